"""The torch-free runtime on a real bundle: loading refuses damaged bundles, images are prepared as
in training, awkward images get a right answer or a clear error, and the CLI and the manual's
embedding example (docs/export.md) give the runtime's answers."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, make_imagefolder, write_manifest

from nasxserve.errors import BundleError, ImageError
from nasxserve.imaging import MAX_PIXELS, normalize, open_image, resize_to, to_model_mode, to_uint8_chw
from nasxserve.runtime import load_bundle
from nasxserve.runtime.bundle import same_patch_groups


@pytest.fixture(scope="module")
def bundle(digits_bundle: Path):
    return load_bundle(digits_bundle, "cpu")


@pytest.fixture
def bundle_copy(digits_bundle: Path, tmp_path: Path) -> Path:
    out = tmp_path / "bundle"
    shutil.copytree(digits_bundle, out)
    return out


def _logits(bundle, source) -> np.ndarray:
    return bundle.run(bundle.prepare([source]).x)["logits"][0]


# ============================================================================ no torch

def test_runtime_imports_and_predicts_without_torch(digits_bundle: Path, digit_pngs: list[Path]):
    code = ("import sys, json; import nasxserve.runtime as rt; "
            f"b = rt.load_bundle({str(digits_bundle)!r}); "
            f"r = b.explain([{str(digit_pngs[0])!r}]); "
            "print(json.dumps({'torch': sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')), "
            "'class': r[0]['predictions'][0]['class']}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["torch"] == []
    assert result["class"] in [str(i) for i in range(10)]


def test_the_cli_predicts_and_verifies_where_torch_cannot_be_imported(digits_bundle: Path, digit_pngs, env,
                                                                     tmp_path: Path):
    shadow = tmp_path / "shadow" / "torch"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('torch is not installed here')\n")
    env = dict(env, PYTHONPATH=str(shadow.parent))
    run = lambda *args: subprocess.run([sys.executable, "-m", "nasxserve", *map(str, args)],  # noqa: E731
                                       capture_output=True, text=True, env=env, timeout=120)
    r = run("predict", digits_bundle, digit_pngs[0], "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["predictions"]
    r = run("verify", digits_bundle, "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["ok"] and report["onnx_vs_stored_pytorch"]["ok"]
    assert report["live_pytorch"].startswith("skipped: torch is not installed")


# ============================================================================ damaged bundles

def test_a_changed_byte_in_the_onnx_model_is_refused(bundle_copy: Path):
    data = bytearray((bundle_copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle_copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.onnx does not match its sha256"):
        load_bundle(bundle_copy)


def test_a_missing_file_is_refused(bundle_copy: Path):
    (bundle_copy / "prototypes" / "0003_context.png").unlink()
    with pytest.raises(BundleError, match=r"prototypes/0003_context\.png is missing"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize("version, fragment", [(99, "version 99 is not supported.*upgrade nasx"),
                                               (0, "version 0 is not supported.*re-export"),
                                               ("1", "version '1' is not supported")])
def test_an_unknown_format_version_is_refused(bundle_copy: Path, version, fragment: str):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["format_version"] = version
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=fragment):
        load_bundle(bundle_copy)


def test_a_manifest_that_does_not_parse_is_refused(bundle_copy: Path):
    text = (bundle_copy / "manifest.json").read_text()
    (bundle_copy / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(BundleError, match=r"manifest\.json does not parse as JSON"):
        load_bundle(bundle_copy)


def test_a_folder_that_is_no_bundle_is_refused(tmp_path: Path):
    with pytest.raises(BundleError, match="not a nasx bundle: manifest.json is missing; a bundle is the folder"):
        load_bundle(tmp_path)
    with pytest.raises(BundleError, match="is not a folder"):
        load_bundle(tmp_path / "nowhere")
    run = tmp_path / "run"                          # what nasx train writes: says how to get a bundle from it
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("data: {}\n")
    with pytest.raises(BundleError, match=re.escape(f"looks like a training run: make a bundle of it with "
                                                    f"`nasx export {run} -o BUNDLE`")):
        load_bundle(run)


def test_a_file_listed_outside_the_bundle_is_refused(bundle_copy: Path):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["files"]["../secret"] = {"sha256": "0" * 64, "bytes": 0}
    write_manifest(bundle_copy, manifest)
    with pytest.raises(BundleError, match="outside the bundle"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize("damage, fragment", [
    ("flip", "model.onnx does not match its sha256"),
    ("version", "format version 7 is not supported"),
])
def test_nasx_verify_names_the_problem(damage: str, fragment: str, bundle_copy: Path, nasx):
    if damage == "flip":
        data = bytearray((bundle_copy / "model.onnx").read_bytes())
        data[100] ^= 0xFF
        (bundle_copy / "model.onnx").write_bytes(bytes(data))
    else:
        manifest = json.loads((bundle_copy / "manifest.json").read_text())
        manifest["format_version"] = 7
        (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    r = nasx("verify", bundle_copy)
    assert r.returncode == 2
    assert fragment in r.stderr and "Traceback" not in r.stderr


def test_nasx_verify_passes_a_good_bundle(digits_bundle: Path, nasx):
    r = nasx("verify", digits_bundle, "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["ok"] and report["checksums"] == "ok" and report["provider"] == "CPUExecutionProvider"
    assert report["onnx_vs_stored_pytorch"]["images"] == 12
    assert set(report["live_pytorch"]) == {"onnx"} and report["live_pytorch"]["onnx"]["ok"]
    assert set(report["torch_files"]) == {"torchscript", "pt2"}       # hash-checked, not unpickled
    r = nasx("verify", digits_bundle, "--json", "--trust-torch-files")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert set(report["live_pytorch"]) == {"onnx", "torchscript", "pt2"}
    assert all(a["ok"] for a in report["live_pytorch"].values())


def test_nasx_verify_flags_a_prototype_shown_with_a_class_it_does_not_support(bundle_copy: Path, nasx):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    good = nasx("verify", bundle_copy, "--json")
    assert good.returncode == 0 and json.loads(good.stdout)["prototype_labels"] == {"ok": True, "mislabelled": []}
    proto = manifest["prototypes"][3]
    proto["class_index"] = (proto["class_index"] + 1) % len(manifest["classes"])   # relabelled, weights unchanged
    write_manifest(bundle_copy, manifest)
    r = nasx("verify", bundle_copy, "--json")
    assert r.returncode == 2 and "failed verification" in r.stderr and "Traceback" not in r.stderr
    report = json.loads(r.stdout)
    assert report["prototype_labels"] == {"ok": False, "mislabelled": [3]} and not report["ok"]


def test_verify_catches_a_model_that_no_longer_matches_pytorch(bundle_copy: Path):
    """Shift the recorded PyTorch logits by 1e-3: verify must fail on logits alone and report the largest
    difference, which is 1e-3 give or take the bundle's own ONNX/PyTorch difference (at most the 1e-4
    tolerance it passed with)."""
    import hashlib
    import re
    assert load_bundle(bundle_copy).verify().ok
    with np.load(bundle_copy / "parity.npz") as data:
        arrays = dict(data)
    arrays["logits"] = arrays["logits"] + 1e-3
    np.savez(bundle_copy / "parity.npz", **arrays)
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    digest = hashlib.sha256((bundle_copy / "parity.npz").read_bytes()).hexdigest()
    manifest["files"]["parity.npz"]["sha256"] = digest
    write_manifest(bundle_copy, manifest)
    a = load_bundle(bundle_copy).verify()
    assert not a.ok and len(a.failures()) == 1
    found = re.fullmatch(r"logits differ by up to (\S+), (\S+)x the tolerance", a.failures()[0])
    assert found and abs(float(found.group(1)) - 1e-3) <= 1e-4 + 5e-6, a.failures()   # + the message's rounding
    assert float(found.group(2)) > 1.0


# ============================================================================ preprocessing

def test_preprocessing_equals_the_torchvision_pipeline(tmp_path: Path):
    T = pytest.importorskip("torchvision.transforms")
    rng = np.random.default_rng(0)
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    for i, (w, h) in enumerate([(37, 23), (32, 32), (8, 100), (300, 200)]):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        ours = normalize(to_uint8_chw(resize_to(to_model_mode(open_image(path), 3), 32, 24)), mean, std)
        pipeline = T.Compose([T.Resize((24, 32), interpolation=T.InterpolationMode.BILINEAR), T.ToTensor(),
                              T.Normalize(mean, std)])
        theirs = pipeline(Image.open(path).convert("RGB")).numpy()
        assert ours.shape == theirs.shape == (3, 24, 32)
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_preprocessing_equals_what_the_training_loader_feeds_the_model(tmp_path: Path):
    torch = pytest.importorskip("torch")
    from nasxserve.data import load_dataset
    root = make_imagefolder(tmp_path / "data", classes=2, train_per_class=3, test_per_class=2, size=12)
    data = load_dataset(f"imagefolder:{root}", 8)
    files = sorted((root / "train").glob("*/*.png"))
    x_train, _ = data.train.batch(torch.arange(len(files)))
    ours = np.stack([normalize(to_uint8_chw(resize_to(to_model_mode(open_image(p), 3), 8, 8)), data.mean, data.std)
                     for p in files])
    np.testing.assert_array_equal(ours, x_train.numpy())


# ============================================================================ awkward images

def test_grey_rgb_rgba_and_16_bit_versions_of_a_digit_get_the_same_answer(bundle, digit_pngs, tmp_path: Path):
    grey = np.asarray(Image.open(digit_pngs[0]))
    expected = _logits(bundle, digit_pngs[0])
    variants = {
        "rgb.png": Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2)),
        "rgba_opaque.png": Image.fromarray(np.dstack([grey, grey, grey, np.full_like(grey, 255)])),
        "la.png": Image.fromarray(np.dstack([grey, np.full_like(grey, 255)]), mode="LA"),
        "sixteen.png": Image.fromarray(grey.astype(np.uint16) * 257),
    }
    for name, img in variants.items():
        img.save(tmp_path / name)
        assert Image.open(tmp_path / name).mode in ("RGB", "RGBA", "LA", "I;16", "I"), name
        np.testing.assert_allclose(_logits(bundle, tmp_path / name), expected, atol=1e-5, err_msg=name)


def test_transparency_is_composited_over_white(bundle, digit_pngs, tmp_path: Path):
    grey = np.asarray(Image.open(digit_pngs[1])).copy()
    rgba = np.dstack([grey, grey, grey, np.full_like(grey, 255)])
    rgba[:, :4, 3] = 0                                  # left half transparent (its colour: whatever)
    rgba[:, :4, :3] = 7
    Image.fromarray(rgba).save(tmp_path / "t.png")
    white = grey.copy()
    white[:, :4] = 255
    Image.fromarray(white).save(tmp_path / "w.png")
    np.testing.assert_allclose(_logits(bundle, tmp_path / "t.png"), _logits(bundle, tmp_path / "w.png"), atol=1e-5)


def test_a_large_image_is_resized_and_classified(bundle, digit_pngs, tmp_path: Path):
    big = Image.open(digit_pngs[2]).resize((6000, 6000), Image.NEAREST)
    big.save(tmp_path / "big.png")
    big.resize((8, 8), Image.BILINEAR).save(tmp_path / "small.png")
    result = bundle.explain([tmp_path / "big.png"], top_prototypes=3)[0]
    small = bundle.explain([tmp_path / "small.png"], top_prototypes=3)[0]
    assert result["image"] == {"width": 6000, "height": 6000}
    assert result["predictions"] == small["predictions"]
    for ev_big, ev_small in zip(result["explanations"][0]["evidence"], small["explanations"][0]["evidence"]):
        assert ev_big["box"] == [v * 750 for v in ev_small["box"]]    # 6000 / 8


@pytest.mark.parametrize("make, fragment", [
    (lambda p: p.write_text("hello, I am not an image"), "not an image"),
    (lambda p: p.write_bytes(_png_bytes()[:-40]), "damaged or truncated"),
    (lambda p: Image.new("L", (1, 1)).save(p), "1x1 pixels is too small"),
    (lambda p: Image.new("F", (16, 16)).save(p.with_suffix(".tif")) or p.with_suffix(".tif").rename(p),
     "floating-point images are not supported"),
])
def test_unusable_images_get_a_clear_error(bundle, tmp_path: Path, make, fragment: str):
    path = tmp_path / "bad.png"
    make(path)
    with pytest.raises(ImageError, match=fragment):
        bundle.predict([path])
    assert fragment in bundle.predict([path], errors="report")[0]["error"]


def test_too_many_pixels_are_refused_before_decoding(tmp_path: Path):
    side = int(MAX_PIXELS ** 0.5) + 10
    path = tmp_path / "huge.png"
    Image.new("L", (side, side)).save(path, compress_level=1)
    with pytest.raises(ImageError, match="megapixels; the limit is 64"):
        open_image(path)


def _png_bytes() -> bytes:
    import io
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_reported_errors_keep_the_order_of_the_images(bundle, digit_pngs, tmp_path: Path):
    (tmp_path / "bad.png").write_text("no")
    results = bundle.predict([digit_pngs[0], tmp_path / "bad.png", digit_pngs[1]], errors="report")
    assert "predictions" in results[0] and "error" in results[1] and "predictions" in results[2]
    alone = bundle.predict([digit_pngs[1]])[0]
    assert [p["index"] for p in results[2]["predictions"]] == [p["index"] for p in alone["predictions"]]
    assert [p["logit"] for p in results[2]["predictions"]] == pytest.approx([p["logit"] for p in alone["predictions"]],
                                                                             abs=1e-5)


# ============================================================================ explanations

def test_explanations_add_up_to_the_logit_and_boxes_are_in_the_callers_pixels(bundle, digit_pngs, tmp_path):
    big = Image.open(digit_pngs[3]).resize((40, 24), Image.BILINEAR)
    big.save(tmp_path / "wide.png")
    result = bundle.explain([tmp_path / "wide.png"], top_k=3, top_prototypes=20)[0]
    assert len(result["explanations"]) == 3
    for cls in result["explanations"]:
        assert cls["evidence_total"] == pytest.approx(cls["logit"], abs=1e-4)
        contributions = [ev["contribution"] for ev in cls["evidence"]]
        assert contributions == sorted(contributions, reverse=True)
        assert sum(contributions) == pytest.approx(cls["logit"], abs=1e-4)     # all 20 prototypes shown
        for ev in cls["evidence"]:
            x0, y0, x1, y1 = ev["box"]
            assert 0 <= x0 < x1 <= 40 and 0 <= y0 < y1 <= 24
            assert ev["contribution"] == pytest.approx(ev["weight"] * ev["similarity"], rel=1e-6)


def test_source_view_follows_the_rule_and_says_when_it_cannot():
    from nasxserve.contracts import PrototypeEntry
    from nasxserve.runtime.bundle import source_view
    source = {"split": "train", "index": 3, "latent_position": [0, 1], "box": [0, 0, 4, 4],
              "distance_at_projection": 0.0, "class_before_projection": 0}
    old = {"id": 0, "class_index": 0, "class": "0", "weight": 1.0, "source": source, "box_offset": [0, 0],
           "patch": "prototypes/0000.png", "context": "prototypes/0000_context.png"}
    from nasxserve.regions import EVIDENCE_RULE_VERSION
    drawn = {"evidence_box": [2, 1, 5, 3], "evidence_rule_version": EVIDENCE_RULE_VERSION}
    new = old | {"source": source | drawn, "evidence_patch": "prototypes/0000_evidence.png",
                 "evidence_context": "prototypes/0000_evidence_context.png"}
    view = source_view(PrototypeEntry.model_validate(new), "evidence")
    assert (view.regions, view.box, view.patch) == ("evidence", [2, 1, 5, 3], "prototypes/0000_evidence.png")
    view = source_view(PrototypeEntry.model_validate(new), "activation")
    assert (view.regions, view.box, view.context) == ("activation", [0, 0, 4, 4], "prototypes/0000_context.png")
    # a bundle exported before source images had evidence boxes: ProtoPNet's box, named as such
    view = source_view(PrototypeEntry.model_validate(old), "evidence")
    assert (view.regions, view.box, view.patch) == ("activation", [0, 0, 4, 4], "prototypes/0000.png")
    # boxes an older version of the evidence rule drew (none recorded, or another number): not shown as this rule's
    for version in (None, EVIDENCE_RULE_VERSION - 1):
        older = new | {"source": source | drawn | {"evidence_rule_version": version}}
        view = source_view(PrototypeEntry.model_validate(older), "evidence")
        assert (view.regions, view.box, view.patch) == ("activation", [0, 0, 4, 4], "prototypes/0000.png")


def test_the_figure_says_when_training_patches_are_boxed_by_another_rule():
    from nasxserve.explain.figure import _source_note
    same = {"regions": "evidence"}
    assert _source_note(same, [{"source_regions": "evidence"}, {"source_regions": "evidence"}]) == ""
    assert "where the similarity map peaks" in _source_note(same, [{"source_regions": "activation"}])
    assert _source_note({"regions": "activation"}, [{"source_regions": "activation"}]) == ""


def test_the_figure_caption_is_wrapped_to_the_figure_and_keeps_every_word():
    from nasxserve.explain.figure import REGION_CAPTIONS, _font, _source_note, wrapped
    font = _font(13)
    text = REGION_CAPTIONS["evidence"] + _source_note({"regions": "evidence"}, [{"source_regions": "activation"}])
    lines = wrapped(text, font, 300)
    assert len(lines) >= 3 and " ".join(lines) == " ".join(text.split())
    assert all(font.getlength(line) <= 300 for line in lines)
    assert wrapped("a " + "x" * 80, font, 50) == ["a", "x" * 80]          # a word too wide keeps its own line


def test_same_patch_groups_by_hand():
    from nasxserve.contracts import PrototypeEntry

    def at(j, index, row, col):
        source = {"split": "train", "index": index, "latent_position": [row, col], "box": [0, 0, 1, 1],
                  "distance_at_projection": 0.0, "class_before_projection": 0}
        return PrototypeEntry.model_validate({"id": j, "class_index": 0, "class": "0", "weight": 1.0,
                                              "source": source, "box_offset": [0, 0], "patch": "p", "context": "c"})
    src = [(4, 1, 2), (4, 2, 1), (4, 1, 2), (7, 0, 0), (9, 1, 2), (4, 2, 1)]
    assert same_patch_groups([at(j, *s) for j, s in enumerate(src)]).tolist() == [0, 1, 0, 3, 4, 1]


def test_identical_prototypes_are_one_piece_of_evidence(digits_bundle: Path, bundle, digit_pngs):
    """Prototypes projected onto the same training patch are listed once, with their twins' ids, and carry the
    group's summed weight and contribution; every prototype is accounted for exactly once. (The twins are
    declared by hand on a second copy of the bundle, so that the sums can be checked against the ungrouped
    evidence of the first.)"""
    m = len(bundle.prototypes)
    assert len(set(bundle._group.tolist())) == len({(p.source.index, tuple(p.source.latent_position))
                                                     for p in bundle.prototypes})
    grouped = load_bundle(digits_bundle)
    grouped._group = np.arange(m)
    grouped._group[[3, 7]] = 1                      # 1, 3 and 7 one group; 5 and 6 another
    grouped._group[6] = 5
    plain = load_bundle(digits_bundle)
    plain._group = np.arange(m)
    cls = grouped.explain([digit_pngs[2]], top_prototypes=m)[0]["explanations"][0]
    single = {ev["prototype"]: ev for ev in plain.explain([digit_pngs[2]], top_prototypes=m)[0]["explanations"][0]
              ["evidence"]}
    listed = [ev["prototype"] for ev in cls["evidence"]]
    assert len(listed) == m - 3
    assert sorted(listed + [d for ev in cls["evidence"] for d in ev["duplicates"]]) == list(range(m))
    by_id = {ev["prototype"]: ev for ev in cls["evidence"]}
    assert by_id[1]["duplicates"] == [3, 7] and by_id[5]["duplicates"] == [6] and by_id[0]["duplicates"] == []
    for j, members in ((1, [1, 3, 7]), (5, [5, 6]), (0, [0])):
        assert by_id[j]["contribution"] == pytest.approx(sum(single[i]["contribution"] for i in members), rel=1e-6)
        assert by_id[j]["weight"] == pytest.approx(sum(single[i]["weight"] for i in members), rel=1e-6)
    contributions = [ev["contribution"] for ev in cls["evidence"]]
    assert contributions == sorted(contributions, reverse=True)
    assert sum(contributions) == pytest.approx(cls["logit"], abs=1e-4)


def test_a_digit_drawn_dark_on_light_is_called_inverted(digits_bundle: Path, bundle, digit_pngs, nasx, tmp_path):
    """The bundle records the training images' brightness; an input outside it whose negative fits gets a
    warning (in the result, and on stderr from the CLI), and the test digits get none."""
    spread = bundle.manifest.input.brightness
    assert 0 < spread.p1 <= spread.median <= spread.p99 < 0.5      # light strokes on a dark background
    assert all(r["warnings"] == [] for r in bundle.predict(digit_pngs))
    inverted = tmp_path / "inverted.png"
    with Image.open(digit_pngs[0]) as im:
        Image.fromarray(255 - np.asarray(im.convert("L"))).save(inverted)
    for result in (bundle.predict([inverted])[0], bundle.explain([inverted])[0]):
        assert len(result["warnings"]) == 1 and "looks inverted" in result["warnings"][0], result["warnings"]
    r = nasx("predict", digits_bundle, inverted)
    assert r.returncode == 0 and f"{inverted}: warning: the image looks inverted" in " ".join(r.stderr.split())


# ============================================================================ a broken ONNX Runtime install

def test_a_half_installed_onnxruntime_gets_the_one_line_fix(digits_bundle: Path, digit_pngs, tmp_path: Path, env):
    fake = tmp_path / "shadow" / "onnxruntime"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")            # the folder survives, the native module is gone
    env = dict(env, PYTHONPATH=str(fake.parent))
    r = subprocess.run([sys.executable, "-m", "nasxserve", "predict", str(digits_bundle), str(digit_pngs[0])],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    assert "ONNX Runtime cannot be used" in r.stderr
    assert "pip uninstall -y onnxruntime onnxruntime-gpu &&" in r.stderr and "pip install onnxruntime" in r.stderr
    assert "Traceback" not in r.stderr


# ============================================================================ CLI and the manual

def test_nasx_predict_json_equals_the_runtime(digits_bundle: Path, digit_pngs, bundle, nasx):
    r = nasx("predict", digits_bundle, *digit_pngs[:3], "--json", "--top-k", "2")
    assert r.returncode == 0, r.stderr
    printed = json.loads(r.stdout)
    expected = bundle.predict(digit_pngs[:3], top_k=2)
    assert [p["file"] for p in printed] == [str(p) for p in digit_pngs[:3]]
    assert [{k: v for k, v in p.items() if k != "file"} for p in printed] == expected


def test_nasx_predict_lists_refused_images_and_exits_2(digits_bundle: Path, digit_pngs, nasx, tmp_path: Path):
    (tmp_path / "notes.txt").write_text("not an image")
    r = nasx("predict", digits_bundle, digit_pngs[0], tmp_path / "notes.txt")
    assert r.returncode == 2
    assert "not an image" in r.stdout and "1 of 2 images could not be used" in r.stderr


def test_nasx_predict_errors_keep_the_whole_path_on_a_narrow_terminal(digits_bundle: Path, digit_pngs, env,
                                                                       tmp_path: Path):
    """A table squeezed into 40 columns cut a failed image's row to 'imgs/nothe…'; the failures are
    lines of their own, whole at any width (FORCE_COLOR makes rich draw for a terminal though stdout is a
    pipe)."""
    missing = tmp_path / "imgs" / "a-long-folder-name" / "nothere.png"
    proc = subprocess.run([sys.executable, "-m", "nasxserve", "predict", str(digits_bundle), str(digit_pngs[0]),
                           str(missing)], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env=dict(env, COLUMNS="40", FORCE_COLOR="1"))
    assert proc.returncode == 2, proc.stderr
    out = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", proc.stdout)
    reason = load_bundle(digits_bundle).predict([missing], errors="report")[0]["error"]    # names the file
    assert f"{missing}: error: {reason.removeprefix(f'{missing}: ')}" in out.splitlines(), out
    table = [line for line in out.splitlines() if line and line[0] in "┏┃┡│└"]
    assert table and max(map(len, table)) <= 40                                  # the table fits the terminal
    assert f"{digits_bundle} on ONNX Runtime" in out                             # and so does the bundle's path


def test_nasx_explain_writes_a_figure_and_json(digits_bundle: Path, digit_pngs, bundle, nasx, tmp_path: Path):
    fig = tmp_path / "fig.png"
    r = nasx("explain", digits_bundle, digit_pngs[4], "-o", fig, "--json", "-n", "3")
    assert r.returncode == 0, r.stderr
    printed = json.loads(r.stdout)
    assert printed["explanations"] == bundle.explain([digit_pngs[4]], top_prototypes=3)[0]["explanations"]
    with Image.open(fig) as im:
        assert im.format == "PNG" and im.width > 600 and im.height > 300
        pixels = np.asarray(im.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20          # drawn, not blank


def test_nasx_explain_table_adds_up_to_the_logit(digits_bundle: Path, digit_pngs, bundle, nasx):
    """The table ends, as the figure does, with the contribution of the prototypes it does not list, so that its
    contributions add up to the logit printed above it."""
    r = nasx("explain", digits_bundle, digit_pngs[4], "-n", "3")
    assert r.returncode == 0, r.stderr
    cls = bundle.explain([digit_pngs[4]], top_prototypes=3)[0]["explanations"][0]
    rest = cls["evidence_total"] - sum(ev["contribution"] for ev in cls["evidence"])
    row = next(line for line in r.stdout.splitlines() if "the others" in line)
    assert f"{rest:+.3f}" in row
    shown = [float(cell) for line in r.stdout.splitlines() for cell in line.split("│")[5:6]
             if cell.strip()[:1] in "+-" and "the others" not in line]
    assert len(shown) == 3
    assert sum(shown) + rest == pytest.approx(cls["logit"], abs=5e-3)


def test_nasx_explain_refuses_a_figure_name_that_is_not_png(digits_bundle: Path, digit_pngs, nasx, tmp_path: Path):
    notes = tmp_path / "notes.md"
    r = nasx("explain", digits_bundle, digit_pngs[4], "-o", notes)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: ") and "notes.md" in r.stderr and ".png" in r.stderr
    assert not notes.exists()


def test_the_manual_embedding_example_runs_and_agrees(digits_bundle: Path, digit_pngs, bundle, tmp_path: Path):
    page = (REPO / "docs" / "export.md").read_text()
    code = page.split("<!-- embed-example -->\n```python\n", 1)[1].split("```", 1)[0]
    assert "nasxserve" not in code
    script = tmp_path / "embed.py"
    script.write_text(code)
    for png in digit_pngs[:3]:
        r = subprocess.run([sys.executable, str(script), str(digits_bundle), str(png)], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        top = bundle.explain([png], top_prototypes=3)[0]["explanations"][0]
        assert lines[0] == f"class {top['class']} (logit {top['logit']:.3f})"
        assert [int(line.split()[1]) for line in lines[1:]] == [ev["prototype"] for ev in top["evidence"]]


def test_grey_images_are_replicated_for_rgb_models_and_rgb_converted_by_luma_for_grey_ones():
    grey = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 3, mode="L")
    rgb = to_uint8_chw(to_model_mode(grey, 3))
    assert rgb.shape == (3, 8, 8) and (rgb == rgb[0]).all() and (rgb[0] == np.asarray(grey)).all()
    colour = Image.fromarray(np.dstack([np.full((8, 8), 200), np.full((8, 8), 100),
                                        np.full((8, 8), 50)]).astype(np.uint8))
    luma = to_uint8_chw(to_model_mode(colour, 1))
    assert luma.shape == (1, 8, 8) and int(luma[0, 0, 0]) == round(200 * 0.299 + 100 * 0.587 + 50 * 0.114)


# ============================================================================ region rules

def test_the_runtime_draws_the_evidence_regions_nasx_evaluate_measures(digits_bundle: Path, bundle, digit_pngs):
    """The torch-free runtime and the PyTorch evaluation run the same rule (nasxserve.regions) on the same model."""
    import torch

    from nasxserve.explain.metrics import region_boxes_of
    from nasxserve.export.bundle import load_pytorch_model

    model = load_pytorch_model(digits_bundle).eval()
    for png in digit_pngs[:4]:
        cls = bundle.explain([png], top_prototypes=3)[0]["explanations"][0]
        ids = np.asarray([[ev["prototype"] for ev in cls["evidence"]]])
        x = torch.from_numpy(bundle.prepare([png]).x)
        with torch.no_grad():
            maps = model(x).protos.similarity_maps.numpy()
        assert [ev["box"] for ev in cls["evidence"]] == region_boxes_of(model, x, maps, ids, "evidence").tolist()[0]


def test_each_region_rule_is_named_in_the_answer_and_activation_keeps_protopnets_box(bundle, digit_pngs):
    from nasxserve.boxes import activation_boxes

    png = digit_pngs[5]
    answer = {rule: bundle.explain([png], top_prototypes=4, regions=rule)[0] for rule in ("evidence", "activation")}
    assert answer["evidence"]["regions"] == "evidence" and answer["activation"]["regions"] == "activation"
    evidence, activation = (answer[r]["explanations"][0]["evidence"] for r in ("evidence", "activation"))
    assert [e["prototype"] for e in evidence] == [e["prototype"] for e in activation]   # same evidence, other boxes
    out = bundle.run(bundle.prepare([png]).x)
    ids = [e["prototype"] for e in activation]
    assert [e["box"] for e in activation] == [list(b) for b in activation_boxes(out["similarity_maps"][0, ids],
                                                                                 (bundle.height, bundle.width))]
    with pytest.raises(ValueError, match="activation, evidence"):
        bundle.explain([png], regions="gradient")


def test_nasx_explain_names_its_region_rule_and_refuses_an_unknown_one(digits_bundle: Path, digit_pngs, nasx):
    r = nasx("explain", digits_bundle, digit_pngs[1], "--regions", "activation")
    assert r.returncode == 0 and "activation box (x0, y0, x1, y1)" in r.stdout
    r = nasx("explain", digits_bundle, digit_pngs[1], "--regions", "peaks")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "activation, evidence" in r.stderr
