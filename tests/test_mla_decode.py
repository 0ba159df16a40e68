"""sparse_mla_decode (SPEC section 3) against dsa_ext.reference: both MLA cache layouts, paged
block sizes, every head count the kernels serve, ragged/invalid/empty rows, sinks, topk_length
in both forms, opcheck, and bad inputs."""
import math

import pytest
import torch

import dsa_ext
from dsa_ext import reference as ref
from conftest import randn, rel_err

D_QK, D_V = 576, 512


def make_cache(num_blocks, block_size, fp8, gen, d_qk=D_QK, pitch_pad=None):
    """A random MLA cache. d_qk 576: V3.2 (FP8 656-byte records or bf16 576). d_qk 512: V4 (FP8
    584-byte MODEL1 pages or bf16 512). A V4 FP8 cache is a view over pages of pitch
    `block_size * 584 + pitch_pad` bytes (None: FlashMLA's allocation, rounded up to a multiple
    of 576), the padding filled with random bytes that a read would turn into wrong output."""
    kv = randn(num_blocks * block_size, d_qk, gen=gen)
    if d_qk == D_QK:
        if fp8:
            return ref.quantize_mla_records(kv).view(num_blocks, block_size, 1, 656)
        return kv.to(torch.bfloat16).view(num_blocks, block_size, 1, D_QK)
    if not fp8:
        return kv.to(torch.bfloat16).view(num_blocks, block_size, 1, 512)
    row = block_size * 584
    pitch = -(-row // 576) * 576 if pitch_pad is None else row + pitch_pad
    pages = torch.randint(0, 256, (num_blocks, pitch), generator=gen, dtype=torch.uint8)
    cache = pages[:, :row].view(num_blocks, block_size, 1, 584)
    ref.mla_kv_cache_write(kv, torch.arange(num_blocks * block_size), cache)
    return cache


def make_indices(B, s_q, K, num_slots, gen, invalid_frac=0.2):
    """Random slots, with -1, other negatives and out-of-range slots sprinkled in."""
    idx = torch.randint(0, num_slots, (B, s_q, K), generator=gen, dtype=torch.int32)
    r = torch.rand(B, s_q, K, generator=gen)
    idx[r < invalid_frac] = -1
    idx[(r >= invalid_frac) & (r < invalid_frac * 1.25)] = num_slots        # just out of range
    idx[(r >= invalid_frac * 1.25) & (r < invalid_frac * 1.5)] = -7
    idx[(r >= invalid_frac * 1.5) & (r < invalid_frac * 1.6)] = 2**31 - 1
    return idx


def check(q, cache, idx, sm_scale, device, sink=None, topk_length=None, extra_cache=None,
          extra_idx=None, extra_length=None):
    to = lambda t: None if t is None else t.to(device)
    out, lse = dsa_ext.sparse_mla_decode(to(q), to(cache), to(idx), sm_scale, 512, to(sink),
                                         to(topk_length), to(extra_cache), to(extra_idx),
                                         to(extra_length))
    ro, rl = ref.sparse_mla_decode(q, cache, idx, sm_scale, 512, sink, topk_length, extra_cache,
                                   extra_idx, extra_length)
    assert out.shape == ro.shape and out.dtype == torch.bfloat16
    assert lse.shape == rl.shape and lse.dtype == torch.float32
    out, lse = out.cpu(), lse.cpu()
    empty = torch.isneginf(rl)
    assert torch.equal(torch.isneginf(lse), empty), "empty rows must give lse = -inf exactly"
    assert torch.all(out[empty] == 0), "empty rows must give out = 0"
    if (~empty).any():
        tol = 8e-3 if device == "cpu" else 2e-2
        assert rel_err(out[~empty], ro[~empty]) < tol
        assert (lse[~empty] - rl[~empty]).abs().max().item() < (1e-3 if device == "cpu" else 1e-2)
    return out, lse


@pytest.mark.parametrize("fp8", [True, False], ids=["fp8", "bf16"])
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("B,s_q,H,K", [(2, 1, 16, 64), (1, 2, 32, 128), (2, 3, 64, 64), (1, 4, 128, 96)])
def test_matches_reference(device, gen, fp8, block_size, B, s_q, H, K):
    cache = make_cache(7, block_size, fp8, gen)
    q = randn(B, s_q, H, D_QK, gen=gen, dtype=torch.bfloat16)
    idx = make_indices(B, s_q, K, 7 * block_size, gen)
    check(q, cache, idx, D_QK ** -0.5, device)


@pytest.mark.parametrize("block_size", [1, 32])
def test_other_block_sizes_and_repeats(device, gen, block_size):
    cache = make_cache(50, block_size, True, gen)
    q = randn(2, 2, 16, D_QK, gen=gen, dtype=torch.bfloat16)
    idx = make_indices(2, 2, 64, 50 * block_size, gen)
    idx[0, 0, 10:20] = 3     # a repeated slot counts once per occurrence
    check(q, cache, idx, 0.1, device)


def test_empty_and_ragged_rows(device, gen):
    cache = make_cache(4, 64, True, gen)
    q = randn(3, 2, 16, D_QK, gen=gen, dtype=torch.bfloat16)
    idx = make_indices(3, 2, 128, 256, gen)
    idx[0, 1] = -1                     # all -1
    idx[1, 0] = 256                    # all out of range
    idx[2, 1, 1:] = -1                 # a single valid entry
    idx[2, 1, 0] = 5
    out, lse = check(q, cache, idx, D_QK ** -0.5, device)
    assert torch.isneginf(lse[0, 1]).all() and torch.isneginf(lse[1, 0]).all()
    assert torch.isfinite(lse[2, 1]).all()


@pytest.mark.parametrize("per_query", [False, True], ids=["len[B]", "len[B,s_q]"])
def test_topk_length(device, gen, per_query):
    B, s_q, H, K = 3, 2, 32, 128
    cache = make_cache(5, 64, True, gen)
    q = randn(B, s_q, H, D_QK, gen=gen, dtype=torch.bfloat16)
    idx = make_indices(B, s_q, K, 320, gen, invalid_frac=0.05)
    if per_query:
        lengths = torch.tensor([[0, 1], [64, 77], [128, 500]], dtype=torch.int32)
    else:
        lengths = torch.tensor([0, 65, 128], dtype=torch.int32)
    out, lse = check(q, cache, idx, D_QK ** -0.5, device, topk_length=lengths)
    assert torch.isneginf(lse[0, 0]).all()
    # entries past topk_length must not matter, even if they are valid slots
    full, _ = dsa_ext.sparse_mla_decode(q.to(device), cache.to(device), idx.to(device), D_QK ** -0.5,
                                        topk_length=lengths.to(device))
    idx2 = idx.clone()
    idx2[1, :, 100:] = 0
    cut, _ = dsa_ext.sparse_mla_decode(q.to(device), cache.to(device), idx2.to(device), D_QK ** -0.5,
                                       topk_length=lengths.to(device))
    assert torch.equal(full.cpu(), cut.cpu())


def test_attn_sink(device, gen):
    B, s_q, H, K = 2, 2, 16, 64
    cache = make_cache(3, 64, True, gen)
    q = randn(B, s_q, H, D_QK, gen=gen, dtype=torch.bfloat16)
    idx = make_indices(B, s_q, K, 192, gen)
    idx[1, 1] = -1
    sink = randn(H, gen=gen, scale=3.0)
    out, lse = check(q, cache, idx, D_QK ** -0.5, device, sink=sink)
    plain, plain_lse = dsa_ext.sparse_mla_decode(q.to(device), cache.to(device), idx.to(device), D_QK ** -0.5)
    # lse excludes the sink; out shrinks by exactly the sink's share of the denominator
    torch.testing.assert_close(lse, plain_lse.cpu())
    shrink = torch.exp(plain_lse.cpu() - torch.logaddexp(plain_lse.cpu(), sink.expand_as(plain_lse)))
    valid = torch.isfinite(plain_lse.cpu())
    expect = plain.cpu().float() * shrink[..., None]
    assert rel_err(out[valid], expect[valid]) < 1e-2


def test_scores_with_large_range(device, gen):
    """Peaky softmax (large sm_scale) must not overflow the online softmax."""
    cache = make_cache(2, 64, False, gen)
    q = randn(1, 2, 16, D_QK, gen=gen, dtype=torch.bfloat16)
    idx = make_indices(1, 2, 128, 128, gen)
    check(q, cache, idx, 2.0, device)


def test_k_zero_and_empty_batch(device, gen):
    cache = make_cache(2, 64, True, gen).to(device)
    q = randn(2, 1, 16, D_QK, gen=gen, dtype=torch.bfloat16).to(device)
    out, lse = dsa_ext.sparse_mla_decode(q, cache, torch.empty(2, 1, 0, dtype=torch.int32, device=device), 0.1)
    assert torch.all(out == 0) and torch.isneginf(lse).all()
    out, lse = dsa_ext.sparse_mla_decode(q[:0], cache, torch.empty(0, 1, 64, dtype=torch.int32, device=device), 0.1)
    assert out.shape == (0, 1, 16, 512) and lse.shape == (0, 1, 16)


@pytest.mark.parametrize("fp8", [True, False], ids=["fp8", "bf16"])
def test_agrees_with_written_and_gathered_cache(device, gen, fp8):
    """Rows written by the cache family's writer, read back by its gather: decode must attend
    to exactly those rows (cross-checks the 656-byte layout between the two families)."""
    N, H = 200, 16
    kv = randn(N, D_QK, gen=gen)
    cache = ref.new_mla_kv_cache(4, 64, fp8=fp8)
    slots = torch.randperm(256, generator=gen)[:N]
    ref.mla_kv_cache_write(kv, slots, cache)
    q = randn(1, 1, H, D_QK, gen=gen, dtype=torch.bfloat16)
    idx = slots[torch.randint(0, N, (1, 1, 96), generator=gen)].to(torch.int32)
    rows = ref.mla_kv_cache_gather(cache, idx.view(-1)).view(96, D_QK).double()
    scores = q[0, 0].double() @ rows.T * 0.05
    expect = torch.softmax(scores, dim=1) @ rows[:, :D_V]
    out, lse = dsa_ext.sparse_mla_decode(q.to(device), cache.to(device), idx.to(device), 0.05)
    assert rel_err(out.cpu()[0, 0], expect) < (8e-3 if device == "cpu" else 2e-2)
    torch.testing.assert_close(lse.cpu()[0, 0].double(), torch.logsumexp(scores, 1),
                               atol=1e-3 if device == "cpu" else 1e-2, rtol=0)


@pytest.mark.parametrize("fp8", [True, False], ids=["fp8", "bf16"])
def test_empty_cache(device, gen, fp8):
    """A cache with no blocks: every slot is out of range, nothing is read."""
    cache = make_cache(0, 64, fp8, gen).to(device)
    q = randn(1, 2, 16, D_QK, gen=gen, dtype=torch.bfloat16).to(device)
    idx = torch.tensor([0, 1, -1, 63] * 16, dtype=torch.int32).view(1, 1, 64).expand(1, 2, 64).contiguous()
    out, lse = dsa_ext.sparse_mla_decode(q, cache, idx.to(device), 0.1)
    assert torch.all(out.cpu() == 0) and torch.isneginf(lse.cpu()).all()


@pytest.mark.parametrize("per_query", [False, True], ids=["len[B]", "len[B,s_q]"])
def test_equals_sparse_mla_fwd_on_dequantised_cache(device, gen, per_query):
    """Decode = the sparse_mla_fwd op over the dequantised cache with (b, s_q) flattened."""
    if not torch._C._dispatch_has_kernel_for_dispatch_key(
            "dsa::sparse_mla_fwd", "CUDA" if device == "cuda" else "CPU"):
        pytest.skip(f"sparse_mla_fwd has no {device} kernel in this build")
    B, s_q, H, K = 2, 2, 64, 192
    cache = make_cache(6, 32, True, gen)
    q = randn(B, s_q, H, D_QK, gen=gen, dtype=torch.bfloat16)
    idx = make_indices(B, s_q, K, 6 * 32, gen)
    sink = randn(H, gen=gen)
    lengths = torch.randint(0, K + 1, (B, s_q) if per_query else (B,), generator=gen, dtype=torch.int32)
    flat_len = (lengths if per_query else lengths[:, None].expand(B, s_q)).reshape(-1).contiguous()
    kv = ref.dequantize_mla_cache(cache).to(torch.bfloat16).unsqueeze(1)   # exact: pow2 scales
    fo, fl = dsa_ext.sparse_mla_fwd(q.reshape(B * s_q, H, D_QK).to(device), kv.to(device),
                                    idx.reshape(B * s_q, 1, K).to(device), 0.05, 512,
                                    sink.to(device), flat_len.to(device))
    do, dl = dsa_ext.sparse_mla_decode(q.to(device), cache.to(device), idx.to(device), 0.05, 512,
                                       sink.to(device), lengths.to(device))
    fo, fl = fo.cpu().reshape(B, s_q, H, 512), fl.cpu().reshape(B, s_q, H)
    do, dl = do.cpu(), dl.cpu()
    empty = torch.isneginf(fl)
    assert torch.equal(torch.isneginf(dl), empty)
    # CPU: both ops accumulate in fp32 over the same bf16-exact rows, so they agree closely.
    assert rel_err(do[~empty], fo[~empty]) < (1e-3 if device == "cpu" else 1e-2)
    assert (dl[~empty] - fl[~empty]).abs().max().item() < (1e-4 if device == "cpu" else 1e-2)


@pytest.mark.parametrize("fp8", [True, False], ids=["fp8", "bf16"])
def test_opcheck(device, gen, fp8):
    cache = make_cache(3, 16, fp8, gen).to(device)
    q = randn(2, 2, 16, D_QK, gen=gen, dtype=torch.bfloat16).to(device)
    idx = make_indices(2, 2, 64, 48, gen).to(device)
    sink = randn(16, gen=gen).to(device)
    lengths = torch.tensor([40, 64], dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.dsa.sparse_mla_decode.default, (q, cache, idx, 0.05, 512, sink, lengths))
    torch.library.opcheck(torch.ops.dsa.sparse_mla_decode.default, (q, cache, idx, 0.05))


def _args(device="cpu"):
    g = torch.Generator().manual_seed(0)
    q = randn(2, 1, 16, D_QK, gen=g, dtype=torch.bfloat16).to(device)
    cache = make_cache(2, 16, True, g).to(device)
    idx = make_indices(2, 1, 64, 32, g).to(device)
    return dict(q=q, kv_cache=cache, indices=idx, sm_scale=0.1)


@pytest.mark.parametrize("change,match", [
    (lambda a: a.update(q=a["q"].float()), "q must be bfloat16"),
    (lambda a: a.update(q=a["q"][..., :512].contiguous()), "q.size"),
    (lambda a: a.update(q=a["q"][0]), "q must be 4-D"),
    (lambda a: a.update(q=a["q"].transpose(0, 2)), r"indices.size\(0\)|q must be contiguous"),
    (lambda a: a.update(kv_cache=a["kv_cache"][..., :640].contiguous()), "kv_cache.size"),
    (lambda a: a.update(kv_cache=torch.zeros(2, 16, 1, 576, dtype=torch.float16)), "kv_cache must be uint8 or bfloat16"),
    (lambda a: a.update(kv_cache=torch.zeros(2, 16, 1, 656, dtype=torch.bfloat16)), "kv_cache.size"),
    (lambda a: a.update(kv_cache=torch.zeros(2, 16, 2, 656, dtype=torch.uint8)), "kv_cache.size"),
    (lambda a: a.update(kv_cache=torch.zeros(32, 656, dtype=torch.uint8)), "kv_cache must be 4-D"),
    (lambda a: a.update(indices=a["indices"].long()), "indices must be int32, got int64"),
    (lambda a: a.update(indices=a["indices"][:1]), "indices.size"),
    (lambda a: a.update(indices=a["indices"].expand(2, 3, 64).contiguous()), "indices.size"),
    (lambda a: a.update(indices=a["indices"][0]), "indices must be 3-D"),
    (lambda a: a.update(indices=a["indices"].repeat(1, 1, 2)[..., ::2]), "indices must be contiguous"),
    (lambda a: a.update(d_v=448), "d_v"),
    (lambda a: a.update(attn_sink=torch.zeros(8)), "attn_sink.size"),
    (lambda a: a.update(attn_sink=torch.zeros(16, dtype=torch.float64)), "attn_sink must be float32"),
    (lambda a: a.update(topk_length=torch.zeros(3, dtype=torch.int32)), "topk_length.size"),
    (lambda a: a.update(topk_length=torch.zeros(2, 2, dtype=torch.int32)), "topk_length.size"),
    (lambda a: a.update(topk_length=torch.zeros(2, dtype=torch.int64)), "topk_length must be int32"),
    (lambda a: a.update(topk_length=torch.zeros(2, 1, 1, dtype=torch.int32)), "topk_length must be 1-D"),
    (lambda a: a.update(sm_scale=float("nan")), "sm_scale"),
])
def test_bad_inputs(change, match):
    a = _args()
    change(a)
    with pytest.raises((RuntimeError, ValueError), match=match):
        torch.ops.dsa.sparse_mla_decode(**a)      # the raw op: SPEC's strict contract
    if match not in WRAPPER_ACCEPTS:
        with pytest.raises((RuntimeError, ValueError), match=match):
            dsa_ext.sparse_mla_decode(**a)


# What the typed wrapper converts instead of refusing (tests/test_inputs.py checks the results).
WRAPPER_ACCEPTS = {"indices must be int32, got int64", "indices must be contiguous",
                   "attn_sink must be float32", "topk_length must be int32"}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("fp8", [True, False], ids=["fp8", "bf16"])
@pytest.mark.parametrize("B,s_q,H,K", [(2, 2, 128, 256), (1, 1, 64, 1024), (80, 2, 64, 192)])
def test_cuda_wgmma_kernel(monkeypatch, gen, fp8, B, s_q, H, K):
    """The opt-in wgmma kernel (DSA_MLA_DECODE_WGMMA=1, 64-head blocks on sm_90a) against the
    reference, split and unsplit."""
    monkeypatch.setenv("DSA_MLA_DECODE_WGMMA", "1")
    cache = make_cache(40, 64, fp8, gen)
    q = randn(B, s_q, H, D_QK, gen=gen, dtype=torch.bfloat16)
    idx = make_indices(B, s_q, K, 40 * 64, gen)
    lengths = torch.randint(0, K + 1, (B,), generator=gen, dtype=torch.int32)
    check(q, cache, idx, D_QK ** -0.5, "cuda", sink=randn(H, gen=gen), topk_length=lengths)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_slots_past_2gib_of_cache(gen):
    """slot * 656 beyond 2^31 bytes: offsets must be 64-bit. The same records placed at the end
    of a 2.2 GB cache and at the start of a small one must give identical results."""
    block_size, big_blocks = 64, 52_000                   # 3.3M slots, 2.18 GB
    small = make_cache(4, block_size, True, gen).cuda()
    big = torch.zeros(big_blocks, block_size, 1, 656, dtype=torch.uint8, device="cuda")
    base = (big_blocks - 4) * block_size
    big.view(-1, 656)[base:] = small.view(-1, 656)
    q = randn(2, 2, 64, D_QK, gen=gen, dtype=torch.bfloat16).cuda()
    idx = make_indices(2, 2, 256, 4 * block_size, gen).cuda()
    in_small = (idx >= 0) & (idx < 4 * block_size)
    big_idx = torch.where(in_small, idx + base, idx)
    big_idx[idx == 4 * block_size] = big_blocks * block_size   # just out of range, in both
    out_s, lse_s = dsa_ext.sparse_mla_decode(q, small, idx, D_QK ** -0.5)
    out_b, lse_b = dsa_ext.sparse_mla_decode(q, big, big_idx, D_QK ** -0.5)
    assert torch.equal(out_s, out_b) and torch.equal(lse_s, lse_b)
    del big


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_mixed_devices_rejected():
    a = _args("cuda")
    a["indices"] = a["indices"].cpu()
    with pytest.raises(RuntimeError, match="indices must be on the same device"):
        dsa_ext.sparse_mla_decode(**a)


@pytest.mark.parametrize("B,s_q,H,K", [(2, 2, 16, 64), (1, 1, 64, 1024)], ids=["unsplit", "split"])
def test_nan_score_propagates(device, gen, B, s_q, H, K):
    """A NaN score gives NaN out and lse for its row (the reference's answer), also through the
    split combine and when it is the row's only valid entry."""
    kv = randn(20 * 64, D_QK, gen=gen)
    kv[5, 10] = float("nan")
    cache = kv.to(torch.bfloat16).view(20, 64, 1, D_QK)     # bf16 keeps the NaN in place
    q = randn(B, s_q, H, D_QK, gen=gen, dtype=torch.bfloat16)
    idx = make_indices(B, s_q, K, 20 * 64, gen)
    idx[idx == 5] = 6
    idx[0, 0, K - 3] = 5                   # among valid entries
    if B * s_q > 1:
        idx[-1, -1] = -1
        idx[-1, -1, 0] = 5                 # the only valid entry
    out, lse = dsa_ext.sparse_mla_decode(q.to(device), cache.to(device), idx.to(device), D_QK ** -0.5)
    nan_rows = [(0, 0)] + ([(B - 1, s_q - 1)] if B * s_q > 1 else [])
    for b, s in nan_rows:
        assert out[b, s].float().isnan().all() and lse[b, s].isnan().all()
    ro, rl = ref.sparse_mla_decode(q, cache, idx, D_QK ** -0.5)
    for b, s in nan_rows:
        assert rl[b, s].isnan().all()


@pytest.mark.parametrize("fp8", [True, False], ids=["fp8", "bf16"])
@pytest.mark.parametrize("B,s_q,H,K", [(2, 2, 16, 64), (1, 1, 64, 1024)], ids=["unsplit", "split"])
def test_infinite_sink(device, gen, fp8, B, s_q, H, K):
    """attn_sink = +inf: that head's output is 0, lse unaffected; -inf: no sink (FlashMLA's
    rule), on both caches and on the split path (the sink is applied in the combine)."""
    cache = make_cache(20, 64, fp8, gen)
    q = randn(B, s_q, H, D_QK, gen=gen, dtype=torch.bfloat16)
    idx = make_indices(B, s_q, K, 20 * 64, gen)
    idx[0, 0] = -1                                       # an empty row too
    sink = randn(H, gen=gen)
    sink[0::3], sink[1::3] = float("inf"), float("-inf")
    out, lse = check(q, cache, idx, D_QK ** -0.5, device, sink=sink)
    plain, plain_lse = dsa_ext.sparse_mla_decode(q.to(device), cache.to(device), idx.to(device),
                                                 D_QK ** -0.5)
    assert not out.isnan().any() and not lse.isnan().any()
    assert (out[:, :, torch.isposinf(sink)] == 0).all()
    assert torch.equal(out[:, :, torch.isneginf(sink)], plain.cpu()[:, :, torch.isneginf(sink)])
    assert torch.equal(lse, plain_lse.cpu())


@pytest.mark.parametrize("B,s_q,H,K", [
    (1, 1, 64, 1024),    # few CTAs: K split over many CTAs, partials merged by lse
    (1, 2, 16, 704),     # split with a ragged last split (11 tiles)
    (70, 2, 16, 128),    # enough CTAs to fill the GPU: no split
])
def test_split_and_unsplit_work_plans(device, gen, B, s_q, H, K):
    cache = make_cache(40, 64, True, gen)
    q = randn(B, s_q, H, D_QK, gen=gen, dtype=torch.bfloat16)
    idx = make_indices(B, s_q, K, 40 * 64, gen)
    sink = randn(H, gen=gen)
    lengths = torch.randint(0, K + 1, (B, s_q), generator=gen, dtype=torch.int32)
    lengths.view(-1)[0] = K
    check(q, cache, idx, D_QK ** -0.5, device, sink=sink, topk_length=lengths)


@pytest.mark.parametrize("H", [1, 8, 24, 48, 100])
def test_head_counts_not_multiple_of_the_head_block(device, gen, H):
    cache = make_cache(3, 64, True, gen)
    q = randn(2, 1, H, D_QK, gen=gen, dtype=torch.bfloat16)
    idx = make_indices(2, 1, 192, 192, gen)
    check(q, cache, idx, D_QK ** -0.5, device, sink=randn(H, gen=gen))


def test_compiles_fullgraph(gen):
    cache = make_cache(2, 64, True, gen)
    q = randn(1, 2, 16, D_QK, gen=gen, dtype=torch.bfloat16)
    idx = make_indices(1, 2, 64, 128, gen)
    f = torch.compile(lambda q, c, i: dsa_ext.sparse_mla_decode(q, c, i, 0.1), fullgraph=True,
                      backend="eager")
    out, lse = f(q, cache, idx)
    eo, el = dsa_ext.sparse_mla_decode(q, cache, idx, 0.1)
    assert torch.equal(out, eo) and torch.equal(lse, el)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("B", [1, 128])
def test_cuda_graph_replay_follows_new_indices(gen, B):
    """Captured once, replayed on new indices / lengths / cache contents: no host sync and no
    data-dependent launch decisions."""
    cache = make_cache(64, 64, True, gen).cuda()
    q = randn(B, 2, 64, D_QK, gen=gen, dtype=torch.bfloat16).cuda()
    idx = make_indices(B, 2, 512, 64 * 64, gen).cuda()
    lengths = torch.full((B,), 512, dtype=torch.int32, device="cuda")
    args = (q, cache, idx, D_QK ** -0.5, 512, None, lengths)
    torch.ops.dsa.sparse_mla_decode(*args)   # warm up (kernel attributes, allocator)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = torch.ops.dsa.sparse_mla_decode(*args)
    idx.copy_(make_indices(B, 2, 512, 64 * 64, gen).cuda())
    lengths.copy_(torch.randint(0, 513, (B,), generator=gen, dtype=torch.int32).cuda())
    cache.copy_(make_cache(64, 64, True, gen).cuda())
    graph.replay()
    torch.cuda.synchronize()
    ro, rl = ref.sparse_mla_decode(q.cpu(), cache.cpu(), idx.cpu(), D_QK ** -0.5, 512, None, lengths.cpu())
    finite = torch.isfinite(rl)
    assert torch.equal(torch.isneginf(lse.cpu()), ~finite)
    assert rel_err(out.cpu()[finite], ro[finite]) < 2e-2


# ------------------------------------------------------------------ DeepSeek-V4 / GLM-5 (SPEC 10)
V4_DQK = 512
V4_CACHES = {   # id -> (fp8, pitch_pad): FlashMLA's padded pages, dense pages, an odd padding
    "v4fp8-padded": (True, None), "v4fp8-dense": (True, 0), "v4fp8-pad48": (True, 48),
    "v4bf16": (False, None)}


@pytest.mark.parametrize("cache_id", list(V4_CACHES))
@pytest.mark.parametrize("B,s_q,H,K", [(2, 1, 8, 64), (1, 2, 64, 128), (2, 3, 16, 96), (1, 1, 128, 70)])
def test_v4_matches_reference(device, gen, cache_id, B, s_q, H, K):
    """d_qk 512 (K == V: out is the whole row) over the V4 caches, page pitch from stride(0)."""
    fp8, pad = V4_CACHES[cache_id]
    block_size = 16 if pad == 0 else 64   # dense 584-byte pages: a pitch that is no multiple of 576
    cache = make_cache(5, block_size, fp8, gen, V4_DQK, pad)
    if fp8 and pad != 0:
        assert cache.stride(0) != block_size * 584 and not cache.is_contiguous()
    q = randn(B, s_q, H, V4_DQK, gen=gen, dtype=torch.bfloat16)
    idx = make_indices(B, s_q, K, 5 * block_size, gen)
    check(q, cache, idx, V4_DQK ** -0.5, device, sink=randn(H, gen=gen))


def test_v4_agrees_with_written_and_gathered_cache(device, gen):
    """The V4 cache written by mla_kv_cache_write and read back by mla_kv_cache_gather (the
    cache family's byte layout) is what decode attends to."""
    N, H = 150, 8
    kv = randn(N, V4_DQK, gen=gen)
    cache = ref.new_mla_kv_cache(3, 64, fp8=True, model="v4")
    slots = torch.randperm(192, generator=gen)[:N]
    torch.ops.dsa.mla_kv_cache_write(kv.to(torch.bfloat16), slots, cache)
    q = randn(1, 1, H, V4_DQK, gen=gen, dtype=torch.bfloat16)
    idx = slots[torch.randint(0, N, (1, 1, 80), generator=gen)].to(torch.int32)
    rows = torch.ops.dsa.mla_kv_cache_gather(cache, idx.view(-1)).view(80, V4_DQK).double()
    scores = q[0, 0].double() @ rows.T * 0.05
    expect = torch.softmax(scores, dim=1) @ rows
    out, lse = dsa_ext.sparse_mla_decode(q.to(device), cache.to(device), idx.to(device), 0.05)
    assert rel_err(out.cpu()[0, 0], expect) < (8e-3 if device == "cpu" else 2e-2)
    torch.testing.assert_close(lse.cpu()[0, 0].double(), torch.logsumexp(scores, 1),
                               atol=1e-3 if device == "cpu" else 1e-2, rtol=0)


def _extra_case(gen, d_qk, fp8, B, s_q, H, K, K2, pad=None):
    """A window cache + list and a compressed cache + list of the same format (V4's layout of
    SPEC 10.3), random with invalid slots of every kind in both lists."""
    cache = make_cache(3, 64, fp8, gen, d_qk, pad)
    extra = make_cache(5, 32, fp8, gen, d_qk, pad)
    q = randn(B, s_q, H, d_qk, gen=gen, dtype=torch.bfloat16)
    idx = make_indices(B, s_q, K, 3 * 64, gen)
    extra_idx = make_indices(B, s_q, K2, 5 * 32, gen)
    return q, cache, idx, extra, extra_idx


EXTRA_FORMATS = {"v4fp8": (V4_DQK, True), "v4bf16": (V4_DQK, False), "v32fp8": (D_QK, True),
                 "v32bf16": (D_QK, False)}


@pytest.mark.parametrize("fmt", list(EXTRA_FORMATS))
@pytest.mark.parametrize("B,s_q,H,K,K2", [(2, 1, 8, 128, 192), (1, 2, 64, 64, 512), (2, 6, 16, 32, 40),
                                          (1, 1, 32, 128, 0)])
def test_extra_cache_matches_reference(device, gen, fmt, B, s_q, H, K, K2):
    """One softmax over both lists (sink in the denominator), any s_q (6: chunked prefill),
    K2 = 0, both caches and the lists of both with -1 / out-of-range slots."""
    d_qk, fp8 = EXTRA_FORMATS[fmt]
    q, cache, idx, extra, extra_idx = _extra_case(gen, d_qk, fp8, B, s_q, H, K, K2)
    sink = randn(H, gen=gen)
    check(q, cache, idx, d_qk ** -0.5, device, sink, None, extra, extra_idx)


@pytest.mark.parametrize("per_query", [False, True], ids=["len[B]", "len[B,s_q]"])
def test_extra_lengths_window_only_and_empty_rows(device, gen, per_query):
    """extra_topk_length limits the second list as topk_length the first: rows with only window
    entries (extra length 0), only compressed entries (length 0), neither (empty: lse -inf,
    out 0) and lengths past K2 or negative."""
    B, s_q, H, K, K2 = 2, 2, 8, 64, 96
    q, cache, idx, extra, extra_idx = _extra_case(gen, V4_DQK, True, B, s_q, H, K, K2)
    if per_query:
        lengths = torch.tensor([[0, 64], [10, 0]], dtype=torch.int32)
        extra_lengths = torch.tensor([[0, 0], [500, -4]], dtype=torch.int32)
        empty = [(0, 0), (1, 1)]
    else:
        lengths = torch.tensor([0, 33], dtype=torch.int32)
        extra_lengths = torch.tensor([0, 90], dtype=torch.int32)
        empty = [(0, 0), (0, 1)]
    out, lse = check(q, cache, idx, V4_DQK ** -0.5, device, randn(H, gen=gen), lengths, extra, extra_idx,
                     extra_lengths)
    for b, s in empty:
        assert torch.isneginf(lse[b, s]).all() and (out[b, s] == 0).all()
    # entries past extra_topk_length must not matter, even if they are valid slots
    per_row = extra_lengths if per_query else extra_lengths[:, None].expand(B, s_q)
    idx2 = torch.where(torch.arange(K2) >= per_row[..., None], 0, extra_idx).int()
    assert not torch.equal(idx2, extra_idx)
    cut, _ = dsa_ext.sparse_mla_decode(q.to(device), cache.to(device), idx.to(device), V4_DQK ** -0.5,
                                       512, None, lengths.to(device), extra.to(device), idx2.to(device),
                                       extra_lengths.to(device))
    full, _ = dsa_ext.sparse_mla_decode(q.to(device), cache.to(device), idx.to(device), V4_DQK ** -0.5,
                                        512, None, lengths.to(device), extra.to(device), extra_idx.to(device),
                                        extra_lengths.to(device))
    assert torch.equal(full.cpu(), cut.cpu())


def test_extra_cache_equals_one_joined_cache(device, gen):
    """Two caches in one softmax = one cache holding both, the second list re-based (the same
    rows in a different order: equal up to summation order)."""
    B, s_q, H, K, K2 = 2, 2, 16, 64, 128
    q, cache, idx, extra, extra_idx = _extra_case(gen, V4_DQK, False, B, s_q, H, K, K2)
    sink = randn(H, gen=gen)
    joined = torch.cat([cache.reshape(-1, 1, 1, V4_DQK), extra.reshape(-1, 1, 1, V4_DQK)])
    n1, n2 = cache.shape[0] * cache.shape[1], extra.shape[0] * extra.shape[1]
    rebased = torch.where((extra_idx >= 0) & (extra_idx < n2), extra_idx + n1, torch.full_like(extra_idx, -1))
    one = torch.where((idx >= 0) & (idx < n1), idx, torch.full_like(idx, -1))
    jo, jl = dsa_ext.sparse_mla_decode(q.to(device), joined.to(device), torch.cat([one, rebased], 2).to(device),
                                       0.05, 512, sink.to(device))
    to, tl = dsa_ext.sparse_mla_decode(q.to(device), cache.to(device), idx.to(device), 0.05, 512, sink.to(device),
                                       None, extra.to(device), extra_idx.to(device))
    assert rel_err(to.cpu(), jo.cpu()) < 1e-2
    torch.testing.assert_close(tl.cpu(), jl.cpu(), atol=1e-3, rtol=0)


@pytest.mark.parametrize("fmt", ["v4fp8", "v32fp8"])
def test_extra_infinite_sink(device, gen, fmt):
    """Sinks +inf (head output 0, lse unaffected), -inf (no sink) and finite over two lists."""
    d_qk, fp8 = EXTRA_FORMATS[fmt]
    B, s_q, H, K, K2 = 1, 2, 16, 128, 256
    q, cache, idx, extra, extra_idx = _extra_case(gen, d_qk, fp8, B, s_q, H, K, K2)
    sink = randn(H, gen=gen)
    sink[0::3], sink[1::3] = float("inf"), float("-inf")
    out, lse = check(q, cache, idx, d_qk ** -0.5, device, sink, None, extra, extra_idx)
    plain, plain_lse = dsa_ext.sparse_mla_decode(q.to(device), cache.to(device), idx.to(device), d_qk ** -0.5,
                                                 512, None, None, extra.to(device), extra_idx.to(device))
    assert not out.isnan().any() and (out[:, :, torch.isposinf(sink)] == 0).all()
    assert torch.equal(out[:, :, torch.isneginf(sink)], plain.cpu()[:, :, torch.isneginf(sink)])
    assert torch.equal(lse, plain_lse.cpu())


@pytest.mark.parametrize("fmt", ["v4fp8", "v32bf16"])
def test_extra_opcheck(device, gen, fmt):
    d_qk, fp8 = EXTRA_FORMATS[fmt]
    q, cache, idx, extra, extra_idx = _extra_case(gen, d_qk, fp8, 2, 2, 8, 64, 32)
    sink = randn(8, gen=gen)
    lengths = torch.tensor([[40, 64], [3, 0]], dtype=torch.int32)
    extra_lengths = torch.tensor([20, 32], dtype=torch.int32)
    args = [t.to(device) if isinstance(t, torch.Tensor) else t
            for t in (q, cache, idx, 0.05, 512, sink, lengths, extra, extra_idx, extra_lengths)]
    torch.library.opcheck(torch.ops.dsa.sparse_mla_decode.default, tuple(args))


def test_extra_compiles_fullgraph(gen):
    q, cache, idx, extra, extra_idx = _extra_case(gen, V4_DQK, True, 1, 1, 8, 64, 64)
    f = torch.compile(lambda q, c, i, e, ei: dsa_ext.sparse_mla_decode(q, c, i, 0.1, extra_kv_cache=e,
                                                                       extra_indices=ei),
                      fullgraph=True, backend="eager")
    out, lse = f(q, cache, idx, extra, extra_idx)
    eo, el = dsa_ext.sparse_mla_decode(q, cache, idx, 0.1, extra_kv_cache=extra, extra_indices=extra_idx)
    assert torch.equal(out, eo) and torch.equal(lse, el)


def _v4_args():
    g = torch.Generator().manual_seed(0)
    q, cache, idx, extra, extra_idx = _extra_case(g, V4_DQK, True, 2, 1, 8, 64, 32)
    return dict(q=q, kv_cache=cache, indices=idx, sm_scale=0.1, extra_kv_cache=extra, extra_indices=extra_idx)


@pytest.mark.parametrize("change,match", [
    # d_qk and the cache's model must agree
    (lambda a: a.update(q=torch.zeros(2, 1, 8, 512, dtype=torch.bfloat16), kv_cache=make_cache(
        2, 16, True, torch.Generator().manual_seed(1)), extra_kv_cache=None, extra_indices=None),
     r"q.size\(3\) \(d_qk\) must be 576 for kv_cache with 656-byte"),
    (lambda a: a.update(q=torch.zeros(2, 1, 8, 576, dtype=torch.bfloat16), extra_kv_cache=None,
                        extra_indices=None), r"q.size\(3\) \(d_qk\) must be 512 for kv_cache with 584-byte"),
    (lambda a: a.update(q=torch.zeros(2, 1, 8, 448, dtype=torch.bfloat16)), r"q.size\(3\) \(d_qk\) must be 576"),
    (lambda a: a.update(extra_kv_cache=make_cache(2, 16, True, torch.Generator().manual_seed(1))),
     r"q.size\(3\) \(d_qk\) must be 576 for extra_kv_cache with 656-byte.*got 512"),
    (lambda a: a.update(extra_kv_cache=torch.zeros(2, 16, 1, 512, dtype=torch.bfloat16)),
     "extra_kv_cache must have the format of kv_cache"),
    (lambda a: a.update(extra_kv_cache=torch.zeros(2, 16, 1, 600, dtype=torch.uint8)), r"extra_kv_cache.size\(3\)"),
    (lambda a: a.update(extra_kv_cache=torch.zeros(2, 16, 1, 584, dtype=torch.uint8)[:, :, :, ::2]),
     "extra_kv_cache.size|extra_kv_cache .V4 FP8. must be dense"),
    (lambda a: a.update(extra_kv_cache=None), "extra_indices was given without extra_kv_cache"),
    (lambda a: a.update(extra_indices=None), "extra_kv_cache was given without extra_indices"),
    (lambda a: a.update(extra_kv_cache=None, extra_indices=None,
                        extra_topk_length=torch.zeros(2, dtype=torch.int32)),
     "extra_topk_length was given without extra_kv_cache"),
    (lambda a: a.update(extra_indices=a["extra_indices"][:1]), r"extra_indices.size\(0\)"),
    (lambda a: a.update(extra_indices=a["extra_indices"].expand(2, 3, 32).contiguous()), r"extra_indices.size\(1\)"),
    (lambda a: a.update(extra_indices=a["extra_indices"][0]), "extra_indices must be 3-D"),
    (lambda a: a.update(extra_indices=a["extra_indices"].long()), "extra_indices must be int32, got int64"),
    (lambda a: a.update(extra_topk_length=torch.zeros(3, dtype=torch.int32)), r"extra_topk_length.size\(0\)"),
    (lambda a: a.update(extra_topk_length=torch.zeros(2, 2, dtype=torch.int32)), r"extra_topk_length.size\(1\)"),
    (lambda a: a.update(extra_topk_length=torch.zeros(2, 1, 1, dtype=torch.int32)), "extra_topk_length must be 1-D"),
    (lambda a: a.update(extra_topk_length=torch.zeros(2, dtype=torch.int64)), "extra_topk_length must be int32"),
])
def test_v4_and_extra_bad_inputs(change, match):
    a = _v4_args()
    change(a)
    with pytest.raises((RuntimeError, ValueError), match=match):
        torch.ops.dsa.sparse_mla_decode(**a)
    if match not in ("extra_indices must be int32, got int64", "extra_topk_length must be int32"):
        with pytest.raises((RuntimeError, ValueError), match=match):
            dsa_ext.sparse_mla_decode(**a)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("wgmma", [False, True], ids=["mma", "wgmma"])
@pytest.mark.parametrize("fmt", list(EXTRA_FORMATS))
@pytest.mark.parametrize("B,s_q,H,K,K2", [(2, 1, 8, 128, 512), (1, 1, 64, 128, 512), (3, 2, 128, 64, 1024),
                                          (128, 1, 64, 128, 512), (2, 5, 16, 64, 0), (1, 1, 8, 2048, 0)])
def test_cuda_extra_and_v4(monkeypatch, gen, wgmma, fmt, B, s_q, H, K, K2):
    """CUDA: both models' caches, H = 8..128, two lists (split and unsplit plans), lengths."""
    if wgmma:
        monkeypatch.setenv("DSA_MLA_DECODE_WGMMA", "1")
    d_qk, fp8 = EXTRA_FORMATS[fmt]
    q, cache, idx, extra, extra_idx = _extra_case(gen, d_qk, fp8, B, s_q, H, K, K2)
    lengths = torch.randint(0, K + 1, (B,), generator=gen, dtype=torch.int32)
    extra_lengths = torch.randint(0, K2 + 1, (B, s_q), generator=gen, dtype=torch.int32)
    sink = randn(H, gen=gen)
    sink[0] = float("inf")
    check(q, cache, idx, d_qk ** -0.5, "cuda", sink, lengths, extra, extra_idx, extra_lengths)
