"""benchmarks/gpu_check.sh, run on this machine with stand-ins for python, nvidia-smi, compute-sanitizer
and ncu: the steps run in their order of value, their limits fit the budget, the output folder follows
the argument or $OUT, the sanitizers are limited to earlyexit's kernels and see both GPU backends, ncu
writes a report file, a rerun can select steps, and the results file is written.

The one GPU run of a session is minutes long; a mistake in the script costs that run, so it is checked here.
"""

import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")

# Each stand-in appends its name and arguments to $CALLS, one line per call.
FAKE_PYTHON = r"""#!/usr/bin/env bash
echo "python $*" >>"$CALLS"
case "$*" in
  *get_device_name*) echo "FAKE_GPU" ;;
  *"import ninja"*) echo "python ninja 1.11" ;;
  *"import torch, triton"*) echo "torch 2.11 CUDA 13.0 triton 3.6" ;;
  *bench_exit_check.py*) echo "fastest per shape (earlyexit backend / any provider):"
    echo "  d=4096 V=128256 N=1: ee-cuda / ee-cuda (0.25 ms)" ;;
  *"-m pytest"*) echo "3 passed in 0.01s" ;;
esac
exit 0
"""
FAKE_SMI = """#!/usr/bin/env bash
echo "name, driver_version"
echo "FAKE GPU, 580.00"
"""
FAKE_SANITIZER = """#!/usr/bin/env bash
echo "compute-sanitizer $*" >>"$CALLS"
echo "========= ERROR SUMMARY: 0 errors"
"""
FAKE_NCU = """#!/usr/bin/env bash
echo "ncu $*" >>"$CALLS"
prev=""
for a in "$@"; do
  [ "$prev" = "-o" ] && touch "$a.ncu-rep"
  prev=$a
done
case "$*" in *--import*) echo "  exit_check_kernel (1, 1, 1)"; echo "    DRAM Throughput   %   91.0" ;; esac
"""


def _stand_ins(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in [
        ("python", FAKE_PYTHON),
        ("nvidia-smi", FAKE_SMI),
        ("compute-sanitizer", FAKE_SANITIZER),
        ("ncu", FAKE_NCU),
    ]:
        path = bin_dir / name
        path.write_text(text)
        path.chmod(0o755)
    return bin_dir


def _run(tmp_path, args=(), **env_extra):
    bin_dir = _stand_ins(tmp_path)
    calls = tmp_path / "calls.txt"
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "GPU_CHECK_STEPS", "GPU_CHECK_PACK")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", PYTHON=str(bin_dir / "python"), CALLS=str(calls), **env_extra)
    proc = subprocess.run(["bash", SCRIPT, *args], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, calls.read_text().splitlines()


def _step_of(call):
    """The gpu_check step a stand-in call belongs to (None for probes)."""
    for pattern, step in [
        (r"pip install", "build"),
        (r"-m earlyexit\.env", "env"),
        (r"compute-sanitizer --tool memcheck", "memcheck"),
        (r"compute-sanitizer --tool racecheck", "racecheck"),
        (r"pytest .*-m gpu tests", "tests"),
        (r"pytest .*test_cuda_sass", "sass"),
        (r"bench_exit_check\.py", "bench_exit"),
        (r"^ncu .*ncu_exit_check\.py", "ncu"),
        (r"bench_compaction\.py", "bench_compaction"),
        (r"bench_state_similarity\.py", "bench_state"),
        (r"bench_generate\.py", "bench_generate"),
    ]:
        if re.search(pattern, call):
            return step
    return None


needs_tools = pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils timeout")


@needs_tools
def test_steps_run_in_order_of_value_and_write_the_results_file(tmp_path):
    out = tmp_path / "out"
    proc, calls = _run(tmp_path, [str(out)])
    steps = [s for s in map(_step_of, calls) if s is not None]
    assert list(dict.fromkeys(steps)) == [
        "build",
        "env",
        "memcheck",
        "racecheck",
        "tests",
        "sass",
        "bench_exit",
        "ncu",
        "bench_compaction",
        "bench_state",
        "bench_generate",
    ]
    results = (out / "FAKE_GPU.md").read_text()
    assert "FAKE GPU, 580.00" in results and "torch 2.11" in results
    assert "DRAM Throughput" in results  # ncu's text view, made from the report file
    assert "fastest per shape" in proc.stdout
    for step in ("build", "memcheck", "tests", "bench_exit", "bench_generate"):
        assert re.search(rf"^{step}\s+rc=0", results, re.M), results


@needs_tools
def test_sanitizers_filter_to_our_kernels_and_ncu_writes_a_report(tmp_path):
    _, calls = _run(tmp_path, [str(tmp_path / "out")])
    sanitizer = [c for c in calls if c.startswith("compute-sanitizer --tool")]
    assert len(sanitizer) == 2
    # Every Triton kernel of the package, and the CUDA ones by their namespace.
    triton_kernels = set()
    for name in os.listdir(os.path.join(ROOT, "triton_kernels")):
        if name.endswith(".py"):
            with open(os.path.join(ROOT, "triton_kernels", name)) as f:
                triton_kernels |= set(re.findall(r"@triton\.jit\ndef (\w+_kernel)\(", f.read()))
    assert len(triton_kernels) >= 5, triton_kernels
    for c in sanitizer:
        # One plain-substring filter per kernel: kns= takes no alternation, so "a|b" would match nothing.
        listed = set(re.findall(r"--kernel-name kns=(\S+)", c))
        assert "earlyexit" in listed and triton_kernels <= listed, (c, triton_kernels)
        assert not any("|" in k for k in listed), c
        assert c.endswith("benchmarks/sanitize_cuda.py"), c
    ncu = [c for c in calls if c.startswith("ncu ") and "ncu_exit_check.py" in c]
    assert len(ncu) == 1 and " -o " in ncu[0] and "--clock-control none" in ncu[0]
    assert (tmp_path / "out" / "logs" / "ncu_exit_check.ncu-rep").exists()
    assert any("--import" in c for c in calls if c.startswith("ncu "))
    pytest_calls = [c for c in calls if "pytest" in c and "-m gpu" in c]
    assert pytest_calls and "faulthandler_timeout" in pytest_calls[0] and " -v " in pytest_calls[0]
    # Every test file once, the exit check's suite first (a time limit cuts the last ones).
    files = re.findall(r"tests/test_\w+\.py", pytest_calls[0])
    every = sorted(f"tests/{n}" for n in os.listdir(os.path.join(ROOT, "tests")) if re.fullmatch(r"test_\w+\.py", n))
    assert sorted(files) == every and files[0] == "tests/test_exit_check.py", files


@needs_tools
def test_out_from_the_environment_when_no_argument(tmp_path):
    out = tmp_path / "from_env"
    _run(tmp_path, OUT=str(out))
    assert (out / "FAKE_GPU.md").exists() and (out / "logs" / "summary.txt").exists()


@needs_tools
def test_selected_steps_and_packed_logs(tmp_path):
    out = tmp_path / "out"
    _, calls = _run(tmp_path, [str(out)], GPU_CHECK_STEPS="tests bench_exit", GPU_CHECK_PACK="1")
    steps = {s for s in map(_step_of, calls) if s is not None}
    assert steps == {"build", "tests", "bench_exit"}
    assert sorted(os.listdir(out)) == ["FAKE_GPU.md", "logs.tar.gz"]


def test_step_limits_fit_the_budget():
    text = open(SCRIPT).read()
    budget = int(re.search(r"BUDGET=\$\{GPU_CHECK_BUDGET_S:-(\d+)\}", text).group(1))
    limits = {m.group(1): int(m.group(2)) for m in re.finditer(r"step (\w+) (\d+) ", text)}
    # build_noext only runs when build failed quickly enough to leave it time; it replaces build.
    total = sum(v for k, v in limits.items() if k != "build_noext")
    assert budget <= 480 and total <= budget, (limits, budget)
    assert "timeout -s INT -k 10" in text
