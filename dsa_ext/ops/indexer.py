"""The lightning-indexer logits ops (SPEC section 3):

    I[t, s] = k_scale[s] * sum_h weights[t, h] * relu(q[t, h, :] . k[s, :])

with q and k in FP8 (``torch.float8_e4m3fn``). The caller folds q's dequantisation scale and
``H**-0.5 * D**-0.5`` into ``weights``. CUDA kernels serve H in {32, 64} and D = 128; the CPU
kernels accept any H and D.

Range semantics (both ops): bounds are clamped, never trusted (``ks``/``ke`` to ``[0, S]``,
visible lengths to ``[0, max_context_len]``); a paged position whose block-table entry is out
of ``[0, num_blocks)`` is never read and scores ``-inf``. With ``clean_logits=True`` every
entry outside a row's range is ``-inf``; with ``clean_logits=False`` those entries are
unspecified (the CUDA kernels leave whole skipped tiles unwritten, as DeepGEMM does), so only
read in-range entries then.

MXFP4 keys (SPEC 10.5; byte layout in ``mxfp4_quantize`` and ``csrc/indexer/mxfp4.h``): the
same two ops score them, told apart by ``k_scale``'s dtype (uint8 / float8_e8m0fnu: MXFP4 keys
``k [S, D/2]`` uint8 / float4_e2m1fn_x2, ``k_scale [S, D/32]``) or the cache's last dim
(``D/2 + D/32``, 68 bytes a 128-dim key, beside the FP8 cache's ``D + 4``). Queries stay FP8:
the tensor cores of sm_89/sm_90 have no FP4 x FP8 MMA, e4m3 holds every E2M1 value exactly,
and FP8 queries keep the query error where V3.2 has it (half the bytes a decode step reads
are the keys'). The logits equal dequantise-then-score:
``I[t, s] = sum_h w[t, h] * relu(q[t, h] . dequant(k[s]))`` (no per-key scale; the group
scales sit inside the dot product, before the ReLU).

On CUDA (H in {32, 64}, D = 128) MXFP4 keys take the mma.sync kernel with the codes widened to
e4m3 in shared memory (the 2-CTA wgmma kernel is FP8-key only), on images with e4m3 MMA
(sm_89+); other images raise. A key whose scale byte is 0 reads as 2**-127 and 255 (e8m0 NaN)
gives unspecified logits for that key; neither is written by ``mxfp4_indexer_k_cache_write``.
The CPU kernels dequantise the keys exactly (bf16 where the CPU has bf16 GEMMs: every MXFP4
value is a bf16 value; subnormal products may be flushed there).

Accepted forms (``dsa_ext.ops._accept``): q / k as float8_e4m3fn or their uint8 bytes;
``k_scale`` as ``[S]`` or ``[S, 1]`` (what ``fp8_quantize`` returns); ks / ke / context_lens /
block_table as int32 or int64 (converted, clamped to the int32 range); a float8_e4m3fn cache
viewed as uint8. Non-contiguous q, k, k_scale, weights, ks, ke are copied to contiguous ones
(block_table keeps its row stride); the cache must be contiguous.
"""
from __future__ import annotations

import torch

from ._accept import byte_view, dense, fp8_view, int32_index, scale_vector

__all__ = ["indexer_logits", "paged_indexer_logits", "mxfp4_quantize",
           "mxfp4_indexer_k_cache_write", "v4_indexer_ranges", "v4_indexer_context_lens"]

_MXFP4_SCALE_DTYPES = (torch.uint8, getattr(torch, "float8_e8m0fnu", torch.uint8))
_FP4_X2 = getattr(torch, "float4_e2m1fn_x2", None)


def _mxfp4_bytes(t: torch.Tensor) -> torch.Tensor:
    """float4_e2m1fn_x2 / float8_e8m0fnu tensors viewed as their uint8 bytes; then dense."""
    if t.dtype != torch.uint8 and (t.dtype == _FP4_X2 or t.dtype in _MXFP4_SCALE_DTYPES):
        t = t.view(torch.uint8)
    return dense(t)


def indexer_logits(q: torch.Tensor, k: torch.Tensor, k_scale: torch.Tensor,
                   weights: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor,
                   clean_logits: bool = True) -> torch.Tensor:
    """Indexer logits of a ragged prefill batch (DeepGEMM ``fp8_mqa_logits`` contract).

    Args:
        q: ``[T, H, D]`` float8_e4m3fn queries.
        k: ``[S, D]`` float8_e4m3fn keys (one head, shared by all query heads).
        k_scale: ``[S]`` fp32 dequantisation scale of each key (must be >= 0 for the scale to
            commute with the ReLU, as every FP8 quantiser produces).
        weights: ``[T, H]`` fp32 per-query, per-head weights.
        ks, ke: ``[T]`` int32; row t sees keys ``ks[t] <= s < ke[t]``.
        clean_logits: write ``-inf`` outside each row's range (else those entries are unspecified).

    MXFP4 keys: ``k`` ``[S, D/2]`` uint8 (or float4_e2m1fn_x2) and ``k_scale`` ``[S, D/32]``
    uint8 (or float8_e8m0fnu), as :func:`mxfp4_quantize` returns them; the logits are those of
    the dequantised keys (module doc).

    Returns:
        ``[T, S]`` fp32 logits.
    """
    if k_scale.dtype in _MXFP4_SCALE_DTYPES:
        return torch.ops.dsa.indexer_logits(fp8_view(q), _mxfp4_bytes(k), _mxfp4_bytes(k_scale),
                                            dense(weights), int32_index(ks), int32_index(ke),
                                            clean_logits)
    return torch.ops.dsa.indexer_logits(fp8_view(q), fp8_view(k), scale_vector(k_scale),
                                        dense(weights), int32_index(ks), int32_index(ke),
                                        clean_logits)


def paged_indexer_logits(q: torch.Tensor, kv_cache: torch.Tensor, weights: torch.Tensor,
                         context_lens: torch.Tensor, block_table: torch.Tensor,
                         max_context_len: int, clean_logits: bool = True) -> torch.Tensor:
    """Indexer logits of decode queries over the paged indexer K cache
    (DeepGEMM ``fp8_paged_mqa_logits`` contract).

    Args:
        q: ``[B, N, H, D]`` float8_e4m3fn (N = 1 + draft tokens).
        kv_cache: ``uint8 [num_blocks, block_size, 1, D + 4]`` in the DeepGEMM / vLLM layout
            (per block: ``block_size * D`` FP8 values, then ``block_size`` fp32 scales), or the
            MXFP4 cache ``uint8 [num_blocks, block_size, 1, D/2 + D/32]`` that
            :func:`mxfp4_indexer_k_cache_write` fills (told apart by the last dim).
        weights: ``[B * N, H]`` fp32.
        context_lens: ``[B]`` int32 cached tokens including the N new ones (query j of sequence
            b sees positions ``< context_lens[b] - N + 1 + j``), or ``[B, N]`` int32 giving each
            query's visible length directly.
        block_table: ``[B, max_blocks]`` int32 physical block of each logical block (rows must
            have unit stride; a row stride is allowed).
        max_context_len: columns of the output.
        clean_logits: write ``-inf`` outside each query's visible range.

    Returns:
        ``[B * N, max_context_len]`` fp32 logits.
    """
    return torch.ops.dsa.paged_indexer_logits(fp8_view(q), byte_view(kv_cache), dense(weights),
                                              int32_index(context_lens),
                                              int32_index(block_table, keep_strides=True),
                                              max_context_len, clean_logits)


def mxfp4_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4-quantise ``x [..., D]`` (bf16 / fp32, D a multiple of 32) for the V4 indexer.

    Byte layout (DeepSeek-V4 ``fp4_act_quant`` with ue8m0 scales; SGLang's FP4 indexer cache):

    * groups of 32 consecutive values of the last dim; per group ``amax`` = max |x| over its
      non-NaN values; scale ``s = 2**ceil(log2(amax / 6))`` (fp32 ``amax / 6``, exponent
      rounded up when its mantissa is non-zero), clamped to ``[2**-126, 2**127]`` (the floor is
      DeepSeek-V4's ``amax.clamp_min(6 * 2**-126)``; an all-zero group gets ``2**-126``, an
      infinite one ``2**127``); stored as the ue8m0 byte ``log2(s) + 127`` in ``[1, 254]``;
    * each value: ``x / s`` (exact, a power of two) rounded to nearest onto the E2M1 grid
      ``{0, 0.5, 1, 1.5, 2, 3, 4, 6}``, ties to the even code (0.25 -> 0, 0.75 -> 1, 1.25 -> 1,
      1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4), saturating at 6 (inf -> 6); code = 3-bit
      magnitude index, sign in bit 3; a result of magnitude 0 is stored as +0 (``0x0``; so
      -0.0 and tiny negatives give ``0x0``); NaN is stored as ``0x0`` (E2M1 has no NaN);
    * two codes a byte: value ``2i`` in the low nibble, ``2i + 1`` in the high nibble
      (``torch.float4_e2m1fn_x2`` order). Dequantised value ``e2m1(code) * 2**(byte - 127)``.

    Returns ``(packed uint8 [..., D/2], scale uint8 [..., D/32])``; ``packed.view(
    torch.float4_e2m1fn_x2)`` and ``scale.view(torch.float8_e8m0fnu)`` are the typed views.

    Example (V4 indexer keys, dense prefill)::

        # k_rot [S, 128]: compressed entries (v4_compress), Hadamard-rotated, bf16
        k_fp4, k_sc = dsa_ext.mxfp4_quantize(k_rot)
        logits = dsa_ext.ops.indexer.indexer_logits(q_fp8, k_fp4, k_sc, w, ks, ke)
    """
    return torch.ops.dsa.mxfp4_quantize(dense(x))


def mxfp4_indexer_k_cache_write(k: torch.Tensor, slot_mapping: torch.Tensor,
                                kv_cache: torch.Tensor) -> None:
    """Quantise ``k [N, D]`` (bf16 / fp32; :func:`mxfp4_quantize`'s bytes) into the MXFP4
    indexer cache ``uint8 [num_blocks, block_size, 1, D/2 + D/32]`` in place, token i at slot
    ``slot_mapping[i]`` (int32 / int64, ``blk * block_size + off``; negative: skipped).

    Cache layout (the FP8 indexer cache's region form, SGLang's V4 FP4 cache): per block first
    ``block_size * D/2`` packed bytes (token-major), then ``block_size * D/32`` scale bytes
    (token-major). Value bytes of (blk, off) at ``blk*bs*(D/2 + D/32) + off*D/2``, scale bytes
    at ``blk*bs*(D/2 + D/32) + bs*D/2 + off*D/32``. As ``indexer_k_cache_write``: a slot past
    the cache or written twice in one call raises ``ValueError`` on the CPU; on CUDA the first
    is skipped and the second leaves that record unspecified. CUDA-graph safe.

    Example (V4 decode: new compressed entries, then one step's logits)::

        cache = torch.zeros(num_blocks, 64, 1, 68, dtype=torch.uint8, device="cuda")
        mxfp4_indexer_k_cache_write(k_rot_new, slots, cache)
        lens = v4_indexer_context_lens(positions)            # [B, N]: (t + 1) // 4
        logits = paged_indexer_logits(q_fp8, cache, w, lens, block_table, max_entries)
    """
    torch.ops.dsa.mxfp4_indexer_k_cache_write(dense(k), dense(slot_mapping), byte_view(kv_cache))


def v4_indexer_context_lens(positions: torch.Tensor, ratio: int = 4) -> torch.Tensor:
    """The V4 causal rule (SPEC 10.5) for ``paged_indexer_logits``: a query at absolute
    position ``t`` of its sequence sees the compressed entries ``j < (t + 1) // ratio``.
    ``positions [B, N]`` (int) -> int32 ``[B, N]`` per-query visible lengths (pass as
    ``context_lens``). Device-side, no host synchronisation."""
    if ratio <= 0:
        raise ValueError(f"ratio must be positive, got {ratio}")
    if positions.dim() != 2:
        raise ValueError(f"positions must be [B, N], got shape {tuple(positions.shape)}")
    return torch.div(positions.to(torch.int64) + 1, ratio, rounding_mode="floor").clamp(
        0, 2 ** 31 - 1).to(torch.int32)


def v4_indexer_ranges(positions: torch.Tensor, entry_start: torch.Tensor,
                      ratio: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """The V4 causal rule (SPEC 10.5) for ``indexer_logits`` / ``indexer_topk`` over the
    compressed entries of a ragged batch, concatenated: query token i at absolute position
    ``positions[i]`` of its sequence, whose entries start at row ``entry_start[i]`` of ``k``,
    sees rows ``[entry_start[i], entry_start[i] + (positions[i] + 1) // ratio)``.
    Returns ``(ks, ke)`` int32 ``[T]``; top-k over that range gives top-min(k, visible).

    Example (prefill of one sequence of T tokens, its T // 4 entries in ``k``)::

        pos = torch.arange(T); start = torch.zeros(T, dtype=torch.int32)
        ks, ke = v4_indexer_ranges(pos, start)
        top = dsa_ext.indexer_topk(q_fp8, k_fp8, k_scale, w, ks, ke, topk=512)
    """
    if ratio <= 0:
        raise ValueError(f"ratio must be positive, got {ratio}")
    if positions.dim() != 1 or entry_start.shape != positions.shape:
        raise ValueError(f"positions and entry_start must be [T] of one shape, got "
                         f"{tuple(positions.shape)} and {tuple(entry_start.shape)}")
    visible = torch.div(positions.to(torch.int64) + 1, ratio, rounding_mode="floor").clamp_min(0)
    ks = entry_start.to(torch.int64)
    return (ks.clamp(-2 ** 31, 2 ** 31 - 1).to(torch.int32),
            (ks + visible).clamp(-2 ** 31, 2 ** 31 - 1).to(torch.int32))


@torch.library.register_fake("dsa::mxfp4_quantize")
def _mxfp4_quantize_fake(x):
    torch._check(x.dim() >= 1, lambda: "x must have at least 1 dimension [..., D]")
    d = x.shape[-1]
    torch._check(d % 32 == 0, lambda: f"x.size(-1) must be a multiple of 32, got {d}")
    return (x.new_empty((*x.shape[:-1], d // 2), dtype=torch.uint8),
            x.new_empty((*x.shape[:-1], d // 32), dtype=torch.uint8))


@torch.library.register_fake("dsa::mxfp4_indexer_k_cache_write")
def _mxfp4_indexer_k_cache_write_fake(k, slot_mapping, kv_cache):
    return None


@torch.library.register_fake("dsa::indexer_logits")
def _indexer_logits_fake(q, k, k_scale, weights, ks, ke, clean_logits=True):
    torch._check(q.dim() == 3, lambda: f"q must be 3-D [T, H, D], got {tuple(q.shape)}")
    torch._check(k.dim() == 2, lambda: f"k must be 2-D [S, D], got {tuple(k.shape)}")
    return q.new_empty((q.shape[0], k.shape[0]), dtype=torch.float32)


@torch.library.register_fake("dsa::paged_indexer_logits")
def _paged_indexer_logits_fake(q, kv_cache, weights, context_lens, block_table, max_context_len,
                               clean_logits=True):
    torch._check(q.dim() == 4, lambda: f"q must be 4-D [B, N, H, D], got {tuple(q.shape)}")
    return q.new_empty((q.shape[0] * q.shape[1], max_context_len), dtype=torch.float32)
