"""Sparse MLA attention for prefill and training (SPEC section 3): `sparse_mla_fwd`,
`sparse_mla_bwd` and the differentiable `sparse_mla`.

Differences from FlashMLA a user should know:
- a query row with no valid index returns out = 0 and lse = **-inf** (FlashMLA returns +inf);
  -inf is the value under which lse-weighted merging of partial results stays correct.
- `attn_sink` joins the softmax denominator only. `attn_sink[h] = +inf` makes head h's output
  0 with lse unaffected (FlashMLA's rule); `-inf` means no sink. Its gradient (autograd, when
  the sink requires grad) is `-Σ_t sigmoid(sink[h] - lse[t,h]) · (dout[t,h] · out[t,h])`,
  computed from the forward's out and lse in fp32 with torch reductions ([T, H] work;
  deterministic); it is 0 for an infinite sink.
- the gradient that flows into `lse` is ignored by the backward (lse is an auxiliary output);
  only `out` is differentiated.

CUDA kernels (sm_80+ mma.sync bf16 tensor cores; see csrc/sparse_mla): bf16 only, d_qk = 576
(DeepSeek-V3.2 / GLM-5: 512 value + 64 rope dims) or d_qk = 512 (DeepSeek-V4: the whole row is K
and V, so ``dkv`` sums both roles over all 512 dims), d_v = 512, H in {8, 16, 32, 64, 128} (head
blocks of 64, 32 or 16 share one gather; H = 8 runs in a 16-row block with the other 8 rows
masked, so tensor-parallel shards need no padding), any K (entries past K's last multiple of the
tile, or past topk_length, are masked), tensors 16-byte aligned. The opt-in sm_90a wgmma forward
(DSA_SPARSE_MLA_WGMMA=1) serves both widths for H a multiple of 64. The CPU kernels accept any
d_qk / d_v / H and bf16 / float32 / float64. The deterministic CUDA backward keeps its scratch
within 64 MiB (DSA_SPARSE_MLA_DET_SCRATCH_MB): it adds fixed-point integers with atomics
(order-free sums: about the atomic mode's cost) in one pass where the int64 [S, d_qk] sums fit
(S <= 14563 at d_qk 576, 16384 at 512), else in passes over ranges of kv rows (each pass
recomputes the backward). It requires K <= 131072.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._accept import dense, fp32, int32_index

__all__ = ["sparse_mla_fwd", "sparse_mla_bwd", "sparse_mla", "sparse_mla_sink_grad"]


def sparse_mla_fwd(q: Tensor, kv: Tensor, indices: Tensor, sm_scale: float, d_v: int = 512,
                   attn_sink: Optional[Tensor] = None,
                   topk_length: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Sparse MLA attention forward.

    Args:
        q: ``[T, H, d_qk]`` bf16 (CPU also float32 / float64). CUDA: d_qk 576 (V3.2 / GLM-5)
            or 512 (V4), H in {8, 16, 32, 64, 128} (tensor-parallel shards, unpadded).
        kv: ``[S, 1, d_qk]`` latent rows, q's dtype; the value is ``kv[..., :d_v]`` (the
            whole row at d_qk = d_v = 512, K == V).
        indices: ``[T, 1, K]`` int32 (or int64) rows of kv each query attends to. ``-1``, negative or
            ``>= S`` entries are skipped (never read); a repeated index counts once per
            occurrence.
        sm_scale: softmax scale applied to q·k.
        d_v: value width (512 on CUDA).
        attn_sink: optional ``[H]`` (float32; other float dtypes are cast); adds
            ``exp(attn_sink[h])`` to the softmax denominator only (lse excludes it). ``+inf``
            makes head h's output 0 (lse unaffected), ``-inf`` is no sink.
        topk_length: optional ``[T]`` int32 / int64; row t uses only its first
            ``topk_length[t]`` entries (values are clamped to ``[0, K]``).

    Non-contiguous q, kv, indices (and, in the backward, out, dout, lse) are copied to
    contiguous tensors before the kernels run; int64 index tensors are converted to int32.

    Returns:
        ``out [T, H, d_v]`` in q's dtype and ``lse [T, H]`` float32, the natural-log
        log-sum-exp of the scaled valid scores. A row with no valid entry gives out = 0 and
        lse = -inf (FlashMLA returns +inf there).
    """
    q, kv, indices, attn_sink, topk_length = _accepted(q, kv, indices, attn_sink, topk_length)
    return torch.ops.dsa.sparse_mla_fwd(q, kv, indices, sm_scale, d_v, attn_sink, topk_length)


def _accepted(q, kv, indices, attn_sink, topk_length):
    """The forward's inputs in the forms the op takes (dsa_ext.ops._accept)."""
    return dense(q), dense(kv), int32_index(indices), fp32(attn_sink), int32_index(topk_length)


def sparse_mla_bwd(q: Tensor, kv: Tensor, out: Tensor, dout: Tensor, indices: Tensor,
                   lse: Tensor, sm_scale: float, d_v: int = 512,
                   attn_sink: Optional[Tensor] = None, topk_length: Optional[Tensor] = None,
                   deterministic: bool = False) -> Tuple[Tensor, Tensor]:
    """Sparse MLA attention backward: the exact gradients of `sparse_mla_fwd`'s ``out``.

    Takes the forward's inputs plus its ``out`` and ``lse`` and the gradient ``dout``
    (``[T, H, d_v]``, q's dtype). P is recomputed from lse (and attn_sink, which must be the
    forward's). Returns ``dq [T, H, d_qk]`` (q's dtype) and ``dkv [S, 1, d_qk]`` (kv's dtype),
    accumulated in float32 over every query that selected a row; ``dkv[..., :d_v]`` holds both
    the key and the value gradient. ``deterministic=True`` gives bitwise-identical results run
    to run (the CPU kernel always does; CUDA otherwise uses float atomics). The gradient of
    attn_sink is `sparse_mla_sink_grad` (autograd calls it).
    """
    return torch.ops.dsa.sparse_mla_bwd(dense(q), dense(kv), dense(out), dense(dout),
                                        int32_index(indices), dense(lse), sm_scale, d_v,
                                        fp32(attn_sink), int32_index(topk_length), deterministic)


def sparse_mla(q: Tensor, kv: Tensor, indices: Tensor, sm_scale: float, d_v: int = 512,
               attn_sink: Optional[Tensor] = None, topk_length: Optional[Tensor] = None,
               deterministic: bool = False) -> Tuple[Tensor, Tensor]:
    """Differentiable sparse MLA attention: `sparse_mla_fwd` whose backward is
    `sparse_mla_bwd` (gradients for q, kv and attn_sink; lse is treated as a constant).
    ``deterministic`` selects the bitwise-reproducible backward. Returns (out, lse)."""
    if deterministic:
        q, kv, indices, attn_sink, topk_length = _accepted(q, kv, indices, attn_sink, topk_length)
        return _DeterministicSparseMLA.apply(q, kv, indices, sm_scale, d_v, attn_sink,
                                             topk_length)
    return sparse_mla_fwd(q, kv, indices, sm_scale, d_v, attn_sink, topk_length)


# ---- fake (meta) kernels ------------------------------------------------------------------------

@torch.library.register_fake("dsa::sparse_mla_fwd")
def _sparse_mla_fwd_fake(q, kv, indices, sm_scale, d_v=512, attn_sink=None, topk_length=None):
    T, H, _ = q.shape
    return q.new_empty((T, H, d_v)), q.new_empty((T, H), dtype=torch.float32)


@torch.library.register_fake("dsa::sparse_mla_bwd")
def _sparse_mla_bwd_fake(q, kv, out, dout, indices, lse, sm_scale, d_v=512, attn_sink=None,
                         topk_length=None, deterministic=False):
    return torch.empty_like(q), torch.empty_like(kv)


# ---- autograd -----------------------------------------------------------------------------------

def _setup_context(ctx, inputs, output, deterministic=False):
    q, kv, indices, sm_scale, d_v, attn_sink, topk_length = inputs
    out, lse = output
    ctx.save_for_backward(q, kv, indices, out, lse, attn_sink, topk_length)
    ctx.sm_scale = sm_scale
    ctx.d_v = d_v
    ctx.deterministic = deterministic


def _backward(ctx, dout, dlse):
    # dlse is ignored: lse is an auxiliary output (see the module docstring).
    q, kv, indices, out, lse, attn_sink, topk_length = ctx.saved_tensors
    if dout is None:
        return None, None, None, None, None, None, None
    dq, dkv = torch.ops.dsa.sparse_mla_bwd(q, kv, out, dout.contiguous(), indices, lse,
                                           ctx.sm_scale, ctx.d_v, attn_sink, topk_length,
                                           ctx.deterministic)
    dsink = None
    if attn_sink is not None and ctx.needs_input_grad[5]:
        dsink = sparse_mla_sink_grad(out, dout, lse, attn_sink)
    return dq, dkv, None, None, None, dsink, None


def sparse_mla_sink_grad(out: Tensor, dout: Tensor, lse: Tensor, attn_sink: Tensor) -> Tensor:
    """Gradient of the loss w.r.t. ``attn_sink [H]`` given the forward's ``out [T, H, d_v]`` and
    ``lse [T, H]`` and ``dout``: the sink's probability is ``sigmoid(sink - lse)`` and every
    entry's p shrinks by that factor, so ``d sink[h] = -Σ_t sigmoid(sink[h] - lse[t,h]) ·
    (dout[t,h] · out[t,h])``. 0 for an infinite sink (out = 0 at +inf, probability 0 at -inf)
    and for empty rows (out = 0). fp32, in attn_sink's dtype."""
    delta = (dout.float() * out.float()).sum(-1)                          # [T, H]
    sink = attn_sink.float()[None, :]
    # A -inf sink has probability 0 even on an empty row (lse = -inf, where sink - lse is NaN);
    # at +inf out = 0, so the product is 0 · 1.
    p_sink = torch.where(sink == float("-inf"), 0.0, torch.sigmoid(sink - lse.float()))
    return (-(p_sink * delta).sum(0)).to(attn_sink.dtype)


torch.library.register_autograd("dsa::sparse_mla_fwd", _backward, setup_context=_setup_context)


class _DeterministicSparseMLA(torch.autograd.Function):
    """`sparse_mla(..., deterministic=True)`: the op's forward with the deterministic backward
    (the op schema has no `deterministic` argument to carry into register_autograd)."""

    @staticmethod
    def forward(q, kv, indices, sm_scale, d_v, attn_sink, topk_length):
        return torch.ops.dsa.sparse_mla_fwd(q, kv, indices, sm_scale, d_v, attn_sink,
                                            topk_length)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output, deterministic=True)

    @staticmethod
    def backward(ctx, dout, dlse):
        return _backward(ctx, dout, dlse)
