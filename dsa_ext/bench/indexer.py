"""Benchmark cases of the indexer family (SPEC section 6).

- ``indexer_logits`` (prefill, compute-bound, FP8 roofline): one sequence of S tokens whose
  last T tokens are the queries, causal ranges (query t sees keys ``< S - T + t + 1``), H = 64,
  D = 128. FLOPs ``2*H*D`` per in-range (t, s) pair.
- ``paged_indexer_logits`` (decode, memory-bound): B sequences of ``ctx`` cached tokens in a
  block-64 paged cache with shuffled blocks, N = 1 or 2 queries each. Bytes: the cached tokens'
  132 bytes each, q, weights, block table, context lengths, and the ``[B*N, ctx]`` output.
- ``paged_indexer_logits mxfp4`` (V4 decode, SPEC 10.5): the same decode shapes over an MXFP4
  key cache (68 bytes a key: half the key bytes a step reads), beside the FP8-key op on the
  same shape and a PyTorch gather + dequantise + matmul composite.

Baselines: what a user would otherwise run in PyTorch — dequantise, ``q @ k^T`` per head, ReLU,
the weighted head sum as a batched matmul, times the key scale (paged: gather the keys through
the block table first) — once in bf16 (``torch bf16``) and once upcast to fp32 (``torch fp32``:
the faster one on CPUs whose bf16 matmul is emulated), included only where the ``[T, H, S]``
score tensor fits in 16 GiB. ``quick`` / CPU: tiny shapes that run in a second or two.
"""
from __future__ import annotations

import torch

import dsa_ext
from .common import Case

__all__ = ["cases"]

_FP8 = torch.float8_e4m3fn
_BASELINE_SCORE_BYTES = 16 << 30
# The PyTorch composites, each in bf16 and upcast to fp32 (which is faster depends on the CPU).
_COMPOSITE_DTYPES = (("bf16", torch.bfloat16), ("fp32", torch.float32))


def _torch_prefill(q, k, k_scale, weights, ks, ke, dtype=torch.bfloat16):
    """Dense PyTorch formulation: [T, H, S] scores in `dtype`."""
    t_len, h_len, d_len = q.shape
    s_len = k.shape[0]
    scores = torch.matmul(q.to(dtype).view(t_len * h_len, d_len), k.to(dtype).t())
    scores = scores.relu_().view(t_len, h_len, s_len)
    logits = torch.bmm(weights.to(dtype)[:, None, :], scores)[:, 0].float() * k_scale[None]
    cols = torch.arange(s_len, device=q.device)[None]
    return logits.masked_fill_((cols < ks[:, None]) | (cols >= ke[:, None]), float("-inf"))


def _torch_paged(q, kv_cache, weights, context_lens, block_table, max_context_len, dtype=torch.bfloat16):
    """Gather the keys through the block table, then the dense formulation per sequence."""
    b_len, n_len, h_len, d_len = q.shape
    nb, bs = kv_cache.shape[:2]
    flat = kv_cache.view(nb, bs * (d_len + 4))
    k_fp8 = flat[:, : bs * d_len].reshape(nb * bs, d_len).view(_FP8)
    k_scale = flat[:, bs * d_len:].contiguous().view(torch.float32).reshape(nb * bs)
    pos = torch.arange(max_context_len, device=q.device)
    slots = (block_table.long()[:, pos // bs] * bs + pos % bs)                     # [B, P]
    k = k_fp8[slots].to(dtype)                                                     # [B, P, D]
    scores = torch.matmul(q.to(dtype).view(b_len, n_len * h_len, d_len), k.transpose(1, 2))
    scores = scores.relu_().view(b_len * n_len, h_len, max_context_len)
    logits = torch.bmm(weights.to(dtype)[:, None, :], scores)[:, 0].float()
    logits = logits * k_scale[slots].repeat_interleave(n_len, 0)
    lens = (context_lens.long()[:, None] - n_len + 1 + torch.arange(n_len, device=q.device)).reshape(-1)
    return logits.masked_fill_(pos[None] >= lens[:, None], float("-inf"))


def _random_cache(g, num_blocks, block_size, head_dim, device):
    """A full indexer K cache built on the device: random finite FP8 bytes (every e4m3fn byte
    but 0x7f / 0xff, the NaNs) and positive scales, laid out as SPEC section 2."""
    shape = (num_blocks, block_size * head_dim)
    values = torch.randint(0, 0x7F, shape, dtype=torch.uint8, device=device, generator=g)
    values |= torch.randint(0, 2, shape, dtype=torch.uint8, device=device, generator=g) << 7
    scales = torch.rand(num_blocks, block_size, device=device, generator=g) * 0.1 + 0.01
    return torch.cat([values, scales.view(torch.uint8)], dim=1).view(num_blocks, block_size, 1, head_dim + 4)


def _random_mxfp4_cache(g, num_blocks, block_size, head_dim, device):
    """An MXFP4 indexer cache (csrc/indexer/mxfp4.h layout): random code bytes, then scale
    bytes around 2^0 (127 +- 6) so that logits stay finite."""
    codes = torch.randint(0, 256, (num_blocks, block_size * head_dim // 2), dtype=torch.uint8, device=device,
                          generator=g)
    scales = torch.randint(121, 134, (num_blocks, block_size * head_dim // 32), dtype=torch.uint8, device=device,
                           generator=g)
    row = head_dim // 2 + head_dim // 32
    return torch.cat([codes, scales], dim=1).view(num_blocks, block_size, 1, row)


def _torch_paged_mxfp4(q, kv_cache, weights, context_lens, block_table, max_context_len, dtype=torch.float32):
    """Gather the MXFP4 keys through the block table, dequantise (LUT x 2^e), then the dense
    formulation per sequence (no per-key scale)."""
    b_len, n_len, h_len, d_len = q.shape
    nb, bs = kv_cache.shape[:2]
    flat = kv_cache.view(nb, -1)
    codes = flat[:, : bs * d_len // 2].reshape(nb * bs, d_len // 2)
    sc = flat[:, bs * d_len // 2:].reshape(nb * bs, d_len // 32)
    pos = torch.arange(max_context_len, device=q.device)
    slots = (block_table.long()[:, pos // bs] * bs + pos % bs)                     # [B, P]
    c = codes[slots].long()                                                        # [B, P, D/2]
    lut = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6],
                       dtype=dtype, device=q.device)
    vals = torch.stack([lut[c & 15], lut[c >> 4]], dim=-1).flatten(-2)            # [B, P, D]
    scale = torch.exp2(sc[slots].to(dtype) - 127).repeat_interleave(32, dim=-1)
    k = vals * scale
    scores = torch.matmul(q.to(dtype).view(b_len, n_len * h_len, d_len), k.transpose(1, 2))
    scores = scores.relu_().view(b_len * n_len, h_len, max_context_len)
    logits = torch.bmm(weights.to(dtype)[:, None, :], scores)[:, 0].float()
    lens = (context_lens.long()[:, None] - n_len + 1 + torch.arange(n_len, device=q.device)).reshape(-1)
    return logits.masked_fill_(pos[None] >= lens[:, None], float("-inf"))


def _fp8(g, device, *shape):
    return (torch.randn(*shape, generator=g) * 2).to(_FP8).to(device)


def cases(device, quick: bool):
    device = torch.device(device)
    small = quick or device.type != "cuda"
    g = torch.Generator(device="cpu").manual_seed(0)
    g_dev = torch.Generator(device=device).manual_seed(0)
    heads, head_dim = (16 if device.type != "cuda" else 64), 128
    out = []

    # ---- prefill: indexer_logits ----
    prefill = [(32, 512)] if small else [(4096, 8192), (4096, 32768), (4096, 131072)]
    for t_len, s_len in prefill:
        q = _fp8(g, device, t_len, heads, head_dim)
        k = _fp8(g, device, s_len, head_dim)
        k_scale = (torch.rand(s_len, generator=g) * 0.1 + 0.01).to(device)
        weights = torch.randn(t_len, heads, generator=g).to(device)
        ke = torch.arange(s_len - t_len + 1, s_len + 1, dtype=torch.int32).to(device)
        ks = torch.zeros(t_len, dtype=torch.int32, device=device)
        pairs = int((ke.long() - ks.long()).sum())
        baselines = {}
        if 4 * t_len * heads * s_len <= _BASELINE_SCORE_BYTES:
            for name, dt in _COMPOSITE_DTYPES:
                baselines[f"torch dequant + matmul {name}"] = (
                    lambda q=q, k=k, s=k_scale, w=weights, ks=ks, ke=ke, dt=dt: _torch_prefill(q, k, s, w, ks, ke, dt))
        out.append(Case(
            family="indexer", name="indexer_logits",
            shape=dict(T=t_len, S=s_len, H=heads, D=head_dim),
            fn=lambda q=q, k=k, s=k_scale, w=weights, ks=ks, ke=ke: dsa_ext.indexer_logits(q, k, s, w, ks, ke),
            flops=2.0 * heads * head_dim * pairs,
            bytes=q.numel() + k.numel() + 4 * s_len + 4 * weights.numel() + 8 * t_len + 4 * t_len * s_len,
            bound="compute", flops_dtype="fp8",
            baselines=baselines,
            note="causal: query t sees keys < S - T + t + 1",
        ))

    # ---- decode: paged_indexer_logits ----
    block_size = 64
    decode = [(4, 1, 1024), (4, 2, 1024)] if small else [(64, 1, 131072), (64, 2, 131072), (128, 1, 32768), (128, 2, 131072)]
    for b_len, n_len, ctx in decode:
        blocks_per_seq = ctx // block_size
        num_blocks = b_len * blocks_per_seq
        cache = _random_cache(g_dev, num_blocks, block_size, head_dim, device)
        block_table = torch.randperm(num_blocks, generator=g).view(b_len, blocks_per_seq).to(torch.int32).to(device)
        context_lens = torch.full((b_len,), ctx, dtype=torch.int32, device=device)
        q = _fp8(g, device, b_len, n_len, heads, head_dim)
        weights = torch.randn(b_len * n_len, heads, generator=g).to(device)
        visible = b_len * sum(ctx - n_len + 1 + j for j in range(n_len))
        baselines = {}
        if 4 * b_len * n_len * heads * ctx <= _BASELINE_SCORE_BYTES and 4 * b_len * ctx * head_dim <= _BASELINE_SCORE_BYTES:
            for name, dt in _COMPOSITE_DTYPES:
                baselines[f"torch gather + dequant + matmul {name}"] = (
                    lambda q=q, c=cache, w=weights, cl=context_lens, bt=block_table, P=ctx, dt=dt:
                    _torch_paged(q, c, w, cl, bt, P, dt))
        out.append(Case(
            family="indexer", name="paged_indexer_logits",
            shape=dict(B=b_len, N=n_len, ctx=ctx, H=heads, D=head_dim, block_size=block_size),
            fn=lambda q=q, c=cache, w=weights, cl=context_lens, bt=block_table, P=ctx:
                dsa_ext.paged_indexer_logits(q, c, w, cl, bt, P),
            flops=2.0 * heads * head_dim * visible,
            bytes=(b_len * ctx * (head_dim + 4) + q.numel() + 4 * weights.numel() + 4 * block_table.numel()
                   + 4 * b_len + 4 * b_len * n_len * ctx),
            bound="memory", flops_dtype="fp8",
            baselines=baselines,
        ))
        # The same step over MXFP4 keys (68 bytes a key), beside the FP8-key op above.
        mx_cache = _random_mxfp4_cache(g_dev, num_blocks, block_size, head_dim, device)
        mx_baselines = {"dsa_ext paged_indexer_logits FP8 keys (132 B a key)": (
            lambda q=q, c=cache, w=weights, cl=context_lens, bt=block_table, P=ctx:
            dsa_ext.paged_indexer_logits(q, c, w, cl, bt, P))}
        if 4 * b_len * n_len * heads * ctx <= _BASELINE_SCORE_BYTES and 8 * b_len * ctx * head_dim <= _BASELINE_SCORE_BYTES:
            mx_baselines["torch gather + dequant + matmul fp32"] = (
                lambda q=q, c=mx_cache, w=weights, cl=context_lens, bt=block_table, P=ctx:
                _torch_paged_mxfp4(q, c, w, cl, bt, P))
        out.append(Case(
            family="indexer", name="paged_indexer_logits mxfp4",
            shape=dict(B=b_len, N=n_len, ctx=ctx, H=heads, D=head_dim, block_size=block_size),
            fn=lambda q=q, c=mx_cache, w=weights, cl=context_lens, bt=block_table, P=ctx:
                dsa_ext.paged_indexer_logits(q, c, w, cl, bt, P),
            flops=2.0 * heads * head_dim * visible,
            bytes=(b_len * ctx * (head_dim // 2 + head_dim // 32) + q.numel() + 4 * weights.numel()
                   + 4 * block_table.numel() + 4 * b_len + 4 * b_len * n_len * ctx),
            bound="memory", flops_dtype="fp8",
            baselines=mx_baselines,
            note="MXFP4 keys: 68 B a key vs 132 B (FP8)",
        ))
    return out
