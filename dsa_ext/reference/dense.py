"""The dense, masked formulation of one DeepSeek-V3.2 DSA step (SPEC section 1), in fp64.

Where the sparse ops gather K selected keys per query, this module computes the same step the
way one would write it without any sparsity: the full `[T, S]` indexer score matrix, a boolean
`[T, S]` top-k mask, and softmax attention over all S keys with the unselected ones at `-inf`.
It is the yardstick the sparse references and ops are checked against (tests/test_reference_dense.py,
tests/test_modules.py), so it is written for clarity, not speed: O(T*S) memory.

Causal convention (used by `causal_ranges` and `dsa_step_dense`): the T queries are the last
T positions of an S-token context, so query t sees keys `s < S - T + t + 1`. Prefill from
scratch is T == S (t sees s <= t); one decode step is T == 1 (sees all S keys).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

__all__ = [
    "causal_ranges", "ranges_to_mask", "dense_indexer_logits", "dense_topk_mask",
    "dense_masked_mla_attention", "dsa_step_dense", "DenseDSAStep",
]


def causal_ranges(num_queries: int, num_keys: int, device=None):
    """`(ks, ke)` int32 `[T]`: query t sees keys `ks[t] <= s < ke[t]` = `[0, S - T + t + 1)`."""
    if num_queries > num_keys:
        raise ValueError(f"num_queries ({num_queries}) must be <= num_keys ({num_keys}) for causal ranges")
    ke = torch.arange(num_keys - num_queries + 1, num_keys + 1, dtype=torch.int32, device=device)
    return torch.zeros_like(ke), ke


def ranges_to_mask(ks: torch.Tensor, ke: torch.Tensor, num_keys: int) -> torch.Tensor:
    """Boolean `[T, S]`: True where `ks[t] <= s < ke[t]`."""
    cols = torch.arange(num_keys, device=ks.device)
    return (cols[None, :] >= ks[:, None].long()) & (cols[None, :] < ke[:, None].long())


def dense_indexer_logits(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor,
                         k_scale: Optional[torch.Tensor] = None,
                         valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Lightning-indexer scores `I[t,s] = k_scale[s] * sum_h w[t,h] * relu(q[t,h,:] . k[s,:])`.

    q `[T, H, D]`, k `[S, D]` (dequantised FP8 values, or any float), weights `[T, H]` (the
    caller has folded q's scale and `H**-0.5 * D**-0.5` into it), k_scale `[S]` (optional: pass
    it when k holds the raw FP8 values). `valid` `[T, S]` bool (default: the causal ranges);
    scores outside it are `-inf`. Computed in fp64, returned as fp32 `[T, S]`.
    """
    T, S = q.shape[0], k.shape[0]
    dots = torch.einsum("thd,sd->ths", q.double(), k.double()).clamp_min(0)
    logits = torch.einsum("ths,th->ts", dots, weights.double())
    if k_scale is not None:
        logits = logits * k_scale.double()[None, :]
    if valid is None:
        valid = ranges_to_mask(*causal_ranges(T, S, q.device), S)
    return logits.masked_fill(~valid, float("-inf")).float()


def dense_topk_mask(logits: torch.Tensor, k: int, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean `[T, S]` mask of the k largest `logits[t, :]` among the `valid` columns (default:
    all), with the order of SPEC `topk_indices`: larger value first, ties toward the smaller
    column, NaN below `-inf` (and `-inf` an ordinary candidate). Rows with fewer than k valid
    columns select all of them."""
    T, S = logits.shape
    if valid is None:
        valid = torch.ones(T, S, dtype=torch.bool, device=logits.device)
    cols = torch.arange(S, device=logits.device).expand(T, S)
    # Lexicographic order (class, -value, column) by stable sorts, least significant key first:
    # class 0 = valid number, 1 = valid NaN, 2 = outside the range.
    order = torch.sort(logits.double().nan_to_num(nan=float("-inf")), dim=1, descending=True, stable=True).indices
    klass = torch.where(valid, logits.isnan().long(), torch.full_like(cols, 2))
    order = order.gather(1, torch.sort(klass.gather(1, order), dim=1, stable=True).indices)
    rank = torch.empty_like(order).scatter_(1, order, cols.contiguous())
    return (rank < k) & valid


def dense_masked_mla_attention(q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor, sm_scale: float,
                               d_v: int = 512, attn_sink: Optional[torch.Tensor] = None):
    """Softmax attention of every query over all S latent rows, unselected rows at `-inf`.

    q `[T, H, d_qk]`, kv `[S, 1, d_qk]` or `[S, d_qk]` (one KV head shared by all query heads;
    V = `kv[:, :d_v]`), mask `[T, S]` bool. Returns `out [T, H, d_v]` and natural-log
    `lse [T, H]` of the scaled scores, both fp32 (fp64 inside). A row with nothing selected
    gives out = 0, lse = -inf. `attn_sink [H]` adds `exp(attn_sink[h])` to the denominator only.
    """
    kv = kv.reshape(kv.shape[0], -1).double()
    scores = torch.einsum("thd,sd->ths", q.double(), kv) * sm_scale
    scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)                                  # -inf for empty rows
    denom_lse = lse if attn_sink is None else torch.logaddexp(lse, attn_sink.double()[None, :])
    # Clamping an empty row's -inf keeps exp(-inf - lse) at 0 instead of NaN.
    probs = torch.exp(scores - denom_lse[..., None].clamp_min(torch.finfo(torch.float64).min))
    out = torch.einsum("ths,sd->thd", probs, kv[:, :d_v])
    return out.float(), lse.float()


class DenseDSAStep(NamedTuple):
    out: torch.Tensor       # [T, H, d_v] fp32
    lse: torch.Tensor       # [T, H] fp32
    logits: torch.Tensor    # [T, S] fp32 indexer scores, -inf outside the causal range
    mask: torch.Tensor      # [T, S] bool: the selected keys


def dsa_step_dense(index_q: torch.Tensor, index_k: torch.Tensor, index_weights: torch.Tensor,
                   q: torch.Tensor, kv: torch.Tensor, topk: int, sm_scale: float, d_v: int = 512,
                   index_k_scale: Optional[torch.Tensor] = None,
                   valid: Optional[torch.Tensor] = None) -> DenseDSAStep:
    """One DSA step, densely: indexer scores over the causal range (or `valid`), the top-k mask
    (`min(topk, range)` keys per row), then masked MLA attention. Arguments as in
    `dense_indexer_logits` (index_*) and `dense_masked_mla_attention` (q, kv)."""
    T, S = index_q.shape[0], index_k.shape[0]
    if valid is None:
        valid = ranges_to_mask(*causal_ranges(T, S, index_q.device), S)
    logits = dense_indexer_logits(index_q, index_k, index_weights, index_k_scale, valid)
    mask = dense_topk_mask(logits, topk, valid)
    out, lse = dense_masked_mla_attention(q, kv, mask, sm_scale, d_v)
    return DenseDSAStep(out, lse, logits, mask)
