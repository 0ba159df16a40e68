"""Drop-in adapters for code written against FlashMLA, DeepGEMM and vLLM (SPEC section 9).

Swap the import and keep the call sites::

    import flash_mla                      ->  from dsa_ext.compat import flash_mla
    import deep_gemm                      ->  from dsa_ext.compat import deep_gemm
    from vllm import _custom_ops as ops   ->  from dsa_ext.compat import vllm as ops

Each function has the peer's name, argument names and order, defaults, input checks, return
tuple, output strides and conventions (FlashMLA's ``+inf`` lse for a query with no valid key,
its ``[B, H, s_q]`` decode lse, DeepGEMM's 1024-byte-aligned logits row stride, vLLM's
in-place outputs and row-relative top-k indices). Underneath they call ``torch.ops.dsa``: there
is no second attention / indexer / top-k kernel here, only argument translation and, where an
op lacks a form the peer has, a documented PyTorch workaround (each module says which).

Everything runs on CPU tensors too (our ops have CPU kernels), so programs written for the
peers can be tested on machines without a GPU. What an op cannot serve raises
``NotImplementedError`` naming the argument; bad input raises the peer's kind of error
(``AssertionError`` where FlashMLA's Python asserts, ``RuntimeError`` where its C++ or
DeepGEMM / vLLM check).
"""
from . import deep_gemm, flash_mla, vllm  # noqa: F401

__all__ = ["flash_mla", "deep_gemm", "vllm"]
