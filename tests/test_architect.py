"""The architecture gradient of eq. (2): first order, and second order against an exact unrolled autograd
computation on a tiny float64 NASXNet.

About the finite-difference radius: the second-order gradient approximates the mixed second derivative
times a vector by a central difference of radius ``fd_radius / ||v||``. On this tiny ReLU network a
perturbation of norm 1e-2 (DARTS' 0.01, the default) crosses non-differentiable points (ReLU, max-pool,
the min over patches), and the difference quotient then differs from the exact Hessian-vector product
by 200-600 % (measured on the 4-step case: radius 1e-2, 1e-3, 1e-4 -> relative error 2.2, 4.1, 6.4;
1e-5 -> 2e-9; 1e-6 -> 5e-10). That is a property of the DARTS approximation, not of the implementation,
so these tests use ``fd_radius=1e-6`` in float64, where the difference quotient is exact to ~1e-9 and
any error in the formula shows.
"""
from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from nasxserve.nas.supernet import SearchNetwork
from nasxserve.protos.losses import LossWeights, Stage, stage_loss
from nasxserve.protos.model import ExplainableNet
from nasxserve.training.architect import Architect

ARCH = ["features.alphas_normal", "features.alphas_reduce"]
MOMENTUM, WD = 0.9, 3e-4
FD = 1e-6


pytestmark = pytest.mark.usefixtures("one_thread")


def _loss_fn(model, stage: Stage, weights: LossWeights):
    """Like the trainer's functional stage loss: functional_call with the stage's path flags."""
    def loss(tensors, x, y):
        out = functional_call(model, tensors, (x,), {"prototype_path": stage.uses_prototypes,
                                                     "aux_path": stage.uses_aux})
        return stage_loss(stage, out, y, tensors["prototype_layer.prototypes"], weights)
    return loss


def _setup(stage: Stage = Stage.JOINT, seed: int = 0, steps: int = 2):
    """A float64 ExplainableNet over SearchNetwork(channels=4, layers=3, in_channels=1), 8x8 inputs, 3
    classes, 2 prototypes per class of dimension 4, after one SGD step (momentum 0.9, wd 3e-4).

    ``steps=4`` is the DARTS cell (14 edges); most tests use ``steps=2`` (5 edges), which exercises the
    same code with a quarter of the modules and keeps the file fast.
    """
    torch.manual_seed(seed)
    features = SearchNetwork(channels=4, layers=3, in_channels=1, steps=steps, multiplier=steps)
    model = ExplainableNet(features, num_classes=3, prototypes_per_class=2, prototype_dim=4).double()
    with torch.no_grad():  # alphas away from uniform so that the softmax Jacobian is not degenerate
        features.alphas_normal.normal_(0.0, 0.5)
        features.alphas_reduce.normal_(0.0, 0.5)
    model.train()
    g = torch.Generator().manual_seed(seed + 100)
    xt = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    yt = torch.tensor([0, 1, 2, 1])
    xv = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    yv = torch.tensor([2, 0, 1, 0])
    weights = LossWeights(0.8, 0.001)
    loss = _loss_fn(model, stage, weights)
    weight_params = [p for n, p in model.named_parameters() if n not in ARCH]
    opt = torch.optim.SGD(weight_params, lr=0.05, momentum=MOMENTUM, weight_decay=WD)
    # one weight step so that momentum buffers exist
    out = model(xt, prototype_path=stage.uses_prototypes, aux_path=stage.uses_aux)
    l0 = stage_loss(stage, out, yt, model.prototype_layer.prototypes, weights)
    grads = torch.autograd.grad(l0, weight_params, allow_unused=True)
    for p, gr in zip(weight_params, grads):
        p.grad = gr
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, loss, opt, (xt, yt, xv, yv)


def _snapshot(model):
    return ({n: p.detach().clone() for n, p in model.named_parameters()},
            {n: b.detach().clone() for n, b in model.named_buffers()})


def _exact_second_order(model, loss, opt, data, xi):
    """grad_alpha L_val(w - xi (momentum buf + grad_w L_train(w, alpha) + wd w), alpha), through the graph."""
    xt, yt, xv, yv = data
    params = dict(model.named_parameters())
    alphas = [params[n] for n in ARCH]
    names = [n for n in params if n not in ARCH]
    ws = [params[n] for n in names]

    def tensors(weights):
        t = dict(params)
        t.update(zip(names, weights))
        t.update({n: b.clone() for n, b in model.named_buffers()})   # nothing is mutated
        return t

    l_train = loss(tensors(ws), xt, yt)
    gw = torch.autograd.grad(l_train, ws, create_graph=True, allow_unused=True)
    unrolled = []
    for w, g in zip(ws, gw):
        d = (torch.zeros_like(w) if g is None else g) + WD * w.detach()
        buf = opt.state[w].get("momentum_buffer") if w in opt.state else None
        if buf is not None:
            d = d + MOMENTUM * buf
        unrolled.append(w.detach() - xi * d)
    l_val = loss(tensors(unrolled), xv, yv)
    return [g.detach() for g in torch.autograd.grad(l_val, alphas)]


def _first_order_plain(model, loss, data):
    xt, yt, xv, yv = data
    params = dict(model.named_parameters())
    t = dict(params)
    t.update({n: b.clone() for n, b in model.named_buffers()})
    return [g.detach() for g in torch.autograd.grad(loss(t, xv, yv), [params[n] for n in ARCH])]


def _rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = torch.sqrt(sum(((x - y) ** 2).sum() for x, y in zip(a, b)))
    den = torch.sqrt(sum((y ** 2).sum() for y in b))
    return float(num / den)


@pytest.fixture(scope="module")
def joint_case():
    """The DARTS 4-step cell."""
    return _setup(Stage.JOINT, steps=4)


@pytest.fixture(scope="module")
def small_case():
    return _setup(Stage.JOINT, seed=5, steps=2)


def test_momentum_buffers_exist(joint_case):
    model, _, opt, _ = joint_case
    bufs = [opt.state[p].get("momentum_buffer") for n, p in model.named_parameters()
            if n not in ARCH and p in opt.state]
    assert len(bufs) > 10 and all(b is not None for b in bufs)


def test_second_order_matches_exact_unrolled_gradient(joint_case):
    model, loss, opt, data = joint_case
    xi = 0.1
    params_before, buffers_before = _snapshot(model)
    arch2 = Architect(model, loss, ARCH, order=2, fd_radius=FD)
    got = arch2.gradient(*data, xi=xi, w_optimizer=opt)
    exact = _exact_second_order(model, loss, opt, data, xi)
    first = _first_order_plain(model, loss, data)
    assert [g.shape for g in got] == [(14, 8), (14, 8)]
    err = _rel(got, exact)
    gap = _rel(first, exact)
    assert err < 1e-3, f"second order differs from the exact unrolled gradient by {err:.2e}"
    # the second-order correction is large here, so a silent fall-back to first order would fail
    assert gap > 0.1, gap
    assert gap > 100 * err, (gap, err)
    # nothing in the model moved: weights, alphas, BatchNorm running statistics
    params_after, buffers_after = _snapshot(model)
    assert all(torch.equal(params_before[n], params_after[n]) for n in params_before)
    assert all(torch.equal(buffers_before[n], buffers_after[n]) for n in buffers_before)


def test_second_order_uses_the_momentum_buffer(small_case):
    """The unrolled step includes the momentum buffer: dropping it changes the result."""
    model, loss, opt, data = small_case
    xi = 0.1
    exact = _exact_second_order(model, loss, opt, data, xi)
    got = Architect(model, loss, ARCH, order=2, fd_radius=FD).gradient(*data, xi=xi, w_optimizer=opt)
    no_momentum = torch.optim.SGD([p for n, p in model.named_parameters() if n not in ARCH], lr=0.05,
                                  momentum=0.0, weight_decay=WD)
    got_nm = Architect(model, loss, ARCH, order=2, fd_radius=FD).gradient(*data, xi=xi,
                                                                          w_optimizer=no_momentum)
    assert _rel(got, exact) < 1e-3
    assert _rel(got_nm, exact) > 10 * _rel(got, exact)


def test_second_order_with_xi_zero_is_first_order(small_case):
    model, loss, opt, data = small_case
    got = Architect(model, loss, ARCH, order=2, fd_radius=FD).gradient(*data, xi=0.0, w_optimizer=opt)
    first = _first_order_plain(model, loss, data)
    assert _rel(got, first) < 1e-10


def test_unrolled_weights_are_the_sgd_step(small_case):
    """w' equals the weights after a real SGD step with the same lr (momentum + weight decay)."""
    model, loss, opt, data = small_case
    xt, yt, _, _ = data
    xi = 0.05
    arch = Architect(model, loss, ARCH, order=2)
    unrolled = arch.unrolled_weights(xt, yt, xi, opt)
    # a real step on copies
    names = arch.weight_names
    params = dict(model.named_parameters())
    copies = [params[n].detach().clone().requires_grad_() for n in names]
    shadow = torch.optim.SGD(copies, lr=xi, momentum=MOMENTUM, weight_decay=WD)
    for c, n in zip(copies, names):
        buf = opt.state[params[n]].get("momentum_buffer")
        shadow.state[c]["momentum_buffer"] = buf.clone()
    t = dict(params)
    t.update(zip(names, copies))
    t.update({n: b.clone() for n, b in model.named_buffers()})
    grads = torch.autograd.grad(loss(t, xt, yt), copies, allow_unused=True)
    for c, g in zip(copies, grads):
        c.grad = torch.zeros_like(c) if g is None else g
    shadow.step()
    for n, u, c in zip(names, unrolled, copies):
        torch.testing.assert_close(u, c.detach(), rtol=1e-12, atol=1e-14, msg=n)
        assert not u.requires_grad


def test_first_order_equals_plain_autograd(joint_case):
    model, loss, opt, data = joint_case
    xt, yt, xv, yv = data
    got = Architect(model, loss, ARCH, order=1).gradient(*data)
    # the ordinary module call (train mode), no functional_call
    out = model(xv)
    ref = torch.autograd.grad(stage_loss(Stage.JOINT, out, yv, model.prototype_layer.prototypes,
                                         LossWeights(0.8, 0.001)),
                              [model.features.alphas_normal, model.features.alphas_reduce])
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-13)
    # it does not depend on the training batch or xi
    other = Architect(model, loss, ARCH, order=1).gradient(xt * 0, yt, xv, yv, xi=1.0, w_optimizer=opt)
    for g, o in zip(got, other):
        assert torch.equal(g, o)


@pytest.mark.parametrize("stage", [Stage.ADAPT, Stage.FINETUNE])
def test_second_order_other_stages(stage):
    model, loss, opt, data = _setup(stage, seed=1)
    xi = 0.1
    got = Architect(model, loss, ARCH, order=2, fd_radius=FD).gradient(*data, xi=xi, w_optimizer=opt)
    exact = _exact_second_order(model, loss, opt, data, xi)
    first = _first_order_plain(model, loss, data)
    err, gap = _rel(got, exact), _rel(first, exact)
    assert err < 1e-3, err
    assert gap > 20 * err, (gap, err)


def _track_running_stats(model) -> int:
    """Give every BatchNorm running statistics (the search network may be built without them, using batch
    statistics in eval mode too); returns how many BatchNorms there are."""
    n = 0
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n += 1
            if m.running_mean is None:
                p = next(model.parameters())
                m.track_running_stats = True
                m.register_buffer("running_mean", torch.zeros(m.num_features, dtype=p.dtype))
                m.register_buffer("running_var", torch.ones(m.num_features, dtype=p.dtype))
                m.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
    return n


def test_second_order_leaves_batchnorm_running_stats_alone():
    model, loss, opt, data = _setup(Stage.JOINT, seed=2)
    n_bn = _track_running_stats(model)
    model(data[0])  # non-trivial running statistics
    _, buffers = _snapshot(model)
    bn_names = [n for n in buffers if n.endswith("running_mean") or n.endswith("running_var")
                or n.endswith("num_batches_tracked")]
    assert len(bn_names) == 3 * n_bn and n_bn > 30
    Architect(model, loss, ARCH, order=2, fd_radius=FD).gradient(*data, xi=0.1, w_optimizer=opt)
    now = dict(model.named_buffers())
    for n in bn_names:
        assert torch.equal(buffers[n], now[n]), n
    # a plain forward in train mode does update them (so the check above can fail)
    model(data[2])
    now = dict(model.named_buffers())
    changed = [n for n in bn_names if n.endswith("running_mean") and not torch.equal(buffers[n], now[n])]
    assert len(changed) == n_bn


@pytest.mark.parametrize("order", [1, 2])
def test_step_changes_alphas_only(order):
    model, loss, opt, data = _setup(Stage.JOINT, seed=3)
    params, buffers = _snapshot(model)
    opt_state = {id(p): s["momentum_buffer"].clone() for p, s in opt.state.items()}
    arch = Architect(model, loss, ARCH, order=order, lr=1e-2, fd_radius=FD)
    grads = arch.gradient(*data, xi=0.1, w_optimizer=opt)
    arch.step(*data, xi=0.1, w_optimizer=opt)
    now = dict(model.named_parameters())
    for n in ARCH:
        assert not torch.equal(params[n], now[n]), n
    for n in params:
        if n not in ARCH:
            assert torch.equal(params[n], now[n]), n
            assert now[n].grad is None, n
    for n, b in model.named_buffers():
        assert torch.equal(buffers[n], b), n
    for p, s in opt.state.items():
        assert torch.equal(opt_state[id(p)], s["momentum_buffer"])
    # the first Adam step (weight decay 1e-3, eps 1e-8) on gradient g moves alpha by
    # -lr * g' / (|g'| + eps), g' = g + 1e-3 * alpha
    for n, g in zip(ARCH, grads):
        delta = now[n].detach() - params[n]
        gd = g + 1e-3 * params[n]
        big = gd.abs() > 1e-5
        assert big.float().mean() > 0.5
        torch.testing.assert_close(delta[big], -1e-2 * gd[big] / (gd[big].abs() + 1e-8), rtol=1e-4, atol=1e-6)


def test_order_must_be_one_or_two():
    model, loss, _, _ = _setup(Stage.ADAPT, seed=4)
    with pytest.raises(ValueError, match="order"):
        Architect(model, loss, ARCH, order=3)


def test_gradient_walks_the_module_tree_a_constant_number_of_times():
    """Performance: ``Architect`` looks parameters up by name. Rebuilding ``dict(model.named_parameters())``
    once per weight tensor makes a second-order step quadratic in the model size (on the 8-layer DARTS
    search network, 1407 parameters over 5774 modules, the two rebuild loops cost ~35 s per step on CPU,
    more than the forward and backward passes). The number of walks must not grow with the parameters."""
    counts, weights = zip(*(_walks_per_gradient(steps) for steps in (2, 3)))
    assert counts[0] == counts[1] and counts[0] <= 10, (
        f"named_parameters() called {counts} times for {weights[-1]} weight tensors")


def _walks_per_gradient(steps: int) -> tuple[int, int]:
    """How often one second-order ``Architect.gradient`` calls ``named_parameters()``, and the number of
    weight tensors, on the model built with ``steps``."""
    model, loss, opt, data = _setup(Stage.ADAPT, seed=6, steps=steps)
    arch = Architect(model, loss, ARCH, order=2, fd_radius=FD)
    calls = [0]
    original = model.named_parameters

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    model.named_parameters = counting
    try:
        arch.gradient(*data, xi=0.1, w_optimizer=opt)
    finally:
        del model.named_parameters
    return calls[0], len(arch.weight_names)
