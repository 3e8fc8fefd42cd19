"""Retraining the derived network from scratch: stages 2 and 3 (eq. 5, 7), global projections (eq. 9) every
``project_every`` epochs and at the end; or, with ``retrain.head: linear``, the black box of the paper's
Table 1: the same network predicting with h1 alone, stage 1's loss (eq. 4) in every epoch, no prototypes.
Writes report.json."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nasxserve import __version__
from nasxserve.data import Dataset, ImageSet
from nasxserve.data.augment import Augmentation
from nasxserve.explain.consistency import mislabelled_prototypes
from nasxserve.nas.genotype import Genotype
from nasxserve.protos.losses import LossWeights, Stage
from nasxserve.protos.model import ExplainableNet, ModelSpec, build_model
from nasxserve.training.config import TrainConfig
from nasxserve.training.context import (RETRAIN, PhaseState, RunContext, TimedBatches, augmentation_generator,
                                        cosine_lr, stages_for)
from nasxserve.training.projection import Projector, sign_floor
from nasxserve.training.steps import evaluate, to_device, weight_step


def model_spec(cfg: TrainConfig, data: Dataset, genotype: Genotype) -> ModelSpec:
    """The retrained network's architecture as plain data (what an exported bundle records)."""
    m, r = cfg.model, cfg.retrain
    return ModelSpec(genotype=genotype, channels=r.channels, layers=r.layers, reductions=r.reductions,
                     in_channels=data.in_channels, num_classes=data.num_classes,
                     prototypes_per_class=m.prototypes_per_class, prototype_dim=m.prototype_dim, eps=m.eps,
                     auxiliary_tower=r.auxiliary_tower > 0, head=r.head)


class RetrainPhase:
    """One retraining of ``genotype``'s network, from its first epoch or from the checkpoint it was stopped at."""

    def __init__(self, ctx: RunContext, projector: Projector, genotype: Genotype):
        self.ctx, self.project, self.genotype = ctx, projector, genotype
        r = ctx.cfg.retrain
        self.linear = r.head == "linear"
        self.loss_weights = LossWeights(ctx.cfg.loss.lambda1, ctx.cfg.loss.lambda2, r.auxiliary_tower)
        if self.linear:   # eq. (4) (plus the tower term when on) for all the retrain's epochs
            self.schedule = [Stage.ADAPT] * (r.epochs_joint + r.epochs_finetune)
        else:
            self.schedule = stages_for({Stage.JOINT: r.epochs_joint, Stage.FINETUNE: r.epochs_finetune})
        self.state = PhaseState(RETRAIN)

    def run(self, ckpt: dict[str, Any] | None, search_report: dict[str, Any] | None) -> dict[str, Any]:
        ctx, r = self.ctx, self.ctx.cfg.retrain
        torch.manual_seed(ctx.cfg.seed + 1)
        model = ctx.place(build_model(model_spec(ctx.cfg, ctx.data, self.genotype)))
        ctx.world.broadcast_state(model)
        # the black box trains f and h1 only; its prototype path is never used
        if self.linear:
            assert model.aux_head is not None
            params = list(model.features.parameters()) + list(model.aux_head.parameters())
        else:
            params = list(model.parameters())
        opt = torch.optim.SGD(params, lr=r.lr, momentum=r.momentum, weight_decay=r.weight_decay)
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["w_opt"])
            ctx.resume(ckpt, self.state)
        ctx.reporter.phase(RETRAIN, len(self.schedule))
        augment = ctx.augmentation(cutout=r.cutout)
        while self.state.epoch < len(self.schedule):
            self._epoch(model, params, opt, augment)
        return self._report(model, search_report)

    def _epoch(self, model: ExplainableNet, params: list[nn.Parameter], opt: torch.optim.Optimizer,
               augment: Augmentation | None) -> None:
        ctx, r, state = self.ctx, self.ctx.cfg.retrain, self.state
        e, total = state.epoch, len(self.schedule)
        stage = self.schedule[e]
        lr = cosine_lr(r.lr, r.lr_min, e, total)
        gen = ctx.begin_epoch(RETRAIN, e, lr, opt)
        model.features.drop_path_prob = r.drop_path * e / total
        model.train()
        train, bs = ctx.data.train, r.batch_size or ctx.cfg.data.batch_size
        n_batches = train.num_batches(bs, drop_last=True)
        ctx.reporter.epoch_start(RETRAIN, e, stage, n_batches)
        loss_sum = acc_sum = 0.0
        batches = TimedBatches(ctx.train_batches(train, bs, gen, augmentation_generator(gen, ctx.world.rank), augment))
        reduce = ctx.world.gradient_reducer(bs)
        for x, y in batches:
            x, y = to_device(x, y, ctx.device, ctx.channels_last)
            loss, acc = weight_step(model, stage, x, y, opt, params, self.loss_weights, r.grad_clip, ctx.precision,
                                    reduce, sign_floor(ctx.cfg), self.project.extensions)
            loss_sum, acc_sum = loss_sum + loss, acc_sum + acc
            ctx.reporter.batch(loss, acc)
        wait_share = batches.wait_share
        train_loss, train_acc = ctx.epoch_means([loss_sum, acc_sum], n_batches, bs)
        ctx.world.broadcast_state(model, buffers_only=True)   # evaluate and save rank 0's BN statistics
        v, val_name, projected = self._project_and_evaluate(model, train, e)
        ctx.step += 1
        state.epoch = e + 1
        ctx.log_epoch({"phase": RETRAIN, "epoch": e + 1, "stage": stage.value, "lr": lr,
                       "train_loss": train_loss, "train_acc": train_acc,
                       "val_acc": v.acc, "val_aux_acc": v.aux_acc, "val_split": val_name,
                       "data_wait_share": round(wait_share, 4)})
        if v.acc > state.best_val and (projected or self.linear):
            # only a model just projected (and its h fitted) explains with real patches; the black box has none
            state.best_val = v.acc
            ctx.run.save_checkpoint({"model": model.state_dict(), "epoch": e + 1, "val_acc": v.acc,
                                     "genotype": self.genotype.to_dict()}, ctx.run.best_checkpoint)
        ctx.finish_epoch(state, {"model": model.state_dict(), "w_opt": opt.state_dict(),
                                 "genotype": self.genotype.to_dict()})

    def _project_and_evaluate(self, model: ExplainableNet, train: ImageSet, e: int):
        """Project when due (never for the black box), then the validation accuracy; returns it, the validation
        split's name and whether the model was projected."""
        ctx, r = self.ctx, self.ctx.cfg.retrain
        val_name, val = ctx.validation_split()
        last = e == len(self.schedule) - 1
        projected = not self.linear and (last or bool(r.project_every and (e + 1) % r.project_every == 0))
        if projected:
            sets = {val_name: val, "test": ctx.data.test} if last else {val_name: val}
            self.project(model, train, sets, RETRAIN, e, self.state, save=True)
        v = evaluate(model, val, ctx.cfg.data.eval_batch_size, ctx.device, prototype_path=not self.linear,
                     channels_last=ctx.channels_last, precision=ctx.precision, world=ctx.world)
        return v, val_name, projected

    def _consistency(self, model: ExplainableNet) -> dict[str, Any]:
        """The report's word on whether the prototypes' labels are true (:mod:`nasxserve.explain.consistency`):
        prototypes whose label is not the class they support (none after the last-layer fit), and classes left
        without a prototype by the last projection, whose logit then has no positive evidence."""
        weight = model.last_layer.weight.detach().cpu().numpy()
        labels = model.prototype_layer.prototype_class.cpu().numpy()
        return {"mislabelled_prototypes": mislabelled_prototypes(weight, labels).tolist(),
                "classes_without_prototypes": [c for k, c in enumerate(self.ctx.data.classes)
                                               if not (labels == k).any()]}

    def _report(self, model: ExplainableNet, search_report: dict[str, Any] | None) -> dict[str, Any]:
        """report.json. ``test.acc`` is the accuracy of the run's prediction (the prototype path, or h1 for the
        black box); ``params`` counts what that prediction uses (the training-only h1 and tower left out)."""
        ctx, cfg, genotype, linear = self.ctx, self.ctx.cfg, self.genotype, self.linear
        test = evaluate(model, ctx.data.test, cfg.data.eval_batch_size, ctx.device, prototype_path=not linear,
                        channels_last=ctx.channels_last, world=ctx.world)
        final = self.state.projections[-1] if self.state.projections else {}
        report = {
            "nasx_version": __version__,
            "method": "nasxnet",
            "head": cfg.retrain.head,
            "data": ctx.data.summary(),
            "genotype": genotype.to_dict(),
            "model": model_spec(cfg, ctx.data, genotype).to_dict(),
            "genotype_darts": genotype.to_darts_string(),
            "genotype_source": cfg.genotype or "search",
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
            "extensions": cfg.extensions.record(),
            "prototype_class_counts": None if linear else dict(zip(ctx.data.classes, final["class_counts"])),
            **({} if linear else self._consistency(model)),
            "num_prototypes": None if linear else model.prototype_layer.num_prototypes,
            "params": model.prediction_parameters(cfg.retrain.head),
            "search": search_report,
            "retrain_projections": self.state.projections,
            **ctx.run_facts(),
        }
        ctx.run.write_json(ctx.run.report_path, report)
        return report
