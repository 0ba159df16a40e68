"""Reference (oracle) for the indexer op family: the DeepSeek-V3.2 lightning-indexer logits
(SPEC section 3), written for clarity and exactness (float64 inside, fp32 out).

    I[t, s] = k_scale[s] * sum_h weights[t, h] * relu(q[t, h, :] . k[s, :])

Semantics both the oracle and the kernels follow:

- ``indexer_logits``: row t sees keys ``ks[t] <= s < ke[t]``. Range bounds are clamped to
  ``[0, S]``; a row with ``ks >= ke`` sees nothing. With ``clean_logits=True`` every entry
  outside the row's range is ``-inf``. With ``clean_logits=False`` entries outside the range
  are UNSPECIFIED (as in DeepGEMM ``fp8_mqa_logits``: the kernels skip whole key tiles outside
  a row block's range and leave that memory unwritten); this oracle fills them with the real
  logit so its output is deterministic, and callers (tests) compare in-range entries only.
- ``paged_indexer_logits``: query ``(b, j)`` (output row ``b*N + j``) sees positions
  ``p < L[b, j]`` where ``L[b, j] = context_lens[b] - N + 1 + j`` for a ``[B]`` context_lens,
  or ``context_lens[b, j]`` for a ``[B, N]`` one; ``L`` is clamped to ``[0, max_context_len]``.
  Position p lives at ``(block_table[b, p // block_size], p % block_size)`` of the cache. A
  position whose block-table entry is missing (``p // block_size >= max_blocks``) or out of
  range (``< 0`` or ``>= num_blocks``) is never read: its logit is ``-inf`` even inside the
  visible range. Outside the visible range: ``-inf`` with ``clean_logits=True``, unspecified
  otherwise (this oracle writes the real logit where the block is valid, ``-inf`` elsewhere).

The paged K cache is the DeepGEMM / vLLM byte layout (SPEC section 2):
``uint8 [num_blocks, block_size, 1, D + 4]``, per block all ``block_size * D`` FP8 values
(token-major) first, then ``block_size`` fp32 scales. ``pack_indexer_k_cache`` /
``unpack_indexer_k_cache`` convert between that layout and (values, scales) tensors.

MXFP4 keys (SPEC 10.5; the byte rules of ``csrc/indexer/mxfp4.h``, see ``mxfp4_quantize``):
``indexer_logits`` takes them as ``k`` uint8 ``[S, D/2]`` with ``k_scale`` uint8 ``[S, D/32]``,
``paged_indexer_logits`` as a cache ``uint8 [num_blocks, block_size, 1, D/2 + D/32]``; the
logits are those of the dequantised keys (``mxfp4_dequantize``) with a unit key scale.
"""
from __future__ import annotations

import torch

from .cache import indexer_cache_tokens

__all__ = [
    "indexer_logits",
    "paged_indexer_logits",
    "pack_indexer_k_cache",
    "unpack_indexer_k_cache",
    "visible_lengths",
    "mxfp4_quantize",
    "mxfp4_dequantize",
    "pack_mxfp4_k_cache",
    "unpack_mxfp4_k_cache",
    "mxfp4_indexer_k_cache_write",
    "v4_indexer_lengths",
]

_E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _e8m0_value(scale: torch.Tensor) -> torch.Tensor:
    """float64 ``2**(byte - 127)``; byte 0 reads as 2**-127 and 255 as NaN (e8m0)."""
    e = scale.to(torch.int64)
    v = torch.pow(torch.tensor(2.0, dtype=torch.float64, device=scale.device), (e - 127).to(torch.float64))
    return torch.where(e == 255, torch.full_like(v, float("nan")), v)


def mxfp4_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Oracle of ``dsa::mxfp4_quantize``: x ``[..., D]`` (D % 32 == 0) -> ``(packed uint8
    [..., D/2], scale uint8 [..., D/32])``.

    Per group of 32: ``amax`` = max |x| over non-NaN values (fp32); scale byte = the fp32
    exponent of ``amax / 6`` rounded up (2**ceil(log2)), clamped to [1, 254] (+127 bias);
    code = nearest E2M1 of ``x * 2**-e`` (ties to the even code, saturating at 6, sign in bit 3,
    a zero magnitude always +0, NaN -> 0); byte i = value 2i (low nibble) | value 2i+1 << 4.
    Written independently of the kernels' threshold form (a nearest-grid-point search)."""
    d = x.shape[-1]
    assert d % 32 == 0 and d > 0
    xf = x.to(torch.float32).reshape(*x.shape[:-1], d // 32, 32)
    nan = torch.isnan(xf)
    amax = torch.where(nan, torch.zeros_like(xf), xf.abs()).amax(-1)
    t = (amax / 6.0).to(torch.float32)                         # fp32 division, as the kernels
    bits = t.view(torch.int32).to(torch.int64)
    e = (bits >> 23) & 0xFF
    e = e + (((bits & 0x7FFFFF) != 0) & (e != 0xFF)).to(torch.int64)
    e = e.clamp(1, 254)
    # x * 2**(127 - e): exact in float64, then the single fp32 rounding of the kernels' product
    q = (xf.to(torch.float64) * torch.pow(2.0, (127 - e).to(torch.float64))[..., None]).to(torch.float32)
    mag = q.abs().clamp(max=6.0).to(torch.float64)
    grid = torch.tensor(_E2M1_GRID, dtype=torch.float64, device=x.device)
    dist = (mag[..., None] - grid).abs()                           # [..., 32, 8]
    best = dist == dist.amin(-1, keepdim=True)
    even = (torch.arange(8, device=x.device) % 2 == 0)
    pick_even = best & even
    has_even = pick_even.any(-1, keepdim=True)
    choice = torch.where(has_even, pick_even, best).to(torch.int64).argmax(-1)   # first match
    code = torch.where(torch.isnan(q), torch.zeros_like(choice), choice)
    code = code | ((q < 0) & (code != 0)).to(torch.int64) * 8
    code = code.reshape(*x.shape[:-1], d)
    packed = (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8)
    return packed, e.to(torch.uint8)


def mxfp4_dequantize(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float64 ``[..., D]`` values of MXFP4 ``packed [..., D/2]`` / ``scale [..., D/32]`` bytes."""
    p = packed.to(torch.int64)
    codes = torch.stack([p & 15, p >> 4], dim=-1).flatten(-2)          # [..., D]
    grid = torch.tensor(_E2M1_GRID, dtype=torch.float64, device=packed.device)
    mag = grid[codes & 7]
    val = torch.where((codes & 8) != 0, -mag, mag)
    s = _e8m0_value(scale).repeat_interleave(32, dim=-1)
    return val * s


def pack_mxfp4_k_cache(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Lay out ``packed [nb, bs, D/2]`` / ``scale [nb, bs, D/32]`` (uint8) as the MXFP4 paged
    cache ``uint8 [nb, bs, 1, D/2 + D/32]``: per block the packed values of every slot
    (token-major), then their scale bytes (token-major)."""
    nb, bs, half = packed.shape
    assert scale.shape == (nb, bs, half // 16)
    return torch.cat([packed.reshape(nb, bs * half), scale.reshape(nb, bs * (half // 16))],
                     dim=1).reshape(nb, bs, 1, half + half // 16)


def unpack_mxfp4_k_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``pack_mxfp4_k_cache``: ``(packed [nb, bs, D/2], scale [nb, bs, D/32])``."""
    nb, bs, _, row = kv_cache.shape
    half = row * 16 // 17
    flat = kv_cache.contiguous().reshape(nb, bs * row)
    return flat[:, :bs * half].reshape(nb, bs, half), flat[:, bs * half:].reshape(nb, bs, half // 16)


def mxfp4_indexer_k_cache_write(k: torch.Tensor, slot_mapping: torch.Tensor,
                                kv_cache: torch.Tensor) -> None:
    """Oracle of ``dsa::mxfp4_indexer_k_cache_write``: quantise ``k [N, D]`` and write token i
    at slot ``slot_mapping[i]`` (negative: skipped) of the MXFP4 cache, in place."""
    nb, bs, _, row = kv_cache.shape
    packed, scale = unpack_mxfp4_k_cache(kv_cache)
    p, s = mxfp4_quantize(k)
    for i, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            packed[slot // bs, slot % bs] = p[i]
            scale[slot // bs, slot % bs] = s[i]
    kv_cache.copy_(pack_mxfp4_k_cache(packed, scale))


def v4_indexer_lengths(positions: torch.Tensor, ratio: int = 4) -> torch.Tensor:
    """The V4 causal rule (SPEC 10.5): a query at absolute position t sees the compressed
    entries ``j < (t + 1) // ratio`` of its sequence: that count, int64."""
    return torch.div(positions.to(torch.int64) + 1, ratio, rounding_mode="floor").clamp_min(0)


def _is_mxfp4_cache(kv_cache: torch.Tensor, d: int) -> bool:
    return d % 32 == 0 and kv_cache.shape[-1] == d // 2 + d // 32

_FP8 = torch.float8_e4m3fn


def pack_indexer_k_cache(k_fp8: torch.Tensor, k_scale: torch.Tensor) -> torch.Tensor:
    """Lay out ``k_fp8 [num_blocks, block_size, D]`` (float8_e4m3fn) and ``k_scale
    [num_blocks, block_size]`` (fp32) as the byte-exact indexer K cache
    ``uint8 [num_blocks, block_size, 1, D + 4]``: block ``blk`` holds bytes
    ``[blk*bs*(D+4), (blk+1)*bs*(D+4))``; value (blk, off, d) at ``+ off*D + d``, the
    little-endian fp32 scale of (blk, off) at ``+ bs*D + 4*off``."""
    assert k_fp8.dtype == _FP8 and k_fp8.dim() == 3, "k_fp8 must be float8_e4m3fn [nb, bs, D]"
    nb, bs, d = k_fp8.shape
    assert k_scale.dtype == torch.float32 and tuple(k_scale.shape) == (nb, bs)
    values = k_fp8.contiguous().view(torch.uint8).reshape(nb, bs * d)
    scales = k_scale.contiguous().view(torch.uint8).reshape(nb, bs * 4)
    return torch.cat([values, scales], dim=1).reshape(nb, bs, 1, d + 4)


def unpack_indexer_k_cache(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``pack_indexer_k_cache``: ``(k_fp8 [nb, bs, D], k_scale [nb, bs])``."""
    assert kv_cache.dtype == torch.uint8 and kv_cache.dim() == 4 and kv_cache.size(2) == 1
    nb, bs, _, dp4 = kv_cache.shape
    k_fp8, k_scale = indexer_cache_tokens(kv_cache.contiguous())
    return k_fp8.reshape(nb, bs, dp4 - 4), k_scale.reshape(nb, bs)


def _weighted_relu_logits(q: torch.Tensor, k: torch.Tensor, k_scale: torch.Tensor,
                          weights: torch.Tensor) -> torch.Tensor:
    """``[T, S]`` float64: k_scale[s] * sum_h weights[t,h] * relu(q[t,h] . k[s]), for all s."""
    qd = q.to(torch.float64)                    # [T, H, D]
    kd = k.to(torch.float64)                    # [S, D]
    scores = torch.einsum("thd,sd->ths", qd, kd).clamp_min(0.0)
    logits = torch.einsum("ths,th->ts", scores, weights.to(torch.float64))
    return logits * k_scale.to(torch.float64)[None, :]


def indexer_logits(q: torch.Tensor, k: torch.Tensor, k_scale: torch.Tensor,
                   weights: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor,
                   clean_logits: bool = True) -> torch.Tensor:
    """Oracle of ``dsa::indexer_logits``: q ``[T, H, D]`` FP8, k ``[S, D]`` FP8, k_scale ``[S]``
    fp32, weights ``[T, H]`` fp32, ks/ke ``[T]`` int32 -> ``[T, S]`` fp32 (see module doc)."""
    if k_scale.dtype == torch.uint8:                      # MXFP4 keys: dequantise, unit scale
        k = mxfp4_dequantize(k, k_scale)
        k_scale = torch.ones(k.shape[0], dtype=torch.float64, device=k.device)
    t_len, s_len = q.shape[0], k.shape[0]
    out = torch.empty(t_len, s_len, dtype=torch.float32, device=q.device)
    chunk = max(1, (1 << 24) // max(1, q.shape[1] * s_len))   # bound the [t, H, S] temporary
    cols = torch.arange(s_len, device=q.device)
    for t0 in range(0, t_len, chunk):
        t1 = min(t_len, t0 + chunk)
        logits = _weighted_relu_logits(q[t0:t1], k, k_scale, weights[t0:t1])
        if clean_logits:
            lo = ks[t0:t1].long().clamp(0, s_len)[:, None]
            hi = ke[t0:t1].long().clamp(0, s_len)[:, None]
            logits = logits.masked_fill((cols < lo) | (cols >= hi), float("-inf"))
        out[t0:t1] = logits.to(torch.float32)
    return out


def visible_lengths(context_lens: torch.Tensor, n: int, max_context_len: int) -> torch.Tensor:
    """``[B, N]`` int64: how many positions query (b, j) sees, clamped to [0, max_context_len].
    A ``[B]`` context_lens counts the cached tokens including the N new ones (query j sees
    ``context_lens[b] - N + 1 + j``); a ``[B, N]`` one gives each query's length directly."""
    cl = context_lens.long()
    if cl.dim() == 1:
        lens = cl[:, None] - n + 1 + torch.arange(n, device=cl.device)[None, :]
    else:
        lens = cl
    return lens.clamp(0, max_context_len)


def paged_indexer_logits(q: torch.Tensor, kv_cache: torch.Tensor, weights: torch.Tensor,
                         context_lens: torch.Tensor, block_table: torch.Tensor,
                         max_context_len: int, clean_logits: bool = True) -> torch.Tensor:
    """Oracle of ``dsa::paged_indexer_logits``: q ``[B, N, H, D]`` FP8, kv_cache the indexer K
    cache ``uint8 [num_blocks, block_size, 1, D+4]``, weights ``[B*N, H]`` fp32, context_lens
    ``[B]`` or ``[B, N]`` int32, block_table ``[B, max_blocks]`` int32
    -> ``[B*N, max_context_len]`` fp32 (see module doc)."""
    b_len, n_len, h_len, d_len = q.shape
    if _is_mxfp4_cache(kv_cache, d_len):
        packed, scale = unpack_mxfp4_k_cache(kv_cache)
        k_fp8 = mxfp4_dequantize(packed, scale)               # [nb, bs, D] float64
        k_scale = torch.ones(k_fp8.shape[:2], dtype=torch.float64, device=q.device)
    else:
        k_fp8, k_scale = unpack_indexer_k_cache(kv_cache)
    num_blocks, block_size = k_scale.shape
    max_blocks = block_table.shape[1]
    lens = visible_lengths(context_lens, n_len, max_context_len)
    pos = torch.arange(max_context_len, device=q.device)
    logical = pos // block_size
    out = torch.empty(b_len * n_len, max_context_len, dtype=torch.float32, device=q.device)
    for b in range(b_len):
        in_table = logical < max_blocks
        blk = torch.full_like(pos, -1)
        blk[in_table] = block_table[b].long()[logical[in_table]]
        valid = (blk >= 0) & (blk < num_blocks)
        safe_blk = torch.where(valid, blk, torch.zeros_like(blk))
        k_b = k_fp8[safe_blk, pos % block_size]                      # [P, D] (dummy rows masked)
        s_b = k_scale[safe_blk, pos % block_size]
        logits = _weighted_relu_logits(q[b], k_b, s_b, weights[b * n_len:(b + 1) * n_len])
        logits = logits.masked_fill(~valid[None, :], float("-inf"))
        if clean_logits:
            logits = logits.masked_fill(pos[None, :] >= lens[b][:, None], float("-inf"))
        out[b * n_len:(b + 1) * n_len] = logits.to(torch.float32)
    return out
