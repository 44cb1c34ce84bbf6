"""earlyexit: fused kernels for early-exit LLM inference.

Public API: :func:`exit_check` and :class:`ExitResult` (fused exit-head confidence check),
:func:`build_info` (what is built and which backends run here);
ragged batch compaction: :func:`compact`, :func:`partition_rows`, :func:`scatter_rows`.
"""

__version__ = "0.1.0"

from earlyexit.backends import build_info  # noqa: E402
from earlyexit.ops import ExitResult, compact, exit_check, partition_rows, scatter_rows  # noqa: E402

__all__ = [
    "ExitResult",
    "build_info",
    "compact",
    "exit_check",
    "partition_rows",
    "scatter_rows",
    "__version__",
]
