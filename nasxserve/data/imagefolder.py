"""Any ``train/<class>/*`` + ``test/<class>/*`` tree of images (the torchvision ImageFolder layout).

Class names are the sub-folder names in sorted order; every image is converted to RGB and resized to
``image_size`` (default: the size of the first training image) by :mod:`nasxserve.imaging`, the same
code that prepares images at inference. Images are read once into memory; normalisation statistics
are computed from the training images.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from nasxserve.data.decode import Manifest, Split, build_dataset
from nasxserve.errors import DataError

if TYPE_CHECKING:
    from nasxserve.data.base import Dataset

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
LAYOUT = "expected PATH/train/<class>/<image> and PATH/test/<class>/<image>"


def _scan(split_dir: Path) -> dict[str, list[Path]]:
    return {d.name: sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            for d in sorted(split_dir.iterdir()) if d.is_dir() and not d.name.startswith(".")}


def is_imagefolder(root: Path) -> bool:
    return (root / "train").is_dir() and (root / "test").is_dir()


def scan_imagefolder(path: str | None) -> Manifest:
    """The files and labels of an image-folder tree, class by class in sorted order, files sorted."""
    if not path:
        raise DataError(f"imagefolder needs a path: --data imagefolder:PATH ({LAYOUT})")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist; {LAYOUT}")
    found = {}
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise DataError(f"{root} has no {split}/ folder; {LAYOUT}")
        found[split] = _scan(root / split)
    classes = sorted(c for c, files in found["train"].items() if files)
    if not classes:
        raise DataError(f"{root / 'train'} has no class folders with images; {LAYOUT}")
    unknown = sorted(c for c, files in found["test"].items() if files and c not in classes)
    if unknown:
        raise DataError(f"test classes {unknown} have no training images in {root / 'train'}")
    if len(classes) < 2:
        raise DataError(f"{root / 'train'} has only one class ({classes[0]}); a classifier needs two or more")
    splits = {}
    for split in ("train", "test"):
        files, labels = [], []
        for k, c in enumerate(classes):
            in_class = found[split].get(c, [])
            files += in_class
            labels += [k] * len(in_class)
        if not files:
            raise DataError(f"{root / split} has no images; {LAYOUT}")
        splits[split] = Split(np.asarray(labels, dtype=np.int64), files=files)
    return Manifest(name="imagefolder", source=str(root.resolve()), classes=classes, splits=splits)


def load_imagefolder(path: str | None, image_size: int | None = None) -> Dataset:
    return build_dataset(scan_imagefolder(path), image_size)
