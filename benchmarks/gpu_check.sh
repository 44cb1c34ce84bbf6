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
BUDGET=${GPU_CHECK_BUDGET_S:-450}  # every step ends by this many seconds (its limit is cut to fit): < 8 min
step() {  # step NAME TIMEOUT_S CMD...: run with a time limit, log to OUTDIR/NAME.log, record the outcome
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - SECONDS))
  if ((left < 15)); then
    printf '%-14s skipped: time budget (%ss) spent\n' "$name" "$BUDGET" >>"$SUMMARY"
    return 1
  fi
  ((limit > left)) && limit=$left
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
if ! step build 180 env EARLYEXIT_CUDA_ARCHS="${EARLYEXIT_CUDA_ARCHS:-90}" MAX_JOBS=8 \
  $PY -m pip install --no-build-isolation --no-deps --no-index -e .; then
  # Without the extension the Triton kernels, the tests of everything else and most numbers still run.
  step build_noext 60 env EARLYEXIT_SKIP_BUILD=1 $PY -m pip install --no-build-isolation --no-deps --no-index -e .
fi
step env 30 $PY -m earlyexit.env
# No -x: one GPU failure must not hide the others.
step tests 150 $PY -m pytest -q -rs tests
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
# Out-of-bounds / misaligned accesses in every CUDA kernel path (small shapes, compared with the reference).
[ -n "$SANITIZER" ] && step memcheck 60 "$SANITIZER" --tool memcheck --error-exitcode 1 $PY benchmarks/sanitize_cuda.py
step bench_exit 150 $PY benchmarks/bench_exit_check.py --set reduced --out "$OUT"
for extra in bench_compaction bench_generate; do
  [ -f "benchmarks/$extra.py" ] && step "$extra" 90 $PY "benchmarks/$extra.py" --quick --out "$OUT"
done
# Shared-memory hazards (the decode kernels reuse their staging buffer for the merge): late, it is slow.
[ -n "$SANITIZER" ] && step racecheck 60 "$SANITIZER" --tool racecheck --error-exitcode 1 $PY benchmarks/sanitize_cuda.py
# Hardware counters of the decode kernels at the real head size (where ncu can read them).
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null || true)
[ -n "$NCU" ] && step ncu 60 "$NCU" --clock-control none --target-processes all \
  --kernel-name regex:'exit_check_kernel|decode_mma_kernel|decode_kernel' \
  --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
  $PY benchmarks/ncu_exit_check.py

# The results file to commit as benchmarks/results/<gpu-name>.md.
GPU=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))" 2>/dev/null || echo unknown_gpu)
{
  echo "# $GPU: gpu_check.sh results"
  echo
  echo "- date: $(date -u +%F), $(head -n 2 "$OUT/gpu.txt" | tail -n 1)"
  $PY -c "import torch, triton; print(f'- torch {torch.__version__}, CUDA {torch.version.cuda}, triton {triton.__version__}')"
  echo
  echo '```'
  cat "$SUMMARY"
  for log in memcheck racecheck; do
    [ -f "$OUT/$log.log" ] && { echo; echo "## $log"; tail -n 12 "$OUT/$log.log"; }
  done
  [ -f "$OUT/ncu.log" ] && { echo; echo "## ncu (decode kernels, d=4096 V=128256 bf16)"
    grep -E '^  [a-z_]+.*(exit_check_kernel|decode)|DRAM Throughput|Memory Throughput|Duration|Achieved Occupancy|Registers Per|==PROF==|ERR' "$OUT/ncu.log" | head -n 80; }
  for log in bench_exit bench_compaction bench_generate; do
    [ -f "$OUT/$log.log" ] && { echo; echo "## $log"; grep -v '^wrote ' "$OUT/$log.log" | tail -n 90; }
  done
  echo '```'
} >"$OUT/$GPU.md"

echo
echo "=== summary ($(head -n 2 "$OUT/gpu.txt" | tail -n 1)); results file: $OUT/$GPU.md"
cat "$SUMMARY"
grep -h -A 40 '^provider' "$OUT/bench_exit.log" 2>/dev/null | head -n 60
