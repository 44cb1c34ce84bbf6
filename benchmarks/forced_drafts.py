"""Controlled acceptance for exact mode: drafts forced to agree with the verifier a chosen fraction of the time.

Exact mode's speed depends on how often its drafts are accepted, which with the shared head of a model
not trained for early exit is rarely. :func:`forced_drafts` sets that acceptance: it wraps
``earlyexit.hf.generate.draft_step`` so every draft step still runs for real (layers 0..E-1 and the exit
check: its cost is paid), then replaces each running row's draft token by the full model's greedy token
with probability ``alpha`` and by a wrong one otherwise, and reports each draft's probability as 1.0
(so no draft threshold ends a round). The verification is untouched, so the output still equals
``model.generate``; what changes is how many drafts it keeps. This is the ceiling of the mechanics:
what a model trained for early exit (e.g. a LayerSkip checkpoint) whose draft at depth E agrees with
full depth a fraction alpha of the time can expect.

Usage::

    ref = model.generate(ids, attention_mask=am, max_new_tokens=n, do_sample=False)[:, ids.shape[1]:]
    eem.draft = DraftPolicy(8, 0.0, 4)
    with forced_drafts(ref, am, alpha=0.8, vocab_size=model.config.vocab_size) as stats:
        out = eem.generate(ids, am, max_new_tokens=n, mode="exact")
    stats.hit_rate  # share of forced drafts that were the reference token (about alpha)
"""

import contextlib
from dataclasses import dataclass, field

import torch

import earlyexit.hf.generate as hf_generate
from earlyexit.hf.draft_policy import AdaptiveDraft, FixedDraft


@dataclass
class ForcedStats:
    """What the forcing did, accumulated over the generate calls inside :func:`forced_drafts`.

    drafts: forced draft tokens (running rows x draft steps). hits: those set to the reference token.
    draft_steps: draft steps run (each one a real draft step).
    rounds: per drafting round, (drafts verified, drafts accepted (one int per running row), draft
        seconds, verify seconds) as exact mode's loop reports them to its draft policy (verify seconds
        include the acceptance).
    """

    drafts: int = 0
    hits: int = 0
    draft_steps: int = 0
    rounds: list = field(default_factory=list)

    @property
    def hit_rate(self):
        """Share of forced drafts equal to the reference (about alpha); NaN before any draft."""
        return self.hits / self.drafts if self.drafts else float("nan")


class ForcedDrafts:
    """A replacement for ``draft_step``: the real step, then the draft tokens set by a seeded coin.

    Args:
        reference: int64 [B, n], the full model's greedy tokens of each row (``model.generate``'s
            generated part); where a row's position lies beyond it, the draft is a wrong token.
        attention_mask: [B, T] of the prompt (1 = token): its row sums are the real prompt lengths.
        alpha: probability that a draft is the reference token (independent per draft).
        vocab_size: V; a wrong draft is (reference + 1) mod V.
        seed: of the torch.Generator drawing the coins.
        stats: a :class:`ForcedStats` to accumulate into.
        real: the draft step to run (default: earlyexit.hf.forward.draft_step).
    """

    def __init__(self, reference, attention_mask, alpha, vocab_size, *, seed=0, stats=None, real=None):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha: expected a probability in [0, 1], got {alpha!r}")
        self.reference = torch.as_tensor(reference, dtype=torch.int64)
        self.prompt_len = attention_mask.long().sum(1)
        self.alpha = float(alpha)
        self.vocab_size = int(vocab_size)
        self.generator = torch.Generator().manual_seed(seed)
        self.stats = stats if stats is not None else ForcedStats()
        self.real = real if real is not None else hf_generate.draft_step

    def __call__(self, adapter, cache, input_ids, attention_mask, running, depth, head, counters, *more):
        # *more: draft_step's further arguments (the draft sub-vocabulary), passed through.
        tokens, prob, state = self.real(
            adapter, cache, input_ids, attention_mask, running, depth, head, counters, *more
        )
        device = tokens.device
        ref = self.reference.to(device)
        # The mask covers the cached positions and the draft's input (0 for padding and cache holes):
        # the real positions past the prompt are the index of the token being drafted.
        g = attention_mask.long().sum(1) - self.prompt_len.to(device)
        inside = (g >= 0) & (g < ref.shape[1])
        right = ref.gather(1, g.clamp(0, ref.shape[1] - 1)[:, None]).squeeze(1)
        coin = torch.rand(tokens.shape[0], generator=self.generator).to(device) < self.alpha
        hit = coin & inside
        forced = torch.where(hit, right, (right + 1) % self.vocab_size)
        tokens = torch.where(running, forced, torch.zeros_like(forced))
        s = self.stats
        s.draft_steps += 1
        s.drafts += int(running.sum())
        s.hits += int((hit & running).sum())
        return tokens, torch.ones_like(prob), state


def _recording(cls, stats):
    """Wrap ``cls.observe_round`` so every drafting round's timings land in ``stats.rounds``; returns the original."""
    original = cls.__dict__["observe_round"]

    def observe_round(self, depth, confidences, drafted, accepted, draft_s, verify_s):
        stats.rounds.append((drafted, accepted, draft_s, verify_s))
        return original(self, depth, confidences, drafted, accepted, draft_s, verify_s)

    cls.observe_round = observe_round
    return original


@contextlib.contextmanager
def forced_drafts(reference, attention_mask, alpha, vocab_size, *, seed=0, stats=None):
    """Within the block, exact mode's drafts agree with ``reference`` with probability ``alpha``.

    Patches ``earlyexit.hf.generate.draft_step`` (and, to record round timings, the draft policies'
    ``observe_round``) and restores them on exit. Arguments as :class:`ForcedDrafts`; the coins restart
    from ``seed`` on every entry, so the same call inside the block does the same work each time.
    Yields the :class:`ForcedStats`.
    """
    stats = stats if stats is not None else ForcedStats()
    real = hf_generate.draft_step
    forced = ForcedDrafts(reference, attention_mask, alpha, vocab_size, seed=seed, stats=stats, real=real)
    originals = {}
    try:
        hf_generate.draft_step = forced
        for cls in (FixedDraft, AdaptiveDraft):
            originals[cls] = _recording(cls, stats)
        yield stats
    finally:
        hf_generate.draft_step = real
        for cls, original in originals.items():
            cls.observe_round = original


def expected_acceptance(alpha, block_lengths):
    """Exact mode's acceptance_rate when each draft is right with probability alpha, independently.

    A row keeps a block's drafts up to its first wrong one, so a block of n drafts keeps
    alpha + ... + alpha^n of them on average. block_lengths: {drafts verified: rounds}.
    """
    drafted = sum(n * c for n, c in block_lengths.items())
    kept = sum(c * sum(alpha**i for i in range(1, n + 1)) for n, c in block_lengths.items())
    return kept / drafted if drafted else float("nan")


def expected_rounds(alpha, n, new_tokens, rows=1, trials=2000, seed=0):
    """Mean rounds of exact mode by drafts verified, {drafts: rounds} (0: a plain step), for i.i.d. drafts.

    Simulates exact mode's loop with ``DraftPolicy(E, 0.0, n)`` when each draft is right with
    probability alpha: a round drafts min(n, remaining - 1) tokens (remaining: the most tokens an
    unfinished row still needs; none left: a plain step), each row keeps its drafts up to its first
    wrong one plus the verifier's token, and rows stop at ``new_tokens`` (no end of sequence).
    """
    g = torch.Generator().manual_seed(seed)
    left = torch.full((trials, rows), new_tokens, dtype=torch.int64)
    counts = torch.zeros(n + 1, dtype=torch.float64)
    j = torch.arange(n)
    while True:
        most = left.max(1).values
        active = most > 0
        if not bool(active.any()):
            break
        k = (most - 1).clamp(0, n)  # [trials]
        counts += torch.bincount(k[active], minlength=n + 1).double()
        right = torch.rand(trials, rows, n, generator=g) < alpha
        right &= j < k[:, None, None]
        kept = right.long().cumprod(2).sum(2)
        left = torch.where(left > 0, left - (kept + 1), left).clamp(min=0)
    return {k: float(c) / trials for k, c in enumerate(counts.tolist()) if c}
