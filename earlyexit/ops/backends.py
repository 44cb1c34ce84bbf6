"""Which backends can run here, why not, and which one "auto" picks.

Availability is decided once at import time (not per call) so that ``exit_check`` stays
traceable by torch.compile: dynamo then sees plain dictionary lookups, never an import.
"""

import importlib
import os
import re

import torch

#: Every backend name the ops accept, besides "auto".
BACKENDS = ("torch", "triton", "cpu", "cuda")

# Triton reads TRITON_INTERPRET when a kernel is decorated, so the value at import is the one in force.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _probe_triton():
    try:
        triton = importlib.import_module("triton")
    except Exception as e:  # ImportError, or a broken install raising something else
        return None, f"triton is not importable ({type(e).__name__}: {e})"
    return triton.__version__, None


def interpreter_reason(triton_version, numpy_version):
    """Why the Triton interpreter of ``triton_version`` cannot run beside ``numpy_version``, or None.

    Triton before 3.7 converts 1-element numpy arrays to Python ints inside the interpreter (program
    ids, loop bounds); numpy 2.4 turned that long-deprecated conversion into a TypeError, so every
    kernel fails at its first loop. The GPU compiler is not affected.
    """
    if _release(triton_version) < (3, 7) and _release(numpy_version) >= (2, 4):
        return (
            f"triton {triton_version}'s interpreter fails on numpy {numpy_version} (a TypeError in every "
            "kernel): use numpy<2.4 or triton>=3.7"
        )
    return None


def _release(version):
    """(major, minor) of a version string such as "3.6.0+git1234" or "2.4.0rc1"."""
    return tuple(int(re.match(r"\d+", part).group()) for part in version.split(".")[:2])


#: What the Python side calls in the extension: an older build (an editable install whose csrc changed
#: since) lacks some of it, and is then reported as out of date rather than crashing at the first call.
_EXTENSION_OPS = {
    "exit_check": "float softcap",
    "exit_stats": "float softcap",
    "compact": "",
    "partition_rows": "",
    "scatter_rows": "",
    "state_similarity": "",
}


def _probe_extension():
    try:
        ext = importlib.import_module("earlyexit._C")
    except ImportError as e:
        return None, f"the C++ extension earlyexit._C is not built ({e})"
    for op, needs in _EXTENSION_OPS.items():
        packet = getattr(torch.ops.earlyexit_C, op, None)
        if packet is None or needs not in str(packet.default._schema):
            return None, f"the C++ extension earlyexit._C is out of date (no {op}({needs}...)): rebuild it"
    return ext, None


TRITON_VERSION, _TRITON_REASON = _probe_triton()
_INTERPRETER_REASON = (
    interpreter_reason(TRITON_VERSION, importlib.import_module("numpy").__version__)
    if TRITON_INTERPRET and TRITON_VERSION
    else None
)
CUDA_AVAILABLE = torch.cuda.is_available()
#: The imported earlyexit._C module (its import registers torch.ops.earlyexit_C), or None if not built.
EXTENSION, _EXT_REASON = _probe_extension()


def _compiled_cuda_archs():
    """CUDA architectures compiled into earlyexit._C, read from the binary (nvcc's __CUDA_ARCH_LIST__)."""
    if EXTENSION is None:
        return []
    return [a for a in EXTENSION.cuda_archs.split(";") if a]


CUDA_ARCHS = _compiled_cuda_archs()
#: How the C++ CPU kernel multiplies a bf16 head here: "avx512bf16" (bf16-pair dot products, any row count)
#: or "widen" (each weight widened to float32; up to 8 rows, a float32 GEMM above); None without it.
CPU_BF16_DOTS = getattr(EXTENSION, "cpu_bf16_dots", None)


def arch_reason(archs, capabilities):
    """Why CUDA code compiled for ``archs`` cannot run on every GPU of ``capabilities``, or None.

    archs: compute capabilities as strings ("80", "90"), as :data:`CUDA_ARCHS`; setup.py compiles machine
    code for each and PTX for the newest. capabilities: (major, minor) per visible GPU. Machine code runs
    on a GPU of its major version and an equal or newer minor one; PTX is compiled by the driver for any
    GPU at least as new.
    """
    nums = [int(a) for a in archs]
    for i, (major, minor) in enumerate(capabilities):
        if not any(a // 10 == major and a % 10 <= minor for a in nums) and major * 10 + minor < max(nums):
            return (
                f"the C++ extension has code for sm_{', sm_'.join(archs)} only, none that GPU {i} (sm_{major}{minor})"
                f" can run: rebuild with EARLYEXIT_CUDA_ARCHS including {major}{minor}"
            )
    return None


_GPU_ARCH_REASON = []  # arch_reason of this build and the visible GPUs, once known


def _gpu_arch_reason():
    # Found on the first eager call (reading device capabilities initializes CUDA, which an import must not);
    # a trace before any eager call takes the GPUs as runnable, and the kernel launch itself would say otherwise.
    if not _GPU_ARCH_REASON:
        if torch.compiler.is_compiling():
            return None
        caps = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
        _GPU_ARCH_REASON.append(arch_reason(CUDA_ARCHS, caps))
    return _GPU_ARCH_REASON[0]


def unavailable_reason(backend, device_type):
    """Why ``backend`` cannot run on tensors of ``device_type`` ("cpu"/"cuda"), or None if it can."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}"
    if device_type == "cuda" and not CUDA_AVAILABLE:
        return "no CUDA device is visible to torch"
    if backend == "torch":
        return None
    if backend == "triton":
        if _TRITON_REASON:
            return _TRITON_REASON
        if device_type == "cuda":
            return None
        if device_type == "cpu":
            if not TRITON_INTERPRET:
                return "triton runs on CPU tensors only under TRITON_INTERPRET=1 (set before import)"
            return _INTERPRETER_REASON
        return f"triton does not support device type {device_type!r}"
    if backend == "cpu":
        if EXTENSION is None:
            return _EXT_REASON
        if device_type != "cpu":
            return f"backend 'cpu' needs CPU tensors, got {device_type!r}"
        return None
    if backend == "cuda":
        if EXTENSION is None:
            return _EXT_REASON
        if not CUDA_ARCHS:
            return "the C++ extension was built without CUDA kernels"
        if device_type != "cuda":
            return f"backend 'cuda' needs CUDA tensors, got {device_type!r}"
        return _gpu_arch_reason()


def resolve(backend, device_type):
    """Map a requested backend (possibly "auto") to a concrete one that can run, or raise.

    Raises:
        ValueError: ``backend`` is not a known name.
        RuntimeError: the backend is known but cannot run here; the message says why.
    """
    if backend == "auto":
        return auto_backend(device_type)
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected 'auto' or one of {BACKENDS}, got {backend!r}")
    reason = unavailable_reason(backend, device_type)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} cannot run on {device_type!r} tensors here: {reason}")
    return backend


def auto_backend(device_type):
    """The backend "auto" picks for a device: the fastest one that can run.

    CPU: the C++ kernel when built. Measured (benchmarks/results/cpu_exit_check.md, d=576, V=49152,
    float32, 2 cores) faster than the reference at N = 1, 8 and 64; the Triton interpreter is for
    testing, never picked. CUDA: the Triton kernel. The CUDA extension kernel has not been timed on a
    GPU yet (built and unit-tested on CPU-only machines), so it is only used when asked for by name
    until benchmarks/bench_exit_check.py shows where it wins.
    """
    if device_type == "cuda" and unavailable_reason("triton", "cuda") is None:
        return "triton"
    if device_type == "cpu" and unavailable_reason("cpu", "cpu") is None:
        return "cpu"
    return "torch"


def build_info():
    """A dict describing this install: versions, compiled parts, and each backend's availability.

    Keys: ``version``, ``torch``, ``torch_cuda``, ``triton`` (None if missing), ``triton_interpret``,
    ``cpu_ext`` (bool), ``cuda_archs`` (list of str, empty if none), ``cpu_bf16_dots`` (:data:`CPU_BF16_DOTS`),
    ``cuda_available``, and
    ``backends``: ``{name: {"cpu": reason_or_None, "cuda": reason_or_None}}`` where None means it runs.
    """
    from earlyexit import __version__

    return {
        "version": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": TRITON_VERSION,
        "triton_interpret": TRITON_INTERPRET,
        "cpu_ext": EXTENSION is not None,
        "cuda_archs": list(CUDA_ARCHS),
        "cpu_bf16_dots": CPU_BF16_DOTS,
        "cuda_available": CUDA_AVAILABLE,
        "backends": {name: {dev: unavailable_reason(name, dev) for dev in ("cpu", "cuda")} for name in BACKENDS},
    }


def resolve_preferred(backend, device_type, preference):
    """Like :func:`resolve`, but "auto" picks the first backend of ``preference`` that can run here.

    ``preference`` maps a device type to an ordered tuple of backend names; the reference "torch"
    is the last resort. Ops whose best backend differs from the exit check's use this.
    """
    if backend != "auto":
        return resolve(backend, device_type)
    for name in preference.get(device_type, ()):
        if unavailable_reason(name, device_type) is None:
            return name
    return "torch"
