"""Position-schedule calibration: the steepest SkipDecodeSchedule whose teacher-forced agreement meets a target.

Teacher-forced agreement of a schedule s on data: each window of ``seq_len`` tokens is a prompt (its
first ``prompt_len`` tokens) followed by a generation of N = seq_len - prompt_len + 1 positions;
generated position t is the prediction made at window position prompt_len - 1 + t (t = 0: the token
after the prompt). The schedule's token there is the shared head's argmax (final norm + lm_head, the
fused exit check generation uses) on the hidden state after s(t) decoder layers; its agreement is the
share of (window, t) whose token equals the full-depth token.

That is exact for generation, not an approximation: a schedule is non-increasing, so the layers a
position runs read only cache entries that earlier positions computed (see :mod:`earlyexit.schedule`),
and the hidden state after s(t) layers is the full model's on the same prefix. So one full-depth pass
over the data gives, per layer k and position t, the number of windows whose layer-k token agrees
(:func:`layer_agreement`), and every schedule is scored from that table (O(N) each; the model never
runs again per candidate).

The family (:func:`schedule_family`): ``SkipDecodeSchedule(L, m, warmup=w, decay=d, horizon=h)`` for
every min_layers m (default 1..L), warmup w (default 0), horizon h >= w (default 17 values from 0 to
N - 1, so min_layers is reached inside the measured positions) and decay d (default all of
:data:`~earlyexit.schedule.DECAYS`); full depth (m = L) is one member. "Steepest" = the fewest mean
decoder layers over the N measured positions; ties go to the higher agreement, then to the gentler
schedule (higher min_layers, then later horizon, later warmup, the decays in their listed order).
"""

import math
from dataclasses import dataclass, field

import torch

from earlyexit.ops import exit_check
from earlyexit.schedule import DECAYS, SkipDecodeSchedule
from earlyexit.tuning.progress import progress_bar
from earlyexit.tuning.teacher_forcing import collect_states
from earlyexit.tuning.text_data import token_windows

#: Default number of horizons in the family (spread evenly over the measured positions).
HORIZONS = 17


@dataclass
class LayerAgreement:
    """Teacher-forced agreement per layer and generated position.

    counts: int64 [L + 1, N]; counts[k, t] = windows whose token after k decoder layers equals the
    full-depth token at generated position t (rows below the lowest layer scored are 0; row L ==
    windows). windows: number of windows; prompt_len: the split point; num_layers: L.
    """

    counts: torch.Tensor
    windows: int
    prompt_len: int
    num_layers: int

    @property
    def positions(self):
        """N, the generated positions per window."""
        return self.counts.shape[1]

    def score(self, depths):
        """(agreement [C] float64, mean_layers [C] float64) of schedules given as depths int64 [C, N]."""
        t = torch.arange(self.positions).expand_as(depths)
        agreed = self.counts[depths, t].sum(1).double()
        return agreed / (self.windows * self.positions), depths.double().mean(1)


@dataclass
class ScheduleReport:
    """What a calibrated schedule achieves, teacher-forced on the calibration data.

    agreement: share of (window, position) whose token equals the full-depth token.
    mean_layers: mean decoder layers over the ``positions`` measured positions (N); num_layers: L.
    per_position: agreement at each generated position t (over the windows).
    windows, prompt_len: the data; target_agreement: the goal; candidates: schedules scored.
    """

    agreement: float
    mean_layers: float
    num_layers: int
    positions: int
    windows: int
    prompt_len: int
    target_agreement: float
    candidates: int
    per_position: list = field(default_factory=list)

    @property
    def layer_fraction(self):
        """mean_layers / L: the share of layer compute that still runs."""
        return self.mean_layers / self.num_layers

    def __str__(self):
        return (
            f"agreement {self.agreement:.2%} (target {self.target_agreement:.2%}), {self.mean_layers:.2f} of "
            f"{self.num_layers} layers ({self.layer_fraction:.1%}) over {self.positions} positions x {self.windows} "
            f"windows (prompt {self.prompt_len} tokens); {self.candidates} schedules scored"
        )


def _check_int(name, value, lo, hi=None):
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name}: expected an int {bound}, got {value!r}")
    return value


@torch.no_grad()
def layer_agreement(
    eem,
    data,
    *,
    tokenizer=None,
    seq_len=128,
    prompt_len=32,
    max_tokens=4096,
    lowest_layer=1,
    batch_size=8,
    progress=True,
):
    """The :class:`LayerAgreement` of ``eem``'s model on ``data``: one full-depth pass, one head per layer.

    Args:
        eem: an :class:`earlyexit.EarlyExitLM` (its model and shared head; its schedule, exit layers and
            heads are not used).
        data: list of strings (needs ``tokenizer``) or a LongTensor of token ids (see
            :func:`~earlyexit.tuning.text_data.token_windows`).
        seq_len, prompt_len: windows of seq_len tokens, each a prompt of prompt_len tokens
            (1 <= prompt_len < seq_len) and N = seq_len - prompt_len + 1 generated positions.
        max_tokens: token budget (whole windows). Cost: the model over the windows, plus one exit
            check per layer from ``lowest_layer`` to L - 1 on every generated position.
        lowest_layer: layers below it are not scored (their counts stay 0).
        batch_size: windows per forward pass (the states of one batch are kept at a time).
    """
    _check_int("seq_len", seq_len, 2)
    _check_int("prompt_len", prompt_len, 1, seq_len - 1)
    L = eem.num_layers
    _check_int("lowest_layer", lowest_layer, 1, L)
    windows = token_windows(data, seq_len, tokenizer=tokenizer, max_tokens=max_tokens)
    head = eem.adapter.exit_head
    dtype, device = head["weight"].dtype, head["weight"].device
    # Full-depth tokens from the lm_head input (collect_states' ``final`` is after the final norm).
    final_head = {k: v for k, v in head.items() if k not in ("norm_weight", "norm_eps", "norm_offset")}
    n_pos = seq_len - prompt_len + 1
    counts = torch.zeros(L + 1, n_pos, dtype=torch.int64)
    layers = list(range(lowest_layer, L))
    bar = progress_bar(total=windows.shape[0], desc="schedule calibration", unit="seq", enabled=progress)
    for i in range(0, windows.shape[0], batch_size):
        chunk = windows[i : i + batch_size]
        states, final = collect_states(eem.model, layers, chunk, batch_size=batch_size, progress=False)
        n = chunk.shape[0]
        full = _tokens(final, n, prompt_len, final_head, device, dtype)
        for k in layers:
            counts[k] += (_tokens(states[k], n, prompt_len, head, device, dtype) == full).sum(0)
        counts[L] += n
        bar.update(n)
    bar.close()
    return LayerAgreement(counts, windows.shape[0], prompt_len, L)


def _tokens(states, n, prompt_len, head, device, dtype):
    """The head's tokens [n, N] at the generated positions of n windows' states [n * seq_len, d]."""
    x = states.view(n, -1, states.shape[-1])[:, prompt_len - 1 :]
    tokens = exit_check(x.reshape(-1, x.shape[-1]).to(device, dtype), threshold=0.0, **head).token
    return tokens.cpu().view(n, -1)


def schedule_family(num_layers, positions, *, min_layers=None, warmups=(0,), horizons=None, decays=DECAYS):
    """The candidate schedules, gentlest first: ``SkipDecodeSchedule(L, m, warmup=w, decay=d, horizon=h)``.

    min_layers: candidate m (default 1..L); warmups: candidate w; horizons: candidate h (default
    :data:`HORIZONS` values spread over 0..positions - 1); pairs with h < w are left out; decays: a
    subset of :data:`~earlyexit.schedule.DECAYS`. Full depth (m = L) is always the first member.
    """
    L = num_layers
    ms = sorted(set(range(1, L + 1) if min_layers is None else min_layers), reverse=True)
    if not ms or any(isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= L for m in ms):
        raise ValueError(f"min_layers: expected ints in [1, {L}], got {min_layers!r}")
    if horizons is None:
        horizons = {round(j * (positions - 1) / (HORIZONS - 1)) for j in range(HORIZONS)}
    hs = sorted(set(horizons), reverse=True)
    ws = sorted(set(warmups), reverse=True)
    for name, values in (("horizons", hs), ("warmups", ws)):
        if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
            raise ValueError(f"{name}: expected ints >= 0, got {values!r}")
    if isinstance(decays, str) or not decays or any(d not in DECAYS for d in decays):
        raise ValueError(f"decays: expected a non-empty subset of {DECAYS}, got {decays!r}")
    family = [SkipDecodeSchedule(L, L)]
    for m in ms:
        if m == L:
            continue
        for h in hs:
            for w in ws:
                if h >= w:
                    family.extend(SkipDecodeSchedule(L, m, warmup=w, decay=d, horizon=h) for d in decays)
    return family


def choose_schedule(table, family, target_agreement):
    """The steepest member of ``family`` whose agreement on ``table`` (a :class:`LayerAgreement`) is at
    least ``target_agreement``: (schedule, its ScheduleReport). ValueError naming target_agreement if none."""
    n = table.positions
    depths = torch.tensor([s.layers(n) for s in family], dtype=torch.int64)
    agreement, mean_layers = table.score(depths)
    ok = (agreement >= target_agreement).nonzero().flatten().tolist()
    if not ok:
        raise ValueError(
            f"target_agreement: {target_agreement} is not reached by any of the {len(family)} schedules "
            f"(best agreement {float(agreement.max()):.4f})"
        )
    best = min(ok, key=lambda i: (float(mean_layers[i]), -float(agreement[i]), i))
    t = torch.arange(n)
    per_position = (table.counts[depths[best], t].double() / table.windows).tolist()
    report = ScheduleReport(
        agreement=float(agreement[best]),
        mean_layers=float(mean_layers[best]),
        num_layers=table.num_layers,
        positions=n,
        windows=table.windows,
        prompt_len=table.prompt_len,
        target_agreement=target_agreement,
        candidates=len(family),
        per_position=per_position,
    )
    return family[best], report


def calibrate_schedule(
    eem,
    data,
    *,
    target_agreement,
    tokenizer=None,
    seq_len=128,
    prompt_len=32,
    max_tokens=4096,
    min_layers=None,
    warmups=(0,),
    horizons=None,
    decays=DECAYS,
    progress=True,
):
    """The steepest SkipDecodeSchedule of the family whose teacher-forced agreement on ``data`` meets the
    target; set as ``eem.schedule`` and returned (see the module docstring for the agreement, the family
    and "steepest").

    Args:
        eem: an :class:`earlyexit.EarlyExitLM`; its ``schedule`` is set to the result.
        data: list of strings (needs ``tokenizer``) or a LongTensor of token ids.
        target_agreement: in (0, 1]; full depth always agrees, so every such target is reachable
            (1.0 may still give a shallower schedule where the data shows no disagreement).
        seq_len, prompt_len, max_tokens: the windows (see :func:`layer_agreement`): N = seq_len -
            prompt_len + 1 generated positions each, at most max_tokens tokens in all.
        min_layers, warmups, horizons, decays: the family (see :func:`schedule_family`).
        progress: show a progress bar over the windows (the model's pass and the heads).

    Returns:
        the :class:`~earlyexit.SkipDecodeSchedule`, with ``report`` a :class:`ScheduleReport` (its
        agreement, mean layers over the N positions, per-position agreement, candidates scored).

    Raises:
        ValueError naming the argument: target_agreement outside (0, 1] (or NaN, or not a number) or
        unreached, bad windows or family arguments, empty data, strings without a tokenizer.
    """
    if (
        isinstance(target_agreement, bool)
        or not isinstance(target_agreement, (int, float))
        or math.isnan(target_agreement)
        or not 0 < target_agreement <= 1
    ):
        raise ValueError(f"target_agreement: expected a value in (0, 1], got {target_agreement!r}")
    _check_int("seq_len", seq_len, 2)
    _check_int("prompt_len", prompt_len, 1, seq_len - 1)
    family = schedule_family(
        eem.num_layers,
        seq_len - prompt_len + 1,
        min_layers=min_layers,
        warmups=warmups,
        horizons=horizons,
        decays=decays,
    )
    lowest = min(s.min_layers for s in family)
    table = layer_agreement(
        eem,
        data,
        tokenizer=tokenizer,
        seq_len=seq_len,
        prompt_len=prompt_len,
        max_tokens=max_tokens,
        lowest_layer=lowest,
        progress=progress,
    )
    schedule, report = choose_schedule(table, family, float(target_agreement))
    schedule.report = report
    eem.schedule = schedule
    return schedule
