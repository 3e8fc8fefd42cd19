"""The discrete feature extractor built from a :class:`Genotype` (DARTS' evaluation network).

Input (B, in_channels, H, W) -> z (B, out_channels, H / 4, W / 4) with DARTS' two reduction cells, or
(B, out_channels, H / 2, W / 2) with the first alone, plus the logits of the DARTS auxiliary tower (attached
after the cell at 2/3 depth) while training, when enabled.
"""
from __future__ import annotations

import torch
from torch import nn

from nasxserve.nas.genotype import Edge, Genotype
from nasxserve.nas.ops import FactorizedReduce, ReLUConvBN, build_op


REDUCTIONS = (1, 2)


def reduction_cells(layers: int, reductions: int = 2) -> tuple[int, ...]:
    """Indices of the reduction cells among ``layers`` cells: DARTS' two, at 1/3 and 2/3 of the depth, or
    the first of them alone, which halves the image's side once instead of twice, so that the latent grid
    (and a prototype's box) is fine enough for parts a few pixels wide."""
    if reductions not in REDUCTIONS:
        raise ValueError(f"reductions must be one of {REDUCTIONS}, got {reductions}")
    return (layers // 3, 2 * layers // 3)[:reductions]


def drop_path(x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """Zero whole samples of a branch with probability ``drop_prob``, rescaling the survivors."""
    if drop_prob <= 0.0:
        return x
    keep = 1.0 - drop_prob
    mask = torch.empty(x.size(0), 1, 1, 1, device=x.device, dtype=x.dtype).bernoulli_(keep)
    return x / keep * mask


class Cell(nn.Module):
    """A discrete cell: each intermediate node sums two operations of earlier nodes."""

    def __init__(self, genotype: Genotype, c_prev_prev: int, c_prev: int, c: int, reduction: bool,
                 reduction_prev: bool):
        super().__init__()
        self.reduction = reduction
        self.preprocess0 = (FactorizedReduce(c_prev_prev, c) if reduction_prev
                            else ReLUConvBN(c_prev_prev, c, 1, 1, 0))
        self.preprocess1 = ReLUConvBN(c_prev, c, 1, 1, 0)
        edges: tuple[Edge, ...] = genotype.reduce if reduction else genotype.normal
        self.concat = genotype.reduce_concat if reduction else genotype.normal_concat
        self.steps = len(edges) // 2
        self.inputs = [j for _, j in edges]
        self.ops = nn.ModuleList(build_op(op, c, 2 if reduction and j < 2 else 1) for op, j in edges)
        self.multiplier = len(self.concat)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, drop_prob: float) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i in range(self.steps):
            node = None
            for k in (2 * i, 2 * i + 1):
                op = self.ops[k]
                h = op(states[self.inputs[k]])
                if self.training and not isinstance(op, nn.Identity):
                    h = drop_path(h, drop_prob)
                node = h if node is None else node + h
            states.append(node)
        return torch.cat([states[i] for i in self.concat], dim=1)


class AuxiliaryTower(nn.Module):
    """DARTS' auxiliary classifier after the cell at 2/3 depth (the second reduction in DARTS' network):
    (B, C, h, w) -> (B, K) logits.

    DARTS pools an 8x8 map with a 5x5/3 window to 2x2; the adaptive pool gives the same 2x2 grid for
    any input size.
    """

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(2),
            nn.Conv2d(channels, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False),
            nn.BatchNorm2d(768),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class GenotypeNetwork(nn.Module):
    """Stem + ``layers`` discrete cells (``reductions`` of them reduce: :func:`reduction_cells`): a feature extractor.

    ``drop_path_prob`` is set by the training loop (DARTS schedules it linearly over epochs).
    ``forward`` returns z (B, out_channels, H / 2^r, W / 2^r), r = ``reductions``;
    :meth:`forward_with_tower` also returns the auxiliary tower's logits (B, K) when the tower exists and
    the module is training, else None.
    """

    def __init__(self, genotype: Genotype, channels: int = 36, layers: int = 20, in_channels: int = 3,
                 num_classes: int | None = None, auxiliary_tower: bool = False, stem_multiplier: int = 3,
                 reductions: int = 2):
        super().__init__()
        self.genotype = genotype
        self.drop_path_prob = 0.0
        c_curr = stem_multiplier * channels
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c_curr, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(c_curr))
        c_prev_prev, c_prev, c_curr = c_curr, c_curr, channels
        cells = []
        reduction_prev = False
        self.tower_after = 2 * layers // 3
        tower_channels = None
        reducing = reduction_cells(layers, reductions)
        for i in range(layers):
            reduction = i in reducing
            if reduction:
                c_curr *= 2
            cell = Cell(genotype, c_prev_prev, c_prev, c_curr, reduction, reduction_prev)
            cells.append(cell)
            reduction_prev = reduction
            c_prev_prev, c_prev = c_prev, cell.multiplier * c_curr
            if i == self.tower_after:
                tower_channels = c_prev
        self.cells = nn.ModuleList(cells)
        self.out_channels = c_prev
        self.tower = None
        if auxiliary_tower:
            if num_classes is None:
                raise ValueError("the auxiliary tower needs num_classes")
            assert tower_channels is not None, "tower_after names a cell"
            self.tower = AuxiliaryTower(tower_channels, num_classes)

    def forward_with_tower(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        s0 = s1 = self.stem(x)
        tower_logits = None
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == self.tower_after and self.tower is not None and self.training:
                tower_logits = self.tower(s1)
        return s1, tower_logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_tower(x)[0]
