"""The NASXNet model (figure 2): feature extractor f, then two classification paths.

- prototype path: add-on layers -> prototype layer g_p -> last layer h (no bias), so that every logit
  is exactly ``sum_j w[k, j] * similarity[j]``;
- auxiliary path h1: global average pooling + linear, used in stages 1 and 2 only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nasxserve.protos.layer import PrototypeActivations, PrototypeLayer


class AddOnLayers(nn.Sequential):
    """ProtoPNet's add-on layers: 1x1 conv, ReLU, 1x1 conv, sigmoid. (B, C, H, W) -> (B, D, H, W)."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__(nn.Conv2d(in_channels, dim, 1), nn.ReLU(), nn.Conv2d(dim, dim, 1), nn.Sigmoid())


def class_connection_init(prototype_class: torch.Tensor, num_classes: int, incorrect: float = -0.5) -> torch.Tensor:
    """Eq. (8): w[k, j] = 1 if prototype j belongs to class k, else ``incorrect`` (-0.5). Shape (K, m)."""
    onehot = torch.nn.functional.one_hot(prototype_class, num_classes).T.to(torch.float32)
    return onehot + incorrect * (1.0 - onehot)


@dataclass
class NetOutput:
    """logits: (B, K) prototype path, or None when not computed; aux_logits: (B, K) h1, or None;
    tower_logits: (B, K) DARTS auxiliary tower while training, or None; protos: the prototype layer's
    activations, or None."""

    logits: torch.Tensor | None
    aux_logits: torch.Tensor | None
    tower_logits: torch.Tensor | None
    protos: PrototypeActivations | None


class ExplainableNet(nn.Module):
    """f + (add-on, g_p, h) + h1 over any feature extractor with ``out_channels``.

    Args:
        features: maps (B, C_in, H, W) to z (B, C_f, H', W'); may offer ``forward_with_tower``.
        num_classes: K.
        prototypes_per_class: m / K (10 in the paper).
        prototype_dim: D, channels of the prototype space.
    """

    def __init__(self, features: nn.Module, num_classes: int, prototypes_per_class: int = 10,
                 prototype_dim: int = 64, eps: float = 1e-4):
        super().__init__()
        self.features = features
        self.num_classes = num_classes
        channels = features.out_channels
        self.add_on = AddOnLayers(channels, prototype_dim)
        self.prototype_layer = PrototypeLayer(num_classes * prototypes_per_class, prototype_dim, num_classes, eps)
        self.last_layer = nn.Linear(self.prototype_layer.num_prototypes, num_classes, bias=False)
        self.aux_head = nn.Linear(channels, num_classes)
        self.reset_last_layer()

    def reset_last_layer(self) -> None:
        """Initialise h by eq. (8) against the prototypes' current class identities."""
        with torch.no_grad():
            self.last_layer.weight.copy_(class_connection_init(self.prototype_layer.prototype_class,
                                                               self.num_classes))

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if hasattr(self.features, "forward_with_tower"):
            return self.features.forward_with_tower(x)
        return self.features(x), None

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """The prototype-space map add_on(f(x)): (B, D, H', W')."""
        return self.add_on(self._features(x)[0])

    def forward(self, x: torch.Tensor, prototype_path: bool = True, aux_path: bool = True) -> NetOutput:
        """x: (B, C_in, H, W). Paths not asked for are not computed (stage 1 needs no prototypes)."""
        z, tower = self._features(x)
        aux = self.aux_head(z.mean(dim=(2, 3))) if aux_path else None
        logits = protos = None
        if prototype_path:
            protos = self.prototype_layer(self.add_on(z))
            logits = self.last_layer(protos.similarities)
        return NetOutput(logits=logits, aux_logits=aux, tower_logits=tower, protos=protos)
