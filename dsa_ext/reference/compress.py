"""Reference of the DeepSeek-V4 compressor (SPEC 10.4): gated pooling of ``ratio`` consecutive
tokens into one KV entry, then RMSNorm and rope. Pooling in float64; the norm and rope in
float32 between the bf16 roundings the model makes (V4 ``inference/model.py``: ``kv.to(dtype)``
before ``self.norm``, which returns bf16, then ``apply_rotary_emb`` in fp32 back to bf16)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["v4_compress", "v4_compress_step"]

ROPE_DIMS = 64


def _pool(kv: Tensor, score: Tensor, ape: Tensor, d: int) -> Tensor:
    """Pooled entries ``[n, d]`` (float64) of one sequence's complete windows."""
    ratio, width = ape.shape
    n = kv.shape[0] // ratio
    kv = kv[: n * ratio].double().reshape(n, ratio, width)
    z = score[: n * ratio].double().reshape(n, ratio, width) + ape.double()
    if width == d:                                     # c = 1: the window's own tokens
        pool_kv, pool_z = kv, z
    else:                                              # c = 2: W_{j-1}'s first half, W_j's second
        prev_kv = torch.zeros(n, ratio, d, dtype=torch.float64)
        prev_z = torch.full((n, ratio, d), float("-inf"), dtype=torch.float64)
        prev_kv[1:] = kv[:-1, :, :d]
        prev_z[1:] = z[:-1, :, :d]
        pool_kv = torch.cat([prev_kv, kv[:, :, d:]], dim=1)
        pool_z = torch.cat([prev_z, z[:, :, d:]], dim=1)
    return (pool_z.softmax(dim=1) * pool_kv).sum(dim=1)


def _rope_gptj(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Interleaved pairs (x[2i], x[2i+1]) rotated by the angle of frequency i."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


def _finish(e: Tensor, windows: Tensor, ratio: int, w: Tensor, eps: float, cos_t: Tensor,
            sin_t: Tensor) -> Tensor:
    """bf16 rounding, fp32 RMSNorm to bf16, rope at position window * ratio to bf16."""
    d = e.shape[-1]
    e = e.to(torch.bfloat16).float()
    y = (e * torch.rsqrt(e.square().mean(dim=-1, keepdim=True) + eps) * w).to(torch.bfloat16)
    pos = windows * ratio
    y = y.float()
    y[:, d - ROPE_DIMS:] = _rope_gptj(y[:, d - ROPE_DIMS:], cos_t[pos], sin_t[pos])
    return y.to(torch.bfloat16)


def v4_compress(kv: Tensor, score: Tensor, ape: Tensor, norm_weight: Tensor, eps: float,
                rope_cos: Tensor, rope_sin: Tensor,
                cu_seqlens: Optional[Tensor] = None) -> Tensor:
    """Entries ``[sum_b len_b // ratio, d]`` bf16, sequence by sequence, window by window.

    Entry j of a sequence: pooled ``e`` (per-channel softmax of ``score + ape[t % ratio]`` over
    the pool rows, times ``kv``), ``e`` rounded to bf16, ``y = e * rsqrt(mean(e**2) + eps) * w``
    in fp32 rounded to bf16, then dims ``[d-64, d)`` rotated in GPT-J pairs with row
    ``j * ratio`` of the rope tables (the window's first position, as V4's
    ``freqs_cis[:cutoff:ratio]`` at prefill and ``freqs_cis[start_pos + 1 - ratio]`` at decode),
    rounded to bf16.
    """
    d = norm_weight.numel()
    ratio = ape.shape[0]
    device = kv.device
    kv, score = kv.cpu(), score.cpu()
    if cu_seqlens is None:
        bounds = [0, kv.shape[0]]
    else:
        bounds = [int(v) for v in cu_seqlens.cpu().tolist()]
    w = norm_weight.cpu().float()
    cos_t, sin_t = rope_cos.cpu().float(), rope_sin.cpu().float()
    out = []
    for b in range(len(bounds) - 1):
        lo, hi = bounds[b], bounds[b + 1]
        e = _pool(kv[lo:hi], score[lo:hi], ape.cpu(), d)
        out.append(_finish(e, torch.arange(e.shape[0]), ratio, w, eps, cos_t, sin_t))
    result = torch.cat(out) if out else torch.empty(0, d, dtype=torch.bfloat16)
    return result.to(device)


def v4_compress_step(kv: Tensor, score: Tensor, ape: Tensor, norm_weight: Tensor, eps: float,
                     rope_cos: Tensor, rope_sin: Tensor, positions: Tensor, kv_state: Tensor,
                     score_state: Tensor) -> Tensor:
    """One decode step (the project's state, see ``dsa_ext.ops.compress``): token t of sequence
    b goes to ring row ``t % (c * ratio)`` of ``kv_state[b]`` (its kv) and ``score_state[b]``
    (``score + ape[t % ratio]``), in place; where ``t + 1`` is a multiple of ratio the entry
    of window ``t // ratio`` is pooled from the ring (rows of windows j - 1 and j, as
    :func:`v4_compress`). Returns ``[B, d]`` bf16, zeros where no entry is due or no token
    (negative position)."""
    d = norm_weight.numel()
    ratio, width = ape.shape
    c = width // d
    ring = c * ratio
    out = torch.zeros(kv.shape[0], d, dtype=torch.bfloat16)
    w = norm_weight.cpu().float()
    cos, sin = rope_cos.cpu().float(), rope_sin.cpu().float()
    for b, t in enumerate(positions.cpu().tolist()):
        if t < 0:
            continue
        kv_state[b, t % ring] = kv[b]
        score_state[b, t % ring] = score[b] + ape[t % ratio]
        if (t + 1) % ratio:
            continue
        j = t // ratio
        rows_kv, rows_z = [], []
        for half in ((0, 1) if c == 2 and j > 0 else (1,)):
            slots = [((j - 1 + half) * ratio + r) % ring for r in range(ratio)]
            lo = d if half == 1 and c == 2 else 0
            rows_kv.append(kv_state[b, slots, lo:lo + d].double().cpu())
            rows_z.append(score_state[b, slots, lo:lo + d].double().cpu())
        pool_kv, pool_z = torch.cat(rows_kv), torch.cat(rows_z)
        e = (pool_z.softmax(dim=0) * pool_kv).sum(dim=0, keepdim=True)
        out[b] = _finish(e, torch.tensor([j]), ratio, w, eps, cos, sin)[0]
    return out.to(kv.device)
