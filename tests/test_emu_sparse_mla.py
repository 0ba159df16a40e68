"""The sparse_mla kernels (csrc/sparse_mla) run on the CPU emulator (csrc/emu): every kernel the
launchers can select (the mma.sync forward for head blocks of 16, 32 and 64, the opt-in wgmma
forward for 64, the backward for each head block with fp32 atomics and deterministic with its
count / scan / fill / reduce kernels), each at both latent widths d_qk = 576 (V3.2 / GLM-5) and
512 (V4, K == V), and H = 8 (one 16-row head block with 8 rows masked), against
dsa_ext.reference within the CUDA tolerances of test_sparse_mla.py, with no hazard reported
(H = 128 included: the whole file takes about 30 s here).

kv, indices, lengths and sink are registered as device memory exactly, so a gather of a skipped
entry (-1, other negatives, S, 2^31 - 1, or past topk_length) is an out-of-bounds report, not a
silent zero. Outputs start as NaN (dkv_acc as zero, as the launcher requires), so an element the
kernels should write but do not fails the comparison. Shapes are tiny (a few tokens, K <= 150;
only the two-chunk deterministic case has K = 65536, cut short by topk_length) but span several
KV blocks with a ragged last one (64-token blocks forward, 32 backward), so the double-buffered
gathers, the online softmax rescale and the block loop's barriers all run.
"""
import ctypes
import re

import pytest
import torch

import emulator as E
from conftest import randn, rel_err
from dsa_ext import reference as ref
from test_sparse_mla import D_V

pytestmark = pytest.mark.emu
P = E.ptr
I64, VP = ctypes.c_int64, ctypes.c_void_p
D_QKS = (576, 512)          # the two latent widths the kernels are instantiated for
SCALE = 576 ** -0.5
# test_sparse_mla.py's CUDA tolerances: check_fwd (out rel. error; lse atol / rtol) and
# check_bwd (dq, dkv rel. error).
OUT_TOL, LSE_ATOL, LSE_RTOL, GRAD_TOL = 1e-2, 1e-3, 1e-4, 2e-2
WGMMA_ENV = "DSA_SPARSE_MLA_WGMMA"   # the earlier opt-in (= DSA_SPARSE_MLA_FWD=wgmma)
FWD_ENV = "DSA_SPARSE_MLA_FWD"       # ws | wgmma | mma (unset: ws for 64-head blocks)
BWD_ENV = "DSA_SPARSE_MLA_BWD"       # wgmma | mma (unset: wgmma for 64-head blocks)
BUDGET_ENV = "DSA_SPARSE_MLA_DET_SCRATCH_MB"   # the deterministic scratch budget (MiB; 0 = none)
# the deterministic design: fixed (default: fixed point where S x d_qk x 8 <= the budget) | list |
# bitmap (chunked, inverse index)
REDUCE_ENV = "DSA_SPARSE_MLA_DET_REDUCE"
# the deterministic reduction's kernels per mode (instantiated per d_qk where templated)
DETERMINISTIC_KERNELS = {
    "fixed": ("fixed_point_bound_kernel<{d}>", "fixed_point_finish_kernel"),
    "list": ("count_rows_kernel", "alloc_rows_kernel", "fill_rows_kernel", "reduce_rows_kernel<{d}>",
             "reduce_big_rows_kernel<{d}>"),
    "bitmap": ("count_rows_kernel", "scan_rows_kernel", "fill_rows_kernel",
               "reduce_rows_bitmap_kernel<{d}>"),
}


@pytest.fixture(scope="module")
def lib():
    lib = E.load("sparse_mla")
    lib.emu_sparse_mla_fwd.argtypes = [VP] * 7 + [I64] * 5 + [ctypes.c_float]
    lib.emu_sparse_mla_bwd_workspace.argtypes = [I64] * 5 + [VP]
    lib.emu_sparse_mla_bwd_workspace.restype = None
    lib.emu_sparse_mla_bwd_workspace_for.argtypes = [I64] * 6 + [VP]   # out: 6 words
    lib.emu_sparse_mla_bwd_workspace_for.restype = None
    lib.emu_sparse_mla_bwd.argtypes = [VP] * 12 + [I64] * 5 + [ctypes.c_float, ctypes.c_int]
    yield lib
    E.set_env(lib, WGMMA_ENV, None)
    E.set_env(lib, FWD_ENV, None)
    E.set_env(lib, BWD_ENV, None)
    E.set_env(lib, BUDGET_ENV, None)
    E.set_env(lib, REDUCE_ENV, None)


def make_inputs(T, H, S, K, gen, invalid_frac=0.1, scale_q=1.0, d_qk=576):
    """q [T, H, d_qk], kv [S, 1, d_qk] bf16, indices [T, 1, K] with -1 and out-of-range entries."""
    q = randn(T, H, d_qk, gen=gen, dtype=torch.bfloat16, scale=scale_q)
    kv = randn(S, 1, d_qk, gen=gen, dtype=torch.bfloat16)
    idx = torch.randint(0, S, (T, 1, K), generator=gen, dtype=torch.int32)
    r = torch.rand(T, 1, K, generator=gen)
    idx[r < invalid_frac / 2] = -1
    idx[(r >= invalid_frac / 2) & (r < invalid_frac)] = S
    return q, kv, idx


def kernels_launched(lib):
    """{kernel name without its return type and parameter list: counters} of the launches since
    the last clear ("dsa::sparse_mla::sparse_mla_fwd_kernel<16, 576>")."""
    return {re.sub(r"^void\s+", "", name.split("(")[0]): c
            for name, c in E.counters(lib).items() if c["launches"]}


def run_fwd(lib, q, kv, idx, sm_scale, sink=None, tl=None, kernel="mma", legacy=False):
    """The emulated sparse_mla_fwd: (out, lse, reports). kernel: DSA_SPARSE_MLA_FWD (None: unset,
    the launcher's default); legacy: DSA_SPARSE_MLA_WGMMA=1 instead. True / False (the earlier
    wgmma flag) mean "wgmma" / "mma"."""
    if kernel is True or kernel is False:
        kernel = "wgmma" if kernel else "mma"
    T, H, D = q.shape
    S, K = kv.shape[0], idx.shape[2]
    out = torch.full((T, H, D_V), float("nan"), dtype=torch.bfloat16)
    lse = torch.full((T, H), float("nan"))
    E.set_env(lib, FWD_ENV, None if legacy else kernel)
    E.set_env(lib, WGMMA_ENV, "1" if legacy else None)
    try:
        reports, rc = E.run(lib.emu_sparse_mla_fwd, P(q), P(kv), P(idx), P(sink), P(tl), P(out), P(lse),
                            T, S, H, K, D, sm_scale, buffers=[q, kv, idx, sink, tl, out, lse], lib=lib)
    finally:
        E.set_env(lib, FWD_ENV, None)
        E.set_env(lib, WGMMA_ENV, None)
    assert rc == 0, (rc, reports[:3])
    return out, lse, reports


def check_fwd(out, lse, q, kv, idx, sm_scale, sink=None, tl=None):
    """test_sparse_mla.check_fwd's comparison, at its CUDA tolerances."""
    r_out, r_lse = ref.sparse_mla_fwd(q, kv, idx, sm_scale, D_V, sink, tl)
    assert not torch.isnan(out.float()).any() and not torch.isnan(lse).any(), "unwritten outputs"
    assert rel_err(out, r_out) < OUT_TOL
    empty = torch.isneginf(r_lse)
    assert torch.equal(torch.isneginf(lse), empty), "empty rows must give lse = -inf exactly"
    assert torch.allclose(lse[~empty], r_lse[~empty], atol=LSE_ATOL, rtol=LSE_RTOL)
    assert (out[empty] == 0).all(), "empty rows must give out = 0"


def run_bwd(lib, q, kv, out, dout, idx, lse, sm_scale, sink=None, tl=None, deterministic=False,
            kernel=None):
    """The emulated sparse_mla_bwd: (dq, dkv_acc fp32 [S, d_qk], reports). The deterministic
    workspace is sized as the glue sizes it and starts as NaN / garbage. kernel:
    DSA_SPARSE_MLA_BWD (None: unset)."""
    T, H, D = q.shape
    S, K = kv.shape[0], idx.shape[2]
    dq = torch.full_like(q, float("nan"))
    dkv_acc = torch.zeros(S, D)
    scratch = ints = None
    if deterministic:
        sizes = (ctypes.c_int64 * 4)()
        lib.emu_sparse_mla_bwd_workspace(T, S, H, K, D, sizes)
        scratch = torch.full((sizes[0],), float("nan"))
        ints = torch.full((sizes[1],), -12345, dtype=torch.int32)
    E.set_env(lib, BWD_ENV, kernel)
    try:
        reports, rc = E.run(lib.emu_sparse_mla_bwd, P(q), P(kv), P(out), P(dout), P(idx), P(lse),
                            P(sink), P(tl), P(dq), P(dkv_acc), P(scratch), P(ints), T, S, H, K, D,
                            sm_scale, int(deterministic),
                            buffers=[q, kv, out, dout, idx, lse, sink, tl, dq, dkv_acc, scratch, ints],
                            lib=lib)
    finally:
        E.set_env(lib, BWD_ENV, None)
    assert rc == 0, (rc, reports[:3])
    return dq, dkv_acc, reports


def bwd_case(lib, gen, q, kv, idx, sm_scale, sink=None, tl=None, deterministic=False, kernel=None):
    """Forward by the reference, backward emulated with no report and compared with the
    reference backward (test_sparse_mla.check_bwd at its CUDA tolerance). Returns (dq, dkv_acc)."""
    out, lse = ref.sparse_mla_fwd(q, kv, idx, sm_scale, D_V, sink, tl)
    dout = randn(*out.shape, gen=gen, dtype=torch.bfloat16)
    dq, dkv_acc, reports = run_bwd(lib, q, kv, out, dout, idx, lse, sm_scale, sink, tl, deterministic,
                                   kernel)
    assert reports == []
    r_dq, r_dkv = ref.sparse_mla_bwd(q, kv, out, dout, idx, lse, sm_scale, D_V, sink, tl)
    assert not torch.isnan(dq.float()).any() and not torch.isnan(dkv_acc).any(), "unwritten outputs"
    assert rel_err(dq, r_dq) < GRAD_TOL
    # the glue casts dkv_acc to bf16: compare what the op returns
    assert rel_err(dkv_acc.to(torch.bfloat16), r_dkv.view(-1, q.shape[2])) < GRAD_TOL
    return dq, dkv_acc


# ---- forward ---------------------------------------------------------------------------------

def fwd_kernel(hb, d_qk, kern, pair=False):
    """The kernel the launcher runs for a head block of hb and the switch's kernel."""
    if hb == 64 and kern in ("wgmma", "legacy"):
        return f"sparse_mla_fwd_wgmma_kernel<{d_qk}>"
    if hb == 64 and kern in ("ws-pair", None):  # unset: the sm_90a default, paired at H % 128 == 0
        return f"sparse_mla_fwd_ws_kernel<{d_qk}, {'true' if pair else 'false'}>"
    if hb == 64 and kern == "ws":
        return f"sparse_mla_fwd_ws_kernel<{d_qk}, false>"
    return f"sparse_mla_fwd_kernel<{hb}, {d_qk}>"


# name -> (H, DSA_SPARSE_MLA_FWD (None: unset; "legacy": DSA_SPARSE_MLA_WGMMA=1), head block).
# H = 8 is one 16-row block with rows 8..15 masked; H = 48 (kernel-level only: the glue admits
# {8, 16, 32, 64, 128}) and 128 give several head blocks per token; wgmma / ws with H = 32 or 8
# is not a 64-head block: the launcher falls back to mma.sync. Unset: ws for H = 64 / 128 (the
# emulator plays an sm_90a device), mma.sync for the other H.
FWD_VARIANTS = {
    "h8": (8, "mma", 16),
    "hb16": (16, "mma", 16),
    "hb16x3": (48, "mma", 16),
    "hb32": (32, "mma", 32),
    "hb64": (64, "mma", 64),
    "hb64x2": (128, "mma", 64),
    "wgmma": (64, "wgmma", 64),
    "wgmma-x2": (128, "wgmma", 64),
    "wgmma-legacy-env": (64, "legacy", 64),
    "wgmma-fallback-hb32": (32, "wgmma", 32),
    "wgmma-fallback-h8": (8, "wgmma", 16),
    "ws": (64, "ws", 64),
    "ws-x2": (128, "ws", 64),
    "ws-fallback-hb32": (32, "ws", 32),
    "ws-pair": (128, "ws-pair", 64),
    "ws-pair-h64": (64, "ws-pair", 64),   # no pair at one head block: ws
    "default-h64": (64, None, 64),
    "default-h128": (128, None, 64),
    "default-h16": (16, None, 16),
}


def run_variant(lib, variant, q, kv, idx, sm_scale, sink=None, tl=None):
    kern = FWD_VARIANTS[variant][1]
    return run_fwd(lib, q, kv, idx, sm_scale, sink, tl, kernel=None if kern == "legacy" else kern,
                   legacy=kern == "legacy")


@pytest.mark.parametrize("extras", [False, True], ids=["plain", "sink+topk_length"])
@pytest.mark.parametrize("variant", list(FWD_VARIANTS))
@pytest.mark.parametrize("d_qk", D_QKS)
def test_fwd_every_kernel(lib, gen, variant, extras, d_qk):
    """T = 3, K = 150: three 64-token blocks, the last ragged (entries past K are skipped);
    -1 and S among the indices. With extras: a sink and lengths 0 (empty row), 65 (a block
    and one entry) and 500 (clamped to K)."""
    H, kern, hb = FWD_VARIANTS[variant]
    kernel = fwd_kernel(hb, d_qk, kern, pair=H % 128 == 0)
    T, S, K = 3, 200, 150
    q, kv, idx = make_inputs(T, H, S, K, gen, scale_q=3.0, d_qk=d_qk)
    sink = randn(H, gen=gen) * 2 if extras else None
    tl = torch.tensor([0, 65, 500], dtype=torch.int32) if extras else None
    lib.emu_clear_counters()
    out, lse, reports = run_variant(lib, variant, q, kv, idx, SCALE, sink, tl)
    assert reports == []
    check_fwd(out, lse, q, kv, idx, SCALE, sink, tl)
    if extras:
        assert torch.isneginf(lse[0]).all() and torch.isfinite(lse[1:]).all()

    kernels = kernels_launched(lib)
    assert list(kernels) == [f"dsa::sparse_mla::{kernel}"], list(kernels)
    c = kernels[f"dsa::sparse_mla::{kernel}"]
    limits = [K] * T if tl is None else tl.clamp(0, K).tolist()
    nhb = -(-H // hb)
    assert c["ctas"] == T * nhb
    assert {k: c[k] for k in FWD_WORK} == fwd_work(kernel, limits, nhb, d_qk)


@pytest.mark.parametrize("d_qk", D_QKS)
def test_fwd_ws_pair_equals_ws(lib, gen, d_qk):
    """The ws pair (2-CTA clusters, each CTA gathering half of every block and forwarding it to
    its peer by st.async) computes on the same shared-memory contents as the unpaired ws kernel:
    out and lse bitwise equal, over 7 blocks a row (each ring stage reused 3-4 times: the
    full / peer_free parities wrap), an empty row, -1 / out-of-range entries, a sink. It gathers
    half the bytes, and its clusters meet twice (after the barrier inits, before exit)."""
    T, H, S, K = 3, 128, 300, 400
    q, kv, idx = make_inputs(T, H, S, K, gen, scale_q=3.0, d_qk=d_qk)
    sink = randn(H, gen=gen) * 2
    tl = torch.tensor([400, 0, 333], dtype=torch.int32)
    runs = {}
    for kern in ("ws", "ws-pair"):
        lib.emu_clear_counters()
        out, lse, reports = run_fwd(lib, q, kv, idx, SCALE, sink, tl, kernel=kern)
        assert reports == []
        runs[kern] = (out, lse, kernels_launched(lib))
    assert torch.equal(runs["ws"][0], runs["ws-pair"][0])
    assert torch.equal(runs["ws"][1], runs["ws-pair"][1])
    check_fwd(runs["ws-pair"][0], runs["ws-pair"][1], q, kv, idx, SCALE, sink, tl)
    one = runs["ws"][2][f"dsa::sparse_mla::sparse_mla_fwd_ws_kernel<{d_qk}, false>"]
    pair = runs["ws-pair"][2][f"dsa::sparse_mla::sparse_mla_fwd_ws_kernel<{d_qk}, true>"]
    blocks = 2 * (7 + 0 + 6)                        # per head block: 400 -> 7, 0, 333 -> 6
    q_bytes = T * H * d_qk * 2
    assert one["cp_async_bytes"] - q_bytes == blocks * 64 * d_qk * 2
    assert pair["cp_async_bytes"] - q_bytes == blocks * 32 * d_qk * 2
    assert one["cluster_barriers"] == 0 and pair["cluster_barriers"] == 2 * T


FWD_WORK = ("cp_async_bytes", "mma_sync", "ldmatrix", "wgmma", "barriers")


def fwd_work(kernel, limits, head_blocks, d_qk):
    """What the forward kernel issues for rows of these lengths (each row once per head block):
    the Q tile (masked head rows zero-filled: copies too) and one 64-row gather per KV block
    (zero-filled entries are copies too); per block and warp d_qk / 16 = 36 or 32 k-steps of S
    (4 mma, 1 + 2 ldmatrix) and 4 of P·V (32 mma per warp's tile of O;
    ldmatrix: one P fragment per 16-row tile, one V fragment per two n-tiles); 4 barriers per
    block and the epilogue's (wgmma: per block 36 wgmma of S and 4 of P·V per warpgroup, the
    barriers after the softmax and at the block's end, the prologue's and the epilogue's; ws:
    the same wgmma, no CTA barrier per block (mbarriers between the warpgroups, named barriers
    within each), the prologue's and epilogue's; the ws pair copies 32 rows a block)."""
    hb = int(re.search(r"<(\d+)", kernel).group(1)) if "wgmma" not in kernel and "ws" not in kernel else 64
    k_steps = d_qk // 16
    blocks = head_blocks * sum((n + 63) // 64 for n in limits)
    ctas = head_blocks * len(limits)
    # the ws pair (", true>"): each CTA gathers half of every block, the peer forwards the rest
    gathered = 32 if ", true>" in kernel else 64
    work = {"cp_async_bytes": (ctas * hb + blocks * gathered) * d_qk * 2}
    if "wgmma" in kernel:
        work.update(mma_sync=0, ldmatrix=0, wgmma=blocks * (k_steps + 2 * 4), barriers=2 * blocks + 2 * ctas)
    elif "_ws_" in kernel:
        # named barriers: consumer 0's two per block (around the softmax), the producer's one
        # per block with a successor (its warps done with the stage it refills)
        named = head_blocks * sum(3 * ((n + 63) // 64) - 1 for n in limits if n > 0)
        work.update(mma_sync=0, ldmatrix=0, wgmma=blocks * (k_steps + 2 * 4), barriers=2 * ctas + named)
    else:
        warps, pv_tiles = hb // 8, 2 if hb >= 32 else 1
        work.update(mma_sync=blocks * warps * (4 * k_steps + 4 * 32),
                    ldmatrix=blocks * warps * (3 * k_steps + 4 * (pv_tiles + 16 // pv_tiles)),
                    wgmma=0, barriers=4 * blocks + ctas)
    return work


@pytest.mark.parametrize("d_qk", D_QKS)
@pytest.mark.parametrize("kern", ["mma", "wgmma", "ws"])
def test_fwd_adversarial_indices(lib, gen, kern, d_qk):
    """test_sparse_mla.test_fwd_adversarial_indices on the emulator: runs of -1, S, other
    negatives, 2^31 - 1, an empty row, one row repeated K times, a half-invalid row, ties.
    mma.sync at H = 8 (the masked head block)."""
    T, H, S, K = 6, 8 if kern == "mma" else 64, 200, 128
    q, kv, idx = make_inputs(T, H, S, K, gen, invalid_frac=0.0, d_qk=d_qk)
    idx[0, 0, 10:70] = -1
    idx[1, 0, ::3] = S
    idx[1, 0, 1::7] = -5
    idx[1, 0, 2::11] = 2**31 - 1
    idx[2] = -1
    idx[3, 0, :] = 7
    idx[4, 0, 64:] = S + 1000
    idx[5, 0, :] = idx[5, 0, torch.arange(K) % 5]
    out, lse, reports = run_fwd(lib, q, kv, idx, SCALE, kernel=kern)
    assert reports == []
    check_fwd(out, lse, q, kv, idx, SCALE)
    assert torch.isneginf(lse[2]).all() and (out[2] == 0).all()
    torch.testing.assert_close(out[3].float(), kv[7, 0, :D_V].float().expand(H, D_V), atol=1e-2, rtol=0)


@pytest.mark.parametrize("d_qk", D_QKS)
@pytest.mark.parametrize("kern", ["mma", "wgmma", "ws"])
def test_fwd_empty_rows(lib, gen, kern, d_qk):
    """Every row empty, three ways: all indices -1; all out of range; lengths 0 and negative
    (valid indices never read). Also a sink, which must not make an empty row non-empty."""
    T, H, S, K = 3, 64, 50, 64
    q, kv, idx = make_inputs(T, H, S, K, gen, d_qk=d_qk)
    sink = randn(H, gen=gen)
    for case_idx, tl in ((torch.full_like(idx, -1), None),
                         (torch.tensor([S, 2**31 - 1, -7], dtype=torch.int32).repeat_interleave(K).view(T, 1, K), None),
                         (idx, torch.tensor([0, -3, 0], dtype=torch.int32))):
        out, lse, reports = run_fwd(lib, q, kv, case_idx.contiguous(), 0.1, sink, tl, kern)
        assert reports == []
        assert (out == 0).all() and torch.isneginf(lse).all()


# ---- backward --------------------------------------------------------------------------------

# name -> (H, head block, DSA_SPARSE_MLA_BWD (None: unset)). Unset, 64-head blocks take the
# wgmma kernel (the emulator plays an sm_90a device); "mma" the mma.sync one; wgmma asked for
# with H = 32 is not a 64-head block: mma.sync.
BWD_VARIANTS = {
    "h8": (8, 16, None),
    "hb16": (16, 16, None),
    "hb16x3": (48, 16, None),
    "hb32": (32, 32, None),
    "hb64": (64, 64, "mma"),
    "hb64x2": (128, 64, "mma"),
    "wgmma": (64, 64, None),
    "wgmma-x2": (128, 64, None),
    "wgmma-named": (64, 64, "wgmma"),
    "wgmma-fallback-hb32": (32, 32, "wgmma"),
}


def bwd_kernel(hb, d_qk, kern):
    """The main backward kernel the launcher runs for a head block of hb and the switch."""
    if hb == 64 and kern in (None, "wgmma"):
        return f"sparse_mla_bwd_wgmma_kernel<{d_qk}>"
    return f"sparse_mla_bwd_kernel<{hb}, {d_qk}>"


def bwd_wgmma_per_step(d_qk):
    """wgmma instructions (one per warpgroup) of a 32-row step of the wgmma backward: S and dP
    by each warpgroup (d_qk / 16 + 32), dQ (2 k steps, n256 + n32 at 576), 8 value tiles of
    dKVᵀ (4 + 4), the rope tile's 4 at 576."""
    return 2 * (d_qk // 16 + 32) + 2 * 2 * (2 if d_qk == 576 else 1) + 8 * 8 + (4 if d_qk == 576 else 0)


@pytest.mark.parametrize("mode", ["atomic", "fixed", "list", "bitmap"])
@pytest.mark.parametrize("variant", list(BWD_VARIANTS))
@pytest.mark.parametrize("d_qk", D_QKS)
def test_bwd_every_kernel(lib, gen, variant, mode, d_qk):
    """T = 3, K = 70 (three 32-token blocks, the last ragged), S = 40 < K so dkv rows collect
    many contributions across tokens and head blocks; a sink, lengths 70, 33 and 0. At
    d_qk = 512 every dkv column sums the key and the value role. Deterministic: both inverse
    index builds ("list": grids sized by the 173 entries, never by S; "bitmap": S reduce CTAs)
    and the fixed-point design (one main launch between the bound and finish passes)."""
    H, hb, kern = BWD_VARIANTS[variant]
    deterministic = mode != "atomic"
    kernel = bwd_kernel(hb, d_qk, kern)
    T, S, K = 3, 40, 70
    q, kv, idx = make_inputs(T, H, S, K, gen, scale_q=2.0, d_qk=d_qk)
    sink = randn(H, gen=gen)
    tl = torch.tensor([70, 33, 0], dtype=torch.int32)
    lib.emu_clear_counters()
    E.set_env(lib, REDUCE_ENV, mode if deterministic else None)
    try:
        dq, _ = bwd_case(lib, gen, q, kv, idx, SCALE, sink, tl, deterministic, kern)
    finally:
        E.set_env(lib, REDUCE_ENV, None)
    assert (dq[2] == 0).all()

    kernels = kernels_launched(lib)
    main = kernels.pop(f"dsa::sparse_mla::{kernel}")
    assert main["ctas"] == T * -(-H // hb)
    if "wgmma" in kernel:  # steps of 32 rows: lengths 70 and 33 -> 3 + 2 per head block
        assert main["mma_sync"] == 0 and main["ldmatrix"] == 0
        assert main["wgmma"] == (H // 64) * 5 * bwd_wgmma_per_step(d_qk)
    else:
        assert main["mma_sync"] > 0 and main["ldmatrix"] > 0
    expected = sorted(k.format(d=d_qk) for k in DETERMINISTIC_KERNELS[mode]) if deterministic else []
    assert sorted(k.split("::")[-1] for k in kernels) == expected
    if mode == "fixed":  # grid-stride passes, at most 1024 CTAs of 256 threads
        ctas = {k.split("::")[-1]: c["ctas"] for k, c in kernels.items()}
        groups = max(T * H * d_qk // 8, S * 64)
        assert ctas == {f"fixed_point_bound_kernel<{d_qk}>": -(-groups // 256),
                        "fixed_point_finish_kernel": -(-S * d_qk // 256)}
    elif deterministic:  # one chunk of T * K = 210 entries: a thread per entry in count / fill
        ctas = {k.split("::")[-1]: (c["ctas"], c["threads"]) for k, c in kernels.items()}
        per_entry = (-(-T * K // 256), -(-T * K // 256) * 256)
        if mode == "bitmap":  # one 1024-thread scan, a CTA per kv row
            assert ctas == {"count_rows_kernel": per_entry, "scan_rows_kernel": (1, 1024),
                            "fill_rows_kernel": per_entry,
                            f"reduce_rows_bitmap_kernel<{d_qk}>": (S, 160 * S)}
        else:  # a warp per entry (capped), a big-row CTA per 33 entries: nothing sized by S
            warps, big = -(-T * K // 8), T * K // 33 + 1
            assert ctas == {"count_rows_kernel": per_entry, "alloc_rows_kernel": per_entry,
                            "fill_rows_kernel": per_entry,
                            f"reduce_rows_kernel<{d_qk}>": (warps, 256 * warps),
                            f"reduce_big_rows_kernel<{d_qk}>": (big, 160 * big)}


@pytest.mark.parametrize("d_qk", D_QKS)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_bwd_sink_topk_length_adversarial(lib, gen, deterministic, d_qk):
    """test_sparse_mla.test_bwd_sink_topk_length_adversarial on the emulator: an all -1 row, a
    row repeating one kv row 40 times, half its entries out of range, lengths 0 and 65; H = 8
    (the masked head block)."""
    T, H, S, K = 5, 8, 90, 128
    q, kv, idx = make_inputs(T, H, S, K, gen, scale_q=2.0, d_qk=d_qk)
    idx[0] = -1
    idx[1, 0, :40] = 3
    idx[2, 0, ::2] = S + 7
    idx[2, 0, 1::4] = 2**31 - 1
    sink = randn(H, gen=gen)
    tl = torch.tensor([128, 100, 128, 0, 65], dtype=torch.int32)
    dq, _ = bwd_case(lib, gen, q, kv, idx, SCALE, sink, tl, deterministic)
    assert (dq[0] == 0).all() and (dq[3] == 0).all()


@pytest.mark.parametrize("d_qk", D_QKS)
def test_bwd_deterministic_matches_atomic(lib, gen, d_qk):
    """Both reductions of the same contributions agree to fp32 rounding (the deterministic one
    sums each row in (head block, token, slot) order, the atomic one in arrival order)."""
    T, H, S, K = 2, 32, 24, 64
    q, kv, idx = make_inputs(T, H, S, K, gen, d_qk=d_qk)
    out, lse = ref.sparse_mla_fwd(q, kv, idx, SCALE)
    dout = randn(*out.shape, gen=gen, dtype=torch.bfloat16)
    dq_a, dkv_a, rep_a = run_bwd(lib, q, kv, out, dout, idx, lse, SCALE, deterministic=False)
    dq_d, dkv_d, rep_d = run_bwd(lib, q, kv, out, dout, idx, lse, SCALE, deterministic=True)
    assert rep_a == [] and rep_d == []
    assert torch.equal(dq_a, dq_d)
    torch.testing.assert_close(dkv_d, dkv_a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("budget_mb,chunks", [(None, 3), ("0", 2)], ids=["64MiB", "no-budget"])
def test_bwd_deterministic_several_chunks(lib, gen, budget_mb, chunks):
    """K = 65536: one token's contributions (65536 x 576 x 4 bytes = 144 MiB) exceed the 64 MiB
    budget, so every token is its own chunk (three launches, t_begin = 0, 1, 2); without a budget
    (the earlier chunking) two tokens share a chunk of 131072 entries (two launches). topk_length
    keeps the work small (the count / fill kernels still visit every one of the chunk's
    entries)."""
    T, H, S, K = 3, 16, 30, 65536
    q, kv, idx = make_inputs(T, H, S, K, gen)
    tl = torch.tensor([40, 0, 70], dtype=torch.int32)
    E.set_env(lib, BUDGET_ENV, budget_mb)
    E.set_env(lib, REDUCE_ENV, "list")
    try:
        lib.emu_clear_counters()
        dq, _ = bwd_case(lib, gen, q, kv, idx, SCALE, None, tl, deterministic=True)
    finally:
        E.set_env(lib, BUDGET_ENV, None)
        E.set_env(lib, REDUCE_ENV, None)
    assert (dq[1] == 0).all()
    kernels = kernels_launched(lib)
    assert kernels["dsa::sparse_mla::sparse_mla_bwd_kernel<16, 576>"]["launches"] == chunks
    assert kernels["dsa::sparse_mla::reduce_rows_kernel<576>"]["launches"] == chunks


@pytest.mark.parametrize("d_qk", D_QKS)
def test_bwd_deterministic_any_budget_same_bits(lib, gen, d_qk):
    """Every dkv row sums its contributions in (token, slot, head block) order and each chunk
    continues the sums of the previous ones, so the chunking (the scratch budget) cannot change
    a bit: 1 MiB (a few tokens per chunk: 4 chunks at d_qk 576), the default 64 MiB (one
    chunk) and no budget give identical dq and dkv. H = 8 and 128 (two head blocks)."""
    T, S, K = 13, 30, 70
    for H in (8, 128):
        q, kv, idx = make_inputs(T, H, S, K, gen, d_qk=d_qk)
        out, lse = ref.sparse_mla_fwd(q, kv, idx, SCALE)
        dout = randn(*out.shape, gen=gen, dtype=torch.bfloat16)
        results = []
        for budget in ("1", None, "0"):
            E.set_env(lib, BUDGET_ENV, budget)
            E.set_env(lib, REDUCE_ENV, "list")
            try:
                sizes = (ctypes.c_int64 * 4)()
                lib.emu_sparse_mla_bwd_workspace(T, S, H, K, d_qk, sizes)
                lib.emu_clear_counters()
                dq, dkv, reports = run_bwd(lib, q, kv, out, dout, idx, lse, SCALE, deterministic=True)
            finally:
                E.set_env(lib, BUDGET_ENV, None)
                E.set_env(lib, REDUCE_ENV, None)
            assert reports == []
            chunks = -(-T // sizes[3])
            if budget == "1":
                nhb = -(-H // (64 if H % 64 == 0 else 16))
                assert sizes[3] == max(1, (1 << 20) // (nhb * K * d_qk * 4)) and chunks > 1
                assert sizes[0] * 4 <= 1 << 20 or sizes[3] == 1
            else:
                assert chunks == 1
            launched = kernels_launched(lib)[f"dsa::sparse_mla::reduce_rows_kernel<{d_qk}>"]
            assert launched["launches"] == chunks
            results.append((dq, dkv))
        r_dq, r_dkv = ref.sparse_mla_bwd(q, kv, out, dout, idx, lse, SCALE)
        assert rel_err(results[0][0], r_dq) < GRAD_TOL
        assert rel_err(results[0][1].to(torch.bfloat16), r_dkv.view(S, d_qk)) < GRAD_TOL
        for dq, dkv in results[1:]:
            assert torch.equal(dq, results[0][0])
            assert torch.equal(dkv, results[0][1])


@pytest.mark.parametrize("d_qk", D_QKS)
def test_bwd_det_list_reduce_same_bits_as_bitmap(lib, gen, d_qk):
    """The "list" inverse index (work proportional to the entries) and the earlier "bitmap" one
    sum every dkv row in the same order: bitwise equal dkv (and dq), over several chunks (1 MiB
    budget) with rows of more than 32 entries in a chunk (a kv row repeated 40 times in one
    token and picked by every token: the big-row kernel) beside rows of a few entries, H = 128
    (two head blocks), -1 / out-of-range entries and a ragged topk_length."""
    T, H, S, K = 6, 128, 50, 70
    q, kv, idx = make_inputs(T, H, S, K, gen, d_qk=d_qk)
    idx[1, 0, :40] = 7
    idx[:, 0, 60] = 7
    tl = torch.tensor([70, 69, 0, 61, 70, 33], dtype=torch.int32)
    out, lse = ref.sparse_mla_fwd(q, kv, idx, SCALE, D_V, None, tl)
    dout = randn(*out.shape, gen=gen, dtype=torch.bfloat16)
    results = {}
    for mode in ("list", "bitmap"):
        E.set_env(lib, REDUCE_ENV, mode)
        E.set_env(lib, BUDGET_ENV, "1")
        try:
            sizes = (ctypes.c_int64 * 4)()
            lib.emu_sparse_mla_bwd_workspace(T, S, H, K, d_qk, sizes)
            lib.emu_clear_counters()
            dq, dkv, reports = run_bwd(lib, q, kv, out, dout, idx, lse, SCALE, None, tl, True)
        finally:
            E.set_env(lib, REDUCE_ENV, None)
            E.set_env(lib, BUDGET_ENV, None)
        assert reports == []
        launched = kernels_launched(lib)
        chunks = -(-T // sizes[3])   # 1 MiB holds 3 tokens of 2 x 70 x d_qk fp32 rows: 2 chunks
        assert chunks >= 2
        assert launched[f"dsa::sparse_mla::sparse_mla_bwd_wgmma_kernel<{d_qk}>"]["launches"] == chunks
        results[mode] = (dq, dkv)
    assert torch.equal(results["list"][0], results["bitmap"][0])
    assert torch.equal(results["list"][1], results["bitmap"][1])
    r_dq, r_dkv = ref.sparse_mla_bwd(q, kv, out, dout, idx, lse, SCALE, D_V, None, tl)
    assert rel_err(results["list"][1].to(torch.bfloat16), r_dkv.view(S, d_qk)) < GRAD_TOL


def test_bwd_det_list_reduce_work_is_not_sized_by_s(lib, gen):
    """Rows never touched cost nothing: with S = 20000 kv rows and 2 x 16 entries, the "list"
    reduction launches grids sized by the 32 entries (one count / alloc / fill CTA, 4 reduce
    CTAs, one big-row CTA), where the "bitmap" one launches a reduce CTA per kv row."""
    T, H, S, K = 2, 16, 20000, 16
    q, kv, idx = make_inputs(T, H, S, K, gen, invalid_frac=0.0)
    lib.emu_clear_counters()
    E.set_env(lib, REDUCE_ENV, "list")
    try:
        bwd_case(lib, gen, q, kv, idx, SCALE, deterministic=True)
    finally:
        E.set_env(lib, REDUCE_ENV, None)
    ctas = {k.split("::")[-1]: c["ctas"] for k, c in kernels_launched(lib).items()}
    assert ctas == {"sparse_mla_bwd_kernel<16, 576>": 2, "count_rows_kernel": 1,
                    "alloc_rows_kernel": 1, "fill_rows_kernel": 1, "reduce_rows_kernel<576>": 4,
                    "reduce_big_rows_kernel<576>": 1}


def test_bwd_deterministic_scratch_within_64mib(lib):
    """SPEC section 6: the deterministic backward's scratch stays <= 64 MiB for any T and S,
    H <= 128 and K <= 2048 (both widths), with the workspace the helper chooses (the same host
    code the launcher and the glue call). Fixed point (the default): int64 sums of
    min(S, 64 MiB / (d_qk x 8)) dkv rows a pass (S <= 14563 at 576, 16384 at 512 in one pass).
    The chunked design (list): at H = 128, K = 2048, d_qk = 576 a chunk is 7 tokens (63 MiB)
    where the budget-free chunking held 64 (604 MB); a token never splits (chunk >= 1) and the
    chunk never exceeds T or the 131072-entry bitmap."""
    out = (ctypes.c_int64 * 6)()
    budget = 64 << 20
    for d_qk in D_QKS:
        s_fit = budget // (d_qk * 8)
        for S in (1, 100, 8192, s_fit, s_fit + 1, 131072, 1 << 24):
            for T in (1, 4096, 1 << 31):
                lib.emu_sparse_mla_bwd_workspace_for(T, S, 128, 2048, d_qk, budget, out)
                chunk, rows, list_len, nbytes, fixed, pass_rows = list(out)
                assert fixed == 1 and pass_rows == min(S, s_fit) and nbytes <= budget
                assert (chunk, rows, list_len, nbytes) == (T, 2 * pass_rows, 1, pass_rows * d_qk * 8)
    lib.emu_sparse_mla_bwd_workspace_for(4096, 8192, 128, 2048, 576, budget, out)   # SPEC shape: one pass
    assert out[5] == 8192 and out[3] == 8192 * 576 * 8                               # 37.7 MB
    lib.emu_sparse_mla_bwd_workspace_for(4096, 131072, 128, 2048, 576, budget, out)
    assert out[5] == 14563 and -(-131072 // out[5]) == 10                            # 10 passes
    lib.emu_sparse_mla_bwd_workspace_for(4096, 131072, 128, 2048, 576, 0, out)      # no budget: one pass
    assert out[5] == 131072 and out[3] == 131072 * 576 * 8
    E.set_env(lib, REDUCE_ENV, "list")
    try:
        for d_qk in D_QKS:
            for H in (1, 8, 16, 24, 32, 48, 64, 96, 128):
                for K in (1, 2, 63, 64, 100, 512, 640, 1000, 1024, 2047, 2048):
                    for T in (1, 2, 7, 100, 4096, 1 << 17, 1 << 20, 1 << 31):
                        lib.emu_sparse_mla_bwd_workspace_for(T, 8192, H, K, d_qk, budget, out)
                        chunk, rows, list_len, nbytes, fixed, _ = list(out)
                        assert fixed == 0 and nbytes <= budget, (T, H, K, d_qk, chunk, nbytes)
                        assert 1 <= chunk <= T and chunk * K <= 131072
                        assert rows == -(-H // (64 if H % 64 == 0 else 32 if H % 32 == 0 else 16)) * chunk * K
                        assert list_len == chunk * K
        lib.emu_sparse_mla_bwd_workspace_for(4096, 8192, 128, 2048, 576, budget, out)
        assert out[0] == 7 and out[3] == 7 * 2 * 2048 * 576 * 4
        lib.emu_sparse_mla_bwd_workspace_for(4096, 8192, 128, 2048, 576, 0, out)    # no budget
        assert out[0] == 64 and out[3] == 64 * 2 * 2048 * 576 * 4                  # 604 MB
        # above the bound (one token's contributions exceed it) a chunk is one token
        lib.emu_sparse_mla_bwd_workspace_for(5, 8192, 128, 16384, 576, budget, out)
        assert out[0] == 1
    finally:
        E.set_env(lib, REDUCE_ENV, None)


# ---- the fixed-point deterministic design ------------------------------------------------------

@pytest.mark.parametrize("d_qk", D_QKS)
@pytest.mark.parametrize("H", [16, 128])
def test_bwd_fixed_point_order_free(lib, gen, H, d_qk):
    """Integer sums do not depend on the order of the additions: permuting the tokens (with
    their q, out, dout and lse) and the slots within each token's list leaves the fixed-point
    dkv bitwise unchanged, where the fp32 atomic sums (arrival order) are not guaranteed to be;
    it agrees with the atomic mode to fp32 rounding and with the reference. S < K: rows shared
    by many tokens and both head blocks at H = 128, repeated rows, -1 entries."""
    T, S, K = 5, 30, 70
    q, kv, idx = make_inputs(T, H, S, K, gen, d_qk=d_qk)
    idx[1, 0, :10] = 4
    out, lse = ref.sparse_mla_fwd(q, kv, idx, SCALE)
    dout = randn(*out.shape, gen=gen, dtype=torch.bfloat16)
    dq, dkv, rep = run_bwd(lib, q, kv, out, dout, idx, lse, SCALE, deterministic=True)
    tp = torch.randperm(T, generator=gen)
    sp = torch.randperm(K, generator=gen)
    idx_p = idx[tp][:, :, sp].contiguous()
    dq_p, dkv_p, rep_p = run_bwd(lib, q[tp].contiguous(), kv, out[tp].contiguous(), dout[tp].contiguous(),
                                 idx_p, lse[tp].contiguous(), SCALE, deterministic=True)
    assert rep == [] and rep_p == []
    assert torch.equal(dkv_p, dkv)
    assert rel_err(dq_p, dq[tp]) < GRAD_TOL   # dq sums over the slots in fp32: order matters there
    _, dkv_a, _ = run_bwd(lib, q, kv, out, dout, idx, lse, SCALE, deterministic=False)
    torch.testing.assert_close(dkv, dkv_a, atol=1e-5, rtol=1e-5)
    _, r_dkv = ref.sparse_mla_bwd(q, kv, out, dout, idx, lse, SCALE)
    assert rel_err(dkv.to(torch.bfloat16), r_dkv.view(S, d_qk)) < GRAD_TOL


@pytest.mark.parametrize("d_qk", D_QKS)
def test_bwd_fixed_point_passes_same_bits(lib, gen, d_qk):
    """Above the budget the fixed-point design makes passes over ranges of dkv rows: with a
    1 MiB budget and S = 600 rows (2.8 / 2.5 MB of int64 sums) that is 3 passes (main kernel and
    finish launched 3 times), and dq and dkv are bitwise those of the one-pass run (same scale,
    the same integer sums per element). H = 128: two head blocks."""
    T, H, S, K = 4, 128, 600, 160
    q, kv, idx = make_inputs(T, H, S, K, gen, d_qk=d_qk)
    out, lse = ref.sparse_mla_fwd(q, kv, idx, SCALE)
    dout = randn(*out.shape, gen=gen, dtype=torch.bfloat16)
    runs = {}
    for budget in ("1", "0"):
        E.set_env(lib, BUDGET_ENV, budget)
        try:
            lib.emu_clear_counters()
            dq, dkv, rep = run_bwd(lib, q, kv, out, dout, idx, lse, SCALE, deterministic=True)
        finally:
            E.set_env(lib, BUDGET_ENV, None)
        assert rep == []
        runs[budget] = (dq, dkv, kernels_launched(lib))
    passes = -(-S // ((1 << 20) // (d_qk * 8)))
    assert passes == 3
    for name, n in ((f"sparse_mla_bwd_wgmma_kernel<{d_qk}>", passes), ("fixed_point_finish_kernel", passes),
                    (f"fixed_point_bound_kernel<{d_qk}>", 1)):
        assert runs["1"][2][f"dsa::sparse_mla::{name}"]["launches"] == n
        assert runs["0"][2][f"dsa::sparse_mla::{name}"]["launches"] == 1
    assert torch.equal(runs["1"][0], runs["0"][0]) and torch.equal(runs["1"][1], runs["0"][1])
    _, r_dkv = ref.sparse_mla_bwd(q, kv, out, dout, idx, lse, SCALE)
    assert rel_err(runs["1"][1].to(torch.bfloat16), r_dkv.view(S, d_qk)) < GRAD_TOL


@pytest.mark.parametrize("magnitude", [1e-25, 1e25])
def test_bwd_fixed_point_scale_follows_the_inputs(lib, gen, magnitude):
    """The scale 2^s comes from the inputs' maxima: gradients of 1e-25 keep their precision (a
    fixed scale would round them to 0) and gradients of 1e25 do not overflow the int64 sums."""
    T, H, S, K = 3, 64, 40, 70
    q, kv, idx = make_inputs(T, H, S, K, gen)
    out, lse = ref.sparse_mla_fwd(q, kv, idx, SCALE)
    dout = (randn(*out.shape, gen=gen) * magnitude).to(torch.bfloat16)
    _, dkv, rep = run_bwd(lib, q, kv, out, dout, idx, lse, SCALE, deterministic=True)
    assert rep == []
    _, r_dkv = ref.sparse_mla_bwd(q, kv, out, dout, idx, lse, SCALE)
    r = r_dkv.view(S, 576).double()
    assert torch.isfinite(dkv).all() and (dkv != 0).any()
    assert ((dkv.double() - r).norm() / r.norm()).item() < 1e-2


@pytest.mark.parametrize("bad", ["nan_dout", "inf_dout", "nan_kv"])
def test_bwd_fixed_point_non_finite(lib, gen, bad):
    """Non-finite values land where the atomic mode puts them: the same NaN / inf pattern in dkv,
    the same finite values to fp32 rounding elsewhere, and the bound ignores them (the finite
    entries keep their precision)."""
    T, H, S, K = 3, 16, 40, 50
    q, kv, idx = make_inputs(T, H, S, K, gen, invalid_frac=0.0)
    if bad == "nan_kv":
        kv[7, 0, 3] = float("nan")
        idx[0, 0, 4] = 7
        idx[1:][idx[1:] == 7] = 8
    out, lse = ref.sparse_mla_fwd(q, kv, idx, SCALE)
    dout = randn(*out.shape, gen=gen, dtype=torch.bfloat16)
    if bad == "nan_dout":
        dout[1, 2, 5] = float("nan")
    elif bad == "inf_dout":
        dout[1, 2, 5] = float("inf")
    _, dkv_f, rep_f = run_bwd(lib, q, kv, out, dout, idx, lse, SCALE, deterministic=True)
    _, dkv_a, rep_a = run_bwd(lib, q, kv, out, dout, idx, lse, SCALE, deterministic=False)
    assert rep_f == [] and rep_a == []
    assert not torch.isfinite(dkv_a).all()
    assert torch.equal(dkv_f.isnan(), dkv_a.isnan())
    assert torch.equal(dkv_f.isposinf(), dkv_a.isposinf()) and torch.equal(dkv_f.isneginf(), dkv_a.isneginf())
    fin = torch.isfinite(dkv_a)
    torch.testing.assert_close(dkv_f[fin], dkv_a[fin], atol=1e-5, rtol=1e-5)


# ---- infinite sinks: +inf -> the head's output (and gradient) is 0, lse unaffected; -inf -> none

def infinite_sink(H, gen):
    sink = randn(H, gen=gen) * 2
    sink[0::3], sink[1::3] = float("inf"), float("-inf")
    return sink


@pytest.mark.parametrize("variant", ["h8", "hb16", "hb32", "hb64", "wgmma", "ws"])
def test_fwd_infinite_sink(lib, gen, variant):
    H = FWD_VARIANTS[variant][0]
    T, S, K = 3, 100, 80
    q, kv, idx = make_inputs(T, H, S, K, gen)
    idx[1] = -1                                                  # an empty row
    sink = infinite_sink(H, gen)
    out, lse, reports = run_variant(lib, variant, q, kv, idx, SCALE, sink, None)
    assert reports == []
    check_fwd(out, lse, q, kv, idx, SCALE, sink)
    assert (out[:, torch.isposinf(sink)] == 0).all()
    _, lse_plain = ref.sparse_mla_fwd(q, kv, idx, SCALE, D_V)
    fin = torch.isfinite(lse_plain)
    assert torch.allclose(lse[fin], lse_plain[fin], atol=LSE_ATOL, rtol=LSE_RTOL)


@pytest.mark.parametrize("H", [8, 16])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_bwd_infinite_sink(lib, gen, deterministic, H):
    T, S, K = 3, 40, 70
    q, kv, idx = make_inputs(T, H, S, K, gen, d_qk=512)
    sink = infinite_sink(H, gen)
    dq, _ = bwd_case(lib, gen, q, kv, idx, SCALE, sink, None, deterministic)
    assert (dq[:, torch.isposinf(sink)] == 0).all()


@pytest.mark.parametrize("variant", ["h8", "hb16", "hb64", "wgmma", "ws"])
def test_fwd_nan_score_propagates(lib, gen, variant):
    """A NaN score makes that row's out and lse NaN (as in the reference), never an "empty"
    row: row 0 selects one NaN latent row among finite ones, row 1 selects only it, row 2
    never selects it."""
    H = FWD_VARIANTS[variant][0]
    T, S, K = 3, 100, 80
    q, kv, idx = make_inputs(T, H, S, K, gen, invalid_frac=0.0)
    kv[7, 0, 3] = float("nan")
    idx[0, 0, 40] = 7
    idx[1, 0, :] = -1
    idx[1, 0, 5] = 7
    idx[2][idx[2] == 7] = 8
    out, lse, reports = run_variant(lib, variant, q, kv, idx, SCALE, None, None)
    assert reports == []
    assert out[:2].float().isnan().all() and lse[:2].isnan().all()
    r_out, r_lse = ref.sparse_mla_fwd(q, kv, idx, SCALE, D_V)
    assert rel_err(out[2], r_out[2]) < OUT_TOL and torch.allclose(lse[2], r_lse[2], atol=LSE_ATOL, rtol=LSE_RTOL)


# ---- H = 8: a 16-row head block with rows 8..15 masked ----------------------------------------

@pytest.mark.parametrize("d_qk", D_QKS)
def test_h8_is_the_first_heads_of_h16(lib, gen, d_qk):
    """The masked block computes each real row exactly as a full 16-head block does: out, lse
    and dq of H = 8 equal heads 0..7 of the same query with 16 heads bit for bit (rows are
    independent in both kernels), and dkv equals the H = 16 run's dkv with heads 8..15 given
    zero gradient (dout = 0 there), to fp32 rounding."""
    T, S, K = 3, 60, 100
    q16, kv, idx = make_inputs(T, 16, S, K, gen, scale_q=2.0, d_qk=d_qk)
    q8 = q16[:, :8].contiguous()
    out16, lse16, rep16 = run_fwd(lib, q16, kv, idx, SCALE)
    out8, lse8, rep8 = run_fwd(lib, q8, kv, idx, SCALE)
    assert rep16 == [] and rep8 == []
    assert torch.equal(out8, out16[:, :8]) and torch.equal(lse8, lse16[:, :8])
    dout16 = randn(T, 16, D_V, gen=gen, dtype=torch.bfloat16)
    dout16[:, 8:] = 0
    dout8 = dout16[:, :8].contiguous()
    for det in (False, True):
        dq16, dkv16, r16 = run_bwd(lib, q16, kv, out16, dout16, idx, lse16, SCALE, deterministic=det)
        dq8, dkv8, r8 = run_bwd(lib, q8, kv, out8.contiguous(), dout8, idx, lse8.contiguous(), SCALE,
                                deterministic=det)
        assert r16 == [] and r8 == []
        assert torch.equal(dq8, dq16[:, :8])
        torch.testing.assert_close(dkv8, dkv16, atol=1e-5, rtol=1e-5)
