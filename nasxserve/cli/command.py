"""The command classes every ``nasx`` command and group is built with, so the help reads the same whatever
Typer renders it: flags without a value placeholder, arguments named in capitals in the usage line, help
paragraphs without the hard line breaks of the docstrings they come from, and ``--help`` in the panel with
the output options when a command groups its options into panels.

Only plain Click attributes are touched (``metavar``, ``help``, ``rich_help_panel``, ``params``), so the
classes work with the Typer that builds on Click as with the one that carries its own copy.
"""
from __future__ import annotations

import inspect
from typing import Any

from typer.core import TyperCommand, TyperGroup

# Panel names shared by the commands that group their options (the help lists panels in the order their
# first option appears in the command's signature, so the signatures put the most-used panel first).
DATA = "Data"
RUN = "Run & output"
OUTPUT = "Output"
SCHEDULE = "Schedule"
METHOD = "Method"
BOXES = "Explanation boxes (not in the papers)"
SEARCH = "Search"
MEASURES = "Measures"
HARDWARE = "Hardware"

# where --help goes in a command whose every option has a panel (else it would open an "Options" panel
# of its own, printed before all the others)
HELP_PANELS = (RUN, OUTPUT)


def unwrap_help(text: str | None) -> str | None:
    """A help text with each paragraph on one line: the line breaks a docstring or a wrapped string has
    inside a paragraph are spaces, blank lines still part paragraphs, and a paragraph that starts with
    ``\\b`` (Click's "keep my line breaks") is kept as written. Whatever follows ``\\f`` is dropped."""
    if not text:
        return text
    text = inspect.cleandoc(text).partition("\f")[0]
    paragraphs = [p.strip("\n") for p in text.split("\n\n")]
    return "\n\n".join(p if p.startswith("\b") else " ".join(p.split()) for p in paragraphs if p.strip())


def argument_metavar(param: Any) -> str:
    """An argument's name in the usage line and the help: its metavar, else its name in capitals (with
    ``...`` when it takes several values)."""
    if param.metavar:
        return param.metavar
    return param.name.upper() + ("..." if param.nargs != 1 else "")


class _Help:
    """What :class:`NasxCommand` and :class:`NasxGroup` share."""

    params: list[Any]
    help: str | None
    short_help: str | None
    options_metavar: str | None
    get_params: Any

    def _tidy(self) -> None:
        self.help = unwrap_help(self.help)
        self.short_help = unwrap_help(self.short_help)
        for param in self.params:
            if param.param_type_name == "argument":
                param.metavar = argument_metavar(param)
            elif getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""                      # a flag takes no value: no <bool> placeholder

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is None:
            return None
        option.metavar = ""
        panels = [getattr(p, "rich_help_panel", None) for p in self.params if p.param_type_name == "option"]
        if panels and all(panels):
            option.rich_help_panel = next((p for p in HELP_PANELS if p in panels), panels[-1])
        return option

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        """``[OPTIONS]``, then each argument as ``NAME`` (required), ``[NAME]`` (optional) or ``NAME...``."""
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = argument_metavar(param)
                pieces.append(name if param.required else f"[{name}]")
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces


class NasxCommand(_Help, TyperCommand):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tidy()


class NasxGroup(_Help, TyperGroup):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tidy()

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return [*super().collect_usage_pieces(ctx), self.subcommand_metavar]
