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
    """(..., h, w) -> (..., H, W) float64, bicubic with align_corners=False."""
    h, w = values.shape[-2:]
    return _bicubic_matrix(h, out_hw[0]) @ values.astype(np.float64) @ _bicubic_matrix(w, out_hw[1]).T


def activation_boxes(similarity_maps: np.ndarray, image_hw: tuple[int, int],
                     percentile: float = BOX_PERCENTILE,
                     offsets: np.ndarray | None = None) -> list[tuple[int, int, int, int]]:
    """The box of the top (100 - percentile)% of each upsampled similarity map.

    Args:
        similarity_maps: (n, H', W') similarity of n prototypes at every latent position.
        image_hw: (H, W) of the image the model saw.
        offsets: (n, 2) int (dx, dy) pixels to move each box by, or None: the calibrated offset of each
            map's prototype (:mod:`nasxserve.explain.calibration`), 0 for an uncalibrated one.
    Returns:
        n boxes (x0, y0, x1, y1) in that image's pixels, x1 and y1 exclusive, always inside the image.
    """
    if len(similarity_maps) == 0:
        return []
    up = upsample_bicubic(similarity_maps, image_hw)
    # One percentile over all maps: a server answers every /explain with several boxes.
    threshold = np.percentile(up.reshape(len(up), -1), percentile, axis=1)
    mask = up >= threshold[:, None, None]
    rows, cols = mask.any(axis=2), mask.any(axis=1)
    y0, y1 = rows.argmax(axis=1), rows.shape[1] - rows[:, ::-1].argmax(axis=1)
    x0, x1 = cols.argmax(axis=1), cols.shape[1] - cols[:, ::-1].argmax(axis=1)
    boxes = np.stack([x0, y0, x1, y1], axis=1)
    if offsets is not None:
        boxes = shift_boxes(boxes, offsets, image_hw)
    return [(int(a), int(b), int(c), int(d)) for a, b, c, d in boxes]


def recorded_offsets(prototypes: list[dict]) -> np.ndarray:
    """(m, 2) int (dx, dy): each prototype's ``box_offset`` as a run's records or a bundle's manifest hold it,
    (0, 0) where none is recorded (a run that did not calibrate its boxes, or one written before calibration)."""
    return np.asarray([p.get("box_offset", (0, 0)) for p in prototypes], dtype=np.int64).reshape(-1, 2)


def shift_boxes(boxes: np.ndarray, offsets: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """(n, 4) exclusive (x0, y0, x1, y1) boxes moved by (n, 2) int (dx, dy), then slid back inside the
    (H, W) image where the move took them past an edge: a box keeps its size, so it still covers as much
    of the image as its map's top pixels do."""
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    h, w = image_hw
    dx = np.clip(offsets[:, 0], -boxes[:, 0], w - boxes[:, 2])
    dy = np.clip(offsets[:, 1], -boxes[:, 1], h - boxes[:, 3])
    return boxes + np.stack([dx, dy, dx, dy], axis=1)


def activation_box(similarity_map: np.ndarray, image_hw: tuple[int, int],
                   percentile: float = BOX_PERCENTILE) -> tuple[int, int, int, int]:
    """:func:`activation_boxes` of one (H', W') map."""
    return activation_boxes(similarity_map[None], image_hw, percentile)[0]


def box_masks(boxes: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """(n, 4) exclusive (x0, y0, x1, y1) boxes -> (n, H, W) bool masks, True inside each box."""
    boxes = np.asarray(boxes).reshape(-1, 4)
    rows, cols = np.arange(image_hw[0])[None, :, None], np.arange(image_hw[1])[None, None, :]
    return ((rows >= boxes[:, 1, None, None]) & (rows < boxes[:, 3, None, None])
            & (cols >= boxes[:, 0, None, None]) & (cols < boxes[:, 2, None, None]))


def scale_box(box: tuple[int, int, int, int], from_wh: tuple[int, int],
              to_wh: tuple[int, int]) -> tuple[int, int, int, int]:
    """Map an exclusive (x0, y0, x1, y1) box between two sizes of the same image (stretch resize),
    rounding outward so the box never shrinks."""
    sx, sy = to_wh[0] / from_wh[0], to_wh[1] / from_wh[1]
    x0, y0, x1, y1 = box
    return (int(np.floor(x0 * sx)), int(np.floor(y0 * sy)),
            min(to_wh[0], int(np.ceil(x1 * sx))), min(to_wh[1], int(np.ceil(y1 * sy))))
