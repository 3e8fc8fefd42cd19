"""Stabilised DARTS (NASXNet section 3.4, after R-DARTS: Zela et al., "Understanding and Robustifying
Differentiable Architecture Search", ICLR 2020, the DARTS-ADA schedule).

Every ``every`` search epochs the largest eigenvalue of the Hessian of the validation loss w.r.t. alpha
is estimated (:mod:`nasxserve.training.hessian`). Its local average over a centred window of ``window``
measurements is compared with the local average ``lookback`` epochs earlier; when it grew by more than
``ratio`` (and the earlier epoch comes after the first ``start_epoch``), the search goes back to the state
after that earlier epoch and continues with the weight decay multiplied by ``factor``, up to
``max_weight_decay``. Once at the limit the search carries on without further rollbacks.

The rule is that of the reference (automl/RobustDARTS): ``train`` in src/search/train_search.py measures
after the epochs whose 0-based index is a multiple of ``report_freq_hessian`` (2 in
scripts/DARTS-ADA_search.sh) and after the last one; ``EVLocalAvg.update`` in src/utils.py averages
``window`` = 5 measurements centred on one (fewer at the start, where the window is cut), and
``EVLocalAvg.early_stop`` compares the newest complete local average with the one ``delta`` = 4
measurements (8 epochs) earlier, with ``factor`` 1.3, once that earlier epoch's 0-based index is at least
``es_start_epoch`` = 10, never after the last epoch; ``--early_stop 3`` then reloads the checkpoint of that
earlier epoch with the weight decay x ``mul_factor``. ``every`` = 1, ``lookback`` = 4 keeps the rule and
measures every epoch.
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
    """The eigenvalue history of one search network and the DARTS-ADA trigger.

    Epochs are counted as finished epochs of the network: ``values[k]`` was measured after epoch
    ``epochs[k]``. Measurements fall on epochs 1, 1 + every, 1 + 2 every, ... (the reference's 0-based
    multiples of ``report_freq_hessian``) and on the network's last epoch.
    """

    window: int = 5          # measurements in a local average
    ratio: float = 1.3
    lookback: int = 4        # epochs between the two local averages compared (a multiple of ``every``)
    start_epoch: int = 10    # the earlier one must come after this many epochs
    every: int = 1           # epochs between measurements
    values: list[float] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.every < 1 or self.lookback % self.every:
            raise ValueError(f"lookback ({self.lookback}) must be a multiple of every ({self.every})")

    def due(self, epoch: int, final: bool = False) -> bool:
        """Whether to measure after ``epoch`` finished epochs (``final``: the network's last epoch)."""
        return final or (epoch - 1) % self.every == 0

    def local_average(self, k: int) -> float:
        """Mean of the ``window`` measurements centred on measurement ``k`` (0-based), cut at the first one
        as ``EVLocalAvg.update`` cuts it (for an even window, one more after ``k`` than before)."""
        newest = k + self.window // 2
        return float(np.mean(self.values[max(0, newest - self.window + 1):newest + 1]))

    def add(self, value: float, epoch: int, final: bool = False) -> Optional[Rollback]:
        """Record the eigenvalue measured after ``epoch`` finished epochs; a :class:`Rollback` when it rose
        too fast. ``final`` (the network's last epoch) records without comparing, as the reference."""
        self.values.append(float(value))
        self.epochs.append(int(epoch))
        centre = len(self.values) - 1 - self.window // 2      # newest measurement with a full window after it
        earlier = centre - self.lookback // self.every
        if final or earlier < 0 or self.epochs[earlier] <= self.start_epoch:
            return None
        now, before = self.local_average(centre), self.local_average(earlier)
        if before > 0 and now / before > self.ratio:
            return Rollback(at_epoch=epoch, to_epoch=self.epochs[earlier], ratio=now / before)
        return None

    def truncate(self, epochs: int) -> None:
        """Forget the measurements after ``epochs`` finished epochs (a rollback to that state)."""
        kept = sum(e <= epochs for e in self.epochs)
        del self.values[kept:], self.epochs[kept:]

    def restore(self, values: list[float], epochs: list[int] | None) -> None:
        """The history a checkpoint holds; ``epochs`` None (checkpoints before the cadence): one a
        measurement, every epoch from the first."""
        self.values = [float(v) for v in values]
        self.epochs = [int(e) for e in epochs] if epochs is not None else list(range(1, len(values) + 1))

    def oldest_rollback_target(self) -> int:
        """The earliest finished epoch a later rollback can return to: the states after it (those measured)
        must be kept, older ones may go."""
        needed = self.window // 2 + self.lookback // self.every + 1
        return self.epochs[-needed] if len(self.epochs) >= needed else 1


def raised_weight_decay(current: float, factor: float, limit: float) -> Optional[float]:
    """The next weight decay of the schedule, or None when ``current`` is already at the limit."""
    if current >= limit:
        return None
    return min(current * factor, limit)
