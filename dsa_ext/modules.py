"""nn.Modules for the DSA path of a DeepSeek-V3.2 attention layer (SPEC sections 1 and 5.1).

- `LightningIndexer`: the V3.2 indexer: `wq_b` on the query latent `qr`, `wk` + LayerNorm
  `k_norm` on the hidden state, NeoX (non-interleaved) rope on the first `rope_dim` dims,
  the orthonormal Hadamard rotation and FP8 quantisation (block 128, ue8m0) -- fused in one
  kernel for the queries (`dsa_ext.hadamard_fp8_quantize`), `hadamard_transform` then
  `dsa_ext.fp8_quantize` (or the cache writer) for the keys -- the `weights_proj` head weights
  with q's scale folded in, then
  indexer logits and top-k through the dsa ops (`indexer_topk` for prefill, which never holds
  the `[T, S]` scores; `paged_indexer_logits` + `topk_indices` + `topk_slot_ids` for decode).
- `SparseMLAAttention`: attention of MLA latent queries over the selected latent rows
  (`dsa_ext.sparse_mla`, differentiable; `sparse_mla_decode` over a paged cache).
- `DSAPath`: the two composed, for prefill (`forward`) and for a decode step over a
  `dsa_ext.paged_cache.PagedDSACache` (`decode_step`); `training_forward` is the training mode
  (SPEC section 7): the attention output and the indexer's KL alignment loss, in the dense
  warm-up or the sparse stage, with the report's detach rule.

The MLA projections themselves (`wq_a`/`wq_b`/`wkv_a`/`wkv_b` and the absorption of `wkv_b`
into the query) are the caller's: `DSAPath` takes the absorbed query latent `[T, H, 576]` and
the latent rows `[T, 576]` (512 "nope" + 64 rope, already roped).

Sizes default to DeepSeek-V3.2's (model dim 7168, q latent 1536, 64 indexer heads of dim 128,
rope dim 64, top-k 2048). Rope takes the model's cos/sin (YaRN-scaled in V3.2); `rope_cos_sin`
is a plain-rope helper for tests and benchmarks.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from .paged_cache import PagedDSACache
from .reference.dense import causal_ranges
from .reference.hadamard import walsh_hadamard_butterflies

__all__ = [
    "rope_cos_sin", "apply_rope_neox", "hadamard_transform", "ragged_causal_ranges",
    "LightningIndexer", "SparseMLAAttention", "DSAPath", "DSAOutput", "DSATrainOutput",
    "full_range_selection",
]

FP8_BLOCK = 128


# ---------------------------------------------------------------- rope and Hadamard

def rope_cos_sin(positions: torch.Tensor, rope_dim: int = 64, base: float = 10000.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Plain rope tables for the given positions: `cos, sin` fp32 `[len(positions), rope_dim // 2]`.
    (V3.2 uses YaRN-scaled frequencies; pass the model's own tables to the modules for that.)"""
    inv_freq = base ** (-torch.arange(0, rope_dim, 2, dtype=torch.float64, device=positions.device) / rope_dim)
    angles = positions.double()[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def apply_rope_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the last dim of x `[T, ..., r]` NeoX style: the pairs are (i, i + r/2) (halves),
    not (2i, 2i+1) (interleaved). cos/sin `[T, r/2]`. Computed in fp32, returned in x's dtype."""
    while cos.dim() < x.dim():
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


def hadamard_transform(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """`scale * x @ H_n` over the last dim (n a power of two, Sylvester order, as the
    fast-hadamard-transform package V3.2 uses), by the fast Walsh-Hadamard butterflies:
    log2(n) passes of O(n) instead of an n x n matmul. Computed in fp32, returned in x's dtype.
    Each pass is a separate PyTorch op over the whole tensor. The indexer uses it for the keys
    (one row per token, which the cache writer then quantises); the queries, 64 rows per token,
    go through the fused kernel `dsa_ext.hadamard_fp8_quantize`. A fused rotate-and-write for
    the keys is future work."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"hadamard_transform needs a power-of-two last dim, got {n}")
    return (walsh_hadamard_butterflies(x) * scale).to(x.dtype)


def ragged_causal_ranges(cu_seqlens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """`(ks, ke)` int32 `[T]` for a ragged batch of prefills flattened into T tokens
    (`cu_seqlens` `[B + 1]`): token t of the sequence starting at `start` sees `[start, t + 1)`."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lens)
    ke = torch.arange(1, starts.numel() + 1, device=cu_seqlens.device)
    return starts.int(), ke.int()


# ---------------------------------------------------------------- the lightning indexer

class LightningIndexer(nn.Module):
    """The lightning indexer of a DeepSeek-V3.2 layer (SPEC section 5.1).

    Args:
        dim: model (hidden) dim, input of `wk` and `weights_proj`.
        q_lora_rank: width of the query latent `qr` (shared with MLA), input of `wq_b`.
        n_heads, head_dim: indexer heads and their dim (64, 128; head_dim must be 128, the
            FP8 quantisation block, so each head of q gets one scale).
        rope_dim: leading dims of each head (and of k) that get rope.
        topk: keys kept per query (fewer when the causal range is shorter).

    The selection is not differentiable (FP8 quantisation and top-k have no useful gradient;
    V3.2 trains the indexer with a separate objective on its scores): `select`, `logits` and
    `decode_slots` run under `torch.no_grad()`. `project` is differentiable.
    """

    def __init__(self, dim: int = 7168, q_lora_rank: int = 1536, n_heads: int = 64, head_dim: int = 128,
                 rope_dim: int = 64, topk: int = 2048, device=None, dtype=None):
        super().__init__()
        if head_dim != FP8_BLOCK:
            raise ValueError(f"head_dim must be {FP8_BLOCK} (one FP8 scale per head and per key), got {head_dim}")
        if rope_dim % 2 or rope_dim > head_dim:
            raise ValueError(f"rope_dim must be even and <= head_dim, got {rope_dim}")
        self.dim, self.n_heads, self.head_dim, self.rope_dim, self.topk = dim, n_heads, head_dim, rope_dim, topk
        factory = dict(device=device, dtype=dtype)
        self.wq_b = nn.Linear(q_lora_rank, n_heads * head_dim, bias=False, **factory)
        self.wk = nn.Linear(dim, head_dim, bias=False, **factory)
        self.k_norm = nn.LayerNorm(head_dim, **factory)
        # fp32, as in V3.2: the head weights multiply FP8 products and must not lose bits.
        self.weights_proj = nn.Linear(dim, n_heads, bias=False, device=device, dtype=torch.float32)

    def project(self, x: torch.Tensor, qr: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Roped queries `[T, H, D]` (not yet rotated: `quantize_query` rotates and quantises in
        one kernel) and rotated keys `[T, D]` (what the cache writer takes). x `[T, dim]`,
        qr `[T, q_lora_rank]`, cos/sin `[T, rope_dim / 2]` for the tokens' positions."""
        T, r = x.shape[0], self.rope_dim
        q = self.wq_b(qr).view(T, self.n_heads, self.head_dim)
        k = self.k_norm(self.wk(x))
        q = torch.cat((apply_rope_neox(q[..., :r], cos, sin), q[..., r:]), dim=-1)
        k = torch.cat((apply_rope_neox(k[..., :r], cos, sin), k[..., r:]), dim=-1)
        return q, hadamard_transform(k, self.head_dim ** -0.5)

    def training_inputs(self, x: torch.Tensor, qr: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """`(q, k, weights)` in training precision (no FP8, SPEC section 7), differentiable in the
        indexer's parameters: q `[T, H, D]` and k `[T, D]` both rotated (the rotation is
        orthonormal, so q . k is the unrotated product the FP8 path approximates) and the head
        weights `[T, H]` fp32 with `H**-0.5 * D**-0.5` folded in. The inputs of
        `dsa_ext.indexer_train_logits` and the KL losses."""
        q, k = self.project(x, qr, cos, sin)
        q = hadamard_transform(q, self.head_dim ** -0.5)
        weights = self.weights_proj(x.float()) * (self.n_heads ** -0.5 * self.head_dim ** -0.5)
        return q.contiguous(), k.contiguous(), weights.contiguous()

    @torch.no_grad()
    def quantize_query(self, x: torch.Tensor, q: torch.Tensor):
        """Rotate and FP8-quantise `project`'s queries `[T, H, D]` (one fused kernel); returns
        them with the head weights `[T, H]` fp32, q's dequantisation scale and
        `H**-0.5 * D**-0.5` folded in (the indexer ops' `weights`)."""
        q_fp8, q_scale = torch.ops.dsa.hadamard_fp8_quantize(q.contiguous(), FP8_BLOCK, True)  # scale [T, H, 1]
        weights = self.weights_proj(x.float()) * (self.n_heads ** -0.5 * self.head_dim ** -0.5)
        return q_fp8, weights * q_scale.squeeze(-1)

    @staticmethod
    @torch.no_grad()
    def quantize_key(k: torch.Tensor):
        """FP8 keys `[S, D]` and their scales `[S]` from rotated keys (the bytes the indexer K
        cache stores for them)."""
        k_fp8, k_scale = torch.ops.dsa.fp8_quantize(k, FP8_BLOCK, True)
        return k_fp8, k_scale.squeeze(-1)

    @torch.no_grad()
    def quantized_inputs(self, x, qr, cos, sin):
        """`(q_fp8, k_fp8, k_scale, weights)`: the indexer op inputs of a prefill."""
        q, k = self.project(x, qr, cos, sin)
        q_fp8, weights = self.quantize_query(x, q)
        return (q_fp8, *self.quantize_key(k), weights)

    @torch.no_grad()
    def logits(self, x, qr, cos, sin, ks: Optional[torch.Tensor] = None, ke: Optional[torch.Tensor] = None):
        """The full `[T, T]` indexer scores of a prefill (`-inf` outside each row's range;
        default causal). O(T^2) memory: for inspection; `forward` never holds them."""
        q_fp8, k_fp8, k_scale, weights = self.quantized_inputs(x, qr, cos, sin)
        ks, ke = self._ranges(x, ks, ke)
        return torch.ops.dsa.indexer_logits(q_fp8, k_fp8, k_scale, weights, ks, ke, True)

    @torch.no_grad()
    def select(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
               ks: Optional[torch.Tensor] = None, ke: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Top-k key indices from `project`'s q `[T, H, D]` and k `[S, D]` (see `forward`)."""
        q_fp8, weights = self.quantize_query(x, q)
        k_fp8, k_scale = self.quantize_key(k)
        ks, ke = self._ranges(x, ks, ke)
        return torch.ops.dsa.indexer_topk(q_fp8, k_fp8, k_scale, weights, ks, ke, min(self.topk, k.shape[0]))

    def forward(self, x: torch.Tensor, qr: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                ks: Optional[torch.Tensor] = None, ke: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Prefill: int32 `[T, min(topk, T)]` key indices per token (`-1` where a row's range
        holds fewer keys). Row t ranks keys `ks[t] <= s < ke[t]` (default causal: `[0, t+1)`;
        `ragged_causal_ranges(cu_seqlens)` for a flattened batch)."""
        q, k = self.project(x, qr, cos, sin)
        return self.select(x, q, k, ks, ke)

    @torch.no_grad()
    def decode_slots(self, x: torch.Tensor, q: torch.Tensor, cache: PagedDSACache,
                     seq_ids: Sequence[int], n_new: int = 1) -> torch.Tensor:
        """Decode: the cache slot ids `[B, n_new, K]` (int32, `-1` = none) each new token attends
        to. q `[B * n_new, H, D]` are the new tokens' queries (from `project`), whose keys
        are already in `cache` (context_lens count them)."""
        B = len(seq_ids)
        q_fp8, weights = self.quantize_query(x, q)
        context_lens, block_table = cache.context_lens(seq_ids), cache.block_table(seq_ids)
        max_len = max(cache.seq_len(s) for s in seq_ids)
        logits = torch.ops.dsa.paged_indexer_logits(
            q_fp8.view(B, n_new, self.n_heads, self.head_dim), cache.index_k_cache, weights,
            context_lens, block_table, max_len, True)
        # Query (b, j) sees positions < context_lens[b] - n_new + 1 + j.
        visible = context_lens[:, None] - n_new + 1 + torch.arange(n_new, device=context_lens.device, dtype=torch.int32)
        ke = visible.reshape(-1)
        positions = torch.ops.dsa.topk_indices(logits, min(self.topk, max_len), torch.zeros_like(ke), ke, False)
        return torch.ops.dsa.topk_slot_ids(positions, block_table, cache.block_size).view(B, n_new, -1)

    @staticmethod
    def _ranges(x, ks, ke):
        if (ks is None) != (ke is None):
            raise ValueError("ks and ke must be given together")
        return causal_ranges(x.shape[0], x.shape[0], x.device) if ks is None else (ks, ke)


# ---------------------------------------------------------------- sparse MLA attention

def _sparse_mla():
    """The differentiable `dsa_ext.sparse_mla` function (looked up at call time: the package
    imports this module, and `dsa_ext.ops.sparse_mla` names both a module and its function)."""
    from .ops import sparse_mla as fn
    return getattr(fn, "sparse_mla", fn)


class SparseMLAAttention(nn.Module):
    """Attention of MLA latent queries over selected latent rows (one KV head, K = V[:, :d_v]).

    softmax_scale defaults to `192**-0.5` (V3.2's qk head dim 128 + 64; multiply in the YaRN
    mscale**2 for extended contexts, as the model does)."""

    def __init__(self, softmax_scale: float = 192 ** -0.5, d_v: int = 512):
        super().__init__()
        self.softmax_scale, self.d_v = softmax_scale, d_v

    def forward(self, q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor,
                topk_length: Optional[torch.Tensor] = None):
        """q `[T, H, 576]` bf16, kv `[S, 576]` or `[S, 1, 576]` bf16, indices `[T, K]` or
        `[T, 1, K]` int32 rows of kv (`-1` skipped). Returns `(out [T, H, d_v] bf16, lse [T, H])`;
        differentiable in q and kv."""
        kv = kv.view(kv.shape[0], 1, kv.shape[-1])
        indices = indices.view(indices.shape[0], 1, indices.shape[-1])
        return _sparse_mla()(q, kv, indices, self.softmax_scale, self.d_v, None, topk_length)

    def decode(self, q: torch.Tensor, kv_cache: torch.Tensor, slot_ids: torch.Tensor):
        """q `[B, s_q, H, 576]` bf16 over a paged MLA cache (FP8 or bf16), slot_ids `[B, s_q, K]`.
        Returns `(out [B, s_q, H, d_v] bf16, lse [B, s_q, H])`."""
        return torch.ops.dsa.sparse_mla_decode(q, kv_cache, slot_ids, self.softmax_scale, self.d_v)


# ---------------------------------------------------------------- the composed path

class DSAOutput(NamedTuple):
    out: torch.Tensor       # [T, H, d_v] (prefill) or [B, n_new, H, d_v] (decode), bf16
    lse: torch.Tensor       # [T, H] / [B, n_new, H] fp32
    indices: torch.Tensor   # [T, K] key indices (prefill) / [B, n_new, K] cache slot ids (decode)


class DSATrainOutput(NamedTuple):
    out: torch.Tensor           # [T, H, d_v] attention output, differentiable in q_latent / kv_latent
    lse: torch.Tensor           # [T, H] fp32
    indices: torch.Tensor       # [T, K] the keys attended to (every causal key in the dense stage)
    indexer_loss: torch.Tensor  # scalar KL alignment loss, differentiable in the indexer's parameters only


def full_range_selection(ks: torch.Tensor, ke: torch.Tensor) -> torch.Tensor:
    """int32 `[T, max(ke - ks)]`: every key of each row's range `[ks[t], ke[t])`, then `-1`
    (dense attention through the sparse op: O(T * S) indices, for the warm-up at toy sizes)."""
    lens = (ke.long() - ks.long()).clamp_min(0)
    width = max(int(lens.max()) if lens.numel() else 0, 1)
    cols = torch.arange(width, device=ks.device)
    idx = ks.long()[:, None] + cols[None, :]
    return torch.where(cols[None, :] < lens[:, None], idx, -1).int()


class DSAPath(nn.Module):
    """Indexer -> top-k -> sparse MLA attention of one V3.2 layer. Keyword arguments go to
    `LightningIndexer`; `softmax_scale` and `d_v` to `SparseMLAAttention`."""

    def __init__(self, softmax_scale: float = 192 ** -0.5, d_v: int = 512, **indexer_kwargs):
        super().__init__()
        self.indexer = LightningIndexer(**indexer_kwargs)
        self.attention = SparseMLAAttention(softmax_scale, d_v)

    def forward(self, x: torch.Tensor, qr: torch.Tensor, q_latent: torch.Tensor, kv_latent: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None,
                cache: Optional[PagedDSACache] = None, seq_ids: Optional[Sequence[int]] = None) -> DSAOutput:
        """Prefill of T tokens (one sequence, or a ragged batch given `cu_seqlens`): x `[T, dim]`,
        qr `[T, q_lora_rank]`, q_latent `[T, H, 576]`, kv_latent `[T, 576]`, cos/sin per token.
        With `cache` (and the batch's `seq_ids`, empty so far), the tokens' indexer keys and
        latent rows are also stored there for later decode steps."""
        ks, ke = (None, None) if cu_seqlens is None else ragged_causal_ranges(cu_seqlens)
        q, k = self.indexer.project(x, qr, cos, sin)
        indices = self.indexer.select(x, q, k, ks, ke)
        out, lse = self.attention(q_latent, kv_latent, indices)
        if cache is not None:
            lens = [x.shape[0]] if cu_seqlens is None else (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
            if seq_ids is None or len(seq_ids) != len(lens):
                raise ValueError(f"seq_ids must name the {len(lens)} sequence(s) being stored in the cache")
            cache.append(seq_ids, lens, k, kv_latent)
        return DSAOutput(out, lse, indices)

    def training_forward(self, x: torch.Tensor, qr: torch.Tensor, q_latent: torch.Tensor,
                         kv_latent: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         stage: str = "sparse", cu_seqlens: Optional[torch.Tensor] = None,
                         reduction: str = "mean", block_size: int = 1024,
                         deterministic: bool = False) -> DSATrainOutput:
        """Training mode of the DSA path (DeepSeek-V3.2 report 2.1, SPEC section 7).

        `stage="dense"` (warm-up): the attention runs over every causal key, and the indexer
        loss is `dsa_ext.indexer_kl_loss_dense` over all of them (streamed; never [T, S]).
        `stage="sparse"`: the indexer's FP8 top-k selects the keys, the attention runs over them
        (`dsa_ext.sparse_mla`), and the loss is `dsa_ext.indexer_kl_loss_sparse` against
        `dsa_ext.sparse_attention_target` from that attention's lse.

        Detach rule: the indexer sees `x` and `qr` detached, so its loss trains only the
        indexer's parameters and the model's loss (through `out`) never reaches them; the loss
        gets the main attention's q_latent / kv_latent detached, so it sends them no gradient.
        Optimise `indexer_loss` (indexer parameters) and the model loss (everything else)
        together or separately; in the warm-up the report freezes the main model.
        Inputs as in `forward` (`kv_latent` `[T, 576]` or `[T, 1, 576]`).
        """
        if stage not in ("dense", "sparse"):
            raise ValueError(f'stage must be "dense" or "sparse", got "{stage}"')
        from .ops import training as train_ops
        T = x.shape[0]
        x_i, qr_i = x.detach(), qr.detach()
        if cu_seqlens is None:
            ks, ke = causal_ranges(T, T, x.device)
        else:
            ks, ke = ragged_causal_ranges(cu_seqlens)
        kv3 = kv_latent.view(kv_latent.shape[0], 1, kv_latent.shape[-1])
        q_i, k_i, w_i = self.indexer.training_inputs(x_i, qr_i, cos, sin)
        scale = self.attention.softmax_scale
        if stage == "dense":
            indices = full_range_selection(ks, ke)
            out, lse = self.attention(q_latent, kv3, indices)
            loss = train_ops.indexer_kl_loss_dense(q_i, k_i, w_i, ks, ke, q_latent.detach().contiguous(),
                                                   kv3.detach().contiguous(), scale, reduction,
                                                   block_size, deterministic)
        else:
            with torch.no_grad():
                q_sel, k_sel = self.indexer.project(x_i, qr_i, cos, sin)
                indices = self.indexer.select(x_i, q_sel, k_sel, ks, ke)
            out, lse = self.attention(q_latent, kv3, indices)
            idx3 = indices.view(T, 1, -1).contiguous()
            target = train_ops.sparse_attention_target(q_latent.detach().contiguous(), kv3.detach().contiguous(),
                                                       idx3, lse.detach().contiguous(), scale)
            loss = train_ops.indexer_kl_loss_sparse(q_i, k_i, w_i, idx3, target, None, reduction,
                                                    deterministic)
        return DSATrainOutput(out, lse, indices, loss)

    def decode_step(self, x: torch.Tensor, qr: torch.Tensor, q_latent: torch.Tensor, kv_latent: torch.Tensor,
                    cos: torch.Tensor, sin: torch.Tensor, cache: PagedDSACache, seq_ids: Sequence[int],
                    n_new: int = 1, slot_mapping: Optional[torch.Tensor] = None) -> DSAOutput:
        """`n_new` new tokens for each of B sequences (inputs `[B * n_new, ...]`, sequence-major):
        writes their indexer keys and latent rows into `cache`, then selects and attends.
        Slots are reserved here unless the scheduler already did (`slot_mapping` from
        `cache.reserve(seq_ids, n_new)`)."""
        B = len(seq_ids)
        q, k = self.indexer.project(x, qr, cos, sin)
        if slot_mapping is None:
            slot_mapping = cache.reserve(seq_ids, n_new)
        cache.write(slot_mapping, k, kv_latent)
        slots = self.indexer.decode_slots(x, q, cache, seq_ids, n_new)
        out, lse = self.attention.decode(q_latent.view(B, n_new, *q_latent.shape[1:]), cache.kv_cache, slots)
        return DSAOutput(out, lse, slots)


# DeepSeek-V4 layers (SPEC section 10) live in dsa_ext.v4; re-exported here beside the V3.2 ones.
from .v4 import V4Attention, V4LayerCache, V4Output  # noqa: E402

__all__ += ["V4Attention", "V4LayerCache", "V4Output"]
