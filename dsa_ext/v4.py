"""DeepSeek-V4 attention layers on the dsa ops (SPEC section 10), prefill and paged decode.

A V4 layer keeps one 512-dim latent row per token that is both K and V (448 "nope" dims, then
64 rope dims), and attends, in ONE softmax with a per-head sink, to
- SWA ("swa"): the `window` most recent rows (itself included);
- CSA ("csa"): the window plus the indexer's top-k over compressed entries (ratio 4, c = 2:
  overlapping windows, SPEC 10.4-10.5);
- HCA ("hca"): the window plus every complete compressed entry (ratio 128, c = 1, no indexer).

`V4Attention` follows the public DeepSeek-V4 `inference/model.py` (`Attention`, `Compressor`,
`Indexer`), read and re-derived here:
1. `qr = q_norm(wq_a(x))`, `q = wq_b(qr)` viewed `[T, H, 512]`, then a per-head RMS norm
   without weight (`q * rsqrt(mean(q**2) + eps)`), then rope on the last 64 dims;
2. `kv = kv_norm(wkv(x))` `[T, 512]`, rope on the last 64 dims; its nope dims are what the FP8
   cache quantises (V4 simulates exactly that quantisation in training);
3. compressed entries (csa/hca): `dsa_ext.v4_compress` of `wkv_c(x)`, `wgate_c(x)` (fp32);
   decode: `dsa_ext.v4_compress_step` over a ring-buffer state;
4. CSA indexer: `q_i = wq_b_i(qr)` `[T, Hi, 128]`, rope on its last 64 dims, Hadamard + FP8
   (`hadamard_fp8_quantize`); keys from the indexer's own compressor (d = 128, c = 2), then the
   Hadamard rotation and FP8 (the indexer K cache's quantiser); head weights
   `weights_proj(x) * 128**-0.5 * Hi**-0.5` times q's FP8 scale; entry j visible to the token
   at position t when `j < (t + 1) // 4`; top-min(index_topk, visible);
5. `sparse_mla_fwd` (prefill; decode: `sparse_mla_decode` with the window cache and the
   compressed cache in one softmax, SPEC 10.3) with `sm_scale = 512**-0.5` and the sink;
6. inverse rope on the output's last 64 dims (V4 de-rotates the value's rope half), then the
   grouped low-rank output projection `wo_a` (per group of heads) and `wo_b`.
Rope is GPT-J style (interleaved pairs), with this layer's tables: V4 uses `rope_theta` for
SWA layers and YaRN-scaled `compress_rope_theta` for the compressed ones. The module builds
plain (un-YaRN'd) tables from `rope_base`; load the model's own with `set_rope(cos, sin)`.

GLM-5's shared indexer layers reuse the previous layer's selection: `shared_indexer=True`
builds a CSA layer without an indexer, and `forward` / `decode_step` then take `prev_topk`,
the `topk` field of the previous CSA layer's output (entry positions within each sequence,
the same for every layer of one ratio).

Decode state lives in a `V4LayerCache`: the window rows in a paged ring (`window` slots per
sequence) of the V4 MLA cache (FP8 584-byte MODEL1 or bf16 512), the compressed entries in a
second paged cache of the same format, the indexer keys in a paged indexer K cache (same block
ids as the compressed entries), and both compressors' ring states.

Defaults are DeepSeek-V4-Flash's (dim 4096, 64 heads of 512, q rank 1024, 8 output groups of
rank 1024, window 128, 64 indexer heads of 128, top-k 512; V4-Pro: 128 heads, top-k 1024).

Decode attends to the window slots and the selected compressed entries straight from the paged
caches in one softmax: `sparse_mla_decode` with its second list (`extra_kv_cache`, SPEC 10.3).
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .modules import hadamard_transform
from .ops.compress import (new_v4_compress_state, v4_compress, v4_compress_prefill_state,
                           v4_compress_step)

__all__ = ["V4Attention", "V4LayerCache", "V4Output", "v4_rope_tables", "apply_rope_gptj",
           "V4_KINDS"]

# kind -> (compress ratio, c)
V4_KINDS: Dict[str, Tuple[int, int]] = {"swa": (0, 0), "csa": (4, 2), "hca": (128, 1)}
ROPE_DIM = 64
INDEX_HEAD_DIM = 128
LATENT_DIM = 512


# ---------------------------------------------------------------- rope (GPT-J pairs)

def v4_rope_tables(num_positions: int, rope_dim: int = ROPE_DIM, base: float = 10000.0,
                   device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Plain rope tables `cos, sin` fp32 `[num_positions, rope_dim // 2]` (frequency i =
    `base**(-2i / rope_dim)`). V4's compressed layers scale these by YaRN: pass the model's
    tables to `V4Attention.set_rope` for that."""
    inv_freq = base ** (-torch.arange(0, rope_dim, 2, dtype=torch.float64, device=device) / rope_dim)
    angles = torch.arange(num_positions, dtype=torch.float64, device=device)[:, None] * inv_freq
    return angles.cos().float(), angles.sin().float()


def apply_rope_gptj(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    inverse: bool = False) -> torch.Tensor:
    """Rotate the last dim of x `[T, ..., r]` in interleaved pairs `(x[2i], x[2i+1])` by the
    angle of frequency i (cos/sin `[T, r/2]`); `inverse` rotates back (the conjugate). fp32
    inside, returned in x's dtype."""
    while cos.dim() < x.dim():
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    if inverse:
        sin = -sin
    xf = x.float()
    x0, x1 = xf[..., 0::2], xf[..., 1::2]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).to(x.dtype)


def _rope_last(x: torch.Tensor, cos, sin, inverse: bool = False) -> torch.Tensor:
    """x with GPT-J rope on its last 64 dims (the rest unchanged)."""
    return torch.cat((x[..., :-ROPE_DIM], apply_rope_gptj(x[..., -ROPE_DIM:], cos, sin, inverse)), dim=-1)


def _rms(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """RMS norm over the last dim in fp32 (weight optional), returned in x's dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    return (y if weight is None else y * weight.float()).to(x.dtype)


# ---------------------------------------------------------------- the compressor's weights

class _Compressor(nn.Module):
    """Weights of one V4 compressor (gated pooling of `ratio` tokens, RMSNorm, rope): fp32 as in
    V4. `c = 2` pools overlapping windows (the first `d` channels see the previous window)."""

    def __init__(self, dim: int, d: int, ratio: int, c: int, device=None):
        super().__init__()
        self.d, self.ratio, self.c = d, ratio, c
        f32 = dict(device=device, dtype=torch.float32)
        self.wkv = nn.Linear(dim, c * d, bias=False, **f32)
        self.wgate = nn.Linear(dim, c * d, bias=False, **f32)
        self.ape = nn.Parameter(torch.zeros(ratio, c * d, **f32))
        self.norm_weight = nn.Parameter(torch.ones(d, **f32))

    def project(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        xf = x.float()
        return self.wkv(xf).contiguous(), self.wgate(xf).contiguous()


class V4Output(NamedTuple):
    out: torch.Tensor                  # [T, dim] / [B, dim]: the layer's output (after wo_a, wo_b)
    o: torch.Tensor                    # [T, H, 512] / [B, H, 512] bf16 attention output, inverse-roped
    lse: torch.Tensor                  # [T, H] / [B, H] fp32 (the sink excluded)
    window: torch.Tensor               # prefill: rows of the batch's tokens [T, window]; decode: window-cache slots [B, window]
    compressed: Optional[torch.Tensor]  # prefill: flattened entry rows [T, K2]; decode: compressed-cache slots [B, K2]
    topk: Optional[torch.Tensor]       # csa: the selected entries' positions within each sequence ([T, K] / [B, K], -1 none)


# ---------------------------------------------------------------- the paged decode state

class V4LayerCache:
    """The decode state of one `V4Attention` layer over paged caches.

    - `kv_cache`: the window rows, V4 MLA cache (`"fp8"`: uint8 `[nb, bs, 1, 584]` FlashMLA
      MODEL1 pages; `"bf16"`: `[nb, bs, 1, 512]`); each sequence owns `ceil(window / bs)` blocks
      used as a ring: position p lives in ring row `p % window`.
    - `compressed_cache` (csa/hca): the compressed entries, same format; entry j of a sequence in
      its j-th slot (blocks allocated as entries appear).
    - `index_k_cache` (csa with its own indexer): uint8 `[nb, bs, 1, 132]` indexer keys, entry j
      at the same slot as in `compressed_cache` (one block table serves both).
    - `kv_state`, `score_state` (and `index_kv_state`, `index_score_state`): the compressors'
      ring states `[max_seqs, c * ratio, c * d]` (`dsa_ext.new_v4_compress_state`), one row per
      sequence.
    Bookkeeping (blocks, lengths) is host-side Python, as `dsa_ext.paged_cache.PagedDSACache`.
    """

    def __init__(self, layer: "V4Attention", num_blocks: int, block_size: int = 64,
                 max_seqs: int = 8, kv_cache_dtype: Optional[str] = None,
                 device: Union[str, torch.device, None] = None):
        kv_cache_dtype = layer.kv_cache_dtype if kv_cache_dtype is None else kv_cache_dtype
        if num_blocks <= 0 or block_size <= 0 or max_seqs <= 0:
            raise ValueError(f"num_blocks, block_size and max_seqs must be positive, got "
                             f"{num_blocks}, {block_size}, {max_seqs}")
        if kv_cache_dtype not in ("fp8", "bf16"):
            raise ValueError(f"kv_cache_dtype must be 'fp8' or 'bf16', got {kv_cache_dtype!r}")
        from .reference.cache import new_mla_kv_cache   # the allocator (FlashMLA's page pitch)
        device = torch.device(device) if device is not None else layer.attn_sink.device
        self.device, self.block_size, self.kv_cache_dtype = device, block_size, kv_cache_dtype
        self.kind, self.window, self.ratio = layer.kind, layer.window, layer.ratio
        fp8 = kv_cache_dtype == "fp8"
        self.window_blocks = -(-layer.window // block_size)
        self.kv_cache = new_mla_kv_cache(num_blocks, block_size, fp8, device, model="v4")
        self.compressed_cache = (new_mla_kv_cache(num_blocks, block_size, fp8, device, model="v4")
                                 if layer.ratio else None)
        self.index_k_cache = None
        if layer.indexer_compressor is not None:
            self.index_k_cache = torch.zeros(num_blocks, block_size, 1, INDEX_HEAD_DIM + 4,
                                             dtype=torch.uint8, device=device)
        self.kv_state = self.score_state = self.index_kv_state = self.index_score_state = None
        if layer.compressor is not None:
            comp = layer.compressor
            self.kv_state, self.score_state = new_v4_compress_state(max_seqs, comp.d, comp.c, comp.ratio, device)
        if layer.indexer_compressor is not None:
            comp = layer.indexer_compressor
            self.index_kv_state, self.index_score_state = new_v4_compress_state(
                max_seqs, comp.d, comp.c, comp.ratio, device)
        # Two independent block pools would waste memory; window and entry blocks share one.
        self._free: List[int] = list(range(num_blocks - 1, -1, -1))
        self._free_rows: List[int] = list(range(max_seqs - 1, -1, -1))
        self._win_blocks: Dict[int, List[int]] = {}
        self._entry_blocks: Dict[int, List[int]] = {}
        self._lens: Dict[int, int] = {}
        self._rows: Dict[int, int] = {}
        self._next_id = 0

    # ---- sequences ----
    def add_sequence(self, seq_id: Optional[int] = None) -> int:
        """Register an empty sequence (its window blocks and a state row); returns its id."""
        seq_id = self._next_id if seq_id is None else seq_id
        if seq_id in self._lens:
            raise ValueError(f"seq_id {seq_id} is already in the cache")
        if not self._free_rows:
            raise RuntimeError("V4LayerCache: every state row is in use (raise max_seqs)")
        if len(self._free) < self.window_blocks:
            raise RuntimeError(f"V4LayerCache is full: {self.window_blocks} blocks needed, {len(self._free)} free")
        self._next_id = max(self._next_id, seq_id + 1)
        self._win_blocks[seq_id] = [self._free.pop() for _ in range(self.window_blocks)]
        self._entry_blocks[seq_id], self._lens[seq_id] = [], 0
        self._rows[seq_id] = self._free_rows.pop()
        return seq_id

    def free_sequence(self, seq_id: int) -> None:
        self._check(seq_id)
        self._free.extend(reversed(self._win_blocks.pop(seq_id) + self._entry_blocks.pop(seq_id)))
        self._free_rows.append(self._rows.pop(seq_id))
        del self._lens[seq_id]

    def seq_len(self, seq_id: int) -> int:
        return self._lens[self._check(seq_id)]

    def num_entries(self, seq_id: int) -> int:
        return self._lens[self._check(seq_id)] // self.ratio if self.ratio else 0

    # ---- slots ----
    def window_table(self, seq_ids: Sequence[int]) -> torch.Tensor:
        """int64 `[B, ceil(window / block_size)]`: the blocks of each sequence's window ring."""
        return torch.tensor([self._win_blocks[self._check(s)] for s in seq_ids], dtype=torch.int64,
                            device=self.device).reshape(len(seq_ids), self.window_blocks)

    def window_slots(self, seq_ids: Sequence[int], positions: torch.Tensor,
                     table: Optional[torch.Tensor] = None) -> torch.Tensor:
        """int64 slots `[B, n]` of the window ring rows holding `positions [B, n]` (-1 where
        negative); `table` (rows of `window_table`, one per row of positions) overrides."""
        table = self.window_table(seq_ids) if table is None else table
        ring = positions.remainder(self.window)
        slots = table.gather(1, ring // self.block_size) * self.block_size + ring % self.block_size
        return torch.where(positions >= 0, slots, -1)

    def reserve_entries(self, seq_ids: Sequence[int], counts: Sequence[int]) -> torch.Tensor:
        """Slots (int64 `[sum(counts)]`) for `counts[i]` new compressed entries of `seq_ids[i]`,
        after the ones it has (call before advancing the length)."""
        need = sum(self._blocks_for(self.num_entries(s) + n) - len(self._entry_blocks[s])
                   for s, n in zip(seq_ids, counts))
        if need > len(self._free):
            raise RuntimeError(f"V4LayerCache is full: {need} blocks needed, {len(self._free)} free")
        slots: List[int] = []
        for s, n in zip(seq_ids, counts):
            blocks, start = self._entry_blocks[s], self.num_entries(s)
            while len(blocks) < self._blocks_for(start + n):
                blocks.append(self._free.pop())
            slots.extend(blocks[j // self.block_size] * self.block_size + j % self.block_size
                         for j in range(start, start + n))
        return torch.tensor(slots, dtype=torch.int64, device=self.device)

    def entry_block_table(self, seq_ids: Sequence[int]) -> torch.Tensor:
        """int32 `[B, max_blocks]` of the compressed entries (padded with block 0, never read past
        the entry count)."""
        width = max([len(self._entry_blocks[self._check(s)]) for s in seq_ids] + [1])
        rows = [self._entry_blocks[s] + [0] * (width - len(self._entry_blocks[s])) for s in seq_ids]
        return torch.tensor(rows, dtype=torch.int32, device=self.device).reshape(len(seq_ids), width)

    def state_rows(self, seq_ids: Sequence[int]) -> List[int]:
        return [self._rows[self._check(s)] for s in seq_ids]

    def advance(self, seq_ids: Sequence[int], counts: Sequence[int]) -> None:
        for s, n in zip(seq_ids, counts):
            self._lens[self._check(s)] += n

    def _blocks_for(self, n: int) -> int:
        return -(-n // self.block_size)

    def _check(self, seq_id: int) -> int:
        if seq_id not in self._lens:
            raise KeyError(f"seq_id {seq_id} is not in the cache")
        return seq_id


class _StateRows:
    """The batch's rows of a compressor state as one tensor the step op updates in place: a view
    when the rows are consecutive, else a gathered copy written back by `commit`."""

    def __init__(self, state: torch.Tensor, rows: List[int]):
        self.state, self.rows = state, rows
        consecutive = rows == list(range(rows[0], rows[0] + len(rows))) if rows else True
        self.view = state[rows[0]:rows[0] + len(rows)] if consecutive and rows else None
        self.tensor = self.view if self.view is not None else state[rows]

    def commit(self) -> None:
        if self.view is None:
            self.state[self.rows] = self.tensor


# ---------------------------------------------------------------- the layer

class V4Attention(nn.Module):
    """One DeepSeek-V4 attention layer (module docstring): prefill `forward`, paged `decode_step`.

    Args:
        kind: "swa", "csa" (ratio 4, overlapping windows, indexer top-k) or "hca" (ratio 128,
            every complete entry).
        dim: model (hidden) dim. n_heads: attention heads (V4-Flash 64; per GPU under TP).
        q_lora_rank: query latent width. o_groups, o_lora_rank: the grouped output projection.
        window: the sliding window (128). head dim is 512 (448 nope + 64 rope), fixed by the caches.
        index_heads, index_topk: the CSA indexer (64 heads of 128, top-k 512).
        ratio: overrides the kind's compress ratio (tests use small ones; "csa" needs c = 2,
            "hca" c = 1, any ratio >= 2).
        shared_indexer: csa only: no indexer of its own; `prev_topk` is required (GLM-5-style).
        kv_cache_dtype: "fp8" (the V4 FP8 MODEL1 cache: the 448 nope dims of every row, window
            and compressed, are quantised in 7 tiles of 64 with ue8m0 scales, as V4 was trained)
            or "bf16"; prefill attends to the rows as this format stores them, so prefill and
            decode see the same values.
        eps: the RMS norms' epsilon. rope_base: base of the default rope tables (10000 for swa,
            160000 for csa/hca, V4's `rope_theta` / `compress_rope_theta`, without YaRN).
        max_positions: rows of the default rope tables.
        dtype: of the attention projections (bf16 in V4; the compressors and the indexer's head
            weights are fp32, as in V4). q and kv enter the attention ops in bf16.
    """

    def __init__(self, kind: str = "csa", dim: int = 4096, n_heads: int = 64, q_lora_rank: int = 1024,
                 o_groups: int = 8, o_lora_rank: int = 1024, window: int = 128, index_heads: int = 64,
                 index_topk: int = 512, ratio: Optional[int] = None, shared_indexer: bool = False,
                 kv_cache_dtype: str = "fp8", eps: float = 1e-6, rope_base: Optional[float] = None, max_positions: int = 65536,
                 device=None, dtype=None):
        super().__init__()
        if kind not in V4_KINDS:
            raise ValueError(f"kind must be one of {sorted(V4_KINDS)}, got {kind!r}")
        default_ratio, c = V4_KINDS[kind]
        ratio = default_ratio if ratio is None else ratio
        if kind != "swa" and ratio < 2:
            raise ValueError(f"ratio must be >= 2 for a {kind} layer, got {ratio}")
        if kind == "swa" and ratio:
            raise ValueError("a swa layer has no compressor: ratio must be None or 0")
        if shared_indexer and kind != "csa":
            raise ValueError(f"shared_indexer applies to csa layers only, got kind={kind!r}")
        if window <= 0 or n_heads <= 0 or o_groups <= 0 or (n_heads % o_groups):
            raise ValueError(f"window and n_heads must be positive and n_heads a multiple of o_groups, "
                             f"got window={window}, n_heads={n_heads}, o_groups={o_groups}")
        if kind == "csa" and not shared_indexer and (index_heads <= 0 or index_topk <= 0):
            raise ValueError(f"index_heads and index_topk must be positive, got {index_heads}, {index_topk}")
        if kv_cache_dtype not in ("fp8", "bf16"):
            raise ValueError(f"kv_cache_dtype must be 'fp8' or 'bf16', got {kv_cache_dtype!r}")
        self.kind, self.ratio, self.window, self.eps = kind, ratio, window, eps
        self.kv_cache_dtype = kv_cache_dtype
        self.n_heads, self.o_groups, self.o_lora_rank = n_heads, o_groups, o_lora_rank
        self.index_heads, self.index_topk, self.shared_indexer = index_heads, index_topk, shared_indexer
        self.softmax_scale = LATENT_DIM ** -0.5
        factory = dict(device=device, dtype=dtype)
        self.wq_a = nn.Linear(dim, q_lora_rank, bias=False, **factory)
        self.q_norm_weight = nn.Parameter(torch.ones(q_lora_rank, device=device, dtype=torch.float32))
        self.wq_b = nn.Linear(q_lora_rank, n_heads * LATENT_DIM, bias=False, **factory)
        self.wkv = nn.Linear(dim, LATENT_DIM, bias=False, **factory)
        self.kv_norm_weight = nn.Parameter(torch.ones(LATENT_DIM, device=device, dtype=torch.float32))
        self.wo_a = nn.Linear(n_heads * LATENT_DIM // o_groups, o_groups * o_lora_rank, bias=False, **factory)
        self.wo_b = nn.Linear(o_groups * o_lora_rank, dim, bias=False, **factory)
        self.attn_sink = nn.Parameter(torch.zeros(n_heads, device=device, dtype=torch.float32))
        self.compressor = _Compressor(dim, LATENT_DIM, ratio, c, device) if ratio else None
        self.indexer_compressor = self.wq_b_index = self.weights_proj = None
        if kind == "csa" and not shared_indexer:
            self.indexer_compressor = _Compressor(dim, INDEX_HEAD_DIM, ratio, c, device)
            self.wq_b_index = nn.Linear(q_lora_rank, index_heads * INDEX_HEAD_DIM, bias=False, **factory)
            # fp32: the head weights multiply FP8 products (as in V3.2's indexer).
            self.weights_proj = nn.Linear(dim, index_heads, bias=False, device=device, dtype=torch.float32)
        base = rope_base if rope_base is not None else (10000.0 if kind == "swa" else 160000.0)
        cos, sin = v4_rope_tables(max_positions, ROPE_DIM, base, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def set_rope(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Use the model's rope tables `[P, 32]` (YaRN-scaled for csa/hca layers in V4)."""
        if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != ROPE_DIM // 2:
            raise ValueError(f"rope tables must both be [P, {ROPE_DIM // 2}], got {tuple(cos.shape)}, {tuple(sin.shape)}")
        self.rope_cos, self.rope_sin = cos.float().contiguous(), sin.float().contiguous()

    # ---- projections shared by prefill and decode ----
    def project(self, x: torch.Tensor, positions: torch.Tensor):
        """`(qr, q [T, H, 512] bf16, kv [T, 512] bf16)` for tokens x `[T, dim]` at `positions [T]`:
        steps 1-2 of the module docstring (before any cache quantisation)."""
        self._check_positions(positions)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        qr = _rms(self.wq_a(x), self.q_norm_weight, self.eps)
        q = self.wq_b(qr).view(x.shape[0], self.n_heads, LATENT_DIM)
        q = _rope_last(_rms(q, None, self.eps), cos, sin).to(torch.bfloat16)
        kv = _rms(self.wkv(x), self.kv_norm_weight, self.eps)
        kv = _rope_last(kv, cos, sin).to(torch.bfloat16)
        return qr, q.contiguous(), kv.contiguous()

    def index_query(self, x: torch.Tensor, qr: torch.Tensor, positions: torch.Tensor):
        """The indexer's FP8 queries `[T, Hi, 128]` and head weights `[T, Hi]` fp32 (q's scale,
        `128**-0.5` and `Hi**-0.5` folded in)."""
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        q = self.wq_b_index(qr).view(x.shape[0], self.index_heads, INDEX_HEAD_DIM)
        q = _rope_last(q.float(), cos, sin).contiguous()
        q_fp8, q_scale = torch.ops.dsa.hadamard_fp8_quantize(q, INDEX_HEAD_DIM, True)   # [T, Hi, 1]
        w = self.weights_proj(x.float()) * (INDEX_HEAD_DIM ** -0.5 * self.index_heads ** -0.5)
        return q_fp8, (w * q_scale.squeeze(-1)).contiguous()

    def attend(self, q: torch.Tensor, kv_rows: torch.Tensor, indices: torch.Tensor, positions: torch.Tensor):
        """Sparse attention of q `[T, H, 512]` over rows `[S, 512]` at `indices [T, K]` (-1 skipped)
        with the sink, then the inverse rope at `positions` and the output projection.
        Returns `(out [T, dim], o [T, H, 512] bf16, lse [T, H])`."""
        o, lse = torch.ops.dsa.sparse_mla_fwd(q, kv_rows.reshape(-1, 1, LATENT_DIM).contiguous(),
                                              indices.reshape(q.shape[0], 1, -1).int().contiguous(),
                                              self.softmax_scale, LATENT_DIM, self.attn_sink.float(), None)
        return (*self._output(o, positions), lse)

    def _output(self, o: torch.Tensor, positions: torch.Tensor):
        o = _rope_last(o, self.rope_cos[positions], self.rope_sin[positions], inverse=True)
        T = o.shape[0]
        # wo_a is per group of heads: group g's heads [T, H/G * 512] through its own rank block.
        groups = o.view(T, self.o_groups, -1).to(self.wo_a.weight.dtype)
        w = self.wo_a.weight.view(self.o_groups, self.o_lora_rank, -1)
        y = torch.einsum("tgd,grd->tgr", groups, w)
        return self.wo_b(y.reshape(T, -1)), o

    # ---- prefill ----
    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None,
                cache: Optional[V4LayerCache] = None, seq_ids: Optional[Sequence[int]] = None,
                prev_topk: Optional[torch.Tensor] = None) -> V4Output:
        """Prefill of whole sequences (each from position 0): x `[T, dim]`, one sequence or a
        ragged batch given `cu_seqlens [B + 1]`. With `cache` and the batch's `seq_ids` (empty
        sequences of it), the window rows, entries, indexer keys and compressor states are
        stored for `decode_step`. `prev_topk` `[T, K]`: a shared-indexer layer's selection
        (the `topk` of the previous csa layer's output)."""
        if x.dim() != 2:
            raise ValueError(f"x must be 2-D [T, dim], got {tuple(x.shape)}")
        self._check_prev_topk_use(prev_topk)
        x = x.to(self.wq_a.weight.dtype)       # the layer's dtype (inputs of another float dtype are cast)
        T = x.shape[0]
        cu = (torch.tensor([0, T], device=x.device) if cu_seqlens is None
              else cu_seqlens.to(device=x.device, dtype=torch.long))
        if cu.dim() != 1 or cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != T or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"cu_seqlens must be [B + 1] non-decreasing from 0 to T = {T}, got {cu.tolist()}")
        lens = cu[1:] - cu[:-1]
        starts = torch.repeat_interleave(cu[:-1], lens)
        positions = torch.arange(T, device=x.device) - starts
        qr, q, kv = self.project(x, positions)
        if cache is not None:
            self._check_cache(cache)
        fmt = self.kv_cache_dtype
        kv_rows = _as_cached(kv, fmt)
        # Window: rows g - window + 1 .. g of the token's own sequence.
        g = torch.arange(T, device=x.device)
        win = g[:, None] - (self.window - 1) + torch.arange(self.window, device=x.device)[None, :]
        window = torch.where(win >= starts[:, None], win, -1)
        rows, compressed, topk = kv_rows, None, None
        if self.ratio:
            cu32 = cu.int()
            comp = self.compressor
            kv_c, score_c = comp.project(x)
            entries = v4_compress(kv_c, score_c, comp.ape, comp.norm_weight, self.eps,
                                  self.rope_cos, self.rope_sin, cu32)
            entry_rows = _as_cached(entries, fmt)
            n_entries = lens // self.ratio
            e_start = torch.repeat_interleave(torch.cumsum(n_entries, 0) - n_entries, lens)   # [T]
            visible = (positions + 1) // self.ratio                                           # [T]
            if self.kind == "hca":
                width = max(int(n_entries.max()), 1)
                j = torch.arange(width, device=x.device)[None, :]
                compressed = torch.where(j < visible[:, None], e_start[:, None] + j, -1)
            else:
                if prev_topk is None:
                    if self.shared_indexer:
                        raise ValueError("a shared_indexer layer needs prev_topk (the previous csa layer's topk)")
                    topk, index_keys = self._index_prefill(x, qr, positions, cu32, e_start, visible, entries.shape[0])
                else:
                    topk, index_keys = self._check_topk(prev_topk, T, visible), None
                compressed = torch.where(topk >= 0, e_start[:, None] + topk, -1)
            rows = torch.cat((kv_rows, entry_rows))
            indices = torch.cat((window, torch.where(compressed >= 0, compressed + T, -1)), dim=1)
        else:
            indices = window
        out, o, lse = self.attend(q, rows, indices, positions)
        if cache is not None:
            self._store_prefill(cache, seq_ids, x, lens, cu, kv, entries if self.ratio else None,
                                index_keys if self.kind == "csa" and self.indexer_compressor is not None else None)
        return V4Output(out, o, lse, window.int(), None if compressed is None else compressed.int(),
                        None if topk is None else topk.int())

    def _index_prefill(self, x, qr, positions, cu32, e_start, visible, num_entries):
        """CSA prefill selection: `(topk [T, K] entry positions within the sequence, rotated keys
        [E, 128] bf16)`."""
        T = x.shape[0]
        comp = self.indexer_compressor
        kv_i, score_i = comp.project(x)
        keys = v4_compress(kv_i, score_i, comp.ape, comp.norm_weight, self.eps, self.rope_cos,
                           self.rope_sin, cu32)
        keys = hadamard_transform(keys, INDEX_HEAD_DIM ** -0.5)
        if num_entries == 0:
            return torch.full((T, 1), -1, dtype=torch.int32, device=x.device), keys
        q_fp8, w = self.index_query(x, qr, positions)
        k_fp8, k_scale = torch.ops.dsa.fp8_quantize(keys, INDEX_HEAD_DIM, True)
        ks = e_start.int()
        ke = (e_start + visible).int()
        cols = torch.ops.dsa.indexer_topk(q_fp8, k_fp8, k_scale.reshape(-1), w, ks, ke,
                                          min(self.index_topk, num_entries))
        return torch.where(cols >= 0, cols - ks[:, None], -1).int(), keys

    def _check_prev_topk_use(self, prev_topk) -> None:
        if prev_topk is not None and not self.shared_indexer:
            raise ValueError(f"prev_topk is for shared_indexer csa layers; this {self.kind} layer "
                             f"{'runs its own indexer' if self.kind == 'csa' else 'has no indexer top-k'}")

    @staticmethod
    def _check_topk(topk: torch.Tensor, rows: int, visible: torch.Tensor) -> torch.Tensor:
        if topk.dim() != 2 or topk.shape[0] != rows or topk.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"prev_topk must be int32 [{rows}, K] (the previous csa layer's topk), "
                             f"got {topk.dtype} {tuple(topk.shape)}")
        topk = topk.long()
        # Positions a query may not see (a mismatched batch) are dropped, not attended.
        return torch.where((topk >= 0) & (topk < visible[:, None]), topk, -1)

    def _store_prefill(self, cache: V4LayerCache, seq_ids, x, lens, cu, kv, entries, index_keys):
        lens_l = lens.tolist()
        if seq_ids is None or len(seq_ids) != len(lens_l):
            raise ValueError(f"seq_ids must name the {len(lens_l)} sequence(s) being stored in the cache")
        if any(cache.seq_len(s) for s in seq_ids):
            raise ValueError("prefill stores whole sequences: the cache's sequences must be empty")
        self._check_cache(cache)
        T = x.shape[0]
        pos = torch.arange(T, device=x.device) - torch.repeat_interleave(cu[:-1], lens)
        ends = torch.repeat_interleave(lens, lens)
        keep = pos >= ends - self.window                      # the last `window` tokens of each sequence
        seq_of = torch.repeat_interleave(torch.arange(len(lens_l), device=x.device), lens)
        table = cache.window_table(seq_ids)[seq_of]                           # [T, blocks]
        slots = cache.window_slots(seq_ids, pos[:, None], table)[:, 0]
        slots = torch.where(keep, slots, -1)
        torch.ops.dsa.mla_kv_cache_write(kv, slots, cache.kv_cache)
        if self.ratio:
            entry_slots = cache.reserve_entries(seq_ids, [n // self.ratio for n in lens_l])
            torch.ops.dsa.mla_kv_cache_write(entries, entry_slots, cache.compressed_cache)
            if index_keys is not None:
                torch.ops.dsa.indexer_k_cache_write(index_keys.contiguous(), entry_slots, cache.index_k_cache, True)
            for comp, (ks, ss) in self._compressors(cache):
                state = [_StateRows(ks, cache.state_rows(seq_ids)), _StateRows(ss, cache.state_rows(seq_ids))]
                kv_c, score_c = comp.project(x)
                v4_compress_prefill_state(kv_c, score_c, comp.ape, state[0].tensor, state[1].tensor, cu.int())
                state[0].commit(), state[1].commit()
        cache.advance(seq_ids, lens_l)

    def _compressors(self, cache: V4LayerCache):
        pairs = []
        if self.compressor is not None:
            pairs.append((self.compressor, (cache.kv_state, cache.score_state)))
        if self.indexer_compressor is not None:
            pairs.append((self.indexer_compressor, (cache.index_kv_state, cache.index_score_state)))
        return pairs

    def _check_cache(self, cache: V4LayerCache) -> None:
        if cache.kv_cache_dtype != self.kv_cache_dtype:
            raise ValueError(f"cache holds {cache.kv_cache_dtype} rows but this layer was built with "
                             f"kv_cache_dtype={self.kv_cache_dtype!r}")
        if (cache.kind, cache.window, cache.ratio) != (self.kind, self.window, self.ratio) or \
                ((cache.index_k_cache is None) != (self.indexer_compressor is None)):
            raise ValueError(f"cache was made for a {cache.kind} layer (window {cache.window}, ratio "
                             f"{cache.ratio}), not this {self.kind} layer (window {self.window}, ratio {self.ratio})")

    # ---- decode ----
    def decode_step(self, x: torch.Tensor, cache: V4LayerCache, seq_ids: Sequence[int],
                    prev_topk: Optional[torch.Tensor] = None) -> V4Output:
        """One new token for each of B sequences (x `[B, dim]`, at position `cache.seq_len`):
        writes its window row (ring), steps the compressors (a new entry, and indexer key, at a
        window's last token), selects and attends over the two caches in one softmax.
        `prev_topk [B, K]`: a shared-indexer layer's selection (the previous csa layer's
        `topk`, entry positions within each sequence).

        The cache's bookkeeping (lengths, block allocation, which sequences complete a window
        this step) is host-side, so a step is not CUDA-graph capturable as a whole; the ops it
        calls are (a serving engine that keeps its own block tables calls them directly)."""
        B = len(seq_ids)
        if x.dim() != 2 or x.shape[0] != B:
            raise ValueError(f"x must be [B, dim] with B = len(seq_ids) = {B}, got {tuple(x.shape)}")
        if len(set(seq_ids)) != B:
            raise ValueError(f"seq_ids must be distinct, got {list(seq_ids)}")
        self._check_cache(cache)
        self._check_prev_topk_use(prev_topk)
        x = x.to(self.wq_a.weight.dtype)
        dev = x.device
        lens = [cache.seq_len(s) for s in seq_ids]
        positions = torch.tensor(lens, dtype=torch.long, device=dev)
        qr, q, kv = self.project(x, positions)
        torch.ops.dsa.mla_kv_cache_write(kv, cache.window_slots(seq_ids, positions[:, None])[:, 0], cache.kv_cache)
        win_pos = positions[:, None] - (self.window - 1) + torch.arange(self.window, device=dev)[None, :]
        window = cache.window_slots(seq_ids, win_pos)                     # [B, window], -1 before position 0
        compressed = topk = None
        if self.ratio:
            due = [(p + 1) % self.ratio == 0 for p in lens]
            new_slots = cache.reserve_entries(seq_ids, [int(d) for d in due])
            slot_map = torch.full((B,), -1, dtype=torch.int64, device=dev)
            if any(due):
                slot_map[torch.tensor(due, device=dev)] = new_slots
            for comp, (ks, ss) in self._compressors(cache):
                rows = cache.state_rows(seq_ids)
                kst, sst = _StateRows(ks, rows), _StateRows(ss, rows)
                kv_c, score_c = comp.project(x)
                entry = v4_compress_step(kv_c, score_c, comp.ape, comp.norm_weight, self.eps,
                                         self.rope_cos, self.rope_sin, positions.int(), kst.tensor, sst.tensor)
                kst.commit(), sst.commit()
                if comp is self.compressor:
                    torch.ops.dsa.mla_kv_cache_write(entry, slot_map, cache.compressed_cache)
                else:
                    key = hadamard_transform(entry, INDEX_HEAD_DIM ** -0.5).contiguous()
                    torch.ops.dsa.indexer_k_cache_write(key, slot_map, cache.index_k_cache, True)
            n_vis = [(p + 1) // self.ratio for p in lens]
            table = cache.entry_block_table(seq_ids)
            if self.kind == "hca":
                width = max(max(n_vis), 1)
                j = torch.arange(width, device=dev)[None, :].expand(B, width)
                pos_sel = torch.where(j < torch.tensor(n_vis, device=dev)[:, None], j, -1).int()
            elif prev_topk is not None:
                pos_sel = self._check_topk(prev_topk, B, torch.tensor(n_vis, device=dev)).int()
            elif self.shared_indexer:
                raise ValueError("a shared_indexer layer needs prev_topk (the previous csa layer's topk)")
            else:
                pos_sel = self._index_decode(x, qr, positions, cache, table, n_vis)
            topk = pos_sel if self.kind == "csa" else None
            compressed = torch.ops.dsa.topk_slot_ids(pos_sel.contiguous(), table, cache.block_size).long()
        cache.advance(seq_ids, [1] * B)
        o, lse = self._decode_attention(q, cache, window, compressed)
        out, o = self._output(o, positions)
        return V4Output(out, o, lse, window.int(), None if compressed is None else compressed.int(),
                        None if topk is None else topk.int())

    def _index_decode(self, x, qr, positions, cache, table, n_vis):
        B = x.shape[0]
        max_len = max(n_vis)
        if max_len == 0:
            return torch.full((B, 1), -1, dtype=torch.int32, device=x.device)
        q_fp8, w = self.index_query(x, qr, positions)
        ctx = torch.tensor(n_vis, dtype=torch.int32, device=x.device)
        logits = torch.ops.dsa.paged_indexer_logits(q_fp8.view(B, 1, self.index_heads, INDEX_HEAD_DIM),
                                                    cache.index_k_cache, w, ctx, table, max_len, True)
        return torch.ops.dsa.topk_indices(logits, min(self.index_topk, max_len), torch.zeros_like(ctx), ctx, False)

    def _decode_attention(self, q, cache: V4LayerCache, window, compressed):
        """One softmax over the window slots of `kv_cache` and the entry slots of
        `compressed_cache`: `sparse_mla_decode` with the second cache (SPEC 10.3)."""
        B = q.shape[0]
        extra = {} if compressed is None else dict(
            extra_kv_cache=cache.compressed_cache, extra_indices=compressed.int().view(B, 1, -1).contiguous())
        o, lse = torch.ops.dsa.sparse_mla_decode(q.view(B, 1, self.n_heads, LATENT_DIM), cache.kv_cache,
                                                 window.int().view(B, 1, -1).contiguous(), self.softmax_scale,
                                                 LATENT_DIM, self.attn_sink.float(), None, **extra)
        return o.view(B, self.n_heads, LATENT_DIM), lse.view(B, self.n_heads)

    def _check_positions(self, positions: torch.Tensor) -> None:
        if positions.numel() and int(positions.max()) >= self.rope_cos.shape[0]:
            raise ValueError(f"position {int(positions.max())} is past the rope tables "
                             f"({self.rope_cos.shape[0]} rows; raise max_positions or set_rope)")


def _as_cached(rows: torch.Tensor, fmt: str) -> torch.Tensor:
    """Rows `[N, 512]` bf16 as the cache stores them (the FP8 format's quantisation of the 448
    nope dims, or bf16), so prefill attends to the same values decode reads back."""
    if fmt == "bf16" or rows.shape[0] == 0:
        return rows.to(torch.bfloat16)
    from .reference.cache import new_mla_kv_cache
    bs = 64
    scratch = new_mla_kv_cache(-(-rows.shape[0] // bs), bs, True, rows.device, model="v4")
    slots = torch.arange(rows.shape[0], device=rows.device)
    torch.ops.dsa.mla_kv_cache_write(rows.to(torch.bfloat16).contiguous(), slots, scratch)
    return torch.ops.dsa.mla_kv_cache_gather(scratch, slots.int()).view(-1, LATENT_DIM)
