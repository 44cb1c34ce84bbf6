"""earlyexit: fused kernels for early-exit LLM inference.

Public API: :func:`exit_check` and :class:`ExitResult` (fused exit-head confidence check), the
statistics contract behind it: :func:`exit_stats`, :func:`merge_exit_stats`, :func:`finalize_exit_stats`
and :class:`ExitStats` (vocabulary slices and shards; :mod:`earlyexit.distributed` for process groups),
:func:`state_similarity` (cosine of consecutive layers' hidden states per row: CALM's "state" confidence),
:func:`build_info` (what is built and which backends run here);
:class:`ExitHead` (the exit check as an ``nn.Module`` over a model's head, by reference, for any PyTorch decoder);
ragged batch compaction: :func:`compact`, :func:`partition_rows`, :func:`scatter_rows`;
:class:`EarlyExitLM` (early-exit generation for HuggingFace models; needs transformers, imported lazily);
exit heads for models never trained to exit: :func:`train_exit_adapters`, :class:`ExitAdapters`, :func:`calibrate`;
a measured cost model for cost-aware calibration: :func:`measure_costs`, :class:`CostModel` (need transformers,
imported lazily);
position schedules (SkipDecode): :class:`SkipDecodeSchedule` (layers per generated position, for
``EarlyExitLM(..., schedule=)``) and :func:`calibrate_schedule` (the steepest one meeting an agreement target).
"""

__version__ = "0.1.0"

from earlyexit.exit_head import ExitHead  # noqa: E402
from earlyexit.ops import (  # noqa: E402
    ExitResult,
    ExitStats,
    compact,
    exit_check,
    exit_stats,
    finalize_exit_stats,
    merge_exit_stats,
    partition_rows,
    scatter_rows,
    state_similarity,
)
from earlyexit.ops.backends import build_info  # noqa: E402
from earlyexit.schedule import SkipDecodeSchedule  # noqa: E402
from earlyexit.tuning.adapters import ExitAdapters, train_exit_adapters  # noqa: E402
from earlyexit.tuning.calibrate import calibrate  # noqa: E402
from earlyexit.tuning.schedule_calibration import calibrate_schedule  # noqa: E402

__all__ = [
    "CostModel",
    "EarlyExitLM",
    "ExitAdapters",
    "ExitHead",
    "ExitResult",
    "ExitStats",
    "SkipDecodeSchedule",
    "build_info",
    "calibrate",
    "calibrate_schedule",
    "compact",
    "exit_check",
    "exit_stats",
    "finalize_exit_stats",
    "measure_costs",
    "merge_exit_stats",
    "partition_rows",
    "scatter_rows",
    "state_similarity",
    "train_exit_adapters",
    "__version__",
]


def __getattr__(name):
    # Lazy: importing earlyexit must not require transformers.
    if name == "EarlyExitLM":
        from earlyexit.hf import EarlyExitLM

        return EarlyExitLM
    if name in ("CostModel", "measure_costs"):
        from earlyexit.tuning import costs

        return getattr(costs, name)
    raise AttributeError(f"module 'earlyexit' has no attribute {name!r}")
