"""Where the evidence of a prototype lies in an image: the two region rules.

- ``activation`` (ProtoPNet, section 4.1; the papers' rule): the 95th-percentile box of the prototype's
  upsampled similarity map (:func:`nasxserve.boxes.activation_boxes`). It shows where the latent patch that
  matched sits, which can be far from the pixels that made it match (Sacha et al., AAAI 2024).
- ``evidence`` (occlusion sensitivity, Zeiler and Fergus, ECCV 2014): each latent cell's block of pixels (or,
  on a latent grid over 8 x 8, each block of a coarser 8 x 8 grid) is hidden in turn and the drop of the
  prototype's similarity s_j (its maximum over positions, eq. (2) of NASXNet) is that block's value; the same
  95th-percentile rule then boxes this sensitivity map. The region is where hiding the input lowers the
  similarity the prediction used.
  A block is hidden by ROAD's linear imputation from the pixels around it (:mod:`nasxserve.imputation`), without
  ROAD's noise, so that the same image always gets the same region: a flat grey block would be a pattern of
  its own (on a black background, a strong one), and the map would follow the fill.

Both work from the model's outputs alone (one extra batch of at most 64 occluded copies per image for
``evidence``), so the torch-free runtime, the server and ``nasx evaluate`` draw the same regions.
A top-level numpy leaf beside :mod:`nasxserve.boxes`.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from nasxserve.boxes import activation_boxes
from nasxserve.imputation import impute_block

REGION_RULES = ("activation", "evidence")
DEFAULT_REGION_RULE = "evidence"
# the evidence rule hides at most this many blocks a side: a 224 x 224 NASXNet has a 56 x 56 latent grid, and an
# explanation must not cost 3,136 more images
MAX_BLOCKS = 8

EVIDENCE_RULE_WORDS = ("pixels at or above the 95th percentile of the occlusion-sensitivity map, upsampled "
                       "bicubically: how much hiding each latent cell's block of pixels (imputed from around it) "
                       "lowers the prototype's similarity (nasxserve.regions)")
Box = tuple[int, int, int, int]


def occlusion_grid(latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The (rows, columns) of blocks the evidence rule hides one at a time: the latent grid's, at most
    :data:`MAX_BLOCKS` a side."""
    return min(latent_hw[0], MAX_BLOCKS), min(latent_hw[1], MAX_BLOCKS)


def cell_blocks(latent_hw: tuple[int, int], image_hw: tuple[int, int]) -> np.ndarray:
    """(H' * W', 4) int64 exclusive (x0, y0, x1, y1) pixel blocks of an (H', W') grid in row-major order: cell
    (r, c) covers rows floor(r H / H') .. floor((r + 1) H / H'), and the same for columns, so the blocks tile the
    image exactly."""
    (h, w), (height, width) = latent_hw, image_hw
    ys = np.floor(np.arange(h + 1) * height / h).astype(np.int64)
    xs = np.floor(np.arange(w + 1) * width / w).astype(np.int64)
    r, c = (a.ravel() for a in np.meshgrid(np.arange(h), np.arange(w), indexing="ij"))
    return np.stack([xs[c], ys[r], xs[c + 1], ys[r + 1]], axis=1)


def occluded_copies(x: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """x (C, H, W) normalised -> (G, C, H, W) float32: copy g has block g of ``blocks`` (G, 4) hidden by linear
    imputation from the pixels around it (:func:`nasxserve.imputation.impute_block`)."""
    return np.stack([impute_block(x, tuple(block)) for block in blocks]).astype(np.float32)


def occlusion_blocks(latent_hw: tuple[int, int], image_hw: tuple[int, int]) -> np.ndarray:
    """(G, 4) the pixel blocks the evidence rule hides one at a time (:func:`cell_blocks` of the
    :func:`occlusion_grid`): the latent cells' blocks, or coarser ones on a grid over 8 x 8."""
    return cell_blocks(occlusion_grid(latent_hw), image_hw)


def sensitivity_maps(similarities: np.ndarray, occluded: np.ndarray, grid_hw: tuple[int, int]) -> np.ndarray:
    """How much hiding each block lowers each prototype's similarity.

    Args:
        similarities: (m,) s_j of the image.
        occluded: (G, m) s_j of each occluded copy (:func:`occluded_copies` of the blocks of the (gh, gw) grid
            ``grid_hw``, G = gh * gw).
    Returns:
        (m, gh, gw) float64, max(0, s_j - s_j(copy)): a rise (hiding a block can make another patch match
        better) is no evidence and counts as 0.
    """
    drop = np.asarray(similarities, np.float64)[None, :] - np.asarray(occluded, np.float64)
    return np.clip(drop, 0.0, None).T.reshape(-1, *grid_hw)


def evidence_boxes(similarities: np.ndarray, occluded: np.ndarray, latent_hw: tuple[int, int],
                   image_hw: tuple[int, int]) -> list[Box]:
    """The ``evidence`` rule's boxes of the prototypes whose similarities are given.

    similarities: (n,) and occluded: (G, n), the similarities of the copies of :func:`occlusion_blocks` of the
    (H', W') ``latent_hw``. Returns n exclusive boxes in the (H, W) image's pixels. A prototype whose
    similarity no block lowers gets the whole image: nothing local is its evidence."""
    return activation_boxes(sensitivity_maps(similarities, occluded, occlusion_grid(latent_hw)), image_hw)


def region_boxes(rule: str, x: np.ndarray, prototypes: np.ndarray, similarities: np.ndarray,
                 similarity_maps: np.ndarray, similarities_of: Callable[[np.ndarray], np.ndarray],
                 offsets: np.ndarray | None = None) -> list[Box]:
    """The boxes of ``prototypes`` in one image by ``rule`` (one of :data:`REGION_RULES`).

    Args:
        x: (C, H, W) the normalised image.
        prototypes: (n,) int prototype ids.
        similarities: (m,) the image's similarities s_j.
        similarity_maps: (m, H', W') the image's similarity maps.
        similarities_of: (G, C, H, W) images -> (G, m) their similarities s_j (the model); called once, with
            the G <= 64 copies of :func:`occlusion_blocks`, by the ``evidence`` rule only.
        offsets: (n, 2) calibrated (dx, dy) moves of the ``activation`` boxes, or None; the ``evidence``
            rule measures the input evidence itself and takes none.
    Returns:
        n exclusive (x0, y0, x1, y1) boxes in the image's pixels.
    """
    prototypes = np.asarray(prototypes, dtype=np.int64)
    image_hw = (int(x.shape[1]), int(x.shape[2]))
    if rule == "activation":
        return activation_boxes(similarity_maps[prototypes], image_hw, offsets=offsets)
    if rule != "evidence":
        raise ValueError(f"unknown region rule {rule!r}; choose one of {', '.join(REGION_RULES)}")
    if len(prototypes) == 0:
        return []
    latent_hw = (int(similarity_maps.shape[1]), int(similarity_maps.shape[2]))
    copies = occluded_copies(x, occlusion_blocks(latent_hw, image_hw))
    occluded = similarities_of(copies)[:, prototypes]
    return evidence_boxes(np.asarray(similarities)[prototypes], occluded, latent_hw, image_hw)
