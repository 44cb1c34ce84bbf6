"""Every GPU kernel path of earlyexit once, at small shapes, for compute-sanitizer.

Both GPU backends: the CUDA kernels of earlyexit._C (decode FMA and tensor-core kernels, the chunked
cuBLAS path, compaction, state similarity) and the Triton kernels (what "auto" picks on CUDA; with the
merge of gathered vocabulary-parallel statistics).
gpu_check.sh runs it under `compute-sanitizer --tool memcheck` (out-of-bounds and misaligned accesses)
and `--tool racecheck` (shared-memory hazards: the decode kernels reuse their staging buffer for the
merge), instrumenting
earlyexit's kernels only. Each call is also compared with the PyTorch reference, so a run without the
sanitizer is a quick correctness smoke test. Exit status 1 on any mismatch.

Usage: python benchmarks/sanitize_cuda.py [--backends cuda,triton]
"""

import argparse
import math
import sys

import torch

from earlyexit.ops import (
    backends,
    compact,
    exit_check,
    exit_stats,
    finalize_exit_stats,
    partition_rows,
    scatter_rows,
    state_similarity,
)
from earlyexit.ops.measures import get_head_measure

# (dtype, N, d, V). CUDA: FMA decode (fp32, misaligned), tensor-core decode (each token-tile width,
# resident and K-chunked rows, partial tiles), chunked cuBLAS path (N > 64). Triton: each row-block size,
# a partial last tile, several splits and the chunked merge of their partials.
CASES = [
    (torch.float32, 3, 72, 1001),
    (torch.bfloat16, 1, 4096, 3001),
    (torch.float16, 9, 584, 2049),
    (torch.bfloat16, 17, 4104, 2000),
    (torch.bfloat16, 64, 2048, 1999),
    (torch.bfloat16, 100, 256, 3000),
    (torch.bfloat16, 1, 256, 40000),
]


def check_exit(backend, dtype, n, d, v, misaligned=False):
    g = torch.Generator(device="cuda").manual_seed(n * 7 + d)
    hidden = (torch.randn(n, d + 8, device="cuda", generator=g) * 2).to(dtype)
    hidden = hidden[:, 1 : d + 1] if misaligned else hidden[:, :d]
    weight = (torch.randn(v, d, device="cuda", generator=g) / math.sqrt(d) * 4).to(dtype)
    norm = torch.rand(d, device="cuda", generator=g) + 0.5
    bias = torch.randn(v, device="cuda", generator=g).to(dtype)
    thr = torch.rand(n, device="cuda", generator=g)
    got = exit_check(hidden, weight, thr, norm_weight=norm, bias=bias, backend=backend)
    ref = exit_check(hidden, weight, thr, norm_weight=norm, bias=bias, backend="torch")
    torch.cuda.synchronize()
    # Tokens may differ only on near-ties (float32 summation order differs between the two).
    tokens_ok = bool(((got.token == ref.token) | (ref.margin < 1e-2)).all())
    ok = tokens_ok and torch.allclose(got.max_prob, ref.max_prob, atol=2e-2)
    name = str(dtype).split(".")[-1]
    print(f"exit_check {backend} {name} N={n} d={d} V={v} misaligned={misaligned}: {'ok' if ok else 'MISMATCH'}")
    # The same kernels in their statistics mode (the merged statistics written instead of finalized).
    stats = exit_stats(hidden, weight, norm_weight=norm, bias=bias, backend=backend)
    ref_stats = exit_stats(hidden, weight, norm_weight=norm, bias=bias, backend="torch")
    torch.cuda.synchronize()
    stats_ok = bool(((stats.argmax == ref_stats.argmax) | (ref.margin < 1e-2)).all())
    stats_ok = stats_ok and torch.equal(stats.invalid, ref_stats.invalid)
    stats_ok = stats_ok and torch.allclose(stats.max_logit, ref_stats.max_logit, rtol=1e-2, atol=2e-2)
    stats_ok = stats_ok and torch.allclose(stats.sum_exp, ref_stats.sum_exp, rtol=2e-2)
    print(f"exit_stats {backend} {name} N={n} d={d} V={v} misaligned={misaligned}: {'ok' if stats_ok else 'MISMATCH'}")
    return ok and stats_ok


def check_compaction(backend):
    keep = torch.rand(300, device="cuda") < 0.4
    x = torch.randn(300, 33, device="cuda")
    ids = torch.arange(300, device="cuda")
    (xk, ik), rows = compact(keep, x, ids, backend=backend)
    parts, _, _ = partition_rows(keep, x, ids, backend=backend)
    out = torch.zeros_like(x)
    scatter_rows(out, rows, xk, backend=backend)
    torch.cuda.synchronize()
    ok = torch.equal(xk, x[keep]) and torch.equal(parts[1][: int(keep.sum())], ids[keep])
    ok = ok and torch.equal(out[keep], x[keep]) and bool((out[~keep] == 0).all())
    print(f"compaction {backend}: {'ok' if ok else 'MISMATCH'}")
    return ok


def check_state_similarity(backend):
    """The state-similarity kernels: 16-byte and unaligned loads, a partial row block, the rescue path."""
    ok = True
    for dtype, n, d, off in [(torch.bfloat16, 17, 4096, 0), (torch.float32, 9, 577, 1), (torch.float16, 3, 64, 0)]:
        h = torch.randn(n, d + 1, device="cuda").to(dtype)[:, off : off + d]
        p = (h.float() + torch.randn(n, d, device="cuda")).to(dtype)
        if dtype != torch.float16:
            h[1] *= 2.0**100  # squares overflow float32: the rescue path
            p[2] *= 2.0**-130  # subnormal
        h[n - 1] = 0
        got = state_similarity(h, p, backend=backend)
        ref = state_similarity(h, p, backend="torch")
        torch.cuda.synchronize()
        case = f"{str(dtype).split('.')[-1]} N={n} d={d} offset={off}"
        good = torch.allclose(got, ref, rtol=0, atol=1e-3 if dtype == torch.float32 else 1e-2, equal_nan=True)
        print(f"state_similarity {backend} {case}: {'ok' if good else 'MISMATCH'}")
        ok = ok and good
    return ok


def check_gathered_merge():
    """The Triton merge of gathered vocabulary-parallel statistics (several programs, W no power of two)."""
    from earlyexit.distributed import _pack, merge_gathered
    from earlyexit.triton_kernels.merge_stats import merge_check_gathered_triton, merge_gathered_triton

    hidden = torch.randn(300, 64, device="cuda")
    weight = torch.randn(500, 64, device="cuda")
    bounds = [(0, 170), (170, 340), (340, 500)]
    parts = [exit_stats(hidden, weight[a:b], vocab_start=a, backend="torch") for a, b in bounds]
    words = torch.stack([_pack(p) for p in parts])
    got = merge_gathered_triton(words)
    want = merge_gathered(words.cpu())
    torch.cuda.synchronize()
    floats = (0, 2, 3, 4)  # max_logit, second_logit, sum_exp, sum_exp_z
    good = all(torch.equal(got[i].cpu(), want[i]) for i in (1, 5)) and all(
        torch.allclose(got[i].cpu(), want[i], rtol=1e-5, atol=1e-6) for i in floats
    )
    thr = torch.full((300,), 0.01, device="cuda")
    spec = get_head_measure("max_prob")
    check = merge_check_gathered_triton(words, thr, spec.code, spec.exit_above)
    want_check = finalize_exit_stats(want, thr.cpu())
    torch.cuda.synchronize()
    good = good and all(torch.equal(check[i].cpu(), want_check[i]) for i in (0, 1))
    print(f"merge_gathered triton W=3 N=300, statistics and decision: {'ok' if good else 'MISMATCH'}")
    return good


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="cuda,triton", help="comma-separated GPU backends to check")
    args = p.parse_args(argv)
    results = []
    for backend in args.backends.split(","):
        reason = backends.unavailable_reason(backend, "cuda")
        if reason is not None:
            print(f"{backend}: skipped ({reason})")
            continue
        results += [check_exit(backend, *case) for case in CASES]
        results.append(check_exit(backend, torch.bfloat16, 5, 64, 999, misaligned=True))
        results.append(check_compaction(backend))
        results.append(check_state_similarity(backend))
        if backend == "triton":
            results.append(check_gathered_merge())
    return 0 if results and all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
