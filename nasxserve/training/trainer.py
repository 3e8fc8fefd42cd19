"""NASXNet training: the three-stage search (section 3.2), then retraining the derived network.

search:  stage 1 adaptation (eq. 4) -> stage 2 joint (eq. 5) -> stage 3 fine-tune (eq. 7); alpha is
         updated on the held-out half of the training split after every weight step (eq. 1, 2);
         global projection (eq. 9) every ``project_every`` epochs of stages 2-3 and at the end;
         the genotype is derived from alpha.
retrain: the discrete network from scratch, stages 2 and 3 only, projections likewise; or, with
         ``retrain.head: linear``, the black box of the paper's Table 1: the same network predicting with
         h1 alone, stage 1's loss (eq. 4) in every epoch, no prototypes.

``method: protopnet`` runs the ProtoPNet baseline instead (:mod:`nasxserve.training.protopnet`, a
subclass of :class:`Trainer` that shares its run directory, checkpoints, seeding and evaluation).

State is checkpointed at the end of every epoch. Every epoch reseeds its random streams from
(seed, phase, epoch), so a run resumed from a checkpoint continues exactly as if never stopped.

Under torchrun the same loops run data-parallel (:mod:`nasxserve.training.distributed`): every process
trains on its shard of each global batch, gradients are averaged, and only rank 0 writes the run.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from nasxserve import __version__
from nasxserve.data import Dataset, ImageSet, load_dataset
from nasxserve.data.augment import Augmentation, default_padding
from nasxserve.errors import ConfigError, DeviceError, RunDirError
from nasxserve.explain.calibration import evidence_offsets
from nasxserve.explain.consistency import mislabelled_prototypes
from nasxserve.nas.genotype import Genotype, load_genotype
from nasxserve.nas.supernet import SearchNetwork
from nasxserve.protos.losses import LossWeights, Stage, deletion_cost, joint_logits, stage_loss
from nasxserve.protos.model import ExplainableNet, ModelSpec, build_model
from nasxserve.protos.last_layer import LastLayerFit, constrain_signs_, descend_on_similarities, fit_last_layer
from nasxserve.protos.projection import ProjectionRecord, calibrate_records, class_counts, project_prototypes
from nasxserve.training.architect import Architect, Reducer
from nasxserve.training.lease import LeaseArchitect, build_audience
from nasxserve.training.lease_deltas import DeltaStore
from nasxserve.training.strategies import SearchStrategy, build_strategy
from nasxserve.training.strategies.base import CandidateSets
from nasxserve.training.hessian import dominant_eigenvalue
from nasxserve.training.stability import EigenvalueMonitor, Rollback, raised_weight_decay
from nasxserve.training.config import TrainConfig
from nasxserve.training.config_loading import config_from_dict
from nasxserve.training.precision import Precision, resolve_precision
from nasxserve.training.distributed import (ArchitectureTrace, World, current_world, device_for_rank, rank_seed,
                                            sharded_batches, sharded_nearest_patches)
from nasxserve.training.rundir import ReplicaRunDir, RunDir

SEARCH, RETRAIN = "search", "retrain"
LAST_LAYER_RULE = "reconnect"   # eq. (8), then the sign-constrained last-layer fit, after every projection


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


def _run_dir(out: str, world: World) -> RunDir:
    """The run directory as this process sees it: rank 0 writes it, the other ranks only read it."""
    return RunDir(out) if world.is_main else ReplicaRunDir(out)


def stages_for(epochs: dict[Stage, int]) -> list[Stage]:
    """The stage of each epoch, in order."""
    return [s for s in Stage for _ in range(epochs.get(s, 0))]


def cosine_lr(base: float, minimum: float, epoch: int, total: int) -> float:
    """DARTS' cosine annealing from ``base`` to ``minimum`` over ``total`` epochs."""
    return minimum + 0.5 * (base - minimum) * (1 + math.cos(math.pi * epoch / max(total, 1)))


def epoch_seed(seed: int, phase: str, epoch: int) -> int:
    return (seed * 1_000_003 + (0 if phase == SEARCH else 500_009) + epoch * 7_919) % (2**63)


@dataclass
class EvalResult:
    acc: float              # prototype path (or the stage's prediction in stage 1)
    aux_acc: float | None
    loss: float
    n: int


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


@torch.no_grad()
def evaluate(model: ExplainableNet, images: ImageSet, batch_size: int, device: torch.device,
             prototype_path: bool = True, channels_last: bool = False,
             precision: Precision | None = None, world: World = World()) -> EvalResult:
    """Top-1 accuracy of the prototype path (or of h1 with ``prototype_path=False``) and of h1 on ``images``
    (eval mode); ``aux_acc`` is None for a model without h1.

    Across processes each evaluates its block of whole batches and the per-batch counts are added up in
    batch order, so the result is the single-process one (given the same model on every process)."""
    was = model.training
    model.eval()
    counts = []   # per batch: (summed loss, correct, correct by h1, images)
    for b in world.batch_block(images.num_batches(batch_size)):
        x, y = _to_device(*images.numbered_batch(b, batch_size, device), device, channels_last)
        with precision.autocast() if precision is not None else contextlib.nullcontext():
            out = model(x, prototype_path=prototype_path, aux_path=True)
        main = (out.logits if prototype_path else out.aux_logits).float()
        right_aux = 0 if out.aux_logits is None else int((out.aux_logits.float().argmax(1) == y).sum())
        counts.append((float(F.cross_entropy(main, y, reduction="sum")), int((main.argmax(1) == y).sum()),
                       right_aux, len(y)))
    model.train(was)
    correct = correct_aux = total = 0
    loss_sum = 0.0
    for block in world.all_gather_object(counts):     # blocks in rank order: batches in order
        for loss, right, right_aux, k in block:
            loss_sum += loss
            correct, correct_aux, total = correct + right, correct_aux + right_aux, total + k
    aux_acc = correct_aux / total if model.aux_head is not None else None   # ProtoPNet has no h1
    return EvalResult(acc=correct / total, aux_acc=aux_acc, loss=loss_sum / total, n=total)


def _to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device, channels_last: bool):
    x = x.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def _stage_prediction(stage: Stage, out, lambda1: float) -> torch.Tensor:
    if stage is Stage.ADAPT:
        return out.aux_logits
    if stage is Stage.JOINT:
        return joint_logits(out, lambda1)
    return out.logits


def functional_stage_loss(model: ExplainableNet, stage: Stage, weights: LossWeights):
    """``loss(tensors, x, y)``: the stage's loss (eq. 4, 5 or 7) of ``model`` evaluated with the given
    parameters and buffers (``torch.func.functional_call``), as the architect needs."""
    def loss(tensors: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, tensors, (x,), {"prototype_path": stage.uses_prototypes,
                                                     "aux_path": stage.uses_aux})
        return stage_loss(stage, out, y, tensors["prototype_layer.prototypes"], weights)
    return loss


def functional_stage_logits(model: ExplainableNet, stage: Stage, weights: LossWeights):
    """``logits(tensors, x)``: the stage's prediction (B, K) evaluated with the given parameters and
    buffers, the explainer's output f(x; E) that LeaSE perturbs (eq. 7)."""
    def logits(tensors: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, tensors, (x,), {"prototype_path": stage.uses_prototypes,
                                                     "aux_path": stage.uses_aux})
        return _stage_prediction(stage, out, weights.lambda1)
    return logits


def apply_gradients(loss: torch.Tensor, params: list[nn.Parameter], optimizer: torch.optim.Optimizer,
                    precision: Precision | None = None, clip: float | None = None,
                    reduce_gradients: Reducer | None = None) -> None:
    """One ``optimizer`` step on the gradient of ``loss`` with respect to ``params`` alone (other parameters
    get none). With fp16 the loss is scaled, the gradients unscaled before clipping and a step with inf/nan
    gradients skipped; ``clip`` bounds their total norm; ``reduce_gradients`` averages them over processes
    first, so that every process clips, skips and steps alike."""
    scaler = precision.scaler if precision is not None else None
    grads = list(torch.autograd.grad(scaler.scale(loss) if scaler else loss, params, allow_unused=True))
    if reduce_gradients is not None:
        grads = reduce_gradients(grads)   # an inf or nan on any process reaches all: all skip the step
    optimizer.zero_grad(set_to_none=True)
    for p, g in zip(params, grads):
        p.grad = g
    if scaler:
        scaler.unscale_(optimizer)
    if clip is not None:
        nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], clip)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def weight_step(model: ExplainableNet, stage: Stage, x: torch.Tensor, y: torch.Tensor,
                optimizer: torch.optim.Optimizer, params: list[nn.Parameter], weights: LossWeights,
                clip: float, precision: Precision | None = None,
                reduce_gradients: Reducer | None = None, sign_floor: float | None = None) -> tuple[float, float]:
    """One SGD step on the stage's loss; returns (loss, accuracy of the stage's prediction) on ``x``.

    Only ``params`` get gradients (alpha is left to the architect). In stage 3 the last layer is held
    fixed: the paper fine-tunes the feature extractor and the prototypes only. With ``weights.deletion`` the
    prototype stages add the deletion cost (:func:`nasxserve.protos.losses.deletion_cost`), one more forward
    pass on the batch with each image's top evidence box occluded. With ``sign_floor`` a step that trains h puts
    it back on the sign constraint of :mod:`nasxserve.protos.last_layer` (own-class connections >= sign_floor,
    the others <= 0), so that between projections too every prototype supports only its own class. The
    forward passes run
    under ``precision``'s autocast; with fp16 the loss is scaled and a step with inf/nan gradients skipped.
    Data-parallel: ``x`` is this process's shard and ``reduce_gradients`` averages the gradients over
    processes before clipping, so every process clips, skips and steps alike.
    """
    with precision.autocast() if precision is not None else contextlib.nullcontext():
        out = model(x, prototype_path=stage.uses_prototypes, aux_path=stage.uses_aux)
        loss = stage_loss(stage, out, y, model.prototype_layer.prototypes, weights)
        if weights.deletion > 0 and stage.uses_prototypes:
            loss = loss + weights.deletion * deletion_cost(model, x, y, out.protos)
    trainable = [p for p in params if not (stage is Stage.FINETUNE and p is model.last_layer.weight)]
    apply_gradients(loss, trainable, optimizer, precision, clip, reduce_gradients)
    if sign_floor is not None and stage.uses_prototypes and any(p is model.last_layer.weight for p in trainable):
        constrain_signs_(model.last_layer.weight, model.prototype_layer.prototype_class, sign_floor)
    pred = _stage_prediction(stage, out, weights.lambda1)
    return float(loss.detach()), float((pred.argmax(1) == y).float().mean())


@dataclass
class SearchNet:
    """The search network the loop is training (P-DARTS trains one per stage) and what trains it."""

    index: int
    candidates: CandidateSets | None
    features: SearchNetwork
    model: ExplainableNet
    weight_params: list[nn.Parameter]
    w_opt: torch.optim.Optimizer
    architect: Architect
    losses: dict[Stage, Callable]
    logits: dict[Stage, Callable]
    monitor: EigenvalueMonitor
    eigvec: list[torch.Tensor] | None = None


def _augmentation_generator(order: torch.Generator, rank: int = 0) -> torch.Generator:
    """The epoch's augmentation stream, seeded from its batch-order stream but separate from it, and
    different on every rank (each augments its own shard)."""
    return torch.Generator().manual_seed(rank_seed(order.initial_seed() + 1, rank))


def _plain_candidates(candidates: CandidateSets | None) -> dict[str, list[list[str]]] | None:
    return None if candidates is None else {k: [list(ops) for ops in v] for k, v in candidates.items()}


@dataclass
class PhaseState:
    """Everything a phase needs to continue after a restart."""

    phase: str
    epoch: int = 0
    best_val: float = -1.0
    projections: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)     # search: adaptive regularisation


def _trainer_class(cls: type[Trainer], cfg: TrainConfig) -> type[Trainer]:
    """The class that trains ``cfg``: ``cls``, or ProtoPNet's trainer for ``method: protopnet``."""
    if cfg.method == "protopnet":
        from nasxserve.training.protopnet import ProtoPNetTrainer   # it imports this module
        return ProtoPNetTrainer
    return cls


class Trainer:
    """Runs search and/or retraining for one run directory.

    Args:
        cfg: the effective configuration (saved to config.yaml).
        run_dir: where everything goes.
        reporter: progress sink.
        on_epoch_end: called after each epoch's checkpoint is written, with (phase, epoch); a
            KeyboardInterrupt raised there stops the run cleanly (used to test resumption).

    Under torchrun (an initialised process group) it trains data-parallel; ``run_dir`` is then a
    :class:`ReplicaRunDir` on every rank but 0.
    """

    class_specific_projection = False   # ProtoPNet's push keeps every prototype within its class

    def __init__(self, cfg: TrainConfig, run_dir: RunDir, reporter: Reporter | None = None,
                 on_epoch_end: Callable[[str, int], None] | None = None):
        self.cfg = cfg
        self.run = run_dir
        self.reporter = reporter or Reporter()
        self.on_epoch_end = on_epoch_end
        self.world = current_world()
        self.device = device_for_rank(resolve_device(cfg.device), self.world)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.channels_last = self.device.type == "cpu"
        self.precision = resolve_precision(cfg.precision, self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True   # fixed input sizes: let cuDNN pick its fastest kernels
        self.data: Dataset = load_dataset(cfg.data.spec, cfg.data.image_size, cfg.data.crop, cfg.data.val_share)
        self.loss_weights = LossWeights(cfg.loss.lambda1, cfg.loss.lambda2)
        self._check_batches_cover_ranks()
        self.arch_trace = ArchitectureTrace.from_environment(self.world.rank)
        self.step = 0  # global epoch counter across phases, for metrics.jsonl
        self.started = time.time()
        self.elapsed_before = 0.0

    # ------------------------------------------------------------------ entry points
    @classmethod
    def fresh(cls, cfg: TrainConfig, out: str, **kw) -> Trainer:
        world = current_world()
        run = _run_dir(world.broadcast_object(out), world)   # rank 0's name, e.g. a time-stamped default
        if cfg.genotype:
            load_genotype(cfg.genotype)  # a bad genotype fails before anything is written
        trainer = _trainer_class(cls, cfg)(cfg, run, **kw)   # so do a bad dataset and an unavailable device

        def create_run() -> None:
            run.create()
            run.write_text(run.config_path, cfg.to_yaml())

        world.run_on_main(create_run)
        return trainer

    @classmethod
    def resume(cls, out: str, **kw) -> Trainer:
        import yaml
        run = _run_dir(out, current_world())
        run.require_resumable()
        if not run.config_path.is_file():
            raise RunDirError(f"cannot resume {run.root}: config.yaml is missing")
        cfg = config_from_dict(yaml.safe_load(run.config_path.read_text(encoding="utf-8")) or {})
        return _trainer_class(cls, cfg)(cfg, run, **kw)

    def search(self) -> Genotype:
        """Search only (or continue an interrupted search); writes genotype.json."""
        return self._search(self._checkpoint())

    def _search(self, ckpt: dict[str, Any] | None) -> Genotype:
        if ckpt is not None and ckpt["phase"] == RETRAIN:
            return Genotype.from_dict(ckpt["genotype"])
        genotype = self._run_search(ckpt)
        self.run.write_json(self.run.genotype_path, {"genotype": genotype.to_dict(),
                                                    "darts": genotype.to_darts_string()})
        return genotype

    def train(self) -> dict[str, Any]:
        """Search (unless a genotype is given), then retrain; returns the report."""
        ckpt = self._checkpoint()
        if self.cfg.genotype:
            genotype = load_genotype(self.cfg.genotype)
            self.run.write_json(self.run.genotype_path, {"genotype": genotype.to_dict(),
                                                        "darts": genotype.to_darts_string(),
                                                        "source": self.cfg.genotype})
            search_report = None
        else:
            genotype = self._search(ckpt)
            search_report = self._search_summary()
        retrain_ckpt = ckpt if ckpt is not None and ckpt["phase"] == RETRAIN else None
        return self._run_retrain(genotype, retrain_ckpt, search_report)

    # ------------------------------------------------------------------ shared pieces
    def _checkpoint(self) -> dict[str, Any] | None:
        ckpt = self.run.load_checkpoint() if self.run.last_checkpoint.is_file() else None
        self.world.barrier()   # every rank has read it before rank 0 writes the next one
        if ckpt is None:
            if self.run.metrics_path.is_file():   # a run resumed before its first checkpoint starts again
                self.run.truncate_metrics(0)
            return None
        self.elapsed_before = float(ckpt.get("elapsed_s", 0.0))
        return ckpt

    def _check_batches_cover_ranks(self) -> None:
        """Every global training batch must give each process at least one image."""
        sizes = {"data.batch_size": self.cfg.data.batch_size, "retrain.batch_size": self.cfg.retrain.batch_size,
                 "search.stability.batch_size": self.cfg.search.stability.batch_size}
        small = [f"{k} = {v}" for k, v in sizes.items() if v is not None and v < self.world.size]
        if small:
            raise ConfigError(f"{', '.join(small)} is smaller than the {self.world.size} processes; batch sizes "
                              f"are global (split over the processes), so make them at least {self.world.size}")

    def _elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.started

    def model_spec(self, genotype: Genotype) -> ModelSpec:
        """The retrained network's architecture as plain data (what an exported bundle records)."""
        m, r = self.cfg.model, self.cfg.retrain
        return ModelSpec(genotype=genotype, channels=r.channels, layers=r.layers, reductions=r.reductions,
                         in_channels=self.data.in_channels, num_classes=self.data.num_classes,
                         prototypes_per_class=m.prototypes_per_class, prototype_dim=m.prototype_dim, eps=m.eps,
                         auxiliary_tower=r.auxiliary_tower > 0, head=r.head)

    def _place(self, model: ExplainableNet) -> ExplainableNet:
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def _project(self, model: ExplainableNet, images: ImageSet, eval_sets: dict[str, ImageSet], phase: str,
                 epoch: int, state: PhaseState, save: bool) -> dict[str, Any]:
        """Global projection (eq. 9) onto ``images``, then the last-layer policy (:meth:`_after_projection`).

        The prototype path's accuracy on each of ``eval_sets`` is recorded just before and just after
        the projection (Theorem 1 says it should barely move) and after the last-layer steps. Data-parallel,
        the nearest-patch search is split over the processes and every process projects alike.
        """
        bs = self.cfg.data.eval_batch_size

        def accuracies(tag: str) -> dict[str, float]:
            return {f"{name}_acc_{tag}": evaluate(model, s, bs, self.device, channels_last=self.channels_last,
                                                  world=self.world).acc
                    for name, s in eval_sets.items()}

        event: dict[str, Any] = {"event": "projection", "phase": phase, "epoch": epoch + 1, "step": self.step + 1}
        event.update(accuracies("before"))
        records = project_prototypes(model, images, bs, self.device, sharded_nearest_patches(self.world),
                                     class_specific=self.class_specific_projection)
        if save and self.cfg.projection.box_calibration:
            records = self._calibrate_boxes(model, images, records, event)
        event.update(accuracies("after"))
        rule, changed = self._after_projection(model, images, epoch, phase, records, event)
        event.update(class_counts=class_counts(records, self.data.num_classes),
                     mean_distance=sum(r.distance for r in records) / len(records), last_layer=rule)
        if changed:
            event.update(accuracies("after_last_layer"))
        if save:
            self.run.save_prototypes(records, images, self.data.classes)
        self.run.append_metrics(event)
        state.projections.append(event)
        first = next(iter(eval_sets))
        self.reporter.message(
            f"projection ({phase}, epoch {epoch + 1}): {first} accuracy {event[first + '_acc_before']:.4f} -> "
            f"{event[first + '_acc_after']:.4f}"
            + (f" -> {event[first + '_acc_after_last_layer']:.4f} after last-layer steps"
               if first + "_acc_after_last_layer" in event else ""))
        return event

    def _calibrate_boxes(self, model: ExplainableNet, images: ImageSet, records: list[ProjectionRecord],
                         event: dict[str, Any]) -> list[ProjectionRecord]:
        """The projected prototypes' box offsets measured on ``images`` (every process measures all of them, so
        all agree), put in their records and summed up in the projection's log ``event``."""
        offsets = evidence_offsets(model, images, self.cfg.data.eval_batch_size, self.device)
        moved = np.abs(offsets).max(axis=1)
        event["box_calibration"] = {"prototypes_moved": int((moved > 0).sum()),
                                    "median_shift_px": float(np.median(moved)), "max_shift_px": int(moved.max())}
        return calibrate_records(records, offsets, self._latent_hw(model, images), images.image_hw)

    def _latent_hw(self, model: ExplainableNet, images: ImageSet) -> tuple[int, int]:
        """(H', W') of the latent grid ``model`` gives ``images``, from one image in eval mode (no batch-norm
        statistics learn from it); the model is left in the mode it was in."""
        was_training = model.training
        model.eval()
        with torch.no_grad():
            x, _ = images.batch(torch.arange(1))
            _, _, h, w = model.latent(x.to(self.device)).shape
        model.train(was_training)
        return h, w

    def _after_projection(self, model: ExplainableNet, images: ImageSet, epoch: int, phase: str,
                          records: list[ProjectionRecord], event: dict[str, Any]) -> tuple[str, bool]:
        """The last-layer step after a projection (:mod:`nasxserve.protos.last_layer`): the prototypes that changed
        class (``records``' ``class_before``) reconnected by eq. (8), then h fitted on ``images``' fixed
        similarities, so that every prototype supports the class it is shown with; how many were reconnected goes
        into the projection's log ``event``. Data-parallel, every process does all of it (the same steps from the
        same data: the same h). Returns the rule's name for the log and whether h changed."""
        p = self.cfg.projection
        sims, labels = self._fixed_similarities(model, images)
        fit = LastLayerFit(passes=p.last_layer_passes, lr=p.last_layer_lr, l1=p.last_layer_l1,
                           batch_size=self.cfg.data.batch_size)
        gen = torch.Generator().manual_seed(epoch_seed(self.cfg.seed, phase, epoch) + 1)
        layer = model.prototype_layer
        before = torch.tensor([r.class_before for r in records], device=layer.prototype_class.device)
        event["reconnected_prototypes"] = fit_last_layer(model.last_layer, sims, labels, layer.prototype_class,
                                                         before, fit, gen)
        model.train()
        return LAST_LAYER_RULE, True

    def _sign_floor(self) -> float | None:
        """The floor of h's own-class connections between projections (projection.signs_between_projections), or
        None where h trains freely between them."""
        return LastLayerFit.floor if self.cfg.projection.signs_between_projections else None

    def _fixed_similarities(self, model: ExplainableNet, images: ImageSet) -> tuple[torch.Tensor, torch.Tensor]:
        """Similarities (N, m) and labels (N,) of ``images`` in order, in eval mode (the model is left in it)."""
        model.eval()
        sims, labels = [], []
        with torch.no_grad():
            for x, y in images.batches(self.cfg.data.eval_batch_size):
                x, y = _to_device(x, y, self.device, self.channels_last)
                sims.append(model(x, aux_path=False).protos.similarities)
                labels.append(y)
        return torch.cat(sims), torch.cat(labels)

    def _fit_last_layer(self, model: ExplainableNet, images: ImageSet, optimizer: torch.optim.Optimizer, passes: int,
                        epoch: int, phase: str, penalty: Callable[[], torch.Tensor | float] = lambda: 0.0) -> None:
        """``passes`` shuffled passes of ``optimizer`` steps on h alone: cross-entropy of h over the fixed
        similarities of ``images`` (batches of ``data.batch_size``), plus ``penalty()``."""
        sims, labels = self._fixed_similarities(model, images)
        gen = torch.Generator().manual_seed(epoch_seed(self.cfg.seed, phase, epoch) + 1)
        descend_on_similarities(model.last_layer, sims, labels, optimizer, passes, self.cfg.data.batch_size, gen,
                                penalty)
        model.train()

    def _log_epoch(self, row: dict[str, Any]) -> None:
        row = {"step": self.step, **row, "elapsed_s": round(self._elapsed(), 2)}
        self.run.append_metrics(row)
        self.reporter.epoch_end(row)

    def _save_state(self, state: PhaseState, payload: dict[str, Any]) -> None:
        """checkpoints/last.pt: ``payload`` (model and optimiser states) plus where the phase stands."""
        payload.update(phase=state.phase, epoch=state.epoch, step=self.step, best_val=state.best_val,
                       projections=state.projections, elapsed_s=self._elapsed(),
                       config=self.cfg.to_dict(), nasx_version=__version__)
        self.run.save_checkpoint(payload)

    def _finish_epoch(self, state: PhaseState, payload: dict[str, Any]) -> None:
        self._save_state(state, payload)
        if self.on_epoch_end is not None:
            self.on_epoch_end(state.phase, state.epoch)

    def _begin_epoch(self, phase: str, epoch: int, lr: float, optimizer: torch.optim.Optimizer) -> torch.Generator:
        """Set the optimiser's lr and reseed the epoch's random streams (:meth:`_reseed`)."""
        for g in optimizer.param_groups:
            g["lr"] = lr
        return self._reseed(phase, epoch)

    def _reseed(self, phase: str, epoch: int) -> torch.Generator:
        """Reseed the epoch's random streams from (seed, phase, epoch); returns the generator that orders the
        epoch's batches (the same on every rank; torch's global stream, which dropout and drop-path draw
        from, is the rank's own)."""
        seed = epoch_seed(self.cfg.seed, phase, epoch)
        torch.manual_seed(rank_seed(seed, self.world.rank))
        return torch.Generator().manual_seed(seed)

    def _validation_split(self) -> tuple[str, ImageSet]:
        """The split of the per-epoch accuracy, the projection lines and best.pt: val (the dataset's own, or held
        out of its training split by data.val_share), or test with data.val_share 0 on a dataset without one (the
        papers' setting: DARTS' CIFAR runs train on the whole training set and report the test split)."""
        return ("val", self.data.val) if self.data.val is not None else ("test", self.data.test)

    def _augmentation(self, cutout: int) -> Augmentation | None:
        """The configured training augmentation (None when there is none)."""
        d = self.cfg.data
        padding = d.padding if d.padding is not None else default_padding(min(self.data.image_size))
        augment = Augmentation(d.augment, padding=padding, cutout=cutout)
        return augment if augment.active else None

    def _train_batches(self, images: ImageSet, batch_size: int, order: torch.Generator,
                       aug_gen: torch.Generator, augment: Augmentation | None, with_index: bool = False):
        """This rank's shards of the epoch's shuffled global batches of ``batch_size`` (with their sample
        indices: ``with_index``)."""
        return sharded_batches(images, batch_size, self.world, True, order, drop_last=True, augment=augment,
                               augment_generator=aug_gen, device=self.device, with_index=with_index)

    def _epoch_means(self, sums: list[float], batches: int, batch_size: int) -> list[float]:
        """Per-batch values summed over the epoch on this rank's shards -> means over the global batches."""
        return [total / max(batches, 1) for total in self.world.sum_floats(sums, self.world.share(batch_size))]

    def _resume_common(self, ckpt: dict[str, Any], state: PhaseState) -> None:
        state.epoch, state.best_val = int(ckpt["epoch"]), float(ckpt["best_val"])
        state.projections = list(ckpt["projections"])
        self.step = int(ckpt["step"])
        self.run.truncate_metrics(self.step)
        self.reporter.message(f"resuming {state.phase} after epoch {state.epoch}")

    # ------------------------------------------------------------------ search
    def _search_split(self) -> tuple[ImageSet, ImageSet]:
        train = self.data.train
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.cfg.seed)).numpy()
        if self.cfg.search.subset:
            order = order[:self.cfg.search.subset]
        cut = int(round(len(order) * self.cfg.data.train_portion))
        return train.subset(order[:cut]), train.subset(order[cut:])

    def _search_schedule(self) -> list[Stage]:
        """The NASXNet stage of each epoch of one search network; with the plain head, stage 1 throughout."""
        s = self.cfg.search
        epochs = {Stage.ADAPT: s.epochs_adapt, Stage.JOINT: s.epochs_joint, Stage.FINETUNE: s.epochs_finetune}
        if s.head == "plain":
            return [Stage.ADAPT] * sum(epochs.values())
        return stages_for(epochs)

    def _open_search_network(self, strategy: SearchStrategy, index: int, candidates: CandidateSets | None,
                             weight_decay: float, audience: nn.Module | None) -> SearchNet:
        """The strategy's ``index``-th search network in an explainable model, with its optimisers."""
        s, m = self.cfg.search, self.cfg.model
        torch.manual_seed(self.cfg.seed + index)
        features = strategy.build(index, candidates)
        model = self._place(ExplainableNet(features, self.data.num_classes, m.prototypes_per_class,
                                           m.prototype_dim, m.eps))
        self.world.broadcast_state(model)   # the same seed builds the same network; this makes sure of it
        arch_names = [f"features.{n}" for n in features.arch_parameter_names()]
        weight_params = [p for n, p in model.named_parameters() if n not in arch_names]
        w_opt = torch.optim.SGD(weight_params, lr=s.lr, momentum=s.momentum, weight_decay=weight_decay)
        losses = {st: functional_stage_loss(model, st, self.loss_weights) for st in Stage}
        logits = {st: functional_stage_logits(model, st, self.loss_weights) for st in Stage}
        # one architect per network, so one Adam state for alpha across stages; its loss follows the stage
        args = (model, losses[Stage.ADAPT], arch_names, s.order, s.arch_lr, (*s.arch_betas,), s.arch_weight_decay)
        reduce = self.world.gradient_reducer(self.cfg.data.batch_size)
        if audience is None:
            architect = Architect(*args, reduce_gradients=reduce)
        else:
            le = s.lease
            architect = LeaseArchitect(*args, reduce_gradients=reduce, logits=logits[Stage.ADAPT], audience=audience,
                                       gamma=le.gamma, audience_only=le.audience_only, audience_lr=le.audience_lr,
                                       audience_momentum=le.audience_momentum,
                                       audience_weight_decay=le.audience_weight_decay, delta_lr=le.delta_lr,
                                       delta_init=le.delta_init)
        st = s.stability
        return SearchNet(index, candidates, features, model, weight_params, w_opt, architect, losses, logits,
                         EigenvalueMonitor(st.window, st.ratio, st.lookback, st.start_epoch, st.every))

    def _restore_search_network(self, net: SearchNet, ckpt: dict[str, Any]) -> None:
        net.model.load_state_dict(ckpt["model"])
        net.w_opt.load_state_dict(ckpt["w_opt"])
        net.architect.load_checkpoint_state(ckpt)
        net.monitor.restore(ckpt.get("eigenvalues", []), ckpt.get("eigenvalue_epochs"))
        net.eigvec = ckpt.get("eigenvector")             # the warm start, so a resumed run logs the same

    def _next_search_network(self, strategy: SearchStrategy, net: SearchNet, index: int,
                             audience: nn.Module | None) -> SearchNet:
        """P-DARTS between stages: the next, deeper network keeps the strongest operations of this one."""
        candidates = strategy.next_candidates(net.features, net.index)
        nxt = self._open_search_network(strategy, index, candidates, net.w_opt.param_groups[0]["weight_decay"],
                                        audience)
        # the audience carries on, momentum and all
        if isinstance(net.architect, LeaseArchitect) and isinstance(nxt.architect, LeaseArchitect):
            nxt.architect.audience_optimizer.load_state_dict(net.architect.audience_optimizer.state_dict())
        self.run.append_metrics({"phase": SEARCH, "event": "operations_dropped", "step": self.step,
                                 "after_network": net.index + 1, "keep": len(candidates["normal"][0]),
                                 "candidates": _plain_candidates(candidates)})
        self.reporter.message(f"search: network {net.index + 1} done; network {index + 1} "
                              f"({len(net.features.cells)} -> {len(nxt.features.cells)} cells) keeps "
                              f"{len(candidates['normal'][0])} operations per edge")
        return nxt

    def _run_search(self, ckpt: dict[str, Any] | None) -> Genotype:
        s = self.cfg.search
        strategy = build_strategy(s, self.data.in_channels)
        schedule = self._search_schedule()
        per_network = len(schedule)
        total = per_network * strategy.networks
        state = PhaseState(SEARCH)
        audience = None
        if s.lease.enabled:
            torch.manual_seed(self.cfg.seed + 10_007)
            audience = build_audience(s.lease.audience, self.data.in_channels, self.data.num_classes).to(self.device)
            if self.channels_last:
                audience = audience.to(memory_format=torch.channels_last)
            self.world.broadcast_state(audience)
        st = s.stability
        adaptive = st.adaptive and st.track
        if ckpt is None:
            net = self._open_search_network(strategy, 0, None, s.weight_decay, audience)
        else:
            net = self._open_search_network(strategy, int(ckpt.get("network", 0)), ckpt.get("candidates"),
                                            s.weight_decay, audience)
            self._restore_search_network(net, ckpt)
            state.events = list(ckpt.get("regularisation", []))
            adaptive = adaptive and all("rolled_back_to" in ev for ev in state.events)
            self._resume_common(ckpt, state)
        w_set, a_set = self._search_split()
        deltas = None if audience is None else self._open_deltas(w_set, state.epoch if ckpt is not None else 0)
        augment = self._augmentation(cutout=0)
        # first-order DARTS' alpha gradient is a plain backward pass; finite differences need fp32
        low_precision_arch = s.order == 1 and audience is None
        self.reporter.phase(SEARCH, total)
        bs = self.cfg.data.batch_size
        while state.epoch < total:
            e = state.epoch
            index, local = divmod(e, per_network)
            if index != net.index:
                net = self._next_search_network(strategy, net, index, audience)
            stage = schedule[local]
            lr = cosine_lr(s.lr, s.lr_min, local, per_network)
            gen = self._begin_epoch(SEARCH, e, lr, net.w_opt)
            strategy_row = strategy.begin_epoch(net.features, index, local, per_network)
            updates_arch = strategy.updates_architecture(local)
            net.architect.loss = net.losses[stage]
            if isinstance(net.architect, LeaseArchitect):
                net.architect.logits = net.logits[stage]
                net.architect.deltas = deltas
            net.model.train()
            n_batches = min(w_set.num_batches(bs, drop_last=True), a_set.num_batches(bs, drop_last=True))
            self.reporter.epoch_start(SEARCH, e, stage, n_batches)
            loss_sum = acc_sum = audience_sum = explanation_sum = 0.0
            aug_gen = _augmentation_generator(gen, self.world.rank)
            batches = TimedBatches(zip(self._train_batches(w_set, bs, gen, aug_gen, augment, with_index=True),
                                       self._train_batches(a_set, bs, gen, aug_gen, augment)))
            reduce = self.world.gradient_reducer(bs)
            for i, ((xt, yt, it), (xv, yv)) in enumerate(batches):
                xt, yt = _to_device(xt, yt, self.device, self.channels_last)
                xv, yv = _to_device(xv, yv, self.device, self.channels_last)
                if updates_arch:
                    with self.precision.autocast() if low_precision_arch else contextlib.nullcontext():
                        net.architect.step(xt, yt, xv, yv, lr, net.w_opt, index=it)
                    self.arch_trace.record(e + 1, i + 1, net.architect.arch)
                    if isinstance(net.architect, LeaseArchitect):   # it has an audience
                        audience_sum += net.architect.last_audience_loss
                        explanation_sum += net.architect.last_explanation_acc
                loss, acc = weight_step(net.model, stage, xt, yt, net.w_opt, net.weight_params, self.loss_weights,
                                        s.grad_clip, self.precision, reduce, self._sign_floor())
                loss_sum, acc_sum = loss_sum + loss, acc_sum + acc
                self.reporter.batch(loss, acc)
            wait_share = batches.wait_share
            train_loss, train_acc, audience_loss, explanation_acc = self._epoch_means(
                [loss_sum, acc_sum, audience_sum, explanation_sum], n_batches, bs)
            self.world.broadcast_state(net.model, buffers_only=True)   # evaluate and save rank 0's BN statistics
            last = e == total - 1
            projected = None
            if stage.uses_prototypes and (last or (s.project_every and (e + 1) % s.project_every == 0)):
                projected = self._project(net.model, w_set, {"val": a_set}, SEARCH, e, state, save=False)
            if last and projected is None:  # a search with no prototype stage still ends projected
                projected = self._project(net.model, w_set, {"val": a_set}, SEARCH, e, state, save=False)
            val = evaluate(net.model, a_set, self.cfg.data.eval_batch_size, self.device,
                           prototype_path=stage.uses_prototypes or last, channels_last=self.channels_last,
                           precision=self.precision, world=self.world)
            self.step += 1
            state.epoch = e + 1
            genotype = strategy.genotype(net.features)
            row = {"phase": SEARCH, "epoch": e + 1, "stage": stage.value, "strategy": strategy.name,
                   "network": index + 1, "arch_updates": updates_arch, "lr": lr,
                   "weight_decay": net.w_opt.param_groups[0]["weight_decay"],
                   "train_loss": train_loss, "train_acc": train_acc,
                   "val_acc": val.acc, "val_aux_acc": val.aux_acc, "data_wait_share": round(wait_share, 4),
                   **strategy_row,
                   "skip_connections": genotype.count("skip_connect"), "genotype": genotype.to_dict()}
            if deltas is not None and updates_arch:   # LeaSE
                row.update(audience_val_loss=audience_loss, audience_explanation_acc=explanation_acc,
                           **deltas.take_drift())
            rise = None
            final = local == per_network - 1
            measured = st.track and net.monitor.due(local + 1, final)
            if measured:
                estimate = dominant_eigenvalue(self._hessian_losses(net.architect, a_set), net.architect.arch,
                                               st.iterations, st.tolerance, start=net.eigvec,
                                               generator=torch.Generator().manual_seed(self.cfg.seed),
                                               reduce=self.world.reducer(1.0))   # losses carry their shares
                net.eigvec = estimate.warm_start   # lambda_max's eigenvector, and the shift's if one was needed
                row.update(hessian_eigenvalue=estimate.value, hessian_iterations=estimate.iterations)
                rise = net.monitor.add(estimate.value, local + 1, final)
            self._log_epoch(row)
            payload = self._search_payload(net, state)
            snapshots = range(0)   # the epochs a later rollback may return to, within the network's own
            if adaptive:
                snapshots = range(index * per_network + net.monitor.oldest_rollback_target(), state.epoch + 1)
                if measured:   # a rollback returns to a measured epoch
                    self.run.save_checkpoint(payload, self.run.search_snapshot(state.epoch))
                    self.run.prune_search_snapshots(snapshots)
            if deltas is not None:
                self._save_deltas(deltas, state.epoch, snapshots)
            self._finish_epoch(state, payload)
            if rise is not None and adaptive:
                adaptive = self._regularise(rise, index * per_network, state, net)
        if deltas is not None:
            self.run.prune_lease_deltas({state.epoch})   # last.pt's; rollbacks are over
            deltas.close()
        return strategy.genotype(net.features)

    def _open_deltas(self, w_set: ImageSet, epoch: int) -> DeltaStore:
        """LeaSE's per-sample Delta over the weight split (D_e^tr = D_a^tr), as it was after ``epoch``
        search epochs: initial for 0, else the copy saved with that epoch's checkpoint. Rank 0 keeps it in
        the run directory's working file when large, the other ranks in a temporary file."""
        le = self.cfg.search.lease
        store = DeltaStore(len(w_set), tuple(w_set.images.shape[1:]), self.cfg.seed, le.delta_init,
                           self.run.lease_deltas_working if self.world.is_main else None,
                           gather_rows=self.world.gather_rows, reset=epoch == 0)
        if epoch:
            store.load(self.run.lease_deltas(epoch))
        return store

    def _save_deltas(self, deltas: DeltaStore, epoch: int, snapshots: range) -> None:
        """Delta after ``epoch``, the copy last.pt (written next) and a search snapshot of ``epoch`` go with.
        The previous epoch's copy stays until the next epoch (last.pt names it until it is replaced), and so
        do those of the search snapshots a rollback may return to (Delta rolls back with E, W and alpha)."""
        deltas.save(self.run.save_array, self.run.lease_deltas(epoch))
        self.run.prune_lease_deltas({epoch - 1, epoch, *snapshots})

    def _search_payload(self, net: SearchNet, state: PhaseState) -> dict[str, Any]:
        """What a search checkpoint (last.pt or an epoch snapshot) holds besides the phase bookkeeping."""
        return {"model": net.model.state_dict(), "w_opt": net.w_opt.state_dict(), **net.architect.checkpoint_state(),
                "network": net.index, "candidates": _plain_candidates(net.candidates),
                "eigenvalues": list(net.monitor.values), "eigenvalue_epochs": list(net.monitor.epochs),
                "eigenvector": net.eigvec,
                "regularisation": list(state.events)}

    def _hessian_losses(self, architect: Architect, a_set: ImageSet) -> list:
        """The current stage's validation loss on the first ``stability.batches`` validation batches (a
        fixed order, so epochs are compared on the same data). Data-parallel: this rank's shard of each,
        weighted by its share, so that the Hessian-vector products sum over ranks to the global ones."""
        st = self.cfg.search.stability
        losses = []
        for b in range(min(st.batches, a_set.num_batches(st.batch_size))):
            start = b * st.batch_size
            stop = min(start + st.batch_size, len(a_set))
            if stop - start < self.world.size:
                break   # a last batch too small to give every rank an image (every rank sees this alike)
            lo, hi = self.world.shard_of(start, stop)
            xv, yv = _to_device(*a_set.batch(torch.arange(lo, hi)), self.device, self.channels_last)
            share = (hi - lo) / (stop - start)   # 1.0 in one process: the loss unchanged, bit for bit
            losses.append(lambda xv=xv, yv=yv, share=share: share * architect.current_loss(xv, yv))
        return losses

    def _regularise(self, rise: Rollback, offset: int, state: PhaseState, net: SearchNet) -> bool:
        """DARTS-ADA: back to the state after ``rise.to_epoch`` (counted within the network, whose first
        epoch is ``offset + 1``) with the weight decay raised; at the limit, record it and carry on.
        Returns whether later rises may still roll back."""
        st = self.cfg.search.stability
        current = float(net.w_opt.param_groups[0]["weight_decay"])
        raised = raised_weight_decay(current, st.factor, st.max_weight_decay)
        to_epoch = offset + rise.to_epoch
        event = {"phase": SEARCH, "event": "regularisation", "at_epoch": offset + rise.at_epoch,
                 "eigenvalue_ratio": rise.ratio}
        if raised is None:
            event.update(action="none: weight decay already at its limit", weight_decay=current)
        else:
            self.world.barrier()   # rank 0 has written the snapshot (every rank sees the same rise)
            snap = self.run.load_checkpoint(self.run.search_snapshot(to_epoch))
            net.model.load_state_dict(snap["model"])
            net.w_opt.load_state_dict(snap["w_opt"])
            net.architect.load_checkpoint_state(snap)
            if isinstance(net.architect, LeaseArchitect) and net.architect.deltas is not None:
                net.architect.deltas.load(self.run.lease_deltas(to_epoch))
            for group in net.w_opt.param_groups:
                group["weight_decay"] = raised
            net.monitor.truncate(rise.to_epoch)
            state.epoch = to_epoch
            self.run.prune_search_snapshots(range(1, to_epoch + 1))
            event.update(action="rolled back", rolled_back_to=to_epoch, weight_decay=raised)
        state.events.append(event)
        self.run.append_metrics({"step": self.step, **event, "elapsed_s": round(self._elapsed(), 2)})
        self.reporter.message(f"search: eigenvalue rose {rise.ratio:.2f}x by epoch {event['at_epoch']}; "
                              + (f"back to epoch {to_epoch} with weight decay {raised:g}" if raised is not None
                                 else "weight decay already at its limit, continuing"))
        self._save_state(state, self._search_payload(net, state))
        return raised is not None

    def _search_summary(self) -> dict[str, Any]:
        """The search's epochs and projections as logged (the log survives a resumed run; memory doesn't);
        rank 0 reads the log it wrote and tells the others."""
        summary = self.world.broadcast_object(self._read_search_summary() if self.world.is_main else None)
        assert summary is not None
        return summary

    def _read_search_summary(self) -> dict[str, Any]:
        rows = [r for r in self.run.read_metrics() if r.get("phase") == SEARCH]
        epochs = [r for r in rows if "event" not in r]
        s = self.cfg.search
        return {"strategy": s.strategy, "lease": s.lease.enabled, "head": s.head,
                "epochs": epochs[-1]["epoch"] if epochs else 0, "epochs_run": len(epochs),
                "final_val_acc": epochs[-1]["val_acc"] if epochs else None,
                "final_hessian_eigenvalue": epochs[-1].get("hessian_eigenvalue") if epochs else None,
                "projections": [r for r in rows if r.get("event") == "projection"],
                "regularisation": [r for r in rows if r.get("event") == "regularisation"],
                "operations_dropped": [r for r in rows if r.get("event") == "operations_dropped"]}

    # ------------------------------------------------------------------ retrain
    def _run_retrain(self, genotype: Genotype, ckpt: dict[str, Any] | None,
                     search_report: dict[str, Any] | None) -> dict[str, Any]:
        r = self.cfg.retrain
        torch.manual_seed(self.cfg.seed + 1)
        model = self._place(build_model(self.model_spec(genotype)))
        self.world.broadcast_state(model)
        features = model.features
        self.loss_weights = LossWeights(self.cfg.loss.lambda1, self.cfg.loss.lambda2, r.auxiliary_tower,
                                        r.deletion_cost)
        linear = r.head == "linear"
        # the black box trains f and h1 only; its prototype path is never used
        if linear:
            assert model.aux_head is not None
            params = list(features.parameters()) + list(model.aux_head.parameters())
        else:
            params = list(model.parameters())
        opt = torch.optim.SGD(params, lr=r.lr, momentum=r.momentum, weight_decay=r.weight_decay)
        if linear:   # eq. (4) (plus the tower term when on) for all the retrain's epochs
            schedule = [Stage.ADAPT] * (r.epochs_joint + r.epochs_finetune)
        else:
            schedule = stages_for({Stage.JOINT: r.epochs_joint, Stage.FINETUNE: r.epochs_finetune})
        total = len(schedule)
        state = PhaseState(RETRAIN)
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["w_opt"])
            self._resume_common(ckpt, state)
        train = self.data.train
        val_name, val = self._validation_split()
        self.reporter.phase(RETRAIN, total)
        bs = r.batch_size or self.cfg.data.batch_size
        augment = self._augmentation(cutout=r.cutout)
        while state.epoch < total:
            e = state.epoch
            stage = schedule[e]
            lr = cosine_lr(r.lr, r.lr_min, e, total)
            gen = self._begin_epoch(RETRAIN, e, lr, opt)
            features.drop_path_prob = r.drop_path * e / total
            model.train()
            n_batches = train.num_batches(bs, drop_last=True)
            self.reporter.epoch_start(RETRAIN, e, stage, n_batches)
            loss_sum = acc_sum = 0.0
            batches = TimedBatches(self._train_batches(train, bs, gen, _augmentation_generator(gen, self.world.rank),
                                                       augment))
            reduce = self.world.gradient_reducer(bs)
            for x, y in batches:
                x, y = _to_device(x, y, self.device, self.channels_last)
                loss, acc = weight_step(model, stage, x, y, opt, params, self.loss_weights, r.grad_clip,
                                        self.precision, reduce, self._sign_floor())
                loss_sum, acc_sum = loss_sum + loss, acc_sum + acc
                self.reporter.batch(loss, acc)
            wait_share = batches.wait_share
            train_loss, train_acc = self._epoch_means([loss_sum, acc_sum], n_batches, bs)
            self.world.broadcast_state(model, buffers_only=True)   # evaluate and save rank 0's BN statistics
            last = e == total - 1
            projected = not linear and (last or bool(r.project_every and (e + 1) % r.project_every == 0))
            if projected:
                sets = {val_name: val, "test": self.data.test} if last else {val_name: val}
                self._project(model, train, sets, RETRAIN, e, state, save=True)
            v = evaluate(model, val, self.cfg.data.eval_batch_size, self.device, prototype_path=not linear,
                         channels_last=self.channels_last, precision=self.precision, world=self.world)
            self.step += 1
            state.epoch = e + 1
            self._log_epoch({"phase": RETRAIN, "epoch": e + 1, "stage": stage.value, "lr": lr,
                             "train_loss": train_loss, "train_acc": train_acc,
                             "val_acc": v.acc, "val_aux_acc": v.aux_acc, "val_split": val_name,
                             "data_wait_share": round(wait_share, 4)})
            if v.acc > state.best_val and (projected or linear):
                # only a model just projected (and its h fitted) explains with real patches; the black box has none
                state.best_val = v.acc
                self.run.save_checkpoint({"model": model.state_dict(), "epoch": e + 1, "val_acc": v.acc,
                                          "genotype": genotype.to_dict()}, self.run.best_checkpoint)
            self._finish_epoch(state, {"model": model.state_dict(), "w_opt": opt.state_dict(),
                                       "genotype": genotype.to_dict()})
        return self._report(model, genotype, state, search_report)

    def _run_facts(self) -> dict[str, Any]:
        """The report keys every method shares: how long the run took, where and at which precision."""
        return {"wall_time_s": round(self._elapsed(), 1), "device": str(self.device),
                "precision": self.precision.name, "preset": self.cfg.preset}

    def _consistency(self, model: ExplainableNet) -> dict[str, Any]:
        """The report's word on whether the prototypes' labels are true (:mod:`nasxserve.explain.consistency`):
        prototypes whose label is not the class they support (none after the last-layer fit), and classes left
        without a prototype by the last projection, whose logit then has no positive evidence."""
        weight = model.last_layer.weight.detach().cpu().numpy()
        labels = model.prototype_layer.prototype_class.cpu().numpy()
        return {"mislabelled_prototypes": mislabelled_prototypes(weight, labels).tolist(),
                "classes_without_prototypes": [c for k, c in enumerate(self.data.classes) if not (labels == k).any()]}

    def _report(self, model: ExplainableNet, genotype: Genotype, state: PhaseState,
                search_report: dict[str, Any] | None) -> dict[str, Any]:
        """report.json. ``test.acc`` is the accuracy of the run's prediction (the prototype path, or h1 for the
        black box); ``params`` counts what that prediction uses (the training-only h1 and tower left out)."""
        head = self.cfg.retrain.head
        linear = head == "linear"
        test = evaluate(model, self.data.test, self.cfg.data.eval_batch_size, self.device, prototype_path=not linear,
                        channels_last=self.channels_last, world=self.world)
        final = state.projections[-1] if state.projections else {}
        report = {
            "nasx_version": __version__,
            "method": "nasxnet",
            "head": head,
            "data": self.data.summary(),
            "genotype": genotype.to_dict(),
            "model": self.model_spec(genotype).to_dict(),
            "genotype_darts": genotype.to_darts_string(),
            "genotype_source": self.cfg.genotype or "search",
            "collapsed_normal_cell": genotype.collapsed(),
            "test": {
                "acc": test.acc,
                "prototype_acc": None if linear else test.acc,
                "prototype_acc_before_projection": final.get("test_acc_before"),
                "prototype_acc_after_projection": final.get("test_acc_after"),
                "prototype_acc_after_last_layer": final.get("test_acc_after_last_layer"),
                "aux_acc": test.aux_acc,
                "n": test.n,
            },
            "last_layer_after_projection": None if linear else final["last_layer"],
            "deletion_cost": self.cfg.retrain.deletion_cost,
            "box_calibration": self.cfg.projection.box_calibration,
            "prototype_class_counts": None if linear else dict(zip(self.data.classes, final["class_counts"])),
            **({} if linear else self._consistency(model)),
            "num_prototypes": None if linear else model.prototype_layer.num_prototypes,
            "params": model.prediction_parameters(head),
            "search": search_report,
            "retrain_projections": state.projections,
            **self._run_facts(),
        }
        self.run.write_json(self.run.report_path, report)
        return report
