"""Typed, documented wrappers of torch.ops.dsa.*, one module per op family (mirrors csrc/).
Each family module also registers its fake kernels (and autograd, where differentiable)."""
from .cache import *  # noqa: F401,F403
from .hadamard import *  # noqa: F401,F403
from .indexer import *  # noqa: F401,F403
from .topk import *  # noqa: F401,F403
from .sparse_mla import *  # noqa: F401,F403
from .mla_decode import *  # noqa: F401,F403
from .training import *  # noqa: F401,F403
from .compress import *  # noqa: F401,F403
# `from .sparse_mla import *` binds the name `sparse_mla` to the function dsa_ext.sparse_mla,
# which shadows the submodule: take the family modules from sys.modules.
import sys as _sys

FAMILIES = ("cache", "hadamard", "indexer", "topk", "sparse_mla", "mla_decode", "training", "compress")
__all__ = [n for f in FAMILIES for n in _sys.modules[f"{__name__}.{f}"].__all__]
