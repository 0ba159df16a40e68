"""The cache kernels (csrc/cache) on the CPU emulator (csrc/emu): every instantiation the
launchers can select, byte-exact against dsa_ext.reference.cache (as the CUDA cases of
test_cache.py), with no hazard reported.

  * quantize_groups_vec_kernel: 1, 2, 4, 8, 16, 32 lanes per group with one chunk of 8 per lane,
    32 lanes with 2, 4, 8 chunks, groups whose chunk count leaves lanes idle; the scalar
    fallback for group sizes that are not multiples of 8, groups above 2048 values and
    misaligned inputs; bf16 / fp32 inputs, both scale rules; as fp8_quantize (dense groups) and
    as indexer_k_cache_write (cache slots, int32 / int64, negative and past-the-cache slots
    skipped, cache geometries that force the scalar path).
  * indexer_gather_kernel<16> and <1> with 1 .. 32 lanes per token, ragged and empty sequences,
    block ids outside the cache (zeros, never read).
  * mla_write_kernel / mla_gather_kernel, FP8 656-byte records and bf16 rows, bf16 / fp32 input,
    int32 / int64 slots, slots outside the cache.

Caches start as random bytes (a writer must leave every other byte alone); outputs start as
bytes no answer has in full, so a byte that should be written but is not fails the comparison.
Only the tensors a kernel may touch are registered as device memory.
"""
import ctypes
import re

import pytest
import torch

import emulator as E
from conftest import randn
from dsa_ext.reference import cache as ref

pytestmark = pytest.mark.emu
P = E.ptr
I64, INT, VP = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
MISALIGNED = 716  # cudaErrorMisalignedAddress
# Template arguments as the demangled kernel names spell them.
C_TYPE = {torch.bfloat16: "__nv_bfloat16", torch.float32: "float"}
C_INDEX = {torch.int64: "long", torch.int32: "int"}


@pytest.fixture(scope="module")
def lib():
    lib = E.load("cache")
    lib.emu_fp8_quantize.argtypes = [VP, INT, I64, I64, INT, VP, VP]
    lib.emu_indexer_k_cache_write.argtypes = [VP, INT, VP, INT, I64, I64, INT, VP, I64, I64]
    lib.emu_indexer_k_cache_gather.argtypes = [VP, I64, I64, I64, VP, I64, VP, I64, I64, VP, VP]
    lib.emu_mla_kv_cache_write.argtypes = [VP, INT, VP, INT, I64, VP, INT, I64]
    lib.emu_mla_kv_cache_gather.argtypes = [VP, INT, I64, VP, INT, I64, VP]
    lib.emu_mla_kv_cache_write_layout.argtypes = [VP, INT, VP, INT, I64, VP, INT, INT, I64, I64, I64]
    lib.emu_mla_kv_cache_gather_layout.argtypes = [VP, INT, INT, I64, I64, I64, VP, INT, I64, VP]
    return lib


def bytes_of(t):
    return t.contiguous().view(torch.uint8).reshape(-1)


def is_bf16(t):
    return int(t.dtype == torch.bfloat16)


def random_bytes(*shape, gen):
    return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)


def launched(lib):
    """The kernels of the last call (name -> counters)."""
    return {name: c for name, c in E.counters(lib).items() if c["launches"]}


def call(lib, fn, *args, buffers):
    lib.emu_clear_counters()
    reports, rc = E.run(fn, *args, buffers=buffers, lib=lib)
    assert reports == []
    return rc, launched(lib)


def only_kernel(kernels):
    (name,) = kernels
    return name


def vec_config(name):
    """(lanes per group, chunks per lane) of a quantize_groups_vec_kernel name, None if scalar."""
    m = re.search(r"quantize_groups_vec_kernel<[^,]+, (\d+), (\d+),", name)
    if m:
        return int(m.group(1)), int(m.group(2))
    assert "quantize_groups_scalar_kernel<" in name, name
    return None


def groups_of_magnitudes(n_groups, group_size, gen, dtype):
    """Groups of very different magnitudes, so scales span many powers of two."""
    x = randn(n_groups, group_size, gen=gen)
    mag = torch.exp2(torch.randint(-20, 12, (n_groups, 1), generator=gen).float())
    return (x * mag).to(dtype)


# ---------------------------------------------------------------------------------------------
# fp8_quantize: dense groups
# ---------------------------------------------------------------------------------------------
# group size -> the launcher's kernel: (lanes per group, chunks per lane), None = scalar.
QUANTIZE_CASES = [(8, (1, 1)), (16, (2, 1)), (24, (4, 1)), (64, (8, 1)), (128, (16, 1)), (256, (32, 1)),
                  (320, (32, 2)), (1024, (32, 4)), (2048, (32, 8)), (3, None), (36, None), (4096, None)]


def run_fp8_quantize(lib, x, group_size, ue8m0):
    groups = x.numel() // group_size
    q = torch.full((x.numel(),), 0x5A, dtype=torch.uint8)
    s = torch.full((groups,), float("nan"))
    rc, kernels = call(lib, lib.emu_fp8_quantize, P(x), is_bf16(x), groups, group_size, int(ue8m0), P(q), P(s),
                       buffers=[x, q, s])
    return rc, q, s, kernels


@pytest.mark.parametrize("group_size,config", QUANTIZE_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_quantize_matches_reference(lib, gen, group_size, config, dtype):
    ue8m0 = group_size % 16 == 0   # both rules over the cases
    n_groups = 3 if group_size <= 1024 else 2
    x = groups_of_magnitudes(n_groups, group_size, gen, dtype)
    x[0, :] = 0.0                  # the 1e-4 scale floor
    x[-1, 0] = float("nan")        # ignored by the abs-max, stays NaN
    rc, q, s, kernels = run_fp8_quantize(lib, x, group_size, ue8m0)
    assert rc == 0 and vec_config(only_kernel(kernels)) == config
    q_ref, s_ref = ref.fp8_quantize(x, group_size, ue8m0)
    assert torch.equal(q, bytes_of(q_ref)) and torch.equal(bytes_of(s), bytes_of(s_ref))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_quantize_misaligned_input_takes_the_scalar_path(lib, gen, dtype):
    x = randn(1 + 4 * 128, gen=gen, dtype=dtype)[1:]       # one element off 16-byte alignment
    rc, q, s, kernels = run_fp8_quantize(lib, x, 128, True)
    assert rc == 0 and vec_config(only_kernel(kernels)) is None
    q_ref, s_ref = ref.fp8_quantize(x.view(4, 128), 128, True)
    assert torch.equal(q, bytes_of(q_ref)) and torch.equal(bytes_of(s), bytes_of(s_ref))


@pytest.mark.parametrize("ue8m0", [True, False])
def test_fp8_quantize_edge_groups(lib, ue8m0):
    g = 16
    x = torch.stack([
        torch.zeros(g), torch.full((g,), 1e-7), torch.linspace(-448, 448, g),
        torch.tensor([448.0, -448.0, 1000.0, -1e6] + [3.0] * (g - 4)),
        torch.tensor([float("nan"), 1.0, -2.0] + [0.5] * (g - 3)),
        torch.tensor([7.0] + [-7.0] * (g - 1)),
        torch.tensor([1e-30, -3e-38] + [2e-39] * (g - 2)),
        torch.tensor([3e38, -1.0, 1e-30, -1e-40] + [5e37] * (g - 4)),
        torch.tensor([float("inf"), 1.0] + [2.0] * (g - 2)),
    ])
    rc, q, s, _ = run_fp8_quantize(lib, x, g, ue8m0)
    assert rc == 0
    q_ref, s_ref = ref.fp8_quantize(x, g, ue8m0)
    assert torch.equal(q, bytes_of(q_ref)) and torch.equal(bytes_of(s), bytes_of(s_ref))


def test_fp8_quantize_empty_launches_nothing(lib):
    rc, kernels = call(lib, lib.emu_fp8_quantize, None, 1, 0, 128, 1, None, None, buffers=[])
    assert rc == 0 and kernels == {}


# ---------------------------------------------------------------------------------------------
# indexer K cache
# ---------------------------------------------------------------------------------------------
def slots_with_skips(n, num_slots, gen, dtype):
    """n distinct slots, two negative and one past the cache (every one skipped in-kernel)."""
    s = torch.randperm(num_slots, generator=gen)[:n].long()
    s[0], s[n // 2] = -1, -7
    s[-1] = num_slots if dtype == torch.int32 else 2 ** 40
    return s.to(dtype)


def as_reference_slots(slots, num_slots):
    """The kernels skip slots outside the cache; the reference raises for those past it."""
    s = slots.long().clone()
    s[s >= num_slots] = -1
    return s


# (nb, bs, D) -> kernel: (5, 16, 64) 8 lanes; (2, 4, 512) 32 lanes x 2 chunks; (3, 5, 128):
# bs * (D + 4) % 8 != 0, scalar; (4, 7, 20): D % 8 != 0, scalar; (3, 2, 32) 4 lanes.
INDEXER_WRITE_CASES = [((5, 16, 64), (8, 1)), ((2, 4, 512), (32, 2)), ((3, 5, 128), None),
                       ((4, 7, 20), None), ((3, 2, 32), (4, 1))]


@pytest.mark.parametrize("geometry,config", INDEXER_WRITE_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_indexer_k_cache_write_matches_reference(lib, gen, geometry, config, dtype, slot_dtype):
    nb, bs, D = geometry
    ue8m0 = slot_dtype == torch.int64
    n = min(nb * bs, 9)
    k = randn(n, D, gen=gen, dtype=dtype, scale=3.0)
    slots = slots_with_skips(n, nb * bs, gen, slot_dtype)
    cache = random_bytes(nb, bs, 1, D + 4, gen=gen)
    cache_ref = cache.clone()
    rc, kernels = call(lib, lib.emu_indexer_k_cache_write, P(k), is_bf16(k), P(slots), int(slot_dtype == torch.int64),
                       n, D, int(ue8m0), P(cache), nb, bs, buffers=[k, slots, cache])
    assert rc == 0 and vec_config(only_kernel(kernels)) == config
    ref.indexer_k_cache_write(k, as_reference_slots(slots, nb * bs), cache_ref, ue8m0)
    assert torch.equal(cache, cache_ref)


def run_indexer_gather(lib, cache, block_table, seq_lens):
    nb, bs, _, d4 = cache.shape
    D = d4 - 4
    B, max_blocks = block_table.shape
    cu = torch.zeros(B + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(seq_lens.long(), 0)      # as the glue builds it
    total = int(cu[-1])
    k_fp8 = torch.full((total, D), 0x5A, dtype=torch.uint8)
    k_scale = torch.full((total,), float("nan"))
    rc, kernels = call(lib, lib.emu_indexer_k_cache_gather, P(cache), nb, bs, D, P(block_table), max_blocks, P(cu), B,
                       total, P(k_fp8), P(k_scale), buffers=[cache, block_table, cu, k_fp8, k_scale])
    return rc, k_fp8, k_scale, kernels


# (bs, D) -> (bytes per lane step, lanes per token): 16-byte chunks when D % 16 == 0 and every
# block starts 16-byte aligned, else bytes; lanes = the chunk count rounded up to 2^k, <= 32.
INDEXER_GATHER_CASES = [((8, 32), (16, 2)), ((16, 128), (16, 8)), ((4, 512), (16, 32)), ((16, 64), (16, 4)),
                        ((5, 20), (1, 32)), ((3, 128), (1, 32)), ((4, 16), (16, 1))]


@pytest.mark.parametrize("geometry,config", INDEXER_GATHER_CASES)
def test_indexer_k_cache_gather_matches_reference(lib, gen, geometry, config):
    bs, D = geometry
    nb, B, max_blocks = 6, 4, 3
    cache = random_bytes(nb, bs, 1, D + 4, gen=gen)
    block_table = torch.stack([torch.randperm(nb, generator=gen)[:max_blocks] for _ in range(B)]).int()
    seq_lens = torch.tensor([2 * bs + 1, 0, max_blocks * bs, bs - 1], dtype=torch.int32)
    block_table[0, 1] = -1        # a bad id inside seq 0's length: zeros
    block_table[2, 2] = nb        # past the cache, inside seq 2's length: zeros
    block_table[3, 1] = 1000      # unused (past seq 3's length)
    rc, k_fp8, k_scale, kernels = run_indexer_gather(lib, cache, block_table, seq_lens)
    assert rc == 0
    vec, lanes = config
    name = only_kernel(kernels)
    assert f"indexer_gather_kernel<{vec}>" in name
    c = kernels[name]
    total = int(seq_lens.sum())
    assert c["threads"] >= total * lanes and c["ctas"] == -(-total * lanes // 256)
    r_fp8, r_scale = ref.indexer_k_cache_gather(cache, block_table, seq_lens)
    assert torch.equal(k_fp8, bytes_of(r_fp8).view(total, D)) and torch.equal(bytes_of(k_scale), bytes_of(r_scale))


def test_indexer_k_cache_gather_empty_launches_nothing(lib, gen):
    cache = random_bytes(2, 8, 1, 36, gen=gen)
    rc, _, _, kernels = run_indexer_gather(lib, cache, torch.zeros(2, 2, dtype=torch.int32),
                                           torch.zeros(2, dtype=torch.int32))
    assert rc == 0 and kernels == {}


def test_indexer_k_cache_round_trip(lib, gen):
    nb, bs, D = 4, 16, 128
    lens = torch.tensor([20, 1, 0, 10], dtype=torch.int32)        # 2 + 1 + 0 + 1 = 4 blocks
    perm = torch.randperm(nb, generator=gen).tolist()
    table = torch.full((lens.numel(), 2), -1, dtype=torch.int32)
    for b, n in enumerate(lens.tolist()):
        for j in range(-(-n // bs)):
            table[b, j] = perm.pop()
    pos = torch.cat([torch.arange(int(n)) for n in lens])
    seq = torch.repeat_interleave(torch.arange(lens.numel()), lens.long())
    slots = table[seq, pos // bs].long() * bs + pos % bs
    k = randn(slots.numel(), D, gen=gen, dtype=torch.bfloat16, scale=2.0)
    cache = random_bytes(nb, bs, 1, D + 4, gen=gen)
    rc, _ = call(lib, lib.emu_indexer_k_cache_write, P(k), 1, P(slots), 1, slots.numel(), D, 1, P(cache), nb, bs,
                 buffers=[k, slots, cache])
    assert rc == 0
    rc, k_fp8, k_scale, _ = run_indexer_gather(lib, cache, table, lens)
    assert rc == 0
    q_ref, s_ref = ref.fp8_quantize(k, D)
    assert torch.equal(k_fp8.reshape(-1), bytes_of(q_ref)) and torch.equal(k_scale, s_ref[:, 0])


# ---------------------------------------------------------------------------------------------
# MLA KV cache
# ---------------------------------------------------------------------------------------------
def mla_rows(n, gen, dtype):
    kv = randn(n, 576, gen=gen)
    kv[:, 128:256] *= 1e-3                       # tiles of different magnitudes
    kv[:, 256:384] *= 200.0
    kv[0, 384:512] = 0.0                         # all-zero tile -> 1e-4 floor
    return kv.to(dtype)


def random_mla_cache(num_slots, fp8, gen):
    """FP8 records with finite e4m3 bytes, power-of-two scales and finite rope, or random bf16 rows."""
    if not fp8:
        return randn(num_slots, 576, gen=gen, dtype=torch.bfloat16)
    rec = random_bytes(num_slots, 656, gen=gen)
    nope = rec[:, :512]
    nope[(nope & 0x7F) == 0x7F] = 0x11           # no e4m3 NaN codes: every output byte compares
    rec[:, 512:528] = (torch.exp2(torch.randint(-12, 4, (num_slots, 4), generator=gen).float())
                       .contiguous().view(torch.uint8))
    # Finite rope: the reference passes it through fp32, which would quieten a random NaN.
    rec[:, 528:] = randn(num_slots, 64, gen=gen, dtype=torch.bfloat16).view(torch.uint8)
    return rec


@pytest.mark.parametrize("fp8", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_mla_kv_cache_write_matches_reference(lib, gen, fp8, dtype, slot_dtype):
    num_slots, n = 12, 9
    kv = mla_rows(n, gen, dtype)
    slots = slots_with_skips(n, num_slots, gen, slot_dtype)
    cache = random_mla_cache(num_slots, fp8, gen)
    cache_ref = cache.clone()
    rc, kernels = call(lib, lib.emu_mla_kv_cache_write, P(kv), is_bf16(kv), P(slots), int(slot_dtype == torch.int64),
                       n, P(cache), int(fp8), num_slots, buffers=[kv, slots, cache])
    assert rc == 0
    name = only_kernel(kernels)
    assert f"mla_write_kernel<{C_TYPE[dtype]}, {C_INDEX[slot_dtype]}, {MLA_KIND['v3.2-fp8' if fp8 else 'bf16']}>" in name
    ref.mla_kv_cache_write(kv, as_reference_slots(slots, num_slots), cache_ref.view(1, num_slots, 1, -1))
    assert torch.equal(bytes_of(cache), bytes_of(cache_ref))


@pytest.mark.parametrize("fp8", [True, False])
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_mla_kv_cache_gather_matches_reference(lib, gen, fp8, slot_dtype):
    num_slots, m = 10, 11
    cache = random_mla_cache(num_slots, fp8, gen)
    slots = torch.randint(0, num_slots, (m,), generator=gen)
    slots[[2, 5, 9]] = torch.tensor([-1, num_slots, 2 ** 40 if slot_dtype == torch.int64 else 2 ** 31 - 1])
    slots = slots.to(slot_dtype)
    out = torch.full((m, 576), float("nan"), dtype=torch.bfloat16)
    rc, kernels = call(lib, lib.emu_mla_kv_cache_gather, P(cache), int(fp8), num_slots, P(slots),
                       int(slot_dtype == torch.int64), m, P(out), buffers=[cache, slots, out])
    assert rc == 0
    name = only_kernel(kernels)
    assert f"mla_gather_kernel<{C_INDEX[slot_dtype]}, {MLA_KIND['v3.2-fp8' if fp8 else 'bf16']}>" in name
    out_ref = ref.mla_kv_cache_gather(cache.view(1, num_slots, 1, -1), slots)[:, 0]
    assert torch.equal(bytes_of(out), bytes_of(out_ref))
    assert (out[[2, 5, 9]] == 0).all()


def test_mla_kv_cache_round_trip_bf16_is_exact(lib, gen):
    num_slots, n = 8, 5
    kv = randn(n, 576, gen=gen, dtype=torch.bfloat16)
    slots = torch.randperm(num_slots, generator=gen)[:n]
    cache = random_mla_cache(num_slots, False, gen)
    rc, _ = call(lib, lib.emu_mla_kv_cache_write, P(kv), 1, P(slots), 1, n, P(cache), 0, num_slots,
                 buffers=[kv, slots, cache])
    out = torch.empty(n, 576, dtype=torch.bfloat16)
    rc2, _ = call(lib, lib.emu_mla_kv_cache_gather, P(cache), 0, num_slots, P(slots), 1, n, P(out),
                  buffers=[cache, slots, out])
    assert rc == rc2 == 0 and torch.equal(out, kv)


@pytest.mark.parametrize("fp8", [True, False])
def test_mla_misaligned_pointers_are_refused(lib, gen, fp8):
    """The launchers need 16-byte aligned rows (the glue copies kv to an aligned buffer)."""
    kv = randn(1 + 2 * 576, gen=gen, dtype=torch.bfloat16)[1:]
    slots = torch.tensor([0, 1])
    cache = random_mla_cache(2, fp8, gen)
    before = cache.clone()
    rc, kernels = call(lib, lib.emu_mla_kv_cache_write, P(kv), 1, P(slots), 1, 2, P(cache), int(fp8), 2,
                       buffers=[kv, slots, cache])
    assert rc == MISALIGNED and kernels == {} and torch.equal(cache, before)


# ---- DeepSeek-V4 MLA cache (FlashMLA MODEL1 pages, SPEC 10.2) ------------------------------------

MLA_KIND = {"v3.2-fp8": "(dsa::cache::MlaCacheKind)0", "v4-fp8": "(dsa::cache::MlaCacheKind)1",
            "bf16": "(dsa::cache::MlaCacheKind)2"}


def v4_cache(nb, bs, fp8, gen):
    """(cache view [nb, bs, 1, 584 | 512], the allocation to register as device memory):
    FlashMLA's padded pages for FP8 (pitch: bs*584 rounded up to 576), random bytes / values."""
    if not fp8:
        c = randn(nb, bs, 1, 512, gen=gen, dtype=torch.bfloat16)
        return c, c
    pitch = -(-bs * 584 // 576) * 576
    pages = random_bytes(nb, pitch, gen=gen)
    rows = pages[:, :bs * 576].view(nb, bs, 576)
    nope = rows[..., :448]
    nope[(nope & 0x7F) == 0x7F] = 0x11             # no e4m3 NaN codes: every output byte compares
    rows[..., 448:] = randn(nb, bs, 64, gen=gen, dtype=torch.bfloat16).view(torch.uint8)
    scales = pages[:, bs * 576:bs * 584].view(nb, bs, 8)
    scales[..., :7] = torch.randint(110, 131, (nb, bs, 7), generator=gen, dtype=torch.uint8)
    return pages[:, :bs * 584].view(nb, bs, 1, 584), pages


@pytest.mark.parametrize("fp8", [True, False], ids=["fp8", "bf16"])
@pytest.mark.parametrize("bs", [1, 5, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_v4_cache_write_and_gather_match_reference(lib, gen, fp8, bs, dtype):
    """The V4 writer and reader (quarter-warp tiles of 64, ue8m0 scales after the page's rows,
    pad byte 0; 28 lanes dequantise, 4 copy rope) on padded pages, byte-exact vs the reference;
    skipped and out-of-range slots; the pad bytes between pages are never touched."""
    nb, n = 3, 2 * bs
    kv = randn(n, 512, gen=gen, dtype=dtype, scale=3.0)
    kv[0, 70] = 1e-7                                  # tiles on the 1e-4 scale floor
    slots = slots_with_skips(n, nb * bs, gen, torch.int64)
    cache, alloc = v4_cache(nb, bs, fp8, gen)
    want = cache.clone() if not fp8 else None
    before = alloc.clone()
    kind, pitch = (1, alloc.stride(0)) if fp8 else (2, bs * 1024)
    rc, kernels = call(lib, lib.emu_mla_kv_cache_write_layout, P(kv), is_bf16(kv), P(slots), 1, n,
                       P(alloc), kind, 512, bs, pitch, nb * bs, buffers=[kv, slots, alloc])
    assert rc == 0
    assert MLA_KIND["v4-fp8" if fp8 else "bf16"] in only_kernel(kernels)
    if fp8:
        want_alloc = before.clone()
        ref.mla_kv_cache_write(kv, as_reference_slots(slots, nb * bs),
                               want_alloc[:, :bs * 584].view(nb, bs, 1, 584))
        assert torch.equal(alloc, want_alloc)          # page tails (padding) included
    else:
        ref.mla_kv_cache_write(kv, as_reference_slots(slots, nb * bs), want)
        assert torch.equal(bytes_of(cache), bytes_of(want))
    q = torch.randint(0, nb * bs, (9,), generator=gen)
    q[[1, 4, 7]] = torch.tensor([-1, nb * bs, 2 ** 40])
    out = torch.full((9, 512), float("nan"), dtype=torch.bfloat16)
    rc, kernels = call(lib, lib.emu_mla_kv_cache_gather_layout, P(alloc), kind, 512, bs, pitch, nb * bs,
                       P(q), 1, 9, P(out), buffers=[alloc, q, out])
    assert rc == 0 and MLA_KIND["v4-fp8" if fp8 else "bf16"] in only_kernel(kernels)
    assert torch.equal(bytes_of(out), bytes_of(ref.mla_kv_cache_gather(cache, q)[:, 0]))
    assert (out[[1, 4, 7]] == 0).all()


def test_v4_cache_misaligned_pitch_is_refused(lib, gen):
    """A page pitch that is not a multiple of 16 bytes would misalign the 16-byte accesses."""
    kv = randn(2, 512, gen=gen, dtype=torch.bfloat16)
    alloc = random_bytes(2, 4 * 584 + 8, gen=gen)
    rc, kernels = call(lib, lib.emu_mla_kv_cache_write_layout, P(kv), 1, P(torch.tensor([0, 5])), 1, 2,
                       P(alloc), 1, 512, 4, 4 * 584 + 8, 8, buffers=[kv, alloc])
    assert rc == MISALIGNED and kernels == {}
