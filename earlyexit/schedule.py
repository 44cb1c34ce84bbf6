"""Position schedules (SkipDecode): how many decoder layers each generated position runs.

A position schedule gives generated position t (t = 0 for the first generated token) a number of
decoder layers, the same for every row of the batch and non-increasing in t. With it,
:class:`earlyexit.EarlyExitLM` runs exactly ``schedule(t)`` layers at position t, takes the token
through the shared head there (no exit checks, no compaction: one static shape per position) and
fills the skipped upper layers' cache by state propagation.

SkipDecode (Del Corro et al., 2023, arXiv 2307.02628) skips the *lower* layers of a model fine-tuned
for it: the upper layers always run, so they always have every earlier token's cache. Its batch
shares one budget per position, non-increasing with position, so no earlier token lacks a layer that
a later one needs. Here the models are unmodified pretrained ones, which only give sensible tokens
from their first k layers (behind the final norm and lm_head), so the skipped layers are the
*upper* ones. Non-increasing keeps SkipDecode's property the other way round: a token at position t
runs layers 0..schedule(t)-1, and every earlier token ran at least those, so every layer a token
runs reads only computed (never propagated) cache entries of earlier tokens: its hidden states are
exactly the full model's on the same prefix. The upper layers' entries that state propagation writes
are never read while the schedule runs; they keep the cache complete (every entry is what the model
would cache, or the propagated state of a skipped layer) for whatever continues from it.

This module needs neither torch nor transformers.
"""

import bisect
import math
import numbers
import operator
from collections.abc import Sequence

#: The decays of :class:`SkipDecodeSchedule`: the shape of the curve from max_layers to min_layers.
DECAYS = ("linear", "cosine", "exponential")

#: Default decay length: horizon = warmup + DEFAULT_DECAY_POSITIONS when not given.
DEFAULT_DECAY_POSITIONS = 128


def _int_arg(name, value, lowest):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}: expected an int >= {lowest}, got {value!r}")
    value = int(value)
    if value < lowest:
        raise ValueError(f"{name}: expected an int >= {lowest}, got {value}")
    return value


class SkipDecodeSchedule:
    """Decoder layers per generated position: max_layers, then a decay to min_layers, then min_layers.

    ``schedule(t)`` for generated position t >= 0 (t = 0 is the first generated token):

    - ``max_layers`` for the first ``warmup`` positions (t < warmup; none when warmup = 0);
    - for warmup <= t < horizon, the ceiling of the curve c(t) that falls from max_layers M (at
      t = warmup - 1) to min_layers m (at t = horizon), with u = (t - warmup + 1) / (horizon - warmup + 1):

      - ``"linear"``: c = m + (M - m) (1 - u) (computed in integers, no rounding error);
      - ``"cosine"``: c = m + (M - m) (1 + cos(pi u)) / 2 (slow start and end);
      - ``"exponential"``: c = M (m / M) ** u (the same factor fewer layers per position);

    - ``min_layers`` from t = horizon on.

    Rounding: the ceiling, so a position never runs fewer layers than the curve. The schedule is
    stored as the positions where it drops by one layer (``drops``, sorted), so every value is an
    int in [min_layers, max_layers] and the schedule is non-increasing by construction.
    ``horizon == warmup`` is a step: max_layers for t < warmup, min_layers after.

    Args:
        max_layers: M >= 1 (at most the model's L; EarlyExitLM checks that).
        min_layers: m, 1 <= m <= M.
        warmup: positions at max_layers before the decay starts (int >= 0).
        decay: one of :data:`DECAYS`.
        horizon: the first position at min_layers (int >= warmup); default warmup + 128.

    Raises:
        ValueError naming the argument: non-int or out-of-range layer counts (min_layers < 1,
        min_layers > max_layers), warmup < 0, horizon < warmup, unknown decay.

    Equality and hashing compare the five arguments. ``report`` is None, or what
    :func:`earlyexit.calibrate_schedule` measured for the schedule it returns (not compared).
    """

    __slots__ = ("max_layers", "min_layers", "warmup", "decay", "horizon", "drops", "report")

    def __init__(self, max_layers, min_layers, *, warmup=0, decay="linear", horizon=None):
        max_layers = _int_arg("max_layers", max_layers, 1)
        min_layers = _int_arg("min_layers", min_layers, 1)
        if min_layers > max_layers:
            raise ValueError(f"min_layers: expected <= max_layers ({max_layers}), got {min_layers}")
        warmup = _int_arg("warmup", warmup, 0)
        if not isinstance(decay, str) or decay not in DECAYS:
            raise ValueError(f"decay: expected one of {DECAYS}, got {decay!r}")
        if horizon is None:
            horizon = warmup + DEFAULT_DECAY_POSITIONS
        horizon = _int_arg("horizon", horizon, 0)
        if horizon < warmup:
            raise ValueError(f"horizon: expected >= warmup ({warmup}), the first position at min_layers, got {horizon}")
        self.max_layers, self.min_layers, self.warmup = max_layers, min_layers, warmup
        self.decay, self.horizon = decay, horizon
        self.drops = tuple(sorted(self._drop(k) for k in range(1, max_layers - min_layers + 1)))
        self.report = None

    def _drop(self, k):
        """The first position at which the schedule runs at most max_layers - k layers (1 <= k <= M - m)."""
        M, m, w, h = self.max_layers, self.min_layers, self.warmup, self.horizon
        span = h - w + 1  # u = (t - w + 1) / span
        if self.decay == "linear":
            # c(t) <= M - k  <=>  (M - m)(h - t) / span <= M - m - k  <=>  t >= w - 1 + span k / (M - m)
            t = w - 1 - (-span * k // (M - m))
        else:
            if self.decay == "cosine":  # (1 + cos(pi u)) / 2 <= y  <=>  u >= acos(2y - 1) / pi
                y = (M - m - k) / (M - m)
                u = math.acos(max(-1.0, min(1.0, 2 * y - 1))) / math.pi
            else:  # M (m / M) ** u <= M - k  <=>  u >= log((M - k) / M) / log(m / M)
                u = math.log((M - k) / M) / math.log(m / M)
            t = w - 1 + math.ceil(span * u - 1e-9)
        return min(h, max(w, t))

    def __call__(self, t):
        """Decoder layers of generated position t (an int >= 0)."""
        if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0:
            raise ValueError(f"t: expected a position, an int >= 0, got {t!r}")
        return self.max_layers - bisect.bisect_right(self.drops, t)

    def layers(self, n):
        """The first n values: [schedule(0), ..., schedule(n - 1)]."""
        n = _int_arg("n", n, 0)
        return [self(t) for t in range(n)]

    def mean_layers(self, n):
        """Mean decoder layers over the first n positions (n >= 1)."""
        n = _int_arg("n", n, 1)
        return sum(self.layers(n)) / n

    def _key(self):
        return (self.max_layers, self.min_layers, self.warmup, self.decay, self.horizon)

    def __eq__(self, other):
        if not isinstance(other, SkipDecodeSchedule):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        return (
            f"SkipDecodeSchedule(max_layers={self.max_layers}, min_layers={self.min_layers}, warmup={self.warmup}, "
            f"decay={self.decay!r}, horizon={self.horizon})"
        )


def check_schedule(schedule, num_layers):
    """Validate what can be validated without positions: the type, a SkipDecodeSchedule's max_layers,
    a sequence's values (see :func:`schedule_depths`). Returns ``schedule``; ValueError naming it."""
    if isinstance(schedule, SkipDecodeSchedule):
        if schedule.max_layers > num_layers:
            raise ValueError(
                f"schedule: max_layers={schedule.max_layers} is more than the model's {num_layers} decoder layers"
            )
    elif not callable(schedule):
        _checked(_as_sequence(schedule), num_layers)
    return schedule


def schedule_depths(schedule, n, num_layers):
    """The decoder layers of positions 0..n-1 under ``schedule``: a list of n ints.

    ``schedule``: a :class:`SkipDecodeSchedule`, any callable t -> int, or a sequence of ints (a list,
    tuple or 1-D tensor: position t takes entry t, positions past its end its last entry). Each value
    must be an int (what ``operator.index`` takes, not a bool: floats and NaN are refused) in
    [1, num_layers], and the values must be non-increasing in t: a later position runs no more layers
    than an earlier one (the layers it would add have no computed cache entries of the earlier tokens).
    A callable is called once per position, t = 0..n-1.

    Raises:
        ValueError naming ``schedule``: not a schedule, a value of the wrong type or outside
        [1, num_layers], an increase, a SkipDecodeSchedule whose max_layers exceeds num_layers.
    """
    check_schedule(schedule, num_layers)
    if callable(schedule):
        return _checked([schedule(t) for t in range(n)], num_layers)
    values = _as_sequence(schedule)
    return _checked([values[min(t, len(values) - 1)] for t in range(n)], num_layers)


def _as_sequence(schedule):
    """A non-empty sequence of values (a tensor or array as a list); ValueError naming schedule otherwise."""
    if hasattr(schedule, "tolist") and not isinstance(schedule, Sequence):
        schedule = schedule.tolist()  # a tensor or array; a 0-d one gives a number, refused below
    if isinstance(schedule, (str, bytes)) or not isinstance(schedule, Sequence):
        raise ValueError(
            "schedule: expected a SkipDecodeSchedule, a callable t -> decoder layers or a sequence of layer "
            f"counts, got {type(schedule).__name__}"
        )
    if len(schedule) == 0:
        raise ValueError("schedule: an empty sequence (expected the layer count of position 0 at least)")
    return schedule


def _checked(raw, num_layers):
    """raw values of positions 0, 1, ... as ints in [1, num_layers], non-increasing; ValueError naming schedule."""
    depths = []
    for t, v in enumerate(raw):
        try:
            if isinstance(v, bool):
                raise TypeError
            d = operator.index(v)
        except TypeError:
            raise ValueError(f"schedule: schedule({t}) = {v!r}, expected an int number of decoder layers") from None
        if not 1 <= d <= num_layers:
            raise ValueError(f"schedule: schedule({t}) = {d}, expected an int in [1, {num_layers}] (decoder layers)")
        if depths and d > depths[-1]:
            raise ValueError(
                f"schedule: must be non-increasing in t, got schedule({t}) = {d} after schedule({t - 1}) = "
                f"{depths[-1]} (a later position cannot run layers whose cache an earlier one left uncomputed)"
            )
        depths.append(d)
    return depths
