"""The ProtoPNet baseline (Chen et al., "This looks like that: deep learning for interpretable image
recognition", NeurIPS 2019), trained in nasx's pipeline so that the NASXNet paper's Table 1 can be
reproduced with the same data, budget and run directory.

Model: a torchvision backbone's convolutional trunk (:mod:`nasxserve.protos.backbone`; ResNet-18 by
default, ImageNet weights from ``--backbone-weights`` or none), ProtoPNet's add-on layers, m = K x
``model.prototypes_per_class`` class-specific prototypes and the last layer initialised by +1 / -0.5
(NASXNet's eq. 8 is ProtoPNet's initialisation). No auxiliary head.

Schedule (their main.py and settings.py), one epoch = one pass over the training split:
- warm-up, ``epochs_warm`` epochs: the features frozen, add-on layers and prototypes trained (Adam, 3e-3);
- joint, ``epochs_joint`` epochs: features, add-on layers and prototypes (Adam; 1e-4 for pretrained
  features, 3e-3, 3e-3; weight decay 1e-3 on features and add-on layers), every rate x0.1 every 5 joint
  epochs; the last layer stays fixed in both phases;
- push after 0-based epoch e when e >= ``push_start`` (10) and (e - push_start) is a multiple of
  ``push_every`` (10), and always after the last epoch: each prototype becomes its nearest training patch
  among images of its own class, then the last layer alone is optimised (Adam 1e-4, CE + 1e-4 L1 over
  weights to other classes) for ``last_layer_iterations`` (20) passes over the training split.
Loss of warm-up and joint epochs: CE + 0.8 ClstCost - 0.08 SepCost + 1e-4 L1 (:func:`protopnet_loss`).

Where this differs from the reference code, and why:
- The last-layer passes run on the similarities of the unaugmented training images computed once in
  eval mode, not on 20 fresh augmented passes through the network in train mode: the loss as a function
  of the last layer is the same, the cost drops from 20 network passes to one (which is what makes pushes
  affordable on a CPU), and BatchNorm's running statistics do not drift while the features are frozen.
- From scratch (no ``--backbone-weights``) the features learn at 1e-3: ProtoPNet's 1e-4 is a fine-tuning
  rate for ImageNet weights.
- ClstCost and SepCost take the masked minimum directly instead of ProtoPNet's ``D - max((D - d) mask)``,
  which equals it only while every distance is at most D.
- Single process: no data parallelism (ProtoPNet uses DataParallel on one machine); under torchrun it
  refuses to start.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from enum import Enum
from typing import Any

import torch
from torch import nn

from nasxserve import __version__
from nasxserve.data import Dataset, ImageSet
from nasxserve.data.augment import Augmentation
from nasxserve.errors import ConfigError
from nasxserve.nas.genotype import Genotype
from nasxserve.protos.backbone import read_backbone_weights, uses_small_input_stem
from nasxserve.protos.losses import ProtoPNetWeights, last_layer_l1, protopnet_loss
from nasxserve.protos.model import ExplainableNet, ModelSpec, build_model
from nasxserve.protos.projection import ProjectionRecord
from nasxserve.training.config import ProtoPNetConfig, TrainConfig
from nasxserve.training.context import PhaseState, Reporter, RunContext, TimedBatches, augmentation_generator
from nasxserve.training.distributed import current_world
from nasxserve.training.precision import Precision
from nasxserve.training.projection import Projector
from nasxserve.training.rundir import RunDir
from nasxserve.training.steps import apply_gradients, evaluate, to_device

PHASE = "protopnet"      # the phase of every row in metrics.jsonl
LAST_LAYER_RULE = "convex"   # ProtoPNet's stage 3, "convex optimization of the last layer", as logged
FROM_SCRATCH = "none: trained from scratch"
LOSS_TERMS = ("cross_entropy", "cluster_cost", "separation_cost", "l1")


class ProtoPNetStage(str, Enum):
    WARM = "warm"
    JOINT = "joint"


def pushes_after(epoch: int, total: int, p: ProtoPNetConfig) -> bool:
    """Whether a push follows 0-based ``epoch`` of ``total``: ProtoPNet's ``epoch >= push_start and epoch in
    push_epochs`` (multiples of 10), and always after the last."""
    due = p.push_every > 0 and epoch >= p.push_start and (epoch - p.push_start) % p.push_every == 0
    return due or epoch == total - 1


def joint_lr_factor(joint_epoch: int, p: ProtoPNetConfig) -> float:
    """The StepLR factor of 0-based joint epoch ``joint_epoch``. ProtoPNet calls ``scheduler.step()`` before
    each joint epoch, so the first decay comes in the ``joint_lr_step``-th joint epoch, not after it."""
    return p.joint_lr_gamma ** ((joint_epoch + 1) // p.joint_lr_step)


def protopnet_step(model: ExplainableNet, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
                   params: list[nn.Parameter], weights: ProtoPNetWeights,
                   precision: Precision | None = None) -> tuple[dict[str, float], float]:
    """One Adam step of ``params`` on ProtoPNet's loss; returns the loss and its terms as floats, and the
    batch's accuracy. Parameters outside ``params`` (the last layer; the features in warm-up) get no step."""
    with precision.autocast() if precision is not None else contextlib.nullcontext():
        out = model(x, aux_path=False)
    layer = model.prototype_layer
    loss = protopnet_loss(out.logits.float(), out.protos.min_distances.float(), y, layer.prototype_class,
                          model.last_layer.weight, weights)
    apply_gradients(loss.total, params, optimizer, precision)
    terms = {"train_loss": float(loss.total.detach()), "cross_entropy": float(loss.cross_entropy.detach()),
             "cluster_cost": float(loss.cluster.detach()), "separation_cost": float(loss.separation.detach()),
             "l1": float(loss.l1.detach())}
    return terms, float((out.logits.argmax(1) == y).float().mean())


def backbone_spec(cfg: TrainConfig, data: Dataset) -> ModelSpec:
    m, p = cfg.model, cfg.protopnet
    return ModelSpec(backbone=p.backbone, small_input_stem=uses_small_input_stem(p.backbone, data.image_size),
                     in_channels=data.in_channels, num_classes=data.num_classes,
                     prototypes_per_class=m.prototypes_per_class, prototype_dim=m.prototype_dim, eps=m.eps)


class ProtoPNetTrainer:
    """Trains the ProtoPNet baseline for one run directory (made by :meth:`Trainer.fresh` or continued by
    :meth:`Trainer.resume`, which pick this class for ``method: protopnet``).

    The run directory is a NASXNet run's: config.yaml, checkpoints/last.pt (every epoch) and best.pt (the
    pushed model with the best validation accuracy), metrics.jsonl, prototypes/, report.json. The model is
    built (and ImageNet weights loaded) when the trainer is made, so a bad backbone or weights file fails
    before anything is written.
    """

    def __init__(self, cfg: TrainConfig, run_dir: RunDir, reporter: Reporter | None = None,
                 on_epoch_end: Callable[[str, int], None] | None = None):
        if current_world().distributed:
            raise ConfigError("ProtoPNet trains in a single process; start nasx train --method protopnet without "
                              "torchrun (or with --nproc-per-node 1)")
        self.ctx = ctx = RunContext(cfg, run_dir, reporter, on_epoch_end)
        p = cfg.protopnet
        self.pp_weights = ProtoPNetWeights(p.cluster, p.separation, p.l1)
        self.spec = backbone_spec(cfg, ctx.data)
        torch.manual_seed(cfg.seed + 1)
        self.model = ctx.place(build_model(self.spec))
        self.weights_source, self.weights_notes = FROM_SCRATCH, []
        if p.backbone_weights and not run_dir.last_checkpoint.is_file():   # a resumed run has them in last.pt
            weights = read_backbone_weights(p.backbone_weights)
            self.weights_notes = self.model.features.load_pretrained(weights)
            self.weights_source = weights.describe()
        # one Adam state for the last layer across pushes, as ProtoPNet's last_layer_optimizer
        self.last_opt = torch.optim.Adam([self.model.last_layer.weight], lr=p.last_layer_lr)
        self.push = Projector(ctx, class_specific=True, last_layer=self._last_layer_stage)
        self.state = PhaseState(PHASE)

    def search(self) -> Genotype:
        raise ConfigError("ProtoPNet has a fixed backbone: there is no architecture to search. Run nasx train "
                          "(method protopnet) to train it, or nasx search with method nasxnet")

    def _optimizers(self) -> tuple[torch.optim.Adam, torch.optim.Adam]:
        """ProtoPNet's warm-up and joint optimisers; each group is named so that its rate can be set per epoch."""
        p, model = self.ctx.cfg.protopnet, self.model
        add_on, protos = list(model.add_on.parameters()), [model.prototype_layer.prototypes]
        warm = torch.optim.Adam([
            {"params": add_on, "lr": p.warm_lr, "weight_decay": p.weight_decay, "name": "add_on"},
            {"params": protos, "lr": p.warm_lr, "name": "prototypes"}])
        joint = torch.optim.Adam([
            {"params": list(model.features.parameters()), "lr": p.resolved_features_lr(),
             "weight_decay": p.weight_decay, "name": "features"},
            {"params": add_on, "lr": p.add_on_lr, "weight_decay": p.weight_decay, "name": "add_on"},
            {"params": protos, "lr": p.prototype_lr, "name": "prototypes"}])
        return warm, joint

    def _set_rates(self, stage: ProtoPNetStage, epoch: int, optimizer: torch.optim.Adam) -> dict[str, float]:
        """Each group's learning rate for 0-based ``epoch``; returns them by group name."""
        p = self.ctx.cfg.protopnet
        if stage is ProtoPNetStage.WARM:
            base, factor = {"add_on": p.warm_lr, "prototypes": p.warm_lr}, 1.0
        else:
            base = {"features": p.resolved_features_lr(), "add_on": p.add_on_lr, "prototypes": p.prototype_lr}
            factor = joint_lr_factor(epoch - p.epochs_warm, p)
        for g in optimizer.param_groups:
            g["lr"] = base[g["name"]] * factor
        return {g["name"]: g["lr"] for g in optimizer.param_groups}

    def train(self) -> dict[str, Any]:
        """Warm-up and joint epochs with pushes; returns the report."""
        ctx, p = self.ctx, self.ctx.cfg.protopnet
        ckpt = ctx.load_checkpoint()
        warm_opt, joint_opt = self._optimizers()
        if ckpt is not None:
            self.model.load_state_dict(ckpt["model"])
            warm_opt.load_state_dict(ckpt["warm_opt"])
            joint_opt.load_state_dict(ckpt["joint_opt"])
            self.last_opt.load_state_dict(ckpt["last_opt"])
            self.weights_source, self.weights_notes = ckpt["backbone_weights"], list(ckpt["backbone_weights_notes"])
            ctx.resume(ckpt, self.state)
        total = p.epochs_warm + p.epochs_joint
        ctx.reporter.phase(PHASE, total)
        augment = ctx.augmentation(cutout=0)
        while self.state.epoch < total:
            self._epoch(warm_opt, joint_opt, augment)
        return self._report()

    def _epoch(self, warm_opt: torch.optim.Adam, joint_opt: torch.optim.Adam, augment: Augmentation | None) -> None:
        ctx, p, model, state = self.ctx, self.ctx.cfg.protopnet, self.model, self.state
        e, total = state.epoch, p.epochs_warm + p.epochs_joint
        stage = ProtoPNetStage.WARM if e < p.epochs_warm else ProtoPNetStage.JOINT
        opt = warm_opt if stage is ProtoPNetStage.WARM else joint_opt
        rates = self._set_rates(stage, e, opt)
        gen = ctx.reseed(PHASE, e)
        model.train()   # BatchNorm statistics move in warm-up too, as in ProtoPNet
        model.features.requires_grad_(stage is ProtoPNetStage.JOINT)   # frozen: no graph through f at all
        means, wait_share = self._train(stage, e, opt, gen, augment)
        model.features.requires_grad_(True)
        train, (val_name, val) = ctx.data.train, ctx.validation_split()
        pushed = pushes_after(e, total, p)
        if pushed:
            sets = {val_name: val, "test": ctx.data.test} if e == total - 1 else {val_name: val}
            self.push(model, train, sets, PHASE, e, state, save=True)
        v = evaluate(model, val, ctx.cfg.data.eval_batch_size, ctx.device, channels_last=ctx.channels_last,
                     precision=ctx.precision)
        ctx.step += 1
        state.epoch = e + 1
        ctx.log_epoch({"phase": PHASE, "epoch": e + 1, "stage": stage.value, "lr": rates["add_on"],
                       "features_lr": rates.get("features", 0.0), **means,
                       "val_acc": v.acc, "val_aux_acc": None, "val_split": val_name,
                       "data_wait_share": round(wait_share, 4)})
        if v.acc > state.best_val and pushed:   # only a model just pushed explains with real patches
            state.best_val = v.acc
            ctx.run.save_checkpoint({"model": model.state_dict(), "epoch": e + 1, "val_acc": v.acc,
                                     "backbone": p.backbone}, ctx.run.best_checkpoint)
        ctx.finish_epoch(state, {"model": model.state_dict(), "warm_opt": warm_opt.state_dict(),
                                 "joint_opt": joint_opt.state_dict(), "last_opt": self.last_opt.state_dict(),
                                 "backbone_weights": self.weights_source,
                                 "backbone_weights_notes": list(self.weights_notes)})

    def _train(self, stage: ProtoPNetStage, e: int, opt: torch.optim.Adam, gen: torch.Generator,
               augment: Augmentation | None) -> tuple[dict[str, float], float]:
        """The epoch's steps; returns the means of the loss, its terms and the accuracy over the batches, and
        the share of time spent waiting for data."""
        ctx, bs, train = self.ctx, self.ctx.cfg.data.batch_size, self.ctx.data.train
        params = [q for g in opt.param_groups for q in g["params"]]
        n_batches = train.num_batches(bs, drop_last=True)
        ctx.reporter.epoch_start(PHASE, e, stage, n_batches)
        sums = dict.fromkeys(("train_loss", "train_acc") + LOSS_TERMS, 0.0)
        batches = TimedBatches(ctx.train_batches(train, bs, gen, augmentation_generator(gen), augment))
        for x, y in batches:
            x, y = to_device(x, y, ctx.device, ctx.channels_last)
            terms, acc = protopnet_step(self.model, x, y, opt, params, self.pp_weights, ctx.precision)
            for k, value in {**terms, "train_acc": acc}.items():
                sums[k] += value
            ctx.reporter.batch(terms["train_loss"], acc)
        return {k: total_ / max(n_batches, 1) for k, total_ in sums.items()}, batches.wait_share

    def _last_layer_stage(self, model: ExplainableNet, images: ImageSet, epoch: int, phase: str,
                          records: list[ProjectionRecord], event: dict[str, Any]) -> tuple[str, bool]:
        """ProtoPNet's stage 3 after every push: the last layer alone, Adam on CE + l1 * L1 (the cluster and
        separation terms do not depend on it), ``last_layer_iterations`` passes over ``images``' similarities
        in shuffled batches of ``data.batch_size``."""
        p = self.ctx.cfg.protopnet
        if p.last_layer_iterations == 0:
            return "keep", False
        weight, classes = model.last_layer.weight, model.prototype_layer.prototype_class
        self.push.fit_last_layer(model, images, self.last_opt, p.last_layer_iterations, epoch, phase,
                                 penalty=lambda: p.l1 * last_layer_l1(weight, classes))
        return LAST_LAYER_RULE, True

    def _report(self) -> dict[str, Any]:
        ctx, p, model = self.ctx, self.ctx.cfg.protopnet, self.model
        final = self.state.projections[-1]
        test = evaluate(model, ctx.data.test, ctx.cfg.data.eval_batch_size, ctx.device,
                        channels_last=ctx.channels_last)
        report = {
            "nasx_version": __version__,
            "method": "protopnet",
            "head": "prototype",
            "data": ctx.data.summary(),
            "model": self.spec.to_dict(),
            "backbone": p.backbone,
            "backbone_weights": self.weights_source,
            "backbone_weights_notes": self.weights_notes,
            "features_lr": p.resolved_features_lr(),
            "genotype": None,
            "test": {
                "acc": test.acc,
                "prototype_acc": test.acc,
                "prototype_acc_before_projection": final["test_acc_before"],
                "prototype_acc_after_projection": final["test_acc_after"],
                "aux_acc": None,
                "n": test.n,
            },
            "last_layer_after_projection": final["last_layer"],
            "prototype_class_counts": dict(zip(ctx.data.classes, final["class_counts"])),
            "num_prototypes": model.prototype_layer.num_prototypes,
            "params": model.prediction_parameters("prototype"),
            "search": None,
            "projections": self.state.projections,
            **ctx.run_facts(),
        }
        ctx.run.write_json(ctx.run.report_path, report)
        return report
