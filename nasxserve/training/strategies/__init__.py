"""Search strategies: small plug-ins to the one search loop in :mod:`nasxserve.training.search`.

A strategy decides which search network(s) the loop trains, when the architecture is updated, what
changes from epoch to epoch and how the final genotype is read off. The architect (first- or
second-order DARTS, or LeaSE on top: :mod:`nasxserve.training.lease`) and the NASXNet stages are the
loop's, so every strategy works with the prototype head and with the plain classifier head alike.

==========  ==================================================================================
darts       DARTS (Liu et al., 2019); with ``search.stability`` the R-DARTS / NASXNet 3.4
            stabilised search
pc-darts    partial channel connections and edge normalisation (Xu et al., 2020)
p-darts     progressive depth, operation dropping, skip dropout, skip limit (Chen et al., 2019)
==========  ==================================================================================
"""
from __future__ import annotations

from nasxserve.training.strategies.base import SearchStrategy
from nasxserve.training.strategies.darts import Darts
from nasxserve.training.strategies.p_darts import PDarts
from nasxserve.training.strategies.pc_darts import PCDarts

STRATEGIES: dict[str, type[SearchStrategy]] = {"darts": Darts, "pc-darts": PCDarts, "p-darts": PDarts}


def build_strategy(search_cfg, in_channels: int) -> SearchStrategy:
    """The strategy named by ``search_cfg.strategy`` (a :class:`~nasxserve.training.config.SearchConfig`)."""
    return STRATEGIES[search_cfg.strategy](search_cfg, in_channels)


__all__ = ["STRATEGIES", "SearchStrategy", "build_strategy", "Darts", "PCDarts", "PDarts"]
