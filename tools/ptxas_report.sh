#!/usr/bin/env bash
# ptxas resource report (registers, spills, shared memory, stack) for every CUDA kernel, for
# sm_90a, without a GPU. Exits 1 if any kernel spills or uses local memory for spills.
#   tools/ptxas_report.sh [file.cu ...]     (default: csrc/*/*_launch.cu)
set -uo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-/usr/local/cuda/bin/nvcc}
ARCH=${DSA_PTXAS_ARCH:-"-gencode=arch=compute_90a,code=sm_90a"}
files=("$@"); [ ${#files[@]} -eq 0 ] && files=(csrc/*/*_launch.cu)
status=0
for f in "${files[@]}"; do
  echo "=== $f"
  out=$($NVCC $ARCH -std=c++17 -O3 --expt-relaxed-constexpr -Icsrc -Xptxas=-v,-warn-spills,-warn-lmem-usage \
        -c "$f" -o /dev/null 2>&1) || { echo "$out"; echo "FAILED to compile $f"; status=1; continue; }
  # Keep the report readable: one "Function properties"/"Used" pair per kernel, demangled names.
  echo "$out" | grep -E "Compiling entry|Function properties|spill|Used" | sed 's/^ptxas info    : //'
  if echo "$out" | grep -E "[1-9][0-9]* bytes spill (stores|loads)" >/dev/null; then
    echo "SPILLS in $f"; status=1
  fi
  if echo "$out" | grep -qi "warning.*\(spill\|local memory\)"; then
    echo "local-memory warning in $f"; status=1
  fi
done
exit $status
