"""Stanford Cars (196 classes, 8,144 train / 8,041 test images) in the devkit layout.

PATH holds ``cars_train/*.jpg`` and ``cars_test/*.jpg``; the devkit files ``cars_meta.mat``
(``class_names``), ``cars_train_annos.mat`` and ``cars_test_annos_withlabels.mat`` (distributed
separately from the devkit) are read from ``PATH/devkit/`` or from PATH itself. Each annotation file
holds an ``annotations`` struct array with fields ``bbox_x1``, ``bbox_y1``, ``bbox_x2``, ``bbox_y2``,
``class`` (1-based) and ``fname`` (a file name in the split's image folder).

The boxes are MATLAB pixel indices (1-based, inclusive), so the box covering pixels x1..x2 is
[x1 - 1, x2) in this package's 0-based, end-exclusive coordinates; boxes are clipped to the image.
The classes are those that have images, in class-id order, labelled 0..K-1 (all 196 for the full
dataset). ``crop="bbox"`` crops each image to its box before resizing. Images are resized to 224x224
by default and normalised with the ImageNet statistics.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from nasxserve.data.cub import DEFAULT_SIZE, IMAGENET_MEAN, IMAGENET_STD
from nasxserve.data.decode import Manifest, Problem, Split, build_dataset
from nasxserve.errors import DataError

if TYPE_CHECKING:
    from nasxserve.data.base import Dataset

URL = "https://ai.stanford.edu/~jkrause/cars/car_dataset.html"
META = "cars_meta.mat"
ANNOTATIONS = {"train": "cars_train_annos.mat", "test": "cars_test_annos_withlabels.mat"}
IMAGE_FOLDERS = {"train": "cars_train", "test": "cars_test"}
FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
LAYOUT = (f"expected PATH/cars_train/*.jpg, PATH/cars_test/*.jpg and {META}, {ANNOTATIONS['train']}, "
          f"{ANNOTATIONS['test']} in PATH/devkit/ (or PATH); get the images and the devkit from {URL} (the test "
          f"labels come separately as {ANNOTATIONS['test']}), then use --data stanford-cars:PATH")


def _loadmat(path: Path) -> dict:
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataError("reading Stanford Cars' .mat files needs scipy: pip install scipy") from None
    try:
        return loadmat(str(path), squeeze_me=True)
    except (OSError, ValueError, TypeError, NotImplementedError) as e:
        raise DataError(f"cannot read {path} as a MATLAB file ({e}); {LAYOUT}") from None


def _find(root: Path, name: str) -> Path:
    for folder in (root / "devkit", root):
        if (folder / name).is_file():
            return folder / name
    hint = ""
    if name == ANNOTATIONS["test"] and any((f / "cars_test_annos.mat").is_file() for f in (root / "devkit", root)):
        hint = " (cars_test_annos.mat has no labels: the labelled file is needed to evaluate)"
    raise DataError(f"{root} has no {name} in devkit/ or in itself{hint}; {LAYOUT}")


def _class_names(path: Path) -> list[str]:
    mat = _loadmat(path)
    if "class_names" not in mat:
        raise DataError(f"{path} has no class_names; {LAYOUT}")
    return [str(n) for n in np.atleast_1d(mat["class_names"])]


def _annotations(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """An annotation file -> file names, class ids (N,) as stored (1-based), boxes (N, 4) x0, y0, x1, y1."""
    mat = _loadmat(path)
    annos = np.atleast_1d(mat.get("annotations", np.zeros(0)))
    missing = [f for f in FIELDS if annos.dtype.names is None or f not in annos.dtype.names]
    if missing:
        raise DataError(f"{path} has no annotations struct array with fields {', '.join(missing)}; {LAYOUT}")
    try:
        classes = annos["class"].astype(np.int64)
        corners = np.stack([annos[f].astype(np.float64) for f in FIELDS[:4]], axis=1)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: the class and bbox fields must hold one number per image ({e}); {LAYOUT}") from None
    boxes = corners - np.array([1.0, 1.0, 0.0, 0.0])     # 1-based inclusive -> 0-based, end-exclusive
    return [str(f) for f in annos["fname"]], classes, boxes.reshape(-1, 4)


def find_root(path: str | None) -> Path:
    if not path:
        raise DataError(f"stanford-cars needs a path: --data stanford-cars:PATH ({LAYOUT})")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"no Stanford Cars data at {root}: it does not exist; {LAYOUT}")
    missing = [f"{d}/" for d in IMAGE_FOLDERS.values() if not (root / d).is_dir()]
    if missing:
        raise DataError(f"{root} has no {' or '.join(missing)}; {LAYOUT}")
    return root


def scan_cars(path: str | None) -> Manifest:
    """The files, labels and boxes the devkit lists, with their problems (bad class ids, absent files)."""
    root = find_root(path)
    names = _class_names(_find(root, META))
    annotations = {}
    for split, file in ANNOTATIONS.items():
        anno_path = _find(root, file)
        annotations[split] = (anno_path, *_annotations(anno_path))
    problems: list[Problem] = []
    kept: dict[str, list[int]] = {}
    for split, (anno_path, files, classes, _) in annotations.items():
        kept[split] = []
        for i, (fname, class_id) in enumerate(zip(files, classes)):
            found = _entry_problems(root / IMAGE_FOLDERS[split] / fname, anno_path, i, int(class_id), len(names))
            problems += found
            if not found:
                kept[split].append(i)
    class_ids = sorted({int(c) for _, _, classes, _ in annotations.values() for c in classes
                        if 1 <= c <= len(names)})
    label_of = {c: k for k, c in enumerate(class_ids)}
    splits = {}
    for split, (_, files, classes, boxes) in annotations.items():
        rows = kept[split]
        splits[split] = Split(labels=np.array([label_of[int(classes[i])] for i in rows], dtype=np.int64),
                              files=[root / IMAGE_FOLDERS[split] / files[i] for i in rows],
                              boxes=boxes[rows].astype(np.float32))
    return Manifest(name="stanford-cars", source=str(root.resolve()), classes=[names[c - 1] for c in class_ids],
                    splits=splits, mean=IMAGENET_MEAN, std=IMAGENET_STD, default_size=DEFAULT_SIZE,
                    problems=problems)


def _entry_problems(image: Path, anno_path: Path, row: int, class_id: int, num_classes: int) -> list[Problem]:
    found = []
    if not 1 <= class_id <= num_classes:
        found.append(Problem("bad-label", f"{anno_path} entry {row + 1} ({image.name})",
                             f"class {class_id} is not in 1..{num_classes} (the classes in {META})"))
    if not image.is_file():
        found.append(Problem("missing-file", str(image), f"listed in {anno_path.name} but not there"))
    return found


def load_cars(path: str | None, image_size: int | None = None, crop: str = "none") -> Dataset:
    """Stanford Cars as ``image_size`` (default 224) square images with their boxes in stored pixels."""
    return build_dataset(scan_cars(path), image_size, crop)
