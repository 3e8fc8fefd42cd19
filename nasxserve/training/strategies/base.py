"""The interface every search strategy implements (plain DARTS is the reference behaviour)."""
from __future__ import annotations

from typing import Any

from nasxserve.nas.genotype import Genotype, derive_constrained
from nasxserve.nas.supernet import SearchNetwork

CandidateSets = dict[str, tuple[tuple[str, ...], ...]]   # "normal"/"reduce" -> per edge, the operations


class SearchStrategy:
    """DARTS' behaviour; subclasses override what their paper changes.

    The loop trains ``networks`` search networks one after the other (P-DARTS: one per stage of depth),
    each for the NASXNet schedule of ``search.epochs_*`` epochs.

    Args:
        cfg: the ``search`` section of the training configuration.
        in_channels: image channels of the dataset.
    """

    name = "darts"

    def __init__(self, cfg: Any, in_channels: int):
        self.cfg = cfg
        self.in_channels = in_channels

    @property
    def networks(self) -> int:
        return 1

    def build(self, index: int, candidates: CandidateSets | None) -> SearchNetwork:
        """The ``index``-th search network; ``candidates`` as returned by :meth:`next_candidates` (None:
        every operation on every edge)."""
        c = candidates or {}
        return SearchNetwork(self.cfg.channels, self.cfg.layers, self.in_channels,
                             candidates_normal=c.get("normal"), candidates_reduce=c.get("reduce"),
                             reductions=self.cfg.reductions)

    def updates_architecture(self, epoch: int) -> bool:
        """Whether alpha is updated in this epoch (0-based, counted within the current network)."""
        return True

    def begin_epoch(self, network: SearchNetwork, index: int, epoch: int, epochs: int) -> dict[str, Any]:
        """Per-epoch changes to ``network`` before the epoch runs; returns what to log for it."""
        return {}

    def next_candidates(self, network: SearchNetwork, index: int) -> CandidateSets:
        """The operations the next network keeps on each edge, read off the finished network ``index``."""
        raise NotImplementedError(f"{self.name} trains a single network")

    def genotype(self, network: SearchNetwork) -> Genotype:
        """The discrete cells the final network's architecture parameters select, keeping at least
        ``search.min_convolutions`` convolutions in the normal cell (:func:`derive_constrained`)."""
        w, scale = network.mixing_weights(), network.edge_scales()
        return derive_constrained(w["normal"], w["reduce"], network.steps, network.multiplier,
                                  min_convolutions=self.cfg.min_convolutions, edge_scale_normal=scale["normal"],
                                  edge_scale_reduce=scale["reduce"])
