"""dsa_ext.compat: FlashMLA / DeepGEMM / vLLM call sites over torch.ops.dsa.

Each adapter is checked against the formula its peer documents (written out here, in the form of
the peer's own test reference: FlashMLA tests/ref.py, DeepGEMM tests/test_attention.py, vLLM
tests/kernels/test_top_k_per_row.py), every translated convention explicitly (lse base and the
+inf of an empty row, the [B, H, s_q] decode lse, DeepGEMM's aligned row stride, vLLM's relative
indices and in-place outputs), peer-style programs run after an import swap, the adapters trace
under torch.compile, and bad input raises the peer's kind of error.
"""
import math
import sys
import textwrap
import types

import pytest
import torch

import dsa_ext
from dsa_ext import reference as ref
from dsa_ext.compat import deep_gemm, flash_mla, vllm

from conftest import randn

INF = float("inf")
# FlashMLA's generator draws invalid indices from these (tests/lib.py)
INVALID_INDICES = [-2147483648, -123456, -1, 114514, 1919810, 2147480000, 2147483647]


# ---------------------------------------------------------------------------------------------
# FlashMLA: formulas of tests/ref.py
# ---------------------------------------------------------------------------------------------
def flashmla_prefill_formula(q, kv, indices, sm_scale, attn_sink, topk_length):
    """(out fp32, max_logits, lse) as FlashMLA's ref_sparse_attn_fwd defines them."""
    s_q, h_q, d_qk = q.shape
    s_kv = kv.shape[0]
    idx = indices[:, 0, :].long().clone()
    topk = idx.shape[-1]
    if topk_length is not None:
        idx[torch.arange(topk)[None, :] >= topk_length.long()[:, None]] = -1
    invalid = (idx < 0) | (idx >= s_kv)
    idx[invalid] = 0
    g = kv[:, 0, :].double()[idx]                                   # [s_q, topk, d_qk]
    P = torch.einsum("thd,tkd->thk", q.double(), g) * sm_scale
    P = P.masked_fill(invalid[:, None, :], -INF)
    lse = torch.logsumexp(P, dim=-1)
    max_logits = P.amax(dim=-1)
    lse_for_o = lse
    if attn_sink is not None:
        lse_for_o = torch.logsumexp(torch.stack([lse, attn_sink.double()[None, :].expand_as(lse)]), 0)
    lse_for_o = lse_for_o.masked_fill(torch.isneginf(lse_for_o), INF)
    out = torch.einsum("thk,tkd->thd", torch.exp(P - lse_for_o[..., None]), g[..., :512])
    return out, max_logits, lse.masked_fill(torch.isneginf(lse), INF)


def _prefill_case(gen, s_q=9, s_kv=95, topk=64, h_q=16, d_qk=576, all_invalid_rows=(3,)):
    q = (randn(s_q, h_q, d_qk, gen=gen, scale=0.1)).bfloat16()
    kv = (randn(s_kv, 1, d_qk, gen=gen, scale=0.1)).bfloat16()
    idx = torch.stack([torch.randperm(s_kv + 40, generator=gen)[:topk] for _ in range(s_q)])
    bad = idx >= s_kv
    choice = torch.randint(0, len(INVALID_INDICES), idx.shape, generator=gen)
    idx = torch.where(bad, torch.tensor(INVALID_INDICES)[choice], idx)
    for r in all_invalid_rows:
        idx[r] = -1
    indices = idx.to(torch.int32).view(s_q, 1, topk)
    sink = torch.randn(h_q, generator=gen)
    sink[0], sink[1] = INF, -INF
    topk_length = torch.randint(0, topk + 1, (s_q,), generator=gen, dtype=torch.int32)
    return q, kv, indices, sink, topk_length


def _non_contiguous(x):
    """The same values in a strided view (FlashMLA's tests pass such views)."""
    wide = torch.empty(*x.shape[:-1], x.shape[-1] + 8, dtype=x.dtype, device=x.device)
    wide[..., :x.shape[-1]] = x
    return wide[..., :x.shape[-1]]


@pytest.mark.parametrize("with_sink,with_len,d_qk", [(False, False, 576), (True, True, 576),
                                                     (True, False, 576), (True, True, 512)])
def test_flash_mla_sparse_fwd_formula(device, gen, with_sink, with_len, d_qk):
    if device == "cuda" and d_qk == 512:
        pytest.skip("d_qk = 512 on CUDA arrives with issue 22")
    q, kv, indices, sink, topk_length = _prefill_case(gen, d_qk=d_qk)
    sink = sink if with_sink else None
    topk_length = topk_length if with_len else None
    sm_scale = 0.5
    out, max_logits, lse = flash_mla.flash_mla_sparse_fwd(
        q.to(device), kv.to(device), indices.to(device), sm_scale=sm_scale, attn_sink=None if sink is None else sink.to(device),
        topk_length=None if topk_length is None else topk_length.to(device))
    r_out, r_max, r_lse = flashmla_prefill_formula(q, kv, indices, sm_scale, sink, topk_length)
    assert out.dtype == torch.bfloat16 and out.shape == (9, 16, 512)
    assert max_logits.dtype == lse.dtype == torch.float32 and lse.shape == max_logits.shape == (9, 16)
    torch.testing.assert_close(out.cpu().double(), r_out, atol=8e-4, rtol=3.01 / 128)
    # FlashMLA's tolerance on both: abs 1e-6, rel 2/65536 (fp32 math over bf16 inputs)
    torch.testing.assert_close(max_logits.cpu().double(), r_max, atol=1e-6, rtol=2.01 / 65536)
    torch.testing.assert_close(lse.cpu().double(), r_lse, atol=1e-5, rtol=2.01 / 65536)
    # the conventions, explicitly: row 3 has no valid index -> lse +inf, max_logits -inf, out 0
    assert torch.isposinf(lse[3]).all() and torch.isneginf(max_logits[3]).all()
    assert (out[3] == 0).all()
    if with_sink:
        assert (out[:, 0] == 0).all()                     # +inf sink zeroes the head
    # natural-log lse: the op's own lse, with -inf mapped to +inf, nothing else changed
    _, op_lse = torch.ops.dsa.sparse_mla_fwd(q.to(device), kv.to(device), indices.to(device), sm_scale, 512,
                                             None, None if topk_length is None else topk_length.to(device))
    assert torch.equal(lse, op_lse.masked_fill(torch.isneginf(op_lse), INF))


def test_flash_mla_max_logits_ties_scale_and_opt_out(monkeypatch, gen):
    """max_logits = lse(2**32 s) / 2**32: exact to fp32 rounding with many tied maxima, tiny
    and large scores, a negative scale; COMPUTE_MAX_LOGITS = False skips it."""
    q, kv, indices, sink, topk_length = _prefill_case(gen, s_q=7, s_kv=50, topk=32)
    dup = indices.clone()
    dup[0, 0, :] = 5                                        # 32 copies of one key: 32 tied maxima
    for scale in (0.4, 1e-4, 30.0, -0.7):
        _, got, _ = flash_mla.flash_mla_sparse_fwd(q, kv, dup, scale, topk_length=topk_length)
        _, want, _ = flashmla_prefill_formula(q, kv, dup, scale, None, topk_length)
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=2.01 / 65536)
    whole = flash_mla.flash_mla_sparse_fwd(q, kv, indices, 0.4, topk_length=topk_length)
    monkeypatch.setattr(flash_mla, "COMPUTE_MAX_LOGITS", False)
    out, max_logits, lse = flash_mla.flash_mla_sparse_fwd(q, kv, indices, 0.4, topk_length=topk_length)
    assert max_logits is None and torch.equal(out, whole[0]) and torch.equal(lse, whole[2])


def test_flash_mla_sparse_fwd_views_and_grad(device, gen):
    q, kv, indices, sink, topk_length = _prefill_case(gen, s_q=5, s_kv=40, topk=16, h_q=16)
    qv, kvv, iv = (_non_contiguous(t.to(device)) for t in (q, kv, indices))
    assert not qv.is_contiguous() and not kvv.is_contiguous()
    a = flash_mla.flash_mla_sparse_fwd(qv, kvv, iv, 0.3)
    b = flash_mla.flash_mla_sparse_fwd(q.to(device), kv.to(device), indices.to(device), 0.3)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    # differentiable: the gradient of the op's own autograd (the lse map does not touch it)
    qg = q.to(device).requires_grad_()
    kg = kv.to(device).requires_grad_()
    out, _, _ = flash_mla.flash_mla_sparse_fwd(qg, kg, indices.to(device), 0.3, attn_sink=sink.to(device))
    out.float().square().sum().backward()
    q2 = q.to(device).requires_grad_()
    k2 = kv.to(device).requires_grad_()
    sink_finite = sink.to(device).masked_fill(torch.isposinf(sink.to(device)), 0.0)
    out2, _ = dsa_ext.sparse_mla(q2, k2, indices.to(device), 0.3, 512, sink_finite)
    out2.masked_fill(torch.isposinf(sink.to(device))[:, None], 0).float().square().sum().backward()
    assert torch.equal(qg.grad, q2.grad) and torch.equal(kg.grad, k2.grad)


def test_flash_mla_sparse_fwd_bad_input(gen):
    q, kv, indices, sink, topk_length = _prefill_case(gen, s_q=3, s_kv=20, topk=8, all_invalid_rows=())
    cases = [
        dict(indices=indices.long()), dict(q=q.float()), dict(kv=kv[:, :, :512]),
        dict(attn_sink=sink.double()), dict(topk_length=topk_length[:2]), dict(d_v=576),
        dict(indices=indices.view(3, 8)), dict(q=q[:, :, :128]),
    ]
    names = ["indices", "q", "kv", "attn_sink", "topk_length", "d_v", "indices", "d_qk"]
    for change, name in zip(cases, names):
        args = dict(q=q, kv=kv, indices=indices, sm_scale=0.1)
        args.update(change)
        with pytest.raises(RuntimeError, match=name):
            flash_mla.flash_mla_sparse_fwd(**args)


def flashmla_decode_formula(q, caches, sm_scale, attn_sink):
    """FlashMLA's ref_sparse_attn_decode over dequantised caches: ``caches`` is a list of
    (dequantised rows [slots, 576], indices [b, s_q, k], topk_length [b] or None) sharing one
    softmax. Returns out fp64 [b, s_q, h, 512] and lse [b, h, s_q] with +inf for empty rows."""
    b, s_q, h, d = q.shape
    gathered, invalid = [], []
    for rows, idx, tl in caches:
        k = idx.shape[-1]
        bad = (idx < 0) | (idx >= rows.shape[0])
        if tl is not None:
            bad = bad | (torch.arange(k)[None, None, :] >= tl.long()[:, None, None])
        gathered.append(rows.double()[idx.long().clamp(0, rows.shape[0] - 1)])
        invalid.append(bad)
    g = torch.cat(gathered, dim=2)                                   # [b, s_q, K, 576]
    bad = torch.cat(invalid, dim=2)
    w = torch.einsum("bshd,bskd->bshk", q.double(), g) * sm_scale
    w = w.masked_fill(bad[:, :, None, :], -INF)
    lse = w.logsumexp(-1)
    p = torch.exp(w - lse.masked_fill(torch.isneginf(lse), 0)[..., None]).masked_fill(bad[:, :, None, :], 0)
    out = torch.einsum("bshk,bskd->bshd", p, g[..., :512])
    if attn_sink is not None:
        out = out * (1.0 / (1.0 + torch.exp(attn_sink.double().view(1, 1, h) - lse)))[..., None]
    empty = torch.isneginf(lse)
    out = out.masked_fill(empty[..., None], 0)
    return out, lse.masked_fill(empty, INF).transpose(1, 2)


def _flashmla_fp8_cache(gen, num_blocks, block_size):
    """A V3.2 FP8 cache the way FlashMLA's tests/quant.py hands it out: a float8_e4m3fn tensor
    whose pages are padded by one record (stride(0) = (block_size + 1) * 656), written here with
    our writer (same bytes); returns (cache view, dequantised rows)."""
    rows = randn(num_blocks * block_size, 576, gen=gen, scale=0.3).bfloat16()
    dense = ref.new_mla_kv_cache(num_blocks, block_size)
    torch.ops.dsa.mla_kv_cache_write(rows, torch.arange(num_blocks * block_size), dense)
    padded = torch.empty(num_blocks, block_size + 1, 656, dtype=torch.float8_e4m3fn)[:, :block_size]
    padded.view(torch.uint8).copy_(dense.view(num_blocks, block_size, 656))
    return padded.view(num_blocks, block_size, 1, 656), ref.dequantize_mla_cache(dense)


def _decode_indices(gen, b, s_q, topk, num_slots, all_invalid_batch=None):
    idx = torch.randint(0, num_slots, (b, s_q, topk), generator=gen, dtype=torch.int32)
    idx[torch.rand(b, s_q, topk, generator=gen) < 0.2] = -1
    if all_invalid_batch is not None:
        idx[all_invalid_batch] = -1
    return idx


def test_flash_mla_with_kvcache_formula(device, gen):
    b, s_q, h_q, topk, nb, bs = 3, 2, 16, 48, 5, 16
    cache, rows = _flashmla_fp8_cache(gen, nb, bs)
    assert not cache.is_contiguous() and cache.dtype == torch.float8_e4m3fn
    q = randn(b, s_q, h_q, 576, gen=gen, scale=0.5).bfloat16()
    idx = _decode_indices(gen, b, s_q, topk, nb * bs, all_invalid_batch=1)
    topk_length = torch.tensor([topk, 5, 31], dtype=torch.int32)
    sink = torch.randn(h_q, generator=gen)
    sink[2], sink[3] = INF, -INF
    scale = 576 ** -0.55
    meta, splits = flash_mla.get_mla_metadata()
    assert isinstance(meta, flash_mla.FlashMLASchedMeta) and splits is None
    for _ in range(2):      # the second call reuses the metadata (consistency checked)
        out, lse = flash_mla.flash_mla_with_kvcache(
            q.to(device), cache.to(device), None, None, 512, meta, splits, scale, False, True,
            idx.to(device), sink.to(device), None, None, topk_length.to(device), None)
    r_out, r_lse = flashmla_decode_formula(q, [(rows, idx, topk_length)], scale, sink)
    assert out.shape == (b, s_q, h_q, 512) and out.dtype == torch.bfloat16
    assert lse.shape == (b, h_q, s_q) and lse.dtype == torch.float32
    assert lse.stride() == (s_q * h_q, 1, h_q)                       # FlashMLA's transposed view
    torch.testing.assert_close(out.cpu().double(), r_out, atol=1e-3, rtol=2.01 / 128)
    torch.testing.assert_close(lse.cpu().double(), r_lse, atol=1e-5, rtol=8.01 / 65536)
    assert torch.isposinf(lse[1]).all() and (out[1] == 0).all()      # batch 1: no valid slot
    assert (out[:, :, 2] == 0).all()                                 # +inf sink
    # the op's lse, transposed, with -inf -> +inf
    _, op_lse = torch.ops.dsa.sparse_mla_decode(q.to(device), cache.view(torch.uint8).contiguous().to(device),
                                                idx.to(device), scale, 512, None, topk_length.to(device))
    assert torch.equal(lse, op_lse.masked_fill(torch.isneginf(op_lse), INF).transpose(1, 2))


def test_flash_mla_with_kvcache_extra_cache(device, gen):
    """One softmax over two caches (FlashMLA's extra_k_cache), with extra_topk_length."""
    b, s_q, h_q = 2, 3, 16
    cache, rows = _flashmla_fp8_cache(gen, 4, 16)
    extra, extra_rows = _flashmla_fp8_cache(gen, 3, 8)
    q = randn(b, s_q, h_q, 576, gen=gen, scale=0.5).bfloat16()
    idx = _decode_indices(gen, b, s_q, 32, 64)
    idx[0, 1] = -1                      # window part empty, extra part not
    eidx = _decode_indices(gen, b, s_q, 16, 24)
    eidx[1] = -1                        # extra part empty for batch 1
    elen = torch.tensor([9, 16], dtype=torch.int32)
    sink = torch.randn(h_q, generator=gen)
    sink[0] = INF
    meta, _ = flash_mla.get_mla_metadata()
    out, lse = flash_mla.flash_mla_with_kvcache(
        q.to(device), cache.to(device), None, None, 512, meta, None, 0.05, False, True,
        idx.to(device), sink.to(device), extra.to(device), eidx.to(device), None, elen.to(device))
    r_out, r_lse = flashmla_decode_formula(q, [(rows, idx, None), (extra_rows, eidx, elen)], 0.05, sink)
    torch.testing.assert_close(out.cpu().double(), r_out, atol=2e-3, rtol=2.01 / 128)
    torch.testing.assert_close(lse.cpu().double(), r_lse, atol=1e-5, rtol=8.01 / 65536)
    assert meta.config.extra_topk == 16 and meta.config.extra_page_block_size == 8


def test_flash_mla_with_kvcache_checks(gen):
    cache, _ = _flashmla_fp8_cache(gen, 2, 8)
    q = randn(1, 1, 16, 576, gen=gen).bfloat16()
    idx = _decode_indices(gen, 1, 1, 8, 16)
    call = flash_mla.flash_mla_with_kvcache
    meta, _ = flash_mla.get_mla_metadata()
    call(q, cache, None, None, 512, meta, None, None, False, True, idx)
    with pytest.raises(AssertionError, match="s_q"):          # sched_meta reused with other shapes
        call(q.expand(1, 2, 16, 576), cache, None, None, 512, meta, None, None, False, True,
             idx.expand(1, 2, 8))
    with pytest.raises(AssertionError, match="FlashMLASchedMeta"):
        call(q, cache, None, None, 512, None, None, None, False, True, idx)
    with pytest.raises(AssertionError, match="num_splits"):
        call(q, cache, None, None, 512, flash_mla.get_mla_metadata()[0], torch.zeros(1), None, False, True, idx)
    with pytest.raises(AssertionError, match="causal"):
        call(q, cache, None, None, 512, flash_mla.get_mla_metadata()[0], None, None, True, True, idx)
    with pytest.raises(AssertionError, match="is_fp8_kvcache"):
        call(q, cache, None, None, 512, flash_mla.get_mla_metadata()[0], None, None, False, False, idx)
    bad = [
        (dict(indices=idx.long()), "indices"), (dict(q=q.float()), "q"),
        (dict(k_cache=cache.view(torch.uint8)[..., :576]), "k_cache"),
        (dict(head_dim_v=576), "head_size_v"),
        (dict(topk_length=torch.ones(2, dtype=torch.int32)), "topk_length"),
        (dict(attn_sink=torch.zeros(8)), "attn_sink"),
        (dict(extra_indices_in_kvcache=idx), "extra_indices_in_kvcache"),
        (dict(k_cache=cache.to(torch.bfloat16)), "k_cache"),
    ]
    for change, name in bad:
        args = dict(q=q, k_cache=cache, block_table=None, cache_seqlens=None, head_dim_v=512,
                    tile_scheduler_metadata=flash_mla.get_mla_metadata()[0], is_fp8_kvcache=True,
                    indices=idx)
        args.update(change)
        with pytest.raises(RuntimeError, match=name):
            call(**args)
    with pytest.raises(NotImplementedError, match="dense"):
        flash_mla.flash_attn_varlen_func(q, q, q, None, None, 1, 1)
    with pytest.raises(NotImplementedError, match="dense"):
        call(q, cache, torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32), 512,
             flash_mla.get_mla_metadata()[0])
    v32 = torch.zeros(2, 8, 1, 656, dtype=torch.uint8)       # d_qk 512 needs the 584-byte cache
    with pytest.raises(RuntimeError, match="k_cache"):
        call(q[..., :512].contiguous(), v32, None, None, 512, flash_mla.get_mla_metadata()[0], None, None,
             False, True, idx)


def _flashmla_v4_cache(gen, num_blocks, block_size):
    """A V4 (MODEL1) FP8 cache the way FlashMLA allocates it: float8_e4m3fn pages of
    ceil(bs * 584 / 576) * 576 bytes viewed as [nb, bs, 1, 584] (stride(0) is the padded pitch),
    written with our writer; returns (cache view, dequantised rows [slots, 512])."""
    rows = randn(num_blocks * block_size, 512, gen=gen, scale=0.3).bfloat16()
    cache = ref.new_mla_kv_cache(num_blocks, block_size, True, model="v4")
    torch.ops.dsa.mla_kv_cache_write(rows, torch.arange(num_blocks * block_size), cache)
    return cache.view(torch.float8_e4m3fn), ref.dequantize_mla_cache(cache)


def test_flash_mla_with_kvcache_v4_extra_cache(device, gen):
    """DeepSeek-V4 decode through the adapter: d_qk 512 over MODEL1 caches read in place (padded
    page pitch), window cache + compressed entries (extra_k_cache) in one softmax, lengths on
    both lists, a sink, 8 heads."""
    b, s_q, h_q = 2, 1, 8
    cache, rows = _flashmla_v4_cache(gen, 2, 64)
    extra, extra_rows = _flashmla_v4_cache(gen, 3, 64)
    assert cache.stride(0) != 64 * 584 and cache.dtype == torch.float8_e4m3fn
    q = randn(b, s_q, h_q, 512, gen=gen, scale=0.5).bfloat16()
    idx = _decode_indices(gen, b, s_q, 128, 128)
    eidx = _decode_indices(gen, b, s_q, 64, 192)
    tl = torch.tensor([128, 70], dtype=torch.int32)
    elen = torch.tensor([0, 50], dtype=torch.int32)        # batch 0: window rows only
    sink = torch.randn(h_q, generator=gen)
    meta, _ = flash_mla.get_mla_metadata()
    out, lse = flash_mla.flash_mla_with_kvcache(
        q.to(device), cache.to(device), None, None, 512, meta, None, 512 ** -0.5, False, True,
        idx.to(device), sink.to(device), extra.to(device), eidx.to(device), tl.to(device), elen.to(device))
    r_out, r_lse = flashmla_decode_formula(q, [(rows, idx, tl), (extra_rows, eidx, elen)], 512 ** -0.5, sink)
    torch.testing.assert_close(out.cpu().double(), r_out, atol=2e-3, rtol=2.01 / 128)
    torch.testing.assert_close(lse.cpu().double(), r_lse, atol=1e-5, rtol=8.01 / 65536)


# ---------------------------------------------------------------------------------------------
# DeepGEMM: formulas of tests/test_attention.py
# ---------------------------------------------------------------------------------------------
def deepgemm_mqa_formula(q, k_deq, weights, ks, ke):
    """ref_fp8_mqa_logits: sum_h w * relu(q . k), -inf outside [ks, ke)."""
    score = torch.einsum("mhd,nd->hmn", q.double(), k_deq.double())
    logits = torch.einsum("hmn,mh->mn", score.relu(), weights.double())
    cols = torch.arange(k_deq.shape[0])
    mask = (cols[None, :] >= ks.long()[:, None]) & (cols[None, :] < ke.long()[:, None])
    return logits.masked_fill(~mask, -INF)


def _per_token_fp8(k):
    """DeepGEMM's per_custom_dims_cast_to_fp8(kv, (0,), False): per-row amax / 448 scale."""
    sf = k.abs().float().amax(dim=1).clamp(min=1e-4) / 448.0
    return (k.float() / sf[:, None]).to(torch.float8_e4m3fn), sf


def _cp_ranges(seq_len, seq_len_kv):
    """DeepGEMM's generate_ks_ke_tests with context parallelism (an arbitrary CP rank)."""
    chunk, cp = seq_len // 2, seq_len_kv // seq_len
    cp_id = cp // 3
    ks = torch.zeros(seq_len, dtype=torch.int32)
    ke = torch.zeros(seq_len, dtype=torch.int32)
    for i in range(chunk):
        ke[i] = cp_id * chunk + i
        ke[i + chunk] = (cp * 2 - 1 - cp_id) * chunk + i
    return ks, ke


@pytest.mark.parametrize("cp", [False, True])
def test_deep_gemm_fp8_mqa_logits_formula(device, gen, cp):
    T, S, H, D = 16, 96, 32, 128        # the CUDA indexer kernels serve H in {32, 64}, D = 128
    q = randn(T, H, D, gen=gen).to(torch.float8_e4m3fn)
    k_fp8, k_sf = _per_token_fp8(randn(S, D, gen=gen).bfloat16())
    w = randn(T, H, gen=gen)
    if cp:
        ks, ke = _cp_ranges(T, S)
    else:
        ks = torch.zeros(T, dtype=torch.int32)
        ke = torch.arange(T, dtype=torch.int32) + (S - T)
    logits = deep_gemm.fp8_mqa_logits(q.to(device), (k_fp8.to(device), k_sf.to(device)), w.to(device),
                                      ks.to(device), ke.to(device))
    expect = deepgemm_mqa_formula(q.float(), k_fp8.float() * k_sf[:, None], w, ks, ke)
    assert logits.shape == (T, S) and logits.dtype == torch.float32
    # DeepGEMM's layout: row stride aligned to 1024 bytes with a 256-key tail, rows to 128 / H
    assert logits.stride() == (math.ceil((S + 256) / 256) * 256, 1)
    assert logits.untyped_storage().nbytes() >= math.ceil(T / (128 // H)) * (128 // H) * logits.stride(0) * 4
    assert torch.equal(torch.isneginf(logits).cpu(), torch.isneginf(expect))
    fin = ~torch.isneginf(expect)
    torch.testing.assert_close(logits.cpu().double()[fin], expect[fin], rtol=1e-5, atol=1e-4)


def test_deep_gemm_compressed_and_bf16_logits(device, gen):
    T, S, H, D = 8, 70, 32, 128
    q = randn(T, H, D, gen=gen).to(torch.float8_e4m3fn).to(device)
    k_fp8, k_sf = _per_token_fp8(randn(S, D, gen=gen))
    kv = (k_fp8.to(device), k_sf.to(device))
    w = randn(T, H, gen=gen).to(device)
    ks = torch.randint(0, 30, (T,), generator=gen, dtype=torch.int32)
    ke = (ks + torch.randint(0, 40, (T,), generator=gen, dtype=torch.int32)).clamp(max=S)
    ks, ke = ks.to(device), ke.to(device)
    full = deep_gemm.fp8_mqa_logits(q, kv, w, ks, ke)
    m = int((ke - ks).max())
    comp = deep_gemm.fp8_mqa_logits(q, kv, w, ks, ke, clean_logits=False, max_seqlen_k=m)
    assert comp.shape == (T, m) and comp.stride(0) == math.ceil(m / 256) * 256
    for t in range(T):
        n = int(ke[t] - ks[t])
        assert torch.equal(comp[t, :n], full[t, int(ks[t]):int(ke[t])])
    with pytest.raises(RuntimeError, match="clean_logits"):
        deep_gemm.fp8_mqa_logits(q, kv, w, ks, ke, clean_logits=True, max_seqlen_k=m)
    bf = deep_gemm.fp8_fp4_mqa_logits((q, None), kv, w, ks, ke, logits_dtype=torch.bfloat16)
    assert bf.dtype == torch.bfloat16 and bf.stride(0) == math.ceil((S + 256) / 512) * 512
    assert torch.equal(bf, full.to(torch.bfloat16))
    with pytest.raises(NotImplementedError, match="FP4"):
        deep_gemm.fp8_fp4_mqa_logits((q, torch.zeros(T, H, dtype=torch.int32)), kv, w, ks, ke)


def deepgemm_kv_cache_cast_to_fp8(x):
    """DeepGEMM's kv_cache_cast_to_fp8 (tests/test_attention.py): per block, the FP8 keys then the
    fp32 scales; returns (uint8 [nb, bs, 1, D + 4], dequantised keys)."""
    nb, bs, _, D = x.shape
    sf = x.abs().float().amax(dim=3, keepdim=True).clamp(1e-4) / 448.0
    scaled = (x * (1.0 / sf)).to(torch.float8_e4m3fn)
    out = torch.empty(nb, bs * (D + 4), dtype=torch.uint8)
    out[:, :bs * D] = scaled.view(nb, bs * D).view(torch.uint8)
    out[:, bs * D:] = sf.view(nb, bs).view(torch.uint8)
    return out.view(nb, bs, 1, D + 4), scaled.float() * sf


def deepgemm_paged_formula(q, k_deq, weights, visible, block_table, max_len):
    """ref_paged_mqa_logits: row (b, j) sees positions < visible[b, j] of its block table."""
    B, N, H, D = q.shape
    bs = k_deq.shape[1]
    logits = torch.full((B * N, max_len), -INF, dtype=torch.float64)
    for b in range(B):
        nblk = math.ceil(int(visible[b].max()) / bs)
        keys = k_deq[block_table[b, :nblk].long()].reshape(-1, D).double()
        s = torch.einsum("jhd,nd->jhn", q[b].double(), keys).relu()
        s = torch.einsum("jhn,jh->jn", s, weights[b * N:(b + 1) * N].double())
        pos = torch.arange(keys.shape[0])
        s = s.masked_fill(pos[None, :] >= visible[b].long()[:, None], -INF)
        logits[b * N:(b + 1) * N, :keys.shape[0]] = s
    return logits


@pytest.mark.parametrize("two_d", [True, False])
def test_deep_gemm_fp8_paged_mqa_logits_formula(device, gen, two_d):
    B, N, H, D, bs = 3, 2, 32, 128, 64
    ctx = torch.tensor([70, 130, 9], dtype=torch.int32)
    nblk = (ctx + bs - 1) // bs
    total = int(nblk.sum())
    cache, k_deq = deepgemm_kv_cache_cast_to_fp8(randn(total, bs, 1, D, gen=gen).bfloat16())
    perm = torch.randperm(total, generator=gen).to(torch.int32)
    table = torch.zeros(B, int(nblk.max()), dtype=torch.int32)
    o = 0
    for b in range(B):
        table[b, :nblk[b]] = perm[o:o + nblk[b]]
        o += int(nblk[b])
    max_len = int(nblk.max()) * bs
    q = randn(B, N, H, D, gen=gen).to(torch.float8_e4m3fn)
    w = randn(B * N, H, gen=gen)
    if two_d:   # DeepGEMM's current form: each query's visible length, last one = ctx
        ctx_in = ((ctx[:, None] + 1) * torch.rand(B, N, generator=gen)).int()
        ctx_in[:, -1] = ctx
        visible = ctx_in
    else:       # the earlier 1-D form
        ctx_in = ctx
        visible = ctx[:, None] - N + 1 + torch.arange(N)[None, :]
    meta = deep_gemm.get_paged_mqa_logits_metadata(ctx_in.to(device), bs, deep_gemm.get_num_sms())
    assert meta.shape == (deep_gemm.get_num_sms() + 1, 2) and meta.dtype == torch.int32
    logits = deep_gemm.fp8_paged_mqa_logits(q.to(device), cache.to(device), w.to(device), ctx_in.to(device),
                                            table.to(device), meta, max_len, clean_logits=True)
    expect = deepgemm_paged_formula(q.float(), k_deq.reshape(total, bs, D), w, visible, table, max_len)
    assert logits.shape == (B * N, max_len) and logits.stride(0) == math.ceil(max_len / 256) * 256
    assert torch.equal(torch.isneginf(logits).cpu(), torch.isneginf(expect))
    fin = ~torch.isneginf(expect)
    torch.testing.assert_close(logits.cpu().double()[fin], expect[fin], rtol=1e-5, atol=1e-4)
    # default clean_logits=False: the in-range entries are the same
    raw = deep_gemm.fp8_paged_mqa_logits(q.to(device), cache.to(device), w.to(device), ctx_in.to(device),
                                         table.to(device), meta, max_len)
    assert torch.equal(raw.cpu()[fin], logits.cpu()[fin])


def test_deep_gemm_bad_input(gen):
    T, S, H, D = 4, 16, 4, 32
    q = randn(T, H, D, gen=gen).to(torch.float8_e4m3fn)
    k, sf = _per_token_fp8(randn(S, D, gen=gen))
    w = randn(T, H, gen=gen)
    ks = torch.zeros(T, dtype=torch.int32)
    ke = torch.full((T,), S, dtype=torch.int32)
    bad = [
        ((q.float(), (k, sf), w, ks, ke), "q_fp"), ((q, (k, sf.double()), w, ks, ke), "kv_sf"),
        ((q, (k, sf), w[:, :2], ks, ke), "weights"), ((q, (k, sf), w, ks.long(), ke), "cu_seq_len_k_start"),
        ((q, (k[:, :16], sf), w, ks, ke), "kv_fp"),
    ]
    for args, name in bad:
        with pytest.raises(RuntimeError, match=name):
            deep_gemm.fp8_mqa_logits(*args)
    cache = torch.zeros(2, 64, 1, D + 4, dtype=torch.uint8)
    qp = q.view(2, 2, H, D)
    table = torch.zeros(2, 2, dtype=torch.int32)
    ctx = torch.full((2, 2), 10, dtype=torch.int32)
    meta = deep_gemm.get_paged_mqa_logits_metadata(ctx, 64, 4)
    with pytest.raises(RuntimeError, match="context_lens"):
        deep_gemm.fp8_paged_mqa_logits(qp, cache, w, ctx.long(), table, meta, 128)
    with pytest.raises(RuntimeError, match="fused_kv_cache"):
        deep_gemm.fp8_paged_mqa_logits(qp, cache[..., :D], w, ctx, table, meta, 128)
    with pytest.raises(RuntimeError, match="schedule_meta"):
        deep_gemm.fp8_paged_mqa_logits(qp, cache, w, ctx, table, meta.float(), 128)


# ---------------------------------------------------------------------------------------------
# vLLM: cache ops and top-k
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale_fmt", ["ue8m0", ""])
def test_vllm_indexer_k_quant_and_cache(device, gen, scale_fmt):
    nb, bs, D, N = 4, 16, 128, 37
    k = randn(N, D, gen=gen, scale=2.0).bfloat16()
    slots = torch.randperm(nb * bs, generator=gen)[:N]
    slots[::7] = -1                                       # skipped
    cache = torch.full((nb, bs, D + 4), 0x5A, dtype=torch.uint8)   # vLLM's 3-D allocation
    cache_dev = cache.to(device)
    vllm.indexer_k_quant_and_cache(k.to(device), cache_dev, slots.to(device), D, scale_fmt)
    expect = cache.clone().unsqueeze(2)
    ref.indexer_k_cache_write(k, slots, expect, ue8m0=scale_fmt == "ue8m0")
    assert torch.equal(cache_dev.cpu(), expect.squeeze(2))
    # the scale rule written out: max(amax, 1e-4) / 448, rounded up to 2**n for ue8m0
    blocks = cache_dev.cpu().view(nb, bs * (D + 4))
    s0 = int(slots[1])
    got = blocks[s0 // bs, bs * D + 4 * (s0 % bs):bs * D + 4 * (s0 % bs) + 4].view(torch.float32)
    amax = k[1].float().abs().max().clamp(min=1e-4) / 448
    want = 2 ** torch.ceil(torch.log2(amax)) if scale_fmt == "ue8m0" else amax
    assert torch.equal(got, want.reshape(1))
    with pytest.raises(NotImplementedError, match="quant_block_size"):
        vllm.indexer_k_quant_and_cache(k, cache, slots, 64, scale_fmt)
    with pytest.raises(NotImplementedError, match="bf16"):
        vllm.indexer_k_quant_and_cache(k, torch.zeros(nb, bs, D, dtype=torch.bfloat16), slots, D, scale_fmt)
    with pytest.raises(RuntimeError, match="cache_stride"):
        vllm.indexer_k_quant_and_cache(k, cache[..., :D], slots, D, scale_fmt)


def test_vllm_cp_gather_indexer_k_quant_cache(device, gen):
    nb, bs, D = 6, 8, 64
    cache = ref.new_indexer_k_cache(nb, bs, D)
    ref.indexer_k_cache_write(randn(nb * bs, D, gen=gen), torch.arange(nb * bs), cache)
    cache3 = cache.squeeze(2)
    table = torch.tensor([[3, 1, 99], [0, 5, 2], [4, -1, 0]], dtype=torch.int32)  # 99 / -1: bad ids
    lens = torch.tensor([20, 0, 13], dtype=torch.int32)
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), lens.cumsum(0).int()])
    T = int(cu[-1]) + 5                                   # 5 rows past the batch stay untouched
    dst_k = torch.full((T, D), 0x33, dtype=torch.uint8).view(torch.float8_e4m3fn).to(device)
    dst_s = torch.full((T, 4), 0x77, dtype=torch.uint8).to(device)
    vllm.cp_gather_indexer_k_quant_cache(cache3.to(device), dst_k, dst_s, table.to(device), cu.to(device))
    want_k, want_s = ref.indexer_k_cache_gather(cache, table, lens)
    n = int(cu[-1])
    assert torch.equal(dst_k.cpu()[:n].view(torch.uint8), want_k.view(torch.uint8))
    assert torch.equal(dst_s.cpu()[:n].view(torch.float32).squeeze(-1), want_s)
    assert (dst_k.cpu()[n:].view(torch.uint8) == 0x33).all() and (dst_s.cpu()[n:] == 0x77).all()
    # odd geometries and an offset destination: the gather falls back to narrower words
    for nb2, bs2, D2, offset in ((3, 3, 12, 0), (2, 5, 16, 3), (2, 4, 8, 4)):
        c2 = ref.new_indexer_k_cache(nb2, bs2, D2)
        ref.indexer_k_cache_write(randn(nb2 * bs2, D2, gen=gen), torch.arange(nb2 * bs2), c2)
        t2 = torch.tensor([[1, 0]], dtype=torch.int32)
        n2 = 2 * bs2 - 1
        flat = torch.zeros(offset + n2 * D2, dtype=torch.uint8)
        dk2 = flat[offset:].view(n2, D2)
        ds2 = torch.zeros(n2, 4, dtype=torch.uint8)
        vllm.cp_gather_indexer_k_quant_cache(c2.squeeze(2), dk2, ds2, t2, torch.tensor([0, n2], dtype=torch.int32))
        wk, ws = ref.indexer_k_cache_gather(c2, t2, torch.tensor([n2], dtype=torch.int32))
        assert torch.equal(dk2, wk.view(torch.uint8)) and torch.equal(ds2.view(torch.float32).squeeze(-1), ws)
    # the op we would otherwise call agrees (it syncs on CUDA; the adapter does not)
    op_k, op_s = torch.ops.dsa.indexer_k_cache_gather(cache, table, lens)
    assert torch.equal(op_k.view(torch.uint8), want_k.view(torch.uint8)) and torch.equal(op_s, want_s)


def test_vllm_empty_inputs(gen):
    """Empty chunks are no-ops: no rows to gather, no rows to rank, an empty cache reads zeros."""
    cache = torch.zeros(0, 8, 36, dtype=torch.uint8)
    dst_k = torch.full((3, 32), 9, dtype=torch.uint8)
    dst_s = torch.full((3, 4), 9, dtype=torch.uint8)
    vllm.cp_gather_indexer_k_quant_cache(cache, dst_k, dst_s, torch.zeros(1, 1, dtype=torch.int32),
                                         torch.tensor([0, 2], dtype=torch.int32))
    assert (dst_k[:2] == 0).all() and (dst_k[2] == 9).all() and (dst_s[:2] == 0).all()
    vllm.cp_gather_indexer_k_quant_cache(cache, dst_k[:0], dst_s[:0], torch.zeros(1, 1, dtype=torch.int32),
                                         torch.tensor([0, 0], dtype=torch.int32))
    out = torch.full((2, 4), 5, dtype=torch.int32)
    vllm.top_k_per_row_prefill(randn(2, 10, gen=gen), torch.zeros(2, dtype=torch.int32),
                               torch.full((2,), 10, dtype=torch.int32), out, 0, 10, 1, 4)
    vllm.top_k_per_row_decode(randn(2, 10, gen=gen), 1, torch.full((2,), 10, dtype=torch.int32), out, 0, 10, 1, 4)
    assert (out == 5).all()


def _assert_same_topk(logits_row, got, want):
    """vLLM's compare_top_k_results: equal sets, or the differing entries' values agree."""
    got = [int(i) for i in got if i >= 0]
    want = [int(i) for i in want if i >= 0]
    assert len(got) == len(want) and len(set(got)) == len(got)
    a, b = sorted(set(got) - set(want)), sorted(set(want) - set(got))
    torch.testing.assert_close(logits_row[a].sort().values, logits_row[b].sort().values)


def test_vllm_top_k_per_row_prefill(device, gen):
    rows, S, k = 12, 300, 40
    wide = randn(rows, S + 17, gen=gen)                   # row stride S + 17 (a view, as vLLM's)
    logits = wide[:, :S]
    ks = torch.randint(0, 100, (rows,), generator=gen, dtype=torch.int32)
    ke = (ks + torch.randint(0, 200, (rows,), generator=gen, dtype=torch.int32)).clamp(max=S)
    ke[0] = ks[0] + 3                                     # short row: -1 padding
    buf = torch.full((rows + 2, k + 8), -7, dtype=torch.int32).to(device)   # vLLM's wider buffer
    out = buf[:rows, :k]
    vllm.top_k_per_row_prefill(logits.to(device), ks.to(device), ke.to(device), out, rows,
                               logits.stride(0), logits.stride(1), k)
    got = buf.cpu()
    assert (got[:rows, k:] == -7).all() and (got[rows:] == -7).all()   # nothing else written
    for r in range(rows):
        n = int(ke[r] - ks[r])
        want = torch.topk(logits[r, ks[r]:ke[r]], min(k, n)).indices   # relative to rowStart
        _assert_same_topk(logits[r, ks[r]:ke[r]], got[r, :k], want)
        assert (got[r, min(k, n):k] == -1).all()
    # a column-strided view (stride1 = 2): read through the given strides
    strided = wide[:, ::2]
    out2 = torch.empty(rows, k, dtype=torch.int32)
    vllm.top_k_per_row_prefill(strided, ks, ke.clamp(max=strided.shape[1]), out2, rows,
                               strided.stride(0), strided.stride(1), k)
    want2 = torch.empty(rows, k, dtype=torch.int32)
    vllm.top_k_per_row_prefill(strided.contiguous(), ks, ke.clamp(max=strided.shape[1]), want2, rows,
                               strided.shape[1], 1, k)
    assert torch.equal(out2, want2)


@pytest.mark.parametrize("two_d", [False, True])
def test_vllm_top_k_per_row_decode_and_persistent(device, gen, two_d):
    B, next_n, S, k = 4, 2, 200, 32
    seq_lens = torch.tensor([150, 2, 33, 200], dtype=torch.int32)
    rows = B * next_n
    r = torch.arange(rows)
    ends = seq_lens[r // next_n] - next_n + r % next_n + 1
    arg = ends.view(B, next_n).int() if two_d else seq_lens
    logits = randn(rows, S, gen=gen)
    out = torch.empty(rows, k, dtype=torch.int32).to(device)
    vllm.top_k_per_row_decode(logits.to(device), next_n, arg.to(device), out, rows,
                              logits.stride(0), logits.stride(1), k)
    for i in range(rows):
        n = int(ends[i])
        _assert_same_topk(logits[i], out.cpu()[i], torch.topk(logits[i, :n], min(k, n)).indices)
    out2 = torch.empty(rows, k, dtype=torch.int32).to(device)
    vllm.persistent_topk(logits.to(device), ends.int().view(B, next_n).to(device), out2,
                         torch.empty(16, dtype=torch.uint8), k, S)
    assert torch.equal(out2.cpu(), out.cpu())


def test_vllm_bad_input(gen):
    logits = randn(4, 50, gen=gen)
    ks = torch.zeros(4, dtype=torch.int32)
    ke = torch.full((4,), 50, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="indices"):
        vllm.top_k_per_row_prefill(logits, ks, ke, torch.empty(4, 8, dtype=torch.int64), 4, 50, 1, 8)
    with pytest.raises(RuntimeError, match="logits"):
        vllm.top_k_per_row_prefill(logits.double(), ks, ke, torch.empty(4, 8, dtype=torch.int32), 4, 50, 1, 8)
    with pytest.raises(RuntimeError, match="lengths"):
        vllm.persistent_topk(logits, ke[:3], torch.empty(4, 8, dtype=torch.int32), None, 8, 50)
    cache = torch.zeros(2, 8, 36, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="dst_scale"):
        vllm.cp_gather_indexer_k_quant_cache(cache, torch.empty(3, 32, dtype=torch.uint8),
                                             torch.empty(3, 2, dtype=torch.uint8),
                                             torch.zeros(1, 2, dtype=torch.int32),
                                             torch.tensor([0, 3], dtype=torch.int32))


# ---------------------------------------------------------------------------------------------
# Programs written against the peers run unchanged after the import swap
# ---------------------------------------------------------------------------------------------
PEER_PROGRAM = textwrap.dedent('''
    import torch
    import flash_mla
    import deep_gemm
    from vllm import _custom_ops as ops

    def decode_layers(q, k_caches, indices, topk_length, attn_sink, sm_scale):
        # FlashMLA README: one scheduler handle reused by every layer of a decode step
        tile_scheduler_metadata, num_splits = flash_mla.get_mla_metadata()
        outs = []
        for k_cache in k_caches:
            o, lse = flash_mla.flash_mla_with_kvcache(
                q, k_cache, None, None, 512, tile_scheduler_metadata, num_splits,
                sm_scale, False, True, indices, attn_sink, None, None, topk_length, None)
            outs.append((o, lse))
        return outs

    def prefill(q, kv, indices, sm_scale):
        out, max_logits, lse = flash_mla.flash_mla_sparse_fwd(q, kv, indices, sm_scale=sm_scale)
        return out, lse

    def index_prefill(k, kv_cache, slot_mapping, block_table, cu_seq_lens, q_fp8, weights,
                      ks, ke, topk_tokens):
        # vLLM's sparse_attn_indexer prefill path, step by step
        ops.indexer_k_quant_and_cache(k, kv_cache, slot_mapping, k.shape[-1], "ue8m0")
        total = int(cu_seq_lens[-1])
        k_fp8 = torch.empty((total, k.shape[-1]), dtype=torch.float8_e4m3fn)
        k_scale = torch.empty((total, 4), dtype=torch.uint8)
        ops.cp_gather_indexer_k_quant_cache(kv_cache, k_fp8, k_scale, block_table, cu_seq_lens)
        logits = deep_gemm.fp8_mqa_logits(q_fp8, (k_fp8, k_scale.view(torch.float32).squeeze(-1)),
                                          weights, ks, ke, clean_logits=False)
        topk_indices = torch.full((q_fp8.shape[0], topk_tokens), -1, dtype=torch.int32)
        ops.top_k_per_row_prefill(logits, ks, ke, topk_indices, logits.shape[0],
                                  logits.stride(0), logits.stride(1), topk_tokens)
        return topk_indices
''')


def _load_peer_program(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_mla", flash_mla)
    monkeypatch.setitem(sys.modules, "deep_gemm", deep_gemm)
    fake_vllm = types.ModuleType("vllm")
    fake_vllm._custom_ops = vllm
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm)
    monkeypatch.setitem(sys.modules, "vllm._custom_ops", vllm)
    program = types.ModuleType("peer_program")
    exec(compile(PEER_PROGRAM, "peer_program", "exec"), program.__dict__)
    return program


def test_peer_program_runs_after_import_swap(monkeypatch, gen):
    program = _load_peer_program(monkeypatch)
    # FlashMLA decode over two "layers"
    caches = [_flashmla_fp8_cache(gen, 3, 16) for _ in range(2)]
    q = randn(2, 1, 16, 576, gen=gen, scale=0.5).bfloat16()
    idx = _decode_indices(gen, 2, 1, 24, 48)
    tl = torch.tensor([24, 7], dtype=torch.int32)
    outs = program.decode_layers(q, [c for c, _ in caches], idx, tl, None, 0.07)
    for (o, lse), (_, rows) in zip(outs, caches):
        r_out, r_lse = flashmla_decode_formula(q, [(rows, idx, tl)], 0.07, None)
        torch.testing.assert_close(o.double(), r_out, atol=1e-3, rtol=2.01 / 128)
        torch.testing.assert_close(lse.double(), r_lse, atol=1e-5, rtol=8.01 / 65536)
    # FlashMLA prefill
    qp, kv, ip, _, _ = _prefill_case(gen, s_q=4, s_kv=30, topk=16)
    out, lse = program.prefill(qp, kv, ip, 0.2)
    r_out, _, r_lse = flashmla_prefill_formula(qp, kv, ip, 0.2, None, None)
    torch.testing.assert_close(out.double(), r_out, atol=8e-4, rtol=3.01 / 128)
    torch.testing.assert_close(lse.double(), r_lse, atol=1e-5, rtol=2.01 / 65536)
    # vLLM + DeepGEMM indexer prefill: two sequences of 40 and 25 cached keys
    D, H, bs, topk = 128, 4, 16, 12
    lens = [40, 25]
    table = torch.tensor([[2, 0, 5], [1, 4, 3]], dtype=torch.int32)
    slot_mapping = torch.cat([table[b].long()[torch.arange(n) // bs] * bs + torch.arange(n) % bs
                              for b, n in enumerate(lens)])
    k = randn(sum(lens), D, gen=gen).bfloat16()
    kv_cache = torch.zeros(6, bs, D + 4, dtype=torch.uint8)
    cu = torch.tensor([0, 40, 65], dtype=torch.int32)
    T = 10                                   # the last 5 tokens of each sequence query
    q_fp8 = randn(T, H, D, gen=gen).to(torch.float8_e4m3fn)
    w = randn(T, H, gen=gen)
    ks = torch.tensor([0] * 5 + [40] * 5, dtype=torch.int32)
    ke = torch.tensor([36, 37, 38, 39, 40, 61, 62, 63, 64, 65], dtype=torch.int32)
    got = program.index_prefill(k, kv_cache, slot_mapping, table, cu, q_fp8, w, ks, ke, topk)
    # the same pipeline from the oracle: quantise, logits over the concatenated keys, top-k
    k_fp8, k_sf = ref.fp8_quantize(k, block_size=D, ue8m0=True)
    logits = ref.indexer_logits(q_fp8, k_fp8, k_sf.reshape(-1), w, ks, ke)
    want = ref.topk_indices(logits, topk, ks, ke)
    for r in range(T):
        rel = torch.where(want[r] >= 0, want[r] - ks[r], want[r])
        _assert_same_topk(logits[r, ks[r]:ke[r]], got[r], rel)


# ---------------------------------------------------------------------------------------------
# Traceable by torch.compile (fullgraph), as the ops are
# ---------------------------------------------------------------------------------------------
def test_adapters_trace_under_torch_compile(gen):
    torch._dynamo.reset()
    q, kv, idx, sink, tl = _prefill_case(gen, s_q=4, s_kv=30, topk=16)
    fwd = torch.compile(flash_mla.flash_mla_sparse_fwd, fullgraph=True, backend="aot_eager")
    for a, b in zip(fwd(q, kv, idx, 0.2, 512, sink, tl),
                    flash_mla.flash_mla_sparse_fwd(q, kv, idx, 0.2, 512, sink, tl)):
        assert torch.equal(a, b)

    # the max_logits pass is dead code when the caller drops max_logits (as every engine does)
    from torch._dynamo.backends.common import aot_autograd
    calls = []

    def count_attention(gm, example_inputs):
        calls.append(sum(1 for n in gm.graph.nodes if "sparse_mla_fwd" in str(n.target)))
        return gm

    def drops_max_logits(q, kv, idx):
        out, _, lse = flash_mla.flash_mla_sparse_fwd(q, kv, idx, 0.2)
        return out, lse

    for fn in (drops_max_logits, lambda q, kv, idx: flash_mla.flash_mla_sparse_fwd(q, kv, idx, 0.2)):
        torch._dynamo.reset()
        torch.compile(fn, fullgraph=True, backend=aot_autograd(fw_compiler=count_attention))(q, kv, idx)
    assert calls == [1, 2]

    T, S, H, D = 8, 40, 4, 32
    qf = randn(T, H, D, gen=gen).to(torch.float8_e4m3fn)
    k_fp8, k_sf = _per_token_fp8(randn(S, D, gen=gen))
    w = randn(T, H, gen=gen)
    ks = torch.zeros(T, dtype=torch.int32)
    ke = torch.arange(T, dtype=torch.int32) + S - T + 1

    def indexer_step(qf, k_fp8, k_sf, w, ks, ke, out):
        logits = deep_gemm.fp8_mqa_logits(qf, (k_fp8, k_sf), w, ks, ke, clean_logits=False)
        vllm.top_k_per_row_prefill(logits, ks, ke, out, logits.shape[0], logits.stride(0),
                                   logits.stride(1), 8)
        return out

    compiled = torch.compile(indexer_step, fullgraph=True, backend="aot_eager")
    a = compiled(qf, k_fp8, k_sf, w, ks, ke, torch.empty(T, 8, dtype=torch.int32))
    b = indexer_step(qf, k_fp8, k_sf, w, ks, ke, torch.empty(T, 8, dtype=torch.int32))
    assert torch.equal(a, b)

    # the decode-side calls: cache write + gather, paged logits, decode top-k
    B, N, bs = 2, 1, 16
    k_new = randn(20, D, gen=gen).bfloat16()
    slots = torch.randperm(48, generator=gen)[:20]
    table = torch.tensor([[0, 2], [1, 0]], dtype=torch.int32)
    cu = torch.tensor([0, 20, 27], dtype=torch.int32)
    ctx = torch.tensor([[20], [27]], dtype=torch.int32)
    qd = randn(B, N, H, D, gen=gen).to(torch.float8_e4m3fn)
    wd = randn(B * N, H, gen=gen)

    def decode_step(kv_cache, dst_k, dst_s, out):
        vllm.indexer_k_quant_and_cache(k_new, kv_cache, slots, D, "ue8m0")
        vllm.cp_gather_indexer_k_quant_cache(kv_cache, dst_k, dst_s, table, cu)
        sched = deep_gemm.get_paged_mqa_logits_metadata(ctx, bs, 4)
        logits = deep_gemm.fp8_paged_mqa_logits(qd, kv_cache.unsqueeze(2), wd, ctx, table, sched, 32)
        vllm.top_k_per_row_decode(logits, N, ctx, out, B * N, logits.stride(0), logits.stride(1), 8)
        return logits

    def fresh():
        return (torch.zeros(3, bs, D + 4, dtype=torch.uint8), torch.zeros(27, D, dtype=torch.uint8),
                torch.zeros(27, 4, dtype=torch.uint8), torch.zeros(B * N, 8, dtype=torch.int32))

    got, want = fresh(), fresh()
    la = torch.compile(decode_step, fullgraph=True, backend="aot_eager")(*got)
    lb = decode_step(*want)
    assert torch.equal(la, lb)
    for x, y in zip(got, want):
        assert torch.equal(x, y)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_adapters_add_no_host_sync_on_cuda(gen):
    """The peers' decode / paged / top-k / cache calls have no host synchronisation; neither do
    the adapters (torch raises on a synchronising call in sync-debug mode "error")."""
    dev = "cuda"
    cache, _ = _flashmla_fp8_cache(gen, 4, 64)
    cache = cache.view(torch.uint8).contiguous().to(dev)
    q = randn(2, 1, 64, 576, gen=gen).bfloat16().to(dev)
    idx = _decode_indices(gen, 2, 1, 128, 256).to(dev)
    meta, _ = flash_mla.get_mla_metadata()
    B, N, H, D, bs = 2, 1, 64, 128, 64
    kv_cache = ref.new_indexer_k_cache(4, bs, D).to(dev)
    ref.indexer_k_cache_write(randn(4 * bs, D, gen=gen).to(dev), torch.arange(4 * bs, device=dev), kv_cache)
    qf = randn(B, N, H, D, gen=gen).to(torch.float8_e4m3fn).to(dev)
    w = randn(B * N, H, gen=gen).to(dev)
    ctx = torch.tensor([[100], [200]], dtype=torch.int32, device=dev)
    table = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]], dtype=torch.int32, device=dev)
    sched = deep_gemm.get_paged_mqa_logits_metadata(ctx, bs, deep_gemm.get_num_sms())
    out_idx = torch.empty(B * N, 64, dtype=torch.int32, device=dev)
    k_new = randn(3, D, gen=gen).bfloat16().to(dev)
    slots = torch.tensor([5, -1, 77], device=dev)
    dst_k = torch.empty(300, D, dtype=torch.float8_e4m3fn, device=dev)
    dst_s = torch.empty(300, 4, dtype=torch.uint8, device=dev)
    cu = torch.tensor([0, 100, 300], dtype=torch.int32, device=dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        flash_mla.flash_mla_with_kvcache(q, cache, None, None, 512, meta, None, None, False, True, idx)
        logits = deep_gemm.fp8_paged_mqa_logits(qf, kv_cache, w, ctx, table, sched, 256)
        vllm.top_k_per_row_decode(logits, N, ctx, out_idx, B * N, logits.stride(0), logits.stride(1), 64)
        vllm.indexer_k_quant_and_cache(k_new, kv_cache.squeeze(2), slots, D, "ue8m0")
        vllm.cp_gather_indexer_k_quant_cache(kv_cache.squeeze(2), dst_k, dst_s, table, cu)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
