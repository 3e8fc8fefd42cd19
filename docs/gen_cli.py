"""Generate docs/cli.md, the CLI reference: for every ``nasx`` command, its usage line, its help and a table
of its arguments and options, built from the Click command objects Typer makes of the app, the same objects
``--help`` prints. Nothing depends on how rich draws the help (boxes, wrapping, placeholders), so another
Typer or rich gives the same page.

    python docs/gen_cli.py           # rewrite docs/cli.md
    python docs/gen_cli.py --check   # exit 1 if docs/cli.md differs from what the code describes

tests/test_docs.py fails when a command's help changed and docs/cli.md was not regenerated, and checks that
every option and argument ``--help`` prints is on the page.
"""
from __future__ import annotations

import inspect
import re
import sys
import typing
from enum import Enum
from pathlib import Path
from typing import Any, Union
from collections.abc import Iterator

import typer

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:                      # run as a script from a checkout
    sys.path.insert(0, str(REPO))

from nasxserve.cli import app  # noqa: E402

CLI_MD = REPO / "docs" / "cli.md"
REGENERATE = "python docs/gen_cli.py"
ARGUMENTS, OPTIONS = "Arguments", "Options"       # Typer's titles of the unnamed panels

HEADER = f"""# CLI reference

Every `nasx` command: its usage line, its help, and its arguments and options with their values and
defaults, grouped as `--help` groups them. This page is generated from the code (`{REGENERATE}`); edit the
help strings in `nasxserve/cli/`, not this page.
"""

# the value a parameter of each Python type takes, in Click's classic names
TYPE_NAMES = {str: "TEXT", int: "INTEGER", float: "FLOAT", bool: "BOOLEAN", Path: "PATH"}
# what Markdown would read as markup: backslashes, code and emphasis marks, brackets, table pipes; an
# underscore only at a word's edge (inside a word, as in RUN_DIR, it is a letter to Markdown)
_MARKDOWN_SPECIAL = re.compile(r"([\\`*\[\]|]|(?<!\w)_|_(?!\w))")
_ENTITY = re.compile(r"&(?=#?\w+;)")


# ------------------------------------------------------------------------------------------ the commands

def walk() -> Iterator[tuple[tuple[str, ...], Any, Any]]:
    """(path, command, context) for the app and every command and group in it, depth first in the order
    ``nasx --help`` lists them; each context has its parents, so ``ctx.command_path`` is ``nasx data shapes``."""
    def visit(cmd: Any, path: tuple[str, ...], parent: Any) -> Iterator[tuple[tuple[str, ...], Any, Any]]:
        ctx = cmd.context_class(cmd, info_name=path[-1] if path else "nasx", parent=parent)
        yield path, cmd, ctx
        if hasattr(cmd, "list_commands"):                  # a group (Typer's, whichever Click it builds on)
            for name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, name)
                if sub is not None and not sub.hidden:
                    yield from visit(sub, (*path, name), ctx)

    yield from visit(typer.main.get_command(app), (), None)


def command_paths() -> list[tuple[str, ...]]:
    """Every command and command group of the app, as in :func:`walk`."""
    return [path for path, _, _ in walk()]


def heading(path: tuple[str, ...]) -> str:
    return f"## `{' '.join(('nasx', *path))}`"


def anchor(path: tuple[str, ...]) -> str:
    """The id MkDocs (Python-Markdown's toc) gives :func:`heading`."""
    return "-".join(("nasx", *path))


# ---------------------------------------------------------------------------------------------- text

def escape(text: str) -> str:
    """Prose for a Markdown paragraph or table cell, shown as written."""
    text = _MARKDOWN_SPECIAL.sub(r"\\\1", text)
    return _ENTITY.sub("&amp;", text).replace("<", "&lt;").replace(">", "&gt;")


def code(text: str) -> str:
    """A name in code type; one with a ``|`` (``RUN_DIR|BUNDLE``) as escaped text, since a table would
    split a code span at it."""
    return escape(text) if "|" in text else f"`{text}`"


def paragraphs(text: str | None) -> list[str]:
    """A help text's paragraphs (parted by blank lines), each with its whitespace made single spaces."""
    text = inspect.cleandoc(text or "").partition("\f")[0]
    return [" ".join(p.replace("\b", " ").split()) for p in re.split(r"\n\s*\n", text) if p.strip()]


def first_paragraph(text: str | None) -> str:
    found = paragraphs(text)
    return found[0] if found else ""


# ------------------------------------------------------------------------------------------ parameters

def _callback_hints(cmd: Any) -> dict[str, Any]:
    """The type annotations of the function behind a command (Typer wraps it, keeping ``__wrapped__``)."""
    if cmd.callback is None:
        return {}
    try:
        return typing.get_type_hints(inspect.unwrap(cmd.callback))
    except Exception:                                      # an annotation that cannot be resolved here
        return {}


def _bare(annotation: Any) -> tuple[Any, bool]:
    """``Optional[X]`` -> X, ``list[X]`` -> X; and whether it was a list."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin is Union or (origin is not None and type(None) in typing.get_args(annotation)):
        return _bare(args[0]) if len(args) == 1 else (annotation, False)
    if origin in (list, tuple, set) and args:
        return args[0], True
    return annotation, False


def _limit(param: Any, name: str) -> Any:
    """A numeric bound: Typer's own Click keeps it on the parameter, Click on its IntRange/FloatRange type."""
    value = getattr(param, name, None)
    if value is None:
        value = getattr(getattr(param, "type", None), name, None)
    return value


def _is_flag(param: Any) -> bool:
    return bool(getattr(param, "is_flag", False)) and not getattr(param, "count", False)


def value_text(param: Any, hints: dict[str, Any]) -> str:
    """What the parameter takes: its metavar, else its type (``INTEGER``, ``PATH``) with its range; empty
    for a flag."""
    if param.param_type_name == "option" and _is_flag(param):
        return ""
    if param.metavar and param.param_type_name == "option":
        value = param.metavar
    else:
        annotation, _ = _bare(hints.get(param.name, str))
        value = TYPE_NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)).upper())
    low, high = _limit(param, "min"), _limit(param, "max")
    if low is not None and high is not None:
        value += f" ({low} to {high})"
    elif low is not None:
        value += f" (>= {low})"
    elif high is not None:
        value += f" (<= {high})"
    return value


def default_text(param: Any, ctx: Any) -> str:
    """The default as ``--help`` shows it (``[default: ...]``), ``required``, or nothing."""
    if param.required:
        return "required"
    show = getattr(param, "show_default", None)
    if isinstance(show, str):
        return f"({show})"
    default = param.get_default(ctx, call=False)
    if default is None or not (show or ctx.show_default):
        return ""
    if callable(default):
        return "(dynamic)"
    if _is_flag(param) and param.secondary_opts:           # --batching/--no-batching: the side it is on
        return (param.opts if default else param.secondary_opts)[0].lstrip("-")
    if _is_flag(param) and not default:
        return ""
    if isinstance(default, (list, tuple)):
        return ", ".join(str(d) for d in default)
    if isinstance(default, Enum):
        return str(default.value)
    return str(default)


def names_text(param: Any) -> str:
    """``-o``, ``--out``; ``--lease`` / ``--no-lease``; an argument's metavar."""
    if param.param_type_name == "argument":
        return code(param.metavar or param.name.upper())

    def side(opts: list[str]) -> str:
        ordered = sorted(opts, key=lambda o: (o.startswith("--"), o))       # short names first
        return ", ".join(code(o) for o in ordered)

    return " / ".join(side(opts) for opts in (param.opts, param.secondary_opts) if opts)


def panels(cmd: Any, ctx: Any) -> list[tuple[str, list[Any]]]:
    """The command's parameters in the help's panels and order: the arguments, then the unnamed options
    panel, then the named panels in the order their first option comes."""
    grouped: dict[tuple[int, str], list[Any]] = {}
    for param in cmd.get_params(ctx):
        if getattr(param, "hidden", False):
            continue
        is_argument = param.param_type_name == "argument"
        default = ARGUMENTS if is_argument else OPTIONS
        panel = getattr(param, "rich_help_panel", None) or default
        grouped.setdefault((0 if is_argument else 1, panel), []).append(param)
    # within arguments and within options the unnamed panel leads; dicts keep first appearance otherwise
    keys = sorted(grouped, key=lambda k: (k[0], k[1] not in (ARGUMENTS, OPTIONS)))
    return [(panel, grouped[(kind, panel)]) for kind, panel in keys]


def param_table(title: str, params: list[Any], hints: dict[str, Any], ctx: Any) -> list[str]:
    rows = [f"| {escape(title)} | Value | Default | Description |", "|---|---|---|---|"]
    for param in params:
        value = value_text(param, hints)
        default = default_text(param, ctx)
        rows.append(f"| {names_text(param)} | {code(value) if value else ''} | "
                    f"{code(default) if default and default != 'required' else default} | "
                    f"{escape(' '.join(paragraphs(getattr(param, 'help', None))))} |")
    return rows


# ------------------------------------------------------------------------------------------------ page

def section(path: tuple[str, ...], cmd: Any, ctx: Any) -> str:
    """One command's part of the page."""
    usage = " ".join([ctx.command_path, *cmd.collect_usage_pieces(ctx)])
    lines = [heading(path), "", "```text", usage, "```", ""]
    for paragraph in paragraphs(cmd.help):
        lines += [escape(paragraph), ""]
    hints = _callback_hints(cmd)
    for title, params in panels(cmd, ctx):
        lines += [*param_table(title, params, hints, ctx), ""]
    if hasattr(cmd, "list_commands"):
        lines += ["| Commands | Description |", "|---|---|"]
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                sub_path = (*path, name)
                lines.append(f"| [`{' '.join(('nasx', *sub_path))}`](#{anchor(sub_path)}) | "
                             f"{escape(first_paragraph(sub.short_help or sub.help))} |")
        lines.append("")
    return "\n".join(lines)


def render() -> str:
    """The whole of docs/cli.md."""
    return "\n".join([HEADER, *(section(path, cmd, ctx) for path, cmd, ctx in walk())]).rstrip("\n") + "\n"


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
