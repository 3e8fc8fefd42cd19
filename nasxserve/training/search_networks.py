"""The networks a search trains: the strategy's search network inside an explainable model, with its weight
optimiser and architect (LeaSE's when there is an audience); P-DARTS switches to the next, deeper one between
its stages. Also LeaSE's audience and Delta as the search keeps them in the run directory."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nasxserve.data import ImageSet
from nasxserve.nas.supernet import SearchNetwork
from nasxserve.protos.losses import LossWeights, Stage
from nasxserve.protos.model import ExplainableNet
from nasxserve.training.architect import Architect
from nasxserve.training.context import SEARCH, PhaseState, RunContext
from nasxserve.training.lease import LeaseArchitect, build_audience
from nasxserve.training.lease_deltas import DeltaStore
from nasxserve.training.stability import EigenvalueMonitor
from nasxserve.training.steps import functional_stage_logits, functional_stage_loss
from nasxserve.training.strategies import SearchStrategy
from nasxserve.training.strategies.base import CandidateSets


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


def plain_candidates(candidates: CandidateSets | None) -> dict[str, list[list[str]]] | None:
    return None if candidates is None else {k: [list(ops) for ops in v] for k, v in candidates.items()}


def open_search_network(ctx: RunContext, strategy: SearchStrategy, index: int, candidates: CandidateSets | None,
                        weight_decay: float, audience: nn.Module | None, loss_weights: LossWeights) -> SearchNet:
    """The strategy's ``index``-th search network in an explainable model, with its optimisers."""
    s, m = ctx.cfg.search, ctx.cfg.model
    torch.manual_seed(ctx.cfg.seed + index)
    features = strategy.build(index, candidates)
    model = ctx.place(ExplainableNet(features, ctx.data.num_classes, m.prototypes_per_class, m.prototype_dim, m.eps))
    ctx.world.broadcast_state(model)   # the same seed builds the same network; this makes sure of it
    arch_names = [f"features.{n}" for n in features.arch_parameter_names()]
    weight_params = [p for n, p in model.named_parameters() if n not in arch_names]
    w_opt = torch.optim.SGD(weight_params, lr=s.lr, momentum=s.momentum, weight_decay=weight_decay)
    losses = {st: functional_stage_loss(model, st, loss_weights) for st in Stage}
    logits = {st: functional_stage_logits(model, st, loss_weights) for st in Stage}
    # one architect per network, so one Adam state for alpha across stages; its loss follows the stage
    args = (model, losses[Stage.ADAPT], arch_names, s.order, s.arch_lr, (*s.arch_betas,), s.arch_weight_decay)
    reduce = ctx.world.gradient_reducer(ctx.cfg.data.batch_size)
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


def restore_search_network(net: SearchNet, ckpt: dict[str, Any]) -> None:
    net.model.load_state_dict(ckpt["model"])
    net.w_opt.load_state_dict(ckpt["w_opt"])
    net.architect.load_checkpoint_state(ckpt)
    net.monitor.restore(ckpt.get("eigenvalues", []), ckpt.get("eigenvalue_epochs"))
    net.eigvec = ckpt.get("eigenvector")             # the warm start, so a resumed run logs the same


def next_search_network(ctx: RunContext, strategy: SearchStrategy, net: SearchNet, index: int,
                        audience: nn.Module | None, loss_weights: LossWeights) -> SearchNet:
    """P-DARTS between stages: the next, deeper network keeps the strongest operations of this one."""
    candidates = strategy.next_candidates(net.features, net.index)
    nxt = open_search_network(ctx, strategy, index, candidates, net.w_opt.param_groups[0]["weight_decay"], audience,
                              loss_weights)
    # the audience carries on, momentum and all
    if isinstance(net.architect, LeaseArchitect) and isinstance(nxt.architect, LeaseArchitect):
        nxt.architect.audience_optimizer.load_state_dict(net.architect.audience_optimizer.state_dict())
    ctx.run.append_metrics({"phase": SEARCH, "event": "operations_dropped", "step": ctx.step,
                            "after_network": net.index + 1, "keep": len(candidates["normal"][0]),
                            "candidates": plain_candidates(candidates)})
    ctx.reporter.message(f"search: network {net.index + 1} done; network {index + 1} "
                         f"({len(net.features.cells)} -> {len(nxt.features.cells)} cells) keeps "
                         f"{len(candidates['normal'][0])} operations per edge")
    return nxt


def search_payload(net: SearchNet, state: PhaseState) -> dict[str, Any]:
    """What a search checkpoint (last.pt or an epoch snapshot) holds besides the phase bookkeeping."""
    return {"model": net.model.state_dict(), "w_opt": net.w_opt.state_dict(), **net.architect.checkpoint_state(),
            "network": net.index, "candidates": plain_candidates(net.candidates),
            "eigenvalues": list(net.monitor.values), "eigenvalue_epochs": list(net.monitor.epochs),
            "eigenvector": net.eigvec,
            "regularisation": list(state.events)}


def open_audience(ctx: RunContext) -> nn.Module | None:
    """LeaSE's audience network, the same on every process; None without LeaSE."""
    le = ctx.cfg.search.lease
    if not le.enabled:
        return None
    torch.manual_seed(ctx.cfg.seed + 10_007)
    audience = build_audience(le.audience, ctx.data.in_channels, ctx.data.num_classes).to(ctx.device)
    if ctx.channels_last:
        audience = audience.to(memory_format=torch.channels_last)
    ctx.world.broadcast_state(audience)
    return audience


def open_deltas(ctx: RunContext, w_set: ImageSet, epoch: int) -> DeltaStore:
    """LeaSE's per-sample Delta over the weight split (D_e^tr = D_a^tr), as it was after ``epoch``
    search epochs: initial for 0, else the copy saved with that epoch's checkpoint. Rank 0 keeps it in
    the run directory's working file when large, the other ranks in a temporary file."""
    le = ctx.cfg.search.lease
    store = DeltaStore(len(w_set), tuple(w_set.images.shape[1:]), ctx.cfg.seed, le.delta_init,
                       ctx.run.lease_deltas_working if ctx.world.is_main else None,
                       gather_rows=ctx.world.gather_rows, reset=epoch == 0)
    if epoch:
        store.load(ctx.run.lease_deltas(epoch))
    return store


def save_deltas(ctx: RunContext, deltas: DeltaStore, epoch: int, snapshots: range) -> None:
    """Delta after ``epoch``, the copy last.pt (written next) and a search snapshot of ``epoch`` go with.
    The previous epoch's copy stays until the next epoch (last.pt names it until it is replaced), and so
    do those of the search snapshots a rollback may return to (Delta rolls back with E, W and alpha)."""
    deltas.save(ctx.run.save_array, ctx.run.lease_deltas(epoch))
    ctx.run.prune_lease_deltas({epoch - 1, epoch, *snapshots})
