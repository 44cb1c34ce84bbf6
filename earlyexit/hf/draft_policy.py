"""Exact mode's draft policy: how deep to draft, when to stop drafting, how many drafts per round.

A round drafts at a fixed depth E (layers 0..E-1, then the fused exit check through E's head), stops
at the first draft whose confidence falls below the draft threshold (that draft is dropped: the
verification already has its input's states) or after ``max_tokens`` drafts, then verifies the
block at full depth. Depth None is plain decoding: one full-depth step per round, no exit check.

A draft's confidence is the min over the round's rows of the draft token's probability (max_prob at
E) under the head measures, and of the hidden-state similarity cos(h_E, h_(E-1)) under
``measure="state"`` (the draft token still comes from the head). Thresholds are in those units:
probabilities (:data:`THRESHOLDS`; 0 never stops early) or cosines (:data:`NEVER_STATE` = -inf never
stops early; the adaptive policy's other candidates are quantiles of the similarities it has seen at
that depth, :data:`STATE_QUANTILES`, since how saturated the states get depends on the model and the
depth). Either way the verification keeps exact mode's output that of ``model.generate``.

:class:`DraftPolicy` is a fixed configuration. :class:`AdaptiveDraft` ("auto") chooses one per round
from what it has measured so far: the wall time of plain steps, draft steps per depth and
verifications, and the acceptance of the last :data:`WINDOW` drafts per depth by confidence. It picks
the configuration with the most expected tokens per second and decodes plainly when no drafting beats
plain steps, re-trying one draft now and then so the estimates can recover, as long as what the
drafting rounds lost against plain steps (plus the next probe's worst case) stays within
:data:`EXPLORE_BUDGET` of the time so far. By default it learns within one generate call;
:class:`DraftMemory` keeps one per batch size across calls (``EarlyExitLM.draft_memory``), so a call
starts from what the earlier ones measured instead of from a pessimistic prior.
"""

import collections
import math
import numbers
import operator
from dataclasses import dataclass

#: Draft thresholds (draft-token probability) the adaptive policy chooses from; 0 never stops early.
THRESHOLDS = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95)
#: measure="state": the draft threshold that never stops early (a NaN similarity counts as -inf).
NEVER_STATE = float("-inf")
#: measure="state": quantiles of the similarities seen at a depth that the adaptive policy also tries.
STATE_QUANTILES = (0.1, 0.25, 0.5)

#: Share of the time so far that losing drafting rounds may cost before probes pause.
EXPLORE_BUDGET = 0.03
#: Drafts per depth whose confidence and acceptance the adaptive policy remembers. Older ones are
#: forgotten, so that the estimates follow a drift (other prompts, a carried memory) and a choice
#: costs the same in the thousandth round as in the tenth.
WINDOW = 512
#: Keys (batch size, sampling setting) a :class:`DraftMemory` keeps a policy for; the least recently
#: used one is forgotten beyond it, so that a server seeing many batch sizes and temperatures stays
#: within a bounded memory.
MEMORY_KEYS = 64


@dataclass(frozen=True)
class DraftPolicy:
    """A fixed draft configuration for ``EarlyExitLM.draft``.

    depth: E, draft after the first E decoder layers (1 <= E < L) through E's exit head if E is an
        exit layer, else the shared head; None = no drafting (plain full-depth decoding).
    threshold: stop drafting at the first draft whose confidence is below it: the min-over-rows
        probability of the draft token (max_prob at E; 0 never stops early), or under
        ``measure="state"`` the min-over-rows cos(h_E, h_(E-1)) (-inf never stops early).
    max_tokens: most drafts per round: an int >= 1 when drafting; with depth None it is not read
        (any int >= 0).

    The fields are checked when the policy is made (ValueError naming the field; depth and max_tokens
    take any integer type, stored as int, not a bool; threshold any real number but NaN, stored as
    float). Whether depth is below the model's L is checked by ``EarlyExitLM.generate``.
    """

    depth: int | None = None
    threshold: float = 0.0
    max_tokens: int = 4

    def __post_init__(self):
        depth = None if self.depth is None else _integer(self.depth, "depth", 1, "None or an int >= 1")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, numbers.Real):
            raise ValueError(f"DraftPolicy.threshold: expected a real number, got {self.threshold!r}")
        if math.isnan(self.threshold):  # every comparison with NaN is False: it would silently never stop
            raise ValueError("DraftPolicy.threshold: expected a real number, not NaN")
        if depth is None:
            max_tokens = _integer(self.max_tokens, "max_tokens", 0, "an int >= 0")
        else:
            max_tokens = _integer(self.max_tokens, "max_tokens", 1, "an int >= 1 when drafting (depth set)")
        # Frozen: the normalized values (a numpy int, a numpy float) go in through object.__setattr__.
        object.__setattr__(self, "depth", depth)
        object.__setattr__(self, "threshold", float(self.threshold))
        object.__setattr__(self, "max_tokens", max_tokens)


def _integer(value, name, least, expected):
    """``value`` as an int >= least (any integer type but bool, through operator.index); ValueError naming
    ``DraftPolicy.<name>`` otherwise."""
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"DraftPolicy.{name}: expected {expected}, got {value!r}") from None
    if value < least:
        raise ValueError(f"DraftPolicy.{name}: expected {expected}, got {value!r}")
    return value


class FixedDraft:
    """The per-call driver of a :class:`DraftPolicy`: the same choice every round, nothing learned."""

    rounds_observed = 0  # what a later call would start from: nothing is kept

    def __init__(self, policy):
        self.policy = policy

    def choose(self, limit):
        """The configuration of the next round; limit: most drafts the round may make (>= 0)."""
        p = self.policy
        if p.depth is None or min(p.max_tokens, limit) < 1:
            return DraftPolicy(None)
        return DraftPolicy(p.depth, p.threshold, min(p.max_tokens, limit))

    def observe_plain(self, seconds):
        """A plain step took ``seconds``."""

    def observe_round(self, depth, confidences, drafted, accepted, draft_s, verify_s):
        """A drafting round: see :meth:`AdaptiveDraft.observe_round`."""


class _Ema:
    """Exponential moving average that starts at its first observation."""

    def __init__(self, weight=0.3):
        self.value, self.weight = None, weight

    def add(self, x):
        self.value = x if self.value is None else (1 - self.weight) * self.value + self.weight * x


class AdaptiveDraft:
    """Online choice of (depth, threshold, max_tokens) from costs and acceptance measured in the call.

    Model of a round at depth E, threshold t, at most n drafts, with p = P(draft probability >= t)
    and a = P(accepted | confident, previous accepted), both measured at E (a starts from a prior
    that grows with E): draft steps 1 + p + ... + p^(n-1), verified drafts m = p + ... + p^n,
    tokens 1 + sum_i (p a)^i; time = steps x draft_s(E) + verify, verify = plain_s x ((L - E) / L x
    (1 + beta x m) + p^n x E / L) (layers E.. on the block, plus layers ..E of the last draft when no
    draft stopped the round). beta, the cost of one more verified position relative to one, is
    measured from the verifications.

    Args:
        num_layers: L. depths: candidate draft depths (the exit layers). max_tokens: most drafts per
            round (0 = never draft). measure: the EarlyExitLM's measure: "state" drafts with state
            similarities as confidences (thresholds: :data:`NEVER_STATE` and :data:`STATE_QUANTILES` of
            the similarities seen at the depth), any other with max_prob (:data:`THRESHOLDS`).
    """

    def __init__(self, num_layers, depths, max_tokens, measure="max_prob"):
        self.num_layers = num_layers
        self.depths = list(depths)
        self.max_tokens = max_tokens
        self.state = measure == "state"
        self.never = NEVER_STATE if self.state else THRESHOLDS[0]
        self.plain_s = _Ema()
        self.draft_s = {e: _Ema() for e in self.depths}
        self.beta = _Ema()
        # Per depth, the last WINDOW drafts: (min-over-rows confidence, accepted or None if dropped).
        self.seen = {e: collections.deque(maxlen=WINDOW) for e in self.depths}
        self.best = None  # (rate, DraftPolicy) of the best drafting configuration, None = recompute
        self.elapsed_s = 0.0  # time of all rounds so far
        self.lost_s = 0.0  # time drafting rounds took beyond plain steps for the same tokens
        self.rounds_observed = 0  # rounds observed (plain steps and drafting rounds)

    def _acceptance(self, e, t):
        """(p, a) at depth e and threshold t: P(confidence >= t) and P(accepted | confident)."""
        seen = self.seen[e]
        confident = [acc for c, acc in seen if c >= t]
        p = 1.0 if t == self.never else (len(confident) + 0.5) / (len(seen) + 1)
        verified = [acc for acc in confident if acc is not None]  # acceptance shares in [0, 1]
        prior = 0.8 * e / self.num_layers
        return p, (sum(verified) + 2 * prior) / (len(verified) + 2)

    def _rate(self, e, p, a, n):
        """Expected tokens per second of drafting at depth e, at most n drafts, with (p, a) of
        :meth:`_acceptance` for the threshold."""
        L, plain = self.num_layers, self.plain_s.value
        steps = sum(p**i for i in range(n))
        m = sum(p**i for i in range(1, n + 1))
        tokens = 1 + sum((p * a) ** i for i in range(1, n + 1))
        draft = self._draft_cost(e)
        beta = 0.1 if self.beta.value is None else self.beta.value
        verify = plain * ((L - e) / L * (1 + beta * m) + p**n * e / L)
        return tokens / (steps * draft + verify)

    def _draft_cost(self, e):
        """Seconds of one draft step at depth e: measured, else e layers and about two for the exit check."""
        return self.draft_s[e].value or self.plain_s.value * (e + 2) / self.num_layers

    def _thresholds(self, e):
        """Draft thresholds to try at depth e: :data:`THRESHOLDS`, or for the state measure
        :data:`NEVER_STATE` and the :data:`STATE_QUANTILES` of the finite similarities seen at e."""
        if not self.state:
            return THRESHOLDS
        seen = sorted(c for c, _ in self.seen[e] if math.isfinite(c))
        quantiles = sorted({seen[int(q * (len(seen) - 1))] for q in STATE_QUANTILES}) if seen else []
        return (NEVER_STATE, *quantiles)

    def _best(self):
        if self.best is None:
            best = None
            for e in self.depths:
                for t in self._thresholds(e):
                    p, a = self._acceptance(e, t)
                    for n in range(1, self.max_tokens + 1):
                        rate = self._rate(e, p, a, n)
                        if best is None or rate > best[0]:  # the first of equal rates, as max() picks
                            best = rate, DraftPolicy(e, t, n)
            self.best = best
        return self.best

    def choose(self, limit):
        """The configuration of the next round; limit: most drafts the round may make (>= 0)."""
        if self.plain_s.value is None or min(self.max_tokens, limit) < 1 or not self.depths:
            return DraftPolicy(None)
        rate, best = self._best()
        if rate * self.plain_s.value > 1.0:
            return DraftPolicy(best.depth, best.threshold, min(best.max_tokens, limit))
        # A probe: the most promising drafting configuration with one draft, when the budget covers
        # the losses so far plus this probe's worst case (about one draft step).
        if self.lost_s + self._draft_cost(best.depth) <= EXPLORE_BUDGET * self.elapsed_s:
            return DraftPolicy(best.depth, best.threshold, 1)
        return DraftPolicy(None)

    def observe_plain(self, seconds):
        """A plain step took ``seconds``."""
        self.plain_s.add(seconds)
        self.elapsed_s += seconds
        self.rounds_observed += 1

    def observe_round(self, depth, confidences, drafted, accepted, draft_s, verify_s):
        """A drafting round at ``depth``.

        confidences: the min-over-rows confidence of each draft step (the last one dropped when
        ``drafted`` < len(confidences)); drafted: drafts verified; accepted: drafts each row kept
        (a sequence of ints, one per row that ran); draft_s, verify_s: wall time of the draft steps
        and of the verification.
        """
        seen = self.seen[depth]
        for i, c in enumerate(confidences):
            if i < drafted:
                # Acceptance of draft i among the rows that accepted every draft before it; drafts
                # after a row's first rejection tell nothing.
                reached = [a for a in accepted if a >= i]
                if reached:
                    seen.append((c, sum(a > i for a in reached) / len(reached)))
            else:
                seen.append((c, None))
        self.draft_s[depth].add(draft_s / len(confidences))
        plain, L = self.plain_s.value, self.num_layers
        if drafted > 0 and plain:
            below = depth / L if drafted == len(confidences) else 0.0
            self.beta.add(max(0.0, (verify_s / plain - below) / ((L - depth) / L) - 1) / drafted)
        self.elapsed_s += draft_s + verify_s
        # Every row gains its accepted drafts plus one token, against one token per plain step.
        tokens = 1 + sum(accepted) / len(accepted)
        self.lost_s += max(0.0, draft_s + verify_s - tokens * plain)
        self.rounds_observed += 1
        self.best = None


class DraftMemory:
    """What the adaptive policy learned, kept across generate calls: one :class:`AdaptiveDraft` per
    key (the batch size, on which costs and the min-over-rows confidences depend, and how tokens are
    chosen, on which acceptance depends), for one configuration.

    ``config`` is anything comparable that says what the measurements were made with (exit layers,
    heads, measure, most drafts, draft vocabulary, device, dtype); another one forgets them all. At
    most :data:`MEMORY_KEYS` keys are kept, the least recently used forgotten first.
    """

    def __init__(self):
        self.clear()

    def policy(self, config, key, make, keep=()):
        """The remembered policy of ``key`` under ``config``, else a new one from ``make()``.

        keep: the objects whose ``id()`` ``config`` holds. They stay referenced while remembered, so
        that no new object takes one of their ids and passes for them.
        """
        if config != self.config:
            self.config, self.kept, self.by_key = config, tuple(keep), collections.OrderedDict()
        if key in self.by_key:
            self.by_key.move_to_end(key)
        else:
            self.by_key[key] = make()
            if len(self.by_key) > MEMORY_KEYS:
                self.by_key.popitem(last=False)
        return self.by_key[key]

    def clear(self):
        """Forget every measurement."""
        self.config, self.kept, self.by_key = None, (), collections.OrderedDict()
