"""What every training method shares for one run: the configuration, the run directory, the device and the
process group, the precision, the dataset, and the bookkeeping of epochs (seeding, batches, metrics and
checkpoints). The phases (:mod:`~nasxserve.training.search`, :mod:`~nasxserve.training.retrain`,
:mod:`~nasxserve.training.protopnet`) train with it.

State is checkpointed at the end of every epoch. Every epoch reseeds its random streams from
(seed, phase, epoch), so a run resumed from a checkpoint continues exactly as if never stopped.

Under torchrun the same loops run data-parallel (:mod:`nasxserve.training.distributed`): every process
trains on its shard of each global batch, gradients are averaged, and only rank 0 writes the run.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from nasxserve import __version__
from nasxserve.data import Dataset, ImageSet, load_dataset
from nasxserve.data.augment import Augmentation, default_padding
from nasxserve.errors import ConfigError, DeviceError
from nasxserve.protos.losses import Stage
from nasxserve.protos.model import ExplainableNet
from nasxserve.training.config import TrainConfig
from nasxserve.training.distributed import current_world, device_for_rank, rank_seed, sharded_batches
from nasxserve.training.precision import resolve_precision
from nasxserve.training.rundir import RunDir

SEARCH, RETRAIN = "search", "retrain"


class Reporter:
    """Receives progress; the CLI shows it with rich, tests stay silent."""

    def phase(self, name: str, epochs: int) -> None: ...

    def epoch_start(self, phase: str, epoch: int, stage: Enum, batches: int) -> None: ...

    def batch(self, loss: float, acc: float) -> None: ...

    def epoch_end(self, row: dict[str, Any]) -> None: ...

    def message(self, text: str) -> None: ...


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"--device {name} was asked for but PyTorch sees no CUDA GPU; use --device cpu "
                          f"(or auto), or install a CUDA build of torch on a machine with a GPU")
    return torch.device(name)


def stages_for(epochs: dict[Stage, int]) -> list[Stage]:
    """The stage of each epoch, in order."""
    return [s for s in Stage for _ in range(epochs.get(s, 0))]


def cosine_lr(base: float, minimum: float, epoch: int, total: int) -> float:
    """DARTS' cosine annealing from ``base`` to ``minimum`` over ``total`` epochs."""
    return minimum + 0.5 * (base - minimum) * (1 + math.cos(math.pi * epoch / max(total, 1)))


def epoch_seed(seed: int, phase: str, epoch: int) -> int:
    return (seed * 1_000_003 + (0 if phase == SEARCH else 500_009) + epoch * 7_919) % (2**63)


def augmentation_generator(order: torch.Generator, rank: int = 0) -> torch.Generator:
    """The epoch's augmentation stream, seeded from its batch-order stream but separate from it, and
    different on every rank (each augments its own shard)."""
    return torch.Generator().manual_seed(rank_seed(order.initial_seed() + 1, rank))


class TimedBatches:
    """Wraps a batch iterator and adds up the time spent waiting for each batch (``wait_s``); ``wait_share``
    is that time's share of the time since the wrapper was made (just before the loop over it)."""

    def __init__(self, batches):
        self.batches = iter(batches)
        self.wait_s = 0.0
        self.started = time.perf_counter()

    @property
    def wait_share(self) -> float:
        return self.wait_s / max(time.perf_counter() - self.started, 1e-9)

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self.batches)
        finally:
            self.wait_s += time.perf_counter() - start


@dataclass
class PhaseState:
    """Everything a phase needs to continue after a restart."""

    phase: str
    epoch: int = 0
    best_val: float = -1.0
    projections: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)     # search: adaptive regularisation


def cpu_threads(asked: int | None, device: torch.device) -> int:
    """PyTorch's CPU threads for a run: ``asked`` (``--threads``), else one on the CPU and PyTorch's own default (one
    per core) beside a GPU.

    One thread on the CPU, as torchrun gives each of its processes: the networks the cpu presets train are small, so
    a second thread barely speeds them up (a short digits run on a 2-core machine: 170 s on one thread, 168 s on
    two), while every thread beyond its share of the cores, when another training or a test suite runs beside it,
    waits spinning for its peers and slows both runs far more than their share (two such runs on two threads each,
    side by side: 4.9x the time of one alone; docs/results.md#threads). One thread also makes a run's floating-point
    sums, and so its numbers, the same on every machine. Beside a GPU the CPU threads prepare the batches, so they
    keep PyTorch's default."""
    if asked:
        return asked
    return 1 if device.type == "cpu" else torch.get_num_threads()


class RunContext:
    """One run directory's training context.

    Args:
        cfg: the effective configuration (saved to config.yaml).
        run_dir: where everything goes; under torchrun a :class:`~nasxserve.training.rundir.ReplicaRunDir`
            on every rank but 0.
        reporter: progress sink.
        on_epoch_end: called after each epoch's checkpoint is written, with (phase, epoch); a
            KeyboardInterrupt raised there stops the run cleanly (used to test resumption).
    """

    def __init__(self, cfg: TrainConfig, run_dir: RunDir, reporter: Reporter | None = None,
                 on_epoch_end: Callable[[str, int], None] | None = None):
        self.cfg = cfg
        self.run = run_dir
        self.reporter = reporter or Reporter()
        self.on_epoch_end = on_epoch_end
        self.world = current_world()
        self.device = device_for_rank(resolve_device(cfg.device), self.world)
        torch.set_num_threads(cpu_threads(cfg.threads, self.device))
        self.channels_last = self.device.type == "cpu"
        self.precision = resolve_precision(cfg.precision, self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True   # fixed input sizes: let cuDNN pick its fastest kernels
        self.data: Dataset = load_dataset(cfg.data.spec, cfg.data.image_size, cfg.data.crop, cfg.data.val_share)
        self._check_batches_cover_ranks()
        self.step = 0  # global epoch counter across phases, for metrics.jsonl
        self.started = time.time()
        self.elapsed_before = 0.0

    def _check_batches_cover_ranks(self) -> None:
        """Every global training batch must give each process at least one image."""
        sizes = {"data.batch_size": self.cfg.data.batch_size, "retrain.batch_size": self.cfg.retrain.batch_size,
                 "search.stability.batch_size": self.cfg.search.stability.batch_size}
        small = [f"{k} = {v}" for k, v in sizes.items() if v is not None and v < self.world.size]
        if small:
            raise ConfigError(f"{', '.join(small)} is smaller than the {self.world.size} processes; batch sizes "
                              f"are global (split over the processes), so make them at least {self.world.size}")

    def load_checkpoint(self) -> dict[str, Any] | None:
        """checkpoints/last.pt, or None for a run that has not finished an epoch yet."""
        ckpt = self.run.load_checkpoint() if self.run.last_checkpoint.is_file() else None
        self.world.barrier()   # every rank has read it before rank 0 writes the next one
        if ckpt is None:
            if self.run.metrics_path.is_file():   # a run resumed before its first checkpoint starts again
                self.run.truncate_metrics(0)
            return None
        self.elapsed_before = float(ckpt.get("elapsed_s", 0.0))
        return ckpt

    def resume(self, ckpt: dict[str, Any], state: PhaseState) -> None:
        """Where ``state``'s phase stood at the checkpoint; metrics.jsonl is cut back to it."""
        state.epoch, state.best_val = int(ckpt["epoch"]), float(ckpt["best_val"])
        state.projections = list(ckpt["projections"])
        self.step = int(ckpt["step"])
        self.run.truncate_metrics(self.step)
        self.reporter.message(f"resuming {state.phase} after epoch {state.epoch}")

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.started

    def place(self, model: ExplainableNet) -> ExplainableNet:
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def reseed(self, phase: str, epoch: int) -> torch.Generator:
        """Reseed the epoch's random streams from (seed, phase, epoch); returns the generator that orders the
        epoch's batches (the same on every rank; torch's global stream, which dropout and drop-path draw
        from, is the rank's own)."""
        seed = epoch_seed(self.cfg.seed, phase, epoch)
        torch.manual_seed(rank_seed(seed, self.world.rank))
        return torch.Generator().manual_seed(seed)

    def begin_epoch(self, phase: str, epoch: int, lr: float, optimizer: torch.optim.Optimizer) -> torch.Generator:
        """Set the optimiser's lr and reseed the epoch's random streams (:meth:`reseed`)."""
        for g in optimizer.param_groups:
            g["lr"] = lr
        return self.reseed(phase, epoch)

    def validation_split(self) -> tuple[str, ImageSet]:
        """The split of the per-epoch accuracy, the projection lines and best.pt: val (the dataset's own, or held
        out of its training split by data.val_share), or test with data.val_share 0 on a dataset without one (the
        papers' setting: DARTS' CIFAR runs train on the whole training set and report the test split)."""
        return ("val", self.data.val) if self.data.val is not None else ("test", self.data.test)

    def augmentation(self, cutout: int) -> Augmentation | None:
        """The configured training augmentation (None when there is none)."""
        d = self.cfg.data
        padding = d.padding if d.padding is not None else default_padding(min(self.data.image_size))
        augment = Augmentation(d.augment, padding=padding, cutout=cutout)
        return augment if augment.active else None

    def train_batches(self, images: ImageSet, batch_size: int, order: torch.Generator,
                      aug_gen: torch.Generator, augment: Augmentation | None, with_index: bool = False):
        """This rank's shards of the epoch's shuffled global batches of ``batch_size`` (with their sample
        indices: ``with_index``)."""
        return sharded_batches(images, batch_size, self.world, True, order, drop_last=True, augment=augment,
                               augment_generator=aug_gen, device=self.device, with_index=with_index)

    def epoch_means(self, sums: list[float], batches: int, batch_size: int) -> list[float]:
        """Per-batch values summed over the epoch on this rank's shards -> means over the global batches."""
        return [total / max(batches, 1) for total in self.world.sum_floats(sums, self.world.share(batch_size))]

    def log_epoch(self, row: dict[str, Any]) -> None:
        row = {"step": self.step, **row, "elapsed_s": round(self.elapsed(), 2)}
        self.run.append_metrics(row)
        self.reporter.epoch_end(row)

    def save_state(self, state: PhaseState, payload: dict[str, Any]) -> None:
        """checkpoints/last.pt: ``payload`` (model and optimiser states) plus where the phase stands."""
        payload.update(phase=state.phase, epoch=state.epoch, step=self.step, best_val=state.best_val,
                       projections=state.projections, elapsed_s=self.elapsed(),
                       config=self.cfg.to_dict(), nasx_version=__version__)
        self.run.save_checkpoint(payload)

    def finish_epoch(self, state: PhaseState, payload: dict[str, Any]) -> None:
        self.save_state(state, payload)
        if self.on_epoch_end is not None:
            self.on_epoch_end(state.phase, state.epoch)

    def run_facts(self) -> dict[str, Any]:
        """The report keys every method shares: how long the run took, where, on how many CPU threads and at
        which precision."""
        return {"wall_time_s": round(self.elapsed(), 1), "device": str(self.device),
                "threads": torch.get_num_threads(), "precision": self.precision.name, "preset": self.cfg.preset}
