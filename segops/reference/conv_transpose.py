"""Pure-PyTorch transposed 2-D convolution (CPU path and test oracle of
kernels/conv_transpose.py), written with the convolution reference: the
forward is a convolution's input gradient. (The backward needs no reference
of its own: segops.ops.conv_transpose computes it with the convolution ops.)
``padding`` here is the symmetric (pad_h, pad_w) of
F.conv_transpose2d; weight is (C_in, C_out / groups, KH, KW)."""
from __future__ import annotations

from torch import Tensor

from .._geometry import conv_transpose_output_size as output_size
from .._geometry import four_sided
from . import conv


def conv_transpose2d(x: Tensor, w: Tensor, bias: Tensor | None, stride, padding,
                     output_padding, dilation, groups: int) -> Tensor:
    out_hw = output_size(x.shape[-2:], w.shape[-2:], stride, padding, output_padding, dilation)
    y = conv.conv2d_grad_input(x, w, out_hw, stride, four_sided(padding), dilation, groups)
    return y if bias is None else y + bias.view(1, -1, 1, 1)
