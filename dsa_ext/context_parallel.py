"""Context parallelism for DSA over a ``torch.distributed`` process group (SPEC section 8).

One sequence's work is spread over the W ranks of a group; every result equals the
single-rank result on the unsharded data. Pure Python over ``torch.ops.dsa`` and
``torch.distributed`` collectives, so the same code runs on NCCL (GPUs) and gloo (CPUs).

Decode (:class:`ShardedDSACache`, :func:`decode_step`)
    The paged indexer-K and MLA caches of a sequence are sharded by token. Placement
    (:class:`TokenPlacement`): token ``p`` lives on rank ``(p // I) % W`` at local position
    ``(p // (I*W)) * I + p % I``, interleave ``I = 1`` by default (round-robin, the layout of
    vLLM's decode context parallelism with ``cp_kv_cache_interleave_size``). Round-robin is
    chosen over block-contiguous because every prefix ``[0, L)`` then holds ``floor`` or
    ``ceil(L / W)`` tokens on each rank: every context length, every causal prefix of a
    multi-token (MTP) step and every decode step's new token stay balanced, where
    block-contiguous shards put all new tokens (and the growth of the cache) on one rank.
    The local map is increasing in ``p``, so a rank's local tie-break (smaller local
    position) is the global one (smaller global position).

    A step: local ``paged_indexer_logits`` + local ``topk_indices`` on every rank; in
    ``mode="exact"`` one all-gather of the ``(value, global position)`` candidates
    (``W * K`` per query) and an exact merge on every rank, which gives the single-rank
    selection (the global top-K is contained in the union of the local top-Ks under the total
    order "value descending, position ascending"); ``sparse_mla_decode`` of each rank over its
    own selected rows; partial ``(out, lse)`` combined exactly by lse (one all-gather of lse,
    one all-reduce of the weighted out; an empty partial has lse = -inf and weight 0; an
    ``attn_sink`` is applied once, after the combine). ``mode="union"`` skips the candidate
    all-gather: each rank attends over its own local top-K (vLLM's default for DSA: the union
    of the local selections, up to ``W * K`` rows, contains the exact selection but attends to
    more rows); ``mode="union_share"`` keeps ``ceil(K / W)`` per rank (K rows in all, a
    recall below 1). :func:`selection_recall` measures either against exact.

Prefill (:func:`zigzag_positions`, :func:`prefill`)
    The queries of one sequence of T tokens are split in 2W chunks and rank r takes chunks
    r and 2W-1-r (zig-zag): causal cost grows with the position, and each rank gets one cheap
    and one expensive chunk. The indexer keys (``D + 4`` bytes per token) are all-gathered;
    the latent rows are all-gathered too, not gathered per selection: with K = 2048 and
    thousands of queries per rank, each selecting K of its causal prefix, the union of a
    rank's selections is expected to cover most of the sequence (an expectation, not measured
    on a model's selections), so a selective gather would save little and cost a
    data-dependent second round (counts, then an all-to-all) that cannot overlap the indexer. The latent all-gather is differentiable (its
    backward is a reduce-scatter), so :func:`prefill` trains through ``dsa_ext.sparse_mla``,
    and :func:`indexer_kl_loss_sparse` gives each rank its term of the indexer's sparse-stage
    alignment loss (SPEC section 7) with the keys' gradients reduced to their owners.

Bad input: every entry point first checks its inputs locally, then agrees on the outcome
with one small all-gather (the group's world size, the cache's declared placement, shapes,
sequence lengths); any problem raises the same ``ValueError`` naming the rank and the
argument on every rank, so no rank is left waiting in a later collective. A rank that calls
with a different group cannot be detected this way: the group's timeout ends that case.

Communication is counted when a :class:`CommStats` is passed (bytes each rank contributes
and receives per collective; ring algorithms assumed for all-reduce / reduce-scatter).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from .ops.sparse_mla import sparse_mla as _sparse_mla
from .ops.training import indexer_kl_loss_sparse as _indexer_kl_loss_sparse
from .paged_cache import PagedDSACache

__all__ = [
    "TokenPlacement", "ShardedDSACache", "CommStats", "CPDecodeOutput", "CPPrefillOutput",
    "decode_step", "merge_topk_candidates", "combine_partials", "gather_selection",
    "selection_recall", "zigzag_chunks", "zigzag_positions", "prefill",
    "all_gather_sequence", "indexer_kl_loss_sparse", "DECODE_MODES",
]

DECODE_MODES = ("exact", "union", "union_share")
_NO_POSITION = torch.iinfo(torch.int64).max


# ---------------------------------------------------------------- communication accounting

@dataclass
class CommStats:
    """Bytes moved by the collectives of the calls it is passed to, per rank.

    ``sent`` counts what this rank contributes, ``received`` what reaches it (all-gather:
    ``(W-1) * n`` for an n-byte contribution; all-reduce and reduce-scatter of an n-byte
    buffer: ``2 (W-1)/W * n`` and ``(W-1)/W * n`` with ring algorithms)."""
    calls: List[Tuple[str, int, int]] = field(default_factory=list)

    def record(self, op: str, sent: int, received: int) -> None:
        self.calls.append((op, int(sent), int(received)))

    @property
    def sent(self) -> int:
        return sum(c[1] for c in self.calls)

    @property
    def received(self) -> int:
        return sum(c[2] for c in self.calls)

    def reset(self) -> None:
        self.calls.clear()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _all_gather(inp: torch.Tensor, group, stats: Optional[CommStats], what: str) -> torch.Tensor:
    """``[W, *inp.shape]``: every rank's ``inp`` (same shape and dtype on every rank)."""
    W = dist.get_world_size(group)
    if W == 1:
        return inp.unsqueeze(0)
    out = inp.new_empty((W,) + tuple(inp.shape))
    dist.all_gather_into_tensor(out.view(-1), inp.contiguous().view(-1), group=group)
    if stats is not None:
        stats.record(f"all_gather:{what}", _nbytes(inp), (W - 1) * _nbytes(inp))
    return out


def _all_reduce_sum(t: torch.Tensor, group, stats: Optional[CommStats], what: str) -> torch.Tensor:
    W = dist.get_world_size(group)
    if W == 1:
        return t
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    if stats is not None:
        stats.record(f"all_reduce:{what}", _nbytes(t), 2 * (W - 1) * _nbytes(t) // W)
    return t


# ---------------------------------------------------------------- agreement on bad input

def _poly_hash(values: Sequence[int]) -> int:
    """Order-sensitive hash of a list of ints that fits int64 (lists of any length compare in
    the fixed-size agreement vector)."""
    h = len(values)
    for v in values:
        h = (h * 1000003 + int(v) + 1) % (2 ** 61 - 1)
    return h


def _agree(group, device: torch.device, fields: Sequence[Tuple[str, int]], errors: List[str],
           where: str, check: bool = True) -> None:
    """Raise the same ValueError on every rank when any rank found a local error or the
    ranks disagree on a field. One all-gather of a small int64 vector; the error text of
    other ranks travels (all_gather_object) only on the error path."""
    if not check:
        return
    W, rank = dist.get_world_size(group), dist.get_rank(group)
    vec = torch.tensor([1 if errors else 0] + [int(v) for _, v in fields], dtype=torch.int64,
                       device=device)
    allv = _all_gather(vec, group, None, "agree").cpu()
    bad_ranks = [r for r in range(W) if allv[r, 0] != 0]
    mismatched = [name for i, (name, _) in enumerate(fields)
                  if not bool((allv[:, i + 1] == allv[0, i + 1]).all())]
    if not bad_ranks and not mismatched:
        return
    parts = []
    if bad_ranks:
        texts = [None] * W
        dist.all_gather_object(texts, "; ".join(errors), group=group)
        parts += [f"rank {r}: {texts[r]}" for r in bad_ranks]
    for name in mismatched:
        i = [n for n, _ in fields].index(name) + 1
        parts.append(f"ranks disagree on {name}: " + ", ".join(
            f"rank {r} has {int(allv[r, i])}" for r in range(W)))
    raise ValueError(f"{where} (rank {rank} of {W}): " + " | ".join(parts))


# ---------------------------------------------------------------- placement

class TokenPlacement:
    """Which rank holds global token position ``p`` and where: ``owner(p) = (p // I) % W``,
    ``local(p) = (p // (I W)) * I + p % I`` (I = interleave; 1 = round-robin). Works on ints
    and int64 tensors."""

    def __init__(self, world_size: int, interleave: int = 1):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if interleave < 1:
            raise ValueError(f"interleave must be >= 1, got {interleave}")
        self.world_size, self.interleave = world_size, interleave

    def owner(self, p):
        return (p // self.interleave) % self.world_size

    def local_position(self, p):
        I, W = self.interleave, self.world_size
        return (p // (I * W)) * I + p % I

    def global_position(self, rank: int, j):
        I, W = self.interleave, self.world_size
        return (j // I) * (I * W) + rank * I + j % I

    def local_count(self, length, rank: int):
        """How many of the positions ``[0, length)`` live on ``rank``."""
        I, W = self.interleave, self.world_size
        span = I * W
        tail = length % span - rank * I
        if isinstance(tail, torch.Tensor):
            tail = tail.clamp(0, I)
        else:
            tail = min(max(tail, 0), I)
        return (length // span) * I + tail


# ---------------------------------------------------------------- the sharded cache

class ShardedDSACache:
    """This rank's shard of paged indexer-K and MLA caches whose sequences are placed by
    :class:`TokenPlacement`. Every rank makes the same calls (``add_sequence``, ``append``)
    with the same arguments; each keeps only the tokens it owns in a local
    :class:`~dsa_ext.paged_cache.PagedDSACache` (``.local``), whose block tables and
    context lengths are local.

    Args: ``group`` (default: the world), ``interleave`` (tokens per placement unit), the
    rest as :class:`PagedDSACache` (``num_blocks`` is this rank's pool).
    """

    def __init__(self, num_blocks: int, block_size: int = 64, index_head_dim: int = 128,
                 kv_dim: int = 576, kv_cache_dtype: str = "fp8",
                 device: Union[str, torch.device] = "cpu", group=None, interleave: int = 1):
        self.group = group
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.placement = TokenPlacement(self.world_size, interleave)
        self.local = PagedDSACache(num_blocks, block_size, index_head_dim, kv_dim,
                                   kv_cache_dtype, device)
        self._global_lens = {}

    # what the ops take
    @property
    def block_size(self) -> int:
        return self.local.block_size

    @property
    def device(self) -> torch.device:
        return self.local.device

    @property
    def index_k_cache(self) -> torch.Tensor:
        return self.local.index_k_cache

    @property
    def kv_cache(self) -> torch.Tensor:
        return self.local.kv_cache

    def block_table(self, seq_ids: Sequence[int]) -> torch.Tensor:
        return self.local.block_table(seq_ids)

    def add_sequence(self, seq_id: Optional[int] = None) -> int:
        seq_id = self.local.add_sequence(seq_id)
        self._global_lens[seq_id] = 0
        return seq_id

    def free_sequence(self, seq_id: int) -> None:
        self.local.free_sequence(seq_id)
        del self._global_lens[seq_id]

    def seq_len(self, seq_id: int) -> int:
        """Global length (tokens of the sequence on all ranks)."""
        if seq_id not in self._global_lens:
            raise KeyError(f"seq_id {seq_id} is not in the cache")
        return self._global_lens[seq_id]

    def local_len(self, seq_id: int) -> int:
        return self.local.seq_len(seq_id)

    def reserve(self, seq_ids: Sequence[int], num_new: Union[int, Sequence[int]]) -> torch.Tensor:
        """Advance the sequences by ``num_new`` global tokens; returns the local slot mapping
        int64 ``[sum(num_new)]`` of the new tokens in global order: this rank's slot for a
        token it owns, ``-1`` (skipped by the cache writers) for the others."""
        counts = [num_new] * len(seq_ids) if isinstance(num_new, int) else list(num_new)
        if len(counts) != len(seq_ids):
            raise ValueError(f"num_new must have one entry per sequence ({len(seq_ids)}), got {len(counts)}")
        if any(n < 0 for n in counts):
            raise ValueError(f"num_new must be non-negative, got {counts}")
        P, rank = self.placement, self.rank
        starts = [self.seq_len(s) for s in seq_ids]
        owned = [P.local_count(L + n, rank) - P.local_count(L, rank) for L, n in zip(starts, counts)]
        local_slots = self.local.reserve(seq_ids, owned).cpu()
        mapping = torch.full((sum(counts),), -1, dtype=torch.int64)
        at, taken = 0, 0
        for L, n, m in zip(starts, counts, owned):
            pos = torch.arange(L, L + n, dtype=torch.int64)
            mine = (P.owner(pos) == rank).nonzero().flatten()
            mapping[at + mine] = local_slots[taken:taken + m]
            at, taken = at + n, taken + m
        for s, n in zip(seq_ids, counts):
            self._global_lens[s] += n
        return mapping.to(self.device)

    def slot_mapping(self, seq_id: int, positions: torch.Tensor) -> torch.Tensor:
        """Local slot ids int64 of a sequence's global ``positions`` (already reserved): the
        slot on this rank for a position it owns, ``-1`` for the others, so that rewriting
        tokens (e.g. after rejected draft tokens) goes through the cache writers unchanged.
        Raises ValueError for a position outside ``[0, seq_len)``."""
        L = self.seq_len(seq_id)
        pos = positions.to(torch.int64).cpu()
        bad = (pos < 0) | (pos >= L)
        if bool(bad.any()):
            raise ValueError(f"positions must lie in [0, {L}) for seq {seq_id}, got "
                             f"{pos[bad][:8].tolist()}")
        mine = self.placement.owner(pos) == self.rank
        local = self.local.slot_ids(seq_id).cpu()
        out = torch.full_like(pos, -1)
        out[mine] = local[self.placement.local_position(pos[mine])]
        return out.to(self.device)

    def append(self, seq_ids: Sequence[int], num_new: Union[int, Sequence[int]],
               index_k: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """``reserve`` then write this rank's share of the new tokens. ``index_k [N, D]`` and
        ``kv [N, kv_dim]`` hold all ``N = sum(num_new)`` new tokens (every rank has them, as
        after the replicated projections of a decode step); returns the local slot mapping."""
        mapping = self.reserve(seq_ids, num_new)
        if index_k.shape[0] != mapping.shape[0] or kv.shape[0] != mapping.shape[0]:
            raise ValueError(f"index_k and kv must hold the {mapping.shape[0]} new tokens, got "
                             f"{index_k.shape[0]} and {kv.shape[0]} rows")
        self.local.write(mapping, index_k, kv)
        return mapping

    def _errors(self, seq_ids: Sequence[int]) -> List[str]:
        errs = []
        for s in seq_ids:
            if s not in self._global_lens:
                errs.append(f"seq_id {s} is not in the cache")
                continue
            want = self.placement.local_count(self._global_lens[s], self.rank)
            if self.local.seq_len(s) != want:
                errs.append(f"cache is not sharded as declared: seq {s} of global length "
                            f"{self._global_lens[s]} holds {self.local.seq_len(s)} local tokens, "
                            f"placement (W={self.world_size}, interleave={self.placement.interleave}) "
                            f"puts {want} on rank {self.rank}")
        return errs


# ---------------------------------------------------------------- decode

class CPDecodeOutput(NamedTuple):
    out: torch.Tensor        # [B, N, H, d_v] bf16, the same on every rank
    lse: torch.Tensor        # [B, N, H] fp32, the same on every rank
    positions: torch.Tensor  # [B, N, k] int32 global positions (-1 = none): exact: the global
    #                          selection (same on every rank); union modes: this rank's own


def merge_topk_candidates(values: torch.Tensor, positions: torch.Tensor, k: int) -> torch.Tensor:
    """Exact top-k of candidate lists: ``values`` fp32 and ``positions`` int ``[R, M]``
    (``-1`` = no candidate; valid positions unique per row). Returns int32 ``[R, k]`` the
    positions of the k largest values, ties toward the smaller position, NaN below -inf
    (the rule of ``topk_indices``), ``-1``-padded; order within a row unspecified.

    The candidates are ordered by position first, so ``topk_indices``' tie-break toward the
    smaller column is the tie-break toward the smaller position."""
    R, M = values.shape
    if M == 0:
        return torch.full((R, k), -1, dtype=torch.int32, device=values.device)
    key = torch.where(positions < 0, torch.full_like(positions, _NO_POSITION, dtype=torch.int64),
                      positions.to(torch.int64))
    order = key.argsort(dim=1)
    vals = values.gather(1, order).contiguous()
    pos = positions.to(torch.int64).gather(1, order)
    count = (positions >= 0).sum(dim=1).to(torch.int32)
    cols = torch.ops.dsa.topk_indices(vals, k, torch.zeros_like(count), count, False)
    picked = pos.gather(1, cols.clamp_min(0).to(torch.int64))
    return torch.where(cols >= 0, picked, -1).to(torch.int32)


def combine_partials(out: torch.Tensor, lse: torch.Tensor, group=None,
                     attn_sink: Optional[torch.Tensor] = None,
                     stats: Optional[CommStats] = None,
                     scatter_heads: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of the ranks' partial attention ``out [..., H, d_v]`` / ``lse [..., H]``
    (each over a disjoint set of rows): ``lse = logsumexp_r lse_r``, ``out = sum_r
    exp(lse_r - lse) out_r``. An empty partial (lse -inf) has weight 0; all empty gives
    out 0 and lse -inf. ``attn_sink [H]`` joins the denominator once, here (the partials
    must be computed without it). Returns (out in ``out``'s dtype, lse fp32): every head on
    every rank (an fp32 all-reduce), or with ``scatter_heads`` rank r's ``H / W`` heads
    ``[r H/W, (r+1) H/W)`` (a reduce-scatter: half the bytes, for groups whose ranks are also
    the tensor-parallel ranks that own those heads, as in vLLM's decode context parallelism)."""
    W, rank = dist.get_world_size(group), dist.get_rank(group)
    H = lse.shape[-1]
    lse_all = _all_gather(lse.float(), group, stats, "lse")
    lse_g = torch.logsumexp(lse_all, dim=0)
    finite = torch.isfinite(lse_g)
    weight = torch.where(finite, torch.exp(lse.float() - torch.where(finite, lse_g, 0.0)), 0.0)
    acc = out.float() * weight.unsqueeze(-1)
    if scatter_heads:
        if H % W:
            raise ValueError(f"scatter_heads needs the heads ({H}) divisible by the world size ({W})")
        heads = slice(rank * H // W, (rank + 1) * H // W)
        if W > 1:
            by_head = acc.movedim(-2, 0).contiguous()                  # [H, ..., d_v]
            mine = by_head.new_empty((H // W,) + tuple(by_head.shape[1:]))
            dist.reduce_scatter_tensor(mine, by_head, op=dist.ReduceOp.SUM, group=group)
            if stats is not None:
                stats.record("reduce_scatter:out", _nbytes(by_head), (W - 1) * _nbytes(mine))
            acc = mine.movedim(0, -2)
        lse_g = lse_g[..., heads]
        if attn_sink is not None:
            attn_sink = attn_sink[heads]
    else:
        acc = _all_reduce_sum(acc, group, stats, "out")
    if attn_sink is not None:
        # exp(lse) / (exp(lse) + exp(sink)); 0 where lse = -inf
        acc = acc * torch.sigmoid(lse_g - attn_sink.float()).unsqueeze(-1)
    return acc.to(out.dtype), lse_g.contiguous()


def _decode_errors(cache: ShardedDSACache, seq_ids, q_index, weights, q_latent, topk, mode,
                   n_new, group, scatter_heads) -> List[str]:
    errs = []
    if mode not in DECODE_MODES:
        errs.append(f"mode must be one of {DECODE_MODES}, got {mode!r}")
    if topk < 1:
        errs.append(f"topk must be >= 1, got {topk}")
    W, rank = dist.get_world_size(group), dist.get_rank(group)
    if cache.world_size != W or cache.rank != rank:
        errs.append(f"cache is sharded for rank {cache.rank} of {cache.world_size}, the group "
                    f"has this process as rank {rank} of {W}")
    errs += cache._errors(seq_ids)
    B = len(seq_ids)
    if q_index.dim() != 4 or q_index.dtype != torch.float8_e4m3fn:
        errs.append(f"q_index must be float8_e4m3fn [B, N, H, D], got {q_index.dtype} {tuple(q_index.shape)}")
    elif q_index.shape[0] != B or q_index.shape[1] != n_new:
        errs.append(f"q_index must be [B={B}, N={n_new}, H, D], got {tuple(q_index.shape)}")
    elif weights.shape != (B * n_new, q_index.shape[2]):
        errs.append(f"weights must be [B*N={B * n_new}, H={q_index.shape[2]}], got {tuple(weights.shape)}")
    if q_latent.dim() != 4 or q_latent.shape[:2] != (B, n_new):
        errs.append(f"q_latent must be [B={B}, N={n_new}, H, 576], got {tuple(q_latent.shape)}")
    elif scatter_heads and q_latent.shape[2] % W:
        errs.append(f"scatter_heads needs q_latent's heads ({q_latent.shape[2]}) divisible by "
                    f"the world size ({W})")
    if not errs:
        for s in seq_ids:
            if cache.seq_len(s) < n_new:
                errs.append(f"seq {s} holds {cache.seq_len(s)} tokens, fewer than the {n_new} "
                            f"new tokens (write them with cache.append before the step)")
    return errs


def decode_step(cache: ShardedDSACache, seq_ids: Sequence[int], q_index: torch.Tensor,
                weights: torch.Tensor, q_latent: torch.Tensor, topk: int, sm_scale: float,
                mode: str = "exact", attn_sink: Optional[torch.Tensor] = None,
                stats: Optional[CommStats] = None, check: bool = True,
                scatter_heads: bool = False) -> CPDecodeOutput:
    """One context-parallel decode step of ``N`` new tokens for each of B sequences whose
    keys are already in ``cache`` (``cache.append``; query j of sequence b sees global
    positions ``< seq_len(b) - N + 1 + j``). Every rank calls it with the same arguments.

    Args:
        cache: this rank's :class:`ShardedDSACache`.
        q_index: ``[B, N, H, D]`` FP8 indexer queries; ``weights [B*N, H]`` fp32 (as
            ``paged_indexer_logits``).
        q_latent: ``[B, N, Hq, 576]`` bf16 absorbed MLA queries.
        topk: K, the selection size.
        mode: ``"exact"`` (the single-rank selection and result), ``"union"`` (each rank its
            local top-K, no candidate exchange) or ``"union_share"`` (local top ``ceil(K/W)``).
        attn_sink: optional ``[H]`` fp32, as ``sparse_mla_decode``.
        stats: optional :class:`CommStats` that the step's collectives are added to.
        check: agree on the inputs first (one small all-gather and a host read of it); with
            False a local error raises on its rank only, and the other ranks wait in the next
            collective until the group's timeout. (The step is not CUDA-graph capturable
            either way: it builds the step's lengths on the host from the cache's bookkeeping.)
        scatter_heads: return only this rank's ``Hq / W`` heads (see :func:`combine_partials`).

    Returns :class:`CPDecodeOutput`; out/lse are the same on every rank (or each rank's
    heads with ``scatter_heads``).
    """
    group = cache.group
    W, rank = cache.world_size, cache.rank
    B, N = len(seq_ids), q_index.shape[1] if q_index.dim() == 4 else 0
    errors = _decode_errors(cache, seq_ids, q_index, weights, q_latent, topk, mode, N, group,
                            scatter_heads)
    glens = [cache.seq_len(s) if s in cache._global_lens else -1 for s in seq_ids]
    if not check and errors:
        raise ValueError(f"context_parallel.decode_step (rank {rank} of {W}): " + "; ".join(errors))
    _agree(group, cache.device, [
        ("world_size", dist.get_world_size(group)), ("cache.world_size", cache.world_size),
        ("interleave", cache.placement.interleave), ("batch", B), ("n_new", N),
        ("topk", topk), ("mode", DECODE_MODES.index(mode) if mode in DECODE_MODES else -1),
        ("q_index heads", q_index.shape[2] if q_index.dim() == 4 else -1),
        ("q_latent heads", q_latent.shape[2] if q_latent.dim() == 4 else -1),
        ("q_index head dim", q_index.shape[-1] if q_index.dim() else -1),
        ("q_latent dim", q_latent.shape[-1] if q_latent.dim() else -1),
        ("scatter_heads", int(scatter_heads)),
        ("seq_ids", _poly_hash(list(seq_ids))), ("global seq lens", _poly_hash(glens)),
    ], errors, "context_parallel.decode_step", check)

    P, dev = cache.placement, cache.device
    glen = torch.tensor(glens, dtype=torch.int64, device=dev)
    visible = glen[:, None] - N + 1 + torch.arange(N, dtype=torch.int64, device=dev)   # [B, N]
    local_visible = P.local_count(visible, rank).to(torch.int32)
    max_local = max([cache.local_len(s) for s in seq_ids], default=0)
    block_table = cache.block_table(seq_ids)
    k_local = math.ceil(topk / W) if mode == "union_share" else topk
    R = B * N

    logits = torch.ops.dsa.paged_indexer_logits(q_index, cache.index_k_cache, weights.float(),
                                                local_visible, block_table, max_local, True)
    ke = local_visible.reshape(R)
    local_idx = torch.ops.dsa.topk_indices(logits, k_local, torch.zeros_like(ke), ke, False)
    valid = local_idx >= 0
    global_pos = torch.where(valid, P.global_position(rank, local_idx.to(torch.int64)), -1)

    if mode == "exact":
        if max_local > 0:
            values = logits.gather(1, local_idx.clamp_min(0).to(torch.int64))
        else:
            values = torch.full((R, k_local), float("-inf"), device=dev)
        packed = torch.stack([values.contiguous().view(torch.int32), global_pos.to(torch.int32)])
        everyone = _all_gather(packed, group, stats, "candidates")       # [W, 2, R, K]
        cand_vals = everyone[:, 0].view(torch.float32).permute(1, 0, 2).reshape(R, W * k_local)
        cand_pos = everyone[:, 1].permute(1, 0, 2).reshape(R, W * k_local)
        selected = merge_topk_candidates(cand_vals, cand_pos, topk)      # [R, K] global
        sel64 = selected.to(torch.int64)
        mine = (sel64 >= 0) & (P.owner(sel64) == rank)
        local_sel = torch.where(mine, P.local_position(sel64), -1).to(torch.int32)
    else:
        selected = global_pos.to(torch.int32)
        local_sel = local_idx

    slots = torch.ops.dsa.topk_slot_ids(local_sel.view(B, N, -1).contiguous(), block_table,
                                        cache.block_size)
    out_p, lse_p = torch.ops.dsa.sparse_mla_decode(q_latent, cache.kv_cache, slots, sm_scale,
                                                   512, None, None)
    out, lse = combine_partials(out_p, lse_p, group, attn_sink, stats, scatter_heads)
    return CPDecodeOutput(out, lse, selected.view(B, N, -1))


def gather_selection(positions: torch.Tensor, group=None) -> torch.Tensor:
    """All ranks' selections concatenated along the last dim: ``[..., k]`` -> ``[..., W*k]``
    (the rows a union-mode step attended to, for :func:`selection_recall`)."""
    everyone = _all_gather(positions, group, None, "selection")         # [W, ..., k]
    return torch.cat(list(everyone.unbind(0)), dim=-1)


def selection_recall(exact: torch.Tensor, approx: torch.Tensor) -> float:
    """Mean over rows (with a non-empty exact selection) of ``|approx ∩ exact| / |exact|``;
    ``exact [..., K]`` and ``approx [..., M]`` hold positions, ``-1`` = none."""
    exact = exact.reshape(-1, exact.shape[-1]).cpu()
    approx = approx.reshape(-1, approx.shape[-1]).cpu()
    recalls = []
    for e, a in zip(exact, approx):
        e = e[e >= 0]
        if e.numel():
            recalls.append(torch.isin(e, a[a >= 0]).double().mean().item())
    return sum(recalls) / len(recalls) if recalls else 1.0


# ---------------------------------------------------------------- prefill

class CPPrefillOutput(NamedTuple):
    out: torch.Tensor       # [T_r, H, d_v]: this rank's queries, in zigzag_positions order
    lse: torch.Tensor       # [T_r, H] fp32
    indices: torch.Tensor   # [T_r, K] int32 global key positions (-1 = none)
    kv: torch.Tensor        # [T, 1, 576] every latent row, gathered (differentiable), e.g.
    #                         for sparse_attention_target in indexer training


def zigzag_chunks(seq_len: int, world_size: int, rank: int) -> List[Tuple[int, int]]:
    """The two ``[start, end)`` chunks of rank ``rank``: chunks r and 2W-1-r of the 2W
    near-equal chunks ``[c T // 2W, (c+1) T // 2W)``."""
    n = 2 * world_size
    bounds = [c * seq_len // n for c in range(n + 1)]
    return [(bounds[c], bounds[c + 1]) for c in (rank, n - 1 - rank)]


def zigzag_positions(seq_len: int, world_size: int, rank: int, device=None) -> torch.Tensor:
    """int64 global positions of rank ``rank``'s query tokens, in the order :func:`prefill`
    expects its per-rank inputs."""
    return torch.cat([torch.arange(a, b, dtype=torch.int64, device=device)
                      for a, b in zigzag_chunks(seq_len, world_size, rank)])


def _zigzag_layout(seq_len: int, world_size: int, device):
    """(padded rows per rank, ``[T]`` index of each global position in the gathered
    ``[W * padded]`` buffer)."""
    counts = [sum(b - a for a, b in zigzag_chunks(seq_len, world_size, r)) for r in range(world_size)]
    padded = max(counts)
    where = torch.empty(seq_len, dtype=torch.int64)
    for r in range(world_size):
        where[zigzag_positions(seq_len, world_size, r)] = r * padded + torch.arange(counts[r])
    return padded, where.to(device)


class _AllGatherSequence(torch.autograd.Function):
    """Rows of every rank, in global order; backward: reduce-scatter of the gradient (fp32)
    back to the rows' owners."""

    @staticmethod
    def forward(ctx, local, seq_len, group, stats):
        W = dist.get_world_size(group)
        padded, where = _zigzag_layout(seq_len, W, local.device)
        buf = local.new_zeros((padded,) + tuple(local.shape[1:]))
        buf[:local.shape[0]] = local
        everyone = _all_gather(buf, group, stats, "rows").reshape((W * padded,) + tuple(local.shape[1:]))
        ctx.group, ctx.stats, ctx.where, ctx.padded, ctx.rows = group, stats, where, padded, local.shape[0]
        return everyone.index_select(0, where)

    @staticmethod
    def backward(ctx, grad):
        W = dist.get_world_size(ctx.group)
        full = grad.new_zeros((W * ctx.padded,) + tuple(grad.shape[1:]), dtype=torch.float32)
        full.index_copy_(0, ctx.where, grad.float())
        mine = full.new_empty((ctx.padded,) + tuple(grad.shape[1:]))
        if W == 1:
            mine = full
        else:
            dist.reduce_scatter_tensor(mine, full, op=dist.ReduceOp.SUM, group=ctx.group)
        if ctx.stats is not None and W > 1:
            ctx.stats.record("reduce_scatter:row grads", _nbytes(full), (W - 1) * _nbytes(mine))
        return mine[:ctx.rows].to(grad.dtype), None, None, None


def all_gather_sequence(local: torch.Tensor, seq_len: int, group=None,
                        stats: Optional[CommStats] = None) -> torch.Tensor:
    """``[T, ...]`` from every rank's zig-zag rows ``[T_r, ...]`` (differentiable)."""
    W, rank = dist.get_world_size(group), dist.get_rank(group)
    rows = sum(b - a for a, b in zigzag_chunks(seq_len, W, rank))
    if local.dim() < 1 or local.shape[0] != rows:
        raise ValueError(f"rank {rank} must pass its {rows} zig-zag rows of a {seq_len}-token "
                         f"sequence (W={W}), got shape {tuple(local.shape)}")
    return _AllGatherSequence.apply(local, seq_len, group, stats)


def _prefill_errors(seq_len, topk, q_index, weights, k_index, k_scale, q_latent, kv_latent,
                    group) -> List[str]:
    errs = []
    W, rank = dist.get_world_size(group), dist.get_rank(group)
    if seq_len < 1:
        errs.append(f"seq_len must be >= 1, got {seq_len}")
        return errs
    if topk < 1:
        errs.append(f"topk must be >= 1, got {topk}")
    rows = sum(b - a for a, b in zigzag_chunks(seq_len, W, rank))
    for name, t, dim in (("q_index", q_index, 3), ("weights", weights, 2), ("k_index", k_index, 2),
                         ("k_scale", k_scale, 1), ("q_latent", q_latent, 3)):
        if t.dim() != dim or t.shape[0] != rows:
            errs.append(f"{name} must be {dim}-D with this rank's {rows} zig-zag rows of a "
                        f"{seq_len}-token sequence (W={W}), got {tuple(t.shape)}")
    if kv_latent.shape[0] != rows or kv_latent.dim() not in (2, 3):
        errs.append(f"kv_latent must be [{rows}, 576] or [{rows}, 1, 576], got {tuple(kv_latent.shape)}")
    if q_index.dtype != torch.float8_e4m3fn or k_index.dtype != torch.float8_e4m3fn:
        errs.append(f"q_index and k_index must be float8_e4m3fn, got {q_index.dtype} and {k_index.dtype}")
    if k_scale.dtype != torch.float32:
        errs.append(f"k_scale must be float32, got {k_scale.dtype}")
    return errs


def prefill(q_index: torch.Tensor, weights: torch.Tensor, k_index: torch.Tensor,
            k_scale: torch.Tensor, q_latent: torch.Tensor, kv_latent: torch.Tensor,
            seq_len: int, topk: int, sm_scale: float, group=None,
            attn_sink: Optional[torch.Tensor] = None, deterministic: bool = False,
            stats: Optional[CommStats] = None, check: bool = True) -> CPPrefillOutput:
    """Context-parallel causal prefill of one ``seq_len``-token sequence. Rank r holds the
    tokens ``zigzag_positions(seq_len, W, r)`` (``T_r`` of them) and passes their rows:

    Args:
        q_index ``[T_r, H, D]`` FP8, weights ``[T_r, H]`` fp32: the indexer queries.
        k_index ``[T_r, D]`` FP8, k_scale ``[T_r]`` fp32: the tokens' indexer keys.
        q_latent ``[T_r, Hq, 576]`` bf16, kv_latent ``[T_r, 576]`` (or ``[T_r, 1, 576]``)
            bf16: the absorbed MLA queries and latent rows.
        topk: K; sm_scale, attn_sink, deterministic: as ``dsa_ext.sparse_mla``.
        stats, check: as :func:`decode_step`.

    Query at position p sees keys ``[0, p]``. Returns this rank's rows of the single-rank
    result; differentiable in q_latent and kv_latent (each rank's kv gradient sums the
    contributions of every rank's queries).
    """
    errors = _prefill_errors(seq_len, topk, q_index, weights, k_index, k_scale, q_latent,
                             kv_latent, group)
    if not check and errors:
        raise ValueError(f"context_parallel.prefill (rank {dist.get_rank(group)}): " + "; ".join(errors))
    _agree(group, q_latent.device, [
        ("world_size", dist.get_world_size(group)), ("seq_len", seq_len), ("topk", topk),
        ("q_index heads", q_index.shape[1] if q_index.dim() == 3 else -1),
        ("head dim", q_index.shape[-1] if q_index.dim() else -1),
        ("q_latent heads", q_latent.shape[1] if q_latent.dim() == 3 else -1),
        ("q_latent dim", q_latent.shape[-1] if q_latent.dim() else -1),
    ], errors, "context_parallel.prefill", check)
    W, rank = dist.get_world_size(group), dist.get_rank(group)
    dev = q_latent.device
    positions = zigzag_positions(seq_len, W, rank, dev)

    # indexer keys: D FP8 bytes + 4 scale bytes per token, one all-gather
    D = k_index.shape[1]
    packed = torch.cat([k_index.view(torch.uint8), k_scale.contiguous().view(torch.uint8).view(-1, 4)], dim=1)
    keys = all_gather_sequence(packed, seq_len, group, stats)
    k_full = keys[:, :D].contiguous().view(torch.float8_e4m3fn)
    scale_full = keys[:, D:].contiguous().view(torch.float32).view(-1)
    ke = (positions + 1).to(torch.int32)
    indices = torch.ops.dsa.indexer_topk(q_index, k_full, scale_full, weights.float(),
                                         torch.zeros_like(ke), ke, topk, False,
                                         256 * 1024 * 1024)

    kv_full = all_gather_sequence(kv_latent.reshape(kv_latent.shape[0], kv_latent.shape[-1]), seq_len, group, stats)
    out, lse = _sparse_mla(q_latent, kv_full.unsqueeze(1), indices.unsqueeze(1), sm_scale, 512,
                          attn_sink, None, deterministic)
    return CPPrefillOutput(out, lse, indices, kv_full.unsqueeze(1))


def indexer_kl_loss_sparse(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor,
                           indices: torch.Tensor, target: torch.Tensor, seq_len: int,
                           group=None, deterministic: bool = False,
                           stats: Optional[CommStats] = None) -> torch.Tensor:
    """This rank's term of the sparse-stage indexer alignment loss of a context-parallel
    prefill (``dsa_ext.indexer_kl_loss_sparse``, reduction "sum"): q ``[T_r, H, D]``,
    weights ``[T_r, H]`` and target ``[T_r, K]`` are this rank's zig-zag rows, k ``[T_r, D]``
    its tokens' training-precision indexer keys (all-gathered here, differentiably), indices
    ``[T_r, K]`` the global positions :func:`prefill` selected. The terms of all ranks sum to
    the single-rank "sum" loss; backward of each rank's term gives its rows' dq and dw, and dk
    of its own keys summed over every rank's queries (a reduce-scatter), so each rank calls
    backward on its own term. A "mean" is the caller's: divide by the global count of rows
    with a selection."""
    W, rank = dist.get_world_size(group), dist.get_rank(group)
    rows = sum(b - a for a, b in zigzag_chunks(seq_len, W, rank)) if seq_len >= 1 else -1
    errors = [f"{name} must have this rank's {rows} zig-zag rows of a {seq_len}-token sequence "
              f"(W={W}), got {tuple(t.shape)}"
              for name, t in (("q", q), ("k", k), ("weights", weights), ("indices", indices),
                              ("target", target)) if t.dim() < 1 or t.shape[0] != rows]
    _agree(group, q.device, [("world_size", W), ("seq_len", seq_len),
                             ("k dim", k.shape[-1] if k.dim() else -1)],
           errors, "context_parallel.indexer_kl_loss_sparse")
    k_full = all_gather_sequence(k, seq_len, group, stats)
    return _indexer_kl_loss_sparse(q, k_full, weights, indices.unsqueeze(1), target, None, "sum",
                                   deterministic)
