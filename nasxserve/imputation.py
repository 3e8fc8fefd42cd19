"""Linear imputation of hidden pixels from their surroundings (ROAD, Rong et al., ICML 2022, section 4).

Each hidden pixel p takes the weighted mean of its in-image neighbours q, 1/6 for the four that share a side and
1/12 for the four diagonal ones: sum_q w_pq (v_p - v_q) = 0, solved jointly over the hidden region with the
visible pixels as its boundary. A hidden region then continues its surroundings and has no colour or edges of its
own, so hiding it does not add a pattern the model could react to.

A numpy leaf: the deletion protocol of ``nasx evaluate`` (:mod:`nasxserve.explain.deletion`) solves
:func:`linear_system` sparsely for arbitrary masks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# (dy, dx, weight) of ROAD's eight neighbours
NEIGHBOURS = tuple((dy, dx, 1 / 6 if dy == 0 or dx == 0 else 1 / 12)
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))
# a pull of each hidden pixel towards 0 (the training mean after normalisation), relative to its weights: it
# keeps the system solvable when no pixel of a hidden region is visible, and is negligible otherwise (under
# 1e-5 of the values in a 200 x 200 hole)
ANCHOR = 1e-9


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
