"""The largest eigenvalue of the Hessian of the validation loss with respect to the architecture
parameters, by power iteration on Hessian-vector products.

R-DARTS (Zela et al., ICLR 2020; NASXNet section 3.4) observed that DARTS degenerates (cells full of
skip connections, a poor genotype) when this eigenvalue grows during the search, and regularises when
it does. Its reference (automl/RobustDARTS, src/search/train_search.py) computes the full Hessian and
tracks ``max(LA.eigvals(H))``, the largest eigenvalue, which it calls the dominant one. A
Hessian-vector product costs two backward passes, so a few power iterations (warm-started from the
previous measurement's eigenvectors) make the estimate cheap enough for every epoch. Power iteration
finds the eigenvalue of largest magnitude; when that one is negative, a second power iteration on the
shifted H - lambda I finds the largest (:func:`dominant_eigenvalue`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional, cast

import torch

Loss = Callable[[], torch.Tensor]


@dataclass
class EigenEstimate:
    value: float                 # the largest eigenvalue: the Rayleigh quotient v.Hv at the last iterate (|v| = 1)
    vector: list[torch.Tensor]   # that v, shaped like the parameters
    iterations: int              # Hessian-vector products, over both power iterations
    converged: bool
    # the eigenvector of the largest-magnitude eigenvalue where that one is negative (the shift), else None
    shift_vector: list[torch.Tensor] | None = None

    @property
    def warm_start(self) -> list[torch.Tensor]:
        """What to pass as the next call's ``start``: ``vector``, followed by ``shift_vector`` if any."""
        return list(self.vector) + list(self.shift_vector or [])


def hessian_vector_product(grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                           v: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """H v for the loss whose ``grads`` (taken with ``create_graph=True``) w.r.t. ``params`` are given:
    d(g . v)/d params. The graph is retained, so one gradient serves many products."""
    dot = cast(torch.Tensor, sum((g * u).sum() for g, u in zip(grads, v)))   # a tensor: not empty
    hv = torch.autograd.grad(dot, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(params, hv)]


def _normalised(v: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    norm = torch.sqrt(cast(torch.Tensor, sum((u * u).sum() for u in v)))
    return [u / norm for u in v]


Product = Callable[[list[torch.Tensor]], list[torch.Tensor]]


def power_iteration(product: Product, v: Sequence[torch.Tensor], iterations: int,
                    tolerance: float) -> tuple[float, list[torch.Tensor], int, bool]:
    """The eigenvalue of largest magnitude of the symmetric operator ``product`` (v -> Av, on lists of
    parameter-shaped tensors), from the unit start ``v``.

    Returns: (Rayleigh quotient v.Av at the last iterate, that v, products taken, whether the quotient
    moved by at most ``tolerance`` relative between the last two products).
    """
    v = list(v)
    value, converged, it = 0.0, False, 0
    for it in range(1, iterations + 1):
        av = product(v)
        new_value = float(sum((a * b).sum() for a, b in zip(v, av)))
        norm = torch.sqrt(cast(torch.Tensor, sum((h * h).sum() for h in av)))
        if float(norm) == 0.0:
            return 0.0, v, it, True
        converged = it > 1 and abs(new_value - value) <= tolerance * max(abs(new_value), 1e-12)
        value = new_value
        if converged:
            break
        # normalising Av keeps the sign; for a negative dominant eigenvalue the iterate alternates,
        # and the Rayleigh quotient still converges to it
        v = [h / norm for h in av]
    return value, [u.detach() for u in v], it, converged


def dominant_eigenvalue(losses: Sequence[Loss], params: Sequence[torch.Tensor], iterations: int = 20,
                        tolerance: float = 1e-3, start: Optional[Sequence[torch.Tensor]] = None,
                        generator: Optional[torch.Generator] = None,
                        reduce: Optional[Callable[[list[torch.Tensor]], list[torch.Tensor]]] = None) -> EigenEstimate:
    """R-DARTS' dominant eigenvalue: the largest (algebraic) eigenvalue lambda_max of the Hessian H of
    ``mean(loss() for loss in losses)`` w.r.t. ``params``, as its reference's ``max(LA.eigvals(H))``.

    A first power iteration finds the eigenvalue of largest magnitude, lambda_dom. If it is >= 0 it is
    lambda_max. Otherwise H - lambda_dom I has eigenvalues lambda_i - lambda_dom >= 0 (up to the first
    estimate's error), the largest being lambda_max - lambda_dom, which a second power iteration finds.

    Args:
        losses: callables that each build one batch's loss (their mean is the loss; each keeps its own
            graph for the products, so pass one to a few batches).
        params: the architecture parameters, e.g. alphas (E, |O|) x 2.
        iterations: most power iterations of each of the two runs; a run stops earlier once its Rayleigh
            quotient changes by less than ``tolerance`` relative.
        start: the previous estimate's :attr:`EigenEstimate.warm_start`: lambda_max's eigenvector, then
            (when the previous estimate needed the shift) the largest-magnitude one; one vector serves
            both runs. Random otherwise.
        reduce: data-parallel search: sums each Hessian-vector product over processes, every process's
            ``losses`` being its shards of the batches already weighted by their share, so that every
            process iterates on the same global products and stops at the same step (the shift is
            applied to the summed product).
    """
    params = list(params)
    grads_per_loss = []
    for loss in losses:
        grads = torch.autograd.grad(loss() / len(losses), params, create_graph=True, allow_unused=True)
        grads_per_loss.append([torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)])

    def hessian_product(v: list[torch.Tensor]) -> list[torch.Tensor]:
        hv = [sum(parts) for parts in zip(*(hessian_vector_product(g, params, v) for g in grads_per_loss))]
        return reduce(hv) if reduce is not None else hv

    def random_vector() -> list[torch.Tensor]:
        return _normalised([torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params])

    given = list(start or [])
    starts = [_normalised([s.to(p) for s, p in zip(given[k:k + len(params)], params)])
              for k in range(0, len(given), len(params))]
    largest_start = starts[0] if starts else None
    dominant_start = starts[-1] if starts else random_vector()
    value, v, it, converged = power_iteration(hessian_product, dominant_start, iterations, tolerance)
    if value >= 0.0:
        return EigenEstimate(value, v, it, converged)
    shift = value

    def shifted_product(u: list[torch.Tensor]) -> list[torch.Tensor]:
        return [h - shift * x for h, x in zip(hessian_product(u), u)]

    gap, top, it2, converged2 = power_iteration(shifted_product, largest_start or random_vector(), iterations,
                                                tolerance)
    if gap < 0.0:
        # both runs' values are Rayleigh quotients of H, so lambda_max >= each: keep the larger (the first
        # run stopped so far above lambda_min that the second converged to the shifted lambda_min instead)
        return EigenEstimate(shift, v, it + it2, False)
    return EigenEstimate(shift + gap, top, it + it2, converged and converged2, shift_vector=v)
