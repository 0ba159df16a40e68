"""The topk kernels (csrc/topk) run on the CPU emulator (csrc/emu): topk_radix_kernel in every
cluster size the launcher can choose on the emulated H100 (1, 2, 4, 8 and 16 CTAs per row,
decided by T and S alone: slices of at least 2048 columns spread few rows over the 132 SMs),
the key cache and the streaming fallback (a slice above the 20480-key cache re-reads global
memory every pass), the launcher's fallback to smaller clusters when the device cannot place
16 (or any) CTAs per cluster, and topk_slot_ids_kernel; exact against dsa_ext.reference, with
no hazard reported.

Every test runs in both cluster synchronisation modes of topk_radix_kernel (DSA_TOPK_SYNC,
topk_launch.cu): "mbarrier" (point-to-point mbarrier / st.async signalling, the sm_90 default;
one cluster barrier per cluster) and "cluster" (a full cluster barrier per pass, the previous
kernel); the emulator checks races across the cluster's CTAs (DSMEM) in both.

Only the columns a row may read ([ks, ke) clamped) are registered as device memory, so a read
outside its range is an out-of-bounds report; rows start off 16-byte alignment (the scalar head
of the vectorised first pass) at a row stride that is not S. Outputs start at -7, which no
answer contains, so an entry the kernel should write but does not fails the comparison.
"""
import ctypes
import json
import os
import subprocess
import sys

import pytest
import torch

import emulator as E
from conftest import randn
from dsa_ext.reference import topk as ref
from test_topk import ADVERSARIAL, _adversarial

pytestmark = pytest.mark.emu
P = E.ptr
I64 = ctypes.c_int64
RADIX, SLOT_IDS = "topk_radix_kernel", "topk_slot_ids_kernel"
# topk_kernels.cuh: threads per CTA, the per-CTA key cache, the largest cluster.
BLOCK, CACHE_KEYS, MAX_CLUSTER = 512, 20480, 16
UNWRITTEN = -7


def _setup(lib):
    lib.emu_topk_indices.argtypes = ([ctypes.c_void_p, I64, I64, I64, ctypes.c_void_p, ctypes.c_void_p]
                                     + [ctypes.c_int, ctypes.c_int, ctypes.c_void_p])
    lib.emu_topk_slot_ids.argtypes = [ctypes.c_void_p, I64, I64, ctypes.c_void_p, I64, I64, I64,
                                      ctypes.c_void_p]
    return lib


SYNC_MODES = ["mbarrier", "cluster"]


@pytest.fixture(scope="module", params=SYNC_MODES)
def sync(request):
    return request.param


@pytest.fixture(scope="module")
def lib(sync):
    lib = _setup(E.load("topk"))
    E.set_env(lib, "DSA_TOPK_SYNC", sync)  # read by the launcher at every launch
    # The launcher reads the device (SM count, the largest cluster it can place) once per
    # process, at its first call: it must see the whole emulated H100.
    E.set_env(lib, "DSA_EMU_NUM_SMS", None)
    E.set_env(lib, "DSA_EMU_MAX_CLUSTER", None)
    return lib


def rows(T, S, gen, name="random", offset=1, pad=3):
    """[T, S] logits as a view at `offset` elements into rows of S + pad: misaligned rows."""
    base = torch.empty(T, S + pad)
    base[:, offset:offset + S] = randn(T, S, gen=gen) if name == "random" else _adversarial(name, T, S, gen)
    return base[:, offset:offset + S]


def row_ranges(T, S, ks, ke):
    lo = [0] * T if ks is None else [min(max(int(v), 0), S) for v in ks]
    hi = [S] * T if ke is None else [min(max(int(v), 0), S) for v in ke]
    return [(lo[t], max(lo[t], hi[t])) for t in range(T)]


def run_topk(lib, x, k, ks=None, ke=None, sorted=False):
    """The emulated op: (out, reports, counters of topk_radix_kernel)."""
    T, S = x.shape
    out = torch.full((T, k), UNWRITTEN, dtype=torch.int32)
    in_range = [x[t, lo:hi] for t, (lo, hi) in enumerate(row_ranges(T, S, ks, ke))]
    lib.emu_clear_counters()
    reports, rc = E.run(lib.emu_topk_indices, P(x), T, S, x.stride(0), P(ks), P(ke), k, int(sorted), P(out),
                        buffers=in_range + [ks, ke, out], lib=lib)
    assert rc == 0
    return out, reports, kernel_counters(lib, RADIX)


def kernel_counters(lib, kernel):
    counters = {n: c for n, c in E.counters(lib).items() if kernel in n and c["launches"]}
    assert len(counters) == 1, f"one launch of {kernel} expected, got {list(E.counters(lib))}"
    return next(iter(counters.values()))


def cluster_size(counters, T):
    return counters["threads"] // (BLOCK * T)


def assert_topk(got, x, k, ks, ke, sorted):
    want = ref.topk_indices(x.contiguous(), k, ks, ke)
    if sorted:
        assert torch.equal(got, want), (got, want)
        return
    assert torch.equal(got.sort(1).values, want.sort(1).values)
    n_valid = (want >= 0).sum(1)
    for t in range(got.shape[0]):  # -1 only as trailing padding
        assert (got[t, :n_valid[t]] >= 0).all() and (got[t, n_valid[t]:] == -1).all()


# T, S -> the cluster size choose_cluster_size (topk_launch.cu) picks on 132 SMs: double while
# T * cs < 264 and the slices stay >= 2048 columns.
CLUSTERS = [(3, 3000, 1), (1, 4096, 2), (2, 8192, 4), (1, 16384, 8), (1, 2 * 16384, 16)]


@pytest.mark.parametrize("T,S,cs", CLUSTERS, ids=[f"cs{c[2]}" for c in CLUSTERS])
@pytest.mark.parametrize("name,k,sorted", [("random", 2049, True), ("few_distinct", 777, False)])
def test_cluster_sizes(lib, sync, gen, T, S, cs, name, k, sorted):
    """Every cluster size: the cluster histogram through distributed shared memory, CTA offsets
    for the elements above the threshold and for the tie class (few_distinct: thousands of
    equal keys, cut in index order across the cluster's CTAs), and the sort by CTA 0."""
    x = rows(T, S, gen, name)
    out, reports, counters = run_topk(lib, x, k, sorted=sorted)
    assert reports == []
    assert cluster_size(counters, T) == cs
    assert_topk(out, x, k, None, None, sorted)
    assert E.counters(lib) and (RADIX + "<(dsa::topk::SyncMode)" + ("1" if sync == "mbarrier" else "0")) in \
        next(n for n in E.counters(lib) if RADIX in n)
    if sync == "mbarrier":
        # one cluster barrier per cluster (the mbarrier inits); per pass a reduce-scatter and an
        # all-gather phase in every CTA (cs > 1), one counts phase per CTA, CTA 0's done phase
        # when sorted
        assert counters["cluster_barriers"] == T
        assert counters["mbarrier_phases"] >= T * (cs * (1 + (2 if cs > 1 else 0)) + (1 if sorted else 0))
    else:
        assert counters["cluster_barriers"] >= 3 * T and counters["mbarrier_phases"] == 0
    # the key cache: every logit is read once (the sort reads its k indices and their logits)
    assert counters["gmem_bytes_read"] == 4 * T * S + (8 * T * k if sorted else 0)


def _topk_model():
    """tools/topk_model.py (the MODEL of topk_kernels.cuh), imported by path: tools is no package."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "topk_model.py")
    if "topk_model" not in sys.modules:  # registered first: its dataclass looks itself up there
        spec = importlib.util.spec_from_file_location("topk_model", path)
        sys.modules["topk_model"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["topk_model"])
    return sys.modules["topk_model"]


# (T, S, data, k, sorted, cluster size): two sizes at cs 8 and 4, rows that stop after 2 radix
# passes (random) and rows that take all 3 (few_distinct: the threshold bin is a tie class
# larger than what is left to take; low_10_bits: the keys differ only in the last digit).
MODEL_CASES = [(1, 16384, "random", 256, False, 8), (1, 16384, "few_distinct", 777, True, 8),
               (2, 8192, "random", 300, True, 4), (2, 8192, "low_10_bits", 1000, False, 4)]


@pytest.mark.parametrize("T,S,name,k,sorted,cs", MODEL_CASES,
                         ids=[f"cs{c[5]}-{c[2]}-{'sorted' if c[4] else 'unsorted'}" for c in MODEL_CASES])
def test_sync_counts_match_the_model(lib, sync, gen, T, S, name, k, sorted, cs):
    """The MODEL's synchronisation counts per row (topk_kernels.cuh, tools/topk_model.py) are the
    kernel's: the emulator's cluster_barriers / mbarrier_phases equal the model's formulas
    (mbarrier: one cluster barrier per row and cs (2 p + 1) + sorted phases; cluster: p + 2
    barriers) with p, the radix passes, computed by the model's own replay of the kernel's
    digit loop on the same rows; and the model's cluster size is the launcher's."""
    model = _topk_model()
    x = rows(T, S, gen, name)
    out, reports, counters = run_topk(lib, x, k, sorted=sorted)
    assert reports == []
    assert_topk(out, x, k, None, None, sorted)
    assert cluster_size(counters, T) == cs == model.choose_cluster_size(T, S)
    passes = [model.radix_passes(model.topk_keys(x[t]), k)[0] for t in range(T)]
    if name != "random":  # random rows stop after 2 or 3 passes: both regimes are covered
        assert set(passes) == {3}, passes
    want = [model.sync_counts(sync, cs, p, sorted) for p in passes]
    assert counters["cluster_barriers"] == sum(w["cluster_barriers"] for w in want)
    assert counters["mbarrier_phases"] == sum(w["mbarrier_phases"] for w in want)


def test_model_pass_replay_matches_the_reference():
    """The model's pass count is the kernel's stopping rule, derived independently from the
    reference order (on the CPU, no emulator): with P_d the first d digits of the k-th largest
    key, the loop stops after the first d whose prefix class is taken whole (exactly k keys at
    or above P_d), else after all 3 digits; so the passes the test above feeds the model are
    not an echo of the counters."""
    model = _topk_model()
    masks = [0xFFE00000, 0xFFFFFC00, 0xFFFFFFFF]  # the 11-, 11- and 10-bit digits
    g = torch.Generator().manual_seed(5)
    seen = set()
    for name, S, k in (("random", 5000, 100), ("random", 131072, 2048), ("few_distinct", 4000, 777),
                       ("low_10_bits", 3000, 50), ("all_equal", 300, 7)):
        x = randn(1, S, gen=g)[0] if name == "random" else _adversarial(name, 1, S, g)[0]
        keys = model.topk_keys(x)
        p, counted = model.radix_passes(keys, k)
        kth = int(keys.sort(descending=True).values[k - 1])
        whole = [int(((keys & m) >= (kth & m)).sum()) == k for m in masks]
        assert p == next((d + 1 for d in range(3) if whole[d]), 3), (name, p, whole)
        assert counted[0] == S and all(a >= b for a, b in zip(counted, counted[1:]))
        seen.add(p)
    assert seen == {2, 3}


@pytest.mark.parametrize("name", ADVERSARIAL)
@pytest.mark.parametrize("k,sorted", [(1, False), (2049, True)])
def test_adversarial_rows(lib, gen, name, k, sorted):
    """Ties at every digit (all_equal, all_nan), differences only in the last 10-bit digit
    (low_10_bits: the 1024-bin pass), NaN below -inf, -0.0 == +0.0, on a 4-CTA cluster."""
    x = rows(1, 8192, gen, name)
    out, reports, counters = run_topk(lib, x, k, sorted=sorted)
    assert reports == []
    assert cluster_size(counters, 1) == 4
    assert_topk(out, x, k, None, None, sorted)


def test_nan_below_neg_inf_and_zero_ties(lib):
    x = torch.tensor([[float("nan"), -float("inf"), 1.0, float("nan"), -float("inf"), -0.0, 0.0, -0.0]])
    for k in (8, 3):
        out, reports, _ = run_topk(lib, x, k, sorted=True)
        assert reports == []
        assert out.tolist() == [[2, 5, 6, 7, 1, 4, 0, 3][:k]]


@pytest.mark.parametrize("which,name,k,sorted", [("both", "few_distinct", 4096, True),
                                                  ("ks", "random", 1000, False),
                                                  ("ke", "few_distinct", 333, True)])
def test_ragged_ranges(lib, gen, which, name, k, sorted):
    """8-CTA clusters over ragged rows: fewer columns than k (all taken, -1 padding spread over
    the cluster's CTAs), inverted (empty), clamped at both ends, slices of unequal length."""
    T, S = 4, 16384
    x = rows(T, S, gen, name)
    ks = torch.tensor([-5, 7000, 123, 3001], dtype=torch.int32)
    ke = torch.tensor([100, 6997, S + 50, 15000], dtype=torch.int32)
    ks, ke = (ks, ke) if which == "both" else (ks, None) if which == "ks" else (None, ke)
    out, reports, counters = run_topk(lib, x, k, ks, ke, sorted)
    assert reports == []
    assert cluster_size(counters, T) == 8
    assert_topk(out, x, k, ks, ke, sorted)


def test_streaming_fallback(lib, gen):
    """A row longer than 16 CTAs' key caches: each CTA streams its slice from global memory on
    every pass, here through all three digits (few_distinct: a tie class far larger than k, cut
    in index order), while a shorter row of the same launch still fits the cache."""
    T, S, k = 2, MAX_CLUSTER * CACHE_KEYS + 2000, 2049
    x = rows(T, S, gen, "few_distinct")
    ks = torch.tensor([0, 300], dtype=torch.int32)
    ke = torch.tensor([S, 300 + 40000], dtype=torch.int32)
    out, reports, counters = run_topk(lib, x, k, ks, ke, sorted=True)
    assert reports == []
    assert cluster_size(counters, T) == MAX_CLUSTER
    assert_topk(out, x, k, ks, ke, True)
    # row 0: three passes and the output pass over global memory; row 1: one
    assert counters["gmem_bytes_read"] >= 4 * (4 * S + 40000)


def test_k_larger_than_row_and_empty_rows(lib, gen):
    """n <= k on a 2-CTA cluster: every column in range (n == k, n < k), then -1 padding spread
    over the CTAs; empty and inverted rows all -1."""
    T, S, k = 4, 4096, 4096
    x = rows(T, S, gen)
    ks = torch.tensor([0, 10, 50, 5], dtype=torch.int32)
    ke = torch.tensor([S, 10, 40, 4000], dtype=torch.int32)
    for sorted in (False, True):
        out, reports, counters = run_topk(lib, x, k, ks, ke, sorted)
        assert reports == []
        assert cluster_size(counters, T) == 2
        assert_topk(out, x, k, ks, ke, sorted)


def test_launcher_rejects_k_above_4096(lib, gen):
    x = rows(1, 5000, gen)
    out = torch.full((1, 4097), UNWRITTEN, dtype=torch.int32)
    reports, rc = E.run(lib.emu_topk_indices, P(x), 1, 5000, x.stride(0), None, None, 4097, 0, P(out),
                        buffers=[x, out], lib=lib)
    assert rc != 0 and reports == [] and (out == UNWRITTEN).all()


@pytest.mark.skipif(not E.FULL, reason="random shapes, ranges and data: DSA_EMU_FULL=1")
@pytest.mark.parametrize("seed", range(16))
def test_random_cases(lib, seed):
    g = torch.Generator().manual_seed(seed)
    draw = lambda n: int(torch.randint(0, n, (1,), generator=g))  # noqa: E731
    T, S, k = 1 + draw(3), 1 + draw(40000), 1 + draw(4096)
    names, offset = ["random"] + ADVERSARIAL, draw(4)
    x = rows(T, S, g, names[draw(len(names))], offset=offset, pad=offset + draw(6))
    ks = ke = None
    if draw(2):
        ks = torch.randint(-5, S // 2 + 1, (T,), generator=g, dtype=torch.int32)
        ke = ks + torch.randint(-5, S + 1, (T,), generator=g, dtype=torch.int32)
    sorted = bool(draw(2))
    out, reports, _ = run_topk(lib, x, k, ks, ke, sorted)
    assert reports == []
    assert_topk(out, x, k, ks, ke, sorted)


# ---- the launcher's cluster fallback: a device that cannot place large clusters -------------

_CHILD = r"""
import json, sys, torch
sys.path[:0] = [{tests!r}]
import emulator as E, test_emu_topk as t
lib = t._setup(E.load("topk"))
res = []
for S, k, sorted in {cases!r}:
    x = t.rows(1, S, torch.Generator().manual_seed(S), "few_distinct")
    out, reports, counters = t.run_topk(lib, x, k, sorted=sorted)
    want = t.ref.topk_indices(x.contiguous(), k)
    ok = torch.equal(out, want) if sorted else torch.equal(out.sort(1).values, want.sort(1).values)
    res.append(dict(cs=t.cluster_size(counters, 1), ok=ok, reports=reports, read=counters["gmem_bytes_read"]))
print(json.dumps(res))
"""


@pytest.mark.parametrize("max_cluster,S,cs", [("8", 2 * 16384, 8), ("1", CACHE_KEYS + 3000, 1)])
@pytest.mark.parametrize("sync", SYNC_MODES)
def test_cluster_fallback(max_cluster, S, cs, sync):
    """The launcher asks cudaOccupancyMaxActiveClusters for 16, 8, ... CTAs and takes the
    largest the device can place (the emulator's DSA_EMU_MAX_CLUSTER caps it; the launcher
    decides once per process, hence a child process). With no clusters at all, a row above
    one key cache streams on a single CTA."""
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, DSA_EMU_MAX_CLUSTER=max_cluster, DSA_TOPK_SYNC=sync)
    env.pop("DSA_EMU_NUM_SMS", None)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(tests), tests, env.get("PYTHONPATH", "")])
    cases = [(S, 2049, True)]
    child = subprocess.run([sys.executable, "-c", _CHILD.format(tests=tests, cases=cases)], env=env,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr
    for r in json.loads(child.stdout.strip().splitlines()[-1]):
        assert r["reports"] == [] and r["ok"] and r["cs"] == cs
        if S > cs * CACHE_KEYS:
            assert r["read"] >= 3 * 4 * S  # streamed


# ---- topk_slot_ids_kernel ---------------------------------------------------------------------

@pytest.mark.parametrize("B,N,K,block_size", [(3, 1, 64, 64), (4, 2, 100, 16), (2, 4, 7, 1)])
def test_slot_ids(lib, gen, B, N, K, block_size):
    """Negative positions, blocks past the table, unallocated (negative) table entries and a
    slot id past int32 all give -1; a row maps through its sequence's table row (R / B rows per
    sequence)."""
    M = 9
    table = torch.randperm(1000, generator=gen)[: B * M].reshape(B, M).int()
    table[0, 3] = -1
    if block_size > 1:
        table[B - 1, 2] = 2**31 // block_size  # every slot id of this block is past int32
    idx = torch.randint(-3, M * block_size + 40, (B * N, K), generator=gen, dtype=torch.int32)
    idx[:, 0] = -1
    idx[0, 1] = 3 * block_size
    idx[-1, -1] = 2 * block_size
    out = torch.full_like(idx, UNWRITTEN)
    lib.emu_clear_counters()
    reports, rc = E.run(lib.emu_topk_slot_ids, P(idx), B * N, K, P(table), B, M, block_size, P(out),
                        buffers=[idx, table, out], lib=lib)
    assert rc == 0
    assert reports == []
    assert torch.equal(out, ref.topk_slot_ids(idx, table, block_size))
    assert kernel_counters(lib, SLOT_IDS)["threads"] >= B * N * K
