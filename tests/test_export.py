"""nasx export on a tiny trained run: the bundle's files, its self-description, and the agreement of
ONNX Runtime, TorchScript and torch.export with eager PyTorch."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import snapshot

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from nasxserve.errors import BundleError, RunDirError  # noqa: E402
from nasxserve.export.bundle import (export_bundle, load_pytorch_model, load_trained_run,  # noqa: E402
                                     torch_outputs)
from nasxserve.export.graph import InferenceNet, load_program, load_torchscript  # noqa: E402
from nasxserve.runtime import load_bundle  # noqa: E402
from nasxserve.runtime.format import ATOL, OUTPUT_NAMES, RTOL, sha256_file  # noqa: E402
from nasxserve.runtime.parity import compare  # noqa: E402


@pytest.fixture(scope="module")
def eager(trained_digits_run: Path) -> InferenceNet:
    return InferenceNet(load_trained_run(trained_digits_run).model)


@pytest.fixture(scope="module")
def real_x(trained_digits_run: Path) -> np.ndarray:
    from nasxserve.data import load_dataset
    data = load_dataset("digits", 8)
    return data.test.batch(torch.arange(17, 34))[0].numpy()      # not the images export checked


def _runners(bundle: Path) -> dict:
    b = load_bundle(bundle, "cpu")
    ts = load_torchscript(bundle / "model.ts")
    program = load_program(bundle / "model.pt2")
    return {"onnx": b.run, "torchscript": lambda x: torch_outputs(ts, x),
            "pt2": lambda x: torch_outputs(program, x)}


# ============================================================================ files and manifest

def test_bundle_holds_every_file_with_its_checksum(digits_bundle: Path):
    manifest = json.loads((digits_bundle / "manifest.json").read_text())
    m = len(manifest["prototypes"])
    expected = {"model.onnx", "model.ts", "model.pt2", "weights.safetensors", "config.json", "parity.npz"}
    expected |= {f"prototypes/{j:04d}{rule}{kind}.png" for j in range(m) for rule in ("", "_evidence")
                 for kind in ("", "_context")}
    on_disk = {str(p.relative_to(digits_bundle)) for p in digits_bundle.rglob("*") if p.is_file()}
    assert on_disk == expected | {"manifest.json"}
    assert set(manifest["files"]) == expected
    for rel, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(digits_bundle / rel)
        assert entry["bytes"] == (digits_bundle / rel).stat().st_size
    assert not list(digits_bundle.parent.glob(".bundle.*")), "temporary folders left behind"


def test_manifest_describes_inputs_outputs_and_prototypes(digits_bundle: Path, trained_digits_run: Path):
    manifest = json.loads((digits_bundle / "manifest.json").read_text())
    report = json.loads((trained_digits_run / "report.json").read_text())
    records = json.loads((trained_digits_run / "prototypes" / "records.json").read_text())["records"]
    assert manifest["format"] == "nasx-bundle" and manifest["format_version"] == 1
    assert manifest["name"] == "digits", "named after its dataset, so /v2/models/digits serves it"
    assert manifest["classes"] == [str(i) for i in range(10)]
    spec = manifest["input"]
    assert (spec["channels"], spec["height"], spec["width"], spec["color_mode"]) == (1, 8, 8, "L")
    assert spec["mean"] == report["data"]["mean"] and spec["std"] == report["data"]["std"]
    assert [o["name"] for o in manifest["outputs"]] == list(OUTPUT_NAMES)
    assert manifest["outputs"][4]["shape"] == ["batch", 20, 2, 2]
    assert manifest["genotype"] == report["genotype"] and manifest["metrics"]["test"] == report["test"]
    weight = np.asarray(manifest["last_layer"]["weight"])
    model = load_trained_run(trained_digits_run).model
    np.testing.assert_array_equal(weight, model.last_layer.weight.detach().double().numpy())
    for proto, rec in zip(manifest["prototypes"], records, strict=True):
        assert proto["id"] == rec["prototype"] and proto["class_index"] == rec["source_class"]
        assert proto["source"]["index"] == rec["sample"] and proto["source"]["box"] == rec["box_xyxy"]
        assert proto["weight"] == weight[rec["source_class"], rec["prototype"]]
        assert proto["source"]["evidence_box"] == rec["evidence_box_xyxy"]
        for rel in (proto["patch"], proto["context"], proto["evidence_patch"], proto["evidence_context"]):
            assert (digits_bundle / rel).read_bytes() == (trained_digits_run / rel).read_bytes()
        assert proto["evidence_patch"] == f"prototypes/{proto['id']:04d}_evidence.png"
    # every prototype supports the class it is shown with, and the counts are of those
    labels = np.asarray([p["class_index"] for p in manifest["prototypes"]])
    assert (weight.argmax(axis=0) == labels).all() and (weight[labels, np.arange(len(labels))] > 0).all()
    assert list(manifest["metrics"]["prototype_class_counts"].values()) == np.bincount(labels, minlength=10).tolist()


def test_onnx_file_is_self_describing_single_file_with_a_dynamic_batch(digits_bundle: Path):
    model = onnx.load(str(digits_bundle / "model.onnx"), load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    props = {p.key: json.loads(p.value) for p in model.metadata_props}
    manifest = json.loads((digits_bundle / "manifest.json").read_text())
    for key in ("format_version", "nasx_version", "classes", "input"):
        assert props[f"nasx.{key}"] == manifest[key]
    assert [o.name for o in model.graph.output] == list(OUTPUT_NAMES)
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value
    assert model.graph.output[3].type.tensor_type.elem_type == onnx.TensorProto.INT64


def test_export_reports_its_own_parity_check(digits_bundle: Path):
    export = json.loads((digits_bundle / "manifest.json").read_text())["export"]
    parity = export["parity"]
    assert set(parity) == {"onnx", "torchscript", "pt2"}
    for fmt, a in parity.items():
        assert a["ok"] and a["images"] == 2 * (1 + 3 + 17), fmt
        assert set(a["worst_vs_tolerance"]) == set(ATOL) and max(a["worst_vs_tolerance"].values()) <= 1.0, fmt
        assert all(a["max_abs"][k] <= ATOL[k] for k in ATOL), fmt    # a small model passes the absolute bound alone
    assert export["parity_rule"]["atol"] == ATOL and export["parity_rule"]["rtol"] == RTOL


# ============================================================================ parity on fresh inputs

@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "pt2"])
def test_format_agrees_with_eager_pytorch_on_real_and_random_images(fmt: str, digits_bundle: Path, eager, real_x):
    run = _runners(digits_bundle)[fmt]
    rand = np.random.default_rng(5).normal(size=(17, 1, 8, 8)).astype(np.float32)
    for x in (real_x, rand):
        a = compare(torch_outputs(eager, x), run(x))
        assert a.ok, (fmt, a.failures())
        assert a.top1_mismatches == 0 and a.patch_mismatches == 0


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "pt2"])
def test_batches_of_1_3_and_17_give_the_single_image_results(fmt: str, digits_bundle: Path, real_x):
    run = _runners(digits_bundle)[fmt]
    singles = [run(real_x[i:i + 1]) for i in range(17)]
    for b in (1, 3, 17):
        out = run(real_x[:b])
        assert out["logits"].shape == (b, 10) and out["similarity_maps"].shape == (b, 20, 2, 2)
        for i in range(b):
            a = compare(singles[i], {k: v[i:i + 1] for k, v in out.items()})
            assert a.ok, (fmt, b, i, a.failures())


def test_logits_are_exactly_the_weighted_sum_of_similarities(digits_bundle: Path, real_x):
    out = load_bundle(digits_bundle, "cpu").run(real_x)
    weight = np.asarray(json.loads((digits_bundle / "manifest.json").read_text())["last_layer"]["weight"])
    np.testing.assert_allclose(out["logits"], out["similarities"].astype(np.float64) @ weight.T, atol=1e-5)
    # the reported similarity is the best position's similarity map value
    flat = out["similarity_maps"].reshape(17, 20, -1)
    best = np.take_along_axis(flat, out["best_patch"][..., None], -1)[..., 0]
    np.testing.assert_allclose(best, out["similarities"], atol=ATOL["similarity_maps"])
    np.testing.assert_array_equal(flat.argmax(-1), out["best_patch"])


def test_weights_reload_without_pickle_into_the_same_model(digits_bundle: Path, eager, real_x):
    model = load_pytorch_model(digits_bundle)
    reloaded = torch_outputs(InferenceNet(model), real_x)
    original = torch_outputs(eager, real_x)
    for name in OUTPUT_NAMES:
        np.testing.assert_array_equal(reloaded[name], original[name])


# ============================================================================ refusing and atomicity

def test_export_refuses_an_unfinished_run(trained_digits_run: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(trained_digits_run, run)
    (run / "report.json").unlink()
    with pytest.raises(RunDirError, match="has not finished.*--resume"):
        export_bundle(run, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_export_refuses_to_overwrite_unless_forced(trained_digits_run: Path, tmp_path: Path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(BundleError, match="already exists.*--force"):
        export_bundle(trained_digits_run, out, formats=["onnx"])
    assert snapshot(out) == {"mine.txt": snapshot(out)["mine.txt"]}
    export_bundle(trained_digits_run, out, formats=["onnx"], force=True)
    assert not (out / "mine.txt").exists() and (out / "model.onnx").is_file()
    assert not (out / "model.ts").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_an_interrupted_export_leaves_nothing(trained_digits_run: Path, tmp_path: Path):
    def interrupt(message: str) -> None:
        if message.startswith("checking"):
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        export_bundle(trained_digits_run, tmp_path / "b", formats=["onnx"], step=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_a_run_whose_prototypes_vote_for_another_class(trained_digits_run: Path, tmp_path: Path):
    """h as a run trained before the last-layer fit left it: prototype 0 connected mostly to another class."""
    run = tmp_path / "run"
    shutil.copytree(trained_digits_run, run)
    ckpt = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    weight = ckpt["model"]["last_layer.weight"]
    own = int(ckpt["model"]["prototype_layer.prototype_class"][0])
    weight[(own + 1) % weight.shape[0], 0] = weight[:, 0].max() + 1.0
    torch.save(ckpt, run / "checkpoints" / "last.pt")
    with pytest.raises(BundleError, match=r"1 of 20 prototypes .*\(ids 0\) do not have their largest"):
        export_bundle(run, tmp_path / "b", formats=["onnx"])
    assert not (tmp_path / "b").exists()


def test_export_refuses_when_a_format_disagrees(trained_digits_run: Path, tmp_path: Path, monkeypatch):
    import nasxserve.export.bundle as bundle_mod
    real_runner = bundle_mod._ort_runner

    def skewed(path):
        run = real_runner(path)
        return lambda x: {k: (v + 1e-3 if k == "logits" else v) for k, v in run(x).items()}
    monkeypatch.setattr(bundle_mod, "_ort_runner", skewed)
    with pytest.raises(BundleError, match="does not match PyTorch.*onnx: logits differ.*--parity-rtol"):
        export_bundle(trained_digits_run, tmp_path / "b", formats=["onnx"])
    assert list(tmp_path.iterdir()) == []


def test_an_rgb_image_folder_run_exports_and_predicts_its_files_like_the_model(synthetic_folder: Path,
                                                                              tmp_path: Path):
    from conftest import tiny_config
    from nasxserve.data import load_dataset
    from nasxserve.training.config_loading import config_from_dict
    from nasxserve.training.trainer import Trainer

    cfg = config_from_dict(tiny_config(genotype="DARTS_V2", data={"spec": f"imagefolder:{synthetic_folder}"}))
    Trainer.fresh(cfg, str(tmp_path / "run")).train()
    export_bundle(tmp_path / "run", tmp_path / "bundle", formats=["onnx"])
    bundle = load_bundle(tmp_path / "bundle")
    assert bundle.manifest.input.color_mode == "RGB" and bundle.classes == ["class_0", "class_1", "class_2"]

    data = load_dataset(f"imagefolder:{synthetic_folder}", 8)
    files = sorted((synthetic_folder / "test").glob("*/*.png"))          # the loader's order
    eager = InferenceNet(load_trained_run(tmp_path / "run").model)
    expected = torch_outputs(eager, data.test.batch(torch.arange(len(files)))[0].numpy())["logits"]
    got = np.array([[p["logit"] for p in sorted(r["predictions"], key=lambda p: p["index"])]
                    for r in bundle.predict(files, top_k=3)])
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_nasx_export_cli(trained_digits_run: Path, tmp_path: Path, nasx):
    r = nasx("export", trained_digits_run, "-o", tmp_path / "b", "--formats", "onnx,pt2", "--quiet")
    assert r.returncode == 0, r.stderr
    assert set(json.loads(r.stdout)) == {"onnx", "pt2"}
    assert "Warning" not in r.stderr and "deprecated" not in r.stderr
    assert (tmp_path / "b" / "model.pt2").is_file() and not (tmp_path / "b" / "model.ts").exists()
    r = nasx("export", trained_digits_run, "-o", tmp_path / "bundle", "--formats", "onnx")
    assert r.returncode == 0, r.stderr
    assert f"{tmp_path / 'bundle'}: each format against PyTorch" in r.stdout       # was "bundle <path>"
    assert "bundle bundle" not in r.stdout
    r = nasx("export", trained_digits_run, "-o", tmp_path / "c", "--formats", "onnx,tflite")
    assert r.returncode == 2 and "--formats takes a comma-separated list of onnx, torchscript, pt2" in r.stderr
    r = nasx("export", tmp_path / "nowhere", "-o", tmp_path / "c")
    assert r.returncode == 2 and "does not exist" in r.stderr
    assert not (tmp_path / "c").exists()


def test_an_opset_the_exporter_cannot_make_is_refused_not_faked(trained_digits_run: Path, tmp_path: Path):
    with pytest.raises(BundleError, match="could not produce opset 99"):
        export_bundle(trained_digits_run, tmp_path / "b", formats=["onnx"], opset=99)
    assert list(tmp_path.iterdir()) == []
    export_bundle(trained_digits_run, tmp_path / "b", formats=["onnx"], opset=21)
    assert onnx.load(str(tmp_path / "b" / "model.onnx")).opset_import[0].version == 21
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["export"]["onnx_opset"] == 21


@pytest.fixture(scope="module")
def fine_grained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CUB-sized prototype head: 200 classes x 10 prototypes of 128 channels over a DARTS_V2 trunk, trained for
    one epoch on 2 synthetic 16x16 images a class (its logits sum 2,000 terms, as a real fine-grained model's)."""
    from conftest import make_imagefolder, tiny_config
    from nasxserve.training.config_loading import config_from_dict
    from nasxserve.training.trainer import Trainer

    root = tmp_path_factory.mktemp("fine-grained")
    make_imagefolder(root / "data", classes=200, train_per_class=2, test_per_class=1, size=16)
    cfg = config_from_dict(tiny_config(
        genotype="DARTS_V2", data={"spec": f"imagefolder:{root / 'data'}", "image_size": None},
        model={"prototypes_per_class": 10, "prototype_dim": 128},
        retrain={"epochs_joint": 1, "epochs_finetune": 0}, projection={"last_layer_passes": 1}))
    Trainer.fresh(cfg, str(root / "run")).train()
    return root / "run"


def test_a_fine_grained_model_exports_within_the_relative_tolerance(fine_grained_run: Path, tmp_path: Path):
    result = export_bundle(fine_grained_run, tmp_path / "b", formats=["onnx"])
    a = result.parity["onnx"]
    assert a.ok and a.top1_mismatches == 0
    assert result.manifest.last_layer.shape == [200, 2000]
    assert load_bundle(tmp_path / "b").verify().ok


def test_a_fine_grained_model_whose_output_really_differs_is_refused(fine_grained_run: Path, tmp_path: Path,
                                                                     monkeypatch):
    """One logit per image moved by 1 % of the image's largest logit: far beyond rounding, so refused."""
    import nasxserve.export.bundle as bundle_mod
    real_runner = bundle_mod._ort_runner

    def perturbed(path):
        run = real_runner(path)

        def outputs(x):
            out = run(x)
            logits = out["logits"].copy()
            logits[:, 7] += 0.01 * np.abs(logits).max(axis=1)
            return dict(out, logits=logits)
        return outputs
    monkeypatch.setattr(bundle_mod, "_ort_runner", perturbed)
    with pytest.raises(BundleError, match="onnx: logits differ by up to .*x the tolerance"):
        export_bundle(fine_grained_run, tmp_path / "b", formats=["onnx"])
    assert list(tmp_path.iterdir()) == []
