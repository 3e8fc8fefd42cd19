"""``nasx export``: freeze a finished run into a verified bundle (docs/design.md, "The bundle").

The bundle is written into a temporary sibling folder and renamed into place only after ONNX Runtime,
TorchScript and ``torch.export`` have been checked against eager PyTorch, so an interrupted or failed
export leaves no half bundle and never touches an existing one.
"""
from __future__ import annotations

import datetime as dt
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import yaml

from pydantic import ValidationError

from nasxserve import __version__
from nasxserve.contracts import (BATCH, Brightness, BundleMetrics, DataSummary, ExportRecord, FileEntry, InputSpec,
                                 LastLayer, LatentGrid, Manifest, ManifestBody, ModelFormat, OutputSpec,
                                 ParityAgreement, ParityRuleSpec, ProjectionSource, PrototypeEntry, Provenance,
                                 RunReport, RunSettings, Similarity, describe)
from nasxserve.data import Dataset
from nasxserve.errors import BundleError, DataError, RunDirError
from nasxserve.explain.consistency import mislabelled_prototypes, supported_class
from nasxserve.export.graph import (DEFAULT_OPSET, InferenceNet, export_onnx, export_program, export_torchscript,
                                    inference_form, load_program, load_torchscript, save_program)
from nasxserve.imaging import normalize
from nasxserve.io import fsync_tree, replace_folder, sibling_folder
from nasxserve.protos.model import ExplainableNet, ModelSpec, build_model
from nasxserve.regions import EVIDENCE_RULE_VERSION
from nasxserve.runtime.format import (CONFIG_FILE, FORMAT, FORMAT_FILES, FORMAT_VERSION, INPUT_NAME, MANIFEST,
                                      METADATA_PREFIX, ONNX_FILE, ONNX_METADATA_KEYS, OUTPUT_NAMES, PARITY_FILE,
                                      PT2_FILE, PROTOTYPES_DIR, RTOL, TORCHSCRIPT_FILE, WEIGHTS_FILE,
                                      prototype_context, prototype_patch, seal, sha256_file)
from nasxserve.runtime.parity import Agreement, ParityRule, compare
from nasxserve.training.rundir import RunDir

FORMATS = tuple(FORMAT_FILES)
PARITY_BATCHES = (1, 3, 17)
RESIZE_RULE = "bilinear (antialiased when shrinking) to exactly width x height; the aspect ratio is not kept"


@dataclass
class TrainedRun:
    """What export needs from a finished run directory: its model, report.json, config.yaml (as written, and the
    settings read back from it) and the last projection's records."""

    root: Path
    model: ExplainableNet
    spec: ModelSpec
    report: RunReport
    config: dict[str, Any]
    settings: RunSettings
    records: list[dict[str, Any]]

    @property
    def data(self) -> DataSummary:
        """The report's dataset (every run that can be exported has one)."""
        if self.report.data is None:
            raise RunDirError(f"{self.root / 'report.json'} does not describe the run's data; it was written by an "
                              f"older nasx: retrain with this version")
        return self.report.data


@dataclass
class ExportResult:
    path: Path
    manifest: Manifest
    parity: dict[str, Agreement] = field(default_factory=dict)


def load_trained_run(run_dir: str | Path) -> TrainedRun:
    """The final model of a finished run (``checkpoints/last.pt``, whose prototypes are the ones the
    last projection recorded in ``prototypes/records.json``): NASXNet, ProtoPNet (``spec.backbone``) or the
    black box (``spec.head == "linear"``, which has no prototypes: ``records`` is empty)."""
    run = RunDir(Path(run_dir).expanduser())
    if not run.root.is_dir():
        raise RunDirError(f"run directory {run.root} does not exist")
    if not run.report_path.is_file():
        raise RunDirError(f"{run.root} has no report.json: the run has not finished (continue it with "
                          f"`nasx train --resume {run.root}`)")
    raw = _read_run_file(run.report_path, json.loads)
    if not isinstance(raw, dict) or "model" not in raw:
        raise RunDirError(f"{run.report_path} has no model description; it was written by an older nasx: "
                          f"retrain with this version")
    try:
        report = RunReport.model_validate(raw)
    except ValidationError as e:
        raise RunDirError(f"{run.report_path} is not a report nasx train wrote ({describe(e)})") from None
    spec = ModelSpec.from_dict(report.model)
    ckpt = run.load_checkpoint()
    model = build_model(spec)
    model.load_state_dict(ckpt["model"])
    model.eval()
    config = _read_run_file(run.config_path, yaml.safe_load) if run.config_path.is_file() else {}
    if not isinstance(config, dict):
        raise RunDirError(f"{run.config_path} is not a mapping of settings; it was not written by nasx train")
    try:
        settings = RunSettings.read(config)
    except ValidationError as e:
        raise RunDirError(f"{run.config_path} is not a configuration nasx train wrote ({describe(e)})") from None
    if spec.head == "linear":
        return TrainedRun(run.root, model, spec, report, config, settings, [])
    records_path = run.records_path
    if not records_path.is_file():
        raise RunDirError(f"{records_path} is missing: the run has no projected prototypes")
    records = _read_run_file(records_path, json.loads)
    if not isinstance(records, dict) or not isinstance(records.get("records"), list):
        raise RunDirError(f"{records_path} has no list of records; it was not written by nasx train")
    records = records["records"]
    classes = model.prototype_layer.prototype_class.tolist()
    if [r["source_class"] for r in records] != classes:
        raise RunDirError(f"{records_path} does not describe the prototypes of {run.last_checkpoint}")
    return TrainedRun(run.root, model, spec, report, config, settings, records)


def _read_run_file(path: Path, parse: Callable[[str], Any]) -> Any:
    """A JSON or YAML file of a run, any parse failure (a ``!!python`` tag, deep nesting) as a one-line error."""
    try:
        return parse(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError, yaml.YAMLError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else " ".join(str(e).split())[:300]
        raise RunDirError(f"{path} cannot be read ({reason}); it was not written by nasx train, or was "
                          f"edited") from None


def _run_dataset(run: TrainedRun, data_spec: str | None) -> Dataset:
    from nasxserve.data import load_dataset
    saved = run.settings.data
    spec = data_spec or saved.spec or "digits"
    try:
        return load_dataset(spec, saved.image_size, saved.crop)
    except DataError as e:
        raise DataError(f"the parity check runs the model on real images of the run's dataset, which cannot be "
                        f"loaded: {e}. Point --data at the dataset") from None


def _real_samples(data: Dataset, n: int) -> np.ndarray:
    x, _ = data.test.batch(torch.arange(min(n, len(data.test))))
    return x.numpy()


def training_brightness(images: torch.Tensor) -> Brightness:
    """The spread of the training images' mean brightness (pixel / 255 over all pixels and channels) of uint8
    (N, C, H, W) ``images``: 1st percentile, median, 99th percentile; the runtime warns about an input outside
    it (:meth:`nasxserve.runtime.bundle.Bundle.input_warning`)."""
    means = images.reshape(len(images), -1).float().mean(dim=1).numpy() / 255.0
    p1, median, p99 = np.percentile(means, [1, 50, 99])
    return Brightness(p1=round(float(p1), 4), median=round(float(median), 4), p99=round(float(p99), 4),
                      measured_on="train")


def _random_images(run: TrainedRun, n: int, seed: int = 0) -> np.ndarray:
    """Uniform random pixels, normalised like real images: in range for the model, but unlike any data."""
    d = run.data
    c, (h, w) = d.channels, d.image_size
    pixels = np.random.default_rng(seed).integers(0, 256, (n, c, h, w), dtype=np.uint8)
    return normalize(pixels, np.asarray(d.mean), np.asarray(d.std))


def torch_outputs(fn: Callable[[torch.Tensor], Sequence[torch.Tensor]], x: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = fn(torch.from_numpy(x))
    return {name: t.detach().cpu().numpy() for name, t in zip(OUTPUT_NAMES, out)}


def _agreement(reference: dict[str, np.ndarray], run: Callable[[np.ndarray], dict[str, np.ndarray]],
               inputs: Sequence[np.ndarray], rule: ParityRule) -> Agreement:
    """``run`` on the first 1, 3 and 17 images of each input set against the reference outputs."""
    total = Agreement()
    offset = 0
    for x in inputs:
        for b in PARITY_BATCHES:
            if b > len(x):
                continue
            ref = {k: v[offset:offset + b] for k, v in reference.items()}
            total = total.merge(compare(ref, run(x[:b]), rule))
        offset += len(x)
    return total


def _manifest(run: TrainedRun, name: str, grid: tuple[int, int], formats: Sequence[str], opset: int,
              brightness: Brightness, rule: ParityRule) -> ManifestBody:
    """The manifest, less the parity measured and the file list (added once known) and the digest."""
    d = run.data
    c, (h, w) = d.channels, d.image_size
    m, k = run.spec.num_prototypes, run.spec.num_classes
    weight = run.model.last_layer.weight.detach().cpu().numpy()
    classes = list(d.classes)
    prototypes = []
    for r in run.records:
        j, cls = r["prototype"], r["source_class"]
        evidence = _evidence_box(r)
        prototypes.append(PrototypeEntry.model_validate({     # by the field names on disk: "class" is a keyword
            "id": j, "class_index": cls, "class": classes[cls], "weight": float(weight[cls, j]),
            "source": ProjectionSource(split="train", index=r["sample"], latent_position=list(r["position"]),
                                       box=list(r["box_xyxy"]), evidence_box=_listed(evidence),
                                       evidence_rule_version=EVIDENCE_RULE_VERSION if evidence is not None else None,
                                       distance_at_projection=r["distance"],
                                       class_before_projection=r["class_before"]),
            "box_offset": list(r.get("box_offset", (0, 0))),
            "patch": prototype_patch(j), "context": prototype_context(j),
            **({"evidence_patch": prototype_patch(j, "evidence"), "evidence_context": prototype_context(j, "evidence")}
               if evidence is not None else {})}))
    report = run.report
    return ManifestBody(
        format=FORMAT, format_version=FORMAT_VERSION, name=name,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        nasx_version=__version__,
        classes=classes,
        input=InputSpec(name=INPUT_NAME, dtype="float32", layout="NCHW", shape=[BATCH, c, h, w],
                        channels=c, height=h, width=w, color_mode="L" if c == 1 else "RGB",
                        resize=RESIZE_RULE, alpha="composited over white", scale="pixel / 255",
                        mean=list(d.mean), std=list(d.std),
                        normalize="(pixel / 255 - mean[c]) / std[c]", brightness=brightness),
        outputs=[
            OutputSpec(name="logits", dtype="float32", shape=[BATCH, k]),
            OutputSpec(name="similarities", dtype="float32", shape=[BATCH, m]),
            OutputSpec(name="min_distances", dtype="float32", shape=[BATCH, m]),
            OutputSpec(name="best_patch", dtype="int64", shape=[BATCH, m],
                       meaning="flat index row * grid width + col of the best-matching latent position"),
            OutputSpec(name="similarity_maps", dtype="float32", shape=[BATCH, m, grid[0], grid[1]]),
        ],
        latent_grid=LatentGrid(height=grid[0], width=grid[1]),
        similarity=Similarity(function=run.spec.similarity, eps=run.spec.eps),
        box_rule="pixels at or above the 95th percentile of the similarity map, upsampled bicubically "
                 "(a = -0.75) to the input size; a prototype whose box_offset (dx, dy) is not (0, 0) has "
                 "that box moved by it and cut to the image, after a side lying on the image's edge that "
                 "the move leaves is put at the mirror of the opposite side about the best patch's cell "
                 "centre",
        evidence="logits[k] = sum_j last_layer.weight[k][j] * similarities[j]; "
                 "contribution of prototype j to class k = last_layer.weight[k][j] * similarities[j]",
        last_layer=LastLayer(shape=[k, m], weight=weight.astype(np.float64).tolist()),
        prototypes=prototypes,
        genotype=run.spec.genotype.to_dict() if run.spec.genotype is not None else None,   # None: ProtoPNet
        genotype_darts=run.spec.genotype.to_darts_string() if run.spec.genotype is not None else None,
        model=run.spec.to_dict(),
        metrics=BundleMetrics(test=report.test, prototype_class_counts=_supporting_counts(run, classes)),
        training=Provenance(run_dir=str(run.root.resolve()),
                            # prototypes[].source.index counts the training images the run trained on: val_split
                            # says whether a validation share was held out of the dataset's own training split first
                            data={"name": d.name, "source": d.source, "sizes": d.sizes, "val_split": d.val_split},
                            method=report.method, genotype_source=report.genotype_source,
                            backbone_weights=report.backbone_weights, wall_time_s=report.wall_time_s,
                            device=report.device, config=run.config),
        export=ExportRecord(formats=[cast(ModelFormat, f) for f in formats], onnx_opset=opset,
                            torch_version=torch.__version__, parity={},
                            parity_rule=ParityRuleSpec.model_validate(rule.to_dict())),
        files={},
    )


def _onnx_metadata(manifest: ManifestBody) -> dict[str, str]:
    fields = manifest.as_json(set(ONNX_METADATA_KEYS))
    return {METADATA_PREFIX + key: json.dumps(fields[key]) for key in ONNX_METADATA_KEYS}


def _write_onnx(proto: Any, manifest: ManifestBody, path: Path) -> None:
    import onnx
    onnx.helper.set_model_props(proto, _onnx_metadata(manifest))
    proto.doc_string = f"nasx {__version__} explainable classifier {manifest.name!r}; see the nasx.* metadata"
    onnx.save_model(proto, str(path), save_as_external_data=False)


def _ort_runner(path: Path) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    from nasxserve.runtime.session import create_session
    session = create_session(str(path), "cpu")
    return lambda x: dict(zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})))


def _check_prototype_labels(run: TrainedRun) -> None:
    """Refuse a run in which a prototype is labelled with a class it does not support
    (:func:`nasxserve.explain.consistency.mislabelled_prototypes`): its explanations would show it as evidence
    for one class while it votes for another."""
    weight = run.model.last_layer.weight.detach().cpu().numpy()
    bad = mislabelled_prototypes(weight, run.model.prototype_layer.prototype_class.cpu().numpy())
    if len(bad):
        shown = ", ".join(str(j) for j in bad[:10]) + (", ..." if len(bad) > 10 else "")
        raise BundleError(f"{len(bad)} of {weight.shape[1]} prototypes of {run.root} (ids {shown}) do not have their "
                          f"largest last-layer weight positive and on their own class, so their explanations would "
                          f"be false; nothing was written. Runs trained by this nasx fit the last layer after every "
                          f"projection: retrain the run with this version")


def _supporting_counts(run: TrainedRun, classes: list[str]) -> dict[str, int]:
    """Prototypes per class, counting each prototype for the class it supports."""
    supported = supported_class(run.model.last_layer.weight.detach().cpu().numpy())
    return {name: int((supported == k).sum()) for k, name in enumerate(classes)}


def _refuse_disagreement(parity: dict[str, Agreement], rule: ParityRule) -> None:
    """A :class:`BundleError` saying which format differed, how, and what the user can do about it."""
    failed = {fmt: a.failures() for fmt, a in parity.items() if not a.ok}
    if not failed:
        return
    detail = "; ".join(f"{fmt}: {', '.join(msgs)}" for fmt, msgs in failed.items())
    only_values = all(a.top1_mismatches == 0 and a.patch_mismatches == 0 for a in parity.values() if not a.ok)
    hint = (f"; if the differences are float rounding (the top-1 classes agree), allow more with --parity-rtol "
            f"(now {rule.rtol:g})" if only_values else "")
    others = [fmt for fmt in failed if fmt != "onnx"]
    if others:
        hint += f"; or leave out {', '.join(others)} with --formats onnx (ONNX is what nasx serves)"
    raise BundleError(f"the exported model does not match PyTorch ({detail}); nothing was written{hint}")


def _prepare_target(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise BundleError(f"{out} exists and is not a folder; choose another -o")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise BundleError(f"{out} already exists and is not empty; choose another -o, or pass --force to replace it")


def export_bundle(run_dir: str | Path, out: str | Path, formats: Sequence[str] = FORMATS, opset: int = DEFAULT_OPSET,
                  data_spec: str | None = None, force: bool = False, name: str | None = None,
                  step: Callable[[str], None] = lambda message: None, parity_rtol: float = RTOL) -> ExportResult:
    """Write the bundle of the finished run ``run_dir`` to ``out`` and return what was checked.

    ``formats`` picks among onnx (always written: it is what nasx serves), torchscript and pt2.
    Raises :class:`BundleError` (nothing written) when any format disagrees with eager PyTorch beyond the
    :class:`~nasxserve.runtime.parity.ParityRule` with relative tolerance ``parity_rtol``, which the manifest
    records for ``nasx verify``.
    """
    if not 0.0 <= parity_rtol < 1e-2:
        raise BundleError(f"--parity-rtol {parity_rtol:g} is out of range: give a relative tolerance from 0 to 0.01 "
                          f"(the default {RTOL:g} covers float32 reordering in models with thousands of prototypes)")
    rule = ParityRule(rtol=parity_rtol)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise BundleError(f"unknown export formats {unknown}; choose from {', '.join(FORMATS)}")
    formats = ["onnx"] + [f for f in FORMATS if f in formats and f != "onnx"]
    out = Path(out).expanduser()
    _prepare_target(out, force)
    step("loading the run")
    run = load_trained_run(run_dir)
    if run.spec.head == "linear":
        raise BundleError(f"{run.root} is a black-box run (--head linear): it has no prototypes, and a nasx bundle "
                          f"is a model that explains with prototypes; export a run trained with prototypes "
                          f"(--head prototype or plain, or --method protopnet)")
    _check_prototype_labels(run)
    net = InferenceNet(run.model)                      # the model as trained: what every format must match
    exported = InferenceNet(inference_form(run.model))
    data = _run_dataset(run, data_spec)
    real = _real_samples(data, max(PARITY_BATCHES))
    rand = _random_images(run, max(PARITY_BATCHES))
    inputs = [real, rand]
    reference = torch_outputs(net, np.concatenate(inputs))
    grid = tuple(reference["similarity_maps"].shape[2:])
    manifest = _manifest(run, name or run.data.name, grid, formats, opset,      # the name: what the API serves it as
                         training_brightness(data.train.images), rule)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling_folder(out, "tmp")
    try:
        example = torch.from_numpy(real[:2])
        step("exporting ONNX")
        _write_onnx(export_onnx(exported, example, opset), manifest, tmp / ONNX_FILE)
        runners = {"onnx": _ort_runner(tmp / ONNX_FILE)}
        if "torchscript" in formats:
            step("exporting TorchScript")
            (tmp / TORCHSCRIPT_FILE).write_bytes(export_torchscript(exported, example))
            ts = load_torchscript(tmp / TORCHSCRIPT_FILE)
            runners["torchscript"] = lambda x: torch_outputs(ts, x)
        if "pt2" in formats:
            step("exporting torch.export program")
            save_program(export_program(exported, example), tmp / PT2_FILE)
            program = load_program(tmp / PT2_FILE)
            runners["pt2"] = lambda x: torch_outputs(program, x)
        step("checking every format against PyTorch")
        parity = {fmt: _agreement(reference, runner, inputs, rule) for fmt, runner in runners.items()}
        _refuse_disagreement(parity, rule)
        manifest.export.parity = {fmt: ParityAgreement.model_validate(a.to_dict()) for fmt, a in parity.items()}

        step("writing weights, prototypes and manifest")
        _write_weights(run, tmp)
        # 8 real and 4 random images, with the eager outputs already computed for them
        keep = np.r_[0:8, len(real):len(real) + 4]
        _write_parity(tmp, np.concatenate(inputs)[keep], {k: v[keep] for k, v in reference.items()})
        _copy_prototypes(run, tmp)
        manifest.files = {str(p.relative_to(tmp).as_posix()): FileEntry(sha256=sha256_file(p), bytes=p.stat().st_size)
                          for p in sorted(tmp.rglob("*")) if p.is_file()}
        sealed = seal(manifest)
        (tmp / MANIFEST).write_text(json.dumps(sealed.as_json(), indent=2) + "\n", encoding="utf-8")
        fsync_tree(tmp)
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out, sealed, parity)


def _write_weights(run: TrainedRun, folder: Path) -> None:
    from safetensors.torch import save_file
    state = {k: v.detach().cpu().contiguous() for k, v in run.model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "nasx-model", "config": CONFIG_FILE})
    architecture = "nasxnet" if run.spec.genotype is not None else "protopnet"
    config = {"format": "nasx-model", "format_version": FORMAT_VERSION, "architecture": architecture,
              "classes": list(run.data.classes), "model": run.spec.to_dict()}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _write_parity(folder: Path, x: np.ndarray, expected: dict[str, np.ndarray]) -> None:
    """Inputs and PyTorch's outputs for them, so that ``nasx verify`` can check ONNX Runtime without torch."""
    arrays: dict[str, Any] = {"input": x, **expected}
    np.savez(folder / PARITY_FILE, **arrays)


def _listed(box: Sequence[int] | None) -> list[int] | None:
    return None if box is None else list(box)


def _evidence_box(record: dict[str, Any]) -> Sequence[int] | None:
    """A projection record's source box by the evidence rule, if this version of the rule drew it: a run trained
    before it (no box, or another ``evidence_rule_version``) gets the activation box in its bundle."""
    if record.get("evidence_rule_version") != EVIDENCE_RULE_VERSION:
        return None
    box: Sequence[int] | None = record.get("evidence_box_xyxy")
    return box


def _copy_prototypes(run: TrainedRun, folder: Path) -> None:
    """The run's prototype PNGs: the activation box's, and the evidence box's where this version of the rule
    measured it (:func:`_evidence_box`)."""
    (folder / PROTOTYPES_DIR).mkdir()
    for r in run.records:
        rules = ("activation", "evidence") if _evidence_box(r) is not None else ("activation",)
        for rel in (f(r["prototype"], rule) for rule in rules for f in (prototype_patch, prototype_context)):
            if not (run.root / rel).is_file():
                raise RunDirError(f"{run.root / rel} is missing; the run's prototype images are incomplete")
            shutil.copyfile(run.root / rel, folder / rel)


def load_pytorch_model(bundle: str | Path, verify: bool = True) -> ExplainableNet:
    """The bundle's model as an :class:`ExplainableNet` (eval mode) from ``weights.safetensors`` and
    ``config.json``, for fine-tuning or analysis; no pickle is read. ``verify=False`` skips the
    checksums, for a bundle that :func:`nasxserve.runtime.load_bundle` has just verified."""
    from safetensors.torch import load_file
    from nasxserve.runtime.files import read_manifest, verify_files
    root = Path(bundle).expanduser()
    if verify:
        verify_files(root, read_manifest(root))
    config = json.loads((root / CONFIG_FILE).read_text(encoding="utf-8"))
    model = build_model(ModelSpec.from_dict(config["model"]))
    model.load_state_dict(load_file(str(root / WEIGHTS_FILE)))
    return model.eval()
