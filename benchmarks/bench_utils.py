"""Shared benchmark plumbing: device description, ceilings measured in the same run, timing, CSV, plots.

Every figure a benchmark reports is a ratio or a fraction of a ceiling measured by the same process,
so results from different machines and runs can be compared without trusting a spec sheet.
"""

import csv
import datetime
import os
import platform
import statistics
import time

import torch

try:
    import triton
except ImportError:  # CPU-only installs may lack triton; GPU timing then uses CUDA events directly.
    triton = None


def device_name(device):
    """A short, file-name-safe device name: "NVIDIA_H200" or "cpu-<model>-<cores>c"."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        model = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        model = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        name = f"cpu-{model}-{torch.get_num_threads()}t"
    return "".join(c if c.isalnum() or c in "-." else "_" for c in name).strip("_")


def environment(device):
    """Dict of versions and the device, written beside every result."""
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "",
        "triton": getattr(triton, "__version__", ""),
        "date": datetime.date.today().isoformat(),
    }


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device, *, reps=None, warmup=3, cuda_graph=False):
    """Median wall time of ``fn()`` in milliseconds.

    GPU: triton.testing.do_bench (L2 flushed between reps), or a CUDA-graph replay when
    ``cuda_graph`` so launch gaps do not hide a microsecond-scale kernel. CPU: perf_counter median.
    """
    if device.type == "cuda":
        if cuda_graph:
            return _time_cuda_graph(fn, device)
        if triton is not None:
            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    budget = time.perf_counter() + 2.0
    n = reps or 1000
    for i in range(n):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
        if reps is None and i >= 4 and time.perf_counter() > budget:
            break
    return statistics.median(times)


def add_generation_args(parser, new_tokens=48, repeats=3):
    """The arguments every generation benchmark takes: --new-tokens, --repeats, --out (the CSV folder)."""
    parser.add_argument("--new-tokens", type=int, default=new_tokens)
    parser.add_argument(
        "--repeats", type=int, default=repeats, help="interleaved timed rounds (the median is reported)"
    )
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))


def timed_rounds(runners, device, repeats):
    """Median wall-clock seconds and last output of each runner, {label: (out, s)}.

    Runners are interleaved, round after round, so that slow drifts of the machine (clock, other
    tenants) bias none of them; each is run once first as a warm-up (kernels, autotuning, allocator).
    Round r starts at the r-th runner (a rotation), so that no runner always follows the same one: a
    heavy runner (transformers' assisted generation) leaves the allocator and caches in a state that
    slows whichever runs next.
    """
    for fn in runners.values():
        fn()
    times = {label: [] for label in runners}
    outs = {}
    labels = list(runners)
    for r in range(repeats):
        shift = r % len(labels)
        for label in labels[shift:] + labels[:shift]:
            fn = runners[label]
            synchronize(device)
            t0 = time.perf_counter()
            outs[label] = fn()
            synchronize(device)
            times[label].append(time.perf_counter() - t0)
    return {label: (outs[label], statistics.median(t)) for label, t in times.items()}


def _time_cuda_graph(fn, device, per_graph=20):
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(per_graph):
            fn()
    graph.replay()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end) / per_graph)
    return statistics.median(times)


def copy_bandwidth(device, nbytes=None):
    """Device-to-device copy bandwidth in GB/s (bytes read + written per second), measured now."""
    nbytes = nbytes or (2 << 30 if device.type == "cuda" else 256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src), device)
    return 2 * nbytes / ms / 1e6


def matmul_rate(device, dtype):
    """Dense matmul throughput in TFLOP/s for ``dtype`` on ``device``, measured now."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    ms = time_fn(lambda: a @ b, device)
    return 2 * n**3 / ms / 1e9


def write_csv(path, rows):
    """Write a list of dicts (union of keys as columns, first row's order first)."""
    if not rows:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    keys = list(rows[0])
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def format_table(rows, columns):
    """A fixed-width text table of the given columns (floats to 4 significant digits)."""

    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(x.rjust(w) for x, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def plot_lines(path, rows, *, x, y, series, group, title):
    """One PNG with a panel per ``group`` value: ``y`` against ``x``, a line per ``series``. Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written ({path})")
        return
    groups = sorted({r[group] for r in rows}, key=str)
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, g in zip(axes[0], groups):
        for s in sorted({r[series] for r in rows if r[group] == g}):
            pts = sorted((r[x], r[y]) for r in rows if r[group] == g and r[series] == s and r[y] is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=s)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.set_title(str(g))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
