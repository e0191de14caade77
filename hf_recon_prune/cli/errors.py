"""Exit codes, the error the user must fix (exit code 2), hints for errors whose message says no remedy, and the
Hub token: where ``push`` reads it, and how every message and log line is kept free of it (``Redaction``)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any, Iterable, Iterator, Optional

#: What a token is replaced with wherever it would be printed or logged.
REDACTED = "<redacted token>"
#: Environment variables huggingface_hub reads a token from.
TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """Something the user must fix in the command line or its files; exit code 2."""


#: The flag that sets each value a self-generation failure may advise changing, by its name in
#: ``generate_self_calibration`` (the generate-calibration command) and in PruningConfig (prune).
SELF_GENERATION_FLAGS = {name: "--self-gen-" + argument.replace("_", "-")
                         for argument in ("greedy_tokens", "language", "stop_at_eos")
                         for name in (argument, "self_gen_" + argument)}


def in_flag_terms(error: Exception) -> Exception:
    """An error whose advice names Python arguments, worded with the CLI's flags (others are returned as they are)."""
    if type(error).__name__ != "SelfGenerationError" or not hasattr(error, "renamed"):  # no torch import here
        return error
    renamed = error.renamed(SELF_GENERATION_FLAGS)
    worded = [(flag, text.replace(f"{flag}=False", f"{flag} false").replace(f"{flag}=None", f"{flag} none"))
              for flag, text in renamed.remedies]
    return type(error)(renamed.problem, worded)


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


# ---------------------------------------------------------------------------------------------------- the token
def push_token(args: Any) -> Optional[str]:
    """The token ``push`` passes on: ``--token-file``'s, else ``--token``'s (with a warning: it shows in ``ps``), else
    None (huggingface_hub then reads HF_TOKEN or the cached login)."""
    if getattr(args, "token_file", None):
        token = read_token_file(args.token_file)
        if getattr(args, "token", None):
            raise UsageError("give either --token-file or --token, not both")
        return token
    if getattr(args, "token", None):
        print("warning: --token shows the token in the process list (ps) and the shell history; use the HF_TOKEN "
              "variable, `hf auth login` or --token-file instead", file=sys.stderr)
        return args.token
    return None


def read_token_file(path: str) -> str:
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as handle:
            token = handle.read().strip()
    except OSError as error:
        raise UsageError(f"--token-file {path}: cannot be read ({error.strerror or error})") from None
    if not token or "\n" in token:
        raise UsageError(f"--token-file {path}: must hold the token alone, on one line")
    return token


def known_tokens(args: Any) -> list[str]:
    """Every token this command may see: from its flags, the environment and (for ``push``) the cached login."""
    tokens = [getattr(args, "token", None)]
    if getattr(args, "token_file", None):
        with contextlib.suppress(UsageError):
            tokens.append(read_token_file(args.token_file))
    tokens += [os.environ.get(name) for name in TOKEN_VARIABLES]
    if getattr(args, "command", None) == "push":
        with contextlib.suppress(Exception):
            from huggingface_hub import get_token

            tokens.append(get_token())
    return sorted({t.strip() for t in tokens if isinstance(t, str) and len(t.strip()) >= 8}, key=len, reverse=True)


class Redaction:
    """Cuts known tokens out of text, and (as a context manager) out of every log record created meanwhile, its
    formatted exception included, whatever the handler or the verbosity."""

    def __init__(self, tokens: Iterable[str]):
        self.tokens = [t for t in tokens if t]

    def __call__(self, text: Any) -> str:
        text = str(text)
        for token in self.tokens:
            text = text.replace(token, REDACTED)
        return text

    @contextlib.contextmanager
    def logging(self) -> Iterator[None]:
        if not self.tokens:
            yield
            return
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            record.msg, record.args = self(record.getMessage()), ()
            if record.exc_info:
                record.exc_text = self(logging.Formatter().formatException(record.exc_info))
            if record.stack_info:
                record.stack_info = self(record.stack_info)
            return record

        logging.setLogRecordFactory(factory)
        try:
            yield
        finally:
            logging.setLogRecordFactory(previous)
