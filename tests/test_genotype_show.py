"""``nasx genotype show``: the cells as text and JSON from a published name, a run directory or a file;
the --png figure; and one clear ``error:`` line for bad input.

Commands run in-process on the Typer app (CliRunner); the error cases also go through ``nasxserve.cli.main``,
the console script's entry point, which turns a NasxError into ``error: ...`` and exit status 2.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nasxserve.cli import app, main
from nasxserve.errors import ConfigError, GenotypeError
from nasxserve.nas import drawing
from nasxserve.nas.genotype import DARTS_V2, GENOTYPES, PC_DARTS, Genotype

runner = CliRunner()

# Three nodes per cell (not the published four), concat lists that are not all the nodes, two skip
# connections in the normal cell and one in the reduction cell.
CUSTOM = Genotype(
    normal=(("sep_conv_5x5", 1), ("skip_connect", 0), ("dil_conv_5x5", 2), ("skip_connect", 1),
            ("avg_pool_3x3", 3), ("sep_conv_3x3", 0)),
    normal_concat=(2, 3, 4),
    reduce=(("max_pool_3x3", 0), ("dil_conv_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
            ("sep_conv_5x5", 3), ("avg_pool_3x3", 2)),
    reduce_concat=(3, 4),
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def show(*args: object):
    result = runner.invoke(app, ["genotype", "show", *map(str, args)])
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def run_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str, str]:
    """``nasx ARGS`` through the console script's entry point: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["nasx", *map(str, args)])
    with pytest.raises(SystemExit) as exited:
        main()
    out, err = capsys.readouterr()
    return exited.value.code, out, err


def parse_cells(text: str) -> dict[str, list[tuple[str, int]]]:
    """The ``node N: op <- j (...), op <- j`` lines of the text output, per cell, back as edges."""
    cells: dict[str, list[tuple[str, int]]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith(("normal cell:", "reduction cell:")):
            current = cells.setdefault("normal" if line.startswith("normal") else "reduce", [])
        elif m := re.fullmatch(r"  node (\d+): (\w+) <- (\d+)(?: \(c_\{k-[12]\}\))?, "
                               r"(\w+) <- (\d+)(?: \(c_\{k-[12]\}\))?", line):
            assert int(m[1]) == 2 + len(current) // 2, line
            current += [(m[2], int(m[3])), (m[4], int(m[5]))]
    return cells


# -------------------------------------------------------------------------------------------- text and JSON
def test_published_name_prints_each_nodes_two_edges():
    out = show("pc_darts").stdout      # names are case-insensitive
    lines = out.splitlines()
    assert lines[0] == "genotype: PC_DARTS"
    normal = lines.index("normal cell: 4 nodes, 1 skip connection")
    assert lines[normal + 1:normal + 6] == [
        "  node 2: sep_conv_3x3 <- 1 (c_{k-1}), skip_connect <- 0 (c_{k-2})",
        "  node 3: sep_conv_3x3 <- 0 (c_{k-2}), dil_conv_3x3 <- 1 (c_{k-1})",
        "  node 4: sep_conv_5x5 <- 0 (c_{k-2}), sep_conv_3x3 <- 1 (c_{k-1})",
        "  node 5: avg_pool_3x3 <- 0 (c_{k-2}), dil_conv_3x3 <- 1 (c_{k-1})",
        "  concat: 2, 3, 4, 5 -> c_{k}",
    ]
    reduce = lines.index("reduction cell: 4 nodes, 0 skip connections")
    assert lines[reduce + 1:reduce + 6] == [
        "  node 2: sep_conv_5x5 <- 1 (c_{k-1}), max_pool_3x3 <- 0 (c_{k-2})",
        "  node 3: sep_conv_5x5 <- 1 (c_{k-1}), sep_conv_5x5 <- 2",
        "  node 4: sep_conv_3x3 <- 0 (c_{k-2}), sep_conv_3x3 <- 3",
        "  node 5: sep_conv_3x3 <- 1 (c_{k-1}), sep_conv_3x3 <- 2",
        "  concat: 2, 3, 4, 5 -> c_{k}",
    ]
    assert f"darts: {PC_DARTS.to_darts_string()}" in lines


@pytest.mark.parametrize("name", sorted(GENOTYPES))
def test_text_lists_every_edge_of_every_published_genotype_in_order(name):
    g = GENOTYPES[name]
    cells = parse_cells(show(name).stdout)
    assert cells == {"normal": list(g.normal), "reduce": list(g.reduce)}


def test_skip_connections_are_counted_per_cell():
    out = show("DARTS_V2").stdout
    assert "normal cell: 4 nodes, 2 skip connections" in out
    assert "reduction cell: 4 nodes, 3 skip connections" in out
    assert json.loads(show("DARTS_V2", "--json").stdout)["skip_connections"] == {"normal": 2, "reduce": 3}


def _run_dir(tmp_path: Path, genotype: Genotype) -> Path:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    # what the trainer writes after a search
    (run / "genotype.json").write_text(json.dumps({"genotype": genotype.to_dict(),
                                                   "darts": genotype.to_darts_string()}), encoding="utf-8")
    return run


def test_run_directory_reads_its_genotype_json_and_json_round_trips(tmp_path):
    run = _run_dir(tmp_path, CUSTOM)
    data = json.loads(show(run, "--json").stdout)
    assert set(data) == {"genotype", "darts", "skip_connections", "convolutions", "collapsed"}
    assert Genotype.from_dict(data["genotype"]) == CUSTOM
    assert Genotype.from_darts_string(data["darts"]) == CUSTOM
    assert data["skip_connections"] == {"normal": 2, "reduce": 1}

    out = show(run).stdout
    assert out.splitlines()[0] == f"genotype: {run / 'genotype.json'}"
    assert "normal cell: 3 nodes, 2 skip connections" in out
    assert "  node 4: avg_pool_3x3 <- 3, sep_conv_3x3 <- 0 (c_{k-2})" in out
    assert "  concat: 2, 3, 4 -> c_{k}" in out
    assert "reduction cell: 3 nodes, 1 skip connection\n" in out
    assert "  concat: 3, 4 -> c_{k}" in out
    assert parse_cells(out) == {"normal": list(CUSTOM.normal), "reduce": list(CUSTOM.reduce)}


@pytest.mark.parametrize("form", ["json", "darts"])
def test_genotype_file_in_either_form(tmp_path, form):
    p = tmp_path / f"cells.{form}"
    p.write_text(CUSTOM.to_json() if form == "json" else CUSTOM.to_darts_string(), encoding="utf-8")
    assert Genotype.from_dict(json.loads(show(p, "--json").stdout)["genotype"]) == CUSTOM


# ---------------------------------------------------------------------------------------------------- figure
def test_png_draws_both_cells(tmp_path):
    pytest.importorskip("matplotlib")
    Image = pytest.importorskip("PIL.Image")
    out = tmp_path / "cells.png"
    out.write_bytes(b"an older figure")
    result = show("PDARTS", "--png", out, "--engine", "matplotlib")
    assert "node 2: skip_connect <- 0 (c_{k-2}), dil_conv_3x3 <- 1 (c_{k-1})" in result.stdout
    assert f"figure: {out} (drawn with matplotlib)" in result.stderr
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.png"]     # no temporary file left behind
    with Image.open(out) as im:
        assert im.format == "PNG"
        rgb = im.convert("RGB")
    w, h = rgb.size
    assert w > 1000 and h > 300 and w > h          # two cells side by side
    colours = {c: n for n, c in rgb.getcolors(maxcolors=w * h)}
    assert len(colours) > 20                        # text, arrows, anti-aliasing: not one flat colour
    assert colours[(255, 255, 255)] > w * h // 2    # a white background
    # every node of both cells, filled in the papers' colours: per cell two inputs, four intermediate
    # nodes, one output; the two cells side by side
    for colour, per_cell in ((drawing.INPUT_COLOUR, 2), (drawing.NODE_COLOUR, 4), (drawing.OUTPUT_COLOUR, 1)):
        blobs = _blobs(rgb, colour)
        assert len(blobs) == 2 * per_cell, colour
        left = sum(x < w / 2 for x, _ in blobs)
        assert left == per_cell, colour


def _blobs(image, hex_colour: str, min_pixels: int = 200) -> list[tuple[float, float]]:
    """Centres of the connected regions of exactly ``hex_colour`` (4-neighbourhood), small specks ignored."""
    import numpy as np
    target = [int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)]
    ys, xs = np.nonzero(np.all(np.asarray(image) == target, axis=-1))
    todo = set(zip(xs.tolist(), ys.tolist()))
    blobs = []
    while todo:
        stack = [todo.pop()]
        region = []
        while stack:
            x, y = stack.pop()
            region.append((x, y))
            for q in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)):
                if q in todo:
                    todo.remove(q)
                    stack.append(q)
        if len(region) >= min_pixels:
            blobs.append((sum(x for x, _ in region) / len(region), sum(y for _, y in region) / len(region)))
    return blobs


def _custom_file(tmp_path: Path) -> Path:
    p = tmp_path / "custom.json"
    p.write_text(CUSTOM.to_json(), encoding="utf-8")
    return p


def test_png_with_auto_engine_reports_the_engine_it_used(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "auto.png"
    result = show(_custom_file(tmp_path), "--png", out)
    engine = "graphviz" if drawing.graphviz_available() else "matplotlib"
    assert f"(drawn with {engine})" in result.stderr
    assert out.read_bytes()[:8] == PNG_SIGNATURE


def test_cell_graph_has_the_genotypes_edges_then_the_concat():
    g = drawing.cell_graph(PC_DARTS, "reduce")
    assert g.edges == (
        (1, 2, "sep_conv_5x5"), (0, 2, "max_pool_3x3"), (1, 3, "sep_conv_5x5"), (2, 3, "sep_conv_5x5"),
        (0, 4, "sep_conv_3x3"), (3, 4, "sep_conv_3x3"), (1, 5, "sep_conv_3x3"), (2, 5, "sep_conv_3x3"),
        (2, 6, None), (3, 6, None), (4, 6, None), (5, 6, None),
    )
    assert [g.label(n) for n in g.nodes] == ["c_{k-2}", "c_{k-1}", "0", "1", "2", "3", "c_{k}"]
    c = drawing.cell_graph(CUSTOM, "reduce")
    assert [e for e in c.edges if e[2] is None] == [(3, 5, None), (4, 5, None)]


@pytest.mark.parametrize("genotype", [*GENOTYPES.values(), CUSTOM], ids=[*GENOTYPES, "CUSTOM"])
def test_layout_runs_left_to_right_and_no_edge_passes_through_another_node(genotype):
    for cell in drawing.CELLS:
        g = drawing.cell_graph(genotype, cell)
        pos = drawing.layered_layout(g)
        assert len(set(pos.values())) == len(pos)
        assert pos[0][0] == pos[1][0] < min(pos[n][0] for n in range(2, g.output + 1))
        assert all(pos[dst][0] > pos[src][0] for src, dst, _ in g.edges)
        bends = drawing._bends(g, pos)
        for k, (src, dst, _) in enumerate(g.edges):
            (xa, ya), (xb, yb), rad = pos[src], pos[dst], bends[k][1]
            cx, cy = (xa + xb) / 2 + rad * (yb - ya), (ya + yb) / 2 - rad * (xb - xa)
            for t in (i / 50 for i in range(1, 50)):
                p = ((1 - t) ** 2 * xa + 2 * t * (1 - t) * cx + t ** 2 * xb,
                     (1 - t) ** 2 * ya + 2 * t * (1 - t) * cy + t ** 2 * yb)
                hit = [n for n in g.nodes if n not in (src, dst) and drawing._in_node(p, n, g, pos, pad=0.0)]
                assert not hit, (cell, g.label(src), g.label(dst), [g.label(n) for n in hit])


def test_dot_source_has_one_cluster_per_cell_with_labelled_edges():
    text = drawing.dot_source([drawing.cell_graph(DARTS_V2, c) for c in drawing.CELLS], title='run "x"')
    assert 'label="run \\"x\\""' in text
    assert text.count("subgraph cluster_") == 2
    assert '"normal_5" [label="3", fillcolor="#add8e6"];' in text
    assert '"normal_2" -> "normal_5" [label="dil_conv_3x3"];' in text
    assert '"reduce_0" -> "reduce_2" [label="max_pool_3x3"];' in text
    assert '"reduce_5" -> "reduce_6";' in text
    assert text.count("->") == 2 * (8 + 4)


def test_graphviz_engine_pipes_the_dot_source_through_dot(tmp_path, monkeypatch):
    pytest.importorskip("graphviz")
    # a stand-in dot that records what it was given and answers with a PNG signature
    fake = tmp_path / "bin" / "dot"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\ncat > {tmp_path / 'stdin.dot'}\nprintf '\\211PNG\\r\\n\\032\\nfake'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "gv.png"
    assert drawing.draw_genotype(PC_DARTS, out, engine="graphviz", title="PC_DARTS") == "graphviz"
    assert out.read_bytes() == PNG_SIGNATURE + b"fake"
    sent = (tmp_path / "stdin.dot").read_text()
    assert sent == drawing.dot_source([drawing.cell_graph(PC_DARTS, c) for c in drawing.CELLS], "PC_DARTS")


# ------------------------------------------------------------------------------------------------ bad input
def test_missing_path(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "no-such-run"
    code, out, err = run_main(monkeypatch, capsys, "genotype", "show", missing)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1
    assert str(missing) in err and "no such file or directory" in err
    assert "run directory" in err and "DARTS_V2" in err          # says what to pass instead
    assert isinstance(runner.invoke(app, ["genotype", "show", str(missing)]).exception, GenotypeError)


def test_directory_without_genotype_json(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    code, out, err = run_main(monkeypatch, capsys, "genotype", "show", run)
    assert code == 2 and out == ""
    assert err.startswith(f"error: {run} has no genotype.json")
    assert "genotype file" in err and "PC_DARTS" in err
    assert isinstance(runner.invoke(app, ["genotype", "show", str(run)]).exception, GenotypeError)


def test_malformed_genotype_json_in_a_run_directory(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "genotype.json").write_text('{"genotype": {"normal": [["warp_drive", 0]]}}', encoding="utf-8")
    code, _, err = run_main(monkeypatch, capsys, "genotype", "show", run)
    assert code == 2 and err.startswith(f"error: {run / 'genotype.json'}: ")


def test_png_in_a_missing_directory(tmp_path, monkeypatch, capsys):
    out = tmp_path / "figures" / "cells.png"
    code, stdout, err = run_main(monkeypatch, capsys, "genotype", "show", "PDARTS", "--png", out)
    assert code == 2 and stdout == ""
    assert err.startswith(f"error: cannot write the figure to {out}: the folder {out.parent} does not exist")
    assert not out.parent.exists()                                 # nothing created on the way
    assert isinstance(runner.invoke(app, ["genotype", "show", "PDARTS", "--png", str(out)]).exception, ConfigError)


def test_png_path_that_is_a_directory(tmp_path, monkeypatch, capsys):
    code, _, err = run_main(monkeypatch, capsys, "genotype", "show", "PDARTS", "--png", tmp_path)
    assert code == 2 and err.startswith(f"error: cannot write the figure to {tmp_path}: it is a folder")
    assert list(tmp_path.iterdir()) == []


def test_unknown_engine(tmp_path, monkeypatch, capsys):
    code, _, err = run_main(monkeypatch, capsys, "genotype", "show", "PDARTS", "--png", tmp_path / "x.png",
                            "--engine", "tikz")
    assert code == 2 and err == "error: --engine takes one of auto, graphviz, matplotlib; got 'tikz'\n"
    assert list(tmp_path.iterdir()) == []


def test_graphviz_engine_when_graphviz_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(drawing, "graphviz_available", lambda: False)
    code, _, err = run_main(monkeypatch, capsys, "genotype", "show", "PDARTS", "--png", tmp_path / "x.png",
                            "--engine", "graphviz")
    assert code == 2 and err.startswith("error: the graphviz engine needs the graphviz Python package and the dot")
    assert list(tmp_path.iterdir()) == []


def test_a_collapsed_normal_cell_is_flagged(monkeypatch, capsys):
    """A normal cell of pools and skip connections (DARTS' collapse) is called so; DARTS_V2's is not."""
    pools = Genotype(normal=[("avg_pool_3x3", 0), ("dil_conv_3x3", 1), ("max_pool_3x3", 2), ("avg_pool_3x3", 0),
                             ("max_pool_3x3", 3), ("avg_pool_3x3", 0), ("avg_pool_3x3", 0), ("skip_connect", 1)],
                     normal_concat=(2, 3, 4, 5), reduce=DARTS_V2.reduce, reduce_concat=DARTS_V2.reduce_concat)
    assert (pools.parametric("normal"), pools.collapsed()) == (1, True)
    assert (DARTS_V2.parametric("normal"), DARTS_V2.collapsed()) == (6, False)
    code, out, err = run_main(monkeypatch, capsys, "genotype", "show", pools.to_darts_string())
    assert code == 0 and "collapsed cell" in err and "1 convolution(s) of 8 edges" in err
    assert json.loads(show(pools.to_darts_string(), "--json").stdout)["collapsed"] is True
    code, out, err = run_main(monkeypatch, capsys, "genotype", "show", "DARTS_V2")
    assert code == 0 and "collapsed" not in err


def test_the_run_summary_says_when_the_floor_added_convolutions():
    from nasxserve.cli.train import _normal_cell_row

    pools = Genotype(normal=[("avg_pool_3x3", 0), ("dil_conv_3x3", 1)] + [("max_pool_3x3", 0)] * 6,
                     normal_concat=(2, 3, 4, 5), reduce=DARTS_V2.reduce, reduce_concat=DARTS_V2.reduce_concat)
    assert "collapsed: 1 convolution(s) of 8 edges" in str(_normal_cell_row(pools, {"convolutions_searched": 1}))
    added = str(_normal_cell_row(DARTS_V2, {"convolutions_searched": 1}))
    assert "6 convolutions of 8 edges: the search chose 1, search.min_convolutions added the rest" in added
    assert _normal_cell_row(DARTS_V2, {"convolutions_searched": 6}) is None        # the search's own choice
    assert _normal_cell_row(DARTS_V2, {"convolutions_searched": None}) is None     # no floor was set
