"""The eight candidate operations of the DARTS search space (Liu et al., 2019, section 3.1).

Every operation maps (B, C, H, W) to (B, C, H / stride, W / stride). ``affine=False`` is used inside
the search network (the architecture weights, not BatchNorm, scale each operation), ``affine=True``
in the discrete network built from a genotype.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

PRIMITIVES: tuple[str, ...] = (
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)


class ReLUConvBN(nn.Module):
    """ReLU -> Conv -> BatchNorm: (B, C_in, H, W) -> (B, C_out, H', W')."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, affine: bool = True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(c_out, affine=affine),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class DepthwiseConv2d(nn.Conv2d):
    """A depthwise (groups = channels) convolution.

    A dilation-2 kernel applied with stride 2 and padding ``k - 1`` only ever reads the even rows and
    columns of its input, so it equals an undilated convolution with padding ``(k - 1) / 2`` on
    ``x[:, :, ::2, ::2]``. The two give the same values and gradients; the undilated one is several
    times faster on CPU, so it is used wherever it applies. Weights keep the usual (C, 1, k, k) shape.
    """

    def __init__(self, channels: int, kernel: int, stride: int, padding: int, dilation: int = 1):
        super().__init__(channels, channels, kernel, stride=stride, padding=padding, dilation=dilation,
                         groups=channels, bias=False)
        self._even_phase = stride == 2 and dilation == 2 and padding == kernel - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._even_phase:
            return F.conv2d(x[:, :, ::2, ::2], self.weight, padding=(self.kernel_size[0] - 1) // 2,
                            groups=self.groups)
        return super().forward(x)


class DilConv(nn.Module):
    """ReLU -> (dilated) depthwise conv -> pointwise conv -> BatchNorm."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, dilation: int,
                 affine: bool = True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            DepthwiseConv2d(c_in, kernel, stride, padding, dilation),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out, affine=affine),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)

    def forward_from_relu(self, relu_x: torch.Tensor) -> torch.Tensor:
        """The same as ``forward`` given ``relu(x)`` already computed."""
        return self.op[1:](relu_x)


class SepConv(nn.Module):
    """Two stacked (ReLU -> depthwise conv -> pointwise conv -> BatchNorm) blocks; only the first strides."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, affine: bool = True):
        super().__init__()
        self.op = nn.Sequential(
            DilConv(c_in, c_in, kernel, stride, padding, 1, affine),
            DilConv(c_in, c_out, kernel, 1, padding, 1, affine),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)

    def forward_from_relu(self, relu_x: torch.Tensor) -> torch.Tensor:
        """The same as ``forward`` given ``relu(x)`` already computed."""
        first = cast(DilConv, self.op[0])
        return self.op[1](first.forward_from_relu(relu_x))


class Zero(nn.Module):
    """The ``none`` operation: a zero tensor of the output shape."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            return x.mul(0.0)
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class FactorizedReduce(nn.Module):
    """Halve H and W with two offset 1x1 stride-2 convolutions whose outputs are concatenated."""

    def __init__(self, c_in: int, c_out: int, affine: bool = True):
        super().__init__()
        if c_out % 2:
            raise ValueError(f"FactorizedReduce needs an even number of output channels, got {c_out}")
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_from_relu(self.relu(x))

    def forward_from_relu(self, relu_x: torch.Tensor) -> torch.Tensor:
        """The same as ``forward`` given ``relu(x)`` already computed.

        A 1x1 kernel at stride 2 reads only every other row and column, so each half is a stride-1
        convolution of a subsampled input: the same values and gradients, and it avoids PyTorch 2.14's
        CPU backward of 1x1 stride-2 convolutions with one or two output channels, which corrupts the
        heap under channels_last (PC-DARTS' partial-channel edges are that narrow).
        """
        return self.bn(torch.cat([F.conv2d(relu_x[:, :, ::2, ::2], self.conv_1.weight),
                                  F.conv2d(relu_x[:, :, 1::2, 1::2], self.conv_2.weight)], dim=1))

    def as_one_conv(self) -> nn.Sequential:
        """The same function for inference as ReLU -> one 2 x 2 stride-2 convolution -> this BatchNorm: the first
        half of its kernels read only the top-left pixel of each 2 x 2 window (``conv_1``), the second half only
        the bottom-right (``conv_2`` on ``x[:, :, 1::2, 1::2]``). In an ONNX graph that is one node where the two
        halves took two slices, two convolutions and a concatenation, and a model of 16 x 16 digits runs about
        5 % faster on ONNX Runtime's CPU kernels. The input's height and width must be even, as they must here."""
        half = self.conv_1.out_channels
        conv = nn.Conv2d(self.conv_1.in_channels, 2 * half, 2, stride=2, bias=False)
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[:half, :, 0, 0] = self.conv_1.weight[:, :, 0, 0]
            conv.weight[half:, :, 1, 1] = self.conv_2.weight[:, :, 0, 0]
        return nn.Sequential(nn.ReLU(), conv, copy.deepcopy(self.bn))


OpBuilder = Callable[[int, int, bool], nn.Module]

OPS: dict[str, OpBuilder] = {
    "none": lambda c, stride, affine: Zero(stride),
    "avg_pool_3x3": lambda c, stride, affine: nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False),
    "max_pool_3x3": lambda c, stride, affine: nn.MaxPool2d(3, stride=stride, padding=1),
    "skip_connect": lambda c, stride, affine: nn.Identity() if stride == 1 else FactorizedReduce(c, c, affine),
    "sep_conv_3x3": lambda c, stride, affine: SepConv(c, c, 3, stride, 1, affine),
    "sep_conv_5x5": lambda c, stride, affine: SepConv(c, c, 5, stride, 2, affine),
    "dil_conv_3x3": lambda c, stride, affine: DilConv(c, c, 3, stride, 2, 2, affine),
    "dil_conv_5x5": lambda c, stride, affine: DilConv(c, c, 5, stride, 4, 2, affine),
}


def build_op(name: str, channels: int, stride: int, affine: bool = True) -> nn.Module:
    """Build the operation called ``name`` (one of :data:`PRIMITIVES`) for ``channels`` channels."""
    try:
        return OPS[name](channels, stride, affine)
    except KeyError:
        raise ValueError(f"unknown operation {name!r}; known: {', '.join(PRIMITIVES)}") from None
