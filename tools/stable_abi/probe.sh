#!/usr/bin/env bash
# Stable-ABI probe (see hadamard_stable.cpp): build one op's CPU glue against the torch in
# BUILD_PY (default .venv, torch 2.14.1) targeting the stable ABI of TORCH_TARGET (default 2.13),
# check it imports no C++ symbol of torch (only the C shim), record the real dsa_ext op's bytes
# for random inputs, then load the probe under the torch of RUN_PY (default /tmp/t213/bin/python,
# torch 2.13.0) and compare bit for bit.
#   tools/stable_abi/probe.sh [BUILD_PY] [RUN_PY]
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD_PY=${1:-.venv/bin/python}
RUN_PY=${2:-/tmp/t213/bin/python}
TARGET=${TORCH_TARGET:-0x020d000000000000}   # (2 << 56) | (13 << 48): torch 2.13
OUT=${PROBE_DIR:-/tmp/dsa_stable_probe}
mkdir -p "$OUT"
TI=$("$BUILD_PY" -c "import torch.utils.cpp_extension as c; print(c.include_paths()[0])")
TL=$("$BUILD_PY" -c "import torch.utils.cpp_extension as c; print(c.library_paths()[0])")
echo "::: compile against $("$BUILD_PY" -c 'import torch; print(torch.__version__)'), TORCH_TARGET_VERSION=$TARGET"
time g++ -std=c++17 -O2 -shared -fPIC -DTORCH_TARGET_VERSION="$TARGET" -I"$TI" -Icsrc \
  tools/stable_abi/hadamard_stable.cpp -o "$OUT/probe.so" -L"$TL" -ltorch_cpu -lc10
echo "::: C++ symbols of torch the probe imports (stable ABI: none, only aoti_torch_*/torch_* C functions)"
cxx=$(nm -D --undefined-only "$OUT/probe.so" | awk '{print $2}' | grep -E '^_ZN(3c10|2at|5torch)' || true)
[ -z "$cxx" ] || { echo "FAIL: $cxx" | c++filt; exit 1; }
nm -D --undefined-only "$OUT/probe.so" | awk '{print $2}' | grep -cE '^(aoti_torch|torch)_' | sed 's/^/C shim functions imported: /'
echo "::: expected bytes from dsa_ext.hadamard_fp8_quantize under $BUILD_PY"
"$BUILD_PY" - "$OUT" <<'PY'
import sys, torch, dsa_ext
g = torch.Generator().manual_seed(0)
cases = []
for shape, dt, block, ue in [((7, 128), torch.float32, 128, True), ((3, 5, 256), torch.bfloat16, 64, False),
                             ((1, 1024), torch.float32, 128, False), ((0, 64), torch.bfloat16, 32, True)]:
    x = (torch.randn(shape, generator=g) * 3).to(dt)
    if x.numel():
        x.view(-1)[0] = float("nan")
    q, s = dsa_ext.hadamard_fp8_quantize(x, block, ue)
    cases.append((x, block, ue, q.view(torch.uint8), s))
torch.save(cases, sys.argv[1] + "/expected.pt")
print(len(cases), "cases")
PY
echo "::: load and compare under $RUN_PY"
"$RUN_PY" - "$OUT" <<'PY'
import sys, torch
torch.ops.load_library(sys.argv[1] + "/probe.so")
op = torch.ops.dsa_stable_probe.hadamard_fp8_quantize
for x, block, ue, q_ref, s_ref in torch.load(sys.argv[1] + "/expected.pt"):
    q, s = op(x, block, ue)
    assert q.dtype == torch.float8_e4m3fn and torch.equal(q.view(torch.uint8), q_ref), (x.shape, block)
    assert torch.equal(s, s_ref), (x.shape, block)
try:
    op(torch.randn(4, 100), 128, True)
    raise SystemExit("FAIL: a bad size was accepted")
except RuntimeError as e:
    assert "power of two" in str(e), e
print(f"torch {torch.__version__}: the stable-ABI probe loads and matches dsa_ext's bytes on every case")
PY
