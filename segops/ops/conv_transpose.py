"""Transposed 2-D convolution: ``F.conv_transpose2d``'s signature and results
on segops' kernels (FCN, U-Net and Mask R-CNN up-sampling).

Conventions (``F.conv_transpose2d``'s)
--------------------------------------
* ``input`` ``(N, C_in, H, W)`` or ``(C_in, H, W)``; ``weight``
  ``(C_in, C_out / groups, KH, KW)``; ``bias`` ``(C_out,)`` or None; one
  dtype (float32 with TF32 per ``torch.backends.cudnn.allow_tf32``,
  float16, bfloat16; float64 on the reference and interpreter paths).
* Output ``(N, C_out, OH, OW)`` with OH = (H - 1)*stride_h - 2*pad_h +
  dil_h*(KH - 1) + output_padding_h + 1, channels_last when the input or
  the weight is (ATen's rule), else contiguous.
* ``output_padding`` must be smaller than the stride or the dilation.
* Backward: grad_input is an ordinary convolution of the output gradient
  (``segops::conv2d``), grad_weight the convolution's weight gradient with
  input and gradient swapped (``segops::conv2d_grad_weight``).
* Non-finite weights (NaN, inf) give non-finite outputs, but on the
  kernel path not always at ATen's pixels: the kernels multiply
  out-of-range (zero) loads by the weight, so a NaN tap also reaches pixels
  it does not touch in ATen. NaN/inf in the input or the output gradient
  land where ATen puts them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _dispatch
from .._checks import ArgumentError, accumulation_dtype, refuse_forward_ad
from .._format import conv_memory_format, empty_in_format, in_format
from .._geometry import conv_transpose_output_size, four_sided
from ..reference import conv_transpose as reference
from .conv import (
    _conv2d,
    _conv2d_grad_weight,
    _pair,
    check_conv_tensors,
    check_geometry,
    check_pixel_count,
    gemm_operand_once,
    kernel_operand,
    prepare_inputs,
    ran_channels_last,
)


def _kernels():
    from ..kernels import conv_transpose as kernels  # lazy: triton is slow to import
    return kernels


@torch.library.custom_op("segops::conv_transpose2d", mutates_args=())
def _conv_transpose2d(input: Tensor, weight: Tensor, bias: Tensor | None, stride: list[int],
                      padding: list[int], output_padding: list[int], dilation: list[int],
                      groups: int) -> Tensor:
    args = (input, weight, bias, stride, padding, output_padding, dilation, groups)
    if _dispatch.uses_kernel(input):
        return _kernels().conv_transpose2d_forward(*args)
    return in_format(reference.conv_transpose2d(*args), conv_memory_format(input, weight))


@_conv_transpose2d.register_fake
def _(input, weight, bias, stride, padding, output_padding, dilation, groups):
    out_hw = conv_transpose_output_size(input.shape[-2:], weight.shape[-2:], stride, padding,
                                        output_padding, dilation)
    return empty_in_format(input, (input.shape[0], weight.shape[1] * groups, *out_hw),
                           conv_memory_format(input, weight))


def _setup_context(ctx, inputs, output):
    input, weight, bias, stride, padding, output_padding, dilation, groups = inputs
    ctx.save_for_backward(input, weight)
    ctx.geometry = (list(stride), four_sided(padding), list(dilation), groups)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _grad(ctx, grad):
    input, weight = ctx.saved_tensors
    if ctx.needs_input_grad[0] and ctx.needs_input_grad[1]:
        grad = gemm_operand_once(grad, weight.shape[1])
    grad_input = grad_weight = grad_bias = None
    fmt = conv_memory_format(input, weight)
    if ctx.needs_input_grad[0]:
        grad_input = _conv2d(grad, weight, None, *ctx.geometry, False)
        # output_padding >= stride (allowed below the dilation) adds output
        # rows that no input pixel reaches: the convolution then returns
        # extra rows, dropped here (a crop is neither layout: a copy)
        grad_input = in_format(grad_input[..., :input.shape[-2], :input.shape[-1]], fmt)
    if ctx.needs_input_grad[1]:
        # the convolution's weight gradient: the transposed conv's input plays
        # the output gradient, its output gradient plays the input
        grad_weight = _conv2d_grad_weight(input, grad, list(weight.shape), *ctx.geometry,
                                          ran_channels_last(input, weight))
    if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
        grad_bias = grad.sum(dim=(0, 2, 3), dtype=accumulation_dtype(grad.dtype)).to(ctx.bias_dtype)
    return grad_input, grad_weight, grad_bias, None, None, None, None, None


_conv_transpose2d.register_autograd(_grad, setup_context=_setup_context)


def _check_tensors(input: Tensor, weight: Tensor, bias: Tensor | None, groups) -> int:
    """Checks, and returns groups as an int."""
    groups = check_conv_tensors(input, weight, bias, groups, "(C_in, C_out / groups, KH, KW)")
    if weight.shape[1] == 0:  # F.conv_transpose2d refuses an empty weight too
        raise ArgumentError(f"weight (C_in, C_out / groups, KH, KW) has no output channels along "
                            f"dim 1, got shape {tuple(weight.shape)}")
    if weight.shape[0] % groups:
        raise ArgumentError(f"groups={groups} must divide the input channels {weight.shape[0]} "
                            f"(weight shape {tuple(weight.shape)})")
    if input.shape[1] != weight.shape[0]:
        raise ArgumentError(f"weight of shape {tuple(weight.shape)} expects {weight.shape[0]} "
                            f"input channels, got input of shape {tuple(input.shape)} with "
                            f"{input.shape[1]}")
    C_out = weight.shape[1] * groups
    if bias is not None and tuple(bias.shape) != (C_out,):
        raise ArgumentError(f"bias must have shape ({C_out},), got {tuple(bias.shape)}")
    return groups


def conv_transpose2d(input: Tensor, weight: Tensor, bias: Tensor | None = None,
                     stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                     output_padding: int | tuple[int, int] = 0, groups: int = 1,
                     dilation: int | tuple[int, int] = 1) -> Tensor:
    """Transposed convolution with ``F.conv_transpose2d``'s signature and
    results (see the module docstring).

    Args:
        input: ``(N, C_in, H, W)`` or ``(C_in, H, W)``.
        weight: ``(C_in, C_out / groups, KH, KW)``.
        bias: ``(C_out,)`` or None.
        stride, dilation: int or pair, >= 1.
        padding: int or pair, >= 0 (removed from each side of the output).
        output_padding: int or pair added to the bottom/right of the output,
            smaller than the stride or the dilation.
        groups: divides C_in and C_out.
    Returns:
        ``(N, C_out, OH, OW)`` in the input's dtype and memory format (channels_last
        also when only the weight is, like ATen).
    """
    refuse_forward_ad("conv_transpose2d", input, weight, bias)
    input, weight, bias, unbatched = prepare_inputs(input, weight, bias)
    groups = _check_tensors(input, weight, bias, groups)
    stride = _pair("stride", stride, 1)
    dilation = _pair("dilation", dilation, 1)
    padding = _pair("padding", padding, 0)
    output_padding = _pair("output_padding", output_padding, 0)
    for op, s, d in zip(output_padding, stride, dilation):
        if op >= s and op >= d:
            raise ArgumentError(f"output_padding {tuple(output_padding)} must be smaller than "
                                f"either stride {tuple(stride)} or dilation {tuple(dilation)}")
    out_hw = conv_transpose_output_size(input.shape[-2:], weight.shape[-2:], stride, padding,
                                        output_padding, dilation)
    # an empty batch may have an empty output, as in F.conv_transpose2d
    if min(out_hw) < (1 if input.shape[0] else 0):
        raise ArgumentError(f"output size {out_hw} is too small: input {tuple(input.shape[-2:])},"
                            f" padding {tuple(padding)} removes more than the kernel adds")
    check_pixel_count("input", input.shape[0] * input.shape[2] * input.shape[3])
    check_pixel_count("output", input.shape[0] * out_hw[0] * out_hw[1])
    # the backward convolves the output gradient: its geometry must fit too
    check_geometry(out_hw, weight.shape[-2:], stride, four_sided(padding), dilation)
    if _dispatch.uses_native(input):
        out = F.conv_transpose2d(input, weight, bias, stride, padding, output_padding, groups,
                                 dilation)
    else:
        out = _conv_transpose2d(kernel_operand(input, weight), weight, bias, stride, padding,
                                output_padding, dilation, groups)
    return out.squeeze(0) if unbatched else out


# graph leaves for torch.fx.symbolic_trace (see segops/ops/__init__.py)
torch.fx.wrap("conv_transpose2d")
