"""The power-iteration estimate of the Hessian's largest eigenvalue (R-DARTS' instability signal) against
the exact Hessian of the validation loss w.r.t. the alphas of a tiny float64 search network, and on
quadratics with known spectra (a negative eigenvalue of largest magnitude needs the shifted second run)."""
from __future__ import annotations

import pytest
import torch

from nasxserve.nas.supernet import SearchNetwork
from nasxserve.protos.losses import LossWeights, Stage
from nasxserve.protos.model import ExplainableNet
from nasxserve.training.hessian import dominant_eigenvalue
from nasxserve.training.steps import functional_stage_loss

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


def _exact_largest(model, loss, batches) -> float:
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
    h = torch.autograd.functional.hessian(f, flat, vectorize=True)  # vmapped: the same matrix, 2x faster
    return float(torch.linalg.eigvalsh((h + h.T) / 2).max())


@pytest.mark.parametrize("seed, stage, n_batches", [(0, Stage.ADAPT, 1), (1, Stage.JOINT, 2), (2, Stage.FINETUNE, 1)])
def test_power_iteration_matches_the_exact_hessian(seed, stage, n_batches):
    model, loss, x, y = _case(seed, stage)
    batches = [(x[i::n_batches], y[i::n_batches]) for i in range(n_batches)]
    exact = _exact_largest(model, loss, batches)
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
                                start=est.warm_start)
    assert again.iterations <= 3 * (1 + (est.shift_vector is not None))
    assert abs(again.value - est.value) <= 1e-4 * abs(est.value)


def _quadratic(eigenvalues: list[float], seed: int = 0):
    """loss = 0.5 a^T A a with A = Q diag(eigenvalues) Q^T for a random rotation Q; returns (loss, a, A)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), dtype=torch.float64, generator=g))[0]
    a_mat = q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T
    a = torch.zeros(len(eigenvalues), dtype=torch.float64, requires_grad=True)
    return (lambda: 0.5 * a @ a_mat @ a), a, a_mat


@pytest.mark.parametrize("eigenvalues, largest", [
    ([5.0, -2.0, 1.0], 5.0),            # the largest is also the largest in magnitude
    ([-5.0, 2.0, -1.0], 2.0),           # largest magnitude -5: the shifted run finds 2
    ([-5.0, -2.0, -1.0, -3.0], -1.0),   # all negative: the largest is the smallest in magnitude
    ([-0.889, 0.3, 0.05, -0.2], 0.3),
])
def test_the_largest_eigenvalue_of_a_quadratic(eigenvalues, largest):
    loss, a, a_mat = _quadratic(eigenvalues)
    est = dominant_eigenvalue([loss], [a], iterations=500, tolerance=1e-12)
    assert est.value == pytest.approx(largest, rel=1e-6) and est.converged
    assert (est.shift_vector is not None) == (max(eigenvalues, key=abs) < 0)
    v = est.vector[0]
    torch.testing.assert_close(a_mat @ v, largest * v, rtol=0, atol=1e-5)   # lambda_max's eigenvector
    # warm-started from both vectors, each run converges at once
    again = dominant_eigenvalue([loss], [a], iterations=500, tolerance=1e-9, start=est.warm_start)
    assert again.value == pytest.approx(largest, rel=1e-6)
    assert again.iterations <= 2 * (1 + (est.shift_vector is not None))


def test_the_shift_applies_to_the_product_summed_over_processes():
    """Two processes with equal shards: each loss carries half, ``reduce`` sums the halves (here: doubles
    one); the shift must come after the sum, or the second run would see H - 2 lambda_dom I."""
    eigenvalues = [-5.0, 2.0, -1.0]
    loss, a, _ = _quadratic(eigenvalues)
    est = dominant_eigenvalue([lambda: 0.5 * loss()], [a], iterations=500, tolerance=1e-12,
                              reduce=lambda hv: [2 * h for h in hv])
    assert est.value == pytest.approx(2.0, rel=1e-6)
