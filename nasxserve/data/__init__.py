"""Dataset registry: ``--data NAME[:PATH]``."""
from __future__ import annotations

from typing import Callable

from nasxserve.data.base import Dataset, ImageSet
from nasxserve.errors import DataError

Loader = Callable[..., Dataset]


CROPS = ("none", "bbox")


def _no_crop(name: str, crop: str) -> None:
    if crop != "none":
        raise DataError(f"{name} has no bounding boxes to crop to; use data.crop: none (or --crop none)")


def _digits(path: str | None, image_size: int | None, crop: str = "none") -> Dataset:
    from nasxserve.data.digits import load_digits
    if path:
        raise DataError("digits is bundled with scikit-learn and takes no path: use --data digits")
    _no_crop("digits", crop)
    return load_digits(image_size=image_size or 16)


def _imagefolder(path: str | None, image_size: int | None, crop: str = "none") -> Dataset:
    from nasxserve.data.imagefolder import load_imagefolder
    _no_crop("imagefolder", crop)
    return load_imagefolder(path, image_size)


DATASETS: dict[str, Loader] = {"digits": _digits, "imagefolder": _imagefolder}


def parse_data_spec(spec: str) -> tuple[str, str | None]:
    """``"NAME"`` or ``"NAME:PATH"`` -> (name, path or None)."""
    name, _, path = spec.partition(":")
    return name.strip().lower(), (path or None)


def load_dataset(spec: str, image_size: int | None = None, crop: str = "none") -> Dataset:
    """``spec`` = NAME or NAME:PATH; ``image_size`` = the side images are resized to (the dataset's default
    when None); ``crop`` = "none" or "bbox" (crop each image to its object's box, where the dataset has boxes)."""
    name, path = parse_data_spec(spec)
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)} (use NAME or NAME:PATH)")
    if crop not in CROPS:
        raise DataError(f"crop must be one of {', '.join(CROPS)}, got {crop!r}")
    return DATASETS[name](path, image_size, crop)


__all__ = ["DATASETS", "Dataset", "ImageSet", "load_dataset", "parse_data_spec"]
