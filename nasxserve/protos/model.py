"""The NASXNet model (figure 2): feature extractor f, then two classification paths.

- prototype path: add-on layers -> prototype layer g_p -> last layer h (no bias), so that every logit
  is exactly ``sum_j w[k, j] * similarity[j]``;
- auxiliary path h1: global average pooling + linear, used in stages 1 and 2 only.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from nasxserve.nas.genotype import Genotype
from nasxserve.nas.network import GenotypeNetwork
from nasxserve.protos.layer import SIMILARITY, PrototypeActivations, PrototypeLayer


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


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a trained (discrete) NASXNet model, as plain data.

    This is ``config.json`` of a bundle: with ``weights.safetensors`` it reloads the model without
    pickle. ``similarity`` names the distance-to-similarity function (only ProtoPNet's log form).
    """

    genotype: Genotype
    channels: int
    layers: int
    in_channels: int
    num_classes: int
    prototypes_per_class: int
    prototype_dim: int
    eps: float = 1e-4
    auxiliary_tower: bool = False
    similarity: str = SIMILARITY

    @property
    def num_prototypes(self) -> int:
        return self.num_classes * self.prototypes_per_class

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["genotype"] = self.genotype.to_dict()
        d["prototype_shape"] = [self.prototype_dim, 1, 1]
        d["num_prototypes"] = self.num_prototypes
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        fields = {k: v for k, v in d.items() if k not in ("prototype_shape", "num_prototypes")}
        if fields.get("similarity", SIMILARITY) != SIMILARITY:
            raise ValueError(f"unknown similarity function {fields['similarity']!r}; this nasx knows {SIMILARITY!r}")
        fields["genotype"] = Genotype.from_dict(fields["genotype"])
        return cls(**fields)


def build_model(spec: ModelSpec) -> ExplainableNet:
    """The discrete network of ``spec`` with freshly initialised weights."""
    features = GenotypeNetwork(spec.genotype, spec.channels, spec.layers, spec.in_channels, spec.num_classes,
                               auxiliary_tower=spec.auxiliary_tower)
    return ExplainableNet(features, spec.num_classes, spec.prototypes_per_class, spec.prototype_dim, spec.eps)
