"""The region rules (nasxserve.regions), the linear imputation behind them (nasxserve.imputation) and the
deletion protocol (nasxserve.explain.deletion), on constructed images whose evidence is known."""
from __future__ import annotations

import numpy as np
import pytest

from nasxserve.boxes import box_masks
from nasxserve.explain.deletion import ORDERS, order_curves, random_places, road_impute, summarise
from nasxserve.explain.metrics import box_iou
from nasxserve.imputation import block_imputer, impute_block
from nasxserve.regions import cell_blocks, region_boxes, sensitivity_maps


def ramp(h: int = 12, w: int = 10, channels: int = 2) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w]
    return np.stack([0.3 * xs - 0.2 * ys + 1.0 + c for c in range(channels)]).astype(np.float64)


# ------------------------------------------------------------------------------------------ imputation
def test_a_hidden_block_of_a_linear_image_is_imputed_exactly_by_both_solvers():
    x = ramp()
    block = (2, 3, 7, 8)
    mask = box_masks(block, x.shape[1:])[0]
    dense = impute_block(x, block)
    sparse = road_impute(x, mask, np.zeros(2), np.random.default_rng(0))
    np.testing.assert_allclose(dense, x, atol=1e-4)      # the eight-neighbour mean of a plane is the plane
    np.testing.assert_allclose(sparse, x, atol=1e-4)


def test_a_block_on_the_edge_continues_its_surroundings_and_the_input_is_not_touched():
    x = np.zeros((1, 8, 8))
    x[0, :, 4:] = 1.0                     # left half 0, right half 1
    kept = x.copy()
    out = impute_block(x, (0, 0, 3, 8))  # a left strip, all its visible neighbours are 0
    np.testing.assert_array_equal(x, kept)
    assert np.abs(out[0, :, :3]).max() < 1e-4
    out = impute_block(x, (6, 0, 8, 8))  # a right strip, its neighbours are 1
    np.testing.assert_allclose(out[0, :, 6:], 1.0, atol=1e-4)


def test_a_wholly_hidden_image_imputes_to_the_training_mean_and_the_operator_is_cached():
    x = ramp(6, 6, 1)
    np.testing.assert_allclose(impute_block(x, (0, 0, 6, 6)), 0.0, atol=1e-9)
    assert block_imputer((6, 6), (1, 1, 3, 3)) is block_imputer((6, 6), (1, 1, 3, 3))


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
    assert len(blocks) == 64 and (box_masks(blocks, (224, 224)).sum(axis=0) == 1).all()
    assert set((blocks[:, 2] - blocks[:, 0]).tolist()) == {28}


def test_sensitivity_is_the_clipped_drop_per_cell():
    sims = np.asarray([2.0, 1.0])
    occluded = np.asarray([[1.5, 1.0], [2.5, 0.25], [2.0, 1.0], [0.0, 1.0]])    # 4 cells of a 2x2 grid
    maps = sensitivity_maps(sims, occluded, (2, 2))
    np.testing.assert_allclose(maps[0], [[0.5, 0.0], [0.0, 2.0]])                 # a rise counts as 0
    np.testing.assert_allclose(maps[1], [[0.0, 0.75], [0.0, 0.0]])


def block_model(block: tuple[int, int, int, int]):
    """A 'model' with two prototypes: s_0 is the mean of the pixels of ``block``, s_1 the mean of the whole image."""
    x0, y0, x1, y1 = block

    def similarities_of(images: np.ndarray) -> np.ndarray:
        return np.stack([images[:, :, y0:y1, x0:x1].mean(axis=(1, 2, 3)), images.mean(axis=(1, 2, 3))], axis=1)
    return similarities_of


def test_the_evidence_rule_boxes_the_pixels_the_similarity_depends_on_wherever_the_map_peaks():
    block = (4, 8, 8, 12)                                    # latent cell (2, 1) of a 4x4 grid on 16x16
    x = np.zeros((1, 16, 16), np.float32)
    x[0, 8:12, 4:8] = 3.0
    similarities_of = block_model(block)
    sims = similarities_of(x[None])[0]
    maps = np.zeros((2, 4, 4))
    maps[0, 0, 3] = 1.0                                      # the similarity map peaks at the opposite corner
    maps[1, 3, 0] = 1.0
    evidence = region_boxes("evidence", x, np.asarray([0]), sims, maps, similarities_of)
    activation = region_boxes("activation", x, np.asarray([0]), sims, maps, similarities_of)
    assert box_iou(np.asarray(evidence[0]), np.asarray(block)) >= 0.5
    assert box_iou(np.asarray(activation[0]), np.asarray(block)) == 0.0


def test_a_prototype_no_block_lowers_gets_the_whole_image():
    x = np.zeros((1, 8, 8), np.float32)                      # nothing to lose anywhere
    similarities_of = block_model((0, 0, 4, 4))
    sims = similarities_of(x[None])[0]
    boxes = region_boxes("evidence", x, np.asarray([0, 1]), sims, np.zeros((2, 2, 2)), similarities_of)
    assert boxes == [(0, 0, 8, 8), (0, 0, 8, 8)]


def test_an_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="activation, evidence"):
        region_boxes("gradient", np.zeros((1, 4, 4)), np.asarray([0]), np.zeros(1), np.zeros((1, 2, 2)), lambda x: x)


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
