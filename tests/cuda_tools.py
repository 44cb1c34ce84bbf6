"""Paths of the CUDA binary utilities the CPU-only tests use to inspect GPU code (no GPU needed)."""

import os
import shutil


def cuobjdump():
    """cuobjdump from Triton's bundle or the CUDA toolkit, or None when neither is installed."""
    try:
        import triton

        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(bundled):
            return bundled
    except ImportError:
        pass
    return shutil.which("cuobjdump")
