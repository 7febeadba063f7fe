"""Atrous (dilated) 2-D convolution: ``F.conv2d``'s signature and results on
segops' implicit-GEMM kernels (any stride, padding, dilation, groups).

Conventions (``F.conv2d``'s)
----------------------------
* ``input`` ``(N, C_in, H, W)`` or unbatched ``(C_in, H, W)``; ``weight``
  ``(C_out, C_in / groups, KH, KW)``; ``bias`` ``(C_out,)`` or None. One
  dtype for all three: float32, float16, bfloat16 (float64 on the reference
  and interpreter paths). Accumulation is float32; float32 inputs use TF32
  exactly when ``torch.backends.cudnn.allow_tf32`` is set, as F.conv2d does.
* ``stride``, ``dilation``: int or pair, >= 1. ``padding``: int or pair
  (>= 0), or ``'valid'`` (none) or ``'same'`` (output size = input size,
  stride 1 only; an odd total is padded one more at the bottom/right,
  like PyTorch).
* Output ``(N, C_out, OH, OW)``, OH = (H + 2*pad_h - dil_h*(KH-1) - 1) //
  stride_h + 1, channels_last when the input or the weight is (ATen's rule:
  a model moved to channels_last gives channels_last outputs from NCHW
  inputs), else contiguous. A tensor's format is its stride order, as
  ATen's ``suggest_memory_format`` reads it (a channel slice of a
  channels_last tensor is channels_last); the output and the gradients have
  the strides ATen gives them (segops._format).
* Under autocast, float32 inputs are cast to the autocast dtype first, as
  ATen does for conv2d.
* Non-finite weights (NaN, inf) give non-finite outputs, but on the
  kernel path not always at ATen's pixels: a tap that reads only padding
  in a whole tile is skipped (ATen multiplies those zeros by the NaN) and the
  input gradient multiplies out-of-range (zero) loads by the weight. NaN/inf in the input or
  the output gradient land where ATen puts them.
* Errors are ``ArgumentError``/``ArgumentTypeError``: ValueError/TypeError
  that are also RuntimeError, the kind F.conv2d raises.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _dispatch
from .._checks import (
    FLOAT_DTYPES,
    ArgumentError,
    ArgumentTypeError,
    accumulation_dtype,
    check_choice,
    check_int,
    int_pair,
    refuse_forward_ad,
)
from .._format import conv_memory_format, empty_in_format, in_format, memory_format_of
from .._geometry import conv_output_size
from ..reference import conv as reference

ACTIVATIONS = (None, "relu")


def _kernels():
    from ..kernels import conv as kernels  # lazy: triton is slow to import
    return kernels


def _memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def ran_channels_last(input: Tensor, weight: Tensor) -> bool:
    """Whether the convolution of ``input`` and ``weight`` runs (and gives its
    output and every gradient) in channels_last: ATen's rule."""
    return conv_memory_format(input, weight) == torch.channels_last


# --------------------------------------------------------------------------
# custom ops: forward, grad_input, grad_weight
# --------------------------------------------------------------------------
@torch.library.custom_op("segops::conv2d", mutates_args=())
def _conv2d(input: Tensor, weight: Tensor, bias: Tensor | None, stride: list[int],
            padding: list[int], dilation: list[int], groups: int, relu: bool) -> Tensor:
    args = (input, weight, bias, stride, padding, dilation, groups, relu)
    if _dispatch.uses_kernel(input):
        return _kernels().conv2d_forward(*args)
    return in_format(reference.conv2d(*args), conv_memory_format(input, weight))


@_conv2d.register_fake
def _(input, weight, bias, stride, padding, dilation, groups, relu):
    OH, OW = conv_output_size(input.shape[-2:], weight.shape[-2:], stride, padding, dilation)
    return empty_in_format(input, (input.shape[0], weight.shape[0], OH, OW),
                           conv_memory_format(input, weight))


@torch.library.custom_op("segops::conv2d_grad_input", mutates_args=())
def _conv2d_grad_input(grad: Tensor, weight: Tensor, input_hw: list[int], stride: list[int],
                       padding: list[int], dilation: list[int], groups: int,
                       channels_last: bool) -> Tensor:
    if _dispatch.uses_kernel(grad):
        return _kernels().conv_transpose_gather(grad, weight, None, input_hw, stride, padding,
                                                dilation, groups, _memory_format(channels_last))
    dx = reference.conv2d_grad_input(grad, weight, input_hw, stride, padding, dilation, groups)
    return in_format(dx, _memory_format(channels_last))


@_conv2d_grad_input.register_fake
def _(grad, weight, input_hw, stride, padding, dilation, groups, channels_last):
    shape = (grad.shape[0], weight.shape[1] * groups, *input_hw)
    return empty_in_format(grad, shape, _memory_format(channels_last))


@torch.library.custom_op("segops::conv2d_grad_weight", mutates_args=())
def _conv2d_grad_weight(grad: Tensor, input: Tensor, weight_shape: list[int],
                        stride: list[int], padding: list[int], dilation: list[int],
                        groups: int, channels_last: bool) -> Tensor:
    args = (grad, input, weight_shape, stride, padding, dilation, groups)
    if _dispatch.uses_kernel(input):
        dw = _kernels().conv2d_grad_weight(*args)
    else:
        dw = reference.conv2d_grad_weight(*args)
    fmt = _memory_format(channels_last)
    return in_format(dw.to(input.dtype, memory_format=fmt), fmt)


@_conv2d_grad_weight.register_fake
def _(grad, input, weight_shape, stride, padding, dilation, groups, channels_last):
    return empty_in_format(input, weight_shape, _memory_format(channels_last))


# Double backward: both gradient ops are bilinear, and each derivative is
# another of the three ops (so any order works). With y = conv(x, w):
#   grad_input(dy, w)  -> d/d dy: conv(g, w);        d/d w: grad_weight(dy, g)
#   grad_weight(dy, x) -> d/d dy: conv(x, g);        d/d x: grad_input(dy, g)
# where g is the incoming gradient (x-shaped, resp. w-shaped).
def _save_operands_and_geometry(ctx, inputs, output):
    """Both gradient ops take (dy, an operand, a shape, stride, padding,
    dilation, groups, ...)."""
    ctx.save_for_backward(inputs[0], inputs[1])
    stride, padding, dilation, groups = inputs[3:7]
    ctx.geometry = (list(stride), list(padding), list(dilation), groups)


def _dense_like(out: Tensor, like: Tensor) -> Tensor:
    """``out`` cropped to ``like``'s height and width, dense in its layout."""
    return in_format(out[..., :like.shape[-2], :like.shape[-1]], memory_format_of(like))


def _grad_input_grad(ctx, g):
    grad, weight = ctx.saved_tensors
    dgrad = dweight = None
    if ctx.needs_input_grad[0]:
        # cropped to dy: in a transposed conv's third derivative, dy is the
        # transposed conv's input, smaller than this conv's output when
        # output_padding leaves rows and columns no input reaches
        dgrad = _dense_like(_conv2d(g, weight, None, *ctx.geometry, False), grad)
    if ctx.needs_input_grad[1]:
        dweight = _conv2d_grad_weight(grad, g, list(weight.shape), *ctx.geometry,
                                      ran_channels_last(g, weight))
    return dgrad, dweight, None, None, None, None, None, None


_conv2d_grad_input.register_autograd(_grad_input_grad, setup_context=_save_operands_and_geometry)


def _grad_weight_grad(ctx, g):
    grad, input = ctx.saved_tensors
    dgrad = dinput = None
    if ctx.needs_input_grad[0]:
        # cropped to dy: a transposed conv's output_padding can leave rows
        # and columns that reach no input, where this conv gives extra output
        dgrad = _dense_like(_conv2d(input, g, None, *ctx.geometry, False), grad)
    if ctx.needs_input_grad[1]:
        dinput = _conv2d_grad_input(grad, g, list(input.shape[-2:]), *ctx.geometry,
                                    ran_channels_last(input, g))
    return dgrad, dinput, None, None, None, None, None, None


_conv2d_grad_weight.register_autograd(_grad_weight_grad,
                                      setup_context=_save_operands_and_geometry)


def kernel_operand(input: Tensor, weight: Tensor) -> Tensor:
    """On the kernel path, the input of a channels_last convolution (the
    weight is) with its channel axis contiguous: the forward kernel and the
    backward's weight GEMM both read it so, and this one copy is what the
    backward saves (else each would make its own). The output's layout does
    not change: it is ATen's rule for the original operands either way."""
    if _dispatch.uses_kernel(input) and input.stride(1) != 1 and ran_channels_last(input, weight):
        return input.contiguous(memory_format=torch.channels_last)
    return input


def gemm_operand_once(grad: Tensor, channels_per_group: int) -> Tensor:
    """The output gradient in channels_last when both backward GEMM kernels
    will read it: they each convert an NCHW operand (kernels/_gemm.py), so
    converting here once saves a pass. Depthwise kernels (one channel per
    group) read NCHW as is."""
    if (_dispatch.uses_kernel(grad) and channels_per_group > 1 and grad.dim() == 4
            and grad.stride(1) != 1):
        return grad.contiguous(memory_format=torch.channels_last)
    return grad


def _conv2d_setup_context(ctx, inputs, output):
    input, weight, bias, stride, padding, dilation, groups, relu = inputs
    ctx.save_for_backward(input, weight, output if relu else None)
    ctx.geometry = (list(stride), list(padding), list(dilation), groups)
    ctx.relu = relu
    ctx.bias_dtype = None if bias is None else bias.dtype


def _conv2d_grad(ctx, grad):
    input, weight, output = ctx.saved_tensors
    if ctx.relu:
        # F.relu's rule: the gradient passes where the output is not <= 0 (NaN too)
        grad = torch.where(output <= 0, 0, grad)
    if ctx.needs_input_grad[0] and ctx.needs_input_grad[1]:
        grad = gemm_operand_once(grad, weight.shape[1])
    grad_input = grad_weight = grad_bias = None
    channels_last = ran_channels_last(input, weight)
    if ctx.needs_input_grad[0]:
        grad_input = _conv2d_grad_input(grad, weight, list(input.shape[-2:]), *ctx.geometry,
                                        channels_last)
    if ctx.needs_input_grad[1]:
        grad_weight = _conv2d_grad_weight(grad, input, list(weight.shape), *ctx.geometry,
                                          channels_last)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
        grad_bias = grad.sum(dim=(0, 2, 3), dtype=accumulation_dtype(grad.dtype)).to(ctx.bias_dtype)
    return grad_input, grad_weight, grad_bias, None, None, None, None, None


_conv2d.register_autograd(_conv2d_grad, setup_context=_conv2d_setup_context)


# --------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------
# The kernels compute pixel coordinates (oh * stride - pad + tap * dilation)
# in 32 bits: every geometry value stays below 2^31.
MAX_INT32 = 2**31 - 1


def _pair(name: str, value, minimum: int) -> list[int]:
    return int_pair(name, value, minimum, MAX_INT32)


def resolve_padding(padding, kernel_size, stride, dilation) -> list[int]:
    """(top, bottom, left, right) from an int, a pair, 'valid' or 'same'."""
    if isinstance(padding, str):
        check_choice("padding", padding, ("same", "valid"))
        if padding == "valid":
            return [0, 0, 0, 0]
        if max(stride) > 1:
            raise ArgumentError("padding='same' is not supported for strided convolutions "
                                f"(stride={tuple(stride)})")
        pads = []
        for k, d in zip(kernel_size, dilation):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return pads
    ph, pw = _pair("padding", padding, 0)
    return [ph, ph, pw, pw]


def check_conv_tensors(input: Tensor, weight: Tensor, bias: Tensor | None, groups: int,
                       weight_layout: str) -> None:
    """What a convolution and a transposed one check alike: tensors of one
    floating dtype on one device, 4-D input and weight, positive int groups."""
    if not isinstance(weight, Tensor):
        raise ArgumentTypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    for name, t in (("input", input), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise ArgumentTypeError(f"{name} must be floating point, got {t.dtype}")
        if t.dtype != input.dtype:
            raise ArgumentTypeError(f"input ({input.dtype}) and {name} ({t.dtype}) must have "
                                    "the same dtype")
        if t.device != input.device:
            raise ArgumentError(f"input is on {input.device} but {name} is on {t.device}")
    if input.dim() != 4:
        raise ArgumentError(f"input must be (N, C, H, W) or (C, H, W), got shape "
                            f"{tuple(input.shape)}")
    if weight.dim() != 4:
        raise ArgumentError(f"weight must be {weight_layout}, got shape {tuple(weight.shape)}")
    groups = check_int("groups", groups, minimum=1, maximum=MAX_INT32)
    if weight.shape[0] == 0:
        raise ArgumentError(f"weight {weight_layout} has no channels along dim 0, got shape "
                            f"{tuple(weight.shape)}")
    if input.shape[0] * input.shape[1] and 0 in input.shape[2:]:
        raise ArgumentError("input must have a non-zero height and width unless its batch or "
                            f"channels are empty, got shape {tuple(input.shape)}")
    if 0 in weight.shape[2:]:
        raise ArgumentError(f"weight must have a non-empty kernel, got shape {tuple(weight.shape)}")
    return groups


def _check_tensors(input: Tensor, weight: Tensor, bias: Tensor | None, groups) -> int:
    """Checks, and returns groups as an int."""
    groups = check_conv_tensors(input, weight, bias, groups, "(C_out, C_in / groups, KH, KW)")
    if weight.shape[0] % groups:
        raise ArgumentError(f"groups={groups} must divide the output channels "
                            f"{weight.shape[0]} (weight shape {tuple(weight.shape)})")
    if input.shape[1] != weight.shape[1] * groups:
        raise ArgumentError(
            f"weight of shape {tuple(weight.shape)} with groups={groups} expects "
            f"{weight.shape[1] * groups} input channels, got input of shape "
            f"{tuple(input.shape)} with {input.shape[1]}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ArgumentError(f"bias must have shape ({weight.shape[0]},), got "
                            f"{tuple(bias.shape)}")
    return groups


def check_geometry(input_hw, kernel_hw, stride, pads, dilation) -> None:
    """The padded input and the dilated kernel fit the kernels' 32-bit pixel
    arithmetic (always true for real images; absurd values are refused)."""
    for axis, (size, k, d, before, after) in enumerate(zip(input_hw, kernel_hw, dilation,
                                                           pads[0::2], pads[1::2])):
        if size + before + after > MAX_INT32 or d * (k - 1) + 1 > MAX_INT32:
            raise ArgumentError(
                f"input size {tuple(input_hw)} with padding {pads} and dilated kernel "
                f"{d * (k - 1) + 1} along axis {axis} exceed 2^31 - 1")


# 2^31 less a margin: a tile's pixel indices (program * BLOCK_M + lane, past
# the last pixel for the masked lanes of the last tile) must not wrap int32
MAX_PIXELS = 2**31 - 2**16


def check_pixel_count(name: str, count: int) -> None:
    """The kernels index pixels (N*H*W) with 32-bit integers; element
    offsets are 64-bit, so it is the pixel count, not the tensor size, that
    is bounded."""
    if count > MAX_PIXELS:
        raise ArgumentError(f"{name} has {count} pixels (N*H*W); the convolution kernels "
                            f"support up to 2^31 - 2^16 (tensors past 2^31 elements are fine)")


def prepare_inputs(input, weight, bias):
    """(input, weight, bias, unbatched): an unbatched (C, H, W) input gets a
    batch dim, and autocast's casts are applied, as ATen does for convs."""
    if not isinstance(input, Tensor):
        raise ArgumentTypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    unbatched = input.dim() == 3
    if unbatched:
        input = input.unsqueeze(0)
    return (*_autocast(input, weight, bias), unbatched)


# Read once at import: torch.compile (torch <= 2.11) cannot trace
# torch.amp.is_autocast_available, while a set lookup traces.
_AUTOCAST_DEVICES = frozenset(
    d for d in ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "maia", "xla", "privateuseone")
    if torch.amp.is_autocast_available(d))


def _autocast(*tensors):
    """ATen's autocast policy for conv2d: float16/32 inputs go to the
    autocast dtype (float64 stays)."""
    device = tensors[0].device.type
    if device not in _AUTOCAST_DEVICES or not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.dtype in (torch.float32, torch.float16,
                                                              torch.bfloat16) else t
                 for t in tensors)


# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------
def atrous_conv2d(input: Tensor, weight: Tensor, bias: Tensor | None = None,
                  stride: int | tuple[int, int] = 1,
                  padding: int | tuple[int, int] | str = 0,
                  dilation: int | tuple[int, int] = 1, groups: int = 1, *,
                  activation: str | None = None) -> Tensor:
    """2-D convolution with ``F.conv2d``'s signature and results, tuned for
    dilation (see the module docstring for shapes and conventions).

    Args:
        input: ``(N, C_in, H, W)`` or ``(C_in, H, W)``.
        weight: ``(C_out, C_in / groups, KH, KW)``.
        bias: ``(C_out,)`` or None.
        stride, dilation: int or pair, >= 1.
        padding: int, pair, ``'same'`` or ``'valid'``.
        groups: divides C_in and C_out (``groups == C_in`` is depthwise).
        activation: ``None`` or ``'relu'``, fused into the store (after the
            bias); its gradient is applied before the backward kernels.
    Returns:
        ``(N, C_out, OH, OW)`` (or ``(C_out, OH, OW)``) in the input's dtype
        and memory format (channels_last also when only the weight is, as
        in ATen). With ``C_in = 0`` every output is its bias (or 0), where
        F.conv2d returns a tensor with no channels.
    """
    refuse_forward_ad("atrous_conv2d", input, weight, bias)
    input, weight, bias, unbatched = prepare_inputs(input, weight, bias)
    groups = _check_tensors(input, weight, bias, groups)
    check_choice("activation", activation, ACTIVATIONS)
    stride = _pair("stride", stride, 1)
    dilation = _pair("dilation", dilation, 1)
    pads = resolve_padding(padding, weight.shape[-2:], stride, dilation)
    check_geometry(input.shape[-2:], weight.shape[-2:], stride, pads, dilation)
    OH, OW = conv_output_size(input.shape[-2:], weight.shape[-2:], stride, pads, dilation)
    if OH <= 0 or OW <= 0:
        raise ArgumentError(
            f"output size {OH}x{OW} is too small: input {tuple(input.shape[-2:])}, padding "
            f"{pads}, dilated kernel {[d * (k - 1) + 1 for d, k in zip(dilation, weight.shape[-2:])]}, "
            f"stride {stride}")
    check_pixel_count("input", input.shape[0] * input.shape[2] * input.shape[3])
    check_pixel_count("output", input.shape[0] * OH * OW)
    relu = activation == "relu"
    if input.shape[1] == 0:
        out = _no_input_channels(input, weight, bias, (OH, OW), relu)
    elif _dispatch.uses_native(input):
        out = _native_conv2d(input, weight, bias, stride, padding, pads, dilation, groups, relu)
    else:
        out = _conv2d(kernel_operand(input, weight), weight, bias, stride, pads, dilation,
                      groups, relu)
    return out.squeeze(0) if unbatched else out


def _native_conv2d(input, weight, bias, stride, padding, pads, dilation, groups, relu):
    """ATen's F.conv2d (off the GPU): the same numbers and its own autograd.
    Uneven pads only come from padding='same', which ATen takes as is."""
    symmetric = pads[0] == pads[1] and pads[2] == pads[3]
    out = F.conv2d(input, weight, bias, stride, (pads[0], pads[2]) if symmetric else padding,
                   dilation, groups)
    return F.relu(out) if relu else out


def _no_input_channels(input, weight, bias, out_hw, relu):
    """C_in = 0: every output is its bias (or 0). (F.conv2d returns a tensor
    with no channels here; segops returns the (N, C_out, OH, OW) that the
    convolution's definition gives.) The empty input and weight join the
    graph through a zero term, so autograd gives them (empty) gradients."""
    out = input.new_zeros((input.shape[0], weight.shape[0], *out_hw)) \
        + 0 * (input.sum() + weight.sum())
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return in_format(out.relu() if relu else out, conv_memory_format(input, weight))


# graph leaves for torch.fx.symbolic_trace (see segops/ops/__init__.py)
torch.fx.wrap("atrous_conv2d")
