"""Vocabulary-sharded exit-check cases, built the same way by tests/test_distributed.py and its worker processes.

A case is an unsharded head (hidden [..., d], weight [vocab_size, d], bias, RMSNorm weight, temperature) plus a
layout: per rank, (vocab_start, rows) of the head padded with zero rows, as vLLM pads its head. Every builder
is deterministic (seeded generators), so the parent and the spawned ranks hold bitwise equal tensors.
"""

import math
from dataclasses import dataclass

import torch

MEASURES = ("max_prob", "margin", "entropy")
# Per measure: a scalar threshold and the range of per-row thresholds.
_THRESHOLDS = {"max_prob": (0.3, (0.05, 0.95)), "margin": (0.1, (0.0, 0.9)), "entropy": (1.5, (0.1, 4.0))}


@dataclass(frozen=True)
class Case:
    name: str
    hidden: torch.Tensor  # [..., d]
    weight: torch.Tensor  # [vocab_size, d], the real (unpadded) head
    layout: tuple  # per rank (vocab_start, rows); rows past vocab_size are zero padding
    norm_weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    temperature: float = 1.0
    pass_vocab_size: bool = True  # False: vocab_size=None (no padding in the layout)
    default_start: bool = False  # True: vocab_start=None, the equal-shard default

    @property
    def vocab_size(self):
        return self.weight.shape[0]

    def shard(self, rank):
        """This rank's (weight [rows, d], bias [rows] or None): the padded head's rows [start, start + rows)."""
        start, rows = self.layout[rank]
        pad = max(0, start + rows - self.vocab_size)
        weight = torch.cat([self.weight, self.weight.new_zeros(pad, self.weight.shape[1])])[start : start + rows]
        bias = None if self.bias is None else torch.cat([self.bias, self.bias.new_zeros(pad)])[start : start + rows]
        return weight, bias

    def sharded_kwargs(self, rank):
        """Keyword arguments of exit_check / exit_stats for this rank, besides hidden, weight and threshold."""
        _, bias = self.shard(rank)
        return dict(
            norm_weight=self.norm_weight,
            bias=bias,
            temperature=self.temperature,
            vocab_start=None if self.default_start else self.layout[rank][0],
            vocab_size=self.vocab_size if self.pass_vocab_size else None,
        )

    def thresholds(self, measure):
        """{"scalar": float, "rows": float32 tensor shaped hidden.shape[:-1]} for ``measure``."""
        scalar, (lo, hi) = _THRESHOLDS[measure]
        lead = tuple(self.hidden.shape[:-1])
        rows = torch.linspace(lo, hi, math.prod(lead)).reshape(lead)
        return {"scalar": scalar, "rows": rows}


def equal_layout(vocab, world):
    assert vocab % world == 0
    return tuple((r * (vocab // world), vocab // world) for r in range(world))


def balanced_layout(vocab, world):
    """Uneven but balanced shards (Apple CCE): the first vocab % world ranks hold one row more."""
    sizes = [vocab // world + (r < vocab % world) for r in range(world)]
    return tuple((sum(sizes[:r]), sizes[r]) for r in range(world))


def padded_layout(vocab, world, multiple):
    """Equal shards of ceil(vocab / world) rounded up to ``multiple`` rows; the tail is padding (vLLM)."""
    rows = -(-vocab // world)
    rows = -(-rows // multiple) * multiple
    return tuple((r * rows, rows) for r in range(world))


def ceil_layout(vocab, world):
    """transformers' split: chunks of ceil(vocab / world), so the last ranks can be short or empty."""
    c = -(-vocab // world)
    return tuple((min(r * c, vocab), max(0, min(c, vocab - r * c))) for r in range(world))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _random_head(n, d, vocab, seed, dtype=torch.float32):
    g = _gen(seed)
    hidden = torch.randn(n, d, generator=g).to(dtype)
    weight = (torch.randn(vocab, d, generator=g) * 1.5).to(dtype)
    norm = (1 + 0.1 * torch.randn(d, generator=g)).to(dtype)
    bias = torch.randn(vocab, generator=g).to(dtype)
    return hidden, weight, norm, bias


def _integer_ties(layout, vocab, seed):
    """Integer hidden and weights (exact logits in any summation order) with the maximum of every row reached
    by exactly two columns, one on each side of a shard boundary, so the merge must pick the lower global id."""
    g = _gen(seed)
    d = 8
    ends = sorted(start + rows for start, rows in layout if rows)
    bounds = [b for b in ends if 0 < b < vocab]
    n = 2 * len(bounds) + 1
    hidden = torch.randint(-2, 3, (n, d), generator=g).float()
    hidden[:, 0] = 1  # no zero row: its logits would all tie at 0
    weight = torch.randint(-1, 2, (vocab, d), generator=g).float()
    for i in range(n):
        b, j = bounds[i % len(bounds)], i // len(bounds)
        # 2 * sign(h) reaches 2 * sum|h|; every other column (entries in [-1, 1]) reaches at most sum|h|.
        weight[b - 1 - j] = weight[b + j] = 2 * torch.sign(hidden[i])
    return hidden, weight


def _huge_ties(layout, vocab):
    """Logits about +-2e4, exact in float32: row i = 100 * e_i, its maximum reached by a set of columns on
    different ranks (max_prob exactly 1 / the set's size), every other logit at least 1000 lower."""
    starts = [start for start, rows in layout if rows and start < vocab]
    lasts = [min(start + rows, vocab) - 1 for start, rows in layout if rows and start < vocab]
    tie_sets = [(lasts[0], starts[-1]), (starts[0], lasts[-1]), tuple(sorted(set(starts)))]
    n = len(tie_sets) + 1
    hidden = 100 * torch.eye(n)
    hidden[-1] *= -1  # every logit of the last row near -2e4
    weight = 190 - (torch.arange(vocab, dtype=torch.float32)[:, None] % 7).expand(vocab, n).clone()
    for i, cols in enumerate(tie_sets):
        weight[list(cols), i] = 200
    weight[:, -1] = 200 + (torch.arange(vocab) % 5 != 2).float() * 10
    return hidden, weight, tie_sets


def cases(world):
    """The cases every world runs (keyed by name); the layouts depend on the world size."""
    h, w, nw, b = _random_head(5, 16, 48, seed=1)
    out = [Case("equal", h, w, equal_layout(48, world), nw, b, 0.7, pass_vocab_size=False, default_start=True)]
    h, w, nw, b = _random_head(7, 16, 50, seed=2)
    out.append(Case("uneven", h, w, balanced_layout(50, world), nw, b, 1.3))
    # Every real logit < 0 = a zero padding row's logit: padding must be ignored, or it would win.
    g = _gen(3)
    hidden = torch.rand(6, 12, generator=g) + 0.1
    weight = -torch.rand(45, 12, generator=g) - 0.1
    out.append(Case("padded", hidden, weight, padded_layout(45, world, 4)))
    # The last rank holds padding only (vocab_start == vocab_size).
    rows = -(-36 // (world - 1))
    h, w, nw, b = _random_head(4, 16, rows * (world - 1), seed=4)
    out.append(Case("all_padding_rank", h, w, tuple((r * rows, rows) for r in range(world)), nw, b))
    empty = {2: ((0, 0), (0, 40)), 3: ((0, 20), (20, 0), (20, 30)), 4: ceil_layout(9, 4)}[world]
    vocab = sum(rows for _, rows in empty)
    h, w, nw, b = _random_head(5, 16, vocab, seed=5)
    out.append(Case("empty_shard", h, w, empty, nw, b, 0.9))
    layout = balanced_layout(40, world)
    h, w = _integer_ties(layout, 40, seed=6)
    out.append(Case("ties", h, w, layout))
    # The same ties with the blocks in reverse rank order: the lower id sits on the higher rank.
    blocks = balanced_layout(40, world)
    layout = tuple(blocks[world - 1 - r] for r in range(world))
    h, w = _integer_ties(layout, 40, seed=7)
    out.append(Case("ties_reversed_ranks", h, w, layout))
    layout = balanced_layout(30, world)
    h, w, _ = _huge_ties(layout, 30)
    out.append(Case("huge_logits", h, w, layout))
    out.append(_nonfinite(world))
    h, w, nw, b = _random_head(6, 16, 33, seed=9)
    out.append(Case("leading_dims", h.reshape(2, 3, 16), w, balanced_layout(33, world), nw, b))
    h, w, nw, b = _random_head(1, 16, 37, seed=12)
    out.append(Case("one_row", h, w, balanced_layout(37, world), nw, b))
    h, w, nw, b = _random_head(0, 16, 20, seed=10)
    out.append(Case("n0", h, w, balanced_layout(20, world), nw, b))
    if world == 2:
        h, w, nw, b = _random_head(5, 32, 64, seed=11, dtype=torch.bfloat16)
        out.append(Case("bf16", h, w, balanced_layout(64, world), nw, b))
    return {c.name: c for c in out}


def _nonfinite(world):
    """NaN/inf hidden rows, a finite row whose logits overflow, and -inf bias over all of rank 0's columns."""
    g = _gen(8)
    layout = balanced_layout(40, world)
    hidden = torch.randn(7, 16, generator=g)
    weight = torch.randn(40, 16, generator=g)
    bias = torch.randn(40, generator=g)
    bias[: layout[0][1]] = -math.inf  # rank 0's shard has no finite logit at all
    bias[-3] = -math.inf
    hidden[1, 3] = math.nan
    hidden[3, 0] = math.inf
    hidden[4, 5] = -math.inf
    hidden[2] = 1e38  # finite, but its logits overflow to +-inf
    return Case("nonfinite", hidden, weight, layout, None, bias)


#: Rows of the "nonfinite" case that are invalid (token -1, never exit).
NONFINITE_ROWS = (1, 2, 3, 4)


def huge_tie_sets(world):
    """The tie sets of the "huge_logits" case: row i's maximum is reached by exactly these global ids."""
    return _huge_ties(balanced_layout(30, world), 30)[2]
