"""LeaSE's architecture gradient (eq. 9-17) against autograd through the unrolled steps of eq. (6-8).

A tiny float64 explainer (NASXNet over a 2-step search cell) and a tiny audience with BatchNorm. As in
tests/test_architect.py the finite differences use radius 1e-6 in float64, where they are exact to ~1e-9
(at DARTS' 1e-2 a ReLU network's difference quotients cross kinks), so any error in the chain shows.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from nasxserve.errors import ConfigError
from nasxserve.nas.supernet import SearchNetwork
from nasxserve.protos.losses import LossWeights, Stage
from nasxserve.protos.model import ExplainableNet
from nasxserve.training.lease import LeaseArchitect, build_audience
from nasxserve.training.steps import functional_stage_logits, functional_stage_loss

pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = ["features.alphas_normal", "features.alphas_reduce"]
XI_E, XI_D, XI_W, GAMMA = 0.05, 2.0, 0.1, 0.7


def _tiny_audience() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def _setup(stage: Stage, order: int = 2, audience_only: bool = False):
    torch.manual_seed(0)
    features = SearchNetwork(channels=4, layers=3, in_channels=1, steps=2, multiplier=2)
    model = ExplainableNet(features, num_classes=3, prototypes_per_class=2, prototype_dim=4).double().train()
    with torch.no_grad():
        features.alphas_normal.normal_(0.0, 0.5)
        features.alphas_reduce.normal_(0.0, 0.5)
    audience = _tiny_audience().double().train()
    weights = LossWeights(0.8, 0.001)
    architect = LeaseArchitect(model, functional_stage_loss(model, stage, weights), ARCH, order=order,
                               fd_radius=1e-6, logits=functional_stage_logits(model, stage, weights),
                               audience=audience, gamma=GAMMA, audience_only=audience_only, audience_lr=XI_W,
                               delta_lr=XI_D, delta_init=0.05)
    g = torch.Generator().manual_seed(1)
    data = (torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 1]),
            torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64), torch.tensor([2, 0, 1, 0]))
    return model, audience, architect, data


def _unrolled_autograd(model, audience, architect, data, audience_only: bool) -> list[torch.Tensor]:
    """d/dA [L(E', A; x_val) + gamma L(W'; x_val)] with E', Delta', W' built with create_graph=True."""
    xt, yt, xv, yv = data
    params = dict(model.named_parameters())
    alphas = [params[n] for n in ARCH]
    names = [n for n in params if n not in ARCH]

    def tensors(weights):
        t = dict(params)
        t.update(zip(names, weights))
        t.update({n: b.clone() for n, b in model.named_buffers()})
        return t

    def aud(weights, x):
        t = dict(zip([n for n, _ in audience.named_parameters()], weights))
        t.update({n: b.clone() for n, b in audience.named_buffers()})
        return functional_call(audience, t, (x,))

    torch.manual_seed(7)
    delta = architect.initial_delta(xt).requires_grad_()
    ws = [params[n] for n in names]
    grads = torch.autograd.grad(architect.loss(tensors(ws), xt, yt), ws, create_graph=True, allow_unused=True)
    e1 = [w.detach() - XI_E * (torch.zeros_like(w) if g is None else g) for w, g in zip(ws, grads)]       # (6)
    t1 = tensors(e1)
    o_delta = -(F.softmax(architect.logits(t1, xt), 1) * F.log_softmax(architect.logits(t1, xt + delta), 1)).sum()
    d1 = delta.detach() + XI_D * torch.autograd.grad(o_delta, delta, create_graph=True)[0]                # (7)
    aw = [p.detach().requires_grad_() for p in audience.parameters()]
    gw = torch.autograd.grad(F.cross_entropy(aud(aw, d1 * xt), yt), aw, create_graph=True)
    w1 = [w - XI_W * g for w, g in zip(aw, gw)]                                                            # (8)
    objective = GAMMA * F.cross_entropy(aud(w1, xv), yv)
    if not audience_only:
        objective = objective + architect.loss(t1, xv, yv)
    return [g.detach() for g in torch.autograd.grad(objective, alphas)]


def _gradient(architect, data):
    torch.manual_seed(7)
    return architect.gradient(*data, xi=XI_E)


def _rel(a, b) -> float:
    num = torch.sqrt(sum(((x - y) ** 2).sum() for x, y in zip(a, b)))
    return float(num / torch.sqrt(sum((y ** 2).sum() for y in b)))


@pytest.mark.parametrize("stage", [Stage.ADAPT, Stage.JOINT])
def test_lease_gradient_matches_autograd_through_the_unrolled_steps(stage):
    model, audience, architect, data = _setup(stage)
    exact = _unrolled_autograd(model, audience, architect, data, audience_only=False)
    assert _rel(_gradient(architect, data), exact) < 1e-5


def test_audience_only_ablation_matches_autograd_and_differs_from_the_full_gradient():
    model, audience, architect, data = _setup(Stage.JOINT, audience_only=True)
    exact = _unrolled_autograd(model, audience, architect, data, audience_only=True)
    got = _gradient(architect, data)
    assert _rel(got, exact) < 1e-5
    full = _unrolled_autograd(model, audience, architect, data, audience_only=False)
    assert _rel(got, full) > 0.1


def test_the_audience_term_is_not_negligible_here():
    """Guards the tests above: the audience's share of the gradient is large enough that a wrong chain
    would show (compare the explainer's share alone)."""
    model, audience, architect, data = _setup(Stage.JOINT)
    full = _unrolled_autograd(model, audience, architect, data, audience_only=False)
    torch.manual_seed(7)
    audience_part = architect.audience_term(architect.unrolled_weights(data[0], data[1], XI_E, None), *data, XI_E)
    assert _rel([GAMMA * a for a in audience_part], full) > 0.05


def test_step_moves_alpha_and_gives_the_audience_its_eq8_step():
    model, audience, architect, data = _setup(Stage.ADAPT, order=1)
    before = [p.detach().clone() for p in audience.parameters()]
    alphas = [model.features.alphas_normal.detach().clone(), model.features.alphas_reduce.detach().clone()]
    torch.manual_seed(7)
    architect.step(*data, xi=XI_E)
    grads = architect._audience_grads
    wd = architect.audience_optimizer.param_groups[0]["weight_decay"]
    for p, w, g in zip(audience.parameters(), before, grads):   # first SGD step: buffer = g + wd w
        torch.testing.assert_close(p.detach(), w - XI_W * (g + wd * w))
    assert not torch.equal(model.features.alphas_normal.detach(), alphas[0])
    assert architect.last_audience_loss == architect.last_audience_loss   # a number, not NaN


def test_build_audience_small_input_resnet_and_other_models():
    r18 = build_audience("resnet18", in_channels=1, num_classes=10)
    assert r18.conv1.stride == (1, 1) and r18.conv1.in_channels == 1 and isinstance(r18.maxpool, nn.Identity)
    assert r18(torch.randn(2, 1, 16, 16)).shape == (2, 10)
    mobile = build_audience("mobilenet_v3_small", in_channels=1, num_classes=4)
    assert mobile.eval()(torch.randn(2, 1, 32, 32)).shape == (2, 4)
    with pytest.raises(ConfigError, match="unknown audience 'resnet7'"):
        build_audience("resnet7", 3, 10)


# ============================================================================ Delta per sample (Algorithm 1)

def _lease_search_config(**search):
    """A LeaSE search on 256 digits (64 for the weights: one batch an epoch, every sample in it), 8x8, in
    the adaptation stage, the smallest torchvision audience, the Hessian tracked briefly."""
    from conftest import tiny_config
    from nasxserve.training.config_loading import config_from_dict

    return config_from_dict(tiny_config(search={
        "epochs_adapt": 2, "epochs_joint": 0, "epochs_finetune": 0, "subset": 256,
        "lease": {"enabled": True, "audience": "mobilenet_v3_small", "delta_init": 0.05},
        "stability": {"batch_size": 16, "iterations": 2}, **search}))


@pytest.mark.slow
def test_each_samples_delta_carries_over_from_one_epoch_to_the_next(tmp_path, monkeypatch):
    """Eq. (7)'s step in epoch 2 starts where the same sample's step of epoch 1 ended (not from a fresh
    draw), and that is not where it started. Samples are told apart by their pixels (no augmentation)."""
    from nasxserve.training.trainer import Trainer

    steps: list[dict[bytes, tuple[torch.Tensor, torch.Tensor]]] = []   # per step: x_i -> (delta_i, delta'_i)
    original = LeaseArchitect._delta_gradient

    def spy(self, delta, unrolled, x):
        grad = original(self, delta, unrolled, x)
        new = delta + self.delta_lr * grad
        rows = [r.contiguous().numpy().tobytes() for r in x.detach().cpu()]
        unique = {k for k in rows if rows.count(k) == 1}   # digits has a few identical images: leave them out
        steps.append({k: (delta[i].detach().clone(), new[i].detach().clone())
                      for i, k in enumerate(rows) if k in unique})
        return grad

    monkeypatch.setattr(LeaseArchitect, "_delta_gradient", spy)
    Trainer.fresh(_lease_search_config(), str(tmp_path / "run")).search()
    assert len(steps) == 2, "one architecture step in each of the two epochs"
    first, second = steps
    shared = first.keys() & second.keys()
    assert len(shared) > 50
    for k in shared:
        assert torch.equal(second[k][0].contiguous(), first[k][1].contiguous()), "epoch 2 restarted Delta"
        assert not torch.equal(second[k][0], first[k][0])


@pytest.fixture(scope="module")
def lease_reference(tmp_path_factory):
    from nasxserve.training.trainer import Trainer

    out = tmp_path_factory.mktemp("lease") / "reference"
    Trainer.fresh(_lease_search_config(), str(out)).search()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("when", ["after epoch 1", "in epoch 2"])
def test_a_lease_search_resumes_exactly(when, lease_reference, tmp_path, monkeypatch):
    """Stopped after epoch 1's checkpoint, or in epoch 2 after its step has written new delta'_i to the
    (memory-mapped) working store, the search resumes from epoch 1's copy of Delta and ends where the
    uninterrupted one ends: the same checkpoint, Delta, log and genotype, bit for bit."""
    from test_training import TIMINGS, assert_same, load_pt, without

    from conftest import read_jsonl
    from nasxserve.training.lease_deltas import DeltaStore
    from nasxserve.training.trainer import Trainer

    monkeypatch.setattr(DeltaStore, "in_memory_bytes", 0)   # the working file, as for CIFAR-10 or CUB
    updates = []
    original = DeltaStore.update

    def update(self, index, values):
        original(self, index, values)
        updates.append(len(index))
        if when == "in epoch 2" and len(updates) == 2:
            raise KeyboardInterrupt

    def after_epoch(phase, epoch):
        if when == "after epoch 1":
            raise KeyboardInterrupt

    monkeypatch.setattr(DeltaStore, "update", update)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        Trainer.fresh(_lease_search_config(), str(out), on_epoch_end=after_epoch).search()
    assert load_pt(out / "checkpoints" / "last.pt")["epoch"] == 1
    assert (out / "checkpoints" / "lease-deltas-working.npy").is_file()
    Trainer.resume(str(out)).search()

    final = sorted(p.name for p in (out / "checkpoints").glob("lease-deltas*"))
    assert final == ["lease-deltas-epoch-002.npy"], "the working file is gone, only last.pt's copy is left"
    got, expected = (np.load(d / "checkpoints" / final[0], allow_pickle=False) for d in (out, lease_reference))
    assert got.dtype == np.float32 and got.tobytes() == expected.tobytes()
    assert_same(load_pt(out / "checkpoints" / "last.pt"), load_pt(lease_reference / "checkpoints" / "last.pt"))
    rows = without(read_jsonl(out / "metrics.jsonl"), *TIMINGS)
    assert rows == without(read_jsonl(lease_reference / "metrics.jsonl"), *TIMINGS)
    assert all(0 < r["delta_cosine_to_initial"] < 1 and 0 <= r["audience_explanation_acc"] <= 1
               for r in rows if "event" not in r)
    assert (out / "genotype.json").read_text() == (lease_reference / "genotype.json").read_text()


@pytest.mark.slow
def test_a_rollback_takes_delta_back_with_the_rest_of_the_search(monkeypatch, tmp_path):
    """The adaptive regularisation's rollback restores Delta as of the epoch it returns to: with weight decay
    0 (it stays 0 when "raised") the repeated epoch 3 is the first epoch 3 again, Delta's drift included."""
    from test_stability import _scripted_eigenvalues

    from conftest import read_jsonl
    from nasxserve.training.trainer import Trainer

    _scripted_eigenvalues(monkeypatch, [1.0, 1.0, 9.0, 1.0, 1.0, 1.0])
    cfg = _lease_search_config(epochs_adapt=2, epochs_joint=2, weight_decay=0.0, stability={
        "window": 1, "lookback": 1, "start_epoch": 1, "ratio": 1.3, "factor": 10.0, "max_weight_decay": 0.03})
    out = tmp_path / "run"
    Trainer.fresh(cfg, str(out)).search()
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "event" not in r]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 3, 4]
    first, again = ({k: v for k, v in r.items() if k not in ("elapsed_s", "data_wait_share", "step",
                                                                 "hessian_eigenvalue")}
                    for r in rows[2:4])
    assert first == again and first["delta_cosine_to_initial"] < rows[1]["delta_cosine_to_initial"]
    assert sorted(p.name for p in (out / "checkpoints").glob("lease-deltas*")) == ["lease-deltas-epoch-004.npy"]
