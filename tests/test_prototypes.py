"""Prototype layer, eq. (8) initialisation, separation cost (eq. 6), stage losses (eq. 4, 5, 7) and the
global projection of eq. (9)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from nasxserve.data.base import ImageSet
from nasxserve.protos.layer import PrototypeLayer, distance_to_similarity, squared_distances
from nasxserve.protos.losses import LossWeights, Stage, joint_logits, separation_cost, stage_loss
from nasxserve.protos.model import ExplainableNet, NetOutput, class_connection_init
from nasxserve.boxes import activation_box, activation_boxes, scale_box, upsample_bicubic
from nasxserve.protos.projection import class_counts, project_prototypes, save_projection, with_evidence_boxes


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


pytestmark = pytest.mark.usefixtures("one_thread")


def _brute_distances(z: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W), (m, D, 1, 1) -> (B, m, H, W) by explicit loops over positions and prototypes."""
    b, d, h, w = z.shape
    m = protos.shape[0]
    out = torch.empty(b, m, h, w, dtype=z.dtype)
    for i in range(b):
        for j in range(m):
            for r in range(h):
                for c in range(w):
                    diff = z[i, :, r, c] - protos[j, :, 0, 0]
                    out[i, j, r, c] = (diff * diff).sum()
    return out


class TinyFeatures(nn.Module):
    """A small CNN with BatchNorm: (B, 1, 16, 16) -> (B, 6, 4, 4)."""

    out_channels = 6

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                 nn.Conv2d(6, 6, 3, stride=2, padding=1))

    def forward(self, x):
        return self.net(x)


def _tiny_model(num_classes=3, per_class=2, dim=4) -> ExplainableNet:
    torch.manual_seed(1)
    model = ExplainableNet(TinyFeatures(), num_classes, prototypes_per_class=per_class, prototype_dim=dim)
    bn = model.features.net[1]
    with torch.no_grad():  # non-trivial running statistics so that eval mode differs from train mode
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
    return model


def _image_set(n=23, classes=3, size=16, seed=0) -> ImageSet:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 1, size, size), dtype=np.uint8)
    labels = rng.integers(0, classes, size=n)
    labels[:classes] = np.arange(classes)
    return ImageSet(images, labels, mean=(0.5,), std=(0.25,))


# ----------------------------------------------------------------------------------------- distances
def test_squared_distances_match_brute_force():
    torch.manual_seed(7)
    z = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    p = torch.randn(4, 5, 1, 1, dtype=torch.float64)
    d = squared_distances(z, p)
    assert d.shape == (2, 4, 3, 3)
    torch.testing.assert_close(d, _brute_distances(z, p), rtol=1e-12, atol=1e-12)
    # broadcasting form, independent of the loops
    bcast = ((z[:, None] - p[None, :, :, 0, 0, None, None]) ** 2).sum(dim=2)
    torch.testing.assert_close(d, bcast, rtol=1e-12, atol=1e-12)


def test_squared_distance_of_a_patch_to_itself_is_zero_not_negative():
    z = torch.randn(1, 8, 4, 4) * 100
    p = z[0, :, 2, 1].clone().view(1, 8, 1, 1)
    d = squared_distances(z, p)
    assert d.min() >= 0
    assert d[0, 0, 2, 1] <= 1e-5 * (p ** 2).sum()  # rounding only
    assert d.flatten().argmin() == 2 * 4 + 1


def test_min_distance_is_exact_where_the_expansion_cancels():
    # float32 latent patches near the prototype with large norms: the conv expansion loses the small
    # distance to rounding, the layer's directly recomputed minimum keeps it
    torch.manual_seed(3)
    p = torch.rand(4, 32, 1, 1)
    z = p[:, :, 0, 0].T.reshape(1, 32, 2, 2) + 1e-3 * torch.randn(1, 32, 2, 2)
    layer = PrototypeLayer(4, 32, 2)
    with torch.no_grad():
        layer.prototypes.copy_(p)
    acts = layer(z)
    exact = _brute_distances(z.double(), p.double()).flatten(2).min(dim=-1).values
    torch.testing.assert_close(acts.min_distances.double(), exact, rtol=1e-5, atol=0)
    sims_exact = distance_to_similarity(exact, layer.eps)
    torch.testing.assert_close(acts.similarities.double(), sims_exact, rtol=0, atol=1e-5)


def test_prototype_layer_outputs_match_brute_force():
    torch.manual_seed(8)
    layer = PrototypeLayer(6, 5, 3, eps=1e-4).double()
    z = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    with torch.no_grad():
        layer.prototypes.copy_(torch.randn(6, 5, 1, 1, dtype=torch.float64))
    acts = layer(z)
    brute = _brute_distances(z, layer.prototypes.detach())
    torch.testing.assert_close(acts.distances, brute, rtol=1e-12, atol=1e-12)
    flat = brute.flatten(2)
    torch.testing.assert_close(acts.min_distances, flat.min(dim=-1).values, rtol=1e-12, atol=1e-12)
    assert torch.equal(acts.best_patch, flat.argmin(dim=-1))
    assert acts.best_patch.dtype == torch.int64
    # the flat index is h * W + w
    for b in range(2):
        for j in range(6):
            k = int(acts.best_patch[b, j])
            assert brute[b, j, k // 4, k % 4] == flat[b, j].min()
    eps = 1e-4
    d = acts.min_distances
    torch.testing.assert_close(acts.similarities, torch.log((d + 1) / (d + eps)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acts.similarity_maps, torch.log((brute + 1) / (brute + eps)),
                               rtol=1e-12, atol=1e-12)
    # the best similarity is at the minimum distance
    torch.testing.assert_close(acts.similarities, acts.similarity_maps.flatten(2).max(dim=-1).values)


def test_distance_to_similarity_values():
    d = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    s = distance_to_similarity(d, 1e-4)
    torch.testing.assert_close(s, torch.tensor([math.log(1e4), math.log(2 / 1.0001), math.log(4 / 3.0001)],
                                               dtype=torch.float64))
    assert (s[:-1] > s[1:]).all()  # decreasing in distance


def test_prototype_layer_classes_and_validation():
    layer = PrototypeLayer(12, 3, 4)
    assert layer.prototype_class.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert layer.num_prototypes == 12
    with pytest.raises(ValueError, match="evenly"):
        PrototypeLayer(10, 3, 4)


# ----------------------------------------------------------------------------------------- eq. (8)
def test_last_layer_init_eq8():
    model = ExplainableNet(TinyFeatures(), num_classes=3, prototypes_per_class=2, prototype_dim=4)
    assert model.prototype_layer.prototype_class.tolist() == [0, 0, 1, 1, 2, 2]   # j // per_class
    expected = torch.tensor([[1.0, 1.0, -0.5, -0.5, -0.5, -0.5],
                             [-0.5, -0.5, 1.0, 1.0, -0.5, -0.5],
                             [-0.5, -0.5, -0.5, -0.5, 1.0, 1.0]])
    assert torch.equal(model.last_layer.weight.detach(), expected)
    assert model.last_layer.bias is None
    # re-initialisation follows changed class identities (after a projection)
    model.prototype_layer.prototype_class.copy_(torch.tensor([2, 0, 0, 1, 2, 2]))
    model.reset_last_layer()
    w = model.last_layer.weight.detach()
    for j, k in enumerate([2, 0, 0, 1, 2, 2]):
        assert w[k, j] == 1.0
        assert all(w[o, j] == -0.5 for o in range(3) if o != k)
    torch.testing.assert_close(class_connection_init(torch.tensor([1, 0]), 2, incorrect=-0.25),
                               torch.tensor([[-0.25, 1.0], [1.0, -0.25]]))


def test_explainable_net_logits_are_last_layer_times_similarities():
    model = _tiny_model().double().eval()
    x = torch.randn(3, 1, 16, 16, dtype=torch.float64)
    out = model(x)
    z = model.features(x)
    acts = model.prototype_layer(model.add_on(z))
    torch.testing.assert_close(out.logits, acts.similarities @ model.last_layer.weight.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.aux_logits, model.aux_head(z.mean(dim=(2, 3))), rtol=1e-12, atol=1e-12)
    assert out.protos.distances.shape == (3, 6, 4, 4) and out.tower_logits is None
    only_aux = model(x, prototype_path=False)
    assert only_aux.logits is None and only_aux.protos is None
    torch.testing.assert_close(only_aux.aux_logits, out.aux_logits)
    assert model(x, aux_path=False).aux_logits is None
    assert model.latent(x).shape == (3, 4, 4, 4)
    assert ((model.latent(x) > 0) & (model.latent(x) < 1)).all()   # sigmoid add-on


# ----------------------------------------------------------------------------------------- eq. (6)
def test_separation_cost_collinear_example():
    # p0=(0,0), p1=(3,4), p2=(6,8): nearest squared distances 25, 25, 25 -> Sep = -25
    p = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]], dtype=torch.float64).view(3, 2, 1, 1)
    assert separation_cost(p).item() == pytest.approx(-25.0, abs=1e-12)


def test_separation_cost_non_symmetric_example():
    # p0=(0,0), p1=(1,0), p2=(4,0), p3=(0,3)
    # squared distances: d01=1, d02=16, d03=9, d12=9, d13=10, d23=25
    # nearest: p0 -> 1, p1 -> 1, p2 -> 9, p3 -> 9; Sep = -(1 + 1 + 9 + 9) / 4 = -5
    p = torch.tensor([[0.0, 0.0], [1.0, 0.0], [4.0, 0.0], [0.0, 3.0]], dtype=torch.float64).view(4, 2, 1, 1)
    assert separation_cost(p).item() == pytest.approx(-5.0, abs=1e-12)
    # and a 3-D example whose nearest neighbours are not mutual:
    # q0=(0,0,0), q1=(2,0,0), q2=(2,3,0), q3=(2,3,6): d01=4, d02=13, d03=49, d12=9, d13=45, d23=36
    # nearest: 4, 4, 9, 36 -> Sep = -53 / 4
    q = torch.tensor([[0, 0, 0], [2, 0, 0], [2, 3, 0], [2, 3, 6]], dtype=torch.float64).view(4, 3, 1, 1)
    assert separation_cost(q).item() == pytest.approx(-53.0 / 4, abs=1e-12)


def test_separation_cost_matches_brute_force_and_gradient():
    torch.manual_seed(9)
    p = torch.randn(7, 5, 1, 1, dtype=torch.float64, requires_grad=True)
    flat = p.detach().flatten(1)
    nearest = [min(((flat[i] - flat[j]) ** 2).sum().item() for j in range(7) if j != i) for i in range(7)]
    assert separation_cost(p).item() == pytest.approx(-sum(nearest) / 7, rel=1e-12)
    # gradient of the brute-force form
    (g,) = torch.autograd.grad(separation_cost(p), p)
    pp = p.detach().clone().requires_grad_()
    f = pp.flatten(1)
    terms = []
    for i in range(7):
        j = min((j for j in range(7) if j != i), key=lambda j: ((flat[i] - flat[j]) ** 2).sum().item())
        terms.append(((f[i] - f[j]) ** 2).sum())
    (g_ref,) = torch.autograd.grad(-torch.stack(terms).mean(), pp)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------- eq. (4, 5, 7)
def _net_output(b=5, k=3, tower=False, seed=11) -> tuple[NetOutput, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = NetOutput(logits=torch.randn(b, k, generator=g, dtype=torch.float64),
                    aux_logits=torch.randn(b, k, generator=g, dtype=torch.float64),
                    tower_logits=torch.randn(b, k, generator=g, dtype=torch.float64) if tower else None,
                    protos=None)
    y = torch.randint(0, k, (b,), generator=g)
    return out, y


def _sep_by_hand(p: torch.Tensor) -> float:
    f = p.flatten(1)
    m = f.shape[0]
    return -sum(min(float(((f[i] - f[j]) ** 2).sum()) for j in range(m) if j != i) for i in range(m)) / m


def test_default_loss_weights_are_the_papers():
    w = LossWeights()
    assert w.lambda1 == 0.8 and w.lambda2 == 0.001 and w.tower == 0.0


def test_stage_flags():
    assert not Stage.ADAPT.uses_prototypes and Stage.ADAPT.uses_aux
    assert Stage.JOINT.uses_prototypes and Stage.JOINT.uses_aux
    assert Stage.FINETUNE.uses_prototypes and not Stage.FINETUNE.uses_aux


def test_stage_losses_by_hand():
    out, y = _net_output()
    p = torch.randn(6, 4, 1, 1, dtype=torch.float64)
    sep = _sep_by_hand(p)
    w = LossWeights(lambda1=0.7, lambda2=0.05)
    ce_main = F.cross_entropy(out.logits, y).item()
    ce_aux = F.cross_entropy(out.aux_logits, y).item()
    # eq. (4)
    assert stage_loss(Stage.ADAPT, out, y, p, w).item() == pytest.approx(ce_aux, rel=1e-12)
    # eq. (5)
    assert stage_loss(Stage.JOINT, out, y, p, w).item() == pytest.approx(ce_main + 0.7 * ce_aux + 0.05 * sep,
                                                                         rel=1e-12)
    # eq. (7)
    assert stage_loss(Stage.FINETUNE, out, y, p, w).item() == pytest.approx(ce_main + 0.05 * sep, rel=1e-12)
    # the three differ (the test would notice a swapped term)
    vals = {round(stage_loss(s, out, y, p, w).item(), 9) for s in Stage}
    assert len(vals) == 3


def test_stage_loss_cross_entropy_is_mean_over_batch():
    out, y = _net_output(b=4, k=3)
    p = torch.randn(3, 2, 1, 1, dtype=torch.float64)
    manual = -sum(torch.log_softmax(out.aux_logits[i], 0)[y[i]].item() for i in range(4)) / 4
    assert stage_loss(Stage.ADAPT, out, y, p, LossWeights()).item() == pytest.approx(manual, rel=1e-12)


def test_stage_loss_adapt_needs_no_prototype_path_and_finetune_ignores_aux():
    out, y = _net_output()
    p = torch.randn(6, 4, 1, 1, dtype=torch.float64)
    w = LossWeights()
    no_protos = NetOutput(logits=None, aux_logits=out.aux_logits, tower_logits=None, protos=None)
    assert stage_loss(Stage.ADAPT, no_protos, y, p, w).item() == pytest.approx(
        F.cross_entropy(out.aux_logits, y).item(), rel=1e-12)
    no_aux = NetOutput(logits=out.logits, aux_logits=None, tower_logits=None, protos=None)
    assert stage_loss(Stage.FINETUNE, no_aux, y, p, w).item() == pytest.approx(
        F.cross_entropy(out.logits, y).item() + 0.001 * _sep_by_hand(p), rel=1e-12)


def test_stage_loss_tower_term():
    out, y = _net_output(tower=True)
    p = torch.randn(6, 4, 1, 1, dtype=torch.float64)
    ce_tower = F.cross_entropy(out.tower_logits, y).item()
    off = LossWeights(0.8, 0.001, tower=0.0)
    on = LossWeights(0.8, 0.001, tower=0.4)
    for s in Stage:
        base = stage_loss(s, out, y, p, off).item()
        assert stage_loss(s, out, y, p, on).item() == pytest.approx(base + 0.4 * ce_tower, rel=1e-12)
    no_tower = NetOutput(out.logits, out.aux_logits, None, None)
    assert stage_loss(Stage.JOINT, no_tower, y, p, on).item() == pytest.approx(
        stage_loss(Stage.JOINT, out, y, p, off).item(), rel=1e-12)


def test_joint_logits():
    out, _ = _net_output()
    torch.testing.assert_close(joint_logits(out, 0.8), (out.logits + 0.8 * out.aux_logits) / 1.8)


# ----------------------------------------------------------------------------------------- eq. (9)
def _latents(model: ExplainableNet, images: ImageSet, batch_size: int) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model.latent(x) for x, _ in images.batches(batch_size)])


def test_projection_replaces_prototypes_with_nearest_patches():
    model = _tiny_model()
    images = _image_set()
    bs = 8     # 23 images: the last batch is partial
    model.train()
    before = model.prototype_layer.prototypes.detach().clone()
    class_before = model.prototype_layer.prototype_class.clone()
    z = _latents(model, images, bs)                              # (N, D, 4, 4), eval mode
    n, dim, h, w = z.shape
    assert (n, dim, h, w) == (23, 4, 4, 4)
    d_before = squared_distances(z.double(), before.double())    # (N, m, H, W)
    min_before = d_before.permute(1, 0, 2, 3).reshape(6, -1).min(dim=1).values
    model.train()

    records = project_prototypes(model, images, batch_size=bs)

    assert model.training   # mode restored
    protos = model.prototype_layer.prototypes.detach()
    assert len(records) == 6
    for j, r in enumerate(records):
        assert r.prototype == j
        row, col = r.position
        assert 0 <= r.sample < n and 0 <= row < h and 0 <= col < w
        # exactly the latent patch the record points at
        assert torch.equal(protos[j, :, 0, 0], z[r.sample, :, row, col])
        # the class follows the source image
        assert r.source_class == int(images.labels[r.sample])
        assert int(model.prototype_layer.prototype_class[j]) == r.source_class
        assert r.class_before == int(class_before[j])
        # recorded distance: pre-projection squared distance to that patch, and it is the minimum
        assert r.distance == pytest.approx(float(d_before[r.sample, j, row, col]), rel=1e-5, abs=1e-6)
        assert r.distance == pytest.approx(float(min_before[j]), rel=1e-5, abs=1e-6)
        x0, y0, x1, y1 = r.box_xyxy
        assert 0 <= x0 < x1 <= 16 and 0 <= y0 < y1 <= 16
    # no prototype is farther from its nearest patch than before
    d_after = squared_distances(z.double(), protos.double()).permute(1, 0, 2, 3).reshape(6, -1)
    assert (d_after.min(dim=1).values <= min_before + 1e-9).all()
    assert d_after.min(dim=1).values.max() < 1e-9
    assert not torch.equal(protos, before)
    assert class_counts(records, 3) == torch.bincount(model.prototype_layer.prototype_class, minlength=3).tolist()


def test_projected_prototype_is_perfectly_similar_to_its_source():
    model = _tiny_model()
    images = _image_set(n=10)
    records = project_prototypes(model, images, batch_size=4)
    model.eval()
    with torch.no_grad():
        for r in records:
            x, _ = images.batch(torch.tensor([r.sample]))
            acts = model(x).protos
            assert acts.min_distances[0, r.prototype] < 1e-5
            h, w = acts.distances.shape[2:]
            assert int(acts.best_patch[0, r.prototype]) == r.position[0] * w + r.position[1]


def test_projection_on_digits_subset():
    from nasxserve.data import load_dataset
    data = load_dataset("digits")
    images = data.train.subset(np.arange(40))
    torch.manual_seed(2)
    model = ExplainableNet(TinyFeatures(), data.num_classes, prototypes_per_class=1, prototype_dim=4)
    model.eval()
    z = _latents(model, images, 16)
    records = project_prototypes(model, images, batch_size=16)
    assert not model.training
    protos = model.prototype_layer.prototypes.detach()
    for j, r in enumerate(records):
        assert torch.equal(protos[j, :, 0, 0], z[r.sample, :, r.position[0], r.position[1]])
        assert r.source_class == int(images.labels[r.sample])


@pytest.mark.parametrize("h, w, out_h, out_w", [(4, 4, 16, 16), (2, 3, 32, 17), (7, 7, 224, 224), (8, 8, 3, 5)])
def test_numpy_bicubic_equals_torch(h, w, out_h, out_w):
    m = torch.rand(h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(h * w))
    expected = F.interpolate(m[None, None], size=(out_h, out_w), mode="bicubic", align_corners=False)[0, 0]
    np.testing.assert_allclose(upsample_bicubic(m.numpy(), (out_h, out_w)), expected.numpy(), rtol=0, atol=1e-12)


def test_scale_box_rounds_outward_and_stays_inside():
    assert scale_box((4, 8, 12, 16), (16, 16), (64, 32)) == (16, 16, 48, 32)
    assert scale_box((1, 1, 3, 3), (16, 16), (10, 10)) == (0, 0, 2, 2)
    assert scale_box((0, 0, 16, 16), (16, 16), (7, 5)) == (0, 0, 7, 5)


def test_activation_box_single_peak():
    sim = np.zeros((4, 4))
    sim[1, 2] = 1.0                         # latent cell (row 1, col 2) covers pixels y 4..7, x 8..11
    x0, y0, x1, y1 = activation_box(sim, (16, 16))
    assert 0 <= x0 < x1 <= 16 and 0 <= y0 < y1 <= 16
    assert x0 <= 9 and x1 >= 11 and y0 <= 5 and y1 >= 7   # holds the centre of the cell
    assert x0 >= 7 and x1 <= 13 and y0 >= 3 and y1 <= 9   # and not much more
    assert (x1 - x0) * (y1 - y0) >= 0.05 * 256


def test_activation_box_axes_and_corners():
    # non-square: the map is (H'=2, W'=4), the image (H=8, W=16); peak at the top-right cell
    sim = np.zeros((2, 4))
    sim[0, 3] = 5.0
    x0, y0, x1, y1 = activation_box(sim, (8, 16))
    assert x1 == 16 and y0 == 0          # columns are x, rows are y
    assert x0 >= 10 and y1 <= 5
    # peak in the top-left cell: the box starts at the image corner and stays in that cell's area
    sim = np.zeros((4, 4))
    sim[0, 0] = 1.0
    x0, y0, x1, y1 = activation_box(sim, (16, 16))
    assert (x0, y0) == (0, 0) and 2 <= x1 <= 6 and 2 <= y1 <= 6


def test_activation_boxes_match_the_rule_map_by_map():
    # the batched form against the rule written out for one map: the pixels at or above the map's own
    # 95th percentile, their first and last rows and columns (flat maps and two peaks included)
    rng = np.random.default_rng(3)
    maps = rng.random((6, 5, 7))
    maps[1] = 0.25                                  # flat: every pixel is at the percentile
    maps[2] = 0.0
    maps[2, 0, 0] = maps[2, 4, 6] = 1.0             # two far-apart peaks: the box spans both
    boxes = activation_boxes(maps, (20, 28))
    for m, box in zip(maps, boxes):
        up = upsample_bicubic(m, (20, 28))
        rows, cols = np.nonzero(up >= np.percentile(up, 95))
        assert box == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
    assert boxes[1] == (0, 0, 28, 20)
    assert activation_boxes(np.zeros((0, 5, 7)), (20, 28)) == []


class PatchFeatures(nn.Module):
    """(B, 1, 16, 16) -> (B, 6, 4, 4), each latent cell computed from its own 4 x 4 block of pixels only."""

    out_channels = 6

    def __init__(self):
        super().__init__()
        self.net = nn.Conv2d(1, 6, 4, stride=4)

    def forward(self, x):
        return self.net(x)


def test_evidence_source_box_is_the_block_the_prototype_was_taken_from():
    # every latent cell sees its own block only (the add-on layers are 1 x 1), so a projected prototype's
    # similarity on its source image depends on the block of its latent position and on no other pixel
    torch.manual_seed(0)
    model = ExplainableNet(PatchFeatures(), 3, prototypes_per_class=2, prototype_dim=4)
    images = _image_set(n=12)
    model.train()
    records = with_evidence_boxes(model, images, project_prototypes(model, images, batch_size=5), batch_size=7)
    assert model.training, "mode restored"
    for r in records:
        row, col = r.position
        x0, y0, x1, y1 = r.evidence_box_xyxy
        # the block, to the rule's resolution: its shifted grid sees each quarter of the block with a block
        # that also covers a neighbour's quarter, so an edge may sit a pixel (a quarter block) off the block's
        assert max(abs(x0 - 4 * col), abs(y0 - 4 * row), abs(x1 - 4 * col - 4), abs(y1 - 4 * row - 4)) <= 1, r
        assert x1 - x0 >= 3 and y1 - y0 >= 3, "the block's top pixels, not a corner of it"


def test_save_projection_files(tmp_path):
    model = _tiny_model()
    images = _image_set(n=12)
    records = project_prototypes(model, images, batch_size=5)
    out = tmp_path / "protos"
    save_projection(records, images, ["zero", "one", "two"], out)
    data = json.loads((out / "records.json").read_text())
    assert "95" in data["box_rule"]
    assert len(data["records"]) == 6
    for r, saved in zip(records, data["records"]):
        assert saved["prototype"] == r.prototype and saved["sample"] == r.sample
        assert list(saved["box_xyxy"]) == list(r.box_xyxy)
        assert saved["source_label"] == ["zero", "one", "two"][r.source_class]
        x0, y0, x1, y1 = r.box_xyxy
        with Image.open(out / f"{r.prototype:04d}.png") as patch:
            scale = patch.width // (x1 - x0)
            assert patch.size == (scale * (x1 - x0), scale * (y1 - y0)) and min(patch.size) >= 64
            assert min(patch.size) < 64 + scale, "the smallest whole factor"
            patch_px = np.asarray(patch.convert("L"))
        src = images.raw(r.sample)[:, :, 0]
        # the box's pixels, each a scale x scale block
        assert np.array_equal(patch_px, np.kron(src[y0:y1, x0:x1], np.ones((scale, scale), dtype=np.uint8)))
        with Image.open(out / f"{r.prototype:04d}_context.png") as ctx:
            assert ctx.size == (128, 128)                       # 16 px enlarged x8 to >= 128
            assert ctx.mode == "RGB"
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["records.json"] + [f"{j:04d}.png" for j in range(6)]
                           + [f"{j:04d}_context.png" for j in range(6)])
    # with the evidence boxes measured, each prototype's patch and context by that rule beside ProtoPNet's
    records = with_evidence_boxes(model, images, records, batch_size=5)
    save_projection(records, images, ["zero", "one", "two"], out)
    data = json.loads((out / "records.json").read_text())
    assert "occlusion" in data["evidence_box_rule"]
    for r, saved in zip(records, data["records"]):
        assert list(saved["evidence_box_xyxy"]) == list(r.evidence_box_xyxy)
        x0, y0, x1, y1 = r.evidence_box_xyxy
        with Image.open(out / f"{r.prototype:04d}_evidence.png") as patch:
            scale = patch.width // (x1 - x0)
            assert np.array_equal(np.asarray(patch.convert("L")), np.kron(images.raw(r.sample)[y0:y1, x0:x1, 0],
                                                                          np.ones((scale, scale), dtype=np.uint8)))
        assert (out / f"{r.prototype:04d}_evidence_context.png").is_file()
