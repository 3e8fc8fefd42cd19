"""DARTS (Liu et al., 2019): every operation on every edge, alpha updated from the first step."""
from __future__ import annotations

from nasxserve.training.strategies.base import SearchStrategy


class Darts(SearchStrategy):
    """Plain DARTS; first or second order by ``search.order`` (eq. 1-2), stabilised by ``search.stability``."""

    name = "darts"
