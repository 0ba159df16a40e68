"""topk family: topk_indices, topk_slot_ids, indexer_topk against dsa_ext.reference."""
import pytest
import torch

import dsa_ext
from dsa_ext.reference import topk as ref
from conftest import randn

INF = float("inf")
NAN = float("nan")


def _check(logits, k, ks=None, ke=None, sorted=False):
    """Run the op and compare with the reference: exact when sorted, as sets otherwise."""
    got = dsa_ext.topk_indices(logits, k, ks, ke, sorted=sorted)
    assert got.dtype == torch.int32 and got.shape == (logits.shape[0], k)
    assert got.device == logits.device
    want = ref.topk_indices(logits.cpu(), k, None if ks is None else ks.cpu(),
                            None if ke is None else ke.cpu())
    got = got.cpu()
    if sorted:
        assert torch.equal(got, want)
    else:
        assert torch.equal(got.sort(dim=1).values, want.sort(dim=1).values)
        # -1 only as trailing padding
        n_valid = (want >= 0).sum(1)
        for t in range(got.shape[0]):
            assert (got[t, : n_valid[t]] >= 0).all() and (got[t, n_valid[t]:] == -1).all()
    return got


# ---------------------------------------------------------------- random rows
@pytest.mark.parametrize("sorted", [False, True])
@pytest.mark.parametrize("T,S,k", [(4, 1000, 1), (3, 5000, 64), (5, 300, 64), (2, 16384, 2048),
                                   (1, 16384, 4096), (3, 4097, 4096)])
def test_random_rows(device, gen, T, S, k, sorted):
    x = randn(T, S, gen=gen, device=device)
    got = _check(x, k, sorted=sorted)
    if k <= S:  # distinct values: same set as torch.topk
        tk = torch.topk(x.cpu(), k, dim=1).indices.int()
        assert torch.equal(got.sort(1).values, tk.sort(1).values)


# ---------------------------------------------------------------- adversarial rows
def _adversarial(name, T, S, gen):
    g = gen
    if name == "all_equal":
        return torch.full((T, S), 0.37)
    if name == "low_10_bits":  # one exponent/high mantissa, only the low 10 bits vary
        bits = torch.randint(0, 1024, (T, S), generator=g, dtype=torch.int32) | 0x3F800000
        return bits.view(torch.float32)
    if name == "shifted_100":
        return randn(T, S, gen=g) * 1e-3 + 100.0
    if name == "few_distinct":  # heavy ties
        return torch.randint(0, 5, (T, S), generator=g).float() - 2.0
    if name == "mostly_neg_inf":
        x = torch.full((T, S), -INF)
        m = torch.rand(T, S, generator=g) < 0.01
        return torch.where(m, randn(T, S, gen=g), x)
    if name == "nan_mix":
        x = randn(T, S, gen=g)
        u = torch.rand(T, S, generator=g)
        x = torch.where(u < 0.3, torch.full_like(x, NAN), x)
        x = torch.where((u >= 0.3) & (u < 0.4), torch.full_like(x, -INF), x)
        x = torch.where((u >= 0.4) & (u < 0.45), torch.full_like(x, INF), x)
        return x
    if name == "all_nan":
        x = torch.full((T, S), NAN)
        x[:, ::7] = -INF
        return x
    if name == "signed_zeros":
        z = torch.where(torch.rand(T, S, generator=g) < 0.5, torch.tensor(-0.0), torch.tensor(0.0))
        m = torch.rand(T, S, generator=g) < 0.2
        return torch.where(m, randn(T, S, gen=g), z)
    if name == "negative_nan_payloads":
        bits = torch.randint(0x7F800001, 0x7FFFFFFF, (T, S), generator=g, dtype=torch.int64)
        sign = (torch.rand(T, S, generator=g) < 0.5).to(torch.int64) << 31
        x = (bits | sign).to(torch.int64).to(torch.int32).view(torch.float32).clone()
        m = torch.rand(T, S, generator=g) < 0.05
        return torch.where(m, randn(T, S, gen=g), x)
    raise ValueError(name)


ADVERSARIAL = ["all_equal", "low_10_bits", "shifted_100", "few_distinct", "mostly_neg_inf",
               "nan_mix", "all_nan", "signed_zeros", "negative_nan_payloads"]


@pytest.mark.parametrize("sorted", [False, True])
@pytest.mark.parametrize("k", [1, 64, 2048])
@pytest.mark.parametrize("name", ADVERSARIAL)
def test_adversarial_rows(device, gen, name, k, sorted):
    x = _adversarial(name, 3, 6000, gen).to(device)
    _check(x, k, sorted=sorted)


def test_nan_below_neg_inf_and_zero_ties(device):
    x = torch.tensor([[NAN, -INF, 1.0, NAN, -INF, -0.0, 0.0, -0.0]], device=device)
    got = dsa_ext.topk_indices(x, 8, sorted=True).cpu()
    assert got.tolist() == [[2, 5, 6, 7, 1, 4, 0, 3]]
    assert dsa_ext.topk_indices(x, 3, sorted=True).cpu().tolist() == [[2, 5, 6]]
    got = dsa_ext.topk_indices(x[:, :2], 4, sorted=True).cpu()
    assert got.tolist() == [[1, 0, -1, -1]]


# ---------------------------------------------------------------- ranges
def test_ragged_ranges(device, gen):
    T, S = 24, 5000
    x = randn(T, S, gen=gen, device=device)
    ks = torch.randint(0, S, (T,), generator=gen, dtype=torch.int32)
    ke = (ks + torch.randint(0, 3000, (T,), generator=gen, dtype=torch.int32)).clamp(max=S)
    ks[0], ke[0] = 10, 10        # empty
    ks[1], ke[1] = 17, 18        # a single valid column
    ks[2], ke[2] = 100, 50       # inverted: empty
    ks[3], ke[3] = -20, S + 100  # clamped to the whole row
    ks[4], ke[4] = 0, 63         # fewer than k columns in range
    ks[5], ke[5] = S - 65, S     # just more than k
    for sorted in (False, True):
        got = _check(x, 64, ks.to(device), ke.to(device), sorted=sorted)
    assert (got[0] == -1).all() and (got[2] == -1).all()
    assert got[1, 0] == 17 and (got[1, 1:] == -1).all()


@pytest.mark.parametrize("only", ["ks", "ke"])
def test_one_sided_range(device, gen, only):
    T, S = 6, 3000
    x = randn(T, S, gen=gen, device=device)
    r = torch.randint(0, S, (T,), generator=gen, dtype=torch.int32).to(device)
    _check(x, 128, r if only == "ks" else None, r if only == "ke" else None, sorted=True)


def test_ranges_with_ties(device, gen):
    T, S = 8, 9000
    x = _adversarial("few_distinct", T, S, gen).to(device)
    ks = torch.randint(0, 3000, (T,), generator=gen, dtype=torch.int32).to(device)
    ke = (ks + 5000).to(device)
    for sorted in (False, True):
        _check(x, 2048, ks, ke, sorted=sorted)


# ---------------------------------------------------------------- layouts and sizes
def test_non_contiguous_rows(device, gen):
    big = randn(5, 7000, gen=gen, device=device)
    x = big[:, 123:123 + 4000]  # row stride 7000, stride(1) == 1
    assert not x.is_contiguous()
    _check(x, 256, sorted=True)
    _check(big[::2, :3000], 100)


def test_k_larger_than_row(device, gen):
    x = randn(3, 50, gen=gen, device=device)
    got = _check(x, 64, sorted=True)
    assert (got[:, 50:] == -1).all()


def test_empty_tensors(device):
    assert dsa_ext.topk_indices(torch.empty(0, 100, device=device), 8).shape == (0, 8)
    out = dsa_ext.topk_indices(torch.empty(3, 0, device=device), 4)
    assert (out.cpu() == -1).all()


def test_large_k_any_cpu(gen):
    x = randn(2, 10000, gen=gen)
    _check(x, 5000, sorted=True)  # k > 4096 is fine on CPU


needs_cuda = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.fixture(params=["mbarrier", "cluster"])
def topk_sync(request, monkeypatch):
    """The CUDA top-k's cluster synchronisation (DSA_TOPK_SYNC, read by the launcher at every
    launch, topk_launch.cu): mbarrier / st.async pushes (the sm_90 default) or a full cluster
    barrier per pass (the previous kernel). Results must be identical."""
    monkeypatch.setenv("DSA_TOPK_SYNC", request.param)
    return request.param


@pytest.mark.parametrize("name", ["random", "all_equal", "low_10_bits", "few_distinct", "nan_mix"])
@pytest.mark.parametrize("T,S", [(1, 131072), (64, 131072), (300, 32768), (3, 400000)])
@pytest.mark.parametrize("ragged", [False, True])
def test_cuda_long_rows(gen, topk_sync, name, T, S, ragged):
    """Both CUDA regimes (one CTA per row; a cluster of CTAs per row) and the streaming
    fallback (S = 400000: slices larger than the shared-memory key cache)."""
    x = randn(T, S, gen=gen) if name == "random" else _adversarial(name, T, S, gen)
    ks = ke = None
    if ragged:
        ks = torch.randint(-5, S // 3, (T,), generator=gen, dtype=torch.int32)
        ke = ks + torch.randint(0, S, (T,), generator=gen, dtype=torch.int32)
    # the sorted reference top-k is a prefix of the sorted reference top-4096
    want_all = ref.topk_indices(x, 4096, ks, ke)
    xc = x.cuda()
    kc = None if ks is None else ks.cuda()
    ec = None if ke is None else ke.cuda()
    for k, sorted in ((2048, False), (2048, True), (4096, False), (64, True), (1, False)):
        got = dsa_ext.topk_indices(xc, k, kc, ec, sorted=sorted).cpu()
        want = want_all[:, :k]
        if sorted:
            assert torch.equal(got, want), (name, T, S, k)
        else:
            assert torch.equal(got.sort(1).values, want.sort(1).values), (name, T, S, k)


for _m in needs_cuda:
    test_cuda_long_rows = _m(test_cuda_long_rows)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu_ragged(gen, topk_sync):
    T, S = 300, 20000
    x = _adversarial("few_distinct", T, S, gen)
    ks = torch.randint(-10, S, (T,), generator=gen, dtype=torch.int32)
    ke = ks + torch.randint(-10, S, (T,), generator=gen, dtype=torch.int32)
    a = dsa_ext.topk_indices(x, 2048, ks, ke, sorted=True)
    b = dsa_ext.topk_indices(x.cuda(), 2048, ks.cuda(), ke.cuda(), sorted=True).cpu()
    assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_graph_capture(gen, topk_sync):
    x = randn(8, 65536, gen=gen, device="cuda")
    ke = torch.full((8,), 60000, dtype=torch.int32, device="cuda")
    want = dsa_ext.topk_indices(x, 2048, None, ke, sorted=True)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = dsa_ext.topk_indices(x, 2048, None, ke, sorted=True)
    x.copy_(randn(8, 65536, gen=gen, device="cuda"))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, ref.topk_indices(x.cpu(), 2048, None, ke.cpu()).cuda())
    assert not torch.equal(out, want)


# ---------------------------------------------------------------- opcheck and bad input
def test_opcheck_topk_indices(device, gen):
    x = randn(4, 700, gen=gen, device=device)
    ks = torch.tensor([0, 5, 100, 600], dtype=torch.int32, device=device)
    ke = torch.tensor([700, 300, 100, 700], dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.dsa.topk_indices.default, (x, 64, ks, ke, True))
    torch.library.opcheck(torch.ops.dsa.topk_indices.default, (x, 16, None, None, False))


def test_torch_compile_fullgraph(device, gen):
    @torch.compile(fullgraph=True, dynamic=True)
    def select_slots(x, ks, ke, table):
        return dsa_ext.topk_slot_ids(dsa_ext.topk_indices(x * 2, 16, ks, ke, sorted=True), table, 4)

    x = randn(4, 100, gen=gen, device=device)
    ks = torch.tensor([0, 3, 50, 99], dtype=torch.int32, device=device)
    ke = torch.tensor([90, 10, 100, 99], dtype=torch.int32, device=device)
    table = torch.randperm(200, generator=gen)[:100].reshape(4, 25).int().to(device)
    want = dsa_ext.topk_slot_ids(dsa_ext.topk_indices(x, 16, ks, ke, sorted=True), table, 4)
    assert torch.equal(select_slots(x, ks, ke, table), want)


def test_bad_inputs_topk_indices(device, gen):
    x = randn(4, 700, gen=gen, device=device)
    i32 = dict(dtype=torch.int32, device=device)
    with pytest.raises(RuntimeError, match="logits"):
        dsa_ext.topk_indices(x.double(), 8)
    with pytest.raises(RuntimeError, match="logits"):
        dsa_ext.topk_indices(x.half(), 8)
    with pytest.raises(RuntimeError, match="logits"):
        dsa_ext.topk_indices(x[0], 8)
    with pytest.raises(RuntimeError, match="logits"):
        torch.ops.dsa.topk_indices(randn(700, 4, gen=gen, device=device).t(), 8)  # raw op
    with pytest.raises((RuntimeError, ValueError), match="k must be"):
        dsa_ext.topk_indices(x, 0)
    with pytest.raises(RuntimeError, match="ks"):
        torch.ops.dsa.topk_indices(x, 8, torch.zeros(4, dtype=torch.int64, device=device))
    with pytest.raises(RuntimeError, match="ks"):
        dsa_ext.topk_indices(x, 8, torch.zeros(4, dtype=torch.float32, device=device))
    with pytest.raises(RuntimeError, match="ke"):
        dsa_ext.topk_indices(x, 8, None, torch.zeros(5, **i32))
    with pytest.raises(RuntimeError, match="ks"):
        dsa_ext.topk_indices(x, 8, torch.zeros(4, 1, **i32))
    if device == "cuda":
        with pytest.raises((RuntimeError, ValueError), match="k must be"):
            dsa_ext.topk_indices(x, 4097)
        with pytest.raises(RuntimeError, match="ks"):
            dsa_ext.topk_indices(x, 8, torch.zeros(4, dtype=torch.int32))


# ---------------------------------------------------------------- topk_slot_ids
@pytest.mark.parametrize("B,N,K,block_size", [(3, 1, 64, 64), (4, 2, 100, 16), (2, 4, 7, 1)])
def test_slot_ids(device, gen, B, N, K, block_size):
    M = 9
    table = torch.randperm(1000, generator=gen)[: B * M].reshape(B, M).int()
    table[0, 3] = -1  # an unallocated block
    idx = torch.randint(-3, M * block_size + 40, (B * N, K), generator=gen, dtype=torch.int32)
    idx[:, 0] = -1
    idx[0, 1] = 3 * block_size  # lands in the unallocated block
    got = dsa_ext.topk_slot_ids(idx.to(device), table.to(device), block_size)
    want = ref.topk_slot_ids(idx, table, block_size)
    assert got.dtype == torch.int32 and torch.equal(got.cpu(), want)
    # spot-check the formula against a direct loop
    for r in range(B * N):
        b = r // N
        for j in range(K):
            p = int(idx[r, j])
            if p < 0 or p // block_size >= M or table[b, p // block_size] < 0:
                assert want[r, j] == -1
            else:
                assert want[r, j] == table[b, p // block_size] * block_size + p % block_size


def test_slot_ids_3d(device, gen):
    B, N, K, bs, M = 3, 2, 50, 16, 6
    table = torch.randperm(100, generator=gen)[: B * M].reshape(B, M).int()
    idx = torch.randint(-1, M * bs + 5, (B, N, K), generator=gen, dtype=torch.int32)
    got = dsa_ext.topk_slot_ids(idx.to(device), table.to(device), bs)
    assert got.shape == (B, N, K)
    flat = dsa_ext.topk_slot_ids(idx.reshape(B * N, K).to(device), table.to(device), bs)
    assert torch.equal(got.reshape(B * N, K).cpu(), flat.cpu())
    assert torch.equal(got.cpu(), ref.topk_slot_ids(idx, table, bs))
    with pytest.raises(RuntimeError, match="indices"):
        dsa_ext.topk_slot_ids(idx[:2].to(device), table.to(device), bs)  # size(0) != B


def test_slot_ids_from_topk(device, gen):
    B, N, S, bs = 2, 2, 1000, 64
    x = randn(B * N, S, gen=gen, device=device)
    idx = dsa_ext.topk_indices(x, 2048)  # mostly -1 padding
    table = torch.randperm(64, generator=gen)[: B * 16].reshape(B, 16).int().to(device)
    got = dsa_ext.topk_slot_ids(idx, table, bs)
    assert torch.equal(got.cpu(), ref.topk_slot_ids(idx.cpu(), table.cpu(), bs))
    assert ((got == -1) == (idx == -1)).all()


def test_opcheck_slot_ids(device, gen):
    idx = torch.randint(-1, 500, (4, 33), generator=gen, dtype=torch.int32).to(device)
    table = torch.randint(0, 100, (2, 8), generator=gen, dtype=torch.int32).to(device)
    torch.library.opcheck(torch.ops.dsa.topk_slot_ids.default, (idx, table, 64))


def test_bad_inputs_slot_ids(device):
    i32 = dict(dtype=torch.int32, device=device)
    idx, table = torch.zeros(4, 8, **i32), torch.zeros(2, 3, **i32)
    with pytest.raises(RuntimeError, match="indices"):
        torch.ops.dsa.topk_slot_ids(idx.long(), table, 64)    # raw op: int32 only
    with pytest.raises(RuntimeError, match="block_table"):
        torch.ops.dsa.topk_slot_ids(idx, table.long(), 64)
    with pytest.raises(RuntimeError, match="block_table"):
        dsa_ext.topk_slot_ids(idx, torch.zeros(3, 3, **i32), 64)
    with pytest.raises((RuntimeError, ValueError), match="block_size"):
        dsa_ext.topk_slot_ids(idx, table, 0)
    with pytest.raises(RuntimeError, match="indices"):
        dsa_ext.topk_slot_ids(idx[0], table, 64)
    with pytest.raises(RuntimeError, match="indices"):
        torch.ops.dsa.topk_slot_ids(idx.t(), table, 64)  # not contiguous (the wrapper copies)
    if device == "cuda":
        with pytest.raises(RuntimeError, match="block_table"):
            dsa_ext.topk_slot_ids(idx, table.cpu(), 64)


# ---------------------------------------------------------------- indexer_topk
def _has_indexer(device):
    key = "CUDA" if device == "cuda" else "CPU"
    return torch._C._dispatch_has_kernel_for_dispatch_key("dsa::indexer_logits", key)


def _indexer_logits_formula(q, k, k_scale, weights, ks, ke, clean_logits=True):
    """SPEC section 3 indexer logits in fp32 (used only as a stand-in kernel, below)."""
    s = torch.einsum("thd,sd->ths", q.float(), k.float()).relu()
    logits = torch.einsum("ths,th->ts", s, weights.float()) * k_scale.float()[None, :]
    if clean_logits:
        cols = torch.arange(k.shape[0], device=q.device)
        valid = (cols[None, :] >= ks[:, None].long()) & (cols[None, :] < ke[:, None].long())
        logits = logits.masked_fill(~valid, float("-inf"))
    return logits.contiguous()


@pytest.fixture
def indexer_op(device):
    """dsa::indexer_logits for `device`: the real kernel when the indexer family is built, else
    a PyTorch stand-in registered for this test only, so that indexer_topk's chunking and
    dispatch (C++, csrc/topk/indexer_topk.h) are exercised either way."""
    if _has_indexer(device):
        yield "kernel"
        return
    lib = torch.library.Library("dsa", "IMPL")
    lib.impl("indexer_logits", _indexer_logits_formula, "CUDA" if device == "cuda" else "CPU")
    try:
        yield "stand-in"
    finally:
        lib._destroy()


def _indexer_shape(device):
    """(H, D) of the indexer_topk tests: the CUDA indexer kernels serve only H in {32, 64} with
    D = 128 (they raise on anything else); the CPU kernels any (small keeps tests fast)."""
    return (32, 128) if device == "cuda" else (4, 64)


def _indexer_inputs(T, S, H, D, gen, device):
    q = (randn(T, H, D, gen=gen) * 2).clamp(-448, 448).to(torch.float8_e4m3fn).to(device)
    k = (randn(S, D, gen=gen) * 2).clamp(-448, 448).to(torch.float8_e4m3fn).to(device)
    k_scale = (torch.rand(S, generator=gen) + 0.5).to(device)
    weights = randn(T, H, gen=gen, device=device)
    ks = torch.randint(0, S // 2, (T,), generator=gen, dtype=torch.int32)
    ke = (ks + torch.randint(1, S, (T,), generator=gen, dtype=torch.int32)).clamp(max=S)
    ks[0], ke[0] = 3, 3  # an empty row
    ks[1], ke[1] = 0, 40  # fewer than topk columns
    return q, k, k_scale, weights, ks.to(device), ke.to(device)


@pytest.mark.parametrize("sorted", [False, True])
def test_indexer_topk_chunks(device, gen, indexer_op, sorted):
    (T, S, topk), (H, D) = (13, 700, 64), _indexer_shape(device)
    args = _indexer_inputs(T, S, H, D, gen, device)
    logits = torch.ops.dsa.indexer_logits(*args, True)
    want = dsa_ext.topk_indices(logits, topk, args[4], args[5], sorted=sorted).cpu()
    # workspace of 3 rows -> 5 chunks; of 1 byte -> one row per chunk; default -> one chunk
    for ws in (3 * S * 4, 3 * S * 4 + 5, 1, 256 * 1024 * 1024):
        got = dsa_ext.indexer_topk(*args, topk, sorted=sorted, max_workspace_bytes=ws).cpu()
        assert got.shape == (T, topk) and got.dtype == torch.int32
        if sorted:
            assert torch.equal(got, want), ws
        else:
            assert torch.equal(got.sort(1).values, want.sort(1).values), ws
    assert (got[0] == -1).all() and (got[1, 40:] == -1).all()


def test_indexer_topk_vs_reference(device, gen, indexer_op):
    """Against dsa_ext.reference.indexer_topk (reference indexer logits + reference top-k)."""
    try:
        from dsa_ext.reference.indexer import indexer_logits  # noqa: F401
    except ImportError:
        pytest.skip("dsa_ext.reference.indexer_logits not written yet (indexer family)")
    (T, S, topk), (H, D) = (9, 500, 32), _indexer_shape(device)
    args = _indexer_inputs(T, S, H, D, gen, device)
    want = ref.indexer_topk(*[a.cpu() for a in args], topk, sorted=True)
    got = dsa_ext.indexer_topk(*args, topk, sorted=True, max_workspace_bytes=2 * S * 4).cpu()
    # kernel and reference logits may differ in the last bits (summation order): require the
    # selected sets to agree almost everywhere rather than bit-exactly.
    overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(got, want))
    assert overlap >= 0.98 * sum(len(set(b.tolist())) for b in want)


def test_indexer_topk_bad_inputs(device, gen, indexer_op):
    args = _indexer_inputs(4, 100, *_indexer_shape(device), gen, device)
    with pytest.raises((RuntimeError, ValueError), match="topk"):
        dsa_ext.indexer_topk(*args, 0)
    with pytest.raises((RuntimeError, ValueError), match="max_workspace_bytes"):
        dsa_ext.indexer_topk(*args, 8, max_workspace_bytes=0)
    with pytest.raises(RuntimeError, match="ks"):
        dsa_ext.indexer_topk(*args[:4], args[4][:3], args[5], 8)
    with pytest.raises(RuntimeError, match="q"):
        dsa_ext.indexer_topk(args[0][0], *args[1:], 8)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_indexer_topk_cuda_mixed_devices_and_topk_bound(gen):
    """The CUDA kernel is dispatched when any argument is on CUDA: a CPU q must get a message
    naming q (not CUDAGuard's "non-CUDA DeviceType"), a CPU k one naming k, and a topk above
    the CUDA top-k's limit one naming topk, before any logits are computed."""
    args = list(_indexer_inputs(4, 100, *_indexer_shape("cuda"), gen, "cuda"))
    with pytest.raises(RuntimeError, match="q must be a CUDA tensor"):
        dsa_ext.indexer_topk(args[0].cpu(), *args[1:], 8)
    with pytest.raises(RuntimeError, match="k must be on the same device as q"):
        dsa_ext.indexer_topk(args[0], args[1].cpu(), *args[2:], 8)
    with pytest.raises(RuntimeError, match="k_scale must be on the same device as q"):
        dsa_ext.indexer_topk(args[0], args[1], args[2].cpu(), *args[3:], 8)
    with pytest.raises(ValueError, match="topk must be <= 4096"):
        dsa_ext.indexer_topk(*args, 4097)


def test_opcheck_indexer_topk(device, gen, indexer_op):
    args = _indexer_inputs(5, 200, *_indexer_shape(device), gen, device)
    # test_schema is left out: torch's SchemaCheckMode compares inputs with arithmetic that
    # float8_e4m3fn does not implement ("mul_cpu_reduced_float"), for any op with FP8 inputs.
    torch.library.opcheck(torch.ops.dsa.indexer_topk.default, (*args, 32, True, 2 * 200 * 4),
                          test_utils=("test_autograd_registration", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))
