"""A torchvision classifier's convolutional trunk as the feature extractor f of ProtoPNet (Chen et al.,
NeurIPS 2019, section 2.1: "the convolutional layers of VGG, ResNet or DenseNet", ImageNet-pretrained).

The trunk is everything before the global pooling and the classifier: for ResNets (also ResNeXt and Wide
ResNet) the stem and the four stages, for families that keep their convolutions in ``model.features``
(VGG, DenseNet, EfficientNet, MobileNet, ConvNeXt) that module. (B, C_in, H, W) -> z (B, out_channels,
H', W'), H' = H / 32 for the standard stems.

Small images: a ResNet's 7x7 stride-2 stem and max-pool would leave a 32x32 image a 1x1 grid, so for
sides under :data:`SMALL_INPUT_SIDE` ResNets get the CIFAR stem (a 3x3 stride-1 first convolution, no
max-pool), as LeaSE's audience does (:func:`nasxserve.training.lease.build_audience`): 32x32 -> 4x4.
Images with other than three channels get a first convolution of their own channel count.

ImageNet weights come from a file (nothing is downloaded): :func:`read_backbone_weights` reads a
torchvision ``state_dict`` and :meth:`BackboneFeatures.load_pretrained` copies the trunk's part.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nasxserve.errors import ConfigError

SMALL_INPUT_SIDE = 64          # ResNets get the small-input stem below this image side
RESNET_TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
FEATURES_FAMILIES = ("vgg", "densenet", "efficientnet", "mobilenetv2", "mobilenetv3", "convnext")
PROBE_SIDE = 64                # the side of the dry run that measures a ``features`` trunk's channels


def backbone_family(name: str) -> str:
    """``"resnet"`` or one of :data:`FEATURES_FAMILIES` for a torchvision classification model name;
    :class:`ConfigError` for names torchvision does not know and for families without a plain trunk."""
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise ConfigError(f"unknown backbone {name!r}; use a torchvision classification model such as resnet18, "
                          f"resnet50, vgg19 or densenet121 (see torchvision.models.list_models())")
    family = torchvision.models.get_model_builder(name).__module__.rsplit(".", 1)[-1]
    if family != "resnet" and family not in FEATURES_FAMILIES:
        raise ConfigError(f"backbone {name!r} ({family}) has no convolutional trunk nasx can take apart; use a "
                          f"ResNet (resnet*, resnext*, wide_resnet*) or a model of the families "
                          f"{', '.join(FEATURES_FAMILIES)}")
    return family


def uses_small_input_stem(name: str, image_size: tuple[int, int]) -> bool:
    """Whether a ``name`` backbone gets the small-input stem for images of ``image_size`` (H, W)."""
    return backbone_family(name) == "resnet" and min(image_size) < SMALL_INPUT_SIDE


@dataclass(frozen=True)
class BackboneWeights:
    """A torchvision ``state_dict`` read from ``path`` (sha256 of the file)."""

    path: Path
    sha256: str
    state: dict[str, torch.Tensor]

    def describe(self) -> str:
        return f"{self.path} (sha256 {self.sha256})"


def read_backbone_weights(path: str | Path) -> BackboneWeights:
    """Read a ``state_dict`` file (``torch.load(..., weights_only=True)``); :class:`ConfigError` when it is
    missing, unreadable or not a mapping of names to tensors."""
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise ConfigError(f"--backbone-weights {p} does not exist; pass a torchvision state_dict file, e.g. one "
                          f"saved with torch.save(torchvision.models.resnet18(weights='DEFAULT').state_dict(), PATH)")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated, foreign or pickled-object file: say which and why
        raise ConfigError(f"cannot read --backbone-weights {p}: {e}. Pass a torchvision state_dict saved with "
                          f"torch.save(model.state_dict(), PATH)") from None
    if not isinstance(state, dict) or not state or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                          for k, v in state.items()):
        raise ConfigError(f"--backbone-weights {p} holds a {type(state).__name__}, not a state_dict (a mapping of "
                          f"parameter names to tensors); save one with torch.save(model.state_dict(), PATH)")
    return BackboneWeights(p, hashlib.sha256(p.read_bytes()).hexdigest(), state)


class BackboneFeatures(nn.Module):
    """The trunk of torchvision's ``name`` with random weights: (B, in_channels, H, W) -> (B, out_channels, H', W').

    Args:
        name: a torchvision classification model of a supported family (:func:`backbone_family`).
        in_channels: image channels (1 or 3).
        small_input_stem: ResNets only: 3x3 stride-1 first convolution and no max-pool.
    """

    def __init__(self, name: str, in_channels: int, small_input_stem: bool = False):
        import torchvision

        super().__init__()
        self.name = name
        self.family = backbone_family(name)
        if small_input_stem and self.family != "resnet":
            raise ConfigError(f"the small-input stem is for ResNets; {name!r} is a {self.family}")
        self.small_input_stem = small_input_stem
        model = torchvision.models.get_model(name, weights=None)
        if self.family == "resnet":
            if small_input_stem:
                model.conv1 = nn.Conv2d(in_channels, model.conv1.out_channels, 3, stride=1, padding=1, bias=False)
                model.maxpool = nn.Identity()
            elif in_channels != 3:
                model.conv1 = _with_in_channels(model.conv1, in_channels)
            self.trunk = nn.Sequential(OrderedDict((k, getattr(model, k)) for k in RESNET_TRUNK))
            self.out_channels = model.fc.in_features
            self.source_prefix = ""            # trunk keys are the classifier's own
        else:
            self.trunk = model.features
            if in_channels != 3:
                parent, attr, conv = _first_conv(self.trunk)
                setattr(parent, attr, _with_in_channels(conv, in_channels))
            self.source_prefix = "features."
            self.out_channels = self._probe_channels(in_channels)

    def _probe_channels(self, in_channels: int) -> int:
        """The trunk's output channels, from a dry run (eval mode, so no statistics move)."""
        was = self.trunk.training
        self.trunk.eval()
        with torch.no_grad():
            channels = self.trunk(torch.zeros(1, in_channels, PROBE_SIDE, PROBE_SIDE)).shape[1]
        self.trunk.train(was)
        return int(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def load_pretrained(self, weights: BackboneWeights) -> list[str]:
        """Copy the trunk's tensors from a state_dict of the whole torchvision classifier (its classification
        head is ignored). Returns notes on tensors not copied as they are: the small-input stem's first
        convolution keeps its random initialisation (ImageNet's is 7x7 stride 2), and a grey-image first
        convolution gets ImageNet's filters summed over RGB (the same as feeding the grey image three times).

        Raises :class:`ConfigError` naming missing, unexpected or wrongly shaped tensors (weights of
        another architecture)."""
        target = self.trunk.state_dict()
        first = _first_conv_key(self.trunk)
        prefix, head = self.source_prefix, ("fc.",) if self.family == "resnet" else ("classifier.",)
        source = {k[len(prefix):]: v for k, v in weights.state.items() if k.startswith(prefix)}
        loaded: dict[str, torch.Tensor] = {}
        notes: list[str] = []
        mismatched = []
        for key, value in source.items():
            if key not in target:
                continue
            if value.shape == target[key].shape:
                loaded[key] = value
            elif key == first and self.small_input_stem:
                notes.append(f"{key} not loaded: the small-input stem's 3x3 stride-1 convolution cannot take "
                             f"ImageNet's 7x7 stride-2 filters; it keeps its random initialisation")
            elif key == first and value.shape[1] == 3 and target[key].shape[1] == 1 \
                    and value.shape[2:] == target[key].shape[2:]:
                loaded[key] = value.sum(dim=1, keepdim=True)
                notes.append(f"{key}: ImageNet's RGB filters summed for grey images")
            else:
                mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(target[key].shape)}")
        # BatchNorm's num_batches_tracked is absent from older torchvision files; BatchNorm restores it
        missing = [k for k in target if k not in source and not k.endswith("num_batches_tracked")
                   and not (k == first and self.small_input_stem)]
        unexpected = [k for k in weights.state if not k.startswith(head)
                      and not (k.startswith(prefix) and k[len(prefix):] in target)]
        problems = []
        if missing:
            problems.append(f"{len(missing)} tensors missing (e.g. {', '.join(missing[:4])})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:4])})")
        if mismatched:
            problems.append(f"{len(mismatched)} of another shape (e.g. {'; '.join(mismatched[:3])})")
        if problems:
            raise ConfigError(f"--backbone-weights {weights.path} is not a state_dict of torchvision's {self.name}: "
                              f"{', '.join(problems)}. Pass the weights of the same model (--backbone {self.name})")
        self.trunk.load_state_dict(loaded, strict=False)
        return notes


def _first_conv(module: nn.Module) -> tuple[nn.Module, str, nn.Conv2d]:
    """(parent, attribute name, convolution) of the first ``Conv2d`` in ``module``."""
    for name, child in module.named_modules():
        if isinstance(child, nn.Conv2d):
            parent_name, _, attr = name.rpartition(".")
            return module.get_submodule(parent_name), attr, child
    raise ConfigError("the backbone has no convolution")


def _first_conv_key(trunk: nn.Module) -> str:
    for name, child in trunk.named_modules():
        if isinstance(child, nn.Conv2d):
            return f"{name}.weight"
    raise ConfigError("the backbone has no convolution")


def _with_in_channels(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A fresh convolution like ``conv`` for ``in_channels`` input channels."""
    # torch types a convolution's kernel_size, stride, padding and dilation as tuple[int, ...] (any
    # dimension), while Conv2d's constructor takes pairs; a Conv2d's are pairs
    return nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size,  # type: ignore[arg-type]
                     stride=conv.stride, padding=conv.padding,  # type: ignore[arg-type]
                     dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None)  # type: ignore[arg-type]
