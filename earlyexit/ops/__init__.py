"""The op layer: validation, allocation, backend dispatch, torch.library registration, the pure-PyTorch
references (:mod:`earlyexit.ops.reference`), which backends run here (:mod:`earlyexit.ops.backends`) and
the exit measures (:mod:`earlyexit.ops.measures`); the hidden-state similarity
(:mod:`earlyexit.ops.state_similarity`). Nothing here knows of models."""

from earlyexit.ops.compaction import compact, partition_rows, scatter_rows
from earlyexit.ops.exit_check import exit_check
from earlyexit.ops.exit_stats import exit_stats, finalize_exit_stats, merge_exit_stats
from earlyexit.ops.exit_types import ExitResult, ExitStats
from earlyexit.ops.state_similarity import state_similarity

__all__ = [
    "ExitResult",
    "ExitStats",
    "compact",
    "exit_check",
    "exit_stats",
    "finalize_exit_stats",
    "merge_exit_stats",
    "partition_rows",
    "scatter_rows",
    "state_similarity",
]
