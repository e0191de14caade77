"""Exit codes, the error the user must fix (exit code 2), and hints for errors whose message says no remedy."""

from __future__ import annotations

import os

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """Something the user must fix in the command line or its files; exit code 2."""


def _hint(error: BaseException) -> str:
    """One sentence on what to do about errors whose message does not say it already."""
    if isinstance(error, ModuleNotFoundError):
        extras = {"langdetect": "selfgen", "matplotlib": "report", "lm_eval": "eval", "gguf": "demo"}
        extra = extras.get((error.name or "").split(".")[0])
        if extra:
            return f" Install it with: pip install 'hf-recon-prune[{extra}]'"
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    text = str(error).lower()
    if offline and any(word in text for word in ("offline", "connect", "internet", "resolve", "hub")):
        return " HF_HUB_OFFLINE is set: only local folders, cached models and the offline default work."
    if "out of memory" in text or type(error).__name__ == "MemoryBudgetError":
        return (" Try --stream-location cpu (or disk), a smaller --forward-batch-size / --br-batch-size, fewer "
                "--num-samples, or a larger --max-device-memory if the device has room.")
    return ""
