"""Pure-PyTorch transposed 2-D convolution (CPU path and test oracle of
kernels/conv_transpose.py), written with the convolution reference: the
forward is a convolution's input gradient, the backward a convolution and
its weight gradient. ``padding`` here is the symmetric (pad_h, pad_w) of
F.conv_transpose2d; weight is (C_in, C_out / groups, KH, KW)."""
from __future__ import annotations

from torch import Tensor

from . import conv


def _conv_padding(padding) -> list[int]:
    return [padding[0], padding[0], padding[1], padding[1]]


def output_size(input_hw, kernel_size, stride, padding, output_padding, dilation):
    return tuple((size - 1) * s - 2 * p + d * (k - 1) + op + 1 for size, k, s, p, op, d in
                 zip(input_hw, kernel_size, stride, padding, output_padding, dilation))


def conv_transpose2d(x: Tensor, w: Tensor, bias: Tensor | None, stride, padding,
                     output_padding, dilation, groups: int) -> Tensor:
    out_hw = output_size(x.shape[-2:], w.shape[-2:], stride, padding, output_padding, dilation)
    y = conv.conv2d_grad_input(x, w, out_hw, stride, _conv_padding(padding), dilation, groups)
    return y if bias is None else y + bias.view(1, -1, 1, 1)


def conv_transpose2d_grad_input(grad: Tensor, w: Tensor, stride, padding, dilation,
                                groups: int) -> Tensor:
    """An ordinary convolution of the output gradient with the same weight."""
    return conv.conv2d(grad, w, None, stride, _conv_padding(padding), dilation, groups)


def conv_transpose2d_grad_weight(grad: Tensor, x: Tensor, weight_shape, stride, padding,
                                 dilation, groups: int) -> Tensor:
    """The convolution's weight gradient with x as the 'output gradient' and
    the output gradient as the 'input'."""
    return conv.conv2d_grad_weight(x, grad, weight_shape, stride, _conv_padding(padding),
                                   dilation, groups)
