"""The kernel demo: the fused exit check on a real-sized LM head, checked against the reference."""

import torch

from earlyexit.ops import backends, exit_check
from earlyexit.timing import synchronized_clock


def _time(fn, device, reps):
    """Mean ms per call of ``reps`` back-to-back calls (after a warm-up call)."""
    fn()
    t0 = synchronized_clock(device)
    for _ in range(reps):
        fn()
    return (synchronized_clock(device) - t0) / reps * 1e3


def kernel_demo(device=None, rows=(1, 8, 64), threshold=0.5, out=print):
    """Run exit_check on every backend that can run here and print a comparison table.

    CPU: SmolLM2's head (d=576, V=49152) in float32; CUDA: a Llama-3-8B-sized head (d=4096,
    V=128256) in bfloat16. Random weights; the reference backend is the yardstick.
    Returns the table rows as dicts.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    d, v, dtype = (4096, 128256, torch.bfloat16) if device.type == "cuda" else (576, 49152, torch.float32)
    names = [
        b
        for b in backends.BACKENDS
        if backends.unavailable_reason(b, device.type) is None and not (b == "triton" and device.type == "cpu")
    ]
    out(f"fused exit check on {device} ({dtype}, head d={d} V={v}, {v * d * dtype.itemsize / 2**20:.0f} MiB)")
    out(f"backends here: {', '.join(names)}  (python -m earlyexit.env says why others are not)")
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(v, d, generator=gen) / d**0.5 * 6).to(dtype).to(device)
    norm_weight = (torch.rand(d, generator=gen) + 0.5).to(dtype).to(device)
    table = []
    for n in rows:
        hidden = (torch.randn(n, d, generator=gen)).to(dtype).to(device)
        ref = exit_check(hidden, weight, threshold, norm_weight=norm_weight, backend="torch")
        for name in names:
            call = lambda b=name, h=hidden: exit_check(h, weight, threshold, norm_weight=norm_weight, backend=b)  # noqa: E731
            res = call()
            ms = _time(call, device, reps=3 if device.type == "cpu" else 20)
            table.append(
                dict(
                    backend=name,
                    N=n,
                    ms=ms,
                    GBps=v * d * dtype.itemsize / ms / 1e6,
                    max_dp=(res.max_prob - ref.max_prob).abs().max().item(),
                    tokens_agree=int((res.token == ref.token).sum()),
                    exits=int(res.exit.sum()),
                )
            )
    out(f"{'backend':>8} {'N':>4} {'ms':>9} {'GB/s':>8} {'max|dP|':>9} {'tokens=ref':>10} {'exits':>6}")
    for r in table:
        out(
            f"{r['backend']:>8} {r['N']:>4} {r['ms']:>9.3f} {r['GBps']:>8.1f} {r['max_dp']:>9.2e} "
            f"{r['tokens_agree']:>5}/{r['N']:<4} {r['exits']:>6}"
        )
    return table
