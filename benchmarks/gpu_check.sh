#!/usr/bin/env bash
# GPU check: build, test and measure everything on an NVIDIA machine that already has torch, triton
# and nvcc, with no internet. Usage: benchmarks/gpu_check.sh OUTDIR   (default benchmarks/out/gpu)
# Writes logs, CSVs and plots into OUTDIR and prints one summary table last. Budget: < 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/out/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
step() {  # step NAME TIMEOUT_S CMD...: run with a time limit, log to OUTDIR/NAME.log, record the outcome
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "=== $name: $*"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  printf '%-14s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - t0))" "$OUT/$name.log" >>"$SUMMARY"
  return $rc
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv >"$OUT/gpu.txt" 2>&1
# Build in place against the installed torch: no downloads, no build isolation. Hopper only, to fit the budget.
step build 300 env EARLYEXIT_CUDA_ARCHS="${EARLYEXIT_CUDA_ARCHS:-90}" MAX_JOBS=8 \
  $PY -m pip install --no-build-isolation --no-deps --no-index -e .
step env 60 $PY -m earlyexit.env
step tests 240 $PY -m pytest -q -rs -x tests
step bench_exit 240 $PY benchmarks/bench_exit_check.py --set reduced --out "$OUT"
for extra in bench_compaction bench_generate; do
  [ -f "benchmarks/$extra.py" ] && step "$extra" 150 $PY "benchmarks/$extra.py" --quick --out "$OUT"
done

echo
echo "=== summary ($(head -n 2 "$OUT/gpu.txt" | tail -n 1))"
cat "$SUMMARY"
grep -h -A 40 '^provider' "$OUT/bench_exit.log" 2>/dev/null | head -n 60
