"""PC-DARTS (Xu et al., 2020): partial channel connections and edge normalisation.

Published CIFAR-10 search: K = 4, batch 256, weight lr 0.1, arch lr 6e-4, first order, 50 epochs with
alpha (and beta) frozen for the first 15. Here ``search.pc_darts`` holds K, edge normalisation and the
first epoch of architecture updates; batch size and learning rates are the shared ``search`` ones.
"""
from __future__ import annotations

from nasxserve.nas.supernet import SearchNetwork
from nasxserve.training.strategies.base import CandidateSets, SearchStrategy


class PCDarts(SearchStrategy):
    """Mixed operations see 1/K of each edge's channels (section 3.2); nodes weigh their incoming edges by
    softmaxed betas (section 3.3), which also rank the edges when the genotype is derived."""

    name = "pc-darts"

    def build(self, index: int, candidates: CandidateSets | None) -> SearchNetwork:
        pc = self.cfg.pc_darts
        return SearchNetwork(self.cfg.channels, self.cfg.layers, self.in_channels,
                             partial_channels=pc.partial_channels, edge_normalisation=pc.edge_normalisation,
                             reductions=self.cfg.reductions)

    def updates_architecture(self, epoch: int) -> bool:
        return epoch >= self.cfg.pc_darts.arch_start_epoch
