"""The indexer kernels (csrc/indexer) run on the CPU emulator (csrc/emu): every tensor-core
path (sm_90a wgmma; e4m3 mma.sync with DSA_INDEXER_MMA=sync; the sm_80 path that dequantises
to bf16 for mma.sync m16n8k16, taken by the launcher's own dispatch when the loaded image has no
FP8 MMA: DSA_EMU_IMAGE_LEVEL=1 makes the emulator report an sm_80-class image), dense and
paged keys, against dsa_ext.reference within the CUDA tolerance of test_indexer.py, with no
hazard reported.

Shapes are tiny but reach every branch the launcher and kernel can take: a partial last query
block, a key count that is not a multiple of the 128-key tile, CTAs whose key chunk holds no
row's range (the range-tile skip), empty, inverted and out-of-bounds ks/ke, paged lengths beyond
the table, bad block-table entries, and (with the emulated GPU cut to one SM, so that the
launcher gives each CTA many tiles) the cp.async pipeline (4 stages; 2 on the sm80 path)
wrapping around its stages.
"""
import ctypes

import pytest
import torch

import emulator as E
from dsa_ext.reference import indexer as ref
from test_indexer import (_assert_in_range_close, _key_mask, _magnitude, _paged_inputs,
                          _position_mask, _prefill_inputs)

pytestmark = pytest.mark.emu
P = E.ptr
I64 = ctypes.c_int64
KERNEL = "indexer_logits_kernel"
# The kernel's tile and CTA geometry (indexer_kernels.cuh), for the expected grids and counts.
TILE_KEYS, COLS, THREADS, STAGES = 128, 128, 256, 4


@pytest.fixture(scope="module")
def lib():
    lib = E.load("indexer")
    lib.emu_indexer_logits.argtypes = [ctypes.c_void_p] * 7 + [I64, I64, I64, ctypes.c_int]
    lib.emu_paged_indexer_logits.argtypes = (
        [ctypes.c_void_p] * 4 + [ctypes.c_int, ctypes.c_void_p, I64, ctypes.c_void_p]
        + [I64] * 7 + [ctypes.c_int])
    return lib


@pytest.fixture(params=["wgmma", "sync", "sm80"])
def mma(request, lib):
    """Which tensor-core path the launcher picks (DSA_INDEXER_MMA, read on every launch; sm80:
    the image level the launcher reads says "no FP8 MMA", as for an sm_80 / sm_86 cubin)."""
    E.set_env(lib, "DSA_INDEXER_MMA", "sync" if request.param == "sync" else None)
    E.set_env(lib, "DSA_EMU_IMAGE_LEVEL", 1 if request.param == "sm80" else None)
    yield request.param
    E.set_env(lib, "DSA_INDEXER_MMA", None)
    E.set_env(lib, "DSA_EMU_IMAGE_LEVEL", None)


@pytest.fixture
def sms(lib):
    """Sets how many SMs the emulated GPU reports (the launcher splits the key axis into about
    8 CTAs per SM; one SM leaves many tiles per CTA)."""
    def set_sms(n):
        E.set_env(lib, "DSA_EMU_NUM_SMS", n)
    yield set_sms
    E.set_env(lib, "DSA_EMU_NUM_SMS", None)


def _cuda_magnitude(args, max_context_len=None):
    """The CUDA tests' tolerance (test_indexer.CUDA_FP8_SLACK per entry): the emulated tensor
    cores may accumulate as Hopper's FP8 ones do, with fewer than fp32's bits."""
    return _magnitude("cuda", args, max_context_len)


def _nan_out(rows, cols):
    # NaN, not zeros: an entry the kernel should write but does not can never pass for a logit.
    return torch.full((rows, cols), float("nan"))


def run_dense(lib, q, k, k_scale, w, ks, ke, clean_logits, registered=None, status=0):
    """registered: the device memory (default: every argument whole); narrower views of the
    inputs make reads of what the kernel should skip out-of-bounds reports. status: the CUDA
    status the launcher must return."""
    T, H, _ = q.shape
    S = k.shape[0]
    out = _nan_out(T, S)
    reports, rc = E.run(lib.emu_indexer_logits, P(q), P(k), P(k_scale), P(w), P(ks), P(ke), P(out),
                        T, S, H, int(clean_logits),
                        buffers=(registered or [q, k, k_scale, w, ks, ke]) + [out], lib=lib)
    assert rc == status
    return out, reports


def run_paged(lib, q, cache, w, context_lens, block_table, max_context_len, clean_logits,
              registered=None, status=0):
    B, N, H, _ = q.shape
    nb, bs = cache.shape[:2]
    out = _nan_out(B * N, max_context_len)
    reports, rc = E.run(
        lib.emu_paged_indexer_logits, P(q), P(cache), P(w), P(context_lens), int(context_lens.dim() == 2),
        P(block_table), block_table.stride(0), P(out), B, N, H, nb, bs, block_table.shape[1],
        max_context_len, int(clean_logits),
        buffers=(registered or [q, cache, w, context_lens, block_table]) + [out], lib=lib)
    assert rc == status
    return out, reports


def check_dense(out, args, clean_logits):
    expected = ref.indexer_logits(*args, clean_logits=True)
    mask = _key_mask(args[4], args[5], args[1].shape[0])
    _assert_in_range_close(out, expected, mask, clean_logits, _cuda_magnitude(args))
    if not clean_logits:   # the op leaves them unspecified; this kernel does not write them
        assert torch.isnan(out[~mask]).all()


def _ragged_ranges(T, S):
    """Per row: full, clamped negative start, inverted, empty, past-the-end, one key, a range
    that starts in the last tile; repeated over T rows."""
    cases = [(0, S), (-5, 20), (S - 10, 10), (44, 44), (130, 2**31 - 1), (S - 1, S), (TILE_KEYS + 3, S - 7)]
    ks = torch.tensor([cases[t % len(cases)][0] for t in range(T)], dtype=torch.int32)
    ke = torch.tensor([cases[t % len(cases)][1] for t in range(T)], dtype=torch.int32)
    return ks, ke


@pytest.mark.parametrize("H", [32, 64])
@pytest.mark.parametrize("clean_logits", [True, False])
def test_indexer_logits(lib, mma, gen, H, clean_logits):
    T, S = 7, 300                          # partial last query block; 2 full tiles + 44 keys
    q, k, k_scale, w, _, _ = _prefill_inputs(T, S, H, 128, gen, "cpu", "full")
    ks, ke = _ragged_ranges(T, S)
    out, reports = run_dense(lib, q, k, k_scale, w, ks, ke, clean_logits)
    assert reports == []
    check_dense(out, [q, k, k_scale, w, ks, ke], clean_logits)


def test_indexer_logits_range_tile_skip(lib, mma, gen):
    """A query block reads only the tiles of its rows' union range, cut to its key chunk: keys
    past every row's end are not even registered as device memory, so one stray read is a
    report; chunks no range reaches are -inf; a block of empty rows reads no key at all."""
    H, T, S = 64, 6, 400                   # 2 rows per CTA: (0, 1) short, (2, 3) empty, (4, 5) mid
    q, k, k_scale, w, _, _ = _prefill_inputs(T, S, H, 128, gen, "cpu", "full")
    ks = torch.tensor([0, 5, 9, 300, 130, 17], dtype=torch.int32)
    ke = torch.tensor([100, 60, 9, 200, 250, 255], dtype=torch.int32)
    end = int(ke.max())
    out, reports = run_dense(lib, q, k, k_scale, w, ks, ke, True,
                             registered=[q, k[:end], k_scale[:end], w, ks, ke])
    assert reports == []
    check_dense(out, [q, k, k_scale, w, ks, ke], True)
    assert torch.isneginf(out[2:4]).all() and torch.isneginf(out[:, end:]).all()


@pytest.mark.parametrize("H", [32, 64])
@pytest.mark.parametrize("block_size,per_query_lens,clean_logits",
                         [(16, False, True), (64, True, False), (32, False, False),
                          (12, True, True), (20, False, True)])   # shift vs 32-bit divide
def test_paged_indexer_logits(lib, mma, gen, H, block_size, per_query_lens, clean_logits):
    args = _paged_inputs(2, 3, H, 128, block_size, 200, gen, "cpu", per_query_lens, bad_blocks=True)
    out, reports = run_paged(lib, *args, 200, clean_logits)
    assert reports == []
    expected = ref.paged_indexer_logits(*args, 200, clean_logits=True)
    _assert_in_range_close(out, expected, _position_mask(args[3], 3, 200), clean_logits,
                           _cuda_magnitude(args, 200))


def test_paged_lengths_beyond_table_and_output(lib, mma, gen):
    """Lengths past max_context_len or the block table, negative and zero: clamped, never read
    out of bounds (the cache and block table are registered exactly; a stray read is a report)."""
    q, cache, w, _, full_table = _paged_inputs(4, 2, 32, 128, 32, 100, gen, "cpu", False)
    block_table = full_table[:, :2]        # a strided view covering 64 positions
    context_lens = torch.tensor([1000, -5, 0, 70], dtype=torch.int32)
    out, reports = run_paged(lib, q, cache, w, context_lens, block_table, 100, True,
                             registered=[q, cache, w, context_lens, full_table])
    assert reports == []
    args = [q, cache, w, context_lens, block_table]
    expected = ref.paged_indexer_logits(*args, 100)
    _assert_in_range_close(out, expected, _position_mask(context_lens, 2, 100), True,
                           _cuda_magnitude(args, 100))
    assert torch.isneginf(out[0, 64:]).all() and torch.isfinite(out[0, :64]).all()
    assert torch.isneginf(out[2:6]).all()


def _grid(query_blocks, num_cols, sms):
    """The launcher's grid (indexer_launch.cu split_cols) for `sms` SMs."""
    tiles = -(-num_cols // TILE_KEYS)
    splits = min(max(-(-8 * sms // query_blocks), 1), tiles)
    chunk_tiles = -(-tiles // splits)
    return query_blocks, -(-tiles // chunk_tiles), chunk_tiles


def test_pipeline_wraps_its_stages(lib, mma, sms, gen):
    """One emulated SM: 8 key splits of 6 tiles each, so every CTA streams more tiles than the
    pipeline has stages (stage reuse, the wait_group depth, the barrier before a refill), over
    ragged ranges that start mid-tile."""
    sms(1)
    H, T, S = 32, 4, 48 * TILE_KEYS - 50
    q, k, k_scale, w, _, _ = _prefill_inputs(T, S, H, 128, gen, "cpu", "full")
    ks = torch.tensor([77, 1000, 3 * TILE_KEYS + 5, 200], dtype=torch.int32)   # union from 77
    ke = torch.tensor([S - 3, 4000, 5000, 300], dtype=torch.int32)
    lib.emu_clear_counters()
    out, reports = run_dense(lib, q, k, k_scale, w, ks, ke, True)
    assert reports == []
    check_dense(out, [q, k, k_scale, w, ks, ke], True)
    qb, splits, chunk_tiles = _grid(1, S, 1)
    assert chunk_tiles > STAGES
    assert _kernel_counters(lib)["ctas"] == qb * splits


def test_paged_pipeline_wraps_its_stages(lib, mma, sms, gen):
    """The same on the paged path (H = 64: one query block of two rows), with bad block-table
    entries scattered over the tiles of every CTA."""
    sms(1)
    L = 40 * TILE_KEYS - 30
    args = _paged_inputs(1, 2, 64, 128, 64, L, gen, "cpu", True, bad_blocks=True)
    lib.emu_clear_counters()
    out, reports = run_paged(lib, *args, L, True)
    assert reports == []
    expected = ref.paged_indexer_logits(*args, L)
    _assert_in_range_close(out, expected, _position_mask(args[3], 2, L), True, _cuda_magnitude(args, L))
    qb, splits, chunk_tiles = _grid(1, L, 1)
    assert chunk_tiles > STAGES and _kernel_counters(lib)["ctas"] == qb * splits


def _kernel_counters(lib):
    counters = E.counters(lib)
    names = [n for n in counters if KERNEL in n]
    assert len(names) == 1, f"one indexer kernel instantiation expected, got {list(counters)}"
    return counters[names[0]]


def test_counters(lib, mma, gen):
    """The emulator counts what the kernel issues: per CTA and 128-key tile 2 warpgroups x 4
    wgmma k-steps, or 8 warps x 4 k-steps x (2 x 2 x 4 mma.sync, 2 + 4 ldmatrix.x4), or (sm80)
    8 warps x 2 halves x 8 k16-steps x (8 bf16 mma.sync, 1 + 4 ldmatrix.x4)."""
    H, T, S = 32, 5, 2 * TILE_KEYS           # 2 query blocks (4 + 1 rows), full rows: 2 tiles
    args = _prefill_inputs(T, S, H, 128, gen, "cpu", "full")
    lib.emu_clear_counters()
    out, reports = run_dense(lib, *args, True)
    assert reports == []
    check_dense(out, args, True)
    c = _kernel_counters(lib)
    print(f"\n{KERNEL} ({mma}): {c}")
    qb, splits, chunk_tiles = _grid(2, S, 132)
    ctas, cta_tiles = qb * splits, qb * -(-S // TILE_KEYS)
    assert c["launches"] == 1 and c["ctas"] == ctas and c["threads"] == ctas * THREADS
    if mma == "wgmma":
        assert c["wgmma"] == cta_tiles * 2 * 4 and c["mma_sync"] == 0 and c["ldmatrix"] == 0
    elif mma == "sync":
        assert c["wgmma"] == 0 and c["mma_sync"] == cta_tiles * 8 * 4 * 16
        assert c["ldmatrix"] == cta_tiles * 8 * 4 * 6
    else:
        assert c["wgmma"] == 0 and c["mma_sync"] == cta_tiles * 8 * 2 * 8 * 8
        assert c["ldmatrix"] == cta_tiles * 8 * 2 * 8 * 5
    # Every CTA copies its Q block (128 columns of 128 B, zero-filled past the last query) and
    # each of its tiles' keys (128 x 128 B) and scales (4 B each, for readable keys).
    assert c["cp_async_bytes"] >= ctas * COLS * 128 + cta_tiles * TILE_KEYS * 128
    assert c["barriers"] > 0 and c["smem_requests"] > 0 and c["gmem_requests"] > 0
    assert c["gmem_bytes_written"] == T * S * 4
    # The XOR-swizzled 128-byte rows make ldmatrix and the fills conflict-free; these are the
    # wavefronts of that layout at this shape (a swizzle on row & 3 instead of row & 7 still
    # computes the right logits on the mma.sync path, but takes 8168 wavefronts there).
    assert c["smem_wavefronts"] <= {"wgmma": 3560, "sync": 5096, "sm80": 15336}[mma]


def _one_hot_inputs(H, positions):
    """Keys 0..255 whose byte at dim d is (s + d) mod 256, so every finite e4m3 code (the
    subnormals included) occurs at every dim, NaN codes (0x7f, 0xff) replaced by 0 (a NaN
    anywhere in a key makes its whole dot product NaN); keys 256, 257: zero but for a NaN
    (0x7f, 0xff) at dim positions[0]. Query rows 2i / 2i + 1: head 0 is +1 / -1 at dim
    positions[i], every other head zero. Head 0's weight 1 and k_scale 1 make each logit exactly
    relu(+-k[s, d]): the e4m3 -> bf16 conversion, bit for bit."""
    S, T = 258, 2 * len(positions)
    s, d = torch.arange(256)[:, None], torch.arange(128)[None, :]
    codes = (s + d) % 256
    codes[(codes == 0x7F) | (codes == 0xFF)] = 0
    k = torch.zeros(S, 128, dtype=torch.uint8)
    k[:256] = codes.to(torch.uint8)
    k[256, positions[0]], k[257, positions[0]] = 0x7F, 0xFF
    q = torch.zeros(T, H, 128, dtype=torch.uint8)
    for i, p in enumerate(positions):
        q[2 * i, 0, p], q[2 * i + 1, 0, p] = 0x38, 0xB8     # e4m3 +1.0, -1.0
    w = torch.full((T, H), 0.5)
    w[:, 0] = 1.0
    ks = torch.zeros(T, dtype=torch.int32)
    ke = torch.full((T,), S, dtype=torch.int32)
    return q.view(torch.float8_e4m3fn), k.view(torch.float8_e4m3fn), torch.ones(S), w, ks, ke


@pytest.mark.parametrize("path", ["sm80", "sync"])
def test_every_e4m3_code_exact(lib, path):
    """Each finite code of k scores exactly its value (the sm80 path's software conversion, and
    the e4m3 MMA), and a key holding a NaN code scores as on the e4m3 path: a NaN dot product,
    relu's fmaxf -> 0; without the conversion's NaN fix-up the bits 0x7f would score 480."""
    E.set_env(lib, "DSA_EMU_IMAGE_LEVEL", 1 if path == "sm80" else None)
    E.set_env(lib, "DSA_INDEXER_MMA", "sync" if path == "sync" else None)
    try:
        positions = [0, 5, 63, 127]
        args = _one_hot_inputs(32, positions)
        out, reports = run_dense(lib, *args, True)
    finally:
        E.set_env(lib, "DSA_EMU_IMAGE_LEVEL", None)
        E.set_env(lib, "DSA_INDEXER_MMA", None)
    assert reports == []
    kv = args[1].float()
    assert torch.equal(out[:, 256:], torch.zeros(len(positions) * 2, 2))
    for i, p in enumerate(positions):
        for sign, row in ((1.0, 2 * i), (-1.0, 2 * i + 1)):
            assert torch.equal(out[row, :256], (sign * kv[:256, p]).clamp_min(0)), (path, p, sign)
    assert ((kv[:256, positions].abs() < 2.0 ** -6) & (kv[:256, positions] != 0)).any()   # subnormals


def test_bf16_path_forced_on_an_fp8_image(lib, gen):
    """DSA_INDEXER_MMA=bf16 takes the dequantising kernel on an sm_90a image too (so a GPU run
    can time and cross-check it next to wgmma): the same counters as the sm80 dispatch, and
    the same logits bit for bit (one kernel), within the tolerance of the reference."""
    H, T, S = 64, 6, 2 * TILE_KEYS + 17
    args = _prefill_inputs(T, S, H, 128, gen, "cpu", "full")
    results = {}
    for name, env in (("forced", ("DSA_INDEXER_MMA", "bf16")), ("sm80", ("DSA_EMU_IMAGE_LEVEL", 1))):
        E.set_env(lib, *env)
        lib.emu_clear_counters()
        try:
            out, reports = run_dense(lib, *args, True)
        finally:
            E.set_env(lib, env[0], None)
        assert reports == []
        results[name] = (out, _kernel_counters(lib))
    (a, ca), (b, cb) = results["forced"], results["sm80"]
    assert torch.equal(a, b) and ca == cb
    cta_tiles = -(-T // 2) * -(-S // TILE_KEYS)
    assert ca["mma_sync"] == cta_tiles * 8 * 2 * 8 * 8 and ca["wgmma"] == 0
    check_dense(a, args, True)


def test_mxfp4_keys_refused_without_fp8_mma(lib, gen):
    """MXFP4 keys score on the e4m3 MMA only: an image without it returns
    cudaErrorNoKernelImageForDevice (209; the glue names the device and the archs built) and
    launches nothing."""
    if not hasattr(lib, "emu_indexer_logits_mxfp4"):
        pytest.skip("no MXFP4 entry point in this emulator build")
    lib.emu_indexer_logits_mxfp4.argtypes = [ctypes.c_void_p] * 7 + [I64, I64, I64, ctypes.c_int]
    E.set_env(lib, "DSA_EMU_IMAGE_LEVEL", 1)
    try:
        q, _, _, w, ks, ke = _prefill_inputs(4, 64, 32, 128, gen, "cpu", "full")
        kp = torch.randint(0, 256, (64, 64), dtype=torch.uint8, generator=gen)
        ksc = torch.full((64, 4), 127, dtype=torch.uint8)
        out = _nan_out(4, 64)
        lib.emu_clear_counters()
        reports, rc = E.run(lib.emu_indexer_logits_mxfp4, P(q), P(kp), P(ksc), P(w), P(ks), P(ke), P(out),
                            4, 64, 32, 1, buffers=[q, kp, ksc, w, ks, ke, out], lib=lib)
    finally:
        E.set_env(lib, "DSA_EMU_IMAGE_LEVEL", None)
    assert rc == 209 and reports == []
    assert not any(KERNEL in n for n in E.counters(lib))


def test_launcher_refuses_what_the_kernels_do_not_serve(lib, gen):
    """The launchers' own checks (the glue checks first, but the launcher must not launch on
    its own either): H outside {32, 64}, a paged block_size not a multiple of 4; and empty
    problems return success without a launch."""
    invalid_value = 1
    lib.emu_clear_counters()
    _, reports = run_dense(lib, *_prefill_inputs(4, 20, 16, 128, gen, "cpu", "full"), True,
                           status=invalid_value)
    assert reports == []
    args = _paged_inputs(2, 1, 64, 128, 6, 40, gen, "cpu", False)
    _, reports = run_paged(lib, *args, 40, True, status=invalid_value)
    assert reports == []
    out, reports = run_dense(lib, *_prefill_inputs(0, 20, 32, 128, gen, "cpu", "full"), True)
    assert reports == [] and out.numel() == 0
    assert not any(KERNEL in n for n in E.counters(lib))


# ---------------------------------------------------------------------------------------------
# MXFP4 keys (kMx: raw 64-byte codes + 4 ue8m0 bytes a key, widened to e4m3 in shared memory,
# one scale group per k32 step of the mma.sync path) and the MXFP4 quantiser / cache writer.

from test_indexer_mxfp4 import _abs_mx, _keys, _mx_paged, _mx_prefill  # noqa: E402


@pytest.fixture(scope="module")
def mxlib(lib):
    lib.emu_indexer_logits_mxfp4.argtypes = [ctypes.c_void_p] * 7 + [I64, I64, I64, ctypes.c_int]
    lib.emu_paged_indexer_logits_mxfp4.argtypes = lib.emu_paged_indexer_logits.argtypes
    lib.emu_mxfp4_quantize.argtypes = ([ctypes.c_void_p, ctypes.c_int, I64, I64] + [ctypes.c_void_p] * 3
                                       + [I64, I64])
    return lib


def _mx_dense_magnitude(q, kp, ksc, w, ks, ke):
    qa = q.view(torch.uint8).bitwise_and(0x7F).view(torch.float8_e4m3fn)
    return ref.indexer_logits(qa, _abs_mx(kp), ksc, w.abs(), ks, ke)


def run_dense_mx(lib, q, kp, ksc, w, ks, ke, clean_logits, registered=None, status=0):
    T, H, _ = q.shape
    S = kp.shape[0]
    out = _nan_out(T, S)
    reports, rc = E.run(lib.emu_indexer_logits_mxfp4, P(q), P(kp), P(ksc), P(w), P(ks), P(ke), P(out),
                        T, S, H, int(clean_logits),
                        buffers=(registered or [q, kp, ksc, w, ks, ke]) + [out], lib=lib)
    assert rc == status
    return out, reports


def run_paged_mx(lib, q, cache, w, context_lens, block_table, max_context_len, clean_logits):
    B, N, H, _ = q.shape
    nb, bs = cache.shape[:2]
    out = _nan_out(B * N, max_context_len)
    reports, rc = E.run(
        lib.emu_paged_indexer_logits_mxfp4, P(q), P(cache), P(w), P(context_lens), int(context_lens.dim() == 2),
        P(block_table), block_table.stride(0), P(out), B, N, H, nb, bs, block_table.shape[1],
        max_context_len, int(clean_logits), buffers=[q, cache, w, context_lens, block_table, out], lib=lib)
    assert rc == 0
    return out, reports


@pytest.mark.parametrize("H", [32, 64])
@pytest.mark.parametrize("clean_logits", [True, False])
def test_indexer_logits_mxfp4(mxlib, gen, H, clean_logits):
    T, S = 7, 300
    q, kp, ksc, w, _, _ = _mx_prefill(T, S, H, 128, gen, "cpu", "full")
    ks, ke = _ragged_ranges(T, S)
    end = int(ke.clamp(max=S).max())
    out, reports = run_dense_mx(mxlib, q, kp, ksc, w, ks, ke, clean_logits)
    assert reports == []
    args = [q, kp, ksc, w, ks, ke]
    mask = _key_mask(ks, ke, S)
    _assert_in_range_close(out, ref.indexer_logits(*args), mask, clean_logits, _mx_dense_magnitude(*args))
    if not clean_logits:
        assert torch.isnan(out[~mask]).all()
    assert end == S


def test_indexer_logits_mxfp4_reads_only_its_keys(mxlib, gen):
    """Keys past every row's end are not registered: the packed codes and scale bytes of a
    skipped tile are never read."""
    H, T, S = 64, 6, 400
    q, kp, ksc, w, _, _ = _mx_prefill(T, S, H, 128, gen, "cpu", "full")
    ks = torch.tensor([0, 5, 9, 300, 130, 17], dtype=torch.int32)
    ke = torch.tensor([100, 60, 9, 200, 250, 255], dtype=torch.int32)
    end = int(ke.max())
    out, reports = run_dense_mx(mxlib, q, kp, ksc, w, ks, ke, True, registered=[q, kp[:end], ksc[:end], w, ks, ke])
    assert reports == []
    args = [q, kp, ksc, w, ks, ke]
    _assert_in_range_close(out, ref.indexer_logits(*args), _key_mask(ks, ke, S), True, _mx_dense_magnitude(*args))


@pytest.mark.parametrize("H", [32, 64])
@pytest.mark.parametrize("block_size,per_query_lens", [(16, False), (64, True), (12, True)])
def test_paged_indexer_logits_mxfp4(mxlib, gen, H, block_size, per_query_lens):
    args = _mx_paged(2, 3, H, 128, block_size, 200, gen, "cpu", per_query_lens, bad_blocks=True)
    out, reports = run_paged_mx(mxlib, *args, 200, True)
    assert reports == []
    expected = ref.paged_indexer_logits(*args, 200)
    q, cache, w, cl, bt = args
    packed, scale = ref.unpack_mxfp4_k_cache(cache)
    qa = q.view(torch.uint8).bitwise_and(0x7F).view(torch.float8_e4m3fn)
    mag = ref.paged_indexer_logits(qa, ref.pack_mxfp4_k_cache(_abs_mx(packed), scale), w.abs(), cl, bt, 200)
    _assert_in_range_close(out, expected, _position_mask(cl, 3, 200), True, mag)


def test_paged_mxfp4_pipeline_wraps_its_stages(mxlib, sms, gen):
    """One emulated SM: every CTA streams more MXFP4 tiles than the pipeline has stages (the
    single widened tile is rewritten each tile: a missing barrier there is a race report)."""
    sms(1)
    L = 40 * TILE_KEYS - 30
    args = _mx_paged(1, 2, 64, 128, 64, L, gen, "cpu", True, bad_blocks=True)
    mxlib.emu_clear_counters()
    out, reports = run_paged_mx(mxlib, *args, L, True)
    assert reports == []
    expected = ref.paged_indexer_logits(*args, L)
    q, cache, w, cl, bt = args
    packed, scale = ref.unpack_mxfp4_k_cache(cache)
    qa = q.view(torch.uint8).bitwise_and(0x7F).view(torch.float8_e4m3fn)
    mag = ref.paged_indexer_logits(qa, ref.pack_mxfp4_k_cache(_abs_mx(packed), scale), w.abs(), cl, bt, L)
    _assert_in_range_close(out, expected, _position_mask(cl, 2, L), True, mag)
    qb, splits, chunk_tiles = _grid(1, L, 1)
    c = _kernel_counters(mxlib)
    assert chunk_tiles > STAGES and c["ctas"] == qb * splits
    assert c["wgmma"] == 0 and c["mma_sync"] > 0
    # half the key bytes of the FP8 cache: 64 packed + 4 scale bytes a readable key
    assert c["cp_async_bytes"] < qb * splits * COLS * 128 + L * 132


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp4_quantize_and_cache_write(mxlib, gen, dtype):
    """The CUDA quantiser's bytes equal the reference's, dense and through slots (negative and
    past-the-cache slots skipped, other bytes untouched)."""
    D, rows = 128, 37
    x = _keys(rows, D, gen).to(dtype)
    x[0, :4] = torch.tensor([float("nan"), float("inf"), -0.0, 2.5])
    packed = torch.full((rows, D // 2), 0xAB, dtype=torch.uint8)
    scale = torch.full((rows, D // 32), 0xAB, dtype=torch.uint8)
    xb = x.view(torch.int16) if dtype == torch.bfloat16 else x
    reports, rc = E.run(mxlib.emu_mxfp4_quantize, P(xb), int(dtype == torch.bfloat16), rows, D, P(packed), P(scale),
                        None, 0, 0, buffers=[xb, packed, scale], lib=mxlib)
    assert rc == 0 and reports == []
    want_p, want_s = ref.mxfp4_quantize(x)
    assert torch.equal(packed, want_p) and torch.equal(scale, want_s)
    nb, bs = 4, 12
    cache = torch.randint(0, 256, (nb, bs, 1, 68), generator=gen, dtype=torch.uint8)
    want = cache.clone()
    slots = torch.randperm(nb * bs, generator=gen)[:rows].long()
    slots[::5] = -1
    slots[3] = nb * bs + 7
    reports, rc = E.run(mxlib.emu_mxfp4_quantize, P(xb), int(dtype == torch.bfloat16), rows, D, P(cache), None,
                        P(slots), nb * bs, bs, buffers=[xb, cache, slots], lib=mxlib)
    assert rc == 0 and reports == []
    keep = (slots >= 0) & (slots < nb * bs)
    ref.mxfp4_indexer_k_cache_write(x[keep], slots[keep], want)
    assert torch.equal(cache, want)


def test_mxfp4_reads_half_the_key_bytes(mxlib, gen):
    """Same shape, FP8 keys (132 B a key) vs MXFP4 keys (68 B): the copies differ by exactly
    64 bytes a key tile row (the Q block and scales are the same), and MXFP4 takes mma.sync."""
    E.set_env(mxlib, "DSA_INDEXER_MMA", "sync")
    try:
        H, T, S = 32, 5, 2 * TILE_KEYS
        fp8_args = _prefill_inputs(T, S, H, 128, gen, "cpu", "full")
        mxlib.emu_clear_counters()
        out, reports = run_dense(mxlib, *fp8_args, True)
        assert reports == []
        c8 = _kernel_counters(mxlib)
        q, kp, ksc, w, ks, ke = _mx_prefill(T, S, H, 128, gen, "cpu", "full")
        q = fp8_args[0]
        mxlib.emu_clear_counters()
        out, reports = run_dense_mx(mxlib, q, kp, ksc, w, ks, ke, True)
        assert reports == []
        c4 = _kernel_counters(mxlib)
    finally:
        E.set_env(mxlib, "DSA_INDEXER_MMA", None)
    qb, splits, _ = _grid(2, S, 132)
    cta_tiles = qb * -(-S // TILE_KEYS)
    assert c8["ctas"] == c4["ctas"] == qb * splits
    assert c8["cp_async_bytes"] - c4["cp_async_bytes"] == cta_tiles * TILE_KEYS * 64
    assert c4["mma_sync"] == c8["mma_sync"] and c4["wgmma"] == 0
    print(f"\nFP8 keys: {c8['cp_async_bytes']} B copied, MXFP4 keys: {c4['cp_async_bytes']} B")
