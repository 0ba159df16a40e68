"""hadamard_fp8_quantize_kernel (csrc/hadamard) on the CPU emulator (csrc/emu): every
instantiation the launcher can select (values per lane 1, 2, 4, 8, 16, 32, i.e. d = 32 .. 1024,
bf16 and fp32 inputs), quantisation groups from one lane to the whole warp, both scale rules;
byte-exact against dsa_ext.reference (FP8 bytes and scales, as the CUDA cases of
test_hadamard.py), with no hazard reported.

Rows are not a multiple of the CTA's 8 warps, so the last CTA's idle warps exit early; the
outputs start as bytes no answer has in full (0x5A, NaN scales), so a byte the kernel should
write but does not fails the comparison.
"""
import ctypes

import pytest
import torch

import emulator as E
from conftest import randn
from dsa_ext import reference as ref

pytestmark = pytest.mark.emu
P = E.ptr
I64 = ctypes.c_int64
KERNEL = "hadamard_fp8_quantize_kernel"


@pytest.fixture(scope="module")
def lib():
    lib = E.load("hadamard")
    lib.emu_hadamard_fp8_quantize.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                              I64, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return lib


def launched(lib):
    return {name: c for name, c in E.counters(lib).items() if c["launches"]}


def run_hadamard(lib, x, block, ue8m0):
    rows, d = x.shape
    out = torch.full((rows, d), 0x5A, dtype=torch.uint8)
    scales = torch.full((rows, d // block), float("nan"))
    lib.emu_clear_counters()
    reports, rc = E.run(lib.emu_hadamard_fp8_quantize, P(x), int(x.dtype == torch.bfloat16), P(out), P(scales),
                        rows, d, block, int(ue8m0), buffers=[x, out, scales], lib=lib)
    return rc, out, scales, reports


# (d, block): every values-per-lane (d / 32) once per dtype, lanes per group (block / VPT) from
# 1 to 32 across the cases.
CASES = [(32, 1), (32, 32), (64, 8), (128, 128), (128, 4), (256, 64), (512, 16), (1024, 128), (1024, 1024)]


@pytest.mark.parametrize("d,block", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_matches_reference_bytes(lib, gen, d, block, dtype):
    ue8m0 = (d // block) % 2 == 0          # both rules over the cases
    rows = 9 if d <= 256 else 3            # 9: two CTAs, the second with one live warp
    x = randn(rows, d, gen=gen, dtype=dtype, scale=3.0)
    x[0, 0] = 900.0                        # beyond the FP8 range before rotation
    x[1] *= 1e-6                           # a row near the scale floor
    rc, out, scales, reports = run_hadamard(lib, x, block, ue8m0)
    assert rc == 0 and reports == []
    rq, rs = ref.hadamard_fp8_quantize(x, block, ue8m0)
    assert torch.equal(scales.view(torch.uint8), rs.contiguous().view(torch.uint8))
    assert torch.equal(out, rq.view(torch.uint8))
    (name, cnt), = launched(lib).items()
    assert KERNEL in name
    assert cnt["launches"] == 1 and cnt["ctas"] == -(-rows // 8)
    # Each live lane loads its d / 32 values once and writes them as FP8 once.
    assert cnt["gmem_bytes_read"] == rows * d * x.element_size()
    assert cnt["gmem_bytes_written"] == rows * d + rows * (d // block) * 4


def test_refusals_and_empty(lib):
    x = torch.ones(2, 48)
    rc, out, _, reports = run_hadamard(lib, x, 16, True)
    assert rc != 0 and reports == [] and (out == 0x5A).all()   # d not a power of two in [32, 1024]
    lib.emu_clear_counters()
    reports, rc = E.run(lib.emu_hadamard_fp8_quantize, None, 1, None, None, 0, 128, 128, 1, lib=lib)
    assert rc == 0 and reports == [] and launched(lib) == {}
