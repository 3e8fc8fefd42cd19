"""Dataset registry: ``--data NAME[:PATH]``."""
from __future__ import annotations

from typing import Callable

from nasxserve.data.base import Dataset, ImageSet
from nasxserve.errors import DataError

Loader = Callable[..., Dataset]


def _digits(path: str | None, image_size: int | None) -> Dataset:
    from nasxserve.data.digits import load_digits
    if path:
        raise DataError("digits is bundled with scikit-learn and takes no path: use --data digits")
    return load_digits(image_size=image_size or 16)


def _imagefolder(path: str | None, image_size: int | None) -> Dataset:
    from nasxserve.data.imagefolder import load_imagefolder
    return load_imagefolder(path, image_size)


DATASETS: dict[str, Loader] = {"digits": _digits, "imagefolder": _imagefolder}


def parse_data_spec(spec: str) -> tuple[str, str | None]:
    """``"NAME"`` or ``"NAME:PATH"`` -> (name, path or None)."""
    name, _, path = spec.partition(":")
    return name.strip().lower(), (path or None)


def load_dataset(spec: str, image_size: int | None = None) -> Dataset:
    name, path = parse_data_spec(spec)
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)} (use NAME or NAME:PATH)")
    return DATASETS[name](path, image_size)


__all__ = ["DATASETS", "Dataset", "ImageSet", "load_dataset", "parse_data_spec"]
