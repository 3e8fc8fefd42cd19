"""What is background in an image, where the data says: the object's annotated box (the glyph of ``shapes``, the
bird of CUB-200-2011) or, for objects drawn on black (digits), the bright pixels.

``nasx evaluate`` measures with it how much of the evidence lies on background, and the ``foreground-projection``
extension (:mod:`nasxserve.training.extensions`) keeps global projection off background patches.
"""
from __future__ import annotations

import numpy as np

from nasxserve.boxes import box_masks
from nasxserve.data.base import ImageSet

FOREGROUND_LEVEL = 0.1      # on a dark background, a pixel this bright (share of the range) is part of the object
BACKGROUND_SHARE = 0.1      # a region with less of its pixels on the object than this lies on background


def foreground_masks(images: ImageSet, dark_background: bool) -> np.ndarray | None:
    """(N, H, W) bool, True on the object, or None where the data does not say: inside each image's annotated box,
    else, for data on a dark background, the pixels of at least :data:`FOREGROUND_LEVEL` of the range in some
    channel."""
    hw = images.image_hw
    if images.boxes is not None:
        boxes = np.concatenate([np.floor(images.boxes[:, :2]), np.ceil(images.boxes[:, 2:])], axis=1)
        return box_masks(boxes.astype(np.int64), hw)
    if dark_background:
        return np.any(images.images.numpy() >= round(FOREGROUND_LEVEL * 255), axis=1)
    return None


def on_background(boxes: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """(n, 4) exclusive boxes and their images' (n, H, W) foreground -> (n,) bool: fewer than
    :data:`BACKGROUND_SHARE` of the box's pixels lie on the object."""
    inside = box_masks(boxes, foreground.shape[1:])
    share = (inside & foreground).sum(axis=(1, 2)) / np.maximum(inside.sum(axis=(1, 2)), 1)
    return share < BACKGROUND_SHARE


def background_blocks(foreground: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """(N, H, W) foreground and (G, 4) pixel blocks (the same in every image) -> (N, G) bool: the block lies on
    background in that image (:func:`on_background`)."""
    shares = np.stack([foreground[:, y0:y1, x0:x1].mean(axis=(1, 2)) for x0, y0, x1, y1 in blocks], axis=1)
    return shares < BACKGROUND_SHARE
