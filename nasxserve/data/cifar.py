"""CIFAR-10 and CIFAR-100 from the official "python version" batches, or from an image-folder copy.

Layouts read (PATH may be the batch folder itself or the folder that holds it):

- CIFAR-10: ``cifar-10-batches-py/`` with ``data_batch_1`` .. ``data_batch_5`` (train), ``test_batch`` and
  ``batches.meta`` (``label_names``);
- CIFAR-100: ``cifar-100-python/`` with ``train``, ``test`` and ``meta`` (``fine_label_names``); labels are
  the 100 fine labels (``fine_labels``).

Each batch is a pickled dict with bytes keys: ``b"data"`` uint8 (N, 3072), each row a 32x32 image stored
channel-planar (1024 red, then 1024 green, then 1024 blue values, rows top to bottom), and the labels
as a list of ints. The pickles are read with an unpickler that only builds numpy arrays, so a file
passed off as a batch cannot run code.

PATH may instead be an image-folder copy (``train/<class>/*``, ``test/<class>/*``), read as by
:mod:`nasxserve.data.imagefolder`. Either way the published per-channel normalisation is used and the
images stay 32x32 unless another size is asked for.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from nasxserve.data.decode import Manifest, Problem, Split, build_dataset
from nasxserve.data.imagefolder import is_imagefolder, scan_imagefolder
from nasxserve.errors import DataError

if TYPE_CHECKING:
    from nasxserve.data.base import Dataset

SIDE = 32
URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
SHOWN_ROWS = 5


@dataclass(frozen=True)
class Variant:
    """Where one CIFAR variant keeps what, and its published normalisation."""

    title: str
    folder: str
    archive: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    names_key: bytes
    labels_key: bytes
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train_files, *self.test_files, self.meta_file)

    def layout(self, name: str) -> str:
        batches = ", ".join(self.files)
        return (f"expected PATH = {self.folder}/ ({batches}) or the folder holding it, or an image-folder copy "
                f"PATH/train/<class>/<image> + PATH/test/<class>/<image>; get the python version "
                f"({self.archive}) from {URL} and extract it, then use --data {name}:PATH")


VARIANTS = {
    "cifar10": Variant("CIFAR-10", "cifar-10-batches-py", "cifar-10-python.tar.gz",
                       tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "batches.meta",
                       b"label_names", b"labels", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": Variant("CIFAR-100", "cifar-100-python", "cifar-100-python.tar.gz", ("train",), ("test",), "meta",
                        b"fine_label_names", b"fine_labels", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


# Everything a CIFAR batch pickle needs to rebuild its arrays (the batches were written by Python 2 numpy;
# "_codecs.encode" appears when bytes are re-pickled with protocol 2 by Python 3).
SAFE_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR batch holds only arrays")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            content = _ArrayUnpickler(f, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as e:
        raise DataError(f"cannot read {path} as a CIFAR python batch ({e}); extract the archive from {URL} "
                        f"again") from None
    if not isinstance(content, dict):
        raise DataError(f"{path} is not a CIFAR python batch (a pickled dict); extract the archive from {URL} again")
    return content


def _entry(batch: dict, key: bytes, path: Path):
    if key not in batch:
        keys = ", ".join(repr(k) for k in batch)
        raise DataError(f"{path} has no {key!r} entry (it has {keys}); is it a batch of the other CIFAR?")
    return batch[key]


def _read_batch(path: Path, variant: Variant, num_classes: int) -> tuple[Split, list[Problem]]:
    """One batch file -> its images uint8 (N, 3, 32, 32) and labels; rows whose label is not a class are left
    out and reported as one problem."""
    batch = _unpickle(path)
    data = np.asarray(_entry(batch, b"data", path))
    try:
        labels = np.asarray(_entry(batch, variant.labels_key, path), dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise DataError(f"{path}: the {variant.labels_key!r} entry must be a list of integers; extract the archive "
                        f"from {URL} again") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * SIDE * SIDE or len(data) != len(labels):
        raise DataError(f"{path}: expected uint8 data of shape (N, {3 * SIDE * SIDE}) and N labels, got "
                        f"{data.dtype} {data.shape} and {len(labels)} labels; extract the archive from {URL} again")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    problems = []
    if len(bad):
        rows = ", ".join(str(r) for r in bad[:SHOWN_ROWS])
        more = f" and {len(bad) - SHOWN_ROWS} more" if len(bad) > SHOWN_ROWS else ""
        noun = "row" if len(bad) == 1 else "rows"
        problems.append(Problem("bad-label", str(path), f"labels outside 0..{num_classes - 1} in {noun} {rows}{more}"))
    keep = np.setdiff1d(np.arange(len(labels)), bad)
    return Split(labels[keep], pixels=data[keep].reshape(-1, 3, SIDE, SIDE)), problems


def _batch_folder(root: Path, variant: Variant) -> Path | None:
    if (root / variant.folder).is_dir():
        return root / variant.folder
    if any((root / f).is_file() for f in variant.files):
        return root
    return None


def scan_cifar(name: str, path: str | None) -> Manifest:
    """The images and labels of CIFAR-10 (``name`` "cifar10") or CIFAR-100 ("cifar100") at ``path``."""
    variant = VARIANTS[name]
    if not path:
        raise DataError(f"{name} needs a path: --data {name}:PATH ({variant.layout(name)})")
    root = Path(path).expanduser()
    batches = _batch_folder(root, variant) if root.is_dir() else None
    if batches is None:
        if root.is_dir() and is_imagefolder(root):
            return replace(scan_imagefolder(str(root)), name=name, mean=variant.mean, std=variant.std,
                           default_size=SIDE)
        where = "does not exist" if not root.is_dir() else "holds neither the python batches nor an image-folder copy"
        raise DataError(f"no {variant.title} data at {root}: it {where}; {variant.layout(name)}")
    missing = [f for f in variant.files if not (batches / f).is_file()]
    if missing:
        raise DataError(f"{batches} lacks {', '.join(missing)}; {variant.layout(name)}")
    classes = [n.decode() if isinstance(n, bytes) else str(n)
               for n in _entry(_unpickle(batches / variant.meta_file), variant.names_key, batches / variant.meta_file)]
    splits, problems = {}, []
    for split, files in (("train", variant.train_files), ("test", variant.test_files)):
        read = []
        for f in files:
            batch, found = _read_batch(batches / f, variant, len(classes))
            read.append(batch)
            problems += found
        splits[split] = Split(np.concatenate([b.labels for b in read]), pixels=np.concatenate([b.pixels for b in read]))
    return Manifest(name=name, source=str(batches.resolve()), classes=classes, splits=splits, mean=variant.mean,
                    std=variant.std, default_size=SIDE, problems=problems)


def load_cifar(name: str, path: str | None, image_size: int | None = None) -> Dataset:
    return build_dataset(scan_cifar(name, path), image_size)
