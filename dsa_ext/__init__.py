"""dsa_ext: DeepSeek Sparse Attention (DSA) kernels for PyTorch.

Importing the package loads the compiled extension, which registers every op under
``torch.ops.dsa``, then registers the fake (meta) kernels and autograd formulas.
The typed Python functions below are the documented way to call the ops.
"""
import torch

from . import _C  # noqa: F401  (registers torch.ops.dsa.*)
from .ops import *  # noqa: F401,F403
from .ops import __all__ as _ops_all
from . import reference  # noqa: F401

__version__ = "0.1.0"

OP_NAMES = (
    "fp8_quantize", "indexer_k_cache_write", "indexer_k_cache_gather",
    "mla_kv_cache_write", "mla_kv_cache_gather", "hadamard_fp8_quantize",
    "indexer_logits", "paged_indexer_logits", "indexer_topk",
    "topk_indices", "topk_slot_ids",
    "sparse_mla_fwd", "sparse_mla_bwd", "sparse_mla_decode",
    "indexer_train_logits", "indexer_train_logits_bwd", "sparse_attention_target",
    "indexer_kl_loss_sparse", "indexer_kl_loss_dense",
)


def build_info() -> dict:
    """How the extension was built: torch and CUDA versions, the CUDA architectures compiled,
    and, per op, which dispatch keys (CPU / CUDA) have a kernel."""
    info = dict(_C._build_info())
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    info["ops"] = {
        name: [key for key in ("CPU", "CUDA") if has(f"dsa::{name}", key)] for name in OP_NAMES
    }
    info["cuda_ops"] = [n for n, keys in info["ops"].items() if "CUDA" in keys]
    info["runtime_torch_version"] = torch.__version__
    return info


__all__ = list(_ops_all) + ["build_info", "reference", "OP_NAMES"]
