"""dsa_ext: DeepSeek Sparse Attention (DSA) kernels for PyTorch.

Importing the package loads the compiled extension, which registers every op under
``torch.ops.dsa``, then registers the fake (meta) kernels and autograd formulas.
The typed Python functions below are the documented way to call the ops.
"""
import os as _os

import torch


def _check_torch():
    """Refuse, in plain words, a torch other than the one _C was compiled against, before
    loading _C: otherwise the loader's 'undefined symbol' (or a crash) is all one gets. The record
    is dsa_ext/_build_info.py, written by the build; DSA_SKIP_TORCH_CHECK=1 skips this."""
    try:
        from . import _build_info as built
    except ImportError:
        return  # a source tree without a build: _load_extension says so
    if _os.environ.get("DSA_SKIP_TORCH_CHECK") == "1":
        return
    release = built.TORCH_VERSION.split("+")[0]
    problems = []
    if torch.__version__.split("+")[0] != release:
        problems.append(f"torch {torch.__version__} is running")
    if built.WITH_CUDA and not torch.version.cuda:
        problems.append(f"the running torch {torch.__version__} is a CPU-only build (this "
                        "dsa_ext links torch's CUDA libraries)")
    elif built.WITH_CUDA and torch.version.cuda.split(".")[0] != built.TORCH_CUDA_VERSION.split(".")[0]:
        problems.append(f"the running torch is built for CUDA {torch.version.cuda}")
    if problems:
        cuda = f" (CUDA {built.TORCH_CUDA_VERSION})" if built.WITH_CUDA else " (CPU only)"
        raise ImportError(
            f"dsa_ext was compiled against torch {built.TORCH_VERSION}{cuda}, but "
            + "; ".join(problems) + ". Its compiled module uses torch's C++ ABI, which differs "
            f"between torch releases, so it only loads with torch {release} (elsewhere loading "
            "fails with an 'undefined symbol' error). Fix: install that "
            f"torch (`pip install torch=={release}`), or rebuild dsa_ext against the torch you "
            "have (`pip install --no-build-isolation --force-reinstall --no-deps <dsa_ext "
            "sdist or source dir>`). DSA_SKIP_TORCH_CHECK=1 skips this check.")


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


_check_torch()
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
    "mxfp4_quantize", "mxfp4_indexer_k_cache_write",
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
    try:
        from . import _build_info as built
        info["torch_requirement"] = f"torch=={built.TORCH_VERSION.split('+')[0]}"
    except ImportError:  # built before the record existed
        pass
    return info


__all__ = list(_ops_all) + ["build_info", "reference", "OP_NAMES", "V4Attention", "V4LayerCache"]
