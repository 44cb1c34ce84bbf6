"""Benchmark of ragged batch compaction against the torch way (nonzero, then index_select per tensor).

The batch is what an early-exit decoder moves at an exit point: hidden [N, d] (bf16 on GPU, fp32 on
CPU, d = 4096) plus two int64 [N] tensors (positions, sequence ids); about half the rows are kept.

Providers, all measured in one run on the same inputs:
  torch            compact: nonzero(keep), index_select per tensor.
                   partition: perm = cat(nonzero(keep), nonzero(~keep)), index_select per tensor.
  ee-<name>        each earlyexit backend that can run here (the Triton interpreter is never timed).
  ee-<name>-out    partition_rows into preallocated out= tensors (how a decode loop calls it).
  ee-<name>-graph  (CUDA) partition_rows with out= captured in a CUDA graph, timed as replays.

Reported per (op, N, provider): median microseconds per call, the speedup over torch, achieved GB/s
(rows and index read + written) and, at the large N, that as a fraction of the copy bandwidth
measured in the same run. The CSV, keyed by device and versions, goes to --out (default benchmarks/out/).

Usage: python benchmarks/bench_compaction.py [--device cpu|cuda] [--n 256] [--large-n 65536] [--threads T] [--quick]
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_utils import copy_bandwidth, environment, format_table, time_fn, write_csv  # noqa: E402

import earlyexit  # noqa: E402
from earlyexit.ops import backends  # noqa: E402


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


def providers(device, keep, tensors, quick):
    """(op, provider, fn) for every measurement of one batch; quick: kernel backends only (no reference)."""
    names = [b for b in backends.BACKENDS if backends.unavailable_reason(b, device.type) is None]
    names = [b for b in names if not (b == "triton" and device.type == "cpu") and not (quick and b == "torch")]
    out = tuple(torch.empty_like(x) for x in tensors)
    calls = [("compact", "torch", lambda: torch_compact(keep, tensors))]
    calls += [("compact", f"ee-{b}", lambda b=b: earlyexit.compact(keep, *tensors, backend=b)) for b in names]
    calls.append(("partition", "torch", lambda: torch_partition(keep, tensors)))
    for b in names:
        calls.append(("partition", f"ee-{b}", lambda b=b: earlyexit.partition_rows(keep, *tensors, backend=b)))
        part_out = lambda b=b: earlyexit.partition_rows(keep, *tensors, out=out, backend=b)  # noqa: E731
        calls.append(("partition", f"ee-{b}-out", part_out))
        if device.type == "cuda":
            calls.append(("partition", f"ee-{b}-graph", part_out))
    return calls


def measure(n, d, device, env, copy_gbps, bandwidth_row, quick):
    keep, tensors = make_batch(n, d, device)
    k = int(keep.sum())
    row_bytes = sum(x[0].numel() * x.element_size() for x in tensors)
    nbytes = {"compact": 2 * k * row_bytes + 8 * k + n, "partition": 2 * n * row_bytes + 8 * n + n}
    rows = []
    for op, provider, fn in providers(device, keep, tensors, quick):
        ms = time_fn(fn, device, cuda_graph=provider.endswith("-graph"))
        rows.append(dict(op=op, N=n, provider=provider, us=ms * 1e3, GBps=nbytes[op] / ms / 1e6, **env))
        # Each number as it is measured: a run cut short by a time limit keeps what it had.
        print(f"  {op} N={n} {provider}: {ms * 1e3:.2f} us", flush=True)
    for r in rows:
        base = next(x for x in rows if x["op"] == r["op"] and x["provider"] == "torch")
        r["speedup_vs_torch"] = base["us"] / r["us"]
        # Only the large batch streams from memory; a decode batch sits in cache and would read > 100%.
        r["copy_frac"] = r["GBps"] / copy_gbps if bandwidth_row else None
        r["copy_GBps"] = copy_gbps
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", type=int, default=256, help="decode batch rows")
    p.add_argument("--large-n", type=int, default=65536, help="rows for the bandwidth measurement")
    p.add_argument("--d", type=int, default=4096, help="hidden size")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch and the C++ ops (default: torch's)")
    p.add_argument("--quick", action="store_true", help="skip the torch reference backend (gpu_check.sh)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(device)
    hidden_bytes = args.large_n * args.d * (2 if device.type == "cuda" else 4)
    copy_gbps = copy_bandwidth(device, hidden_bytes)
    print(f"# {env['device']}  torch {env['torch']}  triton {env['triton']}  cuda {env['cuda']}  {env['date']}")
    print(
        f"# d={args.d}, hidden {'bf16' if device.type == 'cuda' else 'fp32'} + 2 x int64, ~50% rows kept, "
        f"{torch.get_num_threads()} CPU threads; copy bandwidth measured now: {copy_gbps:.1f} GB/s"
    )
    table = measure(args.n, args.d, device, env, copy_gbps, False, args.quick)
    table += measure(args.large_n, args.d, device, env, copy_gbps, True, args.quick)
    print(format_table(table, ["op", "N", "provider", "us", "speedup_vs_torch", "GBps", "copy_frac"]))
    stem = f"compaction_{env['device']}_torch{env['torch']}_triton{env['triton']}".replace("+", "_")
    write_csv(os.path.join(args.out, stem + ".csv"), table)
    print(f"wrote {os.path.join(args.out, stem)}.csv")


if __name__ == "__main__":
    main()
