"""Reference (oracle) for the topk op family: exact, written for clarity, not speed.

Ordering used by every top-k here (SPEC section 3):
  * larger value first; -0.0 and +0.0 are equal values;
  * equal values: smaller column index first (so the selected set is fully determined);
  * NaN ranks below -inf (all NaNs equal each other); -inf is an ordinary candidate.
Row t considers only columns ks[t] <= s < ke[t]; ks/ke are clamped to [0, S] (an empty or
inverted range selects nothing). A row with fewer than k columns in range returns all of them
(in the order above), then -1.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["topk_order_key", "topk_indices", "topk_slot_ids", "indexer_topk"]

_NAN_KEY = -(2**31) - 1          # below every non-NaN key (the smallest, -inf, is -0x7F800000)
_OUT_OF_RANGE_KEY = -(2**40)     # below NaN: never selected


def topk_order_key(x: torch.Tensor) -> torch.Tensor:
    """int64 key with the same order as the fp32 values, -0.0 == +0.0, NaN below -inf."""
    bits = x.float().contiguous().view(torch.int32).to(torch.int64)
    magnitude = bits & 0x7FFFFFFF
    key = torch.where(bits >= 0, magnitude, -magnitude)  # -0.0 and +0.0 both give 0
    return torch.where(torch.isnan(x.float()), torch.full_like(key, _NAN_KEY), key)


def _row_ranges(T: int, S: int, ks: Optional[torch.Tensor], ke: Optional[torch.Tensor]):
    lo = torch.zeros(T, dtype=torch.int64) if ks is None else ks.cpu().to(torch.int64).clamp(0, S)
    hi = torch.full((T,), S, dtype=torch.int64) if ke is None else ke.cpu().to(torch.int64).clamp(0, S)
    return lo, torch.maximum(hi, lo)


def topk_indices(logits: torch.Tensor, k: int, ks: Optional[torch.Tensor] = None,
                 ke: Optional[torch.Tensor] = None, sorted: bool = False) -> torch.Tensor:
    """[T, k] int32 columns of the k largest values of each row within [ks[t], ke[t]).

    Always returns the sorted order (descending value, ascending index), which is also a valid
    unsorted answer; compare unsorted results as sets.
    """
    del sorted  # the reference always sorts
    T, S = logits.shape
    x = logits.detach().cpu().float()
    key = topk_order_key(x)
    lo, hi = _row_ranges(T, S, ks, ke)
    cols = torch.arange(S, dtype=torch.int64)
    in_range = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])
    key = torch.where(in_range, key, torch.full_like(key, _OUT_OF_RANGE_KEY))
    # Stable ascending sort of -key keeps equal keys in ascending column order.
    order = torch.sort(-key, dim=1, stable=True).indices
    out = torch.full((T, k), -1, dtype=torch.int32)
    count = (hi - lo).clamp(max=k)
    for t in range(T):
        n = int(count[t])
        out[t, :n] = order[t, :n].to(torch.int32)
    return out.to(logits.device)


def topk_slot_ids(indices: torch.Tensor, block_table: torch.Tensor, block_size: int) -> torch.Tensor:
    """Map token positions to global cache slot ids through a block table.

    indices [R, K] (or [B, N, K], R = B * N) int32 positions; block_table [B, M] int32 with
    R % B == 0: row r of the [R, K] view belongs to sequence b = r // (R // B) (R = B * N for N
    query tokens per sequence). Returns int32 of the shape of indices:
    `block_table[b, idx // block_size] * block_size + idx % block_size`; -1 (and any negative
    position, any position whose block lies past the table, any negative block-table entry, any
    slot id that does not fit int32) gives -1.
    """
    shape = indices.shape
    K = shape[-1]
    R = indices.numel() // K if K else (shape[0] if indices.dim() == 2 else shape[0] * shape[1])
    B, M = block_table.shape
    idx = indices.cpu().to(torch.int64).reshape(R, K)
    table = block_table.cpu().to(torch.int64)
    rows_per_seq = R // B if B > 0 else 1
    b = (torch.arange(R) // max(rows_per_seq, 1))[:, None].expand(R, K)
    blk = idx.div(block_size, rounding_mode="floor")
    valid = (idx >= 0) & (blk < M)
    blk_c = torch.where(valid, blk, torch.zeros_like(blk))
    phys = table[b, blk_c] if M > 0 else torch.zeros_like(blk)
    valid = valid & (phys >= 0)
    slot = phys * block_size + idx.remainder(block_size)
    valid = valid & (slot < 2**31)
    out = torch.where(valid, slot, torch.full_like(slot, -1)).to(torch.int32)
    return out.reshape(shape).to(indices.device)


def indexer_topk(q, k, k_scale, weights, ks, ke, topk: int, sorted: bool = False,
                 max_workspace_bytes: int = 256 * 1024 * 1024) -> torch.Tensor:
    """topk_indices(indexer_logits(q, k, k_scale, weights, ks, ke), topk, ks, ke, sorted)."""
    from .indexer import indexer_logits  # written by the indexer family; imported lazily

    del max_workspace_bytes  # the oracle holds the full [T, S] matrix
    logits = indexer_logits(q, k, k_scale, weights, ks, ke, clean_logits=True)
    return topk_indices(logits, topk, ks, ke, sorted)
