"""MXFP4 indexer keys (SPEC 10.5, issue 23): the quantiser and the paged cache writer byte-exact
against dsa_ext.reference (nibble order, scale rounding, ties, +-0, saturation, NaN), logits over
MXFP4 keys (dense and paged) equal to dequantise-then-score, the V4 causal-rule helpers against
a dense masked reference, bad inputs and opcheck. CPU always; the CUDA cases skip without a GPU
(the kernels also run under the emulator: tests/test_emu_indexer.py)."""
import pytest
import torch

import dsa_ext
from dsa_ext.ops import indexer as ops
from dsa_ext.reference import indexer as ref
from conftest import randn
from test_indexer import (CUDA_FP8_SLACK, OPCHECK_UTILS, _assert_in_range_close, _fp8, _heads,
                          _key_mask, _position_mask)


def _dims(device):
    return (128,) if device == "cuda" else (32, 128)


def _keys(n, d, gen, spread=6):
    """Random keys whose 32-value groups differ in magnitude by up to 2**spread (so every group
    has its own scale byte), with a few exact zeros."""
    x = randn(n, d, gen=gen)
    g = torch.randint(-spread, spread + 1, (n, d // 32), generator=gen).to(torch.float32)
    x = x * torch.pow(2.0, g).repeat_interleave(32, dim=1)
    x[torch.rand(n, d, generator=gen) < 0.02] = 0.0
    return x


def _abs_mx(packed):
    """MXFP4 bytes of |values| (sign bits of both nibbles cleared)."""
    return packed & 0x77


# CPU: fp32 accumulation over D x H terms whose groups differ in scale by up to 2**12, so the
# rounding error follows the sum of |terms| (the logit of |q|, |k|, |w|), not the logit.
CPU_FP32_SLACK = 2.0 ** -18


def _close(out, expected, in_range, clean_logits, magnitude, device):
    """test_indexer._assert_in_range_close, with an fp32-sized slack on the CPU."""
    if device == "cuda":
        return _assert_in_range_close(out, expected, in_range, clean_logits, magnitude)
    _assert_in_range_close(out, expected, in_range, clean_logits, None if magnitude is None else magnitude * 0 + 1e30)
    got, want = out[in_range].double(), expected[in_range].double()
    finite = torch.isfinite(want)
    err = (got[finite] - want[finite]).abs()
    mag = magnitude[in_range][finite].double()
    assert (err <= 2e-5 * want[finite].abs() + 1e-5 + CPU_FP32_SLACK * mag).all(), (
        f"max error {err.max().item():.3g}, worst error / magnitude {(err / mag.clamp_min(1e-30)).max().item():.3g}")


def _mx_magnitude(device, q, k_packed, k_scale, w, ks, ke):
    """The tolerance scale (CUDA_FP8_SLACK on CUDA, CPU_FP32_SLACK here): the logits of |q|,
    |k|, |w|."""
    qa = q.cpu().view(torch.uint8).bitwise_and(0x7F).view(torch.float8_e4m3fn)
    return ref.indexer_logits(qa, _abs_mx(k_packed.cpu()), k_scale.cpu(), w.cpu().abs(), ks.cpu(), ke.cpu())


# ---------------------------------------------------------------------------------------------
# the quantiser

@pytest.mark.parametrize("shape", [(1, 32), (7, 64), (3, 5, 128), (2, 256), (0, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_matches_reference(device, gen, shape, dtype):
    x = (randn(*shape, gen=gen) * torch.pow(2.0, torch.randint(-20, 20, shape[:-1] + (1,), generator=gen).float())).to(dtype)
    packed, scale = dsa_ext.mxfp4_quantize(x.to(device))
    want_p, want_s = ref.mxfp4_quantize(x)
    assert packed.dtype == torch.uint8 and scale.dtype == torch.uint8
    assert packed.shape == (*shape[:-1], shape[-1] // 2) and scale.shape == (*shape[:-1], shape[-1] // 32)
    assert torch.equal(packed.cpu(), want_p) and torch.equal(scale.cpu(), want_s)


def test_quantize_hand_computed_bytes(device):
    """One group at scale 1 (amax = 6) spelling out the rules: ties to the even code, +-0 and
    tiny negatives as +0, NaN as 0, the sign bit, saturation; low nibble = even element."""
    vals = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0,          # ties -> 0, 1, 1, 2, 2, 4, 4; 6
            -0.0, -0.1, float("nan"), -6.0, 0.26, -0.74, 4.9, 5.1,
            0.5, 1.0, 1.5, 2.0, 3.0, 4.0, -0.5, -3.0,
            0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    codes = [0, 2, 2, 4, 4, 6, 6, 7,
             0, 0, 0, 15, 1, 9, 6, 7,
             1, 2, 3, 4, 5, 6, 9, 13,
             0, 0, 0, 0, 0, 0, 0, 0]
    x = torch.tensor([vals, [0.0] * 32, [7.0] + [0.0] * 31, [float("inf"), 1.0] + [0.0] * 30])
    packed, scale = dsa_ext.mxfp4_quantize(x.to(device))
    packed, scale = packed.cpu(), scale.cpu()
    want = torch.tensor(codes[0::2]) | (torch.tensor(codes[1::2]) << 4)
    assert torch.equal(packed[0], want.to(torch.uint8))
    # scale bytes: amax 6 -> 2^0 (127); all zero -> the 2^-126 floor (1); amax 7 -> 2^1 (128);
    # inf -> the 2^127 ceiling (254), where inf saturates to 6 and 1.0 rounds to 0
    assert scale[:, 0].tolist() == [127, 1, 128, 254]
    assert packed[1].eq(0).all() and packed[2, 0] == 6          # 7 / 2 = 3.5 -> 4 (code 6)
    assert packed[3, 0] == 7 and packed[3, 1:].eq(0).all()
    assert torch.equal(packed, ref.mxfp4_quantize(x)[0]) and torch.equal(scale, ref.mxfp4_quantize(x)[1])


def test_quantize_scale_rounding_edges(device):
    """amax exactly 6 * 2^n keeps 2^n; one ulp above moves to 2^(n+1); tiny groups hit the
    2^-126 floor; amax / 6 below a power of two by its fp32 rounding."""
    amax = torch.tensor([6.0, 6.0 * 2**-3, torch.nextafter(torch.tensor(6.0), torch.tensor(7.0)).item(),
                         12.0, 1e-40, 3.0, 6.0 * 2**100])
    x = torch.zeros(len(amax), 32)
    x[:, 3] = -amax
    packed, scale = dsa_ext.mxfp4_quantize(x.to(device))
    assert scale.cpu()[:, 0].tolist() == [127, 124, 128, 128, 1, 126, 227]
    assert torch.equal(scale.cpu(), ref.mxfp4_quantize(x)[1])
    assert torch.equal(packed.cpu(), ref.mxfp4_quantize(x)[0])


def test_dequantize_round_trip_of_grid_values(gen):
    """Values on the E2M1 grid times a power of two come back exactly."""
    grid = torch.tensor(ref._E2M1_GRID)
    codes = torch.randint(0, 8, (16, 128), generator=gen)
    sign = torch.where(torch.rand(16, 128, generator=gen) < 0.5, -1.0, 1.0)
    e = torch.randint(-30, 30, (16, 4), generator=gen).float()
    x = grid[codes] * sign * torch.pow(2.0, e).repeat_interleave(32, 1)
    x[:, ::32] = 6.0 * torch.pow(2.0, e)                          # each group's amax sets 2^e
    packed, scale = dsa_ext.mxfp4_quantize(x)
    assert torch.equal(ref.mxfp4_dequantize(packed, scale).float(), x)


# ---------------------------------------------------------------------------------------------
# the paged cache writer

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D,block_size", [(128, 64), (128, 12), (64, 16)])
def test_cache_write_matches_reference(device, gen, dtype, D, block_size):
    nb = 5
    cache0 = torch.randint(0, 256, (nb, block_size, 1, D // 2 + D // 32), generator=gen, dtype=torch.uint8)
    n = nb * block_size - 3
    k = _keys(n, D, gen).to(dtype)
    slots = torch.randperm(nb * block_size, generator=gen)[:n]
    slots[::7] = -1                                              # skipped
    cache = cache0.clone().to(device)
    dsa_ext.mxfp4_indexer_k_cache_write(k.to(device), slots.to(device).int(), cache)
    want = cache0.clone()
    ref.mxfp4_indexer_k_cache_write(k, slots, want)
    assert torch.equal(cache.cpu(), want)
    # the layout: values of (blk, off) at blk*bs*row + off*D/2, scales at + bs*D/2 + off*D/32
    i = int((slots >= 0).nonzero()[0])
    blk, off = divmod(int(slots[i]), block_size)
    p, s = ref.mxfp4_quantize(k[i:i + 1])
    flat = cache.cpu().reshape(nb, -1)[blk]
    assert torch.equal(flat[off * D // 2:(off + 1) * D // 2], p[0])
    assert torch.equal(flat[block_size * D // 2 + off * D // 32:][:D // 32], s[0])


def test_cache_write_bad_slots_cpu(gen):
    cache = torch.zeros(2, 4, 1, 68, dtype=torch.uint8)
    k = randn(3, 128, gen=gen)
    with pytest.raises(ValueError, match="past the cache"):
        dsa_ext.mxfp4_indexer_k_cache_write(k, torch.tensor([0, 8, 1]), cache)
    with pytest.raises(ValueError, match="more than once"):
        dsa_ext.mxfp4_indexer_k_cache_write(k, torch.tensor([2, 5, 2]), cache)
    assert cache.eq(0).all()


# ---------------------------------------------------------------------------------------------
# logits over MXFP4 keys == dequantise-then-score

def _mx_prefill(T, S, H, D, gen, device, ranges):
    q = _fp8(T, H, D, gen=gen, scale=2.0)
    k_packed, k_scale = ref.mxfp4_quantize(_keys(S, D, gen))
    w = randn(T, H, gen=gen)
    if ranges == "causal":
        ke = torch.randint(0, S + 1, (T,), generator=gen)
        ks = (ke - torch.randint(0, S + 1, (T,), generator=gen)).clamp_min(0)
    elif ranges == "empty":
        ks = torch.randint(0, S + 1, (T,), generator=gen)
        ke = ks.clone()
    else:
        ks, ke = torch.zeros(T, dtype=torch.long), torch.full((T,), S, dtype=torch.long)
    return [t.to(device) for t in (q, k_packed, k_scale, w, ks.int(), ke.int())]


@pytest.mark.parametrize("T,S", [(1, 1), (7, 50), (33, 129), (9, 300)])
@pytest.mark.parametrize("ranges", ["causal", "full", "empty"])
@pytest.mark.parametrize("clean_logits", [True, False])
def test_indexer_logits_mxfp4(device, gen, T, S, ranges, clean_logits):
    for H in _heads(device):
        for D in _dims(device):
            args = _mx_prefill(T, S, H, D, gen, device, ranges)
            out = dsa_ext.indexer_logits(*args, clean_logits=clean_logits)
            cpu = [a.cpu() for a in args]
            expected = ref.indexer_logits(*cpu, clean_logits=True)
            _close(out, expected, _key_mask(args[4], args[5], S), clean_logits,
                   _mx_magnitude(device, *args), device)


def test_indexer_logits_mxfp4_group_scales_matter(device, gen):
    """Negative control: the same codes with one scale per key (the largest group's), or with
    the scales applied after the ReLU, give clearly different logits; the kernel matches the
    dequantise-then-score oracle only."""
    H, D = _heads(device)[0], 128
    q, kp, ksc, w, ks, ke = _mx_prefill(6, 40, H, D, gen, device, "full")
    out = dsa_ext.indexer_logits(q, kp, ksc, w, ks, ke).cpu()
    one_scale = ksc.cpu().amax(-1, keepdim=True).expand_as(ksc.cpu()).contiguous()
    wrong = ref.indexer_logits(q.cpu(), kp.cpu(), one_scale, w.cpu(), ks.cpu(), ke.cpu())
    assert (out.double() - wrong.double()).abs().max() > 1e-2 * wrong.abs().max()
    right = ref.indexer_logits(q.cpu(), kp.cpu(), ksc.cpu(), w.cpu(), ks.cpu(), ke.cpu())
    _close(out, right, _key_mask(ks, ke, 40), True, _mx_magnitude(device, q, kp, ksc, w, ks, ke), device)


def test_indexer_logits_mxfp4_typed_views(device, gen):
    """float4_e2m1fn_x2 / float8_e8m0fnu views of the bytes are accepted by the wrapper."""
    if not hasattr(torch, "float4_e2m1fn_x2") or not hasattr(torch, "float8_e8m0fnu"):
        pytest.skip("torch without float4_e2m1fn_x2 / float8_e8m0fnu")
    H = _heads(device)[0]
    q, kp, ksc, w, ks, ke = _mx_prefill(4, 33, H, 128, gen, device, "causal")
    a = dsa_ext.indexer_logits(q, kp, ksc, w, ks, ke)
    b = dsa_ext.indexer_logits(q, kp.view(torch.float4_e2m1fn_x2), ksc.view(torch.float8_e8m0fnu), w, ks, ke)
    assert torch.equal(a, b)


def _mx_paged(B, N, H, D, block_size, max_context_len, gen, device, per_query_lens, bad_blocks=False):
    max_blocks = (max_context_len + block_size - 1) // block_size
    nb = B * max_blocks + 3
    packed, scale = ref.mxfp4_quantize(_keys(nb * block_size, D, gen).reshape(nb, block_size, D))
    cache = ref.pack_mxfp4_k_cache(packed, scale)
    perm = torch.randperm(nb, generator=gen)
    bt = torch.stack([perm[torch.randint(0, nb, (max_blocks,), generator=gen)] for _ in range(B)]).int()
    if bad_blocks:
        flat = bt.view(-1)
        idx = torch.randperm(flat.numel(), generator=gen)[:max(1, flat.numel() // 3)]
        flat[idx] = torch.tensor([-1, nb, 2**31 - 1, -2**31], dtype=torch.int32).repeat(len(idx))[:len(idx)]
    cl = torch.randint(N, max_context_len + 1, (B,), generator=gen)
    cl[0] = max_context_len
    if per_query_lens:
        context_lens = (cl[:, None] - torch.randint(0, 3, (B, N), generator=gen)).clamp_min(0).int()
    else:
        context_lens = cl.int()
    q = _fp8(B, N, H, D, gen=gen, scale=2.0)
    w = randn(B * N, H, gen=gen)
    return [t.to(device) for t in (q, cache, w, context_lens, bt)]


def _paged_magnitude(device, args, max_context_len):
    q, cache, w, cl, bt = [a.cpu() for a in args]
    packed, scale = ref.unpack_mxfp4_k_cache(cache)
    qa = q.view(torch.uint8).bitwise_and(0x7F).view(torch.float8_e4m3fn)
    return ref.paged_indexer_logits(qa, ref.pack_mxfp4_k_cache(_abs_mx(packed), scale), w.abs(), cl, bt,
                                    max_context_len)


@pytest.mark.parametrize("B,N,max_context_len", [(1, 1, 1), (3, 1, 200), (2, 2, 129), (2, 4, 321)])
@pytest.mark.parametrize("block_size", [64, 16, 12])
@pytest.mark.parametrize("per_query_lens", [False, True])
@pytest.mark.parametrize("clean_logits", [True, False])
def test_paged_indexer_logits_mxfp4(device, gen, B, N, max_context_len, block_size, per_query_lens,
                                    clean_logits):
    H = _heads(device)[-1]
    D = _dims(device)[-1]
    args = _mx_paged(B, N, H, D, block_size, max_context_len, gen, device, per_query_lens, bad_blocks=True)
    out = dsa_ext.paged_indexer_logits(*args, max_context_len, clean_logits=clean_logits)
    expected = ref.paged_indexer_logits(*[a.cpu() for a in args], max_context_len, clean_logits=True)
    _close(out, expected, _position_mask(args[3], N, max_context_len), clean_logits,
           _paged_magnitude(device, args, max_context_len), device)


def test_paged_write_then_score_equals_dense(device, gen):
    """Keys written by mxfp4_indexer_k_cache_write hold mxfp4_quantize's bytes, and scored from
    the cache they give the dense op's logits over those bytes (the two CPU kernels tile their
    GEMMs differently, so equal up to fp32 rounding)."""
    H, D, bs, L = _heads(device)[0], 128, 16, 70
    k = _keys(L, D, gen).to(torch.bfloat16)
    nb = 8
    cache = torch.zeros(nb, bs, 1, 68, dtype=torch.uint8, device=device)
    blocks = torch.randperm(nb, generator=gen)[:5]
    slots = blocks.repeat_interleave(bs)[:L] * bs + torch.arange(L) % bs
    dsa_ext.mxfp4_indexer_k_cache_write(k.to(device), slots.to(device), cache)
    q = _fp8(1, 1, H, D, gen=gen, scale=2.0).to(device)
    w = randn(1, H, gen=gen).to(device)
    paged = dsa_ext.paged_indexer_logits(q, cache, w, torch.tensor([L], dtype=torch.int32, device=device),
                                         blocks[None].int().to(device), L)
    kp, ksc = dsa_ext.mxfp4_quantize(k.to(device))
    full = torch.zeros(1, dtype=torch.int32, device=device), torch.full((1,), L, dtype=torch.int32, device=device)
    dense = dsa_ext.indexer_logits(q[0], kp, ksc, w, *full)
    packed, scale = ref.unpack_mxfp4_k_cache(cache.cpu())
    b, o = slots // bs, slots % bs
    assert torch.equal(packed[b, o], kp.cpu()) and torch.equal(scale[b, o], ksc.cpu())
    mag = ref.indexer_logits(q[0].cpu().view(torch.uint8).bitwise_and(0x7F).view(torch.float8_e4m3fn),
                             _abs_mx(kp.cpu()), ksc.cpu(), w.cpu().abs(), *[f.cpu() for f in full])
    slack = CPU_FP32_SLACK if device == "cpu" else CUDA_FP8_SLACK
    assert ((paged - dense).abs().cpu() <= 2e-5 * dense.abs().cpu() + 1e-5 + 2 * slack * mag).all()


# ---------------------------------------------------------------------------------------------
# the V4 causal rule: j < (t + 1) // ratio, top-min(k, visible)

@pytest.mark.parametrize("ratio", [4, 128])
def test_v4_ranges_match_dense_masked_reference(device, gen, ratio):
    """A ragged batch of sequences (lengths not multiples of the ratio, one shorter than it):
    the helper's ks/ke give each token exactly the entries j < (t + 1) // ratio of its own
    sequence, and the top-k over them is top-min(k, visible) of the dense masked logits."""
    H, D = _heads(device)[0], 128
    lens = [3 * ratio + 1, ratio - 1, 2 * ratio, 5 * ratio + 3]
    n_entries = [n // ratio for n in lens]
    pos = torch.cat([torch.arange(n) for n in lens])
    start = torch.cat([torch.full((n,), sum(n_entries[:i]), dtype=torch.int32) for i, n in enumerate(lens)])
    seq = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])
    ks, ke = ops.v4_indexer_ranges(pos.to(device), start.to(device), ratio)
    assert ks.dtype == torch.int32 and ke.dtype == torch.int32
    T, S = len(pos), sum(n_entries)
    q = _fp8(T, H, D, gen=gen, scale=2.0).to(device)
    kp, ksc = ref.mxfp4_quantize(_keys(S, D, gen))
    w = randn(T, H, gen=gen).to(device)
    out = dsa_ext.indexer_logits(q, kp.to(device), ksc.to(device), w, ks, ke).cpu()
    # dense masked reference: entry j (global) belongs to sequence seq_of[j], local index jl
    seq_of = torch.cat([torch.full((n,), i) for i, n in enumerate(n_entries)])
    local = torch.cat([torch.arange(n) for n in n_entries])
    visible = (seq_of[None] == seq[:, None]) & (local[None] < (pos[:, None] + 1) // ratio)
    full = ref.indexer_logits(q.cpu(), kp, ksc, w.cpu(), torch.zeros(T, dtype=torch.int32),
                              torch.full((T,), S, dtype=torch.int32), clean_logits=True)
    want = full.masked_fill(~visible, float("-inf"))
    assert torch.equal(torch.isneginf(out), ~visible)
    torch.testing.assert_close(out[visible], want[visible], rtol=2e-5 if device == "cpu" else 1e-2,
                               atol=1e-5 if device == "cpu" else 1e-2)
    k_top = 3
    top = dsa_ext.topk_indices(out.to(device), k_top, ks, ke).cpu()
    n_vis = visible.sum(1)
    assert torch.equal((top >= 0).sum(1), n_vis.clamp(max=k_top))          # top-min(k, visible)
    for t in range(T):
        chosen = top[t][top[t] >= 0]
        assert visible[t, chosen.long()].all()
        if n_vis[t] > 0:   # the chosen logits are the largest visible ones
            best = want[t][visible[t]].topk(min(k_top, int(n_vis[t]))).values
            assert torch.equal(out[t, chosen.long()].sort().values, out[t][visible[t]].topk(len(best)).values.sort().values)


def test_indexer_topk_over_mxfp4_keys(device, gen):
    """indexer_topk (row chunks under a small workspace) takes MXFP4 keys and V4 ranges: the
    same indices as topk_indices over the full logits, top-min(k, visible) per row."""
    H = _heads(device)[0]
    T, S = 37, 50
    q = _fp8(T, H, 128, gen=gen, scale=2.0).to(device)
    kp, ksc = [t.to(device) for t in ref.mxfp4_quantize(_keys(S, 128, gen))]
    w = randn(T, H, gen=gen).to(device)
    ks, ke = ops.v4_indexer_ranges(torch.arange(T, device=device) * 5 + 2, torch.zeros(T, dtype=torch.int32, device=device))
    got = dsa_ext.indexer_topk(q, kp, ksc, w, ks, ke, 8, sorted=True, max_workspace_bytes=7 * S * 4)
    want = dsa_ext.topk_indices(dsa_ext.indexer_logits(q, kp, ksc, w, ks, ke), 8, ks, ke, sorted=True)
    assert torch.equal(got, want)
    assert torch.equal((got >= 0).sum(1).cpu(), (ke - ks).cpu().long().clamp(0, 8))


def test_v4_context_lens_for_paged_decode(device, gen):
    """Decode: queries at positions t see (t + 1) // 4 cached entries (per-query lengths)."""
    H, D, bs = _heads(device)[0], 128, 16
    positions = torch.tensor([[0, 1], [3, 4], [38, 39], [98, 99]])
    lens = ops.v4_indexer_context_lens(positions.to(device))
    assert lens.dtype == torch.int32 and lens.cpu().tolist() == [[0, 0], [1, 1], [9, 10], [24, 25]]
    args = _mx_paged(4, 2, H, D, bs, 25, gen, device, True)
    args[3] = lens
    out = dsa_ext.paged_indexer_logits(*args, 25)
    expected = ref.paged_indexer_logits(*[a.cpu() for a in args], 25)
    _close(out, expected, _position_mask(lens, 2, 25), True, _paged_magnitude(device, args, 25), device)
    assert torch.isneginf(out[:2]).all()
    assert torch.equal(ref.v4_indexer_lengths(positions), lens.cpu().long())


def test_v4_helpers_bad_input():
    with pytest.raises(ValueError, match="ratio"):
        ops.v4_indexer_context_lens(torch.zeros(1, 1, dtype=torch.long), ratio=0)
    with pytest.raises(ValueError, match="positions must be"):
        ops.v4_indexer_context_lens(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="entry_start"):
        ops.v4_indexer_ranges(torch.zeros(3, dtype=torch.long), torch.zeros(2, dtype=torch.int32))


# ---------------------------------------------------------------------------------------------
# bad inputs

def test_bad_inputs(device, gen):
    H = _heads(device)[0]
    q, kp, ksc, w, ks, ke = _mx_prefill(3, 20, H, 128, gen, device, "causal")
    cases = [
        (lambda: dsa_ext.mxfp4_quantize(torch.zeros(4, 48, device=device)), "multiple of 32"),
        (lambda: dsa_ext.mxfp4_quantize(torch.zeros(4, 64, dtype=torch.float16, device=device)), "x must be"),
        (lambda: dsa_ext.mxfp4_quantize(torch.zeros((), device=device)), "at least 1 dimension"),
        (lambda: torch.ops.dsa.indexer_logits(q, kp[:, :32].contiguous(), ksc, w, ks, ke, True), "D / 2 packed bytes"),
        (lambda: torch.ops.dsa.indexer_logits(q, kp, ksc[:, :2].contiguous(), w, ks, ke, True), "D / 32 scale bytes"),
        (lambda: torch.ops.dsa.indexer_logits(q, kp.float(), ksc, w, ks, ke, True), "k must be uint8"),
        (lambda: torch.ops.dsa.indexer_logits(q, kp, ksc[:, 0].contiguous(), w, ks, ke, True), "k_scale must be 2-D"),
        (lambda: torch.ops.dsa.indexer_logits(q[:, :, :48].contiguous(), kp[:, :24].contiguous(),
                                              ksc[:, :1].contiguous(), w, ks, ke, True), "multiple of 32"),
    ]
    qp, cache, wp, cl, bt = _mx_paged(2, 1, H, 128, 16, 40, gen, device, False)
    cases += [
        (lambda: dsa_ext.paged_indexer_logits(qp, cache[..., :67].contiguous(), wp, cl, bt, 40), "D/2 \\+ D/32 = 68"),
        (lambda: dsa_ext.mxfp4_indexer_k_cache_write(randn(2, 128, gen=gen).to(device), torch.tensor([0, 1], device=device),
                                                     torch.zeros(2, 16, 1, 132, dtype=torch.uint8, device=device)), "kv_cache.size\\(3\\)"),
        (lambda: dsa_ext.mxfp4_indexer_k_cache_write(randn(2, 96, gen=gen).to(device), torch.tensor([0, 1], device=device),
                                                     torch.zeros(2, 16, 1, 51, dtype=torch.uint8, device=device)), None),
        (lambda: dsa_ext.mxfp4_indexer_k_cache_write(randn(2, 100, gen=gen).to(device), torch.tensor([0, 1], device=device),
                                                     torch.zeros(2, 16, 1, 53, dtype=torch.uint8, device=device)), "multiple of 32"),
        (lambda: dsa_ext.mxfp4_indexer_k_cache_write(randn(2, 128, gen=gen).to(device), torch.tensor([0.0, 1.0], device=device),
                                                     torch.zeros(2, 16, 1, 68, dtype=torch.uint8, device=device)), "slot_mapping must be"),
        (lambda: dsa_ext.mxfp4_indexer_k_cache_write(randn(2, 128, gen=gen).to(device), torch.tensor([0, 1], device=device),
                                                     torch.zeros(2, 16, 1, 68, dtype=torch.uint8, device=device)[:, ::2]), "contiguous"),
    ]
    for fn, msg in cases:
        if msg is None:   # D = 96 is valid: 48 + 3 bytes a key
            fn()
            continue
        with pytest.raises((RuntimeError, ValueError), match=msg):
            fn()


def test_fp8_cache_error_names_both_layouts(gen):
    """A cache of neither width names both forms."""
    qp, cache, wp, cl, bt = _mx_paged(1, 1, 4, 128, 16, 20, gen, "cpu", False)
    with pytest.raises(ValueError, match=r"D \+ 4 = 132.*or D/2 \+ D/32 = 68"):
        dsa_ext.paged_indexer_logits(qp, torch.zeros(4, 16, 1, 100, dtype=torch.uint8), wp, cl, bt, 20)


# ---------------------------------------------------------------------------------------------
# opcheck, compile

def test_opcheck(device, gen):
    x = randn(3, 4, 64, gen=gen).to(device)
    torch.library.opcheck(torch.ops.dsa.mxfp4_quantize.default, (x,))
    torch.library.opcheck(torch.ops.dsa.mxfp4_quantize.default, (x.bfloat16(),))
    cache = torch.zeros(3, 16, 1, 68, dtype=torch.uint8, device=device)
    torch.library.opcheck(torch.ops.dsa.mxfp4_indexer_k_cache_write.default,
                          (randn(5, 128, gen=gen).to(device), torch.tensor([0, 17, -1, 40, 3], device=device), cache))
    H = _heads(device)[0]
    args = _mx_prefill(5, 40, H, 128, gen, device, "causal")
    torch.library.opcheck(torch.ops.dsa.indexer_logits.default, (*args, True), test_utils=OPCHECK_UTILS)
    paged = _mx_paged(2, 2, H, 128, 16, 70, gen, device, True)
    torch.library.opcheck(torch.ops.dsa.paged_indexer_logits.default, (*paged, 70, True), test_utils=OPCHECK_UTILS)


def test_compile_fullgraph(device, gen):
    x = randn(6, 128, gen=gen).to(device)
    fn = torch.compile(dsa_ext.mxfp4_quantize, fullgraph=True, backend="eager")
    a, b = fn(x), dsa_ext.mxfp4_quantize(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
