"""The NASXNet model (figure 2): feature extractor f, then two classification paths.

- prototype path: add-on layers -> prototype layer g_p -> last layer h (no bias), so that every logit
  is exactly ``sum_j w[k, j] * similarity[j]``;
- auxiliary path h1: global average pooling + linear, used in stages 1 and 2 only.

The same class also holds the two baselines of the paper's Table 1: the genotype network predicting
with h1 alone (the black box, ``head="linear"``), and ProtoPNet over a torchvision backbone's trunk
(:mod:`nasxserve.protos.backbone`), which has no h1.
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
    activations, or None; features: f(x), (B, C_f, H', W'), which both paths read (None where not kept)."""

    logits: torch.Tensor | None
    aux_logits: torch.Tensor | None
    tower_logits: torch.Tensor | None
    protos: PrototypeActivations | None
    features: torch.Tensor | None = None


class ExplainableNet(nn.Module):
    """f + (add-on, g_p, h) + h1 over any feature extractor with ``out_channels``.

    Args:
        features: maps (B, C_in, H, W) to z (B, C_f, H', W'); may offer ``forward_with_tower``.
        num_classes: K.
        prototypes_per_class: m / K (10 in the paper).
        prototype_dim: D, channels of the prototype space.
        aux_head: whether h1 exists (ProtoPNet has none: its ``aux_logits`` are then always None).
    """

    # f is duck-typed (GenotypeNetwork, SearchNetwork or BackboneFeatures; callers reach for what their
    # kind has: out_channels, forward_with_tower, drop_path_prob, load_pretrained), hence Any
    features: Any

    def __init__(self, features: nn.Module, num_classes: int, prototypes_per_class: int = 10,
                 prototype_dim: int = 64, eps: float = 1e-4, aux_head: bool = True):
        super().__init__()
        self.features = features
        self.num_classes = num_classes
        channels = self.features.out_channels
        self.add_on = AddOnLayers(channels, prototype_dim)
        self.prototype_layer = PrototypeLayer(num_classes * prototypes_per_class, prototype_dim, num_classes, eps)
        self.last_layer = nn.Linear(self.prototype_layer.num_prototypes, num_classes, bias=False)
        self.aux_head = nn.Linear(channels, num_classes) if aux_head else None
        self.reset_last_layer()

    def reset_last_layer(self) -> None:
        """Initialise h by eq. (8) against the prototypes' current class identities."""
        with torch.no_grad():
            self.last_layer.weight.copy_(class_connection_init(self.prototype_layer.prototype_class,
                                                               self.num_classes))

    def prediction_parameters(self, head: str = "prototype") -> int:
        """How many parameters the prediction of ``head`` uses: f without the DARTS tower, then the prototype
        path (add-on layers, prototypes, h) for ``"prototype"`` or h1 for ``"linear"``. Training-only parts
        (h1 of a prototype model, the tower) are not counted."""
        tower = getattr(self.features, "tower", None)
        skip = {id(p) for p in tower.parameters()} if tower is not None else set()
        if head == "linear":
            assert self.aux_head is not None, "the linear head is h1, which this model does not have"
            head_modules: list[nn.Module] = [self.aux_head]
        else:
            head_modules = [self.add_on, self.prototype_layer, self.last_layer]
        params = [p for p in self.features.parameters() if id(p) not in skip]
        params += [p for module in head_modules for p in module.parameters()]
        return sum(p.numel() for p in params)

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if hasattr(self.features, "forward_with_tower"):
            return self.features.forward_with_tower(x)
        return self.features(x), None

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """The prototype-space map add_on(f(x)): (B, D, H', W')."""
        return self.add_on(self._features(x)[0])

    def contributions(self, similarities: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """``w[classes[b], j] * similarities[b, j]``, (B, m), for similarities (B, m) and classes (B,): each
        prototype's share of the class's logit, which is exactly their sum."""
        return self.last_layer.weight[classes] * similarities

    def class_activation_map(self, features: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """h1's class activation map (Zhou et al., "Learning deep features for discriminative localization",
        CVPR 2016): ``w1[classes[b]] . f(x)[b, :, h, w]``, (B, H', W'), for features f(x) (B, C_f, H', W') as
        ``NetOutput.features`` holds them (so the map costs no second run of f) and classes (B,).

        h1 is a global average pool and a linear layer, so its logit for class k is exactly the mean of this
        map plus the bias: the map says where h1's evidence for k comes from. Raises ValueError without h1.
        """
        if self.aux_head is None:
            raise ValueError("this model has no auxiliary head h1, so it has no class activation map")
        return torch.einsum("bc,bchw->bhw", self.aux_head.weight[classes], features)

    def forward(self, x: torch.Tensor, prototype_path: bool = True, aux_path: bool = True) -> NetOutput:
        """x: (B, C_in, H, W). Paths not asked for are not computed (stage 1 needs no prototypes)."""
        z, tower = self._features(x)
        aux = self.aux_head(z.mean(dim=(2, 3))) if aux_path and self.aux_head is not None else None
        logits = protos = None
        if prototype_path:
            protos = self.prototype_layer(self.add_on(z))
            logits = self.last_layer(protos.similarities)
        return NetOutput(logits=logits, aux_logits=aux, tower_logits=tower, protos=protos, features=z)


HEADS = ("prototype", "linear")


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Everything needed to rebuild a trained (discrete) model, as plain data.

    This is ``config.json`` of a bundle: with ``weights.safetensors`` it reloads the model without
    pickle. ``similarity`` names the distance-to-similarity function (only ProtoPNet's log form).

    The feature extractor is either a ``genotype`` network (``channels``, ``layers``, ``reductions``,
    ``auxiliary_tower``: NASXNet, and the black box) or a torchvision ``backbone``'s trunk (ProtoPNet;
    ``small_input_stem``: a ResNet's 3x3 stride-1 first convolution without max-pool, for images smaller
    than 64 pixels).
    ``head`` is the path that predicts: ``prototype`` (add-on, prototypes, h) or ``linear`` (h1 alone: the
    black box of the paper's Table 1; its prototype layer exists but is never trained).
    """

    genotype: Genotype | None = None
    channels: int | None = None
    layers: int | None = None
    reductions: int = 2
    in_channels: int
    num_classes: int
    prototypes_per_class: int
    prototype_dim: int
    eps: float = 1e-4
    auxiliary_tower: bool = False
    similarity: str = SIMILARITY
    backbone: str | None = None
    small_input_stem: bool = False
    head: str = "prototype"

    def __post_init__(self) -> None:
        if (self.genotype is None) == (self.backbone is None):
            raise ValueError("a model has either a genotype or a backbone, not both or neither")
        if self.genotype is not None and (self.channels is None or self.layers is None):
            raise ValueError("a genotype network needs channels and layers")
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r}; this nasx knows {', '.join(HEADS)}")
        if self.backbone is not None and self.head != "prototype":
            raise ValueError("a backbone model (ProtoPNet) predicts with its prototype head only")

    @property
    def num_prototypes(self) -> int:
        return self.num_classes * self.prototypes_per_class

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["genotype"] = self.genotype.to_dict() if self.genotype is not None else None
        d["prototype_shape"] = [self.prototype_dim, 1, 1]
        d["num_prototypes"] = self.num_prototypes
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        """The inverse of :meth:`to_dict`; dicts written before backbones and heads existed load as genotype
        networks with the prototype head."""
        fields = {k: v for k, v in d.items() if k not in ("prototype_shape", "num_prototypes")}
        if fields.get("similarity", SIMILARITY) != SIMILARITY:
            raise ValueError(f"unknown similarity function {fields['similarity']!r}; this nasx knows {SIMILARITY!r}")
        if fields.get("genotype") is not None:
            fields["genotype"] = Genotype.from_dict(fields["genotype"])
        return cls(**fields)


def build_model(spec: ModelSpec) -> ExplainableNet:
    """The network of ``spec`` with freshly initialised weights."""
    if spec.backbone is not None:
        from nasxserve.protos.backbone import BackboneFeatures   # torchvision, only for backbone models

        backbone = BackboneFeatures(spec.backbone, spec.in_channels, spec.small_input_stem)
        return ExplainableNet(backbone, spec.num_classes, spec.prototypes_per_class, spec.prototype_dim, spec.eps,
                              aux_head=False)
    # ModelSpec.__post_init__ guarantees these for a genotype network
    assert spec.genotype is not None and spec.channels is not None and spec.layers is not None
    features = GenotypeNetwork(spec.genotype, spec.channels, spec.layers, spec.in_channels, spec.num_classes,
                               auxiliary_tower=spec.auxiliary_tower, reductions=spec.reductions)
    return ExplainableNet(features, spec.num_classes, spec.prototypes_per_class, spec.prototype_dim, spec.eps)
