"""The DeepSeek-V4 compressor (SPEC 10.4): the bulk (prefill) form of V4's ``Compressor``.

Each complete window of ``ratio`` tokens of a sequence becomes one KV entry: a gated pooling
(per-channel softmax of the gate scores plus a learned position bias over the window's tokens,
weighting the projected kv), then RMSNorm and rope on the last 64 dims. DeepSeek-V4's
ratio-4 layers (c = 2) pool over overlapping windows: entry j also sees window j - 1 through
the first half of the channels.

Reading of the model code (DeepSeek-V4 ``inference/model.py`` ``Compressor.forward``), which
this op follows and ``dsa_ext.reference.v4_compress`` spells out:

* the position bias is ``ape[t mod ratio]``, added to both channel halves (c = 2);
* c = 2: entry j's pool is rows ``t in W_{j-1}`` at channels ``[0, d)`` and rows ``t in W_j`` at
  channels ``[d, 2d)`` (V4's ``overlap_transform``); entry 0 has only the W_0 rows (V4 pads
  with score -inf, kv 0, which is the same softmax);
* the pooled value is rounded to bf16 before the norm (V4's ``kv.to(dtype)``), the norm is
  computed in fp32 (``e * rsqrt(mean(e**2) + eps) * w``) and rounded to bf16;
* rope row: entry j uses row ``j * ratio`` of the tables, the window's *first* position (V4
  prefill ``freqs_cis[:cutoff:ratio]``; decode ``freqs_cis[start_pos + 1 - ratio]`` at the
  window's last token, the same row); GPT-J (interleaved) pairs ``(x[2i], x[2i+1])`` of dims
  ``[d-64, d)`` with ``cos[:, i]``, ``sin[:, i]``; out bf16.

Precision: pooling in fp32 (online softmax on CUDA, two-pass on the CPU; the reference in
fp64), so a pooled value that falls near a bf16 rounding boundary may round the other way:
results agree with the reference to about one bf16 ulp, not bit for bit.

Decode (streaming) form, ``v4_compress_step``: the project's state per sequence is a ring
buffer of the last ``c * ratio`` tokens, two fp32 tensors ``kv_state``, ``score_state``
``[B, c * ratio, c * d]`` (:func:`new_v4_compress_state`): token t's kv in row
``t % (c * ratio)`` of ``kv_state``, its gate logits ``score + ape[t % ratio]`` in the same row
of ``score_state``. (V4's reference code keeps the same shapes but shifts the rows at each
entry; a ring needs no shift.) After a prefill, :func:`v4_compress_prefill_state` writes the
last ``c * ratio`` tokens of each sequence; each step then stores one token per sequence and,
at a window's last token, pools the entry from the ring with the code of the bulk op, so the
entries equal (bit for bit, on the same device) what ``v4_compress`` gives over the whole
sequence. Fixed shapes and no host synchronisation: CUDA-graph safe.

Host synchronisation: with ``cu_seqlens`` the number of entries depends on its values, so the
CUDA op copies ``cu_seqlens`` to the host once (not CUDA-graph safe, as
``indexer_k_cache_gather``); with ``cu_seqlens=None`` nothing synchronises.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._accept import dense, int32_index

__all__ = ["v4_compress", "v4_compress_step", "new_v4_compress_state",
           "v4_compress_prefill_state"]


def v4_compress(kv: Tensor, score: Tensor, ape: Tensor, norm_weight: Tensor, eps: float,
                rope_cos: Tensor, rope_sin: Tensor,
                cu_seqlens: Optional[Tensor] = None) -> Tensor:
    """Compress consecutive tokens' ``kv`` into one entry per complete window (SPEC 10.4).

    Args:
        kv: ``[T, c * d]`` fp32, ``wkv(x)`` of the tokens (each sequence from position 0).
        score: ``[T, c * d]`` fp32, ``wgate(x)`` of the same tokens.
        ape: ``[ratio, c * d]`` fp32, the position bias; ``ratio = ape.size(0)``.
        norm_weight: ``[d]`` fp32 RMSNorm weight; ``d = norm_weight.numel()``, even, >= 64.
            ``c = kv.size(1) / d`` must be 1 or 2 (2: overlapping windows).
        eps: RMSNorm epsilon (>= 0).
        rope_cos, rope_sin: ``[P, 32]`` fp32 tables of the layer's rope; ``P`` must exceed the
            last entry's position ``(len // ratio - 1) * ratio``.
        cu_seqlens: ``[B + 1]`` int32 (int64 accepted) prefix sums of the sequence lengths,
            ``cu_seqlens[0] = 0``, ``cu_seqlens[B] = T``; None for one sequence of T tokens.

    Returns:
        ``[sum_b len_b // ratio, d]`` bf16: the entries of sequence 0, then sequence 1, ...
        (a sequence shorter than ``ratio`` contributes none; a partial last window none).
    """
    return torch.ops.dsa.v4_compress(dense(kv), dense(score), dense(ape), dense(norm_weight),
                                     float(eps), dense(rope_cos), dense(rope_sin),
                                     int32_index(cu_seqlens))


def new_v4_compress_state(batch: int, d: int, c: int, ratio: int,
                          device: torch.device | str = "cpu") -> Tuple[Tensor, Tensor]:
    """Empty decode state ``(kv_state, score_state)``, each ``[batch, c * ratio, c * d]`` fp32.
    Rows are only read once written (by the prefill writer or a step), so the fill is free."""
    shape = (batch, c * ratio, c * d)
    return (torch.zeros(shape, dtype=torch.float32, device=device),
            torch.full(shape, float("-inf"), dtype=torch.float32, device=device))


def v4_compress_prefill_state(kv: Tensor, score: Tensor, ape: Tensor, kv_state: Tensor,
                              score_state: Tensor, cu_seqlens: Optional[Tensor] = None) -> None:
    """Write the decode state of sequences whose first tokens went through
    :func:`v4_compress` (same ``kv``, ``score``, ``ape``, ``cu_seqlens``): ring row
    ``t % (c * ratio)`` of sequence b gets token t's kv and ``score + ape[t % ratio]``, for the
    last ``c * ratio`` tokens (all of a shorter sequence). In place; torch ops only, no host
    synchronisation. The next step of sequence b is at position ``len_b``."""
    ratio, width = ape.shape
    ring = kv_state.shape[1]
    torch._check(kv_state.shape[2] == width and ring in (ratio, 2 * ratio),
                 lambda: f"kv_state must be [B, c * ratio, c * d] = [B, {ring}, {width}], got "
                         f"{tuple(kv_state.shape)}")
    if cu_seqlens is None:
        cu_seqlens = torch.tensor([0, kv.shape[0]], device=kv.device)
    cu = cu_seqlens.to(device=kv.device, dtype=torch.long)
    lens = cu[1:] - cu[:-1]                                               # [B]
    k = torch.arange(ring, device=kv.device)
    t = lens[:, None] - ring + k[None, :]                                  # [B, ring] positions
    valid = t >= 0
    tok = (cu[:-1, None] + t.clamp_min(0)).clamp_max(max(kv.shape[0] - 1, 0))
    b = torch.arange(lens.shape[0], device=kv.device)[:, None].expand_as(t)
    slot = t.remainder(ring)                                               # distinct per row
    if kv.shape[0] == 0:
        return
    v = valid[..., None]
    kv_state[b, slot] = torch.where(v, kv[tok], kv_state[b, slot])
    z = score[tok] + ape[t.remainder(ratio)]
    score_state[b, slot] = torch.where(v, z, score_state[b, slot])


def v4_compress_step(kv: Tensor, score: Tensor, ape: Tensor, norm_weight: Tensor, eps: float,
                     rope_cos: Tensor, rope_sin: Tensor, positions: Tensor, kv_state: Tensor,
                     score_state: Tensor) -> Tensor:
    """One decode step of the compressor: ``kv``, ``score`` ``[B, c * d]`` fp32 are the new
    token of each sequence, at ``positions [B]`` (int32, int64 accepted; negative = no token
    this step: state untouched, zeros out). Updates the ring state in place (module docstring)
    and returns ``[B, d]`` bf16: row b is the entry of window ``positions[b] // ratio`` when
    ``positions[b] + 1`` is a multiple of ratio, zeros otherwise. A missing rope row for that
    entry raises on the CPU; on CUDA (no host synchronisation) the row is NaN.
    Other arguments as :func:`v4_compress`."""
    return torch.ops.dsa.v4_compress_step(dense(kv), dense(score), dense(ape), dense(norm_weight),
                                          float(eps), dense(rope_cos), dense(rope_sin),
                                          int32_index(positions), kv_state, score_state)


@torch.library.register_fake("dsa::v4_compress_step")
def _v4_compress_step_fake(kv, score, ape, norm_weight, eps, rope_cos, rope_sin, positions,
                           kv_state, score_state):
    return kv.new_empty((kv.shape[0], norm_weight.numel()), dtype=torch.bfloat16)


@torch.library.register_fake("dsa::v4_compress")
def _v4_compress_fake(kv, score, ape, norm_weight, eps, rope_cos, rope_sin, cu_seqlens=None):
    d = norm_weight.numel()
    torch._check(kv.dim() == 2, lambda: f"kv must be 2-D [T, c * d], got {kv.dim()}-D")
    torch._check(kv.shape[1] == d or kv.shape[1] == 2 * d,
                 lambda: f"kv.size(1) must be d or 2 * d (d = {d}), got {kv.shape[1]}")
    ratio = ape.shape[0]
    if cu_seqlens is None:
        rows = kv.shape[0] // ratio
    else:
        rows = torch.library.get_ctx().new_dynamic_size()
    return kv.new_empty((rows, d), dtype=torch.bfloat16)
