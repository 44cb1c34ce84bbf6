"""Ops: validation, allocation, backend dispatch and torch.library registration."""

from earlyexit.ops.exit_check import ExitResult, exit_check

__all__ = ["ExitResult", "exit_check"]
