"""The prototype layer g_p of ProtoPNet (Chen et al., 2019) as NASXNet uses it (section 3.5, 4.1).

m prototypes of shape (D, 1, 1) (H1 = W1 = 1). For a latent map z (B, D, H, W) the squared L2
distance of prototype j to every patch is ``||z||^2 - 2 z . p_j + ||p_j||^2``: the cross term is one
1x1 convolution, so no (B, m, H, W, D) tensor is ever formed. The similarity is
``log((d + 1) / (d + eps))`` and a prototype's score for an image is its best (maximum) similarity,
i.e. the similarity at the minimum distance, over positions. That minimum is recomputed directly as
``||z_best - p_j||^2`` at the best position, so the evidence a client receives is exact to float
rounding and the same in PyTorch, ONNX Runtime and TorchScript.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class PrototypeActivations:
    """What the prototype layer computes for a batch.

    distances: (B, m, H, W) squared L2 distance of every prototype to every latent patch.
    min_distances: (B, m) the smallest of those per prototype.
    best_patch: (B, m) int64 flat index ``h * W + w`` of that position.
    similarities: (B, m) ``log((min_d + 1) / (min_d + eps))``, the evidence fed to the last layer.
    similarity_maps: (B, m, H, W) the similarity at every position.
    """

    distances: torch.Tensor
    min_distances: torch.Tensor
    best_patch: torch.Tensor
    similarities: torch.Tensor
    similarity_maps: torch.Tensor


SIMILARITY = "log((d + 1) / (d + eps))"


def distance_to_similarity(distances: torch.Tensor, eps: float) -> torch.Tensor:
    """ProtoPNet's log similarity ``log((d + 1) / (d + eps))``, elementwise, any shape."""
    return torch.log((distances + 1.0) / (distances + eps))


def squared_distances(z: torch.Tensor, prototypes: torch.Tensor, center: float = 0.5) -> torch.Tensor:
    """Squared L2 distances of 1x1 prototypes to every patch via the conv identity.

    The expansion ``||z||^2 - 2 z.p + ||p||^2`` cancels badly when the distance is small next to the
    norms, so both sides are first shifted by ``center`` (distances do not change): the add-on layers
    end in a sigmoid, so 0.5 makes the norms about four times smaller.

    Args:
        z: (B, D, H, W) latent map.
        prototypes: (m, D, 1, 1).
    Returns:
        (B, m, H, W), clamped at 0 (rounding can make the expansion slightly negative).
    """
    z = z - center
    prototypes = prototypes - center
    z2 = (z * z).sum(dim=1, keepdim=True)                       # (B, 1, H, W)
    p2 = (prototypes * prototypes).sum(dim=(1, 2, 3)).view(1, -1, 1, 1)  # (1, m, 1, 1)
    cross = F.conv2d(z, prototypes)                              # (B, m, H, W)
    return F.relu(z2 - 2.0 * cross + p2)


def distances_at(z: torch.Tensor, prototypes: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """Exact squared distance of each prototype to the patch at ``position``, by direct subtraction.

    Args:
        z: (B, D, H, W) latent map.
        prototypes: (m, D, 1, 1).
        position: (B, m) int64 flat index ``h * W + w``.
    Returns:
        (B, m). Only (B, D, m) values are formed, so this is cheap even for thousands of prototypes.
    """
    b, dim = z.shape[:2]
    patches = torch.gather(z.flatten(2), 2, position.unsqueeze(1).expand(b, dim, -1))  # (B, D, m)
    return (patches - prototypes.flatten(1).T.unsqueeze(0)).pow(2).sum(dim=1)


class PrototypeLayer(nn.Module):
    """m learnable prototypes with a class identity each.

    ``prototype_class`` (m,) starts in class blocks (prototype j belongs to class j // (m / K)) and
    follows the source image's class after a global projection (eq. 9).
    """

    prototype_class: torch.Tensor   # a buffer (register_buffer), declared for the type checker

    def __init__(self, num_prototypes: int, dim: int, num_classes: int, eps: float = 1e-4):
        super().__init__()
        if num_prototypes % num_classes:
            raise ValueError(f"{num_prototypes} prototypes cannot be split evenly over {num_classes} classes")
        self.eps = eps
        self.num_classes = num_classes
        self.prototypes = nn.Parameter(torch.rand(num_prototypes, dim, 1, 1))
        per_class = num_prototypes // num_classes
        self.register_buffer("prototype_class", torch.arange(num_prototypes) // per_class)

    @property
    def num_prototypes(self) -> int:
        return self.prototypes.shape[0]

    def forward(self, z: torch.Tensor) -> PrototypeActivations:
        """z: (B, D, H, W) latent map (after the add-on layers)."""
        d = squared_distances(z, self.prototypes)
        # argmin over flattened positions keeps H x W out of the exported graph
        best = d.flatten(2).argmin(dim=-1)                       # (B, m)
        # the minimum is recomputed exactly: the similarity's slope 1 / (d + eps) magnifies any
        # rounding of a small distance, and the gradient of a min flows through its argmin alone
        min_d = distances_at(z, self.prototypes, best)
        return PrototypeActivations(
            distances=d,
            min_distances=min_d,
            best_patch=best,
            similarities=distance_to_similarity(min_d, self.eps),
            similarity_maps=distance_to_similarity(d, self.eps),
        )
