"""Benchmark of ragged batch compaction against the torch way (nonzero, then index_select per tensor).

The batch is what an early-exit decoder moves at an exit point: hidden [N, d] (bf16 on GPU, fp32 on
CPU, d = 4096) plus two int64 [N] tensors (positions, sequence ids); about half the rows are kept.

Providers, all measured in one run on the same inputs:
  torch      compact: nonzero(keep), index_select per tensor.
             partition: perm = cat(nonzero(keep), nonzero(~keep)), index_select per tensor.
  ee-<name>  each earlyexit backend that can run here (the Triton interpreter is never timed).
  ee-<name>-out    partition_rows into preallocated out= tensors (how a decode loop calls it).
  ee-<name>-graph  (CUDA) partition_rows with out= captured once in a CUDA graph, timed as replays.

Reported per (op, N, provider): median microseconds per call, the speedup over torch, achieved GB/s
(bytes read + written, rows and index) and, at the large N, the fraction of the copy bandwidth
measured in this run (a plain copy of the hidden tensor). A CSV keyed by device and versions goes to
--out (default benchmarks/out/).

Usage: python benchmarks/bench_compaction.py [--device cpu|cuda] [--n 256] [--large-n 65536] [--threads T] [--out DIR]
"""

import argparse
import csv
import os
import platform
import statistics
import time
from datetime import datetime, timezone

import torch

import earlyexit
from earlyexit import backends


def time_call(fn, device, reps, warmup=3):
    """Median seconds per call of fn() over reps timed runs (CUDA: events around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_batch(n, d, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hidden = torch.randn(n, d, generator=g).to(device=device, dtype=dtype)
    positions = torch.arange(n, dtype=torch.int64).to(device)
    seq_ids = torch.randint(0, 1 << 20, (n,), generator=g).to(device)
    keep = (torch.rand(n, generator=g) < 0.5).to(device)
    return keep, (hidden, positions, seq_ids)


def torch_compact(keep, tensors):
    index = torch.nonzero(keep).reshape(-1)
    return [x.index_select(0, index) for x in tensors], index


def torch_partition(keep, tensors):
    perm = torch.cat([torch.nonzero(keep), torch.nonzero(~keep)]).reshape(-1)
    return [x.index_select(0, perm) for x in tensors], perm


def ee_backends(device):
    names = [b for b in backends.BACKENDS if backends.unavailable_reason(b, device.type) is None]
    return [b for b in names if not (b == "triton" and device.type == "cpu")]


def graph_partition(keep, tensors, backend):
    """partition_rows captured in a CUDA graph; returns the replay function."""
    out = tuple(torch.empty_like(x) for x in tensors)
    earlyexit.partition_rows(keep, *tensors, out=out, backend=backend)  # compile / warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        earlyexit.partition_rows(keep, *tensors, out=out, backend=backend)
    return graph.replay


def measure(n, d, device, reps):
    """Rows of results for one batch size: (op, provider, seconds, bytes moved)."""
    keep, tensors = make_batch(n, d, device)
    k = int(keep.sum())
    row_bytes = sum(x[0].numel() * x.element_size() for x in tensors)
    compact_bytes = 2 * k * row_bytes + 8 * k + n
    partition_bytes = 2 * n * row_bytes + 8 * n + n
    rows = [("compact", "torch", time_call(lambda: torch_compact(keep, tensors), device, reps), compact_bytes)]
    for b in ee_backends(device):
        t = time_call(lambda b=b: earlyexit.compact(keep, *tensors, backend=b), device, reps)
        rows.append(("compact", f"ee-{b}", t, compact_bytes))
    rows.append(
        ("partition", "torch", time_call(lambda: torch_partition(keep, tensors), device, reps), partition_bytes)
    )
    out = tuple(torch.empty_like(x) for x in tensors)
    for b in ee_backends(device):
        t = time_call(lambda b=b: earlyexit.partition_rows(keep, *tensors, backend=b), device, reps)
        rows.append(("partition", f"ee-{b}", t, partition_bytes))
        t = time_call(lambda b=b: earlyexit.partition_rows(keep, *tensors, out=out, backend=b), device, reps)
        rows.append(("partition", f"ee-{b}-out", t, partition_bytes))
        if device.type == "cuda":
            t = time_call(graph_partition(keep, tensors, b), device, reps)
            rows.append(("partition", f"ee-{b}-graph", t, partition_bytes))
    return rows


def copy_bandwidth(n, d, device, reps):
    """Bytes per second of a plain copy of the hidden tensor (read + write), the ceiling for a row gather."""
    _, (hidden, *_) = make_batch(n, d, device)
    dst = torch.empty_like(hidden)
    t = time_call(lambda: dst.copy_(hidden), device, reps)
    return 2 * hidden.numel() * hidden.element_size() / t


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", type=int, default=256, help="decode batch rows")
    p.add_argument("--large-n", type=int, default=65536, help="rows for the bandwidth measurement")
    p.add_argument("--d", type=int, default=4096, help="hidden size")
    p.add_argument("--reps", type=int, default=0, help="timed calls per measurement (default: 200 GPU, 20 CPU)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch and the C++ ops (default: torch's)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = args.reps or (200 if device.type == "cuda" else 20)

    copy_bw = copy_bandwidth(args.large_n, args.d, device, max(3, reps // 10))
    results = []
    for n, r in ((args.n, reps), (args.large_n, max(3, reps // 10))):
        for op, provider, t, nbytes in measure(n, args.d, device, r):
            results.append(dict(op=op, n=n, provider=provider, us=t * 1e6, gbps=nbytes / t / 1e9))
    for row in results:
        base = next(x for x in results if x["op"] == row["op"] and x["n"] == row["n"] and x["provider"] == "torch")
        row["speedup"] = base["us"] / row["us"]
        row["copy_frac"] = row["gbps"] * 1e9 / copy_bw if row["n"] == args.large_n else float("nan")

    name = device_name(device)
    info = earlyexit.build_info()
    print(f"{name}: torch {info['torch']}, triton {info['triton']}, earlyexit {info['version']}")
    print(
        f"d={args.d}, hidden {'bf16' if device.type == 'cuda' else 'fp32'} + 2 x int64; ~50% rows kept; "
        f"{torch.get_num_threads()} CPU threads"
    )
    print(f"copy bandwidth at N={args.large_n}: {copy_bw / 1e9:.1f} GB/s")
    header = f"{'op':10s} {'N':>6s} {'provider':18s} {'us/call':>10s} {'vs torch':>9s} {'GB/s':>8s} {'of copy':>8s}"
    print(header)
    print("-" * len(header))
    for row in results:
        frac = "" if row["copy_frac"] != row["copy_frac"] else f"{row['copy_frac']:.0%}"
        print(
            f"{row['op']:10s} {row['n']:6d} {row['provider']:18s} {row['us']:10.1f} "
            f"{row['speedup']:8.2f}x {row['gbps']:8.1f} {frac:>8s}"
        )

    os.makedirs(args.out, exist_ok=True)
    key = "_".join(
        x.replace(" ", "-").replace("/", "-") for x in (name, f"torch{info['torch']}", f"triton{info['triton']}")
    )
    path = os.path.join(args.out, f"compaction_{key}.csv")
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["date", "device", "torch", "triton", "d", *results[0].keys(), "copy_gbps"])
        w.writeheader()
        for row in results:
            w.writerow(
                dict(
                    date=stamp,
                    device=name,
                    torch=info["torch"],
                    triton=info["triton"],
                    d=args.d,
                    **row,
                    copy_gbps=copy_bw / 1e9,
                )
            )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
