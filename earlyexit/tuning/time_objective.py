"""Cost-aware exit policies: which exit layers to keep, and their thresholds, for the least time per token.

A policy keeps some exit layers with a threshold each. Its expected time per token at ``rows`` rows per
step (batch size 1 by default), from teacher-forced :class:`~earlyexit.tuning.calibrate.ExitScores` and a
:class:`~earlyexit.tuning.costs.CostModel`:

- a token exiting at kept layer k pays k layers, the exit checks of the kept layers up to k, its exit
  token beyond the check there (the head on its row under the state measure, whose checks are the
  similarity only; nothing for the head measures) and L - k layers of state propagation;
- a token running full depth pays L layers, every kept exit check and the full-depth head.

Per-token costs at ``rows`` rows are the cost model's time for ``rows`` rows divided by ``rows`` (this
ignores that compaction runs the layers after an exit on fewer rows).

An exit check that rarely passes costs more than it saves, so layers are dropped as in Apparate's ramp
adjustment: starting from all exit layers, drop the one whose removal lowers the expected time most
(re-searching the thresholds of the others) while that helps. Keeping no layer (early exit off: full
depth, no checks) is a candidate too.

Calibrated thresholds lose agreement on unseen text, so the target is raised by a margin measured on the
data itself: the positions are split into two contiguous halves (different text windows), a policy is
searched on each half and its agreement measured on the other; the larger of the two drops (>= 0) is
the margin. The larger, not the mean: on synthetic data the mean underestimated the drop to fresh text,
because one half's luck cancels the other's drop.
"""

from dataclasses import dataclass

import torch

from earlyexit.tuning.calibrate import ExitScores, candidate_thresholds, simulate


@dataclass
class TimePolicy:
    """A cost-aware exit policy on some ExitScores.

    kept: indices (into ``scores.exit_layers``) of the kept exit layers, increasing (empty: early exit off).
    thresholds: float tensor [m] in score units, +inf for dropped layers.
    time_s, full_depth_s: expected seconds per token of the policy and of full depth.
    margin: agreement added to the target before searching; target: the agreement searched for.
    """

    kept: list
    thresholds: torch.Tensor
    time_s: float
    full_depth_s: float
    margin: float = 0.0
    target: float = None


def token_costs(costs, exit_layers, kept, num_layers, rows=1):
    """Expected seconds per token by outcome.

    Returns:
        (exit_s, full_s): float64 tensor [m] (seconds of a token exiting at exit layer j; meaningless for
        dropped layers, which no token exits at) and a float (seconds of a token running full depth).
    """
    layer = costs.layer_s(rows) / rows
    prop = costs.propagate_s(rows) / rows
    checks = torch.tensor(
        [costs.exit_check_s(k, rows) / rows if j in kept else 0.0 for j, k in enumerate(exit_layers)],
        dtype=torch.float64,
    )
    exit_tokens = torch.tensor(
        [costs.exit_token_s(k, rows) / rows if j in kept else 0.0 for j, k in enumerate(exit_layers)],
        dtype=torch.float64,
    )
    depth = torch.tensor(exit_layers, dtype=torch.float64)
    exit_s = checks.cumsum(0) + exit_tokens + depth * layer + (num_layers - depth) * prop
    full_s = float(checks.sum()) + num_layers * layer + costs.head_s(rows) / rows
    return exit_s, full_s


def _time_of(counts, tokens, exit_s, full_s):
    """Mean seconds per token given exit counts [m] over ``tokens`` positions."""
    exited = counts.to(torch.float64)
    return (float(exited @ exit_s) + (tokens - float(exited.sum())) * full_s) / tokens


def expected_time(scores, thresholds, kept, costs, rows=1):
    """Expected seconds per token of keeping exit layers ``kept`` (indices) with score ``thresholds`` [m]."""
    thr = _drop(thresholds, kept)
    exit_s, full_s = token_costs(costs, scores.exit_layers, kept, scores.num_layers, rows)
    _, _, counts = simulate(scores, thr)
    return _time_of(counts, scores.scores.shape[1], exit_s, full_s)


def _drop(thresholds, kept):
    """Thresholds [m] with +inf (never passes) at the layers not kept."""
    keep = torch.zeros(thresholds.shape[0], dtype=torch.bool)
    keep[list(kept)] = True
    return torch.where(keep, thresholds, torch.inf)


def _positions(scores, sl):
    """The ExitScores of positions ``sl`` (a slice) only."""
    return ExitScores(
        scores.scores[:, sl], scores.correct[:, sl], scores.exit_layers, scores.num_layers, scores.measure
    )


def _outcomes(passes, exit_s, full_s, correct):
    """Per token: (seconds float64 [T], agrees bool [T]) of exiting at the first passing layer, else full depth."""
    any_pass = passes.any(0)
    first = passes.int().argmax(0)
    seconds = torch.where(any_pass, exit_s[first], full_s)
    ok = torch.where(any_pass, correct.gather(0, first[None])[0], True)
    return seconds, ok


def _greedy_time(scores, exit_s, full_s, target, quantiles):
    """Score thresholds [m] for all layers of ``scores``: the least expected time with agreement >= target.

    The greedy search of :func:`~earlyexit.tuning.calibrate.choose_thresholds` (from "never exit", the
    move with the most time saved per agreement lost), but each round scores every lower candidate of
    every layer at once: with the other thresholds fixed, lowering layer j's threshold to c changes only
    the tokens that reach j and score >= c there, so sorted cumulative sums give all candidates' totals.
    """
    m, tokens = scores.scores.shape
    cands = candidate_thresholds(scores, quantiles)
    order = [torch.argsort(scores.scores[j], descending=True, stable=True) for j in range(m)]
    # reach[j][i]: tokens scoring >= candidate i at layer j (a prefix of order[j]).
    reach = [(scores.scores[j][None, :] >= cands[j][:, None]).sum(1) for j in range(m)]
    idx = [0] * m
    thr = torch.tensor([c[0] for c in cands])
    while True:
        passes = scores.scores >= thr[:, None]
        seconds, ok = _outcomes(passes, exit_s, full_s, scores.correct)
        cur_t, cur_ok = float(seconds.sum()), int(ok.sum())
        best = None
        for j in range(m):
            if idx[j] + 1 >= len(cands[j]):
                continue
            rest = passes.clone()
            rest[j] = False
            base_s, base_ok = _outcomes(rest, exit_s, full_s, scores.correct)
            free = ~passes[:j].any(0)  # tokens that reach layer j
            d_s = torch.where(free, exit_s[j] - base_s, 0.0)[order[j]]
            d_ok = torch.where(free, scores.correct[j].long() - base_ok.long(), 0)[order[j]]
            zero = torch.zeros(1, dtype=torch.float64)
            tot_s = float(base_s.sum()) + torch.cat([zero, d_s.cumsum(0)])[reach[j]]
            tot_ok = int(base_ok.sum()) + torch.cat([zero.long(), d_ok.cumsum(0)])[reach[j]]
            lower = torch.arange(len(cands[j])) > idx[j]
            valid = lower & (tot_ok.float() / tokens >= target) & (tot_s < cur_t)  # as simulate's agreement
            if not bool(valid.any()):
                continue
            ratio = (cur_t - tot_s) / torch.clamp((cur_ok - tot_ok).double(), min=1e-12)
            i = int(torch.where(valid, ratio, -torch.inf).argmax())
            if best is None or ratio[i] > best[0]:
                best = (float(ratio[i]), j, i)
        if best is None:
            return thr
        _, j, i = best
        idx[j] = i
        thr[j] = cands[j][i]


def _search_kept(scores, kept, costs, target, rows, quantiles):
    """(thresholds [m], seconds per token): thresholds of the layers ``kept``, searched for the least time."""
    m, tokens = scores.scores.shape
    exit_s, full_s = token_costs(costs, scores.exit_layers, kept, scores.num_layers, rows)
    thr = torch.full((m,), torch.inf)
    if kept:
        thr[kept] = _greedy_time(scores.subset(kept), exit_s[kept], full_s, target, quantiles)
    _, _, counts = simulate(scores, thr)
    return thr, _time_of(counts, tokens, exit_s, full_s)


def search_policy(scores, costs, target_agreement, rows=1, quantiles=128):
    """Kept exit layers and thresholds with agreement >= target and the least expected time per token.

    Backward elimination from all exit layers; each candidate set of layers gets its thresholds from a
    greedy search with expected time as the cost.
    Returns a :class:`TimePolicy` (margin 0).
    """
    kept = list(range(len(scores.exit_layers)))
    thr, best = _search_kept(scores, kept, costs, target_agreement, rows, quantiles)
    while kept:
        trials = [[i for i in kept if i != j] for j in kept]
        results = [_search_kept(scores, t, costs, target_agreement, rows, quantiles) for t in trials]
        i = min(range(len(trials)), key=lambda i: results[i][1])
        if results[i][1] >= best:
            break
        kept, (thr, best) = trials[i], results[i]
    _, full_s = token_costs(costs, scores.exit_layers, [], scores.num_layers, rows)
    if best >= full_s:  # no kept set pays for its checks: early exit off
        kept, thr, best = [], torch.full_like(thr, torch.inf), full_s
    return TimePolicy(kept, thr, best, full_s, 0.0, target_agreement)


def held_out_drop(scores, costs, target_agreement, rows=1, quantiles=128):
    """Agreement lost from one half of the positions to the other by a policy searched on the first.

    Both ways round; returns the larger loss (>= 0).
    """
    half = scores.scores.shape[1] // 2
    halves = (_positions(scores, slice(0, half)), _positions(scores, slice(half, None)))
    drops = []
    for fit, check in (halves, halves[::-1]):
        policy = search_policy(fit, costs, target_agreement, rows, quantiles)
        drops.append(simulate(fit, policy.thresholds)[0] - simulate(check, policy.thresholds)[0])
    return max(0.0, *drops)


def time_policy(scores, costs, target_agreement, rows=1, quantiles=128):
    """:func:`search_policy` for ``target_agreement`` raised by :func:`held_out_drop` (capped at 1)."""
    margin = held_out_drop(scores, costs, target_agreement, rows, quantiles)
    target = min(1.0, target_agreement + margin)
    policy = search_policy(scores, costs, target, rows, quantiles)
    policy.margin = margin
    return policy
