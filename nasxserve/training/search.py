"""The NASXNet search (section 3.2) under a search strategy.

stage 1 adaptation (eq. 4) -> stage 2 joint (eq. 5) -> stage 3 fine-tune (eq. 7); alpha is updated on the
held-out half of the training split before every weight step (eq. 1, 2; LeaSE's eq. 9 with an audience);
global projection (eq. 9) every ``project_every`` epochs of stages 2-3 and at the end; the genotype is derived
from alpha. P-DARTS runs the schedule once per network (:mod:`nasxserve.training.search_networks`); the
stabilised search measures the Hessian and may roll back (:mod:`nasxserve.training.search_rollback`).
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch

from nasxserve.data import ImageSet
from nasxserve.nas.genotype import Genotype
from nasxserve.protos.losses import LossWeights, Stage
from nasxserve.training.config import SearchConfig
from nasxserve.training.context import (SEARCH, PhaseState, RunContext, TimedBatches, augmentation_generator,
                                        cosine_lr, stages_for)
from nasxserve.training.distributed import ArchitectureTrace
from nasxserve.training.lease import LeaseArchitect
from nasxserve.training.projection import Projector, sign_floor
from nasxserve.training.search_networks import (SearchNet, next_search_network, open_audience, open_deltas,
                                                open_search_network, restore_search_network, save_deltas,
                                                search_payload)
from nasxserve.training.search_rollback import measure, regularise
from nasxserve.training.steps import evaluate, to_device, weight_step
from nasxserve.training.strategies import build_strategy


def search_schedule(s: SearchConfig) -> list[Stage]:
    """The NASXNet stage of each epoch of one search network; with the plain head, stage 1 throughout."""
    epochs = {Stage.ADAPT: s.epochs_adapt, Stage.JOINT: s.epochs_joint, Stage.FINETUNE: s.epochs_finetune}
    if s.head == "plain":
        return [Stage.ADAPT] * sum(epochs.values())
    return stages_for(epochs)


def search_split(ctx: RunContext) -> tuple[ImageSet, ImageSet]:
    """The training split's halves (``data.train_portion``) that train the weights and alpha."""
    train = ctx.data.train
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(ctx.cfg.seed)).numpy()
    if ctx.cfg.search.subset:
        order = order[:ctx.cfg.search.subset]
    cut = int(round(len(order) * ctx.cfg.data.train_portion))
    return train.subset(order[:cut]), train.subset(order[cut:])


class SearchPhase:
    """One search from its first epoch, or from the checkpoint it was stopped at."""

    def __init__(self, ctx: RunContext, projector: Projector):
        self.ctx, self.project = ctx, projector
        s = ctx.cfg.search
        self.strategy = build_strategy(s, ctx.data.in_channels)
        self.schedule = search_schedule(s)
        self.per_network = len(self.schedule)
        self.total = self.per_network * self.strategy.networks
        self.state = PhaseState(SEARCH)
        self.loss_weights = LossWeights(ctx.cfg.loss.lambda1, ctx.cfg.loss.lambda2)
        self.arch_trace = ArchitectureTrace.from_environment(ctx.world.rank)

    def run(self, ckpt: dict[str, Any] | None) -> Genotype:
        ctx, s = self.ctx, self.ctx.cfg.search
        self.audience = open_audience(ctx)
        self.adaptive = s.stability.adaptive and s.stability.track
        self.net = self._open(ckpt)
        self.w_set, self.a_set = search_split(ctx)
        self.deltas = None if self.audience is None else open_deltas(ctx, self.w_set, self.state.epoch)
        self.augment = ctx.augmentation(cutout=0)
        # first-order DARTS' alpha gradient is a plain backward pass; finite differences need fp32
        self.low_precision_arch = s.order == 1 and self.audience is None
        ctx.reporter.phase(SEARCH, self.total)
        while self.state.epoch < self.total:
            self._epoch()
        if self.deltas is not None:
            ctx.run.prune_lease_deltas({self.state.epoch})   # last.pt's; rollbacks are over
            self.deltas.close()
        return self.strategy.genotype(self.net.features)

    def _open(self, ckpt: dict[str, Any] | None) -> SearchNet:
        ctx, s = self.ctx, self.ctx.cfg.search
        if ckpt is None:
            return open_search_network(ctx, self.strategy, 0, None, s.weight_decay, self.audience, self.loss_weights)
        net = open_search_network(ctx, self.strategy, int(ckpt.get("network", 0)), ckpt.get("candidates"),
                                  s.weight_decay, self.audience, self.loss_weights)
        restore_search_network(net, ckpt)
        self.state.events = list(ckpt.get("regularisation", []))
        self.adaptive = self.adaptive and all("rolled_back_to" in ev for ev in self.state.events)
        ctx.resume(ckpt, self.state)
        return net

    def _epoch(self) -> None:
        ctx, s, state = self.ctx, self.ctx.cfg.search, self.state
        e = state.epoch
        index, local = divmod(e, self.per_network)
        if index != self.net.index:
            self.net = next_search_network(ctx, self.strategy, self.net, index, self.audience, self.loss_weights)
        net, stage = self.net, self.schedule[local]
        lr = cosine_lr(s.lr, s.lr_min, local, self.per_network)
        gen = ctx.begin_epoch(SEARCH, e, lr, net.w_opt)
        strategy_row = self.strategy.begin_epoch(net.features, index, local, self.per_network)
        updates_arch = self.strategy.updates_architecture(local)
        train_loss, train_acc, audience_loss, explanation_acc, wait_share = self._train(net, stage, e, lr, gen,
                                                                                        updates_arch)
        last = e == self.total - 1
        due = bool(s.project_every) and (e + 1) % s.project_every == 0
        if last or (stage.uses_prototypes and due):   # a search with no prototype stage still ends projected
            self.project(net.model, self.w_set, {"val": self.a_set}, SEARCH, e, state, save=False)
        val = evaluate(net.model, self.a_set, ctx.cfg.data.eval_batch_size, ctx.device,
                       prototype_path=stage.uses_prototypes or last, channels_last=ctx.channels_last,
                       precision=ctx.precision, world=ctx.world)
        ctx.step += 1
        state.epoch = e + 1
        genotype = self.strategy.genotype(net.features)
        row = {"phase": SEARCH, "epoch": e + 1, "stage": stage.value, "strategy": self.strategy.name,
               "network": index + 1, "arch_updates": updates_arch, "lr": lr,
               "weight_decay": net.w_opt.param_groups[0]["weight_decay"],
               "train_loss": train_loss, "train_acc": train_acc,
               "val_acc": val.acc, "val_aux_acc": val.aux_acc, "data_wait_share": round(wait_share, 4),
               **strategy_row,
               "skip_connections": genotype.count("skip_connect"), "genotype": genotype.to_dict()}
        if s.min_convolutions:   # what the search chose before the rule added convolutions
            row["convolutions_searched"] = net.features.genotype().parametric("normal")
        if self.deltas is not None and updates_arch:   # LeaSE
            row.update(audience_val_loss=audience_loss, audience_explanation_acc=explanation_acc,
                       **self.deltas.take_drift())
        self._end_epoch(net, index, local, row)

    def _train(self, net: SearchNet, stage: Stage, e: int, lr: float, gen: torch.Generator,
               updates_arch: bool) -> list[float]:
        """The epoch's architecture and weight steps; returns the means of the training loss and accuracy and
        of LeaSE's audience loss and explanation accuracy, and the share of time spent waiting for data."""
        ctx, bs = self.ctx, self.ctx.cfg.data.batch_size
        net.architect.loss = net.losses[stage]
        if isinstance(net.architect, LeaseArchitect):
            net.architect.logits = net.logits[stage]
            net.architect.deltas = self.deltas
        net.model.train()
        n_batches = min(self.w_set.num_batches(bs, drop_last=True), self.a_set.num_batches(bs, drop_last=True))
        ctx.reporter.epoch_start(SEARCH, e, stage, n_batches)
        loss_sum = acc_sum = audience_sum = explanation_sum = 0.0
        aug_gen = augmentation_generator(gen, ctx.world.rank)
        batches = TimedBatches(zip(ctx.train_batches(self.w_set, bs, gen, aug_gen, self.augment, with_index=True),
                                   ctx.train_batches(self.a_set, bs, gen, aug_gen, self.augment)))
        reduce = ctx.world.gradient_reducer(bs)
        for i, ((xt, yt, it), (xv, yv)) in enumerate(batches):
            xt, yt = to_device(xt, yt, ctx.device, ctx.channels_last)
            xv, yv = to_device(xv, yv, ctx.device, ctx.channels_last)
            if updates_arch:
                with ctx.precision.autocast() if self.low_precision_arch else contextlib.nullcontext():
                    net.architect.step(xt, yt, xv, yv, lr, net.w_opt, index=it)
                self.arch_trace.record(e + 1, i + 1, net.architect.arch)
                if isinstance(net.architect, LeaseArchitect):   # it has an audience
                    audience_sum += net.architect.last_audience_loss
                    explanation_sum += net.architect.last_explanation_acc
            loss, acc = weight_step(net.model, stage, xt, yt, net.w_opt, net.weight_params, self.loss_weights,
                                    ctx.cfg.search.grad_clip, ctx.precision, reduce, sign_floor(ctx.cfg))
            loss_sum, acc_sum = loss_sum + loss, acc_sum + acc
            ctx.reporter.batch(loss, acc)
        wait_share = batches.wait_share
        means = ctx.epoch_means([loss_sum, acc_sum, audience_sum, explanation_sum], n_batches, bs)
        ctx.world.broadcast_state(net.model, buffers_only=True)   # evaluate and save rank 0's BN statistics
        return [*means, wait_share]

    def _end_epoch(self, net: SearchNet, index: int, local: int, row: dict[str, Any]) -> None:
        """Measure the Hessian when due, log the epoch, checkpoint it (and the snapshot a rollback may return
        to), then roll back if the eigenvalue rose."""
        ctx, state = self.ctx, self.state
        measured, rise = measure(ctx, net, self.a_set, local + 1, local == self.per_network - 1, row)
        ctx.log_epoch(row)
        payload = search_payload(net, state)
        snapshots = range(0)   # the epochs a later rollback may return to, within the network's own
        if self.adaptive:
            snapshots = range(index * self.per_network + net.monitor.oldest_rollback_target(), state.epoch + 1)
            if measured:   # a rollback returns to a measured epoch
                ctx.run.save_checkpoint(payload, ctx.run.search_snapshot(state.epoch))
                ctx.run.prune_search_snapshots(snapshots)
        if self.deltas is not None:
            save_deltas(ctx, self.deltas, state.epoch, snapshots)
        ctx.finish_epoch(state, payload)
        if rise is not None and self.adaptive:
            self.adaptive = regularise(ctx, rise, index * self.per_network, state, net)


def search_summary(ctx: RunContext) -> dict[str, Any]:
    """The search's epochs and projections as logged (the log survives a resumed run; memory doesn't);
    rank 0 reads the log it wrote and tells the others."""
    summary = ctx.world.broadcast_object(_read_search_summary(ctx) if ctx.world.is_main else None)
    assert summary is not None
    return summary


def _read_search_summary(ctx: RunContext) -> dict[str, Any]:
    rows = [r for r in ctx.run.read_metrics() if r.get("phase") == SEARCH]
    epochs = [r for r in rows if "event" not in r]
    s = ctx.cfg.search
    return {"strategy": s.strategy, "lease": s.lease.enabled, "head": s.head,
            "epochs": epochs[-1]["epoch"] if epochs else 0, "epochs_run": len(epochs),
            "final_val_acc": epochs[-1]["val_acc"] if epochs else None,
            "final_hessian_eigenvalue": epochs[-1].get("hessian_eigenvalue") if epochs else None,
            "convolutions_searched": epochs[-1].get("convolutions_searched") if epochs else None,
            "projections": [r for r in rows if r.get("event") == "projection"],
            "regularisation": [r for r in rows if r.get("event") == "regularisation"],
            "operations_dropped": [r for r in rows if r.get("event") == "operations_dropped"]}
