"""Architecture updates for the bilevel problem of eq. (1).

first order:  grad_alpha L_val(w, alpha)
second order: eq. (2), grad_alpha L_val(w', alpha) with the one-step unrolled weights
              w' = w - xi * (momentum buffer + grad_w L_train(w, alpha) + wd * w)
              (the SGD step the weights are about to take, as in DARTS), which by the chain rule is
              grad_alpha L_val(w', alpha) - xi * grad^2_{alpha,w} L_train(w, alpha) . grad_w' L_val(w', alpha);
              the mixed second derivative times a vector is the central finite difference
              (grad_alpha L_train(w + R v, alpha) - grad_alpha L_train(w - R v, alpha)) / 2R,
              v = grad_w' L_val(w', alpha), R = 0.01 / ||v|| (DARTS section 2.3).

Data-parallel search: each process holds a shard of the training and validation batches, and
``reduce_gradients`` turns a process's gradient of its shard's loss into the gradient of the global
batch's loss (a weighted sum over processes). What must be global before it is used, w' and v (R
depends on ||v||), is reduced where it is computed; the rest of alpha's gradient is linear in the
per-process terms, so ``gradient`` returns this process's share and ``step`` reduces it once.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional, Protocol, TypeVar, cast

import torch
from torch import nn

LossFn = Callable[[dict[str, torch.Tensor], torch.Tensor, torch.Tensor], torch.Tensor]
MaybeTensor = TypeVar("MaybeTensor", bound=Optional[torch.Tensor])


class Reducer(Protocol):
    """Maps a process's tensors to the global ones, one for one; a None stays None (and a tensor a tensor)."""

    def __call__(self, tensors: Sequence[MaybeTensor], /) -> list[MaybeTensor]: ...


class Architect:
    """Owns the architecture optimizer (Adam) and computes alpha's gradient, first or second order.

    Args:
        model: a module whose parameters include the architecture parameters ``arch_names``.
        loss: ``loss(tensors, x, y)`` evaluates the current stage's loss with ``tensors`` (a mapping of
            parameter and buffer names, as for ``torch.func.functional_call``).
        arch_names: names of the architecture parameters in ``model.named_parameters()``.
        order: 1 or 2.
        reduce_gradients: data-parallel search only: maps this process's gradients (of its shard's loss)
            to the global batch's, identical on every process (module docstring); None in one process.
    """

    def __init__(self, model: nn.Module, loss: LossFn, arch_names: list[str], order: int = 1,
                 lr: float = 3e-4, betas: tuple[float, float] = (0.5, 0.999), weight_decay: float = 1e-3,
                 fd_radius: float = 1e-2, reduce_gradients: Reducer | None = None):
        if order not in (1, 2):
            raise ValueError(f"order must be 1 or 2, got {order}")
        self.model = model
        self.loss = loss
        self.order = order
        self.fd_radius = fd_radius
        self.reduce_gradients: Reducer = reduce_gradients or list   # one process: already global
        params = dict(model.named_parameters())
        self.arch_names = list(arch_names)
        self.arch = [params[n] for n in self.arch_names]
        self.weight_names = [n for n in params if n not in set(self.arch_names)]
        self.optimizer = torch.optim.Adam(self.arch, lr=lr, betas=betas, weight_decay=weight_decay)

    def checkpoint_state(self) -> dict[str, Any]:
        """What a search checkpoint keeps of the architect (merged into the checkpoint's top level)."""
        return {"arch_opt": self.optimizer.state_dict()}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["arch_opt"])

    def _tensors(self, weights: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Parameters (optionally with substituted weights) plus copies of the buffers, so that the
        extra forward passes of the second-order step leave BatchNorm's running statistics alone."""
        named: dict[str, torch.Tensor] = dict(self.model.named_parameters())
        if weights is not None:
            named.update(zip(self.weight_names, weights))
        named.update({n: b.clone() for n, b in self.model.named_buffers()})
        return named

    def current_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The stage's loss at the current parameters, differentiable w.r.t. alpha; BatchNorm's running
        statistics are left alone."""
        return self.loss(self._tensors(), x, y)

    def gradient(self, x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
                 xi: float = 0.0, w_optimizer: torch.optim.Optimizer | None = None) -> list[torch.Tensor]:
        """d L_val / d alpha, first order or by eq. (2) with step size ``xi`` (the weights' current lr);
        in a data-parallel search this process's share of it (``step`` sums the shares)."""
        if self.order == 1:
            return list(torch.autograd.grad(self.current_loss(x_val, y_val), self.arch))
        return self._second_order(x_train, y_train, x_val, y_val, xi, w_optimizer)

    def step(self, x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
             xi: float = 0.0, w_optimizer: torch.optim.Optimizer | None = None,
             index: torch.Tensor | None = None) -> None:
        """One Adam step on alpha. ``index`` (b,): the sample indices of x_train's rows in the weight split,
        for architects that keep per-sample state (LeaSE's Delta); unused here."""
        self.apply_gradient(self.reduce_gradients(self.gradient(x_train, y_train, x_val, y_val, xi, w_optimizer)))

    def apply_gradient(self, grads: list[torch.Tensor]) -> None:
        """One Adam step on alpha along ``grads`` (the global batch's, one per architecture parameter)."""
        self.optimizer.zero_grad(set_to_none=True)
        for p, g in zip(self.arch, grads):
            p.grad = g
        self.optimizer.step()

    def unrolled_weights(self, x_train: torch.Tensor, y_train: torch.Tensor, xi: float,
                         w_optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
        """w' = w - xi * (momentum * buf + grad_w L_train + wd * w), detached."""
        params = dict(self.model.named_parameters())
        weights = [params[n] for n in self.weight_names]
        loss = self.current_loss(x_train, y_train)
        grads = self.reduce_gradients(torch.autograd.grad(loss, weights, allow_unused=True))
        momentum, wd = _sgd_hparams(w_optimizer)
        out = []
        for w, g in zip(weights, grads):
            d = (torch.zeros_like(w) if g is None else g) + wd * w
            buf = w_optimizer.state.get(w, {}).get("momentum_buffer") if w_optimizer is not None else None
            if buf is not None and momentum:
                d = d + momentum * buf
            out.append((w - xi * d).detach())
        return out

    def _second_order(self, x_train, y_train, x_val, y_val, xi, w_optimizer,
                      unrolled: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        if unrolled is None:
            unrolled = self.unrolled_weights(x_train, y_train, xi, w_optimizer)
        unrolled = [w.detach().requires_grad_() for w in unrolled]
        val_loss = self.loss(self._tensors(unrolled), x_val, y_val)
        grads = torch.autograd.grad(val_loss, self.arch + unrolled, allow_unused=True)
        d_alpha = list(grads[:len(self.arch)])
        v = [torch.zeros_like(w) if g is None else g for w, g in zip(unrolled, grads[len(self.arch):])]
        v = self.reduce_gradients(v)     # the global v: the difference quotient's radius depends on ||v||
        return [da - xi * m for da, m in zip(d_alpha, self.mixed_product(v, x_train, y_train))]

    def mixed_product(self, v: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """grad^2_{alpha,w} L(w, alpha) . v by the central difference of DARTS section 2.3 (eq. 11 of
        LeaSE), at radius ``fd_radius / ||v||``; zeros when v = 0."""
        norm = torch.sqrt(cast(torch.Tensor, sum((g * g).sum() for g in v)))   # a tensor: v is not empty
        if float(norm) == 0.0:
            return [torch.zeros_like(a) for a in self.arch]
        r = self.fd_radius / norm
        params = dict(self.model.named_parameters())
        weights = [params[n].detach() for n in self.weight_names]
        g_plus = self._arch_grad_at([w + r * g for w, g in zip(weights, v)], x, y)
        g_minus = self._arch_grad_at([w - r * g for w, g in zip(weights, v)], x, y)
        return [(gp - gm) / (2 * r) for gp, gm in zip(g_plus, g_minus)]

    def _arch_grad_at(self, weights: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        loss = self.loss(self._tensors(weights), x, y)
        return list(torch.autograd.grad(loss, self.arch))


def _sgd_hparams(optimizer: torch.optim.Optimizer | None) -> tuple[float, float]:
    if optimizer is None:
        return 0.0, 0.0
    group = optimizer.param_groups[0]
    return float(group.get("momentum", 0.0)), float(group.get("weight_decay", 0.0))
