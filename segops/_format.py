"""Memory-format rules the ops share (pure torch, so the kernels, the fake
kernels and the references agree without importing triton).

The format of a tensor is ATen's ``suggest_memory_format``: decided by the
order of its strides, not by density, so a channel slice of a channels_last
tensor is channels_last, and a tensor with one channel or 1x1 maps is
whichever layout its strides were made for. Outputs are then laid out with
exactly the strides ``torch.empty(..., memory_format=...)`` gives, as ATen's
are: the next ATen op reads the format back from them.
"""
from __future__ import annotations

import torch

# the axes of an (N, C, H, W) tensor from the fastest-moving in channels_last
_CHANNELS_LAST_ORDER = (1, 3, 2, 0)


def is_channels_last(t: torch.Tensor) -> bool:
    """ATen's ``is_channels_last_strides_2d`` on a 4-D strided tensor: the
    strides grow along C, W, H, N (a size-1 axis's stride counts, as in ATen).
    Ambiguous strides (a channel stride of 0, an empty axis, an (N, 1, 1, 1)
    tensor whose strides are all equal) are contiguous, as in ATen."""
    if t.dim() != 4 or t.layout != torch.strided:
        return False
    sizes, strides = t.shape, t.stride()
    if strides[1] == 0:
        return False
    smallest = 0
    for axis in _CHANNELS_LAST_ORDER:
        if sizes[axis] == 0 or strides[axis] < smallest:
            return False
        if axis == 0 and smallest == strides[1]:
            return False
        smallest = strides[axis] * sizes[axis]  # sizes[axis] >= 1 here
    return True


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """The format an op's output takes from its input ``t``."""
    return torch.channels_last if is_channels_last(t) else torch.contiguous_format


def conv_memory_format(input: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """A convolution's output and gradients: channels_last when the input or
    the weight is (ATen's rule on the CPU and for cuDNN's 16/32-bit
    convolutions: a model moved to channels_last runs channels_last on NCHW
    inputs)."""
    if is_channels_last(input) or is_channels_last(weight):
        return torch.channels_last
    return torch.contiguous_format


def format_strides(shape, memory_format: torch.memory_format) -> tuple[int, ...]:
    """The strides ``torch.empty(shape, memory_format=memory_format)`` has
    (ATen's: contiguous strides count an empty axis as 1, channels_last
    strides do not)."""
    if memory_format == torch.channels_last:
        N, C, H, W = shape
        return (H * W * C, 1, W * C, C)
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def in_format(t: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """``t`` dense in ``memory_format`` with exactly that format's strides: a
    copy only when ``t`` is not dense in it. A tensor already dense whose
    size-1 (or empty) axes have other strides is re-strided, not copied (those
    strides address nothing, but the next op reads its format from them)."""
    t = t.contiguous(memory_format=memory_format)
    strides = format_strides(t.shape, memory_format)
    return t if t.stride() == strides else t.as_strided(t.shape, strides)


def empty_in_format(like: torch.Tensor, shape, memory_format: torch.memory_format) -> torch.Tensor:
    """An uninitialised ``shape`` tensor of ``like``'s dtype and device, with
    ``memory_format``'s strides (what the fake kernels promise)."""
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=memory_format)
