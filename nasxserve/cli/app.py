"""The Typer application; each command group lives in its own module."""
from __future__ import annotations

import typer

from nasxserve import __version__
from nasxserve.cli import bundle as bundle_cmds
from nasxserve.cli import evaluate as evaluate_cmds
from nasxserve.cli import serve as serve_cmds
from nasxserve.cli import train as train_cmds
from nasxserve.cli.data import data_app
from nasxserve.cli.genotype import genotype_app

app = typer.Typer(
    name="nasx",
    help="Search, train, export and serve explainable prototype image classifiers (NASXNet).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"nasx {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """nasx: every prediction comes with its evidence."""


app.command("train")(train_cmds.train)
app.command("search")(train_cmds.search)
app.command("export")(bundle_cmds.export)
app.command("verify")(bundle_cmds.verify)
app.command("predict")(bundle_cmds.predict)
app.command("explain")(bundle_cmds.explain)
app.command("serve")(serve_cmds.serve)
app.command("evaluate", help=evaluate_cmds.HELP)(evaluate_cmds.evaluate)
app.add_typer(genotype_app, name="genotype",
              help="Show an architecture's cells as text, JSON or a figure: "
                   "nasx genotype show RUN_DIR|FILE|NAME|STRING.")
app.add_typer(data_app, name="data")
