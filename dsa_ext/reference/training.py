"""Reference (oracle) for the training op family (SPEC section 7): the indexer in training
precision with its backward, the main attention's target over the selected entries, and the
KL alignment losses of the sparse stage and of the dense warm-up.

Written for clarity, in float64, with every intermediate materialised (the dense loss builds
[T, S] and [T, Hm, S]: an oracle for small sizes only). Gradients come from float64 autograd
through the formulas below.

    I[t, s] = sum_h w[t, h] * relu(q[t, h] . k[s])                 over ks[t] <= s < ke[t]
    p[t, s] = (1/Hm) sum_h softmax_s(sm_scale * q_main[t, h] . kv_main[s])   (target)
    r[t, s] = softmax_s(I[t, s])                                    (prediction)
    L       = sum_t sum_s p log(p / r)        (0 log 0 = 0; "mean" divides by the non-empty rows)

Conventions shared with the kernels: ks/ke are clamped to [0, S]; a selected index that is -1,
negative, >= S, or at a position j >= topk_length[t] is invalid (skipped, never read);
duplicates count once per occurrence. Logits and losses are float32 (float64 for float64 q).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .dense import ranges_to_mask
from .sparse_mla import sparse_mla_valid_mask

__all__ = [
    "indexer_train_logits",
    "indexer_train_logits_bwd",
    "sparse_attention_target",
    "indexer_kl_loss_sparse",
    "indexer_kl_loss_dense",
    "row_range_mask",
    "kl_rows",
]


def _gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """x[idx] for idx [T, K] whose invalid entries were set to 0 (zeros when x has no row)."""
    if x.shape[0] == 0:
        return x.new_zeros((*idx.shape, *x.shape[1:]))
    return x[idx]


def _out_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


# [T, S] bool: key s is in row t's range ks[t] <= s < ke[t] (clamping the bounds to [0, S]
# changes nothing for s in [0, S)).
row_range_mask = ranges_to_mask


def _train_logits_math(q: Tensor, k: Tensor, w: Tensor) -> Tensor:
    """Unmasked [T, S] logits sum_h w * relu(q . k), differentiable, in the inputs' dtype."""
    scores = torch.einsum("thd,sd->ths", q, k)
    return torch.einsum("th,ths->ts", w, torch.relu(scores))


def indexer_train_logits(q: Tensor, k: Tensor, weights: Tensor, ks: Tensor,
                         ke: Tensor) -> Tensor:
    """Oracle of `dsa.indexer_train_logits`: ``[T, S]``, -inf outside each row's range."""
    logits = _train_logits_math(q.double(), k.double(), weights.double())
    logits = logits.masked_fill(~row_range_mask(ks, ke, k.shape[0]), float("-inf"))
    return logits.to(_out_dtype(q))


def indexer_train_logits_bwd(grad: Tensor, q: Tensor, k: Tensor, weights: Tensor, ks: Tensor,
                             ke: Tensor, deterministic: bool = False
                             ) -> Tuple[Tensor, Tensor, Tensor]:
    """Oracle of `dsa.indexer_train_logits_bwd`: (dq, dk, dw) in the dtypes of q, k, weights.
    Entries of ``grad`` outside a row's range are ignored. ``deterministic`` is accepted for
    signature parity."""
    del deterministic
    g = torch.where(row_range_mask(ks, ke, k.shape[0]), grad.double(), 0.0)
    with torch.enable_grad():
        q64 = q.detach().double().requires_grad_(True)
        k64 = k.detach().double().requires_grad_(True)
        w64 = weights.detach().double().requires_grad_(True)
        dq, dk, dw = torch.autograd.grad(_train_logits_math(q64, k64, w64), (q64, k64, w64), g)
    return dq.to(q.dtype), dk.to(k.dtype), dw.to(weights.dtype)


def sparse_attention_target(q: Tensor, kv: Tensor, indices: Tensor, lse: Tensor,
                            sm_scale: float, topk_length: Optional[Tensor] = None) -> Tensor:
    """Oracle of `dsa.sparse_attention_target`: ``[T, K]`` float32 head-averaged probabilities
    ``(1/H) sum_h exp(sm_scale * q[t,h] . kv[idx_j] - lse[t,h])``; 0 at invalid entries and for
    heads whose lse is -inf. With sparse_mla_fwd's lse (which excludes an attention sink) a row
    sums to 1 over its valid entries: the sink is left out and p renormalised (SPEC 7)."""
    T, H, _ = q.shape
    valid = sparse_mla_valid_mask(indices, kv.shape[0], topk_length)           # [T, K]
    rows = _gather_rows(kv[:, 0, :].double(), torch.where(valid, indices[:, 0, :].long(), 0))
    scores = torch.einsum("thd,tkd->thk", q.double(), rows) * sm_scale
    lse64 = lse.double()
    live = torch.isfinite(lse64)[..., None] & valid[:, None, :]                 # [T, H, K]
    probs = torch.where(live, torch.exp(scores - torch.where(live, lse64[..., None], 0.0)), 0.0)
    return (probs.sum(dim=1) / H).float()


def kl_rows(p: Tensor, log_r: Tensor, mask: Tensor) -> Tensor:
    """Per-row ``sum_s p log(p / r)`` over ``mask`` with 0 log 0 = 0 (p, log_r, mask [T, N])."""
    safe_p = torch.where(p > 0, p, 1.0)
    terms = torch.where(mask & (p > 0), p * (torch.log(safe_p) - log_r), 0.0)
    return terms.sum(dim=-1)


def _log_softmax_masked(logits: Tensor, mask: Tensor) -> Tensor:
    """log softmax over the masked entries of each row (rows with no entry: all -inf)."""
    x = logits.masked_fill(~mask, float("-inf"))
    # An empty row's logsumexp would be -inf with a NaN gradient: take it over zeros instead.
    lse = torch.logsumexp(torch.where(mask.any(dim=-1, keepdim=True), x, 0.0), dim=-1,
                          keepdim=True)
    return x - lse


def _reduce(per_row: Tensor, nonempty: Tensor, reduction: str) -> Tensor:
    if reduction not in ("sum", "mean"):
        raise ValueError(f'reduction must be "sum" or "mean", got "{reduction}"')
    total = per_row.sum()
    if reduction == "mean":
        total = total / max(int(nonempty.sum()), 1)
    return total


def _sparse_loss_math(q, k, w, indices, target, topk_length, reduction):
    S = k.shape[0]
    valid = sparse_mla_valid_mask(indices, S, topk_length)                     # [T, K]
    idx = torch.where(valid, indices[:, 0, :].long(), 0)
    scores = torch.einsum("thd,tkd->thk", q, _gather_rows(k, idx))              # [T, H, K]
    logits = torch.einsum("th,thk->tk", w, torch.relu(scores))                  # [T, K]
    log_r = _log_softmax_masked(logits, valid)
    p = torch.where(valid, target, 0.0)
    return _reduce(kl_rows(p, log_r, valid), valid.any(dim=-1), reduction)


def _loss_and_grads(loss_fn, q, k, weights, loss_dtype):
    with torch.enable_grad():
        q64 = q.detach().double().requires_grad_(True)
        k64 = k.detach().double().requires_grad_(True)
        w64 = weights.detach().double().requires_grad_(True)
        loss = loss_fn(q64, k64, w64)
        dq, dk, dw = torch.autograd.grad(loss, (q64, k64, w64), allow_unused=True)
    dq = torch.zeros_like(q64) if dq is None else dq
    dk = torch.zeros_like(k64) if dk is None else dk
    dw = torch.zeros_like(w64) if dw is None else dw
    return (loss.detach().to(loss_dtype), dq.to(q.dtype), dk.to(k.dtype),
            dw.to(weights.dtype))


def indexer_kl_loss_sparse(q: Tensor, k: Tensor, weights: Tensor, indices: Tensor,
                           target: Tensor, topk_length: Optional[Tensor] = None,
                           reduction: str = "sum", deterministic: bool = False
                           ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Oracle of `dsa.indexer_kl_loss_sparse`: (loss, dq, dk, dw). Over each query's valid
    selected entries j: r = softmax_j(I[t, idx_j]), loss_t = sum_j p_j log(p_j / r_j) with
    p = target (its invalid entries ignored). The gradient is that of this formula, i.e.
    ``dL/dI_j = (sum_j p_j) r_j - p_j`` (= r - p for a normalised target)."""
    del deterministic
    tgt = target.double()
    return _loss_and_grads(
        lambda q64, k64, w64: _sparse_loss_math(q64, k64, w64, indices, tgt, topk_length,
                                                reduction),
        q, k, weights, _out_dtype(q))


def dense_attention_target(q_main: Tensor, kv_main: Tensor, mask: Tensor,
                           sm_scale: float) -> Tensor:
    """[T, S] float64 head-averaged softmax of the main attention over each row's mask."""
    scores = torch.einsum("thd,sd->ths", q_main.double(), kv_main[:, 0, :].double()) * sm_scale
    log_p = _log_softmax_masked(scores, mask[:, None, :].expand_as(scores))
    return torch.exp(log_p).mean(dim=1)


def indexer_kl_loss_dense(q: Tensor, k: Tensor, weights: Tensor, ks: Tensor, ke: Tensor,
                          q_main: Tensor, kv_main: Tensor, sm_scale: float,
                          reduction: str = "sum", block_size: int = 1024,
                          deterministic: bool = False
                          ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Oracle of `dsa.indexer_kl_loss_dense`, written plainly with [T, S]: (loss, dq, dk, dw).
    Over all keys ks[t] <= s < ke[t]: p = the main attention's head-averaged softmax (no
    gradient: SPEC 7 detach rule), r = softmax_s(I), loss_t = KL(p || r).
    ``block_size`` and ``deterministic`` are accepted for signature parity."""
    del block_size, deterministic
    mask = row_range_mask(ks, ke, k.shape[0])
    p = dense_attention_target(q_main, kv_main, mask, sm_scale)

    def loss_fn(q64, k64, w64):
        log_r = _log_softmax_masked(_train_logits_math(q64, k64, w64), mask)
        return _reduce(kl_rows(p, log_r, mask), mask.any(dim=-1), reduction)

    return _loss_and_grads(loss_fn, q, k, weights, _out_dtype(q))
