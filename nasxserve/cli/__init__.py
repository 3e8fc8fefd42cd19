"""The ``nasx`` command line."""
from __future__ import annotations

import sys

from nasxserve.cli.app import app
from nasxserve.errors import NasxError


def main() -> None:
    """Entry point: user errors print one line and exit non-zero, never a traceback."""
    try:
        app(standalone_mode=False)
    except NasxError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # click's usage errors come through here with standalone_mode=False
        import click
        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(130)
        raise


__all__ = ["app", "main"]
