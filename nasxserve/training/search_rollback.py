"""The stabilised search's side of DARTS-ADA (NASXNet section 3.4; R-DARTS): the largest eigenvalue of the
validation loss's Hessian w.r.t. alpha measured after an epoch (:mod:`nasxserve.training.hessian`), and on a
rise (:mod:`nasxserve.training.stability`) the rollback to an earlier epoch's state with the weight decay
raised."""
from __future__ import annotations

from typing import Any

import torch

from nasxserve.data import ImageSet
from nasxserve.training.architect import Architect
from nasxserve.training.context import SEARCH, PhaseState, RunContext
from nasxserve.training.hessian import dominant_eigenvalue
from nasxserve.training.lease import LeaseArchitect
from nasxserve.training.search_networks import SearchNet, search_payload
from nasxserve.training.stability import Rollback, raised_weight_decay
from nasxserve.training.steps import to_device


def hessian_losses(ctx: RunContext, architect: Architect, a_set: ImageSet) -> list:
    """The current stage's validation loss on the first ``stability.batches`` validation batches (a
    fixed order, so epochs are compared on the same data). Data-parallel: this rank's shard of each,
    weighted by its share, so that the Hessian-vector products sum over ranks to the global ones."""
    st = ctx.cfg.search.stability
    losses = []
    for b in range(min(st.batches, a_set.num_batches(st.batch_size))):
        start = b * st.batch_size
        stop = min(start + st.batch_size, len(a_set))
        if stop - start < ctx.world.size:
            break   # a last batch too small to give every rank an image (every rank sees this alike)
        lo, hi = ctx.world.shard_of(start, stop)
        xv, yv = to_device(*a_set.batch(torch.arange(lo, hi)), ctx.device, ctx.channels_last)
        share = (hi - lo) / (stop - start)   # 1.0 in one process: the loss unchanged, bit for bit
        losses.append(lambda xv=xv, yv=yv, share=share: share * architect.current_loss(xv, yv))
    return losses


def measure(ctx: RunContext, net: SearchNet, a_set: ImageSet, epoch: int, final: bool,
            row: dict[str, Any]) -> tuple[bool, Rollback | None]:
    """After the network's ``epoch``-th epoch: whether the eigenvalue was due (and measured: its value goes into
    the epoch's ``row``), and the rise it shows, if any."""
    st = ctx.cfg.search.stability
    if not (st.track and net.monitor.due(epoch, final)):
        return False, None
    estimate = dominant_eigenvalue(hessian_losses(ctx, net.architect, a_set), net.architect.arch,
                                   st.iterations, st.tolerance, start=net.eigvec,
                                   generator=torch.Generator().manual_seed(ctx.cfg.seed),
                                   reduce=ctx.world.reducer(1.0))   # losses carry their shares
    net.eigvec = estimate.warm_start   # lambda_max's eigenvector, and the shift's if one was needed
    row.update(hessian_eigenvalue=estimate.value, hessian_iterations=estimate.iterations)
    return True, net.monitor.add(estimate.value, epoch, final)


def regularise(ctx: RunContext, rise: Rollback, offset: int, state: PhaseState, net: SearchNet) -> bool:
    """DARTS-ADA: back to the state after ``rise.to_epoch`` (counted within the network, whose first
    epoch is ``offset + 1``) with the weight decay raised; at the limit, record it and carry on.
    Returns whether later rises may still roll back."""
    st = ctx.cfg.search.stability
    current = float(net.w_opt.param_groups[0]["weight_decay"])
    raised = raised_weight_decay(current, st.factor, st.max_weight_decay)
    to_epoch = offset + rise.to_epoch
    event = {"phase": SEARCH, "event": "regularisation", "at_epoch": offset + rise.at_epoch,
             "eigenvalue_ratio": rise.ratio}
    if raised is None:
        event.update(action="none: weight decay already at its limit", weight_decay=current)
    else:
        ctx.world.barrier()   # rank 0 has written the snapshot (every rank sees the same rise)
        snap = ctx.run.load_checkpoint(ctx.run.search_snapshot(to_epoch))
        net.model.load_state_dict(snap["model"])
        net.w_opt.load_state_dict(snap["w_opt"])
        net.architect.load_checkpoint_state(snap)
        if isinstance(net.architect, LeaseArchitect) and net.architect.deltas is not None:
            net.architect.deltas.load(ctx.run.lease_deltas(to_epoch))
        for group in net.w_opt.param_groups:
            group["weight_decay"] = raised
        net.monitor.truncate(rise.to_epoch)
        state.epoch = to_epoch
        ctx.run.prune_search_snapshots(range(1, to_epoch + 1))
        event.update(action="rolled back", rolled_back_to=to_epoch, weight_decay=raised)
    state.events.append(event)
    ctx.run.append_metrics({"step": ctx.step, **event, "elapsed_s": round(ctx.elapsed(), 2)})
    ctx.reporter.message(f"search: eigenvalue rose {rise.ratio:.2f}x by epoch {event['at_epoch']}; "
                         + (f"back to epoch {to_epoch} with weight decay {raised:g}" if raised is not None
                            else "weight decay already at its limit, continuing"))
    ctx.save_state(state, search_payload(net, state))
    return raised is not None
