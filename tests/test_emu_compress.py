"""v4_compress_kernel (csrc/compress) on the CPU emulator (csrc/emu): the real launcher with
raw pointers as compress_cuda.cpp calls it, against dsa_ext.reference.v4_compress (to about a
bf16 ulp, as the CPU op: fp32 online softmax vs fp64), with no hazard reported. Cases: c = 1
and 2, ratios 3, 4 and 128, d 128 and 512 (so a thread owns one or two channel pairs and the
CTA's last warps idle at d = 128), a ragged batch with empty and short sequences (the entry ->
sequence search skips them) and one sequence without cu_seqlens.

The output starts as bf16 NaNs, so an entry the kernel should write but does not fails.
"""
import ctypes

import pytest
import torch

import emulator as E
import dsa_ext
from conftest import randn
from dsa_ext import reference as ref
from test_compress import assert_matches, make_inputs

pytestmark = pytest.mark.emu
P = E.ptr
KERNEL = "v4_compress_kernel"


@pytest.fixture(scope="module")
def lib():
    lib = E.load("compress")
    vp = ctypes.c_void_p
    lib.emu_v4_compress.argtypes = [vp, vp, vp, vp, ctypes.c_float, vp, vp, vp, vp, ctypes.c_int64,
                                    ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int, vp]
    return lib


def run_compress(lib, kv, score, ape, w, eps, cos, sin, cu):
    d, ratio = w.numel(), ape.shape[0]
    c = kv.shape[1] // d
    if cu is None:
        offsets, batch, entries = None, 1, kv.shape[0] // ratio
    else:
        per_seq = (cu[1:] - cu[:-1]).long() // ratio
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), per_seq.cumsum(0)])
        batch, entries = cu.numel() - 1, int(offsets[-1])
    out = torch.full((entries, d), float("nan"), dtype=torch.bfloat16)
    lib.emu_clear_counters()
    reports, rc = E.run(lib.emu_v4_compress, P(kv), P(score), P(ape), P(w), eps, P(cos), P(sin),
                        P(cu), P(offsets), batch, entries, d, c, ratio, P(out),
                        buffers=[kv, score, ape, w, cos, sin, cu, offsets, out], lib=lib)
    return rc, out, reports


def launched(lib):
    return {name: c for name, c in E.counters(lib).items() if c["launches"]}


@pytest.mark.parametrize("c,ratio,d,lens", [
    (2, 4, 128, [9, 0, 3, 16, 6]),
    (1, 3, 512, [7, 2, 10]),
    (2, 128, 128, [300]),
    (1, 128, 512, [130, 127]),
])
def test_matches_reference(lib, gen, c, ratio, d, lens):
    (kv, score, ape, w), cos, sin, cu = make_inputs(gen, lens, d, c, ratio)
    rc, out, reports = run_compress(lib, kv, score, ape, w, 1e-6, cos, sin, cu)
    assert rc == 0 and reports == []
    assert_matches(out, ref.v4_compress(kv, score, ape, w, 1e-6, cos, sin, cu))
    (name, cnt), = launched(lib).items()
    assert KERNEL in name and cnt["launches"] == 1 and cnt["ctas"] == out.shape[0]


@pytest.mark.parametrize("c", [1, 2])
def test_one_sequence_and_large_scores(lib, gen, c):
    (kv, score, ape, w), cos, sin, _ = make_inputs(gen, [23], 256, c, 4, score_scale=300.0,
                                                   score_shift=-5e3)
    rc, out, reports = run_compress(lib, kv, score, ape, w, 1e-6, cos, sin, None)
    assert rc == 0 and reports == []
    assert_matches(out, ref.v4_compress(kv, score, ape, w, 1e-6, cos, sin))
    # Each pool row's kv, score and ape values are loaded once; per entry the norm weight
    # once and one cos and sin per rope pair; each output value is written once.
    cnt, = launched(lib).values()
    rows = 5 * 4 * c - (4 if c == 2 else 0)       # entry 0 has no previous window
    assert cnt["gmem_bytes_read"] == rows * 256 * 4 * 3 + 5 * 256 * 4 + 5 * 32 * 2 * 4
    assert cnt["gmem_bytes_written"] == 5 * 256 * 2


def test_minus_inf_scores_weigh_nothing(lib, gen):
    (kv, score, ape, w), cos, sin, _ = make_inputs(gen, [13], 128, 2, 4)
    score[0] = float("-inf")              # leading rows of the online softmax
    score[5, :7] = float("-inf")
    rc, out, reports = run_compress(lib, kv, score, ape, w, 1e-6, cos, sin, None)
    assert rc == 0 and reports == [] and torch.isfinite(out.float()).all()
    assert_matches(out, ref.v4_compress(kv, score, ape, w, 1e-6, cos, sin))


def test_refusals_and_empty(lib):
    x = torch.ones(8, 96)
    w = torch.ones(48)
    rc, out, reports = run_compress(lib, x, x, torch.ones(4, 96), w, 1e-6, torch.ones(2, 32),
                                    torch.ones(2, 32), None)
    assert rc != 0 and reports == [] and out.isnan().all()     # d < 64
    lib.emu_clear_counters()
    reports, rc = E.run(lib.emu_v4_compress, None, None, None, None, 1e-6, None, None, None, None,
                        1, 0, 128, 1, 4, None, lib=lib)
    assert rc == 0 and reports == [] and launched(lib) == {}


# ---- the decode step kernel ---------------------------------------------------------------------
def run_step(lib, kv, score, ape, w, eps, cos, sin, pos, kv_state, score_state):
    d, ratio = w.numel(), ape.shape[0]
    out = torch.full((kv.shape[0], d), float("nan"), dtype=torch.bfloat16)
    lib.emu_clear_counters()
    reports, rc = E.run(lib.emu_v4_compress_step, P(kv), P(score), P(ape), P(w), eps, P(cos), P(sin),
                        cos.shape[0], P(pos), P(kv_state), P(score_state), kv.shape[0], d,
                        kv.shape[1] // d, ratio, P(out),
                        buffers=[kv, score, ape, w, cos, sin, pos, kv_state, score_state, out], lib=lib)
    return rc, out, reports


@pytest.fixture(scope="module")
def step_lib(lib):
    vp = ctypes.c_void_p
    lib.emu_v4_compress_step.argtypes = [vp, vp, vp, vp, ctypes.c_float, vp, vp, ctypes.c_int64, vp, vp,
                                         vp, ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int, vp]
    return lib


@pytest.mark.parametrize("c,ratio,d", [(2, 4, 128), (1, 3, 256)])
def test_steps_equal_bulk_kernel(step_lib, gen, c, ratio, d):
    lib = step_lib
    prefill, steps = [0, 5, 2 * ratio + 1], 2 * ratio + 2
    full = [p + steps for p in prefill]
    (kv, score, ape, w), cos, sin, cu = make_inputs(gen, full, d, c, ratio)
    rc, bulk, reports = run_compress(lib, kv, score, ape, w, 1e-6, cos, sin, cu)
    assert rc == 0 and reports == []
    want = torch.split(bulk, [n // ratio for n in full])
    kv_seq, score_seq = torch.split(kv, full), torch.split(score, full)
    kv_state, score_state = dsa_ext.new_v4_compress_state(len(prefill), d, c, ratio)
    cu_pre = torch.tensor([0] + torch.tensor(prefill).cumsum(0).tolist(), dtype=torch.int32)
    dsa_ext.v4_compress_prefill_state(torch.cat([k[:p] for k, p in zip(kv_seq, prefill)]),
                                      torch.cat([s[:p] for s, p in zip(score_seq, prefill)]),
                                      ape, kv_state, score_state, cu_pre)
    got = [list(torch.split(want[b], 1)[: p // ratio]) for b, p in enumerate(prefill)]
    for i in range(steps):
        pos = torch.tensor([p + i for p in prefill], dtype=torch.int32)
        tok_kv = torch.stack([k[p + i] for k, p in zip(kv_seq, prefill)])
        tok_score = torch.stack([s[p + i] for s, p in zip(score_seq, prefill)])
        ref_state = (kv_state.clone(), score_state.clone())
        rc, out, reports = run_step(lib, tok_kv, tok_score, ape, w, 1e-6, cos, sin, pos, kv_state, score_state)
        assert rc == 0 and reports == []
        assert_matches(out, ref.v4_compress_step(tok_kv, tok_score, ape, w, 1e-6, cos, sin, pos, *ref_state))
        torch.testing.assert_close(kv_state, ref_state[0], rtol=0, atol=0)   # same ring writes
        for b in range(len(prefill)):
            if (pos[b] + 1) % ratio == 0:
                got[b].append(out[b:b + 1])
            else:
                assert (out[b].float() == 0).all()
    for b in range(len(prefill)):
        assert torch.equal(torch.cat(got[b]), want[b]), f"sequence {b}"


def test_step_no_token_and_missing_rope_row(step_lib, gen):
    (kv, score, ape, w), cos, sin, _ = make_inputs(gen, [3], 64, 2, 4, rope_rows=4)
    kv_state, score_state = dsa_ext.new_v4_compress_state(3, 64, 2, 4)
    before = kv_state.clone(), score_state.clone()
    # No token; entry 1 needs rope row 4 of 4; entry 0 (ring rows 0..2 never written: score
    # -inf from new_v4_compress_state, so they weigh nothing).
    pos = torch.tensor([-1, 7, 3], dtype=torch.int32)
    rc, out, reports = run_step(step_lib, kv, score, ape, w, 1e-6, cos, sin, pos, kv_state, score_state)
    assert rc == 0 and reports == []
    assert (out[0].float() == 0).all() and torch.equal(kv_state[0], before[0][0])
    assert torch.equal(score_state[0], before[1][0])
    assert out[1].float().isnan().all() and torch.isfinite(out[2].float()).all()
