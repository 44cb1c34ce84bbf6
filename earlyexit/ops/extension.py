"""Python side of the compiled ops (torch.ops.earlyexit_C, built from csrc/): fakes and the call wrapper.

The C++ op ``earlyexit_C::exit_check`` takes the validated 2-D arguments of ``earlyexit::exit_check``
(hidden [N, d], weight [V, d], threshold [N] float32, norm_weight [d] or None, bias [V] or None, measure,
norm_eps, temperature) and returns its seven [N] outputs. Its fake implementation lives here so that
torch.compile and torch.library.opcheck can trace it without running a kernel.
"""

import torch

from earlyexit import backends

if backends.EXTENSION is not None:

    @torch.library.register_fake("earlyexit_C::exit_check")
    def _exit_check_ext_fake(hidden, weight, threshold, norm_weight, bias, measure, norm_eps, temperature):
        n = hidden.shape[0]
        f32 = dict(dtype=torch.float32, device=hidden.device)
        return (
            hidden.new_empty(n, dtype=torch.int64),
            hidden.new_empty(n, dtype=torch.bool),
            *(hidden.new_empty(n, **f32) for _ in range(5)),
        )


def run_extension(hidden, weight, threshold, norm_weight, bias, measure, norm_eps, temperature):
    """Backends "cpu" and "cuda": the compiled kernel for hidden's device. Returns the seven outputs."""
    return tuple(
        torch.ops.earlyexit_C.exit_check(hidden, weight, threshold, norm_weight, bias, measure, norm_eps, temperature)
    )
