"""FP8 quantisation and the KV caches of DeepSeek Sparse Attention (SPEC sections 2 and 3).

Cache layouts (byte-compatible with DeepGEMM / vLLM / FlashMLA; see
``dsa_ext.reference.cache`` for the byte offsets):

* indexer K cache ``uint8 [num_blocks, block_size, 1, D + 4]``: per block, the FP8 keys of
  every slot, then their fp32 scales;
* MLA cache ``uint8 [num_blocks, block_size, 1, 656]`` (FlashMLA FP8 records) or
  ``bfloat16 [num_blocks, block_size, 1, 576]``;
* DeepSeek-V4 MLA cache ``uint8 [num_blocks, block_size, 1, 584]`` (FlashMLA MODEL1 pages,
  page pitch ``stride(0)``) or ``bfloat16 [num_blocks, block_size, 1, 512]``.

Slot id of (block, offset) is ``block * block_size + offset``. Writers skip negative slots. A
slot at or past ``num_blocks * block_size`` raises ``ValueError`` on the CPU; the CUDA kernels
skip it instead (checking would cost a device synchronisation). A non-negative slot may
appear at most once in one call's ``slot_mapping`` (vLLM's and FlashMLA's writers assume the
same): the CPU raises ``ValueError`` for a repeated slot; the CUDA writers run tokens in
parallel and leave such a record unspecified (it may mix two tokens' values and scales) —
don't. Readers return zeros for
any slot or block id outside the cache. Inputs may be bf16 or fp32; on CUDA an MLA cache must
start on a 16-byte boundary (any whole-block slice of a cache does).

Non-finite values: the abs-max of a group ignores NaN, a NaN value is stored as the e4m3 NaN,
and an infinite value gives its group an infinite scale (the group then reads back as NaN/0).
The sign and payload of NaNs in bf16 outputs are not specified.

Everything here except ``indexer_k_cache_gather`` is free of host synchronisation (CUDA-graph
safe).

Accepted forms (``dsa_ext.ops._accept``): a non-contiguous ``x`` / ``k`` / ``kv`` /
``slot_mapping`` / ``slots`` is copied to a contiguous one; int64 ``block_table`` / ``seq_lens``
are converted to int32; a ``float8_e4m3fn`` cache (FlashMLA's dtype) is viewed as its uint8
bytes. Caches are written in place, so they must be contiguous (never copied).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ._accept import byte_view, dense, int32_index

__all__ = [
    "fp8_quantize", "indexer_k_cache_write", "indexer_k_cache_gather",
    "mla_kv_cache_write", "mla_kv_cache_gather",
]

_MLA_DIM = 576


def fp8_quantize(x: Tensor, block_size: int = 128, ue8m0: bool = True) -> Tuple[Tensor, Tensor]:
    """Quantise ``x [..., D]`` (bf16 / fp32) to ``float8_e4m3fn`` in groups of ``block_size``
    consecutive values of the last dim (DeepSeek ``act_quant``).

    Per group ``s = max(amax, 1e-4) / 448`` (rounded up to a power of two when ``ue8m0``), the
    stored value ``clamp(x / s, -448, 448)`` rounded to nearest-even e4m3.

    Returns ``(x_fp8 [..., D], scale [..., D // block_size] fp32)``, ``x ~= x_fp8 * scale``.
    """
    return torch.ops.dsa.fp8_quantize(dense(x), block_size, ue8m0)


def indexer_k_cache_write(k: Tensor, slot_mapping: Tensor, kv_cache: Tensor,
                          ue8m0: bool = True) -> None:
    """Quantise ``k [N, D]`` (one fp32 scale per token, the :func:`fp8_quantize` rule with
    ``block_size = D``) into the indexer K cache ``uint8 [nb, bs, 1, D + 4]``, in place, at
    ``slot_mapping [N]`` (int64 or int32; negative = skip)."""
    torch.ops.dsa.indexer_k_cache_write(dense(k), dense(slot_mapping), byte_view(kv_cache), ue8m0)


def indexer_k_cache_gather(kv_cache: Tensor, block_table: Tensor,
                           seq_lens: Tensor) -> Tuple[Tensor, Tensor]:
    """The cached keys of every sequence, concatenated (the input of ``indexer_logits``).

    ``block_table [B, max_blocks]`` int32, ``seq_lens [B]`` int32 (each in
    ``[0, max_blocks * block_size]``). Token i of sequence b is read from slot
    ``block_table[b, i // bs] * bs + i % bs``. Returns ``(k_fp8 [sum(seq_lens), D]
    float8_e4m3fn, k_scale [sum(seq_lens)] fp32)``; a token whose block id is outside the cache
    reads as zeros. The output size depends on ``seq_lens``' values, so on CUDA this op
    synchronises once with the host (not CUDA-graph safe).
    """
    return torch.ops.dsa.indexer_k_cache_gather(byte_view(kv_cache), int32_index(block_table),
                                                int32_index(seq_lens))


def mla_kv_cache_write(kv: Tensor, slot_mapping: Tensor, kv_cache: Tensor) -> None:
    """Write ``kv [N, 576]`` (V3.2) or ``kv [N, 512]`` (DeepSeek-V4) (bf16 / fp32) into an MLA
    cache, in place, at ``slot_mapping [N]`` (int64 or int32; negative = skip). A uint8
    ``[nb, bs, 1, 656]`` cache receives FlashMLA V3.2 FP8 records (per 128-value tile
    ``s = 2**ceil(log2(max(amax / 448, 1e-4)))``, fp32 scales, rope kept in bf16); a uint8
    ``[nb, bs, 1, 584]`` cache FlashMLA's MODEL1 (V4) pages (7 tiles of 64 with ue8m0 scales
    after the page's rows; any page pitch ``stride(0) >= bs * 584``, as FlashMLA allocates it);
    a bf16 ``[nb, bs, 1, 576 or 512]`` cache the values rounded to bf16."""
    torch.ops.dsa.mla_kv_cache_write(dense(kv), dense(slot_mapping), byte_view(kv_cache))


def mla_kv_cache_gather(kv_cache: Tensor, slots: Tensor) -> Tensor:
    """The rows of an MLA cache (either model) at ``slots [M]`` (int32 / int64), dequantised:
    ``[M, 1, 576]`` (V3.2) or ``[M, 1, 512]`` (V4) bf16 (``fp8 * scale`` in fp32, rounded to
    bf16). Slots outside the cache (e.g. -1) give zeros."""
    return torch.ops.dsa.mla_kv_cache_gather(byte_view(kv_cache), dense(slots))


# ---- fake (meta) kernels: shapes only, for torch.compile / FakeTensor tracing ----------------
@torch.library.register_fake("dsa::fp8_quantize")
def _fp8_quantize_fake(x, block_size=128, ue8m0=True):
    torch._check(block_size > 0, lambda: f"block_size must be positive, got {block_size}")
    torch._check(x.shape[-1] % block_size == 0,
                 lambda: f"block_size ({block_size}) must divide x.size(-1) ({x.shape[-1]})")
    x_fp8 = x.new_empty(x.shape, dtype=torch.float8_e4m3fn)
    scale = x.new_empty((*x.shape[:-1], x.shape[-1] // block_size), dtype=torch.float32)
    return x_fp8, scale


@torch.library.register_fake("dsa::indexer_k_cache_write")
def _indexer_k_cache_write_fake(k, slot_mapping, kv_cache, ue8m0=True):
    return None


@torch.library.register_fake("dsa::indexer_k_cache_gather")
def _indexer_k_cache_gather_fake(kv_cache, block_table, seq_lens):
    total = torch.library.get_ctx().new_dynamic_size()
    head_dim = kv_cache.shape[-1] - 4
    return (kv_cache.new_empty((total, head_dim), dtype=torch.float8_e4m3fn),
            kv_cache.new_empty((total,), dtype=torch.float32))


@torch.library.register_fake("dsa::mla_kv_cache_write")
def _mla_kv_cache_write_fake(kv, slot_mapping, kv_cache):
    return None


@torch.library.register_fake("dsa::mla_kv_cache_gather")
def _mla_kv_cache_gather_fake(kv_cache, slots):
    dim = 512 if kv_cache.shape[-1] in (512, 584) else _MLA_DIM       # V4 caches: 512 values
    return kv_cache.new_empty((slots.shape[0], 1, dim), dtype=torch.bfloat16)
