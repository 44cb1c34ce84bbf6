"""earlyexit.timing: the synchronized clock and the median timer every timing layer uses."""

import time

import torch

from earlyexit.timing import median_seconds, synchronized_clock


def test_median_seconds_warms_up_then_takes_the_median():
    # One warm-up call (slow, as a first call that compiles or allocates) and three timed calls of
    # which one is slow: neither may set the result.
    durations = iter([0.2, 0.0, 0.05, 0.0])
    calls = []

    def fn():
        calls.append(1)
        time.sleep(next(durations))

    seconds = median_seconds(fn, 3, torch.device("cpu"))
    assert len(calls) == 4
    assert 0.0 <= seconds < 0.05


def test_synchronized_clock_reads_perf_counter_for_any_device_spelling():
    before = time.perf_counter()
    assert before <= synchronized_clock("cpu") <= synchronized_clock(torch.device("cpu")) <= time.perf_counter()


def test_median_seconds_runs_before_untimed_before_each_timed_call():
    order = []

    def before():
        order.append("before")
        time.sleep(0.05)  # untimed: must not reach the result

    seconds = median_seconds(lambda: order.append("fn"), 3, torch.device("cpu"), before=before)
    assert order == ["fn", "before", "fn", "before", "fn", "before", "fn"]
    assert seconds < 0.05
