"""LeaSE, learning by self-explanation (Hosseini and Xie), as an architect over any search strategy.

The search network is the *explainer* (architecture A = alpha, weights E); an *audience* network of a
fixed architecture (weights W) learns from the explainer's explanations. One iteration of Algorithm 1,
with D_e^tr = D_a^tr the weight half of the training split and D_e^val = D_a^val the other half
(section 5.1):

    E'     = E - xi_e grad_E L(E, A; x_tr)                                            (6)
    Delta' = Delta + xi_Delta grad_Delta O_Delta(Delta, E'),
             O_Delta = sum_i CE(softmax f(x_i + delta_i; E'), target softmax f(x_i; E'))  (7)
    W'     = W - xi_W grad_W mean_i CE(g(delta'_i * x_i; W), t_i)                     (8)
    A     <- A - eta (grad_A L(E', A; x_val) + gamma grad_A L(W'; x_val))              (9)

The explainer term of eq. (9) is DARTS' (first order, or eq. 10-11). The audience term is the chain of
eq. (12-17), every Jacobian-vector product taken as a central difference like eq. (11):

    v_W     = grad_W' L(W'; x_val)
    v_Delta = (dW'/dDelta')^T v_W = -xi_W grad^2_{Delta,W} O_W . v_W                   (12-13)
    v_E     = (dDelta'/dE')^T v_Delta = xi_Delta grad^2_{E',Delta} O_Delta . v_Delta     (14-15)
    term    = (dE'/dA)^T v_E = -xi_e grad^2_{A,E} L(E, A; x_tr) . v_E                   (16-17)
              + xi_Delta grad^2_{A,Delta} O_Delta . v_Delta

The last line is a term eq. (12-17) leave out: O_Delta depends on A directly, through f(.; E', A), not
only through E'. It comes out of the same two passes that give v_E, and with it the gradient equals
autograd through the unrolled steps (tests/test_lease.py).

Delta is state, like E and W: Algorithm 1 keeps one delta_i per training sample x_i of D_e^tr and
updates it (step 2, eq. 7) every iteration that draws x_i. A :class:`~nasxserve.training.lease_deltas.DeltaStore`
holds them: each delta_i starts uniform in [-delta_init, delta_init], drawn from (seed, i) alone, and every
step reads the batch's delta_i, takes the eq. (7) step from there and writes delta'_i back, on which the
audience trains (eq. 8). The explainer and the audience see each sample's augmented view of the epoch; Delta
belongs to the sample, not to the view.

Choices the paper leaves open, made here: eq. (2) maximises O_Delta, so eq. (7)'s step ascends (the
printed minus sign would descend on a maximisation); O_Delta's gradient is exactly zero at Delta = 0
(the two distributions coincide), so Delta starts small and random rather than at zero; O_W is a mean
over the batch so that xi_W is an ordinary learning rate. The audience then takes the eq. (8) step for
real (Algorithm 1, step 3) with its own SGD optimiser's momentum and weight decay.

Data-parallel search (see :mod:`nasxserve.training.architect`): grad_W O_W (it makes W' and the
audience's step) and v_W and v_E (difference quotients are taken along them) are reduced to the global
batch's where computed; v_Delta is per sample, so it stays with the process that holds the sample.
The updated delta'_i of the global batch are gathered from every rank and written on every rank, so
all ranks keep the same store (each rank's delta'_i is computed with its shard's BatchNorm statistics,
as every other per-sample quantity of the data-parallel search is).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from nasxserve.errors import ConfigError
from nasxserve.training.architect import Architect, LossFn, Reducer
from nasxserve.training.lease_deltas import DeltaStore

LogitsFn = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]
def build_audience(name: str, in_channels: int, num_classes: int) -> nn.Module:
    """A torchvision classifier with random weights for (B, in_channels, H, W) inputs -> (B, num_classes).

    ResNets get the small-input stem used for CIFAR (3x3 stride-1 first convolution, no max-pool), so that
    16x16 or 32x32 images keep their resolution into the residual stages. Other models are used as
    torchvision builds them, grey images repeated to three channels.
    """
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise ConfigError(f"unknown audience {name!r}; use resnet18, resnet50 or another torchvision "
                          f"classification model: {', '.join(sorted(known))}")
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if isinstance(model, torchvision.models.ResNet):
        model.conv1 = nn.Conv2d(in_channels, model.conv1.out_channels, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
        return model
    return nn.Sequential(_RepeatChannels(3), model) if in_channels != 3 else model


class _RepeatChannels(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, self.channels, -1, -1) if x.shape[1] == 1 else x


def _radius(fd_radius: float, vs: list[torch.Tensor]) -> torch.Tensor | None:
    """The central-difference radius ``fd_radius / ||v||`` of eq. (11); None when v = 0."""
    norm = torch.sqrt(cast(torch.Tensor, sum((v * v).sum() for v in vs)))   # a tensor: vs is not empty
    return None if float(norm) == 0.0 else fd_radius / norm


class LeaseArchitect(Architect):
    """The architect of eq. (9): DARTS' gradient of the explainer's validation loss (first or second order)
    plus ``gamma`` times the audience's, through W', Delta' and E'.

    Args:
        model, loss, arch_names, order, lr, betas, weight_decay, fd_radius, reduce_gradients: as for
            :class:`Architect`.
        logits: ``logits(tensors, x)`` -> (B, K) the explainer's prediction (the stage's) evaluated with
            ``tensors`` (parameters and buffers by name), as ``loss`` is.
        audience: the audience network, in training mode throughout.
        gamma: the trade-off of eq. (4).
        audience_only: the ablation of section 5.4 (the explainer's own validation loss is left out).
        audience_lr, audience_momentum, audience_weight_decay: xi_W of eq. (8), and the audience's SGD.
        delta_lr: xi_Delta of eq. (7).
        delta_init: without a store, Delta starts uniform in [-delta_init, delta_init] for every batch,
            drawn from torch's global generator (an architect on its own, as in the gradient's tests).
        deltas: the per-sample Delta of Algorithm 1 (:class:`DeltaStore`): :meth:`step` with ``index``
            starts eq. (7) from the stored delta_i and writes delta'_i back.
    """

    def __init__(self, model: nn.Module, loss: LossFn, arch_names: list[str], order: int = 1, lr: float = 3e-4,
                 betas: tuple[float, float] = (0.5, 0.999), weight_decay: float = 1e-3, fd_radius: float = 1e-2,
                 reduce_gradients: Reducer | None = None, *, logits: LogitsFn, audience: nn.Module, gamma: float = 1.0,
                 audience_only: bool = False, audience_lr: float = 0.025, audience_momentum: float = 0.9,
                 audience_weight_decay: float = 3e-4, delta_lr: float = 1.0, delta_init: float = 1e-3,
                 deltas: DeltaStore | None = None):
        super().__init__(model, loss, arch_names, order, lr, betas, weight_decay, fd_radius, reduce_gradients)
        self.logits = logits
        self.audience = audience
        self.gamma = gamma
        self.audience_only = audience_only
        self.audience_lr = audience_lr
        self.delta_lr = delta_lr
        self.delta_init = delta_init
        self.deltas = deltas
        self.audience_names = [n for n, _ in audience.named_parameters()]
        self.audience_optimizer = torch.optim.SGD(audience.parameters(), lr=audience_lr, momentum=audience_momentum,
                                                  weight_decay=audience_weight_decay)
        self._audience_grads: list[torch.Tensor] | None = None
        self._delta_new: torch.Tensor | None = None
        self.last_audience_loss = float("nan")
        self.last_explanation_acc = float("nan")

    # ------------------------------------------------------------------ eq. (9)
    def gradient(self, x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
                 xi: float = 0.0, w_optimizer: torch.optim.Optimizer | None = None,
                 delta: torch.Tensor | None = None) -> list[torch.Tensor]:
        """This process's share of eq. (9)'s gradient; ``delta``: Delta before eq. (7) (as x_train), None
        for a fresh :meth:`initial_delta`."""
        unrolled = self.unrolled_weights(x_train, y_train, xi, w_optimizer)
        audience = self.audience_term(unrolled, x_train, y_train, x_val, y_val, xi, delta)
        if self.audience_only:
            return [self.gamma * a for a in audience]
        if self.order == 1:
            explainer = list(torch.autograd.grad(self.current_loss(x_val, y_val), self.arch))
        else:
            explainer = self._second_order(x_train, y_train, x_val, y_val, xi, w_optimizer, unrolled)
        return [e + self.gamma * a for e, a in zip(explainer, audience)]

    def step(self, x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
             xi: float = 0.0, w_optimizer: torch.optim.Optimizer | None = None,
             index: torch.Tensor | None = None) -> None:
        """One iteration of Algorithm 1 but the weights' own step: eq. (7) from the stored delta_i of the
        samples ``index`` (b,) (with a store), the architecture step of eq. (9), the audience's own step on
        the same explanations, and delta'_i written back to the store."""
        delta = None
        if self.deltas is not None and index is not None:
            delta = self.deltas.read(index).to(x_train.device, x_train.dtype)
        self.apply_gradient(self.reduce_gradients(self.gradient(x_train, y_train, x_val, y_val, xi, w_optimizer,
                                                                delta)))
        # audience_term, which gradient() ran, left the audience's gradients and Delta'
        assert self._audience_grads is not None and self._delta_new is not None
        self.audience_optimizer.zero_grad(set_to_none=True)
        for p, g in zip(self.audience.parameters(), self._audience_grads):
            p.grad = g
        self.audience_optimizer.step()
        if self.deltas is not None and index is not None:
            self.deltas.update(index, self._delta_new)

    # ------------------------------------------------------------------ the audience term
    def initial_delta(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> Delta of the same shape, uniform in [-delta_init, delta_init]."""
        return (torch.rand(x.shape, dtype=x.dtype, device=x.device) * 2 - 1) * self.delta_init

    def audience_term(self, unrolled: list[torch.Tensor], x_train: torch.Tensor, y_train: torch.Tensor,
                      x_val: torch.Tensor, y_val: torch.Tensor, xi: float,
                      delta: torch.Tensor | None = None) -> list[torch.Tensor]:
        """grad_A L(W'(Delta'(E'(A), A)); x_val) by eq. (12-17) plus the direct term (module docstring).

        Args:
            unrolled: E' of eq. (6), one tensor per weight in ``self.weight_names``.
            x_train, y_train: (B, C, H, W), (B,): what the explainer explains and the audience learns from.
            x_val, y_val: the audience's validation batch.
            xi: xi_e of eq. (6).
            delta: (B, C, H, W) Delta before eq. (7)'s step (the stored delta_i); None draws
                :meth:`initial_delta`.
        Also keeps grad_W O_W for the audience's own step, Delta' (for the store), ``last_audience_loss`` =
        L(W'; x_val) and ``last_explanation_acc``, the audience's top-1 on Delta' * x_train before its step.
        """
        if delta is None:
            delta = self.initial_delta(x_train)
        delta_new = delta + self.delta_lr * self._delta_gradient(delta, unrolled, x_train)            # (7)
        self._delta_new = delta_new.detach()
        weights = [p.detach() for p in self.audience.parameters()]
        grads_w, self.last_explanation_acc = self._audience_weight_grad(weights, delta_new * x_train, y_train)
        grads_w = self.reduce_gradients(grads_w)
        self._audience_grads = grads_w
        stepped = [(w - self.audience_lr * g).requires_grad_() for w, g in zip(weights, grads_w)]  # (8)
        val_loss = F.cross_entropy(self._audience(stepped, x_val), y_val)
        self.last_audience_loss = float(val_loss.detach())
        v_w = self.reduce_gradients(torch.autograd.grad(val_loss, stepped))
        # (12-13): v_Delta = -xi_W grad^2_{Delta,W} O_W . v_W
        r = _radius(self.fd_radius, v_w)
        if r is None:
            return [torch.zeros_like(a) for a in self.arch]
        g_plus = self._audience_grad([w + r * v for w, v in zip(weights, v_w)], delta_new * x_train, y_train, True)
        g_minus = self._audience_grad([w - r * v for w, v in zip(weights, v_w)], delta_new * x_train, y_train, True)
        v_delta = -self.audience_lr * (g_plus[0] - g_minus[0]) / (2 * r) * x_train   # d(delta * x)/d delta = x
        direct, v_e = self._through_delta(delta, v_delta, unrolled, x_train)
        # (16-17): (dE'/dA)^T v_E = -xi_e grad^2_{A,E} L(E, A; x_tr) . v_E
        through_e = self.mixed_product(self.reduce_gradients(v_e), x_train, y_train)
        return [d - xi * t for d, t in zip(direct, through_e)]

    def _through_delta(self, delta: torch.Tensor, v_delta: torch.Tensor, unrolled: list[torch.Tensor],
                       x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(14-15) and the direct path: xi_Delta grad^2_{(A,E'),Delta} O_Delta . v_Delta, split into the part
        for alpha and v_E (one per weight); zeros when v_Delta = 0."""
        r = _radius(self.fd_radius, [v_delta])
        if r is None:
            return [torch.zeros_like(a) for a in self.arch], [torch.zeros_like(w) for w in unrolled]
        plus = self._explanation_grads(delta + r * v_delta, unrolled, x)
        minus = self._explanation_grads(delta - r * v_delta, unrolled, x)
        n = len(self.arch)
        direct = [self.delta_lr * (p - m) / (2 * r) for p, m in zip(plus[:n], minus[:n])]
        v_e = [self.delta_lr * (p - m) / (2 * r) for p, m in zip(plus[n:], minus[n:])]
        return direct, v_e

    def _audience(self, weights: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        tensors = dict(zip(self.audience_names, weights))
        tensors.update({n: b.clone() for n, b in self.audience.named_buffers()})   # running stats untouched
        return functional_call(self.audience, tensors, (x,))

    def _audience_weight_grad(self, weights: list[torch.Tensor], x: torch.Tensor,
                              y: torch.Tensor) -> tuple[list[torch.Tensor], float]:
        """grad_W O_W of eq. (8), O_W = mean CE(g(x; W), y), and the audience's top-1 accuracy on x (B,)."""
        weights = [w.detach().requires_grad_() for w in weights]
        logits = self._audience(weights, x.detach())
        grads = torch.autograd.grad(F.cross_entropy(logits, y), weights)
        return list(grads), float((logits.argmax(1) == y).float().mean())

    def _audience_grad(self, weights: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                       wrt_input: bool) -> list[torch.Tensor]:
        """Gradient of O_W = mean CE(g(x; W), y) w.r.t. W, or (``wrt_input``) w.r.t. x as a 1-list."""
        x = x.detach().requires_grad_(wrt_input)
        weights = [w.detach().requires_grad_(not wrt_input) for w in weights]
        loss = F.cross_entropy(self._audience(weights, x), y)
        return list(torch.autograd.grad(loss, [x] if wrt_input else weights))

    def _o_delta(self, delta: torch.Tensor, tensors: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """O_Delta of eq. (7): sum_i CE between f(x_i + delta_i) and the soft target f(x_i)."""
        target = F.softmax(self.logits(tensors, x), dim=1)
        log_p = F.log_softmax(self.logits(tensors, x + delta), dim=1)
        return -(target * log_p).sum()

    def _delta_gradient(self, delta: torch.Tensor, unrolled: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        delta = delta.detach().requires_grad_()
        tensors = self._tensors([w.detach() for w in unrolled])
        return torch.autograd.grad(self._o_delta(delta, tensors, x), delta)[0]

    def _explanation_grads(self, delta: torch.Tensor, unrolled: list[torch.Tensor],
                           x: torch.Tensor) -> list[torch.Tensor]:
        """grad of O_Delta(delta, E', A) w.r.t. alpha then E' (zeros for weights it does not use)."""
        weights = [w.detach().requires_grad_() for w in unrolled]
        loss = self._o_delta(delta.detach(), self._tensors(weights), x)
        grads = torch.autograd.grad(loss, self.arch + weights, allow_unused=True)
        return [torch.zeros_like(t) if g is None else g for t, g in zip(self.arch + weights, grads)]

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self) -> dict[str, Any]:
        """The architecture optimiser's state, plus the audience's weights and optimiser (under ``audience``)."""
        return {**super().checkpoint_state(), "audience": {"audience": self.audience.state_dict(),
                                                           "audience_opt": self.audience_optimizer.state_dict()}}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        super().load_checkpoint_state(state)
        self.audience.load_state_dict(state["audience"]["audience"])
        self.audience_optimizer.load_state_dict(state["audience"]["audience_opt"])
