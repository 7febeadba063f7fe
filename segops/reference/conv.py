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

from .._geometry import conv_output_size


def _patches(x: Tensor, kernel_size, stride, padding, dilation) -> Tensor:
    """(N, C * KH * KW, OH * OW) patches of x zero-padded by ``padding``."""
    if x.numel() == 0:  # F.unfold refuses empty inputs (an empty batch's)
        OH, OW = conv_output_size(x.shape[-2:], kernel_size, stride, padding, dilation)
        return x.new_zeros(x.shape[0], x.shape[1] * kernel_size[0] * kernel_size[1],
                           max(OH, 0) * max(OW, 0))
    top, bottom, left, right = padding
    x = F.pad(x, (left, right, top, bottom))
    return F.unfold(x, kernel_size, dilation=dilation, stride=stride)


def conv2d(x: Tensor, w: Tensor, bias: Tensor | None, stride, padding, dilation, groups: int,
           relu: bool = False) -> Tensor:
    """(N, C_out, OH, OW) = per group, W_g (C_out/g, C_in/g*KH*KW) @ patches_g."""
    N = x.shape[0]
    C_out, C_in_g, KH, KW = w.shape
    OH, OW = conv_output_size(x.shape[-2:], (KH, KW), stride, padding, dilation)
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
    input (overlapping patches add up), then the padding cropped. The
    patches may cover less than the padded input (rows past the last
    stride, or a transposed convolution's output_padding): the rest is 0."""
    N, C_out, OH, OW = grad.shape
    _, C_in_g, KH, KW = w.shape
    H, W = input_hw
    top, bottom, left, right = padding
    if grad.numel() == 0:  # nothing to fold (F.fold refuses empty inputs)
        return grad.new_zeros((N, groups * C_in_g, H, W))
    weights = w.reshape(groups, C_out // groups, C_in_g * KH * KW)
    dy = grad.reshape(N, groups, C_out // groups, OH * OW)
    cols = torch.einsum("gok,ngop->ngkp", weights, dy)
    covered = ((OH - 1) * stride[0] + dilation[0] * (KH - 1) + 1,
               (OW - 1) * stride[1] + dilation[1] * (KW - 1) + 1)
    folded = F.fold(cols.reshape(N, groups * C_in_g * KH * KW, OH * OW), covered, (KH, KW),
                    dilation=dilation, stride=stride)
    padded = grad.new_zeros((N, groups * C_in_g, max(H + top + bottom, covered[0]),
                             max(W + left + right, covered[1])))
    padded[:, :, :covered[0], :covered[1]] = folded
    return padded[:, :, top:top + H, left:left + W]


def conv2d_grad_weight(grad: Tensor, x: Tensor, weight_shape, stride, padding, dilation,
                       groups: int) -> Tensor:
    """dw: dy_g @ patches_g^T summed over the batch."""
    N, C_out, OH, OW = grad.shape
    _, C_in_g, KH, KW = weight_shape
    # the input may hold rows past the last output row (a transposed
    # convolution's output_padding): only the patches of grad's OH x OW count
    full_hw = conv_output_size(x.shape[-2:], (KH, KW), stride, padding, dilation)
    cols = _patches(x, (KH, KW), stride, padding, dilation)
    cols = cols.view(N, groups * C_in_g * KH * KW, *full_hw)[:, :, :OH, :OW]
    cols = cols.reshape(N, groups, C_in_g * KH * KW, OH * OW)
    dy = grad.reshape(N, groups, C_out // groups, OH * OW)
    return torch.einsum("ngop,ngkp->gok", dy, cols).reshape(weight_shape)
