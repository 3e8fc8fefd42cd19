"""Any ``train/<class>/*`` + ``test/<class>/*`` tree of images (the torchvision ImageFolder layout).

Class names are the sub-folder names in sorted order; every image is converted to RGB and resized to
``image_size`` (default: the size of the first training image) by :mod:`nasxserve.imaging`, the same
code that prepares images at inference. Images are read once into memory.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from nasxserve.data.base import Dataset, ImageSet, channel_stats
from nasxserve.errors import DataError, ImageError
from nasxserve.imaging import open_image, resize_to, to_model_mode, to_uint8_chw

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
LAYOUT = "expected PATH/train/<class>/<image> and PATH/test/<class>/<image>"


def _scan(split_dir: Path) -> dict[str, list[Path]]:
    return {d.name: sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            for d in sorted(split_dir.iterdir()) if d.is_dir() and not d.name.startswith(".")}


def _read(paths: list[Path], size: tuple[int, int]) -> np.ndarray:
    out = np.empty((len(paths), 3, size[1], size[0]), dtype=np.uint8)
    for i, p in enumerate(paths):
        try:
            out[i] = to_uint8_chw(resize_to(to_model_mode(open_image(p), 3), *size))
        except ImageError as e:
            raise DataError(f"cannot use training image {e}") from None
    return out


def load_imagefolder(path: str | None, image_size: int | None = None) -> Dataset:
    if not path:
        raise DataError(f"imagefolder needs a path: --data imagefolder:PATH ({LAYOUT})")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist; {LAYOUT}")
    splits = {}
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise DataError(f"{root} has no {split}/ folder; {LAYOUT}")
        splits[split] = _scan(root / split)
    classes = sorted(c for c, files in splits["train"].items() if files)
    if not classes:
        raise DataError(f"{root / 'train'} has no class folders with images; {LAYOUT}")
    unknown = sorted(c for c, files in splits["test"].items() if files and c not in classes)
    if unknown:
        raise DataError(f"test classes {unknown} have no training images in {root / 'train'}")
    if len(classes) < 2:
        raise DataError(f"{root / 'train'} has only one class ({classes[0]}); a classifier needs two or more")
    first = splits["train"][classes[0]][0]
    if image_size is None:
        with Image.open(first) as im:
            w, h = im.size
        size = (w, h)
    else:
        size = (image_size, image_size)
    if size[0] % 4 or size[1] % 4:
        raise DataError(f"image size {size[0]}x{size[1]} must be a multiple of 4 (two reduction cells); "
                        f"set data.image_size in the config")
    sets = {}
    for split in ("train", "test"):
        paths, labels = [], []
        for k, c in enumerate(classes):
            files = splits[split].get(c, [])
            paths += files
            labels += [k] * len(files)
        if not paths:
            raise DataError(f"{root / split} has no images; {LAYOUT}")
        sets[split] = (_read(paths, size), np.asarray(labels, dtype=np.int64))
    mean, std = channel_stats(sets["train"][0])
    return Dataset(name="imagefolder", classes=classes,
                   train=ImageSet(*sets["train"], mean, std), test=ImageSet(*sets["test"], mean, std),
                   mean=mean, std=std, source=str(root.resolve()))
