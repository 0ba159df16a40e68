"""Drives CMakeLists.txt (the one build description) and puts `_C` into the package.

    pip install --no-build-isolation -e .     # or `pip install .` / `pip wheel .`

Environment: DSA_WITH_CUDA=ON|OFF|AUTO, TORCH_CUDA_ARCH_LIST (default: local GPU, else 9.0a),
MAX_JOBS (parallel compile jobs), DSA_PTXAS_VERBOSE=1 (print ptxas resource usage).
Release wheels: TORCH_CUDA_ARCH_LIST="8.0;8.9;9.0a;10.0+PTX" (tools/build_wheel.sh).

The wheel requires exactly the torch release it is compiled against (torch_requirement below):
the module links torch's C++ API (ATen, c10, pybind11), whose ABI differs between releases.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _cuda_env(env):
    """Point the build at a real CUDA toolkit: /usr/local/bin/nvcc may be a wrapper script that
    makes torch guess CUDA_HOME=/usr/local (TOOLCHAIN.md)."""
    home = env.get("CUDA_HOME") or env.get("CUDA_PATH")
    if not home and Path("/usr/local/cuda/bin/nvcc").exists():
        home = "/usr/local/cuda"
    if home:
        env["CUDA_HOME"] = home
        env["PATH"] = f"{home}/bin:" + env.get("PATH", "")
        env.setdefault("CUDACXX", f"{home}/bin/nvcc")
    return env


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        env = _cuda_env(dict(os.environ))
        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        # A stable build folder keeps ninja/ccache incremental across editable rebuilds.
        build_dir = Path(os.environ.get("DSA_BUILD_DIR", ROOT / "build" / f"cmake-py{sys.version_info[0]}{sys.version_info[1]}")).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DDSA_OUTPUT_DIR={out_dir}",
            f"-DCMAKE_BUILD_TYPE={env.get('DSA_BUILD_TYPE', 'Release')}",
        ]
        for key in ("DSA_WITH_CUDA", "TORCH_CUDA_ARCH_LIST", "DSA_PTXAS_VERBOSE"):
            if env.get(key):
                args.append(f"-D{key}={env[key]}")
        subprocess.check_call(args, env=env)
        jobs = env.get("MAX_JOBS") or str(os.cpu_count() or 2)
        subprocess.check_call(["cmake", "--build", str(build_dir), "-j", jobs], env=env)


def torch_requirement(version):
    """'2.14.1+cu130' -> 'torch==2.14.1': the release the module loads with. `==` without a
    local label also admits 2.14.1+cpu and friends; dsa_ext/__init__.py tells a CUDA build run
    under a CPU-only torch apart at import time, which metadata cannot express."""
    return f"torch=={version.split('+')[0]}"


def _built_torch_version():
    try:
        import torch
    except ImportError:
        sys.exit("dsa_ext: building needs torch in this environment (pip install torch, then "
                 "build with --no-build-isolation so the wheel is compiled against that torch)")
    return torch.__version__


def _have_build_tools():
    for tool in ("cmake", "ninja"):
        if shutil.which(tool) is None:
            sys.exit(f"dsa_ext: '{tool}' not found; pip install {tool} (build with --no-build-isolation)")


_have_build_tools()
setup(
    install_requires=[torch_requirement(_built_torch_version()), "numpy"],
    ext_modules=[CMakeExtension("dsa_ext._C")],
    cmdclass={"build_ext": CMakeBuild},
)
