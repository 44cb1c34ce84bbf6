"""``EarlyExitLM``: drop-in early-exit generation for a HuggingFace decoder-only causal LM.

Exit heads
----------
By default every exit uses the model's own final RMSNorm and lm_head (shared), evaluated by the
fused :func:`earlyexit.exit_check`. ``heads`` adds a per-exit adapter in front of that shared head:

- ``heads`` is a sequence with one entry per exit layer, or a mapping ``{exit_layer: head}``
  (exit layers it does not name get none); an entry of None means no adapter.
- A head is any callable (an ``nn.Module`` works) mapping hidden states [N, d] to [N, d] in the
  model's dtype and device. Its output goes through the shared final norm + lm_head exit check and,
  when sampling, gives the exit token's distribution. State propagation always uses the raw exit
  hidden state (the adapter reads the exit head, not the deeper layers).

The state measure
-----------------
``measure="state"`` (CALM's hidden-state saturation) decides without the head: at exit layer k a row
exits when cos(h_k, h_(k-1)) >= threshold, the cosine similarity (float32,
:func:`earlyexit.state_similarity`) of its hidden states after k and after k - 1 decoder layers (after
0 layers: the embedding). Only the exiting rows, compacted, then go through the exit head (adapter, then
the fused exit check over the shared head) for their token, so the head runs once per token, at the
layer where the row exits (or at full depth), and continuing rows never touch it. The similarity always
compares the raw hidden states: a per-exit adapter only shapes the exit token (as for state
propagation), so adapters trained for the head measures plug in unchanged. Cosines lie in [-1, 1]: a
threshold above 1 never exits, one below -1 always does (a row with non-finite states has a NaN
similarity and never exits). In exact mode the drafts' stop confidence is the same similarity at the
draft depth (see :mod:`earlyexit.hf.draft_policy`).

Position schedules
------------------
``schedule=`` (a :class:`earlyexit.SkipDecodeSchedule`, a callable t -> layers or a sequence) replaces
exit mode's exit checks: generated position t runs exactly ``schedule(t)`` decoder layers in every
row, non-increasing in t, takes its token from the shared head there and gets the layers above by state
propagation. SkipDecode (Del Corro et al., 2023) skips the lower layers of a model fine-tuned for it;
on unmodified pretrained models the skipped layers are the upper ones, and non-increasing budgets mean
every layer a token runs reads computed cache entries only (see :mod:`earlyexit.schedule`). Exact mode
takes no schedule.
"""

import math
import numbers
from collections.abc import Mapping, Sequence

import torch
import transformers

from earlyexit.hf.draft_policy import AdaptiveDraft, DraftMemory, DraftPolicy, FixedDraft
from earlyexit.hf.forward import DraftVocab, ExitSpec
from earlyexit.hf.generate import generate
from earlyexit.hf.model_adapter import ModelAdapter
from earlyexit.hf.sampling import TokenChooser
from earlyexit.ops.measures import get_measure
from earlyexit.schedule import check_schedule, schedule_depths

MODES = ("exit", "exact")


def _check_exit_layers(exit_layers, num_layers):
    if isinstance(exit_layers, int) or not isinstance(exit_layers, Sequence) or len(exit_layers) == 0:
        raise ValueError(
            f"exit_layers: expected a non-empty sorted list of ints in [1, {num_layers}), got {exit_layers!r}"
        )
    for k in exit_layers:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k < num_layers:
            raise ValueError(
                f"exit_layers: each entry must be an int k with 1 <= k < {num_layers} (the model has {num_layers} "
                f"decoder layers), got {k!r}"
            )
    if any(a >= b for a, b in zip(exit_layers, exit_layers[1:])):
        raise ValueError(f"exit_layers: expected strictly increasing (sorted, no duplicates), got {list(exit_layers)}")
    return [int(k) for k in exit_layers]


def _check_thresholds(threshold, n, measure):
    """One float per exit layer. NaN is refused, and so is the infinity that would always exit; the other
    one (+inf for a ">=" measure, -inf for "entropy") is allowed: that layer never exits (calibration
    writes it for layers it does not use)."""
    if isinstance(threshold, numbers.Real) and not isinstance(threshold, bool):
        values = [float(threshold)] * n
    else:
        values = threshold.tolist() if isinstance(threshold, torch.Tensor) else threshold
        if not isinstance(values, Sequence) or isinstance(values, str) or len(values) != n:
            raise ValueError(f"threshold: expected a float or {n} floats (one per exit layer), got {threshold!r}")
        try:
            if any(isinstance(t, (bool, str)) for t in values):
                raise TypeError
            values = [float(t) for t in values]
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"threshold: expected real numbers, got {threshold!r}") from None
    never = math.inf if get_measure(measure).exit_above else -math.inf
    for t in values:
        if math.isnan(t) or (math.isinf(t) and t != never):
            raise ValueError(
                f"threshold: expected finite numbers ({never} allowed: never exits under {measure!r}), got {t!r}"
            )
    return values


def _check_heads(heads, exit_layers):
    if heads is None:
        return [None] * len(exit_layers)
    if isinstance(heads, Mapping):
        unknown = sorted(set(heads) - set(exit_layers))
        if unknown:
            raise ValueError(f"heads: keys {unknown} are not exit layers {exit_layers}")
        heads = [heads.get(k) for k in exit_layers]
    elif not isinstance(heads, Sequence) or len(heads) != len(exit_layers):
        raise ValueError(f"heads: expected None, a mapping, or {len(exit_layers)} heads (one per exit layer)")
    for k, h in zip(exit_layers, heads):
        if h is not None and not callable(h):
            raise ValueError(f"heads: the head of exit layer {k} is not callable ({type(h).__name__})")
    return list(heads)


class EarlyExitLM:
    """Wrap a transformers causal LM (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3, Granite, OLMo 2) for early exits.

    The model's weights are used in place, never copied or changed.

    Args:
        model: a ``*ForCausalLM`` of a family in :data:`earlyexit.hf.families.FAMILIES` (sdpa or eager
            attention; Gemma 2: eager, as transformers runs it).
        exit_layers: sorted layer counts; k means "exit check after the first k decoder layers",
            1 <= k < L (for a 30-layer model, e.g. [7, 14, 21]).
        threshold: one float, or one per exit layer; finite, or the infinity that never exits (+inf for
            "max_prob"/"margin"/"state", -inf for "entropy"); NaN raises.
        measure: "max_prob" (exit when >= threshold), "margin" (>=), "entropy" (<=): statistics of the
            exit head; or "state" (>=): cos(h_k, h_(k-1)) of the hidden states, no head for the
            decision (see the module docstring). :data:`earlyexit.ops.measures.MEASURES` describes them.
        heads: per-exit adapters before the shared exit head (see the module docstring).
        schedule: None, or a position schedule for exit mode (SkipDecode-style, see the module docstring
            and :mod:`earlyexit.schedule`): a :class:`earlyexit.SkipDecodeSchedule` (max_layers <= L),
            any callable t -> decoder layers, or a sequence of layer counts. Exit mode then runs exactly
            ``schedule(t)`` layers at generated position t, for every row, without exit checks.
            ``exit_layers`` may be None when a schedule is given (no exit layers).

    Attributes:
        draft: exact mode's draft policy: "auto" (default; depth among the exit layers, draft
            threshold and block length chosen per round from the call's measured costs and
            acceptance, down to plain decoding) or a fixed :class:`~earlyexit.hf.DraftPolicy`
            (``DraftPolicy(None)``: no drafts). See :mod:`earlyexit.hf.draft_policy`.
        draft_tokens: an int >= 0, the most drafts per round under "auto" (default 4; 0 = never draft).
        draft_memory: False (default): "auto" learns within each generate call, from a pessimistic
            prior. True: it keeps what it measured across calls, one policy per batch size (and
            sampling setting: greedy, or each temperature/top-p/top-k/min-p), so a call starts where
            the earlier ones of that size left off (``stats["draft_rounds_remembered"]``
            says how many rounds it had seen). The memory is forgotten when the exit layers, heads,
            measure, ``draft_tokens``, ``draft_vocab``, device or dtype change, and by
            :meth:`reset_draft_memory` (call it after changing weights in place). The output is the
            same either way: only the speed depends on it.
        draft_vocab: None (default: drafts over the whole vocabulary) or int64 token ids [V'] (e.g.
            :func:`earlyexit.tuning.draft_vocab.draft_vocabulary`, FR-Spec): exact mode's draft
            checks read only those rows of the shared head (copied once per head weight); the
            verification keeps the whole vocabulary, so the output does not change.
        compaction: True (default) runs the layers after an exit only on the continuing rows; False
            keeps every row and masks the exited ones (a reference path: same tokens, no savings).
        progress: None (default) or a callable called with the number of positions generated so far
            after each one (for progress bars).
        schedule: exit mode's position schedule (None: exit checks), settable.

        Each generate call checks these attributes first (an int for ``draft_tokens``, bools for
        ``draft_memory`` and ``compaction``, ...) and raises ValueError naming a bad one.

    Raises:
        ValueError: unsupported architecture (the message lists the supported ones), exit layers out
            of range, unsorted or duplicated, wrong threshold/heads counts, a NaN (or always-exiting
            infinite) threshold, unknown measure, no exit layers and no schedule, a schedule that is
            none (or a SkipDecodeSchedule whose max_layers exceeds L, or a sequence outside [1, L] or
            increasing).
    """

    def __init__(self, model, exit_layers=None, *, threshold=0.9, measure="max_prob", heads=None, schedule=None):
        self.adapter = ModelAdapter(model)
        self.model = model
        if exit_layers is None and schedule is None:
            raise ValueError("exit_layers: expected sorted layer counts (None only with a schedule=)")
        self.schedule = None if schedule is None else check_schedule(schedule, self.adapter.num_layers)
        self.exit_layers = [] if exit_layers is None else _check_exit_layers(exit_layers, self.adapter.num_layers)
        get_measure(measure)  # ValueError naming the argument
        self.measure = measure
        self.thresholds = _check_thresholds(threshold, len(self.exit_layers), measure)
        self.heads = _check_heads(heads, self.exit_layers)
        self.draft = "auto"
        self.draft_tokens = 4
        self.draft_memory = False
        self._draft_memory = DraftMemory()
        self.draft_vocab = None
        self._sub_head = None  # (draft_vocab, its stamp, DraftVocab), see _draft_vocab
        self.compaction = True
        self.progress = None

    @property
    def num_layers(self):
        """L, the decoder layers of the wrapped model."""
        return self.adapter.num_layers

    def set_exit_layers(self, exit_layers, thresholds):
        """Replace the exit layers and their thresholds (one float or one per layer) together.

        A layer that was an exit layer keeps its head; a new one gets none. An empty list turns early
        exit off: exit mode then runs every token at full depth, with no exit checks.
        Raises ValueError like the constructor.
        """
        off = isinstance(exit_layers, Sequence) and len(exit_layers) == 0
        layers = [] if off else _check_exit_layers(exit_layers, self.num_layers)
        thresholds = _check_thresholds(thresholds, len(layers), self.measure)
        heads = dict(zip(self.exit_layers, self.heads))
        self.exit_layers, self.thresholds, self.heads = layers, thresholds, [heads.get(k) for k in layers]

    def _spec(self):
        return ExitSpec(
            self.exit_layers, self.thresholds, self.heads, self.measure, self.compaction, self._draft_vocab()
        )

    def _draft_vocab(self):
        """``draft_vocab`` checked, with its sub-head; rebuilt only when the ids or the head weight change."""
        ids = self.draft_vocab
        if ids is None:
            return None
        V = self.model.lm_head.out_features
        if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.numel() == 0 or ids.dtype != torch.int64:
            raise ValueError(f"draft_vocab: expected None or a non-empty int64 tensor [V'], got {_describe(ids)}")
        weight = self.model.lm_head.weight
        stamp = (ids._version, weight.data_ptr(), weight._version)
        cached = self._sub_head
        if cached is None or cached[0] is not ids or cached[1] != stamp:
            if int(ids.min()) < 0 or int(ids.max()) >= V or ids.unique().numel() != ids.numel():
                raise ValueError(f"draft_vocab: expected distinct token ids in [0, {V})")
            ids_here = ids.to(self.adapter.device)
            self._sub_head = ids, stamp, DraftVocab(ids_here, self.adapter.sub_head(ids_here))
        return self._sub_head[2]

    def reset_draft_memory(self):
        """Forget what the adaptive draft policy learned in earlier calls (see ``draft_memory``)."""
        self._draft_memory.clear()

    def _check_settings(self):
        """ValueError naming the attribute for a bad value of a settable attribute read by generate:
        ``draft`` ("auto" or a :class:`DraftPolicy` whose depth is below L), ``draft_tokens`` (an int >= 0),
        ``draft_memory`` and ``compaction`` (bools: a string such as "no" would read as true), ``progress``
        (None or a callable). Checked at the start of every call, whatever the mode."""
        d, L = self.draft, self.num_layers
        if not (isinstance(d, str) and d == "auto"):
            if not isinstance(d, DraftPolicy):
                raise ValueError(f'draft: expected "auto" or a DraftPolicy, got {d!r}')
            if d.depth is not None and d.depth >= L:  # DraftPolicy checked the rest when it was made
                raise ValueError(f"draft: depth must be None or an int in [1, {L}), got {d.depth!r}")
        tokens = self.draft_tokens
        if isinstance(tokens, bool) or not isinstance(tokens, numbers.Integral) or tokens < 0:
            raise ValueError(f"draft_tokens: expected an int >= 0 (0: never draft), got {tokens!r}")
        for name in ("draft_memory", "compaction"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected True or False, got {getattr(self, name)!r}")
        if self.progress is not None and not callable(self.progress):
            raise ValueError(f"progress: expected None or a callable, got {self.progress!r}")

    def _draft_policy(self, batch, chooser):
        """The driver of ``self.draft`` (checked by :meth:`_check_settings`) for a call of ``batch`` rows
        choosing tokens by ``chooser``: fresh, or under "auto" with ``draft_memory`` the one remembered for
        that batch size and sampling setting."""
        d, L = self.draft, self.num_layers
        if isinstance(d, str) and d == "auto":
            tokens = int(self.draft_tokens)

            def make():
                return AdaptiveDraft(L, self.exit_layers, tokens, measure=self.measure)

            if not self.draft_memory:
                return make()
            vocab = self.draft_vocab
            objects = (*self.heads, vocab)
            config = (
                tuple(self.exit_layers),
                self.measure,
                tokens,
                None if vocab is None else vocab._version,
                str(self.adapter.device),
                self.adapter.dtype,
                *map(id, objects),
            )
            c = chooser
            sampling = (c.temperature, c.top_p, c.top_k, c.min_p) if c.do_sample else None
            return self._draft_memory.policy(config, (batch, sampling), make, keep=objects)
        return FixedDraft(d)

    def _vocab_size(self):
        """V, the rows of the input embedding: token ids are in [0, V)."""
        return int(self.model.get_input_embeddings().num_embeddings)

    def _special_tokens(self, eos_token_id):
        """(eos tensor or None, pad id): like model.generate, defaults from the model's generation config.

        An explicit empty list means no end of sequence (not the generation config's): rows run for
        max_new_tokens. Each id must be an int in [0, V).
        """
        gen = getattr(self.model, "generation_config", None)
        explicit = eos_token_id is not None
        if not explicit:
            eos_token_id = getattr(gen, "eos_token_id", None)
        ids = _eos_ids(
            eos_token_id, self._vocab_size(), "eos_token_id" if explicit else "generation_config.eos_token_id"
        )
        eos = torch.tensor(ids, dtype=torch.int64, device=self.adapter.device) if ids else None
        pad = getattr(gen, "pad_token_id", None)
        if pad is None:
            pad = ids[0] if ids else 0
        return eos, pad

    def _chooser(self, do_sample, **filters):
        """The :class:`TokenChooser` of a call. When sampling, each filter is the call's, else the generation
        config's, else (unset there) the value model.generate fills in (:func:`_generation_defaults`:
        top_k 50 in transformers 5.x), else off; greedy decoding reads the call's only. ValueError naming
        the argument (or generation_config.<name>) for a bad value."""
        gen = getattr(self.model, "generation_config", None)
        defaults = _generation_defaults(gen) if do_sample else {}
        values = {}
        for name, value in filters.items():
            source = name
            if value is None and do_sample:  # greedy decoding reads no filter: a config's odd value is harmless
                value, source = getattr(gen, name, None), f"generation_config.{name}"
                if value is None:
                    value = defaults.get(name)
            if value is None:
                value = _SAMPLING_OFF[name]
            check, expected = _SAMPLING_CHECKS[name]
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not check(value):
                raise ValueError(f"{source}: expected {expected}, got {value!r}")
            values[name] = int(value) if name == "top_k" else float(value)
        return TokenChooser(do_sample, **values)

    def _check_generation_config(self, do_sample, width, has_eos):
        """ValueError naming ``generation_config.<field>`` for a setting of the model's generation config
        that model.generate would apply and EarlyExitLM does not (:data:`_NOT_APPLIED`; when sampling,
        :data:`_NOT_APPLIED_SAMPLING` too): exact mode would silently differ from model.generate.

        An unset field (None) is inactive: model.generate fills it with transformers' default, the inactive
        value. ``width`` (T of input_ids) and ``has_eos`` (the call has an end-of-sequence id) decide the
        fields whose effect depends on the call, as in model.generate: ``min_length`` counts the prompt's
        T (padding included) and, like ``min_new_tokens``, only holds back the end of sequence;
        ``forced_bos_token_id`` forces the first token of a one-token input only. ``max_length`` is not
        read: ``max_new_tokens``, which every call gives, takes precedence in model.generate too.
        """
        gen = getattr(self.model, "generation_config", None)
        if gen is None:
            return
        fields = {**_NOT_APPLIED, **(_NOT_APPLIED_SAMPLING if do_sample else {})}
        min_new_tokens = getattr(gen, "min_new_tokens", None)
        call = {
            # model.generate replaces min_length by T + min_new_tokens when min_new_tokens is set.
            "min_length": lambda v: has_eos and min_new_tokens is None and v > width,
            "min_new_tokens": lambda v: has_eos and v > 0,
            "forced_bos_token_id": lambda v: width == 1,
        }
        for name, (off, active) in fields.items():
            value = getattr(gen, name, None)
            if value is None:
                continue
            try:
                applied = call[name](value) if name in call else active(value)
            except TypeError:  # a value of another type than transformers takes: not inactive either
                applied = True
            if applied:
                raise ValueError(
                    f"generation_config.{name}: model.generate applies {value!r}, EarlyExitLM does not; set "
                    f"model.generation_config.{name} = {off!r} (its default) to turn it off"
                )

    def _schedule_depths(self, schedule, mode, max_new_tokens):
        """Exit mode's layers per position for this call (a list of ints), or None for exit checks.

        ``schedule`` (the call's) overrides ``self.schedule``; exact mode takes none (ValueError for an
        explicit one) and ignores ``self.schedule``: its output is the full model's, its drafts come
        from the draft policy.
        """
        if mode == "exact":
            if schedule is not None:
                raise ValueError(
                    "schedule: exact mode verifies every token at full depth and takes no position schedule; "
                    'use mode="exit"'
                )
            return None
        schedule = self.schedule if schedule is None else schedule
        return None if schedule is None else schedule_depths(schedule, max_new_tokens, self.num_layers)

    def generate(
        self,
        input_ids,
        attention_mask=None,
        *,
        max_new_tokens=32,
        mode="exit",
        eos_token_id=None,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        min_p=None,
        schedule=None,
    ):
        """Generate with early exits.

        Args:
            input_ids: int64 [B, T], left-padded when rows differ in length.
            attention_mask: [B, T] (1 = token, 0 = padding) or None (no padding).
            max_new_tokens: >= 1.
            mode: "exit" (each row exits on its own; compute is saved, output may differ from full
                depth) or "exact" (self-speculative: drafts with exits, verified at full depth; equals
                ``model.generate`` greedy token for token, or follows its distribution when sampling).
            eos_token_id: int or list of ints in [0, V); None uses the model's generation config; ``[]``
                means no end of sequence (even when the generation config has one). Rows stop there.
            do_sample: True or False (a bool): sample instead of greedy decoding (greedy by default;
                unlike ``model.generate``, the generation config's ``do_sample`` is not read).
            temperature, top_p, top_k, min_p: the sampling filters of ``model.generate(do_sample=True)``,
                in its order (:class:`~earlyexit.hf.sampling.TokenChooser`); None takes the model's
                generation config's value, and where the config leaves it unset the value
                ``model.generate`` fills in (transformers 5.x: top_k 50, temperature 1.0, top_p 1.0; min_p
                off). temperature > 0, top_p in (0, 1], top_k an int >= 0 (0: off), min_p in [0, 1]: a
                value given is checked whether sampling or not, the config's when sampling.
            schedule: a position schedule for this call (as the constructor's ``schedule``; None:
                ``self.schedule``), exit mode only. Position t of the call runs ``schedule(t)`` decoder
                layers in every row (checked over the call's positions: ints in [1, L], non-increasing),
                the token comes from the shared head there and state propagation fills the layers above;
                ``exit_layer[:, t] == schedule(t)``, ``stats["exit_check_time_share"] == 0``.

        Returns:
            :class:`~earlyexit.hf.generate.GenerateOutput` with ``sequences`` [B, T + n],
            ``exit_layer`` int64 [B, n], ``stats`` dict and ``cache``.

        Raises:
            ValueError: bad shapes or arguments (input_ids/attention_mask mismatch, token ids of
                input_ids or eos_token_id outside the vocabulary [0, V), unknown mode, a do_sample that
                is not a bool, a schedule with a value outside [1, L] or not an int, an increasing one,
                one given to exact mode, ...); a bad attribute (``draft``, ``draft_tokens``,
                ``draft_memory``, ``compaction``, ``progress``: :meth:`_check_settings`); an attention
                implementation the model was switched to that is not supported; a setting of the model's
                generation config that ``model.generate`` would apply and EarlyExitLM does not
                (repetition_penalty, suppress_tokens, bad_words_ids, min_new_tokens, forced_eos_token_id,
                no_repeat_ngram_size, ..., and when sampling typical_p, epsilon_cutoff, eta_cutoff:
                :meth:`_check_generation_config`), naming ``generation_config.<field>`` and its default.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids: expected an int64 tensor [B, T] with T >= 1, got {_describe(input_ids)}")
        if input_ids.dtype != torch.int64:
            raise ValueError(f"input_ids: expected dtype torch.int64, got {input_ids.dtype}")
        V = self._vocab_size()
        lo, hi = torch.stack(torch.aminmax(input_ids)).tolist() if input_ids.numel() else (0, 0)  # one host sync
        if lo < 0 or hi >= V:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"input_ids: token ids must be in [0, {V}) (the model's vocabulary size is {V}), got {bad}"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask: expected shape {tuple(input_ids.shape)} (that of input_ids), "
                f"got {_describe(attention_mask)}"
            )
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        if not isinstance(do_sample, bool):  # a string such as "False" would read as true
            raise ValueError(f"do_sample: expected True or False, got {do_sample!r}")
        self._check_settings()
        # The model's attention implementation may have changed since it was wrapped: checked before any
        # work, ValueError for one the masks do not serve (the masks follow it: ModelAdapter.attn_impl).
        self.adapter.attn_impl  # noqa: B018
        chooser = self._chooser(do_sample, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p)
        depths = self._schedule_depths(schedule, mode, max_new_tokens)
        device = self.adapter.device
        eos, pad = self._special_tokens(eos_token_id)
        self._check_generation_config(do_sample, input_ids.shape[1], eos is not None)
        return generate(
            self.adapter,
            self._spec(),
            input_ids.to(device),
            attention_mask.to(device).long(),
            max_new_tokens=max_new_tokens,
            mode=mode,
            eos=eos,
            pad=pad,
            chooser=chooser,
            policy=self._draft_policy(input_ids.shape[0], chooser) if mode == "exact" else None,
            progress=self.progress,
            schedule=depths,
        )


#: Each sampling filter's off value: greedy decoding's, and sampling's where neither the call, the
#: generation config nor transformers' defaults (:func:`_generation_defaults`) set it (min_p).
_SAMPLING_OFF = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}


def _generation_defaults(gen):
    """The values model.generate gives the generation-config fields that ``gen`` leaves unset (None): a dict.

    transformers 5.x fills them from ``GenerationConfig._get_default_generation_params()`` (top_k 50,
    temperature 1.0, typical_p 1.0, ...; the same table in 5.17 and 5.25); earlier versions set those
    defaults in the config itself, so no field is unset there ({}).
    """
    source = transformers.GenerationConfig if gen is None else gen
    get = getattr(source, "_get_default_generation_params", None)
    return dict(get()) if callable(get) else {}


def _given(value):
    """A field holding a value: anything but an empty container (an empty token list changes nothing)."""
    return not (isinstance(value, (Sequence, Mapping, set, frozenset)) and len(value) == 0)


def _always(value):
    """A field that model.generate applies whenever it is set (not None)."""
    return True


#: Fields of model.generation_config that model.generate turns into logits processors or stopping
#: criteria (transformers 5.17-5.25, generation/utils.py: ``_get_logits_processor``,
#: ``_get_stopping_criteria``) or into a search other than one greedy or sampled sequence per row, and that
#: EarlyExitLM does not apply: name -> (the inactive default, whether a set value (not None) is applied).
#: The encoder_* ones apply to a decoder-only model too (to the prompt's tokens). renormalize_logits is
#: not here: a log-softmax after the processors changes neither the argmax nor the sampled distribution.
#: min_length, min_new_tokens and forced_bos_token_id depend on the call
#: (:meth:`EarlyExitLM._check_generation_config`); None is inactive for all of them.
_NOT_APPLIED = {
    "repetition_penalty": (1.0, lambda v: v != 1.0),
    "encoder_repetition_penalty": (1.0, lambda v: v != 1.0),
    "no_repeat_ngram_size": (0, lambda v: v > 0),
    "encoder_no_repeat_ngram_size": (0, lambda v: v > 0),
    "bad_words_ids": (None, _given),
    "sequence_bias": (None, _given),
    "suppress_tokens": (None, _given),
    "begin_suppress_tokens": (None, _given),
    "min_length": (0, None),
    "min_new_tokens": (None, None),
    "forced_bos_token_id": (None, None),
    "forced_eos_token_id": (None, _always),
    "exponential_decay_length_penalty": (None, _always),
    "remove_invalid_values": (False, lambda v: v is True),
    "guidance_scale": (None, lambda v: v != 1),
    "watermarking_config": (None, _always),
    "max_time": (None, _always),
    "stop_strings": (None, _given),
    "num_beams": (1, lambda v: v > 1),
    "num_return_sequences": (1, lambda v: v > 1),
}
#: The same for the warpers model.generate adds only when sampling (beside temperature, top_k, top_p and
#: min_p, which EarlyExitLM applies).
_NOT_APPLIED_SAMPLING = {
    "typical_p": (1.0, lambda v: v < 1.0),
    "epsilon_cutoff": (0.0, lambda v: 0.0 < v < 1.0),
    "eta_cutoff": (0.0, lambda v: 0.0 < v < 1.0),
    "top_h": (None, _always),
}
#: (check, what it expects) per sampling filter.
_SAMPLING_CHECKS = {
    "temperature": (lambda v: v > 0 and math.isfinite(v), "a finite value > 0"),
    "top_p": (lambda v: 0 < v <= 1, "a value in (0, 1]"),
    "top_k": (lambda v: isinstance(v, numbers.Integral) and v >= 0, "an int >= 0 (0: off)"),
    "min_p": (lambda v: 0 <= v <= 1, "a value in [0, 1]"),
}


def _eos_ids(eos_token_id, V, name):
    """``eos_token_id`` (None, an int or a sequence of ints) as a list of ids in [0, V); ValueError naming it."""
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, torch.Tensor):
        eos_token_id = eos_token_id.tolist()
    single = isinstance(eos_token_id, numbers.Integral) and not isinstance(eos_token_id, bool)
    ids = [eos_token_id] if single else eos_token_id
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (Sequence, set, frozenset)):
        raise ValueError(f"{name}: expected an int or a list of ints in [0, {V}), got {eos_token_id!r}")
    ids = list(ids)
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < V:
            raise ValueError(f"{name}: expected token ids in [0, {V}) (the model's vocabulary size is {V}), got {t!r}")
    return [int(t) for t in ids]


def _describe(x):
    if isinstance(x, torch.Tensor):
        return f"shape {tuple(x.shape)} dtype {x.dtype}"
    return type(x).__name__
