"""sparse_mla_fwd / sparse_mla_bwd / dsa_ext.sparse_mla against dsa_ext.reference.

CPU cases are small (a few tokens); the full V3.2 shape (H=128, K=2048) runs only on CUDA.
"""
import pytest
import torch

import dsa_ext
from dsa_ext.reference import sparse_mla_bwd as ref_bwd
from dsa_ext.reference import sparse_mla_fwd as ref_fwd

from conftest import randn, rel_err

D_QK, D_V = 576, 512


def make_inputs(T, H, S, K, *, gen, device, dtype=torch.bfloat16, d_qk=D_QK, invalid_frac=0.1,
                scale_q=1.0):
    q = randn(T, H, d_qk, gen=gen, dtype=dtype, device=device, scale=scale_q)
    kv = randn(S, 1, d_qk, gen=gen, dtype=dtype, device=device)
    idx = torch.randint(0, S, (T, 1, K), generator=gen, dtype=torch.int32)
    drop = torch.rand(T, 1, K, generator=gen) < invalid_frac
    idx[drop] = -1
    return q, kv, idx.to(device)


def check_fwd(q, kv, idx, scale, d_v=D_V, sink=None, tl=None, tol=1e-2):
    out, lse = dsa_ext.sparse_mla_fwd(q, kv, idx, scale, d_v, sink, tl)
    r_out, r_lse = ref_fwd(q.cpu(), kv.cpu(), idx.cpu(), scale, d_v,
                           None if sink is None else sink.cpu(),
                           None if tl is None else tl.cpu())
    assert out.shape == r_out.shape and out.dtype == q.dtype
    assert lse.shape == r_lse.shape and lse.dtype == torch.float32
    assert rel_err(out, r_out) < tol
    lse_c = lse.cpu()
    assert torch.equal(torch.isneginf(lse_c), torch.isneginf(r_lse))
    fin = torch.isfinite(r_lse)
    assert torch.allclose(lse_c[fin], r_lse[fin], atol=1e-3, rtol=1e-4)
    # empty rows: out exactly 0
    assert (out.cpu()[torch.isneginf(r_lse)] == 0).all()
    return out, lse


def scale_for(d_qk):
    return d_qk ** -0.5


# ---- forward ---------------------------------------------------------------------------------

@pytest.mark.parametrize("H", [16, 32, 64, 128])
@pytest.mark.parametrize("K", [64, 128, 256, 100])
def test_fwd_matches_reference(device, gen, H, K):
    T = 2 if device == "cpu" else 33
    S = 3 * K
    q, kv, idx = make_inputs(T, H, S, K, gen=gen, device=device)
    check_fwd(q, kv, idx, scale_for(D_QK))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("H", [16, 64, 128])
def test_fwd_full_size_cuda(gen, H):
    T, S, K = 64, 8192, 2048
    q, kv, idx = make_inputs(T, H, S, K, gen=gen, device="cuda")
    check_fwd(q, kv, idx, scale_for(D_QK))


def test_fwd_adversarial_indices(device, gen):
    T, H, S, K = 6, 16, 200, 128
    q, kv, idx = make_inputs(T, H, S, K, gen=gen, device=device, invalid_frac=0.0)
    idx = idx.cpu()
    idx[0, 0, 10:70] = -1                       # a long run of -1
    idx[1, 0, ::3] = S                          # exactly S: out of range
    idx[1, 0, 1::7] = -5                        # other negatives
    idx[1, 0, 2::11] = 2**31 - 1                # far out of range
    idx[2] = -1                                 # empty row
    idx[3, 0, :] = 7                            # one row repeated K times
    idx[4, 0, 64:] = S + 1000                   # second half invalid
    idx[5, 0, :] = idx[5, 0, torch.arange(K) % 5]   # ties from repeats
    idx = idx.to(device)
    out, lse = check_fwd(q, kv, idx, scale_for(D_QK))
    assert torch.isneginf(lse[2]).all() and (out[2] == 0).all()
    # the row repeated K times attends to kv[7] only: out == kv[7, :d_v]
    torch.testing.assert_close(out[3].float().cpu(),
                               kv[7, 0, :D_V].float().cpu().expand(H, D_V), atol=1e-2, rtol=0)


def test_fwd_all_invalid(device, gen):
    q, kv, idx = make_inputs(3, 16, 50, 64, gen=gen, device=device)
    idx = torch.full_like(idx, -1)
    out, lse = dsa_ext.sparse_mla_fwd(q, kv, idx, 0.1)
    assert (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("with_sink", [False, True])
@pytest.mark.parametrize("with_len", [False, True])
def test_fwd_sink_and_topk_length(device, gen, with_sink, with_len):
    T, H, S, K = 5, 32, 300, 192
    q, kv, idx = make_inputs(T, H, S, K, gen=gen, device=device, scale_q=3.0)
    sink = (randn(H, gen=gen) * 2).to(device) if with_sink else None
    tl = torch.tensor([0, 1, 64, 100, 500], dtype=torch.int32, device=device) if with_len else None
    out, lse = check_fwd(q, kv, idx, scale_for(D_QK), sink=sink, tl=tl)
    if with_len:
        assert torch.isneginf(lse[0]).all()
    if with_sink:
        # the sink must change out but not lse
        out0, lse0 = dsa_ext.sparse_mla_fwd(q, kv, idx, scale_for(D_QK), D_V, None, tl)
        assert torch.equal(torch.isneginf(lse0), torch.isneginf(lse))
        fin = torch.isfinite(lse0)
        torch.testing.assert_close(lse[fin], lse0[fin], atol=1e-4, rtol=1e-5)
        assert not torch.allclose(out.float(), out0.float(), atol=1e-3)


def test_fwd_small_head_dim_cpu(gen):
    T, H, S, K = 4, 3, 40, 17
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        q, kv, idx = make_inputs(T, H, S, K, gen=gen, device="cpu", dtype=dtype, d_qk=40)
        sink = randn(H, gen=gen)
        tl = torch.tensor([17, 3, 0, 9], dtype=torch.int32)
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
        check_fwd(q, kv, idx, 0.2, d_v=24, sink=sink, tl=tl, tol=tol)


def test_fwd_float64_exact_cpu(gen):
    q, kv, idx = make_inputs(3, 4, 30, 20, gen=gen, device="cpu", dtype=torch.float64, d_qk=32)
    out, lse = dsa_ext.sparse_mla_fwd(q, kv, idx, 0.3, 16)
    r_out, r_lse = ref_fwd(q, kv, idx, 0.3, 16)
    torch.testing.assert_close(out, r_out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, r_lse)


# ---- backward --------------------------------------------------------------------------------

def check_bwd(q, kv, idx, scale, d_v=D_V, sink=None, tl=None, deterministic=False, tol=2e-2):
    out, lse = dsa_ext.sparse_mla_fwd(q, kv, idx, scale, d_v, sink, tl)
    g = torch.Generator().manual_seed(7)
    dout = randn(*out.shape, gen=g, dtype=q.dtype, device=q.device)
    dq, dkv = dsa_ext.sparse_mla_bwd(q, kv, out, dout, idx, lse, scale, d_v, sink, tl,
                                     deterministic)
    c = lambda t: None if t is None else t.cpu()  # noqa: E731
    r_dq, r_dkv = ref_bwd(q.cpu(), kv.cpu(), out.cpu(), dout.cpu(), idx.cpu(), lse.cpu(), scale,
                          d_v, c(sink), c(tl))
    assert dq.shape == q.shape and dq.dtype == q.dtype
    assert dkv.shape == kv.shape and dkv.dtype == kv.dtype
    assert rel_err(dq, r_dq) < tol
    assert rel_err(dkv, r_dkv) < tol
    return dq, dkv, out, lse, dout


@pytest.mark.parametrize("H", [16, 64, 128])
@pytest.mark.parametrize("K", [64, 128, 100])
def test_bwd_matches_reference(device, gen, H, K):
    T = 2 if device == "cpu" else 33
    S = 2 * K  # repeats across tokens: dkv rows receive several contributions
    q, kv, idx = make_inputs(T, H, S, K, gen=gen, device=device)
    check_bwd(q, kv, idx, scale_for(D_QK))


@pytest.mark.parametrize("deterministic", [False, True])
def test_bwd_sink_topk_length_adversarial(device, gen, deterministic):
    T, H, S, K = 5, 16, 90, 128
    q, kv, idx = make_inputs(T, H, S, K, gen=gen, device=device, scale_q=2.0)
    idx = idx.cpu()
    idx[0] = -1
    idx[1, 0, :40] = 3
    idx[2, 0, ::2] = S + 7
    idx = idx.to(device)
    sink = randn(H, gen=gen).to(device)
    tl = torch.tensor([128, 100, 128, 0, 65], dtype=torch.int32, device=device)
    dq, dkv, *_ = check_bwd(q, kv, idx, scale_for(D_QK), sink=sink, tl=tl,
                            deterministic=deterministic)
    assert (dq[0] == 0).all() and (dq[3] == 0).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_bwd_full_size_cuda(gen):
    T, H, S, K = 32, 128, 4096, 2048
    q, kv, idx = make_inputs(T, H, S, K, gen=gen, device="cuda")
    check_bwd(q, kv, idx, scale_for(D_QK))
    check_bwd(q, kv, idx, scale_for(D_QK), deterministic=True)


def test_bwd_small_dims_cpu(gen):
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        q, kv, idx = make_inputs(6, 3, 25, 19, gen=gen, device="cpu", dtype=dtype, d_qk=48)
        sink = randn(3, gen=gen)
        tl = torch.tensor([19, 0, 5, 18, 30, -2], dtype=torch.int32)
        check_bwd(q, kv, idx, 0.25, d_v=32, sink=sink, tl=tl, tol=tol)


def test_bwd_deterministic_bitwise(device, gen):
    T, H, S, K = 8, 16, 64, 128  # S < K: heavy collisions on dkv rows
    q, kv, idx = make_inputs(T, H, S, K, gen=gen, device=device)
    out, lse = dsa_ext.sparse_mla_fwd(q, kv, idx, 0.05)
    dout = randn(*out.shape, gen=gen, dtype=q.dtype, device=device)
    runs = [dsa_ext.sparse_mla_bwd(q, kv, out, dout, idx, lse, 0.05, deterministic=True)
            for _ in range(3)]
    for dq, dkv in runs[1:]:
        assert torch.equal(dq, runs[0][0])
        assert torch.equal(dkv.view(torch.int16), runs[0][1].view(torch.int16))


def test_gradcheck_float64_cpu(gen):
    T, H, S, K, D, dv = 3, 2, 9, 6, 12, 8
    q = randn(T, H, D, gen=gen, dtype=torch.float64).requires_grad_()
    kv = randn(S, 1, D, gen=gen, dtype=torch.float64).requires_grad_()
    idx = torch.tensor([[0, 3, -1, 3, 8, 9], [1, 1, 2, 5, 7, 4], [-1] * 6],
                       dtype=torch.int32)[:, None]
    sink = randn(H, gen=gen)
    tl = torch.tensor([6, 4, 6], dtype=torch.int32)
    for det in (False, True):
        assert torch.autograd.gradcheck(
            lambda q, kv: dsa_ext.sparse_mla(q, kv, idx, 0.4, dv, sink, tl, deterministic=det)[0],
            (q, kv))
        assert torch.autograd.gradcheck(
            lambda q, kv: dsa_ext.sparse_mla(q, kv, idx, 0.4, dv, deterministic=det)[0], (q, kv))


def test_autograd_matches_reference(device, gen):
    T, H, S, K = 3, 16, 100, 64
    q, kv, idx = make_inputs(T, H, S, K, gen=gen, device=device)
    q.requires_grad_()
    kv.requires_grad_()
    out, lse = dsa_ext.sparse_mla(q, kv, idx, scale_for(D_QK))
    dout = randn(*out.shape, gen=gen, dtype=q.dtype, device=device)
    out.backward(dout)
    r_dq, r_dkv = ref_bwd(q.detach().cpu(), kv.detach().cpu(), None, dout.cpu(), idx.cpu(), None,
                          scale_for(D_QK))
    assert rel_err(q.grad, r_dq) < 2e-2
    assert rel_err(kv.grad, r_dkv) < 2e-2


def test_torch_compile_fullgraph_cpu(gen):
    q, kv, idx = make_inputs(2, 4, 30, 16, gen=gen, device="cpu", dtype=torch.float32, d_qk=32)
    sink = randn(4, gen=gen)

    for det in (False, True):
        def f(q, kv):
            out, lse = dsa_ext.sparse_mla(q, kv, idx, 0.3, 16, sink, deterministic=det)
            return (out * out).sum()

        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        qa, kva = q.clone().requires_grad_(), kv.clone().requires_grad_()
        qb, kvb = q.clone().requires_grad_(), kv.clone().requires_grad_()
        compiled(qa, kva).backward()
        f(qb, kvb).backward()
        torch.testing.assert_close(qa.grad, qb.grad)
        torch.testing.assert_close(kva.grad, kvb.grad)


def test_opcheck(device, gen):
    q, kv, idx = make_inputs(3, 16, 40, 64, gen=gen, device=device)
    sink = randn(16, gen=gen).to(device)
    tl = torch.tensor([64, 10, 0], dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.dsa.sparse_mla_fwd, (q, kv, idx, 0.04, D_V, sink, tl))
    torch.library.opcheck(torch.ops.dsa.sparse_mla_fwd, (q, kv, idx, 0.04))
    out, lse = dsa_ext.sparse_mla_fwd(q, kv, idx, 0.04, D_V, sink, tl)
    dout = randn(*out.shape, gen=gen, dtype=q.dtype, device=device)
    torch.library.opcheck(torch.ops.dsa.sparse_mla_bwd,
                          (q, kv, out, dout, idx, lse, 0.04, D_V, sink, tl, True))
    torch.library.opcheck(torch.ops.dsa.sparse_mla_bwd, (q, kv, out, dout, idx, lse, 0.04))


# ---- bad input -------------------------------------------------------------------------------

def test_bad_inputs(device, gen):
    q, kv, idx = make_inputs(2, 16, 40, 64, gen=gen, device=device)
    f = dsa_ext.sparse_mla_fwd
    raw = torch.ops.dsa.sparse_mla_fwd          # the raw op keeps SPEC's strict contract
    with pytest.raises(RuntimeError, match="indices must be int32"):
        raw(q, kv, idx.long(), 0.1)
    with pytest.raises(RuntimeError, match="indices must be int32"):
        f(q, kv, idx.short(), 0.1)
    with pytest.raises(RuntimeError, match="indices"):
        f(q, kv, idx[:1], 0.1)
    with pytest.raises(RuntimeError, match="indices"):
        f(q, kv, idx[:, 0], 0.1)
    with pytest.raises(RuntimeError, match="kv"):
        f(q, kv[:, :, :500], idx, 0.1)
    with pytest.raises(RuntimeError, match="kv"):
        f(q, kv.expand(40, 2, D_QK), idx, 0.1)
    with pytest.raises(RuntimeError, match="kv must have q's dtype"):
        f(q, kv.half(), idx, 0.1)
    with pytest.raises(RuntimeError, match="q must be"):
        f(q.half(), kv.half(), idx, 0.1)
    with pytest.raises(RuntimeError, match="q"):
        f(q[0], kv, idx, 0.1)
    with pytest.raises(RuntimeError, match="q must be contiguous"):
        raw(q.transpose(0, 1).contiguous().transpose(0, 1), kv, idx, 0.1)
    with pytest.raises(ValueError, match="d_v"):
        f(q, kv, idx, 0.1, 600)
    with pytest.raises(ValueError, match="sm_scale"):
        f(q, kv, idx, float("nan"))
    with pytest.raises(RuntimeError, match="attn_sink"):
        raw(q, kv, idx, 0.1, D_V, torch.zeros(16, dtype=torch.float64, device=device))
    with pytest.raises(RuntimeError, match="attn_sink"):
        f(q, kv, idx, 0.1, D_V, torch.zeros(16, dtype=torch.int32, device=device))
    with pytest.raises(RuntimeError, match="attn_sink"):
        f(q, kv, idx, 0.1, D_V, torch.zeros(8, device=device))
    with pytest.raises(RuntimeError, match="topk_length"):
        raw(q, kv, idx, 0.1, D_V, None, torch.zeros(2, dtype=torch.int64, device=device))
    with pytest.raises(RuntimeError, match="topk_length"):
        f(q, kv, idx, 0.1, D_V, None, torch.zeros(2, dtype=torch.float32, device=device))
    with pytest.raises(RuntimeError, match="topk_length"):
        f(q, kv, idx, 0.1, D_V, None, torch.zeros(3, dtype=torch.int32, device=device))
    out, lse = f(q, kv, idx, 0.1)
    b = dsa_ext.sparse_mla_bwd
    with pytest.raises(RuntimeError, match="lse must be float32"):
        b(q, kv, out, out, idx, lse.double(), 0.1)
    with pytest.raises(RuntimeError, match="dout"):
        b(q, kv, out, out[:, :, :256], idx, lse, 0.1)
    with pytest.raises(RuntimeError, match="out"):
        b(q, kv, out.float(), out, idx, lse, 0.1)
    with pytest.raises(RuntimeError, match="lse"):
        b(q, kv, out, out, idx, lse[:1], 0.1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_bad_inputs_cuda_only(gen):
    # H outside {8, 16, 32, 64, 128} (24 and 48 are multiples of 8 and of 16)
    for H in (24, 48, 4, 256):
        q, kv, idx = make_inputs(2, H, 40, 64, gen=gen, device="cuda")
        with pytest.raises(RuntimeError, match=r"heads\) must be one of \{8, 16, 32, 64, 128\}"):
            dsa_ext.sparse_mla_fwd(q, kv, idx, 0.1)
    # d_qk outside {512, 576}
    for d_qk in (64, 448, 640):
        q, kv, idx = make_inputs(2, 16, 40, 64, gen=gen, device="cuda", d_qk=d_qk)
        with pytest.raises(RuntimeError, match=r"d_qk\) must be one of \{512, 576\}"):
            dsa_ext.sparse_mla_fwd(q, kv, idx, 0.1, 32)
    # d_v != 512 at either width
    for d_qk, d_v in ((512, 448), (512, 256), (576, 576)):
        q, kv, idx = make_inputs(2, 16, 40, 64, gen=gen, device="cuda", d_qk=d_qk)
        with pytest.raises(ValueError, match="d_v must be 512"):
            dsa_ext.sparse_mla_fwd(q, kv, idx, 0.1, d_v)
    # the backward runs the same checks
    q, kv, idx = make_inputs(2, 24, 40, 64, gen=gen, device="cuda")
    out = torch.zeros(2, 24, D_V, dtype=torch.bfloat16, device="cuda")
    lse = torch.zeros(2, 24, device="cuda")
    with pytest.raises(RuntimeError, match="heads"):
        dsa_ext.sparse_mla_bwd(q, kv, out, out, idx, lse, 0.1)
    q, kv, idx = make_inputs(2, 16, 40, 64, gen=gen, device="cuda", dtype=torch.float32)
    with pytest.raises(RuntimeError, match="q must be bfloat16"):
        dsa_ext.sparse_mla_fwd(q, kv, idx, 0.1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_unaligned_view_cuda(gen):
    q, kv, idx = make_inputs(2, 16, 40, 64, gen=gen, device="cuda")
    flat = torch.empty(40 * D_QK + 1, dtype=torch.bfloat16, device="cuda")
    kv_odd = flat[1:].view(40, 1, D_QK)
    kv_odd.copy_(kv)
    with pytest.raises(RuntimeError, match="kv must start at a 16-byte aligned"):
        dsa_ext.sparse_mla_fwd(q, kv_odd, idx, 0.1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_large_kv_64bit_offsets_cuda(gen):
    """S = 2^20 + 7 latent rows (1.2 GB): row * 576 * 2 bytes exceeds 2^31; indices near the end."""
    T, H, K, S = 4, 16, 128, (1 << 20) + 7
    q = randn(T, H, D_QK, gen=gen, dtype=torch.bfloat16, device="cuda")
    kv = torch.randn(S, 1, D_QK, device="cuda", dtype=torch.bfloat16)
    idx = torch.randint(S - 5000, S + 50, (T, 1, K), generator=gen, dtype=torch.int32).cuda()
    out, lse = dsa_ext.sparse_mla_fwd(q, kv, idx, scale_for(D_QK))
    # the reference only needs the rows in use
    lo = S - 5000
    idx_local = torch.where(idx >= lo, idx - lo, -1).int()
    sub = kv[lo:].cpu()
    r_out, r_lse = ref_fwd(q.cpu(), sub, torch.where(idx < S, idx_local, -1).cpu(), scale_for(D_QK))
    assert rel_err(out, r_out) < 1e-2
    dout = torch.randn_like(out)
    dq, dkv = dsa_ext.sparse_mla_bwd(q, kv, out, dout, idx, lse, scale_for(D_QK))
    r_dq, r_dkv = ref_bwd(q.cpu(), sub, out.cpu(), dout.cpu(),
                          torch.where(idx < S, idx_local, -1).cpu(), lse.cpu(), scale_for(D_QK))
    assert rel_err(dq, r_dq) < 2e-2
    assert rel_err(dkv[lo:], r_dkv) < 2e-2
    assert (dkv[:lo] == 0).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_bwd_deterministic_several_chunks_cuda(gen, monkeypatch):
    """T * K above one deterministic chunk (131072 entries): chunks reduce in order (the
    chunked design, forced: at this S the default is fixed point)."""
    monkeypatch.setenv("DSA_SPARSE_MLA_DET_REDUCE", "list")
    T, H, S, K = 80, 64, 1024, 2048
    q, kv, idx = make_inputs(T, H, S, K, gen=gen, device="cuda")
    dq, dkv, out, lse, dout = check_bwd(q, kv, idx, scale_for(D_QK), deterministic=True)
    dq2, dkv2 = dsa_ext.sparse_mla_bwd(q, kv, out, dout, idx, lse, scale_for(D_QK),
                                       deterministic=True)
    assert torch.equal(dq, dq2) and torch.equal(dkv.view(torch.int16), dkv2.view(torch.int16))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("mode", ["fixed", "list", "bitmap"])
def test_bwd_deterministic_designs_cuda(gen, monkeypatch, mode):
    """Each deterministic design at H = 128 (the sm_90a wgmma backward, two head blocks):
    bitwise the same over three runs, equal to the atomic mode to fp32 rounding, and the
    reference's gradients."""
    T, H, S, K = 24, 128, 300, 512
    q, kv, idx = make_inputs(T, H, S, K, gen=gen, device="cuda")
    monkeypatch.setenv("DSA_SPARSE_MLA_DET_REDUCE", mode)
    dq, dkv, out, lse, dout = check_bwd(q, kv, idx, scale_for(D_QK), deterministic=True)
    for _ in range(2):
        dq2, dkv2 = dsa_ext.sparse_mla_bwd(q, kv, out, dout, idx, lse, scale_for(D_QK), deterministic=True)
        assert torch.equal(dq, dq2) and torch.equal(dkv.view(torch.int16), dkv2.view(torch.int16))
    _, dkv_a = dsa_ext.sparse_mla_bwd(q, kv, out, dout, idx, lse, scale_for(D_QK))
    torch.testing.assert_close(dkv.float(), dkv_a.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_fwd_ws_pair_equals_ws_cuda(gen, monkeypatch):
    """At H = 128 the default forward on sm_90a is the ws pair (2-CTA clusters): bitwise the
    unpaired ws kernel's result (the same math on the same shared-memory contents)."""
    q, kv, idx = make_inputs(16, 128, 700, 1000, gen=gen, device="cuda")
    monkeypatch.setenv("DSA_SPARSE_MLA_FWD", "ws-pair")
    out_p, lse_p = check_fwd(q, kv, idx, scale_for(D_QK))
    monkeypatch.setenv("DSA_SPARSE_MLA_FWD", "ws")
    out_1, lse_1 = dsa_ext.sparse_mla_fwd(q, kv, idx, scale_for(D_QK))
    assert torch.equal(out_p, out_1) and torch.equal(lse_p, lse_1)


# ---- the opt-in sm_90a wgmma forward (DSA_SPARSE_MLA_WGMMA=1, 64-head blocks) --------------------

def test_wgmma_layout_model_cpu():
    """Numpy model of sparse_mla_wgmma.cuh's shared-memory layout, wgmma descriptors and
    accumulator fragments (csrc/sparse_mla/emu/wgmma_layout_check.py): one CTA's out / lse match
    a float64 reference, and deliberately broken layouts are caught."""
    import os
    import subprocess
    import sys

    pytest.importorskip("numpy")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "csrc", "sparse_mla", "emu", "wgmma_layout_check.py")
    r = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all ok" in r.stdout and r.stdout.count("-> caught") >= 7, r.stdout


def _sm90():
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.cuda
@pytest.mark.skipif(not _sm90(), reason="needs an sm_90 CUDA device")
@pytest.mark.parametrize("H", [64, 128])
@pytest.mark.parametrize("K", [64, 2048])
@pytest.mark.parametrize("with_sink", [False, True])
@pytest.mark.parametrize("with_len", [False, True])
def test_fwd_wgmma_cuda(gen, monkeypatch, H, K, with_sink, with_len):
    monkeypatch.setenv("DSA_SPARSE_MLA_WGMMA", "1")
    T, S = 9, 3 * K + 7
    q, kv, idx = make_inputs(T, H, S, K, gen=gen, device="cuda", scale_q=3.0)
    idx = idx.cpu()
    idx[0, 0, 5:40] = -1
    idx[1, 0, ::3] = S                       # out of range
    idx[1, 0, 1::7] = -5
    idx[2] = -1                              # empty row
    idx[3, 0, :] = 7                         # one row repeated K times
    idx = idx.cuda()
    sink = (randn(H, gen=gen) * 2).cuda() if with_sink else None
    tl = (torch.tensor([K, 1, K, K, 0, K // 2 + 3, K - 1, 63, K + 9], dtype=torch.int32).cuda()
          if with_len else None)
    out, lse = check_fwd(q, kv, idx, scale_for(D_QK), sink=sink, tl=tl)
    assert torch.isneginf(lse[2]).all() and (out[2] == 0).all()
    # the wgmma path must agree with the default mma.sync path as closely as two fp32 sums can
    monkeypatch.setenv("DSA_SPARSE_MLA_WGMMA", "0")
    out0, lse0 = dsa_ext.sparse_mla_fwd(q, kv, idx, scale_for(D_QK), D_V, sink, tl)
    assert rel_err(out, out0) < 1e-2
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse0))


@pytest.mark.cuda
@pytest.mark.skipif(not _sm90(), reason="needs an sm_90 CUDA device")
def test_fwd_wgmma_cuda_full_size(gen, monkeypatch):
    monkeypatch.setenv("DSA_SPARSE_MLA_WGMMA", "1")
    T, H, S, K = 64, 128, 8192, 2048
    q, kv, idx = make_inputs(T, H, S, K, gen=gen, device="cuda")
    check_fwd(q, kv, idx, scale_for(D_QK))


@pytest.mark.cuda
@pytest.mark.skipif(not _sm90(), reason="needs an sm_90 CUDA device")
def test_fwd_wgmma_cuda_falls_back_for_small_head_blocks(gen, monkeypatch):
    monkeypatch.setenv("DSA_SPARSE_MLA_WGMMA", "1")   # H = 32 is not a 64-head block: mma.sync
    q, kv, idx = make_inputs(4, 32, 300, 128, gen=gen, device="cuda")
    check_fwd(q, kv, idx, scale_for(D_QK))


# ---- infinite sinks (FlashMLA's rule: +inf -> the head's output is 0, lse unaffected) ---------

def mixed_sink(H, gen, device):
    """Per head: +inf, -inf, finite, cycling, so every kind sits in every head block."""
    sink = randn(H, gen=gen) * 2
    sink[0::3] = float("inf")
    sink[1::3] = float("-inf")
    return sink.to(device)


@pytest.mark.parametrize("H", [16, 64])
def test_fwd_infinite_sink(device, gen, H):
    T, S, K = 4, 200, 128
    q, kv, idx = make_inputs(T, H, S, K, gen=gen, device=device)
    idx[1] = -1                                               # an empty row as well
    sink = mixed_sink(H, gen, device)
    out, lse = check_fwd(q, kv, idx, scale_for(D_QK), sink=sink)
    out0, lse0 = dsa_ext.sparse_mla_fwd(q, kv, idx, scale_for(D_QK), D_V)
    assert not out.isnan().any() and not lse.isnan().any()
    pos, neg = torch.isposinf(sink), torch.isneginf(sink)
    assert (out[:, pos] == 0).all()                           # +inf: output exactly 0
    assert torch.equal(out[:, neg], out0[:, neg])             # -inf: no sink at all
    assert torch.equal(lse, lse0)                             # lse never includes the sink
    r_out, _ = ref_fwd(q.cpu(), kv.cpu(), idx.cpu(), scale_for(D_QK), D_V, sink.cpu())
    assert (r_out[:, pos.cpu()] == 0).all()


@pytest.mark.parametrize("deterministic", [False, True])
def test_bwd_infinite_sink(device, gen, deterministic):
    T, H, S, K = 5, 16, 90, 128
    q, kv, idx = make_inputs(T, H, S, K, gen=gen, device=device)
    sink = mixed_sink(H, gen, device)
    dq, dkv, out, lse, dout = check_bwd(q, kv, idx, scale_for(D_QK), sink=sink,
                                        deterministic=deterministic)
    assert not dq.isnan().any() and not dkv.isnan().any()
    assert (dq[:, torch.isposinf(sink)] == 0).all()
    # dkv without the +inf heads' (zero) contributions is the same computation
    keep = ~torch.isposinf(sink)
    sub_sink = sink[keep]
    out_s, lse_s = dsa_ext.sparse_mla_fwd(q[:, keep].contiguous(), kv, idx, scale_for(D_QK), D_V,
                                          sub_sink)
    _, dkv_s = dsa_ext.sparse_mla_bwd(q[:, keep].contiguous(), kv, out_s,
                                      dout[:, keep].contiguous(), idx, lse_s, scale_for(D_QK),
                                      D_V, sub_sink, None, deterministic)
    assert rel_err(dkv, dkv_s) < 1e-2


def _reference_sink_grad(q, kv, idx, scale, d_v, sink, dout, tl=None):
    """d loss / d sink by float64 autograd through the reference forward."""
    from dsa_ext.reference.sparse_mla import _forward_math
    s64 = sink.detach().double().requires_grad_()
    o, _ = _forward_math(q.detach().double(), kv.detach().double(), idx, scale, d_v, s64, tl)
    (g,) = torch.autograd.grad(o, s64, dout.double())
    return g


def test_sink_gradient(device, gen):
    """attn_sink receives its gradient through dsa_ext.sparse_mla: against fp64 autograd of the
    reference, finite / +inf / -inf heads, an empty row and topk_length; 0 (not NaN) at +-inf."""
    T, H, S, K = 6, 16, 80, 64
    q, kv, idx = make_inputs(T, H, S, K, gen=gen, device=device)
    idx[2] = -1
    tl = torch.tensor([64, 10, 64, 0, 33, 64], dtype=torch.int32, device=device)
    for sink in (randn(H, gen=gen).to(device), mixed_sink(H, gen, device)):
        sink = sink.clone().requires_grad_()
        for det in (False, True):
            out, lse = dsa_ext.sparse_mla(q, kv, idx, scale_for(D_QK), D_V, sink, tl,
                                          deterministic=det)
            dout = randn(*out.shape, gen=gen, dtype=q.dtype, device=device)
            (g,) = torch.autograd.grad(out, sink, dout)
            r = _reference_sink_grad(q.cpu(), kv.cpu(), idx.cpu(), scale_for(D_QK), D_V,
                                     sink.cpu(), dout.cpu(), tl.cpu())
            inf = torch.isinf(sink.detach())
            assert g.dtype == torch.float32 and not g.isnan().any()
            assert (g[inf] == 0).all()
            fin = ~inf.cpu()                 # fp64 autograd of logaddexp is NaN at -inf itself
            gf, rf = g.cpu().double()[fin], r[fin]
            assert torch.allclose(gf, rf, rtol=2e-2, atol=2e-2 * rf.abs().max().item())


def test_sink_gradcheck_float64_cpu(gen):
    """Gradcheck of (q, kv, sink) together; the sink is fp32 by the op's contract, so it is
    checked through a float64 parameter cast at the call (finite differences see fp32 rounding
    of the sink only, well inside gradcheck's tolerance at eps=1e-3)."""
    T, H, S, K, D, dv = 3, 3, 9, 6, 12, 8
    q = randn(T, H, D, gen=gen, dtype=torch.float64).requires_grad_()
    kv = randn(S, 1, D, gen=gen, dtype=torch.float64).requires_grad_()
    sink = randn(H, gen=gen, dtype=torch.float64).requires_grad_()
    idx = torch.tensor([[0, 3, -1, 3, 8, 9], [1, 1, 2, 5, 7, 4], [-1] * 6],
                       dtype=torch.int32)[:, None]
    fn = lambda q, kv, s: dsa_ext.sparse_mla(q, kv, idx, 0.4, dv, s.float())[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, kv, sink), eps=1e-3, atol=1e-3, rtol=1e-2)


def test_fwd_nan_score_propagates(device, gen):
    """A NaN score makes that query row's out and lse NaN (the reference's answer), also when it
    is the row's only valid entry — never the zeros / -inf of an empty row."""
    T, H, S, K = 3, 16, 60, 64
    q, kv, idx = make_inputs(T, H, S, K, gen=gen, device=device, invalid_frac=0.0)
    kv[7, 0, 3] = float("nan")
    idx[idx == 7] = 8
    idx[0, 0, 40] = 7
    idx[1, 0, :] = -1
    idx[1, 0, 5] = 7
    out, lse = dsa_ext.sparse_mla_fwd(q, kv, idx, scale_for(D_QK))
    assert out[:2].float().isnan().all() and lse[:2].isnan().all()
    r_out, r_lse = ref_fwd(q.cpu(), kv.cpu(), idx.cpu(), scale_for(D_QK))
    assert r_lse[:2].isnan().all()
    assert rel_err(out[2], r_out[2]) < 1e-2 and torch.isfinite(lse[2]).all()


# ---- d_qk = 512 (DeepSeek-V4: K == V, the whole row) and every H of SPEC 10.1 --------------------

D_QK_V4 = 512
HEADS = [8, 16, 32, 64, 128]


def adversarial_v4_case(T, H, S, K, gen, device, d_qk):
    """Random q / kv / indices with -1, S and 2^31 - 1 entries, an empty row, a repeated row, a
    sink (one +inf and one -inf head) and topk_length (0, 1, a block plus one, over K)."""
    q, kv, idx = make_inputs(T, H, S, K, gen=gen, device="cpu", d_qk=d_qk, scale_q=2.0)
    idx[0, 0, ::5] = S
    idx[0, 0, 1::9] = 2**31 - 1
    idx[1] = -1
    idx[2, 0, : K // 2] = 3
    sink = randn(H, gen=gen) * 2
    sink[0] = float("-inf")
    if H > 1:
        sink[1] = float("inf")
    tl = torch.tensor(([K, K, K, 0, 1, 65, K + 7] * T)[:T], dtype=torch.int32)
    return q.to(device), kv.to(device), idx.to(device), sink.to(device), tl.to(device)


@pytest.mark.parametrize("d_qk", [D_QK_V4, D_QK])
@pytest.mark.parametrize("H", HEADS)
def test_fwd_every_width_and_heads(device, gen, H, d_qk):
    T = 7 if device == "cpu" else 40
    S, K = 150, 128 if device == "cpu" else 640
    q, kv, idx, sink, tl = adversarial_v4_case(T, H, S, K, gen, device, d_qk)
    check_fwd(q, kv, idx, scale_for(d_qk))
    out, lse = check_fwd(q, kv, idx, scale_for(d_qk), sink=sink, tl=tl)
    assert torch.isneginf(lse[1]).all() and torch.isneginf(lse[3]).all()
    if H > 1:
        assert (out[:, 1] == 0).all()              # the +inf sink head


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("d_qk", [D_QK_V4, D_QK])
@pytest.mark.parametrize("H", HEADS)
def test_bwd_every_width_and_heads(device, gen, H, d_qk, deterministic):
    T = 5 if device == "cpu" else 40
    S, K = 60, 96 if device == "cpu" else 640   # S < K: dkv rows collect many contributions
    q, kv, idx, sink, tl = adversarial_v4_case(T, H, S, K, gen, device, d_qk)
    dq, dkv, *_ = check_bwd(q, kv, idx, scale_for(d_qk), sink=sink, tl=tl,
                            deterministic=deterministic)
    assert (dq[1] == 0).all() and (dq[3] == 0).all()   # empty rows: no gradient
    if H > 1:
        assert (dq[:, 1] == 0).all()                   # the +inf sink head


def test_dkv_sums_key_and_value_roles_at_512(device, gen):
    """At d_qk = d_v = 512 every dkv column is both a key and a value column. The two roles are
    split by float64 autograd with separate key and value copies of kv: the op's dkv matches
    their sum, and each role alone is far from it, so a kernel that dropped either role (or
    kept the 576 layout's value part on a prefix only) fails."""
    T, H, S, K = 3, 8, 20, 40
    q, kv, idx = make_inputs(T, H, S, K, gen=gen, device=device, d_qk=D_QK_V4, invalid_frac=0.0)
    scale = scale_for(D_QK_V4)
    dq, dkv, out, lse, dout = check_bwd(q, kv, idx, scale)
    q64 = q.detach().cpu().double()
    k64 = kv.detach().cpu().double()[:, 0].requires_grad_()
    v64 = kv.detach().cpu().double()[:, 0].requires_grad_()
    rows = idx.cpu()[:, 0].long()
    p = torch.softmax(torch.einsum("thd,tkd->thk", q64, k64[rows]) * scale, dim=-1)
    o = torch.einsum("thk,tkd->thd", p, v64[rows])
    g_key, g_val = torch.autograd.grad(o, (k64, v64), dout.cpu().double())
    both = (g_key + g_val)[:, None]
    assert rel_err(dkv.cpu(), both) < 2e-2
    assert rel_err(g_key[:, None], both) > 0.2 and rel_err(g_val[:, None], both) > 0.2


def test_h8_d512_matches_reference_cpu(gen):
    """The CPU kernels at the V4 TP8 shard (H = 8, d_qk = d_v = 512) against the reference, in
    float32 (tight) and bf16."""
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        q, kv, idx, sink, tl = adversarial_v4_case(7, 8, 90, 100, gen, "cpu", D_QK_V4)
        q, kv = q.to(dtype), kv.to(dtype)
        check_fwd(q, kv, idx, scale_for(D_QK_V4), sink=sink, tl=tl, tol=tol)
        check_bwd(q, kv, idx, scale_for(D_QK_V4), sink=sink, tl=tl, tol=tol)


def test_gradcheck_float64_d512_cpu(gen):
    """gradcheck of (q, kv) through dsa_ext.sparse_mla at d_qk = d_v = 512 (K == V) in float64,
    with a sink, topk_length and a -1 / out-of-range entry; both backward modes."""
    T, H, S, K, D = 2, 2, 4, 5, D_QK_V4
    q = randn(T, H, D, gen=gen, dtype=torch.float64, scale=0.1).requires_grad_()
    kv = randn(S, 1, D, gen=gen, dtype=torch.float64, scale=0.5).requires_grad_()
    idx = torch.tensor([[0, 3, -1, 3, 9], [1, 2, 2, 0, 3]], dtype=torch.int32)[:, None]
    sink = randn(H, gen=gen)
    tl = torch.tensor([5, 4], dtype=torch.int32)
    for det in (False, True):
        assert torch.autograd.gradcheck(
            lambda q, kv: dsa_ext.sparse_mla(q, kv, idx, D ** -0.5, D, sink, tl,
                                             deterministic=det)[0],
            (q, kv), fast_mode=True)


def test_opcheck_d512(device, gen):
    for H in (8, 16):
        q, kv, idx = make_inputs(3, H, 40, 64, gen=gen, device=device, d_qk=D_QK_V4)
        sink = randn(H, gen=gen).to(device)
        tl = torch.tensor([64, 10, 0], dtype=torch.int32, device=device)
        s = scale_for(D_QK_V4)
        torch.library.opcheck(torch.ops.dsa.sparse_mla_fwd, (q, kv, idx, s, D_V, sink, tl))
        out, lse = dsa_ext.sparse_mla_fwd(q, kv, idx, s, D_V, sink, tl)
        dout = randn(*out.shape, gen=gen, dtype=q.dtype, device=device)
        for det in (False, True):
            torch.library.opcheck(torch.ops.dsa.sparse_mla_bwd,
                                  (q, kv, out, dout, idx, lse, s, D_V, sink, tl, det))


def test_autograd_d512(device, gen):
    """dsa_ext.sparse_mla at H = 8, d_qk 512: q, kv and sink gradients against the reference."""
    T, H, S, K = 4, 8, 70, 64
    q, kv, idx = make_inputs(T, H, S, K, gen=gen, device=device, d_qk=D_QK_V4)
    q.requires_grad_()
    kv.requires_grad_()
    out, lse = dsa_ext.sparse_mla(q, kv, idx, scale_for(D_QK_V4))
    dout = randn(*out.shape, gen=gen, dtype=q.dtype, device=device)
    out.backward(dout)
    r_dq, r_dkv = ref_bwd(q.detach().cpu(), kv.detach().cpu(), None, dout.cpu(), idx.cpu(), None,
                          scale_for(D_QK_V4))
    assert rel_err(q.grad, r_dq) < 2e-2
    assert rel_err(kv.grad, r_dkv) < 2e-2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("H", [8, 64, 128])
def test_d512_full_size_cuda(gen, H):
    """V4 shapes: K = 512 (Flash) and 1024 (Pro), T = 64, fwd and both backward modes."""
    for K in (512, 1024):
        q, kv, idx = make_inputs(64, H, 8192, K, gen=gen, device="cuda", d_qk=D_QK_V4)
        check_fwd(q, kv, idx, scale_for(D_QK_V4))
        check_bwd(q, kv, idx, scale_for(D_QK_V4))
        check_bwd(q, kv, idx, scale_for(D_QK_V4), deterministic=True)


@pytest.mark.cuda
@pytest.mark.skipif(not _sm90(), reason="needs an sm_90 CUDA device")
@pytest.mark.parametrize("H", [64, 128])
def test_fwd_wgmma_d512_cuda(gen, monkeypatch, H):
    monkeypatch.setenv("DSA_SPARSE_MLA_WGMMA", "1")
    q, kv, idx, sink, tl = adversarial_v4_case(9, H, 3 * 512 + 7, 512, gen, "cuda", D_QK_V4)
    check_fwd(q, kv, idx, scale_for(D_QK_V4), sink=sink, tl=tl)
    out, lse = dsa_ext.sparse_mla_fwd(q, kv, idx, scale_for(D_QK_V4), D_V, sink, tl)
    monkeypatch.setenv("DSA_SPARSE_MLA_WGMMA", "0")
    out0, lse0 = dsa_ext.sparse_mla_fwd(q, kv, idx, scale_for(D_QK_V4), D_V, sink, tl)
    assert rel_err(out, out0) < 1e-2
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse0))
