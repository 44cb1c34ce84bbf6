"""``ExitHead``: the fused exit check as an ``nn.Module``, for any PyTorch decoder.

An :class:`ExitHead` is a view of a model's output head (final RMSNorm + lm_head): it holds references to
the head's tensors and calls :func:`earlyexit.exit_check` on them, so one kernel per exit point decides
each row's token and whether it exits, without [N, V] logits. With :func:`earlyexit.partition_rows` and
:func:`earlyexit.scatter_rows` it gives a hand-written decoder per-row early exits in its own forward loop
(``examples/custom_decoder.py``).

Weights are references, never copies. The head owns no parameters and no buffers: the tensors it was given
are read-only properties (``head.weight is weight``), kept outside the ``nn.Module`` registries, because

* ``head.parameters()`` and ``head.state_dict()`` stay empty: the weights belong to the model, so an
  ``ExitHead`` attached to a model as a submodule adds no duplicate state-dict keys and no parameters to an
  optimizer;
* registering them as buffers instead (even non-persistent) would make ``head.to(...)`` replace them by
  moved copies, silently doubling the head's memory and detaching it from the model.

Devices and dtypes: ``head.to()``, ``.cuda()``, ``.half()`` change nothing (there is nothing of its own to
move). Move the model instead: ``nn.Module.to`` updates a parameter in place (same ``nn.Parameter``
object), so a head built from the model's parameters (:meth:`ExitHead.from_model`, or
``ExitHead(model.lm_head.weight, ...)``) follows the model to its new device or dtype. A head built from
plain tensors keeps the tensors it was given (``tensor.to()`` returns a new tensor): build a new head
after moving them, which costs nothing. A ``hidden`` on another device or in another dtype than the
weight raises ValueError naming the argument.
"""

import torch
from torch import nn

from earlyexit.ops.exit_check import exit_check
from earlyexit.ops.exit_stats import threshold_rows, validate_head
from earlyexit.ops.measures import get_head_measure

#: The keys of a vocabulary-sharded head's extra :func:`earlyexit.exit_check` arguments.
_SHARD_KEYS = ("group", "vocab_start", "vocab_size")


def _reject_nan_entries(threshold):
    """ValueError if the tensor ``threshold`` holds a NaN (reads it on the host)."""
    if bool(torch.isnan(threshold).any()):
        raise ValueError("threshold: expected numbers, got NaN entries (no row could ever be compared with them)")


def _check_stored_threshold(threshold, device):
    """A validated threshold to keep: a float, or a real tensor without NaN (checked once, here)."""
    # threshold_rows' own checks (type, dtype, device; a NaN float), on the tensor's own shape: the batch
    # it must broadcast to is known only per call, where exit_check checks it.
    lead = tuple(threshold.shape) if isinstance(threshold, torch.Tensor) else ()
    rows = threshold_rows(threshold, lead, device)
    if isinstance(threshold, torch.Tensor):
        _reject_nan_entries(rows)
        return threshold
    return float(threshold)


class ExitHead(nn.Module):
    """The exit check of one output head: ``forward(hidden)`` returns :class:`earlyexit.ExitResult`.

    Logits are z = cap(rmsnorm(hidden) @ weight.T + bias) / temperature, exactly as
    :func:`earlyexit.exit_check` defines them, which this module calls with the arguments below.

    Args:
        weight: [V, d] head weight (nn.Linear layout, e.g. ``lm_head.weight``), float32/float16/bfloat16.
        norm_weight: [d] weight of the final RMSNorm applied inside the kernel, or None (no norm).
        norm_eps: RMSNorm epsilon.
        norm_offset: the RMSNorm scale is norm_offset + norm_weight (Gemma: 1.0).
        bias: [V] or None; -inf entries mask vocabulary columns.
        softcap: None, or final-logit softcapping z <- softcap * tanh(z / softcap) (Gemma 2).
        temperature: > 0, divides the logits (Granite's logits_scaling).
        threshold: float, or a tensor broadcastable to ``hidden.shape[:-1]`` (per-row thresholds). A NaN
            (entry) raises ValueError. Settable later: ``head.threshold = 0.8`` (validated the same way).
        measure: "max_prob", "margin" or "entropy" (the head measures of :mod:`earlyexit.ops.measures`).

    The tensors are referenced, not copied, and are not registered as parameters or buffers (see the
    module docstring: ``head.to()`` moves nothing; move the model and a head over its parameters follows).

    Raises:
        ValueError: a bad argument, eagerly, naming it (the op layer's own checks).
    """

    def __init__(
        self,
        weight,
        *,
        norm_weight=None,
        norm_eps=1e-6,
        norm_offset=0.0,
        bias=None,
        softcap=None,
        temperature=1.0,
        threshold=0.9,
        measure="max_prob",
    ):
        super().__init__()
        self._setup(weight, norm_weight, norm_eps, norm_offset, bias, softcap, temperature, threshold, measure, {})

    def _setup(self, weight, norm_weight, norm_eps, norm_offset, bias, softcap, temperature, threshold, measure, shard):
        if not isinstance(weight, torch.Tensor):
            raise ValueError(f"weight: expected a torch.Tensor, got {type(weight).__name__}")
        # The op layer's checks, on an empty batch shaped and typed like the head expects: they name the
        # head's arguments (weight, norm_weight, bias, norm_eps, norm_offset, softcap, temperature).
        d = weight.shape[-1] if weight.dim() else 1
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        probe = torch.empty((0, d), dtype=dtype, device=weight.device)
        validate_head(
            probe,
            weight,
            norm_weight,
            norm_eps,
            bias,
            temperature,
            norm_offset=norm_offset,
            softcap=softcap,
            allow_empty_vocab=bool(shard),
        )
        get_head_measure(measure)
        # Plain instance attributes, outside nn.Module's registries (see the module docstring).
        self.__dict__["_tensors"] = {"weight": weight, "norm_weight": norm_weight, "bias": bias}
        self.norm_eps = float(norm_eps)
        self.norm_offset = float(norm_offset)
        self.softcap = None if softcap is None else float(softcap)
        self.temperature = float(temperature)
        self.measure = measure
        self._shard = dict(shard)
        self.threshold = threshold

    # ------------------------------------------------------------------ referenced tensors (read-only)
    @property
    def weight(self):
        """The [V, d] head weight given, itself (not a copy)."""
        return self._tensors["weight"]

    @property
    def norm_weight(self):
        """The [d] RMSNorm weight given, itself, or None."""
        return self._tensors["norm_weight"]

    @property
    def bias(self):
        """The [V] bias given, itself, or None."""
        return self._tensors["bias"]

    @property
    def threshold(self):
        """The stored threshold: a float or the tensor given."""
        return self._threshold

    @threshold.setter
    def threshold(self, value):
        self._threshold = _check_stored_threshold(value, self.weight.device)

    @property
    def sharded(self):
        """Whether the head is this rank's vocabulary shard (exit checks merge statistics over a process group)."""
        return bool(self._shard)

    # ------------------------------------------------------------------ the check
    def forward(self, hidden, threshold=None):
        """The exit check of ``hidden`` [..., d] (same dtype and device as the weight).

        Args:
            hidden: [..., d] hidden states at an exit point (before the final norm: the head applies it).
            threshold: None (the stored one), or a float / tensor for this call only. A float NaN raises
                ValueError; a tensor is scanned for NaN only when it lives on the CPU (on a GPU the scan
                would synchronize every call; a NaN row then never exits).

        Returns:
            :class:`earlyexit.ExitResult` of tensors shaped ``hidden.shape[:-1]``; tokens are vocabulary ids.
        """
        if threshold is None:
            threshold = self._threshold
        elif (
            isinstance(threshold, torch.Tensor) and threshold.device.type == "cpu" and not torch.compiler.is_compiling()
        ):
            _reject_nan_entries(threshold)
        return exit_check(
            hidden,
            self.weight,
            threshold,
            measure=self.measure,
            norm_weight=self.norm_weight,
            norm_eps=self.norm_eps,
            norm_offset=self.norm_offset,
            bias=self.bias,
            softcap=self.softcap,
            temperature=self.temperature,
            **self._shard,
        )

    def extra_repr(self):
        w = self.weight
        thr = self._threshold
        thr = f"tensor{tuple(thr.shape)}" if isinstance(thr, torch.Tensor) else repr(thr)
        parts = [
            f"vocab={w.shape[0]}",
            f"d={w.shape[1]}",
            f"dtype={str(w.dtype).replace('torch.', '')}",
            f"device={w.device}",
            f"norm={'rms' if self.norm_weight is not None else None}",
            f"measure={self.measure!r}",
            f"threshold={thr}",
        ]
        if self.norm_offset:
            parts.append(f"norm_offset={self.norm_offset}")
        if self.softcap is not None:
            parts.append(f"softcap={self.softcap}")
        if self.temperature != 1.0:
            parts.append(f"temperature={self.temperature}")
        if self._shard:
            parts.append("vocab_sharded=True")
        return ", ".join(parts)

    # ------------------------------------------------------------------ from a HuggingFace model
    @classmethod
    def from_model(cls, model, *, threshold=0.9, measure="max_prob"):
        """The exit head of a supported HuggingFace causal LM: its final norm and lm_head, by reference.

        The arguments (weight, bias, norm_weight, norm_eps, norm_offset, softcap, temperature) come from
        :func:`earlyexit.hf.model_adapter.exit_head_args`, so the head's token is the model's own greedy
        token (the argmax of ``model(...).logits``) for the same final hidden state.

        A vocabulary-sharded lm_head (transformers' tensor parallelism) is supported: the head then holds
        this rank's rows and every call merges per-row statistics over the shard's process group
        (:func:`earlyexit.exit_check` with ``group=``); all ranks must call it together.

        Raises:
            ValueError: an unsupported architecture (the message lists the supported ones) or bad arguments.
        """
        from earlyexit.hf.model_adapter import exit_head_args  # lazily: importing earlyexit needs no transformers

        args = dict(exit_head_args(model))
        shard = {k: args.pop(k) for k in _SHARD_KEYS if k in args}
        known = ("weight", "norm_weight", "norm_eps", "norm_offset", "bias", "softcap", "temperature")
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise ValueError(f"model: exit_head_args returned arguments ExitHead does not know: {unknown}")
        head = cls.__new__(cls)
        nn.Module.__init__(head)
        head._setup(
            args.pop("weight"),
            args.pop("norm_weight", None),
            args.pop("norm_eps", 1e-6),
            args.pop("norm_offset", 0.0),
            args.pop("bias", None),
            args.pop("softcap", None),
            args.pop("temperature", 1.0),
            threshold,
            measure,
            shard,
        )
        return head


__all__ = ["ExitHead"]
