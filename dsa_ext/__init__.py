"""dsa_ext: DeepSeek Sparse Attention (DSA) kernels for PyTorch.

Importing the package loads the compiled extension, which registers every op under
``torch.ops.dsa``, then registers the fake (meta) kernels and autograd formulas.
The typed Python functions below are the documented way to call the ops.
"""
import os as _os

import torch


def _load_extension():
    """Import the compiled module, or say in plain words why it cannot be and what to do."""
    try:
        from . import _C  # noqa: F401  (registers torch.ops.dsa.*)
    except ImportError as e:
        here = _os.path.dirname(_os.path.abspath(__file__))
        built = [f for f in _os.listdir(here) if f.startswith("_C") and f.endswith(".so")]
        if not built:
            raise ImportError(
                f"dsa_ext's compiled module (_C*.so) is not in {here}: this is a source tree "
                "without a build (Python imports it instead of an installed dsa_ext because it "
                "is in the current directory or on sys.path). Build it in place with "
                "`tools/dev_build.sh` (or `pip install --no-build-isolation -e .`), or run from "
                "another directory to use the installed package.") from e
        if "undefined symbol" in str(e):
            raise ImportError(
                f"dsa_ext's compiled module {built[0]} does not load with the running torch "
                f"{torch.__version__}: it was built against another torch release (the C++ ABI "
                "differs between releases). Rebuild dsa_ext against this torch, or install the "
                f"torch it was built for. ({e})") from e
        raise


_load_extension()
from . import _C  # noqa: E402,F401
from .ops import *  # noqa: E402,F401,F403
from .ops import __all__ as _ops_all  # noqa: E402
from . import reference  # noqa: E402,F401
from .modules import V4Attention, V4LayerCache  # noqa: E402,F401  (DeepSeek-V4 layers, dsa_ext.v4)

__version__ = "0.1.0"

OP_NAMES = (
    "fp8_quantize", "indexer_k_cache_write", "indexer_k_cache_gather",
    "mla_kv_cache_write", "mla_kv_cache_gather", "hadamard_fp8_quantize",
    "indexer_logits", "paged_indexer_logits", "indexer_topk",
    "topk_indices", "topk_slot_ids",
    "sparse_mla_fwd", "sparse_mla_bwd", "sparse_mla_decode",
    "indexer_train_logits", "indexer_train_logits_bwd", "sparse_attention_target",
    "indexer_kl_loss_sparse", "indexer_kl_loss_dense",
    "v4_compress", "v4_compress_step",
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


__all__ = list(_ops_all) + ["build_info", "reference", "OP_NAMES", "V4Attention", "V4LayerCache"]
