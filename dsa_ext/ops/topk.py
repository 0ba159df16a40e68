"""topk op family: exact top-k selection over indexer logits, slot-id mapping, and the fused
indexer + top-k with a bounded workspace (SPEC section 3).

Selection rule (every op here, every device): the k largest fp32 values of a row within
``[ks[t], ke[t])``; equal values are taken in ascending column order, so the selected set is
fully determined; -0.0 equals +0.0; NaN ranks below -inf; -inf inside the range is an ordinary
candidate. ``ks``/``ke`` are clamped to ``[0, S]`` and an inverted range is empty. A row with
fewer than k columns in range returns all of them, then -1.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._accept import dense, fp8_view, int32_index, scale_vector

__all__ = ["topk_indices", "topk_slot_ids", "indexer_topk"]

#: largest k served by the CUDA kernel (the CPU kernel takes any k >= 1)
MAX_K_CUDA = 4096


def topk_indices(logits: torch.Tensor, k: int, ks: Optional[torch.Tensor] = None,
                 ke: Optional[torch.Tensor] = None, sorted: bool = False) -> torch.Tensor:
    """Columns of the k largest logits of each row.

    Args:
        logits: ``[T, S]`` float32, any strides: a row stride (e.g. a view of the first S
            columns of a wider buffer) is read without a copy; a column stride other than 1
            (``x[:, ::2]``, a transpose) is copied to a contiguous tensor first.
        k: number of columns to select, ``>= 1`` (``<= 4096`` on CUDA).
        ks, ke: optional ``[T]`` int32 or int64, row t considers columns ``ks[t] <= s < ke[t]``
            (default: the whole row); values are clamped to ``[0, S]``.
        sorted: if True, each row is ordered by descending value, ties by ascending column;
            otherwise the order within a row is unspecified (the set is not).

    Returns:
        ``[T, k]`` int32 column indices, ``-1`` where a row has fewer than k columns in range.
    """
    if logits.dim() == 2 and logits.shape[1] > 1 and logits.stride(1) != 1:
        logits = logits.contiguous()
    return torch.ops.dsa.topk_indices(logits, k, int32_index(ks), int32_index(ke), sorted)


def topk_slot_ids(indices: torch.Tensor, block_table: torch.Tensor, block_size: int) -> torch.Tensor:
    """Map selected token positions to global paged-cache slot ids (for decode).

    Args:
        indices: ``[R, K]`` or ``[B, N, K]`` int32 (or int64) token positions (e.g. from
            :func:`topk_indices`); a non-contiguous view is copied.
        block_table: ``[B, max_blocks]`` int32 (or int64) physical block ids; ``R % B == 0`` and row r of
            the ``[R, K]`` view of ``indices`` belongs to sequence ``b = r // (R // B)``
            (R = B * N for N query tokens per sequence, as in ``paged_indexer_logits``'
            ``[B*N, ...]`` rows); a 3-D ``indices`` must have ``size(0) == B``.
        block_size: tokens per cache block.

    Returns:
        int32 of the shape of ``indices``:
        ``block_table[b, idx // block_size] * block_size + idx % block_size``.
        ``-1`` stays ``-1``; a negative position, a position whose block lies past the table,
        a negative block-table entry, or a slot id that does not fit int32 also gives ``-1``.
    """
    return torch.ops.dsa.topk_slot_ids(int32_index(indices), int32_index(block_table), block_size)


def indexer_topk(q: torch.Tensor, k: torch.Tensor, k_scale: torch.Tensor, weights: torch.Tensor,
                 ks: torch.Tensor, ke: torch.Tensor, topk: int, sorted: bool = False,
                 max_workspace_bytes: int = 256 * 1024 * 1024) -> torch.Tensor:
    """Lightning-indexer logits followed by top-k without holding the full ``[T, S]`` matrix.

    Same inputs as ``indexer_logits`` (q ``[T, H, D]`` FP8, k ``[S, D]`` FP8, k_scale ``[S]``,
    weights ``[T, H]``, ks/ke ``[T]`` int32). Rows are processed in chunks whose fp32 logits fit
    ``max_workspace_bytes`` (at least one row at a time). Accepts the forms
    ``indexer_logits`` accepts (uint8 bytes for FP8, ``[S, 1]`` k_scale, int64 ks/ke,
    non-contiguous views, copied). Returns exactly
    ``topk_indices(indexer_logits(q, k, k_scale, weights, ks, ke), topk, ks, ke, sorted)``:
    ``[T, topk]`` int32. MXFP4 keys (``k [S, D/2]`` / ``k_scale [S, D/32]`` uint8, as
    ``indexer_logits`` takes them; SPEC 10.5) are passed through as such.
    """
    from .indexer import _MXFP4_SCALE_DTYPES, _mxfp4_bytes
    if k_scale.dtype in _MXFP4_SCALE_DTYPES:
        return torch.ops.dsa.indexer_topk(fp8_view(q), _mxfp4_bytes(k), _mxfp4_bytes(k_scale),
                                          dense(weights), int32_index(ks), int32_index(ke), topk,
                                          sorted, max_workspace_bytes)
    return torch.ops.dsa.indexer_topk(fp8_view(q), fp8_view(k), scale_vector(k_scale),
                                      dense(weights), int32_index(ks), int32_index(ke), topk,
                                      sorted, max_workspace_bytes)


def _check_k(k: int) -> None:
    torch._check(k >= 1, lambda: f"k must be >= 1, got {k}")


@torch.library.register_fake("dsa::topk_indices")
def _topk_indices_fake(logits, k, ks=None, ke=None, sorted=False):
    torch._check(logits.dim() == 2, lambda: f"logits must be 2-D [T, S], got {logits.dim()}-D")
    torch._check(logits.dtype == torch.float32, lambda: f"logits must be float32, got {logits.dtype}")
    _check_k(k)
    return logits.new_empty((logits.shape[0], k), dtype=torch.int32)


@torch.library.register_fake("dsa::topk_slot_ids")
def _topk_slot_ids_fake(indices, block_table, block_size):
    torch._check(indices.dim() in (2, 3),
                 lambda: f"indices must be 2-D [R, K] or 3-D [B, N, K], got {indices.dim()}-D")
    torch._check(indices.dtype == torch.int32, lambda: f"indices must be int32, got {indices.dtype}")
    return torch.empty_like(indices, memory_format=torch.contiguous_format)


@torch.library.register_fake("dsa::indexer_topk")
def _indexer_topk_fake(q, k, k_scale, weights, ks, ke, topk, sorted=False,
                       max_workspace_bytes=256 * 1024 * 1024):
    torch._check(q.dim() == 3, lambda: f"q must be 3-D [T, H, D], got {q.dim()}-D")
    torch._check(topk >= 1, lambda: f"topk must be >= 1, got {topk}")
    return q.new_empty((q.shape[0], topk), dtype=torch.int32)
