"""The statistics contract of the exit check: ``exit_stats``, ``merge_exit_stats``, ``finalize_exit_stats``.

``exit_check`` is ``finalize(merge(slices))`` inside one launch. These three ops expose the same steps, so
a head split over the vocabulary (several GPUs, or chunks of one) decides a token from five numbers per
row and slice instead of the logits. ``exit_stats`` is a torch.library custom op with a fake
implementation on every backend; merge and finalize are elementwise torch code over [N] tensors (the
reference's own, :mod:`earlyexit.ops.reference`), traceable as they are.
"""

import math
import sys

import torch

from earlyexit.ops import backends
from earlyexit.ops.checks import check_float_dtype, check_same_device, check_shape, check_tensor
from earlyexit.ops.exit_types import ExitResult, ExitStats
from earlyexit.ops.extension import run_extension_stats
from earlyexit.ops.measures import get_head_measure
from earlyexit.ops.reference import NO_TOKEN, empty_stats, exit_stats_reference, finalize_stats, merge_stats


def _run_triton_stats(hidden, weight, norm_weight, bias, norm_eps, temperature, norm_offset, softcap):
    from earlyexit.triton_kernels.exit_check import HeadArgs, exit_stats_triton

    out = _empty_stats_outputs(hidden.shape[0], hidden.device)
    head = HeadArgs(norm_weight, bias, norm_eps, norm_offset, softcap, temperature)
    return exit_stats_triton(hidden, weight, head, out, hidden.device.type == "cpu")


_STATS_IMPLS = {
    "torch": exit_stats_reference,
    "triton": _run_triton_stats,
    "cpu": run_extension_stats,
    "cuda": run_extension_stats,
}


def _empty_stats_outputs(n, device):
    f = dict(dtype=torch.float32, device=device)
    return (
        torch.empty(n, **f),
        torch.empty(n, dtype=torch.int64, device=device),
        torch.empty(n, **f),
        torch.empty(n, **f),
        torch.empty(n, **f),
        torch.empty(n, dtype=torch.bool, device=device),
    )


@torch.library.custom_op("earlyexit::exit_stats", mutates_args=())
def exit_stats_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    norm_weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    norm_eps: float,
    temperature: float,
    norm_offset: float,
    softcap: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Registered op on validated 2-D inputs: hidden [N, d], weight [V, d] with V >= 1 (local column ids).

    ``softcap`` 0.0 means none. ``backend`` must be concrete. Returns the six :class:`ExitStats` fields
    as [N] tensors.
    """
    args = (hidden, weight, norm_weight, bias, norm_eps, temperature, norm_offset, softcap)
    return tuple(_STATS_IMPLS[backend](*args))


@exit_stats_op.register_fake
def _exit_stats_fake(hidden, weight, norm_weight, bias, norm_eps, temperature, norm_offset, softcap, backend):
    return _empty_stats_outputs(hidden.shape[0], hidden.device)


_FLOAT_MAX = sys.float_info.max
_MAX_TOKEN_ID = 2**63 - 1


def _finite(x):
    """Whether the number x is finite. Not math.isfinite: torch.compile cannot trace it on a symbolic float
    (a float argument that changed between calls), and an int beyond float range would pass it."""
    return x - x == 0 and -_FLOAT_MAX <= x <= _FLOAT_MAX


def _check_number(name, value, ok, expected):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value) or not ok(value):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")


def validate_head(
    hidden, weight, norm_weight, norm_eps, bias, temperature, norm_offset=0.0, softcap=None, *, allow_empty_vocab
):
    """Argument checks shared by the exit-check ops; each ValueError names the argument."""
    check_tensor("hidden", hidden)
    check_tensor("weight", weight)
    check_float_dtype("hidden", hidden)
    check_float_dtype("weight", weight)
    if hidden.dim() < 1:
        raise ValueError("hidden: expected shape [..., d], got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D [V, d] tensor, got {weight.dim()}-D shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(
            f"weight: expected dtype {hidden.dtype} (the dtype of hidden), got {weight.dtype}; cast one of them"
        )
    d = hidden.shape[-1]
    if weight.shape[1] != d:
        raise ValueError(f"weight: expected shape [V, {d}] (d = hidden.shape[-1]), got {tuple(weight.shape)}")
    if d == 0:
        raise ValueError("hidden: expected a last dimension d >= 1, got 0")
    if weight.shape[0] == 0 and not allow_empty_vocab:
        raise ValueError("weight: expected at least one vocabulary row, got V = 0")
    if weight.shape[0] > 0 and d > 1 and weight.stride(1) != 1:
        raise ValueError("weight: expected a unit stride along d (call .contiguous() once, outside the decode loop)")
    check_same_device("hidden", hidden, weight=weight)
    if bias is not None:
        check_tensor("bias", bias)
        check_float_dtype("bias", bias, (torch.float32, torch.float16, torch.bfloat16))
        check_shape("bias", bias, (weight.shape[0],))
        check_same_device("hidden", hidden, bias=bias)
    if norm_weight is not None:
        check_tensor("norm_weight", norm_weight)
        check_float_dtype("norm_weight", norm_weight, (torch.float32, torch.float16, torch.bfloat16))
        check_shape("norm_weight", norm_weight, (d,))
        check_same_device("hidden", hidden, norm_weight=norm_weight)
    _check_number("temperature", temperature, lambda t: t > 0, "a finite float > 0")
    _check_number("norm_eps", norm_eps, lambda e: e >= 0, "a finite float >= 0")
    _check_number("norm_offset", norm_offset, lambda o: True, "a finite float")
    if norm_offset != 0 and norm_weight is None:
        raise ValueError(f"norm_offset: {norm_offset!r} needs norm_weight (the scale is norm_offset + norm_weight)")
    if softcap is not None:
        _check_number("softcap", softcap, lambda c: c > 0, "None or a finite float > 0")


def scalar_args(norm_eps, temperature, norm_offset, softcap):
    """The scalar arguments of the registered ops, as floats: (norm_eps, temperature, norm_offset, softcap),
    with softcap None encoded as 0.0 (the kernels' "no softcapping")."""
    return float(norm_eps), float(temperature), float(norm_offset), 0.0 if softcap is None else float(softcap)


def threshold_rows(threshold, lead, device):
    """``threshold`` (a float or a tensor broadcastable to ``lead``) as a contiguous float32 [prod(lead)] tensor."""
    n = math.prod(lead)
    if isinstance(threshold, torch.Tensor):
        if threshold.dtype == torch.bool or threshold.is_complex():
            raise ValueError(f"threshold: expected a real-valued tensor, got dtype {threshold.dtype}")
        if threshold.device != device and threshold.dim() > 0:
            raise ValueError(f"threshold: expected a tensor on {device} (like hidden), got {threshold.device}")
        try:
            fits = torch.broadcast_shapes(tuple(threshold.shape), lead) == lead
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"threshold: shape {tuple(threshold.shape)} does not broadcast to {lead}")
        return threshold.to(device=device, dtype=torch.float32).expand(lead).reshape(n).contiguous()
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise ValueError(f"threshold: expected a float or a tensor, got {type(threshold).__name__}")
    if threshold != threshold:  # NaN; not math.isnan, which torch.compile cannot trace on a symbolic float
        raise ValueError("threshold: expected a number, got NaN (no row could ever be compared with it)")
    if isinstance(threshold, int) and not _finite(threshold):
        raise ValueError("threshold: an int beyond the float range (use math.inf to never exit)")
    return torch.full((n,), float(threshold), dtype=torch.float32, device=device)


def _vocab_range(vocab_start, vocab_size, rows):
    """Validated (vocab_start, local columns that are real vocabulary, not padding)."""
    _check_number("vocab_start", vocab_start, lambda s: int(s) == s and s >= 0, "an integer >= 0")
    # Token ids are int64: the slice's last global id must be one.
    if int(vocab_start) + rows > _MAX_TOKEN_ID + 1:
        raise ValueError(f"vocab_start: {vocab_start} + {rows} local columns exceeds the int64 token ids")
    if vocab_size is None:
        return int(vocab_start), rows
    _check_number("vocab_size", vocab_size, lambda s: int(s) == s and s >= 1, "an integer >= 1")
    if vocab_start > vocab_size:
        raise ValueError(f"vocab_start: expected a value in [0, vocab_size = {vocab_size}], got {vocab_start}")
    return int(vocab_start), max(0, min(rows, int(vocab_size) - int(vocab_start)))


def exit_stats(
    hidden,
    weight,
    *,
    norm_weight=None,
    norm_eps=1e-6,
    norm_offset=0.0,
    bias=None,
    softcap=None,
    temperature=1.0,
    vocab_start=None,
    vocab_size=None,
    backend="auto",
    group=None,
):
    """Softmax statistics of one vocabulary slice of the exit head, without [N, V] logits.

    The logits are those of :func:`earlyexit.exit_check` (RMSNorm, head GEMM, bias, softcap, temperature)
    for the global vocabulary columns [vocab_start, vocab_start + weight.shape[0]).

    Args:
        hidden: [..., d] float32/float16/bfloat16; rows may be strided.
        weight: [V_local, d] same dtype: this slice of the head; V_local may be 0 (an empty slice).
        norm_weight, norm_eps, norm_offset, bias, softcap, temperature, backend: as in :func:`earlyexit.exit_check`
            (``bias`` is this slice's [V_local]).
        vocab_start: global id of the slice's first column (default 0; with ``group``,
            rank * weight.shape[0], the equal-shard layout).
        vocab_size: the real vocabulary size: columns whose global id is >= vocab_size are padding and are
            ignored (None: no padding).
        group: a torch.distributed ProcessGroup whose ranks each hold one slice (``hidden`` replicated):
            the result is then the statistics of all the ranks' slices, merged identically on every rank
            (:func:`earlyexit.distributed.all_gather_exit_stats`).

    Returns:
        :class:`ExitStats`, each field shaped ``hidden.shape[:-1]``. An empty slice gives the neutral
        element of :func:`merge_exit_stats`.
    """
    stats = slice_stats(
        hidden,
        weight,
        norm_weight=norm_weight,
        norm_eps=norm_eps,
        norm_offset=norm_offset,
        bias=bias,
        softcap=softcap,
        temperature=temperature,
        vocab_start=vocab_start,
        vocab_size=vocab_size,
        backend=backend,
        group=group,
    )
    if group is not None:
        from earlyexit import distributed  # slice_stats checked the group

        stats = distributed.all_gather_exit_stats(stats, group, backend)
    return ExitStats(*(x.reshape(hidden.shape[:-1]) for x in stats))


def slice_stats(
    hidden,
    weight,
    *,
    norm_weight,
    norm_eps,
    norm_offset,
    bias,
    softcap,
    temperature,
    vocab_start,
    vocab_size,
    backend,
    group,
):
    """This rank's part of :func:`exit_stats` (arguments as there): the statistics of its own slice, with
    global ids, as [N] fields (N = the rows of ``hidden``), before any collective."""
    validate_head(
        hidden, weight, norm_weight, norm_eps, bias, temperature, norm_offset, softcap, allow_empty_vocab=True
    )
    if group is not None:
        from earlyexit import distributed  # lazily: plain exit checks never load torch.distributed

        distributed.check_member(group)
        if vocab_start is None:
            vocab_start = distributed.default_vocab_start(group, weight.shape[0])
    start, local = _vocab_range(0 if vocab_start is None else vocab_start, vocab_size, weight.shape[0])
    rows = hidden.reshape(-1, hidden.shape[-1])
    n = rows.shape[0]
    if local == 0 or n == 0:
        stats = empty_stats(n, hidden.device, ~torch.isfinite(rows).all(-1) if n else None)
    else:
        impl = backends.resolve(backend, hidden.device.type)
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        weight = weight[:local]
        bias = bias[:local].contiguous() if bias is not None else None
        norm_weight = norm_weight.contiguous() if norm_weight is not None else None
        scalars = scalar_args(norm_eps, temperature, norm_offset, softcap)
        stats = exit_stats_op(rows, weight, norm_weight, bias, *scalars, impl)
        # Global ids; an invalid row's argmax means nothing (a kernel may leave its sentinel there): -1.
        argmax = torch.where(stats[5], torch.full_like(stats[1], NO_TOKEN), stats[1] + start)
        stats = (stats[0], argmax, *stats[2:])
    return ExitStats(*stats)


def merge_exit_stats(stats):
    """Merge the statistics of disjoint vocabulary slices into those of their union.

    Args:
        stats: a non-empty sequence of :class:`ExitStats` with fields of one shape, on one device.
    Returns:
        :class:`ExitStats`. argmax (the lowest global id on ties) and second_logit are exact; sum_exp and
        sum_exp_z are rescaled to the common maximum in float32. Deterministic: equal inputs in the given
        order give bitwise equal results. An empty slice is a neutral element.
    """
    stats = list(stats)
    if not stats:
        raise ValueError("stats: expected at least one ExitStats")
    for i, s in enumerate(stats):
        if not isinstance(s, tuple) or len(s) != len(ExitStats._fields):
            raise ValueError(f"stats[{i}]: expected an ExitStats, got {type(s).__name__}")
        if s[0].shape != stats[0][0].shape or s[0].device != stats[0][0].device:
            raise ValueError(
                f"stats[{i}]: expected fields of shape {tuple(stats[0][0].shape)} on {stats[0][0].device}, "
                f"got {tuple(s[0].shape)} on {s[0].device}"
            )
    return ExitStats(*merge_stats(stats))


def finalize_exit_stats(stats, threshold, *, measure="max_prob"):
    """The exit decision of merged statistics: the same outputs as :func:`earlyexit.exit_check`.

    Args:
        stats: :class:`ExitStats` (fields of any one shape).
        threshold: float, or a tensor broadcastable to the fields' shape.
        measure: "max_prob", "margin" or "entropy" (see :data:`earlyexit.ops.measures.MEASURES`).
    Returns:
        :class:`ExitResult` shaped like the fields. Invalid rows (flagged, or without a finite logit) never
        exit: token -1, NaN statistics.
    """
    if not isinstance(stats, tuple) or len(stats) != len(ExitStats._fields):
        raise ValueError(f"stats: expected an ExitStats, got {type(stats).__name__}")
    get_head_measure(measure)
    lead = tuple(stats[0].shape)
    thr = threshold_rows(threshold, lead, stats[0].device)
    flat = [x.reshape(-1) for x in stats]
    return ExitResult(*(o.reshape(lead) for o in finalize_stats(flat, thr, measure)))
