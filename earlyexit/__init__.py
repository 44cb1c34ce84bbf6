"""earlyexit: fused kernels for early-exit LLM inference.

Public API: :func:`exit_check` and :class:`ExitResult` (fused exit-head confidence check),
:func:`build_info` (what is built and which backends run here).
"""

__version__ = "0.1.0"

from earlyexit.backends import build_info  # noqa: E402
from earlyexit.ops import ExitResult, exit_check  # noqa: E402

__all__ = ["ExitResult", "build_info", "exit_check", "__version__"]
