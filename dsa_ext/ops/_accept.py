"""What the typed wrappers accept beyond the raw ``torch.ops.dsa`` contract (SPEC section 3).

The raw ops take exactly the SPEC's dtypes and contiguous tensors, so their kernels never guess.
Users hold other, equivalent forms — a strided view from a quantiser, int64 index math, a
float8 view of a byte cache, a ``[S, 1]`` scale — and the wrappers translate them here, once,
with device-side torch ops only (no host synchronisation: CUDA-graph and torch.compile safe):

* ``dense``: a non-contiguous input is copied to a contiguous one. This is the only copy the
  wrappers ever make, and it happens only for inputs the kernels read densely; each wrapper's
  docstring says which of its arguments may be copied. In-place outputs (caches) are never
  copied — a non-contiguous cache is refused by the op, since writing a copy would be lost.
* ``int32_index``: int64 index / length / bound tensors become int32 after clamping to the
  int32 range. Clamping keeps every rule of the ops: an index beyond 2**31 - 1 is out of range
  (skipped) either way, a bound beyond it is clamped to ``[0, S]`` by the kernels anyway, and a
  negative index below -2**31 stays negative (skipped).
* ``byte_view`` / ``fp8_view``: ``float8_e4m3fn`` and ``uint8`` tensors hold the same bytes; a
  cache is viewed as uint8, FP8 operands as float8_e4m3fn (no copy).
* ``scale_vector``: a per-row scale ``[S, 1]`` (what ``fp8_quantize`` returns for
  ``block_size = D``) is viewed as ``[S]``.

Anything else (a wrong dtype, shape or device) goes to the op unchanged, whose error names the
argument and what was expected.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_INT32_MIN, _INT32_MAX = -(2 ** 31), 2 ** 31 - 1
_FP8 = torch.float8_e4m3fn


def dense(t: Optional[Tensor]) -> Optional[Tensor]:
    """``t`` itself when contiguous, else a contiguous copy (None stays None)."""
    if t is None or t.is_contiguous():
        return t
    return t.contiguous()


def int32_index(t: Optional[Tensor], keep_strides: bool = False) -> Optional[Tensor]:
    """int64 -> int32 clamped to the int32 range; then dense (unless ``keep_strides``, for an
    op that reads a row stride itself). Other dtypes pass through."""
    if t is None:
        return t
    if t.dtype == torch.int64:
        t = t.clamp(_INT32_MIN, _INT32_MAX).to(torch.int32)
    return t if keep_strides else dense(t)


def fp32(t: Optional[Tensor]) -> Optional[Tensor]:
    """A floating tensor as float32 (differentiable cast), then dense."""
    if t is not None and t.is_floating_point() and t.dtype != torch.float32:
        t = t.float()
    return dense(t)


def byte_view(t: Tensor) -> Tensor:
    """A float8_e4m3fn cache viewed as its uint8 bytes (same storage)."""
    return t.view(torch.uint8) if t.dtype == _FP8 else t


def fp8_view(t: Tensor) -> Tensor:
    """uint8 bytes of FP8 values viewed as float8_e4m3fn (same storage); then dense."""
    return dense(t.view(_FP8) if t.dtype == torch.uint8 else t)


def scale_vector(t: Tensor) -> Tensor:
    """A ``[S, 1]`` per-row scale as ``[S]``; then dense."""
    if t.dim() == 2 and t.shape[1] == 1:
        t = t[:, 0]
    return dense(t)
