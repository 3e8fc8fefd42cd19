"""The projection step of a phase: global projection of the prototypes onto training patches (eq. 9), the extensions'
hook (:mod:`nasxserve.training.extensions`), then the last-layer step (NASXNet: eq. (8)'s reconnection and the
sign-constrained fit; ProtoPNet brings its own), with the accuracies around each step logged as the projection's
event."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from nasxserve.data import ImageSet
from nasxserve.protos.last_layer import LastLayerFit, descend_on_similarities, fit_last_layer
from nasxserve.protos.model import ExplainableNet
from nasxserve.protos.projection import ProjectionRecord, class_counts, project_prototypes, with_evidence_boxes
from nasxserve.training.config import TrainConfig
from nasxserve.training.context import PhaseState, RunContext, epoch_seed
from nasxserve.training.distributed import sharded_nearest_patches
from nasxserve.training.extensions import build_extensions, projection_candidates, projects_within_class
from nasxserve.training.steps import evaluate, to_device

LAST_LAYER_RULE = "reconnect"   # eq. (8), then the sign-constrained last-layer fit, after every projection

# (model, images, epoch, phase, records, event) -> (the rule's name for the log, whether h changed)
LastLayerStep = Callable[[ExplainableNet, ImageSet, int, str, list[ProjectionRecord], dict[str, Any]],
                         tuple[str, bool]]


def sign_floor(cfg: TrainConfig) -> float | None:
    """The floor of h's own-class connections between projections (projection.signs_between_projections), or
    None where h trains freely between them."""
    return LastLayerFit.floor if cfg.projection.signs_between_projections else None


class Projector:
    """Projects a phase's prototypes: ``class_specific`` keeps each within its class (ProtoPNet's push; so does an
    extension that asks for it); ``last_layer`` is the step after it, NASXNet's :meth:`reconnect_and_fit` unless
    given. It holds the run's ``extensions`` (the config's): the patches they allow are the candidates of every
    projection, and their after-projection hook runs after every projection whose records are saved."""

    def __init__(self, ctx: RunContext, class_specific: bool = False, last_layer: LastLayerStep | None = None):
        self.ctx = ctx
        self.last_layer = last_layer or self.reconnect_and_fit
        self.extensions = build_extensions(ctx.cfg.extensions, ctx.data, ctx.cfg.data.eval_batch_size, ctx.device)
        self.class_specific = class_specific or projects_within_class(self.extensions)

    def __call__(self, model: ExplainableNet, images: ImageSet, eval_sets: dict[str, ImageSet], phase: str,
                 epoch: int, state: PhaseState, save: bool) -> dict[str, Any]:
        """Global projection (eq. 9) onto ``images``, then the last-layer step.

        The prototype path's accuracy on each of ``eval_sets`` is recorded just before and just after
        the projection (Theorem 1 says it should barely move) and after the last-layer steps. Data-parallel,
        the nearest-patch search is split over the processes and every process projects alike.
        """
        ctx = self.ctx
        bs = ctx.cfg.data.eval_batch_size

        def accuracies(tag: str) -> dict[str, float]:
            return {f"{name}_acc_{tag}": evaluate(model, s, bs, ctx.device, channels_last=ctx.channels_last,
                                                  world=ctx.world).acc
                    for name, s in eval_sets.items()}

        event: dict[str, Any] = {"event": "projection", "phase": phase, "epoch": epoch + 1, "step": ctx.step + 1}
        event.update(accuracies("before"))
        records = project_prototypes(model, images, bs, ctx.device, sharded_nearest_patches(ctx.world),
                                     class_specific=self.class_specific,
                                     allowed=projection_candidates(self.extensions, model, images))
        for extension in self.extensions if save else []:
            records = extension.after_projection(model, images, records, event)
        event.update(accuracies("after"))
        rule, changed = self.last_layer(model, images, epoch, phase, records, event)
        event.update(class_counts=class_counts(records, ctx.data.num_classes),
                     mean_distance=sum(r.distance for r in records) / len(records), last_layer=rule)
        if changed:
            event.update(accuracies("after_last_layer"))
        if save and ctx.world.is_main:      # only rank 0 writes the records, so only it measures these
            records = with_evidence_boxes(model, images, records, bs, ctx.device)
            ctx.run.save_prototypes(records, images, ctx.data.classes)
        ctx.run.append_metrics(event)
        state.projections.append(event)
        first = next(iter(eval_sets))
        ctx.reporter.message(
            f"projection ({phase}, epoch {epoch + 1}): {first} accuracy {event[first + '_acc_before']:.4f} -> "
            f"{event[first + '_acc_after']:.4f}"
            + (f" -> {event[first + '_acc_after_last_layer']:.4f} after last-layer steps"
               if first + "_acc_after_last_layer" in event else ""))
        return event

    def reconnect_and_fit(self, model: ExplainableNet, images: ImageSet, epoch: int, phase: str,
                          records: list[ProjectionRecord], event: dict[str, Any]) -> tuple[str, bool]:
        """The last-layer step after a projection (:mod:`nasxserve.protos.last_layer`): the prototypes that changed
        class (``records``' ``class_before``) reconnected by eq. (8), then h fitted on ``images``' fixed
        similarities, so that every prototype supports the class it is shown with; how many were reconnected goes
        into the projection's log ``event``. Data-parallel, every process does all of it (the same steps from the
        same data: the same h)."""
        cfg = self.ctx.cfg
        p = cfg.projection
        sims, labels = self.fixed_similarities(model, images)
        fit = LastLayerFit(passes=p.last_layer_passes, lr=p.last_layer_lr, l1=p.last_layer_l1,
                           batch_size=cfg.data.batch_size)
        gen = torch.Generator().manual_seed(epoch_seed(cfg.seed, phase, epoch) + 1)
        layer = model.prototype_layer
        before = torch.tensor([r.class_before for r in records], device=layer.prototype_class.device)
        event["reconnected_prototypes"] = fit_last_layer(model.last_layer, sims, labels, layer.prototype_class,
                                                         before, fit, gen)
        model.train()
        return LAST_LAYER_RULE, True

    def fit_last_layer(self, model: ExplainableNet, images: ImageSet, optimizer: torch.optim.Optimizer, passes: int,
                       epoch: int, phase: str, penalty: Callable[[], torch.Tensor | float] = lambda: 0.0) -> None:
        """``passes`` shuffled passes of ``optimizer`` steps on h alone: cross-entropy of h over the fixed
        similarities of ``images`` (batches of ``data.batch_size``), plus ``penalty()``."""
        cfg = self.ctx.cfg
        sims, labels = self.fixed_similarities(model, images)
        gen = torch.Generator().manual_seed(epoch_seed(cfg.seed, phase, epoch) + 1)
        descend_on_similarities(model.last_layer, sims, labels, optimizer, passes, cfg.data.batch_size, gen,
                                penalty)
        model.train()

    def fixed_similarities(self, model: ExplainableNet, images: ImageSet) -> tuple[torch.Tensor, torch.Tensor]:
        """Similarities (N, m) and labels (N,) of ``images`` in order, in eval mode (the model is left in it)."""
        ctx = self.ctx
        model.eval()
        sims, labels = [], []
        with torch.no_grad():
            for x, y in images.batches(ctx.cfg.data.eval_batch_size):
                x, y = to_device(x, y, ctx.device, ctx.channels_last)
                sims.append(model(x, aux_path=False).protos.similarities)
                labels.append(y)
        return torch.cat(sims), torch.cat(labels)
