"""Tests of the indexer op family: indexer_logits and paged_indexer_logits against the
float64 oracle in dsa_ext.reference.indexer, opcheck, and bad inputs."""
import pytest
import torch

import dsa_ext
from dsa_ext.reference import indexer as ref
from conftest import randn

FP8 = torch.float8_e4m3fn


def _fp8(*shape, gen, scale=1.0):
    return randn(*shape, gen=gen, scale=scale).to(FP8)


def _heads(device, cpu_heads=(4, 8)):
    """The CUDA kernels serve H in {32, 64}; the CPU kernels any H (small H keeps tests fast)."""
    return (32, 64) if device == "cuda" else cpu_heads


def _dims(device):
    return (128,) if device == "cuda" else (16, 128)


# Hopper's FP8 tensor cores (the default sm_90a wgmma path) do not accumulate in full fp32:
# products are aligned and summed with about 14 significant bits (DeepSeek-V3 report, section
# 3.3.2; the reason DeepGEMM promotes partial sums to CUDA cores). That error scales with the
# sum of |terms|, not with the (often cancelling) logit, so on CUDA an entry may also differ by
# CUDA_FP8_SLACK times the logit of |q|, |k|, |weights| (`_magnitude`). Layout, index, scale or
# ReLU bugs give errors of the size of the logits themselves, far above it. The factor is not
# calibrated on hardware yet: a failure prints the worst error / magnitude ratio seen.
CUDA_FP8_SLACK = 2.0 ** -12


def _fp8_abs(x):
    return x.view(torch.uint8).bitwise_and(0x7F).view(FP8)


def _magnitude(device, args, max_context_len=None):
    """None on CPU (fp32 accumulation: the plain tolerance holds). On CUDA the reference logits
    of |q|, |k|, |weights| with the same ranges: indexer_logits args, or paged_indexer_logits
    args when max_context_len is given."""
    if device != "cuda":
        return None
    a = [x.cpu() for x in args]
    if max_context_len is None:
        q, k, k_scale, w, ks, ke = a
        return ref.indexer_logits(_fp8_abs(q), _fp8_abs(k), k_scale, w.abs(), ks, ke)
    q, cache, w, context_lens, block_table = a
    k_fp8, k_scale = ref.unpack_indexer_k_cache(cache)
    cache = ref.pack_indexer_k_cache(_fp8_abs(k_fp8), k_scale)
    return ref.paged_indexer_logits(_fp8_abs(q), cache, w.abs(), context_lens, block_table,
                                    max_context_len)


def _assert_in_range_close(out, expected, in_range, clean_logits, magnitude=None):
    """Compare entries in range; out of range must be -inf when clean_logits, else unspecified.
    magnitude (CUDA, see CUDA_FP8_SLACK) widens the tolerance of each entry."""
    assert out.shape == expected.shape and out.dtype == torch.float32
    out, expected, in_range = out.cpu(), expected.cpu(), in_range.cpu()
    got, want = out[in_range], expected[in_range]
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))
    if clean_logits:
        assert torch.isneginf(out[~in_range]).all(), "clean_logits: -inf outside each row's range"
    finite = torch.isfinite(want)
    if magnitude is None:
        torch.testing.assert_close(got[finite], want[finite], rtol=2e-5, atol=1e-5)
        return
    got, want = got[finite].double(), want[finite].double()
    mag = magnitude.cpu()[in_range][finite].double()
    err = (got - want).abs()
    assert torch.isfinite(got).all()
    assert (err <= 2e-5 * want.abs() + 1e-5 + CUDA_FP8_SLACK * mag).all(), (
        f"max error {err.max().item():.3g}, worst error / magnitude "
        f"{(err / mag.clamp_min(1e-30)).max().item():.3g} (slack {CUDA_FP8_SLACK:.3g})")


def _prefill_inputs(T, S, H, D, gen, device, ranges):
    q = _fp8(T, H, D, gen=gen, scale=2.0)
    k = _fp8(S, D, gen=gen, scale=2.0)
    k_scale = torch.rand(S, generator=gen) * 0.5 + 0.01
    weights = randn(T, H, gen=gen)
    if ranges == "causal":         # ragged causal rows ending at random places, some empty
        ke = torch.randint(0, S + 1, (T,), generator=gen)
        ks = (ke - torch.randint(0, S + 1, (T,), generator=gen)).clamp_min(0)
    elif ranges == "empty":
        ks = torch.randint(0, S + 1, (T,), generator=gen)
        ke = ks.clone()
    else:                          # full rows
        ks = torch.zeros(T, dtype=torch.long)
        ke = torch.full((T,), S, dtype=torch.long)
    ks, ke = ks.to(torch.int32), ke.to(torch.int32)
    return [x.to(device) for x in (q, k, k_scale, weights, ks, ke)]


def _key_mask(ks, ke, S):
    cols = torch.arange(S)
    return (cols[None] >= ks.cpu().long()[:, None].clamp(0, S)) & (cols[None] < ke.cpu().long()[:, None].clamp(0, S))


@pytest.mark.parametrize("T,S", [(1, 1), (7, 50), (33, 129), (64, 300)])
@pytest.mark.parametrize("ranges", ["causal", "full", "empty"])
@pytest.mark.parametrize("clean_logits", [True, False])
def test_indexer_logits_matches_reference(device, gen, T, S, ranges, clean_logits):
    for H in _heads(device):
        for D in _dims(device):
            args = _prefill_inputs(T, S, H, D, gen, device, ranges)
            out = dsa_ext.indexer_logits(*args, clean_logits=clean_logits)
            expected = ref.indexer_logits(*[a.cpu() for a in args], clean_logits=True)
            _assert_in_range_close(out, expected, _key_mask(args[4], args[5], S), clean_logits,
                                   _magnitude(device, args))


def test_indexer_logits_relu_and_weights_matter(device, gen):
    """Negative dots must be cut by the ReLU *per head*, and weights may be negative: compare
    against the sum without ReLU to prove the test can tell the difference."""
    H, D = _heads(device)[0], _dims(device)[-1]
    q, k, k_scale, w, ks, ke = _prefill_inputs(9, 70, H, D, gen, device, "full")
    out = dsa_ext.indexer_logits(q, k, k_scale, w, ks, ke).cpu()
    no_relu = torch.einsum("thd,sd,th->ts", q.cpu().double(), k.cpu().double(), w.cpu().double()) * k_scale.cpu().double()
    assert (out.double() - no_relu).abs().max() > 1e-2
    expected = ref.indexer_logits(q.cpu(), k.cpu(), k_scale.cpu(), w.cpu(), ks.cpu(), ke.cpu())
    _assert_in_range_close(out, expected, _key_mask(ks, ke, 70), True,
                           _magnitude(device, [q, k, k_scale, w, ks, ke]))


def test_indexer_logits_out_of_range_bounds_are_clamped(device, gen):
    """ks > ke, ke > S and negative ks are clamped to [0, S] (never read out of bounds)."""
    H, D = _heads(device)[0], _dims(device)[-1]
    S = 45
    q, k, k_scale, w, _, _ = _prefill_inputs(6, S, H, D, gen, device, "full")
    ks = torch.tensor([-5, 10, 30, 0, 44, 2**31 - 1], dtype=torch.int32, device=device)
    ke = torch.tensor([20, 5, 10**6, -3, 2**31 - 1, 2**31 - 1], dtype=torch.int32, device=device)
    out = dsa_ext.indexer_logits(q, k, k_scale, w, ks, ke)
    expected = ref.indexer_logits(q.cpu(), k.cpu(), k_scale.cpu(), w.cpu(), ks.cpu(), ke.cpu())
    _assert_in_range_close(out, expected, _key_mask(ks, ke, S), True,
                           _magnitude(device, [q, k, k_scale, w, ks, ke]))
    assert torch.isneginf(out[1]).all() and torch.isneginf(out[3]).all() and torch.isneginf(out[5]).all()
    assert torch.isfinite(out[2, 30:]).all() and torch.isfinite(out[4, 44:]).all()


def test_indexer_logits_zero_sizes(device, gen):
    H, D = _heads(device)[0], _dims(device)[-1]
    for T, S in [(0, 10), (5, 0)]:
        q, k, k_scale, w, ks, ke = _prefill_inputs(T, S, H, D, gen, device, "full")
        assert dsa_ext.indexer_logits(q, k, k_scale, w, ks, ke).shape == (T, S)


# ---------------------------------------------------------------------------------------------
# paged

def _paged_inputs(B, N, H, D, block_size, max_context_len, gen, device, per_query_lens,
                  num_blocks=None, bad_blocks=False):
    max_blocks = (max_context_len + block_size - 1) // block_size
    num_blocks = num_blocks or B * max_blocks + 3
    k_fp8 = _fp8(num_blocks, block_size, D, gen=gen, scale=2.0)
    k_scale = torch.rand(num_blocks, block_size, generator=gen) * 0.5 + 0.01
    kv_cache = ref.pack_indexer_k_cache(k_fp8, k_scale)
    perm = torch.randperm(num_blocks, generator=gen)
    block_table = torch.stack([perm[torch.randint(0, num_blocks, (max_blocks,), generator=gen)] for _ in range(B)]).to(torch.int32)
    if bad_blocks:   # entries a kernel must never dereference
        block_table.view(-1)[torch.randint(0, block_table.numel(), (max(1, block_table.numel() // 3),), generator=gen)] = \
            torch.tensor([-1, num_blocks, 2**31 - 1, -2**31], dtype=torch.int32).repeat(block_table.numel())[: max(1, block_table.numel() // 3)]
    cl = torch.randint(N, max_context_len + 1, (B,), generator=gen)
    cl[0] = max_context_len
    if per_query_lens:
        context_lens = (cl[:, None] - torch.randint(0, 3, (B, N), generator=gen)).clamp_min(0).to(torch.int32)
    else:
        context_lens = cl.to(torch.int32)
    q = _fp8(B, N, H, D, gen=gen, scale=2.0)
    weights = randn(B * N, H, gen=gen)
    return [x.to(device) for x in (q, kv_cache, weights, context_lens, block_table)]


def _position_mask(context_lens, N, max_context_len):
    lens = ref.visible_lengths(context_lens.cpu(), N, max_context_len).reshape(-1)
    return torch.arange(max_context_len)[None] < lens[:, None]


@pytest.mark.parametrize("B,N,max_context_len", [(1, 1, 1), (3, 1, 200), (2, 2, 129), (4, 3, 64), (2, 4, 321)])
@pytest.mark.parametrize("block_size", [64, 16, 32])
@pytest.mark.parametrize("per_query_lens", [False, True])
@pytest.mark.parametrize("clean_logits", [True, False])
def test_paged_indexer_logits_matches_reference(device, gen, B, N, max_context_len, block_size,
                                                per_query_lens, clean_logits):
    H = _heads(device)[-1]
    D = _dims(device)[-1]
    args = _paged_inputs(B, N, H, D, block_size, max_context_len, gen, device, per_query_lens)
    out = dsa_ext.paged_indexer_logits(*args, max_context_len, clean_logits=clean_logits)
    expected = ref.paged_indexer_logits(*[a.cpu() for a in args], max_context_len, clean_logits=True)
    _assert_in_range_close(out, expected, _position_mask(args[3], N, max_context_len), clean_logits,
                           _magnitude(device, args, max_context_len))


@pytest.mark.parametrize("H,D", [(4, 16), (64, 128), (32, 128)])
def test_paged_indexer_logits_heads(device, gen, H, D):
    if device == "cuda" and (H not in (32, 64) or D != 128):
        pytest.skip("CUDA serves H in {32, 64}, D = 128")
    args = _paged_inputs(2, 2, H, D, 64, 300, gen, device, False)
    out = dsa_ext.paged_indexer_logits(*args, 300)
    expected = ref.paged_indexer_logits(*[a.cpu() for a in args], 300)
    _assert_in_range_close(out, expected, _position_mask(args[3], 2, 300), True,
                           _magnitude(device, args, 300))


def test_paged_indexer_logits_bad_block_table_entries_are_skipped(device, gen):
    """Out-of-range block-table entries are never read; their positions score -inf."""
    H, D = _heads(device)[0], _dims(device)[-1]
    args = _paged_inputs(3, 2, H, D, 16, 150, gen, device, False, bad_blocks=True)
    out = dsa_ext.paged_indexer_logits(*args, 150)
    expected = ref.paged_indexer_logits(*[a.cpu() for a in args], 150)
    mask = _position_mask(args[3], 2, 150)
    assert torch.isneginf(expected[mask]).any() and torch.isfinite(expected[mask]).any()
    _assert_in_range_close(out, expected, mask, True, _magnitude(device, args, 150))


def test_paged_indexer_logits_lengths_beyond_table_and_output(device, gen):
    """context_lens larger than max_context_len or than the block table covers, and negative
    or zero lengths, are clamped / scored -inf, never read out of bounds."""
    H, D = _heads(device)[0], _dims(device)[-1]
    q, kv_cache, w, _, block_table = _paged_inputs(4, 2, H, D, 32, 100, gen, device, False)
    block_table = block_table[:, :2]             # covers 64 positions only (a strided view)
    context_lens = torch.tensor([1000, -5, 0, 70], dtype=torch.int32, device=device)
    out = dsa_ext.paged_indexer_logits(q, kv_cache, w, context_lens, block_table, 100)
    expected = ref.paged_indexer_logits(q.cpu(), kv_cache.cpu(), w.cpu(), context_lens.cpu(), block_table.cpu(), 100)
    mask = _position_mask(context_lens, 2, 100)
    _assert_in_range_close(out, expected, mask, True,
                           _magnitude(device, [q, kv_cache, w, context_lens, block_table], 100))
    assert torch.isneginf(out[0, 64:]).all() and torch.isfinite(out[0, :64]).all()
    assert torch.isneginf(out[2:6]).all()


def test_paged_indexer_logits_from_cache_layout(device, gen):
    """The byte layout is SPEC section 2's: writing one token's bytes by hand at the documented
    offsets must be what the op reads."""
    D, bs, H = _dims(device)[-1], 16, _heads(device)[0]
    nb = 3
    cache = torch.zeros(nb, bs, 1, D + 4, dtype=torch.uint8)
    flat = cache.view(-1)
    blk, off = 2, 5
    value = _fp8(D, gen=gen)
    flat[blk * bs * (D + 4) + off * D: blk * bs * (D + 4) + off * D + D] = value.view(torch.uint8)
    flat[blk * bs * (D + 4) + bs * D + 4 * off: blk * bs * (D + 4) + bs * D + 4 * off + 4] = torch.tensor([0.75]).view(torch.uint8)
    q = _fp8(1, 1, H, D, gen=gen)
    w = randn(1, H, gen=gen)
    block_table = torch.tensor([[0, 2]], dtype=torch.int32)
    context_lens = torch.tensor([bs + off + 1], dtype=torch.int32)
    out = dsa_ext.paged_indexer_logits(q.to(device), cache.to(device), w.to(device), context_lens.to(device), block_table.to(device), bs + off + 1).cpu()
    dots = (q[0, 0].double() @ value.double()).clamp_min(0)
    # CUDA: FP8 tensor-core accumulation, see CUDA_FP8_SLACK
    slack = 0.0
    if device == "cuda":
        slack = CUDA_FP8_SLACK * 0.75 * (w[0].double().abs() * (q[0, 0].double().abs() @ value.double().abs())).sum().item()
    torch.testing.assert_close(out[0, bs + off].double(), 0.75 * (w[0].double() * dots).sum(), rtol=1e-5, atol=1e-6 + slack)
    assert (out[0, :bs + off] == 0).all()       # zero bytes decode to 0 values and 0 scale
    k_fp8, k_scale = ref.unpack_indexer_k_cache(cache)
    assert torch.equal(ref.pack_indexer_k_cache(k_fp8, k_scale), cache)


# ---------------------------------------------------------------------------------------------
# opcheck, compile

# torch's SchemaCheckMode (opcheck's "test_schema") compares inputs before/after with
# torch.allclose, which is not implemented for float8_e4m3fn; every other opcheck test runs.
OPCHECK_UTILS = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def test_opcheck(device, gen):
    H, D = _heads(device)[0], _dims(device)[-1]
    args = _prefill_inputs(5, 40, H, D, gen, device, "causal")
    torch.library.opcheck(torch.ops.dsa.indexer_logits.default, (*args, True), test_utils=OPCHECK_UTILS)
    paged = _paged_inputs(2, 2, H, D, 16, 70, gen, device, False)
    torch.library.opcheck(torch.ops.dsa.paged_indexer_logits.default, (*paged, 70, True), test_utils=OPCHECK_UTILS)
    paged = _paged_inputs(2, 2, H, D, 16, 70, gen, device, True)
    torch.library.opcheck(torch.ops.dsa.paged_indexer_logits.default, (*paged, 70, True), test_utils=OPCHECK_UTILS)


def test_compile_fullgraph(device, gen):
    H, D = _heads(device)[0], _dims(device)[-1]
    args = _prefill_inputs(5, 40, H, D, gen, device, "causal")
    fn = torch.compile(dsa_ext.indexer_logits, fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(*args), dsa_ext.indexer_logits(*args))


# ---------------------------------------------------------------------------------------------
# bad inputs

def _bad_prefill_cases(device, gen):
    H, D = _heads(device)[0], _dims(device)[-1]
    q, k, s, w, ks, ke = _prefill_inputs(4, 20, H, D, gen, device, "causal")
    return [
        ((q.float(), k, s, w, ks, ke), "q must be float8_e4m3fn"),
        ((q, k.to(torch.bfloat16), s, w, ks, ke), "k must be float8_e4m3fn"),
        ((q, k, s.double(), w, ks, ke), "k_scale must be float32"),
        ((q, k, s, w.half(), ks, ke), "weights must be float32"),
        ((q, k, s, w, ks.long(), ke), "ks must be int32"),
        ((q, k, s, w, ks, ke.long()), "ke must be int32"),
        ((q[0], k, s, w, ks, ke), "q must be 3-D"),
        ((q, k[None], s, w, ks, ke), "k must be 2-D"),
        ((q, k[:, :D // 2].contiguous(), s, w, ks, ke), r"k.size\(1\) must be"),
        ((q, k, s[:-1], w, ks, ke), r"k_scale.size\(0\)"),
        ((q, k, s, w[:, :1], ks, ke), r"weights.size\(1\)"),
        ((q, k, s, w[:-1], ks, ke), r"weights.size\(0\)"),
        ((q, k, s, w, ks[:-1], ke), r"ks.size\(0\)"),
        ((q, k, s, w, ks, ke[:2]), r"ke.size\(0\)"),
        ((q, k.t().contiguous().t(), s, w, ks, ke), "k must be contiguous"),
    ] + ([((q, k, s, w, ks, ke.cpu()), "ke must be on the same device")] if device == "cuda" else [])


def test_indexer_logits_bad_inputs(device, gen):
    for args, match in _bad_prefill_cases(device, gen):
        with pytest.raises((RuntimeError, ValueError), match=match):
            torch.ops.dsa.indexer_logits(*args)           # the raw op: SPEC's strict contract
        if not any(a in match for a in WRAPPER_ACCEPTS):
            with pytest.raises((RuntimeError, ValueError), match=match):
                dsa_ext.indexer_logits(*args)


# What the typed wrappers convert instead of refusing (uint8 bytes <-> float8, int64 -> int32,
# [S, 1] scales, copies of non-contiguous operands); tests/test_inputs.py checks the results.
WRAPPER_ACCEPTS = ("must be int32", "must be contiguous", "kv_cache must be uint8",
                   "q must be float8_e4m3fn, got uint8", "k must be float8_e4m3fn, got uint8",
                   "k_scale must be 1-D")


def _bad_paged_cases(device, gen):
    H, D = _heads(device)[0], _dims(device)[-1]
    q, c, w, cl, bt = _paged_inputs(2, 2, H, D, 16, 40, gen, device, False)
    return [
        ((q.float(), c, w, cl, bt, 40), "q must be float8_e4m3fn"),
        ((q, c.view(FP8), w, cl, bt, 40), "kv_cache must be uint8"),
        ((q, c, w.double(), cl, bt, 40), "weights must be float32"),
        ((q, c, w, cl.long(), bt, 40), "context_lens must be int32"),
        ((q, c, w, cl, bt.long(), 40), "block_table must be int32"),
        ((q[0], c, w, cl, bt, 40), "q must be 4-D"),
        ((q, c[:, :, 0], w, cl, bt, 40), "kv_cache must be 4-D"),
        ((q, c[..., :-4].contiguous(), w, cl, bt, 40), r"kv_cache.size\(3\)"),
        ((q, c, w[:-1], cl, bt, 40), r"weights.size\(0\)"),
        ((q, c, w[:, 1:], cl, bt, 40), r"weights.size\(1\)"),
        ((q, c, w, cl[:1], bt, 40), r"context_lens.size\(0\)"),
        ((q, c, w, cl[:, None].expand(2, 3).contiguous(), bt, 40), r"context_lens.size\(1\)"),
        ((q, c, w, cl[:, None, None], bt, 40), "context_lens must be 1-D"),
        ((q, c, w, cl, bt[:1], 40), r"block_table.size\(0\)"),
        ((q, c, w, cl, bt.t().contiguous().t(), 40), "block_table rows must be contiguous"),
        ((q, c, w, cl, bt, -1), "max_context_len must be >= 0"),
    ] + ([((q, c, w, cl, bt.cpu(), 40), "block_table must be on the same device")] if device == "cuda" else [])


def test_paged_indexer_logits_bad_inputs(device, gen):
    for args, match in _bad_paged_cases(device, gen):
        with pytest.raises((RuntimeError, ValueError), match=match):
            torch.ops.dsa.paged_indexer_logits(*args)     # the raw op: SPEC's strict contract
        if not any(a in match for a in WRAPPER_ACCEPTS):
            with pytest.raises((RuntimeError, ValueError), match=match):
                dsa_ext.paged_indexer_logits(*args)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_rejects_unsupported_shapes(gen):
    args = _prefill_inputs(4, 20, 8, 128, gen, "cuda", "causal")
    with pytest.raises((RuntimeError, ValueError), match="q"):
        dsa_ext.indexer_logits(*args)
    args = _prefill_inputs(4, 20, 64, 64, gen, "cuda", "causal")
    with pytest.raises((RuntimeError, ValueError), match="q"):
        dsa_ext.indexer_logits(*args)
    paged = _paged_inputs(2, 1, 16, 128, 16, 40, gen, "cuda", False)
    with pytest.raises((RuntimeError, ValueError), match="q"):
        dsa_ext.paged_indexer_logits(*paged, 40)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("mma", ["sync", "bf16", "default"])
def test_cuda_mma_paths(gen, monkeypatch, mma):
    """Every tensor-core path (sm_90a wgmma by default, e4m3 mma.sync with DSA_INDEXER_MMA=sync,
    the sm_80 kernel's bf16 mma.sync after dequantisation with DSA_INDEXER_MMA=bf16) against the
    oracle, prefill and paged, long enough to run many pipeline stages."""
    if mma in ("sync", "bf16"):
        monkeypatch.setenv("DSA_INDEXER_MMA", mma)
    else:
        monkeypatch.delenv("DSA_INDEXER_MMA", raising=False)
    for H in (32, 64):
        args = _prefill_inputs(37, 1500, H, 128, gen, "cuda", "causal")
        out = dsa_ext.indexer_logits(*args)
        expected = ref.indexer_logits(*[a.cpu() for a in args])
        _assert_in_range_close(out, expected, _key_mask(args[4], args[5], 1500), True,
                               _magnitude("cuda", args))
        paged = _paged_inputs(3, 2, H, 128, 64, 1100, gen, "cuda", False, bad_blocks=True)
        out = dsa_ext.paged_indexer_logits(*paged, 1100)
        expected = ref.paged_indexer_logits(*[a.cpu() for a in paged], 1100)
        _assert_in_range_close(out, expected, _position_mask(paged[3], 2, 1100), True,
                               _magnitude("cuda", paged, 1100))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_paged_rejects_unaligned_block_size(gen):
    paged = _paged_inputs(2, 1, 64, 128, 6, 40, gen, "cuda", False)
    with pytest.raises((RuntimeError, ValueError), match="block_size"):
        dsa_ext.paged_indexer_logits(*paged, 40)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_paged_graph_capture(gen):
    """Decode runs under CUDA graphs: no host synchronisation inside the op; a replay after
    the inputs change in place gives the new result."""
    q, cache, w, cl, bt = _paged_inputs(4, 2, 64, 128, 64, 700, gen, "cuda", False)
    dsa_ext.paged_indexer_logits(q, cache, w, cl, bt, 700)   # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = dsa_ext.paged_indexer_logits(q, cache, w, cl, bt, 700)
    cl.copy_(torch.tensor([700, 3, 350, 64], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    expected = ref.paged_indexer_logits(q.cpu(), cache.cpu(), w.cpu(), cl.cpu(), bt.cpu(), 700)
    _assert_in_range_close(out, expected, _position_mask(cl, 2, 700), True,
                           _magnitude("cuda", [q, cache, w, cl, bt], 700))
