"""P-DARTS (Chen et al., 2019): progressive search in stages of growing depth.

Published CIFAR-10 search: 5, 11 and 17 cells, 25 epochs per stage with alpha frozen for the first 10;
after each stage every edge keeps its 5, then 3, then 1 strongest operations (section 3.2); dropout after
skip connections of 0.1, 0.4 and 0.7 in the three stages, decaying to 0 within each stage (section 3.3);
at most 2 skip connections in the final normal cell (section 3.3, "architecture refinement").

Every stage is a fresh network with fresh weights and alphas, as in the paper; here each runs the NASXNet
schedule of ``search.epochs_*`` epochs. ``search.p_darts`` holds the per-stage lists.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from nasxserve.nas.genotype import Genotype, derive_constrained
from nasxserve.nas.ops import PRIMITIVES
from nasxserve.nas.supernet import SearchNetwork
from nasxserve.training.strategies.base import CandidateSets, SearchStrategy

def drop_operations(weights: np.ndarray, candidates: Sequence[Sequence[str]], keep: int) -> tuple[tuple[str, ...], ...]:
    """Keep the ``keep`` strongest of each edge's candidate operations (P-DARTS section 3.2).

    Args:
        weights: (E, |PRIMITIVES|) mixing weights, 0 where an edge holds no such operation.
        candidates: per edge, the operations it holds now.
        keep: how many each edge keeps (ties go to the earlier operation in :data:`PRIMITIVES`).

    Returns: per edge, the kept operation names in :data:`PRIMITIVES` order.
    """
    out = []
    for e, names in enumerate(candidates):
        if keep > len(names):
            raise ValueError(f"edge {e} holds {len(names)} operations, cannot keep {keep}")
        ranked = sorted(names, key=lambda n: (-weights[e, PRIMITIVES.index(n)], PRIMITIVES.index(n)))
        out.append(tuple(sorted(ranked[:keep], key=PRIMITIVES.index)))
    return tuple(out)


def derive_limiting_skips(weights_normal: np.ndarray, weights_reduce: np.ndarray, steps: int, multiplier: int,
                          max_skips: int, min_convolutions: int = 0) -> Genotype:
    """The genotype with at most ``max_skips`` skip connections in the normal cell (P-DARTS section 3.3,
    "architecture refinement"), as P-DARTS' reference derives it (chenxin061/pdarts, train_search.py).

    The reference first derives the genotype as DARTS does (per node the two incoming edges whose strongest
    non-``none`` operation is strongest, each with that operation). Then, while ``check_sk_number`` counts
    more skips than allowed, ``delete_min_sk_prob`` sets to 0 the skip weight of the chosen skip edge whose
    skip weight is smallest, ``keep_1_on`` gives every edge its strongest remaining operation and
    ``keep_2_branches`` ranks each node's incoming edges again on those edited weights before
    ``parse_network`` reads the cell off. An edge that loses its skip therefore competes with its runner-up
    operation's weight and may give its place to another input of the node. The reference walks the limit
    down from 8 and logs a genotype at each count; the one it stops at for ``max_skips`` is the same, since
    each step depends only on the current weights.

    Unlike the reference, a skip edge with no other operation left (possible when ``p_darts.keep`` ends on
    fewer than two non-``none`` operations) is never edited, and when no chosen skip edge can change, the
    genotype is returned with more skips than ``max_skips``. Ties go to the lower edge index here, to the
    higher one in ``keep_2_branches``; with float weights they do not occur in practice.

    Args:
        weights_normal, weights_reduce: (E, |PRIMITIVES|) mixing weights, 0 where an edge holds no such
            operation; E = sum_{i<steps} (2 + i). Only the normal cell's skips are limited.
        max_skips: most skip connections in the normal cell.
        min_convolutions: fewest convolutions in the normal cell (``search.min_convolutions``; not P-DARTS'),
            enforced by the same rule once the skips are within their limit (:func:`derive_constrained`).
    """
    return derive_constrained(weights_normal, weights_reduce, steps, multiplier, max_skips=max_skips,
                              min_convolutions=min_convolutions)


class PDarts(SearchStrategy):
    """Three (``len(p_darts.layers)``) networks of growing depth, each keeping fewer operations per edge."""

    name = "p-darts"

    @property
    def networks(self) -> int:
        return len(self.cfg.p_darts.layers)

    def build(self, index: int, candidates: CandidateSets | None) -> SearchNetwork:
        c = candidates or {}
        return SearchNetwork(self.cfg.channels, self.cfg.p_darts.layers[index], self.in_channels,
                             candidates_normal=c.get("normal"), candidates_reduce=c.get("reduce"),
                             reductions=self.cfg.reductions)

    def updates_architecture(self, epoch: int) -> bool:
        return epoch >= self.cfg.p_darts.arch_start_epoch

    def begin_epoch(self, network: SearchNetwork, index: int, epoch: int, epochs: int) -> dict[str, Any]:
        p = self.cfg.p_darts.skip_dropout[index] * (epochs - epoch - 1) / epochs
        network.set_skip_dropout(p)
        return {"skip_dropout": p}

    def next_candidates(self, network: SearchNetwork, index: int) -> CandidateSets:
        keep = self.cfg.p_darts.keep[index]
        weights = network.mixing_weights()
        return {kind: drop_operations(weights[kind], network.candidates[kind], keep) for kind in ("normal", "reduce")}

    def genotype(self, network: SearchNetwork) -> Genotype:
        w = network.mixing_weights()
        return derive_limiting_skips(w["normal"], w["reduce"], network.steps, network.multiplier,
                                     self.cfg.p_darts.max_skip_connections, self.cfg.min_convolutions)
