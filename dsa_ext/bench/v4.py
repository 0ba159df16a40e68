"""DeepSeek-V4 (SPEC section 10): the compressor and whole V4 attention layers (`dsa-bench v4`).

Cases (family "v4"):
- `v4_compress c=2 r=4` / `v4_compress c=1 r=128`: the bulk compressor over T tokens (d = 512,
  one sequence); memory-bound (kv and score read once, entries written once). Baseline
  `torch`: the same pooling written in PyTorch as V4's reference `Compressor` does it (windows
  as a reshape, the overlap as a shifted copy, softmax, weighted sum, bf16, RMSNorm, rope),
  fp32.
- `v4_layer_prefill <kind>`: `dsa_ext.v4.V4Attention.forward` over L tokens of one sequence,
  the whole layer (projections, compressor, FP8 indexer + top-k for csa, sparse attention with
  the sink over window + compressed rows, inverse rope, output projection). Baselines time the
  attention step alone on the layer's own q and rows: `dense bf16` / `dense fp32` (causal
  attention over all L rows, what a model without sparse attention pays, see
  `dsa_ext.bench.e2e.dense_mla_attention`) and `torch sparse` (the selected rows gathered and
  attended in PyTorch, chunked: the composite of our `sparse_mla_fwd` step).
- `v4_layer_decode <kind>`: one `decode_step` of B sequences holding L tokens in a
  `V4LayerCache` (FP8 MODEL1 caches); baselines: dense attention of the B new queries over
  all L rows, and the PyTorch gathered composite over the same selected rows.

GPU: V4-Flash layer sizes (64 heads, dim 4096, q rank 1024, 64 indexer heads, top-k 512,
window 128), L = 32K..128K. CPU: reduced sizes (8 heads, dim 512, q rank 256, 8 indexer heads,
top-k 128, window 128; L = 256, T = 2048 for the compressor), a few seconds, so that
`dsa-bench all` stays short; longer CPU runs by the environment:
`DSA_BENCH_V4_CONTEXTS=1024,4096 DSA_BENCH_V4_COMPRESS_T=8192,32768 dsa-bench v4`.
These rows mix FP8 and bf16 work: time and speedup only, except the compressor's GB/s.
"""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

import torch

from .common import Case
from .e2e import _Lazy, dense_mla_attention

__all__ = ["cases", "torch_compress", "torch_sparse_attention"]


def torch_compress(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, norm_weight: torch.Tensor,
                   eps: float, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The V4 compressor of one sequence in plain PyTorch (fp32), as a user writes it."""
    ratio, width = ape.shape
    d = norm_weight.numel()
    n = kv.shape[0] // ratio
    kv = kv[: n * ratio].view(n, ratio, width)
    z = score[: n * ratio].view(n, ratio, width) + ape
    if width == 2 * d:   # overlapping windows: window j - 1's first half joins window j's second
        prev_kv = torch.zeros(n, ratio, d, device=kv.device)
        prev_z = torch.full((n, ratio, d), float("-inf"), device=kv.device)
        prev_kv[1:], prev_z[1:] = kv[:-1, :, :d], z[:-1, :, :d]
        kv = torch.cat((prev_kv, kv[:, :, d:]), dim=1)
        z = torch.cat((prev_z, z[:, :, d:]), dim=1)
    e = (z.softmax(dim=1) * kv).sum(dim=1).to(torch.bfloat16).float()
    e = (e * torch.rsqrt(e.square().mean(-1, keepdim=True) + eps) * norm_weight).to(torch.bfloat16).float()
    pos = torch.arange(n, device=kv.device) * ratio
    c, s = cos[pos], sin[pos]
    r = e[:, d - 64:]
    x0, x1 = r[:, 0::2], r[:, 1::2]
    e[:, d - 64:] = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)
    return e.to(torch.bfloat16)


def torch_sparse_attention(q: torch.Tensor, rows: torch.Tensor, indices: torch.Tensor, sm_scale: float,
                           sink: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Attention of q `[T, H, D]` over `rows[indices[t]]` (`-1` skipped) with a per-head sink,
    in PyTorch: gather, fp32 scores, softmax with the sink in the denominator, weighted sum."""
    T, H, D = q.shape
    out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
    for lo in range(0, T, chunk):
        idx = indices[lo:lo + chunk].long()
        kv = rows[idx.clamp_min(0)].float()                                   # [t, K, D]
        s = torch.einsum("thd,tkd->thk", q[lo:lo + chunk].float(), kv) * sm_scale
        s = s.masked_fill((idx < 0)[:, None, :], float("-inf"))
        m = torch.maximum(s.amax(-1, keepdim=True), sink[None, :, None])
        p = torch.exp(s - m)
        denom = p.sum(-1, keepdim=True) + torch.exp(sink[None, :, None] - m)
        out[lo:lo + chunk] = (torch.einsum("thk,tkd->thd", p, kv) / denom).to(q.dtype)
    return out


def _env_ints(name: str, default: Tuple[int, ...]) -> Tuple[int, ...]:
    """A comma-separated list of sizes from the environment (the CPU's opt-in longer runs)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return tuple(int(v) for v in raw.split(","))
    except ValueError:
        raise ValueError(f"{name} must be comma-separated integers, got {raw!r}") from None


def _config(device: torch.device):
    if device.type == "cuda":
        return dict(layer=dict(dim=4096, n_heads=64, q_lora_rank=1024, o_groups=8, o_lora_rank=1024,
                               index_heads=64, index_topk=512),
                    contexts=(32768, 65536, 131072), compress_T=(32768, 131072), batch=8,
                    note="DeepSeek-V4-Flash layer sizes")
    return dict(layer=dict(dim=512, n_heads=8, q_lora_rank=256, o_groups=2, o_lora_rank=128,
                           index_heads=8, index_topk=128),
                contexts=_env_ints("DSA_BENCH_V4_CONTEXTS", (256,)),
                compress_T=_env_ints("DSA_BENCH_V4_COMPRESS_T", (2048,)), batch=2,
                note="CPU: reduced V4 sizes (8 heads, dim 512, 8 indexer heads, K=128, window 128)")


def _random_layer(kind: str, cfg: dict, device, max_positions: int):
    from ..v4 import V4Attention
    layer = V4Attention(kind, max_positions=max_positions, device=device, dtype=torch.bfloat16, **cfg)
    g = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("norm_weight"):
                continue
            scale = 1.0 if name == "attn_sink" else p.shape[-1] ** -0.5
            p.copy_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))
    return layer.eval()


def _compress_cases(device: torch.device, cfg: dict) -> List[Case]:
    from ..ops.compress import v4_compress
    from ..v4 import v4_rope_tables
    out = []
    for T in cfg["compress_T"]:
        for c, ratio in ((2, 4), (1, 128)):
            d = 512

            def build(T=T, c=c, ratio=ratio, d=d):
                g = torch.Generator(device=device).manual_seed(T + c)
                kv = torch.randn(T, c * d, device=device, generator=g)
                score = torch.randn(T, c * d, device=device, generator=g)
                ape = torch.randn(ratio, c * d, device=device, generator=g)
                w = 1 + 0.1 * torch.randn(d, device=device, generator=g)
                cos, sin = v4_rope_tables(T, device=device)
                return kv, score, ape, w, 1e-6, cos, sin

            inp = _Lazy(build)
            n = T // ratio
            out.append(Case("v4", f"v4_compress c={c} r={ratio}", dict(T=T, d=d, c=c, ratio=ratio),
                            lambda inp=inp: v4_compress(*inp()),
                            bytes=2 * T * c * d * 4 + n * d * 2, bound="memory", note=cfg["note"],
                            baselines={"torch": lambda inp=inp: torch_compress(*inp())}))
    return out


def _layer_cases(device: torch.device, cfg: dict) -> List[Case]:
    from ..v4 import V4LayerCache
    out = []
    dim = cfg["layer"]["dim"]
    B = cfg["batch"]
    for kind in ("csa", "hca"):
        for L in cfg["contexts"]:
            shape = dict(L=L, H=cfg["layer"]["n_heads"], K=cfg["layer"]["index_topk"] if kind == "csa" else 0)

            def prefill_state(kind=kind, L=L):
                layer = _random_layer(kind, cfg["layer"], device, L + 8)
                g = torch.Generator(device=device).manual_seed(L)
                x = torch.randn(L, dim, device=device, generator=g, dtype=torch.bfloat16)
                with torch.no_grad():
                    res = layer(x)
                    _, q, kv = layer.project(x, torch.arange(L, device=device))
                    rows, idx = _layer_rows(layer, x, res)
                return dict(layer=layer, x=x, q=q, kv=kv, rows=rows, idx=idx)

            def decode_state(kind=kind, L=L):
                layer = _random_layer(kind, cfg["layer"], device, L + 8)
                bs = 64
                blocks = B * (-(-L // (bs * layer.ratio)) + -(-layer.window // bs) + 1)
                cache = V4LayerCache(layer, num_blocks=blocks, block_size=bs, max_seqs=B)
                ids = [cache.add_sequence() for _ in range(B)]
                g = torch.Generator(device=device).manual_seed(L + 1)
                x = torch.randn(B * L, dim, device=device, generator=g, dtype=torch.bfloat16)
                cu = torch.arange(0, B * L + 1, L, device=device, dtype=torch.int32)
                with torch.no_grad():
                    layer(x, cu, cache=cache, seq_ids=ids)
                    _, _, kv = layer.project(x, torch.arange(B * L, device=device) % L)
                x_t = torch.randn(B, dim, device=device, generator=g, dtype=torch.bfloat16)
                with torch.no_grad():
                    _, q_t, _ = layer.project(x_t, torch.full((B,), L, device=device))
                return dict(layer=layer, cache=cache, ids=ids, x_t=x_t, q_t=q_t, kv=kv.view(B, L, -1))

            pre, dec = _Lazy(prefill_state), _Lazy(decode_state)

            def ours_prefill(pre=pre):
                s = pre()
                with torch.no_grad():
                    return s["layer"](s["x"])

            def dense_prefill(pre=pre, dt=None):
                s = pre()
                return dense_mla_attention(s["q"], s["kv"], 512 ** -0.5, 512, dtype=dt)

            def sparse_prefill(pre=pre):
                s = pre()
                return torch_sparse_attention(s["q"], s["rows"], s["idx"], 512 ** -0.5, s["layer"].attn_sink.float())

            def ours_decode(dec=dec):
                s = dec()
                # The step is undone afterwards so each timed call sees L cached tokens: lengths
                # only (the ring row and compressor state it wrote are rewritten identically).
                with torch.no_grad():
                    r = s["layer"].decode_step(s["x_t"], s["cache"], s["ids"])
                for i in s["ids"]:
                    s["cache"]._lens[i] -= 1
                return r

            def dense_decode(dec=dec, dt=None):
                s = dec()
                return [dense_mla_attention(s["q_t"][b:b + 1], s["kv"][b], 512 ** -0.5, 512, dtype=dt)
                        for b in range(B)]

            both = (("bf16", torch.bfloat16), ("fp32", torch.float32))
            base = {f"dense {n}": (lambda dt=dt, f=dense_prefill: f(dt=dt)) for n, dt in both}
            base["torch sparse"] = sparse_prefill
            out.append(Case("v4", f"v4_layer_prefill {kind}", shape, ours_prefill, note=cfg["note"], baselines=base))
            dbase = {f"dense {n}": (lambda dt=dt, f=dense_decode: f(dt=dt)) for n, dt in both}
            out.append(Case("v4", f"v4_layer_decode {kind}", dict(shape, B=B), ours_decode, note=cfg["note"],
                            baselines=dbase))
    return out


def _layer_rows(layer, x, res) -> Tuple[torch.Tensor, torch.Tensor]:
    """The rows (window rows, then compressed entries, as the layer stores them) and the
    `[T, window + K2]` indices the layer attended: the inputs of the PyTorch composite."""
    from ..ops.compress import v4_compress
    from ..v4 import _as_cached
    _, _, kv = layer.project(x, torch.arange(x.shape[0], device=x.device))
    rows = _as_cached(kv, layer.kv_cache_dtype)
    T = x.shape[0]
    idx = res.window.long()
    if res.compressed is not None:
        comp = layer.compressor
        entries = v4_compress(*comp.project(x), comp.ape, comp.norm_weight, layer.eps, layer.rope_cos, layer.rope_sin)
        rows = torch.cat((rows, _as_cached(entries, layer.kv_cache_dtype)))
        idx = torch.cat((idx, torch.where(res.compressed >= 0, res.compressed.long() + T, -1)), dim=1)
    return rows, idx


def cases(device: torch.device, quick: bool) -> List[Case]:
    cfg: Dict = _config(device)
    if quick and device.type == "cuda":
        cfg = dict(cfg, contexts=cfg["contexts"][:1], compress_T=cfg["compress_T"][:1])
    return _compress_cases(device, cfg) + _layer_cases(device, cfg)
