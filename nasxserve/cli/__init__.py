"""The ``nasx`` command line."""
from __future__ import annotations

import sys

from nasxserve.cli.app import app
from nasxserve.errors import NasxError


def main() -> None:
    """Entry point: usage errors are Typer's; user errors print one line and exit non-zero, no traceback."""
    try:
        app()
    except NasxError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


__all__ = ["app", "main"]
