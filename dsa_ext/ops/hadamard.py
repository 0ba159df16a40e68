"""The lightning indexer's Hadamard rotation fused with its FP8 quantisation."""
from __future__ import annotations

from typing import Tuple

import torch

from ._accept import dense

__all__ = ["hadamard_fp8_quantize"]


def hadamard_fp8_quantize(x: torch.Tensor, block_size: int = 128,
                          ue8m0: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``x [..., D]`` by the orthonormal Hadamard transform (``x @ H * D**-0.5``,
    Sylvester/natural order, as the fast-hadamard-transform package DeepSeek-V3.2 uses) and
    quantise the result to FP8 in groups of ``block_size`` with the ``fp8_quantize`` rule,
    in one pass: the rotated tensor never goes to memory.

    Args:
        x: ``[..., D]`` bf16 or fp32, contiguous; D a power of two (CUDA: 32 <= D <= 1024).
        block_size: quantisation group along the last dim; divides D (CUDA: >= D / 32).
        ue8m0: round each scale up to a power of two (V3.2's default).

    Returns:
        ``x_fp8 [..., D]`` float8_e4m3fn and ``scale [..., D // block_size]`` fp32; the bytes
        equal ``fp8_quantize(hadamard_transform(x))`` of ``dsa_ext.reference``.
    """
    return torch.ops.dsa.hadamard_fp8_quantize(dense(x), block_size, ue8m0)


@torch.library.register_fake("dsa::hadamard_fp8_quantize")
def _hadamard_fp8_quantize_fake(x, block_size=128, ue8m0=True):
    torch._check(x.dim() >= 1, lambda: "x must have at least 1 dimension")
    d = x.shape[-1]
    torch._check(block_size > 0 and d % block_size == 0,
                 lambda: f"block_size must divide x.size(-1) = {d}, got {block_size}")
    return (x.new_empty(x.shape, dtype=torch.float8_e4m3fn),
            x.new_empty(*x.shape[:-1], d // block_size, dtype=torch.float32))
