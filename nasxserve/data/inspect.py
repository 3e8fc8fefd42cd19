"""What a dataset loader sees, without training: ``nasx data inspect NAME[:PATH]``.

The report comes from the loader's own manifest (:data:`nasxserve.data.SCANNERS`) and from decoding
every image file with the loader's own per-image code, in parallel, so a dataset that inspects clean
loads, and every problem loading would stop at is listed here at once.

The report (``--json``) is a dict with these keys:

- ``dataset`` (str): the registry name; ``source`` (str): the resolved folder read (or the origin);
- ``num_classes`` (int) and ``classes`` (list of str): in label order;
- ``splits``: {split: {``images``: int, ``per_class``: {class: int}}} for train, (val,) test; images with
  metadata problems are not counted;
- ``original_sizes``: null when no image could be measured, else {``images``: how many were measured,
  ``width`` and ``height``: {``min``, ``median``, ``max``}} in pixels, before any crop or resize;
- ``stored_size``: [width, height] the loader resizes to by default (null if it cannot be told);
- ``mean``, ``std``: the per-channel normalisation, null when computed from the training images at load;
- ``boxes`` (bool): whether the dataset has object boxes; ``part_names`` (list of str, empty without parts);
- ``problems``: [{``kind``, ``where``, ``detail``}], kind one of
  :data:`nasxserve.data.decode.PROBLEM_KINDS`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

from nasxserve.data import SCANNERS, known_dataset, parse_data_spec
from nasxserve.data.decode import Manifest, Problem, decode_images, default_image_size
from nasxserve.errors import DataError


def inspect_dataset(spec: str, workers: int | None = None) -> dict[str, Any]:
    """The report described in the module docstring for ``spec`` = NAME or NAME:PATH.

    Raises DataError when NAME is unknown or PATH does not hold the dataset's layout."""
    name, path = parse_data_spec(spec)
    manifest = SCANNERS[known_dataset(name)](path)
    sizes, problems = _check_images(manifest, workers)
    return {
        "dataset": manifest.name,
        "source": manifest.source,
        "num_classes": len(manifest.classes),
        "classes": list(manifest.classes),
        "splits": {split_name: {"images": len(split),
                                "per_class": dict(zip(manifest.classes, _per_class(split.labels, manifest)))}
                   for split_name, split in manifest.splits.items()},
        "original_sizes": _size_stats(sizes),
        "stored_size": _stored_size(manifest),
        "mean": None if manifest.mean is None else list(manifest.mean),
        "std": None if manifest.std is None else list(manifest.std),
        "boxes": manifest.has_boxes,
        "part_names": list(manifest.part_names or []),
        "problems": [p.to_dict() for p in manifest.problems + problems],
    }


def _check_images(manifest: Manifest, workers: int | None) -> tuple[np.ndarray, list[Problem]]:
    """Decode every image file of every split; -> (width, height) (M, 2) of those measured, their problems."""
    sizes: list[np.ndarray] = []
    files: list[Path] = []
    boxes: list[np.ndarray] = []
    for split in manifest.splits.values():
        if split.pixels is not None:
            sizes.append(np.tile([split.pixels.shape[3], split.pixels.shape[2]], (len(split), 1)))
        else:
            assert split.files is not None      # a split has either pixels or files
            files += split.files
            if split.boxes is not None:
                boxes.append(split.boxes)
    checked = decode_images(files, None, np.concatenate(boxes) if boxes else None, workers=workers)
    sizes.append(checked.sizes[checked.sizes[:, 0] >= 0])
    return np.concatenate(sizes), checked.problems


def _per_class(labels: np.ndarray, manifest: Manifest) -> list[int]:
    return np.bincount(labels, minlength=len(manifest.classes)).tolist()


def _size_stats(sizes: np.ndarray) -> dict[str, Any] | None:
    if not len(sizes):
        return None
    stats: dict[str, Any] = {"images": int(len(sizes))}
    for axis, name in enumerate(("width", "height")):
        values = sizes[:, axis]
        stats[name] = {"min": int(values.min()), "median": float(np.median(values)), "max": int(values.max())}
    return stats


def _stored_size(manifest: Manifest) -> list[int] | None:
    try:
        return list(default_image_size(manifest))
    except DataError:
        return None


# ----------------------------------------------------------------------------------------- rendering

def render(report: dict[str, Any], console: Console) -> None:
    """The report as tables: overview, images per class and split, original sizes, problems."""
    console.print(Text.assemble((report["dataset"], "bold"), f" from {report['source']}"))
    console.print(_overview(report))
    console.print(_class_table(report))
    if report["original_sizes"] is not None:
        console.print(_size_table(report["original_sizes"]))
    if report["problems"]:
        console.print(_problem_table(report["problems"]))
    else:
        console.print(Text("no problems found"))


def _overview(report: dict[str, Any]) -> Table:
    table = Table(show_header=False, box=None, padding=(0, 2))
    counts = ", ".join(f"{name} {s['images']}" for name, s in report["splits"].items())
    stored = report["stored_size"]
    normalisation = ("computed from the training images" if report["mean"] is None
                     else f"mean {report['mean']}, std {report['std']}")
    parts = report["part_names"]
    rows = [("classes", str(report["num_classes"])), ("images", counts),
            ("stored size", f"{stored[0]}x{stored[1]}" if stored else "unknown"),
            ("normalisation", normalisation), ("boxes", "yes" if report["boxes"] else "no"),
            ("parts", f"{len(parts)}: {', '.join(parts)}" if parts else "no")]
    for key, value in rows:
        table.add_row(key, Text(value))
    return table


def _class_table(report: dict[str, Any]) -> Table:
    splits = report["splits"]
    table = Table(title="images per class", title_justify="left")
    table.add_column("label", justify="right")
    table.add_column("class", overflow="fold")
    for name in splits:
        table.add_column(name, justify="right")
    table.add_column("total", justify="right")
    for k, cls in enumerate(report["classes"]):
        counts = [splits[name]["per_class"][cls] for name in splits]
        table.add_row(str(k), Text(cls), *map(str, counts), str(sum(counts)))
    totals = [splits[name]["images"] for name in splits]
    table.add_row("", "all", *map(str, totals), str(sum(totals)), style="bold")
    return table


def _size_table(stats: dict[str, Any]) -> Table:
    table = Table(title=f"original image sizes ({stats['images']} images)", title_justify="left", min_width=40)
    for column in ("", "min", "median", "max"):
        table.add_column(column, justify="right")
    for name in ("width", "height"):
        s = stats[name]
        table.add_row(name, str(s["min"]), f"{s['median']:g}", str(s["max"]))
    return table


def _problem_table(problems: list[dict[str, str]]) -> Table:
    table = Table(title=f"{len(problems)} problem{'s' * (len(problems) != 1)}", title_justify="left")
    table.add_column("kind", no_wrap=True)
    table.add_column("where", overflow="fold")
    table.add_column("detail", overflow="fold")
    for p in problems:
        table.add_row(p["kind"], Text(p["where"]), Text(p["detail"]))
    return table
