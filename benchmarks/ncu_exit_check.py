"""The decode exit-check kernels at the real head size, once each, for Nsight Compute.

gpu_check.sh runs it under `ncu --clock-control none` (METHOD.md: leave the clocks alone) with the
SpeedOfLight and memory sections, so one GPU session records where the Triton and CUDA decode kernels
stand against DRAM bandwidth (d=4096, V=128256, bf16, N = 1 and 64) and the next can tune without
another run. Each configuration runs twice: the first call compiles / autotunes and sets attributes,
ncu's filter (--launch-skip 0, kernel-name regex) keeps both; read the second.

Usage: python benchmarks/ncu_exit_check.py   (plain run: a quick smoke test of the same calls)
"""

import torch

import earlyexit
from earlyexit.ops import backends


def main():
    d, v = 4096, 128256
    g = torch.Generator(device="cuda").manual_seed(0)
    weight = (torch.randn(v, d, device="cuda", generator=g) / d**0.5).to(torch.bfloat16)
    norm = torch.ones(d, device="cuda", dtype=torch.bfloat16)
    for backend in ("triton", "cuda"):
        reason = backends.unavailable_reason(backend, "cuda")
        if reason is not None:
            print(f"{backend}: skipped ({reason})")
            continue
        for n in (1, 64):
            hidden = torch.randn(n, d, device="cuda", generator=g).to(torch.bfloat16)
            for _ in range(2):
                res = earlyexit.exit_check(hidden, weight, 0.5, norm_weight=norm, backend=backend)
            torch.cuda.synchronize()
            print(f"{backend} N={n}: token[0]={int(res.token[0])}")


if __name__ == "__main__":
    main()
