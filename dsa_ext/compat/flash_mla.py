"""FlashMLA's sparse Python API (``flash_mla/flash_mla_interface.py``, 2026 form) over
``torch.ops.dsa``: ``flash_mla_sparse_fwd``, ``get_mla_metadata``, ``flash_mla_with_kvcache``.

Conventions translated (our ops keep theirs, SPEC section 3):

* lse is the natural-log log-sum-exp of the scaled scores in both APIs (FlashMLA releases
  before 2026-01 returned a base-2 lse from ``flash_mla_sparse_fwd``; this adapter follows the
  current one). A query with no valid index gets lse ``+inf`` here (FlashMLA) where our ops
  return ``-inf``; its output is 0 in both.
* ``flash_mla_with_kvcache`` returns lse as ``[B, H, s_q]`` (a transposed view of a
  ``[B, s_q, H]`` tensor, as FlashMLA returns it).
* ``attn_sink[h] = +inf`` zeroes head h's output (FlashMLA's rule), ``-inf`` means no sink; lse
  never includes the sink.
* ``flash_mla_sparse_fwd`` returns ``(out, max_logits, lse)``. ``max_logits`` (the largest
  scaled score of each row, ``-inf`` for an empty row) is not an output of ``dsa.sparse_mla_fwd``,
  so it is computed by a second ``dsa.sparse_mla_fwd`` pass at a sharpened softmax scale
  (``lse(2**32 * s) / 2**32``: within 2e-9 + fp32 rounding of the max; see ``_max_logits``).
  That doubles the forward's cost; under ``torch.compile`` the pass is removed when the caller
  discards max_logits, and ``dsa_ext.compat.flash_mla.COMPUTE_MAX_LOGITS = False`` skips it
  (max_logits is then None).

Differences a user should know:

* more shapes are served than FlashMLA's kernels take: H a multiple of 16 on CUDA, any H on CPU
  (FlashMLA: 64 or 128), CPU tensors, and ``flash_mla_sparse_fwd`` is differentiable (our sparse
  backward) in q, kv and attn_sink.
* inputs with strides our ops do not take are copied (``.contiguous()``) before the call: q and
  indices cheaply; a V3.2 656-byte cache with padded pages (FlashMLA allows any page pitch)
  entirely. A V4 (MODEL1) 584-byte cache is read in place at any page pitch ``stride(0)``
  (FlashMLA's padded allocation).
* dense attention (``indices=None``) is not served: ``NotImplementedError``.
* ``extra_k_cache`` / ``extra_indices_in_kvcache`` / ``extra_topk_length`` (one softmax over a
  second cache, DeepSeek-V4's window + compressed entries) map onto ``dsa.sparse_mla_decode``'s
  ``extra_kv_cache`` / ``extra_indices`` / ``extra_topk_length``.
* ``FlashMLASchedMeta`` only records the call configuration (FlashMLA's consistency checks);
  its ``tile_scheduler_metadata`` / ``num_splits`` stay ``None``: our decode kernel schedules
  itself from the shapes, without host synchronisation.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..ops.sparse_mla import sparse_mla

__all__ = ["FlashMLASchedMeta", "get_mla_metadata", "flash_mla_with_kvcache",
           "flash_mla_sparse_fwd", "flash_attn_varlen_func", "flash_attn_varlen_qkvpacked_func",
           "flash_attn_varlen_kvpacked_func", "COMPUTE_MAX_LOGITS"]

#: False: ``flash_mla_sparse_fwd`` skips the max_logits pass and returns None in its place
COMPUTE_MAX_LOGITS = True
# lse(lam * s) / lam -> max(s); 2**32 keeps lam * s far inside fp32 range for any score
_MAX_LOGITS_SHARPEN = 2.0 ** 32

_V32_RECORD_BYTES = 656   # 512 e4m3 + 4 fp32 tile scales + 64 bf16 rope
_MODEL1_RECORD_BYTES = 584
_FP8_CACHE_DTYPES = (torch.float8_e4m3fn, torch.int8, torch.uint8)


@dataclasses.dataclass
class FlashMLASchedMeta:
    """Scheduler handle of ``flash_mla_with_kvcache`` (FlashMLA's class, same fields). Here it
    records the first call's configuration so later calls are checked against it, as FlashMLA
    does; the tensor fields stay ``None`` (our kernel needs no precomputed schedule)."""

    @dataclasses.dataclass
    class Config:
        b: int
        s_q: int
        h_q: int
        page_block_size: int
        h_k: int

        causal: bool
        is_fp8_kvcache: bool
        topk: Optional[int]

        extra_page_block_size: Optional[int]
        extra_topk: Optional[int]

    have_initialized: bool = False
    config: Optional[Config] = None
    tile_scheduler_metadata: Optional[Tensor] = None
    num_splits: Optional[Tensor] = None


def get_mla_metadata(*args, **kwargs) -> Tuple[FlashMLASchedMeta, None]:
    """A fresh, empty ``FlashMLASchedMeta`` and ``None`` (FlashMLA's current form; the
    arguments of the old interface are accepted and ignored)."""
    return FlashMLASchedMeta(), None


def _check(cond: bool, msg: str) -> None:
    # FlashMLA's C++ checks (TORCH_CHECK) surface as RuntimeError
    if not cond:
        raise RuntimeError(msg)


def _check_opt(t: Optional[Tensor], name: str, shape: tuple, dtype: torch.dtype,
               device: torch.device) -> None:
    if t is None:
        return
    _check(t.device == device, f"{name} must be on the device of q ({device}), got {t.device}")
    _check(t.dim() == len(shape), f"{name} must have {len(shape)} dimensions, got {t.dim()}")
    _check(t.dtype == dtype, f"{name} must have dtype {dtype}, got {t.dtype}")
    _check(tuple(t.shape) == tuple(shape), f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _flashmla_sink(attn_sink: Optional[Tensor]) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """(sink for our op, mask of +inf-sink heads). FlashMLA defines ``+inf`` as "that head's
    output is 0"; our op is given a finite stand-in there and the head is zeroed after, so the
    result (and its gradient, 0) does not depend on how the op treats an infinite sink."""
    if attn_sink is None:
        return None, None
    zeroed = torch.isposinf(attn_sink)
    return attn_sink.masked_fill(zeroed, 0.0), zeroed


def _flashmla_lse(lse: Tensor) -> Tensor:
    # an empty row: our -inf, FlashMLA's +inf
    return lse.masked_fill(torch.isneginf(lse), float("inf"))


def _max_logits(q: Tensor, kv: Tensor, indices: Tensor, sm_scale: float, d_v: int,
                topk_length: Optional[Tensor]) -> Tensor:
    """Largest scaled score ``sm_scale * q . kv[idx]`` over the valid entries of each
    (token, head); -inf where a row has none.

    Our op returns the log-sum-exp, not the max, so it is run once more at the scale
    ``sm_scale * 2**32``: ``lse(lam * s) / lam`` lies in ``[max s, max s + log(n) / lam]`` for n
    valid entries, i.e. within 2e-9 of the max for n <= 4096 (plus the fp32 rounding of lse,
    ~6e-8 relative), and an empty row stays -inf. This costs one sparse attention pass with
    the op's own score numerics and no scratch beyond its outputs."""
    _, lse = torch.ops.dsa.sparse_mla_fwd(q, kv, indices, sm_scale * _MAX_LOGITS_SHARPEN, d_v,
                                          None, topk_length)
    return lse * (1.0 / _MAX_LOGITS_SHARPEN)


def flash_mla_sparse_fwd(
    q: Tensor,
    kv: Tensor,
    indices: Tensor,
    sm_scale: float,
    d_v: int = 512,
    attn_sink: Optional[Tensor] = None,
    topk_length: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Sparse attention prefill (FlashMLA's signature).

    Args:
        q: ``[s_q, h_q, d_qk]`` bf16, d_qk 576 (V3.2) or 512.
        kv: ``[s_kv, h_kv, d_qk]`` bf16, h_kv = 1.
        indices: ``[s_q, h_kv, topk]`` int32; ``-1`` / negative / ``>= s_kv`` entries are invalid.
        sm_scale: scale of q.k before the softmax.
        d_v: 512.
        attn_sink: optional ``[h_q]`` fp32; the output is multiplied by
            ``exp(lse) / (exp(lse) + exp(attn_sink))``; ``+inf`` zeroes the head, ``-inf`` is no sink.
        topk_length: optional ``[s_q]`` int32; row i uses only ``indices[i, :, :topk_length[i]]``.

    Returns:
        ``(out [s_q, h_q, d_v] bf16, max_logits [s_q, h_q] fp32, lse [s_q, h_q] fp32)``; lse is
        natural-log and ``+inf`` (max_logits ``-inf``, out 0) for a row with no valid index.
        Differentiable in q, kv and attn_sink (out only). max_logits is None when
        ``COMPUTE_MAX_LOGITS`` is False.
    """
    _check(q.dim() == 3, "q must have 3 dimensions")
    _check(kv.dim() == 3, "kv must have 3 dimensions")
    _check(indices.dim() == 3, "indices must have 3 dimensions")
    s_q, h_q, d_qk = q.shape
    s_kv, h_kv = kv.shape[0], kv.shape[1]
    topk = indices.shape[2]
    _check(d_qk in (576, 512), f"Invalid d_qk: {d_qk}")
    _check(d_v == 512, f"Invalid d_v{d_v}")
    for name, t in (("kv", kv), ("indices", indices)):
        _check(t.device == q.device, f"{name} must be on the device of q ({q.device}), got {t.device}")
    _check(q.dtype == torch.bfloat16, f"q must have dtype torch.bfloat16, got {q.dtype}")
    _check(kv.dtype == torch.bfloat16, f"kv must have dtype torch.bfloat16, got {kv.dtype}")
    _check(indices.dtype == torch.int32, f"indices must have dtype torch.int32, got {indices.dtype}")
    _check(tuple(kv.shape) == (s_kv, h_kv, d_qk), f"kv must have shape (s_kv, h_kv, {d_qk})")
    _check(tuple(indices.shape) == (s_q, h_kv, topk), f"indices must have shape ({s_q}, {h_kv}, topk)")
    _check_opt(attn_sink, "attn_sink", (h_q,), torch.float32, q.device)
    _check_opt(topk_length, "topk_length", (s_q,), torch.int32, q.device)
    for name, t in (("q", q), ("kv", kv), ("indices", indices), ("attn_sink", attn_sink),
                    ("topk_length", topk_length)):
        if t is not None:
            _check(t.size(-1) == 1 or t.stride(-1) == 1, f"{name} must have contiguous last dimension")
    _check(h_kv == 1, f"h_kv must be 1 (one latent KV head, as FlashMLA's kernels), got {h_kv}")

    # our op takes dense tensors; FlashMLA takes any leading strides
    q_c, kv_c, idx_c = q.contiguous(), kv.contiguous(), indices.contiguous()
    tl = None if topk_length is None else topk_length.contiguous()
    sink, zeroed = _flashmla_sink(attn_sink)
    out, lse = sparse_mla(q_c, kv_c, idx_c, sm_scale, d_v, sink, tl)
    if zeroed is not None:
        out = out.masked_fill(zeroed[:, None], 0.0)
    max_logits = None
    if COMPUTE_MAX_LOGITS:
        with torch.no_grad():
            max_logits = _max_logits(q_c.detach(), kv_c.detach(), idx_c, sm_scale, d_v, tl)
    return out, max_logits, _flashmla_lse(lse.detach())


def _paged_cache_for_op(k_cache: Tensor, name: str) -> Tensor:
    """FlashMLA's FP8 cache as our op takes it: the uint8 view of a float8/int8 cache. A V4
    (584-byte) cache is read in place at any page pitch; a V3.2 cache with padded pages is
    copied densely (slow for a large cache; lay it out densely to avoid it)."""
    if k_cache.dtype != torch.uint8:
        k_cache = k_cache.view(torch.uint8)
    if k_cache.shape[-1] == _MODEL1_RECORD_BYTES and (k_cache.shape[1] <= 1 or k_cache.stride(1) == _MODEL1_RECORD_BYTES) \
            and k_cache.stride(-1) == 1:
        return k_cache
    return k_cache.contiguous()


def _check_decode_cache(k_cache: Tensor, name: str, d_qk: int, q: Tensor) -> None:
    _check(k_cache.device == q.device, f"{name} must be on the device of q ({q.device}), got {k_cache.device}")
    _check(k_cache.dim() == 4, f"{name} must have 4 dimensions")
    _check(k_cache.dtype in _FP8_CACHE_DTYPES,
           f"{name} must have dtype fp8_e4m3fn, int8 or uint8, got {k_cache.dtype}")
    _check(k_cache.shape[2] == 1,
           "Currently only MQA (i.e. h_kv == 1) is supported for sparse decoding")
    record = _V32_RECORD_BYTES if d_qk == 576 else _MODEL1_RECORD_BYTES
    _check(k_cache.shape[3] == record,
           f"{name} must have shape (num_blocks, page_block_size, 1, {record}), got {tuple(k_cache.shape)}")
    _check(k_cache.shape[1] == 1 or k_cache.stride(1) == record,
           f"The whole block must be contiguous when is_fp8_cache is True for {name}")


def flash_mla_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    block_table: Optional[Tensor],
    cache_seqlens: Optional[Tensor],
    head_dim_v: int,
    tile_scheduler_metadata: FlashMLASchedMeta,
    num_splits: None = None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
    indices: Optional[Tensor] = None,
    attn_sink: Optional[Tensor] = None,
    extra_k_cache: Optional[Tensor] = None,
    extra_indices_in_kvcache: Optional[Tensor] = None,
    topk_length: Optional[Tensor] = None,
    extra_topk_length: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Sparse FP8 decode over a paged MLA cache (FlashMLA's signature; sparse path only).

    Args:
        q: ``[B, s_q, h_q, 576]`` bf16.
        k_cache: ``[num_blocks, page_block_size, 1, 656]`` FP8 records (float8_e4m3fn, int8 or
            uint8 dtype; FlashMLA's V3.2 layout = ours).
        block_table, cache_seqlens: unused by the sparse path (may be None).
        head_dim_v: 512.
        tile_scheduler_metadata: the ``FlashMLASchedMeta`` from ``get_mla_metadata()``; reuse it
            only across calls with the same shapes (checked, as FlashMLA does).
        num_splits: must be None.
        softmax_scale: default ``d_qk ** -0.5``.
        causal: must be False for sparse attention.
        is_fp8_kvcache: must be True for sparse attention.
        indices: ``[B, s_q, topk]`` int32 slot ids ``block * page_block_size + offset``; ``-1``
            (and any id outside the cache) is skipped.
        attn_sink: optional ``[h_q]`` fp32 (``+inf`` zeroes the head).
        extra_k_cache, extra_indices_in_kvcache, extra_topk_length: a second cache and its slot
            ids / lengths joining the same softmax.
        topk_length: optional ``[B]`` int32, only the first topk_length indices of a row are used.

    Returns:
        ``out [B, s_q, h_q, 512]`` bf16 and ``softmax_lse [B, h_q, s_q]`` fp32 (natural log,
        ``+inf`` where a query has no valid index; excludes the sink).
    """
    sched_meta = tile_scheduler_metadata
    indices_in_kvcache = indices
    assert isinstance(sched_meta, FlashMLASchedMeta), "tile_scheduler_metadata must be of type FlashMLASchedMeta"
    assert num_splits is None, "num_splits must be None"

    topk = indices_in_kvcache.shape[-1] if indices_in_kvcache is not None else None
    extra_k_page_block_size = extra_k_cache.shape[1] if extra_k_cache is not None else None
    extra_topk = extra_indices_in_kvcache.shape[-1] if extra_indices_in_kvcache is not None else None
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** (-0.5)

    config = FlashMLASchedMeta.Config(q.shape[0], q.shape[1], q.shape[2], k_cache.shape[1],
                                      k_cache.shape[2], causal, is_fp8_kvcache, topk,
                                      extra_k_page_block_size, extra_topk)
    if not sched_meta.have_initialized:
        if indices_in_kvcache is not None:
            assert not causal, "causal must be False when indices_in_kvcache is not None (i.e. sparse attention is enabled)"
        sched_meta.have_initialized = True
        sched_meta.config = config
    else:
        helper_msg = (" Your input arguments are inconsistent with sched_meta. Please make sure the input "
                      "arguments are consistent across different invocations of flash_mla_with_kvcache on "
                      "the same sched_meta.")
        assert sched_meta.config is not None
        for field in dataclasses.fields(config):
            assert getattr(sched_meta.config, field.name) == getattr(config, field.name), \
                f"sched_meta.config.{field.name} must be equal to {getattr(config, field.name)}." + helper_msg

    if topk is None:
        raise NotImplementedError(
            "flash_mla_with_kvcache: dense attention (indices=None, with block_table / "
            "cache_seqlens) is not served by dsa_ext; pass indices for the sparse path")
    assert not causal, "causal must be False when sparse attention is enabled"
    assert is_fp8_kvcache, "is_fp8_kvcache must be True when sparse attention is enabled"

    _check(q.dim() == 4, "q must have 4 dimensions")
    _check(indices_in_kvcache.dim() == 3, "indices must have 3 dimensions")
    b, s_q, h_q, d_qk = q.shape
    _check(b > 0 and s_q > 0 and h_q > 0, f"q must have non-empty B, s_q and h_q, got {tuple(q.shape)}")
    _check(q.dtype == torch.bfloat16, f"q must have dtype torch.bfloat16, got {q.dtype}")
    _check(d_qk in (576, 512), "Only head_size_k == 576 or 512 is supported for sparse decoding")
    _check(head_dim_v == 512, "Only head_size_v == 512 is supported for sparse decoding")
    _check(topk > 0, f"topk must be > 0, got {topk}")
    if extra_k_cache is not None:
        _check(extra_indices_in_kvcache is not None,
               "extra_indices_in_kvcache must be provided when extra_kcache is provided for sparse attention")
    else:
        _check(extra_indices_in_kvcache is None,
               "extra_indices_in_kvcache must not be provided when extra_k_cache is not provided")
        _check(extra_topk_length is None,
               "extra_topk_length must not be provided when extra_k_cache is not provided")
    _check_decode_cache(k_cache, "k_cache", d_qk, q)
    _check(indices_in_kvcache.device == q.device, "indices must be on the device of q")
    _check(indices_in_kvcache.dtype == torch.int32, f"indices must have dtype torch.int32, got {indices_in_kvcache.dtype}")
    _check(tuple(indices_in_kvcache.shape) == (b, s_q, topk), f"indices must have shape ({b}, {s_q}, topk)")
    _check_opt(topk_length, "topk_length", (b,), torch.int32, q.device)
    _check_opt(attn_sink, "attn_sink", (h_q,), torch.float32, q.device)
    if extra_k_cache is not None:
        _check_decode_cache(extra_k_cache, "extra_k_cache", d_qk, q)
        _check(extra_indices_in_kvcache.device == q.device, "extra_indices_in_kvcache must be on the device of q")
        _check(extra_indices_in_kvcache.dim() == 3, "extra_indices must have 3 dimensions")
        _check(extra_indices_in_kvcache.dtype == torch.int32, "extra_indices must have dtype torch.int32")
        _check(tuple(extra_indices_in_kvcache.shape) == (b, s_q, extra_topk),
               f"extra_indices must have shape ({b}, {s_q}, extra_topk)")
        _check_opt(extra_topk_length, "extra_topk_length", (b,), torch.int32, q.device)
    for name, t in (("q", q), ("indices", indices_in_kvcache), ("extra_indices", extra_indices_in_kvcache)):
        if t is not None:
            _check(t.size(-1) == 1 or t.stride(-1) == 1, f"{name} must have contiguous last dimension")

    q_c = q.contiguous()
    kv = _paged_cache_for_op(k_cache, "k_cache")
    idx = indices_in_kvcache.contiguous()
    tl = None if topk_length is None else topk_length.contiguous()
    sink, zeroed = _flashmla_sink(attn_sink)
    extra = {}
    if extra_k_cache is not None:
        extra = dict(extra_kv_cache=_paged_cache_for_op(extra_k_cache, "extra_k_cache"),
                     extra_indices=extra_indices_in_kvcache.contiguous(),
                     extra_topk_length=None if extra_topk_length is None else extra_topk_length.contiguous())
    out, lse = torch.ops.dsa.sparse_mla_decode(q_c, kv, idx, softmax_scale, head_dim_v, sink, tl, **extra)
    if zeroed is not None:
        out = out.masked_fill(zeroed[:, None], 0.0)
    return out, _flashmla_lse(lse).transpose(1, 2)


def _dense_not_served(name: str):
    def refuse(*args, **kwargs):
        raise NotImplementedError(
            f"flash_mla.{name}: FlashMLA's dense (MHA) prefill is not served by dsa_ext, which "
            "implements the sparse DSA kernels only")
    refuse.__name__ = name
    refuse.__doc__ = f"FlashMLA's dense ``{name}``: not served here (raises NotImplementedError)."
    return refuse


# FlashMLA exports these too; present so that `from flash_mla import ...` lines keep importing
flash_attn_varlen_func = _dense_not_served("flash_attn_varlen_func")
flash_attn_varlen_qkvpacked_func = _dense_not_served("flash_attn_varlen_qkvpacked_func")
flash_attn_varlen_kvpacked_func = _dense_not_served("flash_attn_varlen_kvpacked_func")
