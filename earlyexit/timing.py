"""Wall-clock timing of device work, one definition for every layer that times it: the generation
loop (its stats and the adaptive draft policy), the cost model and the demos."""

import statistics
import time

import torch


def synchronized_clock(device):
    """``time.perf_counter()`` once the work queued on ``device`` has finished.

    device: a ``torch.device`` or its name. CUDA work runs asynchronously, so the clock waits for the
    device first (``torch.cuda.synchronize``); CPU ops have finished when they return.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def median_seconds(fn, repeats, device, *, before=None):
    """Median seconds of ``fn()`` over ``repeats`` calls (after one warm-up call), each call timed
    between two :func:`synchronized_clock` readings on ``device``.

    before: a callable run, untimed, before each timed call (for example work that leaves the caches
    as the real context of ``fn`` would); None: the calls run back to back.
    """
    fn()
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        t0 = synchronized_clock(device)
        fn()
        times.append(synchronized_clock(device) - t0)
    return statistics.median(times)
