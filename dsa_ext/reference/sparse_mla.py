"""Reference (oracle) for the sparse_mla op family (SPEC section 3, "Sparse MLA attention").

Written for clarity: gather the selected latent rows, score them, mask the invalid ones, take a
softmax, and weight the value part. Computed in float64 (float32 / float64 inputs keep their
precision, so `torch.autograd` through `sparse_mla_fwd` gives the exact backward).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["sparse_mla_fwd", "sparse_mla_bwd", "sparse_mla_valid_mask"]


def sparse_mla_valid_mask(indices: torch.Tensor, num_kv: int,
                          topk_length: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[T, K] bool: entry j of row t takes part in the softmax. An index is valid when
    0 <= idx < num_kv and, with topk_length, j < topk_length[t]."""
    idx = indices[:, 0, :].long()
    valid = (idx >= 0) & (idx < num_kv)
    if topk_length is not None:
        pos = torch.arange(idx.shape[1], device=idx.device)
        valid &= pos[None, :] < topk_length.long().to(idx.device)[:, None]
    return valid


def _forward_math(q, kv, indices, sm_scale, d_v, attn_sink, topk_length):
    """Differentiable forward in q's (float64-promoted) precision: (out, lse), both in the
    compute dtype."""
    T, H, _ = q.shape
    S = kv.shape[0]
    valid = sparse_mla_valid_mask(indices, S, topk_length)              # [T, K]
    safe_idx = torch.where(valid, indices[:, 0, :].long(), 0)            # never reads out of range
    rows = kv[:, 0, :][safe_idx]                                          # [T, K, D]
    scores = torch.einsum("thd,tkd->thk", q, rows) * sm_scale             # [T, H, K]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)                                 # [T, H]; -inf if empty
    denom_log = lse
    if attn_sink is not None:
        # The sink joins the denominator only: log(sum exp(s) + exp(sink)).
        sink = attn_sink.to(scores.dtype)[None, :].expand_as(lse)
        denom_log = torch.logaddexp(lse, sink)
    # Empty rows without a sink: every score and the denominator are -inf; define p = 0 there
    # (out = 0) instead of NaN. A +inf sink makes the denominator +inf: p = 0 (FlashMLA's "that
    # head's output is 0"), lse unaffected. A -inf sink is no sink.
    empty = denom_log == float("-inf")
    p = torch.exp(scores - torch.where(empty, 0.0, denom_log)[..., None])
    p = torch.where(valid[:, None, :], p, 0.0)
    out = torch.einsum("thk,tkd->thd", p, rows[..., :d_v])
    return out, lse


def sparse_mla_fwd(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float,
                   d_v: int = 512, attn_sink: Optional[torch.Tensor] = None,
                   topk_length: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Oracle of `dsa.sparse_mla_fwd`.

    q [T, H, D], kv [S, 1, D], indices [T, 1, K] int32 (-1, negative or >= S: skipped);
    p_j ∝ exp(sm_scale * q[t,h]·kv[idx_j]); out[t,h] = Σ p_j kv[idx_j, :d_v] in q's dtype;
    lse[t,h] = logsumexp of the scaled valid scores (fp32; -inf for a row with no valid
    entry, whose out is 0). attn_sink [H] adds exp(attn_sink[h]) to the denominator only.
    Computed in float64.
    """
    out, lse = _forward_math(q.double(), kv.double(), indices, sm_scale, d_v,
                             None if attn_sink is None else attn_sink.double(), topk_length)
    return out.to(q.dtype), lse.float()


def sparse_mla_bwd(q: torch.Tensor, kv: torch.Tensor, out: torch.Tensor, dout: torch.Tensor,
                   indices: torch.Tensor, lse: torch.Tensor, sm_scale: float, d_v: int = 512,
                   attn_sink: Optional[torch.Tensor] = None,
                   topk_length: Optional[torch.Tensor] = None,
                   deterministic: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Oracle of `dsa.sparse_mla_bwd`: (dq, dkv) in q's / kv's dtype, by float64 autograd of
    the forward. `out`, `lse` and `deterministic` are accepted for signature parity (the
    oracle recomputes the forward and is deterministic anyway)."""
    del out, lse, deterministic
    with torch.enable_grad():
        q64 = q.detach().double().requires_grad_(True)
        kv64 = kv.detach().double().requires_grad_(True)
        o, _ = _forward_math(q64, kv64, indices, sm_scale, d_v,
                             None if attn_sink is None else attn_sink.detach().double(),
                             topk_length)
        dq, dkv = torch.autograd.grad(o, (q64, kv64), dout.double())
    return dq.to(q.dtype), dkv.to(kv.dtype)
