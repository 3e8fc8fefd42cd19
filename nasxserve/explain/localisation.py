"""Does the evidence point at the part that defines the class? Measures for data that says where that part is
(``shapes``' glyph boxes, CUB's part points).

- Part hits: the top prototype's box by each region rule (:mod:`nasxserve.regions`) against the part's box
  (IoU >= 0.5) or points.
- Part dependence: how much the top prototype's similarity drops when the part is hidden, against a box of the
  same size off the part, which tells a model whose evidence lies elsewhere from a region rule that misses it.
- Class-activation reference (Zhou et al., CVPR 2016): the auxiliary head h1's class activation map, boxed
  by the prototypes' rule, localises with the same feature extractor but no prototype layer; the gap
  between the two says whether a miss comes from the features or from the prototypes.
- Consistency and stability (Huang et al., "Evaluation and improvement of interpretability for
  self-explainable part-prototype networks", ICCV 2023): does a prototype fall on the same annotated
  part across the images of its class, and on the same part again when the image is slightly perturbed.

Functions that run the model take an :class:`~nasxserve.protos.model.ExplainableNet` in eval mode and an
:class:`~nasxserve.data.base.ImageSet`; the others take arrays.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from nasxserve.boxes import activation_boxes, box_masks, upsample_bicubic
from nasxserve.data.base import ImageSet
from nasxserve.explain.deletion import ROAD_NOISE, hide, random_places
from nasxserve.explain.metrics import numbered_batches, region_boxes_of
from nasxserve.protos.evidence import similarities_of
from nasxserve.protos.model import ExplainableNet

IOU_HIT = 0.5
# Huang et al. take the 72 x 72 region around a prototype's peak in a 224 x 224 image and call a
# prototype consistent when one part falls in that region in at least 80% of its class's images; the
# perturbation is Gaussian noise of std 0.2, clipped to +-0.25, on the normalised image.
REGION_SHARE = 72 / 224
CONSISTENCY_THRESHOLD = 0.8
NOISE_STD, NOISE_CLIP = 0.2, 0.25


# ---------------------------------------------------------------------------------------- regions
@torch.no_grad()
def top_region_boxes(model: ExplainableNet, images: ImageSet, top_prototype: np.ndarray, rule: str,
                     box_offsets: np.ndarray | None = None, batch_size: int = 128,
                     device: torch.device | str = "cpu") -> np.ndarray:
    """(N, 4) the box of each image's top prototype (``top_prototype`` (N,), :attr:`Scan.top_prototype`) by
    ``rule`` (:mod:`nasxserve.regions`)."""
    device = torch.device(device)
    if not len(images):
        return np.zeros((0, 4), np.int64)
    return np.concatenate([
        region_boxes_of(model, x, model(x).protos.similarity_maps.float().cpu().numpy(),
                        top_prototype[start:start + len(x), None], rule, box_offsets, batch_size)[:, 0]
        for start, x, _ in numbered_batches(images, batch_size, device)])


# ---------------------------------------------------------------------------------------- localisation
def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of exclusive (x0, y0, x1, y1) boxes, (..., 4) x (..., 4) -> (...)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    area = lambda t: (t[..., 2] - t[..., 0]) * (t[..., 3] - t[..., 1])  # noqa: E731
    union = area(a) + area(b) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def parts_in_box(box: np.ndarray, parts: np.ndarray) -> np.ndarray:
    """Which visible parts lie in a box. box: (4,) exclusive x0, y0, x1, y1 in pixels; parts: (P, 3)
    as x, y, visible. Returns (P,) bool."""
    x, y, visible = parts[:, 0], parts[:, 1], parts[:, 2] > 0
    return visible & (x >= box[0]) & (x < box[2]) & (y >= box[1]) & (y < box[3])


@dataclass
class Localisation:
    """kind: "part-box" (IoU with a ground-truth part box, e.g. shapes) or "part-points" (annotated part
    locations inside the box, e.g. CUB's part_locs.txt); hit_rate: share of images whose top prototype's
    box hits (IoU >= ``iou_threshold``, or holds at least one visible part); mean_iou for part boxes."""

    kind: str
    n: int
    hit_rate: float
    mean_iou: float | None = None
    iou_threshold: float | None = None


@dataclass
class PartDependence:
    """Whether the top prototype's evidence is the ground-truth part, over n images: the median drop of its
    similarity s_j (eq. (2) of NASXNet), as a share of s_j, when the part's box is hidden (``drop_part``) and
    when a box of the same size at a random place is (``drop_random``, the control), and the share of images
    where hiding the part lowers s_j more (``part_larger``). The random box never overlaps the part where
    there is room for it elsewhere. With drop_part well above drop_random, the model's
    evidence is on the part, and a region that misses the part misses the evidence; with both alike, the
    evidence lies elsewhere."""

    n: int
    drop_part: float
    drop_random: float
    part_larger: float


@torch.no_grad()
def part_dependence(model: ExplainableNet, images: ImageSet, top_prototype: np.ndarray, batch_size: int = 128,
                    device: torch.device | str = "cpu", seed: int = 0) -> PartDependence:
    """:class:`PartDependence` of ``images`` (whose ``boxes`` are the part boxes) and each image's top prototype
    ``top_prototype`` (n,). Boxes are hidden with ROAD's noisy linear imputation
    (:func:`nasxserve.explain.deletion.hide`), random places drawn from ``seed``."""
    if images.boxes is None:
        raise ValueError("part_dependence needs images with part boxes")
    device = torch.device(device)
    places, noise = np.random.default_rng(seed), np.random.default_rng(seed + 1)
    noise_std = ROAD_NOISE / images.pixel_std
    similarity = similarities_of(model, device, batch_size)
    truth = np.concatenate([np.floor(images.boxes[:, :2]), np.ceil(images.boxes[:, 2:])], axis=1).astype(np.int64)
    drops: dict[str, list[np.ndarray]] = {"part": [], "random": []}
    for start, x, _ in numbered_batches(images, batch_size, device):
        pixels = x.float().cpu().numpy()
        at = np.arange(len(pixels))
        top = top_prototype[start:start + len(pixels)]
        s = similarity(pixels)[at, top]
        part = truth[start:start + len(pixels)]
        for name, boxes in (("part", part), ("random", _places_off(part, images.image_hw, places))):
            hidden = hide(pixels, box_masks(boxes, images.image_hw), "road", noise_std, noise)
            drops[name].append((s - similarity(hidden)[at, top]) / np.maximum(np.abs(s), 1e-12))
    part_drop, random_drop = np.concatenate(drops["part"]), np.concatenate(drops["random"])
    return PartDependence(n=int(len(part_drop)), drop_part=float(np.median(part_drop)),
                          drop_random=float(np.median(random_drop)),
                          part_larger=float((part_drop > random_drop).mean()))


def _places_off(boxes: np.ndarray, image_hw: tuple[int, int], rng: np.random.Generator, tries: int = 100) -> np.ndarray:
    """(n, 4) boxes of the sizes of ``boxes`` at random places that do not overlap them (:func:`random_places`
    drawn again while they do, up to ``tries`` times; a box too large to be placed apart keeps its last draw)."""
    out = random_places(boxes, image_hw, rng)
    for _ in range(tries):
        overlapping = box_iou(out, boxes) > 0
        if not overlapping.any():
            break
        out[overlapping] = random_places(boxes[overlapping], image_hw, rng)
    return out


def top_boxes(top_maps: np.ndarray, image_hw: tuple[int, int], offsets: np.ndarray | None = None) -> np.ndarray:
    """(n, H', W') top-prototype similarity maps -> (n, 4) boxes by the 95th-percentile rule, each moved by its
    prototype's calibrated offset where ``offsets`` (n, 2) is given."""
    return np.asarray(activation_boxes(top_maps, image_hw, offsets=offsets), dtype=np.int64).reshape(-1, 4)


def part_box_hits(boxes: np.ndarray, truth: np.ndarray, iou_threshold: float = IOU_HIT) -> Localisation:
    """boxes, truth: (n, 4). Hits are IoU >= ``iou_threshold``."""
    iou = box_iou(boxes, truth)
    return Localisation("part-box", len(iou), float((iou >= iou_threshold).mean()), float(iou.mean()),
                        iou_threshold)


def part_point_hits(boxes: np.ndarray, parts: np.ndarray) -> Localisation:
    """boxes: (n, 4); parts: (n, P, 3). A hit is a box holding at least one visible part."""
    hits = [parts_in_box(b, p).any() for b, p in zip(boxes, parts)]
    return Localisation("part-points", len(hits), float(np.mean(hits)))


def peak_regions(maps: np.ndarray, image_hw: tuple[int, int], half: int) -> np.ndarray:
    """Huang et al.'s region of a prototype in an image: the square of side 2 * ``half`` around the
    peak of its bicubically upsampled similarity map, clipped to the image.

    maps: (n, H', W') -> (n, 4) exclusive boxes (first peak in row-major order on ties)."""
    up = upsample_bicubic(maps, image_hw).reshape(len(maps), -1)
    peak = up.argmax(axis=1)
    r, c = peak // image_hw[1], peak % image_hw[1]
    return np.stack([np.maximum(c - half, 0), np.maximum(r - half, 0),
                     np.minimum(c + half, image_hw[1]), np.minimum(r + half, image_hw[0])], axis=1)


@torch.no_grad()
def part_hits_per_prototype(model: ExplainableNet, images: ImageSet, batch_size: int = 128,
                            device: torch.device | str = "cpu", noise_seed: int | None = None,
                            region_share: float = REGION_SHARE) -> dict[int, np.ndarray]:
    """For every prototype j, (n_j, P) bool: which visible parts fall in its peak region in each image of
    its class (``images.parts`` (N, P, 3) required). With ``noise_seed`` the normalised images first get
    Gaussian noise (std 0.2, clipped to +-0.25, Huang et al.'s perturbation)."""
    assert images.parts is not None, "part annotations are required"
    device = torch.device(device)
    gen = torch.Generator().manual_seed(noise_seed) if noise_seed is not None else None
    proto_class = model.prototype_layer.prototype_class.cpu().numpy()
    hits: dict[int, list[np.ndarray]] = {j: [] for j in range(len(proto_class))}
    for start, x, y in numbered_batches(images, batch_size, device):
        if gen is not None:
            x = x + (torch.randn(x.shape, generator=gen) * NOISE_STD).clamp_(-NOISE_CLIP, NOISE_CLIP).to(device)
        image_hw = (x.shape[2], x.shape[3])
        half = max(1, int(round(region_share * min(image_hw) / 2)))
        maps = model(x).protos.similarity_maps.float().cpu().numpy()           # (B, m, H', W')
        for i, label in enumerate(y.tolist()):
            mine = np.nonzero(proto_class == label)[0]
            if len(mine) == 0:
                continue
            regions = peak_regions(maps[i, mine], image_hw, half)
            for j, region in zip(mine, regions):
                hits[int(j)].append(parts_in_box(region, images.parts[start + i]))
    return {j: np.asarray(v, dtype=bool).reshape(len(v), -1) for j, v in hits.items() if v}


def consistency_score(hits: dict[int, np.ndarray], visible: dict[int, np.ndarray],
                      threshold: float = CONSISTENCY_THRESHOLD) -> float:
    """Huang et al.'s consistency: the share of prototypes for which some part is in the prototype's
    region in at least ``threshold`` of the class's images where that part is visible.

    hits, visible: per prototype (n_j, P) bool."""
    consistent = []
    for j, h in hits.items():
        seen = visible[j].sum(axis=0)
        freq = h.sum(axis=0) / np.maximum(seen, 1)
        consistent.append(bool((freq >= threshold).any()))
    return float(np.mean(consistent)) if consistent else float("nan")


def stability_score(clean: dict[int, np.ndarray], perturbed: dict[int, np.ndarray]) -> float:
    """Huang et al.'s stability: per prototype, the share of its class's images whose set of parts in its
    region is unchanged by the perturbation; averaged over prototypes. Both: per prototype (n_j, P)."""
    same = [float((clean[j] == perturbed[j]).all(axis=1).mean()) for j in clean]
    return float(np.mean(same)) if same else float("nan")


def visible_parts_per_prototype(model: ExplainableNet, images: ImageSet) -> dict[int, np.ndarray]:
    """Per prototype, (n_j, P) bool: which parts are visible in each image of its class (the denominator
    of :func:`consistency_score`)."""
    assert images.parts is not None, "part annotations are required"
    proto_class = model.prototype_layer.prototype_class.cpu().numpy()
    labels = images.labels.numpy()
    return {int(j): images.parts[labels == c][:, :, 2] > 0 for j, c in enumerate(proto_class) if (labels == c).any()}
