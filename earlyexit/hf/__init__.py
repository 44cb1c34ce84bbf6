"""HuggingFace transformers integration: :class:`EarlyExitLM` (needs the ``hf`` extra)."""

from earlyexit.hf.early_exit_lm import EarlyExitLM
from earlyexit.hf.generate import GenerateOutput

__all__ = ["EarlyExitLM", "GenerateOutput"]
