"""Property-based sweep of every public op (hypothesis): random shapes including 0 and 1,
non-contiguous and offset views, special values (+-inf, NaN, -0.0, subnormals, the e4m3 max and
values past it), out-of-range, duplicated and int64 indices, every dtype the op accepts. Each
example either matches dsa_ext.reference (bytes where the op is exact, the family's tolerance
elsewhere, and never a non-finite value where the reference is finite) or raises the error the
op documents, naming the argument — never a crash, a hang or an out-of-bounds read (the CPU
kernels would fault; the CUDA ones run the same cases when a GPU is present).

Budget: DSA_PROPERTY_EXAMPLES examples per op (default 25, derandomised, what CI runs); a long
run on demand: `DSA_PROPERTY_EXAMPLES=2000 DSA_PROPERTY_RANDOM=1 pytest tests/test_property.py`.
The count of examples per op and outcome goes to build/property/counts.json (and stdout).
"""
import collections
import json
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dsa_ext
from dsa_ext import reference as ref
from conftest import HAS_CUDA, rel_err

EXAMPLES = int(os.environ.get("DSA_PROPERTY_EXAMPLES", "25"))
SWEEP = settings(max_examples=EXAMPLES, deadline=None, database=None,
                 derandomize=not os.environ.get("DSA_PROPERTY_RANDOM"),
                 suppress_health_check=list(HealthCheck))
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
FP8 = torch.float8_e4m3fn
COUNTS = collections.Counter()

# Values a user's tensors do hold. 448 is the e4m3 max; 464 rounds past it (saturates), 1e-40
# is an fp32 subnormal, 1e-6 underflows e4m3 at scale 1.
SPECIALS = (float("inf"), float("-inf"), float("nan"), -0.0, 1e-40, 448.0, 464.0, -1e4, 1e-6)
SEEDS = st.integers(0, 2 ** 31 - 1)


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build", "property")
    os.makedirs(root, exist_ok=True)
    data = {"examples_per_op_setting": EXAMPLES, "counts": dict(sorted(COUNTS.items()))}
    with open(os.path.join(root, "counts.json"), "w") as f:
        json.dump(data, f, indent=1)
    print("\nproperty sweep:", json.dumps(data))


def values(seed, shape, dtype, special_frac=0.0, scale=1.0, specials=SPECIALS):
    """Random normal values (never zeros) with a fraction replaced by special values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
    if special_frac and x.numel():
        pick = torch.rand(*shape, generator=g) < special_frac
        which = torch.randint(0, len(specials), shape, generator=g)
        x = torch.where(pick, torch.tensor(specials, dtype=torch.float64)[which], x)
    return x.to(dtype)


def as_view(t, kind):
    """t itself, or the same values as a non-contiguous view at a storage offset."""
    if kind == "contiguous" or t.dim() == 0:
        return t
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1] + 1, dtype=t.dtype, device=t.device)
    v = wide[..., 1::2]
    v.copy_(t)
    return v


def same_float(a, b):
    """Equal values, NaN where the other has NaN, -0.0 == 0.0."""
    a, b = a.double().cpu(), b.double().cpu()
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a[~nan], b[~nan])


def close_where_finite(got, want, tol, what):
    """Where the reference is finite the op is finite and within tol (norm-relative, plus an
    absolute floor for tiny references); the op may be anything where the reference is not."""
    got, want = got.double().cpu(), want.double().cpu()
    fin = torch.isfinite(want)
    assert torch.isfinite(got[fin]).all(), f"{what}: non-finite where the reference is finite"
    if fin.any():
        g, w = got[fin], want[fin]
        err = (g - w).norm().item()
        # relative to the reference's norm, plus a floor of 1% of tol per element for references
        # that are ~0 (a softmax gradient over one key, say)
        assert err <= tol * (w.norm().item() + 1e-2 * w.numel() ** 0.5), (what, err, w.norm().item())


def expect_error(fn, names):
    """The call raises a RuntimeError / ValueError whose message names one of `names`."""
    with pytest.raises((RuntimeError, ValueError)) as e:
        fn()
    assert any(n in str(e.value) for n in names), str(e.value)


def index_tensor(seed, shape, hi, dtype, dup=True):
    """Indices in [-3, hi + 3) with the extremes 2**31 - 1 and -2**31 sprinkled in (int64 also
    gets 2**40), repeats allowed."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(-3, max(hi, 0) + 3, shape, generator=g, dtype=torch.int64)
    if idx.numel():
        r = torch.rand(shape, generator=g)
        idx[r < 0.05] = 2 ** 31 - 1
        idx[(r >= 0.05) & (r < 0.08)] = -2 ** 31
        if dtype == torch.int64:
            idx[(r >= 0.08) & (r < 0.1)] = 2 ** 40
    return idx.to(dtype)


# ---- quantisers ---------------------------------------------------------------------------------

@SWEEP
@given(seed=SEEDS, lead=st.lists(st.integers(0, 3), max_size=2), nblk=st.integers(1, 3),
       block=st.sampled_from([1, 16, 32, 100, 128]), dtype=st.sampled_from([torch.bfloat16, torch.float32]),
       frac=st.sampled_from([0.0, 0.05, 0.5]), ue8m0=st.booleans(),
       view=st.sampled_from(["contiguous", "strided"]), bad_block=st.booleans())
def test_fp8_quantize(seed, lead, nblk, block, dtype, frac, ue8m0, view, bad_block):
    x = values(seed, (*lead, nblk * block), dtype, frac, scale=100.0)
    for device in DEVICES:
        xv = as_view(x.to(device), view)
        if bad_block:
            expect_error(lambda: dsa_ext.fp8_quantize(xv, nblk * block + 1, ue8m0), ["block_size"])
            COUNTS["fp8_quantize raised"] += 1
            continue
        q, s = dsa_ext.fp8_quantize(xv, block, ue8m0)
        rq, rs = ref.fp8_quantize(x, block, ue8m0)
        assert q.dtype == FP8 and q.shape == x.shape and s.shape == rs.shape
        assert same_float(q, rq) and same_float(s, rs)
        COUNTS["fp8_quantize matched"] += 1


@SWEEP
@given(seed=SEEDS, lead=st.lists(st.integers(0, 3), max_size=2), log_d=st.integers(1, 10),
       block_div=st.sampled_from([1, 2, 4]), dtype=st.sampled_from([torch.bfloat16, torch.float32]),
       frac=st.sampled_from([0.0, 0.05]), ue8m0=st.booleans(),
       view=st.sampled_from(["contiguous", "strided"]), bad_dim=st.booleans())
def test_hadamard_fp8_quantize(seed, lead, log_d, block_div, dtype, frac, ue8m0, view, bad_dim):
    d = 2 ** log_d
    block = max(d // block_div, 1)
    x = values(seed, (*lead, d * 3 // 2 if bad_dim else d), dtype, frac, scale=10.0)
    for device in DEVICES:
        xv = as_view(x.to(device), view)
        if bad_dim:
            expect_error(lambda: dsa_ext.hadamard_fp8_quantize(xv, block, ue8m0), ["x.size(-1)", "block_size"])
            COUNTS["hadamard_fp8_quantize raised"] += 1
            continue
        q, s = dsa_ext.hadamard_fp8_quantize(xv, block, ue8m0)
        rq, rs = ref.hadamard_fp8_quantize(x, block, ue8m0)
        if frac:   # a non-finite value spreads over its whole rotated group: compare finite groups
            fin = torch.isfinite(x.float()).reshape(*x.shape[:-1], d // block, block).all(-1)
            fin_v = fin.repeat_interleave(block, -1)
            assert same_float(s.cpu()[fin], rs[fin]) and same_float(q.cpu()[fin_v], rq[fin_v])
        else:
            assert same_float(q, rq) and same_float(s, rs)
        COUNTS["hadamard_fp8_quantize matched"] += 1


# ---- caches -------------------------------------------------------------------------------------

def slot_mapping(seed, n, num_slots, dtype, mode):
    """n slots: distinct in-range ones with some -1 (mode "ok"), or with one repeated / one past
    the cache (the CPU raises; CUDA skips the one past the cache, leaves the repeat unspecified)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(max(num_slots, n), generator=g)[:n]
    perm[perm >= num_slots] = -1
    perm[torch.rand(n, generator=g) < 0.2] = -1
    if n >= 2 and mode == "repeat":
        perm[0], perm[1] = 0, 0
    if n >= 1 and mode == "past":
        perm[0] = num_slots
    return perm.to(dtype)


@SWEEP
@given(seed=SEEDS, nb=st.integers(1, 3), bs=st.sampled_from([1, 4, 16]), D=st.sampled_from([16, 128]),
       n=st.integers(0, 20), idx_dtype=st.sampled_from([torch.int32, torch.int64]),
       dtype=st.sampled_from([torch.bfloat16, torch.float32]), frac=st.sampled_from([0.0, 0.05]),
       mode=st.sampled_from(["ok", "ok", "repeat", "past"]), as_fp8=st.booleans(),
       view=st.sampled_from(["contiguous", "strided"]))
def test_indexer_k_cache_write_gather(seed, nb, bs, D, n, idx_dtype, dtype, frac, mode, as_fp8, view):
    k = values(seed, (n, D), dtype, frac, scale=3.0)
    slots = slot_mapping(seed, n, nb * bs, idx_dtype, mode)
    g = torch.Generator().manual_seed(seed + 1)
    start = torch.randint(0, 256, (nb, bs, 1, D + 4), generator=g, dtype=torch.uint8)
    for device in DEVICES:
        cache = start.clone().to(device)
        call = lambda: dsa_ext.indexer_k_cache_write(as_view(k.to(device), view), slots.to(device),  # noqa: E731
                                                     cache.view(FP8) if as_fp8 else cache)
        want = start.clone()
        bad = mode != "ok" and n >= (2 if mode == "repeat" else 1)
        if bad and device == "cpu":
            expect_error(call, ["slot_mapping"])
            assert torch.equal(cache, start)          # nothing written before the check
            COUNTS["indexer_k_cache_write raised"] += 1
            continue
        call()
        if bad:   # CUDA: the slot past the cache is skipped; a repeated slot is unspecified
            slots_ok = slots.clone()
            slots_ok[: (2 if mode == "repeat" else 1)] = -1
            ref.indexer_k_cache_write(k[2:] if mode == "repeat" else k[1:],
                                      slots_ok[2:] if mode == "repeat" else slots_ok[1:], want)
            keep = torch.ones(nb * bs, dtype=torch.bool)
            keep[0] = mode != "repeat"
        else:
            ref.indexer_k_cache_write(k, slots, want)
            keep = torch.ones(nb * bs, dtype=torch.bool)
        (gk, gs), (wk, ws) = ref.indexer_cache_tokens(cache.cpu()), ref.indexer_cache_tokens(want)
        assert same_float(gk[keep], wk[keep]) and same_float(gs[keep], ws[keep])
        COUNTS["indexer_k_cache_write matched"] += 1
        # gather with bad block ids and ragged lengths
        B, mb = 2, nb + 1
        table = torch.randint(-1, nb + 2, (B, mb), generator=g, dtype=torch.int32)
        lens = torch.randint(0, mb * bs + 1, (B,), generator=g, dtype=torch.int32)
        got = dsa_ext.indexer_k_cache_gather(cache, table.to(device).to(idx_dtype), lens.to(device).to(idx_dtype))
        exp = ref.indexer_k_cache_gather(cache.cpu(), table, lens)
        assert same_float(got[0], exp[0]) and same_float(got[1], exp[1])
        COUNTS["indexer_k_cache_gather matched"] += 1


@SWEEP
@given(seed=SEEDS, nb=st.integers(1, 3), bs=st.sampled_from([1, 4, 16]), n=st.integers(0, 12),
       idx_dtype=st.sampled_from([torch.int32, torch.int64]), fp8=st.booleans(),
       dtype=st.sampled_from([torch.bfloat16, torch.float32]), frac=st.sampled_from([0.0, 0.02]),
       mode=st.sampled_from(["ok", "ok", "repeat", "past"]), as_fp8=st.booleans(),
       view=st.sampled_from(["contiguous", "strided"]), model=st.sampled_from(["v3.2", "v4"]))
def test_mla_kv_cache_write_gather(seed, nb, bs, n, idx_dtype, fp8, dtype, frac, mode, as_fp8, view, model):
    dim = 576 if model == "v3.2" else 512
    kv = values(seed, (n, dim), dtype, frac, scale=5.0)
    slots = slot_mapping(seed, n, nb * bs, idx_dtype, mode)
    start = ref.new_mla_kv_cache(nb, bs, fp8, model=model)     # V4 FP8: FlashMLA's padded pages
    if model == "v4":   # valid records everywhere (the page view has no flat byte view)
        ref.mla_kv_cache_write(values(seed + 2, (nb * bs, dim), torch.float32), torch.arange(nb * bs), start)
    else:
        start.view(-1)[:] = values(seed + 2, (start.numel(),), start.dtype, 0.0) if not fp8 else \
            torch.randint(0, 256, (start.numel(),), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    for device in DEVICES:
        cache = start.clone().to(device) if model == "v3.2" else start.to(device, copy=True)
        target = cache.view(FP8) if (fp8 and as_fp8) else cache
        call = lambda: dsa_ext.mla_kv_cache_write(as_view(kv.to(device), view), slots.to(device), target)  # noqa: E731
        bad = mode != "ok" and n >= (2 if mode == "repeat" else 1)
        if bad and device == "cpu":
            expect_error(call, ["slot_mapping"])
            assert torch.equal(cache, start)
            COUNTS["mla_kv_cache_write raised"] += 1
            continue
        call()
        want = start.clone()
        if bad:
            cut = 2 if mode == "repeat" else 1
            ref.mla_kv_cache_write(kv[cut:], slots[cut:], want)
        else:
            ref.mla_kv_cache_write(kv, slots, want)
        keep = torch.ones(nb * bs, dtype=torch.bool)
        keep[0] = not (bad and mode == "repeat")
        rows = lambda c: c.cpu().reshape(nb * bs, -1)  # noqa: E731
        if model == "v4":
            assert same_float(ref.dequantize_mla_cache(cache.cpu())[keep], ref.dequantize_mla_cache(want)[keep])
        elif fp8:
            assert torch.equal(rows(cache)[keep], rows(want)[keep]) or \
                same_float(ref.dequantize_mla_cache(cache.cpu())[keep], ref.dequantize_mla_cache(want)[keep])
        else:
            assert same_float(rows(cache)[keep], rows(want)[keep])
        COUNTS["mla_kv_cache_write matched"] += 1
        q_slots = index_tensor(seed, (7,), nb * bs, idx_dtype)
        got = dsa_ext.mla_kv_cache_gather(target, q_slots.to(device))
        assert same_float(got, ref.mla_kv_cache_gather(cache.cpu(), q_slots))
        COUNTS["mla_kv_cache_gather matched"] += 1


# ---- indexer ------------------------------------------------------------------------------------

def fp8_values(seed, shape, frac):
    """FP8 operands from values that include the specials (inf saturates or becomes NaN in e4m3:
    torch's cast rule; NaN stays NaN)."""
    return values(seed, shape, torch.float32, frac, scale=4.0).clamp(-448, 448).to(FP8) if frac == 0 \
        else values(seed, shape, torch.float32, frac, scale=4.0).to(FP8)


def ranges(seed, T, S, dtype):
    g = torch.Generator().manual_seed(seed)
    ks = torch.randint(-2, S + 3, (T,), generator=g)
    ke = torch.randint(-2, S + 3, (T,), generator=g)
    return ks.to(dtype), ke.to(dtype)


@SWEEP
@given(seed=SEEDS, T=st.integers(0, 6), S=st.integers(0, 40), H=st.integers(1, 6),
       D=st.sampled_from([1, 16, 128]), frac=st.sampled_from([0.0, 0.0, 0.05]),
       idx_dtype=st.sampled_from([torch.int32, torch.int64]), scale_col=st.booleans(),
       bytes_in=st.booleans(), view=st.sampled_from(["contiguous", "strided"]),
       topk=st.integers(1, 45))
def test_indexer_logits_and_topk(seed, T, S, H, D, frac, idx_dtype, scale_col, bytes_in, view, topk):
    q = fp8_values(seed, (T, H, D), frac)
    k = fp8_values(seed + 1, (S, D), frac)
    k_scale = values(seed + 2, (S,), torch.float32).abs()
    w = values(seed + 3, (T, H), torch.float32, frac)
    ks, ke = ranges(seed, T, S, idx_dtype)
    want = ref.indexer_logits(q, k, k_scale, w, ks.int(), ke.int())
    for device in DEVICES:
        if device == "cuda" and (H not in (32, 64) or D != 128):
            continue
        dq, dk = q.to(device), k.to(device)
        if bytes_in:
            dq, dk = dq.view(torch.uint8), dk.view(torch.uint8)
        sc = k_scale.to(device)[:, None] if scale_col else k_scale.to(device)
        args = (as_view(dq, view), as_view(dk, view), sc, as_view(w.to(device), view),
                ks.to(device), ke.to(device))
        got = dsa_ext.indexer_logits(*args)
        assert got.shape == (T, S) and got.dtype == torch.float32
        close_where_finite(got, want, 1e-4, "indexer_logits")
        inside = ref.ranges_to_mask(ks.int().clamp(0, S), ke.int().clamp(0, S), S) if T else torch.zeros(0, S, dtype=torch.bool)
        assert torch.isneginf(got.cpu()[~inside]).all()
        COUNTS["indexer_logits matched"] += 1
        fused = dsa_ext.indexer_topk(*args, topk)
        assert torch.equal(fused.sort(-1).values,
                           dsa_ext.topk_indices(got, topk, ks.to(device), ke.to(device)).sort(-1).values)
        COUNTS["indexer_topk matched"] += 1


@SWEEP
@given(seed=SEEDS, B=st.integers(1, 3), N=st.integers(1, 3), H=st.integers(1, 5),
       D=st.sampled_from([16, 128]), bs=st.sampled_from([1, 4, 16]), nb=st.integers(1, 4),
       frac=st.sampled_from([0.0, 0.05]), idx_dtype=st.sampled_from([torch.int32, torch.int64]),
       per_query=st.booleans(), as_fp8=st.booleans(), max_len=st.integers(0, 70))
def test_paged_indexer_logits(seed, B, N, H, D, bs, nb, frac, idx_dtype, per_query, as_fp8, max_len):
    g = torch.Generator().manual_seed(seed)
    cache = ref.new_indexer_k_cache(nb, bs, D)
    ref.indexer_k_cache_write(values(seed, (nb * bs, D), torch.float32, frac, scale=3.0),
                              torch.arange(nb * bs), cache)
    q = fp8_values(seed + 1, (B, N, H, D), frac)
    w = values(seed + 2, (B * N, H), torch.float32, frac)
    mb = nb + 1
    table = torch.randint(-1, nb + 2, (B, mb), generator=g, dtype=torch.int32)
    lens = torch.randint(-1, mb * bs + 3, (B, N) if per_query else (B,), generator=g, dtype=torch.int32)
    want = ref.paged_indexer_logits(q, cache, w, lens, table, max_len)
    for device in DEVICES:
        if device == "cuda" and (H not in (32, 64) or D != 128):
            continue
        c = cache.to(device)
        got = dsa_ext.paged_indexer_logits(q.to(device), c.view(FP8) if as_fp8 else c, w.to(device),
                                           lens.to(device).to(idx_dtype), table.to(device).to(idx_dtype), max_len)
        assert got.shape == want.shape
        close_where_finite(got, want, 1e-4, "paged_indexer_logits")
        assert torch.equal(torch.isneginf(got.cpu()) & torch.isneginf(want), torch.isneginf(want))
        COUNTS["paged_indexer_logits matched"] += 1


# ---- top-k --------------------------------------------------------------------------------------

@SWEEP
@given(seed=SEEDS, T=st.integers(0, 5), S=st.integers(0, 300), k=st.integers(1, 310),
       ties=st.sampled_from([None, 3, 50]), frac=st.sampled_from([0.0, 0.1]),
       with_range=st.booleans(), idx_dtype=st.sampled_from([torch.int32, torch.int64]),
       sorted_=st.booleans(), layout=st.sampled_from(["contiguous", "rows", "columns", "transposed"]))
def test_topk_indices(seed, T, S, k, ties, frac, with_range, idx_dtype, sorted_, layout):
    x = values(seed, (T, S), torch.float32, frac)
    if ties:
        x = torch.where(x.isfinite(), (x * ties).round() / ties, x)
    ks, ke = ranges(seed, T, S, idx_dtype) if with_range else (None, None)
    want = ref.topk_indices(x, k, None if ks is None else ks.int(), None if ke is None else ke.int(), sorted=sorted_)
    for device in DEVICES:
        if device == "cuda" and k > 4096:
            continue
        xd = x.to(device)
        if layout == "rows" and T:
            xd = torch.cat([xd, xd], 1)[:, :S]                      # a row stride of 2S
        elif layout == "columns":
            xd = as_view(xd, "strided")                             # column stride 2
        elif layout == "transposed":
            xd = xd.t().contiguous().t()
        got = dsa_ext.topk_indices(xd, k, None if ks is None else ks.to(device),
                                   None if ke is None else ke.to(device), sorted_)
        got = got.cpu()
        if not sorted_:
            got, want_ = got.sort(-1).values, want.sort(-1).values
        else:
            want_ = want
        assert torch.equal(got, want_)
        COUNTS["topk_indices matched"] += 1
        # slot ids of the selection through a block table with holes
        bs = 4
        table = torch.randint(-1, 9, (max(T, 1), max((S + bs - 1) // bs, 1)), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)
        if T:
            got_s = dsa_ext.topk_slot_ids(want.to(device).to(idx_dtype), table[:T].to(device).to(idx_dtype), bs)
            assert torch.equal(got_s.cpu(), ref.topk_slot_ids(want, table[:T], bs))
            COUNTS["topk_slot_ids matched"] += 1


# ---- sparse MLA ---------------------------------------------------------------------------------

ATTN_SPECIALS = (float("inf"), float("-inf"), float("nan"), -0.0, 1e-40, 30.0)
TOL = {torch.bfloat16: 2e-2, torch.float32: 1e-4, torch.float64: 1e-9}
# the backward recomputes P from the fp32 lse the forward returns, for every dtype
BWD_TOL = {torch.bfloat16: 1e-1, torch.float32: 5e-4, torch.float64: 1e-6}


def sink_values(seed, H):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(H, generator=g) * 2
    r = torch.rand(H, generator=g)
    s[r < 0.25] = float("inf")
    s[(r >= 0.25) & (r < 0.5)] = float("-inf")
    return s


@SWEEP
@given(seed=SEEDS, T=st.integers(0, 4), H=st.integers(1, 4), D=st.sampled_from([8, 33, 64]),
       S=st.integers(1, 30), K=st.integers(1, 20), dtype=st.sampled_from([torch.bfloat16, torch.float32, torch.float64]),
       frac=st.sampled_from([0.0, 0.0, 0.02]), idx_dtype=st.sampled_from([torch.int32, torch.int64]),
       with_sink=st.booleans(), with_len=st.booleans(), view=st.sampled_from(["contiguous", "strided"]))
def test_sparse_mla_fwd_bwd(seed, T, H, D, S, K, dtype, frac, idx_dtype, with_sink, with_len, view):
    d_v = max(D // 2, 1)
    q = values(seed, (T, H, D), dtype, frac, specials=ATTN_SPECIALS)
    kv = values(seed + 1, (S, 1, D), dtype, frac, specials=ATTN_SPECIALS)
    idx = index_tensor(seed, (T, 1, K), S, idx_dtype)
    sink = sink_values(seed, H) if with_sink else None
    g = torch.Generator().manual_seed(seed)
    tl = torch.randint(-1, K + 2, (T,), generator=g).to(idx_dtype) if with_len else None
    idx32 = idx.clamp(-2 ** 31, 2 ** 31 - 1).int()
    tl32 = None if tl is None else tl.int()
    r_out, r_lse = ref.sparse_mla_fwd(q, kv, idx32, 0.3, d_v, sink, tl32)
    dout = values(seed + 3, (T, H, d_v), dtype)
    r_dq, r_dkv = ref.sparse_mla_bwd(q, kv, r_out, dout, idx32, r_lse, 0.3, d_v, sink, tl32)
    for device in DEVICES:
        if device == "cuda":
            continue   # the CUDA kernels serve d_qk 576 and H % 16 == 0: test_sparse_mla.py
        out, lse = dsa_ext.sparse_mla_fwd(as_view(q, view), as_view(kv, view), idx, 0.3, d_v, sink, tl)
        close_where_finite(out, r_out, TOL[dtype], "sparse_mla_fwd out")
        close_where_finite(lse, r_lse, 1e-5, "sparse_mla_fwd lse")
        assert torch.equal(torch.isneginf(lse), torch.isneginf(r_lse))
        COUNTS["sparse_mla_fwd matched"] += 1
        for det in (False, True):
            dq, dkv = dsa_ext.sparse_mla_bwd(as_view(q, view), kv, out, dout, idx, lse, 0.3, d_v, sink, tl, det)
            if frac == 0:   # gradients through non-finite scores are NaN in both: compare the rest
                close_where_finite(dq, r_dq, BWD_TOL[dtype], "sparse_mla_bwd dq")
                close_where_finite(dkv, r_dkv, BWD_TOL[dtype], "sparse_mla_bwd dkv")
            COUNTS["sparse_mla_bwd matched"] += 1


@SWEEP
@given(seed=SEEDS, B=st.integers(1, 2), s_q=st.integers(1, 3), H=st.integers(1, 20), K=st.integers(1, 40),
       nb=st.integers(1, 3), bs=st.sampled_from([1, 16, 64]), fp8=st.booleans(), as_fp8=st.booleans(),
       frac=st.sampled_from([0.0, 0.0, 0.01]), idx_dtype=st.sampled_from([torch.int32, torch.int64]),
       with_sink=st.booleans(), lengths=st.sampled_from([None, "B", "B,s_q"]),
       view=st.sampled_from(["contiguous", "strided"]))
def test_sparse_mla_decode(seed, B, s_q, H, K, nb, bs, fp8, as_fp8, frac, idx_dtype, with_sink, lengths, view):
    cache = ref.new_mla_kv_cache(nb, bs, fp8)
    ref.mla_kv_cache_write(values(seed, (nb * bs, 576), torch.float32, frac, scale=2.0,
                                  specials=ATTN_SPECIALS), torch.arange(nb * bs), cache)
    q = values(seed + 1, (B, s_q, H, 576), torch.bfloat16, frac, specials=ATTN_SPECIALS)
    idx = index_tensor(seed, (B, s_q, K), nb * bs, idx_dtype)
    sink = sink_values(seed, H) if with_sink else None
    g = torch.Generator().manual_seed(seed)
    tl = None if lengths is None else torch.randint(-1, K + 2, (B,) if lengths == "B" else (B, s_q),
                                                   generator=g).to(idx_dtype)
    r_out, r_lse = ref.sparse_mla_decode(q, cache, idx.clamp(-2 ** 31, 2 ** 31 - 1).int(), 576 ** -0.5,
                                         512, sink, None if tl is None else tl.int())
    for device in DEVICES:
        c = cache.to(device)
        out, lse = dsa_ext.sparse_mla_decode(as_view(q.to(device), view), c.view(FP8) if (fp8 and as_fp8) else c,
                                             idx.to(device), 576 ** -0.5, 512,
                                             None if sink is None else sink.to(device),
                                             None if tl is None else tl.to(device))
        close_where_finite(out, r_out, 2e-2, "sparse_mla_decode out")
        close_where_finite(lse, r_lse, 1e-5 if device == "cpu" else 1e-3, "sparse_mla_decode lse")
        assert torch.equal(torch.isneginf(lse.cpu()), torch.isneginf(r_lse))
        COUNTS["sparse_mla_decode matched"] += 1
