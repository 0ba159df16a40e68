#!/usr/bin/env bash
# Build the extension in place (dsa_ext/_C*.so in this tree) for development; incremental with
# ninja and ccache. Then run tests with `PYTHONPATH=$PWD python -m pytest tests/...`.
#   DSA_WITH_CUDA=OFF tools/dev_build.sh   # skip the CUDA parts
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} PATH=${CUDA_HOME:-/usr/local/cuda}/bin:$PATH
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
export CCACHE_BASEDIR=${CCACHE_BASEDIR:-/work} CCACHE_DIR=${CCACHE_DIR:-/work/.ccache}
PY=${PYTHON:-python3}
BUILD=${DSA_BUILD_DIR:-build/dev}
mkdir -p "$(dirname "$BUILD")"
cmake -S . -B "$BUILD" -G Ninja -DPython_EXECUTABLE="$(command -v $PY)" \
  -DDSA_OUTPUT_DIR="$PWD/dsa_ext" -DTORCH_CUDA_ARCH_LIST="$TORCH_CUDA_ARCH_LIST" \
  -DDSA_WITH_CUDA="${DSA_WITH_CUDA:-AUTO}" > "$BUILD.configure.log" 2>&1 || { cat "$BUILD.configure.log"; exit 1; }
# One build at a time in this tree (parallel sessions/helpers share it): wait for the lock.
exec 9>"$BUILD.lock"; flock 9
cmake --build "$BUILD" -j "${MAX_JOBS:-2}"
