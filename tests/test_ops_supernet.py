"""Candidate operations, the mixed edge of eq. (3), the search network and the discrete network."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nasxserve.nas.genotype import DARTS_V2, GENOTYPES, derive_genotype
from nasxserve.nas.network import GenotypeNetwork, drop_path, reduction_cells
from nasxserve.nas.ops import (OPS, PRIMITIVES, DepthwiseConv2d, DilConv, FactorizedReduce, SepConv, Zero,
                               build_op)
from nasxserve.nas.supernet import MixedOp, SearchNetwork, num_edges


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


pytestmark = pytest.mark.usefixtures("one_thread")


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


# ----------------------------------------------------------------------------------------- operations
def test_primitives_are_the_darts_eight():
    assert PRIMITIVES == ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3",
                          "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")
    assert set(OPS) == set(PRIMITIVES)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("name", PRIMITIVES)
def test_every_op_keeps_or_halves_shape(name, stride, affine):
    op = build_op(name, 8, stride, affine)
    x = _x(2, 8, 16, 16)
    y = op(x)
    assert y.shape == (2, 8, 16 // stride, 16 // stride)
    assert y.dtype == x.dtype
    if name == "none":
        assert torch.count_nonzero(y) == 0
    if name == "skip_connect" and stride == 1:
        assert torch.equal(y, x)


def test_build_op_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown operation 'conv_7x7'"):
        build_op("conv_7x7", 4, 1)


def test_factorized_reduce_needs_even_channels():
    with pytest.raises(ValueError, match="even"):
        FactorizedReduce(4, 5)


@pytest.mark.parametrize("size", [16, 15])
@pytest.mark.parametrize("kernel", [3, 5])
def test_depthwise_even_phase_matches_dilated_conv(kernel, size):
    torch.manual_seed(kernel + size)
    c = 6
    conv = DepthwiseConv2d(c, kernel, stride=2, padding=kernel - 1, dilation=2).double()
    assert conv._even_phase  # the rewrite is what is being tested
    w = conv.weight.detach().clone().requires_grad_()
    x1 = _x(2, c, size, size, dtype=torch.float64).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()

    y = conv(x1)
    ref = F.conv2d(x2, w, stride=2, padding=kernel - 1, dilation=2, groups=c)
    assert y.shape == ref.shape == (2, c, (size + 1) // 2, (size + 1) // 2)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-10)

    g = torch.randn_like(ref)
    gx1, gw1 = torch.autograd.grad(y, (x1, conv.weight), g)
    gx2, gw2 = torch.autograd.grad(ref, (x2, w), g)
    torch.testing.assert_close(gx1, gx2, rtol=0, atol=1e-10)
    torch.testing.assert_close(gw1, gw2, rtol=0, atol=1e-10)
    # odd rows/columns of the input never influence the output
    assert torch.count_nonzero(gx1[:, :, 1::2, :]) == 0 and torch.count_nonzero(gx1[:, :, :, 1::2]) == 0


@pytest.mark.parametrize("kernel", [3, 5])
def test_depthwise_even_phase_in_float32_within_1e5(kernel):
    c = 8
    conv = DepthwiseConv2d(c, kernel, stride=2, padding=kernel - 1, dilation=2)
    x1 = _x(2, c, 16, 16).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    w = conv.weight.detach().clone().requires_grad_()
    y = conv(x1)
    ref = F.conv2d(x2, w, stride=2, padding=kernel - 1, dilation=2, groups=c)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    gx1, gw1 = torch.autograd.grad(y, (x1, conv.weight), g)
    gx2, gw2 = torch.autograd.grad(ref, (x2, w), g)
    # weight gradients sum 128 products per entry: compare relative to their size
    torch.testing.assert_close(gx1, gx2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw1, gw2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride,padding,dilation", [(1, 2, 2), (2, 1, 1), (1, 1, 1), (2, 2, 2)])
def test_depthwise_other_settings_are_plain_conv(stride, padding, dilation):
    c = 4
    conv = DepthwiseConv2d(c, 3, stride, padding, dilation).double()
    x = _x(2, c, 16, 16, dtype=torch.float64)
    ref = F.conv2d(x, conv.weight, stride=stride, padding=padding, dilation=dilation, groups=c)
    torch.testing.assert_close(conv(x), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("make", [
    lambda s: SepConv(6, 6, 3, s, 1, affine=False),
    lambda s: SepConv(6, 6, 5, s, 2, affine=True),
    lambda s: DilConv(6, 6, 3, s, 2, 2, affine=False),
    lambda s: DilConv(6, 6, 5, s, 4, 2, affine=True),
    lambda s: FactorizedReduce(6, 6, affine=False),
], ids=["sep3", "sep5", "dil3", "dil5", "fr"])
def test_forward_from_relu_equals_forward(make, stride):
    op = make(stride).double().train()
    x = _x(3, 6, 12, 12, dtype=torch.float64)
    torch.testing.assert_close(op.forward_from_relu(F.relu(x)), op(x), rtol=0, atol=1e-13)
    op.eval()
    torch.testing.assert_close(op.forward_from_relu(F.relu(x)), op(x), rtol=0, atol=1e-13)


@pytest.mark.parametrize("size", [2, 8, 16])
def test_factorized_reduce_as_one_conv_is_the_same_function(size):
    torch.manual_seed(0)
    fr = FactorizedReduce(6, 8)
    with torch.no_grad():                        # running statistics that are not the identity
        fr.bn.running_mean.normal_()
        fr.bn.running_var.uniform_(0.5, 2.0)
        fr.bn.weight.normal_()
        fr.bn.bias.normal_()
    fr.eval()
    x = torch.randn(3, 6, size, size, dtype=torch.float64)
    one = fr.as_one_conv().double().eval()
    assert [type(m) for m in one] == [nn.ReLU, nn.Conv2d, nn.BatchNorm2d]
    torch.testing.assert_close(one(x), fr.double()(x), rtol=0, atol=1e-12)


def test_zero_op_outputs_zeros_of_output_shape():
    x = _x(2, 3, 9, 9)
    assert Zero(1)(x).shape == (2, 3, 9, 9)
    assert Zero(2)(x).shape == (2, 3, 5, 5)
    assert torch.count_nonzero(Zero(2)(x)) == 0


# ----------------------------------------------------------------------------------------- mixed op
def _naive_mixed(mixed: MixedOp, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return sum(w[k] * op(x) for k, op in enumerate(mixed._ops))


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("stride", [1, 2])
def test_mixed_op_equals_naive_weighted_sum_over_all_ops(stride, train):
    torch.manual_seed(10 + stride)
    mixed = MixedOp(4, stride).double().train(train)
    assert len(mixed._ops) == len(PRIMITIVES) == 8
    if not train:  # give eval-mode BatchNorm non-trivial running statistics
        for m in mixed.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    x = _x(2, 4, 8, 8, dtype=torch.float64)
    alpha1 = torch.randn(8, dtype=torch.float64, requires_grad=True)
    alpha2 = alpha1.detach().clone().requires_grad_()
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()

    y = mixed(x1, F.softmax(alpha1, dim=0))
    ref = _naive_mixed(mixed, x2, F.softmax(alpha2, dim=0))
    assert y.shape == ref.shape == (2, 4, 8 // stride, 8 // stride)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)

    g = torch.randn_like(y)
    ga1, gx1 = torch.autograd.grad(y, (alpha1, x1), g)
    ga2, gx2 = torch.autograd.grad(ref, (alpha2, x2), g)
    torch.testing.assert_close(ga1, ga2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gx1, gx2, rtol=1e-10, atol=1e-12)
    assert ga1.abs().max() > 1e-3  # the comparison is not between two zeros


def test_mixed_op_gradient_wrt_mixing_weights_is_each_op_output():
    """d<g, out>/dw_k = <g, op_k(x)>; zero for ``none``."""
    mixed = MixedOp(4, 1).double().eval()
    x = _x(2, 4, 8, 8, dtype=torch.float64)
    w = torch.rand(8, dtype=torch.float64, requires_grad=True)
    y = mixed(x, w)
    g = torch.randn_like(y)
    (gw,) = torch.autograd.grad(y, w, g)
    expected = torch.stack([(g * op(x)).sum() for op in mixed._ops])
    torch.testing.assert_close(gw, expected, rtol=1e-10, atol=1e-12)
    assert gw[PRIMITIVES.index("none")] == 0


def test_mixed_op_with_one_hot_weights_is_that_op():
    mixed = MixedOp(4, 2).double().eval()
    x = _x(2, 4, 8, 8, dtype=torch.float64)
    for k, name in enumerate(PRIMITIVES):
        w = torch.zeros(8, dtype=torch.float64)
        w[k] = 1.0
        torch.testing.assert_close(mixed(x, w), mixed._ops[k](x), rtol=0, atol=1e-13, msg=name)


# ----------------------------------------------------------------------------------------- search network
@pytest.mark.parametrize("layers,expected_channels", [(3, 64), (5, 64)])
def test_search_network_shapes(layers, expected_channels):
    net = SearchNetwork(channels=4, layers=layers, in_channels=1)
    assert net.alphas_normal.shape == (14, 8) and net.alphas_reduce.shape == (14, 8)
    assert num_edges(4) == 14 and num_edges(3) == 9
    assert net.out_channels == expected_channels  # 4 nodes x (4 channels doubled twice)
    z = net(_x(2, 1, 16, 16))
    assert z.shape == (2, expected_channels, 4, 4)
    assert [c.reduction for c in net.cells].count(True) == 2


def test_search_network_with_one_reduction_halves_the_side_once():
    net = SearchNetwork(channels=4, layers=5, in_channels=1, reductions=1)
    assert [c.reduction for c in net.cells] == [False, True, False, False, False]
    assert net.out_channels == 32                 # 4 nodes x (4 channels doubled once)
    assert net(_x(2, 1, 16, 16)).shape == (2, 32, 8, 8)


def test_search_network_parameter_split():
    net = SearchNetwork(channels=4, layers=3, in_channels=1)
    arch = net.arch_parameters()
    assert arch[0] is net.alphas_normal and arch[1] is net.alphas_reduce
    weights = list(net.weight_parameters())
    ids = {id(p) for p in weights}
    assert id(net.alphas_normal) not in ids and id(net.alphas_reduce) not in ids
    assert len(weights) + 2 == len(list(net.parameters()))


def test_search_network_alphas_shared_and_reach_every_cell():
    torch.manual_seed(3)
    net = SearchNetwork(channels=4, layers=3, in_channels=1).double()
    x = _x(2, 1, 8, 8, dtype=torch.float64)
    z = net(x)
    gn, gr = torch.autograd.grad(z.square().sum(), net.arch_parameters())
    assert gn.shape == gr.shape == (14, 8)
    # every edge's alpha row influences the output in both cell types
    assert (gn.abs().sum(dim=1) > 0).all() and (gr.abs().sum(dim=1) > 0).all()


def test_search_network_genotype_uses_softmax_of_alphas():
    net = SearchNetwork(channels=4, layers=3, in_channels=1)
    with torch.no_grad():
        net.alphas_normal.zero_()
        net.alphas_reduce.zero_()
        # node 3 (edges 2, 3, 4 from inputs 0, 1, 2). Raw alphas rank 2.0 > 1.7 > 1.5 (inputs 0, 2);
        # softmax weights rank input 2 (0.439) > input 1 (0.390) > input 0 (0.140).
        net.alphas_normal[2, 1:] = 2.0
        net.alphas_normal[3, 4] = 1.5
        net.alphas_normal[4, 6] = 1.7
    g = net.genotype()
    assert set(g.normal[2:4]) == {("sep_conv_3x3", 1), ("dil_conv_3x3", 2)}
    wn = F.softmax(net.alphas_normal.detach(), -1).numpy()
    wr = F.softmax(net.alphas_reduce.detach(), -1).numpy()
    assert g == derive_genotype(wn, wr)


# ----------------------------------------------------------------------------------------- discrete network
@pytest.mark.parametrize("name", sorted(GENOTYPES))
def test_genotype_network_shapes_for_every_published_cell(name):
    torch.manual_seed(1)
    net = GenotypeNetwork(GENOTYPES[name], channels=4, layers=3, in_channels=1)
    assert net.out_channels == 64
    net.train()
    z, tower = net.forward_with_tower(_x(2, 1, 16, 16))
    assert z.shape == (2, 64, 4, 4) and tower is None
    net.eval()
    assert net(_x(2, 1, 16, 16)).shape == (2, 64, 4, 4)


@pytest.mark.parametrize("layers,reductions,expected", [(3, 2, (1, 2)), (5, 2, (1, 3)), (8, 2, (2, 5)),
                                                         (20, 2, (6, 13)), (5, 1, (1,)), (8, 1, (2,))])
def test_reduction_cells_at_a_third_and_two_thirds_of_the_depth(layers, reductions, expected):
    assert reduction_cells(layers, reductions) == expected


def test_reduction_cells_rejects_other_counts():
    for reductions in (0, 3):
        with pytest.raises(ValueError, match="reductions must be one of"):
            reduction_cells(5, reductions)


def test_genotype_network_with_one_reduction_keeps_a_finer_grid_and_its_tower():
    torch.manual_seed(6)
    net = GenotypeNetwork(DARTS_V2, channels=4, layers=5, in_channels=1, num_classes=3, auxiliary_tower=True,
                          reductions=1)
    assert [c.reduction for c in net.cells] == [False, True, False, False, False]
    assert net.out_channels == 32
    net.train()
    z, tower = net.forward_with_tower(_x(2, 1, 16, 16))
    assert z.shape == (2, 32, 8, 8) and tower.shape == (2, 3)


def test_genotype_network_cells_follow_genotype():
    net = GenotypeNetwork(DARTS_V2, channels=4, layers=3, in_channels=1)
    normal, red1, red2 = net.cells
    assert not normal.reduction and red1.reduction and red2.reduction
    assert normal.inputs == [j for _, j in DARTS_V2.normal]
    assert red1.inputs == [j for _, j in DARTS_V2.reduce]
    assert isinstance(normal.ops[0], SepConv) and isinstance(normal.ops[7], DilConv)
    # reduction: stride 2 on edges from the cell inputs (skip becomes FactorizedReduce), stride 1 after
    assert isinstance(red1.ops[2], nn.Identity)                 # ('skip_connect', 2)
    assert isinstance(red1.ops[0], nn.MaxPool2d) and red1.ops[0].stride == 2
    assert isinstance(red1.ops[3], nn.MaxPool2d) and red1.ops[3].stride == 2


def test_genotype_network_auxiliary_tower():
    torch.manual_seed(2)
    net = GenotypeNetwork(DARTS_V2, channels=4, layers=3, in_channels=1, num_classes=5, auxiliary_tower=True)
    x = _x(3, 1, 16, 16)
    net.train()
    z, tower = net.forward_with_tower(x)
    assert z.shape == (3, 64, 4, 4)
    assert tower is not None and tower.shape == (3, 5)
    assert torch.isfinite(tower).all()
    net.eval()
    z, tower = net.forward_with_tower(x)
    assert z.shape == (3, 64, 4, 4) and tower is None
    assert net(x).shape == (3, 64, 4, 4)
    with pytest.raises(ValueError, match="num_classes"):
        GenotypeNetwork(DARTS_V2, channels=4, layers=3, in_channels=1, auxiliary_tower=True)


def test_genotype_network_drop_path_only_in_training():
    torch.manual_seed(4)
    net = GenotypeNetwork(DARTS_V2, channels=4, layers=3, in_channels=1).double()
    x = _x(4, 1, 16, 16, dtype=torch.float64)
    net.eval()
    ref = net(x)
    net.drop_path_prob = 0.5
    torch.testing.assert_close(net(x), ref, rtol=0, atol=0)   # eval ignores drop path
    net.train()
    net.drop_path_prob = 0.0
    torch.manual_seed(5)
    a = net(x)
    torch.manual_seed(5)
    b = net(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    net.drop_path_prob = 0.5
    torch.manual_seed(5)
    c = net(x)
    assert not torch.allclose(a, c)


def test_drop_path_zeroes_whole_samples_and_rescales_survivors():
    torch.manual_seed(123)
    x = torch.rand(2000, 2, 3, 3) + 0.5    # strictly positive: a zero means dropped
    p = 0.3
    y = drop_path(x, p)
    flat_x, flat_y = x.flatten(1), y.flatten(1)
    dropped = (flat_y == 0).all(dim=1)
    kept = ~dropped
    assert ((flat_y == 0).any(dim=1) == dropped).all()        # all-or-nothing per sample
    torch.testing.assert_close(flat_y[kept], flat_x[kept] / (1 - p), rtol=1e-6, atol=0)
    frac = kept.float().mean().item()
    assert abs(frac - 0.7) < 0.04                               # ~ 10 binomial standard deviations
    # unbiased in expectation
    assert abs(y.mean().item() / x.mean().item() - 1.0) < 0.06


def test_drop_path_zero_prob_is_identity():
    x = torch.randn(5, 3, 2, 2)
    assert drop_path(x, 0.0) is x


@pytest.mark.parametrize("size", [8, 2])
def test_one_channel_factorized_reduce_equals_strided_convolutions_and_survives_channels_last(size):
    """FactorizedReduce subsamples and convolves at stride 1 (around a PyTorch heap corruption that one- and
    two-channel outputs, as on PC-DARTS' narrowest strided edges, trigger); the values must be the
    stride-2 convolutions'."""
    torch.manual_seed(0)
    op = FactorizedReduce(2, 2, affine=False).double()
    x = torch.randn(4, 2, size, size, dtype=torch.float64)
    r = F.relu(x)
    expected = op.bn(torch.cat([F.conv2d(r, op.conv_1.weight, stride=2),
                                F.conv2d(r[:, :, 1:, 1:], op.conv_2.weight, stride=2)], dim=1))
    torch.testing.assert_close(op(x), expected)
    op = op.float().to(memory_format=torch.channels_last)
    xc = x.float().contiguous(memory_format=torch.channels_last).requires_grad_()
    for _ in range(3):
        op(xc).square().sum().backward()
    assert xc.grad.isfinite().all()
