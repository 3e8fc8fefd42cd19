"""``nasx data samples``: a few images of a split as PNG files, exactly as the loader holds them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from nasxserve.data import load_dataset


def test_samples_writes_the_first_images_of_each_class_as_the_model_sees_them(nasx, tmp_path: Path):
    out = tmp_path / "samples"
    r = nasx("data", "samples", "digits", "-o", out, "--per-class", "2")
    assert r.returncode == 0, r.stderr
    test = load_dataset("digits").test
    labels = test.labels.numpy()
    files = sorted(out.glob("*.png"))
    assert len(files) == 20
    expected = sorted(f"test-{i:05d}-{k}.png" for k in range(10) for i in np.flatnonzero(labels == k)[:2])
    assert [f.name for f in files] == expected
    for f in files[:3]:
        index = int(f.name.split("-")[1])
        with Image.open(f) as im:
            assert im.mode == "L" and im.size == (16, 16)
            np.testing.assert_array_equal(np.asarray(im), test.images[index, 0].numpy())


def test_samples_refuses_a_split_the_dataset_does_not_have(nasx, tmp_path: Path):
    r = nasx("data", "samples", "digits", "-o", tmp_path / "s", "--split", "holdout")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "--split" in r.stderr
    assert not (tmp_path / "s").exists()
