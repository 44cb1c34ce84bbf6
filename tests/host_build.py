"""Compile C++ test harnesses against csrc/ on the host (no GPU, no torch headers)."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = shutil.which(os.environ.get("CXX", "c++"))


def build_harness(out, sources, *, shared=False, includes=(), flags=("-O2",)):
    """Compile ``sources`` (paths relative to the repository root) with csrc/ on the include path.

    Writes an executable, or a shared library for ctypes when ``shared``, to ``out`` and returns its
    path as a string. includes: more include folders (relative to the root), searched before csrc/;
    flags: the compiler flags (optimization, sanitizers). Skips the calling test when no C++ compiler
    is installed.
    """
    if CXX is None:
        pytest.skip("no C++ compiler")
    kind = ["-shared", "-fPIC"] if shared else []
    dirs = [arg for d in (*includes, "csrc") for arg in ("-I", os.path.join(ROOT, d))]
    srcs = [os.path.join(ROOT, s) for s in sources]
    subprocess.run([CXX, *flags, "-std=c++17", *kind, *dirs, *srcs, "-o", str(out)], check=True)
    return str(out)
