"""Genotypes: plain data describing a discrete DARTS cell pair, kept apart from the modules built from it.

A cell has two input nodes (0: the output of the cell before the previous one, 1: the previous cell's
output) and ``steps`` intermediate nodes. Intermediate node ``i`` (numbered from 2) takes exactly two
incoming edges ``(op, j)`` with ``j < i``; the cell output concatenates the nodes in ``*_concat``.
"""
from __future__ import annotations

import ast
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nasxserve.errors import GenotypeError
from nasxserve.nas.ops import PRIMITIVES

Edge = tuple[str, int]


@dataclass(frozen=True)
class Genotype:
    """A normal and a reduction cell: lists of ``(operation, input node)`` edges, two per node."""

    normal: tuple[Edge, ...]
    normal_concat: tuple[int, ...]
    reduce: tuple[Edge, ...]
    reduce_concat: tuple[int, ...]

    def __post_init__(self) -> None:
        for field in ("normal", "reduce"):
            edges = tuple((str(op), int(j)) for op, j in getattr(self, field))
            object.__setattr__(self, field, edges)
        for field in ("normal_concat", "reduce_concat"):
            object.__setattr__(self, field, tuple(int(i) for i in getattr(self, field)))
        self.validate()

    @property
    def steps(self) -> int:
        """Number of intermediate nodes per cell."""
        return len(self.normal) // 2

    def validate(self) -> None:
        """Raise :class:`GenotypeError` unless both cells are well formed."""
        for name, edges, concat in (("normal", self.normal, self.normal_concat),
                                    ("reduce", self.reduce, self.reduce_concat)):
            if not edges or len(edges) % 2:
                raise GenotypeError(f"genotype {name} cell needs two edges per node, got {len(edges)} edges")
            steps = len(edges) // 2
            for k, (op, j) in enumerate(edges):
                node = 2 + k // 2
                if op not in PRIMITIVES:
                    raise GenotypeError(f"genotype {name} cell: unknown operation {op!r}; "
                                        f"known: {', '.join(PRIMITIVES)}")
                if not 0 <= j < node:
                    raise GenotypeError(f"genotype {name} cell: node {node} cannot take input from node {j}")
            if not concat or any(not 0 <= i < steps + 2 for i in concat):
                raise GenotypeError(f"genotype {name}_concat {list(concat)} must name nodes 0..{steps + 1}")
        if len(self.normal) != len(self.reduce):
            raise GenotypeError("genotype normal and reduce cells must have the same number of nodes")

    def count(self, op: str) -> dict[str, int]:
        """How many edges of each cell use ``op``, e.g. skip connections (R-DARTS' failure mode)."""
        return {"normal": sum(o == op for o, _ in self.normal), "reduce": sum(o == op for o, _ in self.reduce)}

    def parametric(self, cell: str = "normal") -> int:
        """How many of ``cell``'s edges are convolutions (the operations with weights)."""
        return sum(_is_convolution(op) for op, _ in getattr(self, cell))

    def collapsed(self) -> bool:
        """True when the normal cell keeps fewer than 2 convolutions: the parameter-free cell (pools and skip
        connections) that an unstable DARTS search degenerates to (R-DARTS, Zela et al. 2020)."""
        return self.parametric("normal") < 2

    def to_dict(self) -> dict[str, Any]:
        return {
            "normal": [[op, j] for op, j in self.normal],
            "normal_concat": list(self.normal_concat),
            "reduce": [[op, j] for op, j in self.reduce],
            "reduce_concat": list(self.reduce_concat),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Genotype:
        try:
            return cls(normal=tuple((op, j) for op, j in d["normal"]), normal_concat=tuple(d["normal_concat"]),
                       reduce=tuple((op, j) for op, j in d["reduce"]), reduce_concat=tuple(d["reduce_concat"]))
        except GenotypeError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise GenotypeError(f"not a genotype: expected keys normal, normal_concat, reduce, reduce_concat "
                                f"with [op, input] pairs ({type(e).__name__}: {e})") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> Genotype:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise GenotypeError(f"genotype is not valid JSON: {e}") from None
        if isinstance(data, dict) and "genotype" in data:
            data = data["genotype"]
        if not isinstance(data, dict):
            raise GenotypeError("genotype JSON must be an object with normal, normal_concat, reduce, reduce_concat")
        return cls.from_dict(data)

    def to_darts_string(self) -> str:
        """The form DARTS' ``genotypes.py`` prints: ``Genotype(normal=[('sep_conv_3x3', 1), ...], ...)``."""
        return (f"Genotype(normal={list(self.normal)}, normal_concat={list(self.normal_concat)}, "
                f"reduce={list(self.reduce)}, reduce_concat={list(self.reduce_concat)})")

    @classmethod
    def from_darts_string(cls, text: str) -> Genotype:
        """Parse the DARTS namedtuple repr, with lists or ``range(a, b)`` for the concat fields."""
        try:
            call = ast.parse(text.strip(), mode="eval").body
        except SyntaxError as e:
            raise GenotypeError(f"cannot parse genotype string: {e.msg}") from None
        if not (isinstance(call, ast.Call) and getattr(call.func, "id", None) == "Genotype"):
            raise GenotypeError("a genotype string looks like Genotype(normal=[...], normal_concat=..., "
                                "reduce=[...], reduce_concat=...)")
        fields = ("normal", "normal_concat", "reduce", "reduce_concat")
        values: dict[str, Any] = dict(zip(fields, (_literal(a) for a in call.args)))
        for kw in call.keywords:
            if kw.arg not in fields:
                raise GenotypeError(f"unknown genotype field {kw.arg!r}")
            values[kw.arg] = _literal(kw.value)
        return cls.from_dict(values)


def _literal(node: ast.expr) -> Any:
    """Evaluate a literal or a ``range(a, b)`` call without executing code."""
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "range":
        return list(range(*(_literal(a) for a in node.args)))
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise GenotypeError(f"unsupported expression in genotype string: {ast.unparse(node)}") from None


_CONCAT = (2, 3, 4, 5)

# Published cells (CIFAR-10 searches), from the papers' released genotypes.
DARTS_V1 = Genotype(
    normal=(("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 0), ("sep_conv_3x3", 1),
            ("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 2)),
    normal_concat=_CONCAT,
    reduce=(("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 0),
            ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("avg_pool_3x3", 0)),
    reduce_concat=_CONCAT,
)
DARTS_V2 = Genotype(
    normal=(("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)),
    normal_concat=_CONCAT,
    reduce=(("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
            ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)),
    reduce_concat=_CONCAT,
)
PC_DARTS = Genotype(
    normal=(("sep_conv_3x3", 1), ("skip_connect", 0), ("sep_conv_3x3", 0), ("dil_conv_3x3", 1),
            ("sep_conv_5x5", 0), ("sep_conv_3x3", 1), ("avg_pool_3x3", 0), ("dil_conv_3x3", 1)),
    normal_concat=_CONCAT,
    reduce=(("sep_conv_5x5", 1), ("max_pool_3x3", 0), ("sep_conv_5x5", 1), ("sep_conv_5x5", 2),
            ("sep_conv_3x3", 0), ("sep_conv_3x3", 3), ("sep_conv_3x3", 1), ("sep_conv_3x3", 2)),
    reduce_concat=_CONCAT,
)
PDARTS = Genotype(
    normal=(("skip_connect", 0), ("dil_conv_3x3", 1), ("skip_connect", 0), ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 1), ("sep_conv_3x3", 3), ("sep_conv_3x3", 0), ("dil_conv_5x5", 4)),
    normal_concat=_CONCAT,
    reduce=(("avg_pool_3x3", 0), ("sep_conv_5x5", 1), ("sep_conv_3x3", 0), ("dil_conv_5x5", 2),
            ("max_pool_3x3", 0), ("dil_conv_3x3", 1), ("dil_conv_3x3", 1), ("dil_conv_5x5", 3)),
    reduce_concat=_CONCAT,
)

GENOTYPES: dict[str, Genotype] = {"DARTS_V1": DARTS_V1, "DARTS_V2": DARTS_V2, "PC_DARTS": PC_DARTS,
                                  "PDARTS": PDARTS}


GENOTYPE_SOURCES = ("a run directory with a genotype.json (from nasx search or nasx train), a genotype file (JSON or "
                    "a DARTS Genotype(...) string), a Genotype(...) string as nasx search prints it, or a published "
                    f"name: {', '.join(GENOTYPES)}")


def resolve_genotype(source: str) -> tuple[Genotype, str]:
    """The genotype ``source`` names, and where it came from (a file's path, a published name, or ``"the
    Genotype(...) string given"``).

    ``source`` is a published name (case-insensitive), a DARTS ``Genotype(...)`` string (``nasx search``
    prints one to paste), a run directory (its ``genotype.json``) or a genotype file (JSON, bare or as
    ``{"genotype": {...}}``, or a DARTS string). Anything else raises :class:`GenotypeError` saying what to
    pass instead.
    """
    by_name = {k.lower(): k for k in GENOTYPES}
    if source.lower() in by_name:
        name = by_name[source.lower()]
        return GENOTYPES[name], name
    if source.lstrip().startswith("Genotype("):
        return Genotype.from_darts_string(source), "the Genotype(...) string given"
    path = Path(source)
    try:
        is_dir, is_file = path.is_dir(), path.is_file()
    except OSError:   # e.g. a pasted string too long to be a file name
        is_dir = is_file = False
    if is_dir:
        path = path / "genotype.json"
        if not path.is_file():
            raise GenotypeError(f"{source} has no genotype.json (the search has not finished there, or it is not a "
                                f"run directory); pass {GENOTYPE_SOURCES}")
    elif not is_file:
        raise GenotypeError(f"{source!r}: no such file or directory, nor a published genotype; pass {GENOTYPE_SOURCES}")
    text = path.read_text(encoding="utf-8", errors="replace").strip()
    try:
        genotype = Genotype.from_darts_string(text) if text.startswith("Genotype(") else Genotype.from_json(text)
    except GenotypeError as e:
        raise GenotypeError(f"{path}: {e}") from None
    return genotype, str(path)


def load_genotype(source: str) -> Genotype:
    """The genotype ``source`` names: see :func:`resolve_genotype`."""
    return resolve_genotype(source)[0]


def derive_genotype(weights_normal: np.ndarray, weights_reduce: np.ndarray, steps: int = 4,
                    multiplier: int = 4, edge_scale_normal: Sequence[float] | np.ndarray | None = None,
                    edge_scale_reduce: Sequence[float] | np.ndarray | None = None) -> Genotype:
    """Discretise mixing weights (DARTS section 2.4): per node, the two incoming edges whose strongest
    operation other than ``none`` is strongest, each with that operation.

    Args:
        weights_normal, weights_reduce: (E, |O|) softmaxed architecture weights, E = sum_{i<steps} (2+i)
            edges in node order, columns in :data:`PRIMITIVES` order.
        edge_scale_*: optional (E,) per-edge factors multiplied into the weights before ranking edges
            (PC-DARTS edge normalisation).
    """
    concat = tuple(range(2 + steps - multiplier, steps + 2))
    return Genotype(normal=_parse_cell(weights_normal, steps, edge_scale_normal), normal_concat=concat,
                    reduce=_parse_cell(weights_reduce, steps, edge_scale_reduce), reduce_concat=concat)


def _parse_cell(weights: np.ndarray, steps: int,
                edge_scale: Sequence[float] | np.ndarray | None) -> tuple[Edge, ...]:
    w = np.asarray(weights, dtype=np.float64)
    expected = sum(2 + i for i in range(steps))
    if w.shape != (expected, len(PRIMITIVES)):
        raise ValueError(f"expected weights of shape ({expected}, {len(PRIMITIVES)}), got {w.shape}")
    if edge_scale is not None:
        w = w * np.asarray(edge_scale, dtype=np.float64)[:, None]
    w = w.copy()
    w[:, PRIMITIVES.index("none")] = -np.inf
    edges: list[Edge] = []
    start = 0
    for i in range(steps):
        n_in = 2 + i
        block = w[start:start + n_in]
        strongest = block.max(axis=1)
        # stable sort: on ties the lower input index wins
        for j in np.argsort(-strongest, kind="stable")[:2]:
            edges.append((PRIMITIVES[int(block[j].argmax())], int(j)))
        start += n_in
    return tuple(edges)


def derive_constrained(weights_normal: np.ndarray, weights_reduce: np.ndarray, steps: int, multiplier: int, *,
                       max_skips: int | None = None, min_convolutions: int = 0,
                       edge_scale_normal: Sequence[float] | np.ndarray | None = None,
                       edge_scale_reduce: Sequence[float] | np.ndarray | None = None) -> Genotype:
    """The genotype whose normal cell holds at most ``max_skips`` skip connections and at least
    ``min_convolutions`` convolutions: P-DARTS' architecture refinement (section 3.3, as its reference applies it,
    see :func:`~nasxserve.training.strategies.p_darts.derive_limiting_skips`), and the same rule for every
    parameter-free operation (pools and skips) when convolutions are asked for.

    The cell is derived as :func:`derive_genotype` does. While it breaks a limit, the chosen edge whose offending
    operation weighs least (a skip while there are too many skips, else any parameter-free operation) has that
    weight set to 0 and the cell is derived again, so the edge falls back to its runner-up operation or gives its
    place to another input of its node. Stops early, with the limit broken, when no such chosen edge has another
    operation left.

    Args:
        weights_normal, weights_reduce: (E, |PRIMITIVES|) mixing weights, 0 where an edge holds no such operation;
            E = sum_{i<steps} (2 + i). Only the normal cell is constrained.
        max_skips: None: no limit on skips.
        min_convolutions: 0: no floor on convolutions.
        edge_scale_*: optional (E,) per-edge factors (PC-DARTS edge normalisation), as in :func:`derive_genotype`.
    """
    w = np.array(weights_normal, dtype=np.float64)
    if edge_scale_normal is not None:
        w = w * np.asarray(edge_scale_normal, dtype=np.float64)[:, None]
    others = [PRIMITIVES.index(op) for op in PRIMITIVES if op != "none"]
    parameter_free = {op for op in PRIMITIVES if op != "none" and not _is_convolution(op)}
    while True:
        genotype = derive_genotype(w, weights_reduce, steps, multiplier, edge_scale_reduce=edge_scale_reduce)
        if max_skips is not None and genotype.count("skip_connect")["normal"] > max_skips:
            offending = {"skip_connect"}
        elif genotype.parametric("normal") < min_convolutions:
            offending = parameter_free
        else:
            return genotype
        chosen = [(e, PRIMITIVES.index(op)) for e, (op, _) in _search_edges(genotype.normal)
                  if op in offending and (w[e, others] > 0).sum() > 1]
        if not chosen:
            return genotype
        edge, op = min(chosen, key=lambda c: w[c])
        w[edge, op] = 0.0


def _is_convolution(op: str) -> bool:
    return op.endswith(("conv_3x3", "conv_5x5"))


def _search_edges(cell: Sequence[Edge]) -> list[tuple[int, Edge]]:
    """(index of the edge in the search cell's (E, |PRIMITIVES|) weights, edge) for each edge of ``cell``."""
    out, start = [], 0
    for i in range(len(cell) // 2):
        out += [(start + j, (op, j)) for op, j in cell[2 * i:2 * i + 2]]
        start += 2 + i
    return out
