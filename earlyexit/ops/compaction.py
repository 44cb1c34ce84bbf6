"""Ragged batch compaction: ``compact``, ``partition_rows`` and ``scatter_rows``.

When some rows of a batch exit at layer k, the later layers run only on the rows that continue
(``compact`` or ``partition_rows``) and the exited rows' results go back to their original places
(``scatter_rows``). The public functions validate (ValueError naming the argument), resolve the
backend and call registered torch.library custom ops with fake implementations, so
torch.compile(fullgraph=True) traces callers without graph breaks; plain eager calls run the same
implementations without the op dispatch (see ``_eager``).
"""

import importlib
from functools import partial

import torch

from earlyexit.ops import backends
from earlyexit.ops.checks import check_dim, check_dtype, check_rows, check_same_device, check_shape, check_tensor
from earlyexit.ops.reference import compact_reference, partition_rows_reference, scatter_rows_reference
from earlyexit.ops.rows import dense_rows, rows_dense

#: "auto" per device type, first that can run. CUDA: the Triton kernel, whose logic the interpreter lane
#: checks on every CI run; the CUDA kernel has the same contract and a lower launch cost, and is picked
#: explicitly (backend="cuda"). CPU: the C++ loop (no nonzero + index_select pass per tensor).
_PREFERENCE = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}


# --------------------------------------------------------------------------------------------
# Backend implementations (validated inputs)
# --------------------------------------------------------------------------------------------


def _kernels(backend):
    """The kernel ops of a backend: compact(keep, srcs), partition_rows(keep, srcs, dsts) and
    scatter_rows(dest, index, src), on validated tensors with dense rows; C++ ones pick the device."""
    if backend == "triton":
        return importlib.import_module("earlyexit.ops.compaction_triton")
    return torch.ops.earlyexit_C


def _dense_target(x):
    """x if a kernel can write its rows in place, else a contiguous scratch copied back by the caller."""
    return x if rows_dense(x) else torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _compact_kernel(backend, keep, tensors):
    return list(_kernels(backend).compact(keep.contiguous(), [dense_rows(x) for x in tensors]))


def _partition_kernel(backend, keep, tensors, out):
    targets = [_dense_target(o) for o in out]
    perm, count = _kernels(backend).partition_rows(keep.contiguous(), [dense_rows(x) for x in tensors], targets)
    for o, t in zip(out, targets):
        if t is not o:
            o.copy_(t)
    return perm, count


def _scatter_kernel(backend, dest, index, src):
    if not rows_dense(dest):
        # A strided view such as a KV-cache slice along the sequence: torch's strided index_copy_ writes
        # the K rows in place, where a dense scratch for the kernel would copy all of dest twice.
        scatter_rows_reference(dest, index, src)
        return
    _kernels(backend).scatter_rows(dest, index.contiguous(), dense_rows(src))


_KERNEL_BACKENDS = ("triton", "cpu", "cuda")
_COMPACT_IMPLS = {"torch": compact_reference, **{b: partial(_compact_kernel, b) for b in _KERNEL_BACKENDS}}
_PARTITION_IMPLS = {"torch": partition_rows_reference, **{b: partial(_partition_kernel, b) for b in _KERNEL_BACKENDS}}
_SCATTER_IMPLS = {"torch": scatter_rows_reference, **{b: partial(_scatter_kernel, b) for b in _KERNEL_BACKENDS}}


def _check_index_range(index, m):
    """Out-of-range indices raise instead of writing out of bounds.

    CPU: checked here (no device to wait for). GPU: an asynchronous device-side assert, so the call
    stays free of host synchronization and CUDA-graph capturable; the kernels mask out-of-range
    rows, so nothing is written out of bounds before the assert surfaces at the next synchronization.
    """
    if index.numel() == 0:
        return
    if index.device.type == "cpu":
        lo, hi = torch.aminmax(index)
        if lo < 0 or hi >= m:
            raise ValueError(f"index: expected values in [0, {m}) (rows of dest), got min {int(lo)}, max {int(hi)}")
    else:
        torch._assert_async(((index >= 0) & (index < m)).all(), "scatter_rows: index out of range for dest")


# --------------------------------------------------------------------------------------------
# Registered ops
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("earlyexit::compact", mutates_args=())
def compact_op(keep: torch.Tensor, tensors: list[torch.Tensor], backend: str) -> list[torch.Tensor]:
    """Registered op: keep [N] bool, tensors [N, ...] on keep's device; backend concrete.

    Returns [tensors[0][keep], ..., index int64 [K]] as a list of new contiguous tensors.
    """
    return list(_COMPACT_IMPLS[backend](keep, tensors))


@compact_op.register_fake
def _compact_fake(keep, tensors, backend):
    k = torch.library.get_ctx().new_dynamic_size()
    return [x.new_empty((k, *x.shape[1:])) for x in tensors] + [keep.new_empty((k,), dtype=torch.int64)]


@torch.library.custom_op("earlyexit::partition_rows", mutates_args=("out",))
def partition_rows_op(
    keep: torch.Tensor, tensors: list[torch.Tensor], out: list[torch.Tensor], backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Registered op: writes the partitioned rows of tensors[i] into out[i]; returns (perm [N], count 0-d)."""
    perm, count = _PARTITION_IMPLS[backend](keep, tensors, out)
    return perm, count


@partition_rows_op.register_fake
def _partition_rows_fake(keep, tensors, out, backend):
    return keep.new_empty(keep.shape, dtype=torch.int64), keep.new_empty((), dtype=torch.int64)


def _scatter_rows(dest, index, src, backend):
    _check_index_range(index, dest.shape[0])
    _SCATTER_IMPLS[backend](dest, index, src)


@torch.library.custom_op("earlyexit::scatter_rows", mutates_args=("dest",))
def scatter_rows_op(dest: torch.Tensor, index: torch.Tensor, src: torch.Tensor, backend: str) -> None:
    """Registered op: dest[index] = src in place; out-of-range indices raise (see _check_index_range)."""
    _scatter_rows(dest, index, src, backend)


@scatter_rows_op.register_fake
def _scatter_rows_fake(dest, index, src, backend):
    return None


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _eager(x):
    """Whether to call an implementation directly rather than through its registered op.

    The registered op's Python dispatch costs ~20 us per call, as much as moving a whole decode batch;
    plain eager calls skip it. Tracing (torch.compile, export) and tensor subclasses (fake, functional)
    go through the op, so that they see one opaque node.
    """
    return type(x) is torch.Tensor and not torch.compiler.is_compiling()


def _validate_keep_and_tensors(keep, tensors):
    check_tensor("keep", keep)
    check_dtype("keep", keep, (torch.bool,))
    check_dim("keep", keep, 1)
    n = keep.shape[0]
    for i, x in enumerate(tensors):
        name = f"tensors[{i}]"
        check_tensor(name, x)
        check_rows(name, x, n, "len(keep)")
        check_same_device("keep", keep, **{name: x})


def _storages(tensors):
    """Storage addresses of the non-empty tensors; empty when tracing (fake tensors have none)."""
    if torch.compiler.is_compiling():
        return set()
    return {x.untyped_storage().data_ptr() for x in tensors if x.numel() > 0}


def _validate_out(out, tensors):
    if not isinstance(out, (tuple, list)):
        raise ValueError(f"out: expected a tuple of tensors (one per input tensor), got {type(out).__name__}")
    if len(out) != len(tensors):
        raise ValueError(f"out: expected {len(tensors)} tensors (one per input tensor), got {len(out)}")
    for i, (o, x) in enumerate(zip(out, tensors)):
        name = f"out[{i}]"
        check_tensor(name, o)
        check_shape(name, o, x.shape)
        check_dtype(name, o, (x.dtype,))
        check_same_device(f"tensors[{i}]", x, **{name: o})
    inputs = _storages(tensors)
    for i, o in enumerate(out):
        if _storages([o]) & inputs:
            raise ValueError(f"out[{i}]: must not share memory with an input tensor (rows move between positions)")
        if any(_storages([o]) & _storages([p]) for p in out[:i]):
            raise ValueError(f"out[{i}]: must not share memory with another out tensor (each gets its own rows)")


def compact(keep, *tensors, backend="auto"):
    """Keep the rows where ``keep`` is True, in order, from every tensor at once.

    Args:
        keep: [N] bool.
        *tensors: each [N, ...] (any trailing shape, any dtype including bool and bf16, any strides),
            on keep's device.
        backend: "auto", "torch" (reference), "triton", "cpu" or "cuda" (C++ extension).

    Returns:
        (packed, index): packed is a tuple with ``tensors[i][keep]`` ([K, ...], contiguous, same
        dtype) for each tensor; index is int64 [K], the kept rows' original positions, ascending.
        At most one host synchronization (to learn K); none when keep is on the CPU.

    Raises:
        ValueError: keep not a 1-D bool tensor; a tensor whose dim 0 is not len(keep); devices differ.
        RuntimeError: the requested backend cannot run here.
    """
    _validate_keep_and_tensors(keep, tensors)
    impl = backends.resolve_preferred(backend, keep.device.type, _PREFERENCE)
    tensors = list(tensors)
    result = _COMPACT_IMPLS[impl](keep, tensors) if _eager(keep) else compact_op(keep, tensors, impl)
    return tuple(result[:-1]), result[-1]


def partition_rows(keep, *tensors, out=None, backend="auto"):
    """Reorder rows so the kept ones come first: no host synchronization, CUDA-graph capturable.

    Args:
        keep: [N] bool.
        *tensors: each [N, ...] (any trailing shape, dtype and strides), on keep's device.
        out: None, or a tuple of preallocated tensors shaped and typed like ``tensors`` (one per
            tensor, not sharing memory with the inputs); they are written and returned, and nothing
            is allocated for the parts (an out tensor whose trailing dims are not contiguous goes
            through a scratch copy).
        backend: "auto", "torch", "triton", "cpu" or "cuda".

    Returns:
        (parts, perm, count): parts[i] [N, ...] holds the kept rows of tensors[i] in original order,
        then the other rows in original order; perm int64 [N] is the original position of each
        output row; count is a 0-d int64 tensor on the device holding K (the kept rows are
        ``parts[i][:count]``).

    Raises:
        ValueError: as :func:`compact`, or an out tensor of the wrong number, shape, dtype or device.
        RuntimeError: the requested backend cannot run here.
    """
    _validate_keep_and_tensors(keep, tensors)
    if out is None:
        out = [torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in tensors]
    else:
        _validate_out(out, tensors)
    impl = backends.resolve_preferred(backend, keep.device.type, _PREFERENCE)
    tensors, out = list(tensors), list(out)
    if _eager(keep):
        perm, count = _PARTITION_IMPLS[impl](keep, tensors, out)
    else:
        perm, count = partition_rows_op(keep, tensors, out, impl)
    return tuple(out), perm, count


def scatter_rows(dest, index, src, *, backend="auto"):
    """``dest[index] = src`` in place: put computed rows back at their original positions.

    Args:
        dest: [M, ...] any dtype, trailing shape and strides; written in place.
        index: [K] int64 row positions in [0, M); with duplicates the row written there is unspecified
            (it may mix the sources, as ``index_copy_`` may).
        src: [K, ...] with dest's trailing shape and dtype, on dest's device.
        backend: "auto", "torch", "triton", "cpu" or "cuda".

    Returns:
        dest itself.

    Raises:
        ValueError: bad shapes, dtypes or devices; on the CPU, an index out of [0, M).
        RuntimeError: on a GPU, an index out of range trips a device-side assert (surfacing at the
            next synchronization, the call itself never synchronizes); nothing is written out of bounds.
    """
    check_tensor("dest", dest)
    check_tensor("index", index)
    check_tensor("src", src)
    if dest.dim() < 1:
        raise ValueError("dest: expected a tensor with rows in dim 0, got a 0-d tensor")
    check_dtype("index", index, (torch.int64,))
    check_dim("index", index, 1)
    check_shape("src", src, (index.shape[0], *dest.shape[1:]))
    check_dtype("src", src, (dest.dtype,))
    check_same_device("dest", dest, index=index, src=src)
    if _storages([dest]) & _storages([src]):
        raise ValueError("src: must not share memory with dest")
    impl = backends.resolve_preferred(backend, dest.device.type, _PREFERENCE)
    (_scatter_rows if _eager(dest) else scatter_rows_op)(dest, index, src, impl)
    return dest
