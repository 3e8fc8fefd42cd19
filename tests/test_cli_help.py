"""``nasx ... --help`` reads well: flags show no value placeholder, usage lines name arguments in capitals,
every command opens with one short line, and the long commands group their options into panels, the
most-used first. In process, through Typer's test runner: no torch, no subprocess."""
from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from nasxserve.cli import app
from nasxserve.cli import command as panels

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _commands():
    """(path, command, context) for the app and each command and group in it."""
    def visit(cmd, path, parent):
        ctx = cmd.context_class(cmd, info_name=path[-1] if path else "nasx", parent=parent)
        yield path, cmd, ctx
        if hasattr(cmd, "list_commands"):
            for name in cmd.list_commands(ctx):
                yield from visit(cmd.get_command(ctx, name), (*path, name), ctx)
    return list(visit(typer.main.get_command(app), (), None))


COMMANDS = _commands()
PATHS = [path for path, _, _ in COMMANDS]


def _help(path: tuple[str, ...], columns: int = 100) -> str:
    result = CliRunner().invoke(app, [*path, "--help"], prog_name="nasx", color=False,
                                env={"COLUMNS": str(columns), "NO_COLOR": "1", "TERM": "dumb", "FORCE_COLOR": None})
    assert result.exit_code == 0, result.output
    return ANSI.sub("", result.stdout)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p) or "nasx")
def test_help_shows_no_placeholders(path):
    text = _help(path)
    assert "<bool>" not in text                                # a flag takes no value
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    assert "{" not in usage and "}" not in usage, usage        # arguments as RUN_DIR, not {run_dir}


def test_usage_lines_name_the_arguments():
    usage = {" ".join(path): " ".join(cmd.collect_usage_pieces(ctx)) for path, cmd, ctx in COMMANDS}
    assert usage["export"] == "[OPTIONS] RUN_DIR"
    assert usage["predict"] == "[OPTIONS] BUNDLE IMAGE..."
    assert usage["evaluate"] == "[OPTIONS] RUN_DIR|BUNDLE"
    assert usage["genotype show"] == "[OPTIONS] RUN_DIR|FILE|NAME|STRING"
    assert usage[""] == "[OPTIONS] COMMAND [ARGS]..."


@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p) or "nasx")
def test_each_command_opens_with_one_short_line(path):
    """The command list of ``nasx --help`` shows the first paragraph: one line, no line breaks kept from
    the docstring."""
    cmd = next(c for p, c, _ in COMMANDS if p == path)
    first = (cmd.help or "").split("\n\n")[0]
    assert first and "\n" not in first and len(first) <= 100, (path, first)


@pytest.mark.parametrize("command,expected", [
    ("train", [panels.DATA, panels.RUN, panels.SCHEDULE, panels.METHOD, panels.BOXES, panels.SEARCH, panels.HARDWARE]),
    ("search", [panels.DATA, panels.RUN, panels.SCHEDULE, panels.SEARCH, panels.HARDWARE]),
    ("evaluate", [panels.DATA, panels.OUTPUT, panels.MEASURES, panels.HARDWARE]),
])
def test_long_commands_group_their_options_into_panels(command, expected):
    cmd, ctx = next((c, x) for p, c, x in COMMANDS if p == (command,))
    options = [p for p in cmd.get_params(ctx) if p.param_type_name == "option"]
    assert all(getattr(p, "rich_help_panel", None) for p in options), "an option outside every panel"
    order = list(dict.fromkeys(p.rich_help_panel for p in options))
    assert order == expected
    help_option = next(p for p in options if "--help" in p.opts)
    assert help_option.rich_help_panel in (panels.RUN, panels.OUTPUT)
    text = _help((command,))
    titles = [line.strip(" ─╭╮") for line in text.splitlines() if line.lstrip().startswith("╭")]
    assert [t for t in titles if t != "Arguments"] == expected         # the panels, in this order



def test_a_log_shows_where_a_long_epoch_is_and_what_the_phase_has_left(monkeypatch):
    """Not on a terminal there are no bars: a long epoch prints a line every LOG_EVERY_S seconds, and each
    finished epoch says how long the phase has left at the pace so far."""
    import io
    from enum import Enum

    from rich.console import Console

    from nasxserve.cli import train as train_cli

    log = io.StringIO()
    monkeypatch.setattr(train_cli, "console", Console(file=log, force_terminal=False, width=200))
    clock = iter([0.0, 0.0, 0.0, 30.0, 70.0, 100.0, 150.0, 200.0, 200.0, 200.0])
    monkeypatch.setattr(train_cli.time, "monotonic", lambda: next(clock))
    stage = Enum("Stage", {"JOINT": "joint"}).JOINT
    reporter = train_cli.RichReporter(quiet=False)
    reporter.phase("search", 5)
    reporter.epoch_start("search", 0, stage, 4)
    for _ in range(4):                 # the second batch ends past 60 s
        reporter.batch(1.0, 0.5)
    reporter.epoch_end({"phase": "search", "stage": "joint", "epoch": 1, "train_loss": 1.0, "train_acc": 0.5,
                        "val_acc": 0.4, "elapsed_s": 200.0})   # one epoch in 200 s, four left
    lines = log.getvalue().splitlines()
    progress = [line for line in lines if "batch " in line]
    assert len(progress) >= 1 and "batch 2/4" in progress[0] and "left in the epoch" in progress[0]
    assert lines[-1].endswith("[200s, ~13 min left in the search]"), lines[-1]
