"""What the explanations are worth: accuracy, the prototype set and faithfulness (localisation, where the data
says which part defines the class, is :mod:`nasxserve.explain.localisation`).

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
from nasxserve.boxes import activation_boxes, box_masks
from nasxserve.explain.consistency import own_class_share
from nasxserve.explain.deletion import (FILLS, ORDERS, ROAD_NOISE, Deletion, order_curves, random_places,
                                       summarise)
from nasxserve.protos.evidence import evidence_region_boxes
from nasxserve.regions import REGION_RULES
from nasxserve.protos.model import ExplainableNet

DUPLICATE_RMS = 0.01        # per-channel RMS difference under which two prototype vectors are the same
PURITY_K = 10


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


def numbered_batches(images: ImageSet, batch_size: int,
                      device: torch.device) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(index of the batch's first image, x, y) for the unshuffled batches of ``images``, on ``device``."""
    for b, (x, y) in enumerate(images.batches(batch_size, device=device)):
        yield b * batch_size, x, y


@torch.no_grad()
def scan(model: ExplainableNet, images: ImageSet, batch_size: int = 256, device: torch.device | str = "cpu") -> Scan:
    """Run the model over ``images`` in order."""
    device = torch.device(device)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in Scan.__dataclass_fields__}
    for _, x, _ in numbered_batches(images, batch_size, device):
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
                           for _, x, _ in numbered_batches(images, batch_size, device)])


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


@dataclass
class DeletionTest:
    """protocols: one :class:`Deletion` per (region rule, fill), rules outermost; top_prototype: (N,) each image's
    first MoRF prototype (the largest contribution: :attr:`Scan.top_prototype` but where two contributions are
    equal); top_boxes: for each rule, (N, 4) its box, so that the evaluation's other measures need not box it
    again."""

    protocols: list[Deletion]
    top_prototype: np.ndarray
    top_boxes: dict[str, np.ndarray]


@torch.no_grad()
def deletion_test(model: ExplainableNet, images: ImageSet, steps: int = 5, batch_size: int = 128,
                  device: torch.device | str = "cpu", seed: int = 0, box_offsets: np.ndarray | None = None,
                  rules: Sequence[str] = REGION_RULES, fills: Sequence[str] = FILLS) -> DeletionTest:
    """Hide the evidence and compare with hiding elsewhere (:mod:`nasxserve.explain.deletion`), for every
    region rule and fill.

    For each image the ``steps`` prototypes with the largest contributions ``w[pred, j] s_j`` to the predicted
    logit (MoRF), and the ``steps`` whose contributions are nearest 0 (LeRF), are boxed by the rule from the
    unhidden image;
    step s hides boxes 1..s, and the random order hides boxes of the MoRF sizes at places drawn from ``seed``.
    The predicted class is the one before anything is hidden. ``box_offsets`` (m, 2) moves the activation
    boxes where the run calibrated them.
    """
    device = torch.device(device)
    places, noise = np.random.default_rng(seed), np.random.default_rng(seed + 1)
    steps = min(steps, model.prototype_layer.num_prototypes)
    noise_std = ROAD_NOISE / images.pixel_std
    logits_of = _logits_of(model, device, batch_size)
    curves: dict[tuple[str, str], dict[str, list[np.ndarray]]] = {
        (r, f): {o: [] for o in ORDERS} for r in rules for f in fills}
    top_boxes: dict[str, list[np.ndarray]] = {r: [] for r in rules}
    top: list[np.ndarray] = []
    for _, x, _ in numbered_batches(images, batch_size, device):
        out = model(x)
        pred = out.logits.argmax(1)
        contributions = model.contributions(out.protos.similarities, pred)
        most = contributions.argsort(dim=1, descending=True)[:, :steps]
        least = contributions.abs().argsort(dim=1, stable=True)[:, :steps]   # nearest 0, for or against
        chosen = torch.cat([most, least], dim=1).cpu().numpy()                      # MoRF, then LeRF
        top.append(chosen[:, 0])
        pixels, target = x.float().cpu().numpy(), pred.cpu().numpy()
        maps = out.protos.similarity_maps.float().cpu().numpy()
        for rule in rules:
            boxes = region_boxes_of(model, x, maps, chosen, rule, box_offsets, batch_size)
            top_boxes[rule].append(boxes[:, 0])
            ordered = {"morf": boxes[:, :steps], "lerf": boxes[:, steps:],
                       "random": random_places(boxes[:, :steps], images.image_hw, places)}
            for fill in fills:
                for order, curve in order_curves(logits_of, pixels, target, ordered, fill, noise_std, noise).items():
                    curves[rule, fill][order].append(curve)
    protocols = [summarise(r, f, {o: np.concatenate(c[o]) for o in ORDERS}) for (r, f), c in curves.items()]
    return DeletionTest(protocols, np.concatenate(top) if top else np.zeros(0, np.int64),
                        {r: np.concatenate(b) if b else np.zeros((0, 4), np.int64) for r, b in top_boxes.items()})


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
    for start, x, _ in numbered_batches(images, batch_size, device):
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
    for start, x, _ in numbered_batches(images, batch_size, device):
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
