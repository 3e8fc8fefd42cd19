"""The power-iteration estimate of the Hessian's dominant eigenvalue (R-DARTS' instability signal)
against the exact Hessian of the validation loss w.r.t. the alphas of a tiny float64 search network."""
from __future__ import annotations

import pytest
import torch

from nasxserve.nas.supernet import SearchNetwork
from nasxserve.protos.losses import LossWeights, Stage
from nasxserve.protos.model import ExplainableNet
from nasxserve.training.hessian import dominant_eigenvalue
from nasxserve.training.trainer import functional_stage_loss

pytestmark = pytest.mark.usefixtures("one_thread")
ARCH = ["features.alphas_normal", "features.alphas_reduce"]


def _case(seed: int, stage: Stage):
    torch.manual_seed(seed)
    features = SearchNetwork(channels=3, layers=3, in_channels=1, steps=2, multiplier=2)
    model = ExplainableNet(features, num_classes=3, prototypes_per_class=2, prototype_dim=4).double()
    with torch.no_grad():
        features.alphas_normal.normal_(0.0, 0.7)
        features.alphas_reduce.normal_(0.0, 0.7)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    return model, functional_stage_loss(model, stage, LossWeights(0.8, 0.001)), x, y


def _exact_dominant(model, loss, batches) -> float:
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in ARCH]
    sizes = [s.numel() for s in shapes]
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    def f(flat: torch.Tensor) -> torch.Tensor:
        t = dict(params)
        t.update(buffers)
        t.update({n: part.view(s) for n, part, s in zip(ARCH, flat.split(sizes), shapes)})
        return sum(loss(t, x, y) for x, y in batches) / len(batches)

    flat = torch.cat([params[n].detach().flatten() for n in ARCH])
    h = torch.autograd.functional.hessian(f, flat)
    eig = torch.linalg.eigvalsh((h + h.T) / 2)
    return float(eig[eig.abs().argmax()])


@pytest.mark.parametrize("seed, stage, n_batches", [(0, Stage.ADAPT, 1), (1, Stage.JOINT, 2), (2, Stage.FINETUNE, 1)])
def test_power_iteration_matches_the_exact_hessian(seed, stage, n_batches):
    model, loss, x, y = _case(seed, stage)
    batches = [(x[i::n_batches], y[i::n_batches]) for i in range(n_batches)]
    exact = _exact_dominant(model, loss, batches)
    params = dict(model.named_parameters())
    arch = [params[n] for n in ARCH]

    def batch_loss(xb, yb):
        def build():
            t = dict(params)
            t.update({n: b.clone() for n, b in model.named_buffers()})
            return loss(t, xb, yb)
        return build

    est = dominant_eigenvalue([batch_loss(*b) for b in batches], arch, iterations=300, tolerance=1e-9,
                              generator=torch.Generator().manual_seed(seed))
    assert abs(est.value - exact) <= 0.05 * abs(exact), (est.value, exact, est.iterations)
    assert est.converged
    # warm-started from its own eigenvector, one or two products suffice
    again = dominant_eigenvalue([batch_loss(*b) for b in batches], arch, iterations=300, tolerance=1e-6,
                                start=est.vector)
    assert again.iterations <= 3 and abs(again.value - est.value) <= 1e-4 * abs(est.value)


def test_a_quadratic_with_a_known_spectrum():
    # loss = 0.5 a^T A a with eigenvalues (5, -2, 1): the dominant one is 5, whatever the start
    q = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))[0]
    a_mat = q @ torch.diag(torch.tensor([5.0, -2.0, 1.0], dtype=torch.float64)) @ q.T
    a = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    est = dominant_eigenvalue([lambda: 0.5 * a @ a_mat @ a], [a], iterations=200, tolerance=1e-12)
    assert est.value == pytest.approx(5.0, rel=1e-6)
    neg = dominant_eigenvalue([lambda: -0.5 * a @ a_mat @ a], [a], iterations=200, tolerance=1e-12)
    assert neg.value == pytest.approx(-5.0, rel=1e-6)
