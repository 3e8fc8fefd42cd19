"""NASXNet's stage losses (section 3.3).

Stage 1, NAS adaptation (eq. 4):  CE(h1(f(x)), y)
Stage 2, joint (eq. 5):           CE(h(g_p(f(x))), y) + lambda1 CE(h1(f(x)), y) + lambda2 Sep
Stage 3, fine-tune (eq. 7):       CE(h(g_p(f(x))), y) + lambda2 Sep
with lambda1 = 0.8 and lambda2 = 0.001 (section 4.1) and Sep the separation cost of eq. (6).

The retraining can add a deletion cost to stages 2 and 3, ``+ lambda_del Del`` (:func:`deletion_cost`, the
``deletion-cost`` extension of :mod:`nasxserve.training.extensions`; off, the papers' objective, by default).
It is this project's extension, not part of either paper: it trains the explanation's box to hold the
evidence it stands for.

The ProtoPNet baseline's objective (Chen et al., "This looks like that: deep learning for interpretable
image recognition", NeurIPS 2019, section 2.2) is here as well:
    CE + lambda_clst ClstCost - lambda_sep SepCost + lambda_l1 sum_{k, j: class(p_j) != k} |w[k, j]|
with lambda_clst = 0.8, lambda_sep = 0.08 and lambda_l1 = 1e-4 (their settings.py).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from nasxserve.boxes import activation_boxes, box_masks
from nasxserve.protos.layer import PrototypeActivations
from nasxserve.protos.model import ExplainableNet, NetOutput


class Stage(str, Enum):
    ADAPT = "adapt"
    JOINT = "joint"
    FINETUNE = "finetune"

    @property
    def uses_prototypes(self) -> bool:
        return self is not Stage.ADAPT

    @property
    def uses_aux(self) -> bool:
        return self is not Stage.FINETUNE


@dataclass(frozen=True)
class LossWeights:
    lambda1: float = 0.8
    lambda2: float = 0.001
    tower: float = 0.0  # DARTS auxiliary tower weight (0.4 in DARTS' retraining); 0 = off


def separation_cost(prototypes: torch.Tensor) -> torch.Tensor:
    """Eq. (6): ``Sep = -(1/m) sum_i min_{j != i} ||p_i - p_j||^2``.

    Args:
        prototypes: (m, D, ...) any trailing shape; each prototype is flattened.
    Returns:
        A scalar; lower (more negative) when prototypes are further apart.
    """
    p = prototypes.flatten(1)
    sq = (p * p).sum(dim=1)
    d = (sq[:, None] + sq[None, :] - 2.0 * p @ p.T).clamp_min(0.0)
    d = d + torch.diag(torch.full_like(sq, float("inf")))
    return -d.min(dim=1).values.mean()


def joint_logits(out: NetOutput, lambda1: float) -> torch.Tensor:
    """Stage 2's prediction: the weighted sum of both paths, (logits + lambda1 * aux) / (1 + lambda1)."""
    assert out.logits is not None and out.aux_logits is not None, "stage 2 needs both paths"
    return (out.logits + lambda1 * out.aux_logits) / (1.0 + lambda1)


def stage_loss(stage: Stage, out: NetOutput, y: torch.Tensor, prototypes: torch.Tensor,
               weights: LossWeights) -> torch.Tensor:
    """The training loss of ``stage`` (eq. 4, 5 or 7), plus the DARTS tower term when it is on."""
    if stage is Stage.ADAPT:
        assert out.aux_logits is not None, "stage 1 trains h1"
        loss = F.cross_entropy(out.aux_logits, y)
    else:
        assert out.logits is not None, "stages 2 and 3 train the prototype path"
        loss = F.cross_entropy(out.logits, y) + weights.lambda2 * separation_cost(prototypes)
        if stage is Stage.JOINT:
            assert out.aux_logits is not None, "stage 2 trains h1 too"
            loss = loss + weights.lambda1 * F.cross_entropy(out.aux_logits, y)
    if out.tower_logits is not None and weights.tower > 0:
        loss = loss + weights.tower * F.cross_entropy(out.tower_logits, y)
    return loss


# ------------------------------------------------------------------------------------ deletion cost
def occlude(x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W) with the pixels of masks (B, H, W) bool set to 0, the training split's mean colour after
    normalisation: how both the deletion cost and ``nasx evaluate``'s deletion test hide a box."""
    return x.masked_fill(masks[:, None], 0.0)


@contextlib.contextmanager
def batch_norm_statistics_kept(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in training mode without its batch-norm running statistics learning from the batch:
    occluded images are not what the network will see at inference.

    The pass updates copies, which are then dropped; the statistics themselves are never written in place,
    as the clean pass's backward still reads them."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    kept = [dict(m.named_buffers(recurse=False)) for m in norms]
    for m, buffers in zip(norms, kept):
        for name, b in buffers.items():
            setattr(m, name, b.clone())
    try:
        yield
    finally:
        for m, buffers in zip(norms, kept):
            for name, b in buffers.items():
                setattr(m, name, b)


def top_evidence_boxes(model: ExplainableNet, protos: PrototypeActivations, classes: torch.Tensor,
                       image_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Which prototype contributes most to each image's logit of ``classes``, and its explanation box.

    Args:
        protos: the prototype layer's activations of a batch (similarity maps (B, m, H', W')).
        classes: (B,) int64, the class whose evidence is asked for (the label while training).
        image_hw: (H, W) of the images.
    Returns:
        top: (B,) int64, ``argmax_j w[classes[b], j] * similarity[b, j]``; masks: (B, H, W) bool, True inside
        that prototype's 95th-percentile box (:func:`nasxserve.boxes.activation_boxes`: the box a
        client is shown).
    """
    with torch.no_grad():
        top = model.contributions(protos.similarities, classes).argmax(dim=1)
        maps = protos.similarity_maps[torch.arange(len(classes), device=top.device), top]
        boxes = activation_boxes(maps.float().cpu().numpy(), image_hw)
    masks = torch.from_numpy(box_masks(boxes, image_hw)).to(protos.similarities.device)
    return top, masks


def deletion_cost(model: ExplainableNet, x: torch.Tensor, y: torch.Tensor,
                  protos: PrototypeActivations) -> torch.Tensor:
    """The evidence that survives occluding its own box (this project's extension; not in the papers).

    ``Del = (1/B) sum_b s_{j_b}(x_b with box_{j_b}(x_b) occluded)``, where ``j_b`` is the prototype that
    contributes most to image b's logit of its label y_b, ``box_j(x)`` that prototype's 95th-percentile box
    on x (ProtoPNet's rule, section 4.1, as explanations draw it) and s_j the prototype's similarity
    (max over positions). Occluded pixels take the mean colour, as in the deletion test of ``nasx evaluate``
    (after Petsiuk et al., "RISE", BMVC 2018). The box is held fixed (it has no gradient); the cost trains f,
    the add-on layers and the prototypes so that the evidence lives inside the box that shows it, not in
    patches nearby that see it through a wide receptive field. Each call runs the model once more on the
    occluded batch, in training mode, leaving its batch-norm statistics as they were.

    Args:
        model: the network being trained; x: (B, C, H, W) its input batch; y: (B,) int64 labels;
        protos: the prototype layer's activations of x (:attr:`NetOutput.protos`).
    Returns:
        A scalar >= 0: the mean similarity of those prototypes on the occluded images (log(1 / eps) at most).
    """
    top, masks = top_evidence_boxes(model, protos, y, (x.shape[-2], x.shape[-1]))
    with batch_norm_statistics_kept(model):
        occluded = model(occlude(x, masks), prototype_path=True, aux_path=False)
    return occluded.protos.similarities[torch.arange(len(y), device=top.device), top].mean()


# ---------------------------------------------------------------------------------- ProtoPNet baseline
def _own_class(labels: torch.Tensor, prototype_class: torch.Tensor) -> torch.Tensor:
    """(B, m) bool: prototype j belongs to the class of image i."""
    return prototype_class[None, :] == labels[:, None]


def cluster_cost(min_distances: torch.Tensor, labels: torch.Tensor, prototype_class: torch.Tensor) -> torch.Tensor:
    """ProtoPNet's ClstCost (Chen et al., 2019, section 2.2): the mean over images of the smallest squared
    distance from any of the image's patches to a prototype of the image's own class,
    ``(1/n) sum_i min_{j: class(p_j) = y_i} min_d[i, j]``.

    ProtoPNet computes the masked minimum as ``D - max_j (D - d) * mask`` (D = the prototype's size), which
    equals it while every distance is at most D; the masked minimum is the definition and holds for any
    distance.

    Args:
        min_distances: (B, m) the prototype layer's ``min_distances`` (minimum over positions).
        labels: (B,) int64 class of each image.
        prototype_class: (m,) int64 class of each prototype; every label needs at least one prototype.
    Returns:
        A scalar; lower when every image has a patch close to a prototype of its class.
    """
    own = _own_class(labels, prototype_class)
    return min_distances.masked_fill(~own, float("inf")).min(dim=1).values.mean()


def class_separation_cost(min_distances: torch.Tensor, labels: torch.Tensor,
                          prototype_class: torch.Tensor) -> torch.Tensor:
    """ProtoPNet's SepCost (Chen et al., 2019, section 2.2): the mean over images of the smallest squared
    distance to a prototype of any *other* class, ``(1/n) sum_i min_{j: class(p_j) != y_i} min_d[i, j]``.
    It enters the loss with a minus sign (pushing other classes' prototypes away). Not NASXNet's eq. (6),
    :func:`separation_cost`, which separates prototypes from each other.

    Args:
        min_distances: (B, m); labels: (B,) int64; prototype_class: (m,) int64 (at least two classes).
    Returns:
        A scalar.
    """
    own = _own_class(labels, prototype_class)
    return min_distances.masked_fill(own, float("inf")).min(dim=1).values.mean()


def last_layer_l1(weight: torch.Tensor, prototype_class: torch.Tensor) -> torch.Tensor:
    """ProtoPNet's L1 term (Chen et al., 2019, section 2.2, stage 3): ``sum_{k, j: class(p_j) != k} |w[k, j]|``,
    which drives the connections from a prototype to the classes it does not belong to towards 0.

    Args:
        weight: (K, m) the last layer's weight.
        prototype_class: (m,) int64.
    Returns:
        A scalar.
    """
    other = torch.arange(weight.shape[0], device=weight.device)[:, None] != prototype_class[None, :]   # (K, m)
    return (weight * other).abs().sum()


@dataclass(frozen=True)
class ProtoPNetWeights:
    """ProtoPNet's coefficients (its settings.py): ``crs_ent`` 1, ``clst`` 0.8, ``sep`` -0.08, ``l1`` 1e-4."""
    cluster: float = 0.8
    separation: float = 0.08     # subtracted
    l1: float = 1e-4


@dataclass
class ProtoPNetLoss:
    """The total loss and its terms (scalars; the terms for logging)."""
    total: torch.Tensor
    cross_entropy: torch.Tensor
    cluster: torch.Tensor
    separation: torch.Tensor
    l1: torch.Tensor


def protopnet_loss(logits: torch.Tensor, min_distances: torch.Tensor, labels: torch.Tensor,
                   prototype_class: torch.Tensor, last_weight: torch.Tensor,
                   weights: ProtoPNetWeights = ProtoPNetWeights()) -> ProtoPNetLoss:
    """ProtoPNet's training objective (Chen et al., 2019, section 2.2, class-specific):
    ``CE + cluster * ClstCost - separation * SepCost + l1 * L1``.

    Args:
        logits: (B, K) prototype path; min_distances: (B, m); labels: (B,); prototype_class: (m,);
        last_weight: (K, m) the last layer's weight.
    """
    ce = F.cross_entropy(logits, labels)
    clst = cluster_cost(min_distances, labels, prototype_class)
    sep = class_separation_cost(min_distances, labels, prototype_class)
    l1 = last_layer_l1(last_weight, prototype_class)
    total = ce + weights.cluster * clst - weights.separation * sep + weights.l1 * l1
    return ProtoPNetLoss(total, ce, clst, sep, l1)
