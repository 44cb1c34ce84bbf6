"""The exit measures, defined once: which statistic each reads, which way it exits, how calibration sorts it.

Every layer reads this table: the reference and the kernels' launchers (the kernels receive a measure as
its statistic code and exit direction, never its name), ``exit_check``'s validation, ``EarlyExitLM``,
calibration, the CLI, the demo and the tests. A new measure is one new row here plus, if it reads a new
statistic, that statistic in the kernels' finalize step.

A measure's ``source`` says where its statistic comes from: "head" measures (max_prob, margin, entropy)
read the exit head's softmax, which :func:`earlyexit.exit_check` computes (:data:`HEAD_MEASURES`, the
only ones it and the other head ops accept: :func:`get_head_measure`); the "state" measure (CALM's
hidden-state saturation) reads the cosine similarity of the hidden states after k and k - 1 decoder
layers, which :func:`earlyexit.state_similarity` computes without the head. ``EarlyExitLM``, calibration
and the CLI accept every measure (:data:`MEASURE_NAMES`).
"""

from typing import NamedTuple

#: Statistics a head measure can read, in the order of the kernels' statistic codes (csrc/exit_check_stats.h,
#: triton_kernels/exit_check.py): code i is STATISTICS[i], each an :class:`earlyexit.ExitResult` field.
STATISTICS = ("max_prob", "margin", "entropy")
#: Where a measure's statistic comes from: the exit head (exit_check) or the hidden states (state_similarity).
SOURCES = ("head", "state")


class Measure(NamedTuple):
    """One exit measure.

    name: what users pass as ``measure=``. statistic: the :class:`earlyexit.ExitResult` field it reads (a
    head measure), or "state_similarity" (the output of :func:`earlyexit.state_similarity`).
    exit_above: True if a row exits when the statistic is >= the threshold (confidence), False if when it is
    <= the threshold (uncertainty). description: one line for help texts. source: "head" or "state" (see
    the module docstring).
    """

    name: str
    statistic: str
    exit_above: bool
    description: str
    source: str = "head"

    @property
    def code(self):
        """The statistic code the kernels receive (index in :data:`STATISTICS`); ValueError for a state measure."""
        get_head_measure(self.name)
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
        Measure(
            "state",
            "state_similarity",
            True,
            "cosine similarity of the hidden states after k and k-1 layers, no head (exit when >= threshold)",
            "state",
        ),
    )
}
#: The names ``EarlyExitLM(measure=)``, calibration and the CLI accept.
MEASURE_NAMES = tuple(MEASURES)
#: The measures the exit head computes: those :func:`earlyexit.exit_check` (and ExitHead, finalize_exit_stats) accept.
HEAD_MEASURES = {name: m for name, m in MEASURES.items() if m.source == "head"}
HEAD_MEASURE_NAMES = tuple(HEAD_MEASURES)


def get_measure(name):
    """The :class:`Measure` called ``name``; ValueError naming the argument ``measure`` otherwise."""
    try:
        return MEASURES[name]
    except (KeyError, TypeError):
        raise ValueError(f"measure: expected one of {MEASURE_NAMES}, got {name!r}") from None


def get_head_measure(name):
    """The head :class:`Measure` called ``name`` (the exit check's measures); ValueError naming the argument
    ``measure`` otherwise, saying so when ``name`` is a measure of the hidden states ("state")."""
    spec = MEASURES.get(name) if isinstance(name, str) else None
    if spec is not None and spec.source != "head":
        raise ValueError(
            f"measure: {name!r} is not a head statistic (it compares hidden states, not the head's softmax: "
            f"use earlyexit.state_similarity); the exit check takes one of {HEAD_MEASURE_NAMES}"
        )
    if spec is None:
        raise ValueError(f"measure: expected one of {HEAD_MEASURE_NAMES}, got {name!r}")
    return spec
