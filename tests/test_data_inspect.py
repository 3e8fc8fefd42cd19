"""``nasx data inspect``: the report of what a loader sees, its problems and its exit status.

The CLI cases run ``python -m nasxserve`` in a subprocess (the command does not import torch, so each
takes about a second); the other datasets are inspected in-process.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_imagefolder
from test_datasets import CUB200_MINI, need, read_table, write_cars, write_cifar, write_cub

from nasxserve.data import load_dataset
from nasxserve.data.decode import PROBLEM_KINDS
from nasxserve.data.inspect import inspect_dataset
from nasxserve.errors import DataError

KEYS = {"dataset", "source", "num_classes", "classes", "splits", "original_sizes", "stored_size", "mean", "std",
        "boxes", "part_names", "problems"}


def replace_line(path: Path, start: str, new: str | None) -> None:
    """Replace (or, with ``new`` None, delete) the line of ``path`` that starts with ``start``."""
    lines = path.read_text().splitlines()
    index = next(i for i, line in enumerate(lines) if line.startswith(start))
    lines[index:index + 1] = [] if new is None else [new]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def broken_cub(tmp_path: Path) -> Path:
    """The written CUB with four problems: image 12 is not a PNG, image 21's class id 99 is not in classes.txt,
    image 30 is missing from train_test_split.txt and image 20's box lies outside its 44x32 image."""
    folder = write_cub(tmp_path)
    (folder / "images" / "007.Bird_7" / "bird_12.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing")
    replace_line(folder / "image_class_labels.txt", "21 ", "21 99")
    replace_line(folder / "train_test_split.txt", "30 ", None)
    replace_line(folder / "bounding_boxes.txt", "20 ", "20 50.0 40.0 5.0 5.0")
    return folder


def test_clean_dataset_exits_zero(nasx, tmp_path: Path):
    folder = write_cub(tmp_path)
    r = nasx("data", "inspect", f"cub200:{tmp_path}")
    assert r.returncode == 0, r.stderr
    assert "no problems found" in r.stdout
    for text in ("cub200", str(folder.resolve()), "003.Bird_3", "007.Bird_7", "back, left eye, right wing",
                 "images per class", "original image sizes"):
        assert text in r.stdout, text


def test_problems_are_each_reported_and_exit_one(nasx, broken_cub: Path):
    r = nasx("data", "inspect", f"cub200:{broken_cub}", "--json")
    assert r.returncode == 1, r.stderr
    report = json.loads(r.stdout)
    assert set(report) == KEYS
    images = broken_cub / "images"
    by_kind = {p["kind"]: p for p in report["problems"]}
    assert sorted(by_kind) == ["bad-box", "bad-label", "no-split", "unreadable"] and len(report["problems"]) == 4
    assert by_kind["unreadable"]["where"] == str(images / "007.Bird_7" / "bird_12.png")
    assert by_kind["unreadable"]["detail"].startswith("not an image Pillow can read")
    assert by_kind["bad-label"]["where"].startswith("image 21 ") and "class id 99" in by_kind["bad-label"]["detail"]
    assert by_kind["no-split"]["where"].startswith("image 30 ")
    assert "train_test_split.txt" in by_kind["no-split"]["detail"]
    assert by_kind["bad-box"]["where"] == str(images / "007.Bird_7" / "bird_20.png")
    assert "lies outside the 44x32 image" in by_kind["bad-box"]["detail"]
    # images with metadata problems (21, 30) are not counted; the unreadable 12 and the bad box 20 are
    assert {s: v["images"] for s, v in report["splits"].items()} == {"train": 2, "test": 2}
    assert report["splits"]["test"]["per_class"] == {"003.Bird_3": 1, "007.Bird_7": 1}

    human = nasx("data", "inspect", f"cub200:{broken_cub}")
    assert human.returncode == 1 and "4 problems" in human.stdout
    for kind in by_kind:
        assert kind in human.stdout


def test_training_refuses_what_inspect_reports(broken_cub: Path):
    with pytest.raises(DataError) as e:
        load_dataset(f"cub200:{broken_cub}", image_size=16)
    message = str(e.value)
    assert "2 problems in the metadata" in message and "class id 99" in message and "image 30" in message
    assert f"nasx data inspect cub200:{broken_cub.resolve()}" in message


def test_wrong_name_or_path_exits_two(nasx, tmp_path: Path):
    r = nasx("data", "inspect", f"cub200:{tmp_path / 'nowhere'}")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: no CUB-200-2011 data at") and "Traceback" not in r.stderr
    r = nasx("data", "inspect", "mnist", "--json")
    assert r.returncode == 2 and "unknown dataset 'mnist'" in r.stderr and "stanford-cars" in r.stderr


def test_cub200_mini_report(nasx):
    root = need(CUB200_MINI)
    r = nasx("data", "inspect", f"cub200:{root}", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert set(report) == KEYS and report["problems"] == []
    assert report["dataset"] == "cub200" and report["source"] == str(root.resolve())
    assert report["num_classes"] == 5 and report["classes"][0] == "001.Black_footed_Albatross"
    assert report["splits"]["train"]["images"] == 150 and report["splits"]["test"]["images"] == 132
    assert list(report["splits"]["test"]["per_class"].values()) == [30, 30, 28, 30, 14]
    assert report["boxes"] is True and len(report["part_names"]) == 15
    assert report["stored_size"] == [224, 224] and report["mean"] == [0.485, 0.456, 0.406]
    files = [root / "images" / v[0] for v in read_table(root / "images.txt").values()]
    sizes = np.array([Image.open(f).size for f in files])
    measured = report["original_sizes"]
    assert measured["images"] == 282
    for axis, name in enumerate(("width", "height")):
        assert measured[name] == {"min": int(sizes[:, axis].min()), "median": float(np.median(sizes[:, axis])),
                                  "max": int(sizes[:, axis].max())}


def test_cifar_batches_label_out_of_range(tmp_path: Path):
    write_cifar(tmp_path, "cifar10", per_batch=3)
    batch_file = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch = pickle.loads(batch_file.read_bytes(), encoding="bytes")
    batch[b"labels"][2] = -1
    batch_file.write_bytes(pickle.dumps(batch, protocol=2))
    report = inspect_dataset(f"cifar10:{tmp_path}")
    assert report["problems"] == [{"kind": "bad-label", "where": str(batch_file),
                                   "detail": "labels outside 0..9 in row 2"}]
    assert report["splits"]["train"]["images"] == 15 and report["splits"]["test"]["images"] == 2
    assert report["original_sizes"]["width"] == {"min": 32, "median": 32.0, "max": 32}
    assert report["mean"] == [0.4914, 0.4822, 0.4465] and report["boxes"] is False


def test_imagefolder_unreadable_file(tmp_path: Path):
    root = make_imagefolder(tmp_path / "data", classes=2, train_per_class=3, test_per_class=2, size=12)
    bad = root / "test" / "class_1" / "0001.png"
    bad.write_bytes(b"not an image")
    report = inspect_dataset(f"imagefolder:{root}")
    assert [(p["kind"], p["where"]) for p in report["problems"]] == [("unreadable", str(bad))]
    assert report["splits"]["test"]["per_class"] == {"class_0": 2, "class_1": 2}
    assert report["original_sizes"]["images"] == 9 and report["stored_size"] == [12, 12]
    assert report["mean"] is None


def test_stanford_cars_missing_image(tmp_path: Path):
    root = write_cars(tmp_path / "cars")
    (root / "cars_train" / "00003.png").unlink()
    report = inspect_dataset(f"stanford-cars:{root}")
    assert report["problems"] == [{"kind": "missing-file", "where": str(root / "cars_train" / "00003.png"),
                                   "detail": "listed in cars_train_annos.mat but not there"}]
    assert report["splits"]["train"]["images"] == 3 and report["boxes"] is True and report["part_names"] == []


def test_digits_report():
    pytest.importorskip("sklearn")
    report = inspect_dataset("digits")
    assert {s: v["images"] for s, v in report["splits"].items()} == {"train": 1078, "val": 359, "test": 360}
    assert report["original_sizes"]["width"] == {"min": 8, "median": 8.0, "max": 8}
    assert report["stored_size"] == [16, 16] and report["problems"] == []


def test_json_help_names_every_problem_kind():
    from nasxserve.cli.data import JSON_HELP
    for key in KEYS:
        assert key in JSON_HELP, key
    for kind in PROBLEM_KINDS:
        assert kind in JSON_HELP, kind
