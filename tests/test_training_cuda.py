"""The training ops on CUDA (csrc/training/training_cuda.cpp and the kernels of
training_kernels.cuh) against dsa_ext.reference.training and the CPU kernels; skipped where no
CUDA device is present (the same kernels run on the CPU emulator in test_emu_training.py).

Shapes: the indexer's production geometry (H = 64, D = 128; H = 32) and small odd ones (heads
not a multiple of 4, D not a multiple of 32, a partial last key tile), ragged / empty ranges,
invalid selected indices, bf16 and fp32 (weights in q's dtype or fp32), both backward modes
with a bitwise repeat of the deterministic one, autograd through the wrappers, opcheck, and the
CUDA-only input checks.
"""
import math

import pytest
import torch

import dsa_ext  # noqa: F401
from dsa_ext.ops import training as ops
from dsa_ext.reference import training as ref

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
TILE = 128
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]
DTYPE_IDS = ["f32", "bf16", "bf16-w32"]
SHAPES = [(64, 128), (32, 128), (5, 36)]        # (H, D)


def _randn(*shape, gen, dtype, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def _inputs(T, S, H, D, dtypes, gen):
    qk, wd = dtypes
    s = 1.0 / math.sqrt(D)
    return (_randn(T, H, D, gen=gen, dtype=qk, scale=s ** 0.5), _randn(S, D, gen=gen, dtype=qk, scale=s ** 0.5),
            _randn(T, H, gen=gen, dtype=wd, scale=1.0 / math.sqrt(H)))


def _ranges(T, S):
    cases = [(0, S), (-5, 20), (S - 10, 10), (44, 44), (130, 2**31 - 1), (S - 1, S), (2 * TILE + 3, S - 7),
             (TILE, TILE + 1)]
    ks = torch.tensor([cases[t % len(cases)][0] for t in range(T)], dtype=torch.int32)
    ke = torch.tensor([cases[t % len(cases)][1] for t in range(T)], dtype=torch.int32)
    return ks, ke


def _selected(T, K, S, gen):
    idx = torch.randint(0, S, (T, 1, K), generator=gen, dtype=torch.int32)
    bad = torch.rand(T, 1, K, generator=gen)
    idx[bad < 0.1] = -1
    idx[(bad >= 0.1) & (bad < 0.15)] = S + 3
    idx[0, 0, :4] = idx[0, 0, 4]
    return idx


def _cuda(*ts):
    return [None if t is None else t.cuda() for t in ts]


def _assert_close(out, expected, what):
    rtol, atol = (2e-2, 2e-2) if out.dtype == torch.bfloat16 else (1e-4, 1e-4)
    exp = expected.double().cpu()
    scale = max(exp.abs().max().item(), 1e-6)
    torch.testing.assert_close(out.double().cpu(), exp, rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}")


def _bits(t):
    t = t.detach().cpu()
    return t.reshape(-1).view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8)


@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("H,D", SHAPES)
def test_indexer_train_logits_cuda(gen, dtypes, H, D):
    T, S = 11, 3 * TILE + 44
    q, k, w = _inputs(T, S, H, D, dtypes, gen)
    ks, ke = _ranges(T, S)
    out = torch.ops.dsa.indexer_train_logits(*_cuda(q, k, w, ks, ke)).cpu()
    expected = ref.indexer_train_logits(q, k, w, ks, ke)
    mask = ref.row_range_mask(ks, ke, S)
    assert torch.isneginf(out[~mask]).all()
    torch.testing.assert_close(out[mask].double(), expected[mask].double(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("H,D", SHAPES)
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_indexer_train_logits_bwd_cuda(gen, dtypes, H, D, deterministic):
    T, S = 10, 2 * TILE + 37
    q, k, w = _inputs(T, S, H, D, dtypes, gen)
    ks, ke = _ranges(T, S)
    grad = torch.where(ref.row_range_mask(ks, ke, S), torch.randn(T, S, generator=gen), float("nan"))
    args = _cuda(grad, q, k, w, ks, ke)
    got = torch.ops.dsa.indexer_train_logits_bwd(*args, deterministic)
    expected = ref.indexer_train_logits_bwd(grad, q, k, w, ks, ke)
    for name, g, e in zip(("dq", "dk", "dw"), got, expected):
        assert g.dtype == e.dtype
        _assert_close(g, e, name)
    if deterministic:
        again = torch.ops.dsa.indexer_train_logits_bwd(*args, True)
        assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(got, again))


@pytest.mark.parametrize("qdtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("H,D", [(64, 576), (8, 512), (5, 40)])
def test_sparse_attention_target_cuda(gen, qdtype, H, D):
    T, S, K = 6, 300, 2 * TILE + 5
    q = _randn(T, H, D, gen=gen, dtype=qdtype, scale=0.1)
    kv = _randn(S, 1, D, gen=gen, dtype=qdtype)
    indices = _selected(T, K, S, gen)
    topk_length = torch.tensor([K, 30, K, 0, -2, K + 9], dtype=torch.int32)
    sm_scale = 1.0 / math.sqrt(D)
    valid = ref.sparse_mla_valid_mask(indices, S, topk_length)
    rows = kv[:, 0].double()[torch.where(valid, indices[:, 0].long(), 0)]
    s = (torch.einsum("thd,tkd->thk", q.double(), rows) * sm_scale).masked_fill(~valid[:, None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1).float()
    out = torch.ops.dsa.sparse_attention_target(*_cuda(q, kv, indices, lse), sm_scale, topk_length.cuda()).cpu()
    expected = ref.sparse_attention_target(q, kv, indices, lse, sm_scale, topk_length)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("H,D", [(64, 128), (5, 36)])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("deterministic,chunk_rows", [(False, None), (True, None), (True, 2)],
                         ids=["atomic", "deterministic", "deterministic-chunks"])
def test_indexer_kl_loss_sparse_cuda(monkeypatch, gen, dtypes, H, D, reduction, deterministic, chunk_rows):
    if chunk_rows:       # the deterministic dk in several row chunks (read by the launcher per call)
        monkeypatch.setenv("DSA_TRAINING_CHUNK_ROWS", str(chunk_rows))
    T, S, K = 9, 2 * TILE + 20, TILE + 13
    q, k, w = _inputs(T, S, H, D, dtypes, gen)
    indices = _selected(T, K, S, gen)
    indices[3] = S
    topk_length = torch.tensor([K, 100, K, K, 0, K + 5, 7, K, 1], dtype=torch.int32)
    valid = ref.sparse_mla_valid_mask(indices, S, topk_length)
    target = torch.where(valid, torch.rand(T, K, generator=gen), 0.0)
    target = target / target.sum(-1, keepdim=True).clamp_min(1e-30)
    args = _cuda(q, k, w, indices, target, topk_length)
    got = torch.ops.dsa.indexer_kl_loss_sparse(*args, reduction, deterministic)
    expected = ref.indexer_kl_loss_sparse(q, k, w, indices, target, topk_length, reduction)
    assert got[0].dim() == 0
    torch.testing.assert_close(got[0].double().cpu(), expected[0].double(), rtol=1e-3, atol=1e-4)
    for name, g, e in zip(("dq", "dk", "dw"), got[1:], expected[1:]):
        _assert_close(g, e, name)
    if deterministic:
        again = torch.ops.dsa.indexer_kl_loss_sparse(*args, reduction, True)
        assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(got, again))


@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("H,D,Hm,Dm", [(64, 128, 16, 576), (5, 36, 3, 40)])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_indexer_kl_loss_dense_cuda(gen, dtypes, H, D, Hm, Dm, reduction, deterministic):
    T, S = 9, 2 * TILE + 21
    q, k, w = _inputs(T, S, H, D, dtypes, gen)
    ks, ke = _ranges(T, S)
    q_main = _randn(T, Hm, Dm, gen=gen, dtype=dtypes[0])
    kv_main = _randn(S, 1, Dm, gen=gen, dtype=dtypes[0])
    sm_scale = 1.0 / math.sqrt(Dm)
    args = _cuda(q, k, w, ks, ke, q_main, kv_main)
    got = torch.ops.dsa.indexer_kl_loss_dense(*args, sm_scale, reduction, 1024, deterministic)
    expected = ref.indexer_kl_loss_dense(q, k, w, ks, ke, q_main, kv_main, sm_scale, reduction)
    torch.testing.assert_close(got[0].double().cpu(), expected[0].double(), rtol=1e-3, atol=1e-4)
    for name, g, e in zip(("dq", "dk", "dw"), got[1:], expected[1:]):
        _assert_close(g, e, name)
    if deterministic:
        again = torch.ops.dsa.indexer_kl_loss_dense(*args, sm_scale, reduction, 1024, True)
        assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(got, again))


def test_cuda_matches_cpu_through_autograd(gen):
    """The wrappers' autograd on CUDA gives the CPU kernels' gradients (fp32)."""
    T, S, H, D = 7, 200, 8, 32
    q, k, w = _inputs(T, S, H, D, DTYPES[0], gen)
    ks, ke = _ranges(T, S)
    q_main = _randn(T, 4, 64, gen=gen, dtype=torch.float32)
    kv_main = _randn(S, 1, 64, gen=gen, dtype=torch.float32)
    grads = {}
    for dev in ("cpu", "cuda"):
        leaves = [t.to(dev).requires_grad_(True) for t in (q, k, w)]
        logits = ops.indexer_train_logits(*leaves, ks.to(dev), ke.to(dev))
        finite = torch.isfinite(logits)
        loss = torch.where(finite, logits, 0.0).square().sum()
        loss = loss + ops.indexer_kl_loss_dense(*leaves, ks.to(dev), ke.to(dev), q_main.to(dev), kv_main.to(dev),
                                                0.125, "mean")
        loss.backward()
        grads[dev] = [t.grad.cpu() for t in leaves]
    for a, b, name in zip(grads["cuda"], grads["cpu"], ("dq", "dk", "dw")):
        _assert_close(a, b, name)


def test_opcheck_cuda(gen):
    T, S, H, D = 5, 140, 4, 16
    q, k, w = _cuda(*_inputs(T, S, H, D, DTYPES[0], gen))
    ks, ke = _cuda(*_ranges(T, S))
    torch.library.opcheck(torch.ops.dsa.indexer_train_logits, (q, k, w, ks, ke))
    grad = torch.randn(T, S, device="cuda")
    torch.library.opcheck(torch.ops.dsa.indexer_train_logits_bwd, (grad, q, k, w, ks, ke, True))
    idx = _selected(T, 9, S, gen).cuda()
    target = torch.rand(T, 9, device="cuda")
    torch.library.opcheck(torch.ops.dsa.indexer_kl_loss_sparse, (q, k, w, idx, target, None, "sum", True))


def test_cuda_bad_input(gen):
    T, S = 3, 20
    q, k, w = _cuda(*_inputs(T, S, 64, 512, DTYPES[0], gen))
    ks, ke = _cuda(*_ranges(T, S))
    with pytest.raises(ValueError, match="q: the CUDA training-indexer kernels"):
        torch.ops.dsa.indexer_train_logits(q, k, w, ks, ke)
    q, k, w = _cuda(*_inputs(T, S, 4, 8, DTYPES[0], gen))
    with pytest.raises(RuntimeError, match="q must be bfloat16 or float32, got float64"):
        torch.ops.dsa.indexer_train_logits(q.double(), k.double(), w.double(), ks, ke)
    with pytest.raises(RuntimeError, match="ks must be int32"):
        torch.ops.dsa.indexer_train_logits(q, k, w, ks.long(), ke)
