"""The dominant eigenvalue of the Hessian of the validation loss with respect to the architecture
parameters, by power iteration on Hessian-vector products.

R-DARTS (Zela et al., ICLR 2020; NASXNet section 3.4) observed that DARTS degenerates (cells full of
skip connections, a poor genotype) when this eigenvalue grows during the search, and regularises when
it does. The reference computes the full Hessian; a Hessian-vector product costs two backward passes,
so a few power iterations (warm-started from the previous epoch's eigenvector) make the estimate
cheap enough for every epoch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

Loss = Callable[[], torch.Tensor]


@dataclass
class EigenEstimate:
    value: float                 # the Rayleigh quotient v.Hv at the last iterate (|v| = 1)
    vector: list[torch.Tensor]   # that v, shaped like the parameters (to warm-start the next call)
    iterations: int
    converged: bool


def hessian_vector_product(grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                           v: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """H v for the loss whose ``grads`` (taken with ``create_graph=True``) w.r.t. ``params`` are given:
    d(g . v)/d params. The graph is retained, so one gradient serves many products."""
    dot = sum((g * u).sum() for g, u in zip(grads, v))
    hv = torch.autograd.grad(dot, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(params, hv)]


def _normalised(v: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    norm = torch.sqrt(sum((u * u).sum() for u in v))
    return [u / norm for u in v]


def dominant_eigenvalue(losses: Sequence[Loss], params: Sequence[torch.Tensor], iterations: int = 20,
                        tolerance: float = 1e-3, start: Optional[Sequence[torch.Tensor]] = None,
                        generator: Optional[torch.Generator] = None,
                        reduce: Optional[Callable[[list[torch.Tensor]], list[torch.Tensor]]] = None) -> EigenEstimate:
    """The eigenvalue of largest magnitude of the Hessian of ``mean(loss() for loss in losses)`` w.r.t.
    ``params`` (near the minima a search reaches, the largest positive one: R-DARTS' dominant
    eigenvalue).

    Args:
        losses: callables that each build one batch's loss (their mean is the loss; each keeps its own
            graph for the products, so pass one to a few batches).
        params: the architecture parameters, e.g. alphas (E, |O|) x 2.
        iterations: most power iterations; stops earlier once the Rayleigh quotient changes by less
            than ``tolerance`` relative.
        start: the previous estimate's vector (warm start); random otherwise.
        reduce: data-parallel search: sums each Hessian-vector product over processes, every process's
            ``losses`` being its shards of the batches already weighted by their share, so that every
            process iterates on the same global products and stops at the same step.
    """
    params = list(params)
    grads_per_loss = []
    for loss in losses:
        grads = torch.autograd.grad(loss() / len(losses), params, create_graph=True, allow_unused=True)
        grads_per_loss.append([torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)])
    if start is not None:
        v = _normalised([s.to(p) for s, p in zip(start, params)])
    else:
        v = _normalised([torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params])
    value, converged, it = 0.0, False, 0
    for it in range(1, iterations + 1):
        hv = [sum(parts) for parts in zip(*(hessian_vector_product(g, params, v) for g in grads_per_loss))]
        if reduce is not None:
            hv = reduce(hv)
        new_value = float(sum((a * b).sum() for a, b in zip(v, hv)))
        norm = torch.sqrt(sum((h * h).sum() for h in hv))
        if float(norm) == 0.0:
            return EigenEstimate(0.0, v, it, True)
        converged = it > 1 and abs(new_value - value) <= tolerance * max(abs(new_value), 1e-12)
        value = new_value
        if converged:
            break
        # normalising Hv keeps the sign; for a negative dominant eigenvalue the iterate alternates,
        # and the Rayleigh quotient still converges to it
        v = [h / norm for h in hv]
    return EigenEstimate(value, [u.detach() for u in v], it, converged)
