#!/usr/bin/env bash
# ptxas resource report (registers, spills, shared memory, stack) for every CUDA kernel, for
# sm_90a, without a GPU. Exits 1 if any kernel spills, uses local memory for spills, or has
# its wgmma serialised by ptxas (C7520).
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
  # One line per kernel: demangled name, registers, shared memory, stack, spills.
  echo "$out" | awk '
    /Compiling entry function/ { match($0, /\x27[^\x27]+\x27/); name = substr($0, RSTART + 1, RLENGTH - 2) }
    /bytes stack frame/ { n = split($0, w, /[^0-9]+/); k = 0; for (i = 1; i <= n; i++) if (w[i] != "") v[++k] = w[i];
      stack = v[1]; spill = v[2] "+" v[3] }
    /Used [0-9]+ registers/ { match($0, /Used [0-9]+ registers/); regs = substr($0, RSTART + 5, RLENGTH - 15);
      smem = "0"; if (match($0, /[0-9]+ bytes smem/)) smem = substr($0, RSTART, RLENGTH - 11);
      printf "  regs %3s  smem %6s  stack %4s  spill(st+ld) %-7s %s\n", regs, smem, stack, spill, name }' |
    c++filt 2>/dev/null || true
  if echo "$out" | grep -E "[1-9][0-9]* bytes spill (stores|loads)" >/dev/null; then
    echo "SPILLS in $f"; status=1
  fi
  # ptxas reports serialised wgmma as an "info" (C7520), not a warning: a kernel whose wgmma
  # run one at a time loses most of its MMA rate, so it fails here like a spill.
  if echo "$out" | grep -q "C7520"; then
    echo "$out" | grep "C7520" | c++filt 2>/dev/null; echo "WGMMA SERIALISED (C7520) in $f"; status=1
  fi
  if echo "$out" | grep -qi "warning.*\(spill\|local memory\)"; then
    echo "local-memory warning in $f"; status=1
  fi
done
exit $status
