"""``nasx evaluate``: every measure of :mod:`nasxserve.explain.metrics` and :mod:`nasxserve.explain.localisation`
for one trained model on one split.

The model comes from a finished run directory (its final, projected ``checkpoints/last.pt``) or from an
exported bundle (``weights.safetensors``); the data from ``--data`` or else the dataset the model was
trained on. The result is one JSON-ready dict (:func:`evaluate_model`) and its markdown rendering
(:func:`render_markdown`).
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from nasxserve.contracts import DataSettings, Head, Method, TestMetrics, describe
from nasxserve.data.base import Dataset, ImageSet
from nasxserve.data.foreground import (BACKGROUND_SHARE, FOREGROUND_LEVEL, background_blocks, foreground_masks,
                                      on_background)
from nasxserve.errors import EvaluationError
from nasxserve.explain import localisation as L
from nasxserve.explain import metrics as M
from nasxserve.boxes import recorded_offsets
from nasxserve.explain.consistency import mislabelled_prototypes
from nasxserve.explain.deletion import FILLS, Deletion
from nasxserve.explain.verdicts import evaluation_verdicts
from nasxserve.protos.model import ExplainableNet
from nasxserve.regions import DEFAULT_REGION_RULE, REGION_RULES, cell_blocks

HEADLINE_FILL = "road"      # the deletion gap the report leads with and the verdict judges


@dataclass
class EvaluationOptions:
    split: str = "test"
    batch_size: int = 256
    purity_k: int = M.PURITY_K
    duplicate_rms: float = M.DUPLICATE_RMS
    deletion_steps: int = 5
    sanity_images: int = 200
    limit: int | None = None        # evaluate on the first N images of the split only
    seed: int = 0


@dataclass
class Evaluated:
    """A trained model and what its source says about it.

    kind: "run" or "bundle"; method: "nasxnet" or "protopnet"; head: "prototype" or "linear";
    sources: (m, 3) int (source image, latent row, latent column) of each prototype's last projection,
    or None; saved_test: the ``test`` block its training report wrote; data: the training data settings
    (spec, image_size, crop, val_share); has_aux: whether the auxiliary head h1 was trained (NASXNet only);
    image_size: (H, W) of the images it was trained on; extra: what the evaluation's ``model`` block adds
    (provenance, and this project's extensions the run trained with)."""

    path: Path
    kind: str
    model: ExplainableNet
    method: Method
    head: Head
    sources: np.ndarray | None
    saved_test: TestMetrics | None
    data: DataSettings
    has_aux: bool
    image_size: tuple[int, int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    box_offsets: np.ndarray | None = None   # (m, 2) (dx, dy) each prototype's boxes are moved by; None: none


def load_evaluated(path: str | Path) -> Evaluated:
    """A run directory (has ``report.json``) or a bundle (has ``manifest.json``)."""
    root = Path(path).expanduser()
    if (root / "manifest.json").is_file():
        return _from_bundle(root)
    if (root / "report.json").is_file() or (root / "config.yaml").is_file():
        return _from_run(root)
    raise EvaluationError(f"{root} is neither a finished run directory (with report.json) nor a bundle (with "
                          f"manifest.json); pass the folder `nasx train --out` or `nasx export` wrote")


# what the evaluation of a run repeats from its report, where the report has it
RUN_FACTS = ("backbone", "backbone_weights", "genotype_darts", "wall_time_s")


def _from_run(root: Path) -> Evaluated:
    from nasxserve.export.bundle import load_trained_run

    run = load_trained_run(root)
    report = run.report
    test = report.test
    sources = (np.asarray([[r["sample"], *r["position"]] for r in run.records], dtype=np.int64)
               if run.records else None)
    return Evaluated(path=root, kind="run", model=run.model, method=report.method, head=report.head,
                     sources=sources, saved_test=test, data=run.settings.data,
                     has_aux=test is not None and test.aux_acc is not None,
                     image_size=_hw(report.data.image_size) if report.data is not None else None,
                     extra={**report.facts(*RUN_FACTS), **run.settings.extensions_on()},
                     box_offsets=recorded_offsets(run.records))


def _from_bundle(root: Path) -> Evaluated:
    from nasxserve.export.bundle import load_pytorch_model
    from nasxserve.runtime.files import read_manifest

    manifest = read_manifest(root)
    model = load_pytorch_model(root)
    prototypes = manifest.prototypes
    sources = (np.asarray([[p.source.index, *p.source.latent_position] for p in prototypes], dtype=np.int64)
               if prototypes else None)
    test = manifest.metrics.test
    try:
        settings = manifest.training.settings
    except ValidationError as e:
        raise EvaluationError(f"{root / 'manifest.json'}: the run's configuration in training.config cannot be "
                              f"read ({describe(e)})") from None
    return Evaluated(path=root, kind="bundle", model=model, method=manifest.method, head=manifest.head,
                     sources=sources, saved_test=test, data=settings.data,
                     has_aux=test is not None and test.aux_acc is not None,
                     image_size=(manifest.input.height, manifest.input.width), extra=settings.extensions_on(),
                     box_offsets=np.asarray([p.box_offset for p in prototypes], np.int64).reshape(-1, 2))


def _hw(size: list[int]) -> tuple[int, int]:
    height, width = size
    return height, width


def split_of(data: Dataset, name: str) -> ImageSet:
    images = {"train": data.train, "val": data.val, "test": data.test}.get(name)
    if images is None:
        raise EvaluationError(f"the dataset {data.name} has no {name!r} split; use --split test, val or train")
    return images


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {"top1": M.topk_accuracy(logits, labels, 1), "top5": M.topk_accuracy(logits, labels, 5)}


def _projection_accuracy(ev: Evaluated, same_data: bool, split: str) -> dict[str, Any] | None:
    """Before/after the last projection, as training measured it (the weights from before the projection
    are not kept, so it cannot be measured again), only when this evaluation is on that same split."""
    t = ev.saved_test
    if not same_data or split != "test" or t is None or t.prototype_acc_before_projection is None:
        return None
    return {"before": t.prototype_acc_before_projection, "after": t.prototype_acc_after_projection,
            "after_last_layer": t.prototype_acc_after_last_layer,
            "measured_by": "training, on this test split, just before and after the last projection, and after "
                           "the last-layer fit that follows it"}


def evaluate_model(ev: Evaluated, data: Dataset, options: EvaluationOptions, device: torch.device,
                   same_data: bool = True, progress: Callable[[str], None] = lambda step: None) -> dict[str, Any]:
    """All the measures for ``ev.model`` on ``options.split`` of ``data``; a JSON-ready dict."""
    started = time.perf_counter()
    model = ev.model.to(device).eval()
    if device.type == "cpu":    # the cells' depthwise and dilated convolutions run 3-4x faster channels-last on a CPU
        model = model.to(memory_format=torch.channels_last)
    images = split_of(data, options.split)
    _check_compatible(ev, data)
    if options.limit is not None and options.limit < len(images):
        images = images.subset(np.arange(options.limit))
    n = len(images)
    labels = images.labels.numpy()
    progress(f"running the model on {n} {options.split} images")
    scan = M.scan(model, images, options.batch_size, device)
    result: dict[str, Any] = {
        "model": {"path": str(ev.path), "kind": ev.kind, "method": ev.method, "head": ev.head,
                  "params": model.prediction_parameters(ev.head), **ev.extra},
        "data": {"name": data.name, "source": data.source, "split": options.split, "n": n,
                 "classes": data.num_classes},
    }
    if ev.head == "linear":
        assert scan.aux_logits is not None      # the linear head is h1
        result["accuracy"] = {"linear": _accuracy(scan.aux_logits, labels)}
        result.update(prototypes=None, faithfulness=None, localisation=None, background=None,
                      note="a linear head has no prototypes: only accuracy applies")
    else:
        result["accuracy"] = {"prototype": _accuracy(scan.logits, labels),
                              "aux": _accuracy(scan.aux_logits, labels) if ev.has_aux and scan.aux_logits is not None
                              else None,
                              "projection": _projection_accuracy(ev, same_data, options.split)}
        progress(f"deletion test ({options.deletion_steps} steps, {len(REGION_RULES)} region rules x {len(FILLS)} "
                 f"fills)")
        deletion = M.deletion_test(model, images, options.deletion_steps, options.batch_size, device, options.seed,
                                   ev.box_offsets)
        offsets = ev.box_offsets[scan.top_prototype] if ev.box_offsets is not None else None
        boxes = {"activation": L.top_boxes(scan.top_maps, images.image_hw, offsets),   # the scan's maps, no pass
                 "evidence": _top_evidence_boxes(model, images, scan, deletion, options, device)}
        result["evidence"] = _evidence(model, scan)
        result["background"] = _background(ev, data, images, boxes, scan.top_maps.shape[1:])
        result["prototypes"] = _prototype_set(ev, data, options, device, progress)
        result["faithfulness"] = _faithfulness(model, images, scan, boxes, deletion.protocols, options, device,
                                               progress)
        reference = scan.cam_maps if ev.has_aux else None
        result["localisation"] = _localisation(model, data, images, boxes, scan.top_prototype, reference, options,
                                               device, progress)
    result["verdicts"] = evaluation_verdicts(result)
    result["options"] = asdict(options)
    result["wall_time_s"] = round(time.perf_counter() - started, 1)
    result["torch_threads"] = torch.get_num_threads()        # the figures' float sums depend on it
    return result


def _check_compatible(ev: Evaluated, data: Dataset) -> None:
    k = ev.model.last_layer.weight.shape[0]
    if k != data.num_classes:
        raise EvaluationError(f"the model has {k} classes but {data.name} has {data.num_classes}; evaluate on the "
                              f"dataset the model was trained on (--data)")
    if ev.image_size is not None and tuple(ev.image_size) != data.image_size:
        raise EvaluationError(f"the model was trained on {ev.image_size[0]}x{ev.image_size[1]} images but the data "
                              f"is {data.image_size[0]}x{data.image_size[1]}; load it at the training size")


def _evidence(model: ExplainableNet, scan: M.Scan) -> dict[str, Any]:
    """Whether the evidence shown is the predicted class's own: the share of the absolute contributions to the
    predicted logit carried by that class's prototypes (median, 10th percentile, mean over the images), and the
    prototypes whose label is not the class they support (:mod:`nasxserve.explain.consistency`)."""
    share = scan.own_class_share[np.isfinite(scan.own_class_share)]
    weight = model.last_layer.weight.detach().cpu().numpy()
    mislabelled = mislabelled_prototypes(weight, model.prototype_layer.prototype_class.cpu().numpy())
    return {"own_class_share": {"median": float(np.median(share)), "p10": float(np.percentile(share, 10)),
                                "mean": float(share.mean()), "n": int(len(share))} if len(share) else None,
            "mislabelled_prototypes": mislabelled.tolist()}


def _background(ev: Evaluated, data: Dataset, images: ImageSet, boxes: dict[str, np.ndarray],
                latent_hw: tuple[int, ...]) -> dict[str, Any] | None:
    """How much of the evidence sits on background (:func:`nasxserve.data.foreground.on_background`): the share
    of the top prototype's regions, by each rule, and the share of the prototypes whose source patch (the
    latent cell's block of its training image) does; None where the data has no notion of background."""
    foreground = foreground_masks(images, data.dark_background)
    if foreground is None:
        return None
    result: dict[str, Any] = {
        "rule": _foreground_rule(images, data),
        "below_share": BACKGROUND_SHARE,
        "top_regions": {rule: float(on_background(b, foreground).mean()) for rule, b in boxes.items()},
        "prototypes": None}
    train_foreground = foreground_masks(data.train, data.dark_background)
    if ev.sources is not None and train_foreground is not None and ev.sources[:, 0].max() < len(data.train):
        h, w = (int(v) for v in latent_hw)
        # the same test foreground projection makes: the latent cell's block of the source image
        blocks = background_blocks(train_foreground[ev.sources[:, 0]], cell_blocks((h, w), images.image_hw))
        result["prototypes"] = float(blocks[np.arange(len(blocks)), ev.sources[:, 1] * w + ev.sources[:, 2]].mean())
    return result


def _foreground_rule(images: ImageSet, data: Dataset) -> str:
    if images.boxes is None:
        return f"pixels of at least {FOREGROUND_LEVEL:g} of the range are the object"
    return f"inside each image's annotated box: the {'part that defines the class' if data.part_boxes else 'object'}"


def _prototype_set(ev: Evaluated, data: Dataset, options: EvaluationOptions, device: torch.device,
                   progress: Callable[[str], None]) -> dict[str, Any]:
    model = ev.model
    layer = model.prototype_layer
    vectors = layer.prototypes.detach().flatten(1).float().cpu().numpy()
    proto_class = layer.prototype_class.cpu().numpy()
    counts = np.bincount(proto_class, minlength=data.num_classes)
    dups = M.duplicate_prototypes(vectors, ev.sources, options.duplicate_rms)
    nn_dist = M.nearest_prototype_distances(vectors)
    progress(f"class purity over {len(data.train)} training images")
    min_d = M.min_distances_over(model, data.train, options.batch_size, device)
    purity = M.class_purity(min_d, data.train.labels.numpy(), proto_class, options.purity_k)
    return {
        "count": int(len(vectors)), "dim": int(vectors.shape[1]),
        "per_class": dict(zip(data.classes, counts.tolist())),
        "classes_without_prototypes": int((counts == 0).sum()),
        "duplicates": dups.summary(),
        "nearest_neighbour_distance": {"mean": float(nn_dist.mean()), "min": float(nn_dist.min())},
        "purity": {"k": min(options.purity_k, len(data.train)), "mean": float(purity.mean()),
                   "min": float(purity.min()), "share_pure": float((purity == 1.0).mean())},
    }


def _top_evidence_boxes(model: ExplainableNet, images: ImageSet, scan: M.Scan, deletion: M.DeletionTest,
                        options: EvaluationOptions, device: torch.device) -> np.ndarray:
    """(N, 4) the evidence rule's box of each image's top prototype: the deletion test's, which boxed it already;
    boxed again only where its first MoRF prototype is not the scan's (equal contributions, which its sort and the
    scan's argmax may order differently)."""
    boxes = deletion.top_boxes["evidence"].copy()
    other = np.flatnonzero(deletion.top_prototype != scan.top_prototype)
    if len(other):
        boxes[other] = L.top_region_boxes(model, images.subset(other), scan.top_prototype[other], "evidence",
                                          batch_size=options.batch_size, device=device)
    return boxes


def _faithfulness(model: ExplainableNet, images: ImageSet, scan: M.Scan, boxes: dict[str, np.ndarray],
                  protocols: list[Deletion], options: EvaluationOptions, device: torch.device,
                  progress: Callable[[str], None]) -> dict[str, Any]:
    """The deletion test's protocols (``deletion``: the default rule with the ROAD fill), the weight-randomisation
    check, and the alignment of each rule's top box with the input gradient (``alignment``: the default rule's)."""
    headline = next(d for d in protocols if d.rule == DEFAULT_REGION_RULE and d.fill == HEADLINE_FILL)
    k = min(options.sanity_images, len(images))
    first = images.subset(np.arange(k))
    progress(f"weight-randomisation check on {k} images")
    randomisation = M.randomisation_check(model, first, scan.top_prototype[:k], scan.top_maps[:k],
                                          options.batch_size, device, options.seed)
    progress(f"evidence alignment on {k} images")
    alignment = {rule: asdict(M.evidence_alignment(model, first, scan.top_prototype[:k], b[:k], options.batch_size,
                                                   device)) for rule, b in boxes.items()}
    return {"deletion": asdict(headline), "deletion_protocols": [asdict(d) for d in protocols],
            "randomisation": asdict(randomisation), "alignment": alignment[DEFAULT_REGION_RULE],
            "alignment_by_rule": alignment}


def _localisation(model: ExplainableNet, data: Dataset, images: ImageSet, boxes: dict[str, np.ndarray],
                  top_prototype: np.ndarray, cam_maps: np.ndarray | None, options: EvaluationOptions,
                  device: torch.device, progress: Callable[[str], None]) -> dict[str, Any] | None:
    """Hits of the top prototypes' ``boxes`` by the default region rule (``by_rule``: by each rule); with
    ``cam_maps`` (h1's class activation map of the predicted class per image, for a model with h1) also the hits
    of those maps, boxed by the activation rule. With part boxes, ``part_dependence``: whether the top
    prototype's similarity needs the part at all (:func:`nasxserve.explain.localisation.part_dependence`), which
    tells a region rule that misses the part from a model whose evidence lies elsewhere."""
    truth_boxes = images.boxes if data.part_boxes else None
    truth_parts = images.parts
    part_boxes = truth_boxes is not None
    if truth_boxes is not None:
        hits = lambda b: asdict(L.part_box_hits(b, truth_boxes))          # noqa: E731
    elif truth_parts is not None:
        hits = lambda b: asdict(L.part_point_hits(b, truth_parts))        # noqa: E731
    else:
        return None
    result = {**hits(boxes[DEFAULT_REGION_RULE]), "rule": DEFAULT_REGION_RULE,
              "by_rule": {rule: hits(b) for rule, b in boxes.items()}}
    result["aux_reference"] = None
    if cam_maps is not None:
        result["aux_reference"] = hits(L.top_boxes(cam_maps, images.image_hw))
    if part_boxes:
        progress("how much the top prototype's similarity needs the part")
        result["part_dependence"] = asdict(L.part_dependence(model, images, top_prototype, options.batch_size,
                                                             device, options.seed))
        return result
    progress("part consistency and stability (Huang et al.)")
    clean = L.part_hits_per_prototype(model, images, options.batch_size, device)
    noisy = L.part_hits_per_prototype(model, images, options.batch_size, device, noise_seed=options.seed)
    visible = L.visible_parts_per_prototype(model, images)
    result.update(consistency=L.consistency_score(clean, visible), stability=L.stability_score(clean, noisy),
                  region_share=L.REGION_SHARE, consistency_threshold=L.CONSISTENCY_THRESHOLD,
                  part_names=data.part_names)
    return result


# ---------------------------------------------------------------------------------------- markdown
def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def render_markdown(r: dict[str, Any]) -> str:
    """The report as markdown: a heading per section, a table per measure."""
    m, d = r["model"], r["data"]
    lines = [f"# Evaluation of {m['path']}", "",
             f"{m['method']} ({m['head']} head, {m['params']:,} parameters in the prediction), "
             f"{d['name']} {d['split']} split, {d['n']} images, {r['wall_time_s']} s."
             + (f" Trained with the deletion cost (lambda {m['deletion_cost']:g}; not in the papers)."
                if m.get("deletion_cost") else "")
             + (" Boxes calibrated: each prototype's boxes are moved by its offset to its input evidence, measured "
                "on the training split (not in the papers)." if m.get("box_calibration") else "")
             + (" Projected onto patches of the object only (foreground projection; not in the papers)."
                if m.get("foreground_projection") else "")
             + (" Each prototype projected within its own class's images (class projection; not in NASXNet)."
                if m.get("class_projection") else ""),
             "", "## Accuracy", "",
             "| path | top-1 | top-5 |", "|---|---|---|"]
    acc = r["accuracy"]
    for name in ("prototype", "aux", "linear"):
        if acc.get(name):
            lines.append(f"| {name} | {_pct(acc[name]['top1'])} | {_pct(acc[name]['top5'])} |")
    if acc.get("projection"):
        p = acc["projection"]
        lines += ["", f"Last projection (measured in training): {_pct(p['before'])} before, {_pct(p['after'])} after"
                      + (f", {_pct(p['after_last_layer'])} after the last-layer fit (the final model)."
                         if p.get("after_last_layer") is not None else ".")]
    if r.get("note"):
        lines += ["", r["note"]]
    if r.get("evidence"):
        lines += _evidence_lines(r["evidence"])
    if r.get("background"):
        lines += _background_lines(r["background"])
    if r.get("prototypes"):
        lines += _prototype_lines(r["prototypes"])
    if r.get("faithfulness"):
        lines += _faithfulness_lines(r["faithfulness"])
    if r.get("localisation"):
        lines += _localisation_lines(r["localisation"])
    if r.get("verdicts"):
        lines += ["", "## Verdicts", "", *(f"- **{v['verdict']}**: {v['measure']}: {v['says']} ({v['see']})"
                                          for v in r["verdicts"])]
    return "\n".join(lines) + "\n"


def _evidence_lines(e: dict[str, Any]) -> list[str]:
    share, bad = e["own_class_share"], e["mislabelled_prototypes"]
    lines = ["", "## Evidence", ""]
    if share is not None:
        lines.append(f"The predicted class's own prototypes carry a median {_pct(share['median'])} of the absolute "
                     f"evidence for the predicted logit (10th percentile {_pct(share['p10'])}, mean "
                     f"{_pct(share['mean'])}, {share['n']} images); the rest is other classes' prototypes voting for "
                     f"or against it (high is good: the explanation shown is the prediction's reason).")
    lines += ["", "Prototypes whose largest last-layer weight is not positive and to their own class: "
                  + (f"**{len(bad)}** ({', '.join(map(str, bad[:10]))}{', ...' if len(bad) > 10 else ''}): they are "
                     f"shown as evidence for one class while voting for another." if bad else "none.")]
    return lines


def _prototype_lines(p: dict[str, Any]) -> list[str]:
    dup = p["duplicates"]
    counts = ", ".join(f"{k}: {v}" for k, v in p["per_class"].items())
    return ["", "## Prototype set", "", "| measure | value |", "|---|---|",
            f"| prototypes | {p['count']} (dimension {p['dim']}) |",
            f"| duplicate pairs | {dup['pairs']} ({dup['same_source']} on the same source patch, {dup['close']} "
            f"closer than {dup['threshold_rms']:g} RMS per channel) |",
            f"| distinct prototypes | {dup['distinct']} |",
            f"| nearest-neighbour distance | mean {p['nearest_neighbour_distance']['mean']:.4f}, "
            f"min {p['nearest_neighbour_distance']['min']:.4f} |",
            f"| class purity (k = {p['purity']['k']}) | mean {p['purity']['mean']:.3f}, min {p['purity']['min']:.3f}, "
            f"{_pct(p['purity']['share_pure'])} fully pure |",
            f"| classes without prototypes | {p['classes_without_prototypes']} |", "",
            f"Prototypes per class: {counts}."]


def _faithfulness_lines(f: dict[str, Any]) -> list[str]:
    d, rnd = f["deletion"], f["randomisation"]
    curve = lambda c: " -> ".join(f"{v:.2f}" for v in c)  # noqa: E731
    lines = ["", "## Faithfulness", "",
             f"Deletion test over {d['n']} images: the regions of the top 1..{d['steps']} prototypes (by contribution "
             f"to the predicted logit) are hidden one after another (MoRF), or regions of the same sizes at random "
             f"places, or the regions of the {d['steps']} prototypes whose contributions are nearest 0 (LeRF). Regions "
             f"by the {d['rule']} rule, hidden pixels filled by {_FILL_WORDS[d['fill']]}:", "",
             "| hidden | predicted logit, steps 0..S | area |", "|---|---|---|",
             *(f"| {name} | {curve(d['curves'][order])} | {d['areas'][order]:.3f} |"
               for order, name in (("morf", "evidence regions (MoRF)"), ("random", "random regions"),
                                   ("lerf", "least evidence (LeRF)"))), "",
             f"Deletion gap (random - MoRF area): {d['area_gap']:.3f} +- {d['area_gap_se']:.3f} (standard error; 95% "
             f"interval {d['area_gap_ci95'][0]:.3f} to {d['area_gap_ci95'][1]:.3f}); LeRF - MoRF: {d['lerf_gap']:.3f} "
             f"+- {d['lerf_gap_se']:.3f}. The first evidence region lowers the logit more than the random one in "
             f"{_pct(d['top_lower_share'])} of images.", "",
             "Every region rule and fill (positive gaps: the regions shown mattered more than random ones):", "",
             "| region rule | fill | MoRF area | random area | LeRF area | gap (95% interval) | LeRF - MoRF |",
             "|---|---|---|---|---|---|---|"]
    for p in f["deletion_protocols"]:
        a = p["areas"]
        lines.append(f"| {p['rule']} | {p['fill']} | {a['morf']:.3f} | {a['random']:.3f} | {a['lerf']:.3f} | "
                     f"{p['area_gap']:.3f} ({p['area_gap_ci95'][0]:.3f} to {p['area_gap_ci95'][1]:.3f}) | "
                     f"{p['lerf_gap']:.3f} +- {p['lerf_gap_se']:.3f} |")
    return lines + ["",
                    f"Weight randomisation (feature extractor re-initialised), Spearman correlation of the top "
                    f"prototype's similarity map over {rnd['n']} images: mean {rnd['mean_spearman']:.3f}, median "
                    f"{rnd['median_spearman']:.3f}, {_pct(rnd['share_above_half'])} above 0.5 (low is good).",
                    *(line for rule, a in f["alignment_by_rule"].items() for line in ["", *_alignment_lines(a, rule)])]


_FILL_WORDS = {"mean": "the training mean", "road": "ROAD's noisy linear imputation from the pixels around them"}


def _alignment_lines(a: dict[str, Any], rule: str) -> list[str]:
    if not a["n"]:
        return ["Alignment: the top prototype's similarity has no input gradient on any image."]
    return [f"Alignment ({rule} rule) over {a['n']} images: {_pct(a['mass_in_box'])} of the input gradient of the "
            f"top prototype's similarity lies inside its box, which covers {_pct(a['box_share'])} of the image (the "
            f"share an evenly spread gradient would put inside); half of it lies within {a['radius50_px']:.1f} px of "
            f"its centroid, which is a median {a['centroid_offset_px']:.1f} px from the box's centre."]


def _localisation_lines(loc: dict[str, Any]) -> list[str]:
    lines = ["", "## Localisation", ""]
    for rule, hits in loc["by_rule"].items():
        box = f"The top prototype's region by the {rule} rule{' (the default)' if rule == loc['rule'] else ''}"
        if hits["kind"] == "part-box":
            lines.append(f"- {box} overlaps the ground-truth part box with IoU >= {hits['iou_threshold']:g} in "
                         f"{_pct(hits['hit_rate'])} of {hits['n']} images (mean IoU {hits['mean_iou']:.3f}).")
        else:
            lines.append(f"- {box} holds an annotated part in {_pct(hits['hit_rate'])} of {hits['n']} images.")
    if loc["kind"] == "part-points":
        lines += ["", f"Huang et al. (ICCV 2023): consistency {_pct(loc['consistency'])}, stability "
                      f"{_pct(loc['stability'])}."]
    ref = loc.get("aux_reference")
    if ref is not None:
        hit = (f"overlaps the part box with IoU >= {ref['iou_threshold']:g} in {_pct(ref['hit_rate'])} of the "
               f"images (mean IoU {ref['mean_iou']:.3f})" if ref["kind"] == "part-box"
               else f"holds an annotated part in {_pct(ref['hit_rate'])} of the images")
        lines += ["", f"For reference, the box drawn by the activation rule around the class activation map of the "
                      f"auxiliary head h1 (Zhou et al., CVPR 2016) {hit}: the same features, without the prototype "
                      f"layer."]
    dep = loc.get("part_dependence")
    if dep is not None:
        lines += ["", f"Hiding the part box (ROAD fill) lowers the top prototype's similarity by a median "
                      f"{_pct(dep['drop_part'])}, hiding a box of the same size at a random place by "
                      f"{_pct(dep['drop_random'])}; the part matters more in {_pct(dep['part_larger'])} of "
                      f"{dep['n']} images. Where the part matters far more than other places, a region that misses "
                      f"it misses the evidence; where it does not, the model's evidence lies elsewhere."]
    return lines


def _background_lines(b: dict[str, Any]) -> list[str]:
    regions = ", ".join(f"{_pct(v)} by the {rule} rule" for rule, v in b["top_regions"].items())
    lines = ["", "## Background", "",
             f"A region lies on background when under {_pct(b['below_share'])} of its pixels are on the object "
             f"({b['rule']}). The top prototype's region lies on background in {regions}."]
    if b["prototypes"] is not None:
        lines.append(f"Prototypes projected onto a background patch (the latent cell's block of the source image): "
                     f"{_pct(b['prototypes'])}.")
    return lines


def write_outputs(result: dict[str, Any], json_path: Path | None, md_path: Path | None) -> None:
    from nasxserve.io import atomic_write_text

    if json_path is not None:
        atomic_write_text(json_path, json.dumps(result, indent=2) + "\n")
    if md_path is not None:
        atomic_write_text(md_path, render_markdown(result))
