"""``exit_check``: the fused exit-head confidence check, with validation and backend dispatch.

The public function validates (ValueError naming the argument), flattens leading dims, resolves
the backend and calls the registered op ``torch.ops.earlyexit.exit_check``. That op is a
torch.library custom op with a fake (meta) implementation, so torch.compile(fullgraph=True)
traces callers without graph breaks and treats the kernel as opaque.
"""

import math
from typing import NamedTuple

import torch

from earlyexit import backends
from earlyexit.ops.checks import check_float_dtype, check_same_device, check_shape, check_tensor
from earlyexit.ops.extension import run_extension
from earlyexit.reference import MEASURES, exit_check_reference


class ExitResult(NamedTuple):
    """Outputs of :func:`exit_check`, each shaped ``hidden.shape[:-1]``.

    token: int64 argmax of the logits (lowest index on ties; -1 for an invalid row).
    exit: bool, the row passes the threshold (never for an invalid row).
    confidence: float32 value of the chosen measure.
    max_prob, margin (p_top1 - p_top2), entropy (nats), lse (logsumexp of the logits): float32.
    A row is invalid when its hidden state or any of its logits is NaN/inf (-inf logits from a
    -inf bias are allowed) or it has no finite logit; its statistics are NaN.
    """

    token: torch.Tensor
    exit: torch.Tensor
    confidence: torch.Tensor
    max_prob: torch.Tensor
    margin: torch.Tensor
    entropy: torch.Tensor
    lse: torch.Tensor


def _empty_outputs(n, device):
    f = dict(dtype=torch.float32, device=device)
    return (
        torch.empty(n, dtype=torch.int64, device=device),
        torch.empty(n, dtype=torch.bool, device=device),
        torch.empty(n, **f),
        torch.empty(n, **f),
        torch.empty(n, **f),
        torch.empty(n, **f),
        torch.empty(n, **f),
    )


def _run_triton(hidden, weight, threshold, norm_weight, bias, measure, norm_eps, temperature):
    from earlyexit.triton_kernels.exit_check import exit_check_triton

    out = _empty_outputs(hidden.shape[0], hidden.device)
    interpret = hidden.device.type == "cpu"
    return exit_check_triton(
        hidden, weight, threshold, norm_weight, bias, measure, norm_eps, temperature, out, interpret
    )


_IMPLS = {
    "torch": exit_check_reference,
    "triton": _run_triton,
    "cpu": run_extension,
    "cuda": run_extension,
}


@torch.library.custom_op("earlyexit::exit_check", mutates_args=())
def exit_check_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    threshold: torch.Tensor,
    norm_weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    measure: str,
    norm_eps: float,
    temperature: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Registered op on validated 2-D inputs: hidden [N, d], weight [V, d], threshold [N] float32.

    ``backend`` must be concrete ("torch", "triton", "cpu", "cuda"). Returns the seven
    :class:`ExitResult` fields as [N] tensors.
    """
    return tuple(_IMPLS[backend](hidden, weight, threshold, norm_weight, bias, measure, norm_eps, temperature))


@exit_check_op.register_fake
def _exit_check_fake(hidden, weight, threshold, norm_weight, bias, measure, norm_eps, temperature, backend):
    return _empty_outputs(hidden.shape[0], hidden.device)


def _validate(hidden, weight, threshold, measure, norm_weight, norm_eps, bias, temperature):
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
    if weight.shape[0] == 0:
        raise ValueError("weight: expected at least one vocabulary row, got V = 0")
    if weight.stride(1) != 1:
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
    if measure not in MEASURES:
        raise ValueError(f"measure: expected one of {MEASURES}, got {measure!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature: expected a float, got {type(temperature).__name__}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature: expected a finite value > 0, got {temperature}")
    if isinstance(norm_eps, bool) or not isinstance(norm_eps, (int, float)) or not norm_eps >= 0:
        raise ValueError(f"norm_eps: expected a float >= 0, got {norm_eps!r}")
    if isinstance(threshold, torch.Tensor):
        if threshold.dtype == torch.bool or threshold.is_complex():
            raise ValueError(f"threshold: expected a real-valued tensor, got dtype {threshold.dtype}")
        if threshold.device != hidden.device and threshold.dim() > 0:
            raise ValueError(f"threshold: expected a tensor on {hidden.device} (like hidden), got {threshold.device}")
        lead = tuple(hidden.shape[:-1])
        try:
            fits = torch.broadcast_shapes(tuple(threshold.shape), lead) == lead
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"threshold: shape {tuple(threshold.shape)} does not broadcast to hidden.shape[:-1] = {lead}"
            )
    elif isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise ValueError(f"threshold: expected a float or a tensor, got {type(threshold).__name__}")


def exit_check(
    hidden,
    weight,
    threshold,
    *,
    measure="max_prob",
    norm_weight=None,
    norm_eps=1e-6,
    bias=None,
    temperature=1.0,
    backend="auto",
):
    """Fused exit check: exit head logits, softmax confidence and threshold, without [N, V] logits.

    Computes z = (rmsnorm(hidden) @ weight.T + bias) / temperature per row (RMSNorm only when
    ``norm_weight`` is given, statistics in float32 as LlamaRMSNorm), accumulated in float32, and
    its softmax statistics.

    Args:
        hidden: [..., d] float32/float16/bfloat16; rows may be strided.
        weight: [V, d], same dtype as hidden (nn.Linear layout, e.g. ``lm_head.weight``).
        threshold: float, or a tensor broadcastable to ``hidden.shape[:-1]`` (per-row thresholds).
        measure: "max_prob" (exit if max_prob >= threshold), "margin" (p1 - p2 >= threshold)
            or "entropy" (entropy <= threshold, nats).
        norm_weight: [d] RMSNorm weight applied inside the kernel, or None.
        norm_eps: RMSNorm epsilon.
        bias: [V] or None; -inf entries mask vocabulary columns.
        temperature: > 0, divides the logits.
        backend: "auto", "torch" (reference), "triton", "cpu" or "cuda" (C++ extension).

    Returns:
        :class:`ExitResult` of tensors shaped ``hidden.shape[:-1]``.

    Raises:
        ValueError: bad arguments (the message names the argument).
        RuntimeError: the requested backend cannot run here (the message says why).
    """
    _validate(hidden, weight, threshold, measure, norm_weight, norm_eps, bias, temperature)
    lead = hidden.shape[:-1]
    d = hidden.shape[-1]
    impl = backends.resolve(backend, hidden.device.type)
    rows = hidden.reshape(-1, d)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    n = rows.shape[0]
    if isinstance(threshold, torch.Tensor):
        thr = threshold.to(device=hidden.device, dtype=torch.float32).expand(lead).reshape(n).contiguous()
    else:
        thr = torch.full((n,), float(threshold), dtype=torch.float32, device=hidden.device)
    if norm_weight is not None:
        norm_weight = norm_weight.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    out = exit_check_op(rows, weight, thr, norm_weight, bias, measure, float(norm_eps), float(temperature), impl)
    return ExitResult(*(o.reshape(lead) for o in out))
