"""The last-layer step after a prototype projection: reconnect h to the prototypes' new classes and fit it.

Global projection (NASXNet eq. 9) gives prototype j the class of its new source patch. The last layer h
still connects j to its old class, so without this step a prototype labelled "class 4" can carry its largest
weight to class 0 and be shown as evidence for 0. After every projection, then:

1. the prototypes whose class changed are reconnected by eq. (8) to their new identity: ``w[k, j] = 1`` if
   prototype j is now of class k, else -0.5; the others keep their connections, as ProtoPNet's last layer
   keeps its weights across a push;
2. h alone is optimised with the features and prototypes frozen, as ProtoPNet's last-layer stage (Chen et al.,
   2019, section 2.2, stage 3): ``CE(h(s), y) + l1 * sum_{k, j: class(p_j) != k} |w[k, j]|`` over the fixed
   similarities s of the projection set, by Adam in shuffled mini-batches;
3. after each step (and once before the first) the weights are projected onto ``w[class(p_j), j] >= floor``
   and ``w[k, j] <= 0`` for the other classes (projected gradient; the objective stays convex and the set is
   a box).

Step 3 is this project's, not ProtoPNet's: it makes the class a prototype is shown with the class it
supports, by construction (:func:`nasxserve.explain.consistency.mislabelled_prototypes` is empty), and keeps
every prototype's own connection at least ``floor`` > 0 so that no prototype is silently switched off. The L1
term then drives the other-class connections to exactly 0 where they are not worth ``l1`` to the
cross-entropy, so that a logit is carried by its own class's prototypes.
"""
from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nasxserve.protos.losses import last_layer_l1
from nasxserve.protos.model import class_connection_init


@dataclass(frozen=True)
class LastLayerFit:
    """How h is fitted after a projection: ``passes`` shuffled passes over the similarities in batches of
    ``batch_size``, Adam at ``lr``, L1 weight ``l1`` on the other-class connections, own connections kept at
    ``floor`` or above."""

    passes: int = 20
    lr: float = 1e-2
    l1: float = 1e-3
    batch_size: int = 64
    floor: float = 1e-2


def own_class_mask(prototype_class: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, m) bool, True where k is prototype j's class."""
    return torch.arange(num_classes, device=prototype_class.device)[:, None] == prototype_class[None, :]


@torch.no_grad()
def constrain_signs_(weight: torch.Tensor, prototype_class: torch.Tensor, floor: float) -> None:
    """In place on h's (K, m) weight: own-class connections clamped to ``>= floor``, the others to ``<= 0``."""
    own = own_class_mask(prototype_class, weight.shape[0])
    weight.copy_(torch.where(own, weight.clamp(min=floor), weight.clamp(max=0.0)))


@torch.no_grad()
def reconnect_(weight: torch.Tensor, prototype_class: torch.Tensor, class_before: torch.Tensor) -> int:
    """Step 1 in place on h's (K, m) weight: eq. (8) for the prototypes whose class changed from ``class_before``
    to ``prototype_class`` (both (m,) int64); returns how many were reconnected."""
    changed = prototype_class != class_before
    weight.copy_(torch.where(changed[None, :], class_connection_init(prototype_class, weight.shape[0]).to(weight),
                             weight))
    return int(changed.sum())


def fit_last_layer(layer: nn.Linear, similarities: torch.Tensor, labels: torch.Tensor,
                   prototype_class: torch.Tensor, class_before: torch.Tensor, fit: LastLayerFit,
                   generator: torch.Generator) -> int:
    """Steps 1-3 of the module docstring on ``layer`` (h, no bias) in place; returns how many prototypes were
    reconnected (changed class).

    Args:
        layer: the last layer, weight (K, m).
        similarities: (N, m) fixed prototype similarities of the projection set (eval mode).
        labels: (N,) int64.
        prototype_class: (m,) int64, the classes after projection.
        class_before: (m,) int64, the classes before it.
        fit: the optimisation's settings.
        generator: orders the batches (CPU), so that a run and its resumed twin fit alike.
    """
    weight = layer.weight
    reconnected = reconnect_(weight, prototype_class, class_before)
    constrain_signs_(weight, prototype_class, fit.floor)
    descend_on_similarities(layer, similarities, labels, torch.optim.Adam([weight], lr=fit.lr), fit.passes,
                            fit.batch_size, generator, penalty=lambda: fit.l1 * last_layer_l1(weight, prototype_class),
                            after_step=lambda: constrain_signs_(weight, prototype_class, fit.floor))
    weight.grad = None
    return reconnected


def descend_on_similarities(layer: nn.Linear, similarities: torch.Tensor, labels: torch.Tensor,
                            optimizer: torch.optim.Optimizer, passes: int, batch_size: int,
                            generator: torch.Generator, penalty: Callable[[], torch.Tensor | float] = lambda: 0.0,
                            after_step: Callable[[], None] = lambda: None) -> None:
    """``passes`` shuffled passes (order from ``generator``) of ``optimizer`` steps on h alone: the cross-entropy
    of ``layer`` over fixed similarities (N, m) with labels (N,), in batches of ``batch_size``, plus ``penalty()``;
    ``after_step()`` after each step (a projection onto a constraint set). ProtoPNet's last-layer stage and the
    fit above both run this."""
    for _ in range(passes):
        order = torch.randperm(len(labels), generator=generator).to(labels.device)
        for start in range(0, len(labels), batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(layer(similarities[idx]), labels[idx]) + penalty()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            after_step()
