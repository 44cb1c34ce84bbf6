"""Ops: validation, allocation, backend dispatch and torch.library registration."""

from earlyexit.ops.compaction import compact, partition_rows, scatter_rows
from earlyexit.ops.exit_check import ExitResult, exit_check

__all__ = ["ExitResult", "compact", "exit_check", "partition_rows", "scatter_rows"]
