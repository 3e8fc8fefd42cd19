"""Global prototype projection, eq. (9) of NASXNet.

Each prototype p_j is replaced by its nearest latent patch over the whole training split, whatever the
patch's class: ``p_j <- argmin_{z in patches(f(x_i)), i} ||z - p_j||_2``. Its class identity becomes
the class of the image it came from, so per-class prototype counts follow the data. Theorem 1 bounds
how much this can move the top-2 logits when prototypes are already close to real patches.

``class_specific=True`` is ProtoPNet's push instead (Chen et al., 2019, section 2.2, stage 2): each
prototype only looks at patches of images of its own class, so prototype classes never change.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image, ImageDraw

from nasxserve.data.base import ImageSet
from nasxserve.errors import DataError
from nasxserve.boxes import BOX_PERCENTILE, activation_box, cell_centres, move_boxes
from nasxserve.io import atomic_write, atomic_write_json
from nasxserve.protos.layer import distance_to_similarity, squared_distances
from nasxserve.protos.model import ExplainableNet
from nasxserve.protos.evidence import evidence_region_boxes
from nasxserve.regions import EVIDENCE_RULE_VERSION, EVIDENCE_RULE_WORDS
from nasxserve.runtime.format import prototype_context, prototype_patch


RECORDS_FILE = "records.json"   # in the prototypes folder: one record per prototype


@dataclass
class ProjectionRecord:
    """Where prototype ``prototype`` came from.

    sample: index of the source image in the training split; position: (row, col) in the latent grid;
    source_class: label of the source image (now the prototype's class); class_before: the
    prototype's class before projection; distance: squared L2 distance from the prototype before
    projection to the patch that replaced it; box_xyxy: (x0, y0, x1, y1), x1/y1 exclusive, the
    smallest box of the source image holding the pixels at or above the 95th percentile of the
    prototype's upsampled similarity map (section 4.1; ProtoPNet's rule), moved by box_offset; box_offset: (dx,
    dy) pixels every box of this prototype is moved by (:mod:`nasxserve.explain.calibration`), (0, 0) unless the
    run calibrates its boxes; evidence_box_xyxy: the source image's box by the ``evidence`` region rule (where
    hiding pixels lowers the prototype's similarity, :func:`with_evidence_boxes`), None until that is measured
    (it is for every saved projection); evidence_rule_version: the version of that rule which drew it
    (:data:`nasxserve.regions.EVIDENCE_RULE_VERSION`; None in runs from before versions were recorded).
    """

    prototype: int
    sample: int
    position: tuple[int, int]
    source_class: int
    class_before: int
    distance: float
    box_xyxy: tuple[int, int, int, int]
    box_offset: tuple[int, int] = (0, 0)
    evidence_box_xyxy: tuple[int, int, int, int] | None = None
    evidence_rule_version: int | None = None


@dataclass
class NearestPatches:
    """For every prototype j, the nearest latent patch found: squared distance (m,), source sample index
    (m,) int64, flat position in the latent grid (m,) int64, the patch vector (m, D), and the latent grid
    (H', W') (None when no image was scanned)."""

    distance: torch.Tensor
    sample: torch.Tensor
    position: torch.Tensor
    vector: torch.Tensor
    grid: tuple[int, int] | None

    def to(self, device: torch.device | str) -> NearestPatches:
        return NearestPatches(self.distance.to(device), self.sample.to(device), self.position.to(device),
                              self.vector.to(device), self.grid)


class NearestSearch(Protocol):
    """A nearest-patch search as :func:`nearest_patches` does it (``class_specific`` and ``allowed`` as there)."""

    def __call__(self, model: ExplainableNet, images: ImageSet, batch_size: int, device: torch.device, *,
                 class_specific: bool = False, allowed: torch.Tensor | None = None) -> NearestPatches: ...


@torch.no_grad()
def nearest_patches(model: ExplainableNet, images: ImageSet, batch_size: int, device: torch.device,
                    batches: range | None = None, class_specific: bool = False,
                    allowed: torch.Tensor | None = None) -> NearestPatches:
    """For every prototype, the nearest latent patch over ``images``, scanned in unshuffled batches of
    ``batch_size`` (only those numbered in ``batches``, default all); sample indices are into ``images``.
    Ties go to the lower sample index, then the lower position. ``class_specific``: only images whose label
    is the prototype's class count (a prototype of a class without images keeps distance inf). ``allowed``:
    (N, H' * W') bool, only the patches marked True count (None: all)."""
    protos = model.prototype_layer.prototypes
    protos_class = model.prototype_layer.prototype_class
    m = protos.shape[0]
    best_d = torch.full((m,), float("inf"), device=device)
    best_sample = torch.zeros(m, dtype=torch.long, device=device)
    best_pos = torch.zeros(m, dtype=torch.long, device=device)
    best_vec = torch.zeros(m, protos.shape[1], device=device)
    grid = None
    for b in batches if batches is not None else range(images.num_batches(batch_size)):
        start = b * batch_size
        x, y = images.numbered_batch(b, batch_size)
        z = model.latent(x.to(device))                                   # (B, D, H, W)
        _, dim, h, w = z.shape
        grid = (h, w)
        d = squared_distances(z, protos).permute(1, 0, 2, 3).reshape(m, -1)  # (m, B*H*W)
        if class_specific:   # another class's patch never wins, however near
            own = protos_class[:, None] == y.to(device)[None, :]           # (m, B)
            d = d.masked_fill(~own.repeat_interleave(h * w, dim=1), float("inf"))
        if allowed is not None:
            d = d.masked_fill(~allowed[start:start + len(x)].to(device).reshape(1, -1), float("inf"))
        d_min, k = d.min(dim=1)                                          # first minimum: lowest sample, position
        better = d_min < best_d                                          # strict: earlier batches win ties
        if better.any():
            sample_in_batch, pos = k // (h * w), k % (h * w)
            vecs = z.permute(0, 2, 3, 1).reshape(-1, dim)[k]             # (m, D), exact copies
            best_d = torch.where(better, d_min, best_d)
            best_sample = torch.where(better, sample_in_batch + start, best_sample)
            best_pos = torch.where(better, pos, best_pos)
            best_vec = torch.where(better[:, None], vecs, best_vec)
    return NearestPatches(best_d, best_sample, best_pos, best_vec, grid)


def merge_nearest(parts: Sequence[NearestPatches]) -> NearestPatches:
    """The nearest patch per prototype over scans of disjoint samples (one per process): the smallest
    distance wins, ties going to the lower sample index and then the lower position, the order a single
    scan over all the samples keeps. Tensors on one device."""
    best = parts[0]
    for p in parts[1:]:
        earlier = (p.sample < best.sample) | ((p.sample == best.sample) & (p.position < best.position))
        better = (p.distance < best.distance) | ((p.distance == best.distance) & earlier)
        best = NearestPatches(torch.where(better, p.distance, best.distance),
                              torch.where(better, p.sample, best.sample),
                              torch.where(better, p.position, best.position),
                              torch.where(better[:, None], p.vector, best.vector), best.grid or p.grid)
    return best


@torch.no_grad()
def project_prototypes(model: ExplainableNet, images: ImageSet, batch_size: int = 128,
                       device: torch.device | str = "cpu",
                       find_nearest: NearestSearch = nearest_patches,
                       class_specific: bool = False, allowed: torch.Tensor | None = None) -> list[ProjectionRecord]:
    """Eq. (9) in place on ``model``; returns one record per prototype. The model is left in eval mode.

    ``find_nearest`` does the nearest-patch search (the data-parallel trainer passes one that splits the
    scan over processes and returns the same result on every one). ``class_specific``: ProtoPNet's push,
    each prototype replaced by its nearest patch among images of its own class (``find_nearest`` must then
    take ``class_specific``, as :func:`nearest_patches` does); raises :class:`DataError` when a prototype's
    class has no image in ``images``. ``allowed``: (N, H' * W') bool, the only patches a prototype may take
    (None: every patch); :class:`DataError` when none is allowed."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    layer = model.prototype_layer
    search = partial(find_nearest, class_specific=True) if class_specific else find_nearest
    nearest = search(model, images, batch_size, device, allowed=allowed)
    dist, sample, pos, vec = nearest.distance, nearest.sample, nearest.position, nearest.vector
    if allowed is not None and not torch.isfinite(dist).all():
        raise DataError("no patch of the images the prototypes are projected onto may be taken (every patch was "
                        "ruled out); check the data's foreground")
    if class_specific and not torch.isfinite(dist).all():
        missing = sorted(set(layer.prototype_class[~torch.isfinite(dist)].tolist()))
        raise DataError(f"classes {missing} have no image in the set the prototypes are projected onto, so their "
                        f"prototypes have no patch of their class to take; every class needs training images")
    assert nearest.grid is not None, "no image was scanned"
    _, w = nearest.grid
    class_before = layer.prototype_class.clone()
    layer.prototypes.copy_(vec.view_as(layer.prototypes))
    layer.prototype_class.copy_(images.labels.to(device)[sample])

    records: list[ProjectionRecord] = []
    src = sorted(set(sample.tolist()))
    image_hw = images.image_hw
    maps: dict[int, torch.Tensor] = {}
    for chunk in range(0, len(src), batch_size):
        ids = src[chunk:chunk + batch_size]
        x, _ = images.batch(torch.tensor(ids))
        sims = distance_to_similarity(squared_distances(model.latent(x.to(device)), layer.prototypes), layer.eps)
        maps.update(zip(ids, sims))                                      # each (m, H', W')
    for j in range(layer.num_prototypes):
        s = int(sample[j])
        records.append(ProjectionRecord(
            prototype=j, sample=s, position=(int(pos[j]) // w, int(pos[j]) % w),
            source_class=int(layer.prototype_class[j]), class_before=int(class_before[j]),
            distance=float(dist[j]), box_xyxy=activation_box(maps[s][j].cpu().numpy(), image_hw)))
    model.train(was_training)
    return records


@torch.no_grad()
def with_evidence_boxes(model: ExplainableNet, images: ImageSet, records: list[ProjectionRecord],
                        batch_size: int = 128, device: torch.device | str = "cpu") -> list[ProjectionRecord]:
    """``records`` with each prototype's source box by the ``evidence`` region rule
    (:func:`nasxserve.regions.evidence_boxes`): the pixels of its source image whose hiding lowers its similarity
    s_j (eq. (2) of NASXNet) the most, the rule the runtime draws a new image's boxes with by default. Each
    source image runs once with its hidden copies (1 + G images, G <= 113, :func:`nasxserve.regions.evidence_batch`)
    for all the prototypes projected onto it. The model is left in the mode it was in."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    by_sample: dict[int, list[int]] = {}
    for i, r in enumerate(records):
        by_sample.setdefault(r.sample, []).append(i)
    out = list(records)
    try:
        latent_hw: tuple[int, int] | None = None
        for sample, at in by_sample.items():
            x, _ = images.batch(torch.tensor([sample]))
            if latent_hw is None:
                _, _, h, w = model.latent(x.to(device)).shape
                latent_hw = (int(h), int(w))
            prototypes = np.asarray([[records[i].prototype for i in at]])
            boxes = evidence_region_boxes(model, x.numpy(), latent_hw, prototypes, batch_size, device)[0]
            for i, (x0, y0, x1, y1) in zip(at, boxes.tolist()):
                out[i] = replace(records[i], evidence_box_xyxy=(x0, y0, x1, y1),
                                  evidence_rule_version=EVIDENCE_RULE_VERSION)
    finally:
        model.train(was_training)
    return out


def calibrate_records(records: list[ProjectionRecord], offsets: np.ndarray, latent_hw: tuple[int, int],
                      image_hw: tuple[int, int]) -> list[ProjectionRecord]:
    """``records`` with each source box moved by its prototype's offset, (m, 2) int (dx, dy), as every box of
    it is (:func:`nasxserve.boxes.move_boxes`; the source map peaks at the record's latent position on
    the (H', W') grid ``latent_hw``), and that offset recorded, so that the saved patch shows the region the
    prototype's boxes will show in new images."""
    peaks = cell_centres(np.asarray([r.position for r in records]), latent_hw, image_hw)
    moved = move_boxes(np.asarray([r.box_xyxy for r in records]), peaks, offsets[[r.prototype for r in records]],
                       image_hw)
    calibrated = []
    for r, (x0, y0, x1, y1) in zip(records, moved):
        dx, dy = offsets[r.prototype]
        calibrated.append(replace(r, box_xyxy=(int(x0), int(y0), int(x1), int(y1)), box_offset=(int(dx), int(dy))))
    return calibrated


def class_counts(records: list[ProjectionRecord], num_classes: int) -> list[int]:
    """Prototypes per class after projection, (K,)."""
    counts = [0] * num_classes
    for r in records:
        counts[r.source_class] += 1
    return counts


def _to_pil(raw: np.ndarray) -> Image.Image:
    return Image.fromarray(raw[:, :, 0] if raw.shape[2] == 1 else raw).convert("RGB")


def _enlarged(img: Image.Image, min_side: int) -> Image.Image:
    """``img`` scaled by the smallest whole factor that makes its shorter side at least ``min_side`` (nearest
    neighbour: every source pixel becomes a square block, nothing is invented)."""
    scale = max(1, -(-min_side // min(img.size)))
    return img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)


def save_projection(records: list[ProjectionRecord], images: ImageSet, classes: list[str], out_dir: Path,
                    context_min_side: int = 128, patch_min_side: int = 64) -> None:
    """Write ``records.json`` and, for each prototype and each region rule its record has a box of, the source
    patch (its pixels enlarged by a whole factor to ``patch_min_side``: a 4x4 patch of a digit is unreadable at
    its own size) and the source image with the box drawn (enlarged likewise to ``context_min_side``), named as
    a bundle names them (:func:`nasxserve.runtime.format.prototype_patch`, ``prototype_context``): ``NNNN.png``
    and ``NNNN_context.png`` for ProtoPNet's activation box, ``NNNN_evidence.png`` and
    ``NNNN_evidence_context.png`` for the evidence box."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for r in records:
        img = _to_pil(images.raw(r.sample))
        boxes = {"activation": r.box_xyxy, "evidence": r.evidence_box_xyxy}
        for rule, box in boxes.items():
            if box is not None:
                patch, context = (Path(name(r.prototype, rule)).name for name in (prototype_patch, prototype_context))
                _save_png(_enlarged(img.crop(box), patch_min_side), out_dir / patch)
                _save_png(_boxed(img, box, context_min_side), out_dir / context)
    atomic_write_json(out_dir / RECORDS_FILE, {
        "box_rule": f"pixels >= {BOX_PERCENTILE:g}th percentile of the bicubic-upsampled similarity map, then "
                    f"moved by box_offset (nasxserve.boxes.move_boxes)",
        "evidence_box_rule": EVIDENCE_RULE_WORDS,
        "records": [dict(asdict(r), source_label=classes[r.source_class]) for r in records],
    })


def _boxed(img: Image.Image, box: tuple[int, int, int, int], min_side: int) -> Image.Image:
    """``img`` enlarged to ``min_side`` (:func:`_enlarged`) with the exclusive ``box`` drawn in gold."""
    x0, y0, x1, y1 = box
    out = _enlarged(img, min_side)
    scale = out.width // img.width
    ImageDraw.Draw(out).rectangle((x0 * scale, y0 * scale, x1 * scale - 1, y1 * scale - 1),
                                  outline=(255, 215, 0), width=max(1, scale // 2))
    return out


def _save_png(img: Image.Image, path: Path) -> None:
    atomic_write(path, lambda f: img.save(f, format="PNG"))
