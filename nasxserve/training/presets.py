"""Named settings per dataset: ``--preset cpu`` (finishes on a laptop) and ``--preset paper``.

A preset is a nested mapping of config overrides applied between the defaults and the user's config file
and flags, so anything a preset sets can still be changed. ``paper`` follows the settings the papers
publish:

- search (NASXNet section 4, after DARTS): 16 initial channels, 8 cells, batch 64, 50 epochs split
  5 adaptation / 40 joint / 5 fine-tune as in NASXNet's Figure 4, SGD lr 0.025 cosine to 0.001,
  momentum 0.9, weight decay 3e-4, alpha by Adam lr 3e-4 with the second-order gradient of eq. (2)
  (DARTS' one-step unrolled approximation); the prototypes projected every t = 10 epochs of the
  prototype stages (section 3.5: "for every t epochs of training, we project"; the paper gives no t,
  so ProtoPNet's push cadence of 10 epochs, the one NASXNet's retraining uses too);
- the cell derived as DARTS derives it (``search.min_convolutions: 0``; the cpu presets keep at least 2
  convolutions in the normal cell, see docs/deviations.md);
- DARTS-ADA (section 3.4) as R-DARTS' reference runs it: the Hessian's largest eigenvalue after every
  second epoch (and the last) on one validation batch of the search's 64 images, local averages of 5
  measurements compared 8 epochs apart;
- prototypes (NASXNet section 4.1 follows ProtoPNet's settings): 10 per class, 128 channels, 1x1;
- retrain (DARTS' CIFAR evaluation): 20 cells, 36 channels, batch 96, 600 epochs, auxiliary tower
  weight 0.4, Cutout 16, drop-path 0.2, lr 0.025. NASXNet has no adaptation stage when retraining and
  does not publish the split of those 600 epochs; the last 10% fine-tune, as in its search;
- augmentation: DARTS' crop-and-flip on CIFAR; ProtoPNet's 224x224 inputs cropped to the object's box
  with rotation, shear and flips on CUB-200-2011 and Stanford Cars.

``cpu`` keeps the network and the schedule small enough for two cores: on CIFAR-sized images the
search runs on a 640-image subset for three epochs, and the retraining on everything for ten (on
a 5,000-image CIFAR-10 subset the whole run takes about a quarter of an hour). On the
generated ``shapes`` images (32x32 like CIFAR, but 1,200 training images whose glyphs already sit at
random places, so no augmentation) the search is as small, with one reduction cell instead of two, and
the retraining runs 20 epochs. Every preset trains the papers' method: this project's extensions
(``--extension box-calibration,deletion-cost``, :mod:`nasxserve.training.extensions`) are only ever named by
the user.

The ProtoPNet baseline (``method: protopnet``) reads its own ``protopnet`` section. ``paper`` is
ProtoPNet's main.py: 5 warm-up epochs of 1000, pushes every 10 epochs from epoch 10. ``cpu`` trains a
ResNet-18 from scratch for 10 epochs on digits (1 warm-up, the config's defaults), 5 on CIFAR-sized
photographs (1 warm-up: a joint epoch over 5,000 32x32 images takes minutes on two cores, so 10 would
take about half an hour), and elsewhere as many as NASXNet's retraining: 20 on shapes, 25 on the
fine-grained sets (a tenth, at least one, warm-up).
"""
from __future__ import annotations

import copy
from typing import Any

from nasxserve.errors import ConfigError

PRESETS = ("cpu", "paper")
SMALL_IMAGES = ("cifar10", "cifar100", "imagefolder")   # 32x32-like photographs
FINE_GRAINED = ("cub200", "stanford-cars")              # ProtoPNet's 224x224 bird and car crops
SYNTHETIC = ("shapes",)                                 # generated 32x32 glyphs with known part boxes

# t of section 3.5: the paper does not give it; ProtoPNet (whose settings NASXNet follows) pushes every 10 epochs
PAPER_PROJECT_EVERY = 10
PAPER_SEARCH = {"channels": 16, "layers": 8, "epochs_adapt": 5, "epochs_joint": 40, "epochs_finetune": 5,
                "lr": 0.025, "lr_min": 0.001, "momentum": 0.9, "weight_decay": 3e-4, "arch_lr": 3e-4,
                "order": 2, "project_every": PAPER_PROJECT_EVERY, "min_convolutions": 0,
                # R-DARTS' scripts/DARTS-ADA_search.sh: --report_freq_hessian 2, delta 4 (x 2 = 8 epochs), one
                # search batch (64) for the Hessian
                "stability": {"track": True, "adaptive": True, "every": 2, "lookback": 8, "batch_size": 64}}
PAPER_RETRAIN = {"channels": 36, "layers": 20, "batch_size": 96, "epochs_joint": 540, "epochs_finetune": 60,
                 "lr": 0.025, "lr_min": 0.0, "momentum": 0.9, "weight_decay": 3e-4, "auxiliary_tower": 0.4,
                 "cutout": 16, "drop_path": 0.2, "grad_clip": 5.0, "project_every": PAPER_PROJECT_EVERY}
PAPER_MODEL = {"prototypes_per_class": 10, "prototype_dim": 128}   # ProtoPNet's prototype_shape (2000, 128, 1, 1)

# Three search epochs cannot reach the adaptive rule's first trigger (epoch 10), so the cpu presets skip
# the per-epoch Hessian estimate, which would double a search epoch's time; --preset paper keeps it.
CPU_SEARCH = {"channels": 8, "layers": 5, "epochs_adapt": 1, "epochs_joint": 1, "epochs_finetune": 1,
              "stability": {"track": False}}
CPU_SMALL = {
    "data": {"augment": "crop-flip", "batch_size": 64},
    "search": {**CPU_SEARCH, "subset": 640},
    "retrain": {"channels": 16, "layers": 5, "epochs_joint": 8, "epochs_finetune": 2, "lr": 0.05,
                "project_every": 5},
}
# shapes exists to check that boxes find the part: a latent cell of 2 px instead of 4 (one reduction; the
# glyph is 8 px), and 20 retrain epochs, which the extensions that train and move the boxes need when named
CPU_SHAPES = {
    "search": {**CPU_SEARCH, "subset": 600, "reductions": 1},
    "retrain": {"channels": 16, "layers": 5, "reductions": 1, "epochs_joint": 14, "epochs_finetune": 6,
                "project_every": 5},
}
CPU_FINE_GRAINED = {
    "data": {"image_size": 64, "crop": "bbox", "augment": "affine-flip", "batch_size": 32},
    "search": {**CPU_SEARCH, "subset": 600},
    "retrain": {"channels": 16, "layers": 5, "epochs_joint": 20, "epochs_finetune": 5, "project_every": 5},
}

# ProtoPNet (method: protopnet) per family; digits runs on the config's defaults (1 warm-up + 9 joint epochs)
CPU_PROTOPNET = {"small": {"epochs_warm": 1, "epochs_joint": 4}, "shapes": {"epochs_warm": 2, "epochs_joint": 18},
                 "fine-grained": {"epochs_warm": 2, "epochs_joint": 23}}
PAPER_PROTOPNET = {"epochs_warm": 5, "epochs_joint": 995, "push_start": 10, "push_every": 10}


def _family(spec: str) -> str:
    name = spec.partition(":")[0].strip().lower()
    if name in SMALL_IMAGES:
        return "small"
    if name in FINE_GRAINED:
        return "fine-grained"
    if name in SYNTHETIC:
        return "shapes"
    return "digits"


def preset_overrides(preset: str, spec: str) -> dict[str, Any]:
    """The config overrides of ``preset`` for the dataset named by ``spec`` (NAME or NAME:PATH)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    family = _family(spec)
    if preset == "cpu":
        # digits: the defaults are its cpu preset
        overrides = {"small": CPU_SMALL, "fine-grained": CPU_FINE_GRAINED, "shapes": CPU_SHAPES}.get(family, {})
        return {**overrides, "protopnet": dict(CPU_PROTOPNET[family])} if family in CPU_PROTOPNET else overrides
    data: dict[str, Any] = {"batch_size": 64}
    if family == "small":
        data["augment"] = "crop-flip"
    elif family == "fine-grained":
        data.update(image_size=224, crop="bbox", augment="affine-flip")
    return {"data": data, "model": dict(PAPER_MODEL), "search": copy.deepcopy(PAPER_SEARCH),
            "retrain": dict(PAPER_RETRAIN), "protopnet": dict(PAPER_PROTOPNET)}
