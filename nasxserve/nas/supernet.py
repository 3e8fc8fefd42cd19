"""The differentiable search network: cells whose edges are softmax-weighted mixtures of candidate operations.

Each edge (i, j) computes eq. (3) of the NASXNet paper (eq. 2 of DARTS):
``o_bar(x) = sum_o softmax(alpha^(i,j))_o * o(x)``. Two published variants plug into the same cells:

- PC-DARTS (Xu et al., 2020): *partial channel connections*. Only a 1/K sample of an edge's channels
  goes through the mixture, the rest bypass it (max-pooled on strided edges), then the channels are
  shuffled (section 3.2, eq. 2); and *edge normalisation*: node j sums its incoming edges weighted by
  ``softmax(beta)`` over those edges (section 3.3, eq. 4), which also weighs the edges when the genotype
  is derived.
- P-DARTS (Chen et al., 2019): each edge may hold a subset of the candidates (operations are dropped
  between stages, section 3.2), and skip connections may be followed by dropout (section 3.3).

The network is a feature extractor f: it maps (B, C_in, H, W) images to the latent z of shape
(B, D, H / 4, W / 4), or (B, D, H / 2, W / 2) with one reduction cell; the heads live in :mod:`nasxserve.protos`.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nasxserve.nas.genotype import Genotype, derive_genotype
from nasxserve.nas.network import reduction_cells
from nasxserve.nas.ops import PRIMITIVES, FactorizedReduce, ReLUConvBN, build_op

Candidates = Sequence[Sequence[str]]   # per edge, the operation names it mixes (in PRIMITIVES order)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's channel shuffle: (B, C, H, W) -> (B, C, H, W), channel ``g * (C / groups) + i``
    moving to ``i * groups + g``."""
    b, c, h, w = x.shape
    return x.reshape(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class MixedOp(nn.Module):
    """One edge of a search cell: the weighted sum of its candidate operations (eq. 3).

    Args:
        channels: C, input and output channels of the edge.
        stride: 2 on the edges leaving a reduction cell's inputs, else 1.
        candidates: the operations mixed on this edge (default all of :data:`PRIMITIVES`).
        partial: ``None`` for DARTS; K for PC-DARTS, where only the first C / K channels are mixed and
            the rest bypass the edge (max-pooled 2x2 when it strides), followed by a channel shuffle in
            K groups. K = 1 mixes every channel and is DARTS computed the PC-DARTS way.

    Two rewrites keep the mathematics and save CPU time: ``none`` outputs zeros, so its term is left
    out of the sum (value and gradients are those of adding ``w_none * 0``); and the operations that
    begin with a ReLU (the four convolutions, the strided skip) share one ``relu(x)``.
    """

    def __init__(self, channels: int, stride: int, candidates: Sequence[str] = PRIMITIVES,
                 partial: int | None = None):
        super().__init__()
        if partial is not None and (partial < 1 or channels % partial):
            raise ValueError(f"partial channels K={partial} must be >= 1 and divide the edge's {channels} channels")
        self.stride = stride
        self.partial = partial
        self.candidates = tuple(candidates)
        self.skip_dropout = 0.0
        mixed_channels = channels // (partial or 1)
        ops = []
        for name in self.candidates:
            op = build_op(name, mixed_channels, stride, affine=False)
            if "pool" in name:
                op = nn.Sequential(op, nn.BatchNorm2d(mixed_channels, affine=False))
            ops.append(op)
        self._ops = nn.ModuleList(ops)
        self._identity_skip = stride == 1 and "skip_connect" in self.candidates

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W); weights: (len(candidates),) mixing weights -> (B, C, H / stride, W / stride)."""
        if self.partial is None:
            return self._mix(x, weights)
        k = x.shape[1] // self.partial
        parts = [self._mix(x[:, :k], weights)]
        if self.partial > 1:
            bypass = x[:, k:]
            parts.append(F.max_pool2d(bypass, 2, 2) if self.stride == 2 else bypass)
        return channel_shuffle(torch.cat(parts, dim=1), self.partial)

    def _mix(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        relu_x = F.relu(x)
        out = None
        for k, (name, op) in enumerate(zip(self.candidates, self._ops)):
            if name == "none":
                continue
            from_relu = getattr(op, "forward_from_relu", None)
            y = from_relu(relu_x) if from_relu is not None else op(x)
            if name == "skip_connect" and self._identity_skip and self.skip_dropout > 0:
                y = F.dropout(y, self.skip_dropout, self.training)
            out = weights[k] * y if out is None else out + weights[k] * y
        assert out is not None, "an edge holds an operation besides 'none'"
        return out


class SearchCell(nn.Module):
    """A cell of mixed edges: two inputs, ``steps`` intermediate nodes, output = concat of the last
    ``multiplier`` nodes, (B, multiplier * C, H', W')."""

    def __init__(self, steps: int, multiplier: int, c_prev_prev: int, c_prev: int, c: int, reduction: bool,
                 reduction_prev: bool, candidates: Candidates, partial: int | None = None):
        super().__init__()
        self.reduction = reduction
        self.steps = steps
        self.multiplier = multiplier
        self.preprocess0 = (FactorizedReduce(c_prev_prev, c, affine=False) if reduction_prev
                            else ReLUConvBN(c_prev_prev, c, 1, 1, 0, affine=False))
        self.preprocess1 = ReLUConvBN(c_prev, c, 1, 1, 0, affine=False)
        edges = [(i, j) for i in range(steps) for j in range(2 + i)]
        self.edges = nn.ModuleList(
            MixedOp(c, 2 if reduction and j < 2 else 1, candidates[e], partial) for e, (i, j) in enumerate(edges)
        )

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor,
                edge_weights: torch.Tensor | None = None) -> torch.Tensor:
        """weights: (E, n) with E = number of edges, in node order; edge_weights: optional (E,) factors
        on the edges (PC-DARTS edge normalisation)."""
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(self.steps):
            terms = [self.edges[offset + j](h, weights[offset + j]) for j, h in enumerate(states)]
            if edge_weights is not None:
                terms = [edge_weights[offset + j] * t for j, t in enumerate(terms)]
            node = sum(terms)
            offset += len(states)
            states.append(node)
        return torch.cat(states[-self.multiplier:], dim=1)


def _use_batch_statistics(module: nn.Module) -> None:
    """Make every BatchNorm normalise with the statistics of the batch at hand, in eval mode too.

    Training is unchanged (it always uses batch statistics). Running averages would lag behind
    weights and alphas that change every step, so evaluation and prototype projection in eval mode
    would see different latents from the ones the search trains on.
    """
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None


def num_edges(steps: int) -> int:
    """Edges in a cell with ``steps`` intermediate nodes: 2 + 3 + ... + (steps + 1)."""
    return sum(2 + i for i in range(steps))


class SearchNetwork(nn.Module):
    """The over-parameterised feature extractor searched by DARTS and its variants.

    Stem conv, then ``layers`` search cells with reduction cells at 1/3 and 2/3 of the depth (or at 1/3 alone
    with ``reductions`` 1: :func:`~nasxserve.nas.network.reduction_cells`). The
    architecture parameters ``alphas_normal`` and ``alphas_reduce`` have shape (E, n): E edges (14 for 4
    steps), n candidate operations per edge (8 unless P-DARTS dropped some); every normal cell shares
    the first, every reduction cell the second. With edge normalisation (PC-DARTS) there are also
    ``betas_normal`` and ``betas_reduce`` of shape (E,).

    Args:
        candidates_normal, candidates_reduce: per edge, the operations it mixes; every edge of a cell
            type must have the same number. Default: all of :data:`PRIMITIVES` on every edge.
        partial_channels: PC-DARTS' K (``None``: DARTS' full mixed operation).
        edge_normalisation: PC-DARTS' softmaxed beta weights on each node's incoming edges.

    Input (B, in_channels, H, W) -> output z (B, out_channels, H / 2^r, W / 2^r), r = ``reductions``.
    """

    def __init__(self, channels: int = 16, layers: int = 8, in_channels: int = 3, steps: int = 4,
                 multiplier: int = 4, stem_multiplier: int = 3, candidates_normal: Candidates | None = None,
                 candidates_reduce: Candidates | None = None, partial_channels: int | None = None,
                 edge_normalisation: bool = False, reductions: int = 2):
        super().__init__()
        self.steps = steps
        self.multiplier = multiplier
        e = num_edges(steps)
        self.candidates = {"normal": _check_candidates(candidates_normal, e, "normal"),
                           "reduce": _check_candidates(candidates_reduce, e, "reduce")}
        c_curr = stem_multiplier * channels
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c_curr, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(c_curr))
        c_prev_prev, c_prev, c_curr = c_curr, c_curr, channels
        cells = []
        reduction_prev = False
        reducing = reduction_cells(layers, reductions)
        for i in range(layers):
            reduction = i in reducing
            if reduction:
                c_curr *= 2
            cells.append(SearchCell(steps, multiplier, c_prev_prev, c_prev, c_curr, reduction, reduction_prev,
                                    self.candidates["reduce" if reduction else "normal"], partial_channels))
            reduction_prev = reduction
            c_prev_prev, c_prev = c_prev, multiplier * c_curr
        self.cells = nn.ModuleList(cells)
        self.out_channels = c_prev
        _use_batch_statistics(self)
        self.alphas_normal = nn.Parameter(1e-3 * torch.randn(e, len(self.candidates["normal"][0])))
        self.alphas_reduce = nn.Parameter(1e-3 * torch.randn(e, len(self.candidates["reduce"][0])))
        self.edge_normalisation = edge_normalisation
        if edge_normalisation:
            self.betas_normal = nn.Parameter(1e-3 * torch.randn(e))
            self.betas_reduce = nn.Parameter(1e-3 * torch.randn(e))

    def arch_parameters(self) -> list[nn.Parameter]:
        return [getattr(self, n) for n in self.arch_parameter_names()]

    def arch_parameter_names(self) -> list[str]:
        """Names of the architecture parameters in ``named_parameters()`` (alphas, then betas if any)."""
        names = ["alphas_normal", "alphas_reduce"]
        return names + (["betas_normal", "betas_reduce"] if self.edge_normalisation else [])

    def weight_parameters(self) -> Iterator[nn.Parameter]:
        arch = {id(p) for p in self.arch_parameters()}
        return (p for p in self.parameters() if id(p) not in arch)

    def set_skip_dropout(self, p: float) -> None:
        """Dropout probability after every stride-1 skip connection (P-DARTS section 3.3)."""
        for m in self.modules():
            if isinstance(m, MixedOp):
                m.skip_dropout = p

    def edge_weights(self, betas: torch.Tensor) -> torch.Tensor:
        """(E,) betas -> (E,) edge weights: a softmax over each node's incoming edges (PC-DARTS eq. 4)."""
        sizes = [2 + i for i in range(self.steps)]
        return torch.cat([F.softmax(b, dim=-1) for b in torch.split(betas, sizes)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_normal = F.softmax(self.alphas_normal, dim=-1)
        w_reduce = F.softmax(self.alphas_reduce, dim=-1)
        e_normal = e_reduce = None
        if self.edge_normalisation:
            e_normal, e_reduce = self.edge_weights(self.betas_normal), self.edge_weights(self.betas_reduce)
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            if cell.reduction:
                s0, s1 = s1, cell(s0, s1, w_reduce, e_reduce)
            else:
                s0, s1 = s1, cell(s0, s1, w_normal, e_normal)
        return s1

    def mixing_weights(self) -> dict[str, np.ndarray]:
        """Softmaxed alphas scattered into (E, |PRIMITIVES|) arrays, 0 for operations an edge no longer
        holds: the form genotype derivation and operation dropping read."""
        out = {}
        with torch.no_grad():
            for kind, alphas in (("normal", self.alphas_normal), ("reduce", self.alphas_reduce)):
                w = F.softmax(alphas.float(), dim=-1).cpu().numpy()
                full = np.zeros((w.shape[0], len(PRIMITIVES)))
                for e, names in enumerate(self.candidates[kind]):
                    full[e, [PRIMITIVES.index(n) for n in names]] = w[e]
                out[kind] = full
        return out

    def edge_scales(self) -> dict[str, np.ndarray | None]:
        """The (E,) normalised edge weights per cell type, or None without edge normalisation."""
        if not self.edge_normalisation:
            return {"normal": None, "reduce": None}
        with torch.no_grad():
            return {"normal": self.edge_weights(self.betas_normal.float()).cpu().numpy(),
                    "reduce": self.edge_weights(self.betas_reduce.float()).cpu().numpy()}

    def genotype(self) -> Genotype:
        """The discrete cells these alphas select: top-2 incoming edges per node, ``none`` excluded, edges
        ranked by their strongest operation (times the edge weight under edge normalisation)."""
        w, scale = self.mixing_weights(), self.edge_scales()
        return derive_genotype(w["normal"], w["reduce"], self.steps, self.multiplier,
                               scale["normal"], scale["reduce"])


def _check_candidates(candidates: Candidates | None, edges: int, kind: str) -> tuple[tuple[str, ...], ...]:
    if candidates is None:
        return tuple(PRIMITIVES for _ in range(edges))
    out = tuple(tuple(c) for c in candidates)
    if len(out) != edges:
        raise ValueError(f"{kind} candidates: expected {edges} edges, got {len(out)}")
    if len({len(c) for c in out}) != 1 or not out[0]:
        raise ValueError(f"{kind} candidates: every edge needs the same, non-zero number of operations")
    for c in out:
        unknown = [n for n in c if n not in PRIMITIVES]
        if unknown or list(c) != sorted(c, key=PRIMITIVES.index) or len(set(c)) != len(c):
            raise ValueError(f"{kind} candidates {list(c)}: distinct names from {PRIMITIVES}, in that order")
    return out
