"""Training the lightning indexer (SPEC section 7, DeepSeek-V3.2 report section 2.1).

The indexer learns to imitate the main attention through a KL alignment loss:

    I[t, s] = sum_h w[t, h] * relu(q[t, h] . k[s])          indexer logits, training precision
    p[t, s] = (1/Hm) sum_h P_h[t, s]                         the main attention's probabilities
    r[t, s] = softmax_s I[t, s]
    L = sum_t KL(p[t] || r[t])      ("mean": divided by the rows with a non-empty key set)

over all causal keys in the dense warm-up (`indexer_kl_loss_dense`) and over the selected
entries in the sparse stage (`indexer_kl_loss_sparse`, target from `sparse_attention_target`).

Detach rule: the losses train only the indexer. Their autograd sends gradients into q, k and
weights (the indexer's inputs) and none into the main attention's tensors (q_main, kv_main,
target); keep the model's own loss away from the indexer by feeding it detached inputs (see
`dsa_ext.modules`).

Conventions: q/k (and weights, or float32 weights) in bfloat16 or float32 (CPU also float64);
accumulation in float32 (float64 for float64 q); logits and losses are float32 (float64 for
float64 q); ks/ke are clamped to [0, S]; a selected index that is -1, negative, >= S or at a
position >= topk_length[t] is skipped, never read; duplicates count once per occurrence.
Neither loss materialises [T, S]: the dense loss streams keys in blocks of ``block_size`` with
O(T*H + T*block) working memory. The CPU kernels are deterministic in every mode (each output
element is summed by one thread in a fixed order, independent of the thread count);
``deterministic=True`` asks the CUDA kernels for the same property.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "indexer_train_logits",
    "indexer_train_logits_bwd",
    "sparse_attention_target",
    "indexer_kl_loss_sparse",
    "indexer_kl_loss_dense",
    "indexer_kl_loss_sparse_with_grads",
    "indexer_kl_loss_dense_with_grads",
]


def _acc_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def indexer_train_logits(q: Tensor, k: Tensor, weights: Tensor, ks: Tensor, ke: Tensor,
                         deterministic: bool = False) -> Tensor:
    """Differentiable indexer logits in training precision.

    Args:
        q: ``[T, H, D]`` bfloat16 / float32 (CPU also float64) indexer queries.
        k: ``[S, D]`` indexer keys, q's dtype.
        weights: ``[T, H]`` per-query head weights, q's dtype or float32.
        ks, ke: ``[T]`` int32; row t sees keys ``ks[t] <= s < ke[t]`` (clamped to [0, S]).
        deterministic: use the bitwise-reproducible backward (the CPU one always is).

    Returns:
        ``[T, S]`` float32 (float64 for float64 q), ``-inf`` outside each row's range. The
        backward (`indexer_train_logits_bwd`) gives gradients for q, k and weights.
    """
    if deterministic:
        return _DeterministicTrainLogits.apply(q, k, weights, ks, ke)
    return torch.ops.dsa.indexer_train_logits(q, k, weights, ks, ke)


def indexer_train_logits_bwd(grad: Tensor, q: Tensor, k: Tensor, weights: Tensor, ks: Tensor,
                             ke: Tensor, deterministic: bool = False
                             ) -> Tuple[Tensor, Tensor, Tensor]:
    """Backward of `indexer_train_logits`: with ``g = grad`` (``[T, S]`` in the logits' dtype;
    entries outside a row's range are ignored),
    ``dw[t,h] = sum_s g relu(q.k)``, ``dq[t,h] = sum_s g w 1[q.k>0] k[s]``,
    ``dk[s] = sum_t sum_h g w 1[q.k>0] q[t,h]``, accumulated in float32 (float64) and returned
    in the dtypes of q, k, weights. Never builds more than the [T, S] ``grad`` it is given."""
    return torch.ops.dsa.indexer_train_logits_bwd(grad, q, k, weights, ks, ke, deterministic)


def sparse_attention_target(q: Tensor, kv: Tensor, indices: Tensor, lse: Tensor,
                            sm_scale: float, topk_length: Optional[Tensor] = None) -> Tensor:
    """The main attention's head-averaged probabilities over each query's selected entries,
    the target of the sparse-stage loss.

    ``p[t, j] = (1/H) sum_h exp(sm_scale * q[t,h] . kv[idx[t,j]] - lse[t,h])`` with the
    arguments of `sparse_mla_fwd` (q ``[T, H, d_qk]``, kv ``[S, 1, d_qk]``, indices
    ``[T, 1, K]`` int32, topk_length ``[T]``) and its ``lse`` ``[T, H]`` float32. Because that
    lse excludes an attention sink, the sink is left out and each row sums to 1 over its valid
    entries. Returns ``[T, K]`` float32: 0 at invalid entries and in rows whose lse is -inf.
    Not differentiable (SPEC 7 detach rule: the main attention gets no gradient from L_I).
    """
    return torch.ops.dsa.sparse_attention_target(q, kv, indices, lse, sm_scale, topk_length)


def indexer_kl_loss_sparse_with_grads(q: Tensor, k: Tensor, weights: Tensor, indices: Tensor,
                                      target: Tensor, topk_length: Optional[Tensor] = None,
                                      reduction: str = "sum", deterministic: bool = False
                                      ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The op behind `indexer_kl_loss_sparse`: ``(loss, dq, dk, dw)`` in one call."""
    return torch.ops.dsa.indexer_kl_loss_sparse(q, k, weights, indices, target, topk_length,
                                                reduction, deterministic)


def indexer_kl_loss_sparse(q: Tensor, k: Tensor, weights: Tensor, indices: Tensor,
                           target: Tensor, topk_length: Optional[Tensor] = None,
                           reduction: str = "sum", deterministic: bool = False) -> Tensor:
    """Sparse-stage indexer alignment loss over each query's selected entries.

    Args:
        q, k, weights: the indexer's inputs as in `indexer_train_logits` (k ``[S, D]``).
        indices: ``[T, 1, K]`` int32 rows of k each query selected (the top-k of the indexer,
            the same tensor `sparse_mla_fwd` attends to).
        target: ``[T, K]`` float32 target probabilities, normally `sparse_attention_target`'s
            output (entries at invalid positions are ignored). Gets no gradient.
        topk_length: optional ``[T]`` int32 valid prefix length of each row.
        reduction: ``"sum"`` over rows or ``"mean"`` over rows with >= 1 valid entry.
        deterministic: bitwise-reproducible gradients (the CPU kernel always is).

    Returns:
        The scalar loss ``sum_t sum_j p log(p / r)``, ``r = softmax_j I[t, idx_j]`` over the
        valid j, float32 (float64 for float64 q). Its backward scales the gradients the op
        computed with the loss (``dL/dI_j = (sum p) r_j - p_j``, = r - p for a normalised
        target) into q, k, weights. Never materialises [T, S].
    """
    return indexer_kl_loss_sparse_with_grads(q, k, weights, indices, target, topk_length,
                                             reduction, deterministic)[0]


def indexer_kl_loss_dense_with_grads(q: Tensor, k: Tensor, weights: Tensor, ks: Tensor,
                                     ke: Tensor, q_main: Tensor, kv_main: Tensor,
                                     sm_scale: float, reduction: str = "sum",
                                     block_size: int = 1024, deterministic: bool = False
                                     ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The op behind `indexer_kl_loss_dense`: ``(loss, dq, dk, dw)`` in one call."""
    return torch.ops.dsa.indexer_kl_loss_dense(q, k, weights, ks, ke, q_main, kv_main, sm_scale,
                                               reduction, block_size, deterministic)


def indexer_kl_loss_dense(q: Tensor, k: Tensor, weights: Tensor, ks: Tensor, ke: Tensor,
                          q_main: Tensor, kv_main: Tensor, sm_scale: float,
                          reduction: str = "sum", block_size: int = 1024,
                          deterministic: bool = False) -> Tensor:
    """Dense warm-up indexer alignment loss over all keys ``ks[t] <= s < ke[t]``.

    Args:
        q, k, weights, ks, ke: the indexer's inputs as in `indexer_train_logits`.
        q_main: ``[T, Hm, d]`` the main attention's queries (bf16 / float32; CPU float64).
        kv_main: ``[S, 1, d]`` its keys, q_main's dtype (for MLA: the latent rows).
        sm_scale: the main attention's softmax scale.
        reduction: ``"sum"`` over rows or ``"mean"`` over rows with a non-empty range.
        block_size: keys per streamed block.
        deterministic: bitwise-reproducible gradients (the CPU kernel always is).

    Returns:
        The scalar ``sum_t KL(p[t] || r[t])`` with ``p = (1/Hm) sum_h softmax_s(sm_scale *
        q_main[t,h] . kv_main[s])`` and ``r = softmax_s I[t, s]``, float32 (float64 for float64
        q). Computed in two streamed passes (per-head lse of the main attention and the
        indexer's lse, then p, r, the loss and ``g = r - p`` block by block into dq, dw per row
        and dk per key): O(T*H + T*block) memory, never [T, S] or [T, S, H]. Its backward
        scales the precomputed gradients into q, k, weights; q_main and kv_main get none.
    """
    return indexer_kl_loss_dense_with_grads(q, k, weights, ks, ke, q_main, kv_main, sm_scale,
                                            reduction, block_size, deterministic)[0]


# ---- fake (meta) kernels ------------------------------------------------------------------------

@torch.library.register_fake("dsa::indexer_train_logits")
def _indexer_train_logits_fake(q, k, weights, ks, ke):
    torch._check(q.dim() == 3, lambda: f"q must be 3-D [T, H, D], got {tuple(q.shape)}")
    torch._check(k.dim() == 2, lambda: f"k must be 2-D [S, D], got {tuple(k.shape)}")
    return q.new_empty((q.shape[0], k.shape[0]), dtype=_acc_dtype(q))


@torch.library.register_fake("dsa::indexer_train_logits_bwd")
def _indexer_train_logits_bwd_fake(grad, q, k, weights, ks, ke, deterministic=False):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(weights)


@torch.library.register_fake("dsa::sparse_attention_target")
def _sparse_attention_target_fake(q, kv, indices, lse, sm_scale, topk_length=None):
    torch._check(indices.dim() == 3,
                 lambda: f"indices must be 3-D [T, 1, K], got {tuple(indices.shape)}")
    return q.new_empty((q.shape[0], indices.shape[2]), dtype=torch.float32)


def _loss_fake(q, k, weights):
    return (q.new_empty((), dtype=_acc_dtype(q)), torch.empty_like(q), torch.empty_like(k),
            torch.empty_like(weights))


@torch.library.register_fake("dsa::indexer_kl_loss_sparse")
def _indexer_kl_loss_sparse_fake(q, k, weights, indices, target, topk_length=None,
                                 reduction="sum", deterministic=False):
    return _loss_fake(q, k, weights)


@torch.library.register_fake("dsa::indexer_kl_loss_dense")
def _indexer_kl_loss_dense_fake(q, k, weights, ks, ke, q_main, kv_main, sm_scale,
                                reduction="sum", block_size=1024, deterministic=False):
    return _loss_fake(q, k, weights)


# ---- autograd -----------------------------------------------------------------------------------

def _logits_setup_context(ctx, inputs, output, deterministic=False):
    q, k, weights, ks, ke = inputs
    ctx.save_for_backward(q, k, weights, ks, ke)
    ctx.deterministic = deterministic


def _logits_backward(ctx, grad):
    q, k, weights, ks, ke = ctx.saved_tensors
    dq, dk, dw = torch.ops.dsa.indexer_train_logits_bwd(
        grad.to(_acc_dtype(q)).contiguous(), q, k, weights, ks, ke, ctx.deterministic)
    return dq, dk, dw, None, None


torch.library.register_autograd("dsa::indexer_train_logits", _logits_backward,
                                setup_context=_logits_setup_context)


class _DeterministicTrainLogits(torch.autograd.Function):
    """`indexer_train_logits(..., deterministic=True)`: the op's forward with the deterministic
    backward (the forward schema has no `deterministic` argument for register_autograd)."""

    @staticmethod
    def forward(q, k, weights, ks, ke):
        return torch.ops.dsa.indexer_train_logits(q, k, weights, ks, ke)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _logits_setup_context(ctx, inputs, output, deterministic=True)

    @staticmethod
    def backward(ctx, grad):
        return _logits_backward(ctx, grad)


def _loss_setup_context(ctx, inputs, output):
    q, k, weights = inputs[:3]
    _, dq, dk, dw = output
    # The gradients are by-products, not functions to differentiate further.
    ctx.mark_non_differentiable(dq, dk, dw)
    ctx.save_for_backward(dq, dk, dw)
    ctx.num_inputs = len(inputs)


def _loss_backward(ctx, grad_loss, *unused_grads):
    """Scale the op's precomputed gradients by the loss's incoming gradient; the inputs after
    q, k, weights (indices / target / ranges / the main attention's q_main, kv_main) get none:
    the SPEC 7 detach rule."""
    dq, dk, dw = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * ctx.num_inputs
    g = grad_loss.to(torch.float64 if dq.dtype == torch.float64 else torch.float32)
    grads = tuple((g * d.to(g.dtype)).to(d.dtype) for d in (dq, dk, dw))
    return grads + (None,) * (ctx.num_inputs - 3)


torch.library.register_autograd("dsa::indexer_kl_loss_sparse", _loss_backward,
                                setup_context=_loss_setup_context)
torch.library.register_autograd("dsa::indexer_kl_loss_dense", _loss_backward,
                                setup_context=_loss_setup_context)
