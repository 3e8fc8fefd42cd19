"""Where in an image a prototype fires: ProtoPNet's 95th-percentile activation box (section 4.1).

A prototype's (H', W') similarity map is upsampled bicubically to the image and the box is the
smallest rectangle holding every pixel at or above the 95th percentile. The same rule draws the box
around a prototype's source patch at projection time and around its best match in a new image.
The upsampling is written in numpy so that inference needs no torch; it equals PyTorch's
``interpolate(mode="bicubic", align_corners=False)`` (cubic convolution with a = -0.75, edge
pixels repeated).

A top-level numpy leaf: the prototype head (training), the torch-free runtime and the server all
draw boxes with it, so it imports nothing of nasxserve and sits below all of them.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import numpy.typing as npt

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
        offsets: (n, 2) int (dx, dy) pixels to move each box by (:func:`move_boxes`), or None: the
            calibrated offset of each map's prototype (:mod:`nasxserve.explain.calibration`), 0 for an
            uncalibrated one, whose box stays as it is.
    Returns:
        n boxes (x0, y0, x1, y1) in that image's pixels, x1 and y1 exclusive, inside the image, never empty.
    """
    if len(similarity_maps) == 0:
        return []
    up = upsample_bicubic(similarity_maps, image_hw)
    # One percentile over all maps: a server answers every /explain with several boxes.
    threshold = np.percentile(up.reshape(len(up), -1), percentile, axis=1)
    boxes = mask_boxes(up >= threshold[:, None, None])
    if offsets is not None:
        boxes = move_boxes(boxes, peak_cells(similarity_maps, image_hw), offsets, image_hw)
    return [(int(a), int(b), int(c), int(d)) for a, b, c, d in boxes]


def mask_boxes(mask: np.ndarray) -> np.ndarray:
    """(n, H, W) bool masks, each with some pixel set -> (n, 4) int64 exclusive (x0, y0, x1, y1): the smallest box
    around each mask's pixels."""
    rows, cols = np.any(mask, axis=2), np.any(mask, axis=1)
    y0, y1 = rows.argmax(axis=1), rows.shape[1] - rows[:, ::-1].argmax(axis=1)
    x0, x1 = cols.argmax(axis=1), cols.shape[1] - cols[:, ::-1].argmax(axis=1)
    return np.stack([x0, y0, x1, y1], axis=1)


def recorded_offsets(prototypes: list[dict]) -> np.ndarray:
    """(m, 2) int (dx, dy): each prototype's ``box_offset`` as a run's records or a bundle's manifest hold it,
    (0, 0) where none is recorded (a run that did not calibrate its boxes, or one written before calibration)."""
    return np.asarray([p.get("box_offset", (0, 0)) for p in prototypes], dtype=np.int64).reshape(-1, 2)


def cell_centres(cells: np.ndarray, latent_hw: tuple[int, int], image_hw: tuple[int, int]) -> np.ndarray:
    """(n, 2) int (row, col) latent cells -> (n, 2) float (x, y): their centres in the image's pixels."""
    cells = np.asarray(cells).reshape(-1, 2)
    return np.stack([(cells[:, 1] + 0.5) * image_hw[1] / latent_hw[1],
                     (cells[:, 0] + 0.5) * image_hw[0] / latent_hw[0]], axis=1)


def peak_cells(similarity_maps: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """(n, H', W') maps -> (n, 2) float (x, y): the centre of each map's highest cell (the patch that matched)."""
    n, h, w = similarity_maps.shape
    cells = np.stack(np.unravel_index(similarity_maps.reshape(n, -1).argmax(axis=1), (h, w)), axis=1)
    return cell_centres(cells, (h, w), image_hw)


def move_boxes(boxes: np.ndarray, peaks: np.ndarray, offsets: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """Calibrated boxes: (n, 4) exclusive (x0, y0, x1, y1) boxes whose maps peak at ``peaks`` (n, 2) (x, y),
    moved by ``offsets`` (n, 2) int (dx, dy).

    A prototype that fires beside its part peaks by the image's edge when its part lies there, and its box
    loses the rows or columns of high similarity that would lie past the edge. A box the edge cut, moving
    away from that edge, first gets its cut side back where the mirror of its other side about the peak puts
    it (:func:`complete_cut_boxes`); every box is then moved and cut to the image (:func:`shift_boxes`).
    """
    return shift_boxes(complete_cut_boxes(boxes, peaks, offsets, image_hw), offsets, image_hw)


def complete_cut_boxes(boxes: np.ndarray, peaks: np.ndarray, offsets: np.ndarray,
                       image_hw: tuple[int, int]) -> np.ndarray:
    """(n, 4) boxes with each side that lies on the image's edge, while the box moves away from that edge and
    its opposite side does not lie on the image's edge too, put at the mirror of the opposite side about the
    box's peak (n, 2) (x, y). Returns (n, 4) int64, possibly reaching past the image."""
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    dx, dy = np.asarray(offsets).reshape(-1, 2).T
    x0, y0, x1, y1 = boxes.T
    px, py = np.asarray(peaks, dtype=np.float64).reshape(-1, 2).T
    h, w = image_hw
    return np.stack([
        np.where((dx > 0) & (x0 == 0) & (x1 < w), np.minimum(0, np.floor(2 * px - x1)), x0),
        np.where((dy > 0) & (y0 == 0) & (y1 < h), np.minimum(0, np.floor(2 * py - y1)), y0),
        np.where((dx < 0) & (x1 == w) & (x0 > 0), np.maximum(w, np.ceil(2 * px - x0)), x1),
        np.where((dy < 0) & (y1 == h) & (y0 > 0), np.maximum(h, np.ceil(2 * py - y0)), y1),
    ], axis=1).astype(np.int64)


def shift_boxes(boxes: np.ndarray, offsets: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """(n, 4) exclusive (x0, y0, x1, y1) boxes moved by (n, 2) int (dx, dy), then cut to the (H, W) image, as
    the region a box stands for is cut by the image's edge; a box moved wholly out keeps its outermost row or
    column of pixels, so no box is ever empty."""
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    h, w = image_hw
    x0 = np.clip(boxes[:, 0] + offsets[:, 0], 0, w - 1)
    y0 = np.clip(boxes[:, 1] + offsets[:, 1], 0, h - 1)
    x1 = np.clip(boxes[:, 2] + offsets[:, 0], x0 + 1, w)
    y1 = np.clip(boxes[:, 3] + offsets[:, 1], y0 + 1, h)
    return np.stack([x0, y0, x1, y1], axis=1)


def activation_box(similarity_map: np.ndarray, image_hw: tuple[int, int],
                   percentile: float = BOX_PERCENTILE) -> tuple[int, int, int, int]:
    """:func:`activation_boxes` of one (H', W') map."""
    return activation_boxes(similarity_map[None], image_hw, percentile)[0]


def box_masks(boxes: npt.ArrayLike, image_hw: tuple[int, int]) -> np.ndarray:
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
