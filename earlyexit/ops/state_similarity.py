"""``state_similarity``: cosine similarity of two hidden states per row (CALM's "state" confidence).

Hidden-state saturation: when a token's hidden state stops changing from one layer to the next
(cosine similarity near 1), later layers are unlikely to change its prediction either, so the
similarity of consecutive layers' states is an exit confidence that costs no head GEMM.

The public function validates (ValueError naming the argument), flattens leading dims, resolves the
backend and calls the registered op ``torch.ops.earlyexit.state_similarity``: a torch.library custom
op with a fake implementation, so torch.compile(fullgraph=True) traces callers without graph breaks.
Plain eager calls run the implementation without the op dispatch (as the compaction ops do).

Definitions (every backend):

- cos = dot(h, h_prev) / (|h| |h_prev|), statistics in float32, clamped to [-1, 1] (rounding can put
  it an ulp or two outside; a clamped value keeps ``cos >= threshold`` and ``acos`` meaningful).
- A row pair holding a NaN or an inf gives NaN (it never exits: ``NaN >= threshold`` is False) and
  does not disturb the other rows.
- A zero row (all zeros, in either tensor) has no direction: the similarity is 0, as
  ``torch.nn.functional.cosine_similarity`` gives. Unlike that function (which divides by
  ``max(|x|, eps)``, eps = 1e-8, so a row of norm 1e-20 against a unit-scale row gets 1e-12 of its
  cosine, and rows of norm 1e20 give 0; in float16 its eps rounds to 0 and a zero row gives NaN), any
  non-zero finite row gets its true cosine: rows at 1e38 or at subnormal scale are handled by exact
  power-of-two rescaling (:func:`earlyexit.ops.reference.state_similarity_reference`,
  ``csrc/state_similarity.h``).
"""

import torch

from earlyexit.ops import backends
from earlyexit.ops.checks import check_dtype, check_float_dtype, check_same_device, check_shape, check_tensor
from earlyexit.ops.compaction import _eager
from earlyexit.ops.reference import state_similarity_reference

#: "auto" per device type, first that can run. CPU: the C++ kernel, measured 21-168x faster than the
#: reference (and 1.6-9.4x faster than F.cosine_similarity) at d = 576 and 4096, N = 1, 8, 64, float32 and
#: bfloat16 (benchmarks/results/cpu_state_similarity.md).
#: CUDA: the CUDA kernel (one warp per row, no launch-time JIT), then Triton; neither is timed on a GPU
#: yet (benchmarks/bench_state_similarity.py --device cuda decides between them).
_PREFERENCE = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}


def _run_triton(h, h_prev):
    from earlyexit.triton_kernels.state_similarity import state_similarity_triton

    out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
    return state_similarity_triton(h, h_prev, out, h.device.type == "cpu")


def _run_extension(h, h_prev):
    return torch.ops.earlyexit_C.state_similarity(h, h_prev)


_IMPLS = {
    "torch": state_similarity_reference,
    "triton": _run_triton,
    "cpu": _run_extension,
    "cuda": _run_extension,
}


@torch.library.custom_op("earlyexit::state_similarity", mutates_args=())
def state_similarity_op(h: torch.Tensor, h_prev: torch.Tensor, backend: str) -> torch.Tensor:
    """Registered op on validated 2-D inputs: h, h_prev [N, d], same dtype, unit column stride.

    ``backend`` must be concrete ("torch", "triton", "cpu", "cuda"). Returns float32 [N].
    """
    return _IMPLS[backend](h, h_prev)


@state_similarity_op.register_fake
def _state_similarity_fake(h, h_prev, backend):
    return h.new_empty(h.shape[0], dtype=torch.float32)


def _rows(x, d):
    """x as [N, d] rows with a unit column stride (a view when it can be; 2-D input as it is: ~1 us a reshape)."""
    rows = x if x.dim() == 2 else x.reshape(-1, d)
    return rows if rows.stride(-1) == 1 or rows.shape[0] == 0 else rows.contiguous()


def state_similarity(h, h_prev, *, backend="auto"):
    """Cosine similarity of two hidden states per row, in float32 (CALM's "state" confidence).

    Args:
        h: [..., d] float32/float16/bfloat16, d >= 1 (e.g. the hidden states after layer k); rows may
            be strided.
        h_prev: the same shape, dtype and device (e.g. the hidden states after layer k - 1).
        backend: "auto", "torch" (reference), "triton", "cpu" or "cuda" (C++ extension).

    Returns:
        float32 tensor shaped ``h.shape[:-1]``: dot(h, h_prev) / (|h| |h_prev|) per row, in [-1, 1];
        NaN where either row holds a NaN or an inf; 0 where either row is all zeros. Accurate at any
        finite magnitude (no overflow at 1e38, no underflow at subnormal scale).

    Raises:
        ValueError: bad arguments (the message names the argument).
        RuntimeError: the requested backend cannot run here (the message says why).
    """
    check_tensor("h", h)
    check_tensor("h_prev", h_prev)
    check_float_dtype("h", h)
    if h.dim() < 1 or h.shape[-1] < 1:
        raise ValueError(f"h: expected a tensor [..., d] with d >= 1, got shape {tuple(h.shape)}")
    check_shape("h_prev", h_prev, h.shape)
    check_dtype("h_prev", h_prev, (h.dtype,))
    check_same_device("h", h, h_prev=h_prev)
    impl = backends.resolve_preferred(backend, h.device.type, _PREFERENCE)
    lead, d = tuple(h.shape[:-1]), h.shape[-1]
    a, b = _rows(h, d), _rows(h_prev, d)
    out = _IMPLS[impl](a, b) if _eager(a) else state_similarity_op(a, b, impl)
    return out if h.dim() == 2 else out.reshape(lead)
