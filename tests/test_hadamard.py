"""hadamard_fp8_quantize against the reference (bytes and scales exactly), the rotation against
the explicit Sylvester matrix in fp64, opcheck and bad inputs."""
import pytest
import torch

import dsa_ext
from dsa_ext import reference as ref

from conftest import randn


def test_reference_rotation_matches_explicit_matrix(gen):
    x = randn(7, 128, gen=gen, dtype=torch.float64)
    want = x @ ref.hadamard_matrix(128) / 128 ** 0.5
    got = ref.hadamard_transform(x)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)
    # orthonormal: the rotation preserves dot products, which is why the indexer may apply it
    y = randn(7, 128, gen=gen, dtype=torch.float64)
    assert torch.allclose((ref.hadamard_transform(x).double() * ref.hadamard_transform(y).double()).sum(-1),
                          (x * y).sum(-1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape,block", [((5, 128), 128), ((3, 4, 128), 64), ((9, 256), 128),
                                         ((1, 64), 32), ((6, 1024), 128), ((0, 128), 128),
                                         ((4, 32), 32)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("ue8m0", [True, False])
def test_matches_reference_bytes(device, gen, shape, block, dtype, ue8m0):
    x = randn(*shape, gen=gen, dtype=dtype, scale=3.0)
    if x.numel():
        x.view(-1)[0] = 900.0  # beyond the FP8 range before rotation: exercises the scale
    q, s = dsa_ext.hadamard_fp8_quantize(x.to(device), block, ue8m0)
    rq, rs = ref.hadamard_fp8_quantize(x, block, ue8m0)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert q.shape == x.shape and s.shape == (*shape[:-1], shape[-1] // block)
    assert torch.equal(s.cpu(), rs)
    assert torch.equal(q.cpu().view(torch.uint8), rq.view(torch.uint8))


def test_dequantised_rotation_is_close(device, gen):
    x = randn(33, 128, gen=gen, scale=2.0)
    q, s = dsa_ext.hadamard_fp8_quantize(x.to(device))
    deq = ref.fp8_dequantize(q.cpu(), s.cpu())
    want = x.double() @ ref.hadamard_matrix(128) / 128 ** 0.5
    assert ((deq.double() - want).norm() / want.norm()).item() < 0.04  # e4m3 has 3 mantissa bits


def test_opcheck(device, gen):
    x = randn(4, 128, gen=gen, dtype=torch.bfloat16).to(device)
    torch.library.opcheck(torch.ops.dsa.hadamard_fp8_quantize.default, (x, 128, True))


def test_bad_inputs(device):
    with pytest.raises(RuntimeError, match="x must be bfloat16 or float32, got int32"):
        dsa_ext.hadamard_fp8_quantize(torch.ones(2, 128, dtype=torch.int32, device=device))
    with pytest.raises(RuntimeError, match="power of two"):
        dsa_ext.hadamard_fp8_quantize(torch.randn(2, 96, device=device))
    with pytest.raises(ValueError, match="block_size"):
        dsa_ext.hadamard_fp8_quantize(torch.randn(2, 128, device=device), 48)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        torch.ops.dsa.hadamard_fp8_quantize(torch.randn(128, 4, device=device).t())  # raw op
