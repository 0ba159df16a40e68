"""Reference (oracle) for the cache op family: FP8 quantisation and the three cache layouts of
SPEC section 2, in plain PyTorch, byte-exact with the CPU and CUDA kernels.

Layouts (contiguous, except the V4 FP8 cache's page pitch):

* Indexer K cache (DeepGEMM / vLLM): ``uint8 [num_blocks, block_size, 1, D + 4]``. Inside a
  block, the ``block_size * D`` FP8 values come first (token-major), then ``block_size`` fp32
  scales. Value (blk, off, d) is at byte ``blk*block_size*(D+4) + off*D + d``; the scale of
  (blk, off) at ``blk*block_size*(D+4) + block_size*D + 4*off``.
* MLA KV cache, FP8 (FlashMLA V3.2): ``uint8 [num_blocks, block_size, 1, 656]``, one 656-byte
  record per slot: [0, 512) the 512 "nope" values in FP8 (4 tiles of 128), [512, 528) the 4
  fp32 tile scales, [528, 656) the 64 rope values in bf16, unquantised.
* MLA KV cache, bf16: ``bfloat16 [num_blocks, block_size, 1, 576]``.
* DeepSeek-V4 MLA cache, FP8 (FlashMLA MODEL1, SPEC 10.2): ``uint8 [num_blocks, block_size, 1,
  584]`` over pages of pitch ``stride(0)``; a page holds ``block_size`` rows of 576 bytes (448
  e4m3 values in 7 tiles of 64, then 64 bf16 rope values) and then ``block_size`` groups of 8
  bytes (7 ue8m0 tile scales, a zero pad byte). bf16: ``[num_blocks, block_size, 1, 512]``.

Slot id of (blk, off) is ``blk*block_size + off``.

Quantisation rules (fp32 arithmetic throughout, as csrc/common/quant_rules.h):

* indexer K cache and ``fp8_quantize``: per group ``s = max(amax, 1e-4) / 448``, and with
  ``ue8m0`` ``s = exp2(ceil(log2(s)))``;
* MLA FP8 cache, per 128-value tile: ``s = exp2(ceil(log2(max(amax / 448, 1e-4))))``;
* stored value ``clamp(x / s, -448, 448)`` rounded to nearest-even e4m3; dequantised
  ``fp8 * s``.

Non-finite inputs: ``amax`` ignores NaN (as C's ``fmaxf``); a NaN quotient is stored as the
e4m3 NaN ``0x7F``; an infinite input makes the group's scale ``inf`` (so the group dequantises
to NaN / 0 rather than to plausible numbers).

Slots and block ids are not trusted: a negative slot is skipped by the writers; a slot past the
cache makes the writers raise ``ValueError`` here and in the CPU op (the CUDA op skips it
instead of synchronising); the readers return zeros for any slot or block id outside the cache.
A non-negative slot repeated in one write raises ValueError (the CPU op's rule; CUDA leaves
that record unspecified).
"""
from __future__ import annotations

import torch

__all__ = [
    "FP8_MAX", "MLA_NOPE_DIM", "MLA_ROPE_DIM", "MLA_DIM", "MLA_TILE", "MLA_FP8_RECORD_BYTES",
    "indexer_scale", "mla_tile_scale", "quantize_to_fp8",
    "fp8_quantize", "fp8_dequantize",
    "indexer_k_cache_write", "indexer_k_cache_gather", "indexer_cache_tokens",
    "quantize_mla_records", "mla_kv_cache_write", "mla_kv_cache_gather", "dequantize_mla_cache",
    "new_indexer_k_cache", "new_mla_kv_cache", "quantize_v4_tokens", "mla_cache_kind",
    "V4_NOPE_DIM", "V4_DIM", "V4_TILE", "V4_TOKEN_BYTES",
]

FP8_MAX = 448.0
MLA_NOPE_DIM = 512
MLA_ROPE_DIM = 64
MLA_DIM = MLA_NOPE_DIM + MLA_ROPE_DIM              # 576
MLA_TILE = 128
MLA_NUM_TILES = MLA_NOPE_DIM // MLA_TILE          # 4
MLA_FP8_RECORD_BYTES = MLA_NOPE_DIM + 4 * MLA_NUM_TILES + 2 * MLA_ROPE_DIM  # 656
# DeepSeek-V4 (FlashMLA MODEL1, SPEC 10.2): 448 nope + 64 rope, 7 tiles of 64
V4_NOPE_DIM, V4_DIM, V4_TILE = 448, 512, 64
V4_NUM_TILES = V4_NOPE_DIM // V4_TILE                                     # 7
V4_ROW_BYTES, V4_SCALE_BYTES = V4_NOPE_DIM + 2 * MLA_ROPE_DIM, 8           # 576, 8
V4_TOKEN_BYTES = V4_ROW_BYTES + V4_SCALE_BYTES                            # 584


# ---------------------------------------------------------------------------------------------
# Scale rules and the element quantiser
# ---------------------------------------------------------------------------------------------
def _pow2_ceil(s: torch.Tensor) -> torch.Tensor:
    """exp2(ceil(log2(s))) in fp32 ("ue8m0": the scale becomes a pure power of two)."""
    return torch.exp2(torch.ceil(torch.log2(s)))


def _abs_max(x32: torch.Tensor) -> torch.Tensor:
    """max |x| over the last dim, ignoring NaN (as a C loop of fmaxf does); 0 for an all-NaN group."""
    a = x32.abs()
    return torch.where(torch.isnan(a), torch.zeros_like(a), a).amax(dim=-1)


def indexer_scale(amax: torch.Tensor, ue8m0: bool = True) -> torch.Tensor:
    """Indexer K / fp8_quantize scale of a group with abs-max ``amax`` (fp32):
    ``s = max(amax, 1e-4) / 448``, rounded up to a power of two when ``ue8m0``."""
    s = torch.clamp_min(amax.float(), 1e-4) / FP8_MAX
    return _pow2_ceil(s) if ue8m0 else s


def mla_tile_scale(amax: torch.Tensor) -> torch.Tensor:
    """MLA FP8 cache scale of a 128-value tile (FlashMLA's quantiser):
    ``s = exp2(ceil(log2(max(amax / 448, 1e-4))))`` in fp32."""
    return _pow2_ceil(torch.clamp_min(amax.float() / FP8_MAX, 1e-4))


def quantize_to_fp8(x32: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``clamp(x / s, -448, 448)`` in fp32 rounded to nearest-even e4m3 (``s`` broadcasts against
    ``x32``). A NaN quotient becomes the e4m3 NaN 0x7F (positive sign, as the kernels write)."""
    v = torch.clamp(x32.float() / s, -FP8_MAX, FP8_MAX)
    v = torch.where(torch.isnan(v), torch.full_like(v, float("nan")), v)
    return v.to(torch.float8_e4m3fn)


# ---------------------------------------------------------------------------------------------
# fp8_quantize
# ---------------------------------------------------------------------------------------------
def fp8_quantize(x: torch.Tensor, block_size: int = 128, ue8m0: bool = True):
    """Quantise ``x [..., D]`` (bf16 / fp32) to FP8 in groups of ``block_size`` consecutive values
    of the last dim (DeepSeek ``act_quant``). Returns ``(x_fp8 [..., D] float8_e4m3fn,
    scale [..., D // block_size] fp32)`` with ``x ~= x_fp8 * scale`` per group."""
    if block_size <= 0 or x.shape[-1] % block_size != 0:
        raise ValueError(f"block_size must divide x.size(-1) = {x.shape[-1]}, got {block_size}")
    lead, D = x.shape[:-1], x.shape[-1]
    g = x.float().reshape(*lead, D // block_size, block_size)
    s = indexer_scale(_abs_max(g), ue8m0)
    q = quantize_to_fp8(g, s.unsqueeze(-1))
    return q.reshape(x.shape), s


def fp8_dequantize(x_fp8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`fp8_quantize`: ``x_fp8 [..., D]`` times its group scale
    ``scale [..., G]`` (groups of ``D // G`` values), in fp32."""
    D, G = x_fp8.shape[-1], scale.shape[-1]
    g = x_fp8.float().reshape(*x_fp8.shape[:-1], G, D // G) * scale.float().unsqueeze(-1)
    return g.reshape(x_fp8.shape)


# ---------------------------------------------------------------------------------------------
# Indexer K cache
# ---------------------------------------------------------------------------------------------
def new_indexer_k_cache(num_blocks: int, block_size: int, head_dim: int = 128,
                        device="cpu") -> torch.Tensor:
    """An empty (zero) indexer K cache ``uint8 [num_blocks, block_size, 1, head_dim + 4]``."""
    return torch.zeros(num_blocks, block_size, 1, head_dim + 4, dtype=torch.uint8, device=device)


def _indexer_geometry(kv_cache: torch.Tensor):
    nb, bs, _, d4 = kv_cache.shape
    return nb, bs, d4 - 4


def _check_write_slots(slot_mapping: torch.Tensor, num_slots: int):
    """A slot past the cache, or a non-negative slot given twice, raises ValueError (the CPU
    kernels' rule; see dsa_ext.ops.cache)."""
    if slot_mapping.numel() and int(slot_mapping.max()) >= num_slots:
        raise ValueError(f"slot_mapping holds slot {int(slot_mapping.max())}, past the cache's "
                         f"{num_slots} slots")
    used = slot_mapping[slot_mapping >= 0]
    values, counts = torch.unique(used, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"slot_mapping holds slot {int(values[counts > 1][0])} more than once")


def indexer_k_cache_write(k: torch.Tensor, slot_mapping: torch.Tensor, kv_cache: torch.Tensor,
                          ue8m0: bool = True) -> None:
    """Quantise each row of ``k [N, D]`` (one scale per token, ``fp8_quantize`` rule with
    ``block_size = D``) and write it, in place, into the indexer K cache at slot
    ``slot_mapping[i]``. Negative slots are skipped; a slot past the cache raises ValueError."""
    nb, bs, D = _indexer_geometry(kv_cache)
    slots = slot_mapping.long()
    _check_write_slots(slots, nb * bs)
    keep = slots >= 0
    slots, k = slots[keep], k[keep]
    q, s = fp8_quantize(k, block_size=D, ue8m0=ue8m0)     # [n, D], [n, 1]
    flat = kv_cache.view(-1)
    blk, off = slots // bs, slots % bs
    base = blk * (bs * (D + 4))
    val_idx = (base + off * D).unsqueeze(1) + torch.arange(D, device=flat.device)
    sc_idx = (base + bs * D + 4 * off).unsqueeze(1) + torch.arange(4, device=flat.device)
    flat[val_idx.reshape(-1)] = q.view(torch.uint8).reshape(-1)
    flat[sc_idx.reshape(-1)] = s.reshape(-1).contiguous().view(torch.uint8)


def indexer_cache_tokens(kv_cache: torch.Tensor):
    """Every slot of an indexer K cache, in slot order: ``(k_fp8 [nb*bs, D] float8_e4m3fn,
    k_scale [nb*bs] fp32)`` (copies). Dequantised keys are ``k_fp8.float() * k_scale[:, None]``."""
    nb, bs, D = _indexer_geometry(kv_cache)
    blocks = kv_cache.reshape(nb, bs * (D + 4))
    k_fp8 = blocks[:, : bs * D].contiguous().view(torch.float8_e4m3fn).reshape(nb * bs, D)
    k_scale = blocks[:, bs * D:].contiguous().view(torch.float32).reshape(nb * bs)
    return k_fp8, k_scale


def _valid_rows(table: torch.Tensor, rows: torch.Tensor, n: int):
    """Rows of ``table [n, ...]`` at ``rows`` (any int dtype), zeros where ``rows`` is outside
    [0, n)."""
    rows = rows.long()
    ok = (rows >= 0) & (rows < n)
    out = table[torch.where(ok, rows, torch.zeros_like(rows))] if n else \
        table.new_zeros((rows.numel(),) + tuple(table.shape[1:]))
    mask = ok.reshape((-1,) + (1,) * (out.dim() - 1))
    return torch.where(mask, out, torch.zeros_like(out))


def indexer_k_cache_gather(kv_cache: torch.Tensor, block_table: torch.Tensor,
                           seq_lens: torch.Tensor):
    """The cached keys of every sequence, concatenated: token i of sequence b lives at slot
    ``block_table[b, i // block_size] * block_size + i % block_size``. Returns
    ``(k_fp8 [sum(seq_lens), D] float8_e4m3fn, k_scale [sum(seq_lens)] fp32)``; a token whose
    block id is outside the cache reads as zero bytes (value 0, scale 0). ``seq_lens[b]`` must be
    in [0, block_table.size(1) * block_size] (ValueError otherwise)."""
    nb, bs, D = _indexer_geometry(kv_cache)
    k_fp8, k_scale = indexer_cache_tokens(kv_cache)
    lens = seq_lens.long().cpu()
    cap = block_table.shape[1] * bs
    if lens.numel() and (int(lens.min()) < 0 or int(lens.max()) > cap):
        raise ValueError(f"seq_lens must be in [0, block_table.size(1) * block_size = {cap}]")
    vals, scales = [], []
    for b, n in enumerate(lens.tolist()):
        pos = torch.arange(n, device=kv_cache.device)
        blk = block_table[b].long()[pos // bs]
        slot = torch.where((blk >= 0) & (blk < nb), blk * bs + pos % bs, torch.full_like(blk, -1))
        vals.append(_valid_rows(k_fp8.view(torch.uint8), slot, nb * bs))
        scales.append(_valid_rows(k_scale, slot, nb * bs))
    if not vals:
        return (torch.empty(0, D, dtype=torch.float8_e4m3fn, device=kv_cache.device),
                torch.empty(0, dtype=torch.float32, device=kv_cache.device))
    return torch.cat(vals).view(torch.float8_e4m3fn), torch.cat(scales)


# ---------------------------------------------------------------------------------------------
# MLA KV cache (FP8 656-byte records, or bf16)
# ---------------------------------------------------------------------------------------------
def new_mla_kv_cache(num_blocks: int, block_size: int, fp8: bool = True, device="cpu",
                     model: str = "v3.2"):
    """An empty (zero) MLA cache. V3.2: FP8 ``uint8 [nb, bs, 1, 656]`` or bf16
    ``[nb, bs, 1, 576]``. V4 (``model="v4"``): FP8 ``uint8 [nb, bs, 1, 584]`` viewed, as FlashMLA
    allocates it, over pages of ``ceil(bs * 584 / 576) * 576`` bytes (so ``stride(0)`` is the
    padded pitch), or bf16 ``[nb, bs, 1, 512]``."""
    if model == "v4":
        if not fp8:
            return torch.zeros(num_blocks, block_size, 1, V4_DIM, dtype=torch.bfloat16, device=device)
        pitch = -(-block_size * V4_TOKEN_BYTES // V4_ROW_BYTES) * V4_ROW_BYTES
        pages = torch.zeros(num_blocks, pitch, dtype=torch.uint8, device=device)
        return pages[:, :block_size * V4_TOKEN_BYTES].view(num_blocks, block_size, 1, V4_TOKEN_BYTES)
    if fp8:
        return torch.zeros(num_blocks, block_size, 1, MLA_FP8_RECORD_BYTES, dtype=torch.uint8,
                           device=device)
    return torch.zeros(num_blocks, block_size, 1, MLA_DIM, dtype=torch.bfloat16, device=device)


def quantize_mla_records(kv: torch.Tensor) -> torch.Tensor:
    """The FlashMLA FP8 records of ``kv [N, 576]`` (bf16 / fp32): ``uint8 [N, 656]`` (FP8 nope
    in 4 tiles of 128, 4 fp32 tile scales, 64 bf16 rope values)."""
    N = kv.shape[0]
    x = kv.float()
    tiles = x[:, :MLA_NOPE_DIM].reshape(N, MLA_NUM_TILES, MLA_TILE)
    s = mla_tile_scale(_abs_max(tiles))                        # [N, 4]
    q = quantize_to_fp8(tiles, s.unsqueeze(-1)).reshape(N, MLA_NOPE_DIM)
    rope = kv[:, MLA_NOPE_DIM:].to(torch.bfloat16).contiguous()
    return torch.cat([q.view(torch.uint8), s.contiguous().view(torch.uint8),
                      rope.view(torch.uint8)], dim=1)


def quantize_v4_tokens(kv: torch.Tensor):
    """FlashMLA MODEL1 bytes of ``kv [N, 512]`` (bf16 / fp32): ``(rows uint8 [N, 576], scales
    uint8 [N, 8])`` — a row is 448 e4m3 values (7 tiles of 64, each with the FlashMLA scale
    ``2**ceil(log2(max(amax / 448, 1e-4)))``) then the 64 rope values in bf16; the scales are the
    7 ue8m0 bytes (``torch.float8_e8m0fnu``: exponent + 127) and a zero pad byte."""
    N = kv.shape[0]
    tiles = kv.float()[:, :V4_NOPE_DIM].reshape(N, V4_NUM_TILES, V4_TILE)
    s = mla_tile_scale(_abs_max(tiles))                        # [N, 7], powers of two
    q = quantize_to_fp8(tiles, s.unsqueeze(-1)).reshape(N, V4_NOPE_DIM)
    rope = kv[:, V4_NOPE_DIM:].to(torch.bfloat16).contiguous()
    rows = torch.cat([q.view(torch.uint8), rope.view(torch.uint8)], dim=1)
    scales = torch.zeros(N, V4_SCALE_BYTES, dtype=torch.uint8, device=kv.device)
    scales[:, :V4_NUM_TILES] = s.to(torch.float8_e8m0fnu).view(torch.uint8)
    return rows, scales


def mla_cache_kind(kv_cache: torch.Tensor) -> str:
    """"v3.2-fp8", "v4-fp8", "v3.2-bf16" or "v4-bf16", by dtype and last dim."""
    kinds = {(torch.uint8, MLA_FP8_RECORD_BYTES): "v3.2-fp8", (torch.uint8, V4_TOKEN_BYTES): "v4-fp8",
             (torch.bfloat16, MLA_DIM): "v3.2-bf16", (torch.bfloat16, V4_DIM): "v4-bf16"}
    kind = kinds.get((kv_cache.dtype, kv_cache.shape[-1]))
    if kind is None:
        raise ValueError("kv_cache must be uint8 [nb, bs, 1, 656 or 584] (FP8) or bfloat16 "
                         f"[nb, bs, 1, 576 or 512], got {kv_cache.dtype} {tuple(kv_cache.shape)}")
    return kind


def _is_fp8_mla_cache(kv_cache: torch.Tensor) -> bool:
    return mla_cache_kind(kv_cache).endswith("fp8")


def _v4_pages(kv_cache: torch.Tensor):
    """The bytes of a V4 FP8 cache as (rows [nb, bs, 576], scales [nb, bs, 8]) views of its pages
    (pitch stride(0)); writes through them land in the cache."""
    nb, bs = kv_cache.shape[:2]
    pages = torch.as_strided(kv_cache, (nb, bs * V4_TOKEN_BYTES),
                             (kv_cache.stride(0) if nb > 1 else bs * V4_TOKEN_BYTES, 1))
    rows = pages[:, :bs * V4_ROW_BYTES].view(nb, bs, V4_ROW_BYTES)
    scales = pages[:, bs * V4_ROW_BYTES:].view(nb, bs, V4_SCALE_BYTES)
    return rows, scales


def mla_kv_cache_write(kv: torch.Tensor, slot_mapping: torch.Tensor,
                       kv_cache: torch.Tensor) -> None:
    """Write ``kv [N, 576]`` (V3.2 caches) or ``kv [N, 512]`` (V4 caches) into an MLA cache, in
    place, at ``slot_mapping[i]``: FP8 records / pages for a uint8 cache, a bf16 copy for a bf16
    cache. Negative slots are skipped; a slot past the cache raises ValueError."""
    kind = mla_cache_kind(kv_cache)
    nb, bs = kv_cache.shape[:2]
    num_slots = nb * bs
    slots = slot_mapping.long()
    _check_write_slots(slots, num_slots)
    keep = slots >= 0
    slots, kv = slots[keep], kv[keep]
    if kind == "v4-fp8":
        rows, scales = _v4_pages(kv_cache)
        r, s = quantize_v4_tokens(kv)
        rows[slots // bs, slots % bs] = r
        scales[slots // bs, slots % bs] = s
        return
    flat = kv_cache.view(num_slots, kv_cache.shape[-1])
    flat[slots] = quantize_mla_records(kv) if kind == "v3.2-fp8" else kv.to(torch.bfloat16)


def dequantize_mla_cache(kv_cache: torch.Tensor) -> torch.Tensor:
    """Every slot of an MLA cache, dequantised: ``[nb*bs, 576]`` (V3.2) or ``[nb*bs, 512]`` (V4)
    fp32 (nope = fp8 * tile scale, rope = the bf16 values)."""
    kind = mla_cache_kind(kv_cache)
    nb, bs = kv_cache.shape[:2]
    num_slots = nb * bs
    if kind.endswith("bf16"):
        return kv_cache.reshape(num_slots, kv_cache.shape[-1]).float()
    if kind == "v4-fp8":
        rows, scales = _v4_pages(kv_cache)
        rows, scales = rows.reshape(num_slots, V4_ROW_BYTES), scales.reshape(num_slots, V4_SCALE_BYTES)
        nope = rows[:, :V4_NOPE_DIM].contiguous().view(torch.float8_e4m3fn).float()
        s = scales[:, :V4_NUM_TILES].contiguous().view(torch.float8_e8m0fnu).float()
        rope = rows[:, V4_NOPE_DIM:].contiguous().view(torch.bfloat16).float()
        nope = nope.reshape(num_slots, V4_NUM_TILES, V4_TILE) * s.unsqueeze(-1)
        return torch.cat([nope.reshape(num_slots, V4_NOPE_DIM), rope], dim=1)
    rows = kv_cache.reshape(num_slots, kv_cache.shape[-1])
    nope = rows[:, :MLA_NOPE_DIM].contiguous().view(torch.float8_e4m3fn).float()
    s = rows[:, MLA_NOPE_DIM:MLA_NOPE_DIM + 16].contiguous().view(torch.float32)   # [n, 4]
    rope = rows[:, MLA_NOPE_DIM + 16:].contiguous().view(torch.bfloat16).float()
    nope = (nope.reshape(num_slots, MLA_NUM_TILES, MLA_TILE) * s.unsqueeze(-1))
    return torch.cat([nope.reshape(num_slots, MLA_NOPE_DIM), rope], dim=1)


def mla_kv_cache_gather(kv_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The dequantised rows at ``slots [M]`` (int32 / int64): ``[M, 1, 576]`` (V3.2) or
    ``[M, 1, 512]`` (V4) bf16 (the fp32
    product ``fp8 * scale`` rounded to bf16). A slot outside the cache (e.g. -1) gives zeros."""
    deq = dequantize_mla_cache(kv_cache)
    return _valid_rows(deq, slots.reshape(-1), deq.shape[0]).to(torch.bfloat16).unsqueeze(1)
