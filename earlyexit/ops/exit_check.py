"""``exit_check``: the fused exit-head confidence check, with validation and backend dispatch.

The public function validates (ValueError naming the argument), flattens leading dims, resolves
the backend and calls the registered op ``torch.ops.earlyexit.exit_check``. That op is a
torch.library custom op with a fake (meta) implementation, so torch.compile(fullgraph=True)
traces callers without graph breaks and treats the kernel as opaque. With a vocabulary-sharded head
(``group=``, ``vocab_start=``, ``vocab_size=``) it is ``finalize(merge(exit_stats))`` instead
(:mod:`earlyexit.ops.exit_stats`).
"""

import torch

from earlyexit.ops import backends
from earlyexit.ops.exit_stats import finalize_exit_stats, scalar_args, slice_stats, threshold_rows, validate_head
from earlyexit.ops.exit_types import ExitResult
from earlyexit.ops.extension import run_extension
from earlyexit.ops.measures import get_head_measure
from earlyexit.ops.reference import exit_check_reference


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


def _run_triton(hidden, weight, threshold, norm_weight, bias, measure, norm_eps, temperature, norm_offset, softcap):
    from earlyexit.triton_kernels.exit_check import HeadArgs, exit_check_triton

    spec = get_head_measure(measure)
    out = _empty_outputs(hidden.shape[0], hidden.device)
    head = HeadArgs(norm_weight, bias, norm_eps, norm_offset, softcap, temperature)
    return exit_check_triton(
        hidden, weight, threshold, head, spec.code, spec.exit_above, out, hidden.device.type == "cpu"
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
    norm_offset: float,
    softcap: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Registered op on validated 2-D inputs: hidden [N, d], weight [V, d], threshold [N] float32.

    ``softcap`` 0.0 means no softcapping. ``backend`` must be concrete ("torch", "triton", "cpu",
    "cuda"). Returns the seven :class:`ExitResult` fields as [N] tensors.
    """
    args = (hidden, weight, threshold, norm_weight, bias, measure, norm_eps, temperature, norm_offset, softcap)
    return tuple(_IMPLS[backend](*args))


@exit_check_op.register_fake
def _exit_check_fake(
    hidden, weight, threshold, norm_weight, bias, measure, norm_eps, temperature, norm_offset, softcap, backend
):
    return _empty_outputs(hidden.shape[0], hidden.device)


def exit_check(
    hidden,
    weight,
    threshold,
    *,
    measure="max_prob",
    norm_weight=None,
    norm_eps=1e-6,
    norm_offset=0.0,
    bias=None,
    softcap=None,
    temperature=1.0,
    backend="auto",
    group=None,
    vocab_start=None,
    vocab_size=None,
):
    """Fused exit check: exit head logits, softmax confidence and threshold, without [N, V] logits.

    Computes z = cap(rmsnorm(hidden) @ weight.T + bias) / temperature per row (RMSNorm only when
    ``norm_weight`` is given, statistics in float32 as LlamaRMSNorm; cap only with ``softcap``),
    accumulated in float32, and its softmax statistics (:func:`earlyexit.ops.reference.head_logits`
    is the same in plain torch).

    Args:
        hidden: [..., d] float32/float16/bfloat16; rows may be strided.
        weight: [V, d], same dtype as hidden (nn.Linear layout, e.g. ``lm_head.weight``).
        threshold: float, or a tensor broadcastable to ``hidden.shape[:-1]`` (per-row thresholds).
        measure: "max_prob" (exit if max_prob >= threshold), "margin" (p1 - p2 >= threshold)
            or "entropy" (entropy <= threshold, nats): the head measures. "state" (hidden-state
            saturation) is no head statistic and raises ValueError: use :func:`earlyexit.state_similarity`.
        norm_weight: [d] RMSNorm weight applied inside the kernel, or None.
        norm_eps: RMSNorm epsilon.
        norm_offset: finite float added to norm_weight in float32: the RMSNorm scale is
            (norm_offset + norm_weight); Gemma's norms use 1 + w (norm_offset=1.0). Needs norm_weight.
        bias: [V] or None; -inf entries mask vocabulary columns.
        softcap: None, or a finite float > 0: final-logit softcapping z <- softcap * tanh(z / softcap)
            of the finite logits, before the temperature (Gemma 2's final_logit_softcapping).
        temperature: > 0, divides the logits. Granite's ``logits_scaling`` (logits / s) is
            ``temperature=s``.
        backend: "auto", "torch" (reference), "triton", "cpu" or "cuda" (C++ extension).
        group: a torch.distributed ProcessGroup over which the head is sharded by vocabulary: ``weight`` and
            ``bias`` are this rank's shard (possibly empty), ``hidden`` is the same on every rank. One
            all_gather of the per-row statistics (never logits); every rank gets bitwise identical results,
            equal to the unsharded check.
        vocab_start: global id of this shard's first row (default 0; with ``group``, rank * weight.shape[0]).
        vocab_size: the real vocabulary size; shard rows at global ids >= vocab_size are padding, ignored.

    Returns:
        :class:`ExitResult` of tensors shaped ``hidden.shape[:-1]``; tokens are global vocabulary ids.

    Raises:
        ValueError: bad arguments (the message names the argument).
        RuntimeError: the requested backend cannot run here (the message says why).
    """
    sharded = group is not None or vocab_start is not None or vocab_size is not None
    validate_head(
        hidden, weight, norm_weight, norm_eps, bias, temperature, norm_offset, softcap, allow_empty_vocab=sharded
    )
    get_head_measure(measure)  # ValueError naming the argument
    lead = tuple(hidden.shape[:-1])
    thr = threshold_rows(threshold, lead, hidden.device)
    if sharded:
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
        if group is None:
            result = finalize_exit_stats(stats, thr.reshape(-1), measure=measure)
        else:
            from earlyexit import distributed  # slice_stats checked the group

            result = distributed.all_gather_exit_check(stats, group, thr, measure, backend)
        return ExitResult(*(x.reshape(lead) for x in result))
    d = hidden.shape[-1]
    impl = backends.resolve(backend, hidden.device.type)
    rows = hidden.reshape(-1, d)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    if norm_weight is not None:
        norm_weight = norm_weight.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    out = exit_check_op(
        rows, weight, thr, norm_weight, bias, measure, *scalar_args(norm_eps, temperature, norm_offset, softcap), impl
    )
    return ExitResult(*(o.reshape(lead) for o in out))
