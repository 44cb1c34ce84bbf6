"""Compile C++ test harnesses against csrc/ on the host (no GPU, no torch headers)."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = shutil.which(os.environ.get("CXX", "c++"))


def build_harness(out, sources, *, shared=False):
    """Compile ``sources`` (paths relative to the repository root) with csrc/ on the include path.

    Writes an executable, or a shared library for ctypes when ``shared``, to ``out`` and returns its
    path as a string. Skips the calling test when no C++ compiler is installed.
    """
    if CXX is None:
        pytest.skip("no C++ compiler")
    flags = ["-shared", "-fPIC"] if shared else []
    srcs = [os.path.join(ROOT, s) for s in sources]
    subprocess.run(
        [CXX, "-O2", "-std=c++17", *flags, "-I", os.path.join(ROOT, "csrc"), *srcs, "-o", str(out)], check=True
    )
    return str(out)
