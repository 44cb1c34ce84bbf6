"""HuggingFace transformers integration: :class:`EarlyExitLM` (needs the ``hf`` extra)."""

try:
    import transformers  # noqa: F401
except ModuleNotFoundError as e:
    raise ModuleNotFoundError(
        "earlyexit.hf (EarlyExitLM) needs transformers: pip install -e '.[hf]' (or run make test / make demo)"
    ) from e

from earlyexit.hf.draft_policy import DraftPolicy  # noqa: E402
from earlyexit.hf.early_exit_lm import EarlyExitLM  # noqa: E402
from earlyexit.hf.generate import GenerateOutput  # noqa: E402

__all__ = ["DraftPolicy", "EarlyExitLM", "GenerateOutput"]
