"""Reference for hadamard_fp8_quantize: the indexer's orthonormal Hadamard rotation
(SPEC section 5.1 step 3) followed by fp8_quantize (block 128, ue8m0 by default)."""
from __future__ import annotations

import torch

from .cache import fp8_quantize

__all__ = ["hadamard_matrix", "hadamard_transform", "hadamard_fp8_quantize", "walsh_hadamard_butterflies"]


def hadamard_matrix(n: int, dtype=torch.float64) -> torch.Tensor:
    """The n x n Sylvester Hadamard matrix (natural order, entries +-1), n a power of two."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"n must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """``x @ H * D**-0.5`` over the last dim, in fp32 by the fast Walsh-Hadamard butterflies
    (strides 1, 2, 4, ...), the operation order the kernels use, so results agree bit for bit."""
    d = x.shape[-1]
    norm = torch.tensor(1.0, dtype=torch.float32) / torch.sqrt(torch.tensor(float(d), dtype=torch.float32))
    return walsh_hadamard_butterflies(x) * norm


def walsh_hadamard_butterflies(x: torch.Tensor) -> torch.Tensor:
    """Unscaled ``x @ H`` over the last dim in fp32 (``x``'s shape), by the fast Walsh-Hadamard
    butterflies with strides 1, 2, 4, ...; shared by ``hadamard_transform`` and
    ``dsa_ext.modules.hadamard_transform`` so both round the same way as the kernels."""
    d = x.shape[-1]
    if d < 1 or d & (d - 1):
        raise ValueError(f"x.size(-1) must be a power of two, got {d}")
    v = x.float().reshape(-1, d).clone()
    h = 1
    while h < d:
        v = v.view(-1, d // (2 * h), 2, h)
        a, b = v[:, :, 0, :], v[:, :, 1, :]
        v = torch.stack([a + b, a - b], dim=2)
        h *= 2
    return v.reshape(x.shape)


def hadamard_fp8_quantize(x: torch.Tensor, block_size: int = 128, ue8m0: bool = True):
    """``fp8_quantize(hadamard_transform(x), block_size, ue8m0)``: FP8 ``[..., D]`` and fp32
    scales ``[..., D // block_size]``."""
    return fp8_quantize(hadamard_transform(x), block_size, ue8m0)
