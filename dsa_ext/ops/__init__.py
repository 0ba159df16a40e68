"""Typed, documented wrappers of torch.ops.dsa.*, one module per op family (mirrors csrc/).
Each family module also registers its fake kernels (and autograd, where differentiable)."""
from .cache import *  # noqa: F401,F403
from .hadamard import *  # noqa: F401,F403
from .indexer import *  # noqa: F401,F403
from .topk import *  # noqa: F401,F403
from .sparse_mla import *  # noqa: F401,F403
from .mla_decode import *  # noqa: F401,F403
from . import cache, hadamard, indexer, topk, sparse_mla, mla_decode

__all__ = [n for m in (cache, hadamard, indexer, topk, sparse_mla, mla_decode) for n in m.__all__]
