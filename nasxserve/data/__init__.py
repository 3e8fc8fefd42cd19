"""Dataset registry: ``--data NAME[:PATH]``.

``DATASETS`` maps a name to its loader ``(path, image_size, crop) -> Dataset``; ``SCANNERS`` maps it to the
function that reads what the loader would load without decoding images (``nasx data inspect``).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from nasxserve.errors import DataError

if TYPE_CHECKING:
    from nasxserve.data.base import Dataset, ImageSet
    from nasxserve.data.decode import Manifest

Loader = Callable[..., "Dataset"]
Scanner = Callable[[str | None], "Manifest"]


CROPS = ("none", "bbox")


def _no_crop(name: str, crop: str) -> None:
    if crop != "none":
        raise DataError(f"{name} has no bounding boxes to crop to; use data.crop: none (or --crop none)")


def _digits_takes_no_path(path: str | None) -> None:
    if path:
        raise DataError("digits is bundled with scikit-learn and takes no path: use --data digits")


def _digits(path: str | None, image_size: int | None, crop: str = "none") -> Dataset:
    from nasxserve.data.digits import load_digits
    _digits_takes_no_path(path)
    _no_crop("digits", crop)
    return load_digits(image_size=image_size or 16)


def _imagefolder(path: str | None, image_size: int | None, crop: str = "none") -> Dataset:
    from nasxserve.data.imagefolder import load_imagefolder
    _no_crop("imagefolder", crop)
    return load_imagefolder(path, image_size)


def _cifar(name: str) -> Loader:
    def load(path: str | None, image_size: int | None, crop: str = "none") -> Dataset:
        from nasxserve.data.cifar import load_cifar
        _no_crop(name, crop)
        return load_cifar(name, path, image_size)
    return load


def _cub200(path: str | None, image_size: int | None, crop: str = "none") -> Dataset:
    from nasxserve.data.cub import load_cub
    return load_cub(path, image_size, crop)


def _stanford_cars(path: str | None, image_size: int | None, crop: str = "none") -> Dataset:
    from nasxserve.data.cars import load_cars
    return load_cars(path, image_size, crop)


def _shapes(path: str | None, image_size: int | None, crop: str = "none") -> Dataset:
    from nasxserve.data.shapes import load_shapes
    return load_shapes(path, image_size, crop)


DATASETS: dict[str, Loader] = {"digits": _digits, "imagefolder": _imagefolder, "cifar10": _cifar("cifar10"),
                               "cifar100": _cifar("cifar100"), "cub200": _cub200, "stanford-cars": _stanford_cars,
                               "shapes": _shapes}


def _scan_digits(path: str | None) -> Manifest:
    from nasxserve.data.decode import Manifest, Split
    from nasxserve.data.digits import load_digits
    _digits_takes_no_path(path)
    native = load_digits(image_size=8)          # scikit-learn's 8x8 images, split as the loader splits them
    assert native.val is not None               # which holds out a validation split
    splits = {name: Split(s.labels.numpy(), pixels=s.images.numpy())
              for name, s in (("train", native.train), ("val", native.val), ("test", native.test))}
    return Manifest(name="digits", source=native.source, classes=native.classes, splits=splits, default_size=16)


def _scan_imagefolder(path: str | None) -> Manifest:
    from nasxserve.data.imagefolder import scan_imagefolder
    return scan_imagefolder(path)


def _scan_cifar(name: str) -> Scanner:
    def scan(path: str | None) -> Manifest:
        from nasxserve.data.cifar import scan_cifar
        return scan_cifar(name, path)
    return scan


def _scan_cub200(path: str | None) -> Manifest:
    from nasxserve.data.cub import scan_cub
    return scan_cub(path)


def _scan_stanford_cars(path: str | None) -> Manifest:
    from nasxserve.data.cars import scan_cars
    return scan_cars(path)


def _scan_shapes(path: str | None) -> Manifest:
    from nasxserve.data.shapes import scan_shapes
    return scan_shapes(path)


SCANNERS: dict[str, Scanner] = {"digits": _scan_digits, "imagefolder": _scan_imagefolder,
                                "cifar10": _scan_cifar("cifar10"), "cifar100": _scan_cifar("cifar100"),
                                "cub200": _scan_cub200, "stanford-cars": _scan_stanford_cars,
                                "shapes": _scan_shapes}


def parse_data_spec(spec: str) -> tuple[str, str | None]:
    """``"NAME"`` or ``"NAME:PATH"`` -> (name, path or None)."""
    name, _, path = spec.partition(":")
    return name.strip().lower(), (path or None)


def known_dataset(name: str) -> str:
    """``name`` if it is registered; a DataError listing the known names otherwise."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)} (use NAME or NAME:PATH)")
    return name


def load_dataset(spec: str, image_size: int | None = None, crop: str = "none", val_share: float = 0.0) -> Dataset:
    """``spec`` = NAME or NAME:PATH; ``image_size`` = the side images are resized to (the dataset's default
    when None); ``crop`` = "none" or "bbox" (crop each image to its object's box, where the dataset has boxes);
    ``val_share`` > 0: a dataset without a validation split gets one, that share of its training split
    (:func:`nasxserve.data.base.hold_out_validation`)."""
    from nasxserve.data.base import hold_out_validation
    name, path = parse_data_spec(spec)
    known_dataset(name)
    if crop not in CROPS:
        raise DataError(f"crop must be one of {', '.join(CROPS)}, got {crop!r}")
    return hold_out_validation(DATASETS[name](path, image_size, crop), val_share)


def __getattr__(name: str) -> Any:
    # Dataset and ImageSet hold torch tensors; importing them on first use keeps torch out of
    # `nasx data inspect` and out of the decoding worker processes, which need neither.
    if name in ("Dataset", "ImageSet"):
        from nasxserve.data import base
        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CROPS", "DATASETS", "SCANNERS", "Dataset", "ImageSet", "known_dataset", "load_dataset",
           "parse_data_spec"]
