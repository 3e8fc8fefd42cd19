"""This project's additions to the papers' method, behind one seam.

Neither NASXNet nor LeaSE has them; a run has them only when the user names them (``--extension NAME[,NAME]``
or ``extensions.enabled`` in a config), never through a preset, so every preset trains the papers' method.
The training loop knows only :class:`Extension`'s hooks:

- :meth:`Extension.loss_term`: a term added to a weight step's loss (stages 2 and 3 of the retraining, where
  the prototypes are trained: eq. (5) and (7) of NASXNet plus the term);
- :meth:`Extension.projection_candidates`: the training patches every projection (eq. 9) may choose from;
- :attr:`Extension.within_class`: whether every projection keeps each prototype within its class's images;
- :meth:`Extension.after_projection`: a step after a retrain projection (eq. 9), before the last-layer step,
  that may rewrite the projection's records.

The implementations:

- ``deletion-cost`` (:class:`DeletionCost`): ``+ lambda_del Del``, the evidence that survives occluding its
  own box (:func:`nasxserve.protos.losses.deletion_cost`);
- ``box-calibration`` (:class:`BoxCalibration`): every prototype's box moved onto the input evidence its
  similarity rests on (:mod:`nasxserve.explain.calibration`). Its inference part is data: the offsets go into
  the projection records and the bundle, and the torch-free runtime draws every box moved by its prototype's
  offset (:func:`nasxserve.boxes.move_boxes`), (0, 0) where a run did not calibrate;
- ``foreground-projection`` (:class:`ForegroundProjection`): eq. (9) over the patches on the object only, so no
  prototype is a patch of empty background (:mod:`nasxserve.data.foreground`);
- ``class-projection`` (:class:`ClassProjection`): eq. (9) over the patches of the prototype's own class's
  images (ProtoPNet's push), so the per-class counts of eq. (8) hold and no projection can leave a class
  without prototypes or give one class all of them.

docs/results.md measures what each changes on ``shapes`` against the papers' objective.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch

from nasxserve.data import Dataset, ImageSet
from nasxserve.data.foreground import background_blocks, foreground_masks
from nasxserve.errors import ConfigError
from nasxserve.explain.calibration import evidence_offsets
from nasxserve.protos.losses import Stage, deletion_cost
from nasxserve.protos.model import ExplainableNet, NetOutput
from nasxserve.protos.projection import ProjectionRecord, calibrate_records
from nasxserve.regions import cell_blocks
from nasxserve.training.config import EXTENSION_NAMES, ExtensionsConfig


class Extension:
    """One addition to the papers' method; each hook's default leaves the method as it is."""

    name: ClassVar[str]
    within_class: ClassVar[bool] = False      # projections keep each prototype within its class's images

    def loss_term(self, model: ExplainableNet, stage: Stage, x: torch.Tensor, y: torch.Tensor,
                  out: NetOutput) -> torch.Tensor | None:
        """A term added to the weight step's loss on the batch ``x`` (B, C, H, W), ``y`` (B,), whose forward
        pass is ``out``; None adds nothing. Runs inside the step's autocast."""
        return None

    def projection_candidates(self, model: ExplainableNet, images: ImageSet) -> torch.Tensor | None:
        """(N, H' * W') bool: the latent patches of ``images`` a projection may replace a prototype with; None
        leaves every patch."""
        return None

    def after_projection(self, model: ExplainableNet, images: ImageSet, records: list[ProjectionRecord],
                         event: dict[str, Any]) -> list[ProjectionRecord]:
        """The records of a retrain projection onto ``images``, possibly rewritten; what it did goes into the
        projection's log ``event``."""
        return records


class DeletionCost(Extension):
    """``+ weight * Del`` in the prototype stages (:func:`nasxserve.protos.losses.deletion_cost`): one more
    forward pass a step, on the batch with each image's top evidence box occluded."""

    name = "deletion-cost"

    def __init__(self, weight: float):
        self.weight = weight

    def loss_term(self, model: ExplainableNet, stage: Stage, x: torch.Tensor, y: torch.Tensor,
                  out: NetOutput) -> torch.Tensor | None:
        if not stage.uses_prototypes or out.protos is None:
            return None
        return self.weight * deletion_cost(model, x, y, out.protos)


class BoxCalibration(Extension):
    """The projected prototypes' box offsets measured on the projection's images (the training split; every
    process measures all of them, so all agree) and put into their records."""

    name = "box-calibration"

    def __init__(self, batch_size: int, device: torch.device):
        self.batch_size, self.device = batch_size, device

    def after_projection(self, model: ExplainableNet, images: ImageSet, records: list[ProjectionRecord],
                         event: dict[str, Any]) -> list[ProjectionRecord]:
        offsets = evidence_offsets(model, images, self.batch_size, self.device)
        moved = np.abs(offsets).max(axis=1)
        event["box_calibration"] = {"prototypes_moved": int((moved > 0).sum()),
                                    "median_shift_px": float(np.median(moved)), "max_shift_px": int(moved.max())}
        return calibrate_records(records, offsets, latent_hw(model, images, self.device), images.image_hw)


class ForegroundProjection(Extension):
    """Global projection (eq. 9) onto patches of the object only: a latent patch whose block of pixels (the
    latent cell's, :func:`nasxserve.regions.cell_blocks`) lies on background in its image
    (:func:`nasxserve.data.foreground.on_background`) is never chosen. Eq. (9) takes the nearest patch of the
    whole training split, and on black-background digits the nearest is often an empty one: a prototype that
    says "this black corner looks like that black corner"."""

    name = "foreground-projection"

    def __init__(self, data: Dataset, device: torch.device):
        if data.train.boxes is None and not data.dark_background:
            raise ConfigError(f"the foreground-projection extension needs data that says what background is "
                              f"(objects on a dark background, like digits, or annotated object boxes, like shapes "
                              f"and cub200); {data.name} says neither")
        self.dark_background, self.device = data.dark_background, device

    def projection_candidates(self, model: ExplainableNet, images: ImageSet) -> torch.Tensor | None:
        foreground = foreground_masks(images, self.dark_background)
        assert foreground is not None, "checked when the extension was made"
        blocks = cell_blocks(latent_hw(model, images, self.device), images.image_hw)
        return torch.from_numpy(~background_blocks(foreground, blocks))


class ClassProjection(Extension):
    """Every projection (eq. 9) takes, for each prototype, the nearest patch among the images of the class it
    was given by eq. (8), as ProtoPNet's push does (Chen et al., 2019, section 2.2), where NASXNet's global
    projection takes the nearest of the whole training split and relabels the prototype with that patch's
    class. The per-class counts then stay as eq. (8) set them: where the global projection moves most
    prototypes onto one class (on cub200-mini, 47 of 50 at once), no class is left without evidence and
    Theorem 1's bound on the accuracy's move holds for the class-wise projection it is stated for."""

    name = "class-projection"
    within_class = True


def latent_hw(model: ExplainableNet, images: ImageSet, device: torch.device) -> tuple[int, int]:
    """(H', W') of the latent grid ``model`` gives ``images``, from one image in eval mode (no batch-norm
    statistics learn from it); the model is left in the mode it was in."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        x, _ = images.batch(torch.arange(1))
        _, _, h, w = model.latent(x.to(device)).shape
    model.train(was_training)
    return h, w


def build_extensions(cfg: ExtensionsConfig, data: Dataset, eval_batch_size: int,
                     device: torch.device) -> list[Extension]:
    """The extensions ``cfg`` names for a run on ``data``, in the fixed order of :data:`EXTENSION_NAMES` (so a run
    does not depend on the order they were named in); :class:`ConfigError` for one the data cannot take."""
    makers: dict[str, Callable[[], Extension]] = {
        "box-calibration": lambda: BoxCalibration(eval_batch_size, device),
        "class-projection": ClassProjection,
        "deletion-cost": lambda: DeletionCost(cfg.deletion_cost),
        "foreground-projection": lambda: ForegroundProjection(data, device)}
    return [makers[name]() for name in EXTENSION_NAMES if name in cfg.enabled]


def projection_candidates(extensions: list[Extension], model: ExplainableNet,
                          images: ImageSet) -> torch.Tensor | None:
    """(N, H' * W') bool: the patches of ``images`` every extension lets a projection choose; None when none
    restricts them."""
    masks = [m for m in (ext.projection_candidates(model, images) for ext in extensions) if m is not None]
    return torch.stack(masks).all(dim=0) if masks else None


def projects_within_class(extensions: list[Extension]) -> bool:
    """Whether some extension keeps every projection within each prototype's class (:attr:`Extension.within_class`)."""
    return any(ext.within_class for ext in extensions)
