"""The explanation-quality measures, each on a constructed case whose answer is known by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from nasxserve.data.base import ImageSet
from nasxserve.explain import localisation as L
from nasxserve.explain import metrics as M
from nasxserve.explain.deletion import random_places
from nasxserve.protos.model import ExplainableNet
from nasxserve.regions import REGION_RULES

EPS = 1e-4
SPOT_SIM = math.log(1.0 / EPS)                 # similarity at distance 0
BACKGROUND_SIM = math.log(2.0 / (1.0 + EPS))   # similarity at distance 1


class Pixels(nn.Module):
    """A feature extractor that passes the image through: the latent grid is the pixel grid."""

    out_channels = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class ScaledPixels(nn.Module):
    """Pixels times a learnable scale: a feature extractor with a weight to randomise."""

    out_channels = 1

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1, bias=False)
        nn.init.ones_(self.conv.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def spot_model(features: nn.Module | None = None, aux_head: bool = True) -> ExplainableNet:
    """Two classes, one prototype each, prototype space = pixel value: class 0's prototype is a white
    pixel (1.0), class 1's is -1.0; the last layer is the identity, so logit k = similarity of prototype k."""
    model = ExplainableNet(features or Pixels(), num_classes=2, prototypes_per_class=1, prototype_dim=1, eps=EPS,
                           aux_head=aux_head)
    model.add_on = nn.Identity()
    with torch.no_grad():
        model.prototype_layer.prototypes.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
        model.last_layer.weight.copy_(torch.eye(2))
    return model.eval()


def spot_images(n: int, size: int = 20, spot: tuple[int, int] = (4, 5), seed: int = 0) -> tuple[ImageSet, np.ndarray]:
    """Black images with one white 4 x 5 block (exactly 5% of 400 pixels) at a random place; pixel values
    are 0 and 1 after normalisation. Returns the set and the blocks as (n, 4) exclusive boxes."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 1, size, size), dtype=np.uint8)
    boxes = []
    for i in range(n):
        x0, y0 = rng.integers(0, size - spot[0] + 1), rng.integers(0, size - spot[1] + 1)
        images[i, 0, y0:y0 + spot[1], x0:x0 + spot[0]] = 255
        boxes.append((x0, y0, x0 + spot[0], y0 + spot[1]))
    return ImageSet(images, np.zeros(n, dtype=np.int64), (0.0,), (1.0,)), np.asarray(boxes)


# ---------------------------------------------------------------------------------------- accuracy
def test_topk_accuracy_counts_labels_among_the_k_largest():
    logits = np.array([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [1.0, 2.0, 3.0]])
    labels = np.array([0, 2, 0])
    assert M.topk_accuracy(logits, labels, 1) == pytest.approx(1 / 3)
    assert M.topk_accuracy(logits, labels, 2) == pytest.approx(2 / 3)
    assert M.topk_accuracy(logits, labels, 5) == 1.0          # k is capped at K


# ---------------------------------------------------------------------------------------- prototype set
def test_two_identical_prototypes_are_one_duplicate_pair():
    p = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    d = M.duplicate_prototypes(p)
    assert d.pairs == [(0, 2)]
    assert (d.close, d.same_source, d.distinct) == (1, 0, 3)
    assert d.summary()["prototypes_in_pairs"] == 2


def test_same_source_patch_is_a_duplicate_even_when_vectors_differ():
    p = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    sources = np.array([[7, 1, 2], [3, 0, 0], [7, 1, 2]])     # prototypes 0 and 2 came from image 7, cell (1, 2)
    d = M.duplicate_prototypes(p, sources)
    assert d.pairs == [(0, 2)] and d.same_source == 1 and d.close == 0
    # the same image at another cell is not the same patch
    d = M.duplicate_prototypes(p, np.array([[7, 1, 2], [3, 0, 0], [7, 1, 3]]))
    assert d.pairs == []


def test_duplicate_threshold_is_a_per_channel_rms_difference():
    dim = 16
    base = np.zeros((2, dim))
    base[1] = 0.0099            # RMS difference 0.0099 < 0.01
    assert M.duplicate_prototypes(base, threshold_rms=0.01).pairs == [(0, 1)]
    base[1] = 0.0101
    assert M.duplicate_prototypes(base, threshold_rms=0.01).pairs == []


def test_groups_of_duplicates_count_once():
    p = np.array([[0.0], [0.0], [0.0], [5.0]])               # three copies: three pairs, one distinct prototype
    d = M.duplicate_prototypes(p)
    assert len(d.pairs) == 3 and d.distinct == 2


def test_nearest_prototype_distances_by_hand():
    p = np.array([[0.0, 0.0], [3.0, 4.0], [3.0, 6.0]])
    np.testing.assert_allclose(M.nearest_prototype_distances(p), [5.0, 2.0, 2.0])


def test_purity_is_one_and_one_half_on_built_neighbourhoods():
    labels = np.array([0, 0, 1, 1, 0, 1])
    # prototype 0 (class 0): nearest images 0, 1, 4 -> all class 0; prototype 1 (class 1): nearest 2, 0, 3, 1
    min_d = np.array([[0.1, 0.2], [0.2, 0.4], [0.9, 0.1], [0.8, 0.3], [0.3, 0.9], [0.7, 0.8]])
    purity = M.class_purity(min_d, labels, np.array([0, 1]), k=3)
    np.testing.assert_allclose(purity, [1.0, 2 / 3])
    np.testing.assert_allclose(M.class_purity(min_d, labels, np.array([0, 1]), k=4), [0.75, 0.5])


def test_min_distances_over_matches_the_prototype_layer():
    images, _ = spot_images(5)
    d = M.min_distances_over(spot_model(), images, batch_size=2)
    np.testing.assert_allclose(d, np.tile([0.0, 1.0], (5, 1)), atol=1e-6)   # spot at 1.0, background at 0


# ---------------------------------------------------------------------------------------- faithfulness
def test_scan_finds_the_spot_prototype_and_its_map():
    images, boxes = spot_images(6)
    scan = M.scan(spot_model(), images, batch_size=4)
    np.testing.assert_allclose(scan.logits[:, 0], SPOT_SIM, rtol=1e-5)
    assert (scan.predicted == 0).all() and (scan.top_prototype == 0).all()
    found = L.top_boxes(scan.top_maps, (20, 20))
    np.testing.assert_array_equal(found, boxes)               # the 95th-percentile box is the block itself


def test_scan_of_a_model_without_an_auxiliary_head():
    images, _ = spot_images(3)
    scan = M.scan(spot_model(aux_head=False), images)
    assert scan.aux_logits is None and scan.logits.shape == (3, 2)


def test_deletion_test_on_a_model_whose_evidence_is_known():
    images, _ = spot_images(40)
    test = M.deletion_test(spot_model(), images, steps=1, batch_size=16, seed=3, rules=["activation"],
                           fills=["mean"])
    result, = test.protocols
    assert (result.rule, result.fill) == ("activation", "mean")
    # hiding the evidence box removes the white block: the class-0 logit falls to the background similarity
    np.testing.assert_allclose(result.curves["morf"], [SPOT_SIM, BACKGROUND_SIM], rtol=1e-5)
    # a box of the same size elsewhere leaves at least one white pixel unless it covers the block exactly
    assert result.curves["random"][0] == pytest.approx(SPOT_SIM, rel=1e-5)
    assert result.curves["random"][1] > SPOT_SIM - 0.1 * (SPOT_SIM - BACKGROUND_SIM)
    # the least-contributing prototype (class 1's, -1.0) matches every black pixel alike: its box is the whole
    # image, and hiding it hides the block too
    assert result.curves["lerf"][1] == pytest.approx(BACKGROUND_SIM, rel=1e-5)
    assert result.areas["morf"] == pytest.approx((SPOT_SIM + BACKGROUND_SIM) / 2, rel=1e-5)
    assert result.area_gap > 3.5 and result.top_lower_share >= 0.9
    assert result.area_gap_ci95[0] > 0 and result.lerf_gap == pytest.approx(0.0, abs=1e-5)
    assert result.n == 40


def test_part_dependence_tells_evidence_on_the_part_from_evidence_elsewhere():
    images, spots = spot_images(30)
    top = np.zeros(30, dtype=np.int64)              # class 0's prototype, the white block's
    on_part = ImageSet(images.images.numpy(), images.labels.numpy(), (0.0,), (1.0,), boxes=spots.astype(np.float32))
    dep = L.part_dependence(spot_model(), on_part, top, batch_size=8)
    # hiding the block leaves black pixels only: the similarity falls to the background's
    assert dep.n == 30 and dep.drop_part == pytest.approx(1 - BACKGROUND_SIM / SPOT_SIM, abs=0.02)
    assert dep.drop_random < 0.05 and dep.part_larger >= 0.9
    # a "part" that is not where the white block is: hiding it leaves the evidence
    elsewhere = np.where(spots[:, :1] >= 10, [[0, 0, 4, 5]], [[16, 15, 20, 20]])
    assert not (L.box_iou(elsewhere.astype(float), spots.astype(float)) > 0).any()
    off_part = ImageSet(images.images.numpy(), images.labels.numpy(), (0.0,), (1.0,),
                        boxes=elsewhere.astype(np.float32))
    dep = L.part_dependence(spot_model(), off_part, top, batch_size=8)
    assert dep.drop_part < 0.05 and dep.part_larger <= 0.1


def test_the_part_dependence_control_is_placed_off_the_part():
    rng = np.random.default_rng(0)
    parts = np.asarray([[8, 8, 16, 16]] * 200 + [[0, 0, 20, 12]])        # the last leaves no room elsewhere
    placed = L._places_off(parts, (20, 20), rng)
    assert (placed[:, 2:] - placed[:, :2] == parts[:, 2:] - parts[:, :2]).all()
    assert (L.box_iou(placed[:200], parts[:200]) == 0).all()
    assert placed[-1, 0] >= 0 and placed[-1, 2] <= 20 and placed[-1, 1] >= 0 and placed[-1, 3] <= 20


def test_deletion_test_runs_every_rule_and_fill_on_the_same_images():
    images, _ = spot_images(6)
    test = M.deletion_test(spot_model(), images, steps=1, batch_size=4, seed=3)
    results = test.protocols
    assert [(d.rule, d.fill) for d in results] == [("activation", "mean"), ("activation", "road"),
                                                   ("evidence", "mean"), ("evidence", "road")]
    assert all(d.n == 6 and d.curves["morf"][0] == pytest.approx(SPOT_SIM, rel=1e-5) for d in results)


def test_the_deletion_tests_top_boxes_are_the_top_prototypes_boxes_by_each_rule():
    images, _ = spot_images(6)
    model = spot_model()
    test = M.deletion_test(model, images, steps=2, batch_size=4, seed=3)
    scan = M.scan(model, images, batch_size=4)
    np.testing.assert_array_equal(test.top_prototype, scan.top_prototype)
    for rule in REGION_RULES:
        np.testing.assert_array_equal(test.top_boxes[rule],
                                      L.top_region_boxes(model, images, scan.top_prototype, rule, batch_size=4))


def test_random_boxes_keep_their_size_and_stay_inside():
    rng = np.random.default_rng(0)
    boxes = np.array([[[0, 0, 5, 3], [2, 2, 20, 20]]] * 50)
    moved = random_places(boxes, (20, 20), rng)
    np.testing.assert_array_equal(moved[..., 2] - moved[..., 0], boxes[..., 2] - boxes[..., 0])
    np.testing.assert_array_equal(moved[..., 3] - moved[..., 1], boxes[..., 3] - boxes[..., 1])
    assert moved.min() >= 0 and moved[..., 2].max() <= 20 and moved[..., 3].max() <= 20
    assert len({tuple(b) for b in moved[:, 0]}) > 10


def test_spearman_by_hand_and_against_scipy():
    a = np.arange(16.0).reshape(4, 4)
    assert M.spearman(a, a * 3 + 1) == pytest.approx(1.0)
    assert M.spearman(a, -a) == pytest.approx(-1.0)
    assert M.spearman(a, np.ones_like(a)) == 0.0
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=30), rng.normal(size=30)
    y[:5] = y[5]                                               # ties take average ranks
    assert M.spearman(x, y) == pytest.approx(spearmanr(x, y).statistic)


def test_randomised_features_reinitialise_f_only():
    model = spot_model(ScaledPixels())
    copy = M.randomised_features(model, seed=1)
    assert not torch.equal(copy.features.conv.weight, model.features.conv.weight)
    assert torch.equal(model.features.conv.weight, torch.ones(1, 1, 1, 1))   # the original is untouched
    assert torch.equal(copy.prototype_layer.prototypes, model.prototype_layer.prototypes)
    assert torch.equal(copy.last_layer.weight, model.last_layer.weight)


def test_randomisation_check_is_one_when_f_has_nothing_to_randomise():
    images, _ = spot_images(8)
    model = spot_model()
    scan = M.scan(model, images)
    result = M.randomisation_check(model, images, scan.top_prototype, scan.top_maps)
    assert result.mean_spearman == pytest.approx(1.0) and result.share_above_half == 1.0



def test_randomisation_check_follows_the_sign_of_the_new_weight():
    # f = w * pixels: a negative w turns every two-valued similarity map upside down (Spearman -1), a
    # positive one keeps its order (+1); which one the re-initialisation draws depends on the seed
    images, _ = spot_images(8)
    model = spot_model(ScaledPixels())
    scan = M.scan(model, images)
    signs = set()
    for seed in range(6):
        w = float(M.randomised_features(model, seed).features.conv.weight.detach())
        result = M.randomisation_check(model, images, scan.top_prototype, scan.top_maps, seed=seed)
        assert result.mean_spearman == pytest.approx(math.copysign(1.0, w))
        signs.add(w > 0)
    assert signs == {True, False}


class Shifted(nn.Module):
    """Latent cell (i, j) holds pixel (i - k, j - k): the evidence sits k pixels up-left of where it is drawn."""

    out_channels = 1

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.roll(x, shifts=(self.k, self.k), dims=(2, 3))

    def keeps_whole(self, blocks: np.ndarray, size: int = 20) -> np.ndarray:
        """(n,) bool: which (n, 4) blocks the roll moves without wrapping any of them round the edge."""
        return (blocks[:, 2:] + self.k <= size).all(axis=1)


class Blurred(nn.Module):
    """Latent cell = mean of the 3 x 3 pixels around it: every similarity depends on 9 pixels equally."""

    out_channels = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.avg_pool2d(x, 3, stride=1, padding=1)


def off_spot_model(features: nn.Module) -> ExplainableNet:
    """:func:`spot_model` with class 0's prototype at 1.5 instead of 1.0: a white pixel is the best match
    but not an exact one, so the similarity has an input gradient (at distance 0 it has none)."""
    model = spot_model(features)
    with torch.no_grad():
        model.prototype_layer.prototypes[0] = 1.5
    return model


def _alignment(features: nn.Module, images: ImageSet) -> M.Alignment:
    model = off_spot_model(features)
    scan = M.scan(model, images)
    assert (scan.top_prototype == 0).all()
    return M.evidence_alignment(model, images, scan.top_prototype, L.top_boxes(scan.top_maps, (20, 20)),
                                batch_size=4)


def test_alignment_of_evidence_that_is_exactly_its_box():
    # the similarity's maximum is the block's first (top-left) pixel and depends on that pixel alone
    images, _ = spot_images(10)
    result = _alignment(Pixels(), images)
    assert result.n == 10 and result.mass_in_box == pytest.approx(1.0) and result.box_share == pytest.approx(0.05)
    assert result.radius50_px == 0.0
    assert result.centroid_offset_px == pytest.approx(math.hypot(1.5, 2.0))   # top-left pixel to the 4 x 5 centre


def test_alignment_of_evidence_drawn_away_from_where_it_is():
    images, boxes = spot_images(40, seed=1)
    k = 6
    inside = np.flatnonzero(Shifted(k).keeps_whole(boxes))
    result = _alignment(Shifted(k), images.subset(inside))
    assert result.n == len(inside) >= 5
    assert result.mass_in_box == 0.0 and result.radius50_px == 0.0
    assert result.centroid_offset_px == pytest.approx(math.hypot(1.5 + k, 2.0 + k))


def test_alignment_radius_of_a_three_by_three_receptive_field():
    # the maximum is the block's first interior pixel; its 3 x 3 window lies inside the block: the centre
    # holds 1/9 of the gradient and the four pixels at distance 1 another 4/9, so half is within 1 pixel
    images, _ = spot_images(10, seed=2)
    result = _alignment(Blurred(), images)
    assert result.mass_in_box == pytest.approx(1.0) and result.radius50_px == pytest.approx(1.0)
    assert result.centroid_offset_px == pytest.approx(math.hypot(0.5, 1.0))


def test_alignment_leaves_out_images_without_a_gradient():
    images, _ = spot_images(4)
    model = spot_model()                    # an exact match: distance 0, zero gradient
    scan = M.scan(model, images)
    result = M.evidence_alignment(model, images, scan.top_prototype, L.top_boxes(scan.top_maps, (20, 20)))
    assert result == M.Alignment(0, None, None, None, None)


# ---------------------------------------------------------------------------------------- localisation
def test_box_iou_by_hand():
    assert L.box_iou([0, 0, 4, 4], [2, 2, 6, 6]) == pytest.approx(4 / 28)
    assert L.box_iou([0, 0, 4, 4], [0, 0, 4, 4]) == 1.0
    assert L.box_iou([0, 0, 2, 2], [2, 2, 4, 4]) == 0.0       # touching edges do not overlap
    np.testing.assert_allclose(L.box_iou(np.array([[0, 0, 4, 4], [0, 0, 2, 4]]), np.array([[0, 0, 4, 4]] * 2)),
                               [1.0, 0.5])


def test_part_box_hits_use_the_iou_threshold():
    boxes = np.array([[0, 0, 4, 4], [0, 0, 2, 4], [0, 0, 1, 4]])
    truth = np.array([[0, 0, 4, 4]] * 3)
    loc = L.part_box_hits(boxes, truth)
    assert loc.hit_rate == pytest.approx(2 / 3)                # IoU 1.0 and 0.5 hit, 0.25 does not
    assert loc.mean_iou == pytest.approx((1.0 + 0.5 + 0.25) / 3)


def test_class_activation_box_of_h1_is_the_block_it_weighs():
    images, blocks = spot_images(8)
    shift = Shifted(2)
    model = spot_model(shift)
    with torch.no_grad():
        model.aux_head.weight.copy_(torch.tensor([[3.0], [-1.0]]))
        model.aux_head.bias.copy_(torch.tensor([0.5, 0.0]))
    x, _ = images.batch(torch.arange(8))
    with torch.no_grad():
        cams = model.class_activation_map(model(x).features, torch.zeros(8, dtype=torch.long)).numpy()
    assert cams.shape == (8, 20, 20)
    # h1's logit is the map's mean plus the bias: a 4 x 5 block of 3s over 400 pixels, + 0.5
    np.testing.assert_allclose(cams.mean(axis=(1, 2)) + 0.5, model(x).aux_logits[:, 0].detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(cams.mean(axis=(1, 2)), 3.0 * 20 / 400, rtol=1e-6)
    # the features sit 2 pixels down-right of the image (rolled), and so does the box
    inside = shift.keeps_whole(blocks)
    assert inside.sum() >= 4
    np.testing.assert_array_equal(L.top_boxes(cams, (20, 20))[inside], blocks[inside] + 2)
    with torch.no_grad():
        other = model.class_activation_map(model(x).features, torch.ones(8, dtype=torch.long)).numpy()
    np.testing.assert_allclose(other, -cams / 3.0)              # class 1 weighs the same pixels by -1
    # the evaluation's scan keeps the map of each image's predicted class, from the same pass
    scan = M.scan(model, images, batch_size=3)
    np.testing.assert_allclose(scan.cam_maps, np.where(scan.predicted[:, None, None] == 0, cams, other), rtol=1e-6)


def test_class_activation_maps_need_h1():
    images, _ = spot_images(2)
    x, _ = images.batch(torch.arange(2))
    no_h1 = spot_model(aux_head=False)
    with pytest.raises(ValueError, match="no auxiliary head"):
        no_h1.class_activation_map(no_h1(x).features, torch.zeros(2, dtype=torch.long))
    assert M.scan(no_h1, images).cam_maps is None


def test_parts_in_box_needs_visible_parts_inside():
    parts = np.array([[1.0, 1.0, 1.0], [5.0, 5.0, 1.0], [2.0, 2.0, 0.0], [4.0, 1.0, 1.0]])
    np.testing.assert_array_equal(L.parts_in_box(np.array([0, 0, 4, 4]), parts), [True, False, False, False])
    loc = L.part_point_hits(np.array([[0, 0, 4, 4], [6, 6, 8, 8]]), np.stack([parts, parts]))
    assert loc.hit_rate == 0.5


def test_peak_regions_centre_on_the_peak_and_clip():
    maps = np.zeros((2, 20, 20))
    maps[0, 10, 6] = 1.0
    maps[1, 0, 19] = 1.0
    regions = L.peak_regions(maps, (20, 20), half=3)
    np.testing.assert_array_equal(regions, [[3, 7, 9, 13], [16, 0, 20, 3]])


def test_consistency_and_stability_scores_on_built_hits():
    # prototype 0 hits part 1 in 4 of 5 images (0.8 >= 0.8): consistent; prototype 1 wanders: not consistent
    hits = {0: np.array([[0, 1], [0, 1], [1, 1], [0, 1], [0, 0]], dtype=bool),
            1: np.array([[1, 0], [0, 1], [1, 0], [0, 1], [0, 0]], dtype=bool)}
    visible = {j: np.ones((5, 2), dtype=bool) for j in hits}
    assert L.consistency_score(hits, visible) == 0.5
    # part 1 hidden in the one image prototype 0 missed it: 4 of 4 visible
    visible[0][4, 1] = False
    assert L.consistency_score(hits, visible, threshold=0.9) == 0.5
    perturbed = {0: hits[0].copy(), 1: hits[1].copy()}
    perturbed[1][0] = [0, 1]
    perturbed[1][1] = [0, 0]
    assert L.stability_score(hits, perturbed) == pytest.approx((1.0 + 3 / 5) / 2)


def test_part_hits_follow_the_spot_and_survive_small_noise():
    images, boxes = spot_images(6)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2.0
    parts = np.zeros((6, 2, 3), dtype=np.float32)
    parts[:, 0] = np.c_[centres, np.ones(6)]                   # part 0 at the block
    parts[:, 1] = [0.0, 0.0, 1.0]                               # part 1 in a corner
    parts[boxes[:, 0] < 6, 1, 2] = 0.0                          # ... hidden where the block is near it
    images.parts = parts
    model = spot_model()
    clean = L.part_hits_per_prototype(model, images, region_share=0.3)
    assert set(clean) == {0}                                    # class 1 has no images
    assert clean[0][:, 0].all() and not clean[0][:, 1].any()
    assert L.consistency_score(clean, L.visible_parts_per_prototype(model, images)) == 1.0
    noisy = L.part_hits_per_prototype(model, images, region_share=0.3, noise_seed=0)
    assert L.stability_score(clean, noisy) == 1.0


def test_the_evaluation_boxes_again_only_where_the_deletion_tests_top_prototype_is_not_the_scans():
    from nasxserve.explain.evaluation import EvaluationOptions, _top_evidence_boxes

    images, _ = spot_images(6)
    model = spot_model()
    scan = M.scan(model, images, batch_size=4)
    test = M.deletion_test(model, images, steps=1, batch_size=4, seed=3, rules=["evidence"], fills=["mean"])
    other = test.top_prototype.copy()
    other[[1, 4]] = 1 - other[[1, 4]]                  # as if two equal contributions had come out the other way
    marked = M.DeletionTest(test.protocols, other, {"evidence": np.full_like(test.top_boxes["evidence"], -1)})
    boxes = _top_evidence_boxes(model, images, scan, marked, EvaluationOptions(batch_size=4), torch.device("cpu"))
    assert (boxes[[0, 2, 3, 5]] == -1).all()                                 # the deletion test's, as they were
    np.testing.assert_array_equal(boxes[[1, 4]], test.top_boxes["evidence"][[1, 4]])   # boxed again, the scan's
