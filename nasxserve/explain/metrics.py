"""What the explanations are worth: accuracy, the prototype set, faithfulness and localisation.

The prototype-set measures check NASXNet's claim (section 4.3) that the separation cost of eq. (6)
removes the duplicated prototypes ProtoPNet ends up with; the faithfulness measures check that the
evidence a prediction shows is the evidence it used; the localisation measures check that it points at
the part of the image that defines the class, where the dataset says which part that is.

- Duplicates: two prototypes projected onto the same latent patch of the same training image, or whose
  vectors are closer than a threshold (a root-mean-square difference per channel, so that one threshold
  means the same for any prototype dimension D).
- Class purity: of a prototype's k nearest training images (each image represented by its patch
  closest to the prototype, so that the patches of one image cannot fill all k places), the share whose
  label is the prototype's class.
- Deletion test (:mod:`nasxserve.explain.deletion`): hide the regions of the prototypes that contribute most
  to the predicted logit and watch that logit fall, against hiding regions of the same sizes at random places
  and the regions of the prototypes whose contributions are nearest 0, with the mean fill and ROAD's imputation.
- Weight randomisation (Adebayo et al., "Sanity checks for saliency maps", NeurIPS 2018): similarity
  maps that survive re-initialising the feature extractor do not explain the trained model.
- Alignment (Sacha et al., "Interpretability benchmark for evaluating spatial misalignment of prototypical
  parts explanations", AAAI 2024): how much of what the top prototype's similarity depends on (its input
  gradient) lies inside the box drawn for it.
- Class-activation reference (Zhou et al., CVPR 2016): the auxiliary head h1's class activation map, boxed
  by the prototypes' rule, localises with the same feature extractor but no prototype layer; the gap
  between the two says whether a miss comes from the features or from the prototypes.
- Consistency and stability (Huang et al., "Evaluation and improvement of interpretability for
  self-explainable part-prototype networks", ICCV 2023): does a prototype fall on the same annotated
  part across the images of its class, and on the same part again when the image is slightly perturbed.

Every function that runs the model takes an :class:`~nasxserve.protos.model.ExplainableNet` in eval
mode and an :class:`~nasxserve.data.base.ImageSet`; the others take arrays, so that each measure can be
checked by hand on constructed data.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata

from nasxserve.data.base import ImageSet
from nasxserve.boxes import activation_boxes, box_masks, upsample_bicubic
from nasxserve.explain.consistency import own_class_share
from nasxserve.explain.deletion import (FILLS, ORDERS, ROAD_NOISE, Deletion, hide, order_curves, random_places,
                                       summarise)
from nasxserve.protos.evidence import evidence_region_boxes, similarities_of
from nasxserve.regions import REGION_RULES
from nasxserve.protos.model import ExplainableNet

DUPLICATE_RMS = 0.01        # per-channel RMS difference under which two prototype vectors are the same
PURITY_K = 10
IOU_HIT = 0.5
# Huang et al. take the 72 x 72 region around a prototype's peak in a 224 x 224 image and call a
# prototype consistent when one part falls in that region in at least 80% of its class's images; the
# perturbation is Gaussian noise of std 0.2, clipped to +-0.25, on the normalised image.
REGION_SHARE = 72 / 224
CONSISTENCY_THRESHOLD = 0.8
NOISE_STD, NOISE_CLIP = 0.2, 0.25


# ---------------------------------------------------------------------------------------- model passes
@dataclass
class Scan:
    """The model's outputs on every image of a set, in order.

    logits: (N, K) prototype path; aux_logits: (N, K) auxiliary head h1, None without one; predicted: (N,)
    argmax of ``logits``; top_prototype: (N,) the prototype with the largest
    contribution ``w[pred, j] * similarity[j]`` to the predicted logit (the first piece of evidence a
    client is shown); top_maps: (N, H', W') that prototype's similarity map; cam_maps: (N, H', W') h1's class
    activation map of the predicted class (:meth:`ExplainableNet.class_activation_map`), None without h1:
    boxed by the same rule as a prototype's similarity map, it shows how well the same feature extractor
    localises without the prototype layer; own_class_share: (N,) the share of the absolute contributions to the
    predicted logit carried by prototypes of the predicted class
    (:func:`nasxserve.explain.consistency.own_class_share`).
    """

    logits: np.ndarray
    aux_logits: np.ndarray | None
    predicted: np.ndarray
    top_prototype: np.ndarray
    top_maps: np.ndarray
    cam_maps: np.ndarray | None
    own_class_share: np.ndarray


def _numbered_batches(images: ImageSet, batch_size: int,
                      device: torch.device) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(index of the batch's first image, x, y) for the unshuffled batches of ``images``, on ``device``."""
    for b, (x, y) in enumerate(images.batches(batch_size, device=device)):
        yield b * batch_size, x, y


@torch.no_grad()
def scan(model: ExplainableNet, images: ImageSet, batch_size: int = 256, device: torch.device | str = "cpu") -> Scan:
    """Run the model over ``images`` in order."""
    device = torch.device(device)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in Scan.__dataclass_fields__}
    for _, x, _ in _numbered_batches(images, batch_size, device):
        out = model(x)
        pred = out.logits.argmax(1)
        top = model.contributions(out.protos.similarities, pred).argmax(1)
        maps = out.protos.similarity_maps[torch.arange(len(x), device=device), top]
        cams = model.class_activation_map(out.features, pred) if model.aux_head is not None else None
        share = own_class_share(model.last_layer.weight.detach().cpu().numpy(),
                                out.protos.similarities.float().cpu().numpy(), pred.cpu().numpy(),
                                model.prototype_layer.prototype_class.cpu().numpy())
        for key, value in (("logits", out.logits), ("aux_logits", out.aux_logits), ("predicted", pred),
                           ("top_prototype", top), ("top_maps", maps), ("cam_maps", cams),
                           ("own_class_share", torch.from_numpy(share))):
            if value is not None:   # a model without h1 (ProtoPNet) has no aux_logits nor cam_maps
                parts[key].append(value.float().cpu().numpy() if value.is_floating_point() else value.cpu().numpy())
    arrays: dict[str, Any] = {k: np.concatenate(v) if v else None for k, v in parts.items()}   # None: no h1
    return Scan(**arrays)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share of rows whose label is among the ``k`` largest logits (ties broken towards the lower class).
    logits: (N, K); labels: (N,). ``k`` is capped at K."""
    k = min(k, logits.shape[1])
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


# ---------------------------------------------------------------------------------------- prototype set
@dataclass
class Duplicates:
    """pairs: (i, j) with i < j judged duplicates; same_source: how many of them were projected onto the
    same patch of the same image; close: how many are within the threshold (a pair can be both);
    distinct: prototypes left when every duplicate group counts once; threshold_rms: the threshold."""

    pairs: list[tuple[int, int]]
    same_source: int
    close: int
    distinct: int
    threshold_rms: float

    def summary(self) -> dict:
        return {"pairs": len(self.pairs), "same_source": self.same_source, "close": self.close,
                "prototypes_in_pairs": len({i for pair in self.pairs for i in pair}),
                "distinct": self.distinct, "threshold_rms": self.threshold_rms}


def squared_distance_matrix(prototypes: np.ndarray) -> np.ndarray:
    """(m, D) -> (m, m) squared L2 distances, by direct differences (exact zeros for equal vectors)."""
    p = prototypes.astype(np.float64)
    return ((p[:, None, :] - p[None, :, :]) ** 2).sum(axis=-1)


def duplicate_prototypes(prototypes: np.ndarray, sources: np.ndarray | None = None,
                         threshold_rms: float = DUPLICATE_RMS) -> Duplicates:
    """Pairs of prototypes that are the same prototype twice.

    Args:
        prototypes: (m, D) prototype vectors (each (D, 1, 1) prototype flattened).
        sources: (m, 2) int (source image index, flat latent position) from the last projection, or None.
        threshold_rms: two vectors closer than ``sqrt(D) * threshold_rms`` in L2 count as duplicates.
    """
    m, dim = prototypes.shape
    d2 = squared_distance_matrix(prototypes)
    close = d2 < dim * threshold_rms ** 2
    same = np.zeros_like(close)
    if sources is not None:
        s = np.asarray(sources)
        same = (s[:, None, :] == s[None, :, :]).all(axis=-1)
    upper = np.triu(np.ones((m, m), dtype=bool), k=1)
    dup = (close | same) & upper
    pairs = [(int(i), int(j)) for i, j in zip(*np.nonzero(dup))]
    return Duplicates(pairs=pairs, same_source=int((same & upper).sum()), close=int((close & upper).sum()),
                      distinct=_groups(m, pairs), threshold_rms=threshold_rms)


def _groups(m: int, pairs: list[tuple[int, int]]) -> int:
    """Connected components of m nodes joined by ``pairs`` (union-find)."""
    parent = list(range(m))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        parent[root(i)] = root(j)
    return len({root(i) for i in range(m)})


def nearest_prototype_distances(prototypes: np.ndarray) -> np.ndarray:
    """(m, D) -> (m,) L2 distance from each prototype to its nearest other prototype."""
    d2 = squared_distance_matrix(prototypes)
    np.fill_diagonal(d2, np.inf)
    return np.sqrt(d2.min(axis=1))


def class_purity(min_distances: np.ndarray, labels: np.ndarray, prototype_class: np.ndarray,
                 k: int = PURITY_K) -> np.ndarray:
    """Per prototype, the share of its k nearest training images that belong to its class.

    Args:
        min_distances: (N, m) each image's smallest squared distance to each prototype (its closest patch).
        labels: (N,) the images' classes.
        prototype_class: (m,).
        k: neighbours (capped at N); ties go to the lower image index.
    Returns:
        (m,) in [0, 1].
    """
    k = min(k, len(labels))
    nearest = np.argsort(min_distances, axis=0, kind="stable")[:k]        # (k, m)
    return (labels[nearest] == prototype_class[None, :]).mean(axis=0)


@torch.no_grad()
def min_distances_over(model: ExplainableNet, images: ImageSet, batch_size: int = 256,
                       device: torch.device | str = "cpu") -> np.ndarray:
    """(N, m) smallest squared distance of each image's patches to each prototype."""
    device = torch.device(device)
    return np.concatenate([model.prototype_layer(model.latent(x)).min_distances.float().cpu().numpy()
                           for _, x, _ in _numbered_batches(images, batch_size, device)])


# ---------------------------------------------------------------------------------------- faithfulness
def _logits_of(model: ExplainableNet, device: torch.device, batch_size: int) -> Callable[[np.ndarray], np.ndarray]:
    """The model as a numpy function (B, C, H, W) -> (B, K) prototype-path logits, in chunks of ``batch_size``."""
    @torch.no_grad()
    def logits(x: np.ndarray) -> np.ndarray:
        return np.concatenate([model(torch.from_numpy(x[i:i + batch_size]).to(device)).logits.float().cpu().numpy()
                               for i in range(0, len(x), batch_size)])
    return logits


def region_boxes_of(model: ExplainableNet, x: torch.Tensor, maps: np.ndarray, prototypes: np.ndarray, rule: str,
                    box_offsets: np.ndarray | None = None, batch_size: int = 256) -> np.ndarray:
    """The boxes of chosen prototypes by a region rule (:mod:`nasxserve.regions`), per image.

    Args:
        x: (B, C, H, W) normalised images on the model's device.
        maps: (B, m, H', W') the model's similarity maps of ``x``.
        prototypes: (B, n) int prototype ids per image.
        box_offsets: (m, 2) each prototype's calibrated offset (``activation`` rule only), or None.
    Returns:
        (B, n, 4) int64 exclusive boxes in the images' pixels.
    """
    if rule not in REGION_RULES:
        raise ValueError(f"unknown region rule {rule!r}; choose one of {', '.join(REGION_RULES)}")
    image_hw, latent_hw = (int(x.shape[2]), int(x.shape[3])), (int(maps.shape[2]), int(maps.shape[3]))
    if rule == "activation":
        boxes = [activation_boxes(maps[b, prototypes[b]], image_hw,
                                  offsets=box_offsets[prototypes[b]] if box_offsets is not None else None)
                 for b in range(len(x))]
    else:
        return evidence_region_boxes(model, x.float().cpu().numpy(), latent_hw, prototypes, batch_size, x.device)
    return np.asarray(boxes, dtype=np.int64).reshape(len(x), prototypes.shape[1], 4)


@torch.no_grad()
def deletion_test(model: ExplainableNet, images: ImageSet, steps: int = 5, batch_size: int = 128,
                  device: torch.device | str = "cpu", seed: int = 0, box_offsets: np.ndarray | None = None,
                  rules: Sequence[str] = REGION_RULES, fills: Sequence[str] = FILLS) -> list[Deletion]:
    """Hide the evidence and compare with hiding elsewhere (:mod:`nasxserve.explain.deletion`), for every
    region rule and fill.

    For each image the ``steps`` prototypes with the largest contributions ``w[pred, j] s_j`` to the predicted
    logit (MoRF), and the ``steps`` whose contributions are nearest 0 (LeRF), are boxed by the rule from the
    unhidden image;
    step s hides boxes 1..s, and the random order hides boxes of the MoRF sizes at places drawn from ``seed``.
    The predicted class is the one before anything is hidden. ``box_offsets`` (m, 2) moves the activation
    boxes where the run calibrated them. Returns one :class:`Deletion` per (rule, fill), rules outermost.
    """
    device = torch.device(device)
    places, noise = np.random.default_rng(seed), np.random.default_rng(seed + 1)
    steps = min(steps, model.prototype_layer.num_prototypes)
    noise_std = ROAD_NOISE / images.pixel_std
    logits_of = _logits_of(model, device, batch_size)
    curves: dict[tuple[str, str], dict[str, list[np.ndarray]]] = {
        (r, f): {o: [] for o in ORDERS} for r in rules for f in fills}
    for _, x, _ in _numbered_batches(images, batch_size, device):
        out = model(x)
        pred = out.logits.argmax(1)
        contributions = model.contributions(out.protos.similarities, pred)
        most = contributions.argsort(dim=1, descending=True)[:, :steps]
        least = contributions.abs().argsort(dim=1, stable=True)[:, :steps]   # nearest 0, for or against
        chosen = torch.cat([most, least], dim=1).cpu().numpy()                      # MoRF, then LeRF
        pixels, target = x.float().cpu().numpy(), pred.cpu().numpy()
        maps = out.protos.similarity_maps.float().cpu().numpy()
        for rule in rules:
            boxes = region_boxes_of(model, x, maps, chosen, rule, box_offsets, batch_size)
            ordered = {"morf": boxes[:, :steps], "lerf": boxes[:, steps:],
                       "random": random_places(boxes[:, :steps], images.image_hw, places)}
            for fill in fills:
                for order, curve in order_curves(logits_of, pixels, target, ordered, fill, noise_std, noise).items():
                    curves[rule, fill][order].append(curve)
    return [summarise(r, f, {o: np.concatenate(c[o]) for o in ORDERS}) for (r, f), c in curves.items()]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two equally shaped arrays (average ranks for ties); 0 when either
    is constant (no ranking to agree with)."""
    ra, rb = rankdata(a.ravel()), rankdata(b.ravel())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else 0.0


def randomised_features(model: ExplainableNet, seed: int = 0) -> ExplainableNet:
    """A copy of ``model`` whose feature extractor f is re-initialised (every submodule's own
    ``reset_parameters``; BatchNorm statistics reset too); add-on layers, prototypes and the last layer
    are kept. Adebayo et al.'s model-randomisation test applied to f at once."""
    copied = copy.deepcopy(model)
    torch.manual_seed(seed)
    for module in copied.features.modules():
        if hasattr(module, "reset_running_stats"):
            module.reset_running_stats()
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return copied.eval()


@dataclass
class Randomisation:
    """Spearman correlation, per image, between the trained model's top-prototype similarity map and the
    map of the same prototype once the feature extractor is randomised: mean, median and the share of
    images above 0.5. Low values mean the maps depend on what the network learned."""

    n: int
    mean_spearman: float
    median_spearman: float
    share_above_half: float


@torch.no_grad()
def randomisation_check(model: ExplainableNet, images: ImageSet, top_prototype: np.ndarray, top_maps: np.ndarray,
                        batch_size: int = 256, device: torch.device | str = "cpu", seed: int = 0) -> Randomisation:
    """Compare the trained maps of :class:`Scan` (``top_prototype`` (N,), ``top_maps`` (N, H', W'), one per
    image of ``images``) with the randomised model's maps of the same prototypes."""
    device = torch.device(device)
    random_model = randomised_features(model, seed).to(device)
    rhos = []
    for start, x, _ in _numbered_batches(images, batch_size, device):
        maps = random_model(x).protos.similarity_maps
        for i in range(len(x)):
            j = int(top_prototype[start + i])
            rhos.append(spearman(top_maps[start + i], maps[i, j].float().cpu().numpy()))
    r = np.asarray(rhos)
    return Randomisation(n=len(r), mean_spearman=float(r.mean()), median_spearman=float(np.median(r)),
                         share_above_half=float((r > 0.5).mean()))


@dataclass
class Alignment:
    """Where the input pixels that move the top prototype's similarity lie, against the box shown for it.

    mass_in_box: mean share of the input-gradient magnitude inside the top prototype's box; box_share:
    mean share of the image the box covers (what a gradient spread evenly would give); radius50_px:
    median radius, around the gradient's centroid, of the smallest disc holding half of it;
    centroid_offset_px: median distance from the box's centre to that centroid. Images whose similarity has
    no gradient at all (a saturated or exact match) are left out of ``n``; with none left the measures are None."""

    n: int
    mass_in_box: float | None
    box_share: float | None
    radius50_px: float | None
    centroid_offset_px: float | None


def _radius_holding(mass: torch.Tensor, share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, W) non-negative mass, some in every image -> ((B, 2) x, y centroid in pixels, (B,) radius of the
    smallest disc around it, through pixel centres, that holds ``share`` of the mass)."""
    h, w = mass.shape[1:]
    ys, xs = torch.meshgrid(torch.arange(h, dtype=mass.dtype), torch.arange(w, dtype=mass.dtype), indexing="ij")
    total = mass.sum(dim=(1, 2))
    cx = (mass * xs).sum(dim=(1, 2)) / total
    cy = (mass * ys).sum(dim=(1, 2)) / total
    r = torch.hypot(xs[None] - cx[:, None, None], ys[None] - cy[:, None, None]).flatten(1)
    order = r.argsort(dim=1)
    held = mass.flatten(1).gather(1, order).cumsum(dim=1) / total[:, None]
    first = (held < share - 1e-9).sum(dim=1).clamp_max(h * w - 1)
    return torch.stack([cx, cy], 1), r.gather(1, order).gather(1, first[:, None])[:, 0]


def evidence_alignment(model: ExplainableNet, images: ImageSet, top_prototype: np.ndarray, boxes: np.ndarray,
                       batch_size: int = 128, device: torch.device | str = "cpu") -> Alignment:
    """Spatial misalignment of the evidence (Sacha et al., "Interpretability benchmark for evaluating
    spatial misalignment of prototypical parts explanations", AAAI 2024): a prototype's similarity is
    computed from a latent cell whose receptive field can reach far beyond the box drawn for it. The
    gradient of the top prototype's similarity (its maximum over positions) with respect to the input
    (Luo et al.'s effective receptive field, NeurIPS 2016) shows which pixels it actually depends on.

    Args:
        top_prototype: (N,) the prototype of each image of ``images`` (:attr:`Scan.top_prototype`).
        boxes: (N, 4) exclusive boxes drawn for it (:func:`top_boxes`).
    """
    device = torch.device(device)
    inside, share, radius, offset = [], [], [], []
    for start, x, _ in _numbered_batches(images, batch_size, device):
        x = x.detach().requires_grad_(True)
        rows = torch.arange(len(x), device=device)
        top = torch.as_tensor(top_prototype[start:start + len(x)], device=device)
        similarity = model(x).protos.similarity_maps[rows, top].flatten(1).max(dim=1).values
        grad, = torch.autograd.grad(similarity.sum(), x)   # images do not interact in eval mode
        mass = grad.abs().sum(dim=1).double().cpu()                                     # (B, H, W)
        total = mass.sum(dim=(1, 2))
        keep = total > 0
        mass, total, chosen = mass[keep], total[keep], boxes[start:start + len(x)][keep.numpy()]
        masks = torch.from_numpy(box_masks(chosen, (x.shape[2], x.shape[3])))
        inside.append((mass * masks).sum(dim=(1, 2)) / total)
        share.append(masks.flatten(1).double().mean(dim=1))
        centroid, r50 = _radius_holding(mass, 0.5)
        centre = torch.from_numpy((chosen[:, :2] + chosen[:, 2:]) / 2.0 - 0.5)        # pixel-centre coordinates
        radius.append(r50)
        offset.append(torch.linalg.vector_norm(centroid - centre, dim=1))
    inside_all = torch.cat(inside).numpy()
    if not len(inside_all):
        return Alignment(0, None, None, None, None)
    median = lambda parts: float(np.median(torch.cat(parts).numpy()))  # noqa: E731
    return Alignment(n=len(inside_all), mass_in_box=float(inside_all.mean()), box_share=float(torch.cat(share).mean()),
                     radius50_px=median(radius), centroid_offset_px=median(offset))


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
        for start, x, _ in _numbered_batches(images, batch_size, device)])


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
    for start, x, _ in _numbered_batches(images, batch_size, device):
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
    for start, x, y in _numbered_batches(images, batch_size, device):
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
