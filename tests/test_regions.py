"""The region rules (nasxserve.regions), ROAD's linear imputation (nasxserve.imputation) and the
deletion protocol (nasxserve.explain.deletion), on constructed images whose evidence is known."""
from __future__ import annotations

import numpy as np

from nasxserve.boxes import box_masks
from nasxserve.explain.deletion import ORDERS, order_curves, random_places, road_impute, summarise
from nasxserve.regions import cell_blocks, evidence_batch, evidence_boxes, sensitivity_maps


def ramp(h: int = 12, w: int = 10, channels: int = 2) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w]
    return np.stack([0.3 * xs - 0.2 * ys + 1.0 + c for c in range(channels)]).astype(np.float64)


# ------------------------------------------------------------------------------------------ imputation
def test_the_road_imputation_of_a_hidden_block_of_a_linear_image_is_the_image():
    x = ramp()
    mask = box_masks((2, 3, 7, 8), x.shape[1:])[0]
    sparse = road_impute(x, mask, np.zeros(2), np.random.default_rng(0))
    np.testing.assert_allclose(sparse, x, atol=1e-4)      # the eight-neighbour mean of a plane is the plane


def test_a_wholly_hidden_image_takes_the_training_mean():
    x = ramp(6, 6, 1)
    hidden = road_impute(x, np.ones((6, 6), bool), np.zeros(1), np.random.default_rng(0))
    np.testing.assert_allclose(hidden, 0.0, atol=1e-9)


def test_road_imputation_of_a_large_hole_keeps_a_constant():
    x = np.full((1, 60, 60), 5.0)
    mask = np.zeros((60, 60), bool)
    mask[5:55, 5:55] = True
    np.testing.assert_allclose(road_impute(x, mask, np.zeros(1), np.random.default_rng(0)), 5.0, rtol=1e-5)


def test_road_noise_has_the_asked_spread_and_only_touches_hidden_pixels():
    x = np.zeros((1, 40, 40))
    mask = np.zeros((40, 40), bool)
    mask[5:35, 5:35] = True
    out = road_impute(x, mask, np.asarray([0.05]), np.random.default_rng(1))
    assert out[0][~mask].max() == 0.0
    assert abs(out[0][mask].std() - 0.05) < 0.005


# ------------------------------------------------------------------------------------------ region rules
def test_cell_blocks_tile_the_image_exactly():
    for latent_hw, image_hw in (((4, 4), (16, 16)), ((3, 3), (10, 11)), ((7, 7), (224, 224))):
        blocks = cell_blocks(latent_hw, image_hw)
        assert len(blocks) == latent_hw[0] * latent_hw[1]
        cover = box_masks(blocks, image_hw).sum(axis=0)
        assert (cover == 1).all()


def test_a_large_latent_grid_is_hidden_in_at_most_eight_by_eight_blocks():
    from nasxserve.regions import occlusion_blocks, occlusion_grid

    assert occlusion_grid((4, 4)) == (4, 4) and occlusion_grid((56, 56)) == (8, 8) and occlusion_grid((16, 5)) == (8, 5)
    blocks = occlusion_blocks((56, 56), (224, 224))
    assert len(blocks) == 64 + 49 and (box_masks(blocks[:64], (224, 224)).sum(axis=0) == 1).all()
    assert set((blocks[:, 2] - blocks[:, 0]).tolist()) == {28} == set((blocks[:, 3] - blocks[:, 1]).tolist())
    # the shifted grid tiles the image less half a block at each side, each block centred on an inner corner
    inner = box_masks(blocks[64:], (224, 224)).sum(axis=0)
    assert (inner[14:210, 14:210] == 1).all() and inner.sum() == 196 * 196
    np.testing.assert_array_equal((blocks[64:, :2] + blocks[64:, 2:]) // 2, [[28 * (c + 1), 28 * (r + 1)]
                                                                           for r in range(7) for c in range(7)])


def test_shifted_blocks_on_a_grid_that_does_not_divide_the_image():
    from nasxserve.regions import shifted_blocks
    blocks = shifted_blocks((3, 3), (10, 11))                # the grid's blocks: rows 0-3-6-10, columns 0-3-7-11
    np.testing.assert_array_equal(blocks, [[1, 1, 5, 4], [5, 1, 9, 4], [1, 4, 5, 8], [5, 4, 9, 8]])


def test_sensitivity_is_the_clipped_drop_per_cell_and_float_noise_is_no_drop():
    batch = np.asarray([[2.0, 1.0],                         # the image, then 4 cells of a 2x2 grid hidden,
                        [1.5, 1.0], [2.5, 0.25], [2.0 - 1e-6, 1.0], [0.0, 1.0],
                        [1.0, 0.5]])                        # then the one block of the shifted grid
    first, shifted = sensitivity_maps(batch, (2, 2))
    np.testing.assert_allclose(first[0], [[0.5, 0.0], [0.0, 2.0]])    # a rise and a 1e-6 drop count as 0
    np.testing.assert_allclose(first[1], [[0.0, 0.75], [0.0, 0.0]])
    np.testing.assert_allclose(shifted[:, 0, 0], [1.0, 0.5])


def block_similarities(images: np.ndarray, block: tuple[int, int, int, int]) -> np.ndarray:
    """A 'model' with two prototypes: s_0 is the mean of the pixels of ``block``, s_1 the mean of the whole image."""
    x0, y0, x1, y1 = block
    return np.stack([images[:, :, y0:y1, x0:x1].mean(axis=(1, 2, 3)), images.mean(axis=(1, 2, 3))], axis=1)


def test_the_evidence_rule_boxes_the_block_the_similarity_depends_on():
    block = (4, 8, 8, 12)                                    # latent cell (2, 1) of a 4x4 grid on 16x16
    x = np.zeros((1, 16, 16), np.float32)
    x[0, 8:12, 4:8] = 3.0
    batch = evidence_batch(x, (4, 4))
    assert batch.shape == (1 + 16 + 9, 1, 16, 16) and (batch[0] == x).all()
    sims = block_similarities(batch, block)
    box, = evidence_boxes(sims[:, :1], (4, 4), (16, 16))
    assert box == block                                      # exactly the block: no lobe of the upsampling


def test_a_grid_one_block_high_or_wide_has_no_shifted_blocks():
    """ProtoPNet's ResNet-18 on 32 x 32 images has a 1 x 1 latent grid: the image, one copy, no shifted grid."""
    x = np.zeros((1, 32, 32), np.float32)
    x[0, 4:12, 4:12] = 1.0
    for grid in ((1, 1), (1, 4)):
        batch = evidence_batch(x, grid)
        assert len(batch) == 1 + grid[0] * grid[1]
        sims = block_similarities(batch, (4, 4, 12, 12))
        first, shifted = sensitivity_maps(sims, grid)
        assert first.shape == (2, *grid) and shifted.shape == (2, 0, grid[1] - 1)
        assert len(evidence_boxes(sims, grid, (32, 32))) == 2


def test_a_glyph_that_straddles_the_blocks_is_boxed_to_the_pixel():
    """A similarity that a partly hidden glyph already loses most of (as a trained model's does): with one grid of
    4-pixel blocks, a glyph 2 or 1 pixels off the grid was boxed a block too wide (IoU 0.64 and 0.79); the grid
    shifted by half a block places it."""
    for glyph in ((2, 2, 10, 10), (5, 9, 13, 17), (6, 6, 14, 14)):
        x0, y0, x1, y1 = glyph
        x = np.zeros((1, 32, 32), np.float32)
        x[0, y0:y1, x0:x1] = 3.0
        batch = evidence_batch(x, (8, 8))
        sims = np.exp(-((batch[:, 0, y0:y1, x0:x1] - 3.0) ** 2).sum(axis=(1, 2)) / 20.0)[:, None]
        assert evidence_boxes(sims, (8, 8), (32, 32)) == [glyph]


def test_a_lone_block_on_a_fine_grid_is_boxed_alone_and_a_prototype_nothing_lowers_gets_the_whole_image():
    x = np.zeros((1, 64, 64), np.float32)
    x[0, :8, :8] = 1.0                                       # the corner block of an 8x8 grid: 1.6 % of the image
    sims = block_similarities(evidence_batch(x, (8, 8)), (0, 0, 8, 8))
    sims[1:, 0] += np.linspace(0, 1e-5, 64 + 49)            # float noise in every other copy
    corner, _ = evidence_boxes(sims, (8, 8), (64, 64))
    # the block and the positive lobe of its bicubic upsampling: not the whole image, as the 95th percentile of a
    # map that is 98 % zeros would give
    x0, y0, x1, y1 = corner
    assert (x0, y0) == (0, 0) and 8 <= x1 <= 24 and 8 <= y1 <= 24
    flat = np.zeros((1, 8, 8), np.float32)
    nothing = block_similarities(evidence_batch(flat, (2, 2)), (0, 0, 4, 4))
    assert evidence_boxes(nothing, (2, 2), (8, 8)) == [(0, 0, 8, 8), (0, 0, 8, 8)]



def test_a_hidden_block_takes_the_images_median_per_channel_and_the_input_is_not_touched():
    x = np.stack([np.zeros((6, 6)), np.full((6, 6), 2.0)]).astype(np.float32)
    x[:, :2, :2] = 9.0                                       # a bright corner: not the median of either channel
    kept = x.copy()
    batch = evidence_batch(x, (3, 3))
    np.testing.assert_array_equal(x, kept)
    np.testing.assert_array_equal(batch[1][:, :2, :2], [np.zeros((2, 2)), np.full((2, 2), 2.0)])
    np.testing.assert_array_equal(batch[1][:, 2:, :], x[:, 2:, :])
    np.testing.assert_array_equal(batch[9][:, 4:, 4:], [np.zeros((2, 2)), np.full((2, 2), 2.0)])   # the last block
    np.testing.assert_array_equal(batch[9][:, :4, :], x[:, :4, :])


def test_the_evidence_rule_finds_the_inside_of_an_object_that_an_imputation_would_paint_back():
    inside = (4, 4, 8, 8)                                    # latent cell (1, 1) of a 4x4 grid, inside the object
    x = np.zeros((1, 16, 16), np.float32)
    x[0, 2:10, 2:10] = 3.0                                   # an 8 x 8 object of one colour on a plain background
    sims = block_similarities(evidence_batch(x, (4, 4)), inside)
    box, _ = evidence_boxes(sims, (4, 4), (16, 16))
    assert box == inside
    # ROAD's imputation from the block's surroundings paints it back with the object's colour: it hides nothing
    painted = road_impute(x, box_masks(inside, (16, 16))[0], np.zeros(1), np.random.default_rng(0))
    np.testing.assert_allclose(painted[0, 4:8, 4:8], 3.0, atol=1e-5)


def test_of_two_separate_places_the_box_holds_the_stronger_and_touching_blocks_are_boxed_together():
    x = np.zeros((1, 32, 32), np.float32)
    x[0, 0:4, 0:4], x[0, 24:28, 24:28] = 1.0, 2.0           # two blocks of an 8x8 grid, far apart
    batch = evidence_batch(x, (8, 8))
    sims = (batch[:, 0, 0:4, 0:4].mean(axis=(1, 2)) + batch[:, 0, 24:28, 24:28].mean(axis=(1, 2)))[:, None]
    box, = evidence_boxes(sims, (8, 8), (32, 32))
    x0, y0, x1, y1 = box
    assert x0 >= 20 and y0 >= 20 and x1 <= 32 and y1 <= 32   # around the stronger block only, not a 32 x 32 frame
    assert x0 <= 24 and y0 <= 24 and x1 >= 28 and y1 >= 28
    x[0, 24:28, 20:24] = 2.0                                 # its neighbour lowers the similarity as much
    batch = evidence_batch(x, (8, 8))
    sims = (batch[:, 0, 24:28, 20:28].mean(axis=(1, 2)))[:, None]
    box, = evidence_boxes(sims, (8, 8), (32, 32))
    assert box[0] <= 20 and box[2] >= 28                      # one region, both blocks



def test_the_peak_component_is_the_8_connected_region_that_holds_the_peak():
    from scipy import ndimage

    from nasxserve.regions import peak_components
    rng = np.random.default_rng(1)
    masks, maps = rng.random((100, 12, 13)) > 0.6, rng.random((100, 12, 13))
    regions = peak_components(masks, maps)
    for mask, values, region in zip(masks, maps, regions):
        labels, _ = ndimage.label(mask, structure=np.ones((3, 3)))
        peak = np.unravel_index(np.where(mask, values, -1.0).argmax(), mask.shape)
        np.testing.assert_array_equal(region, labels == labels[peak])

# ------------------------------------------------------------------------------------------ deletion protocol
BACKGROUND, PATCH = -1.0, 2.0


def saturating_detector(x: np.ndarray) -> np.ndarray:
    """(B, 1, 16, 16) -> (B, 2) logits: class 0 says 'something that is not background is here', and saturates,
    so a flat grey box fires it as fully as the real patch does (the mean-fill confound, made exact)."""
    away = np.minimum(np.abs(x[:, 0] - BACKGROUND), 1.0)
    windows = np.lib.stride_tricks.sliding_window_view(away, (4, 4), axis=(1, 2)).mean(axis=(-1, -2))
    score = windows.max(axis=(1, 2))
    return np.stack([score, -score], axis=1)


def test_the_road_fill_credits_the_one_patch_that_sets_the_class_and_the_mean_fill_does_not():
    rng = np.random.default_rng(0)
    n = 40
    x = np.full((n, 1, 16, 16), BACKGROUND, np.float32)
    truth = np.zeros((n, 1, 4), np.int64)
    for i in range(n):
        cx, cy = rng.integers(0, 13, size=2)
        x[i, 0, cy:cy + 4, cx:cx + 4] = PATCH
        truth[i, 0] = (cx, cy, cx + 4, cy + 4)
    left = np.where(truth[..., 0] < 6, 12, 0)                # a background box on the side away from the patch
    away = np.stack([left, np.zeros_like(left), left + 4, np.full_like(left, 4)], axis=-1)
    boxes = {"morf": truth, "lerf": away, "random": random_places(truth, (16, 16), rng)}
    target = np.zeros(n, np.int64)
    results = {}
    for fill in ("mean", "road"):
        curves = order_curves(saturating_detector, x, target, boxes, fill, np.asarray([0.01]), rng)
        results[fill] = summarise("evidence", fill, curves)
    mean, road = results["mean"], results["road"]
    assert set(mean.curves) == set(ORDERS)
    assert mean.area_gap == 0.0 and mean.area_gap_ci95 == (0.0, 0.0)       # "the evidence did not matter"
    assert road.area_gap_ci95[0] > 0.0 and road.area_gap > 0.3             # it did: it was the whole class
    assert road.lerf_gap > 0.3 and road.curves["morf"][-1] < 0.1
