"""The DARTS search network: cells whose edges are softmax-weighted mixtures of all candidate operations.

Each edge (i, j) computes eq. (3) of the NASXNet paper (eq. 2 of DARTS):
``o_bar(x) = sum_o softmax(alpha^(i,j))_o * o(x)``. The network is a feature extractor f: it maps
(B, C_in, H, W) images to the latent z of shape (B, D, H / 4, W / 4); the heads live in
:mod:`nasxserve.protos`.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from nasxserve.nas.genotype import Genotype, derive_genotype
from nasxserve.nas.ops import PRIMITIVES, FactorizedReduce, ReLUConvBN, build_op

_NONE = PRIMITIVES.index("none")


class MixedOp(nn.Module):
    """One edge of a search cell: the weighted sum of every candidate operation (eq. 3).

    Two rewrites keep the mathematics and save CPU time: ``none`` outputs zeros, so its term is left
    out of the sum (value and gradients are those of adding ``w_none * 0``); and the operations that
    begin with a ReLU (the four convolutions, the strided skip) share one ``relu(x)``.
    """

    def __init__(self, channels: int, stride: int):
        super().__init__()
        ops = []
        for name in PRIMITIVES:
            op = build_op(name, channels, stride, affine=False)
            if "pool" in name:
                op = nn.Sequential(op, nn.BatchNorm2d(channels, affine=False))
            ops.append(op)
        self._ops = nn.ModuleList(ops)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W); weights: (|O|,) mixing weights in :data:`PRIMITIVES` order."""
        relu_x = F.relu(x)
        out = None
        for k, op in enumerate(self._ops):
            if k == _NONE:
                continue
            y = op.forward_from_relu(relu_x) if hasattr(op, "forward_from_relu") else op(x)
            out = weights[k] * y if out is None else out + weights[k] * y
        return out


class SearchCell(nn.Module):
    """A cell of mixed edges: two inputs, ``steps`` intermediate nodes, output = concat of the last
    ``multiplier`` nodes, (B, multiplier * C, H', W')."""

    def __init__(self, steps: int, multiplier: int, c_prev_prev: int, c_prev: int, c: int, reduction: bool,
                 reduction_prev: bool):
        super().__init__()
        self.reduction = reduction
        self.steps = steps
        self.multiplier = multiplier
        self.preprocess0 = (FactorizedReduce(c_prev_prev, c, affine=False) if reduction_prev
                            else ReLUConvBN(c_prev_prev, c, 1, 1, 0, affine=False))
        self.preprocess1 = ReLUConvBN(c_prev, c, 1, 1, 0, affine=False)
        self.edges = nn.ModuleList(
            MixedOp(c, 2 if reduction and j < 2 else 1) for i in range(steps) for j in range(2 + i)
        )

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """weights: (E, |O|) with E = number of edges, in node order."""
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(self.steps):
            node = sum(self.edges[offset + j](h, weights[offset + j]) for j, h in enumerate(states))
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
    """The over-parameterised feature extractor searched by DARTS.

    Stem conv, then ``layers`` search cells with reduction cells at 1/3 and 2/3 of the depth. The
    architecture parameters ``alphas_normal`` and ``alphas_reduce`` have shape (E, |O|) = (14, 8)
    for 4 steps; every normal cell shares the first, every reduction cell the second.

    Input (B, in_channels, H, W) -> output z (B, out_channels, H / 4, W / 4).
    """

    def __init__(self, channels: int = 16, layers: int = 8, in_channels: int = 3, steps: int = 4,
                 multiplier: int = 4, stem_multiplier: int = 3):
        super().__init__()
        self.steps = steps
        self.multiplier = multiplier
        c_curr = stem_multiplier * channels
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c_curr, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(c_curr))
        c_prev_prev, c_prev, c_curr = c_curr, c_curr, channels
        cells = []
        reduction_prev = False
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                c_curr *= 2
            cells.append(SearchCell(steps, multiplier, c_prev_prev, c_prev, c_curr, reduction, reduction_prev))
            reduction_prev = reduction
            c_prev_prev, c_prev = c_prev, multiplier * c_curr
        self.cells = nn.ModuleList(cells)
        self.out_channels = c_prev
        _use_batch_statistics(self)
        e = num_edges(steps)
        self.alphas_normal = nn.Parameter(1e-3 * torch.randn(e, len(PRIMITIVES)))
        self.alphas_reduce = nn.Parameter(1e-3 * torch.randn(e, len(PRIMITIVES)))

    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.alphas_normal, self.alphas_reduce]

    def weight_parameters(self) -> Iterator[nn.Parameter]:
        arch = {id(p) for p in self.arch_parameters()}
        return (p for p in self.parameters() if id(p) not in arch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_normal = F.softmax(self.alphas_normal, dim=-1)
        w_reduce = F.softmax(self.alphas_reduce, dim=-1)
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, w_reduce if cell.reduction else w_normal)
        return s1

    def genotype(self) -> Genotype:
        """The discrete cells these alphas select (top-2 incoming edges per node, ``none`` excluded)."""
        with torch.no_grad():
            wn = F.softmax(self.alphas_normal, dim=-1).cpu().numpy()
            wr = F.softmax(self.alphas_reduce, dim=-1).cpu().numpy()
        return derive_genotype(wn, wr, self.steps, self.multiplier)
