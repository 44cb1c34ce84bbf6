"""Benchmark of the fused exit check against the PyTorch ways of computing the same statistics.

Providers (all in one run, same inputs):
  eager      RMSNorm, logits = x @ W.T materialized [N, V], float32 softmax, max, top-2, entropy, lse
  compile    torch.compile of the eager function
  chunked    the eager function over row chunks, so the logits buffer stays bounded
  ee-<name>  each earlyexit backend that can run here (the Triton interpreter is never timed)

Order: earlyexit's providers and the real head (d = 4096, V = 128256) first, torch.compile's cold
compiles in a last pass, so a time-limited run prints the headline rows first. On CUDA the timed calls
rotate over copies of the head whose total is at least 3x the L2 cache, so a head that fits in L2
(d = 576, V = 49152 in bf16 is 56 MB) is read from DRAM as in a real decode step, not from L2.

Reported per (provider, N, d, V): median ms, achieved GB/s (weight + hidden + outputs, the bytes a
fused kernel must move) and TFLOP/s (2 N d V), the fraction of the roofline time
max(bytes / copy bandwidth, flops / matmul rate) with both ceilings measured at the start of this
run, the speedup against eager, and on CUDA the extra memory allocated by the call.

Usage: python benchmarks/bench_exit_check.py [--device cuda] [--set full|reduced] [--out DIR]
"""

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_utils import (  # noqa: E402
    copy_bandwidth,
    environment,
    format_table,
    matmul_rate,
    plot_lines,
    time_fn,
    write_csv,
)

import earlyexit  # noqa: E402
from earlyexit.ops import backends  # noqa: E402

HEADS = {
    "full": [(4096, 128256), (8192, 128256), (2048, 32000), (576, 49152)],
    "reduced": [(4096, 128256), (576, 49152)],
}
ROWS = {"full": [1, 8, 32, 64, 256, 1024, 4096], "reduced": [1, 8, 64, 1024]}
CPU_HEADS = {"full": [(576, 49152), (2048, 32000)], "reduced": [(576, 49152)]}
CPU_ROWS = {"full": [1, 8, 64, 256], "reduced": [1, 8, 64]}
EPS = 1e-6
COLUMNS = ["provider", "N", "d", "V", "ms", "GBps", "TFLOPs", "roofline_frac", "speedup_vs_eager", "extra_MiB"]


def eager_exit_stats(hidden, weight, norm_weight):
    """The plain PyTorch exit check: materializes [N, V] logits and runs the statistics over them."""
    x = hidden.float()
    x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)).to(hidden.dtype) * norm_weight
    logits = (x @ weight.T).float()
    lse = torch.logsumexp(logits, -1)
    logp = logits - lse[:, None]
    p = logp.exp()
    top = torch.topk(p, 2, dim=-1)
    entropy = -(p * logp).sum(-1)
    return top.indices[:, 0], top.values[:, 0], top.values[:, 0] - top.values[:, 1], entropy, lse


def chunked_exit_stats(hidden, weight, norm_weight, budget_bytes=256 << 20):
    """eager_exit_stats over row chunks sized so one chunk's float32 logits fit in ``budget_bytes``."""
    rows = max(1, budget_bytes // (4 * weight.shape[0]))
    parts = [eager_exit_stats(hidden[i : i + rows], weight, norm_weight) for i in range(0, hidden.shape[0], rows)]
    return tuple(torch.cat(p) for p in zip(*parts))


def providers(device):
    """Timed providers in the order they run: earlyexit's backends first, then eager and chunked."""
    out = {}
    for name in backends.BACKENDS:
        if backends.unavailable_reason(name, device.type) is None and not (name == "triton" and device.type == "cpu"):
            out[f"ee-{name}"] = lambda h, w, g, _b=name: earlyexit.exit_check(h, w, 0.9, norm_weight=g, backend=_b)
    out["eager"] = eager_exit_stats
    out["chunked"] = chunked_exit_stats
    return out


def compiled_providers():
    """torch.compile of the eager function, timed in a last pass: its cold compiles take seconds each.

    Default (automatic) dynamic shapes: one recompile marks N, another d and V dynamic, so the sweep costs
    about three compiles instead of one per shape (dynamic=False would recompile per shape and, past the
    recompile limit, silently fall back to eager).
    """
    return {"compile": torch.compile(eager_exit_stats)}


def head_copies(weight, device):
    """The head and enough copies of it that cycling through them never hits in L2 (CUDA only)."""
    if device.type != "cuda":
        return [weight]
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    nbytes = weight.numel() * weight.element_size()
    count = max(1, -(-3 * l2 // nbytes))
    return [weight] + [weight.clone() for _ in range(count - 1)]


def extra_memory(fn, device):
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def measure_shape(provs, device, weights, norm_weight, hidden, only):
    """Median ms and extra MiB of each provider on one shape, the calls rotating over ``weights``."""
    out = {}
    for name, fn in provs.items():
        if only and name not in only:
            continue
        turn = itertools.cycle(weights)

        def call(fn=fn, turn=turn):
            return fn(hidden, next(turn), norm_weight)

        try:
            ms = time_fn(call, device, cuda_graph=device.type == "cuda" and hidden.shape[0] <= 64)
            mem = extra_memory(call, device)
        except torch.OutOfMemoryError:
            print(f"  {name} N={hidden.shape[0]} d={hidden.shape[1]} V={weights[0].shape[0]}: out of memory")
            torch.cuda.empty_cache()
            continue
        out[name] = (ms, mem)
    return out


def run(device, dtype, heads, rows, only=None):
    env = environment(device)
    bw = copy_bandwidth(device)
    rate = matmul_rate(device, dtype)
    print(f"# {env['device']}  torch {env['torch']}  triton {env['triton']}  cuda {env['cuda']}  {env['date']}")
    print(f"# ceilings measured now: copy {bw:.1f} GB/s, {str(dtype).split('.')[-1]} matmul {rate:.2f} TFLOP/s")
    table = []
    elt = torch.tensor([], dtype=dtype).element_size()
    eager_ms = {}
    for provs in (providers(device), compiled_providers()):
        for d, v in heads:
            weights = head_copies((torch.randn(v, d, device=device) / d**0.5).to(dtype), device)
            norm_weight = (torch.rand(d, device=device) + 0.5).to(dtype)
            for n in rows:
                hidden = torch.randn(n, d, device=device).to(dtype)
                nbytes = (v * d + n * d) * elt + n * (8 + 1 + 5 * 4)
                flops = 2 * n * d * v
                floor_ms = max(nbytes / bw / 1e6, flops / rate / 1e9)
                measured = measure_shape(provs, device, weights, norm_weight, hidden, only)
                if "eager" in measured:
                    eager_ms[(n, d, v)] = measured["eager"][0]
                shape_rows = []
                for name, (ms, mem) in measured.items():
                    base = eager_ms.get((n, d, v))
                    shape_rows.append(
                        dict(
                            provider=name,
                            N=n,
                            d=d,
                            V=v,
                            head=f"d={d} V={v}",
                            dtype=str(dtype).split(".")[-1],
                            ms=ms,
                            GBps=nbytes / ms / 1e6,
                            TFLOPs=flops / ms / 1e9,
                            roofline_frac=floor_ms / ms,
                            speedup_vs_eager=base / ms if base else None,
                            extra_MiB=mem,
                            copy_GBps=bw,
                            matmul_TFLOPs=rate,
                            **env,
                        )
                    )
                table += shape_rows
                # Printed as measured, so a run cut short by a time limit still leaves its numbers.
                if shape_rows:
                    print(format_table(shape_rows, COLUMNS), flush=True)
            del weights
    return table


def dispatch_summary(table):
    """Per shape, the fastest earlyexit backend and the fastest provider overall: the data behind the
    "auto" dispatch rule (backends.auto_backend) and behind "faster than every other provider"."""
    lines = ["fastest per shape (earlyexit backend / any provider):"]
    for key in dict.fromkeys((r["d"], r["V"], r["N"]) for r in table):
        rows = [r for r in table if (r["d"], r["V"], r["N"]) == key]
        ours = [r for r in rows if r["provider"].startswith("ee-")]
        best = min(rows, key=lambda r: r["ms"])
        mine = min(ours, key=lambda r: r["ms"])["provider"] if ours else "-"
        lines.append(f"  d={key[0]} V={key[1]} N={key[2]}: {mine} / {best['provider']} ({best['ms']:.4g} ms)")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="bfloat16 on CUDA, float32 on CPU by default")
    p.add_argument("--set", default="reduced", choices=["reduced", "full"], help="shape set")
    p.add_argument("--rows", default=None, help="comma-separated N values, overriding the set")
    p.add_argument("--providers", default=None, help="comma-separated provider names to run")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    heads = (HEADS if device.type == "cuda" else CPU_HEADS)[args.set]
    rows = (
        [int(x) for x in args.rows.split(",")] if args.rows else (ROWS if device.type == "cuda" else CPU_ROWS)[args.set]
    )
    table = run(device, dtype, heads, rows, only=args.providers.split(",") if args.providers else None)
    print(format_table(table, COLUMNS))
    print(dispatch_summary(table))
    if table:
        stem = f"exit_check_{table[0]['device']}_torch{table[0]['torch']}".replace("+", "_")
        write_csv(os.path.join(args.out, stem + ".csv"), table)
        plot_lines(
            os.path.join(args.out, stem + ".png"),
            table,
            x="N",
            y="ms",
            series="provider",
            group="head",
            title=f"exit check, {table[0]['device']}, {table[0]['dtype']}",
        )
        print(f"wrote {os.path.join(args.out, stem)}.csv/.png")


if __name__ == "__main__":
    main()
