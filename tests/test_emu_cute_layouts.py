"""The emulator's PTX layouts against an independent oracle, CuTe (test only; CuTe is never in
the product): csrc/emu/cute_check/cute_check.cpp, compiled on the host against the CuTe headers
of the `nvidia-cutlass` wheel, compares every (thread, value) -> coordinate entry of the
mma.sync (bf16 m16n8k16, e4m3 m16n8k32), ldmatrix (x1/x2/x4, .trans) and wgmma (accumulator,
register A) fragments, and every element address of CuTe's GMMA shared-memory atoms (K- and
MN-major, no swizzle / 32B / 64B / 128B, through the descriptors make_gmma_desc builds) with
emu::ptx (csrc/emu/ptx.cpp). Skipped only where the CuTe headers are not installed."""
import hashlib
import importlib.util
import os
import pathlib
import subprocess

import pytest

pytestmark = pytest.mark.emu

ROOT = pathlib.Path(__file__).resolve().parents[1]
EMU = ROOT / "csrc" / "emu"
OUT = pathlib.Path(os.environ.get("DSA_EMU_BUILD_DIR", ROOT / "build" / "emu")) / "cute_check"
CUDA_INCLUDE = pathlib.Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"


def cute_include():
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return None
    inc = pathlib.Path(list(spec.submodule_search_locations)[0]) / "source" / "include"
    return inc if (inc / "cute" / "tensor.hpp").exists() else None


def build_cute_check() -> pathlib.Path:
    inc = cute_include()
    if inc is None:
        pytest.skip("CuTe headers not installed (pip install nvidia-cutlass)")
    # CuTe's headers include <cuda_runtime_api.h> and libcu++ (<cuda/std/...>), host-usable.
    if not (CUDA_INCLUDE / "cuda_runtime_api.h").exists() or not (CUDA_INCLUDE / "cccl").exists():
        pytest.skip(f"CUDA toolkit headers (cuda_runtime_api.h, cccl) not under {CUDA_INCLUDE}")
    # The emulator's own flags for ptx.cpp / runtime.cpp (csrc/emu/build.py, loaded by path).
    spec = importlib.util.spec_from_file_location("dsa_emu_build", EMU / "build.py")
    emu_build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(emu_build)
    COMMON, CXX = emu_build.COMMON, emu_build.CXX

    sources = [EMU / "cute_check" / "cute_check.cpp", EMU / "ptx.cpp", EMU / "runtime.cpp"]
    h = hashlib.sha256(str(inc).encode() + " ".join(COMMON).encode())
    for p in sources + [EMU / "ptx.h", EMU / "emu.h"]:
        h.update(p.read_bytes())
    exe = OUT / f"cute_check.{h.hexdigest()[:16]}"
    if exe.exists():
        return exe
    OUT.mkdir(parents=True, exist_ok=True)
    cute_flags = ["-std=c++17", "-O0", "-w", f"-I{inc}", f"-I{CUDA_INCLUDE}", f"-I{CUDA_INCLUDE / 'cccl'}",
                  f"-I{ROOT / 'csrc'}"]
    objs = []
    for src in sources:
        obj = OUT / (src.stem + ".o")
        flags = cute_flags if src.parent.name == "cute_check" else COMMON + ["-O1"]
        r = subprocess.run([CXX, *flags, "-c", str(src), "-o", str(obj)], capture_output=True, text=True)
        assert r.returncode == 0, f"compiling {src.name}:\n{r.stderr[-4000:]}"
        objs.append(str(obj))
    r = subprocess.run([CXX, *objs, "-o", str(exe), "-ldl", "-lpthread"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    return exe


def test_emulator_layouts_match_cute():
    exe = build_cute_check()
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    # On the host CuTe's cvta helper prints a notice and returns 0; the check sets the start
    # address of each descriptor itself.
    lines = [l for l in r.stdout.splitlines() if "cast_smem_ptr_to_uint" not in l]
    failed = [l for l in lines if l.startswith("FAIL") or "MISMATCH" in l]
    assert r.returncode == 0 and not failed, "\n".join(failed or lines[-20:])
    checked = [l for l in lines if l.startswith("ok ")]
    names = " | ".join(checked)
    for atom in ("mma m16n8k16 bf16 A", "mma m16n8k32 e4m3 B", "ldmatrix x4.trans", "wgmma D m64n256",
                 "wgmma A registers e4m3", "gmma smem bf16 MN SW128", "gmma smem bf16 MN INTER",
                 "gmma smem e4m3 K SW128", "gmma smem bf16 K SW32"):
        assert atom in names, f"{atom} not checked"
    assert lines[-1] == "0 atoms failed"
