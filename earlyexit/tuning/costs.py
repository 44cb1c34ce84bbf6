"""A measured cost model of one early-exit decoding step: what a layer, an exit check and propagation cost.

Every time is measured by calling the pieces generation runs (:class:`~earlyexit.hf.model_adapter.ModelAdapter`
layers and k/v projections on a :class:`~earlyexit.hf.cache.RowCache`, the fused exit check through each
exit layer's head; under ``measure="state"`` the state similarity and, apart, the head on an exiting row)
on random hidden states of the model's width, on the model's own device and dtype.
Calibration (:func:`earlyexit.calibrate` with ``objective="time"``) uses it to weigh layers saved against
exit checks paid.
"""

import weakref
from dataclasses import dataclass, field

import torch

from earlyexit.hf.attention_mask import build_masks, position_ids
from earlyexit.hf.cache import RowCache
from earlyexit.ops import exit_check, state_similarity
from earlyexit.ops.measures import get_measure
from earlyexit.timing import median_seconds

#: model -> {measurement key: CostModel}; entries go with the model.
_CACHE = weakref.WeakKeyDictionary()


def _at(rows_measured, values, rows):
    """Piecewise-linear in the row count; beyond the largest count, the per-row cost stays that of the largest."""
    if rows >= rows_measured[-1]:
        return values[-1] * rows / rows_measured[-1]
    if rows <= rows_measured[0]:
        return values[0]
    for (r0, v0), (r1, v1) in zip(zip(rows_measured, values), zip(rows_measured[1:], values[1:])):
        if rows <= r1:
            return v0 + (v1 - v0) * (rows - r0) / (r1 - r0)


@dataclass
class CostModel:
    """Seconds per operation of one decoding step, per row count (rows of the batch computed together).

    Attributes:
        rows: the measured row counts, increasing.
        layer: one decoder layer on one new position per row, over a cache of ``context`` positions.
        head: the fused exit check over the shared head (final norm + lm_head), as full depth chooses tokens.
        exit_check: {exit layer: the exit check there, through that layer's head}; under the state measure
            the decision only (state similarity of the rows, read by the host), which every row reaching
            the layer pays.
        propagate: state propagation of one layer (k/v projection and cache write).
        verify_position: one more position of one layer in a verification block (marginal).
        num_layers, context, device, dtype: what was measured.
        exit_token: {exit layer: the exit token of the rows exiting there, beyond the exit check}: the
            layer's head (adapter, then the fused check over the shared head) on those rows only, which
            the state measure pays where a row exits; empty (no cost) for the head measures, whose exit
            check gives the token.
    Each timing attribute holds one value per entry of ``rows``; the ``*_s`` methods interpolate.
    """

    rows: tuple
    layer: tuple
    head: tuple
    exit_check: dict
    propagate: tuple
    verify_position: tuple
    num_layers: int
    context: int
    device: str
    dtype: str
    exit_token: dict = field(default_factory=dict)

    def layer_s(self, rows=1):
        """Seconds of one decoder layer for ``rows`` rows."""
        return _at(self.rows, self.layer, rows)

    def head_s(self, rows=1):
        """Seconds of the full-depth token choice (fused check over the shared head) for ``rows`` rows."""
        return _at(self.rows, self.head, rows)

    def exit_check_s(self, layer, rows=1):
        """Seconds of the exit check at exit layer ``layer`` (its head included) for ``rows`` rows."""
        if layer not in self.exit_check:
            raise ValueError(f"layer: {layer!r} is not a measured exit layer ({sorted(self.exit_check)})")
        return _at(self.rows, self.exit_check[layer], rows)

    def exit_token_s(self, layer, rows=1):
        """Seconds of the exit token of ``rows`` rows exiting at ``layer``, beyond its exit check (0 where
        the check gives the token: the head measures)."""
        if layer not in self.exit_token:
            return 0.0
        return _at(self.rows, self.exit_token[layer], rows)

    def propagate_s(self, rows=1):
        """Seconds of state propagation of one layer for ``rows`` rows."""
        return _at(self.rows, self.propagate, rows)

    def verify_position_s(self, rows=1):
        """Marginal seconds of one more position per row of one layer in a verification block."""
        return _at(self.rows, self.verify_position, rows)

    def __str__(self):
        names = ["layer", "head", *(f"check@{k}" for k in self.exit_check)]
        names += [*(f"token@{k}" for k in self.exit_token), "propagate", "verify+1"]
        cols = [self.layer, self.head, *self.exit_check.values(), *self.exit_token.values()]
        cols += [self.propagate, self.verify_position]
        width = max(10, *(len(n) + 1 for n in names))
        lines = [
            f"CostModel ({self.device}, {self.dtype}, {self.num_layers} layers, context {self.context}), "
            "microseconds per call",
            "rows".rjust(5) + "".join(n.rjust(width) for n in names),
        ]
        for i, r in enumerate(self.rows):
            lines.append(f"{r:5d}" + "".join(f"{c[i] * 1e6:{width}.1f}" for c in cols))
        return "\n".join(lines)

    __repr__ = __str__


class _Bench:
    """Inputs of ``rows`` rows decoding after ``context`` cached positions (zeros: values do not change the time)."""

    def __init__(self, adapter, rows, context, generator):
        self.adapter, self.rows, self.context = adapter, rows, context
        self.cache = RowCache(
            adapter.num_layers, rows, adapter.num_kv_heads, adapter.head_dim, adapter.dtype, adapter.device
        )
        self.cache.reserve(context)
        self.generator = generator

    def hidden(self, q):
        """Random hidden states [rows, q, d] of the model's width, dtype and device."""
        a = self.adapter
        d = a.model.config.hidden_size
        h = torch.randn(self.rows, q, d, generator=self.generator, dtype=torch.float32)
        return h.to(a.device, a.dtype)

    def inputs(self, q):
        """(hidden, masks by window, positions, (cos, sin)) of q new positions per row."""
        a = self.adapter
        am = torch.ones(self.rows, self.context + q, dtype=torch.int64, device=a.device)
        pos = position_ids(am, self.context, q)
        h = self.hidden(q)
        masks = build_masks(am, self.context, q, a.windows, a.attn_impl, a.dtype)
        return h, masks, pos, a.rotary(h, pos)

    def _layers(self, q):
        """A callable that runs every decoder layer on q new positions per row, into q positions it reserves
        in the cache (the caller crops them)."""
        a, cache = self.adapter, self.cache
        h, masks, pos, cos_sin = self.inputs(q)
        cache.reserve(q)
        view = cache.view(None)

        def step():
            x = h
            for idx in range(a.num_layers):
                x = a.run_layer(idx, x, masks[a.windows[idx]], pos, cos_sin, view)

        return step

    def layers_s(self, q, repeats):
        """Median seconds of all decoder layers on q new positions per row, divided by L (the mean layer)."""
        t = median_seconds(self._layers(q), repeats, self.adapter.device)
        self.cache.crop(q)
        return t / self.adapter.num_layers

    def propagate_s(self, repeats):
        """Median seconds of project_kv + cache write over all layers, divided by L."""
        a, cache = self.adapter, self.cache
        h, _, _, (cos, sin) = self.inputs(1)
        rows = torch.arange(self.rows, device=a.device)
        cache.reserve(1)

        def step():
            for idx in range(a.num_layers):
                keys, values = a.project_kv(idx, h, cos, sin)
                cache.write(idx, rows, keys, values)

        t = median_seconds(step, repeats, a.device)
        cache.crop(1)
        return t / a.num_layers

    def check_s(self, head, threshold, measure, repeats):
        """Median seconds of ``head`` (None: no adapter) then the fused exit check over the shared head."""
        a = self.adapter
        h = self.hidden(1)[:, 0]
        kw = a.exit_head

        def step():
            x = h if head is None else head(h)
            bool(exit_check(x, threshold=threshold, measure=measure, **kw).exit.any())  # the host reads it

        # Each timed check follows a pass over every decoder layer, as in decoding: back to back, a head
        # that fits a large last-level cache (or a GPU's L2) would be read from there, which the layers
        # between two exit checks of a real step evict.
        t = median_seconds(step, repeats, a.device, before=self._layers(1))
        self.cache.crop(1)
        return t

    def state_s(self, threshold, repeats):
        """Median seconds of the state measure's exit check: the similarity of two states per row and the
        decision, read by the host (no head)."""
        a = self.adapter
        h, before = self.hidden(1)[:, 0], self.hidden(1)[:, 0]

        def step():
            int((state_similarity(h, before) >= threshold).sum())  # the host reads how many rows exit

        return median_seconds(step, repeats, a.device)


def _check_batch_sizes(batch_sizes):
    ok = isinstance(batch_sizes, (tuple, list)) and len(batch_sizes) > 0
    ok = ok and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in batch_sizes)
    if not ok:
        raise ValueError(f"batch_sizes: expected a non-empty sequence of ints >= 1, got {batch_sizes!r}")
    return tuple(sorted(set(batch_sizes)))


@torch.inference_mode()
def measure_costs(eem, *, batch_sizes=(1, 4, 8), context=256, repeats=5):
    """Measure a :class:`CostModel` for ``eem`` (an :class:`earlyexit.EarlyExitLM`) on its device and dtype.

    Args:
        batch_sizes: row counts to measure (ints >= 1); the model interpolates between them.
        context: cached positions the new positions attend to.
        repeats: timed calls per figure (median, after one warm-up call).
    Returns:
        :class:`CostModel`, cached: the same object again for the same model, device, dtype, exit layers
        and heads, measure kind (head or state), and arguments.
    Raises:
        ValueError: bad batch_sizes, context or repeats.
    """
    rows_list = _check_batch_sizes(batch_sizes)
    for name, value in (("context", context), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    a = eem.adapter
    state = get_measure(eem.measure).source == "state"
    key = (
        str(a.device),
        a.dtype,
        rows_list,
        context,
        repeats,
        tuple(eem.exit_layers),
        tuple(id(h) for h in eem.heads),
        state,
    )
    per_model = _CACHE.setdefault(eem.model, {})
    if key in per_model:
        return per_model[key]
    gen = torch.Generator().manual_seed(0)
    q = eem.draft_tokens + 1  # a verification block: the pending token and the drafts
    fig = {"layer": [], "head": [], "propagate": [], "verify": []}
    checks = {k: [] for k in eem.exit_layers}
    tokens = {k: [] for k in eem.exit_layers} if state else {}
    for rows in rows_list:
        bench = _Bench(a, rows, context, gen)
        fig["layer"].append(bench.layers_s(1, repeats))
        head = bench.check_s(None, 1.0, "max_prob", repeats)
        fig["head"].append(head)
        similarity = bench.state_s(0.5, repeats) if state else None  # the same check at every exit layer
        for k, h, t in zip(eem.exit_layers, eem.heads, eem.thresholds):
            if not state:
                # Without an adapter the exit check is the head's computation: one figure for both.
                checks[k].append(head if h is None else bench.check_s(h, t, eem.measure, repeats))
                continue
            # The similarity decides at every exit layer; an exiting row then pays its head for the token
            # (without an adapter, the full-depth head's figure).
            checks[k].append(similarity)
            tokens[k].append(head if h is None else bench.check_s(h, 1.0, "max_prob", repeats))
        fig["propagate"].append(bench.propagate_s(repeats))
        # The marginal position, measured over a whole block so it stands above timer noise.
        extra = bench.layers_s(2 * q, repeats) - bench.layers_s(q, repeats)
        fig["verify"].append(max(extra / q, 0.0))
        del bench
    costs = CostModel(
        rows=rows_list,
        layer=tuple(fig["layer"]),
        head=tuple(fig["head"]),
        exit_check={k: tuple(v) for k, v in checks.items()},
        propagate=tuple(fig["propagate"]),
        verify_position=tuple(fig["verify"]),
        num_layers=a.num_layers,
        context=context,
        device=str(a.device),
        dtype=str(a.dtype).replace("torch.", ""),
        exit_token={k: tuple(v) for k, v in tokens.items()},
    )
    per_model[key] = costs
    return costs
