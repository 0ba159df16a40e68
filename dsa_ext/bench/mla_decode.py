"""Benchmark cases of sparse_mla_decode (family "decode").

CUDA: FlashMLA's decode shape (SPEC section 6: B=128, s_q=2, H=128, K=2048, FP8 cache), the
same with a bf16 cache, and small batches (B=1, 8) where the split-KV path carries the load.
CPU / quick: tiny shapes. Baselines: what a user would otherwise run, i.e. gather the selected
records, dequantise them, and run PyTorch attention over them, once with bf16 GEMMs (`... bf16`)
and once upcast to fp32 (`... fp32`: the faster one on CPUs whose bf16 matmul is emulated).
"""
from __future__ import annotations

import math
import os
from typing import List

import torch

from .common import Case
from ..ops.mla_decode import sparse_mla_decode
from ..reference.cache import dequantize_mla_cache

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


def _with_env(fn, name, value):
    """Run fn with environment variable `name` = value (the glue and the launcher read the decode
    switches per call, so under --graphs the choice is captured too)."""
    def run():
        old = os.environ.get(name)
        os.environ[name] = value
        try:
            return fn()
        finally:
            if old is None:
                del os.environ[name]
            else:
                os.environ[name] = old
    return run


def _with_wgmma(fn):
    """Run fn with the opt-in wgmma kernel selected (DSA_MLA_DECODE_WGMMA=1)."""
    return _with_env(fn, "DSA_MLA_DECODE_WGMMA", "1")


def _case(device, B, s_q, H, K, fp8, block_size=64, invalid_frac=0.0, wgmma=False, kernel=None) -> Case:
    """kernel: DSA_MLA_DECODE_KERNEL for this case ("overlap", "mma", "wgmma"; None = the default)."""
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
        fn=_with_wgmma(op) if wgmma else (_with_env(op, "DSA_MLA_DECODE_KERNEL", kernel) if kernel else op),
        flops=2.0 * B * s_q * H * K * (D_QK + D_V),
        bytes=float(q.numel() * 2 + B * s_q * K * (record_bytes + 4) + B * s_q * H * (D_V * 2 + 4)),
        bound="compute",
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
                _case(device, 2, 2, 16, 256, False)]
    return [
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
