"""The exit measures, defined once: which statistic each reads, which way it exits, how calibration sorts it.

Every layer reads this table: the reference and the kernels' launchers (the kernels receive a measure as
its statistic code and exit direction, never its name), ``exit_check``'s validation, ``EarlyExitLM``,
calibration, the CLI, the demo and the tests. A new measure is one new row here plus, if it reads a new
statistic, that statistic in the kernels' finalize step.
"""

from typing import NamedTuple

#: Statistics a measure can read, in the order of the kernels' statistic codes (csrc/exit_check_stats.h,
#: triton_kernels/exit_check.py): code i is STATISTICS[i], each an :class:`earlyexit.ExitResult` field.
STATISTICS = ("max_prob", "margin", "entropy")


class Measure(NamedTuple):
    """One exit measure.

    name: what users pass as ``measure=``. statistic: the :class:`earlyexit.ExitResult` field it reads.
    exit_above: True if a row exits when the statistic is >= the threshold (confidence), False if when it is
    <= the threshold (uncertainty). description: one line for help texts.
    """

    name: str
    statistic: str
    exit_above: bool
    description: str

    @property
    def code(self):
        """The statistic code the kernels receive (index in :data:`STATISTICS`)."""
        return STATISTICS.index(self.statistic)

    @property
    def rule(self):
        """The exit rule as text: ">=" or "<="."""
        return ">=" if self.exit_above else "<="

    def exits(self, value, threshold):
        """Bool tensor: rows whose statistic ``value`` passes ``threshold`` (NaN never passes)."""
        return value >= threshold if self.exit_above else value <= threshold

    def score(self, value):
        """The value calibration sorts by: larger always means more confident (an entropy is negated)."""
        return value if self.exit_above else -value

    def from_score(self, score):
        """Inverse of :meth:`score`: a threshold in the measure's own units."""
        return score if self.exit_above else -score


MEASURES = {
    m.name: m
    for m in (
        Measure("max_prob", "max_prob", True, "probability of the top-1 token (exit when >= threshold)"),
        Measure("margin", "margin", True, "top-1 minus top-2 probability (exit when >= threshold)"),
        Measure("entropy", "entropy", False, "entropy of the softmax in nats (exit when <= threshold)"),
    )
}
#: The names ``measure=`` accepts.
MEASURE_NAMES = tuple(MEASURES)


def get_measure(name):
    """The :class:`Measure` called ``name``; ValueError naming the argument ``measure`` otherwise."""
    try:
        return MEASURES[name]
    except (KeyError, TypeError):
        raise ValueError(f"measure: expected one of {MEASURE_NAMES}, got {name!r}") from None
