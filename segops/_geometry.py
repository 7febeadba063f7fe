"""Output sizes and padding conversions of the convolutions: one definition
that the ops, the kernels' launchers and the references all import (pure
Python, no torch ops, no triton)."""
from __future__ import annotations

import math


def conv_output_size(input_hw, kernel_size, stride, padding, dilation) -> tuple[int, int]:
    """(OH, OW) of F.conv2d; ``padding`` is (top, bottom, left, right)."""
    H, W = input_hw
    OH = (H + padding[0] + padding[1] - dilation[0] * (kernel_size[0] - 1) - 1) // stride[0] + 1
    OW = (W + padding[2] + padding[3] - dilation[1] * (kernel_size[1] - 1) - 1) // stride[1] + 1
    return OH, OW


def conv_transpose_output_size(input_hw, kernel_size, stride, padding, output_padding,
                               dilation) -> tuple[int, int]:
    """(OH, OW) of F.conv_transpose2d; ``padding`` is the symmetric (pad_h, pad_w)."""
    return tuple((size - 1) * s - 2 * p + d * (k - 1) + op + 1 for size, k, s, p, op, d in
                 zip(input_hw, kernel_size, stride, padding, output_padding, dilation))


def four_sided(padding) -> list[int]:
    """Symmetric (pad_h, pad_w) as (top, bottom, left, right)."""
    return [padding[0], padding[0], padding[1], padding[1]]


def residue_candidates(stride: int, dil: int, taps: int) -> int:
    """How many distinct residues mod ``stride`` the taps t*dil of a
    convolution's kernel fall on: t and t + stride/gcd(stride, dil) land on
    the same one, so taps 0..count-1 give them all, each once."""
    return min(taps, stride // math.gcd(stride, dil))


def candidate_residue(t: int, stride: int, pad: int, dil: int) -> int:
    """The residue of the input rows that tap t reaches in a convolution's
    input gradient: rows i with (i + pad - t*dil) a multiple of ``stride``."""
    return (t * dil - pad) % stride


def reached_residues(length: int, stride: int, pad: int, dil: int, taps: int) -> list[int]:
    """The residues r in [0, min(stride, length)) of the input rows (i %
    stride == r) that at least one tap reaches. The other residue classes
    get no contribution at all (a zero gradient), so no program runs for
    them."""
    hit = {candidate_residue(t, stride, pad, dil)
           for t in range(residue_candidates(stride, dil, taps))}
    return sorted(r for r in hit if r < min(stride, length))


def tap_class_bounds(out_len: int, in_len: int, taps: int, stride: int, pad: int,
                     dil: int) -> tuple[int, ...]:
    """The output positions along one axis where the set of in-bounds taps
    changes, with 0 and ``out_len``: between consecutive bounds every
    position keeps the same taps (tap t reads o*stride - pad + t*dil, inside
    [0, in_len) for o in [ceil((pad - t*dil)/stride), floor((in_len - 1 +
    pad - t*dil)/stride)]). ASPP's d24 on 65: (0, 24, 41, 65)."""
    bounds = {0, out_len}
    for t in range(taps):
        bounds.update(tap_interval(out_len, in_len, t, stride, pad, dil))
    return tuple(sorted(bounds))


def tap_interval(out_len: int, in_len: int, t: int, stride: int, pad: int,
                 dil: int) -> tuple[int, int]:
    """[first, end): the output positions along one axis whose tap t reads
    inside the input (o*stride - pad + t*dil in [0, in_len)), clipped to
    [0, out_len]; first == end when there are none."""
    first = min(max(-((t * dil - pad) // stride), 0), out_len)
    end = min(max((in_len - 1 + pad - t * dil) // stride + 1, first), out_len)
    return first, end  # first <= end, as first <= out_len
