"""SkipDecodeSchedule and the schedule checks of earlyexit.schedule (pure Python, no model, milliseconds)."""

import math
import pickle
import subprocess
import sys

import pytest
import torch

from earlyexit import SkipDecodeSchedule
from earlyexit.schedule import DECAYS, check_schedule, schedule_depths


def _curve(s, t):
    """The documented continuous curve c(t) of a schedule, for warmup <= t < horizon."""
    M, m, w, h = s.max_layers, s.min_layers, s.warmup, s.horizon
    u = (t - w + 1) / (h - w + 1)
    if s.decay == "linear":
        return m + (M - m) * (1 - u)
    if s.decay == "cosine":
        return m + (M - m) * (1 + math.cos(math.pi * u)) / 2
    return M * (m / M) ** u


PARAMS = [(30, 8, 0, 20), (30, 8, 3, 23), (6, 2, 0, 5), (6, 1, 2, 40), (12, 11, 0, 3), (5, 5, 1, 9), (7, 3, 4, 4)]


@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("M,m,w,h", PARAMS)
def test_values_follow_the_documented_curve(decay, M, m, w, h):
    s = SkipDecodeSchedule(M, m, warmup=w, decay=decay, horizon=h)
    values = s.layers(h + 10)
    assert all(isinstance(v, int) for v in values)
    assert values[:w] == [M] * w, "max_layers for the first warmup positions"
    assert values[h:] == [m] * 10, "min_layers from the horizon on"
    assert all(a >= b for a, b in zip(values, values[1:])), "non-increasing"
    assert all(m <= v <= M for v in values)
    for t in range(w, h):
        c = _curve(s, t)
        if abs(c - round(c)) > 1e-6:  # off the integer boundaries, where float rounding may decide either way
            assert values[t] == math.ceil(c), (t, c, values[t])
    assert s(10**9) == m


def test_linear_is_exact_in_integers():
    # 6 -> 2 over u = (t + 1) / 7: c = 2 + 4 (6 - t) / 7, ceil: 6, 5, 5, 4, 4, 3, then 2.
    assert SkipDecodeSchedule(6, 2, horizon=6).layers(9) == [6, 5, 5, 4, 4, 3, 2, 2, 2]
    # c(t) crosses integers exactly at t = 1, 3 (M - m = 4, span = 4): the ceiling keeps them.
    assert SkipDecodeSchedule(6, 2, horizon=3).layers(5) == [5, 4, 3, 2, 2]
    assert SkipDecodeSchedule(6, 2, warmup=2, horizon=2).layers(4) == [6, 6, 2, 2], "horizon == warmup: a step"
    assert SkipDecodeSchedule(4, 4).layers(3) == [4, 4, 4]
    assert SkipDecodeSchedule(6, 2, horizon=0).layers(2) == [2, 2]


def test_defaults_repr_equality_and_helpers():
    s = SkipDecodeSchedule(6, 2, warmup=3)
    assert s.horizon == 3 + 128 and s.decay == "linear"
    assert repr(s) == "SkipDecodeSchedule(max_layers=6, min_layers=2, warmup=3, decay='linear', horizon=131)"
    assert eval(repr(s)) == s and hash(eval(repr(s))) == hash(s)
    assert s != SkipDecodeSchedule(6, 2, warmup=3, decay="cosine") and s != (6, 2)
    assert s.layers(0) == [] and s.layers(5) == [s(t) for t in range(5)]
    assert s.mean_layers(4) == sum(s.layers(4)) / 4
    assert len(s.drops) == 4 and list(s.drops) == sorted(s.drops)
    assert pickle.loads(pickle.dumps(s)) == s and s.report is None


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(max_layers=6, min_layers=0), "min_layers"),
        (dict(max_layers=6, min_layers=-1), "min_layers"),
        (dict(max_layers=4, min_layers=5), "min_layers"),
        (dict(max_layers=0, min_layers=1), "max_layers"),
        (dict(max_layers=6.0, min_layers=2), "max_layers"),
        (dict(max_layers=True, min_layers=1), "max_layers"),
        (dict(max_layers=6, min_layers=float("nan")), "min_layers"),
        (dict(max_layers=6, min_layers=2, warmup=-1), "warmup"),
        (dict(max_layers=6, min_layers=2, warmup=1.5), "warmup"),
        (dict(max_layers=6, min_layers=2, warmup=5, horizon=4), "horizon"),
        (dict(max_layers=6, min_layers=2, horizon=-1), "horizon"),
        (dict(max_layers=6, min_layers=2, decay="step"), "decay"),
        (dict(max_layers=6, min_layers=2, decay=None), "decay"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, name):
    M, m = kwargs.pop("max_layers"), kwargs.pop("min_layers")
    with pytest.raises(ValueError, match=f"^{name}"):
        SkipDecodeSchedule(M, m, **kwargs)


def test_position_must_be_a_non_negative_int():
    s = SkipDecodeSchedule(6, 2)
    for bad in (-1, 1.0, True):
        with pytest.raises(ValueError, match="^t:"):
            s(bad)


def test_schedule_depths_accepts_callables_sequences_and_tensors():
    L = 6
    assert schedule_depths(SkipDecodeSchedule(6, 2, horizon=6), 4, L) == [6, 5, 5, 4]
    assert schedule_depths(lambda t: max(2, L - t), 6, L) == [6, 5, 4, 3, 2, 2]
    assert schedule_depths([5, 3], 4, L) == [5, 3, 3, 3], "past its end a sequence keeps its last value"
    assert schedule_depths(torch.tensor([4, 4, 1]), 3, L) == [4, 4, 1]
    assert schedule_depths(lambda t: torch.tensor(3), 2, L) == [3, 3], "0-d integer tensors are ints"


@pytest.mark.parametrize(
    "schedule",
    [
        lambda t: 2 + t,  # increasing
        [3, 4],  # increasing sequence
        lambda t: 0,  # below 1
        lambda t: 7,  # above L
        lambda t: float("nan"),
        lambda t: 3.0,
        lambda t: True,
        lambda t: None,
        [],
        "654",
        3,
        torch.tensor(3),
        SkipDecodeSchedule(7, 2),  # max_layers > L
    ],
)
def test_schedule_depths_errors_name_schedule(schedule):
    with pytest.raises(ValueError, match="^schedule"):
        schedule_depths(schedule, 4, 6)


def test_check_schedule_without_positions():
    check_schedule(lambda t: 99, 6)  # a callable is only checked over a call's positions
    with pytest.raises(ValueError, match="schedule: max_layers=7"):
        check_schedule(SkipDecodeSchedule(7, 2), 6)
    with pytest.raises(ValueError, match="^schedule"):
        check_schedule([6, 7], 6)


def test_import_needs_no_transformers():
    code = "import sys, earlyexit; earlyexit.SkipDecodeSchedule(4, 2); assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
