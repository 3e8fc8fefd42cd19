"""Where the evidence of a prototype lies in an image: the two region rules.

- ``activation`` (ProtoPNet, section 4.1; the papers' rule): the 95th-percentile box of the prototype's
  upsampled similarity map (:func:`nasxserve.boxes.activation_boxes`). It shows where the latent patch that
  matched sits, which can be far from the pixels that made it match (Sacha et al., AAAI 2024).
- ``evidence`` (occlusion sensitivity, Zeiler and Fergus, ECCV 2014): each latent cell's block of pixels (or,
  on a latent grid over 8 x 8, each block of a coarser 8 x 8 grid) is hidden in turn and the drop of the
  prototype's similarity s_j (its maximum over positions, eq. (2) of NASXNet) is that block's value; so is each
  block of the same grid shifted by half a block down and right (the blocks over the grid's inner corners), as
  Zeiler and Fergus slid their occluder by less than its size: the two maps, upsampled where their blocks lie
  and added, locate the evidence to half a block where one grid located it to a block. The same
  95th-percentile rule then thresholds this sensitivity map, and the box holds the connected region around its
  peak. The region is where hiding the input lowers the similarity the prediction used the most.
  A block is hidden by painting it with the image's own median value per channel (:func:`evidence_batch`): on data
  drawn on a background that is the background (black on digits, the grey of ``shapes``), so a hidden block
  looks like the absence of whatever it held. Two other fills were measured and lost: ROAD's linear imputation
  from the pixels around a block fills a block inside an object of one colour back with that colour and hides
  nothing, so its boxes found only the object's edges (on ``shapes`` validation, the 8 x 8 glyph in 41 % of
  images against 74 %); the training mean is a grey patch, a pattern of its own on black digits.
  Drops under 1e-3 of the largest are float noise and count as 0, and only blocks that lower the similarity can
  be in the box. The image runs in the same model call as its copies where the batch fits one (on a 4 x 4
  grid, 26 images); split over calls, the float noise between them stays under the floor.
  A box that joined two separate peaks would frame the background between them, so only the region holding
  the peak is boxed (8-connected): the strongest evidence, where the prediction's similarity depends on
  two places, is the one shown.

Both work from the model's outputs alone (one extra model call on the image and at most 64 + 49 hidden copies
for ``evidence``; 16 + 9 on a 4 x 4 grid), so the torch-free runtime, the server and ``nasx evaluate`` draw the
same regions.
A top-level numpy leaf beside :mod:`nasxserve.boxes`.
"""
from __future__ import annotations

import numpy as np

from nasxserve.boxes import BOX_PERCENTILE, mask_boxes, upsample_bicubic

REGION_RULES = ("activation", "evidence")
DEFAULT_REGION_RULE = "evidence"
# the evidence rule hides at most this many blocks a side: a 224 x 224 NASXNet has a 56 x 56 latent grid, and an
# explanation must not cost 3,136 more images
MAX_BLOCKS = 8
DROP_FLOOR = 1e-3           # a drop under this share of a prototype's largest is float noise, not evidence
# which evidence rule drew a box that was saved (a prototype's source box in a run and a bundle): 1 imputed its
# blocks and boxed every region over the threshold; 2 paints them with the image's median and boxes the peak's
# region; 3 adds the grid shifted by half a block. A saved box of another version is not shown as this rule's.
EVIDENCE_RULE_VERSION = 3

EVIDENCE_RULE_WORDS = ("the connected region around the peak of the pixels at or above the 95th percentile of the "
                       "occlusion-sensitivity map, upsampled bicubically, where some block lowers the similarity: how "
                       "much hiding each latent cell's block of pixels (at most 8 x 8 blocks, and the same grid "
                       "shifted by half a block; painted with the image's median per channel) lowers the prototype's "
                       "similarity (nasxserve.regions)")
Box = tuple[int, int, int, int]


def occlusion_grid(latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The (rows, columns) of blocks the evidence rule hides one at a time: the latent grid's, at most
    :data:`MAX_BLOCKS` a side."""
    return min(latent_hw[0], MAX_BLOCKS), min(latent_hw[1], MAX_BLOCKS)


def cell_blocks(latent_hw: tuple[int, int], image_hw: tuple[int, int]) -> np.ndarray:
    """(H' * W', 4) int64 exclusive (x0, y0, x1, y1) pixel blocks of an (H', W') grid in row-major order: cell
    (r, c) covers rows floor(r H / H') .. floor((r + 1) H / H'), and the same for columns, so the blocks tile the
    image exactly."""
    (h, w), (ys, xs) = latent_hw, _block_edges(latent_hw, image_hw)
    r, c = (a.ravel() for a in np.meshgrid(np.arange(h), np.arange(w), indexing="ij"))
    return np.stack([xs[c], ys[r], xs[c + 1], ys[r + 1]], axis=1)


def _block_edges(grid_hw: tuple[int, int], image_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The (gh + 1,) row and (gw + 1,) column pixel edges of a (gh, gw) grid of blocks over the (H, W) image:
    floor(i H / gh) and floor(i W / gw)."""
    (h, w), (height, width) = grid_hw, image_hw
    return (np.floor(np.arange(h + 1) * height / h).astype(np.int64),
            np.floor(np.arange(w + 1) * width / w).astype(np.int64))


def evidence_batch(x: np.ndarray, latent_hw: tuple[int, int]) -> np.ndarray:
    """x (C, H, W) normalised -> (1 + G, C, H, W) float32: the image itself, then one copy per block of
    :func:`occlusion_blocks` (both grids) with that block hidden: painted with the image's median per channel.
    Run it in one model call where it fits, so that a drop is never the float noise between two calls that
    batch differently. ``x`` is not changed."""
    x = np.asarray(x, np.float32)
    blocks = occlusion_blocks(latent_hw, (int(x.shape[1]), int(x.shape[2])))
    fill = np.median(x.reshape(len(x), -1), axis=1).astype(np.float32)[:, None, None]
    batch = np.repeat(x[None], 1 + len(blocks), axis=0)
    for copy, (x0, y0, x1, y1) in zip(batch[1:], blocks.tolist()):
        copy[:, y0:y1, x0:x1] = fill
    return batch


def occlusion_blocks(latent_hw: tuple[int, int], image_hw: tuple[int, int]) -> np.ndarray:
    """(G1 + G2, 4) the pixel blocks the evidence rule hides one at a time: the G1 = gh x gw blocks of the
    (gh, gw) :func:`occlusion_grid` (:func:`cell_blocks`: the latent cells' blocks, or coarser ones on a grid over
    8 x 8), then the G2 = (gh - 1) x (gw - 1) blocks of that grid shifted by half a block down and right, each
    over one of its inner corners (:func:`shifted_blocks`)."""
    grid = occlusion_grid(latent_hw)
    return np.concatenate([cell_blocks(grid, image_hw), shifted_blocks(grid, image_hw)])


def shifted_blocks(grid_hw: tuple[int, int], image_hw: tuple[int, int]) -> np.ndarray:
    """((gh - 1) (gw - 1), 4) exclusive boxes, row-major: block (r, c) spans from the middle of the grid's block
    (r, c) to the middle of block (r + 1, c + 1), so it is centred on their shared corner."""
    (h, w), (ys, xs) = grid_hw, _block_edges(grid_hw, image_hw)
    my, mx = (ys[:-1] + ys[1:]) // 2, (xs[:-1] + xs[1:]) // 2                  # the blocks' middles
    r, c = (a.ravel() for a in np.meshgrid(np.arange(h - 1), np.arange(w - 1), indexing="ij"))
    return np.stack([mx[c], my[r], mx[c + 1], my[r + 1]], axis=1).reshape(-1, 4)


def sensitivity_maps(batch_similarities: np.ndarray, grid_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """How much hiding each block lowers each prototype's similarity.

    Args:
        batch_similarities: (1 + G1 + G2, n) s_j of an :func:`evidence_batch`: the image, then its copies with
            the blocks of the (gh, gw) grid ``grid_hw`` hidden, then those of the shifted grid
            (:func:`occlusion_blocks`).
    Returns:
        (n, gh, gw) and (n, gh - 1, gw - 1) float64, max(0, s_j - s_j(copy)), with drops under
        :data:`DROP_FLOOR` of a prototype's largest (over both grids) set to 0 (float noise); a rise (hiding a
        block can make another patch match better) is no evidence and counts as 0.
    """
    (h, w), s = grid_hw, np.asarray(batch_similarities, np.float64)
    drop = np.clip(s[:1] - s[1:], 0.0, None)                                    # (G1 + G2, n)
    drop[drop < DROP_FLOOR * drop.max(axis=0, keepdims=True)] = 0.0
    n = drop.shape[1]
    return drop[:h * w].T.reshape(n, h, w), drop[h * w:].T.reshape(n, h - 1, w - 1)


def sensitivity_image(first: np.ndarray, shifted: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """The two grids' maps ((n, gh, gw), (n, gh - 1, gw - 1)) as one (n, H, W) map: each upsampled bicubically
    over where its blocks lie, and added. The shifted map, with a zero border, is upsampled over the image
    grown by a block and cropped by half a block, which puts its values at the inner corners: exactly where the
    grid's blocks all have one even number of pixels a side (the grids of the presets: 4 x 4 on 16, 8 x 8 on 32,
    7 x 7 and 8 x 8 on 224); elsewhere up to a pixel off, and a box may sit a pixel or two off the evidence."""
    (gh, gw), (height, width) = first.shape[1:], image_hw
    bh, bw = round(height / gh), round(width / gw)
    padded = np.pad(shifted, ((0, 0), (1, 1), (1, 1)))
    around = upsample_bicubic(padded, (height + bh, width + bw))[:, bh // 2:bh // 2 + height, bw // 2:bw // 2 + width]
    return upsample_bicubic(first, image_hw) + around


def evidence_boxes(batch_similarities: np.ndarray, latent_hw: tuple[int, int],
                   image_hw: tuple[int, int]) -> list[Box]:
    """The ``evidence`` rule's boxes of n prototypes from the (1 + G, n) similarities of an
    :func:`evidence_batch` of the (H', W') ``latent_hw``: of the pixels at or above the 95th percentile of the
    upsampled sensitivity map that lie where some block lowers the similarity, the connected region holding the
    map's peak (:func:`peak_components`). Returns n exclusive boxes in the (H, W) image's pixels; a prototype whose
    similarity no block lowers gets the whole image: nothing local is its evidence."""
    first, shifted = sensitivity_maps(batch_similarities, occlusion_grid(latent_hw))
    if not len(first):
        return []
    up = sensitivity_image(first, shifted, image_hw)
    threshold = np.percentile(up.reshape(len(up), -1), BOX_PERCENTILE, axis=1)
    peak = up.reshape(len(up), -1).max(axis=1)
    # bicubic lobes around a lone block put small values on the zero plain; the box holds the block's pixels only
    keep = (up >= threshold[:, None, None]) & (up > DROP_FLOOR * peak[:, None, None])
    keep[peak <= 0] = True
    return [(int(a), int(b), int(c), int(d)) for a, b, c, d in mask_boxes(peak_components(keep, up))]


def peak_components(mask: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """(n, H, W) bool masks and (n, H, W) maps -> (n, H, W) bool: the 8-connected region of each mask that holds
    its map's highest pixel, grown from that pixel one ring of neighbours at a time (a region of d pixels
    across takes d steps)."""
    n = len(mask)
    region = np.zeros_like(mask)
    top = np.ma.masked_array(maps, ~mask).reshape(n, -1).argmax(axis=1)
    region.reshape(n, -1)[np.arange(n), top] = True
    while True:
        grown = region.copy()                 # the 3 x 3 dilation, as a row step then a column step
        grown[:, 1:] |= region[:, :-1]
        grown[:, :-1] |= region[:, 1:]
        rows = grown.copy()
        grown[:, :, 1:] |= rows[:, :, :-1]
        grown[:, :, :-1] |= rows[:, :, 1:]
        grown &= mask
        if np.array_equal(grown, region):
            return region
        region = grown
