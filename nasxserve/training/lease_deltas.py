"""LeaSE's Delta (Algorithm 1 of Hosseini and Xie; :mod:`nasxserve.training.lease`): one perturbation delta_i per
training sample of D_e^tr, kept across iterations and epochs, saved with every search checkpoint."""
from __future__ import annotations

import tempfile
from collections.abc import Callable
from math import prod
from pathlib import Path

import numpy as np
import torch

from nasxserve.errors import RunDirError

RowGather = Callable[[torch.Tensor], torch.Tensor]

DELTA_STREAM = 0x1EA5E   # sets Delta's random stream apart from any other drawn from the run's seed


class DeltaStore:
    """Delta of Algorithm 1: one delta_i (C, H, W) per sample of D_e^tr, float32 (N, C, H, W), kept across
    iterations and updated by eq. (7) whenever its sample is drawn.

    delta_i starts uniform in [-delta_init, delta_init], drawn from a generator seeded by (seed, i) alone,
    so :meth:`initial` regenerates any sample's starting value (to measure how far it has moved) and the
    store does not depend on the order samples are drawn in, nor on the number of processes.

    Storage: in memory up to :attr:`in_memory_bytes`, beyond that a memory-mapped working file (``path``, or
    an anonymous temporary file when None), so that CIFAR-10's training half (25k x 3x32x32: 0.3 GB) or
    CUB's (3k x 3x224x224: 1.8 GB) need not fit in RAM. float32, the dtype eq. (7) is computed in, so the
    stored delta'_i is the one the audience trained on. float16 would halve the file but round every write
    to 11 significant bits (relative error up to 4.9e-4, compounding over the writes of a search), and
    with delta_init = 1e-3 hold the 6 % of initial values below 6.1e-5 as subnormals with fewer bits
    still: the drift being measured would be partly rounding. The working values change during an epoch;
    checkpoints are copies taken at an epoch's end (:meth:`save`, :meth:`load`).

    ``gather_rows``: data-parallel search, :meth:`World.gather_rows`: :meth:`update` writes the rows of
    the global batch on every rank, so that the stores stay identical.

    Per epoch, :meth:`take_drift` reports how far the updated delta_i have moved from their start.
    """

    in_memory_bytes = 256 * 2**20   # larger stores are memory-mapped

    def __init__(self, num_samples: int, sample_shape: tuple[int, ...], seed: int, delta_init: float,
                 path: Path | None = None, gather_rows: RowGather | None = None, reset: bool = True):
        self.shape = (num_samples, *sample_shape)
        self.seed = seed
        self.delta_init = delta_init
        self.path = None
        self.gather_rows: RowGather = gather_rows or (lambda t: t)
        if prod(self.shape) * 4 <= self.in_memory_bytes:
            self.values = np.empty(self.shape, np.float32)
        elif path is not None:
            self.path = Path(path)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.values = np.lib.format.open_memmap(self.path, "w+", np.float32, self.shape)
        else:   # deleted by the system when closed; the memmap holds it open for as long as it lives
            self.values = np.memmap(tempfile.TemporaryFile(), np.float32, "w+", shape=self.shape)  # noqa: SIM115
        self._drift = np.zeros(3)   # sums over the rows updated since take_drift: cosine, norm ratio, count
        if reset:   # not when a saved copy is about to be loaded
            self.reset()

    def __len__(self) -> int:
        return self.shape[0]

    def initial(self, index: np.ndarray) -> np.ndarray:
        """(b,) sample indices -> (b, C, H, W) float32: the delta_i the store started from."""
        out = np.empty((len(index), *self.shape[1:]), np.float32)
        for row, i in enumerate(np.asarray(index, dtype=np.int64)):
            u = np.random.default_rng([DELTA_STREAM, self.seed, int(i)]).random(self.shape[1:], dtype=np.float32)
            out[row] = (u * 2 - 1) * np.float32(self.delta_init)
        return out

    def reset(self, chunk: int = 256) -> None:
        """Every delta_i back to its initial value."""
        for start in range(0, len(self), chunk):
            self.values[start:start + chunk] = self.initial(np.arange(start, min(start + chunk, len(self))))

    def read(self, index: torch.Tensor) -> torch.Tensor:
        """(b,) sample indices -> the current delta_i, (b, C, H, W) float32 on the CPU."""
        return torch.from_numpy(self.values[index.cpu().numpy()])

    def update(self, index: torch.Tensor, values: torch.Tensor) -> None:
        """Write delta'_i (b, C, H, W) of samples ``index`` (b,), gathered over the ranks first."""
        rows = self.gather_rows(index).cpu().numpy()
        new = self.gather_rows(values.detach().float().contiguous()).cpu().numpy()
        self.values[rows] = new
        self._add_drift(rows, new)

    def _add_drift(self, rows: np.ndarray, new: np.ndarray) -> None:
        start = self.initial(rows).reshape(len(rows), -1).astype(np.float64)
        now = new.reshape(len(rows), -1).astype(np.float64)
        norm_start, norm_now = np.linalg.norm(start, axis=1), np.linalg.norm(now, axis=1)
        cosine = (start * now).sum(1) / np.maximum(norm_start * norm_now, 1e-300)
        self._drift += (cosine.sum(), (norm_now / np.maximum(norm_start, 1e-300)).sum(), len(rows))

    def take_drift(self) -> dict[str, float]:
        """Means over the updates since the last call (in a search epoch every sample is drawn at most once,
        so: over the samples updated in the epoch) of cos(delta_i, initial delta_i) and ||delta_i|| /
        ||initial delta_i||; empty when nothing was updated. Starts the next count."""
        cosine, ratio, count = self._drift
        self._drift = np.zeros(3)
        if count == 0:
            return {}
        return {"delta_cosine_to_initial": float(cosine / count), "delta_norm_ratio": float(ratio / count)}

    def save(self, write: Callable[[Path, np.ndarray], None], path: Path) -> None:
        """Hand the current values to ``write(path, array)`` (an atomic .npy writer)."""
        if isinstance(self.values, np.memmap):
            self.values.flush()
        write(path, self.values)

    def load(self, path: Path, chunk: int = 256) -> None:
        """Replace every delta_i by those of the .npy copy at ``path`` (read without pickle)."""
        try:
            saved = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise RunDirError(f"cannot read LeaSE's Delta from {path}: {e}") from None
        if saved.shape != self.shape or saved.dtype != np.float32:
            raise RunDirError(f"{path} holds {saved.dtype} {saved.shape}, not the float32 {self.shape} of this search")
        for start in range(0, len(self), chunk):
            self.values[start:start + chunk] = saved[start:start + chunk]
        self._drift = np.zeros(3)

    def close(self) -> None:
        """Drop the working values, and the working file if there is one (the saved copies remain)."""
        del self.values
        if self.path is not None:
            self.path.unlink(missing_ok=True)
