"""CPU benchmark of the fused exit check: PyTorch eager vs earlyexit "torch" (reference) vs "cpu" (C++).

Times one call per provider (median of --reps after warm-up) on an LM head of the given size, float32 by
default, and reports GB/s (weight + hidden bytes over the median time) against a memory-copy bandwidth
measured at the start of the same run, plus the speedup over eager. Usage:

    python benchmarks/bench_exit_check_cpu.py [--d 576] [--v 49152] [--n 1 8 64] [--dtype float32]
        [--softcap 30 --norm-offset 1]   # Gemma's head: final-logit softcapping, RMSNorm scale 1 + w
"""

import argparse
import datetime
import os
import platform
import statistics
import time

import torch

import earlyexit


def eager(hidden, weight, norm_weight, eps, threshold, norm_offset=0.0, softcap=None):
    """What a model does without the fused op: RMSNorm, [N, V] logits (softcapped as Gemma 2 does),
    softmax, top-2, entropy, logsumexp."""
    x = hidden.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (norm_offset + norm_weight.float())
    z = (x.to(weight.dtype) @ weight.T).float()
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    top = torch.topk(p, 2, -1)
    entropy = -(p * logp).sum(-1)
    lse = torch.logsumexp(z, -1)
    max_prob = top.values[:, 0]
    return top.indices[:, 0], max_prob >= threshold, max_prob, max_prob - top.values[:, 1], entropy, lse


def median_seconds(fns, reps, warmup=2):
    """Median wall time of each callable in ``fns`` (a dict), timed round-robin so that load from other
    processes during the run hits every provider alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def copy_bandwidth(nbytes, reps):
    """GB/s of dst.copy_(src) over nbytes (read + write bytes counted), a memory roofline for this run."""
    src = torch.empty(nbytes // 4, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    return 2 * nbytes / median_seconds({"copy": lambda: dst.copy_(src)}, reps)["copy"] / 1e9


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=576)
    p.add_argument("--v", type=int, default=49152)
    p.add_argument("--n", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--softcap", type=float, default=None, help="final-logit softcapping (Gemma 2: 30)")
    p.add_argument("--norm-offset", type=float, default=0.0, help="RMSNorm scale offset (Gemma: 1)")
    args = p.parse_args(argv)
    head = dict(norm_offset=args.norm_offset, softcap=args.softcap)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    weight = (torch.randn(args.v, args.d) / args.d**0.5).to(dtype)
    norm_weight = torch.rand(args.d) + 0.5
    wbytes = weight.numel() * weight.element_size()
    copy_gbs = copy_bandwidth(wbytes, args.reps)
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"# {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, load average {load}")
    print(
        f"# d={args.d} V={args.v} {args.dtype}, norm_offset {args.norm_offset}, softcap {args.softcap}, "
        f"weight {wbytes / 1e6:.1f} MB, copy bandwidth {copy_gbs:.1f} GB/s"
    )
    print("| N | provider | median ms | GB/s | % of copy | speedup vs eager |")
    print("|---|---|---|---|---|---|")
    for n in args.n:
        hidden = torch.randn(n, args.d).to(dtype)
        thr = torch.full((n,), 0.5)
        providers = {"eager": lambda h=hidden, t=thr: eager(h, weight, norm_weight, 1e-6, t, **head)}
        for backend in ("torch", "cpu"):
            reason = earlyexit.build_info()["backends"][backend]["cpu"]
            if reason is None:
                providers[f"earlyexit {backend}"] = lambda h=hidden, b=backend: earlyexit.exit_check(
                    h, weight, 0.5, norm_weight=norm_weight, backend=b, **head
                )
        times = median_seconds(providers, args.reps)
        nbytes = wbytes + hidden.numel() * hidden.element_size()
        for name, sec in times.items():
            gbs = nbytes / sec / 1e9
            print(
                f"| {n} | {name} | {sec * 1e3:.2f} | {gbs:.1f} | {100 * gbs / copy_gbs:.0f}% | "
                f"{times['eager'] / sec:.2f}x |"
            )


if __name__ == "__main__":
    main()
