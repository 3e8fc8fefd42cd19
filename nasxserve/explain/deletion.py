"""The deletion protocol: hide the evidence and watch the predicted logit, against hiding elsewhere.

A test that hides pixels must not reward the fill itself. With the ``mean`` fill (every hidden pixel takes the
training mean) a box is a flat patch of one colour, which on a black-background dataset is a strong pattern
the model never saw, wherever it is put: the logit then follows the fill, not the evidence. ROAD (Rong et al.,
"A consistent and efficient evaluation strategy for attribution methods", ICML 2022) removes that confound
with noisy linear imputation (``road``): each hidden pixel becomes the weighted mean of its eight neighbours,
solved jointly for the hidden region (:mod:`nasxserve.imputation`), plus a little Gaussian noise, so a hidden box
looks like its surroundings and carries no shape of its own.

Three orders are run with the same fill: the boxes of the prototypes that contribute most to the predicted
logit first (MoRF, most relevant first), boxes of the same sizes at random places, and the boxes of the
prototypes whose contributions are nearest 0 first (LeRF, least relevant first). A faithful explanation's MoRF
curve falls fastest and its LeRF curve slowest. Everything here works on numpy arrays and a ``logits_of``
callable, so the protocol can be checked on a hand-built model whose evidence is known.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.linalg import spsolve

from nasxserve.boxes import box_masks
from nasxserve.imputation import linear_system

FILLS = ("mean", "road")
ORDERS = ("morf", "random", "lerf")
ROAD_NOISE = 0.01          # ROAD's noise, as a share of the pixel range
Z95 = 1.959964


def road_impute(x: np.ndarray, mask: np.ndarray, noise_std: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """ROAD's noisy linear imputation of one image: the hidden pixels solved from their surroundings
    (:mod:`nasxserve.imputation`), then Gaussian noise added to each.

    Args:
        x: (C, H, W) float image.
        mask: (H, W) bool, True where a pixel is hidden.
        noise_std: (C,) std of the noise, in x's units.
    Returns:
        (C, H, W) float64.
    """
    c, h, w = x.shape
    out = np.asarray(x, dtype=np.float64).reshape(c, -1).copy()
    system = linear_system(mask)
    n = len(system.hidden)
    if n == 0:
        return out.reshape(c, h, w)
    a = coo_matrix((system.a[2], system.a[:2]), shape=(n, n)).tocsc()
    b = coo_matrix((system.b[2], system.b[:2]), shape=(n, len(system.ring))).tocsr()
    solved = np.asarray(spsolve(a, b @ out[:, system.ring].T)).reshape(n, c)
    out[:, system.hidden] = solved.T + rng.normal(size=(c, n)) * np.asarray(noise_std, np.float64).reshape(c, 1)
    return out.reshape(c, h, w)


def hide(x: np.ndarray, masks: np.ndarray, fill: str, noise_std: np.ndarray,
         rng: np.random.Generator) -> np.ndarray:
    """x (B, C, H, W) normalised with the pixels of masks (B, H, W) hidden by ``fill`` (one of :data:`FILLS`)."""
    if fill == "mean":
        return np.where(masks[:, None], 0.0, x).astype(np.float32)
    if fill == "road":
        return np.stack([road_impute(xi, mi, noise_std, rng) for xi, mi in zip(x, masks)]).astype(np.float32)
    raise ValueError(f"unknown fill {fill!r}; choose one of {', '.join(FILLS)}")


def deletion_curves(logits_of: Callable[[np.ndarray], np.ndarray], x: np.ndarray, target: np.ndarray,
                    boxes: np.ndarray, fill: str, noise_std: np.ndarray, rng: np.random.Generator,
                    start: np.ndarray) -> np.ndarray:
    """The target logit as ``boxes`` are hidden one after another.

    Args:
        logits_of: (B, C, H, W) -> (B, K) the model.
        x: (B, C, H, W) normalised images; target: (B,) the class whose logit is followed.
        boxes: (B, S, 4) exclusive boxes; step s hides boxes 1..s of each image.
        start: (B,) the target logits of x.
    Returns:
        (B, S + 1): the logit of the unhidden image, then after each step.
    """
    rows = np.arange(len(x))
    curve = [start]
    hidden = np.zeros((len(x), x.shape[2], x.shape[3]), dtype=bool)
    for s in range(boxes.shape[1]):
        hidden |= np.stack([box_masks(b[s], x.shape[2:])[0] for b in boxes])
        curve.append(logits_of(hide(x, hidden, fill, noise_std, rng))[rows, target])
    return np.stack(curve, axis=1).astype(np.float64)


def order_curves(logits_of: Callable[[np.ndarray], np.ndarray], x: np.ndarray, target: np.ndarray,
                 boxes: dict[str, np.ndarray], fill: str, noise_std: np.ndarray,
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    """:func:`deletion_curves` of each order of :data:`ORDERS`: ``boxes`` maps each order to its (B, S, 4)."""
    start = logits_of(x)[np.arange(len(x)), target]
    return {order: deletion_curves(logits_of, x, target, boxes[order], fill, noise_std, rng, start) for order in ORDERS}


def curve_areas(curves: np.ndarray) -> np.ndarray:
    """(n, S + 1) -> (n,) trapezoid areas with the x axis scaled to [0, 1] (logit units)."""
    s = curves.shape[1] - 1
    return (curves[:, :-1] + curves[:, 1:]).sum(axis=1) / (2.0 * s)


def random_places(boxes: np.ndarray, image_hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """(..., 4) boxes moved to uniformly random places in the (H, W) image, sizes kept."""
    h, w = image_hw
    bw, bh = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    x0 = rng.integers(0, w - bw + 1)
    y0 = rng.integers(0, h - bh + 1)
    return np.stack([x0, y0, x0 + bw, y0 + bh], axis=-1)


@dataclass
class Deletion:
    """One deletion protocol (a region rule and a fill) over n images and ``steps`` boxes.

    curves[order][s]: the mean predicted logit after s steps, for the orders of :data:`ORDERS`; areas[order]:
    the mean area under each image's curve (x scaled to [0, 1]; lower = what was hidden mattered more).
    area_gap: mean over images of (random area - MoRF area), the deletion gap, with its standard error and
    95% interval (normal approximation); lerf_gap: mean of (LeRF area - MoRF area) and its standard error;
    top_lower_share: share of images whose logit after the first MoRF box is below that after the first random
    box."""

    rule: str
    fill: str
    steps: int
    n: int
    curves: dict[str, list[float]]
    areas: dict[str, float]
    area_gap: float
    area_gap_se: float
    area_gap_ci95: tuple[float, float]
    lerf_gap: float
    lerf_gap_se: float
    top_lower_share: float


def _mean_se(values: np.ndarray) -> tuple[float, float]:
    n = len(values)
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0


def summarise(rule: str, fill: str, curves: dict[str, np.ndarray]) -> Deletion:
    """The :class:`Deletion` of per-image curves ``{order: (n, S + 1)}`` for every order of :data:`ORDERS`."""
    areas = {o: curve_areas(curves[o]) for o in ORDERS}
    gap, gap_se = _mean_se(areas["random"] - areas["morf"])
    lerf, lerf_se = _mean_se(areas["lerf"] - areas["morf"])
    morf, rand = curves["morf"], curves["random"]
    return Deletion(rule=rule, fill=fill, steps=morf.shape[1] - 1, n=len(morf),
                    curves={o: curves[o].mean(axis=0).tolist() for o in ORDERS},
                    areas={o: float(a.mean()) for o, a in areas.items()},
                    area_gap=gap, area_gap_se=gap_se, area_gap_ci95=(gap - Z95 * gap_se, gap + Z95 * gap_se),
                    lerf_gap=lerf, lerf_gap_se=lerf_se,
                    top_lower_share=float((morf[:, 1] < rand[:, 1]).mean()) if morf.shape[1] > 1 else 0.0)
