"""Benchmark cases of sparse_mla_fwd (family "attn_fwd") and sparse_mla_bwd ("attn_bwd").

CUDA (SPEC section 6): forward at T=4096, H=128, K=2048, S in {8K, 32K, 128K}; backward at
T=4096, S=8192, H=128, K=2048 (atomic, and deterministic dKV with each design: `[fixed]`, the
fixed-point default where its int64 [S, d_qk] sums fit 64 MiB, and the chunked `[list]`,
`[bitmap]`; each backward kernel by DSA_SPARSE_MLA_BWD: `[wgmma]`, the sm_90a default,
`[mma]`); the forward again with each kernel named by DSA_SPARSE_MLA_FWD (`[ws-pair]`, the sm_90a
default for H = 128: 2-CTA clusters sharing each gather; `[ws]`, unpaired, the default for
H = 64; `[wgmma]`; `[mma]`) at S in {8K, 128K}; the DeepSeek-V4 width
d_qk = 512 (K == V) forward and backward at T=4096, H=64, K=640, S=32K (SPEC section 6's
d_qk = 512 row; names end in `[d512]`). FLOPs: forward 2*T*H*K*(d_qk+512) over valid entries
(all entries are valid here), backward 2.5x that; both
compute-bound against the bf16 tensor-core roofline. Bytes: each input read once, each output
written once (kv counted once, not per selection).
Baselines: gather the selected rows and run PyTorch attention (bmm, fp32 softmax; chunked over T
to bound memory), and dense attention over the whole context where it fits (S = 8K), each once
in bf16 (`... bf16`) and once upcast to fp32 (`... fp32`: the faster one on CPUs whose bf16
matmul is emulated).
CPU / quick: tiny shapes that run in well under a second; d_qk 512 at H = 8 (the TP8 shard).
"""
from __future__ import annotations

from typing import List

import torch

from .common import Case, with_env

__all__ = ["cases"]

D_QK, D_V = 576, 512


def _inputs(device, T, H, S, K, gen, d_qk=D_QK):
    q = (torch.randn(T, H, d_qk, generator=gen) * 0.5).to(torch.bfloat16).to(device)
    kv = torch.randn(S, 1, d_qk, generator=gen).to(torch.bfloat16).to(device)
    # K distinct-ish rows per token (random, like a top-k over a long context).
    idx = torch.randint(0, S, (T, 1, K), generator=gen, dtype=torch.int32).to(device)
    return q, kv, idx


def _chunk(T, H, K, budget_elems=1 << 28):
    """Tokens per baseline chunk so that the [Tc, K, d_qk] gather and [Tc, H, K] scores fit."""
    return max(1, min(T, budget_elems // max(1, K * max(D_QK, H))))


# The PyTorch composites, each in bf16 and upcast to fp32 (which is faster depends on the CPU).
COMPOSITE_DTYPES = (("bf16", torch.bfloat16), ("fp32", torch.float32))


def _gathered_attention(q, kv, idx, scale, chunk, dtype=torch.bfloat16):
    """What a user would run without the kernel: gather the selected rows, bmm in `dtype`, fp32
    softmax, bmm in `dtype` (chunked over tokens)."""
    outs = []
    flat = kv[:, 0]
    for t0 in range(0, q.shape[0], chunk):
        qi, ii = q[t0:t0 + chunk].to(dtype), idx[t0:t0 + chunk, 0].long()
        rows = flat[ii].to(dtype)                                         # [Tc, K, d_qk]
        s = torch.bmm(qi, rows.transpose(1, 2)).float() * scale           # [Tc, H, K]
        p = torch.softmax(s, dim=-1).to(dtype)
        outs.append(torch.bmm(p, rows[..., :D_V]).to(q.dtype))
    return torch.cat(outs)


def _gathered_attention_bwd(q, kv, idx, scale, dout, chunk, dtype=torch.bfloat16):
    """Baseline backward: autograd through the gathered PyTorch attention in `dtype`, chunk by
    chunk (inputs and dout already in `dtype`: the upcast is not part of the backward)."""
    kvg = kv.detach().to(dtype).requires_grad_(True)
    dq = []
    for t0 in range(0, q.shape[0], chunk):
        qi = q[t0:t0 + chunk].detach().to(dtype).requires_grad_(True)
        rows = kvg[:, 0][idx[t0:t0 + chunk, 0].long()]
        s = torch.bmm(qi, rows.transpose(1, 2)).float() * scale
        p = torch.softmax(s, dim=-1).to(dtype)
        o = torch.bmm(p, rows[..., :D_V])
        o.backward(dout[t0:t0 + chunk].to(dtype))
        dq.append(qi.grad)
    return torch.cat(dq), kvg.grad


def _dense_attention(q, kv, scale, chunk, dtype=torch.bfloat16):
    """Dense attention of every query over the whole context (no sparsity, no mask), in `dtype`."""
    flat = kv[:, 0].to(dtype)
    outs = []
    for t0 in range(0, q.shape[0], chunk):
        qi = q[t0:t0 + chunk].to(dtype)
        Tc, H, D = qi.shape
        s = (qi.reshape(Tc * H, D) @ flat.t()).float() * scale           # [Tc*H, S]
        p = torch.softmax(s, dim=-1).to(dtype)
        outs.append((p @ flat[:, :D_V]).view(Tc, H, D_V).to(q.dtype))
    return torch.cat(outs)


def _suffix(kernel: str, d_qk: int, tag: str = "") -> str:
    tags = ([kernel] if kernel else []) + (["d512"] if d_qk == 512 else []) + ([tag] if tag else [])
    return f"[{','.join(tags)}]" if tags else ""


def _fwd_case(device, T, H, S, K, gen, dense: bool, kernel: str = "", d_qk: int = D_QK) -> Case:
    """kernel: DSA_SPARSE_MLA_FWD for this case ("ws-pair", "ws", "wgmma", "mma"; "" = the default)."""
    import dsa_ext

    q, kv, idx = _inputs(device, T, H, S, K, gen, d_qk)
    scale = d_qk ** -0.5
    chunk = _chunk(T, H, K)
    baselines = {f"gather + torch attention {name}": (lambda dt=dt: _gathered_attention(q, kv, idx, scale, chunk, dt))
                 for name, dt in COMPOSITE_DTYPES}
    if dense:
        dchunk = max(1, min(T, (1 << 28) // (H * S)))
        for name, dt in COMPOSITE_DTYPES:
            baselines[f"dense torch attention (all S) {name}"] = (
                lambda dt=dt: _dense_attention(q, kv, scale, dchunk, dt))
    flops = 2.0 * T * H * K * (d_qk + D_V)
    nbytes = (q.numel() + kv.numel()) * 2 + idx.numel() * 4 + T * H * D_V * 2 + T * H * 4
    op = lambda: dsa_ext.sparse_mla_fwd(q, kv, idx, scale)  # noqa: E731
    return Case(family="attn_fwd", name="sparse_mla_fwd" + _suffix(kernel, d_qk),
                shape={"T": T, "H": H, "S": S, "K": K, "d_qk": d_qk},
                fn=with_env(op, "DSA_SPARSE_MLA_FWD", kernel) if kernel else op,
                flops=flops, bytes=float(nbytes), bound="compute", flops_dtype="bf16",
                baselines=baselines, note="random indices, all valid")


def _bwd_case(device, T, H, S, K, gen, deterministic: bool, d_qk: int = D_QK, reduce: str = "",
              kernel: str = "") -> Case:
    """reduce: DSA_SPARSE_MLA_DET_REDUCE for a deterministic case ("fixed", "list", "bitmap"; "" = default);
    kernel: DSA_SPARSE_MLA_BWD ("wgmma", "mma"; "" = the default)."""
    import dsa_ext

    q, kv, idx = _inputs(device, T, H, S, K, gen, d_qk)
    scale = d_qk ** -0.5
    out, lse = dsa_ext.sparse_mla_fwd(q, kv, idx, scale)
    dout = (torch.randn(out.shape, generator=gen) * 0.1).to(torch.bfloat16).to(device)
    upcast = {torch.float32: (q.float(), kv.float(), dout.float())}   # built once, outside the timing
    chunk = max(1, _chunk(T, H, K) // 2)
    flops = 2.5 * 2.0 * T * H * K * (d_qk + D_V)
    nbytes = ((q.numel() + kv.numel() + 2 * out.numel()) * 2 + idx.numel() * 4 + lse.numel() * 4
              + (q.numel() + kv.numel()) * 2)
    name = ("sparse_mla_bwd_deterministic" if deterministic else "sparse_mla_bwd") + _suffix(kernel, d_qk, reduce)
    op = lambda: dsa_ext.sparse_mla_bwd(q, kv, out, dout, idx, lse, scale, deterministic=deterministic)  # noqa: E731
    fn = with_env(op, "DSA_SPARSE_MLA_DET_REDUCE", reduce) if reduce else op
    fn = with_env(fn, "DSA_SPARSE_MLA_BWD", kernel) if kernel else fn
    return Case(family="attn_bwd", name=name, shape={"T": T, "H": H, "S": S, "K": K, "d_qk": d_qk},
                fn=fn,
                flops=flops, bytes=float(nbytes), bound="compute", flops_dtype="bf16",
                baselines={"gather + torch attention autograd bf16":
                           lambda: _gathered_attention_bwd(q, kv, idx, scale, dout, chunk),
                           "gather + torch attention autograd fp32":
                           lambda: _gathered_attention_bwd(*upcast[torch.float32][:2], idx, scale,
                                                           upcast[torch.float32][2], chunk, torch.float32)},
                note="FLOPs = 2.5x forward; random indices, all valid")


def cases(device: torch.device, quick: bool) -> List[Case]:
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    out: List[Case] = []
    if device.type == "cuda" and not quick:
        for S in (8192, 32768, 131072):
            out.append(_fwd_case(device, 4096, 128, S, 2048, gen, dense=S == 8192))
        # each forward kernel by name at the SPEC shapes (the default is ws): the first GPU
        # run times the warp-specialised kernel beside the earlier two
        for S in (8192, 131072):
            for kernel in ("ws-pair", "ws", "wgmma", "mma"):
                out.append(_fwd_case(device, 4096, 128, S, 2048, gen, dense=False, kernel=kernel))
        out.append(_bwd_case(device, 4096, 128, 8192, 2048, gen, deterministic=False))
        # the deterministic designs: fixed point (the default at this S), chunked list / bitmap
        for reduce in ("fixed", "list", "bitmap"):
            out.append(_bwd_case(device, 4096, 128, 8192, 2048, gen, deterministic=True, reduce=reduce))
        for kernel in ("wgmma", "mma"):     # the backward kernels by name (default: wgmma)
            out.append(_bwd_case(device, 4096, 128, 8192, 2048, gen, deterministic=False, kernel=kernel))
        # DeepSeek-V4 width (SPEC section 6, d_qk = 512 row): T=4096, H=64, K=640, S=32K
        out.append(_fwd_case(device, 4096, 64, 32768, 640, gen, dense=False, d_qk=512))
        for kernel in ("ws", "mma"):
            out.append(_fwd_case(device, 4096, 64, 32768, 640, gen, dense=False, kernel=kernel, d_qk=512))
        out.append(_bwd_case(device, 4096, 64, 32768, 640, gen, deterministic=False, d_qk=512))
        out.append(_bwd_case(device, 4096, 64, 32768, 640, gen, deterministic=True, d_qk=512))
    else:
        out.append(_fwd_case(device, 8, 16, 512, 128, gen, dense=True))
        out.append(_bwd_case(device, 8, 16, 512, 128, gen, deterministic=False))
        out.append(_bwd_case(device, 8, 16, 512, 128, gen, deterministic=True))
        # d_qk = 512 at H = 8 (V4-Flash at TP8); two rows only: `dsa-bench all --quick` has a
        # time budget in tests/test_bench_cli.py
        out.append(_fwd_case(device, 8, 8, 512, 128, gen, dense=True, d_qk=512))
        out.append(_bwd_case(device, 8, 8, 512, 128, gen, deterministic=False, d_qk=512))
    return out
