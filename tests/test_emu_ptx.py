"""The PTX primitives of csrc/common under the emulator (csrc/emu/ptx.cpp), through the real
runtime: small kernels (csrc/emu/families/ptx_emu.cpp) run ldmatrix -> mma.sync (bf16, e4m3)
and wgmma (bf16, e4m3; every descriptor layout, scale-d, imm-scale, register A, chained,
through the product's helpers) against torch, the hazards the primitives must report
(misaligned ldmatrix, missing fence.proxy.async, accumulator read before wgmma.wait_group),
and the bf16 / fp16 / fp8 shim conversions bit for bit against torch's."""
import pytest
import torch

import emulator as E

pytestmark = pytest.mark.emu
P = E.ptr
BF16, E4M3 = 0, 1


@pytest.fixture(scope="module")
def lib():
    return E.load("ptx")


def raw(x):
    return x.contiguous().view(torch.uint8)


def operand(kind, *shape, gen):
    x = torch.randn(*shape, generator=gen) * 2
    return x.to(torch.bfloat16 if kind == BF16 else torch.float8_e4m3fn)


def assert_fp32_sum(got, want):
    # Exact products summed in fp32: the error is a few ulps of the running sum.
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fp8,b_kn", [(0, 0), (0, 1), (1, 0)])
def test_ldmatrix_mma_sync(lib, gen, fp8, b_kn):
    kind = E4M3 if fp8 else BF16
    K = 32 if fp8 else 16
    a, bt = operand(kind, 16, K, gen=gen), operand(kind, 8, K, gen=gen)  # bt: B as (n, k)
    b = bt.t().contiguous() if b_kn else bt                                # (k, n) for .trans
    c = torch.randn(16, 8, generator=gen)
    d = torch.full((16, 8), float("nan"))
    ra, rb = raw(a), raw(b)
    rep, rc = E.run(lib.emu_ptx_mma_sync, P(ra), P(rb), P(c), P(d), fp8, b_kn, 0, buffers=[ra, rb, c, d], lib=lib)
    assert rc == 0 and rep == []
    assert_fp32_sum(d, c.double() + a.double() @ bt.double().t())


def test_ldmatrix_misaligned_row_is_reported(lib, gen):
    a, b = raw(operand(BF16, 16, 16, gen=gen)), raw(operand(BF16, 8, 16, gen=gen))
    c, d = torch.zeros(16, 8), torch.zeros(16, 8)
    rep, _ = E.run(lib.emu_ptx_mma_sync, P(a), P(b), P(c), P(d), 0, 0, 1, buffers=[a, b, c, d], lib=lib)
    assert {r["kind"] for r in rep} == {"misaligned"} and "lane 3" in rep[0]["text"]


FIELDS = ("type", "n", "swizzle", "trans_a", "trans_b", "start_shift", "scale_d", "scale_a", "scale_b",
          "register_a", "chain", "skip_fence", "early_read", "wrapper")


def run_wgmma(lib, gen, **kw):
    cs = dict(type=BF16, n=64, swizzle=0, trans_a=0, trans_b=0, start_shift=0, scale_d=1, scale_a=1, scale_b=1,
              register_a=0, chain=0, skip_fence=0, early_read=0, wrapper=0)
    cs.update(kw)
    K = 16 if cs["type"] == BF16 else 32
    a, bt = operand(cs["type"], 64, K, gen=gen), operand(cs["type"], cs["n"], K, gen=gen)
    c = torch.randn(64, cs["n"], generator=gen)
    d = torch.full((64, cs["n"]), float("nan"))
    args = torch.tensor([cs[f] for f in FIELDS], dtype=torch.int32)
    ra, rb = raw(a), raw(bt)
    rep, rc = E.run(lib.emu_ptx_wgmma, P(ra), P(rb), P(c), P(d), P(args), buffers=[ra, rb, c, d, args], lib=lib)
    assert rc == 0
    prod = (cs["scale_a"] * a.double()) @ (cs["scale_b"] * bt.double()).t()
    want = (c.double() if cs["scale_d"] else 0) + prod * (1 + cs["chain"])
    return rep, d, want


@pytest.mark.parametrize("swizzle", [0, 1, 2, 3])
@pytest.mark.parametrize("trans_a,trans_b", [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_wgmma_bf16_layouts(lib, gen, swizzle, trans_a, trans_b):
    rep, d, want = run_wgmma(lib, gen, swizzle=swizzle, trans_a=trans_a, trans_b=trans_b)
    assert rep == []
    assert_fp32_sum(d, want)


@pytest.mark.parametrize("swizzle,start_shift", [(0, 0), (1, 0), (1, 32), (2, 32), (3, 0)])
def test_wgmma_e4m3_layouts(lib, gen, swizzle, start_shift):
    rep, d, want = run_wgmma(lib, gen, type=E4M3, n=128, swizzle=swizzle, start_shift=start_shift)
    assert rep == []
    assert_fp32_sum(d, want)


@pytest.mark.parametrize("kw", [
    dict(n=256, swizzle=1, trans_b=1),
    dict(n=8, swizzle=0),
    dict(scale_d=0),
    dict(scale_a=-1, scale_b=1, swizzle=1),
    dict(scale_a=-1, scale_b=-1, trans_a=1),
    dict(register_a=1, swizzle=2),
    dict(register_a=1, type=E4M3, n=64, swizzle=1),
    dict(chain=1, swizzle=3),
    dict(wrapper=1, n=64),                   # dsa::wgmma_m64n64k16_kmajor_b
    dict(wrapper=1, n=256, trans_b=1),       # dsa::wgmma_m64n256k16_nmajor_b
    dict(wrapper=1, type=E4M3, n=128, swizzle=1, start_shift=32),  # dsa::wgmma_m64n128k32_e4m3
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_wgmma_forms(lib, gen, kw):
    rep, d, want = run_wgmma(lib, gen, **kw)
    assert rep == []
    assert_fp32_sum(d, want)


def test_wgmma_hazards_are_reported(lib, gen):
    rep, _, _ = run_wgmma(lib, gen, skip_fence=1)
    assert {r["kind"] for r in rep} == {"proxy-fence"}
    rep, d, want = run_wgmma(lib, gen, early_read=1)
    assert {r["kind"] for r in rep} == {"pending-wgmma"}
    assert_fp32_sum(d, want)  # the wait still retires the right value


def test_counters(lib, gen):
    lib.emu_clear_counters()
    run_wgmma(lib, gen, chain=1)
    a, b = raw(operand(BF16, 16, 16, gen=gen)), raw(operand(BF16, 8, 16, gen=gen))
    c, d = torch.zeros(16, 8), torch.zeros(16, 8)
    E.run(lib.emu_ptx_mma_sync, P(a), P(b), P(c), P(d), 0, 0, 0, buffers=[a, b, c, d], lib=lib)
    k = E.counters(lib)
    wg = next(v for name, v in k.items() if "wgmma_kernel" in name)
    mm = next(v for name, v in k.items() if "mma_sync_kernel" in name)
    assert wg["wgmma"] == 2 and mm["mma_sync"] == 1 and mm["ldmatrix"] == 2


def specials():
    big = [448.0, 449.0, 463.9, 464.0, 480.0, 1e4, 57344.0, 61439.0, 61440.0, 65504.0, 65520.0, 1e30,
           float("inf"), float("nan"), 0.0, 2.0 ** -6, 2.0 ** -9, 2.0 ** -10, 3 * 2.0 ** -11, 2.0 ** -14,
           2.0 ** -16, 2.0 ** -17, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26, 1.0625, 1.1875, 1 + 2.0 ** -8,
           1 + 3 * 2.0 ** -9, 3.0e38, 3.4e38]
    x = torch.tensor(big + [-v for v in big])
    g = torch.Generator().manual_seed(5)
    return torch.cat([x, torch.randn(4000, generator=g) * torch.exp2(torch.randint(-30, 20, (4000,), generator=g).float())])


def test_conversions_match_torch(lib):
    x = specials()
    n = x.numel()
    bf, f16 = torch.zeros(n, dtype=torch.int16), torch.zeros(n, dtype=torch.int16)
    e4s, e4n, e5s, e5n = (torch.zeros(n, dtype=torch.uint8) for _ in range(4))
    e4x2 = torch.zeros(n, dtype=torch.int32)
    lib.emu_ptx_convert(P(x), n, P(bf), P(f16), P(e4s), P(e4n), P(e5s), P(e5n), P(e4x2))
    u16 = lambda t: t.to(torch.int64) & 0xFFFF
    for got, want in ((bf, x.to(torch.bfloat16)), (f16, x.to(torch.float16))):
        nan = torch.isnan(x)
        wb = want.view(torch.int16).to(torch.int64) & 0xFFFF
        assert torch.equal(u16(got)[~nan], wb[~nan])
        assert torch.isnan(want[nan].float()).all() and ((u16(got)[nan] & 0x7FFF) > 0x7C00).all()
    # torch's e4m3fn cast saturates, its e5m2 cast overflows to inf: CUDA's __NV_NOSAT is the
    # e5m2 cast, and for e4m3 makes an overflow (|x| > 464, rounding past 448) NaN, as the CUDA
    # docs of __nv_saturation_t say; __NV_SATFINITE is the cast of the value clamped to the max.
    want = x.to(torch.float8_e5m2)
    nan = torch.isnan(want.float())
    assert torch.equal(e5n[~nan], want.view(torch.uint8)[~nan]) and ((e5n[nan] & 0x7F) > 0x7C).all()
    over = x.abs() > 464  # 464 is the tie between 448 and 480 (not finite): even 448
    fine = ~over & ~torch.isnan(x)
    assert torch.equal(e4n[fine], x[fine].to(torch.float8_e4m3fn).view(torch.uint8))
    assert ((e4n[over | torch.isnan(x)] & 0x7F) == 0x7F).all()
    for got, dtype, mx in ((e4s, torch.float8_e4m3fn, 448.0), (e5s, torch.float8_e5m2, 57344.0)):
        want = x.clamp(-mx, mx).to(dtype)
        nan = torch.isnan(x)
        assert torch.equal(got[~nan], want.view(torch.uint8)[~nan])
        assert torch.isnan(torch.tensor(got[nan].numpy()).view(dtype).float()).all()
    # __nv_cvt_float2_to_fp8x2: .x in the low byte (cvt.rn.satfinite.e4m3x2.f32 d, y, x).
    assert torch.equal(e4x2 & 0xFF, e4s.to(torch.int32))
    neg = (-x).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int32)
    ok = ~torch.isnan(x)
    assert torch.equal(((e4x2 >> 8) & 0xFF)[ok], neg[ok])


def test_decodes_match_torch(lib):
    bf, f16 = torch.zeros(65536), torch.zeros(65536)
    e4, e5 = torch.zeros(256), torch.zeros(256)
    lib.emu_ptx_decode(P(bf), P(f16), P(e4), P(e5))
    codes16 = torch.arange(65536, dtype=torch.int32).to(torch.int16)
    codes8 = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    for got, want in ((bf, codes16.view(torch.bfloat16).float()), (f16, codes16.view(torch.float16).float()),
                      (e4, codes8.view(torch.float8_e4m3fn).float()), (e5, codes8.view(torch.float8_e5m2).float())):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
