#!/usr/bin/env bash
# GPU check: build, check and measure everything on an NVIDIA machine that already has torch, triton
# and nvcc, with no internet. Usage: benchmarks/gpu_check.sh [OUTDIR]
#   OUTDIR: the argument, else $OUT if set, else benchmarks/out/gpu.
# Writes OUTDIR/<gpu-name>.md (the results file to commit as benchmarks/results/<gpu-name>.md), logs
# under OUTDIR/logs/ and prints one summary table last. Budget: < 8 minutes including the build.
#
# Steps run in order of value, so a run cut short still leaves the most important evidence: build,
# memcheck, racecheck, GPU tests (-m gpu; CI runs the CPU suites), SASS, exit-check benchmark, ncu,
# then the compaction, state-similarity and generation benchmarks. Every step has a time limit; the limits add up to the
# budget, and a step is cut to what is left of it. A step that runs out gets SIGINT (pytest prints its
# summary, Python its traceback), then SIGKILL 10 s later.
#
# Environment: GPU_CHECK_BUDGET_S (default 480), GPU_CHECK_STEPS (space-separated step names to run, e.g.
# "tests bench_exit" for a rerun after a fix; the build always runs), GPU_CHECK_PACK=1 (pack logs/ into
# logs.tar.gz and remove it, for transports that return few files), EARLYEXIT_CUDA_ARCHS (default 90).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-benchmarks/out/gpu}}
LOGS="$OUT/logs"
mkdir -p "$LOGS"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
unset TRITON_INTERPRET
SUMMARY="$LOGS/summary.txt"
: >"$SUMMARY"
BUDGET=${GPU_CHECK_BUDGET_S:-480}
STEPS=${GPU_CHECK_STEPS:-}

wanted() { [ -z "$STEPS" ] || [[ " $STEPS " == *" $1 "* ]]; }

step() {  # step NAME LIMIT_S CMD...: run with a time limit, log to LOGS/NAME.log, record the outcome
  local name=$1 limit=$2
  shift 2
  if ! wanted "$name" && [[ $name != build* ]]; then
    return 0
  fi
  local left=$((BUDGET - SECONDS))
  if ((left < 15)); then
    printf '%-16s skipped: time budget (%ss) spent\n' "$name" "$BUDGET" >>"$SUMMARY"
    return 1
  fi
  ((limit > left)) && limit=$left
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s): $*"
  timeout -s INT -k 10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$LOGS/$name.log"
  local note=""
  ((rc == 124 || rc == 130 || rc == 137)) && note="(time limit)"
  printf '%-16s rc=%-3s %4ss  %s %s\n' "$name" "$rc" "$((SECONDS - t0))" "logs/$name.log" "$note" >>"$SUMMARY"
  return $rc
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv >"$LOGS/gpu.txt" 2>&1
# Without ninja torch's extension build compiles one file at a time and runs past its limit: say so.
{
  echo "ninja: $(command -v ninja || echo 'not on PATH')"
  $PY -c "import ninja; print('python ninja', ninja.__version__)" 2>&1 | tail -n 1
  $PY -c "import torch, triton; print(f'torch {torch.__version__} CUDA {torch.version.cuda} triton {triton.__version__}')"
  # The packages the lanes of .ci/compat pin (README, "Supported versions"): what this run stands for.
  $PY -c "from importlib.metadata import version as v; print(*(f'{n} {v(n)}' for n in ('numpy', 'transformers')))" 2>&1 | tail -n 1
} >"$LOGS/toolchain.txt" 2>&1
cat "$LOGS/toolchain.txt"
grep -q "not on PATH" "$LOGS/toolchain.txt" && echo "toolchain        WARNING: ninja missing, the build compiles serially" >>"$SUMMARY"

# Build in place against the installed torch: no downloads, no build isolation. Hopper only, to fit the budget.
if ! step build 120 env EARLYEXIT_CUDA_ARCHS="${EARLYEXIT_CUDA_ARCHS:-90}" MAX_JOBS=16 \
  $PY -m pip install --no-build-isolation --no-deps --no-index -e .; then
  # Without the extension the Triton kernels, the tests of everything else and most numbers still run.
  step build_noext 40 env EARLYEXIT_SKIP_BUILD=1 $PY -m pip install --no-build-isolation --no-deps --no-index -e .
fi
step env 10 $PY -m earlyexit.env

SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
# Instrument earlyexit's own kernels only (CUDA: namespace earlyexit; Triton: the kernel names), not
# torch's or cuBLAS': faster, and every report is ours. kns= matches a plain substring of the mangled
# name (no alternation), so one filter per name: a kernel matching any of them is instrumented. An older
# sanitizer without the filter runs all.
SAN_FILTER=()
for kernel in earlyexit exit_check_kernel compaction_kernel scatter_rows_kernel state_similarity_kernel \
  merge_gathered_kernel; do
  SAN_FILTER+=(--kernel-name "kns=$kernel")
done
if [ -n "$SANITIZER" ] && ! "$SANITIZER" "${SAN_FILTER[@]}" true >/dev/null 2>&1; then
  echo "sanitizer        kernel filter not supported: every kernel is instrumented" >>"$SUMMARY"
  SAN_FILTER=()
fi
# Out-of-bounds / misaligned accesses in every CUDA and Triton kernel path (small shapes, checked against
# the reference), then shared-memory hazards (the decode kernels reuse their staging buffer for the merge).
if [ -n "$SANITIZER" ]; then
  step memcheck 40 "$SANITIZER" --tool memcheck --error-exitcode 1 "${SAN_FILTER[@]}" $PY benchmarks/sanitize_cuda.py
  step racecheck 40 "$SANITIZER" --tool racecheck --error-exitcode 1 "${SAN_FILTER[@]}" $PY benchmarks/sanitize_cuda.py
fi
# GPU-marked tests only (every CUDA backend pair of the contract suites, graph capture, real head sizes):
# CI runs the CPU suites. faulthandler prints every thread's stack if one test hangs for a minute. The
# exit check's and compaction's suites first, then every other test file: a run cut short by the time
# limit (Triton compiles each kernel variant on first use) loses the least important ones. Files, not
# the folder: pytest would fold files named before their folder into it, in the folder's order.
FIRST_TESTS=(tests/test_exit_check.py tests/test_extension.py tests/test_exit_stats.py tests/test_compaction.py
  tests/test_merge_gathered_triton.py tests/test_distributed.py)
TESTS=("${FIRST_TESTS[@]}")
for f in tests/test_*.py; do
  [[ " ${FIRST_TESTS[*]} " == *" $f "* ]] || TESTS+=("$f")
done
step tests 100 $PY -m pytest -v -rs -o faulthandler_timeout=60 -m gpu "${TESTS[@]}"
step sass 15 $PY -m pytest -q -rs tests/test_cuda_sass.py
step bench_exit 60 $PY benchmarks/bench_exit_check.py --set reduced --out "$LOGS"
# Hardware counters of the decode kernels at the real head size (where ncu can read them). The report goes
# to a file as it is measured, so a cut-short run keeps what it has; the text view is made from it.
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null || true)
if [ -n "$NCU" ]; then
  step ncu 30 "$NCU" --clock-control none --target-processes all -f -o "$LOGS/ncu_exit_check" \
    --kernel-name regex:'exit_check_kernel|decode_mma_kernel|decode_kernel' \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
    $PY benchmarks/ncu_exit_check.py
  [ -f "$LOGS/ncu_exit_check.ncu-rep" ] && "$NCU" --import "$LOGS/ncu_exit_check.ncu-rep" --page details \
    >"$LOGS/ncu_details.txt" 2>&1
fi
step bench_compaction 20 $PY benchmarks/bench_compaction.py --quick --out "$LOGS"
# Confirms (or changes) the CUDA "auto" rule of state_similarity, unmeasured until a GPU run.
step bench_state 10 $PY benchmarks/bench_state_similarity.py --device cuda --d 4096 --out "$LOGS"
step bench_generate 35 $PY benchmarks/bench_generate.py --quick --out "$LOGS"

# The results file to commit as benchmarks/results/<gpu-name>.md.
GPU=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))" 2>/dev/null || echo unknown_gpu)
{
  echo "# $GPU: gpu_check.sh results"
  echo
  echo "- date: $(date -u +%F), $(head -n 2 "$LOGS/gpu.txt" | tail -n 1)"
  sed 's/^/- /' "$LOGS/toolchain.txt"
  echo "- command: benchmarks/gpu_check.sh OUTDIR${STEPS:+ (GPU_CHECK_STEPS=\"$STEPS\")}"
  echo
  echo '```'
  cat "$SUMMARY"
  for log in tests sass; do
    [ -f "$LOGS/$log.log" ] && { echo; echo "## $log (failures and summary)"
      grep -E 'FAILED|ERROR|passed|failed|Timeout' "$LOGS/$log.log" | tail -n 40; }
  done
  for log in memcheck racecheck; do
    [ -f "$LOGS/$log.log" ] && { echo; echo "## $log"; tail -n 14 "$LOGS/$log.log"; }
  done
  [ -f "$LOGS/ncu_details.txt" ] && { echo; echo "## ncu (decode kernels, d=4096 V=128256 bf16)"
    grep -E '^  [a-zA-Z_]+.*(exit_check_kernel|decode)|DRAM Throughput|Memory Throughput|Duration|Achieved Occupancy|Registers Per|==PROF==|ERR' \
      "$LOGS/ncu_details.txt" | head -n 80; }
  for log in bench_exit bench_compaction bench_state bench_generate; do
    [ -f "$LOGS/$log.log" ] && { echo; echo "## $log"; grep -v '^wrote ' "$LOGS/$log.log" | tail -n 90; }
  done
  echo '```'
} >"$OUT/$GPU.md"

echo
echo "=== summary ($(head -n 2 "$LOGS/gpu.txt" | tail -n 1)); results file: $OUT/$GPU.md"
cat "$SUMMARY"
grep -h -A 40 '^fastest per shape' "$LOGS/bench_exit.log" 2>/dev/null | head -n 40
if [ "${GPU_CHECK_PACK:-0}" = 1 ]; then
  tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$LOGS"
fi
