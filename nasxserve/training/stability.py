"""Stabilised DARTS (NASXNet section 3.4, after R-DARTS: Zela et al., "Understanding and Robustifying
Differentiable Architecture Search", ICLR 2020, the DARTS-ADA schedule).

Every search epoch ends with an estimate of the dominant eigenvalue of the Hessian of the validation
loss w.r.t. alpha (:mod:`nasxserve.training.hessian`). Its local average over a centred window of
``window`` epochs is compared with the local average ``lookback`` epochs earlier; when it grew by more
than ``ratio`` (and the earlier epoch is at least ``start_epoch``), the search goes back to the state
after that earlier epoch and continues with the weight decay multiplied by ``factor``, up to
``max_weight_decay``. Once at the limit the search carries on without further rollbacks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass
class Rollback:
    """A detected rise: go back to the state after ``to_epoch`` finished epochs."""

    at_epoch: int            # finished epochs when the rise was seen
    to_epoch: int
    ratio: float             # local average now / local average ``lookback`` epochs earlier


@dataclass
class EigenvalueMonitor:
    """The eigenvalue history of one search and the DARTS-ADA trigger.

    Epochs are counted as finished epochs: ``values[i]`` was measured after epoch ``i + 1``.
    """

    window: int = 5
    ratio: float = 1.3
    lookback: int = 4
    start_epoch: int = 10
    values: list[float] = field(default_factory=list)

    def local_average(self, epoch: int) -> float:
        """Mean of the eigenvalues of the ``window`` epochs centred on ``epoch`` (1-based)."""
        half = self.window // 2
        return float(np.mean(self.values[epoch - 1 - half:epoch + half]))

    def add(self, value: float) -> Optional[Rollback]:
        """Record the eigenvalue after the next epoch; a :class:`Rollback` when it rose too fast."""
        self.values.append(float(value))
        half = self.window // 2
        centre = len(self.values) - half           # newest epoch with a full centred window
        earlier = centre - self.lookback
        if earlier - half < 1 or earlier < self.start_epoch:
            return None
        now, before = self.local_average(centre), self.local_average(earlier)
        if before > 0 and now / before > self.ratio:
            return Rollback(at_epoch=len(self.values), to_epoch=earlier, ratio=now / before)
        return None

    def truncate(self, epochs: int) -> None:
        del self.values[epochs:]

    def snapshots_needed(self) -> int:
        """How many of the latest epochs a rollback can return to (keep their states, drop older)."""
        return self.window // 2 + self.lookback + 1


def raised_weight_decay(current: float, factor: float, limit: float) -> Optional[float]:
    """The next weight decay of the schedule, or None when ``current`` is already at the limit."""
    if current >= limit:
        return None
    return min(current * factor, limit)
