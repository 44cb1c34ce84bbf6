"""Threshold calibration: per-exit-layer thresholds that keep agreement with full depth high.

Teacher-forced on calibration text, each position is scored at every exit layer by the same fused
exit check generation uses (with the EarlyExitLM's heads and measure; under ``measure="state"`` by
the similarity of the states after k and k - 1 layers, :func:`earlyexit.state_similarity`, with the
exit token from the head as generation takes it). A policy "exit at the first
exit layer whose confidence passes its threshold" is then simulated for candidate thresholds; a
greedy search lowers thresholds where that saves the most cost per unit of agreement lost, while
agreement with the full-depth token stays >= the target. The cost is mean layers per token
(``objective="layers"``) or the expected time per token of a measured cost model, which also decides
which exit layers to keep (``objective="time"``, :mod:`earlyexit.tuning.time_objective`).
"""

from dataclasses import dataclass, field

import torch

from earlyexit.ops import exit_check, state_similarity
from earlyexit.ops.measures import HEAD_MEASURE_NAMES, get_measure
from earlyexit.tuning.teacher_forcing import collect_states
from earlyexit.tuning.text_data import token_windows

_STEPS = (1, 2, 4, 8, 16, 32)
OBJECTIVES = ("time", "layers")


@dataclass
class CalibrationReport:
    """What a set of thresholds achieves, teacher-forced on some data.

    Attributes:
        thresholds: one per exit layer, in the measure's own units (inf / -inf: never exits).
        agreement: fraction of positions whose token equals the full-depth token.
        mean_layers: mean decoder layers run per token; num_layers: L.
        exit_fraction: {exit layer: fraction of tokens exiting there}; the rest run full depth.
        tokens: positions evaluated; target_agreement: the goal (None when only evaluated).
        objective: "layers" or "time". With "time" also: time_per_token_s and full_depth_time_s (expected
        seconds per token of the policy and of full depth, batch size 1), dropped_layers (exit layers
        removed; exit_fraction names the kept ones, none when early exit is off) and margin (agreement
        added to the target for held-out text).
    """

    thresholds: list
    agreement: float
    mean_layers: float
    num_layers: int
    exit_fraction: dict
    tokens: int
    measure: str
    target_agreement: float = None
    extra: dict = field(default_factory=dict)
    objective: str = "layers"
    time_per_token_s: float = None
    full_depth_time_s: float = None
    dropped_layers: list = field(default_factory=list)
    margin: float = 0.0

    @property
    def layer_fraction(self):
        """mean_layers / L: the share of layer compute that still runs."""
        return self.mean_layers / self.num_layers

    @property
    def time_fraction(self):
        """time_per_token_s / full_depth_time_s (None without a time objective)."""
        return None if self.time_per_token_s is None else self.time_per_token_s / self.full_depth_time_s

    def __str__(self):
        thr = ", ".join(f"{k}: {t:.4g}" for k, t in zip(self.exit_fraction, self.thresholds))
        exits = ", ".join(f"{k}: {f:.1%}" for k, f in self.exit_fraction.items())
        goal = "" if self.target_agreement is None else f" (target {self.target_agreement:.2%})"
        text = (
            f"{self.measure} thresholds {{{thr}}}: agreement {self.agreement:.2%}{goal}, "
            f"{self.mean_layers:.2f} of {self.num_layers} layers ({self.layer_fraction:.1%}) on {self.tokens} tokens; "
            f"exits {{{exits}}}"
        )
        if self.time_per_token_s is None:
            return text
        off = "early exit OFF (no exit layer pays for its checks); " if not self.exit_fraction else ""
        return (
            f"{text}; {off}expected {self.time_per_token_s * 1e3:.3f} ms/token vs {self.full_depth_time_s * 1e3:.3f} "
            f"ms at full depth ({self.time_fraction:.1%}); dropped layers {self.dropped_layers}; "
            f"target margin +{self.margin:.2%}"
        )


@dataclass
class ExitScores:
    """Teacher-forced exit statistics: ``scores`` [m, T] (higher = more confident, -inf = invalid),
    ``correct`` [m, T] (exit token == full-depth token), exit layers and L."""

    scores: torch.Tensor
    correct: torch.Tensor
    exit_layers: list
    num_layers: int
    measure: str

    def subset(self, idx):
        """The ExitScores of the exit layers at indices ``idx`` (a list of ints) only."""
        layers = [self.exit_layers[i] for i in idx]
        return ExitScores(self.scores[idx], self.correct[idx], layers, self.num_layers, self.measure)


def _to_score(confidence, measure):
    return torch.nan_to_num(get_measure(measure).score(confidence.float()), nan=-torch.inf)


def _from_score(score, measure):
    return get_measure(measure).from_score(score)


def exit_scores(eem, data, *, tokenizer=None, seq_len=128, max_tokens=8192, progress=True):
    """Score every position of ``data`` at every exit layer of ``eem`` (teacher-forced). Returns ExitScores."""
    windows = token_windows(data, seq_len, tokenizer=tokenizer, max_tokens=max_tokens)
    previous = get_measure(eem.measure).source == "state"  # it compares the states after k and k - 1 layers
    states, final = collect_states(
        eem.model, eem.exit_layers, windows, desc="calibration states", progress=progress, previous=previous
    )
    return exit_scores_from_states(eem, states, final)


def exit_scores_from_states(eem, states, final, chunk=4096):
    """:func:`exit_scores` on states already collected (see :func:`earlyexit.tuning.teacher_forcing.collect_states`).

    Every exit layer of ``eem`` must be a key of ``states`` (under ``measure="state"`` every k - 1 too:
    ``collect_states(..., previous=True)``); ``final`` [T, d] is the lm_head input.
    """
    return exit_scores_by_measure(eem, states, final, (eem.measure,), chunk)[eem.measure]


@torch.no_grad()
def exit_scores_by_measure(eem, states, final, measures=HEAD_MEASURE_NAMES, chunk=4096):
    """{measure: ExitScores} for several measures from one exit check per position and exit layer.

    The fused exit check returns max_prob, margin and entropy together, so sweeping the head measures
    costs one pass over the head, not one per measure. "state" reads cos(h_k, h_(k-1)) of the raw
    states (before any adapter; ``states`` must then hold every k - 1 too) and shares the exit tokens:
    a row exiting at k takes the head's token there under every measure.
    Raises ValueError for an unknown measure or states missing a layer "state" needs.
    """
    sources = {m: get_measure(m).source for m in measures}
    state = "state" in sources.values()
    missing = sorted({k - 1 for k in eem.exit_layers} - set(states)) if state else []
    if missing:
        raise ValueError(
            f"states: the state measure compares the states after k and k - 1 layers, but layers {missing} "
            "are missing (collect them with collect_states(..., previous=True))"
        )
    head = eem.adapter.exit_head
    dtype, device = head["weight"].dtype, head["weight"].device
    # The full model's tokens from its lm_head input (``final`` is after the final norm): the same head
    # without the norm, softcap and temperature included (a softcap can tie saturated logits).
    final_head = {k: v for k, v in head.items() if k not in ("norm_weight", "norm_eps", "norm_offset")}
    full = torch.cat(
        [
            exit_check(final[i : i + chunk].to(device, dtype), threshold=0.0, **final_head).token.cpu()
            for i in range(0, final.shape[0], chunk)
        ]
    )
    scores = {m: [] for m in measures}
    correct = []
    for k, adapter in zip(eem.exit_layers, eem.heads):
        stats = {m: [] for m in measures}
        tok = []
        for i in range(0, final.shape[0], chunk):
            h = states[k][i : i + chunk].to(device, dtype)
            # The similarity of the raw states, as generation decides: an adapter only shapes the token.
            similarity = state_similarity(h, states[k - 1][i : i + chunk].to(device, dtype)).cpu() if state else None
            if adapter is not None:
                h = adapter(h)
            r = exit_check(h, threshold=0.0, **head)
            for m in measures:
                head_stat = sources[m] == "head"
                stats[m].append(getattr(r, get_measure(m).statistic).cpu() if head_stat else similarity)
            tok.append(r.token.cpu())
        for m in measures:
            scores[m].append(_to_score(torch.cat(stats[m]), m))
        correct.append(torch.cat(tok) == full)
    correct = torch.stack(correct)
    return {m: ExitScores(torch.stack(scores[m]), correct, list(eem.exit_layers), eem.num_layers, m) for m in measures}


def simulate(scores, thresholds):
    """Agreement and mean layers of "exit at the first layer whose score >= its threshold".

    Args:
        scores: :class:`ExitScores`. thresholds: float tensor [m] in score units (+inf: never).
    Returns:
        (agreement, mean_layers, exit_counts [m]) as (float, float, LongTensor).
    """
    if not scores.exit_layers:  # no exit layer: every token runs full depth
        return 1.0, float(scores.num_layers), torch.zeros(0, dtype=torch.int64)
    passes = scores.scores >= thresholds[:, None]
    any_pass = passes.any(0)
    first = passes.int().argmax(0)  # the first passing layer (argmax returns the first maximum)
    depths = torch.tensor(scores.exit_layers, dtype=torch.float32)
    layers = torch.where(any_pass, depths[first], float(scores.num_layers))
    ok = torch.where(any_pass, scores.correct.gather(0, first[None])[0], True)
    counts = torch.bincount(first[any_pass], minlength=len(scores.exit_layers))
    return ok.float().mean().item(), layers.mean().item(), counts


def candidate_thresholds(scores, quantiles=128):
    """Per exit layer, the thresholds a search tries: +inf (never), then the scores' quantiles, decreasing.

    Returns a list of m float tensors.
    """
    cands = []
    for j in range(scores.scores.shape[0]):
        s = scores.scores[j][torch.isfinite(scores.scores[j])]
        qs = torch.quantile(s, torch.linspace(0, 1, quantiles)) if s.numel() else torch.empty(0)
        cands.append(torch.cat([torch.tensor([torch.inf]), torch.unique(qs).flip(0)]))
    return cands


def choose_thresholds(scores, target_agreement, quantiles=128):
    """Greedy search for score thresholds with agreement >= target and as few mean layers as possible.

    Starts from "never exit" (agreement 1, L layers) and repeatedly takes the single threshold
    move, over candidate thresholds at the quantiles of each layer's scores, that saves the most
    mean layers per unit of agreement lost while staying at or above the target.
    Returns a float tensor [m] of score thresholds.
    """
    m = scores.scores.shape[0]
    cands = candidate_thresholds(scores, quantiles)
    idx = [0] * m
    cur = torch.tensor([c[0] for c in cands])
    acc, lay, _ = simulate(scores, cur)
    while True:
        best = None
        for j in range(m):
            for step in _STEPS:
                if idx[j] + step >= len(cands[j]):
                    break
                trial = cur.clone()
                trial[j] = cands[j][idx[j] + step]
                a, ly, _ = simulate(scores, trial)
                if a < target_agreement or ly >= lay:
                    continue
                ratio = (lay - ly) / max(acc - a, 1e-12)
                if best is None or ratio > best[0]:
                    best = (ratio, j, idx[j] + step, a, ly)
        if best is None:
            return cur
        _, j, i, acc, lay = best
        idx[j] = i
        cur[j] = cands[j][i]


def report_for(scores, thresholds, target_agreement=None):
    """A :class:`CalibrationReport` for score-unit ``thresholds`` on ``scores``."""
    acc, lay, counts = simulate(scores, thresholds)
    total = scores.scores.shape[1]
    return CalibrationReport(
        thresholds=[_from_score(t, scores.measure).item() for t in thresholds],
        agreement=acc,
        mean_layers=lay,
        num_layers=scores.num_layers,
        exit_fraction={k: c.item() / total for k, c in zip(scores.exit_layers, counts)},
        tokens=total,
        measure=scores.measure,
        target_agreement=target_agreement,
    )


def to_score_thresholds(thresholds, measure):
    """Measure-unit thresholds (as EarlyExitLM holds them) -> score-unit float tensor."""
    return torch.tensor([float(_from_score(torch.tensor(float(t)), measure)) for t in thresholds])


def _check_costs(costs, eem):
    from earlyexit.tuning.costs import CostModel  # needs transformers, as eem does

    if costs is None:
        return
    if not isinstance(costs, CostModel):
        raise ValueError(f"costs: expected None or a CostModel (earlyexit.measure_costs), got {type(costs).__name__}")
    state = get_measure(eem.measure).source == "state"
    if eem.exit_layers and state != bool(costs.exit_token):
        raise ValueError(
            f"costs: measured for {'the state measure' if costs.exit_token else 'the head measures'}, but eem's "
            f"measure is {eem.measure!r} (measure them with earlyexit.measure_costs(eem))"
        )
    measured = set(costs.exit_check) & set(costs.exit_token) if state else set(costs.exit_check)
    missing = sorted(set(eem.exit_layers) - measured)
    if costs.num_layers != eem.num_layers or missing:
        raise ValueError(
            f"costs: measured for {costs.num_layers} layers and exit layers {sorted(costs.exit_check)}, "
            f"but the model has {eem.num_layers} layers and exit layers {eem.exit_layers}"
        )


def calibrate(
    eem,
    data,
    *,
    target_agreement=0.99,
    tokenizer=None,
    objective="time",
    costs=None,
    seq_len=128,
    max_tokens=8192,
    progress=True,
):
    """Choose exit thresholds (and, by time, exit layers) for ``eem`` on calibration data, and apply them.

    Teacher-forced on ``data``, the chosen policy gives an agreement with the full-depth token of at
    least ``target_agreement`` on this data, as cheaply as the greedy search finds:

    - ``objective="time"`` (default): least expected time per token at batch size 1 under the cost
      model ``costs`` (measured with :func:`earlyexit.measure_costs` when None). Exit layers whose checks
      cost more than they save are dropped (``eem.set_exit_layers``; none left: early exit off), and the
      target is first raised by the agreement a policy loses between two halves of the data
      (see :mod:`earlyexit.tuning.time_objective`).
    - ``objective="layers"``: fewest mean layers per token, every exit layer kept, the target as given.

    Args:
        eem: an :class:`earlyexit.EarlyExitLM` (its heads and measure are used; its thresholds are set).
        data: list of strings (needs ``tokenizer``) or a LongTensor of token ids.
        target_agreement: in (0, 1].
        costs: None or a :class:`earlyexit.CostModel` of ``eem`` (used with objective="time").
        seq_len, max_tokens: teacher-forcing windows and the token budget.
    Returns:
        (thresholds, report): the list set on ``eem.thresholds`` and a :class:`CalibrationReport`.
    Raises:
        ValueError: a target outside (0, 1], unknown objective, costs not a CostModel of this model,
        empty data, strings without a tokenizer, an EarlyExitLM without exit layers.
    """
    if not isinstance(target_agreement, (int, float)) or not 0 < target_agreement <= 1:
        raise ValueError(f"target_agreement: expected a value in (0, 1], got {target_agreement!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective: expected one of {OBJECTIVES}, got {objective!r}")
    _check_costs(costs, eem)
    if not eem.exit_layers:
        raise ValueError("eem: has no exit layers (early exit is off); wrap the model again with exit layers")
    scores = exit_scores(eem, data, tokenizer=tokenizer, seq_len=seq_len, max_tokens=max_tokens, progress=progress)
    if objective == "layers":
        chosen = choose_thresholds(scores, target_agreement)
        report = report_for(scores, chosen, target_agreement)
        eem.thresholds = list(report.thresholds)
        return report.thresholds, report
    from earlyexit.tuning.costs import measure_costs
    from earlyexit.tuning.time_objective import time_policy  # builds on this module's search

    policy = time_policy(scores, measure_costs(eem) if costs is None else costs, target_agreement)
    report = time_report(scores, policy, target_agreement)
    eem.set_exit_layers(list(report.exit_fraction), report.thresholds)
    return report.thresholds, report


def time_report(scores, policy, target_agreement=None):
    """A :class:`CalibrationReport` of a :class:`~earlyexit.tuning.time_objective.TimePolicy` on ``scores``."""
    report = report_for(scores.subset(policy.kept), policy.thresholds[policy.kept], target_agreement)
    report.objective = "time"
    report.time_per_token_s, report.full_depth_time_s = policy.time_s, policy.full_depth_s
    report.dropped_layers = [k for i, k in enumerate(scores.exit_layers) if i not in policy.kept]
    report.margin = policy.margin
    return report
