"""v4_compress (SPEC 10.4) against dsa_ext.reference.v4_compress: c = 1 and 2 (overlapping
windows), ratios 1..128, d 128 and 512, ragged batches with sequences shorter than one window
and lengths not a multiple of the ratio, one sequence without cu_seqlens, large and negative
scores; the reference itself against an independent transcription of V4's batched
formulation; opcheck, torch.compile with the data-dependent size, and bad inputs.

The op pools in fp32 and the reference in fp64, so a pooled value at a bf16 rounding boundary
may round the other way: outputs are compared to about one bf16 ulp (and most must be equal).
"""
import pytest
import torch

import dsa_ext
from conftest import randn
from dsa_ext import reference as ref

ROPE_PAIRS = 32


def rope_tables(positions, gen):
    inv_freq = 10000.0 ** (-torch.rand(ROPE_PAIRS, generator=gen))
    angle = torch.arange(positions, dtype=torch.float64)[:, None] * inv_freq[None, :].double()
    return angle.cos().float(), angle.sin().float()


def make_inputs(gen, lens, d, c, ratio, device="cpu", score_scale=1.0, score_shift=0.0,
                rope_rows=None):
    tokens = sum(lens)
    kv = randn(tokens, c * d, gen=gen, scale=2.0)
    score = randn(tokens, c * d, gen=gen, scale=score_scale) + score_shift
    ape = randn(ratio, c * d, gen=gen, scale=0.5)
    w = 1.0 + 0.3 * randn(d, gen=gen)
    most = max([n // ratio for n in lens] + [1])
    cos, sin = rope_tables(rope_rows if rope_rows is not None else (most - 1) * ratio + 1, gen)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32)
    return [t.to(device) for t in (kv, score, ape, w)], cos.to(device), sin.to(device), cu.to(device)


def assert_matches(out, want):
    assert out.dtype == torch.bfloat16 and out.shape == want.shape
    if want.numel() == 0:
        return
    o, r = out.float().cpu(), want.float().cpu()
    torch.testing.assert_close(o, r, rtol=2 ** -6, atol=2 ** -6 * r.abs().max().item())
    assert (o == r).float().mean().item() > 0.99


def run_both(gen, lens, d, c, ratio, device, use_cu=True, **kw):
    (kv, score, ape, w), cos, sin, cu = make_inputs(gen, lens, d, c, ratio, device, **kw)
    cu_arg = cu if use_cu else None
    out = dsa_ext.v4_compress(kv, score, ape, w, 1e-6, cos, sin, cu_arg)
    want = ref.v4_compress(kv, score, ape, w, 1e-6, cos, sin, cu_arg)
    assert out.device == kv.device
    assert_matches(out, want)
    return out


def ragged(ratio):
    # Lengths: several windows plus a partial one, shorter than one window, empty, exact.
    return [3 * ratio + 1, max(ratio - 1, 0), 0, 2 * ratio, ratio + ratio // 2 + 1]


@pytest.mark.parametrize("c", [1, 2])
@pytest.mark.parametrize("ratio", [2, 3, 4, 128])
@pytest.mark.parametrize("d", [128, 512])
def test_ragged_batch_matches_reference(device, gen, c, ratio, d):
    lens = ragged(ratio)
    out = run_both(gen, lens, d, c, ratio, device)
    assert out.shape[0] == sum(n // ratio for n in lens)


@pytest.mark.parametrize("c", [1, 2])
@pytest.mark.parametrize("tokens", [1, 4, 21, 64])
def test_one_sequence_without_cu_seqlens(device, gen, c, tokens):
    out = run_both(gen, [tokens], 128, c, 4, device, use_cu=False)
    assert out.shape == (tokens // 4, 128)


@pytest.mark.parametrize("c", [1, 2])
def test_large_and_negative_scores_are_stable(device, gen, c):
    # exp of these scores overflows / underflows fp32 without the max shift.
    out = run_both(gen, [37, 16], 256, c, 4, device, score_scale=300.0, score_shift=-5e3)
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("c", [1, 2])
def test_minus_inf_scores_weigh_nothing(device, gen, c):
    (kv, score, ape, w), cos, sin, cu = make_inputs(gen, [13], 128, c, 4)
    score[0] = float("-inf")              # the first pool row of entry 0, every channel
    score[5, :7] = float("-inf")          # a middle row of entry 1, some channels
    out = dsa_ext.v4_compress(kv.to(device), score.to(device), ape.to(device), w.to(device),
                              1e-6, cos.to(device), sin.to(device))
    assert torch.isfinite(out.float()).all()
    assert_matches(out, ref.v4_compress(kv, score, ape, w, 1e-6, cos, sin))


def test_ratio_one_is_norm_and_rope_of_kv(gen):
    # One token per window: the softmax weight is exactly 1, so the entry is the token's kv.
    (kv, score, ape, w), cos, sin, cu = make_inputs(gen, [9], 64, 1, 1)
    out = dsa_ext.v4_compress(kv, score, ape, w, 1e-6, cos, sin)
    e = kv.to(torch.bfloat16).float()
    y = (e * torch.rsqrt(e.square().mean(-1, keepdim=True) + 1e-6) * w).to(torch.bfloat16).float()
    x0, x1 = y[:, 0::2].clone(), y[:, 1::2].clone()
    y[:, 0::2], y[:, 1::2] = x0 * cos - x1 * sin, x0 * sin + x1 * cos
    assert_matches(out, y.to(torch.bfloat16))


def v4_batched_pool(kv, score, ape, d):
    """V4's prefill formulation for one sequence: [n, ratio, 2d] windows reshaped to
    [n, 2 * ratio, d] with the previous window's first half in front (score -inf, kv 0 for
    entry 0), softmax over the rows."""
    ratio = ape.shape[0]
    n = kv.shape[0] // ratio
    kv = kv[: n * ratio].double().unflatten(0, (n, ratio))
    z = score[: n * ratio].double().unflatten(0, (n, ratio)) + ape.double()

    def overlap(t, fill):
        new = t.new_full((n, 2 * ratio, d), fill)
        new[:, ratio:] = t[:, :, d:]
        new[1:, :ratio] = t[:-1, :, :d]
        return new

    kv, z = overlap(kv, 0.0), overlap(z, float("-inf"))
    return (kv * z.softmax(dim=1)).sum(dim=1)


def test_reference_pool_is_v4_overlap_transform(gen):
    (kv, score, ape, w), _, _, _ = make_inputs(gen, [23], 128, 2, 4)
    from dsa_ext.reference.compress import _pool
    torch.testing.assert_close(_pool(kv, score, ape, 128), v4_batched_pool(kv, score, ape, 128),
                               rtol=1e-12, atol=1e-12)


def test_overlap_reads_previous_window(gen):
    # c = 2: changing window 1's first-half channels changes entry 2, not entry 1's output
    # only (entry 1 reads window 1's second half) -- and never entry 0.
    (kv, score, ape, w), cos, sin, _ = make_inputs(gen, [12], 64, 2, 4)
    base = dsa_ext.v4_compress(kv, score, ape, w, 1e-6, cos, sin)
    kv2 = kv.clone()
    kv2[4:8, :64] += 5.0
    moved = dsa_ext.v4_compress(kv2, score, ape, w, 1e-6, cos, sin)
    assert torch.equal(base[:2], moved[:2]) and not torch.equal(base[2], moved[2])


def test_wrapper_accepts_int64_and_strided(device, gen):
    (kv, score, ape, w), cos, sin, cu = make_inputs(gen, [9, 14], 128, 2, 4, device)
    want = ref.v4_compress(kv, score, ape, w, 1e-5, cos, sin, cu)
    kv_t = kv.t().contiguous().t()          # same values, column-major strides
    out = dsa_ext.v4_compress(kv_t, score, ape, w, 1e-5, cos, sin, cu.long())
    assert_matches(out, want)


# ---- opcheck, compile, bad inputs --------------------------------------------------------------
@pytest.mark.parametrize("use_cu", [False, True])
def test_opcheck(device, gen, use_cu):
    (kv, score, ape, w), cos, sin, cu = make_inputs(gen, [10, 3, 8], 64, 2, 4, device)
    if not use_cu:
        kv, score, cu = kv[:10], score[:10], None
    torch.library.opcheck(torch.ops.dsa.v4_compress.default,
                          (kv, score, ape, w, 1e-6, cos, sin, cu))


def test_fake_shapes_and_compile(gen):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    with FakeTensorMode(shape_env=ShapeEnv()):
        out = torch.ops.dsa.v4_compress(torch.empty(22, 256), torch.empty(22, 256),
                                        torch.empty(4, 256), torch.empty(128), 1e-6,
                                        torch.empty(8, 32), torch.empty(8, 32))
        assert out.shape == (5, 128) and out.dtype == torch.bfloat16
        out = torch.ops.dsa.v4_compress(torch.empty(22, 128), torch.empty(22, 128),
                                        torch.empty(4, 128), torch.empty(128), 1e-6,
                                        torch.empty(8, 32), torch.empty(8, 32),
                                        torch.empty(3, dtype=torch.int32))
        assert out.shape[1] == 128

    (kv, score, ape, w), cos, sin, cu = make_inputs(gen, [10, 13], 64, 1, 4)

    @torch.compile(fullgraph=True, backend="eager")
    def compress_then_scale(kv, score, cu):
        return dsa_ext.v4_compress(kv, score, ape, w, 1e-6, cos, sin, cu).float() * 2

    torch.testing.assert_close(compress_then_scale(kv, score, cu),
                               dsa_ext.v4_compress(kv, score, ape, w, 1e-6, cos, sin, cu).float() * 2)


def bad_cases(gen):
    (kv, score, ape, w), cos, sin, cu = make_inputs(gen, [8, 5], 64, 2, 4)
    ok = dict(kv=kv, score=score, ape=ape, norm_weight=w, eps=1e-6, rope_cos=cos, rope_sin=sin,
              cu_seqlens=cu)
    i32 = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    return ok, [
        (dict(kv=kv.double()), "kv must be float32"),
        (dict(score=score.bfloat16()), "score must be float32"),
        (dict(kv=kv[None]), "kv must be 2-D"),
        (dict(norm_weight=w[:62]), "must be even and at least 64"),
        (dict(norm_weight=torch.ones(63)), "must be even and at least 64"),
        (dict(kv=kv[:, :96], score=score[:, :96]), "kv.size(1) must be d or 2 * d"),
        (dict(score=score[:, :64]), "score must have kv's shape"),
        (dict(ape=ape[:, :64]), "ape.size(1) must be 128"),
        (dict(ape=ape[:0]), "ratio) must be positive"),
        (dict(rope_cos=cos[:, :16], rope_sin=sin[:, :16]), "rope_cos.size(1) must be 32"),
        (dict(rope_sin=sin[:1]), "rope_sin must have rope_cos's shape"),
        (dict(rope_cos=cos[:4], rope_sin=sin[:4]), "need at least 5 rows"),
        (dict(eps=-1.0), "eps must be non-negative"),
        (dict(cu_seqlens=i32([1, 8, 13])), "cu_seqlens[0] must be 0"),
        (dict(cu_seqlens=i32([0, 8, 12])), "cu_seqlens[-1] must equal kv.size(0) = 13"),
        (dict(cu_seqlens=i32([0, 9, 8, 13])), "cu_seqlens must be non-decreasing"),
        (dict(cu_seqlens=i32([0])), "B + 1 >= 2"),
        (dict(cu_seqlens=cu.float()), "cu_seqlens must be int32"),
    ]


@pytest.mark.parametrize("case", range(18))
def test_bad_inputs_name_the_argument(device, gen, case):
    ok, cases = bad_cases(gen)
    change, message = cases[case]
    args = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in {**ok, **change}.items()}
    with pytest.raises((RuntimeError, ValueError), match=__import__("re").escape(message)):
        torch.ops.dsa.v4_compress(**args)


# ---- the decode form: prefill + token-by-token steps give the bulk op's entries ---------------
def split_sequences(t, lens):
    return list(torch.split(t, lens))


@pytest.mark.parametrize("c,ratio,d", [(1, 3, 128), (2, 4, 128), (2, 4, 512), (2, 3, 64),
                                       (1, 128, 128), (2, 128, 128)])
def test_prefill_then_steps_equal_bulk(device, gen, c, ratio, d):
    prefill = [0, 5, 2 * ratio + 1, 3 * ratio]
    steps = ratio + 3 if ratio > 8 else 2 * ratio + 3
    full = [p + steps for p in prefill]
    (kv, score, ape, w), cos, sin, cu_full = make_inputs(gen, full, d, c, ratio, device)
    want = split_sequences(dsa_ext.v4_compress(kv, score, ape, w, 1e-6, cos, sin, cu_full),
                           [n // ratio for n in full])
    kv_seq, score_seq = split_sequences(kv, full), split_sequences(score, full)
    cu_pre = torch.tensor([0] + torch.tensor(prefill).cumsum(0).tolist(), dtype=torch.int32,
                          device=device)
    kv_pre = torch.cat([k[:p] for k, p in zip(kv_seq, prefill)])
    score_pre = torch.cat([s[:p] for s, p in zip(score_seq, prefill)])
    got = [[e] for e in split_sequences(
        dsa_ext.v4_compress(kv_pre, score_pre, ape, w, 1e-6, cos, sin, cu_pre),
        [p // ratio for p in prefill])]
    kv_state, score_state = dsa_ext.new_v4_compress_state(len(prefill), d, c, ratio, device)
    dsa_ext.v4_compress_prefill_state(kv_pre, score_pre, ape, kv_state, score_state, cu_pre)
    ref_state = (kv_state.clone(), score_state.clone())
    for i in range(steps):
        pos = torch.tensor([p + i for p in prefill], dtype=torch.int32, device=device)
        tok_kv = torch.stack([k[p + i] for k, p in zip(kv_seq, prefill)])
        tok_score = torch.stack([s[p + i] for s, p in zip(score_seq, prefill)])
        out = dsa_ext.v4_compress_step(tok_kv, tok_score, ape, w, 1e-6, cos, sin, pos,
                                       kv_state, score_state)
        if i < 2 * ratio:          # the reference step on its own copy of the state
            assert_matches(out, ref.v4_compress_step(tok_kv, tok_score, ape, w, 1e-6, cos, sin,
                                                     pos, *ref_state))
        due = (pos + 1) % ratio == 0
        assert (out[~due].float() == 0).all()
        for b in range(len(prefill)):
            if due[b]:
                got[b].append(out[b:b + 1])
    for b in range(len(prefill)):
        assert torch.equal(torch.cat(got[b]), want[b]), f"sequence {b}"


def test_step_without_token_leaves_state(device, gen):
    (kv, score, ape, w), cos, sin, _ = make_inputs(gen, [2], 64, 2, 4, device, rope_rows=8)
    kv_state, score_state = dsa_ext.new_v4_compress_state(2, 64, 2, 4, device)
    before = (kv_state.clone(), score_state.clone())
    pos = torch.tensor([-1, 3], device=device)                       # int64 accepted
    out = dsa_ext.v4_compress_step(kv, score, ape, w, 1e-6, cos, sin, pos, kv_state, score_state)
    assert (out[0].float() == 0).all() and torch.equal(kv_state[0], before[0][0])
    assert torch.equal(score_state[0], before[1][0])
    assert torch.equal(kv_state[1, 3], kv[1]) and torch.equal(score_state[1, 3], score[1] + ape[3])
    assert torch.isfinite(out[1].float()).all() and (out[1] != 0).any()   # entry 0 of sequence 1


def test_step_opcheck(device, gen):
    (kv, score, ape, w), cos, sin, _ = make_inputs(gen, [3], 64, 2, 4, device, rope_rows=16)
    kv_state, score_state = dsa_ext.new_v4_compress_state(3, 64, 2, 4, device)
    kv_state.normal_(generator=None)
    score_state.copy_(torch.randn_like(score_state))
    pos = torch.tensor([3, 6, -1], dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.dsa.v4_compress_step.default,
                          (kv, score, ape, w, 1e-6, cos, sin, pos, kv_state, score_state))


def step_bad_cases(gen):
    (kv, score, ape, w), cos, sin, _ = make_inputs(gen, [3], 64, 2, 4, rope_rows=8)
    kst, sst = dsa_ext.new_v4_compress_state(3, 64, 2, 4)
    ok = dict(kv=kv, score=score, ape=ape, norm_weight=w, eps=1e-6, rope_cos=cos, rope_sin=sin,
              positions=torch.tensor([3, 0, 1], dtype=torch.int32), kv_state=kst, score_state=sst)
    return ok, [
        (dict(positions=torch.tensor([3, 0, 1])), "positions must be int32"),
        (dict(positions=torch.tensor([3, 0], dtype=torch.int32)), "positions.size(0) must be 3"),
        (dict(kv_state=kst[:, :4]), "kv_state.size(1) must be 8"),
        (dict(score_state=sst[:2]), "score_state.size(0) must be 3"),
        (dict(kv_state=kst.double()), "kv_state must be float32"),
        (dict(positions=torch.tensor([11, 0, 1], dtype=torch.int32)), "need at least 9 rows"),
    ]


@pytest.mark.parametrize("case", range(6))
def test_step_bad_inputs_name_the_argument(gen, case):
    ok, cases = step_bad_cases(gen)
    change, message = cases[case]
    with pytest.raises((RuntimeError, ValueError), match=__import__("re").escape(message)):
        torch.ops.dsa.v4_compress_step(**{**ok, **change})


def test_step_compiles_fullgraph(gen):
    (kv, score, ape, w), cos, sin, _ = make_inputs(gen, [2], 64, 2, 4, rope_rows=8)
    states = [dsa_ext.new_v4_compress_state(2, 64, 2, 4) for _ in range(2)]
    pos = torch.tensor([3, 2], dtype=torch.int32)

    @torch.compile(fullgraph=True, backend="eager")
    def step(kv, score, pos, kv_state, score_state):
        return dsa_ext.v4_compress_step(kv, score, ape, w, 1e-6, cos, sin, pos, kv_state, score_state)

    out = step(kv, score, pos, *states[0])
    assert torch.equal(out, dsa_ext.v4_compress_step(kv, score, ape, w, 1e-6, cos, sin, pos, *states[1]))
    assert torch.equal(states[0][0], states[1][0]) and torch.equal(states[0][1], states[1][1])
