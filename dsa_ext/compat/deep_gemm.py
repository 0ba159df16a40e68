"""DeepGEMM's lightning-indexer API (``csrc/apis/attention.hpp``, 2026 form) over
``torch.ops.dsa``: ``fp8_mqa_logits``, ``get_paged_mqa_logits_metadata``,
``fp8_paged_mqa_logits`` and their current names ``fp8_fp4_mqa_logits`` /
``fp8_fp4_paged_mqa_logits`` (q passed as ``(q_fp8, None)``, a ``logits_dtype``).

Semantics (the same as DeepGEMM's): ``logits[t, s] = sum_h weights[t, h] * relu(q[t, h] . k[s]) *
k_scale[s]``, row t covering keys ``cu_seq_len_k_start[t] <= s < cu_seq_len_k_end[t]``.

Conventions kept from DeepGEMM:

* the returned logits are a view whose row stride is 1024-byte aligned: ``[T, S]`` out of a
  ``[align(T, 128 / H), align(S + 256, 256)]`` fp32 buffer (``max_seqlen_k = 0``), or
  ``[T, max_seqlen_k]`` out of ``[.., align(max_seqlen_k, 256)]`` (compressed form: column j of
  row t is key ``cu_seq_len_k_start[t] + j``); paged: ``[B * N, max_context_len]`` out of
  ``[B * N, align(max_context_len, 256)]``. bf16 logits align to 512 elements.
* ``clean_logits=True`` writes ``-inf`` outside each row's range (prefill default); the paged
  default is ``clean_logits=False`` (entries outside the range are then unspecified).
* ``context_lens`` of the paged op: ``[B, N]`` int32, query (b, j) sees positions
  ``< context_lens[b, j]`` (DeepGEMM's current, 2-D form). The 1-D ``[B]`` form of earlier
  DeepGEMM releases (query j sees ``< context_lens[b] - N + 1 + j``) is accepted too.

Differences a user should know:

* the shapes are those of our ops: on CUDA H in {32, 64} and D = 128 (DeepGEMM's SM90 set for
  V3.2) and a paged ``block_kv`` that is a multiple of 4 (DeepGEMM: 64 on SM90); on CPU any H,
  D and block size. Unserved CUDA shapes raise our op's ValueError naming q / kv_cache.
* ``schedule_meta`` is opaque in DeepGEMM and unused here (our paged kernel splits the work
  from the shapes); ``get_paged_mqa_logits_metadata`` returns an int32 ``[num_sms + 1, 2]`` of
  zeros so code that builds and passes it runs unchanged.
* ``clean_logits=True`` is served by the paged op (DeepGEMM refuses it with 2-D context_lens).
* our ops write a dense ``[T, S]`` result, so the adapter copies it into DeepGEMM's aligned
  buffer (one extra pass over the logits); the compressed form (``max_seqlen_k > 0``) is
  gathered from a full ``[T, S]`` intermediate, so it does not save memory here.
* FP4 inputs (``q = (q_fp4, q_sf)``) and the sm100 varlen ``indices`` schedule hint are not
  read by our kernels: FP4 raises ``NotImplementedError``; ``indices`` is checked and ignored
  (each row's context length and block-table row already say what it sees).
* a non-contiguous paged cache (DeepGEMM allows any page pitch) is copied before the call.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["fp8_mqa_logits", "fp8_fp4_mqa_logits", "get_paged_mqa_logits_metadata",
           "fp8_paged_mqa_logits", "fp8_fp4_paged_mqa_logits", "get_num_sms"]

_BLOCK_KV = 256          # DeepGEMM's key tile of the prefill kernel / split of the paged one
_ROW_ALIGN_BYTES = 1024  # DeepGEMM: "Logits row stride must be 1024-byte aligned"


def _assert(cond: bool, what: str) -> None:
    # DeepGEMM's DG_HOST_ASSERT throws a C++ exception that reaches Python as RuntimeError
    if not cond:
        raise RuntimeError(f"Assertion error (dsa_ext.compat.deep_gemm): {what}")


def _align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def get_num_sms() -> int:
    """SM count of the current CUDA device (DeepGEMM's helper); 1 where there is no GPU."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return 1


def _logits_buffer(rows: int, aligned_rows: int, cols: int, padded_cols: int,
                   dtype: torch.dtype, device: torch.device) -> Tensor:
    stride = _align(padded_cols, _ROW_ALIGN_BYTES // dtype.itemsize)
    return torch.empty((aligned_rows, stride), dtype=dtype, device=device)[:rows, :cols]


def _fp8_q(q, fn: str) -> Tensor:
    if isinstance(q, (tuple, list)):
        _assert(len(q) == 2, f"{fn}: q must be a tensor or a (values, scales) pair")
        q_fp, q_sf = q
        if q_sf is not None:
            raise NotImplementedError(
                f"{fn}: FP4 queries (q = (q_fp4, q_sf) with q_sf given) are not served by "
                "dsa_ext; pass FP8 queries as (q_fp8, None)")
        return q_fp
    return q


def _check_logits_dtype(logits_dtype: torch.dtype, weights: Tensor) -> None:
    _assert(logits_dtype in (torch.float32, torch.bfloat16),
            f"logits_dtype == torch::kFloat32 or logits_dtype == torch::kBFloat16 (got {logits_dtype})")
    _assert(weights.dtype == torch.float32 or weights.dtype == torch.bfloat16,
            f"weights.scalar_type() == torch::kFloat (got {weights.dtype})")
    _assert(weights.dtype != torch.bfloat16 or logits_dtype == torch.bfloat16,
            "weights.scalar_type() != torch::kBFloat16 or logits_dtype == torch::kBFloat16")


def fp8_fp4_mqa_logits(q, kv: Tuple[Tensor, Tensor], weights: Tensor,
                       cu_seq_len_k_start: Tensor, cu_seq_len_k_end: Tensor,
                       clean_logits: bool = True, max_seqlen_k: int = 0,
                       logits_dtype: torch.dtype = torch.float32) -> Tensor:
    """Indexer logits of a ragged prefill batch (DeepGEMM's signature).

    Args:
        q: ``(q_fp8 [T, H, D] float8_e4m3fn, None)`` (or the tensor alone).
        kv: ``(k_fp8 [S, D] float8_e4m3fn, k_scale [S] fp32)``.
        weights: ``[T, H]`` fp32 (unit column stride).
        cu_seq_len_k_start, cu_seq_len_k_end: ``[T]`` int32, row t sees keys
            ``start[t] <= s < end[t]``.
        clean_logits: ``-inf`` outside each row's range (not allowed with ``max_seqlen_k``).
        max_seqlen_k: 0 for ``[T, S]`` logits; else ``[T, max_seqlen_k]`` with column j of row t
            holding key ``start[t] + j`` (entries past ``end[t] - start[t]`` unspecified).
        logits_dtype: torch.float32 or torch.bfloat16.

    Returns:
        the logits view described in the module docstring.
    """
    fn = "fp8_mqa_logits"
    q_fp = _fp8_q(q, fn)
    _assert(isinstance(kv, (tuple, list)) and len(kv) == 2, "kv must be a (k_fp8, k_scale) pair")
    k_fp, k_sf = kv
    _assert(q_fp.dim() == 3, f"q must be 3-D [seq_len, num_heads, head_dim], got {q_fp.dim()}-D")
    T, H, D = q_fp.shape
    _assert(q_fp.is_contiguous(), "q_fp.is_contiguous()")
    _assert(q_fp.dtype == torch.float8_e4m3fn, f"q_fp.scalar_type() == torch::kFloat8_e4m3fn (got {q_fp.dtype})")
    _assert(k_fp.dim() == 2 and k_fp.shape[1] == D, f"kv_fp must be [seq_len_kv, {D}], got {tuple(k_fp.shape)}")
    _assert(k_fp.is_contiguous(), "kv_fp.is_contiguous()")
    _assert(k_fp.dtype == torch.float8_e4m3fn, f"kv_fp.scalar_type() == torch::kFloat8_e4m3fn (got {k_fp.dtype})")
    S = k_fp.shape[0]
    _assert(k_sf.dim() == 1 and k_sf.shape[0] == S, f"kv_sf must be [{S}], got {tuple(k_sf.shape)}")
    _assert(k_sf.is_contiguous(), "kv_sf.is_contiguous()")
    _assert(k_sf.dtype == torch.float32, f"kv_sf.scalar_type() == torch::kFloat (got {k_sf.dtype})")
    _assert(weights.dim() == 2 and tuple(weights.shape) == (T, H),
            f"weights must be [{T}, {H}], got {tuple(weights.shape)}")
    _assert(weights.stride(1) == 1, "weights.stride(1) == 1")
    _check_logits_dtype(logits_dtype, weights)
    for name, t in (("cu_seq_len_k_start", cu_seq_len_k_start), ("cu_seq_len_k_end", cu_seq_len_k_end)):
        _assert(t.dim() == 1 and t.shape[0] == T, f"{name}.size(0) == seq_len ({T})")
        _assert(t.is_contiguous(), f"{name}.is_contiguous()")
        _assert(t.dtype == torch.int32, f"{name}.scalar_type() == torch::kInt (got {t.dtype})")
    _assert(max_seqlen_k >= 0, f"max_seqlen_k must be >= 0, got {max_seqlen_k}")
    if max_seqlen_k != 0:
        _assert(not clean_logits, "not clean_logits (the compressed form, max_seqlen_k > 0)")

    block_q = 128 // H if 128 % H == 0 else 1
    logits_rows = _align(T, block_q)
    full = torch.ops.dsa.indexer_logits(q_fp, k_fp, k_sf, weights.float().contiguous(),
                                        cu_seq_len_k_start, cu_seq_len_k_end, clean_logits)
    if max_seqlen_k == 0:
        logits = _logits_buffer(T, logits_rows, S, S + _BLOCK_KV, logits_dtype, q_fp.device)
        logits.copy_(full)
        return logits
    # compressed form: row t, column j <- key ks[t] + j (our op has no such output: gather)
    cols = cu_seq_len_k_start.long()[:, None] + torch.arange(max_seqlen_k, device=q_fp.device)
    in_row = cols < cu_seq_len_k_end.long()[:, None]
    picked = full.gather(1, cols.clamp(0, max(S - 1, 0))) if S > 0 else full.new_zeros((T, max_seqlen_k))
    logits = _logits_buffer(T, logits_rows, max_seqlen_k, _align(max_seqlen_k, _BLOCK_KV),
                            logits_dtype, q_fp.device)
    logits.copy_(picked.masked_fill(~in_row, float("-inf")))
    return logits


def fp8_mqa_logits(q: Tensor, kv: Tuple[Tensor, Tensor], weights: Tensor,
                   cu_seq_len_k_start: Tensor, cu_seq_len_k_end: Tensor,
                   clean_logits: bool = True, max_seqlen_k: int = 0) -> Tensor:
    """DeepGEMM's FP8 prefill indexer logits (fp32 output); see ``fp8_fp4_mqa_logits``."""
    return fp8_fp4_mqa_logits((q, None), kv, weights, cu_seq_len_k_start, cu_seq_len_k_end,
                              clean_logits, max_seqlen_k, torch.float32)


def _check_context_lens(context_lens: Tensor) -> None:
    _assert(context_lens.dim() in (1, 2), f"context_lens must be [B] or [B, next_n], got {context_lens.dim()}-D")
    _assert(context_lens.dtype == torch.int32, f"context_lens.scalar_type() == torch::kInt (got {context_lens.dtype})")
    _assert(context_lens.is_contiguous(), "context_lens.is_contiguous()")


def _check_varlen_indices(indices: Optional[Tensor], batch: int) -> None:
    if indices is None:
        return
    _assert(indices.dim() == 1 and indices.shape[0] == batch,
            f"indices_tensor.dim() == 1 and indices_tensor.size(0) == batch_size ({batch})")
    _assert(indices.is_contiguous(), "indices_tensor.is_contiguous()")
    _assert(indices.dtype == torch.int32, "indices_tensor.scalar_type() == torch::kInt")


def get_paged_mqa_logits_metadata(context_lens: Tensor, block_kv: int, num_sms: int,
                                  indices: Optional[Tensor] = None) -> Tensor:
    """DeepGEMM's scheduler metadata: an int32 ``[num_sms + 1, 2]`` tensor on context_lens'
    device. Opaque to callers; our paged kernel does not read it, so it is zeros here."""
    _check_context_lens(context_lens)
    _assert(block_kv > 0, f"block_kv must be > 0, got {block_kv}")
    _assert(num_sms > 0, f"num_sms must be > 0, got {num_sms}")
    _check_varlen_indices(indices, context_lens.shape[0])
    return torch.zeros((num_sms + 1, 2), dtype=torch.int32, device=context_lens.device)


def fp8_fp4_paged_mqa_logits(q, kv_cache: Tensor, weights: Tensor, context_lens: Tensor,
                             block_table: Tensor, schedule_meta: Tensor, max_context_len: int,
                             clean_logits: bool = False, logits_dtype: torch.dtype = torch.float32,
                             indices: Optional[Tensor] = None) -> Tensor:
    """Indexer logits of decode queries over the paged indexer K cache (DeepGEMM's signature).

    Args:
        q: ``(q_fp8 [B, N, H, D] float8_e4m3fn, None)`` (or the tensor alone).
        kv_cache: ``uint8 [num_blocks, block_kv, 1, D + 4]`` (per block: the FP8 keys, then the
            fp32 scales; the vLLM / DeepGEMM layout = ours).
        weights: ``[B * N, H]`` fp32, contiguous.
        context_lens: ``[B, N]`` int32 visible length of each query, or ``[B]`` (see module doc).
        block_table: ``[B, max_blocks]`` int32, unit column stride.
        schedule_meta: from ``get_paged_mqa_logits_metadata`` (int32 ``[*, 2]``; not read).
        max_context_len: columns of the result.
        clean_logits: ``-inf`` outside each query's visible range.
        logits_dtype: torch.float32 or torch.bfloat16.
        indices: sm100 varlen schedule hint ``[B]`` int32 (checked, not needed here).

    Returns:
        ``[B * N, max_context_len]`` view of a 1024-byte-row-aligned buffer.
    """
    fn = "fp8_paged_mqa_logits"
    q_fp = _fp8_q(q, fn)
    _assert(q_fp.dim() == 4, f"q must be 4-D [batch_size, next_n, num_heads, head_dim], got {q_fp.dim()}-D")
    B, N, H, D = q_fp.shape
    _assert(N >= 1, "next_n >= 1")
    _assert(q_fp.is_contiguous(), "q_fp.is_contiguous()")
    _assert(q_fp.dtype == torch.float8_e4m3fn, f"q_fp.scalar_type() == torch::kFloat8_e4m3fn (got {q_fp.dtype})")
    _assert(kv_cache.dim() == 4, f"fused_kv_cache must be 4-D, got {kv_cache.dim()}-D")
    _assert(kv_cache.shape[2] == 1 and kv_cache.shape[3] == D + 4,
            f"fused_kv_cache: num_heads_kv == 1 and head_dim_with_sf == head_dim + sizeof(float) "
            f"({D + 4}), got {tuple(kv_cache.shape)}")
    _assert(kv_cache.shape[1] == 1 or kv_cache.stride(1) == D + 4, "fused_kv_cache.stride(1) == head_dim_with_sf")
    _assert(kv_cache.stride(3) == 1, "fused_kv_cache.stride(3) == 1")
    _assert(kv_cache.dtype == torch.uint8, f"fused_kv_cache.scalar_type() == torch::kByte (got {kv_cache.dtype})")
    _assert(weights.is_contiguous(), "weights.is_contiguous()")
    _assert(weights.dim() == 2 and tuple(weights.shape) == (B * N, H),
            f"weights must be [{B * N}, {H}], got {tuple(weights.shape)}")
    _check_logits_dtype(logits_dtype, weights)
    _assert(block_table.dim() == 2 and block_table.shape[0] == B, f"block_table must be [{B}, max_blocks]")
    _assert(block_table.shape[1] <= 1 or block_table.stride(1) == 1, "block_table.stride(1) == 1")
    _assert(block_table.dtype == torch.int32, f"block_table.scalar_type() == torch::kInt (got {block_table.dtype})")
    _check_varlen_indices(indices, B)
    _assert(schedule_meta.dim() == 2 and schedule_meta.shape[1] == 2, "schedule_meta must be [num_sms + 1, 2]")
    _assert(schedule_meta.is_contiguous(), "schedule_meta.is_contiguous()")
    _assert(schedule_meta.dtype == torch.int32, "schedule_meta.scalar_type() == torch::kInt")
    _check_context_lens(context_lens)
    _assert(context_lens.shape[0] == B and (context_lens.dim() == 1 or context_lens.shape[1] == N),
            f"context_lens must be [{B}] or [{B}, {N}], got {tuple(context_lens.shape)}")
    _assert(max_context_len >= 0, f"max_context_len must be >= 0, got {max_context_len}")

    # DeepGEMM takes any page pitch; our op reads dense pages (a padded cache is copied)
    full = torch.ops.dsa.paged_indexer_logits(q_fp, kv_cache.contiguous(), weights.float(),
                                              context_lens, block_table, max_context_len,
                                              clean_logits)
    logits = _logits_buffer(B * N, B * N, max_context_len, _align(max_context_len, _BLOCK_KV),
                            logits_dtype, q_fp.device)
    logits.copy_(full)
    return logits


def fp8_paged_mqa_logits(q: Tensor, kv_cache: Tensor, weights: Tensor, context_lens: Tensor,
                         block_table: Tensor, schedule_meta: Tensor, max_context_len: int,
                         clean_logits: bool = False, indices: Optional[Tensor] = None) -> Tensor:
    """DeepGEMM's FP8 paged indexer logits (fp32 output); see ``fp8_fp4_paged_mqa_logits``."""
    return fp8_fp4_paged_mqa_logits((q, None), kv_cache, weights, context_lens, block_table,
                                    schedule_meta, max_context_len, clean_logits, torch.float32,
                                    indices)
