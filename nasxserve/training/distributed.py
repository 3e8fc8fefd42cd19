"""Data-parallel training across the processes ``torchrun`` starts (one per GPU, or several on a CPU).

Conventions, shared by the search and the retrain:

- **Global batch.** ``data.batch_size`` (``retrain.batch_size``) is the batch of one optimisation step
  summed over all processes. Every process draws the same epoch permutation from the same generator
  and takes its shard of every global batch: rank r gets rows [start_r, stop_r) (:func:`shard_bounds`;
  the first ``B mod N`` ranks one row more). So the data an epoch sees, and its number of steps, do not
  depend on the number of processes.
- **Gradients.** Each process computes the gradient of its shard's mean loss and weights it by its share
  of the global batch (b_r / B); the weighted sum over processes, one all-reduce of one flattened bucket
  per step, is the gradient of the global batch's mean loss. All processes get the same bits back, so
  the weights and the architecture parameters stay identical everywhere. BatchNorm's batch statistics
  are per process (as with DistributedDataParallel without SyncBatchNorm); its running statistics are
  taken from rank 0 before every evaluation, projection and checkpoint.
- **Random streams.** The batch order is shared; augmentation, dropout and drop-path draw from streams
  seeded per rank (:func:`rank_seed`, rank 0's being the single-process one). LeaSE's per-sample Delta
  is drawn from (seed, sample) alone, and each step's updated rows are gathered from every rank
  (:meth:`World.gather_rows`), so every rank keeps the same store.
- **Evaluation and projection** split the unshuffled batches into contiguous blocks of whole batches,
  one block per process, so every image passes through the network in the same batch as in a single
  process; results are gathered in batch order and equal the single-process ones.
- **Files.** Only rank 0 writes the run directory; all ranks read it (resume, rollbacks), so with
  several nodes it must be on a shared file system.

In a single process (no torchrun, or ``--nproc-per-node 1``) every helper here is the identity and the
training is exactly what it was without this module.
"""
from __future__ import annotations

import datetime
import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist
from torch import nn

from nasxserve.data.augment import Augmentation
from nasxserve.data.base import ImageSet, shard_bounds
from nasxserve.errors import DeviceError, NasxError
from nasxserve.protos.model import ExplainableNet
from nasxserve.protos.projection import NearestPatches, NearestSearch, merge_nearest, nearest_patches
from nasxserve.training.architect import MaybeTensor, Reducer

TIMEOUT_ENV = "NASX_DIST_TIMEOUT_S"       # seconds a collective may wait for a peer (default 30 minutes)
ARCH_TRACE_ENV = "NASX_ARCH_TRACE_DIR"    # debugging aid, see ArchitectureTrace
DEFAULT_TIMEOUT_S = 1800

T = TypeVar("T")


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s own random streams derived from a shared ``seed``; rank 0 keeps
    ``seed``, so a single process draws exactly what it always drew."""
    return (seed + rank * 0x9E3779B97F4A7C15) % 2**64   # torch takes seeds below 2**64


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel processes; ``World()`` is a single process, for
    which every method is the identity or a no-op."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0

    # ------------------------------------------------------------------ sharding
    def shard_of(self, start: int, stop: int) -> tuple[int, int]:
        """This rank's rows of the global batch [start, stop)."""
        lo, hi = shard_bounds(stop - start, self.rank, self.size)
        return start + lo, start + hi

    def share(self, batch_size: int) -> float:
        """This rank's fraction of a global batch of ``batch_size`` rows (its gradient weight)."""
        lo, hi = shard_bounds(batch_size, self.rank, self.size)
        return (hi - lo) / batch_size

    def batch_block(self, num_batches: int) -> range:
        """This rank's contiguous block of ``num_batches`` whole batches (evaluation, projection)."""
        return range(*shard_bounds(num_batches, self.rank, self.size))

    # ------------------------------------------------------------------ collectives
    def weighted_sum(self, tensors: Sequence[MaybeTensor], weight: float) -> list[MaybeTensor]:
        """sum over ranks of ``weight`` (this rank's) times each tensor; Nones stay None (they must be None
        on every rank). One all-reduce per dtype and device; every rank gets the same bits."""
        if not self.distributed:
            return list(tensors)
        present = [t for t in tensors if t is not None]
        reduced = iter(_bucketed(present, lambda flat: dist.all_reduce(flat.mul_(weight))))
        return [t if t is None else cast(MaybeTensor, next(reduced)) for t in tensors]

    def reducer(self, weight: float) -> Reducer | None:
        """``weighted_sum`` with this rank's ``weight`` as one callable; None in a single process."""
        return partial(self.weighted_sum, weight=weight) if self.distributed else None

    def gradient_reducer(self, batch_size: int) -> Reducer | None:
        """Turns this rank's gradients of its shard's mean loss into the gradient of the global batch's
        mean loss, for global batches of ``batch_size``; None in a single process (nothing to do)."""
        return self.reducer(self.share(batch_size))

    def sum_floats(self, values: Sequence[float], weight: float = 1.0) -> list[float]:
        """sum over ranks of ``weight`` times each value (float64), e.g. an epoch's mean training loss."""
        if not self.distributed:
            return list(values)
        return self.weighted_sum([torch.tensor(values, dtype=torch.float64)], weight)[0].tolist()

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` (b_r, ...) concatenated in rank order, (sum_r b_r, ...), on every rank: a
        global batch from its shards (the shards may differ in length; they are padded for the all-gather)."""
        if not self.distributed:
            return tensor
        count = torch.tensor([len(tensor)], device=tensor.device)
        counts = [torch.zeros_like(count) for _ in range(self.size)]
        dist.all_gather(counts, count)
        rows = [int(c) for c in counts]
        padded = tensor.new_zeros((max(rows), *tensor.shape[1:]))
        padded[:len(tensor)] = tensor
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded)
        return torch.cat([part[:n] for part, n in zip(parts, rows)])

    def broadcast_state(self, module: nn.Module, buffers_only: bool = False) -> None:
        """Copy rank 0's parameters and buffers (or buffers only: BatchNorm's running statistics) into
        ``module`` on every rank."""
        if not self.distributed:
            return
        tensors = list(module.buffers()) if buffers_only else [*module.parameters(), *module.buffers()]
        with torch.no_grad():
            for t, value in zip(tensors, _bucketed(tensors, lambda flat: dist.broadcast(flat, src=0))):
                t.copy_(value)

    def broadcast_object(self, obj: T) -> T:
        """Rank 0's ``obj`` (picklable) on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def run_on_main(self, action: Callable[[], None]) -> None:
        """Run ``action`` on rank 0 only (e.g. creating the run directory); if it raises, every rank raises
        an error too (the same one for a :class:`NasxError`), so that no rank goes on to wait for a peer
        that has given up."""
        if not self.distributed:
            action()
            return
        if self.is_main:
            try:
                action()
            except Exception as e:
                shared = e if isinstance(e, NasxError) else RuntimeError(f"rank 0 failed: {type(e).__name__}: {e}")
                self.broadcast_object(shared)
                raise
            self.broadcast_object(None)
            return
        failure = self.broadcast_object(None)
        if failure is not None:
            raise failure


def _bucketed(tensors: Sequence[torch.Tensor], collective: Callable[[torch.Tensor], Any]) -> list[torch.Tensor]:
    """Run ``collective`` in place on one flat copy of ``tensors`` per (dtype, device) and return the
    results shaped and strided like the inputs (so channels-last gradients stay channels-last)."""
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    out: dict[int, torch.Tensor] = {}
    for members in groups.values():   # the same groups in the same order on every rank
        flat = torch.cat([tensors[i].reshape(-1) for i in members])
        collective(flat)
        for i, part in zip(members, flat.split([tensors[i].numel() for i in members])):
            out[i] = torch.empty_like(tensors[i]).copy_(part.view(tensors[i].shape))
    return [out[i] for i in range(len(tensors))]


# ---------------------------------------------------------------------- process group
def current_world() -> World:
    """The world of the initialised process group, or a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    rank = dist.get_rank()
    return World(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)))


def init_from_environment() -> World:
    """Join the process group torchrun describes in WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and
    MASTER_PORT; a single process when WORLD_SIZE is unset or 1.

    The backend is gloo for CPU tensors and, where CUDA works, NCCL for CUDA tensors (each process then
    uses cuda:LOCAL_RANK). Collectives give up after NASX_DIST_TIMEOUT_S seconds (default 1800) of waiting
    for a peer, so one failed process does not leave the others hanging for ever.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return World()
    if not dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        backend = "gloo"
        if torch.cuda.is_available():
            backend = "cpu:gloo,cuda:nccl"
            if local_rank < torch.cuda.device_count():   # a CPU run may start more processes than GPUs
                torch.cuda.set_device(local_rank)
        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
        dist.init_process_group(backend, timeout=timeout)
    return current_world()


def shutdown(completed: bool = True) -> None:
    """Leave the process group, if this process joined one.

    After a ``completed`` run every process first waits at a barrier for the others: rank 0 still writes the
    report and prints after the last collective, and a process that tore down its connections (or exited)
    while a peer still held them open could take that peer down at exit. After a failure there is no barrier:
    the peers may be stuck in a collective this process will never join."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if completed:
        dist.barrier()
    dist.destroy_process_group()


def device_for_rank(device: torch.device, world: World) -> torch.device:
    """The device a rank trains on: cuda:LOCAL_RANK when ``device`` is CUDA and there are several processes."""
    if not world.distributed or device.type != "cuda":
        return device
    if device.index is not None:
        raise DeviceError(f"under torchrun each process uses cuda:LOCAL_RANK; use --device cuda or auto, "
                          f"not {device}")
    if world.local_rank >= torch.cuda.device_count():
        raise DeviceError(f"local rank {world.local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                          f"start at most that many processes per node (--nproc-per-node)")
    return torch.device("cuda", world.local_rank)


# ---------------------------------------------------------------------- data
def sharded_batches(images: ImageSet, batch_size: int, world: World, shuffle: bool = False,
                    generator: torch.Generator | None = None, drop_last: bool = False,
                    augment: Augmentation | None = None, augment_generator: torch.Generator | None = None,
                    device: torch.device | None = None, with_index: bool = False) -> Iterator[tuple[torch.Tensor, ...]]:
    """``ImageSet.batches`` for one rank: every rank draws the same order from ``generator`` and gets its
    shard of every global batch of ``batch_size``, (b_r, C, H, W) and (b_r,), and with ``with_index`` the
    shard's sample indices (b_r,). In a single process, exactly ``ImageSet.batches``. A global batch needs
    at least ``world.size`` rows (the run context checks)."""
    return images.batches(batch_size, shuffle, generator, drop_last, augment, augment_generator, device,
                          shard=(world.rank, world.size), with_index=with_index)


def sharded_nearest_patches(world: World) -> NearestSearch:
    """``project_prototypes``' nearest-patch search for ``world``: each rank scans its block of whole
    batches, then per prototype the smallest distance over all ranks wins, ties going to the lower global
    sample index (the single-process order); every rank gets the winner's vector and source. In a single
    process, the plain scan."""
    if not world.distributed:
        return nearest_patches

    def search(model: ExplainableNet, images: ImageSet, batch_size: int, device: torch.device, *,
               class_specific: bool = False, allowed: torch.Tensor | None = None) -> NearestPatches:
        block = world.batch_block(images.num_batches(batch_size))
        local = nearest_patches(model, images, batch_size, device, batches=block, class_specific=class_specific,
                                allowed=allowed)
        return merge_nearest(world.all_gather_object(local.to("cpu"))).to(device)

    return search


# ---------------------------------------------------------------------- debugging aid
class ArchitectureTrace:
    """With NASX_ARCH_TRACE_DIR=DIR set, every rank appends one line per architecture step to
    DIR/arch-rank<R>.txt: ``epoch step sha256`` of the architecture parameters' bytes. Identical files
    show that alpha stayed identical on every rank. Meant for tests and debugging; keep DIR outside the
    run directory (which belongs to rank 0)."""

    def __init__(self, path: Path | None):
        self.path = path

    @classmethod
    def from_environment(cls, rank: int) -> ArchitectureTrace:
        folder = os.environ.get(ARCH_TRACE_ENV)
        if not folder:
            return cls(None)
        Path(folder).mkdir(parents=True, exist_ok=True)
        return cls(Path(folder) / f"arch-rank{rank}.txt")

    def record(self, epoch: int, step: int, params: Sequence[torch.Tensor]) -> None:
        if self.path is None:
            return
        digest = hashlib.sha256()
        for p in params:
            digest.update(p.detach().cpu().contiguous().numpy().tobytes())
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{epoch} {step} {digest.hexdigest()}\n")
