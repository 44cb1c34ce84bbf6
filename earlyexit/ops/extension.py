"""Python side of the compiled ops (torch.ops.earlyexit_C, built from csrc/): fakes and the call wrappers.

``earlyexit_C::exit_check(hidden, weight, threshold, norm_weight, bias, statistic, exit_above, norm_eps,
temperature, norm_offset, softcap)`` takes the validated 2-D arguments of ``earlyexit::exit_check``
(hidden [N, d], weight [V, d], threshold [N] float32, norm_weight [d] or None, bias [V] or None; softcap
0.0 for none) with the measure given as its statistic code and exit direction (earlyexit.ops.measures),
and returns its seven [N] outputs. ``earlyexit_C::exit_stats(hidden, weight, norm_weight, bias, norm_eps,
temperature, norm_offset, softcap)`` returns the six :class:`earlyexit.ExitStats` fields of the slice
([N] each; argmax a local column id). ``earlyexit_C::state_similarity(h, h_prev)`` takes the validated
[N, d] rows of ``earlyexit::state_similarity`` and returns the float32 [N] cosines. Their fake
implementations live here so that torch.compile and opcheck can trace them without a kernel.
"""

import torch

from earlyexit.ops import backends
from earlyexit.ops.measures import get_head_measure

if backends.EXTENSION is not None:

    @torch.library.register_fake("earlyexit_C::exit_check")
    def _exit_check_ext_fake(
        hidden,
        weight,
        threshold,
        norm_weight,
        bias,
        statistic,
        exit_above,
        norm_eps,
        temperature,
        norm_offset=0.0,
        softcap=0.0,
    ):
        n = hidden.shape[0]
        f32 = dict(dtype=torch.float32, device=hidden.device)
        return (
            hidden.new_empty(n, dtype=torch.int64),
            hidden.new_empty(n, dtype=torch.bool),
            *(hidden.new_empty(n, **f32) for _ in range(5)),
        )

    @torch.library.register_fake("earlyexit_C::exit_stats")
    def _exit_stats_ext_fake(hidden, weight, norm_weight, bias, norm_eps, temperature, norm_offset=0.0, softcap=0.0):
        n = hidden.shape[0]
        f32 = dict(dtype=torch.float32, device=hidden.device)
        return (
            hidden.new_empty(n, **f32),
            hidden.new_empty(n, dtype=torch.int64),
            *(hidden.new_empty(n, **f32) for _ in range(3)),
            hidden.new_empty(n, dtype=torch.bool),
        )

    @torch.library.register_fake("earlyexit_C::state_similarity")
    def _state_similarity_ext_fake(h, h_prev):
        return h.new_empty(h.shape[0], dtype=torch.float32)


def run_extension(hidden, weight, threshold, norm_weight, bias, measure, norm_eps, temperature, norm_offset, softcap):
    """Backends "cpu" and "cuda": the compiled exit check for hidden's device. Returns the seven outputs."""
    spec = get_head_measure(measure)
    scalars = (norm_eps, temperature, norm_offset, softcap)
    return tuple(
        torch.ops.earlyexit_C.exit_check(
            hidden, weight, threshold, norm_weight, bias, spec.code, spec.exit_above, *scalars
        )
    )


def run_extension_stats(hidden, weight, norm_weight, bias, norm_eps, temperature, norm_offset, softcap):
    """Backends "cpu" and "cuda": the compiled slice statistics. Returns the six ExitStats fields."""
    scalars = (norm_eps, temperature, norm_offset, softcap)
    return tuple(torch.ops.earlyexit_C.exit_stats(hidden, weight, norm_weight, bias, *scalars))
