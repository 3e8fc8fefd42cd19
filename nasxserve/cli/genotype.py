"""``nasx genotype show``: print a searched or published genotype's cells, or draw them."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from nasxserve.cli.command import NasxCommand, NasxGroup
from rich.console import Console

from nasxserve.errors import ConfigError

if TYPE_CHECKING:
    from nasxserve.nas.genotype import Genotype

console = Console(stderr=True)

genotype_app = typer.Typer(
    help="Inspect architectures: a run's genotype.json, a genotype file, or a published cell "
         "(DARTS_V1, DARTS_V2, PC_DARTS, PDARTS).",
    no_args_is_help=True,
    cls=NasxGroup,
)

INPUTS = {0: "c_{k-2}", 1: "c_{k-1}"}


def describe(genotype: Genotype) -> list[str]:
    """The cells as text: per intermediate node its two incoming edges ``op <- input``, then the concat."""
    skips = genotype.count("skip_connect")
    lines = [f"inputs: 0 = {INPUTS[0]}, 1 = {INPUTS[1]}; intermediate nodes 2..{genotype.steps + 1} "
             f"(drawn as 0..{genotype.steps - 1} by --png)"]
    for cell, name in (("normal", "normal cell"), ("reduce", "reduction cell")):
        edges = getattr(genotype, cell)
        lines.append(f"{name}: {genotype.steps} nodes, {skips[cell]} skip connection{'s' * (skips[cell] != 1)}")
        for k in range(0, len(edges), 2):
            incoming = ", ".join(f"{op} <- {_input(j)}" for op, j in edges[k:k + 2])
            lines.append(f"  node {2 + k // 2}: {incoming}")
        concat = getattr(genotype, f"{cell}_concat")
        lines.append(f"  concat: {', '.join(map(str, concat))} -> c_{{k}}")
    return lines


def _input(j: int) -> str:
    return f"{j} ({INPUTS[j]})" if j in INPUTS else str(j)


@genotype_app.command("show", cls=NasxCommand)
def show(
    source: str = typer.Argument(..., metavar="RUN_DIR|FILE|NAME|STRING",
                                 help="A run directory (reads its genotype.json), a genotype file (JSON or DARTS "
                                      "string), a DARTS Genotype(...) string, or a published name: DARTS_V1, "
                                      "DARTS_V2, PC_DARTS, PDARTS."),
    png: Optional[Path] = typer.Option(None, "--png", help="Also draw both cells into this PNG (its folder must "
                                                           "exist; an existing file is replaced)."),
    engine: str = typer.Option("auto", "--engine",
                               help="Drawing engine for --png: auto (graphviz when the graphviz package and dot "
                                    "are installed, else matplotlib), graphviz or matplotlib."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (genotype, DARTS string, skip connections "
                                                       "per cell) instead of text."),
) -> None:
    """Print a genotype's cells: each node's two input edges, the concat, the skip connections.

    --png also draws them.
    """
    from nasxserve.nas.drawing import ENGINES
    from nasxserve.nas.genotype import resolve_genotype
    if engine not in ENGINES:
        raise ConfigError(f"--engine takes one of {', '.join(ENGINES)}; got {engine!r}")
    genotype, origin = resolve_genotype(source)
    drawn = None
    if png is not None:
        from nasxserve.nas.drawing import draw_genotype
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            drawn = draw_genotype(genotype, png, engine=engine, title=origin)
        for w in caught:
            console.print(f"warning: {w.message}", markup=False, highlight=False, soft_wrap=True)
    if as_json:
        print(json.dumps({"genotype": genotype.to_dict(), "darts": genotype.to_darts_string(),
                          "skip_connections": genotype.count("skip_connect"),
                          "convolutions": {"normal": genotype.parametric("normal"),
                                           "reduce": genotype.parametric("reduce")},
                          "collapsed": genotype.collapsed()}, indent=2))
    else:
        print(f"genotype: {origin}")
        print("\n".join(describe(genotype)))
        print(f"darts: {genotype.to_darts_string()}")
    if genotype.collapsed():
        console.print(f"warning: the normal cell has {genotype.parametric('normal')} convolution(s) of "
                      f"{len(genotype.normal)} edges: a collapsed cell, the failure mode of an unstable DARTS search "
                      "(see docs/method.md)", markup=False, highlight=False, soft_wrap=True)
    if drawn is not None:
        console.print(f"figure: {png} (drawn with {drawn})", markup=False, highlight=False, soft_wrap=True)
