"""What this install is and what it will run: `python -m dsa_ext` prints it.

The report: dsa_ext, torch (built against / running), CUDA, the architectures compiled, the
device found, and per op the kernel it will use there. On a GPU, which compiled image the driver
loads follows CUDA's rules (`loaded_image`), and the kernel per op follows the launchers'
dispatch (csrc/*/*_launch.cu, `kernel_plan`): this module restates those rules so they can be
read and tested without a GPU (tests/test_env.py fakes device capabilities); the launchers stay
the authority, and a disagreement is a bug in one of the two.
"""
from __future__ import annotations

import os
import platform
from typing import Dict, List, Optional, Tuple

import torch

__all__ = ["parse_archs", "loaded_image", "kernel_plan", "report", "main"]


def parse_archs(arch_list: str) -> Tuple[List[str], List[int]]:
    """TORCH_CUDA_ARCH_LIST-style text ("8.0;9.0a", "8.0 8.6+PTX") -> (cubins like "90a", PTX
    levels like 80)."""
    cubins, ptx = [], []
    for item in arch_list.replace(";", " ").replace(",", " ").split():
        a = item.replace("+PTX", "")
        cubins.append(a.replace(".", ""))
        if item.endswith("+PTX"):
            ptx.append(int(a.rstrip("af").replace(".", "")))
    return cubins, ptx


def loaded_image(capability: Tuple[int, int], arch_list: str) -> Optional[str]:
    """The image the CUDA driver runs on a device of `capability`: the newest cubin of the same
    major version and no newer minor ("a"/"f" feature cubins only on their exact version), else
    the newest PTX not newer than the device, JIT-compiled ("ptx80"); None if there is none (every
    launch then fails with cudaErrorNoKernelImageForDevice)."""
    major, minor = capability
    cubins, ptx = parse_archs(arch_list)
    best = None
    for c in cubins:
        feature = c[-1] in "af"
        cm, cn = int(c[:-1 if feature else None][:-1]), int(c[:-1 if feature else None][-1])
        if cm != major or cn > minor or (feature and cn != minor):
            continue
        key = (cn, feature)
        if best is None or key > best[0]:
            best = (key, c)
    if best is not None:
        return best[1]
    fit = [p for p in ptx if p <= major * 10 + minor]
    return f"ptx{max(fit)}" if fit else None


def _image_level(image: str) -> Tuple[int, bool]:
    """(compute level, has sm_90a features) of an image name."""
    if image.startswith("ptx"):
        return int(image[3:]), False
    feature = image[-1] in "af"
    return int(image[:-1] if feature else image), image == "90a"


def kernel_plan(capability: Optional[Tuple[int, int]], arch_list: str = "",
                env: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The kernel each op family runs: on the CPU (capability None), or on a GPU of `capability`
    with the build's `arch_list` and the environment switches of the launchers."""
    env = dict(os.environ if env is None else env)
    if capability is None:
        gemm = "fp32 at::mm" if env.get("DSA_CPU_GEMM") == "fp32" else \
            "bf16 brgemm where the CPU packs bf16 (else fp32 at::mm)"
        return {fam: "CPU kernel" for fam in ("cache", "hadamard", "topk", "training", "compress")} | {
            "indexer": f"CPU kernel, GEMM tiles: {gemm}",
            "sparse_mla": f"CPU kernel, GEMM tiles: {gemm}",
            "mla_decode": f"CPU kernel, GEMM tiles: {gemm}"}
    image = loaded_image(capability, arch_list)
    if image is None:
        none = f"none: no image for sm_{capability[0]}{capability[1]} in TORCH_CUDA_ARCH_LIST={arch_list!r}"
        return {fam: none for fam in ("cache", "hadamard", "indexer", "topk", "sparse_mla",
                                      "mla_decode", "training", "compress")}
    level, hopper = _image_level(image)
    plan = {fam: f"CUDA SIMT ({image})" for fam in ("cache", "hadamard", "training", "compress")}
    # topk clusters need a cc 9+ device and cluster code in the loaded image (compute_80 PTX
    # JIT-compiled on an H100 has none: the single-CTA kernel then).
    if capability[0] >= 9 and level >= 90:
        plan["topk"] = f"CUDA radix select, clusters of up to 16 CTAs ({image})"
    else:
        plan["topk"] = f"CUDA radix select, one CTA per row, no clusters ({image})"
    # The indexer by the loaded image (indexer_launch.cu dispatch_heads): wgmma on sm_90a, e4m3
    # mma.sync on images of sm_89+, else (sm_80 / sm_86 code) the FP8 tiles dequantised to bf16 in
    # shared memory for bf16 mma.sync; DSA_INDEXER_MMA=sync / bf16 force the latter two.
    mx = "; MXFP4 keys: mma.sync e4m3" if level >= 89 else "; MXFP4 keys: refused (no FP8 MMA in this image)"
    if env.get("DSA_INDEXER_MMA") == "bf16" or level < 89:
        plan["indexer"] = f"CUDA mma.sync bf16 after e4m3 -> bf16 in shared memory ({image}){mx}"
    elif hopper and env.get("DSA_INDEXER_MMA") != "sync":
        plan["indexer"] = f"CUDA wgmma e4m3 (QGMMA, sm_90a){mx}"
    else:
        plan["indexer"] = f"CUDA mma.sync e4m3 ({image}){mx}"
    # sparse_mla_launch.cu fwd_kernel_selected and mla_decode_launch.cu overlap_selected /
    # wgmma_opted_in: on a cc 9 device without the sm_90a image an explicit wgmma / ws / overlap
    # is refused (cudaErrorNoKernelImageForDevice); off Hopper every switch falls back to mma.sync.
    sm90a = hopper and capability[0] == 9
    fwd = env.get("DSA_SPARSE_MLA_FWD") or ("wgmma" if env.get("DSA_SPARSE_MLA_WGMMA") == "1" else "")
    # sparse_mla_launch.cu det_reduce_mode / sparse_mla_bwd_workspace
    det_env = env.get("DSA_SPARSE_MLA_DET_REDUCE") or ""
    det = ("; deterministic bwd: " + det_env + " reduction of token chunks (DSA_SPARSE_MLA_DET_REDUCE)"
           if det_env in ("list", "bitmap") else
           "; deterministic bwd: fixed-point integer atomics (one pass where S x d_qk x 8 bytes fit"
           " the scratch budget, else passes over row ranges)")
    mma = f"mma.sync bf16 ({image})"
    bwd_env = env.get("DSA_SPARSE_MLA_BWD") or ""
    bwd = (f"wgmma bf16 for H = 64 / 128, {mma} for other H" if sm90a and bwd_env in ("", "wgmma")
           else mma)
    if bwd_env == "wgmma" and capability[0] == 9 and not sm90a:
        plan["sparse_mla"] = f"refused with DSA_SPARSE_MLA_BWD=wgmma: needs the sm_90a image (image {image})"
    elif fwd in ("ws", "ws-pair", "wgmma") and capability[0] == 9 and not sm90a:
        plan["sparse_mla"] = f"refused with DSA_SPARSE_MLA_FWD={fwd}: needs the sm_90a image (image {image})"
    elif sm90a and fwd in ("", "ws-pair"):
        plan["sparse_mla"] = (f"CUDA fwd: warp-specialised wgmma (ws) for H = 64 / 128, H = 128 as 2-CTA clusters"
                              f" sharing each gather; {mma} for other H; bwd {bwd}{det}")
    elif sm90a and fwd == "ws":
        plan["sparse_mla"] = f"CUDA fwd: warp-specialised wgmma (ws) for H = 64 / 128, unpaired; {mma} for other H; bwd {bwd}{det}"
    elif sm90a and fwd == "wgmma":
        plan["sparse_mla"] = f"CUDA fwd: wgmma bf16 for 64-head blocks, {mma} otherwise; bwd {bwd}{det}"
    else:
        plan["sparse_mla"] = f"CUDA {mma}{det}" if bwd == mma else f"CUDA fwd: {mma}; bwd {bwd}{det}"
    dec = env.get("DSA_MLA_DECODE_KERNEL") or ("wgmma" if env.get("DSA_MLA_DECODE_WGMMA") == "1" else "")
    if dec in ("overlap", "wgmma") and capability[0] == 9 and not sm90a:
        plan["mla_decode"] = f"refused with DSA_MLA_DECODE_KERNEL={dec}: needs the sm_90a image (image {image})"
    elif sm90a and dec in ("", "overlap"):
        plan["mla_decode"] = (f"CUDA overlap kernel (wgmma, dequantisation overlapped; H = 128 a 2-CTA cluster) "
                              f"for V3.2 FP8 caches at H = 64 / 128, {mma} otherwise")
    elif sm90a and dec == "wgmma":
        plan["mla_decode"] = f"CUDA wgmma bf16 for 64-head blocks, {mma} otherwise"
    else:
        plan["mla_decode"] = f"CUDA {mma}"
    return plan


def report() -> dict:
    """The facts `python -m dsa_ext` prints."""
    import dsa_ext
    info = dsa_ext.build_info()
    out = {"dsa_ext": dsa_ext.__version__, "torch_running": torch.__version__,
           "torch_built_against": info.get("torch_version"),
           "torch_required": info.get("torch_requirement", "unknown (built before the record)"),
           "cuda_built": info.get("cuda_version"),
           "archs_compiled": info.get("cuda_archs"), "python": platform.python_version()}
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        out["device"] = f"{torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]})"
        out["image_loaded"] = loaded_image(cap, info.get("cuda_archs") or "")
        out["kernels"] = kernel_plan(cap, info.get("cuda_archs") or "")
    else:
        out["device"] = f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, " \
                        f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}"
        out["kernels"] = kernel_plan(None)
    out["ops"] = info["ops"]
    return out


def main() -> None:
    r = report()
    width = max(len(k) for k in r)
    for key, value in r.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k:<24} {', '.join(v) if isinstance(v, list) else v}")
        else:
            print(f"{key:<{width}}  {value}")
