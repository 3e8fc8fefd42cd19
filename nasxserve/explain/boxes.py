"""Where in an image a prototype fires: ProtoPNet's 95th-percentile activation box (section 4.1).

A prototype's (H', W') similarity map is upsampled bicubically to the image and the box is the
smallest rectangle holding every pixel at or above the 95th percentile. The same rule draws the box
around a prototype's source patch at projection time and around its best match in a new image.
The upsampling is written in numpy so that inference needs no torch; it equals PyTorch's
``interpolate(mode="bicubic", align_corners=False)`` (cubic convolution with a = -0.75, edge
pixels repeated).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

BOX_PERCENTILE = 95.0
CUBIC_A = -0.75


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution weights of the 4 taps at offsets -1, 0, 1, 2 for fractions t, (n, 4)."""
    a = CUBIC_A
    d = np.stack([t + 1.0, t, 1.0 - t, 2.0 - t], axis=1)
    near = ((a + 2.0) * d - (a + 3.0)) * d * d + 1.0
    far = ((a * d - 5.0 * a) * d + 8.0 * a) * d - 4.0 * a
    return np.where(d <= 1.0, near, far)


@lru_cache(maxsize=64)
def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix M with ``M @ v`` the bicubic resampling of a length-n_in signal (cached,
    read-only: a server computes boxes for the same two sizes on every request)."""
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    base = np.floor(src).astype(np.int64)
    w = _cubic_weights(src - base)
    m = np.zeros((n_out, n_in))
    rows = np.repeat(np.arange(n_out), 4)
    cols = np.clip(base[:, None] + np.arange(-1, 3)[None, :], 0, n_in - 1).ravel()
    np.add.at(m, (rows, cols), w.ravel())
    m.flags.writeable = False
    return m


def upsample_bicubic(values: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """(h, w) -> (H, W) float64, bicubic with align_corners=False."""
    h, w = values.shape
    return _bicubic_matrix(h, out_hw[0]) @ values.astype(np.float64) @ _bicubic_matrix(w, out_hw[1]).T


def activation_box(similarity_map: np.ndarray, image_hw: tuple[int, int],
                   percentile: float = BOX_PERCENTILE) -> tuple[int, int, int, int]:
    """The box of the top (100 - percentile)% of the upsampled similarity map.

    Args:
        similarity_map: (H', W') one prototype's similarity at every latent position.
        image_hw: (H, W) of the image the model saw.
    Returns:
        (x0, y0, x1, y1) in that image's pixels, x1 and y1 exclusive, always inside the image.
    """
    up = upsample_bicubic(similarity_map, image_hw)
    mask = up >= np.percentile(up, percentile)
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def scale_box(box: tuple[int, int, int, int], from_wh: tuple[int, int],
              to_wh: tuple[int, int]) -> tuple[int, int, int, int]:
    """Map an exclusive (x0, y0, x1, y1) box between two sizes of the same image (stretch resize),
    rounding outward so the box never shrinks."""
    sx, sy = to_wh[0] / from_wh[0], to_wh[1] / from_wh[1]
    x0, y0, x1, y1 = box
    return (int(np.floor(x0 * sx)), int(np.floor(y0 * sy)),
            min(to_wh[0], int(np.ceil(x1 * sx))), min(to_wh[1], int(np.ceil(y1 * sy))))
