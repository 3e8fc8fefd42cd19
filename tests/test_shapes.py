"""The generated ``shapes`` dataset: determinism, the ground-truth part boxes, the distractors, the folder
written by ``nasx data shapes`` and read back by ``--data shapes:PATH``, and its errors."""
from __future__ import annotations

import inspect
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import snapshot

torch = pytest.importorskip("torch")

from nasxserve.cli.data import shapes as shapes_command  # noqa: E402
from nasxserve.data import load_dataset  # noqa: E402
from nasxserve.data.base import channel_stats  # noqa: E402
from nasxserve.data.inspect import inspect_dataset  # noqa: E402
from nasxserve.data.shapes import (COLOUR_JITTER, COLOURS, GAP, SHAPES, ShapesConfig, generate,  # noqa: E402
                                   generate_dataset, generate_split, glyph_mask, write_shapes)
from nasxserve.errors import ConfigError, DataError  # noqa: E402
from nasxserve.training.config_loading import load_config  # noqa: E402
from nasxserve.training.presets import CPU_SHAPES, PRESETS, preset_overrides  # noqa: E402

SMALL = ShapesConfig(classes=4, train_per_class=6, val_per_class=3, test_per_class=4, seed=3)
# more classes than shapes (a second diagonal of the shape x colour grid), the most clutter, crowded images
BUSY = ShapesConfig(classes=11, train_per_class=20, val_per_class=0, test_per_class=10, image_size=24, part_size=5,
                    distractors=4, clutter=1.0, seed=7)


@pytest.fixture(scope="module", params=["default", "busy"])
def generated(request) -> tuple[ShapesConfig, dict]:
    config = ShapesConfig() if request.param == "default" else BUSY
    return config, generate(config)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SMALL written by write_shapes; read-only (copy it to damage it)."""
    return write_shapes(SMALL, tmp_path_factory.mktemp("shapes") / "small")


@pytest.fixture
def damaged(written: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(written, tmp_path / "copy"))


def arrays(splits: dict) -> dict[str, np.ndarray]:
    return {f"{name}.{field}": getattr(s, field) for name, s in splits.items()
            for field in ("images", "labels", "boxes", "distractor_boxes", "distractor_kinds")}


# ============================================================================ generation

def test_same_seed_same_images_other_seed_or_count_changes_only_what_it_should():
    first, again = arrays(generate(SMALL)), arrays(generate(SMALL))
    assert first.keys() == again.keys()
    for key in first:
        assert first[key].tobytes() == again[key].tobytes(), key
    other = generate(replace(SMALL, seed=4))
    for split in ("train", "val", "test"):
        assert not np.array_equal(other[split].images, first[f"{split}.images"])
        assert not np.array_equal(other[split].boxes, first[f"{split}.boxes"])
    # every image has its own stream: more test images leave train and the first test images as they were
    more = generate(replace(SMALL, test_per_class=5))
    assert np.array_equal(more["train"].images, first["train.images"])
    assert np.array_equal(more["test"].images[:4], first["test.images"][:4])


def test_every_class_in_every_split_with_the_configured_counts(generated):
    config, splits = generated
    assert list(splits) == list(config.counts())
    for name, s in splits.items():
        n = config.counts()[name]
        assert s.images.shape == (config.classes * n, 3, config.image_size, config.image_size)
        assert s.labels.tolist() == [k for k in range(config.classes) for _ in range(n)]
        assert s.distractor_boxes.shape == (len(s.labels), config.distractors, 4)


def test_glyph_masks_touch_all_four_sides():
    for size in (5, 8, 11, 16):
        for shape in SHAPES:
            m = glyph_mask(shape, size)
            assert m[0].any() and m[-1].any() and m[:, 0].any() and m[:, -1].any(), (shape, size)
            assert 0.2 < m.mean() <= 1.0, (shape, size)
    masks = {s: glyph_mask(s, 8).tobytes() for s in SHAPES}
    assert len(set(masks.values())) == len(SHAPES)


def test_part_box_holds_exactly_the_class_glyph(generated):
    """Inside the box: the class glyph's mask in its colour (never farther than the jitter from it), and no
    other glyph's pixel; the mask touches every side of the box, so the box is tight."""
    config, splits = generated
    glyphs, p = config.class_glyphs(), config.part_size
    for s in splits.values():
        assert np.all(s.boxes[:, 2:] - s.boxes[:, :2] == p)
        assert s.boxes.min() >= 0 and s.boxes.max() <= config.image_size
        for image, label, (x0, y0, x1, y1) in zip(s.images, s.labels, s.boxes):
            glyph = glyphs[label]
            patch = image[:, y0:y1, x0:x1].astype(np.int64)                       # (3, p, p)
            near = np.abs(patch - np.array(glyph.rgb)[:, None, None]).max(axis=0) <= COLOUR_JITTER
            assert np.array_equal(near, glyph_mask(glyph.shape, p))
            # the rest of the box is grey background: no pixel of a saturated distractor glyph
            spread = patch.max(axis=0) - patch.min(axis=0)
            assert spread[~near].max(initial=0) < 60


def test_distractors_keep_clear_of_the_part_box_and_of_each_other(generated):
    config, splits = generated
    for s in splits.values():
        boxes = np.concatenate([s.boxes[:, None], s.distractor_boxes], axis=1)   # (N, 1 + D, 4)
        a, b = boxes[:, :, None], boxes[:, None, :]
        apart = ((a[..., 0] >= b[..., 2] + GAP) | (b[..., 0] >= a[..., 2] + GAP)
                 | (a[..., 1] >= b[..., 3] + GAP) | (b[..., 1] >= a[..., 3] + GAP))
        off_diagonal = ~np.eye(1 + config.distractors, dtype=bool)
        assert apart[:, off_diagonal].all()
        assert boxes.min() >= 0 and boxes.max() <= config.image_size


def test_distractor_pool_is_shared_and_cannot_tell_the_class(generated):
    config, splits = generated
    glyphs, pool = config.class_glyphs(), config.distractor_pool()
    assert len(set(glyphs)) == config.classes and not set(glyphs) & set(pool)
    assert len(pool) == len(SHAPES) * len(COLOURS) - config.classes
    for g in glyphs:   # each class's shape and colour also appear in distractors that are not the class
        assert any(d.shape == g.shape for d in pool) and any(d.colour == g.colour for d in pool)
    train = splits["train"]
    classes_per_kind = [set(train.labels[np.any(train.distractor_kinds == j, axis=1)].tolist())
                        for j in range(len(pool))]
    assert all(len(c) > 1 for c in classes_per_kind)
    if config == ShapesConfig():   # enough draws to see that each class meets every kind about equally often
        counts = np.stack([np.bincount(train.distractor_kinds[train.labels == k].ravel(), minlength=len(pool))
                           for k in range(config.classes)])
        expected = config.train_per_class * config.distractors / len(pool)
        assert counts.min() >= 1
        assert np.abs(counts - expected).max() < 5 * np.sqrt(expected)


def test_options_out_of_range_are_refused():
    for bad, match in [({"classes": 57}, "classes must be in 2..56"), ({"image_size": 30}, "multiple of 4"),
                       ({"part_size": 17}, "part_size must be in 5..16"), ({"distractors": 5}, "do not fit"),
                       ({"clutter": 1.5}, "clutter"), ({"seed": -1}, "seed"),
                       ({"classes": 6.0}, "classes must be an integer"),
                       ({"test_per_class": 0}, "test_per_class")]:
        with pytest.raises(ConfigError, match=match):
            ShapesConfig(**bad).validate()


# ============================================================================ datasets

def test_default_dataset_from_the_registry():
    d = load_dataset("shapes")
    assert d.name == "shapes" and d.part_boxes and d.summary()["part_boxes"] is True
    assert d.classes == ["red-triangle", "green-circle", "blue-square", "yellow-diamond", "magenta-plus", "cyan-cross"]
    assert (len(d.train), len(d.val), len(d.test)) == (1200, 300, 300)
    assert tuple(d.train.images.shape[1:]) == (3, 32, 32)
    for s in (d.train, d.val, d.test):
        assert torch.bincount(s.labels).tolist() == [len(s) // 6] * 6
    assert (d.mean, d.std) == channel_stats(d.train.images.numpy())
    expected = generate_split(ShapesConfig(), "test")
    assert np.array_equal(d.test.images.numpy(), expected.images)
    assert np.array_equal(d.test.boxes, expected.boxes.astype(np.float32))


def test_written_folder_reads_back_as_the_generated_dataset(written: Path):
    assert (written / "shapes.json").is_file() and (written / "parts.csv").is_file()
    assert len(list(written.glob("train/red-triangle/*.png"))) == 6
    assert len(list(written.glob("test/*/*.png"))) == 16
    on_disk, in_memory = load_dataset(f"shapes:{written}"), generate_dataset(SMALL)
    assert on_disk.source == str(written.resolve()) and on_disk.part_boxes
    assert on_disk.classes == in_memory.classes == ["red-triangle", "green-circle", "blue-square", "yellow-diamond"]
    assert (on_disk.mean, on_disk.std) == (in_memory.mean, in_memory.std)
    for split in ("train", "val", "test"):
        a, b = getattr(on_disk, split), getattr(in_memory, split)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels), split
        assert np.array_equal(a.boxes, b.boxes) and a.boxes.dtype == np.float32, split
    # resizing moves the boxes with the pixels
    doubled = load_dataset(f"shapes:{written}", image_size=64)
    assert np.array_equal(doubled.test.boxes, in_memory.test.boxes * 2)


def test_same_options_write_the_same_bytes(written: Path, tmp_path: Path):
    again = write_shapes(SMALL, tmp_path / "again")
    assert snapshot(again) == snapshot(written)
    meta = json.loads((written / "shapes.json").read_text())
    assert meta["format_version"] == 1 and meta["options"] == SMALL.__dict__
    assert meta["classes"][0] == {"label": 0, "name": "red-triangle", "shape": "triangle", "colour": "red",
                                  "rgb": list(COLOURS["red"])}
    assert (written / "parts.csv").read_text().splitlines()[:2] == [
        "split,path,label,x0,y0,x1,y1",
        "train,train/red-triangle/00000.png,0," + ",".join(str(v) for v in generate(SMALL)["train"].boxes[0])]


def test_no_validation_split_when_asked(tmp_path: Path):
    config = ShapesConfig(classes=2, train_per_class=3, val_per_class=0, test_per_class=2)
    d = load_dataset(f"shapes:{write_shapes(config, tmp_path / 'noval')}")
    assert d.val is None and (len(d.train), len(d.test)) == (6, 4)


def test_crop_to_the_part_box_is_refused():
    with pytest.raises(DataError, match="crop: none"):
        load_dataset("shapes", crop="bbox")


def edit_row(folder: Path, line: int, column: str, value: str) -> None:
    """Set ``column`` of parts.csv's ``line`` (1-based, the header is line 1) to ``value``."""
    path = folder / "parts.csv"
    lines = path.read_text().splitlines()
    cells = lines[line - 1].split(",")
    cells[["split", "path", "label", "x0", "y0", "x1", "y1"].index(column)] = value
    lines[line - 1] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("damage,messages", [
    (lambda f: (f / "parts.csv").unlink(), ["has no parts.csv", "--seed 3 --force"]),
    (lambda f: (f / "shapes.json").unlink(), ["has no shapes.json"]),
    (lambda f: (f / "shapes.json").write_text("{not json"), ["cannot read", "--force"]),
    (lambda f: (f / "shapes.json").write_text('{"format_version": 2}'), ["format version 2", "reads version 1"]),
    (lambda f: (f / "parts.csv").write_text("a,b\n"), ["must start with the header split,path,label,x0,y0,x1,y1"]),
    (lambda f: (f / "train" / "red-triangle" / "00002.png").unlink(),
     ["00002.png: no such file", "nasx data shapes", "--classes 4", "--seed 3 --force"]),
    (lambda f: edit_row(f, 3, "x1", "40"), ["parts.csv:3: box (", "is not a non-empty box inside the 32x32 image"]),
    (lambda f: edit_row(f, 4, "label", "9"), ["parts.csv:4: label 9 is outside 0..3"]),
    (lambda f: edit_row(f, 5, "path", "../elsewhere.png"), ["parts.csv:5: path '../elsewhere.png' must be relative"]),
    (lambda f: edit_row(f, 6, "split", "holdout"), ["parts.csv:6: split 'holdout' is not one of train, val, test"]),
    (lambda f: edit_row(f, 7, "y0", "a"), ["parts.csv:7: label, x0, y0, x1 and y1 must be integers"]),
])
def test_a_damaged_folder_is_refused_with_what_to_do(damaged: Path, damage, messages):
    damage(damaged)
    with pytest.raises(DataError) as e:
        load_dataset(f"shapes:{damaged}")
    for m in messages:
        assert m in str(e.value), str(e.value)


def test_a_missing_folder_says_how_to_write_one(tmp_path: Path):
    with pytest.raises(DataError, match=f"does not exist; write one with `nasx data shapes {tmp_path / 'none'}`"):
        load_dataset(f"shapes:{tmp_path / 'none'}")


def test_inspect_reports_the_rows_a_load_would_stop_at(damaged: Path):
    edit_row(damaged, 3, "x1", "40")
    (damaged / "test" / "blue-square" / "00001.png").write_bytes(b"not a png")
    report = inspect_dataset(f"shapes:{damaged}")
    assert [(p["kind"], Path(p["where"]).name) for p in report["problems"]] == [("bad-box", "parts.csv:3"),
                                                                                ("unreadable", "00001.png")]
    assert report["splits"]["train"]["images"] == 23 and report["boxes"] is True


def test_presets_for_shapes():
    cpu = preset_overrides("cpu", "shapes")
    assert cpu == preset_overrides("cpu", "shapes:/data/s")
    assert (cpu["search"], cpu["retrain"]) == (CPU_SHAPES["search"], CPU_SHAPES["retrain"])
    assert cpu["search"]["subset"] == 600 and "data" not in cpu          # no augmentation
    assert preset_overrides("paper", "shapes")["data"] == {"batch_size": 64}


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("spec", ["digits", "shapes", "cifar10", "imagefolder:/x", "cub200"])
def test_every_preset_trains_the_papers_method_and_only_a_named_extension_is_on(preset, spec):
    cfg = load_config(None, {"data": {"spec": spec}, "preset": preset})
    assert cfg.extensions.enabled == []
    named = load_config(None, {"data": {"spec": spec}, "preset": preset,
                               "extensions": {"enabled": ["deletion-cost", "box-calibration"]}})
    assert named.extensions.enabled == ["deletion-cost", "box-calibration"] and named.extensions.deletion_cost == 2.0


def test_shapes_cpu_preset_retrains_on_a_2px_grid():
    cfg = load_config(None, {"data": {"spec": "shapes"}})
    assert (cfg.search.reductions, cfg.retrain.reductions) == (1, 1)
    assert (cfg.retrain.epochs_joint, cfg.retrain.epochs_finetune) == (14, 6)


def test_configs_written_before_the_extensions_section_keep_their_meaning():
    old = load_config(None, {"data": {"spec": "shapes"}, "retrain": {"deletion_cost": 0.5, "epochs_joint": 3},
                             "projection": {"box_calibration": True, "last_layer_passes": 4}})
    assert old.extensions.enabled == ["deletion-cost", "box-calibration"] and old.extensions.deletion_cost == 0.5
    assert (old.retrain.epochs_joint, old.projection.last_layer_passes) == (3, 4)
    papers = load_config(None, {"retrain": {"deletion_cost": 0.0}, "projection": {"box_calibration": False}})
    assert papers.extensions.enabled == []
    with pytest.raises(ConfigError, match="ProtoPNet"):      # an old baseline config asking for them is refused
        load_config(None, {"method": "protopnet", "retrain": {"deletion_cost": 1.0}})


# ============================================================================ command line

def test_cli_writes_inspects_and_refuses_to_overwrite(nasx, tmp_path: Path):
    out = tmp_path / "out"
    args = ["data", "shapes", out, "--classes", "3", "--train-per-class", "4", "--val-per-class", "2",
            "--test-per-class", "2", "--image-size", "24", "--part-size", "6", "--distractors", "2",
            "--clutter", "0.25", "--seed", "5"]
    r = nasx(*args)
    assert r.returncode == 0, r.stderr
    assert f"nasx train --data shapes:{out}" in r.stdout
    config = ShapesConfig(classes=3, train_per_class=4, val_per_class=2, test_per_class=2, image_size=24,
                          part_size=6, distractors=2, clutter=0.25, seed=5)
    assert json.loads((out / "shapes.json").read_text())["options"] == config.__dict__

    r = nasx("data", "inspect", f"shapes:{out}", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["problems"] == [] and report["dataset"] == "shapes" and report["boxes"] is True
    assert {s: v["images"] for s, v in report["splits"].items()} == {"train": 12, "val": 6, "test": 6}
    assert report["stored_size"] == [24, 24] and report["classes"][2] == "blue-square"

    before = snapshot(out)
    r = nasx(*args[:-1], "6")
    assert r.returncode == 2 and "already exists and is not empty; pass --force" in r.stderr
    assert snapshot(out) == before
    r = nasx(*args[:-1], "6", "--force")
    assert r.returncode == 0, r.stderr
    assert snapshot(out) != before and json.loads((out / "shapes.json").read_text())["options"]["seed"] == 6

    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # no temporary folders left


def test_force_replaces_only_a_shapes_dataset_and_bad_options_write_nothing(tmp_path: Path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a shapes dataset"):
        write_shapes(SMALL, other, force=True)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    with pytest.raises(ConfigError, match="do not fit"):
        write_shapes(replace(SMALL, distractors=9), tmp_path / "bad")
    empty = tmp_path / "empty"
    empty.mkdir()
    write_shapes(SMALL, empty)                       # an empty folder is simply filled
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "mine"]


def test_help_states_the_real_defaults():
    options = inspect.signature(shapes_command).parameters
    for name, value in ShapesConfig().__dict__.items():
        assert f"default: {value}" in options[name].default.help, name
