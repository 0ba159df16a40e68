"""Benchmark cases of sparse_mla_decode (family "decode").

CUDA: FlashMLA's decode shape (SPEC section 6: B=128, s_q=2, H=128, K=2048, FP8 cache), the
same with a bf16 cache, and small batches (B=1, 8) where the split-KV path carries the load.
DeepSeek-V4 / GLM-5 rows (SPEC section 6): V4 decode over 584-byte MODEL1 caches (window 128 +
512 compressed entries in one softmax through the second list, H=64, s_q=1, a sink) and 8-head
decode (H=8, K=2048: GLM-5 / V4-Flash at TP8) at B=128 on CUDA, B=2 on the CPU / quick.
CPU / quick: tiny shapes. Baselines: what a user would otherwise run, i.e. gather the selected
records, dequantise them, and run PyTorch attention over them, once with bf16 GEMMs (`... bf16`)
and once upcast to fp32 (`... fp32`: the faster one on CPUs whose bf16 matmul is emulated).
"""
from __future__ import annotations

import math
from typing import List

import torch

from .common import Case, with_env
from ..ops.mla_decode import sparse_mla_decode
from ..reference.cache import _v4_pages, dequantize_mla_cache, new_mla_kv_cache

D_QK, D_V = 576, 512


def _fp8_cache(num_slots: int, block_size: int, device) -> torch.Tensor:
    """Random FP8 MLA records (finite e4m3 values, power-of-two tile scales, bf16 rope)."""
    nope = (torch.randn(num_slots, 512, device=device) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale = torch.exp2(torch.randint(-10, -4, (num_slots, 4), device=device).float())
    rope = torch.randn(num_slots, 64, device=device, dtype=torch.bfloat16)
    rec = torch.cat([nope.view(torch.uint8), scale.view(torch.uint8), rope.view(torch.uint8)], dim=1)
    return rec.view(num_slots // block_size, block_size, 1, 656)


def _gathered_attention(q, kv_cache, indices, sm_scale, dtype=torch.bfloat16):
    """Baseline: gather + dequantise the selected records, then PyTorch attention (GEMMs in `dtype`)."""
    B, s_q, H, _ = q.shape
    K = indices.shape[-1]
    flat = kv_cache.view(-1, kv_cache.shape[-1])
    valid = (indices >= 0) & (indices < flat.shape[0])
    rows = flat[torch.where(valid, indices, 0).view(-1).long()]
    kv = dequantize_mla_cache(rows.view(-1, 1, 1, rows.shape[-1]))
    kv = kv.to(dtype).view(B * s_q, K, D_QK)
    scores = torch.bmm(q.to(dtype).view(B * s_q, H, D_QK), kv.transpose(1, 2)).float() * sm_scale
    scores = scores.masked_fill(~valid.view(B * s_q, 1, K), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - lse[..., None]).to(dtype)
    out = torch.bmm(p, kv[..., :D_V]).to(q.dtype)
    return out.view(B, s_q, H, D_V), lse.view(B, s_q, H)


def _gather_rows(kv_cache, indices):
    """Baseline gather: the dequantised fp32 rows of `indices` (any slot; invalid ones read slot 0)
    of a V4 cache (584-byte pages: rows and scales apart) or a bf16 512 cache, and their validity."""
    nb, bs = kv_cache.shape[:2]
    valid = (indices >= 0) & (indices < nb * bs)
    slots = torch.where(valid, indices, 0).view(-1).long()
    if kv_cache.dtype != torch.uint8:
        return kv_cache.view(nb * bs, -1)[slots].float(), valid
    rows, scales = _v4_pages(kv_cache)
    r, sc = rows[slots // bs, slots % bs], scales[slots // bs, slots % bs]
    nope = r[:, :448].contiguous().view(torch.float8_e4m3fn).float().view(-1, 7, 64)
    s = sc[:, :7].contiguous().view(torch.float8_e8m0fnu).float()
    rope = r[:, 448:].contiguous().view(torch.bfloat16).float()
    return torch.cat([(nope * s[..., None]).view(-1, 448), rope], dim=1), valid


def _gathered_v4_attention(q, lists, sm_scale, sink, dtype=torch.bfloat16):
    """Baseline of a V4 decode: gather + dequantise the rows of both lists, one PyTorch softmax
    over them with the sink in the denominator (GEMMs in `dtype`)."""
    B, s_q, H, D = q.shape
    rows, valid = zip(*(_gather_rows(c, i) for c, i in lists))
    K = sum(i.shape[-1] for _, i in lists)
    kv = torch.cat([r.view(B * s_q, -1, D) for r in rows], dim=1).to(dtype)
    ok = torch.cat([v.view(B * s_q, -1) for v in valid], dim=1)
    scores = torch.bmm(q.to(dtype).view(B * s_q, H, D), kv.transpose(1, 2)).float() * sm_scale
    scores = scores.masked_fill(~ok.view(B * s_q, 1, K), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - lse[..., None]) * torch.sigmoid(lse - sink.view(1, H))[..., None]
    out = torch.bmm(p.to(dtype), kv).to(q.dtype)
    return out.view(B, s_q, H, D), lse.view(B, s_q, H)


def _v4_cache(num_slots, block_size, fp8, device):
    """A V4 cache (FlashMLA's padded MODEL1 pages or bf16 512) holding random rows."""
    cache = new_mla_kv_cache(num_slots // block_size, block_size, fp8, device, model="v4")
    torch.ops.dsa.mla_kv_cache_write(torch.randn(num_slots, 512, device=device, dtype=torch.bfloat16),
                                      torch.arange(num_slots, device=device), cache)
    return cache


def _v4_case(device, B, s_q, H, window, K2, fp8=True, block_size=64) -> Case:
    """V4 decode: each query's `window` slots in the window cache and K2 compressed entries in
    the second cache, one softmax (SPEC 10.3), sink per head."""
    n_win = math.ceil(max(B * window, 4096) / block_size) * block_size
    n_cmp = math.ceil(max(B * K2, 16384) / block_size) * block_size
    cache, extra = _v4_cache(n_win, block_size, fp8, device), _v4_cache(n_cmp, block_size, fp8, device)
    q = torch.randn(B, s_q, H, 512, device=device, dtype=torch.bfloat16)
    win = torch.randint(0, n_win, (B, s_q, window), device=device, dtype=torch.int32)
    cmp = torch.randint(0, n_cmp, (B, s_q, K2), device=device, dtype=torch.int32)
    sink = torch.randn(H, device=device)
    sm_scale = 512 ** -0.5
    token_bytes = 584 if fp8 else 1024
    K = window + K2
    return Case(
        family="decode", name="sparse_mla_decode[v4]",
        shape=dict(B=B, s_q=s_q, H=H, window=window, K2=K2, fp8_cache=int(fp8), block_size=block_size),
        fn=lambda: sparse_mla_decode(q, cache, win, sm_scale, 512, sink, None, extra, cmp),
        flops=2.0 * B * s_q * H * K * (512 + 512),
        bytes=float(q.numel() * 2 + B * s_q * K * (token_bytes + 4) + B * s_q * H * (512 * 2 + 4)),
        bound="memory", flops_dtype="bf16",
        baselines={f"gather+dequant+torch attention {name}":
                   (lambda dt=dt: _gathered_v4_attention(q, [(cache, win), (extra, cmp)], sm_scale, sink, dt))
                   for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32))},
        note=("V4 FP8 584-byte caches" if fp8 else "V4 bf16 512 caches") + f", window {window} + {K2} compressed",
    )


def _with_wgmma(fn):
    """Run fn with the opt-in wgmma kernel selected (DSA_MLA_DECODE_WGMMA=1)."""
    return with_env(fn, "DSA_MLA_DECODE_WGMMA", "1")


def _case(device, B, s_q, H, K, fp8, block_size=64, invalid_frac=0.0, wgmma=False, kernel=None,
          bound="compute") -> Case:
    """kernel: DSA_MLA_DECODE_KERNEL for this case ("overlap", "mma", "wgmma"; None = the default).
    bound: the roofline the fraction refers to (8 heads: HBM, SPEC section 6)."""
    gen_slots = max(B * s_q * K, 64 * 1024)
    num_slots = math.ceil(gen_slots / block_size) * block_size
    if fp8:
        cache = _fp8_cache(num_slots, block_size, device)
    else:
        cache = torch.randn(num_slots // block_size, block_size, 1, D_QK, device=device,
                            dtype=torch.bfloat16)
    q = torch.randn(B, s_q, H, D_QK, device=device, dtype=torch.bfloat16)
    indices = torch.randint(0, num_slots, (B, s_q, K), device=device, dtype=torch.int32)
    if invalid_frac:
        indices[torch.rand(B, s_q, K, device=device) < invalid_frac] = -1
    sm_scale = D_QK ** -0.5
    record_bytes = 656 if fp8 else 2 * D_QK
    op = lambda: sparse_mla_decode(q, cache, indices, sm_scale)
    return Case(
        family="decode",
        name="sparse_mla_decode[wgmma]" if wgmma else (f"sparse_mla_decode[{kernel}]" if kernel else "sparse_mla_decode"),
        shape=dict(B=B, s_q=s_q, H=H, K=K, fp8_cache=int(fp8), block_size=block_size),
        fn=_with_wgmma(op) if wgmma else (with_env(op, "DSA_MLA_DECODE_KERNEL", kernel) if kernel else op),
        flops=2.0 * B * s_q * H * K * (D_QK + D_V),
        bytes=float(q.numel() * 2 + B * s_q * K * (record_bytes + 4) + B * s_q * H * (D_V * 2 + 4)),
        bound=bound,
        flops_dtype="bf16",
        baselines={f"gather+dequant+torch attention {name}":
                   (lambda dt=dt: _gathered_attention(q, cache, indices, sm_scale, dt))
                   for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32))},
        note=("FP8 cache" if fp8 else "bf16 cache") + f", {num_slots} cached slots",
    )


def cases(device: torch.device, quick: bool) -> List[Case]:
    device = torch.device(device)
    if quick or device.type != "cuda":
        return [_case(device, 1, 1, 16, 128, True), _case(device, 2, 2, 16, 256, True),
                _case(device, 2, 2, 16, 256, False),
                # SPEC section 6's V4 and 8-head rows at B = 2
                _v4_case(device, 2, 1, 64, 128, 512), _case(device, 2, 1, 8, 2048, True, bound="memory")]
    return [
        # DeepSeek-V4 decode (window 128 + 512 compressed, one softmax) and 8-head decode (SPEC 6)
        _v4_case(device, 128, 1, 64, 128, 512),
        _v4_case(device, 128, 1, 64, 128, 512, fp8=False),
        _v4_case(device, 128, 1, 128, 128, 1024),          # V4-Pro: 128 heads, top-k 1024
        _case(device, 128, 1, 8, 2048, True, bound="memory"),
        _case(device, 128, 1, 8, 2048, False, bound="memory"),
        _case(device, 128, 2, 128, 2048, True),    # SPEC section 6 / FlashMLA's decode shape
        _case(device, 128, 2, 128, 2048, False),
        _case(device, 8, 2, 128, 2048, True),
        _case(device, 1, 2, 128, 2048, True),
        _case(device, 64, 1, 16, 2048, True),      # TP-sharded heads
        # the opt-in wgmma kernel (64-head blocks), same shapes
        _case(device, 128, 2, 128, 2048, True, wgmma=True),
        _case(device, 128, 2, 128, 2048, False, wgmma=True),
        _case(device, 1, 2, 128, 2048, True, wgmma=True),
        # the overlap kernel (FP8, H 64 / 128: the sm_90a default there) beside the mma.sync
        # kernel it replaced, same shapes; elsewhere the switch falls back to the old kernels
        _case(device, 128, 2, 128, 2048, True, kernel="overlap"),
        _case(device, 128, 2, 128, 2048, True, kernel="mma"),
        _case(device, 128, 2, 64, 2048, True, kernel="overlap"),
        _case(device, 128, 2, 64, 2048, True, kernel="mma"),
        _case(device, 1, 2, 128, 2048, True, kernel="overlap"),
        _case(device, 1, 2, 128, 2048, True, kernel="mma"),
    ]
