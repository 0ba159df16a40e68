"""End to end: one DeepSeek-V3.2-shaped layer's DSA path against dense attention, by context length.

For each context length L two cases (family "e2e"):
- `dsa_prefill`: `dsa_ext.modules.DSAPath` over L tokens: indexer projections (wq_b, wk, k_norm,
  rope, Hadamard, FP8), indexer scores + top-k (`indexer_topk`, which never holds the [L, L]
  scores), sparse MLA attention; baseline `dense`: causal attention of the same latent queries
  over all L latent rows.
- `dsa_decode`: one decode step of one sequence holding L tokens in paged caches (FP8 MLA cache):
  the new token's cache writes, `paged_indexer_logits` + `topk_indices` + `topk_slot_ids`,
  `sparse_mla_decode`; baseline `dense`: attention of the new query over all L latent rows.

DSA costs O(L^2) cheap FP8 indexer work plus O(L*K) attention against dense attention's O(L^2),
so it overtakes dense once L is a few times K. The dense baseline is plain PyTorch (matmuls,
fp32 softmax) in query chunks, twice: `dense bf16` (bf16 matmuls) and `dense fp32` (upcast to
fp32: the faster one on CPUs whose bf16 matmul is emulated); the FlashAttention kernels behind
`scaled_dot_product_attention` do not take MLA's 576/512 head dims. The crossover is measured
against the faster of the two. The pipelines mix FP8 and bf16 work, so these rows report time
and speedup only (no roofline fraction).

GPU: V3.2 sizes (H = 128 attention heads, 64 indexer heads, K = 2048), L = 4K..128K.
CPU: reduced sizes (fewer heads, smaller model dim, K = 128) and L = 256..2048, which keep the
O(L*K) vs O(L^2) trend visible in seconds; with `dsa-bench e2e --v32-heads` (V32_HEADS = True)
the V3.2 layer sizes at L = 2K and 4K instead (about ten minutes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

from .common import Case

__all__ = ["cases", "summarize", "dense_mla_attention", "E2EConfig", "config"]


@dataclass(frozen=True)
class E2EConfig:
    contexts: Tuple[int, ...]
    heads: int               # attention heads (latent queries)
    index_heads: int
    topk: int
    dim: int                 # model dim
    q_lora_rank: int
    block_size: int = 64
    note: str = ""


# Set by `dsa-bench --v32-heads`: the CPU runs the V3.2 layer sizes (a longer, opt-in run).
V32_HEADS = False


def config(device: torch.device, quick: bool) -> E2EConfig:
    if device.type != "cuda" and V32_HEADS:
        return E2EConfig((2048, 4096), heads=128, index_heads=64, topk=2048, dim=7168,
                         q_lora_rank=1536, note="CPU: DeepSeek-V3.2 layer sizes (--v32-heads)")
    if device.type == "cuda":
        contexts = (4096, 8192, 16384) if quick else (4096, 8192, 16384, 32768, 65536, 131072)
        return E2EConfig(contexts, heads=128, index_heads=64, topk=2048, dim=7168, q_lora_rank=1536,
                         note="DeepSeek-V3.2 layer sizes")
    # The CPU always runs quick; four doublings show the growth exponents at ~10 s.
    return E2EConfig((256, 512, 1024, 2048), heads=8, index_heads=4, topk=128, dim=512, q_lora_rank=256,
                     note="CPU: reduced sizes (8 heads, 4 indexer heads, dim 512, K=128)")


def dense_mla_attention(q: torch.Tensor, kv: torch.Tensor, sm_scale: float, d_v: int = 512,
                        chunk_bytes: int = 1 << 31, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Causal attention of q `[T, H, 576]` (the last T positions) over all rows of kv `[S, 576]`,
    the way one writes it in PyTorch: per chunk of queries, scores by a matmul in `dtype` (q's
    by default; q and kv are upcast first), fp32 softmax, then the weighted sum of
    V = kv[:, :d_v]; the output has q's dtype. Chunks keep the fp32 scores under `chunk_bytes`;
    only the chunk's own diagonal block of keys needs the causal mask."""
    out_dtype = q.dtype
    if dtype is not None and dtype != q.dtype:
        q, kv = q.to(dtype), kv.to(dtype)
    T, H, D = q.shape
    S = kv.shape[0]
    offset = S - T
    out = torch.empty(T, H, d_v, dtype=out_dtype, device=q.device)
    chunk = max(1, chunk_bytes // (H * S * 4))
    for start in range(0, T, chunk):
        end = min(T, start + chunk)
        keys = kv[: offset + end]
        scores = ((q[start:end] * sm_scale).reshape(-1, D) @ keys.T).view(end - start, H, -1).float()
        diagonal = torch.ones(end - start, end - start, dtype=torch.bool, device=q.device).triu_(1)
        scores[..., offset + start:].masked_fill_(diagonal[:, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        out[start:end] = (probs.view(-1, keys.shape[0]) @ keys[:, :d_v]).view(end - start, H, d_v)
    return out


class _Lazy:
    """Builds a workload on first use, so only the context length being timed holds memory
    (the runner drops each case once it has run)."""

    def __init__(self, build: Callable[[], object]):
        self._build, self._value = build, None

    def __call__(self):
        if self._value is None:
            self._value = self._build()
        return self._value


def cases(device: torch.device, quick: bool) -> List[Case]:
    from ..modules import DSAPath, rope_cos_sin
    from ..paged_cache import PagedDSACache

    cfg = config(device, quick)
    dtype = torch.bfloat16
    sm_scale, d_qk, d_v = 192 ** -0.5, 576, 512
    path = DSAPath(softmax_scale=sm_scale, d_v=d_v, dim=cfg.dim, q_lora_rank=cfg.q_lora_rank,
                   n_heads=cfg.index_heads, topk=cfg.topk, device=device, dtype=dtype).eval()
    gen = torch.Generator(device=device)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device, dtype=dtype) * scale)

    def tokens(n: int, start: int):
        """Inputs of n tokens at positions start..: x, qr, q_latent, kv_latent, cos, sin."""
        cos, sin = rope_cos_sin(torch.arange(start, start + n, device=device))
        return (randn(n, cfg.dim), randn(n, cfg.q_lora_rank), randn(n, cfg.heads, d_qk, scale=0.5),
                randn(n, d_qk, scale=0.5), cos, sin)

    def prefill_inputs(L: int):
        gen.manual_seed(L)
        return tokens(L, 0)

    def decode_state(L: int):
        """A sequence of L - 1 cached tokens and the slot of its L-th, reserved."""
        gen.manual_seed(L + 1)
        cache = PagedDSACache(num_blocks=-(-L // cfg.block_size), block_size=cfg.block_size,
                              kv_cache_dtype="fp8", device=device)
        seq = cache.add_sequence()
        kv_all = randn(L, d_qk, scale=0.5)
        cache.append([seq], [L - 1], randn(L - 1, 128), kv_all[:-1])
        x, qr, q_lat, kv_new, cos, sin = tokens(1, L - 1)
        slot = cache.reserve([seq], 1)
        return dict(cache=cache, seq=seq, kv_all=kv_all, slot=slot,
                    step=(x, qr, q_lat, kv_all[-1:], cos, sin))

    result: List[Case] = []
    for L in cfg.contexts:
        shape = dict(L=L, H=cfg.heads, H_idx=cfg.index_heads, K=cfg.topk)
        pre, dec = _Lazy(lambda L=L: prefill_inputs(L)), _Lazy(lambda L=L: decode_state(L))

        def dsa_prefill(pre=pre):
            with torch.no_grad():
                return path(*pre())

        def dense_prefill(pre=pre, dt=None):
            _, _, q_lat, kv_lat, _, _ = pre()
            return dense_mla_attention(q_lat, kv_lat, sm_scale, d_v, dtype=dt)

        def dsa_decode(dec=dec):
            s = dec()
            with torch.no_grad():
                return path.decode_step(*s["step"], cache=s["cache"], seq_ids=[s["seq"]], slot_mapping=s["slot"])

        def dense_decode(dec=dec, dt=None):
            s = dec()
            return dense_mla_attention(s["step"][2], s["kv_all"], sm_scale, d_v, dtype=dt)

        both = (("bf16", torch.bfloat16), ("fp32", torch.float32))
        result.append(Case("e2e", "dsa_prefill", shape, dsa_prefill, note=cfg.note,
                           baselines={f"dense {n}": (lambda dt=dt, f=dense_prefill: f(dt=dt)) for n, dt in both}))
        result.append(Case("e2e", "dsa_decode", dict(shape, B=1), dsa_decode, note=cfg.note,
                           baselines={f"dense {n}": (lambda dt=dt, f=dense_decode: f(dt=dt)) for n, dt in both}))
    return result


def growth_exponent(lengths: List[int], times: List[float]) -> float:
    """Least-squares slope of log(time) against log(L): ~1 for O(L) work, ~2 for O(L^2)."""
    xs, ys = [math.log(L) for L in lengths], [math.log(t) for t in times]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def fastest_dense(row: dict) -> Optional[dict]:
    """The row's fastest dense baseline (`dense`, `dense bf16`, `dense fp32`) that has a time."""
    timed = [b for name, b in row["baselines"].items()
             if name.split(" ")[0] == "dense" and b.get("speedup") is not None]
    return min(timed, key=lambda b: b["us"]) if timed else None


def summarize(rows: List[dict]) -> List[str]:
    """Where DSA overtakes dense (first context length with speedup > 1 over the faster dense
    baseline), the speedup at the longest context, and how each side's time grows with L, for
    prefill and decode."""
    lines = []
    for name in ("dsa_prefill", "dsa_decode"):
        sel = sorted((r for r in rows if r["family"] == "e2e" and r["name"] == name
                      and fastest_dense(r) is not None),
                     key=lambda r: r["shape"]["L"])
        points = [(r["shape"]["L"], fastest_dense(r)["speedup"]) for r in sel]
        if not points:
            continue
        label = name.replace("dsa_", "")
        trend = ", ".join(f"L={L}: {s:.2f}x" for L, s in points)
        wins = [L for L, s in points if s > 1]
        if wins and all(s > 1 for L, s in points if L >= wins[0]):
            verdict = f"DSA overtakes dense at L={wins[0]}"
        elif wins:
            verdict = f"DSA beats dense at L={', '.join(map(str, wins))} (not monotone)"
        else:
            verdict = f"DSA does not overtake dense up to L={points[-1][0]}"
        lines.append(f"e2e {label}: {verdict}; speedup over the faster dense {points[-1][1]:.2f}x at L={points[-1][0]} "
                     f"({trend})")
        if len(sel) >= 2:
            lengths = [L for L, _ in points]
            dsa = growth_exponent(lengths, [r["ours_us"] for r in sel])
            dense = growth_exponent(lengths, [fastest_dense(r)["us"] for r in sel])
            lines.append(f"e2e {label}: time grows as L^{dsa:.2f} (DSA) vs L^{dense:.2f} (dense)")
    return lines
