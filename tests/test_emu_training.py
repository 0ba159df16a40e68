"""The training kernels (csrc/training) run on the CPU emulator (csrc/emu): the real launchers
of training_launch.cu against dsa_ext.reference.training, with no hazard reported (races,
uninitialised or out-of-bounds shared/global accesses, barrier deadlocks).

Shapes are tiny but reach every branch: a partial last key tile, heads that are not a multiple
of the 4-head score step, D not a multiple of 32, ragged / empty / inverted / out-of-range row
ranges, key splits of the forward (and with the emulated GPU cut to one SM, CTAs with several
tiles), invalid selected indices (-1, negative, >= S, past topk_length), duplicates, rows with
no valid entry, both weight dtypes, atomic and deterministic backward modes. Inputs are
registered as device memory exactly, so a read of anything the kernels must skip is a report.
"""
import ctypes
import math

import pytest
import torch

import emulator as E
from dsa_ext.reference import training as ref

pytestmark = pytest.mark.emu
P = E.ptr
I64 = ctypes.c_int64
VP = ctypes.c_void_p
TILE = 128                      # kTileKeys (training_kernels.cuh)
DTYPE_CODE = {torch.bfloat16: 0, torch.float32: 1}
# (q/k dtype, weights dtype): the combinations the checks accept on CUDA.
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]
DTYPE_IDS = ["f32", "bf16", "bf16-w32"]


@pytest.fixture(scope="module")
def lib():
    lib = E.load("training")
    lib.emu_indexer_train_logits.argtypes = [VP] * 6 + [I64] * 4 + [ctypes.c_int] * 2
    lib.emu_indexer_train_logits_bwd.argtypes = [VP] * 11 + [I64] * 4 + [ctypes.c_int] * 3
    lib.emu_sparse_attention_target.argtypes = [VP] * 6 + [I64] * 5 + [ctypes.c_float, ctypes.c_int]
    lib.emu_indexer_kl_loss_sparse.argtypes = [VP] * 16 + [I64] * 5 + [ctypes.c_int] * 4
    lib.emu_sparse_loss_workspace.argtypes = [I64] * 4 + [ctypes.POINTER(I64)]
    lib.emu_sparse_loss_chunk_rows.argtypes = [I64] * 3
    lib.emu_sparse_loss_chunk_rows.restype = I64
    lib.emu_indexer_kl_loss_dense.argtypes = [VP] * 17 + [I64] * 6 + [ctypes.c_float] + [ctypes.c_int] * 5
    lib.emu_training_indexer_cuda_supports.argtypes = [I64, I64]
    lib.emu_deterministic_dk_splits.argtypes = [I64, I64]
    lib.emu_deterministic_dk_splits.restype = I64
    return lib


@pytest.fixture
def sms(lib):
    """Sets how many SMs the emulated GPU reports (fewer SMs: fewer key splits, more tiles per
    forward CTA)."""
    def set_sms(n):
        E.set_env(lib, "DSA_EMU_NUM_SMS", n)
    yield set_sms
    E.set_env(lib, "DSA_EMU_NUM_SMS", None)


def _randn(*shape, gen, dtype, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def _indexer_inputs(T, S, H, D, dtypes, gen):
    qk, wd = dtypes
    q = _randn(T, H, D, gen=gen, dtype=qk, scale=0.5)
    k = _randn(S, D, gen=gen, dtype=qk, scale=0.5)
    w = _randn(T, H, gen=gen, dtype=wd)
    return q, k, w


def _ragged_ranges(T, S):
    """Per row: full, negative start, inverted, empty, past-the-end, one key, a range that
    starts in the last tile, one that ends mid-tile, the first key of a tile only; repeated
    over T rows."""
    cases = [(0, S), (-5, 20), (S - 10, 10), (44, 44), (130, 2**31 - 1), (S - 1, S), (2 * TILE + 3, S - 7),
             (7, TILE + 9), (TILE, TILE + 1)]
    ks = torch.tensor([cases[t % len(cases)][0] for t in range(T)], dtype=torch.int32)
    ke = torch.tensor([cases[t % len(cases)][1] for t in range(T)], dtype=torch.int32)
    return ks, ke


def _tol(out_dtype):
    return (2e-2, 2e-2) if out_dtype == torch.bfloat16 else (2e-5, 2e-5)


def _assert_close(out, expected, what):
    """Relative to the tensor's magnitude (dq, dk sum many terms of both signs)."""
    rtol, atol = _tol(out.dtype)
    exp = expected.double()
    scale = max(exp.abs().max().item(), 1e-6)
    torch.testing.assert_close(out.double(), exp, rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}")


def _dk_workspaces(lib, T, S, D, deterministic):
    """(dk32, dk_partial) as the glue allocates them: the zeroed fp32 accumulator of the atomic
    mode; the deterministic mode's per-split partial sums when the launcher splits the rows
    (NaN-filled: every entry must be written before it is summed)."""
    if not deterministic:
        return torch.zeros(S, D), None
    splits = lib.emu_deterministic_dk_splits(T, S)
    return None, (torch.full((splits, S, D), float("nan")) if splits > 1 else None)


def _no_reports(reports):
    assert reports == [], "\n".join(f"{r['kind']} in {r['kernel']}: {r['text']}" for r in reports[:5])


# ---- indexer_train_logits --------------------------------------------------------------------

def run_logits(lib, q, k, w, ks, ke, status=0):
    T, H, D = q.shape
    S = k.shape[0]
    out = torch.full((T, S), float("nan"))
    reports, rc = E.run(lib.emu_indexer_train_logits, P(q), P(k), P(w), P(ks), P(ke), P(out), T, S, H, D,
                        DTYPE_CODE[q.dtype], DTYPE_CODE[w.dtype], buffers=[q, k, w, ks, ke, out], lib=lib)
    assert rc == status
    return out, reports


@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("num_sms", [None, 1])
def test_indexer_train_logits(lib, sms, gen, dtypes, num_sms):
    if num_sms:
        sms(num_sms)                   # 2 key splits of 2 tiles: a CTA walks several tiles
    T, S, H, D = 9, 3 * TILE + 44, 6, 20
    q, k, w = _indexer_inputs(T, S, H, D, dtypes, gen)
    ks, ke = _ragged_ranges(T, S)
    out, reports = run_logits(lib, q, k, w, ks, ke)
    _no_reports(reports)
    expected = ref.indexer_train_logits(q, k, w, ks, ke)
    mask = ref.row_range_mask(ks, ke, S)
    assert torch.isneginf(out[~mask]).all()
    torch.testing.assert_close(out[mask].double(), expected[mask].double(), rtol=1e-5, atol=1e-5)


def test_keys_outside_every_range_are_not_read(lib, gen):
    """Forward and the atomic backward read only the key rows (and grad entries) inside some
    row's range: k is registered up to the largest end only, so one stray read is a report."""
    T, S, H, D = 4, 3 * TILE + 10, 4, 12
    q, k, w = _indexer_inputs(T, S, H, D, DTYPES[0], gen)
    ks = torch.tensor([3, 40, 200, 7], dtype=torch.int32)
    ke = torch.tensor([TILE + 5, 41, 199, 2 * TILE + 1], dtype=torch.int32)
    end = int(ke.max())
    out = torch.full((T, S), float("nan"))
    reports, rc = E.run(lib.emu_indexer_train_logits, P(q), P(k), P(w), P(ks), P(ke), P(out), T, S, H, D, 1, 1,
                        buffers=[q, k[:end], w, ks, ke, out], lib=lib)
    assert rc == 0
    _no_reports(reports)
    mask = ref.row_range_mask(ks, ke, S)
    torch.testing.assert_close(out[mask].double(), ref.indexer_train_logits(q, k, w, ks, ke)[mask].double(),
                               rtol=1e-5, atol=1e-5)
    assert torch.isneginf(out[~mask]).all()
    grad = torch.randn(T, S, generator=gen)
    dq, dk, dw = torch.full_like(q, float("nan")), torch.full_like(k, float("nan")), torch.full_like(w, float("nan"))
    dk32 = torch.zeros(S, D)
    reports, rc = E.run(lib.emu_indexer_train_logits_bwd, P(grad), P(q), P(k), P(w), P(ks), P(ke), P(dq), P(dk),
                        P(dw), P(dk32), None, T, S, H, D, 1, 1, 0,
                        buffers=[grad, q, k[:end], w, ks, ke, dq, dk, dw, dk32], lib=lib)
    assert rc == 0
    _no_reports(reports)
    for name, g, e in zip(("dq", "dk", "dw"), (dq, dk, dw), ref.indexer_train_logits_bwd(grad, q, k, w, ks, ke)):
        _assert_close(g, e, name)


# ---- indexer_train_logits_bwd ----------------------------------------------------------------

def run_logits_bwd(lib, grad, q, k, w, ks, ke, deterministic):
    T, H, D = q.shape
    S = k.shape[0]
    dq = torch.full_like(q, float("nan"))
    dk = torch.full_like(k, float("nan"))
    dw = torch.full_like(w, float("nan"))
    dk32, part = _dk_workspaces(lib, T, S, D, deterministic)
    reports, rc = E.run(lib.emu_indexer_train_logits_bwd, P(grad), P(q), P(k), P(w), P(ks), P(ke), P(dq), P(dk),
                        P(dw), P(dk32), P(part), T, S, H, D, DTYPE_CODE[q.dtype], DTYPE_CODE[w.dtype],
                        int(deterministic), buffers=[grad, q, k, w, ks, ke, dq, dk, dw, dk32, part], lib=lib)
    assert rc == 0
    return (dq, dk, dw), reports


@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("deterministic,num_sms", [(False, None), (True, None), (True, 1)],
                         ids=["atomic", "deterministic-split", "deterministic-1split"])
def test_indexer_train_logits_bwd(lib, sms, gen, dtypes, deterministic, num_sms):
    """deterministic-split: 132 SMs and 3 key tiles give one row per split (partials summed in
    order); one SM gives a single split that writes dk itself."""
    if num_sms:
        sms(num_sms)
    T, S, H, D = 10, 2 * TILE + 37, 5, 36
    assert (lib.emu_deterministic_dk_splits(T, S) > 1) == (num_sms is None)
    q, k, w = _indexer_inputs(T, S, H, D, dtypes, gen)
    ks, ke = _ragged_ranges(T, S)
    grad = torch.randn(T, S, generator=gen)
    # Outside each row's range the gradient must be ignored: NaN there would poison any sum.
    grad = torch.where(ref.row_range_mask(ks, ke, S), grad, float("nan"))
    grads, reports = run_logits_bwd(lib, grad, q, k, w, ks, ke, deterministic)
    _no_reports(reports)
    expected = ref.indexer_train_logits_bwd(grad, q, k, w, ks, ke)
    for name, got, exp in zip(("dq", "dk", "dw"), grads, expected):
        assert got.dtype == exp.dtype
        _assert_close(got, exp, name)
    # keys no row sees get an exact zero gradient
    seen = ref.row_range_mask(ks, ke, S).any(dim=0)
    assert (grads[1][~seen] == 0).all()
    if deterministic:
        again, reports = run_logits_bwd(lib, grad, q, k, w, ks, ke, True)
        _no_reports(reports)
        for a, b in zip(grads, again):
            assert torch.equal(a.view(torch.int16 if a.dtype == torch.bfloat16 else torch.int32),
                               b.view(torch.int16 if b.dtype == torch.bfloat16 else torch.int32))


def test_more_heads_than_threads(lib, gen):
    """H = 133 > 128 threads: the per-head loops stride over the CTA, 136 padded heads."""
    T, S, H, D = 3, TILE + 12, 133, 8
    q, k, w = _indexer_inputs(T, S, H, D, DTYPES[0], gen)
    ks = torch.tensor([0, 5, 100], dtype=torch.int32)
    ke = torch.tensor([S, 130, 101], dtype=torch.int32)
    out, reports = run_logits(lib, q, k, w, ks, ke)
    _no_reports(reports)
    mask = ref.row_range_mask(ks, ke, S)
    torch.testing.assert_close(out[mask].double(), ref.indexer_train_logits(q, k, w, ks, ke)[mask].double(),
                               rtol=1e-5, atol=1e-5)
    grad = torch.randn(T, S, generator=gen)
    expected = ref.indexer_train_logits_bwd(grad, q, k, w, ks, ke)
    for deterministic in (False, True):
        grads, reports = run_logits_bwd(lib, grad, q, k, w, ks, ke, deterministic)
        _no_reports(reports)
        for name, g, e in zip(("dq", "dk", "dw"), grads, expected):
            _assert_close(g, e, name)


def test_indexer_train_logits_bwd_empty_rows(lib, gen):
    """Every row empty: dq, dw, dk are exact zeros (written, not left as the NaN fill) in both
    modes; no grad entry is read (grad is registered as a 0-byte region: any read is a report)."""
    T, S, H, D = 3, 50, 4, 8
    q, k, w = _indexer_inputs(T, S, H, D, DTYPES[0], gen)
    ks = torch.tensor([5, 60, 0], dtype=torch.int32)
    ke = torch.tensor([5, 70, -3], dtype=torch.int32)
    grad = torch.full((T, S), float("nan"))
    for deterministic in (False, True):
        dq = torch.full_like(q, float("nan"))
        dk = torch.full_like(k, float("nan"))
        dw = torch.full_like(w, float("nan"))
        dk32, part = _dk_workspaces(lib, T, S, D, deterministic)
        reports, rc = E.run(lib.emu_indexer_train_logits_bwd, P(grad), P(q), P(k), P(w), P(ks), P(ke), P(dq),
                            P(dk), P(dw), P(dk32), P(part), T, S, H, D, 1, 1, int(deterministic),
                            buffers=[q, k, w, ks, ke, dq, dk, dw, dk32, part], lib=lib)
        assert rc == 0
        _no_reports(reports)
        assert (dq == 0).all() and (dk == 0).all() and (dw == 0).all()


# ---- sparse_attention_target ------------------------------------------------------------------

def _selected_indices(T, K, S, gen):
    """Random in-range indices with duplicates, plus -1, negative and >= S entries."""
    idx = torch.randint(0, S, (T, 1, K), generator=gen, dtype=torch.int32)
    bad = torch.rand(T, 1, K, generator=gen)
    idx[bad < 0.1] = -1
    idx[(bad >= 0.1) & (bad < 0.15)] = S + 3
    idx[(bad >= 0.15) & (bad < 0.2)] = -7
    idx[0, 0, :4] = idx[0, 0, 4]       # duplicates
    return idx


def _main_lse(q, kv, indices, sm_scale, topk_length):
    """sparse_mla_fwd's lse (no sink) in fp64 from the same inputs: -inf for rows with no entry."""
    valid = ref.sparse_mla_valid_mask(indices, kv.shape[0], topk_length)
    rows = kv[:, 0].double()[torch.where(valid, indices[:, 0].long(), 0)]
    s = torch.einsum("thd,tkd->thk", q.double(), rows) * sm_scale
    s = s.masked_fill(~valid[:, None, :], float("-inf"))
    return torch.logsumexp(s, dim=-1).float()


@pytest.mark.parametrize("qdtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("H,D", [(5, 40), (40, 300)])   # (40, 300): two head chunks
def test_sparse_attention_target(lib, gen, qdtype, H, D):
    T, S, K = 6, 90, 37
    q = _randn(T, H, D, gen=gen, dtype=qdtype)
    kv = _randn(S, 1, D, gen=gen, dtype=qdtype)
    indices = _selected_indices(T, K, S, gen)
    indices[2] = -1                                       # a row with no valid entry
    topk_length = torch.tensor([K, 30, K, 0, -2, K + 9], dtype=torch.int32)
    sm_scale = 1.0 / math.sqrt(D)
    lse = _main_lse(q, kv, indices, sm_scale, topk_length)
    lse[5, 1] = float("-inf")                             # a head with no mass: contributes 0
    out = torch.full((T, K), float("nan"))
    reports, rc = E.run(lib.emu_sparse_attention_target, P(q), P(kv), P(indices), P(lse), P(topk_length), P(out),
                        T, S, H, D, K, sm_scale, DTYPE_CODE[qdtype],
                        buffers=[q, kv, indices, lse, topk_length, out], lib=lib)
    assert rc == 0
    _no_reports(reports)
    expected = ref.sparse_attention_target(q, kv, indices, lse, sm_scale, topk_length)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-6)
    valid = ref.sparse_mla_valid_mask(indices, S, topk_length)
    assert (out[~valid] == 0).all()


# ---- indexer_kl_loss_sparse -------------------------------------------------------------------

def run_sparse_loss(lib, q, k, w, indices, target, topk_length, mean, deterministic):
    T, H, D = q.shape
    S, K = k.shape[0], indices.shape[-1]
    logits = torch.full((T, K), float("nan"))
    row_loss = torch.full((T,), float("nan"))
    count = torch.zeros(1, dtype=torch.int32)
    loss = torch.full((1,), float("nan"))
    dq = torch.full_like(q, float("nan"))
    dk = torch.full_like(k, float("nan"))
    dw = torch.full_like(w, float("nan"))
    dk32 = torch.zeros(S, D)
    entry_dk = entry_ints = None
    if deterministic:               # uninitialised workspace as the glue allocates it: NaN / garbage
        sizes = (I64 * 2)()
        lib.emu_sparse_loss_workspace(T, S, K, D, sizes)
        entry_dk = torch.full((sizes[0],), float("nan"))
        entry_ints = torch.full((sizes[1],), -12345, dtype=torch.int32)
    reports, rc = E.run(lib.emu_indexer_kl_loss_sparse, P(q), P(k), P(w), P(indices), P(target), P(topk_length),
                        P(logits), P(row_loss), P(count), P(loss), P(dq), P(dk), P(dw), P(dk32), P(entry_dk),
                        P(entry_ints), T, S, H, D, K, DTYPE_CODE[q.dtype], DTYPE_CODE[w.dtype], int(mean),
                        int(deterministic),
                        buffers=[q, k, w, indices, target, topk_length, logits, row_loss, count, loss, dq, dk, dw,
                                 dk32, entry_dk, entry_ints], lib=lib)
    assert rc == 0
    return (loss[0], dq, dk, dw), reports


@pytest.fixture
def chunk_rows(lib):
    """Caps the deterministic sparse loss's row chunk (DSA_TRAINING_CHUNK_ROWS)."""
    def set_rows(n):
        E.set_env(lib, "DSA_TRAINING_CHUNK_ROWS", n)
    yield set_rows
    E.set_env(lib, "DSA_TRAINING_CHUNK_ROWS", None)


@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("deterministic,rows_per_chunk", [(False, None), (True, None), (True, 2)],
                         ids=["atomic", "deterministic", "deterministic-chunks"])
def test_indexer_kl_loss_sparse(lib, chunk_rows, gen, dtypes, reduction, deterministic, rows_per_chunk):
    """deterministic-chunks: rows in chunks of 2 (the last one partial), each chunk's entries
    grouped by key and summed in entry order onto the previous chunks' dk."""
    if rows_per_chunk:
        chunk_rows(rows_per_chunk)
    T, S, H, D, K = 7, 2 * TILE + 20, 5, 24, TILE + 13       # two entry tiles, three key tiles
    assert lib.emu_sparse_loss_chunk_rows(T, K, D) == (rows_per_chunk or T)
    q, k, w = _indexer_inputs(T, S, H, D, dtypes, gen)
    indices = _selected_indices(T, K, S, gen)
    indices[3] = S                                        # a row with no valid entry
    topk_length = torch.tensor([K, 100, K, K, 0, K + 5, 7], dtype=torch.int32)
    valid = ref.sparse_mla_valid_mask(indices, S, topk_length)
    # A normalised target over the valid entries, with zeros (0 log 0), and one unnormalised
    # row (the gradient is then (sum p) r - p); invalid entries carry garbage, to be ignored.
    target = torch.rand(T, K, generator=gen) * (torch.rand(T, K, generator=gen) > 0.2)
    target = torch.where(valid, target, 0.0)
    target = target / target.sum(-1, keepdim=True).clamp_min(1e-30)
    target[6] *= 0.5
    target = torch.where(valid, target, 123.0)
    got, reports = run_sparse_loss(lib, q, k, w, indices, target, topk_length, reduction == "mean", deterministic)
    _no_reports(reports)
    expected = ref.indexer_kl_loss_sparse(q, k, w, indices, target, topk_length, reduction)
    torch.testing.assert_close(got[0].double(), expected[0].double(), rtol=1e-4, atol=1e-5)
    for name, g, e in zip(("dq", "dk", "dw"), got[1:], expected[1:]):
        assert g.dtype == e.dtype
        _assert_close(g, e, name)
    if deterministic:
        again, reports = run_sparse_loss(lib, q, k, w, indices, target, topk_length, reduction == "mean", True)
        _no_reports(reports)
        for a, b in zip(got, again):
            assert torch.equal(a.float().view(torch.int32) if a.dim() == 0 else a.view(torch.uint8),
                               b.float().view(torch.int32) if b.dim() == 0 else b.view(torch.uint8))


def test_indexer_kl_loss_sparse_no_valid_entry(lib, gen):
    """No row has a valid entry: loss 0 (mean of zero rows = 0) and zero gradients."""
    T, S, H, D, K = 3, 40, 4, 8, 9
    q, k, w = _indexer_inputs(T, S, H, D, DTYPES[0], gen)
    indices = torch.full((T, 1, K), -1, dtype=torch.int32)
    target = torch.rand(T, K, generator=gen)
    for mean in (False, True):
        got, reports = run_sparse_loss(lib, q, k, w, indices, target, None, mean, False)
        _no_reports(reports)
        assert got[0].item() == 0.0
        assert all((g == 0).all() for g in got[1:])


# ---- indexer_kl_loss_dense --------------------------------------------------------------------

def run_dense_loss(lib, q, k, w, ks, ke, q_main, kv_main, sm_scale, mean, deterministic):
    T, H, D = q.shape
    S, Hm, Dm = k.shape[0], q_main.shape[1], q_main.shape[2]
    main_lse = torch.full((T, Hm), float("nan"))
    index_lse = torch.full((T,), float("nan"))
    row_loss = torch.full((T,), float("nan"))
    count = torch.zeros(1, dtype=torch.int32)
    loss = torch.full((1,), float("nan"))
    dq = torch.full_like(q, float("nan"))
    dk = torch.full_like(k, float("nan"))
    dw = torch.full_like(w, float("nan"))
    dk32, part = _dk_workspaces(lib, T, S, D, deterministic)
    bufs = [q, k, w, ks, ke, q_main, kv_main, main_lse, index_lse, row_loss, count, loss, dq, dk, dw, dk32, part]
    reports, rc = E.run(lib.emu_indexer_kl_loss_dense, *[P(b) for b in bufs], T, S, H, D, Hm, Dm, sm_scale,
                        DTYPE_CODE[q.dtype], DTYPE_CODE[w.dtype], DTYPE_CODE[q_main.dtype], int(mean),
                        int(deterministic), buffers=bufs, lib=lib)
    assert rc == 0
    return (loss[0], dq, dk, dw), reports


@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_indexer_kl_loss_dense(lib, gen, dtypes, reduction, deterministic):
    T, S, H, D, Hm, Dm = 9, 2 * TILE + 21, 5, 20, 3, 40
    q, k, w = _indexer_inputs(T, S, H, D, dtypes, gen)
    ks, ke = _ragged_ranges(T, S)
    q_main = _randn(T, Hm, Dm, gen=gen, dtype=dtypes[0])
    kv_main = _randn(S, 1, Dm, gen=gen, dtype=dtypes[0])
    sm_scale = 1.0 / math.sqrt(Dm)
    got, reports = run_dense_loss(lib, q, k, w, ks, ke, q_main, kv_main, sm_scale, reduction == "mean",
                                  deterministic)
    _no_reports(reports)
    expected = ref.indexer_kl_loss_dense(q, k, w, ks, ke, q_main, kv_main, sm_scale, reduction)
    torch.testing.assert_close(got[0].double(), expected[0].double(), rtol=1e-4, atol=1e-5)
    for name, g, e in zip(("dq", "dk", "dw"), got[1:], expected[1:]):
        assert g.dtype == e.dtype
        _assert_close(g, e, name)
    if deterministic:
        again, reports = run_dense_loss(lib, q, k, w, ks, ke, q_main, kv_main, sm_scale, reduction == "mean", True)
        _no_reports(reports)
        for a, b in zip(got, again):
            assert torch.equal(a.float().view(torch.int32) if a.dim() == 0 else a.view(torch.uint8),
                               b.float().view(torch.int32) if b.dim() == 0 else b.view(torch.uint8))


def test_indexer_kl_loss_dense_head_chunks(lib, gen):
    """q_main heads in several chunks (64 KB of q_main per chunk: Hm * Dm * 4 > 64 KB), with a
    peaked main attention (large scores) so that the online max matters."""
    T, S, H, D, Hm, Dm = 3, 150, 4, 16, 40, 520
    q, k, w = _indexer_inputs(T, S, H, D, DTYPES[0], gen)
    ks = torch.tensor([0, 17, 140], dtype=torch.int32)
    ke = torch.tensor([150, 99, 141], dtype=torch.int32)
    q_main = _randn(T, Hm, Dm, gen=gen, dtype=torch.float32, scale=2.0)
    kv_main = _randn(S, 1, Dm, gen=gen, dtype=torch.float32)
    for deterministic in (False, True):
        got, reports = run_dense_loss(lib, q, k, w, ks, ke, q_main, kv_main, 0.5, False, deterministic)
        _no_reports(reports)
        expected = ref.indexer_kl_loss_dense(q, k, w, ks, ke, q_main, kv_main, 0.5, "sum")
        torch.testing.assert_close(got[0].double(), expected[0].double(), rtol=1e-4, atol=1e-4)
        for name, g, e in zip(("dq", "dk", "dw"), got[1:], expected[1:]):
            _assert_close(g, e, name)


# ---- launcher limits ---------------------------------------------------------------------------

def test_launcher_limits(lib, gen):
    """The launchers refuse head counts / dims whose shared-memory tiles do not fit (the glue
    reports them first) and return success without a launch for empty problems."""
    assert lib.emu_training_indexer_cuda_supports(64, 128) and lib.emu_training_indexer_cuda_supports(3, 20)
    assert not lib.emu_training_indexer_cuda_supports(64, 512)
    q, k, w = _indexer_inputs(2, 10, 64, 512, DTYPES[0], gen)
    ks, ke = _ragged_ranges(2, 10)
    _, reports = run_logits(lib, q, k, w, ks, ke, status=1)
    _no_reports(reports)
    lib.emu_clear_counters()
    q, k, w = _indexer_inputs(0, 10, 4, 8, DTYPES[0], gen)
    out, reports = run_logits(lib, q, k, w, torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.int32))
    _no_reports(reports)
    assert out.numel() == 0 and not E.counters(lib)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_empty_problems(lib, gen, deterministic):
    """T = 0 with keys: dk is all zeros; S = 0 with rows: dq, dw zeros and loss 0 (every selected
    index is out of range); the glue passes such problems to the launchers unchanged."""
    q, k, w = _indexer_inputs(0, 10, 4, 8, DTYPES[0], gen)
    empty = torch.zeros(0, dtype=torch.int32)
    (dq, dk, dw), reports = run_logits_bwd(lib, torch.zeros(0, 10), q, k, w, empty, empty, deterministic)
    _no_reports(reports)
    assert (dk == 0).all() and dq.numel() == 0 and dw.numel() == 0
    q, k, w = _indexer_inputs(3, 0, 4, 8, DTYPES[0], gen)
    indices = torch.tensor([[[0, -1, 5]]] * 3, dtype=torch.int32)
    got, reports = run_sparse_loss(lib, q, k, w, indices, torch.rand(3, 3, generator=gen), None, True, deterministic)
    _no_reports(reports)
    assert got[0].item() == 0.0 and (got[1] == 0).all() and (got[3] == 0).all() and got[2].numel() == 0
    ks, ke = torch.tensor([0, 2, -1], dtype=torch.int32), torch.tensor([5, 9, 3], dtype=torch.int32)
    (dq, dk, dw), reports = run_logits_bwd(lib, torch.zeros(3, 0), q, k, w, ks, ke, deterministic)
    _no_reports(reports)
    assert (dq == 0).all() and (dw == 0).all() and dk.numel() == 0
