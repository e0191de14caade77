"""Console script ``hf-recon-prune``: prune, eval, generate-calibration, push, info.

Every PruningConfig field is a flag of ``prune`` with the same name (``--num-samples`` for ``num_samples``); lists
are comma-separated (``--reconstruction lr,br,gp``) and ``none`` clears an optional value. ``--config FILE`` starts
from a saved config (a saved model folder, its config.json, or a bare PruningConfig JSON); flags override its values
before validation, and an error in a value from the file names the file and the field.

Exit codes: 0 success; 2 bad arguments or configuration (nothing was run, or the message names the flag to fix);
1 a failure while running (the message says what failed and what to try); 130 interrupted.

No message, traceback (``-v``) or log line shows a Hub token: every token the command may see (its flags, HF_TOKEN,
the cached login for ``push``) is replaced by ``<redacted token>`` (``errors.Redaction``).
"""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Optional, Sequence

from .arguments import DEFAULT_EVAL_SEQ_LEN, EPILOG, FIELD_HELP, _config_from_args, build_parser
from .commands import COMMANDS, DEFAULT_MODEL_LABEL
from .errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    Redaction,
    UsageError,
    _hint,
    in_flag_terms,
    known_tokens,
)
from .summary import summary_table

__all__ = ["main", "build_parser", "summary_table", "COMMANDS", "UsageError", "FIELD_HELP", "EPILOG",
           "DEFAULT_EVAL_SEQ_LEN", "DEFAULT_MODEL_LABEL", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE", "EXIT_INTERRUPTED",
           "_config_from_args"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    redact = Redaction(known_tokens(args))
    with redact.logging():
        return _run(args, redact)


def _run(args, redact: Redaction) -> int:
    prefix = f"hf-recon-prune {args.command}"

    def report(message: str, with_traceback: bool) -> None:
        if with_traceback:
            print(redact(traceback.format_exc()), end="", file=sys.stderr)
        print(redact(message), file=sys.stderr)

    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"\n{prefix}: interrupted (saving is atomic: no half-written folder was left)", file=sys.stderr)
        if getattr(args, "checkpoint_dir", None):
            print(f"{prefix}: the same command with --resume continues from the last checkpoint in "
                  f"{args.checkpoint_dir}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except UsageError as error:
        report(f"{prefix}: error: {error}", False)
        return EXIT_USAGE
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as error:
        report(f"{prefix}: error: {error}{_hint(error)}", args.verbose)
        return EXIT_USAGE
    except Exception as error:  # OSError, RuntimeError, ImportError and anything unexpected: exit 1, redacted
        error = in_flag_terms(error)
        if not args.verbose:
            print("(run with -v for the traceback)", file=sys.stderr)
        report(f"{prefix}: failed: {type(error).__name__}: {error}{_hint(error)}", args.verbose)
        return EXIT_FAILURE
