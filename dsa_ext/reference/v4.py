"""Reference of a whole DeepSeek-V4 attention layer (SPEC section 10): dense attention in float64
over every row a query may see, masked to the rows the layer selects.

For a sequence of L tokens with latent rows ``kv`` (window rows) and compressed entries ``e``,
query t (position p) attends, in one softmax whose denominator also holds ``exp(sink[h])``, to
- window rows s with ``p - window < s <= p``;
- hca: every entry j with ``j < (p + 1) // ratio``;
- csa: the entries the indexer selects among those (``topk``: the module's selection, to
  compare the attention of the same rows; else this reference's own top-k of its float64
  indexer scores, ties to the smaller entry).
The projections follow the module (`dsa_ext.v4.V4Attention`, whose weights this reads) in
float64, with the bf16 roundings the model makes where q and kv enter the attention (and the
cache's quantisation of the rows: FP8 MODEL1 or bf16, through this package's cache
reference); compressed entries come from the compressor reference (`v4_compress`). The
indexer scores are exact (no FP8): ``I[t, j] = sum_h w[t, h] * relu(q_i[t, h] . k[j])`` with
q_i and k rope'd and Hadamard-rotated. Written for clarity: O(L^2) memory per sequence.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch
from torch import Tensor

from .cache import mla_kv_cache_gather, mla_kv_cache_write, new_mla_kv_cache
from .compress import v4_compress
from .hadamard import hadamard_matrix

__all__ = ["v4_attention", "V4Reference", "rope_gptj"]

ROPE = 64


class V4Reference(NamedTuple):
    out: Tensor            # [T, dim] float64: the layer's output
    o: Tensor              # [T, H, 512] float64: attention output after the inverse rope
    lse: Tensor            # [T, H] float64 (the sink excluded)
    index_scores: Optional[Tensor]  # csa: [T, max entries] float64, -inf where not visible
    selected: Optional[Tensor]      # csa/hca: [T, max entries] bool, the entries attended


def rope_gptj(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool = False) -> Tensor:
    """GPT-J rope on the last 64 dims of x ``[T, ..., D]`` (interleaved pairs), cos/sin
    ``[T, 32]``; ``inverse`` rotates back."""
    while cos.dim() < x.dim():
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    sin = -sin if inverse else sin
    r = x[..., -ROPE:]
    x0, x1 = r[..., 0::2], r[..., 1::2]
    rot = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    return torch.cat((x[..., :-ROPE], rot), dim=-1)


def _rms(x: Tensor, w: Optional[Tensor], eps: float) -> Tensor:
    y = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    return y if w is None else y * w.double()


def _lin(x: Tensor, linear) -> Tensor:
    return x @ linear.weight.detach().double().T


def _cached(rows: Tensor, kv_cache_dtype: str) -> Tensor:
    """bf16 rows as the layer's cache gives them back (FP8 MODEL1 quantisation or bf16)."""
    rows = rows.to(torch.bfloat16)
    if kv_cache_dtype == "bf16" or rows.shape[0] == 0:
        return rows.double()
    cache = new_mla_kv_cache(rows.shape[0], 1, True, "cpu", model="v4")
    slots = torch.arange(rows.shape[0])
    mla_kv_cache_write(rows.cpu(), slots, cache)
    return mla_kv_cache_gather(cache, slots).reshape(-1, rows.shape[1]).double().to(rows.device)


def _entries(comp, x: Tensor, eps: float, cos: Tensor, sin: Tensor) -> Tensor:
    """The compressor's entries of one sequence (bf16 values as float64)."""
    return v4_compress(_lin(x, comp.wkv), _lin(x, comp.wgate), comp.ape.detach().double(),
                       comp.norm_weight.detach().float(), eps, cos, sin).double()


def v4_attention(layer, x: Tensor, cu_seqlens: Optional[Tensor] = None, kv_cache_dtype: Optional[str] = None,
                 topk: Optional[Tensor] = None) -> V4Reference:
    """The layer's output for the prefill of ``x [T, dim]`` (one sequence, or a ragged batch
    by ``cu_seqlens``), as the module docstring of this file says. ``topk [T, K]``: for a csa
    layer, the entry positions (within each sequence, -1 = none) to attend instead of this
    reference's own selection (required for a shared-indexer layer). ``kv_cache_dtype``:
    "fp8" or "bf16", the layer's by default."""
    kv_cache_dtype = layer.kv_cache_dtype if kv_cache_dtype is None else kv_cache_dtype
    T = x.shape[0]
    bounds = [0, T] if cu_seqlens is None else [int(v) for v in cu_seqlens.tolist()]
    eps, W, ratio, kind = layer.eps, layer.window, layer.ratio, layer.kind
    H = layer.n_heads
    cos_t, sin_t = layer.rope_cos.double().cpu(), layer.rope_sin.double().cpu()
    sink = layer.attn_sink.detach().double().cpu()
    xs = x.detach().double().cpu()
    outs: List[Tensor] = []
    os_: List[Tensor] = []
    lses: List[Tensor] = []
    scores_all: List[Tensor] = []
    sel_all: List[Tensor] = []
    max_e = max([(bounds[b + 1] - bounds[b]) // ratio for b in range(len(bounds) - 1)] + [1]) if ratio else 0
    for b in range(len(bounds) - 1):
        lo, hi = bounds[b], bounds[b + 1]
        L = hi - lo
        xb = xs[lo:hi]
        p = torch.arange(L)
        cos, sin = cos_t[:L], sin_t[:L]
        qr = _rms(_lin(xb, layer.wq_a), layer.q_norm_weight.detach(), eps)
        q = _rms(_lin(qr, layer.wq_b).view(L, H, -1), None, eps)
        q = rope_gptj(q, cos, sin).to(torch.bfloat16).double()
        kv = rope_gptj(_rms(_lin(xb, layer.wkv), layer.kv_norm_weight.detach(), eps), cos, sin)
        rows = _cached(kv, kv_cache_dtype)
        mask = (p[None, :] <= p[:, None]) & (p[None, :] > p[:, None] - W)        # [L, L] window
        visible = (p + 1) // ratio if ratio else None
        if ratio:
            e = _entries(layer.compressor, xb, eps, layer.rope_cos.cpu(), layer.rope_sin.cpu())
            E = e.shape[0]
            j = torch.arange(E)
            allowed = j[None, :] < visible[:, None]                               # [L, E]
            scores = None
            if kind == "csa":
                scores = _index_scores(layer, xb, qr, cos, sin, eps)
                if scores is not None:
                    scores = scores.masked_fill(~allowed, float("-inf"))
                if topk is not None:
                    chosen = topk[lo:hi].long().cpu()
                    chosen_mask = torch.zeros(L, E + 1, dtype=torch.bool)
                    chosen_mask.scatter_(1, torch.where((chosen >= 0) & (chosen < E), chosen, E), True)
                    allowed = allowed & chosen_mask[:, :E]
                elif scores is None:
                    raise ValueError("a shared-indexer layer's reference needs topk")
                else:
                    allowed = allowed & _topk_mask(scores, layer.index_topk)
                pad = torch.full((L, max_e), float("-inf"), dtype=torch.float64)
                if scores is not None:
                    pad[:, :E] = scores
                scores_all.append(pad)
            sel = torch.zeros(L, max_e, dtype=torch.bool)
            sel[:, :E] = allowed
            sel_all.append(sel)
            rows = torch.cat((rows, _cached(e, kv_cache_dtype)))
            mask = torch.cat((mask, allowed), dim=1)
        s = torch.einsum("thd,sd->ths", q, rows) * layer.softmax_scale
        s = s.masked_fill(~mask[:, None, :], float("-inf"))
        lse = torch.logsumexp(s, dim=-1)                                          # [L, H]
        denom = torch.logaddexp(lse, sink[None, :].expand_as(lse))
        prob = torch.exp(s - denom[..., None]).nan_to_num(0.0)
        o = torch.einsum("ths,sd->thd", prob, rows)
        o = rope_gptj(o, cos, sin, inverse=True)
        G = layer.o_groups
        wo_a = layer.wo_a.weight.detach().double().view(G, layer.o_lora_rank, -1)
        y = torch.einsum("tgd,grd->tgr", o.reshape(L, G, -1), wo_a).reshape(L, -1)
        outs.append(_lin(y, layer.wo_b))
        os_.append(o)
        lses.append(lse)
    cat = (lambda parts: torch.cat(parts)) if T else (lambda parts: torch.empty(0))
    return V4Reference(cat(outs), cat(os_), cat(lses),
                       torch.cat(scores_all) if scores_all else None,
                       torch.cat(sel_all) if sel_all else None)


def _index_scores(layer, xb: Tensor, qr: Tensor, cos: Tensor, sin: Tensor, eps: float) -> Optional[Tensor]:
    """Exact indexer scores ``[L, E]`` of one sequence (None for a shared-indexer layer)."""
    if getattr(layer, "indexer_compressor", None) is None:
        return None
    L, Hi = xb.shape[0], layer.index_heads
    k = _entries(layer.indexer_compressor, xb, eps, layer.rope_cos.cpu(), layer.rope_sin.cpu())
    k = k @ hadamard_matrix(k.shape[-1]) * k.shape[-1] ** -0.5
    q = rope_gptj(_lin(qr, layer.wq_b_index).view(L, Hi, -1), cos, sin)
    q = q @ hadamard_matrix(q.shape[-1]) * q.shape[-1] ** -0.5
    w = _lin(xb, layer.weights_proj) * (q.shape[-1] ** -0.5 * Hi ** -0.5)
    return (torch.einsum("thd,jd->thj", q, k).relu() * w[..., None]).sum(dim=1)


def _topk_mask(scores: Tensor, k: int) -> Tensor:
    """The k largest finite-or-not scores of each row, ties to the smaller column (-inf never)."""
    L, E = scores.shape
    if E == 0:
        return torch.zeros(L, 0, dtype=torch.bool)
    # A stable sort of the negated scores orders equal values by ascending column.
    order = torch.sort(-scores, dim=1, stable=True).indices[:, :min(k, E)]
    mask = torch.zeros(L, E, dtype=torch.bool)
    mask.scatter_(1, order, True)
    return mask & torch.isfinite(scores)
