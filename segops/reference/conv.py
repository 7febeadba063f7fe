"""Pure-PyTorch 2-D convolution: the CPU path and the test oracle of
kernels/conv.py (and of the transposed convolution, whose forward is a
convolution's input gradient).

Written as the GEMMs the kernels compute, on explicit patches (F.unfold), so
it is independent of F.conv2d, which the tests compare both against.
``padding`` is (top, bottom, left, right) throughout.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _patches(x: Tensor, kernel_size, stride, padding, dilation) -> Tensor:
    """(N, C * KH * KW, OH * OW) patches of x zero-padded by ``padding``."""
    top, bottom, left, right = padding
    x = F.pad(x, (left, right, top, bottom))
    return F.unfold(x, kernel_size, dilation=dilation, stride=stride)


def output_size(input_hw, kernel_size, stride, padding, dilation) -> tuple[int, int]:
    H, W = input_hw
    OH = (H + padding[0] + padding[1] - dilation[0] * (kernel_size[0] - 1) - 1) // stride[0] + 1
    OW = (W + padding[2] + padding[3] - dilation[1] * (kernel_size[1] - 1) - 1) // stride[1] + 1
    return OH, OW


def conv2d(x: Tensor, w: Tensor, bias: Tensor | None, stride, padding, dilation, groups: int,
           relu: bool = False) -> Tensor:
    """(N, C_out, OH, OW) = per group, W_g (C_out/g, C_in/g*KH*KW) @ patches_g."""
    N = x.shape[0]
    C_out, C_in_g, KH, KW = w.shape
    OH, OW = output_size(x.shape[-2:], (KH, KW), stride, padding, dilation)
    cols = _patches(x, (KH, KW), stride, padding, dilation)
    cols = cols.view(N, groups, C_in_g * KH * KW, OH * OW)
    weights = w.reshape(groups, C_out // groups, C_in_g * KH * KW)
    y = torch.einsum("gok,ngkp->ngop", weights, cols).reshape(N, C_out, OH, OW)
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    return y.relu() if relu else y


def conv2d_grad_input(grad: Tensor, w: Tensor, input_hw, stride, padding, dilation,
                      groups: int) -> Tensor:
    """dx: the patches' gradient W_g^T @ dy_g, folded back onto the padded
    input (overlapping patches add up), then the padding cropped."""
    N, C_out, OH, OW = grad.shape
    _, C_in_g, KH, KW = w.shape
    H, W = input_hw
    top, bottom, left, right = padding
    weights = w.reshape(groups, C_out // groups, C_in_g * KH * KW)
    cols = torch.einsum("gok,ngop->ngkp", weights, grad.reshape(N, groups, C_out // groups, -1))
    padded = F.fold(cols.reshape(N, -1, OH * OW), (H + top + bottom, W + left + right),
                    (KH, KW), dilation=dilation, stride=stride)
    return padded[:, :, top:top + H, left:left + W]


def conv2d_grad_weight(grad: Tensor, x: Tensor, weight_shape, stride, padding, dilation,
                       groups: int) -> Tensor:
    """dw: dy_g @ patches_g^T summed over the batch."""
    N, C_out, OH, OW = grad.shape
    _, C_in_g, KH, KW = weight_shape
    cols = _patches(x, (KH, KW), stride, padding, dilation)
    cols = cols.view(N, groups, C_in_g * KH * KW, OH * OW)
    dy = grad.reshape(N, groups, C_out // groups, OH * OW)
    return torch.einsum("ngop,ngkp->gok", dy, cols).reshape(weight_shape)
