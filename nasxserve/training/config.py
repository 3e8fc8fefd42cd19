"""Training configuration: one dataclass per section and the checks of their values
(:meth:`TrainConfig.validate`); :mod:`nasxserve.training.config_loading` fills them from a preset, YAML and flags.

The defaults are the ``cpu`` preset on the embedded digits dataset: a search and a retrain that finish
in a few minutes on two CPU cores. Optimiser settings are DARTS' reference defaults unless the
NASXNet paper says otherwise.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml

from nasxserve.contracts import ExtensionSettings
from nasxserve.data.augment import POLICIES
from nasxserve.errors import ConfigError
from nasxserve.nas.network import REDUCTIONS
from nasxserve.nas.ops import PRIMITIVES

STRATEGY_NAMES = ("darts", "pc-darts", "p-darts")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
METHODS = ("nasxnet", "protopnet")
RETRAIN_HEADS = ("prototype", "linear")
# nasxserve.training.extensions; in neither paper
EXTENSION_NAMES = ("box-calibration", "class-projection", "deletion-cost", "foreground-projection")


@dataclass
class DataConfig:
    spec: str = "digits"          # NAME or NAME:PATH
    image_size: int | None = None  # dataset default when None
    crop: str = "none"             # "bbox": crop each image to its object's box (cub200, stanford-cars)
    augment: str = "none"          # none, crop-flip (DARTS on CIFAR) or affine-flip (ProtoPNet on CUB and Cars)
    padding: int | None = None     # crop-flip's zero padding; None: image side / 8 (4 on CIFAR)
    batch_size: int = 64
    eval_batch_size: int = 256
    train_portion: float = 0.5     # search: share of the training split for weights; the rest updates alpha
    val_share: float = 0.1         # a dataset without a validation split gets this share of its training split
                                   # (stratified, fixed seed); 0: none, the test split picks best.pt (the papers')


@dataclass
class ModelConfig:
    prototypes_per_class: int = 10   # m = 10 K (section 4.3)
    prototype_dim: int = 32
    eps: float = 1e-4


@dataclass
class StabilityConfig:
    """R-DARTS' adaptive regularisation (NASXNet section 3.4): the DARTS-ADA rule of its reference
    (automl/RobustDARTS; :mod:`nasxserve.training.stability`), measured every epoch by default; the
    reference measures every 2 and looks 8 epochs back (``--preset paper``)."""
    track: bool = True               # estimate the Hessian's largest eigenvalue w.r.t. alpha ...
    every: int = 1                   # ... after epochs 1, 1 + every, ... and the last (reference: 2)
    adaptive: bool = True            # roll back and raise the weight decay when it rises (needs track)
    batches: int = 1                 # validation batches the Hessian is taken on ...
    batch_size: int = 32             # ... of this many images (each product costs ~2 backward passes on it)
    iterations: int = 10             # most power iterations (warm-started from the previous measurement) ...
    tolerance: float = 0.02          # ... or until the estimate moves less than this, relative
    window: int = 5                  # measurements in the (centred) local average
    ratio: float = 1.3               # trigger: local average grew by more than this ...
    lookback: int = 4                # ... over this many epochs (a multiple of every; reference: 4 measurements) ...
    start_epoch: int = 10            # ... and the earlier epoch comes after this many (reference's es_start_epoch)
    factor: float = 10.0             # weight decay multiplier at each trigger
    max_weight_decay: float = 0.03


@dataclass
class PCDartsConfig:
    """PC-DARTS (Xu et al., 2020); published: K = 4, alpha frozen for the first 15 of 50 epochs."""
    partial_channels: int = 4        # K: 1/K of each edge's channels go through the mixed operation
    edge_normalisation: bool = True  # softmaxed betas on each node's incoming edges
    arch_start_epoch: int = 2        # first epoch (0-based) that updates alpha and beta


@dataclass
class PDartsConfig:
    """P-DARTS (Chen et al., 2019); published: 5, 11, 17 cells, 25 epochs a stage, alpha frozen for 10."""
    layers: list[int] = field(default_factory=lambda: [5, 8, 11])          # cells in each stage's network
    keep: list[int] = field(default_factory=lambda: [5, 3, 1])             # operations per edge after each stage
    skip_dropout: list[float] = field(default_factory=lambda: [0.1, 0.4, 0.7])  # initial rate in each stage
    arch_start_epoch: int = 2        # first epoch (0-based) of each stage that updates alpha
    max_skip_connections: int = 2    # in the final normal cell


@dataclass
class LeaseConfig:
    """LeaSE (Hosseini and Xie): the search network explains itself to an audience network (eq. 5-17)."""
    enabled: bool = False
    audience: str = "resnet18"       # resnet18, resnet50 (adapted to small inputs) or any torchvision classifier
    gamma: float = 1.0               # weight of the audience's validation loss (eq. 4)
    audience_only: bool = False      # section 5.4 ablation: alpha learns from the audience's loss alone
    audience_lr: float = 0.025       # xi_W (eq. 8) and the audience's SGD learning rate
    audience_momentum: float = 0.9
    audience_weight_decay: float = 3e-4
    delta_lr: float = 1.0            # xi_Delta (eq. 7)
    delta_init: float = 1e-3         # each sample's delta_i starts uniform in [-delta_init, delta_init], then
                                     # eq. (7) moves it whenever its sample is drawn (Algorithm 1)


@dataclass
class SearchConfig:
    strategy: str = "darts"          # darts, pc-darts or p-darts ("lease" = darts with lease.enabled)
    head: str = "prototype"          # prototype: the NASXNet stages; plain: every epoch on stage 1's classifier
    channels: int = 8
    layers: int = 5
    reductions: int = 2              # reduction cells: 2 (DARTS, latent H/4) or 1 (the first alone, latent H/2)
    epochs_adapt: int = 2
    epochs_joint: int = 4
    epochs_finetune: int = 2
    order: int = 1                   # 1 = first-order DARTS, 2 = second order (eq. 2)
    lr: float = 0.025
    lr_min: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    arch_lr: float = 3e-4
    arch_betas: tuple[float, float] = (0.5, 0.999)
    arch_weight_decay: float = 1e-3
    project_every: int = 0           # 0: project only at the end of the search
    min_convolutions: int = 2        # the derived normal cell keeps at least this many convolutions (not in the
                                     # papers: P-DARTS' skip rule applied to pools and skips; 0: DARTS' derivation,
                                     # --preset paper): short searches otherwise derive all-pool cells
    subset: int = 0                  # search on this many training images (a fixed random subset); 0 = all
    stability: StabilityConfig = field(default_factory=StabilityConfig)
    pc_darts: PCDartsConfig = field(default_factory=PCDartsConfig)
    p_darts: PDartsConfig = field(default_factory=PDartsConfig)
    lease: LeaseConfig = field(default_factory=LeaseConfig)


@dataclass
class RetrainConfig:
    channels: int = 16
    layers: int = 8
    reductions: int = 2              # as search.reductions
    epochs_joint: int = 14
    epochs_finetune: int = 6
    lr: float = 0.05
    lr_min: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 3e-4
    grad_clip: float = 5.0
    batch_size: int | None = None    # None: data.batch_size
    drop_path: float = 0.0
    cutout: int = 0                  # Cutout square side in pixels (16 in DARTS' CIFAR retraining); 0 = off
    auxiliary_tower: float = 0.0     # DARTS auxiliary tower loss weight (0.4 in DARTS); 0 = no tower
    project_every: int = 10          # epochs between global projections (t); always once at the end
    head: str = "prototype"          # prototype: stages 2-3 with projections; linear: the black box, h1 only (eq. 4)


@dataclass
class ProtoPNetConfig:
    """The ProtoPNet baseline (Chen et al., 2019) with its main.py/settings.py schedule and optimisers."""
    backbone: str = "resnet18"       # any torchvision ResNet, VGG, DenseNet, EfficientNet, MobileNet or ConvNeXt
    backbone_weights: str | None = None   # a torchvision state_dict file (e.g. ImageNet's); None: from scratch
    epochs_warm: int = 1             # features frozen; add-on layers and prototypes learn (ProtoPNet: 5)
    epochs_joint: int = 9            # features, add-on layers and prototypes; the last layer stays fixed
    push_start: int = 10             # push after 0-based epoch e when e >= push_start and (e - push_start) is a
    push_every: int = 10             # multiple of push_every (0: only at the end); always after the last epoch
    warm_lr: float = 3e-3            # add-on layers and prototypes in warm-up
    features_lr: float | None = None  # None: 1e-4 (ProtoPNet's, for pretrained weights) or 1e-3 from scratch
    add_on_lr: float = 3e-3
    prototype_lr: float = 3e-3
    weight_decay: float = 1e-3       # features and add-on layers (not the prototypes), Adam's L2 as ProtoPNet
    joint_lr_step: int = 5           # joint lr x joint_lr_gamma every joint_lr_step joint epochs (StepLR)
    joint_lr_gamma: float = 0.1
    last_layer_lr: float = 1e-4      # after each push: the last layer alone, Adam, CE + l1 ...
    last_layer_iterations: int = 20  # ... for this many passes over the training split's similarities
    cluster: float = 0.8             # loss coefficients: CE + cluster ClstCost - separation SepCost + l1 L1
    separation: float = 0.08
    l1: float = 1e-4

    def resolved_features_lr(self) -> float:
        """ProtoPNet's 1e-4 fine-tunes ImageNet weights; from scratch a ResNet needs Adam's usual 1e-3."""
        if self.features_lr is not None:
            return self.features_lr
        return 1e-4 if self.backbone_weights else 1e-3


@dataclass
class LossConfig:
    lambda1: float = 0.8
    lambda2: float = 0.001


@dataclass
class ProjectionConfig:
    # after every projection h is reconnected by eq. (8) and fitted (protos.last_layer): CE + l1 L1 over the
    # other-class connections (l1 10x ProtoPNet's 1e-4: chosen on digits' validation split), Adam, own connections
    # >= 0.01 and the others <= 0
    last_layer_passes: int = 20
    last_layer_lr: float = 0.01
    last_layer_l1: float = 1e-3
    # h kept on the same sign constraint after every weight step that trains it (stages 1-2), not only after
    # projections, as ProtoPNet's h keeps eq. (8)'s signs by not training between its last-layer stages: the
    # prototypes then learn under connections that say what they will be shown as
    signs_between_projections: bool = True


@dataclass
class ExtensionsConfig:
    """This project's additions to the papers' method (nasxserve.training.extensions): none unless named."""
    enabled: list[str] = field(default_factory=list)   # any of EXTENSION_NAMES
    deletion_cost: float = 2.0       # lambda_del of deletion-cost: the evidence left after occluding its own box

    def record(self) -> dict[str, Any]:
        """What the run report and the bundle manifest record of the extensions that are on
        (:meth:`nasxserve.contracts.ExtensionSettings.record`, the one place that says it)."""
        return ExtensionSettings(enabled=self.enabled, deletion_cost=self.deletion_cost).record()


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    protopnet: ProtoPNetConfig = field(default_factory=ProtoPNetConfig)
    extensions: ExtensionsConfig = field(default_factory=ExtensionsConfig)
    method: str = "nasxnet"          # nasxnet (search + retrain), or protopnet (the baseline: a fixed backbone)
    genotype: str | None = None      # a published name or a file: skips the search
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"          # auto (bf16 on CUDA, fp16 where bf16 is missing, fp32 on CPU), fp32, bf16, fp16
    preset: str = "cpu"              # the preset the defaults came from (see presets.py); recorded for the report
    threads: int | None = None       # PyTorch's CPU threads; None: 1 on the CPU, one per core beside a GPU

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def has_prototype_boxes(self) -> bool:
        """Whether the run trains NASXNet's prototypes and their boxes, which the extensions act on (the black box
        and ProtoPNet have none)."""
        return self.method == "nasxnet" and self.retrain.head == "prototype"

    def validate(self) -> TrainConfig:
        if self.search.order not in (1, 2):
            raise ConfigError(f"search.order must be 1 or 2, got {self.search.order}")
        p = self.projection
        if p.last_layer_passes < 1 or p.last_layer_lr <= 0 or p.last_layer_l1 < 0:
            raise ConfigError("projection.last_layer_passes must be >= 1, last_layer_lr > 0 and last_layer_l1 >= 0: "
                              "every projection is followed by the last-layer fit that ties each prototype to its "
                              "class")
        if not 0.0 <= self.data.val_share < 0.5:
            raise ConfigError(f"data.val_share must be at least 0 and below 0.5, got {self.data.val_share}")
        if not 0.0 < self.data.train_portion < 1.0:
            raise ConfigError(f"data.train_portion must be between 0 and 1, got {self.data.train_portion}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.data.augment not in POLICIES:
            raise ConfigError(f"data.augment must be one of {', '.join(POLICIES)}, got {self.data.augment!r}")
        if min(self.data.padding or 0, self.retrain.cutout, self.search.subset) < 0:
            raise ConfigError("data.padding, retrain.cutout and search.subset must be >= 0")
        if min(self.data.batch_size, self.retrain.batch_size or 1) < 1:
            raise ConfigError("data.batch_size and retrain.batch_size must be >= 1")
        for name in ("epochs_adapt", "epochs_joint", "epochs_finetune"):
            if getattr(self.search, name) < 0:
                raise ConfigError(f"search.{name} must be >= 0")
        st = self.search.stability
        if min(st.batches, st.batch_size, st.iterations, st.window, st.lookback) < 1:
            raise ConfigError("search.stability.batches, batch_size, iterations, window and lookback must be >= 1")
        if st.every < 1 or st.lookback % st.every:
            raise ConfigError(f"search.stability.every must be >= 1 and divide lookback (epochs between the local "
                              f"averages compared), got every {st.every}, lookback {st.lookback}")
        if st.ratio <= 1.0 or st.factor <= 1.0:
            raise ConfigError("search.stability.ratio and factor must be > 1")
        for section in ("search", "retrain"):
            if getattr(self, section).reductions not in REDUCTIONS:
                raise ConfigError(f"{section}.reductions must be one of {REDUCTIONS} (reduction cells: 2 halve the "
                                  f"image's side twice, as DARTS; 1 once), got {getattr(self, section).reductions!r}")
        self._validate_strategy()
        if self.retrain.epochs_joint + self.retrain.epochs_finetune < 1:
            raise ConfigError("retrain needs at least one epoch (retrain.epochs_joint + retrain.epochs_finetune)")
        if self.retrain.head not in RETRAIN_HEADS:
            raise ConfigError(f"retrain.head must be one of {', '.join(RETRAIN_HEADS)}, got {self.retrain.head!r}")
        self._validate_extensions()
        self._validate_protopnet()
        return self

    def _validate_extensions(self) -> None:
        ext = self.extensions
        unknown = [name for name in ext.enabled if name not in EXTENSION_NAMES]
        if unknown:
            raise ConfigError(f"unknown extension {unknown[0]!r} (extensions.enabled, --extension); this project's "
                              f"extensions are {', '.join(EXTENSION_NAMES)}")
        if len(set(ext.enabled)) < len(ext.enabled):
            raise ConfigError(f"extensions.enabled names an extension twice: {ext.enabled}")
        if not ext.deletion_cost > 0.0:
            raise ConfigError(f"extensions.deletion_cost (--deletion-cost) is the weight of the deletion-cost "
                              f"extension and must be > 0, got {ext.deletion_cost}; leave the extension out to turn "
                              f"it off")
        if ext.enabled and not self.has_prototype_boxes:
            raise ConfigError(f"the extensions ({', '.join(ext.enabled)}) act on NASXNet's prototypes and their boxes; "
                              f"the black box (--head linear) and ProtoPNet (--method protopnet) have none: drop them")

    def _validate_protopnet(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        p = self.protopnet
        if min(p.epochs_warm, p.epochs_joint, p.push_start, p.push_every, p.last_layer_iterations) < 0:
            raise ConfigError("protopnet.epochs_warm, epochs_joint, push_start, push_every and last_layer_iterations "
                              "must be >= 0")
        if p.epochs_warm + p.epochs_joint < 1:
            raise ConfigError("ProtoPNet needs at least one epoch (protopnet.epochs_warm + protopnet.epochs_joint)")
        if p.joint_lr_step < 1 or not 0.0 < p.joint_lr_gamma <= 1.0:
            raise ConfigError("protopnet.joint_lr_step must be >= 1 and joint_lr_gamma in (0, 1]")
        if self.method != "protopnet":
            return
        if self.genotype:
            raise ConfigError("--genotype has no meaning for ProtoPNet (a fixed torchvision backbone, no search); "
                              "drop it, or choose --method nasxnet")
        if self.retrain.head != "prototype":
            raise ConfigError("--head linear is the NASXNet genotype's black box; ProtoPNet always predicts with "
                              "prototypes (choose --method nasxnet for the black box)")
        from nasxserve.protos.backbone import backbone_family
        backbone_family(p.backbone)   # a ConfigError naming the problem for unknown or unsupported models


    def _validate_strategy(self) -> None:
        s = self.search
        if s.strategy == "lease":   # the CLI's shorthand: LeaSE over plain DARTS
            s.strategy, s.lease.enabled = "darts", True
        if s.strategy not in STRATEGY_NAMES:
            raise ConfigError(f"search.strategy must be one of {', '.join(STRATEGY_NAMES)} or lease, "
                              f"got {s.strategy!r}")
        if s.head not in ("prototype", "plain"):
            raise ConfigError(f"search.head must be 'prototype' or 'plain', got {s.head!r}")
        if not 0 <= s.min_convolutions <= 8:
            raise ConfigError(f"search.min_convolutions must be between 0 and 8 (the normal cell's edges), got "
                              f"{s.min_convolutions}")
        k = s.pc_darts.partial_channels
        if s.strategy == "pc-darts" and (k < 1 or s.channels % k):
            raise ConfigError(f"search.pc_darts.partial_channels ({k}) must be >= 1 and divide search.channels "
                              f"({s.channels})")
        p = s.p_darts
        n = len(p.layers)
        if n < 1 or len(p.keep) != n or len(p.skip_dropout) != n:
            raise ConfigError("search.p_darts.layers, keep and skip_dropout need one entry per stage, "
                              f"got {len(p.layers)}, {len(p.keep)} and {len(p.skip_dropout)}")
        if p.keep[-1] != 1 or any(a <= b for a, b in zip(p.keep, p.keep[1:])) or p.keep[0] >= len(PRIMITIVES) \
                or (n > 1 and p.keep[-2] < 2):
            raise ConfigError(f"search.p_darts.keep {p.keep} must decrease from fewer than {len(PRIMITIVES)} "
                              "operations to 1, with at least 2 in every stage that trains")
        if any(layers < 3 for layers in p.layers) or any(not 0 <= r < 1 for r in p.skip_dropout):
            raise ConfigError("search.p_darts.layers must be >= 3 and skip_dropout rates in [0, 1)")
        if s.lease.enabled:
            import torchvision

            if s.lease.audience not in torchvision.models.list_models(module=torchvision.models):
                raise ConfigError(f"search.lease.audience {s.lease.audience!r} is not a torchvision classification "
                                  "model; use resnet18, resnet50, or see torchvision.models.list_models()")
        if s.lease.audience_only and not s.lease.enabled:
            raise ConfigError("search.lease.audience_only needs LeaSE on (--lease or search.lease.enabled)")


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
