"""The run directory: config.yaml, genotype.json, checkpoints/, metrics.jsonl, prototypes/, report.json.

Every file is written atomically; checkpoints hold only tensors and plain data, so
``torch.load(path, weights_only=True)`` reads them. In data-parallel training rank 0 writes the run
directory and the other ranks see it as a :class:`ReplicaRunDir`, which reads and never writes.
"""
from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nasxserve.errors import RunDirError
from nasxserve.data.base import ImageSet
from nasxserve.io import atomic_write, atomic_write_json, atomic_write_text
from nasxserve.protos.projection import RECORDS_FILE, ProjectionRecord, save_projection


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def genotype_path(self) -> Path:
        return self.root / "genotype.json"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def report_path(self) -> Path:
        return self.root / "report.json"

    @property
    def prototypes_dir(self) -> Path:
        return self.root / "prototypes"

    @property
    def records_path(self) -> Path:
        """The last projection's records: where each prototype came from."""
        return self.prototypes_dir / RECORDS_FILE

    @property
    def last_checkpoint(self) -> Path:
        return self.root / "checkpoints" / "last.pt"

    @property
    def best_checkpoint(self) -> Path:
        return self.root / "checkpoints" / "best.pt"

    def search_snapshot(self, epoch: int) -> Path:
        """The search's state after ``epoch`` finished epochs (kept while a rollback may return to it)."""
        return self.root / "checkpoints" / f"search-epoch-{epoch:03d}.pt"

    def prune_search_snapshots(self, keep: range) -> None:
        """Delete the search snapshots whose epoch is not in ``keep``."""
        for path in (self.root / "checkpoints").glob("search-epoch-*.pt"):
            if int(path.stem.rsplit("-", 1)[1]) not in keep:
                path.unlink()

    def lease_deltas(self, epoch: int) -> Path:
        """LeaSE's per-sample Delta after ``epoch`` finished search epochs (.npy, float32 (N, C, H, W)): the
        copy that last.pt of that epoch, and a search snapshot of it, go with. Named by epoch so that a crash
        between writing it and last.pt leaves last.pt's own copy in place."""
        return self.root / "checkpoints" / f"lease-deltas-epoch-{epoch:03d}.npy"

    @property
    def lease_deltas_working(self) -> Path:
        """The memory-mapped Delta the running search updates (of no use once the search has stopped)."""
        return self.root / "checkpoints" / "lease-deltas-working.npy"

    def save_array(self, path: Path, array: np.ndarray) -> None:
        """``array`` as .npy, written atomically, never pickled."""
        atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))

    def prune_lease_deltas(self, keep: Collection[int]) -> None:
        """Delete the copies of LeaSE's Delta whose epoch is not in ``keep``."""
        for path in (self.root / "checkpoints").glob("lease-deltas-epoch-*.npy"):
            if int(path.stem.rsplit("-", 1)[1]) not in keep:
                path.unlink()

    def create(self) -> None:
        """Make a fresh run directory; refuse to reuse one that already holds a run, unless the run never
        finished an epoch (:meth:`unstarted`): there is nothing in it to lose."""
        if self.root.exists() and any(self.root.iterdir()) and not self.unstarted():
            raise RunDirError(f"{self.root} already exists and is not empty; choose another --out, or continue "
                              f"that run with --resume {self.root}")
        (self.root / "checkpoints").mkdir(parents=True, exist_ok=True)

    def unstarted(self) -> bool:
        """Whether the folder holds only a run stopped before its first checkpoint: its config.yaml, an empty
        checkpoints/, and at most a log and the genotype it was given."""
        def written(folder: Path) -> set[str]:   # less the temporary files of writes an interrupt cut short
            return {p.name for p in folder.iterdir() if not _partial_write(p)} if folder.is_dir() else set()

        checkpoints = self.root / "checkpoints"
        return (written(self.root) <= {self.config_path.name, checkpoints.name, self.metrics_path.name,
                                       self.genotype_path.name}
                and not written(checkpoints))

    def require_resumable(self) -> None:
        """A run can be continued from its last checkpoint, or started again from its config.yaml when it
        stopped before the first one."""
        if not self.last_checkpoint.is_file() and not (self.config_path.is_file() and self.unstarted()):
            raise RunDirError(f"cannot resume {self.root}: no checkpoints/last.pt (is it a nasx run directory?)")

    def write_text(self, path: Path, text: str) -> None:
        atomic_write_text(path, text)

    def write_json(self, path: Path, obj: Any) -> None:
        atomic_write_json(path, obj)

    def save_checkpoint(self, state: dict[str, Any], path: Path | None = None) -> None:
        atomic_write(path or self.last_checkpoint, lambda f: torch.save(state, f))

    def load_checkpoint(self, path: Path | None = None) -> dict[str, Any]:
        path = path or self.last_checkpoint
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or foreign file: say which and why
            raise RunDirError(f"cannot read checkpoint {path}: {e}") from None

    def save_prototypes(self, records: list[ProjectionRecord], images: ImageSet, classes: list[str]) -> None:
        """prototypes/: records.json and each prototype's source patch and context image."""
        save_projection(records, images, classes, self.prototypes_dir)

    def append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        rows = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by an interruption ends the readable log
        return rows

    def truncate_metrics(self, step: int) -> None:
        """Keep only rows logged at or before global epoch ``step`` (what the checkpoint has seen)."""
        rows = [r for r in self.read_metrics() if r.get("step", 0) <= step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))


def _partial_write(path: Path) -> bool:
    """Whether ``path`` is the temporary file of an atomic write (:func:`nasxserve.io.atomic_write`)."""
    return path.name.startswith(".") and path.name.endswith(".tmp")


class ReplicaRunDir(RunDir):
    """The run directory as the ranks other than 0 see it in data-parallel training: they read what rank
    0 writes (config, checkpoints, the log) and write nothing, so every file has one author."""

    def create(self) -> None:
        pass

    def write_text(self, path: Path, text: str) -> None:
        pass

    def write_json(self, path: Path, obj: Any) -> None:
        pass

    def save_checkpoint(self, state: dict[str, Any], path: Path | None = None) -> None:
        pass

    def save_prototypes(self, records: list[ProjectionRecord], images: ImageSet, classes: list[str]) -> None:
        pass

    def prune_search_snapshots(self, keep: range) -> None:
        pass

    def save_array(self, path: Path, array: np.ndarray) -> None:
        pass

    def prune_lease_deltas(self, keep: Collection[int]) -> None:
        pass

    def append_metrics(self, row: dict[str, Any]) -> None:
        pass

    def truncate_metrics(self, step: int) -> None:
        pass
