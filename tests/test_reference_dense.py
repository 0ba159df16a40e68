"""The dense masked DSA step (dsa_ext.reference.dense) on its own, and the sparse references and
the CPU ops of the families against it: the gathered (sparse) formulation must equal the masked
dense one. This is an oracle independent of each family's own reference. Cross-checks with a
family are skipped until it has landed."""
import math

import pytest
import torch

import dsa_ext.reference as ref
from dsa_ext.reference.dense import (causal_ranges, dense_indexer_logits, dense_masked_mla_attention,
                                     dense_topk_mask, dsa_step_dense, ranges_to_mask)

from conftest import randn, rel_err

NEG_INF, NAN = float("-inf"), float("nan")


def _missing(kind, names):
    if kind == "reference":
        return [n for n in names if not callable(getattr(ref, n, None))]
    return [n for n in names if not torch._C._dispatch_has_kernel_for_dispatch_key(f"dsa::{n}", "CPU")]


def impls(*names):
    """Parametrize a test over `impl`: the references, then the CPU ops, of the named functions
    (`impl.<name>`), each skipped until it has landed."""
    params = []
    for kind, source in (("reference", ref), ("op", torch.ops.dsa)):
        missing = _missing(kind, names)
        namespace = None if missing else type(kind, (), {n: staticmethod(getattr(source, n)) for n in names})
        params.append(pytest.param(namespace, id=kind, marks=pytest.mark.skipif(
            bool(missing), reason=f"{kind} not landed yet: {missing}")))
    return pytest.mark.parametrize("impl", params)


def naive_attention(q, kv, mask, sm_scale, d_v):
    """Row by row, head by head, softmax over the selected keys only (the gathered form)."""
    T, H, _ = q.shape
    kv = kv.reshape(kv.shape[0], -1).double()
    out = torch.zeros(T, H, d_v, dtype=torch.float64)
    lse = torch.full((T, H), NEG_INF, dtype=torch.float64)
    for t in range(T):
        keys = kv[mask[t]]
        if keys.shape[0] == 0:
            continue
        for h in range(H):
            s = keys @ q[t, h].double() * sm_scale
            out[t, h] = torch.softmax(s, 0) @ keys[:, :d_v]
            lse[t, h] = torch.logsumexp(s, 0)
    return out, lse


# ---------------------------------------------------------------- the dense step on its own

def test_causal_ranges_and_mask():
    ks, ke = causal_ranges(3, 5)
    assert ks.tolist() == [0, 0, 0] and ke.tolist() == [3, 4, 5]
    assert ranges_to_mask(ks, ke, 5).int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    with pytest.raises(ValueError, match="num_queries"):
        causal_ranges(6, 5)


def test_dense_indexer_logits_matches_loop(gen):
    T, S, H, D = 5, 9, 3, 16
    q, k, w = randn(T, H, D, gen=gen), randn(S, D, gen=gen), randn(T, H, gen=gen)
    k_scale = randn(S, gen=gen).abs() + 0.1
    out = dense_indexer_logits(q, k, w, k_scale)
    assert out.shape == (T, S) and out.dtype == torch.float32
    for t in range(T):
        for s in range(S):
            if s > S - T + t:
                assert out[t, s] == NEG_INF
                continue
            want = k_scale[s].double() * sum(w[t, h].double() * max(0.0, float(q[t, h].double() @ k[s].double()))
                                             for h in range(H))
            assert math.isclose(out[t, s].item(), want, rel_tol=1e-5, abs_tol=1e-6)


def test_dense_topk_mask_order_ties_nan():
    row = torch.tensor([[1.0, 3.0, 3.0, NAN, NEG_INF, 2.0, NAN]])
    picks = [dense_topk_mask(row, k)[0].nonzero().flatten().tolist() for k in range(8)]
    # 3 (col 1 before its tie at col 2), 2, 1, then -inf (an ordinary candidate), then NaNs by column
    assert picks == [[], [1], [1, 2], [1, 2, 5], [0, 1, 2, 5], [0, 1, 2, 4, 5], [0, 1, 2, 3, 4, 5],
                     [0, 1, 2, 3, 4, 5, 6]]
    valid = torch.tensor([[True, True, False, True, True, True, True]])
    assert dense_topk_mask(row, 3, valid)[0].nonzero().flatten().tolist() == [0, 1, 5]
    assert dense_topk_mask(row, 10, valid)[0].tolist() == valid[0].tolist()   # short row: all of it


def test_dense_topk_mask_equals_torch_topk_without_ties(gen):
    logits = randn(6, 300, gen=gen)
    mask = dense_topk_mask(logits, 17)
    want = torch.zeros_like(mask).scatter_(1, logits.topk(17, dim=1).indices, True)
    assert torch.equal(mask, want)


@pytest.mark.parametrize("with_sink", [False, True])
def test_dense_masked_attention_equals_gathered_softmax(with_sink, gen):
    T, S, H, d_qk, d_v = 6, 20, 3, 40, 32
    q, kv = randn(T, H, d_qk, gen=gen), randn(S, 1, d_qk, gen=gen)
    mask = torch.rand(T, S, generator=gen) < 0.4
    mask[2] = False                                     # empty row
    sink = randn(H, gen=gen) if with_sink else None
    out, lse = dense_masked_mla_attention(q, kv, mask, 0.3, d_v, attn_sink=sink)
    want_out, want_lse = naive_attention(q, kv, mask, 0.3, d_v)
    if with_sink:  # the sink only enlarges the denominator: out shrinks by sum / (sum + e^sink)
        want_out = want_out * torch.sigmoid(want_lse - sink.double())[..., None]
    assert out.dtype == lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), want_out.nan_to_num(0.0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)
    assert (out[2] == 0).all() and torch.isneginf(lse[2]).all()


def test_dsa_step_dense_short_rows_are_full_causal_attention(gen):
    """With topk >= S every causal key is selected: the DSA step is dense causal attention."""
    T, H, D, Ha = 12, 2, 16, 3
    iq, ik, w = randn(T, H, D, gen=gen), randn(T, D, gen=gen), randn(T, H, gen=gen)
    q, kv = randn(T, Ha, 64, gen=gen), randn(T, 64, gen=gen)
    step = dsa_step_dense(iq, ik, w, q, kv, topk=T, sm_scale=0.2, d_v=48)
    causal = ranges_to_mask(*causal_ranges(T, T), T)
    assert torch.equal(step.mask, causal)
    want, _ = naive_attention(q, kv, causal, 0.2, 48)
    torch.testing.assert_close(step.out.double(), want, atol=1e-5, rtol=1e-5)
    # and with a small topk each row keeps min(topk, t + 1) keys, all causal
    step = dsa_step_dense(iq, ik, w, q, kv, topk=4, sm_scale=0.2, d_v=48)
    assert step.mask.sum(1).tolist() == [min(4, t + 1) for t in range(T)]
    assert not (step.mask & ~causal).any()


# ---------------------------------------------------------------- the sparse references against it

def attention_inputs(gen, T=10, S=40, H=4):
    q = randn(T, H, 576, gen=gen, dtype=torch.bfloat16)
    kv = randn(S, 1, 576, gen=gen, dtype=torch.bfloat16)
    return q, kv


def indices_mask(indices, S):
    """[T, K] int32 (-1 = none, no repeats) -> [T, S] bool."""
    T = indices.shape[0]
    idx = torch.where(indices < 0, S, indices).long()
    return torch.zeros(T, S + 1, dtype=torch.bool).scatter_(1, idx, True)[:, :S]


def mask_to_indices(mask, K):
    """[T, S] bool -> [T, 1, K] int32 listing the selected columns, -1 padded."""
    T, S = mask.shape
    cols = torch.where(mask, torch.arange(S).expand(T, S), S).sort(1).values[:, :K]
    return torch.where(cols == S, -1, cols).int()[:, None, :]


@impls("sparse_mla_fwd")
def test_sparse_attention_over_every_causal_key_is_dense_causal_attention(impl, gen):
    T, S = 10, 40
    q, kv = attention_inputs(gen, T, S)
    causal = ranges_to_mask(*causal_ranges(T, S), S)
    indices = mask_to_indices(causal, S)
    indices = indices[..., torch.randperm(S, generator=gen)]      # order must not matter
    out, lse = impl.sparse_mla_fwd(q, kv, indices.contiguous(), 576 ** -0.5)
    want_out, want_lse = dense_masked_mla_attention(q, kv, causal, 576 ** -0.5)
    assert rel_err(out, want_out) < 1e-2
    torch.testing.assert_close(lse.float(), want_lse, atol=1e-4, rtol=1e-4)


@impls("topk_indices", "sparse_mla_fwd")
def test_topk_then_sparse_attention_is_dense_masked_attention(impl, gen):
    T, S, K = 10, 40, 8
    q, kv = attention_inputs(gen, T, S)
    logits = randn(T, S, gen=gen)
    logits[:, ::7] = logits[:, 1::7][:, : logits[:, ::7].shape[1]]   # ties across columns
    ks, ke = causal_ranges(T, S)
    indices = impl.topk_indices(logits, K, ks, ke)
    valid = ranges_to_mask(ks, ke, S)
    mask = dense_topk_mask(logits, K, valid)
    assert torch.equal(indices_mask(indices, S), mask)
    out, lse = impl.sparse_mla_fwd(q, kv, indices[:, None, :].int().contiguous(), 0.05)
    want_out, want_lse = dense_masked_mla_attention(q, kv, mask, 0.05)
    assert rel_err(out, want_out) < 1e-2
    torch.testing.assert_close(lse.float(), want_lse, atol=1e-4, rtol=1e-4)


@impls("indexer_logits")
def test_indexer_logits_equal_dense_logits(impl, gen):
    T, S, H, D = 7, 30, 4, 128
    q = randn(T, H, D, gen=gen).to(torch.float8_e4m3fn)
    k = randn(S, D, gen=gen).to(torch.float8_e4m3fn)
    k_scale, w = randn(S, gen=gen).abs() + 0.01, randn(T, H, gen=gen)
    ks, ke = causal_ranges(T, S)
    ks = ks + torch.arange(T, dtype=torch.int32) // 2                  # windows, not only causal
    out = impl.indexer_logits(q, k, k_scale, w, ks, ke)
    want = dense_indexer_logits(q.float(), k.float(), w, k_scale, ranges_to_mask(ks, ke, S))
    assert torch.equal(out.isfinite(), want.isfinite())
    torch.testing.assert_close(out[want.isfinite()].float(), want[want.isfinite()], atol=1e-4, rtol=1e-4)


@impls("indexer_logits", "topk_indices", "sparse_mla_fwd", "indexer_topk")
def test_sparse_pipeline_equals_dsa_step_dense(impl, gen):
    T, S, H, K = 12, 48, 4, 9
    iq = randn(T, H, 128, gen=gen).to(torch.float8_e4m3fn)
    ik = randn(S, 128, gen=gen).to(torch.float8_e4m3fn)
    k_scale, w = randn(S, gen=gen).abs() + 0.01, randn(T, H, gen=gen)
    q, kv = attention_inputs(gen, T, S)
    ks, ke = causal_ranges(T, S)
    logits = impl.indexer_logits(iq, ik, k_scale, w, ks, ke)
    indices = impl.topk_indices(logits, K, ks, ke)
    fused = impl.indexer_topk(iq, ik, k_scale, w, ks, ke, K)
    assert torch.equal(fused.sort(1).values, indices.sort(1).values)
    out, lse = impl.sparse_mla_fwd(q, kv, indices[:, None, :].int().contiguous(), 0.04)
    step = dsa_step_dense(iq.float(), ik.float(), w, q, kv, K, 0.04, index_k_scale=k_scale)
    assert torch.equal(indices_mask(indices, S), step.mask)
    assert rel_err(out, step.out) < 1e-2
    torch.testing.assert_close(lse.float(), step.lse, atol=1e-4, rtol=1e-4)


@impls("sparse_mla_decode")
def test_decode_over_bf16_cache_is_dense_masked_attention(impl, gen):
    B, s_q, H, block, nblocks, K = 2, 2, 4, 8, 6, 12
    cache = randn(nblocks, block, 1, 576, gen=gen, dtype=torch.bfloat16)
    q = randn(B, s_q, H, 576, gen=gen, dtype=torch.bfloat16)
    nslots = nblocks * block
    slots = torch.stack([torch.randperm(nslots, generator=gen)[:K] for _ in range(B * s_q)]).int().view(B, s_q, K)
    slots[0, 1, 3:] = -1
    out, lse = impl.sparse_mla_decode(q, cache, slots, 0.05)
    flat = slots.view(B * s_q, K)
    mask = torch.zeros(B * s_q, nslots + 1, dtype=torch.bool).scatter_(1, torch.where(flat < 0, nslots, flat).long(), True)
    want_out, want_lse = dense_masked_mla_attention(q.view(B * s_q, H, 576), cache.view(nslots, 576),
                                                    mask[:, :nslots], 0.05)
    assert rel_err(out.view(B * s_q, H, 512), want_out) < 1e-2
    torch.testing.assert_close(lse.view(B * s_q, H).float(), want_lse, atol=1e-4, rtol=1e-4)


@impls("sparse_mla_fwd", "sparse_mla_bwd")
def test_sparse_backward_is_the_gradient_of_dense_masked_attention(impl, gen):
    """dq, dkv of the sparse backward = autograd through the dense masked formulation (fp64),
    with keys selected by several queries (dkv accumulates) and a short row."""
    T, S, H, K = 6, 20, 2, 7
    q, kv = attention_inputs(gen, T, S, H)
    indices = torch.stack([torch.randperm(S, generator=gen)[:K] for _ in range(T)]).int()
    indices[2, 4:] = -1
    idx = indices[:, None, :].contiguous()
    out, lse = impl.sparse_mla_fwd(q, kv, idx, 0.05)
    dout = randn(T, H, 512, gen=gen, dtype=torch.bfloat16)
    dq, dkv = impl.sparse_mla_bwd(q, kv, out, dout, idx, lse, 0.05)
    q64, kv64 = q.double().requires_grad_(), kv.double().requires_grad_()
    ref_out, _ = dense_masked_mla_attention(q64, kv64, indices_mask(indices, S), 0.05)
    (ref_out.double() * dout.double()).sum().backward()
    assert rel_err(dq, q64.grad) < 2e-2
    assert rel_err(dkv, kv64.grad) < 2e-2
    assert (dkv[indices_mask(indices, S).sum(0) == 0] == 0).all(), "gradient on a key nobody selected"
