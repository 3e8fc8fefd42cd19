"""Where the commands print their results: stdout, at the terminal's width on a terminal and unwrapped
when stdout is a file or a pipe (``nasx evaluate RUN > eval.md``, ``nasx predict ... | tee log``), where a
line broken at 80 columns would break a markdown table or a path."""
from __future__ import annotations

import sys

from rich.console import Console

# wide enough that no table or line of ours is wrapped; rich sizes a table to its content, not to this
UNWRAPPED_WIDTH = 10_000


def stdout_console() -> Console:
    """A console on the current stdout, made when needed so that it sees where stdout goes now."""
    console = Console()
    return console if console.is_terminal else Console(width=UNWRAPPED_WIDTH)


def print_text(text: str) -> None:
    """Text that must reach stdout as it is (markdown, a report): no wrapping, no markup, no highlighting;
    a terminal folds long lines itself."""
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()
