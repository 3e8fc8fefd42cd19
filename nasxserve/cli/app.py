"""The Typer application; each command group lives in its own module."""
from __future__ import annotations

import typer

from nasxserve import __version__
from nasxserve.cli import bundle as bundle_cmds
from nasxserve.cli import evaluate as evaluate_cmds
from nasxserve.cli import serve as serve_cmds
from nasxserve.cli import train as train_cmds
from nasxserve.cli.command import NasxCommand, NasxGroup
from nasxserve.cli.data import data_app
from nasxserve.cli.genotype import genotype_app

app = typer.Typer(
    name="nasx",
    help="Search, train, export and serve explainable prototype image classifiers (NASXNet).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=NasxGroup,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"nasx {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """nasx: every prediction comes with its evidence."""


app.command("train", cls=NasxCommand)(train_cmds.train)
app.command("search", cls=NasxCommand)(train_cmds.search)
app.command("export", cls=NasxCommand)(bundle_cmds.export)
app.command("verify", cls=NasxCommand)(bundle_cmds.verify)
app.command("keygen", cls=NasxCommand)(bundle_cmds.keygen)
app.command("sign", cls=NasxCommand)(bundle_cmds.sign)
app.command("predict", cls=NasxCommand)(bundle_cmds.predict)
app.command("explain", cls=NasxCommand)(bundle_cmds.explain)
app.command("serve", cls=NasxCommand)(serve_cmds.serve)
app.command("evaluate", cls=NasxCommand, help=evaluate_cmds.HELP)(evaluate_cmds.evaluate)
app.add_typer(genotype_app, name="genotype",
              help="Show an architecture's cells as text, JSON or a figure.\n\n"
                   "nasx genotype show RUN_DIR|FILE|NAME|STRING: a run's genotype.json, a genotype file, a "
                   "Genotype(...) string or a published cell (DARTS_V1, DARTS_V2, PC_DARTS, PDARTS).")
app.add_typer(data_app, name="data")
