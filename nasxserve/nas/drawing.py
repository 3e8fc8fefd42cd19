"""Cell diagrams of a genotype, drawn like the figures of DARTS (Liu et al., 2019, figs. 4-5) and NASXNet.

A cell is a small DAG: the inputs ``c_{k-2}`` and ``c_{k-1}`` (genotype nodes 0 and 1), the intermediate
nodes drawn as ``0 .. steps-1`` (genotype nodes ``2 .. steps+1``) and the output ``c_{k}``, which
concatenates the nodes in ``*_concat``. Operation edges are labelled with the operation; the
concatenation edges into ``c_{k}`` are not.

Two engines: graphviz (the ``graphviz`` Python package driving the ``dot`` executable), the layout the
papers used, and matplotlib with a simple layered layout, so that a figure can be drawn wherever the
training extra is installed. Neither needs torch.
"""
from __future__ import annotations

import importlib.util
import math
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nasxserve.errors import ConfigError
from nasxserve.io import atomic_write

if TYPE_CHECKING:
    from nasxserve.nas.genotype import Genotype

ENGINES = ("auto", "graphviz", "matplotlib")
CELLS = {"normal": "normal cell", "reduce": "reduction cell"}

# The colours of DARTS' visualize.py (X11 darkseagreen2, lightblue, palegoldenrod), so figures match the papers'.
INPUT_COLOUR = "#b4eeb4"
NODE_COLOUR = "#add8e6"
OUTPUT_COLOUR = "#eee8aa"


@dataclass(frozen=True)
class CellGraph:
    """One cell as a graph. Nodes are numbered as in the genotype (0, 1 inputs; 2..steps+1 intermediate)
    plus ``steps + 2`` for the output ``c_{k}``; ``edges`` are ``(source, target, op)`` with ``op`` None
    for a concatenation edge."""

    cell: str
    steps: int
    edges: tuple[tuple[int, int, str | None], ...]

    @property
    def output(self) -> int:
        """The output node ``c_{k}``."""
        return self.steps + 2

    @property
    def nodes(self) -> range:
        """Every node: the inputs, the intermediate nodes and the output."""
        return range(self.steps + 3)

    def label(self, node: int) -> str:
        """The node's name in the figure: c_{k-2}, c_{k-1}, 0..steps-1, c_{k}."""
        if node == 0:
            return "c_{k-2}"
        if node == 1:
            return "c_{k-1}"
        if node == self.output:
            return "c_{k}"
        return str(node - 2)

    def colour(self, node: int) -> str:
        """The node's fill colour: inputs green, intermediate nodes blue, the output yellow."""
        if node < 2:
            return INPUT_COLOUR
        return OUTPUT_COLOUR if node == self.output else NODE_COLOUR


def cell_graph(genotype: Genotype, cell: str) -> CellGraph:
    """The graph of ``genotype``'s ``cell`` ("normal" or "reduce"): every operation edge in genotype order,
    then one concatenation edge per node of ``*_concat``."""
    if cell not in CELLS:
        raise ValueError(f"cell must be one of {', '.join(CELLS)}, got {cell!r}")
    ops = getattr(genotype, cell)
    concat = getattr(genotype, f"{cell}_concat")
    steps = genotype.steps
    edges: list[tuple[int, int, str | None]] = [(j, 2 + k // 2, op) for k, (op, j) in enumerate(ops)]
    edges += [(i, steps + 2, None) for i in concat]
    return CellGraph(cell=cell, steps=steps, edges=tuple(edges))


def graphviz_available() -> bool:
    """Whether the graphviz engine can run: the Python package is importable and ``dot`` is on PATH."""
    return importlib.util.find_spec("graphviz") is not None and shutil.which("dot") is not None


def matplotlib_available() -> bool:
    """Whether the matplotlib engine can run."""
    return importlib.util.find_spec("matplotlib") is not None


def draw_genotype(genotype: Genotype, path: str | Path, engine: str = "auto", title: str | None = None) -> str:
    """Draw the normal and the reduction cell of ``genotype`` into the PNG file ``path``.

    Args:
        genotype: the cells to draw.
        path: the PNG to write, replaced atomically (temporary file in the same folder, then rename); its
            folder must exist.
        engine: ``graphviz`` (needs the ``graphviz`` package and the ``dot`` executable), ``matplotlib``
            (``pip install 'nasx[train]'``) or ``auto``: graphviz when it is available, else matplotlib.
        title: an optional heading above the cells (e.g. where the genotype came from).

    Returns:
        The engine that drew the figure, ``"graphviz"`` or ``"matplotlib"``.

    Raises:
        ConfigError: unknown or unavailable engine, or ``path`` is a folder, inside a missing folder or
            not writable.
    """
    if engine not in ENGINES:
        raise ConfigError(f"unknown drawing engine {engine!r}; choose one of {', '.join(ENGINES)}")
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"cannot write the figure to {path}: it is a folder; give a file name such as "
                          f"{path / 'genotype.png'}")
    if not path.parent.is_dir():
        # atomic_write would create the folder; a typo in a path should not leave new folders behind
        raise ConfigError(f"cannot write the figure to {path}: the folder {path.parent} does not exist "
                          f"(create it first, or choose another path)")
    graphs = [cell_graph(genotype, cell) for cell in CELLS]
    if engine in ("auto", "graphviz") and graphviz_available():
        import graphviz
        try:
            png = graphviz.Source(dot_source(graphs, title)).pipe(format="png", quiet=True)
        except (graphviz.ExecutableNotFound, graphviz.CalledProcessError) as e:
            if engine == "graphviz" or not matplotlib_available():
                raise ConfigError(f"graphviz could not draw the figure ({e}); use the matplotlib engine") from None
            # a broken dot install should not cost the user the figure when matplotlib can draw it
            warnings.warn(f"graphviz could not draw the figure ({e}); drawing it with matplotlib",
                          RuntimeWarning, stacklevel=2)
        else:
            _write(path, lambda f: f.write(png))
            return "graphviz"
    elif engine == "graphviz":
        raise ConfigError("the graphviz engine needs the graphviz Python package and the dot executable "
                          "(pip install graphviz; apt install graphviz); or use the matplotlib engine")
    if not matplotlib_available():
        raise ConfigError("drawing a genotype needs matplotlib (pip install 'nasx[train]') or graphviz "
                          "(pip install graphviz; apt install graphviz)")
    figure = _matplotlib_figure(graphs, title)
    _write(path, lambda f: figure.savefig(f, format="png", dpi=150, facecolor="white", bbox_inches="tight",
                                             pad_inches=0.15))
    return "matplotlib"


def _write(path: Path, write: Callable[[Any], None]) -> None:
    try:
        atomic_write(path, write)
    except OSError as e:
        raise ConfigError(f"cannot write the figure to {path}: {e.strerror or e}") from None


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def dot_source(graphs: list[CellGraph], title: str | None = None) -> str:
    """The graphviz DOT text for ``graphs``: one cluster per cell, styled like DARTS' visualize.py."""
    lines = ["digraph genotype {", "  rankdir=LR;", "  fontname=Helvetica; fontsize=22;",
             '  node [shape=rect, style="rounded,filled", fontname=Helvetica, fontsize=20, '
             "height=0.5, width=0.5, penwidth=2];",
             "  edge [fontname=Helvetica, fontsize=16, color=gray30];"]
    if title:
        lines.append(f"  label={_quote(title)}; labelloc=t;")
    for g in graphs:
        lines.append(f"  subgraph cluster_{g.cell} {{")
        lines.append(f"    label={_quote(CELLS[g.cell])}; color=gray80;")
        for n in g.nodes:
            lines.append(f"    {_quote(f'{g.cell}_{n}')} [label={_quote(g.label(n))}, "
                         f"fillcolor={_quote(g.colour(n))}];")
        for src, dst, op in g.edges:
            attrs = f" [label={_quote(op)}]" if op is not None else ""
            lines.append(f"    {_quote(f'{g.cell}_{src}')} -> {_quote(f'{g.cell}_{dst}')}{attrs};")
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


# Layout units are inches in the figure: one node slot is 1 tall, and columns are far enough apart for an
# operation name to fit along an edge between them.
_COLUMN = 3.0
_BOX_W, _BOX_H, _RADIUS = 1.05, 0.5, 0.28
_LABEL_PT = 8.0
_LABEL_H = 0.2
# Where along an edge a label may go, best first; the first that collides least is taken.
_LABEL_T = (0.5, 0.4, 0.6, 0.32, 0.68, 0.25, 0.75)


def layered_layout(g: CellGraph) -> dict[int, tuple[float, float]]:
    """Node -> (x, y): the inputs in the first column, each other node one column right of its deepest
    input, ``c_{k}`` in a column of its own at the right; within a column nodes are ordered by the mean
    height of their inputs (fewer crossings) and centred on y = 0."""
    preds: dict[int, list[int]] = {n: [] for n in g.nodes}
    for src, dst, _ in g.edges:
        preds[dst].append(src)
    depth = {0: 0, 1: 0}
    for n in range(2, g.output):
        depth[n] = 1 + max(depth[p] for p in preds[n])
    depth[g.output] = 1 + max(depth.values())
    pos: dict[int, tuple[float, float]] = {}
    for d in range(depth[g.output] + 1):
        column = [n for n in g.nodes if depth[n] == d]
        if d > 0:
            column.sort(key=lambda n: (-sum(pos[p][1] for p in preds[n]) / max(len(preds[n]), 1), n))
        for r, n in enumerate(column):
            pos[n] = (d * _COLUMN, (len(column) - 1) / 2 - r)
    return pos


def _matplotlib_figure(graphs: list[CellGraph], title: str | None) -> Any:
    # Figure without pyplot: no global state and no GUI backend, so this is safe in servers and threads
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle, FancyBboxPatch, Patch

    layouts = [layered_layout(g) for g in graphs]
    bends = [_bends(g, pos) for g, pos in zip(graphs, layouts)]
    margin = 0.8
    extents = []
    for pos, rads in zip(layouts, bends):
        xs = [x for x, _ in pos.values()]
        # a bowed edge peaks half its bend above or below the straight line: keep that inside the panel
        ys = [y for _, y in pos.values()] + [y for (_, y), _ in rads.values()]
        extents.append((min(xs) - margin, max(xs) + margin, min(ys) - margin, max(ys) + margin))
    widths = [x1 - x0 for x0, x1, _, _ in extents]
    height = max(y1 - y0 for _, _, y0, y1 in extents)
    top = 0.9 if title else 0.5
    figure = Figure(figsize=(sum(widths), height + top))
    if title:
        figure.suptitle(title, fontsize=13, y=1 - 0.15 / (height + top), va="top")
    left = 0.0
    for g, pos, rads, (x0, x1, y0, y1), width in zip(graphs, layouts, bends, extents, widths):
        # axes placed by hand, one data unit = one inch both ways, so label sizes are known in data units
        ax = figure.add_axes((left / sum(widths), 0.0, width / sum(widths), height / (height + top)))
        left += width
        mid = (y0 + y1) / 2
        ax.set_xlim(x0, x1)
        ax.set_ylim(mid - height / 2, mid + height / 2)
        ax.axis("off")
        ax.set_title(CELLS[g.cell], fontsize=12)
        patches = {}
        for n, (x, y) in pos.items():
            if 2 <= n < g.output:
                patch: Patch = Circle((x, y), _RADIUS, facecolor=g.colour(n), edgecolor="black", lw=1.5, zorder=3)
            else:
                patch = FancyBboxPatch((x - _BOX_W / 2, y - _BOX_H / 2), _BOX_W, _BOX_H,
                                       boxstyle="round,pad=0,rounding_size=0.12", facecolor=g.colour(n),
                                       edgecolor="black", lw=1.5, zorder=3)
            ax.add_patch(patch)
            patches[n] = patch
            ax.text(x, y, g.label(n), ha="center", va="center", fontsize=10, zorder=4)
        placed: list[tuple[float, float]] = []
        for k, (src, dst, op) in enumerate(g.edges):
            rad = rads[k][1]
            ax.annotate("", xy=pos[dst], xytext=pos[src], zorder=2,
                        arrowprops=dict(arrowstyle="-|>", color="0.25", lw=1.2, mutation_scale=12,
                                        shrinkA=0, shrinkB=0, patchA=patches[src], patchB=patches[dst],
                                        connectionstyle=f"arc3,rad={rad}"))
            if op is not None:
                x, y, angle, points = _place_label(op, pos[src], pos[dst], rad, g, pos, placed)
                placed += points
                ax.text(x, y, op, ha="center", va="center", fontsize=_LABEL_PT, rotation=angle,
                        rotation_mode="anchor", zorder=5,
                        bbox=dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none", alpha=0.85))
    return figure


def _bends(g: CellGraph, pos: dict[int, tuple[float, float]]) -> dict[int, tuple[tuple[float, float], float]]:
    """Edge index -> (the curve's midpoint, its arc3 ``rad``)."""
    out = {}
    used: dict[tuple[int, int], list[float]] = {}
    for k, (src, dst, _) in enumerate(g.edges):
        rad = _bend(g, pos, src, dst, used.setdefault((src, dst), []))
        used[(src, dst)].append(rad)
        (xa, ya), (xb, yb) = pos[src], pos[dst]
        # quadratic Bezier at t = 1/2: half way from the chord's midpoint to the control point
        out[k] = (((xa + xb) / 2 + rad * (yb - ya) / 2, (ya + yb) / 2 - rad * (xb - xa) / 2), rad)
    return out


def _bend(g: CellGraph, pos: dict[int, tuple[float, float]], src: int, dst: int, taken: list[float]) -> float:
    """The arc3 ``rad`` of the edge src -> dst: the least bent curve that runs through no other node (an
    edge that jumps over a column could otherwise seem to start at a node it passes), bowed away from the
    centre line first, and different from the curves of earlier edges between the same two nodes."""
    (xa, ya), (xb, yb) = pos[src], pos[dst]
    # arc3 puts the control point at midpoint + rad * (dy, -dx); dx > 0, so rad < 0 bows upwards
    outward = -1.0 if (ya + yb) / 2 >= 0 else 1.0
    candidates = [0.0] + [sign * r for r in (0.15, 0.3, 0.45, 0.6) for sign in (outward, -outward)]
    best = None
    for rad in candidates:
        if any(abs(rad - r) < 1e-9 for r in taken):
            continue
        cx, cy = (xa + xb) / 2 + rad * (yb - ya), (ya + yb) / 2 - rad * (xb - xa)
        curve = [((1 - t) ** 2 * xa + 2 * t * (1 - t) * cx + t ** 2 * xb,
                  (1 - t) ** 2 * ya + 2 * t * (1 - t) * cy + t ** 2 * yb) for t in (i / 40 for i in range(1, 40))]
        hits = sum(_in_node(p, n, g, pos, pad=0.1) for p in curve for n in g.nodes if n not in (src, dst))
        if best is None or hits < best[0]:
            best = (hits, rad)
        if hits == 0:
            break
    assert best is not None, "the straight line is always a candidate"
    return best[1]


def _place_label(op: str, a: tuple[float, float], b: tuple[float, float], rad: float, g: CellGraph,
                 pos: dict[int, tuple[float, float]], placed: list[tuple[float, float]],
                 ) -> tuple[float, float, float, list[tuple[float, float]]]:
    """Where ``op`` goes on the edge a -> b: the position along the curve (from :data:`_LABEL_T`) whose
    label overlaps the fewest nodes and already placed labels, turned to follow the curve but never upside
    down. Labels are modelled as points sampled along their length; returns (x, y, angle, points)."""
    (xa, ya), (xb, yb) = a, b
    cx, cy = (xa + xb) / 2 + rad * (yb - ya), (ya + yb) / 2 - rad * (xb - xa)
    length = 0.6 * _LABEL_PT / 72 * len(op) + 0.1
    best = None
    for t in _LABEL_T:
        x = (1 - t) ** 2 * xa + 2 * t * (1 - t) * cx + t ** 2 * xb
        y = (1 - t) ** 2 * ya + 2 * t * (1 - t) * cy + t ** 2 * yb
        tx = 2 * (1 - t) * (cx - xa) + 2 * t * (xb - cx)
        ty = 2 * (1 - t) * (cy - ya) + 2 * t * (yb - cy)
        norm = math.hypot(tx, ty) or 1.0
        ux, uy = tx / norm, ty / norm
        points = [(x + s * ux, y + s * uy) for s in (length * (k / 8 - 0.5) for k in range(9))]
        clash = sum(_in_node(p, n, g, pos) for p in points for n in g.nodes)
        clash += sum(math.hypot(p[0] - q[0], p[1] - q[1]) < _LABEL_H for p in points for q in placed)
        if best is None or clash < best[0]:
            best = (clash, x, y, ux, uy, points)
        if clash == 0:
            break
    assert best is not None, "_LABEL_T is not empty"
    _, x, y, ux, uy, points = best
    angle = math.degrees(math.atan2(uy, ux))
    if angle > 90:
        angle -= 180
    elif angle < -90:
        angle += 180
    return x, y, angle, points


def _in_node(p: tuple[float, float], n: int, g: CellGraph, pos: dict[int, tuple[float, float]],
             pad: float = 0.07) -> bool:
    dx, dy = abs(p[0] - pos[n][0]), abs(p[1] - pos[n][1])
    if 2 <= n < g.output:
        return math.hypot(dx, dy) < _RADIUS + pad
    return dx < _BOX_W / 2 + pad and dy < _BOX_H / 2 + pad
