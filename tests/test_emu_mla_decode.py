"""The sparse_mla_decode kernels (csrc/mla_decode) run on the CPU emulator (csrc/emu): every
kernel the launcher can select (head blocks of 16, 32 and 64 on mma.sync, the opt-in wgmma
kernel for 64; FP8 656-byte and bf16 caches; unsplit, and split-KV with the combine kernel)
against dsa_ext.reference within the CUDA tolerance of test_mla_decode.py, with no hazard
reported.

The cache, indices, lengths and sink are registered as device memory exactly, so a read of an
invalid slot (-1, other negatives, num_slots, 2^31 - 1), of a cache with no blocks or of an
entry past topk_length is an out-of-bounds report, not a silent zero. Outputs start as NaN, so
an entry the kernels should write but do not fails the comparison. Shapes are tiny (one or a
few query rows, K <= 384): a decode CTA is 256 threads over 64-entry tiles, and the split plan
is decided by shapes alone (on the emulated 132-SM GPU a single row gets one split per 2 tiles,
so K = 256 gives 2 splits and K = 384 gives 3; K <= 192 none).
"""
import ctypes

import pytest
import torch

import emulator as E
from conftest import randn, rel_err
from dsa_ext import reference as ref
from test_mla_decode import D_QK, D_V, make_cache, make_indices, _extra_case

pytestmark = pytest.mark.emu
P = E.ptr
I64 = ctypes.c_int64
# test_mla_decode.py's CUDA tolerances (check(): out rel. error, lse abs. error).
OUT_TOL, LSE_TOL = 2e-2, 1e-2
KERNEL, COMBINE = "sparse_mla_decode_kernel", "sparse_mla_decode_combine_kernel"
# The kernel's CTA geometry (mla_decode_kernels.cuh, mla_decode_launch.h).
THREADS, WARPS, TILE = 256, 8, 64


@pytest.fixture(scope="module")
def lib():
    lib = E.load("mla_decode")
    lib.emu_mla_decode_plan.argtypes = [I64] * 4 + [ctypes.c_void_p]
    lib.emu_mla_decode_plan.restype = None
    lib.emu_sparse_mla_decode.argtypes = ([ctypes.c_void_p] * 5 + [ctypes.c_int] + [ctypes.c_void_p] * 4
                                          + [I64] * 5 + [ctypes.c_int, ctypes.c_float])
    lib.emu_mla_decode_plan2.argtypes = [I64] * 5 + [ctypes.c_void_p]
    lib.emu_mla_decode_plan2.restype = None
    V, C = ctypes.c_void_p, ctypes.c_int
    lib.emu_sparse_mla_decode2.argtypes = [V, C, C, V, I64, I64, I64, V, I64, V, C, V, I64, I64, I64, V, I64, V, C,
                                           V, V, V, V, V, I64, I64, I64, ctypes.c_float]
    yield lib
    E.set_env(lib, "DSA_MLA_DECODE_WGMMA", None)


def fmt_name(kind, d_qk):
    """The demangled cache-format template argument of the kernel (mla_decode_kernels.cuh Fmt)."""
    return f"dsa::mla_decode::Fmt<(dsa::cache::MlaCacheKind){kind},{d_qk}>"


def plan(lib, B, s_q, H, K):
    p = (ctypes.c_int32 * 2)()
    lib.emu_mla_decode_plan(B, s_q, H, K, p)
    return p[0], p[1]


def run_decode(lib, q, cache, idx, sm_scale, sink=None, topk_length=None, wgmma=False, kernel=None):
    """The emulated op: (out, lse, splits, reports). Every argument is registered whole and
    nothing else (the partials are registered only when the plan splits). `kernel` is
    DSA_MLA_DECODE_KERNEL; by default "mma" (the tests above exercise the kernels of
    mla_decode_kernels.cuh, which the overlap kernel replaced as the FP8 64/128-head default)."""
    B, s_q, H, _ = q.shape
    K = idx.shape[2]
    num_slots = cache.shape[0] * cache.shape[1]
    splits, _ = plan(lib, B, s_q, H, K)
    out = torch.full((B, s_q, H, D_V), float("nan"), dtype=torch.bfloat16)
    lse = torch.full((B, s_q, H), float("nan"))
    out_partial = lse_partial = None
    if splits > 1:
        out_partial = torch.full((splits, B * s_q, H, D_V), float("nan"))
        lse_partial = torch.full((splits, B * s_q, H), float("nan"))
    E.set_env(lib, "DSA_MLA_DECODE_WGMMA", "1" if wgmma else None)
    E.set_env(lib, "DSA_MLA_DECODE_KERNEL", kernel if kernel is not None else (None if wgmma else "mma"))
    try:
        reports, rc = E.run(
            lib.emu_sparse_mla_decode, P(q), P(cache), P(idx), P(sink), P(topk_length),
            int(topk_length is not None and topk_length.dim() == 2), P(out), P(lse), P(out_partial),
            P(lse_partial), B, s_q, H, K, num_slots, int(cache.dtype == torch.uint8), sm_scale,
            buffers=[q, cache, idx, sink, topk_length, out, lse, out_partial, lse_partial], lib=lib)
    finally:
        E.set_env(lib, "DSA_MLA_DECODE_WGMMA", None)
        E.set_env(lib, "DSA_MLA_DECODE_KERNEL", None)
    assert rc == 0
    return out, lse, splits, reports


def check(out, lse, q, cache, idx, sm_scale, sink=None, topk_length=None):
    """test_mla_decode.check's comparison, at its CUDA tolerances."""
    ro, rl = ref.sparse_mla_decode(q, cache, idx, sm_scale, D_V, sink, topk_length)
    empty = torch.isneginf(rl)
    assert not torch.isnan(lse).any() and not torch.isnan(out.float()).any(), "unwritten outputs"
    assert torch.equal(torch.isneginf(lse), empty), "empty rows must give lse = -inf exactly"
    assert torch.all(out[empty] == 0), "empty rows must give out = 0"
    if (~empty).any():
        assert rel_err(out[~empty], ro[~empty]) < OUT_TOL
        assert (lse[~empty] - rl[~empty]).abs().max().item() < LSE_TOL


def valid_entries(idx, cache, lengths=None):
    """How many (row, j) entries the op reads: j < topk_length and 0 <= slot < num_slots."""
    B, s_q, K = idx.shape
    num_slots = cache.shape[0] * cache.shape[1]
    keep = (idx >= 0) & (idx < num_slots)
    if lengths is not None:
        per_row = lengths if lengths.dim() == 2 else lengths[:, None].expand(B, s_q)
        keep &= torch.arange(K) < per_row[..., None]
    return int(keep.sum())


def launched(lib):
    """{kernel name: counters} of the launches since the last clear."""
    return {name: c for name, c in E.counters(lib).items() if c["launches"]}


# Head count -> (head block, kernel path). 12 and 24 leave masked rows in their block.
VARIANTS = {"hb16": (12, 16, False), "hb32": (24, 32, False), "hb64": (64, 64, False),
            "hb64-wgmma": (64, 64, True)}


@pytest.mark.parametrize("split", [False, True], ids=["unsplit", "split"])
@pytest.mark.parametrize("fp8", [True, False], ids=["fp8", "bf16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_kernel(lib, gen, variant, fp8, split):
    """One query row per kernel. Unsplit: K = 150 (3 tiles, the last ragged), no topk_length.
    Split: K = 384 in 3 splits of 2 tiles, topk_length 300 leaving the last split 1 tile of 44
    entries, partials merged by the combine kernel. Invalid slots of every kind; a sink."""
    H, hb, wgmma = VARIANTS[variant]
    K = 384 if split else 150
    cache = make_cache(3, 64, fp8, gen)
    q = randn(1, 1, H, D_QK, gen=gen, dtype=torch.bfloat16)
    idx = make_indices(1, 1, K, 3 * 64, gen)
    sink = randn(H, gen=gen)
    lengths = torch.tensor([300], dtype=torch.int32) if split else None
    lib.emu_clear_counters()
    out, lse, splits, reports = run_decode(lib, q, cache, idx, D_QK ** -0.5, sink, lengths, wgmma)
    assert reports == []
    assert splits == (3 if split else 1)
    check(out, lse, q, cache, idx, D_QK ** -0.5, sink, lengths)

    kernels = launched(lib)
    main = [n for n in kernels if KERNEL in n and COMBINE not in n]
    assert len(main) == 1, f"one main kernel launch expected, got {list(kernels)}"
    args = "".join(main[0].split())
    args = args[:args.rindex("(")] if args.endswith(")") else args   # drop "(DecodeParams)"
    if "<" in args:   # "...kernel<16,dsa::mla_decode::Fmt<(dsa::cache::MlaCacheKind)0,576>,false>"
        assert args.endswith(f"<{hb},{fmt_name(0 if fp8 else 2, D_QK)},{str(wgmma).lower()}>"), main[0]
    c = kernels[main[0]]
    tiles = -(-min(K, int(lengths[0]) if split else K) // TILE)   # 64-entry tiles walked in all
    assert c["ctas"] == splits and c["threads"] == THREADS * splits
    assert c["barriers"] == 4 * tiles + splits                      # 4 per tile + the epilogue's
    mt = hb // 16
    if wgmma:   # S: warpgroup 0, 36 k-steps of 16; O += P V: both warpgroups, 4 k-steps
        assert c["wgmma"] == tiles * (D_QK // 16 + 2 * 4) and c["mma_sync"] == 0 and c["ldmatrix"] == 0
    else:       # per warp: S 36 k-steps x MT (16-key tiles), P V 4 k-steps x 8 n-tiles x MT
        assert c["wgmma"] == 0 and c["mma_sync"] == tiles * WARPS * (D_QK // 16 + 4 * 8) * mt
        assert c["ldmatrix"] == tiles * WARPS * (D_QK // 16 * (1 + max(mt // 2, 1)) + 4 * (mt + 4))
    # Only valid entries are copied, each as one whole record; invalid ones are zero-filled.
    assert c["cp_async_bytes"] == valid_entries(idx, cache, lengths) * (656 if fp8 else 2 * D_QK)
    combine = [kernels[n] for n in kernels if COMBINE in n]
    assert len(combine) == int(split)
    if split:   # one 128-thread CTA per (row, head), reading every split's partial row
        assert combine[0]["ctas"] == H and combine[0]["threads"] == 128 * H
        assert combine[0]["gmem_bytes_written"] == H * (2 * D_V + 4)


@pytest.mark.parametrize("split", [False, True], ids=["unsplit", "split"])
@pytest.mark.parametrize("per_query", [False, True], ids=["len[B]", "len[B,s_q]"])
def test_topk_length(lib, gen, per_query, split):
    """Lengths 0, 1, one tile and a bit, beyond K and negative. Split (K = 256, 2 splits of 2
    tiles): a row with no entries in either split (the combine's empty branch) and rows whose
    second split is empty (its partial has lse -inf and weight 0)."""
    B, s_q, H = 2, 2, 8
    K = 256 if split else 128
    cache = make_cache(3, 64, True, gen)
    q = randn(B, s_q, H, D_QK, gen=gen, dtype=torch.bfloat16)
    idx = make_indices(B, s_q, K, 3 * 64, gen, invalid_frac=0.05)
    if per_query:
        lengths = torch.tensor([[0, 1], [65, 500]] if not split else [[0, 64], [129, -3]],
                               dtype=torch.int32)
    else:
        lengths = torch.tensor([0, 70] if not split else [100, 0], dtype=torch.int32)
    out, lse, splits, reports = run_decode(lib, q, cache, idx, D_QK ** -0.5, None, lengths)
    assert reports == []
    assert (splits > 1) == split
    check(out, lse, q, cache, idx, D_QK ** -0.5, None, lengths)
    empty = (lengths if per_query else lengths[:, None].expand(B, s_q)) <= 0
    assert torch.isneginf(lse[empty]).all() and torch.isfinite(lse[~empty]).all()


@pytest.mark.parametrize("fp8", [True, False], ids=["fp8", "bf16"])
def test_invalid_and_empty_rows(lib, gen, fp8):
    """Rows of only -1, only out-of-range slots (num_slots, 2^31 - 1, -7), a single valid entry;
    then a cache with no blocks (nothing registered: any read is a report) and K = 0."""
    cache = make_cache(2, 32, fp8, gen)
    q = randn(2, 2, 16, D_QK, gen=gen, dtype=torch.bfloat16)
    idx = make_indices(2, 2, 64, 64, gen)
    idx[0, 0] = -1
    idx[0, 1] = torch.tensor([64, 2**31 - 1, -7, -2**31], dtype=torch.int32).repeat(16)
    idx[1, 0, :] = -1
    idx[1, 0, 37] = 63
    out, lse, _, reports = run_decode(lib, q, cache, idx, 0.1)
    assert reports == []
    check(out, lse, q, cache, idx, 0.1)
    assert torch.isneginf(lse[0]).all() and torch.isfinite(lse[1]).all()

    no_blocks = make_cache(0, 64, fp8, gen)
    small = torch.tensor([0, 1, -1, 63], dtype=torch.int32).repeat(16).view(1, 1, 64).expand(2, 2, 64)
    out, lse, _, reports = run_decode(lib, q, no_blocks, small.contiguous(), 0.1)
    assert reports == []
    assert torch.all(out == 0) and torch.isneginf(lse).all()

    out, lse, _, reports = run_decode(lib, q, cache, torch.empty(2, 2, 0, dtype=torch.int32), 0.1)
    assert reports == []
    assert torch.all(out == 0) and torch.isneginf(lse).all()


def test_two_head_blocks(lib, gen):
    """H = 80: two 64-head CTAs per row, the second with 48 masked rows (never stored), on the
    wgmma kernel (the mma.sync kernel masks through the same epilogue)."""
    H = 80
    cache = make_cache(2, 64, True, gen)
    q = randn(1, 1, H, D_QK, gen=gen, dtype=torch.bfloat16)
    idx = make_indices(1, 1, 64, 128, gen)
    sink = randn(H, gen=gen)
    out, lse, splits, reports = run_decode(lib, q, cache, idx, D_QK ** -0.5, sink, wgmma=True)
    assert reports == [] and splits == 1
    check(out, lse, q, cache, idx, D_QK ** -0.5, sink)


@pytest.mark.parametrize("split", [False, True], ids=["unsplit", "split"])
@pytest.mark.parametrize("variant", ["hb16", "hb64-wgmma"])
def test_infinite_sink(lib, gen, variant, split):
    """attn_sink +inf / -inf / finite per head: +inf gives the head output 0 with lse
    unaffected, -inf is no sink — in the main kernel (unsplit) and in the combine (split)."""
    H, _, wgmma = VARIANTS[variant]
    K = 384 if split else 150
    cache = make_cache(3, 64, True, gen)
    q = randn(1, 1, H, D_QK, gen=gen, dtype=torch.bfloat16)
    idx = make_indices(1, 1, K, 3 * 64, gen)
    sink = randn(H, gen=gen)
    sink[0::3], sink[1::3] = float("inf"), float("-inf")
    out, lse, splits, reports = run_decode(lib, q, cache, idx, D_QK ** -0.5, sink, None, wgmma)
    assert reports == [] and (splits > 1) == split
    check(out, lse, q, cache, idx, D_QK ** -0.5, sink)
    assert (out[:, :, torch.isposinf(sink)] == 0).all()


@pytest.mark.parametrize("split", [False, True], ids=["unsplit", "split"])
@pytest.mark.parametrize("variant", ["hb16", "hb64-wgmma"])
def test_nan_score_propagates(lib, gen, variant, split):
    """A NaN score gives NaN out and lse for its row (the reference's answer), in the main
    kernel and through the split combine — also when it is the row's only valid entry."""
    H, _, wgmma = VARIANTS[variant]
    K = 384 if split else 150
    kv = randn(3 * 64, D_QK, gen=gen)
    kv[5, 10] = float("nan")
    cache = kv.to(torch.bfloat16).view(3, 64, 1, D_QK)   # bf16: the FP8 writer would scale NaN away
    for only in (False, True):
        q = randn(1, 1, H, D_QK, gen=gen, dtype=torch.bfloat16)
        idx = make_indices(1, 1, K, 3 * 64, gen)
        idx[idx == 5] = 6
        if only:
            idx[:] = -1
        idx[0, 0, K - 3] = 5
        out, lse, splits, reports = run_decode(lib, q, cache, idx, D_QK ** -0.5, None, None, wgmma)
        assert reports == [] and (splits > 1) == split
        assert out.float().isnan().all() and lse.isnan().all()


# ---- The overlap kernel (mla_decode_overlap.cuh): FP8, H = 64 (one CTA per row) and H = 128
# (a 2-CTA cluster per row: each CTA dequantises half of every tile into both CTAs' shared
# memory by st.shared + st.async on the peer's transaction mbarrier). It is the default for
# these shapes (kernel=""), and DSA_MLA_DECODE_KERNEL=overlap names it.
OVERLAP = "sparse_mla_decode_overlap_kernel"


def overlap_case(gen, B, s_q, H, K, blocks=3, invalid_frac=0.2):
    cache = make_cache(blocks, 64, True, gen)
    q = randn(B, s_q, H, D_QK, gen=gen, dtype=torch.bfloat16)
    idx = make_indices(B, s_q, K, blocks * 64, gen, invalid_frac=invalid_frac)
    return cache, q, idx


def overlap_launch(lib):
    kernels = launched(lib)
    main = [n for n in kernels if OVERLAP in n]
    assert len(main) == 1 and not any(KERNEL in n and OVERLAP not in n and COMBINE not in n for n in kernels), \
        list(kernels)
    return kernels[main[0]], main[0]


@pytest.mark.parametrize("split", [False, True], ids=["unsplit", "split"])
@pytest.mark.parametrize("H", [64, 128])
def test_overlap_kernel(lib, gen, H, split):
    """One query row. Unsplit: K = 150 (3 tiles, the last ragged). Split: K = 384 in 3 splits
    of 2 tiles, topk_length 300 (the last split 1 tile of 44 entries), merged by the combine.
    Invalid slots of every kind (-1, negatives, num_slots, 2^31-1) and a finite sink."""
    K = 384 if split else 150
    cache, q, idx = overlap_case(gen, 1, 1, H, K)
    idx[0, 0, 3] = 2**31 - 1
    idx[0, 0, 70] = 3 * 64
    idx[0, 0, 71] = -7
    sink = randn(H, gen=gen)
    lengths = torch.tensor([300], dtype=torch.int32) if split else None
    lib.emu_clear_counters()
    out, lse, splits, reports = run_decode(lib, q, cache, idx, D_QK ** -0.5, sink, lengths, kernel="")
    assert reports == []
    assert splits == (3 if split else 1)
    check(out, lse, q, cache, idx, D_QK ** -0.5, sink, lengths)
    c, name = overlap_launch(lib)
    pair = H == 128
    assert name.replace(" ", "").endswith(f"<{str(pair).lower()}>(dsa::mla_decode::DecodeParams)") or "<" not in name
    tiles = -(-min(K, 300 if split else K) // TILE)
    assert c["ctas"] == splits * (2 if pair else 1)
    # per CTA: S 36 k-steps (warpgroup 0) + P V 4 k-steps (both warpgroups), per tile
    assert c["wgmma"] == c["ctas"] // splits * tiles * (D_QK // 16 + 2 * 4)
    assert c["mma_sync"] == 0 and c["cp_async_bytes"] == 0
    # The crossover's synchronisation: one cluster barrier per cluster (mbarrier inits), and
    # per tile and CTA one full[] phase (own arm + the peer's 36864 st.async bytes) and one
    # empty[] phase (the peer's release of the slot); no mbarrier at all for one CTA.
    assert c["cluster_barriers"] == (splits if pair else 0)
    assert c["mbarrier_phases"] == (2 * 2 * tiles if pair else 0)
    combine = [n for n in launched(lib) if COMBINE in n]
    assert len(combine) == int(split)


@pytest.mark.parametrize("K", [130, 384], ids=["unsplit", "split"])
@pytest.mark.parametrize("per_query", [False, True], ids=["len[B]", "len[B,s_q]"])
def test_overlap_ragged_rows(lib, gen, per_query, K):
    """B * s_q = 3 rows (a multiple of nothing) at H = 128, ragged topk_length (0, one tile and
    a bit, beyond K): an empty row in a cluster (both CTAs walk no tile). K = 384: 3 splits of
    2 tiles, so the 65-entry row leaves two clusters of its splits with nothing to walk and
    the combine merges partials with lse -inf."""
    B, s_q, H = 3, 1, 128
    cache, q, idx = overlap_case(gen, B, s_q, H, K, invalid_frac=0.1)
    lengths = torch.tensor([0, 65, 500], dtype=torch.int32)
    if per_query:
        lengths = lengths.view(B, s_q)
    out, lse, splits, reports = run_decode(lib, q, cache, idx, D_QK ** -0.5, None, lengths, kernel="overlap")
    assert reports == [] and splits == (3 if K == 384 else 1)
    check(out, lse, q, cache, idx, D_QK ** -0.5, None, lengths)
    assert torch.isneginf(lse[0]).all() and torch.isfinite(lse[1:]).all()


@pytest.mark.parametrize("H", [64, 128])
def test_overlap_empty_and_infinite_sink(lib, gen, H):
    """A row of only invalid slots next to a row with one valid entry (in its second tile);
    sinks +inf / -inf / finite per head: +inf gives out 0 with lse unaffected."""
    cache, q, idx = overlap_case(gen, 1, 2, H, 100)
    idx[0, 0] = torch.tensor([-1, 3 * 64, -2**31, 2**31 - 1], dtype=torch.int32).repeat(25)
    idx[0, 1] = -1
    idx[0, 1, 77] = 5
    sink = randn(H, gen=gen)
    sink[0::3], sink[1::3] = float("inf"), float("-inf")
    out, lse, _, reports = run_decode(lib, q, cache, idx, 0.1, sink, kernel="overlap")
    assert reports == []
    check(out, lse, q, cache, idx, 0.1, sink)
    assert torch.isneginf(lse[0, 0]).all() and torch.isfinite(lse[0, 1]).all()
    assert (out[:, :, torch.isposinf(sink)] == 0).all()


def test_overlap_other_shapes_keep_old_kernels(lib, gen):
    """H = 80 (not 64/128) and a bf16 cache are not the overlap kernel's: the launcher routes
    them to the kernels of mla_decode_kernels.cuh even when overlap is asked for."""
    for H, fp8 in ((80, True), (64, False)):
        cache = make_cache(2, 64, fp8, gen)
        q = randn(1, 1, H, D_QK, gen=gen, dtype=torch.bfloat16)
        idx = make_indices(1, 1, 64, 128, gen)
        lib.emu_clear_counters()
        out, lse, _, reports = run_decode(lib, q, cache, idx, D_QK ** -0.5, kernel="overlap")
        assert reports == []
        check(out, lse, q, cache, idx, D_QK ** -0.5)
        assert not any(OVERLAP in n for n in launched(lib))


@pytest.mark.parametrize("kernel,expect", [("", OVERLAP), ("overlap", OVERLAP), ("mma", ",false>"),
                                           ("wgmma", ",true>")])
def test_overlap_switch(lib, gen, kernel, expect):
    """DSA_MLA_DECODE_KERNEL picks the kernel of an FP8 64-head call: the overlap kernel by
    default and by name, the mma.sync and wgmma kernels of mla_decode_kernels.cuh by name (the
    old kernels stay selectable so that a GPU run times them side by side)."""
    cache, q, idx = overlap_case(gen, 1, 1, 64, 64)
    lib.emu_clear_counters()
    out, lse, _, reports = run_decode(lib, q, cache, idx, D_QK ** -0.5, kernel=kernel)
    assert reports == []
    check(out, lse, q, cache, idx, D_QK ** -0.5)
    names = ["".join(n.split()) for n in launched(lib)]
    names = [n[:n.rindex("(")] if n.endswith(")") else n for n in names]   # drop "(DecodeParams)"
    assert len(names) == 1, names
    if expect == OVERLAP:
        assert OVERLAP in names[0], names
    else:   # sparse_mla_decode_kernel<64, <cache format>, kWgmma>
        assert OVERLAP not in names[0] and "sparse_mla_decode_kernel<64," in names[0] and names[0].endswith(expect), names


@pytest.mark.parametrize("H", [64, 128])
def test_overlap_nan_query_propagates(lib, gen, H):
    """A NaN in one head's query gives NaN out and lse for that head only (the reference's
    answer); the other heads of the row, and of the peer CTA at H = 128, are unaffected."""
    cache, q, idx = overlap_case(gen, 1, 1, H, 150)
    bad = H - 3
    q[0, 0, bad, 100] = float("nan")
    out, lse, _, reports = run_decode(lib, q, cache, idx, D_QK ** -0.5, kernel="overlap")
    assert reports == []
    assert out[0, 0, bad].float().isnan().all() and lse[0, 0, bad].isnan()
    keep = torch.arange(H) != bad
    check(out[:, :, keep], lse[:, :, keep], q[:, :, keep], cache, idx, D_QK ** -0.5)


# ------------------------------------------------------- DeepSeek-V4 caches and the second list
V4_DQK = 512
KIND = {"v32fp8": 0, "v4fp8": 1, "bf16": 2}


def cache_geometry(cache):
    """(kind, d_qk, block_size, page pitch in bytes, num_slots) as check_mla_cache reads them."""
    nb, bs, _, last = cache.shape
    if cache.dtype == torch.uint8:
        kind, d_qk = (KIND["v32fp8"], 576) if last == 656 else (KIND["v4fp8"], 512)
    else:
        kind, d_qk = KIND["bf16"], last
    pitch = cache.stride(0) * cache.element_size() if nb > 1 else bs * last * cache.element_size()
    return kind, d_qk, bs, pitch, nb * bs


def pages(cache):
    """A cache's pages as separate buffers (bs * 584 bytes each for a V4 view), so that a read of
    the padding between pages is an out-of-bounds report too."""
    return [cache[i] for i in range(cache.shape[0])] if cache.dtype == torch.uint8 else [cache]


def run_decode2(lib, q, cache, idx, sm_scale, sink=None, lengths=None, extra=None, extra_idx=None,
                extra_lengths=None, wgmma=False):
    """The emulated op with any cache layout and the second list: (out, lse, splits, reports)."""
    B, s_q, H, _ = q.shape
    K, K2 = idx.shape[2], (0 if extra_idx is None else extra_idx.shape[2])
    kind, d_qk, bs, pitch, slots = cache_geometry(cache)
    e_bs = e_pitch = e_slots = 0
    if extra is not None:
        e_kind, e_dqk, e_bs, e_pitch, e_slots = cache_geometry(extra)
        assert (e_kind, e_dqk) == (kind, d_qk)
    p = (ctypes.c_int32 * 2)()
    lib.emu_mla_decode_plan2(B, s_q, H, K, K2, p)
    splits = p[0]
    out = torch.full((B, s_q, H, D_V), float("nan"), dtype=torch.bfloat16)
    lse = torch.full((B, s_q, H), float("nan"))
    out_partial = lse_partial = None
    if splits > 1:
        out_partial = torch.full((splits, B * s_q, H, D_V), float("nan"))
        lse_partial = torch.full((splits, B * s_q, H), float("nan"))
    E.set_env(lib, "DSA_MLA_DECODE_WGMMA", "1" if wgmma else None)
    E.set_env(lib, "DSA_MLA_DECODE_KERNEL", None if wgmma else "mma")
    dim2 = lambda t: int(t is not None and t.dim() == 2)
    try:
        reports, rc = E.run(
            lib.emu_sparse_mla_decode2, P(q), d_qk, kind, P(cache), bs, pitch, slots, P(idx), K, P(lengths),
            dim2(lengths), P(extra), e_bs, e_pitch, e_slots, P(extra_idx), K2, P(extra_lengths), dim2(extra_lengths),
            P(sink), P(out), P(lse), P(out_partial), P(lse_partial), B, s_q, H, sm_scale,
            buffers=[q, idx, sink, lengths, extra_idx, extra_lengths, out, lse, out_partial, lse_partial]
            + pages(cache) + ([] if extra is None else pages(extra)), lib=lib)
    finally:
        E.set_env(lib, "DSA_MLA_DECODE_WGMMA", None)
        E.set_env(lib, "DSA_MLA_DECODE_KERNEL", None)
    assert rc == 0
    return out, lse, splits, reports


def check2(out, lse, q, cache, idx, sm_scale, sink=None, lengths=None, extra=None, extra_idx=None,
           extra_lengths=None):
    ro, rl = ref.sparse_mla_decode(q, cache, idx, sm_scale, D_V, sink, lengths, extra, extra_idx, extra_lengths)
    empty = torch.isneginf(rl)
    assert not torch.isnan(lse).any() and not torch.isnan(out.float()).any(), "unwritten outputs"
    assert torch.equal(torch.isneginf(lse), empty), "empty rows must give lse = -inf exactly"
    assert torch.all(out[empty] == 0), "empty rows must give out = 0"
    if (~empty).any():
        assert rel_err(out[~empty], ro[~empty]) < OUT_TOL
        assert (lse[~empty] - rl[~empty]).abs().max().item() < LSE_TOL
    return empty


# Format -> (d_qk, fp8, pitch padding of a V4 FP8 page, bytes cp.async copies per valid token:
# V4 FP8 = the 576-byte row + 4 private copies of the 8 scale bytes).
FORMATS = {"v4fp8": (V4_DQK, True, None, 576 + 4 * 8), "v4fp8-pad48": (V4_DQK, True, 48, 576 + 4 * 8),
           "v4bf16": (V4_DQK, False, None, 2 * V4_DQK), "v32fp8": (D_QK, True, None, 656),
           "v32bf16": (D_QK, False, None, 2 * D_QK)}
# Head count -> (head block, wgmma): H = 8 computes in a 16-row tile, 8 rows masked.
HEADS = {"h8": (8, 16, False), "h64": (64, 64, False), "h64-wgmma": (64, 64, True)}


def entries(idx, num_slots, lengths=None):
    B, s_q, K = idx.shape
    keep = (idx >= 0) & (idx < num_slots)
    if lengths is not None:
        per_row = lengths if lengths.dim() == 2 else lengths[:, None].expand(B, s_q)
        keep &= torch.arange(K) < per_row[..., None]
    return int(keep.sum())


@pytest.mark.parametrize("split", [False, True], ids=["unsplit", "split"])
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("heads", list(HEADS))
def test_two_lists_every_format(lib, gen, heads, fmt, split):
    """Window list + second list in one softmax on every cache format (V4 FP8 pages at FlashMLA's
    padded pitch and at pitch bs * 584 + 48, registered page by page), H = 8 and 64 (mma.sync and
    wgmma), unsplit (K 64 + K2 70: 1 + 2 tiles, the last ragged) and split (K 150 + K2 192: 3 + 3
    tiles in 3 splits, the middle one crossing from the window list's ragged last tile into the
    second list), -1 / out-of-range
    slots in both lists, a sink; only valid entries are copied."""
    H, hb, wgmma = HEADS[heads]
    d_qk, fp8, pad, token_bytes = FORMATS[fmt]
    K, K2 = (150, 192) if split else (64, 70)
    cache = make_cache(3, 64, fp8, gen, d_qk, pad)
    extra = make_cache(5, 32, fp8, gen, d_qk, pad)
    q = randn(1, 1, H, d_qk, gen=gen, dtype=torch.bfloat16)
    idx = make_indices(1, 1, K, 3 * 64, gen)
    extra_idx = make_indices(1, 1, K2, 5 * 32, gen)
    sink = randn(H, gen=gen)
    lib.emu_clear_counters()
    out, lse, splits, reports = run_decode2(lib, q, cache, idx, d_qk ** -0.5, sink, None, extra, extra_idx,
                                            None, wgmma)
    assert reports == []
    assert splits == (3 if split else 1)
    check2(out, lse, q, cache, idx, d_qk ** -0.5, sink, None, extra, extra_idx)
    kernels = launched(lib)
    main = ["".join(n.split()) for n in kernels if KERNEL in n and COMBINE not in n]
    assert len(main) == 1, list(kernels)
    name = main[0][:main[0].rindex("(")] if main[0].endswith(")") else main[0]
    kind = KIND["bf16"] if not fp8 else (KIND["v4fp8"] if d_qk == V4_DQK else KIND["v32fp8"])
    if "<" in name:
        assert name.endswith(f"<{hb},{fmt_name(kind, d_qk)},{str(wgmma).lower()}>"), name
    c = next(kernels[n] for n in kernels if KERNEL in n and COMBINE not in n)
    tiles = -(-K // TILE) + -(-K2 // TILE)
    assert c["ctas"] == splits and c["barriers"] == 4 * tiles + splits
    assert c["cp_async_bytes"] == (entries(idx, 3 * 64) + entries(extra_idx, 5 * 32)) * token_bytes


@pytest.mark.parametrize("split", [False, True], ids=["unsplit", "split"])
@pytest.mark.parametrize("per_query", [False, True], ids=["len[B]", "len[B,s_q]"])
def test_two_lists_lengths_and_empty_rows(lib, gen, per_query, split):
    """Rows with window entries only (extra length 0), compressed entries only (length 0), none
    (lse -inf, out 0), lengths past K2 and negative; V4 FP8, H = 8, s_q = 3 (beyond decode's 1..4
    is allowed too: any s_q). Tiles wholly past a length are skipped, not read."""
    B, s_q, H = 2, 3, 8
    K, K2 = (64, 320) if split else (64, 96)
    q, cache, idx, extra, extra_idx = _extra_case(gen, V4_DQK, True, B, s_q, H, K, K2)
    if per_query:
        lengths = torch.tensor([[0, 64, 0], [10, 0, 64]], dtype=torch.int32)
        extra_lengths = torch.tensor([[0, 0, 500], [K2, -4, 65]], dtype=torch.int32)
    else:
        lengths = torch.tensor([0, 33], dtype=torch.int32)
        extra_lengths = torch.tensor([0, K2 - 1], dtype=torch.int32)
    sink = randn(H, gen=gen)
    out, lse, splits, reports = run_decode2(lib, q, cache, idx, V4_DQK ** -0.5, sink, lengths, extra,
                                            extra_idx, extra_lengths)
    assert reports == [] and (splits > 1) == split
    empty = check2(out, lse, q, cache, idx, V4_DQK ** -0.5, sink, lengths, extra, extra_idx, extra_lengths)
    expect_empty = [(0, 0), (1, 1)] if per_query else [(0, 0), (0, 1), (0, 2)]
    assert sorted(map(tuple, empty.any(-1).nonzero().tolist())) == expect_empty


@pytest.mark.parametrize("heads", ["h8", "h64-wgmma"])
def test_two_lists_k2_zero_and_sinks(lib, gen, heads):
    """K2 = 0 (a second list with no entries), and sinks +inf / -inf / finite with two lists, in
    the main kernel (unsplit) and through the combine (split: K 64 + K2 320)."""
    H, _, wgmma = HEADS[heads]
    q, cache, idx, extra, extra_idx = _extra_case(gen, V4_DQK, True, 1, 1, H, 150, 0)
    out, lse, splits, reports = run_decode2(lib, q, cache, idx, V4_DQK ** -0.5, None, None, extra, extra_idx,
                                            None, wgmma)
    assert reports == [] and splits == 1
    check2(out, lse, q, cache, idx, V4_DQK ** -0.5, None, None, extra, extra_idx)
    for K2 in (64, 320):
        q, cache, idx, extra, extra_idx = _extra_case(gen, V4_DQK, True, 1, 1, H, 64, K2)
        sink = randn(H, gen=gen)
        sink[0::3], sink[1::3] = float("inf"), float("-inf")
        out, lse, splits, reports = run_decode2(lib, q, cache, idx, V4_DQK ** -0.5, sink, None, extra, extra_idx,
                                                None, wgmma)
        assert reports == [] and (splits > 1) == (K2 == 320)
        check2(out, lse, q, cache, idx, V4_DQK ** -0.5, sink, None, extra, extra_idx)
        assert (out[:, :, torch.isposinf(sink)] == 0).all()
