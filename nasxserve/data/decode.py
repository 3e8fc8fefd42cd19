"""From a dataset's manifest to in-memory image sets: parallel decoding, cropping and annotation mapping.

Every file-based loader works in two steps. It first reads the dataset's metadata into a
:class:`Manifest` (per split: files, labels and, where the dataset has them, object boxes and part
locations in the original images' pixels) together with every :class:`Problem` the metadata shows,
without decoding a pixel. :func:`build_dataset` then decodes the files in worker processes with
:mod:`nasxserve.imaging` (the code inference uses), optionally crops each image to its object's box,
resizes it, and maps boxes and parts into the stored images' pixels. ``nasx data inspect`` reads the
same manifests and runs the same per-image code (:func:`decode_images` without a size), so what it
reports is what training would meet.

Geometry: a box is (x0, y0, x1, y1) with x1, y1 exclusive, in continuous pixel coordinates (pixel
(i, j) covers [i, i + 1) x [j, j + 1)); part locations are points in the same coordinates. Boxes are
clipped to the image; cropping takes the whole pixels the clipped box touches.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from nasxserve.errors import DataError, ImageError
from nasxserve.imaging import open_image, resize_to, to_model_mode, to_uint8_chw

if TYPE_CHECKING:   # base needs torch, which the decoding workers and `nasx data inspect` do not
    from nasxserve.data.base import Dataset, ImageSet

CHANNELS = 3
PARALLEL_MIN = 256      # below this many images, starting worker processes costs more than it saves
CHUNK = 64              # images per worker task: large enough to amortise the transfer, small enough to balance
MAX_WORKERS = 8
SHOWN_PROBLEMS = 5      # problems quoted in a loading error; `nasx data inspect` lists them all

# What a Problem's ``kind`` can be (``nasx data inspect --json`` reports these strings).
PROBLEM_KINDS = {
    "unreadable": "the file is not an image that can be decoded and used",
    "missing-file": "the metadata lists a file that is not there",
    "bad-label": "a label or class id outside the dataset's classes",
    "no-label": "an image without a class label",
    "no-split": "an image without a train/test assignment",
    "no-box": "an image without a bounding box (the dataset has boxes)",
    "bad-box": "a bounding box that does not overlap its image",
    "bad-line": "a metadata line that cannot be parsed, or a repeated or unknown id",
}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset: ``where`` is a file, or a metadata file and line."""

    kind: str
    where: str
    detail: str

    def __str__(self) -> str:
        return f"{self.where}: {self.detail}"

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "where": self.where, "detail": self.detail}


@dataclass
class Split:
    """One split's images before decoding: either ``files`` to decode or ``pixels`` already in memory.

    ``labels`` int64 (N,) in 0..K-1; ``pixels`` uint8 (N, C, H, W); ``boxes`` float32 (N, 4) x0, y0, x1, y1 and
    ``parts`` float32 (N, P, 3) x, y, visible, both in the original images' pixels and not yet clipped.
    """

    labels: np.ndarray
    files: list[Path] | None = None
    pixels: np.ndarray | None = None
    boxes: np.ndarray | None = None
    parts: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Manifest:
    """What a loader found: classes, splits, normalisation, and the problems its metadata has.

    ``mean`` / ``std`` None: computed from the training images once decoded. ``default_size`` None: the
    size of the first training image.
    """

    name: str
    source: str
    classes: list[str]
    splits: dict[str, Split]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    default_size: int | None = None
    part_names: list[str] | None = None
    problems: list[Problem] = field(default_factory=list)

    @property
    def has_boxes(self) -> bool:
        return self.splits["train"].boxes is not None


@dataclass
class Decoded:
    """The result of :func:`decode_images` for N files.

    ``pixels`` uint8 (N, 3, H, W), None when only checking; ``sizes`` int64 (N, 2) width, height of each
    decoded original (-1 where unreadable); ``windows`` float64 (N, 4) the region l, t, r, b of each
    original that became the stored image (the whole image unless cropped); ``problems`` the files that
    could not be used.
    """

    pixels: np.ndarray | None
    sizes: np.ndarray
    windows: np.ndarray
    problems: list[Problem]


# ----------------------------------------------------------------------------------------- geometry

def clip_box(box: np.ndarray, width: int, height: int) -> np.ndarray:
    """(4,) x0, y0, x1, y1 clipped to a ``width`` x ``height`` image."""
    return np.clip(np.asarray(box, dtype=np.float64), 0, [width, height, width, height])


def crop_window(box: np.ndarray, width: int, height: int) -> tuple[int, int, int, int] | None:
    """The whole pixels (l, t, r, b) that the box, clipped to the image, touches; None if it misses the image."""
    x0, y0, x1, y1 = clip_box(box, width, height)
    if x1 <= x0 or y1 <= y0:
        return None
    return math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)


def boxes_to_stored(boxes: np.ndarray, windows: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """boxes (N, 4) in original pixels -> (N, 4) float32 in pixels of the stored ``size`` = (w, h) images,
    clipped to the window each stored image was taken from."""
    lo, hi = windows[:, [0, 1, 0, 1]], windows[:, [2, 3, 2, 3]]
    clipped = np.clip(boxes, lo, hi)
    scale = np.array(size * 2, dtype=np.float64) / (hi - lo)
    return ((clipped - lo) * scale).astype(np.float32)


def parts_to_stored(parts: np.ndarray, windows: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """parts (N, P, 3) x, y, visible in original pixels -> stored pixels; a part outside its window (the crop)
    becomes invisible, and invisible parts are (0, 0, 0)."""
    lo, hi = windows[:, None, :2], windows[:, None, 2:]
    xy = parts[:, :, :2]
    visible = (parts[:, :, 2] > 0) & np.all((xy >= lo) & (xy <= hi), axis=2)
    mapped = (xy - lo) * (np.asarray(size, dtype=np.float64) / (hi - lo))
    out = np.zeros(parts.shape, dtype=np.float32)
    out[visible, :2] = mapped[visible]
    out[visible, 2] = 1.0
    return out


# ----------------------------------------------------------------------------------------- decoding

def _decode_one(path: str, box: np.ndarray | None, size: tuple[int, int] | None, crop: bool):
    """One file -> (pixels (3, h, w) or None, (width, height), window, Problem or None)."""
    try:
        img = to_model_mode(open_image(path), CHANNELS)
    except (ImageError, OSError) as e:
        return None, (-1, -1), (0, 0, 1, 1), _unusable(path, str(e))   # a placeholder window: reported, never mapped
    width, height = img.size
    window = (0, 0, width, height)
    if box is not None:
        touched = crop_window(box, width, height)
        if touched is None:
            corners = ", ".join(f"{float(v):g}" for v in box)
            problem = Problem("bad-box", path, f"box ({corners}) lies outside the {width}x{height} image")
            return None, (width, height), window, problem
        if crop:
            window = touched
    if size is None:
        return None, (width, height), window, None
    if window != (0, 0, width, height):
        img = img.crop(window)
    return to_uint8_chw(resize_to(img, *size)), (width, height), window, None


def _unusable(path: str, message: str) -> Problem:
    detail = message[len(path) + 2:] if message.startswith(f"{path}: ") else message
    return Problem("missing-file" if detail == "no such file" else "unreadable", path, detail)


def _decode_chunk(paths: list[str], boxes: list[np.ndarray | None], size: tuple[int, int] | None, crop: bool):
    """Worker task: :func:`_decode_one` over a chunk, the pixels stacked (unusable images left black)."""
    results = [_decode_one(p, b, size, crop) for p, b in zip(paths, boxes)]
    pixels = None
    if size is not None:
        pixels = np.zeros((len(paths), CHANNELS, size[1], size[0]), dtype=np.uint8)
        for i, result in enumerate(results):
            if result[0] is not None:
                pixels[i] = result[0]
    sizes = np.array([r[1] for r in results], dtype=np.int64).reshape(-1, 2)
    windows = np.array([r[2] for r in results], dtype=np.float64).reshape(-1, 4)
    return pixels, sizes, windows, [r[3] for r in results if r[3] is not None]


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, MAX_WORKERS))


def decode_images(files: list[Path], size: tuple[int, int] | None = None, boxes: np.ndarray | None = None,
                  crop: bool = False, workers: int | None = None) -> Decoded:
    """Decode ``files`` with :mod:`nasxserve.imaging`, in worker processes when there are many.

    ``size`` (w, h): resize to it (None: only check that every file can be used, and measure it);
    ``boxes`` (N, 4) in original pixels, checked against each image; ``crop``: crop each image to its
    clipped box first. Files that cannot be used become problems; the others are still decoded.
    """
    n = len(files)
    paths = [str(f) for f in files]
    per_box = list(boxes) if boxes is not None else [None] * n
    chunks = [(paths[i:i + CHUNK], per_box[i:i + CHUNK]) for i in range(0, n, CHUNK)]
    workers = 1 if n < PARALLEL_MIN else (workers or default_workers())
    # filled chunk by chunk, so that memory peaks at the dataset plus a few chunks, not twice the dataset
    pixels = None if size is None else np.empty((n, CHANNELS, size[1], size[0]), dtype=np.uint8)
    sizes, windows, problems = np.empty((n, 2), dtype=np.int64), np.empty((n, 4)), []
    for start, (chunk_pixels, chunk_sizes, chunk_windows, found) in zip(range(0, n, CHUNK),
                                                                       _run(chunks, size, crop, workers)):
        stop = start + len(chunk_sizes)
        if pixels is not None:
            pixels[start:stop] = chunk_pixels
        sizes[start:stop], windows[start:stop] = chunk_sizes, chunk_windows
        problems += found
    return Decoded(pixels, sizes, windows, problems)


def _run(chunks: list, size: tuple[int, int] | None, crop: bool, workers: int) -> Iterator[tuple]:
    """:func:`_decode_chunk` over ``chunks``, in order; in ``workers`` processes when more than one."""
    if workers == 1:
        yield from (_decode_chunk(paths, boxes, size, crop) for paths, boxes in chunks)
        return
    with ProcessPoolExecutor(max_workers=min(workers, len(chunks))) as pool:
        yield from pool.map(_decode_chunk, *zip(*chunks), [size] * len(chunks), [crop] * len(chunks))


def _resize_in_memory(pixels: np.ndarray, size: tuple[int, int]) -> Decoded:
    """uint8 (N, 3, H, W) already decoded -> resized to ``size`` = (w, h) as image files are."""
    n, _, height, width = pixels.shape
    if (width, height) != size:
        pixels = np.stack([to_uint8_chw(resize_to(Image.fromarray(p.transpose(1, 2, 0)), *size)) for p in pixels])
    return Decoded(pixels, np.tile([width, height], (n, 1)), np.tile([0.0, 0.0, width, height], (n, 1)), [])


# ----------------------------------------------------------------------------------------- datasets

def problems_error(manifest: Manifest, problems: list[Problem], found_in: str) -> DataError:
    """One error quoting the first few problems (found in ``found_in``: the metadata or the images) and saying
    how to see them all."""
    shown = "; ".join(str(p) for p in problems[:SHOWN_PROBLEMS])
    more = f" (and {len(problems) - SHOWN_PROBLEMS} more)" if len(problems) > SHOWN_PROBLEMS else ""
    noun = "problem" if len(problems) == 1 else "problems"
    return DataError(f"{manifest.name} at {manifest.source}: {len(problems)} {noun} in the {found_in}: {shown}{more}. "
                     f"Fix or remove the images concerned; `nasx data inspect {manifest.name}:{manifest.source}` "
                     f"lists every problem")


def default_image_size(manifest: Manifest) -> tuple[int, int]:
    """(w, h) the images are resized to when no size is asked for: the dataset's default, else the size of the
    first training image (read from its header)."""
    if manifest.default_size is not None:
        return manifest.default_size, manifest.default_size
    train = manifest.splits["train"]
    if train.pixels is not None:
        return int(train.pixels.shape[3]), int(train.pixels.shape[2])
    assert train.files is not None              # a split has either pixels or files
    first = train.files[0]
    try:
        with Image.open(first) as im:
            return im.size
    except OSError as e:
        raise DataError(f"cannot read the size of the first training image {first} ({e}); "
                        f"set data.image_size in the config, or fix the image") from None


def check_image_size(size: tuple[int, int]) -> None:
    if size[0] % 4 or size[1] % 4:
        raise DataError(f"image size {size[0]}x{size[1]} must be a multiple of 4 (two reduction cells); "
                        f"set data.image_size in the config")


def build_dataset(manifest: Manifest, image_size: int | None = None, crop: str = "none") -> Dataset:
    """Decode a manifest into a :class:`Dataset` of ``image_size`` x ``image_size`` images (the manifest's
    default when None), cropped to each object's box when ``crop`` is "bbox".

    Raises one DataError listing the problems if the metadata has some (before decoding anything), else if any
    image has some."""
    from nasxserve.data.base import Dataset, channel_stats

    if manifest.problems:
        raise problems_error(manifest, manifest.problems, "metadata")
    if crop == "bbox" and not manifest.has_boxes:
        raise DataError(f"{manifest.name} has no bounding boxes to crop to; use data.crop: none (or --crop none)")
    empty = [name for name, split in manifest.splits.items() if not len(split)]
    if empty:
        raise DataError(f"{manifest.name} at {manifest.source} has no {' and no '.join(empty)} images")
    size = (image_size, image_size) if image_size is not None else default_image_size(manifest)
    check_image_size(size)
    decoded, problems = {}, []
    for name, split in manifest.splits.items():
        if split.pixels is not None:
            decoded[name] = _resize_in_memory(split.pixels, size)
        else:
            assert split.files is not None      # a split has either pixels or files
            decoded[name] = decode_images(split.files, size, split.boxes, crop == "bbox")
        problems += decoded[name].problems
    if problems:
        raise problems_error(manifest, problems, "images")
    mean, std = manifest.mean, manifest.std
    if mean is None or std is None:
        train_pixels = decoded["train"].pixels
        assert train_pixels is not None         # decoded with a size, so kept
        mean, std = channel_stats(train_pixels)
    sets = {name: _image_set(split, decoded[name], size, mean, std) for name, split in manifest.splits.items()}
    return Dataset(name=manifest.name, classes=list(manifest.classes), train=sets["train"], test=sets["test"],
                   val=sets.get("val"), mean=mean, std=std, source=manifest.source,
                   part_names=manifest.part_names)


def _image_set(split: Split, decoded: Decoded, size: tuple[int, int], mean: tuple[float, ...],
               std: tuple[float, ...]) -> ImageSet:
    from nasxserve.data.base import ImageSet

    boxes = None if split.boxes is None else boxes_to_stored(split.boxes, decoded.windows, size)
    parts = None if split.parts is None else parts_to_stored(split.parts, decoded.windows, size)
    assert decoded.pixels is not None           # decoded with a size, so kept
    return ImageSet(decoded.pixels, split.labels, mean, std, boxes=boxes, parts=parts)
