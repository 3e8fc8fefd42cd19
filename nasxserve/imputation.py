"""Linear imputation of hidden pixels from their surroundings (ROAD, Rong et al., ICML 2022, section 4).

Each hidden pixel p takes the weighted mean of its in-image neighbours q, 1/6 for the four that share a side and
1/12 for the four diagonal ones: sum_q w_pq (v_p - v_q) = 0, solved jointly over the hidden region with the
visible pixels as its boundary. A hidden region then continues its surroundings and has no colour or edges of its
own, so hiding it does not add a pattern the model could react to.

A numpy leaf. The deletion protocol of ``nasx evaluate`` (:mod:`nasxserve.explain.deletion`) solves
:func:`linear_system` sparsely for arbitrary masks. The region rule of the torch-free runtime
(:mod:`nasxserve.regions`) hides rectangular blocks with :func:`fill_block`: a dense solution cached per block
(the runtime has no sparse solver), or, for blocks over :data:`MAX_SOLVED_PIXELS` (models over 256 x 256, whose
dense solves would take minutes), :func:`interpolate_block`, a fill of the same kind (linear from the block's
surroundings, exact on planes) that needs no solve.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

# (dy, dx, weight) of ROAD's eight neighbours
NEIGHBOURS = tuple((dy, dx, 1 / 6 if dy == 0 or dx == 0 else 1 / 12)
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))
# a pull of each hidden pixel towards 0 (the training mean after normalisation), relative to its weights: it
# keeps the system solvable when no pixel of a hidden region is visible, and is negligible otherwise (under
# 1e-5 of the values in a 200 x 200 hole)
ANCHOR = 1e-9
# the largest block whose imputation is solved densely (a 256 x 256 model's 32 x 32 blocks, about 50 ms each,
# once per block); a larger one is interpolated
MAX_SOLVED_PIXELS = 1024


@dataclass(frozen=True)
class LinearSystem:
    """A v = B u for the n hidden pixels v given the r visible pixels u that border them.

    hidden: (n,) and ring: (r,) flat pixel indices (row-major); a: (n, n) and b: (n, r) as (rows, cols, values)
    triplets, duplicates summed."""

    hidden: np.ndarray
    ring: np.ndarray
    a: tuple[np.ndarray, np.ndarray, np.ndarray]
    b: tuple[np.ndarray, np.ndarray, np.ndarray]


def linear_system(mask: np.ndarray) -> LinearSystem:
    """The imputation's linear system for an (H, W) bool mask, True where a pixel is hidden."""
    h, w = mask.shape
    hidden = np.flatnonzero(mask.ravel())
    unknown = np.full(h * w, -1, dtype=np.int64)
    unknown[hidden] = np.arange(len(hidden))
    py, px = np.divmod(hidden, w)
    diagonal = np.zeros(len(hidden))
    a_rows, a_cols, a_vals, b_rows, b_pixels, b_vals = [], [], [], [], [], []
    for dy, dx, weight in NEIGHBOURS:
        qy, qx = py + dy, px + dx
        inside = (qy >= 0) & (qy < h) & (qx >= 0) & (qx < w)
        p, q = np.flatnonzero(inside), (qy * w + qx)[inside]
        diagonal[p] += weight
        is_unknown = unknown[q] >= 0
        a_rows.append(p[is_unknown])
        a_cols.append(unknown[q[is_unknown]])
        a_vals.append(np.full(int(is_unknown.sum()), -weight))
        b_rows.append(p[~is_unknown])
        b_pixels.append(q[~is_unknown])
        b_vals.append(np.full(int((~is_unknown).sum()), weight))
    n = len(hidden)
    pixels = np.concatenate(b_pixels) if b_pixels else np.zeros(0, np.int64)
    ring, b_cols = np.unique(pixels, return_inverse=True)
    return LinearSystem(
        hidden=hidden, ring=ring,
        a=(np.concatenate([np.arange(n), *a_rows]), np.concatenate([np.arange(n), *a_cols]),
           np.concatenate([diagonal * (1 + ANCHOR), *a_vals])),
        b=(np.concatenate(b_rows), b_cols.reshape(-1), np.concatenate(b_vals)))


@lru_cache(maxsize=512)
def block_imputer(image_hw: tuple[int, int], block: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray,
                                                                                          np.ndarray]:
    """The imputation of one rectangular block as a dense operator, cached (a server hides the same blocks of
    every image): (hidden (n,), ring (r,), M (n, r)) with v = M u. ``block`` is an exclusive (x0, y0, x1, y1)
    box in the (H, W) image; the solve costs O(n^3), so blocks are kept to :data:`MAX_SOLVED_PIXELS`."""
    mask = np.zeros(image_hw, dtype=bool)
    x0, y0, x1, y1 = block
    mask[y0:y1, x0:x1] = True
    system = linear_system(mask)
    n, r = len(system.hidden), len(system.ring)
    a, b = np.zeros((n, n)), np.zeros((n, r))
    np.add.at(a, system.a[:2], system.a[2])
    np.add.at(b, system.b[:2], system.b[2])
    operator = np.linalg.solve(a, b).astype(np.float32)
    for array in (system.hidden, system.ring, operator):
        array.flags.writeable = False
    return system.hidden, system.ring, operator


def fill_block(x: np.ndarray, block: tuple[int, int, int, int]) -> np.ndarray:
    """x (C, H, W) -> a float32 copy with the exclusive (x0, y0, x1, y1) ``block`` hidden: ROAD's imputation
    (:func:`block_imputer`) for blocks of up to :data:`MAX_SOLVED_PIXELS`, :func:`interpolate_block` beyond."""
    x0, y0, x1, y1 = (int(v) for v in block)
    if (x1 - x0) * (y1 - y0) > MAX_SOLVED_PIXELS:
        return interpolate_block(x, block)
    c, h, w = x.shape
    hidden, ring, operator = block_imputer((h, w), (x0, y0, x1, y1))
    flat = np.array(x, dtype=np.float32).reshape(c, -1)
    flat[:, hidden] = flat[:, ring] @ operator.T
    return flat.reshape(c, h, w)


def interpolate_block(x: np.ndarray, block: tuple[int, int, int, int]) -> np.ndarray:
    """x (C, H, W) -> a float32 copy with the exclusive (x0, y0, x1, y1) ``block`` filled from the pixels around it:
    the mean of two linear interpolations, along each row between the pixels left and right of the block and
    along each column between those above and below it (a side on the image's edge has no pixel: the other side
    is carried across; with neither, that direction is left out; with no side at all the block takes 0, the
    training mean after normalisation). A plane is filled exactly, as by :func:`linear_system`'s imputation, at a
    cost linear in the block's pixels, so any model size can afford it."""
    out = np.array(x, dtype=np.float32)
    c, h, w = out.shape
    x0, y0, x1, y1 = (int(v) for v in block)
    across = [_between(out[:, y0:y1, x0 - 1] if x0 > 0 else None, out[:, y0:y1, x1] if x1 < w else None, x1 - x0,
                       axis=2),
              _between(out[:, y0 - 1, x0:x1] if y0 > 0 else None, out[:, y1, x0:x1] if y1 < h else None, y1 - y0,
                       axis=1)]
    known = [a for a in across if a is not None]
    out[:, y0:y1, x0:x1] = sum(known) / len(known) if known else 0.0
    return out


def _between(before: np.ndarray | None, after: np.ndarray | None, n: int, axis: int) -> np.ndarray | None:
    """The n values between two lines of pixels (C, L) along ``axis`` of a (C, rows, cols) block: linear from
    ``before`` to ``after``, the one given carried across, or None with neither."""
    if before is None and after is None:
        return None
    t = (np.arange(1, n + 1, dtype=np.float32) / (n + 1)) if before is not None and after is not None else None
    lo = before if before is not None else after
    hi = after if after is not None else before
    assert lo is not None and hi is not None
    lo, hi = np.expand_dims(lo, axis), np.expand_dims(hi, axis)
    if t is None:
        return np.repeat(lo, n, axis=axis)
    shape = [1, 1, 1]
    shape[axis] = n
    t = t.reshape(shape)
    return (1 - t) * lo + t * hi
