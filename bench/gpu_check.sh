#!/usr/bin/env bash
# The one prepared script for a lent H100/H200 (python3 with torch 2.11+cu130, 16 cores,
# nothing downloadable). Builds for sm_90a with 16 jobs, runs every CUDA test, optionally the
# compute-sanitizer subset, runs `dsa-bench all`, and writes under $OUT:
#   report.json  device, versions, commit, CUDA test counts (passed/failed/skipped), bench rows
#   build.log, tests.log, junit.xml, bench.log, sanitize.log
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
  # One family per call, each under its own time limit, so one slow family cannot take the
  # others' rows with it; e2e in quick mode (4K-16K: its dense baseline at 128K takes minutes).
  echo "== dsa-bench (SPEC section 6 shapes; e2e --quick)"
  bench_rc=0; : > "$OUT/bench.log"
  for fam in cache indexer topk attn-fwd attn-bwd decode e2e; do
    extra=""; [ $fam = e2e ] && extra="--quick"
    timeout ${DSA_BENCH_FAMILY_TIMEOUT:-75} $PY -m dsa_ext.bench.cli $fam $extra --budget 0.2 \
      --json "$OUT/bench-$fam.json" >> "$OUT/bench.log" 2>&1
    rc=$?; echo "dsa-bench $fam rc=$rc"; [ $rc -ne 0 ] && bench_rc=$rc
  done
  grep -E "^(cache|indexer|topk|attn_fwd|attn_bwd|decode|e2e)/" "$OUT/bench.log" | cut -c1-160 | tail -60
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
except Exception as e:  # the report must be written whatever failed
    rep["env_error"] = repr(e)
for key, cmd in (("driver", ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
                 ("nvcc", ["nvcc", "--version"])):
    try:
        rep[key] = subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    except Exception as e:
        rep[key] = f"unavailable ({type(e).__name__})"
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
import glob
rep["bench"] = []
for bj in sorted(glob.glob(os.path.join(out, "bench-*.json"))):
    rep["bench"].append(json.load(open(bj)))
    os.remove(bj)  # folded into report.json: at most 8 files come back from the device
json.dump(rep, open(os.path.join(out, "report.json"), "w"), indent=1)
print(f"report: device={rep.get('device')} passed={passed} failed={failed} skipped={skipped} "
      f"build_rc={build_rc} sanitize_rc={san_rc} bench_rc={bench_rc} wall={rep['wall_s']}s")
PYEOF
