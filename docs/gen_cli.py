"""Generate docs/cli.md, the CLI reference: every ``nasx`` command's ``--help``, rendered by the Typer app
itself as plain text at a fixed width (no colours), so the reference is exactly what a user sees.

    python docs/gen_cli.py           # rewrite docs/cli.md
    python docs/gen_cli.py --check   # exit 1 if docs/cli.md differs from what the code renders

tests/test_docs.py fails when a command's help changed and docs/cli.md was not regenerated.
"""
from __future__ import annotations

import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import typer
from typer import rich_utils
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:                      # run as a script from a checkout
    sys.path.insert(0, str(REPO))

from nasxserve.cli import app  # noqa: E402

CLI_MD = REPO / "docs" / "cli.md"
WIDTH = 110                                        # the narrowest at which no help word is cut with '…'
REGENERATE = "python docs/gen_cli.py"
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# whatever the calling environment says, render for a plain 100-column terminal
_ENV = {"COLUMNS": str(WIDTH), "LINES": "50", "NO_COLOR": "1", "TERM": "dumb", "FORCE_COLOR": None,
        "PY_COLORS": None, "GITHUB_ACTIONS": None, "TERMINAL_WIDTH": None, "TTY_COMPATIBLE": None,
        "TTY_INTERACTIVE": None, "JUPYTER_COLUMNS": None, "JUPYTER_LINES": None}

HEADER = f"""# CLI reference

Every `nasx` command's `--help`, as the command prints it. This page is generated from the code
(`{REGENERATE}`); edit the help strings in `nasxserve/cli/`, not this page.
"""


def command_paths() -> list[tuple[str, ...]]:
    """Every command and command group of the app, depth first in the order ``nasx --help`` lists them."""
    root = typer.main.get_command(app)
    paths: list[tuple[str, ...]] = []

    def walk(cmd: Any, path: tuple[str, ...], parent: Any) -> None:
        paths.append(path)
        if hasattr(cmd, "list_commands"):                  # a group (Typer's, whichever click it builds on)
            ctx = cmd.context_class(cmd, info_name=path[-1] if path else "nasx", parent=parent)
            for name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, name)
                if sub is not None and not sub.hidden:
                    walk(sub, (*path, name), ctx)

    walk(root, (), None)
    return paths


@contextmanager
def _plain_rich() -> Iterator[None]:
    saved = rich_utils.MAX_WIDTH, rich_utils.FORCE_TERMINAL, rich_utils.COLOR_SYSTEM
    rich_utils.MAX_WIDTH, rich_utils.FORCE_TERMINAL, rich_utils.COLOR_SYSTEM = WIDTH, False, None
    try:
        yield
    finally:
        rich_utils.MAX_WIDTH, rich_utils.FORCE_TERMINAL, rich_utils.COLOR_SYSTEM = saved


def help_text(path: tuple[str, ...]) -> str:
    """``nasx PATH... --help`` as plain text, trailing spaces removed."""
    with _plain_rich():
        result = CliRunner().invoke(app, [*path, "--help"], prog_name="nasx", env=_ENV, color=False)
    if result.exit_code != 0:
        raise RuntimeError(f"nasx {' '.join(path)} --help exited {result.exit_code}: {result.output}")
    text = _ANSI.sub("", result.output)
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


def render() -> str:
    """The whole of docs/cli.md."""
    parts = [HEADER]
    for path in command_paths():
        name = " ".join(("nasx", *path))
        parts.append(f"## `{name}`\n\n```text\n{help_text(path)}\n```\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render()
    if "--check" in argv:
        if CLI_MD.read_text(encoding="utf-8") != text:
            print(f"{CLI_MD.relative_to(REPO)} is out of date: run {REGENERATE}", file=sys.stderr)
            return 1
        return 0
    CLI_MD.write_text(text, encoding="utf-8")
    print(f"wrote {CLI_MD.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
