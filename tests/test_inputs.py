"""Inputs as users hold them (dsa_ext.ops._accept): every form the typed wrappers accept gives
exactly the result of the canonical form — non-contiguous and offset views, int64 index math,
float8_e4m3fn views of byte caches (FlashMLA's dtype) and uint8 bytes of FP8 operands, scales
as [S, 1], float64 sinks, index values beyond the int32 range — and the raw torch.ops.dsa ops
keep refusing them (SPEC's strict contract; their messages are tested in each family's file).
"""
import pytest
import torch

import dsa_ext
from dsa_ext import reference as ref
from conftest import randn

FP8 = torch.float8_e4m3fn


def strided(t, gen):
    """The same values as a non-contiguous view at a nonzero storage offset (every other
    element of the last dim of a buffer twice as wide, from element 1)."""
    wide = randn(*t.shape[:-1], 2 * t.shape[-1] + 1, gen=gen, dtype=t.dtype, device=t.device) \
        if t.is_floating_point() else torch.zeros(*t.shape[:-1], 2 * t.shape[-1] + 1,
                                                  dtype=t.dtype, device=t.device)
    view = wide[..., 1::2]
    view.copy_(t)
    assert not view.is_contiguous() and view.storage_offset() > 0
    return view


def test_sparse_mla_views_int64_and_sinks(device, gen):
    T, H, S, K, D = 5, 16, 70, 64, 576
    q = randn(T, H, D, gen=gen, dtype=torch.bfloat16, device=device)
    kv = randn(S, 1, D, gen=gen, dtype=torch.bfloat16, device=device)
    idx = torch.randint(-1, S + 3, (T, 1, K), generator=gen, dtype=torch.int32).to(device)
    sink = randn(H, gen=gen, device=device)
    tl = torch.tensor([64, 3, 0, 40, 64], dtype=torch.int32, device=device)
    want = dsa_ext.sparse_mla_fwd(q, kv, idx, 0.05, 512, sink, tl)
    got = dsa_ext.sparse_mla_fwd(strided(q, gen), strided(kv, gen), idx.long(), 0.05, 512,
                                 sink.double(), tl.long())
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # an int64 index beyond 2**31 is out of range: skipped exactly like -1
    far = idx.long()
    far[:, :, ::5] = 2 ** 33
    near = idx.clone()
    near[:, :, ::5] = -1
    got = dsa_ext.sparse_mla_fwd(q, kv, far, 0.05, 512, sink, tl)
    want = dsa_ext.sparse_mla_fwd(q, kv, near, 0.05, 512, sink, tl)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(RuntimeError, match="indices must be int32"):
        torch.ops.dsa.sparse_mla_fwd(q, kv, idx.long(), 0.05)


def test_sparse_mla_autograd_through_views(device, gen):
    """Gradients reach the user's non-contiguous leaves, equal to the contiguous case; the
    backward op takes strided out / dout / lse too."""
    T, H, S, K, D = 3, 16, 50, 64, 576
    q0 = randn(T, H, D, gen=gen, dtype=torch.bfloat16, device=device)
    kv0 = randn(S, 1, D, gen=gen, dtype=torch.bfloat16, device=device)
    idx = torch.randint(0, S, (T, 1, K), generator=gen, dtype=torch.int32).to(device)
    dout = randn(T, H, 512, gen=gen, dtype=torch.bfloat16, device=device)
    grads = []
    for q, kv, ind in ((q0.clone(), kv0.clone(), idx), (strided(q0, gen), strided(kv0, gen), idx.long())):
        q.requires_grad_()
        kv.requires_grad_()
        out, lse = dsa_ext.sparse_mla(q, kv, ind, 0.05)
        out.backward(dout)
        grads.append((q.grad, kv.grad, out.detach(), lse))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    out, lse = grads[0][2], grads[0][3]
    want = dsa_ext.sparse_mla_bwd(q0, kv0, out, dout, idx, lse, 0.05)
    got = dsa_ext.sparse_mla_bwd(strided(q0, gen), kv0, strided(out, gen), strided(dout, gen),
                                 idx.long(), strided(lse, gen), 0.05)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("fp8", [True, False], ids=["fp8", "bf16"])
def test_decode_float8_cache_view_and_int64(device, gen, fp8):
    B, s_q, H, K, nb, bs = 2, 2, 16, 64, 4, 16
    kv = randn(nb * bs, 576, gen=gen)
    cache = (ref.quantize_mla_records(kv).view(nb, bs, 1, 656) if fp8
             else kv.to(torch.bfloat16).view(nb, bs, 1, 576)).to(device)
    q = randn(B, s_q, H, 576, gen=gen, dtype=torch.bfloat16, device=device)
    idx = torch.randint(-2, nb * bs + 2, (B, s_q, K), generator=gen, dtype=torch.int32).to(device)
    tl = torch.tensor([K, 17], dtype=torch.int32, device=device)
    want = dsa_ext.sparse_mla_decode(q, cache, idx, 0.04, topk_length=tl)
    got = dsa_ext.sparse_mla_decode(strided(q, gen), cache.view(FP8) if fp8 else cache,
                                    idx.long(), 0.04, topk_length=tl.long())
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_cache_writers_float8_view_and_views(device, gen):
    """FlashMLA hands out its FP8 cache as float8_e4m3fn: writing / gathering through that
    dtype gives the same bytes; strided inputs give the same bytes."""
    N, nb, bs = 40, 4, 16
    kv = randn(N, 576, gen=gen, dtype=torch.bfloat16, device=device)
    slots = torch.randperm(nb * bs, generator=gen)[:N].to(device)
    a = torch.zeros(nb, bs, 1, 656, dtype=torch.uint8, device=device)
    b = torch.zeros(nb, bs, 1, 656, dtype=torch.uint8, device=device).view(FP8)
    dsa_ext.mla_kv_cache_write(kv, slots, a)
    dsa_ext.mla_kv_cache_write(strided(kv, gen), strided(slots, gen), b)
    assert torch.equal(a, b.view(torch.uint8))
    assert torch.equal(dsa_ext.mla_kv_cache_gather(a, slots), dsa_ext.mla_kv_cache_gather(b, slots.int()))
    k = randn(N, 128, gen=gen, dtype=torch.bfloat16, device=device)
    ia = torch.zeros(nb, bs, 1, 132, dtype=torch.uint8, device=device)
    ib = ia.clone().view(FP8)
    dsa_ext.indexer_k_cache_write(k, slots, ia)
    dsa_ext.indexer_k_cache_write(strided(k, gen), slots, ib)
    assert torch.equal(ia, ib.view(torch.uint8))
    table = torch.arange(nb, dtype=torch.int32, device=device)[None]
    lens = torch.tensor([50], dtype=torch.int32, device=device)
    ka, sa = dsa_ext.indexer_k_cache_gather(ia, table, lens)
    kb, sb = dsa_ext.indexer_k_cache_gather(ib, table.long(), lens.long())
    assert torch.equal(ka.view(torch.uint8), kb.view(torch.uint8)) and torch.equal(sa, sb)
    x = randn(6, 256, gen=gen, device=device)
    for f in (dsa_ext.fp8_quantize, dsa_ext.hadamard_fp8_quantize):
        w, g = f(x), f(strided(x, gen))
        assert torch.equal(w[0].view(torch.uint8), g[0].view(torch.uint8)) and torch.equal(w[1], g[1])


def test_indexer_bytes_scale_column_and_int64(device, gen):
    """fp8_quantize's [S, 1] scale, uint8 bytes of the FP8 operands and int64 ks / ke go straight
    into indexer_logits / indexer_topk."""
    T, S, H, D = 6, 90, 32, 128
    q, _ = dsa_ext.fp8_quantize(randn(T, H, D, gen=gen, device=device))
    k, k_scale = dsa_ext.fp8_quantize(randn(S, D, gen=gen, device=device))     # [S, 1]
    assert k_scale.shape == (S, 1)
    w = randn(T, H, gen=gen, device=device)
    ks = torch.tensor([0, 0, 5, 10, 80, 89], dtype=torch.int32, device=device)
    ke = torch.tensor([90, 1, 50, 10, 90, 90], dtype=torch.int32, device=device)
    want = dsa_ext.indexer_logits(q, k, k_scale[:, 0].contiguous(), w, ks, ke)
    got = dsa_ext.indexer_logits(q.view(torch.uint8), strided(k.view(torch.uint8), gen), k_scale,
                                 strided(w, gen), ks.long(), ke.long())
    assert torch.equal(got, want)
    ti = dsa_ext.indexer_topk(q, k, k_scale[:, 0].contiguous(), w, ks, ke, 16, sorted=True)
    tg = dsa_ext.indexer_topk(q.view(torch.uint8), k, k_scale, w, ks.long(), ke.long(), 16, sorted=True)
    assert torch.equal(ti, tg)
    # bounds far outside int32 clamp to the same rows as [0, S]
    far_ks = torch.full((T,), -2 ** 40, dtype=torch.int64, device=device)
    far_ke = torch.full((T,), 2 ** 40, dtype=torch.int64, device=device)
    full = torch.zeros(T, dtype=torch.int32, device=device), torch.full((T,), S, dtype=torch.int32, device=device)
    assert torch.equal(dsa_ext.indexer_logits(q, k, k_scale, w, far_ks, far_ke),
                       dsa_ext.indexer_logits(q, k, k_scale, w, *full))


def test_paged_indexer_float8_cache_and_int64(device, gen):
    B, N, H, D, nb, bs = 2, 2, 32, 128, 6, 16
    cache = torch.zeros(nb, bs, 1, D + 4, dtype=torch.uint8, device=device)
    dsa_ext.indexer_k_cache_write(randn(nb * bs, D, gen=gen, device=device),
                                  torch.arange(nb * bs, device=device), cache)
    q, _ = dsa_ext.fp8_quantize(randn(B, N, H, D, gen=gen, device=device))
    w = randn(B * N, H, gen=gen, device=device)
    lens = torch.tensor([70, 33], dtype=torch.int32, device=device)
    table = torch.randperm(nb, generator=gen).to(torch.int32).view(2, 3).to(device)
    want = dsa_ext.paged_indexer_logits(q, cache, w, lens, table, 96)
    got = dsa_ext.paged_indexer_logits(q.view(torch.uint8), cache.view(FP8), w, lens.long(),
                                       table.long(), 96)
    assert torch.equal(got, want)


def test_topk_any_strides_and_int64(device, gen):
    x = randn(5, 300, gen=gen, device=device)
    ks = torch.tensor([0, 10, 0, 290, 5], dtype=torch.int32, device=device)
    ke = torch.tensor([300, 20, 3, 300, 150], dtype=torch.int32, device=device)
    for view in (x[:, ::2], x.t().contiguous().t(), randn(600, 5, gen=gen, device=device).t()):
        want = dsa_ext.topk_indices(view.contiguous(), 8, ks[:view.shape[0]].clamp(max=view.shape[1]), ke, sorted=True)
        got = dsa_ext.topk_indices(view, 8, ks.long().clamp(max=view.shape[1]), ke.long(), sorted=True)
        assert torch.equal(got, want)
        assert torch.equal(got, ref.topk_indices(view.cpu(), 8, ks.cpu().clamp(max=view.shape[1]),
                                                 ke.cpu(), sorted=True).to(device))
    idx = dsa_ext.topk_indices(x, 16)
    table = torch.randperm(20, generator=gen).to(torch.int32).view(1, 20).to(device)
    want = dsa_ext.topk_slot_ids(idx, table, 16)
    assert torch.equal(dsa_ext.topk_slot_ids(strided(idx.long(), gen), table.long(), 16), want)


def test_wrappers_trace_fullgraph(gen):
    """The conversions are plain torch ops: torch.compile(fullgraph=True) traces them."""
    q = randn(3, 16, 576, gen=gen, dtype=torch.bfloat16)
    kv = randn(40, 1, 576, gen=gen, dtype=torch.bfloat16)
    idx = torch.randint(-1, 41, (3, 1, 64), generator=gen)                       # int64

    def f(q, kv, idx):
        return dsa_ext.sparse_mla_fwd(q[:, :, :576], kv, idx, 0.05)
    want = dsa_ext.sparse_mla_fwd(q, kv, idx.int(), 0.05)
    got = torch.compile(f, fullgraph=True, backend="eager")(q, kv, idx)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
