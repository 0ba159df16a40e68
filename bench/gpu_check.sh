#!/usr/bin/env bash
# The one prepared script for a lent H100/H200 (python3 with torch 2.11+cu130, 16 cores,
# nothing downloadable). Builds for sm_90a with 16 jobs, runs every CUDA test, optionally the
# compute-sanitizer subset, runs `dsa-bench all`, and writes under $OUT:
#   report.json  device, versions, commit, CUDA test counts (passed/failed/skipped), bench rows
#   build.log, tests.log, junit.xml, bench.json, sanitize.log
# Usage (device tool):  DSA_COMMIT=<sha> bash bench/gpu_check.sh [--sanitize] [--no-bench]
# Commit $OUT/report.json as bench/results/<date>-<card>-<sha>.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
SANITIZE=0; BENCH=1
for a in "$@"; do
  case $a in --sanitize) SANITIZE=1;; --no-bench) BENCH=0;; esac
done
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
t0=$(date +%s)

echo "== build (sm_90a, $MAX_JOBS jobs)"
DSA_PTXAS_VERBOSE=1 PYTHON=$PY DSA_BUILD_DIR=build/gpu tools/dev_build.sh > "$OUT/build.log" 2>&1
build_rc=$?
tail -3 "$OUT/build.log"

echo "== CUDA tests"
test_rc=-1
if [ $build_rc -eq 0 ]; then
  timeout ${DSA_TEST_TIMEOUT:-300} $PY -m pytest tests -m cuda -q -rfE --junitxml="$OUT/junit.xml" \
    -p no:cacheprovider > "$OUT/tests.log" 2>&1
  test_rc=$?
  tail -25 "$OUT/tests.log"
fi

san_rc=-1
if [ $SANITIZE -eq 1 ] && [ $build_rc -eq 0 ]; then
  echo "== compute-sanitizer subset"
  : > "$OUT/sanitize.log"
  for tool in memcheck racecheck; do
    timeout 240 compute-sanitizer --tool $tool --error-exitcode 9 $PY bench/sanitize_smoke.py >> "$OUT/sanitize.log" 2>&1
    rc=$?; echo "$tool rc=$rc" | tee -a "$OUT/sanitize.log"
    [ $rc -ne 0 ] && san_rc=$rc || { [ $san_rc -le 0 ] && san_rc=0; }
  done
  tail -5 "$OUT/sanitize.log"
fi

bench_rc=-1
if [ $BENCH -eq 1 ] && [ $build_rc -eq 0 ]; then
  echo "== dsa-bench all"
  timeout ${DSA_BENCH_TIMEOUT:-240} $PY -m dsa_ext.bench.cli all --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
  bench_rc=$?
  tail -40 "$OUT/bench.log"
fi

$PY - "$OUT" "$build_rc" "$test_rc" "$san_rc" "$bench_rc" "$t0" <<'PYEOF'
import json, os, sys, time, subprocess, xml.etree.ElementTree as ET
out, build_rc, test_rc, san_rc, bench_rc, t0 = sys.argv[1], *map(int, sys.argv[2:])
rep = {"schema": "dsa-gpu-check/1", "commit": os.environ.get("DSA_COMMIT", "unknown"),
       "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
       "build_rc": build_rc, "tests_rc": test_rc, "sanitize_rc": san_rc, "bench_rc": bench_rc,
       "wall_s": int(time.time()) - t0}
try:
    import torch
    rep["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    rep["torch"] = torch.__version__; rep["torch_cuda"] = torch.version.cuda
    rep["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                   capture_output=True, text=True).stdout.strip()
    rep["nvcc"] = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
except Exception as e:  # the report must be written whatever failed
    rep["env_error"] = repr(e)
passed = failed = skipped = 0
failures = []
junit = os.path.join(out, "junit.xml")
if os.path.exists(junit):
    for case in ET.parse(junit).getroot().iter("testcase"):
        kinds = {c.tag for c in case}
        if "failure" in kinds or "error" in kinds:
            failed += 1
            msg = next(c for c in case if c.tag in ("failure", "error")).get("message", "")
            failures.append(f"{case.get('classname')}::{case.get('name')}: {msg[:300]}")
        elif "skipped" in kinds:
            skipped += 1
        else:
            passed += 1
rep.update(passed=passed, failed=failed, skipped=skipped, failures=failures)
try:
    import dsa_ext
    rep["build_info"] = dsa_ext.build_info()
except Exception as e:
    rep["build_info_error"] = repr(e)
bj = os.path.join(out, "bench.json")
if os.path.exists(bj):
    rep["bench"] = json.load(open(bj))
json.dump(rep, open(os.path.join(out, "report.json"), "w"), indent=1)
print(f"report: device={rep.get('device')} passed={passed} failed={failed} skipped={skipped} "
      f"build_rc={build_rc} sanitize_rc={san_rc} bench_rc={bench_rc} wall={rep['wall_s']}s")
PYEOF
