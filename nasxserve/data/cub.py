"""CUB-200-2011 (Caltech-UCSD Birds) in its official layout, with the official train/test split.

PATH is the ``CUB_200_2011`` folder or the folder that holds it. Read from it (ids are integers,
fields separated by spaces, pixel coordinates 0-based):

- ``images.txt``: ``image_id relative/path.jpg`` (relative to ``images/``);
- ``image_class_labels.txt``: ``image_id class_id``;
- ``train_test_split.txt``: ``image_id is_training_image`` (1 train, 0 test);
- ``classes.txt``: ``class_id name``;
- ``bounding_boxes.txt``: ``image_id x y width height`` (floats);
- ``parts/parts.txt``: ``part_id name`` (names may contain spaces);
- ``parts/part_locs.txt``: ``image_id part_id x y visible``.

Neither image nor class ids need be contiguous: the classes are those that have images, in class-id
order, labelled 0..K-1 and named as in ``classes.txt``. Boxes can extend past the image; they are
clipped. With ``crop="bbox"`` each image is cropped to its box before resizing, as ProtoPNet does.
Images are resized to 224x224 by default and normalised with the ImageNet statistics (ProtoPNet's).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from nasxserve.data.decode import Manifest, Problem, Split, build_dataset
from nasxserve.errors import DataError

if TYPE_CHECKING:
    from nasxserve.data.base import Dataset

T = TypeVar("T")

URL = "https://www.vision.caltech.edu/datasets/cub_200_2011/"
FOLDER = "CUB_200_2011"
FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt", "bounding_boxes.txt",
         "parts/parts.txt", "parts/part_locs.txt")
LAYOUT = (f"expected PATH = the {FOLDER} folder (or the folder holding it) with {', '.join(FILES)} and "
          f"images/<class>/<image>.jpg; download CUB_200_2011.tgz from {URL} and extract it, then use "
          f"--data cub200:PATH")
DEFAULT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _text(rest: str) -> str:
    if not rest.strip():
        raise ValueError("empty")
    return rest.strip()


def _flag(rest: str) -> bool:
    if rest.strip() not in ("0", "1"):
        raise ValueError(rest)
    return rest.strip() == "1"


def _box(rest: str) -> tuple[float, float, float, float]:
    """``x y width height`` -> (x0, y0, x1, y1)."""
    x, y, w, h = (float(v) for v in rest.split())
    return x, y, x + w, y + h


def _point(rest: str) -> tuple[float, float, float]:
    x, y, visible = rest.split()
    return float(x), float(y), float(_flag(visible))


def _read_table(path: Path, convert: Callable[[str], T], expected: str, problems: list[Problem],
                key_fields: int = 1) -> dict:
    """A metadata file as {id (or tuple of ids): convert(rest of the line)}; lines that cannot be read, and
    repeated ids, become problems."""
    table: dict = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split(maxsplit=key_fields)
        where = f"{path}:{lineno}"
        try:
            ids = tuple(int(f) for f in fields[:key_fields])
            value = convert(fields[key_fields] if len(fields) > key_fields else "")
        except ValueError:
            problems.append(Problem("bad-line", where, f"cannot read {line.strip()!r}; expected {expected}"))
            continue
        key = ids[0] if key_fields == 1 else ids
        if key in table:
            problems.append(Problem("bad-line", where, f"id {key} is listed again"))
        else:
            table[key] = value
    return table


def find_root(path: str | None) -> Path:
    """The ``CUB_200_2011`` folder that PATH is or holds."""
    if not path:
        raise DataError(f"cub200 needs a path: --data cub200:PATH ({LAYOUT})")
    given = Path(path).expanduser()
    for root in (given, given / FOLDER):
        if (root / "images.txt").is_file():
            missing = [f for f in FILES if not (root / f).is_file()]
            if missing:
                raise DataError(f"{root} lacks {', '.join(missing)}; {LAYOUT}")
            return root
    state = "it does not exist" if not given.exists() else f"neither it nor {given / FOLDER} has images.txt"
    raise DataError(f"no CUB-200-2011 data at {given}: {state}; {LAYOUT}")


@dataclass
class _Metadata:
    """The CUB text files, keyed by id (part locations by (image id, part id))."""

    images: dict[int, str]
    labels: dict[int, int]
    is_train: dict[int, bool]
    class_names: dict[int, str]
    boxes: dict[int, tuple[float, float, float, float]]
    part_names: dict[int, str]
    part_locs: dict[tuple[int, int], tuple[float, float, float]]


def _read_metadata(root: Path, problems: list[Problem]) -> _Metadata:
    return _Metadata(
        images=_read_table(root / "images.txt", _text, "image_id path", problems),
        labels=_read_table(root / "image_class_labels.txt", int, "image_id class_id", problems),
        is_train=_read_table(root / "train_test_split.txt", _flag, "image_id 0|1", problems),
        class_names=_read_table(root / "classes.txt", _text, "class_id name", problems),
        boxes=_read_table(root / "bounding_boxes.txt", _box, "image_id x y width height", problems),
        part_names=_read_table(root / "parts" / "parts.txt", _text, "part_id name", problems),
        part_locs=_read_table(root / "parts" / "part_locs.txt", _point, "image_id part_id x y 0|1", problems,
                              key_fields=2),
    )


def scan_cub(path: str | None) -> Manifest:
    """The files, labels, split, boxes and part locations the CUB metadata lists, with its problems."""
    root = find_root(path)
    problems: list[Problem] = []
    meta = _read_metadata(root, problems)
    kept = []
    for image_id in sorted(meta.images):
        found = _image_problems(root, image_id, meta)
        problems += found
        if not found:
            kept.append(image_id)
    class_ids = sorted({meta.labels[i] for i in meta.images if meta.labels.get(i) in meta.class_names})
    part_ids = sorted(meta.part_names)
    unknown_parts = sorted({p for _, p in meta.part_locs} - set(part_ids))
    if unknown_parts:
        problems.append(Problem("bad-line", str(root / "parts" / "part_locs.txt"),
                                f"part ids {unknown_parts} are not in parts/parts.txt"))
    splits = {name: _split(root, [i for i in kept if meta.is_train[i] == train], meta, class_ids, part_ids)
              for name, train in (("train", True), ("test", False))}
    return Manifest(name="cub200", source=str(root.resolve()), classes=[meta.class_names[c] for c in class_ids],
                    splits=splits, mean=IMAGENET_MEAN, std=IMAGENET_STD, default_size=DEFAULT_SIZE,
                    part_names=[meta.part_names[p] for p in part_ids], problems=problems)


def _image_problems(root: Path, image_id: int, meta: _Metadata) -> list[Problem]:
    where = f"image {image_id} ({meta.images[image_id]})"
    found = []
    if image_id not in meta.labels:
        found.append(Problem("no-label", where, "not in image_class_labels.txt"))
    elif meta.labels[image_id] not in meta.class_names:
        found.append(Problem("bad-label", where, f"class id {meta.labels[image_id]} is not in classes.txt"))
    if image_id not in meta.is_train:
        found.append(Problem("no-split", where, "not in train_test_split.txt"))
    if image_id not in meta.boxes:
        found.append(Problem("no-box", where, "not in bounding_boxes.txt"))
    file = root / "images" / meta.images[image_id]
    if not file.is_file():
        found.append(Problem("missing-file", str(file), f"listed in images.txt as image {image_id} but not there"))
    return found


def _split(root: Path, ids: list[int], meta: _Metadata, class_ids: list[int], part_ids: list[int]) -> Split:
    label_of = {c: k for k, c in enumerate(class_ids)}
    parts = np.zeros((len(ids), len(part_ids), 3), dtype=np.float32)
    for row, image_id in enumerate(ids):
        for col, part_id in enumerate(part_ids):
            x, y, visible = meta.part_locs.get((image_id, part_id), (0.0, 0.0, 0.0))
            if visible:
                parts[row, col] = (x, y, 1.0)
    return Split(labels=np.array([label_of[meta.labels[i]] for i in ids], dtype=np.int64),
                 files=[root / "images" / meta.images[i] for i in ids],
                 boxes=np.array([meta.boxes[i] for i in ids], dtype=np.float32).reshape(-1, 4),
                 parts=parts)


def load_cub(path: str | None, image_size: int | None = None, crop: str = "none") -> Dataset:
    """CUB-200-2011 as ``image_size`` (default 224) square images; boxes and parts in stored pixels."""
    return build_dataset(scan_cub(path), image_size, crop)
