"""Benchmark of earlyexit.state_similarity (cosine of consecutive hidden states per row) per backend.

Providers, all measured in one run on the same inputs [N, d]:
  F.cosine      torch.nn.functional.cosine_similarity(h, h_prev, dim=-1) in the input dtype (what a
                caller would write; not overflow-safe, see the op's docstring).
  ee-<name>     earlyexit.state_similarity(h, h_prev, backend=<name>) for every backend that runs here
                (the Triton interpreter is never timed); ee-auto is what "auto" picks.
  ext-direct    (CPU/CUDA extension) torch.ops.earlyexit_C.state_similarity on the prepared rows: the
                kernel without the op layer's validation and dispatch.

Reported per (dtype, d, N, provider): median microseconds per call and the speedup over F.cosine and
over the torch reference (ee-torch), the numbers the "auto" rule is set from. The CSV goes to --out.

Usage: python benchmarks/bench_state_similarity.py [--device cpu|cuda] [--d 576,4096] [--n 1,8,64]
       [--dtypes float32,bfloat16] [--threads T]
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_utils import environment, format_table, time_fn, write_csv  # noqa: E402

import earlyexit  # noqa: E402
from earlyexit.ops import backends  # noqa: E402
from earlyexit.ops.state_similarity import _PREFERENCE  # noqa: E402


def make_pair(n, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    p = h + 0.3 * torch.randn(n, d, generator=g)  # consecutive layers: similar states
    return h.to(device=device, dtype=dtype), p.to(device=device, dtype=dtype)


def providers(device, h, p):
    names = [b for b in backends.BACKENDS if backends.unavailable_reason(b, device.type) is None]
    names = [b for b in names if not (b == "triton" and device.type == "cpu")]
    calls = [("F.cosine", lambda: F.cosine_similarity(h, p, dim=-1))]
    calls += [(f"ee-{b}", lambda b=b: earlyexit.state_similarity(h, p, backend=b)) for b in names]
    calls.append(("ee-auto", lambda: earlyexit.state_similarity(h, p)))
    if (
        backends.EXTENSION is not None
        and backends.unavailable_reason("cpu" if device.type == "cpu" else "cuda", device.type) is None
    ):
        calls.append(("ext-direct", lambda: torch.ops.earlyexit_C.state_similarity(h, p)))
    return calls


def measure(n, d, dtype, device, env):
    h, p = make_pair(n, d, dtype, device)
    rows = []
    for provider, fn in providers(device, h, p):
        ms = time_fn(fn, device)
        rows.append(dict(dtype=str(dtype).split(".")[-1], d=d, N=n, provider=provider, us=ms * 1e3, **env))
        # Each number as it is measured: a run cut short by a time limit keeps what it had.
        print(f"  {rows[-1]['dtype']} d={d} N={n} {provider}: {ms * 1e3:.2f} us", flush=True)
    base = next(r for r in rows if r["provider"] == "F.cosine")["us"]
    ref = next(r for r in rows if r["provider"] == "ee-torch")["us"]
    for r in rows:
        r["vs_F.cosine"] = base / r["us"]
        r["vs_ee-torch"] = ref / r["us"]
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--d", default="576,4096", help="hidden sizes, comma separated")
    parser.add_argument("--n", default="1,8,64", help="row counts, comma separated")
    parser.add_argument("--dtypes", default=None, help="default: float32,bfloat16 on CPU, bfloat16 on CUDA")
    parser.add_argument(
        "--threads", type=int, default=0, help="CPU threads for torch and the C++ op (default: torch's)"
    )
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = args.dtypes or ("bfloat16" if device.type == "cuda" else "float32,bfloat16")
    env = environment(device)
    auto = backends.resolve_preferred("auto", device.type, _PREFERENCE)
    print(f"# {env['device']}  torch {env['torch']}  triton {env['triton']}  cuda {env['cuda']}  {env['date']}")
    print(f"# {torch.get_num_threads()} CPU threads; auto picks {auto!r} here")
    table = []
    for dt in dtypes.split(","):
        for d in (int(x) for x in args.d.split(",")):
            for n in (int(x) for x in args.n.split(",")):
                table += measure(n, d, getattr(torch, dt), device, env)
    print(format_table(table, ["dtype", "d", "N", "provider", "us", "vs_F.cosine", "vs_ee-torch"]))
    stem = f"state_similarity_{env['device']}_torch{env['torch']}".replace("+", "_")
    write_csv(os.path.join(args.out, stem + ".csv"), table)
    print(f"wrote {os.path.join(args.out, stem)}.csv")


if __name__ == "__main__":
    main()
