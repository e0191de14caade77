"""MkDocs hook: replace ``<!-- cli-help: COMMAND -->`` markers with the live ``hf-recon-prune COMMAND --help``.

The command-line reference is rendered from the parser itself, so it cannot drift from the code. Importing
``hf_recon_prune.cli`` loads neither torch nor transformers. An unknown command is a build error.
"""

from __future__ import annotations

import contextlib
import io
import os
import re

MARKER = re.compile(r"<!--\s*cli-help:\s*([\w-]*)\s*-->")


def _help(command: str) -> str:
    from hf_recon_prune.cli import build_parser

    parser = build_parser()
    if command:
        choices = parser._subparsers._group_actions[0].choices
        if command not in choices:
            raise ValueError(f"cli.md asks for the help of an unknown command {command!r}; known: {sorted(choices)}")
        parser = choices[command]
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal width; fix it so the page is stable
    try:
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            parser.print_help()
    finally:
        if previous is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous
    return buffer.getvalue().rstrip()


def on_page_markdown(markdown, page, config, files):
    return MARKER.sub(lambda match: "```text\n" + _help(match.group(1)) + "\n```", markdown)
