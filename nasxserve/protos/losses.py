"""NASXNet's stage losses (section 3.3).

Stage 1, NAS adaptation (eq. 4):  CE(h1(f(x)), y)
Stage 2, joint (eq. 5):           CE(h(g_p(f(x))), y) + lambda1 CE(h1(f(x)), y) + lambda2 Sep
Stage 3, fine-tune (eq. 7):       CE(h(g_p(f(x))), y) + lambda2 Sep
with lambda1 = 0.8 and lambda2 = 0.001 (section 4.1) and Sep the separation cost of eq. (6).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F

from nasxserve.protos.model import NetOutput


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
    return (out.logits + lambda1 * out.aux_logits) / (1.0 + lambda1)


def stage_loss(stage: Stage, out: NetOutput, y: torch.Tensor, prototypes: torch.Tensor,
               weights: LossWeights) -> torch.Tensor:
    """The training loss of ``stage`` (eq. 4, 5 or 7), plus the DARTS tower term when it is on."""
    if stage is Stage.ADAPT:
        loss = F.cross_entropy(out.aux_logits, y)
    else:
        loss = F.cross_entropy(out.logits, y) + weights.lambda2 * separation_cost(prototypes)
        if stage is Stage.JOINT:
            loss = loss + weights.lambda1 * F.cross_entropy(out.aux_logits, y)
    if out.tower_logits is not None and weights.tower > 0:
        loss = loss + weights.tower * F.cross_entropy(out.tower_logits, y)
    return loss
