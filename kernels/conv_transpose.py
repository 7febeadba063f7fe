"""Transposed 2-D convolution. Its forward is a convolution's input gradient,
so the general case runs ``conv._conv2d_bwd_input_kernel`` (stride-residue
gather: no zero insertion, only the taps that land on each residue class),
and its backward runs the convolution kernels (grad_input is an ordinary
strided convolution of the output gradient, grad_weight the convolution's
weight gradient with the roles of input and gradient swapped).

One case gets its own kernel: kernel == stride, no padding, output padding
or dilation (U-Net's and Mask R-CNN's 2x2 stride-2 up-convolutions). Then
every output pixel receives exactly one tap and the whole layer is one GEMM,
X (N*H*W, C_in) @ W (C_in, KH*KW*C_out), whose columns are scattered by the
store into their (r, c) position of each KHxKW output block: the pixel
shuffle is fused into the store. The weight is read as the matrix it is in
memory, so both operands are copied asynchronously (cp.async, 16 bytes), and
the column order follows the output's layout so that stores are 16-byte
vectors too:

* channels_last output: columns (r, c, co), one tap (r, c) per program, so
  each output pixel's channels are one contiguous run of the tile. The
  weight's co axis is contiguous for a channels_last weight (what
  ``model.to(memory_format=torch.channels_last)`` gives); any other weight
  is read from one ci-contiguous copy (C_in*C_out*KH*KW elements per call).
* NCHW output: columns (co, r, c), the memory order of a default weight,
  read in place; the epilogue turns the [pixels, (co, r, c)] tile into
  [(co, r), (pixels, c)], whose rows are runs of consecutive output x
  positions (16-byte stores where the output width is a multiple of 16;
  coalesced narrower ones otherwise). Kernel sizes the reordering cannot
  tile (not powers of two, or more than 16 taps) take the channels_last
  order into a channels_last buffer copied into the output.

NCHW inputs are read through one channels_last copy (the A tile needs
contiguous channels), like the convolution kernels'.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._format import conv_memory_format
from .._geometry import conv_transpose_output_size as output_size
from . import conv
from ._gemm import (
    bias_vector,
    channels_last_operand,
    channels_last_output,
    fill_channels,
    gemm_weight,
    launch,
    mma,
    precision,
    tune_bucket,
)
from ._layout import cdiv, check_grid, empty


@triton.jit
def _conv_transpose_k_eq_s_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    N, C_in, H, W, C_out,
    sxn, sxc, sxh, sxw, swi, swo, swh, sww, syn, syc, syh, syw, tune_pixels,
    KH: tl.constexpr, KW: tl.constexpr, TAP_MAJOR: tl.constexpr, FLAT_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, ALLOW_TF32: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
):
    """y (N, C_out*g, H*KH, W*KW) from x (N, C_in*g, H, W) (channel axis
    contiguous); C_in and C_out per group (program axis 1). The GEMM's rows
    are input pixels m = (n, h, w), its columns one (co, r, c) each;
    TAP_MAJOR picks how a program's BLOCK_N columns are laid out:

    * TAP_MAJOR (the output's channel axis contiguous: channels_last): the
      program's columns are one tap (r, c), a scalar, and BLOCK_N channels
      co. The weight column is co*swo + (r*swh + c*sww), so the B tile is
      contiguous along co (swo == 1: a channels_last weight) or along ci
      (swi == 1: the launcher's K-major copy), and each output pixel's
      channels are one contiguous run: vector stores.
    * otherwise (NCHW output): columns j = (co*KH + r)*KW + c, the order of a
      contiguous weight's (co, r, c) axes, so with FLAT_WEIGHT the B tile is
      the contiguous row segment w[ci, j0:j0+BLOCK_N]. The epilogue
      reorders the [pixels, (co, r, c)] tile into [(co, r), (pixels, c)],
      whose rows are output rows: for consecutive pixels of an image row the
      (pixel, c) pairs are consecutive output x positions, which the store
      writes as vectors.
    """
    pid = tl.program_id(0)
    group = tl.program_id(1)
    M = N * H * W
    ci0 = group * C_in
    if TAP_MAJOR:
        tiles_n = tl.cdiv(C_out, BLOCK_N)
        per_m = KH * KW * tiles_n
        pid_m = pid // per_m
        tap = (pid % per_m) // tiles_n
        r = tap // KW
        c = tap % KW
        co = (pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = co < C_out
        b_cols = w_ptr + co.to(tl.int64) * swo + r.to(tl.int64) * swh + c.to(tl.int64) * sww
    else:
        cols = C_out * (KH * KW)
        tiles_n = tl.cdiv(cols, BLOCK_N)
        pid_m = pid // tiles_n
        offs_n = (pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < cols
        co = offs_n // (KH * KW)
        if FLAT_WEIGHT:  # the weight's (co, r, c) axes are one contiguous run
            b_cols = w_ptr + offs_n.to(tl.int64)
        else:
            b_cols = (w_ptr + co.to(tl.int64) * swo + ((offs_n // KW) % KH).to(tl.int64) * swh
                      + (offs_n % KW).to(tl.int64) * sww)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = offs_m < M
    n = offs_m // (H * W)
    h = (offs_m % (H * W)) // W
    w = offs_m % W
    a_rows = x_ptr + n.to(tl.int64) * sxn + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw

    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for k0 in range(0, C_in, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < C_in
        ci = (ci0 + offs_k).to(tl.int64)
        a = tl.load(a_rows[:, None] + ci[None, :] * sxc, mask=mmask[:, None] & kmask[None, :],
                    other=0.0)
        b = tl.load(b_cols[None, :] + ci[:, None] * swi, mask=kmask[:, None] & nmask[None, :],
                    other=0.0)
        acc = mma(acc, a, b, ALLOW_TF32, UPCAST)

    channel = group * C_out + co
    if HAS_BIAS:
        acc += tl.load(b_ptr + channel, mask=nmask, other=0.0).to(ACC)[None, :]
    out = acc.to(y_ptr.dtype.element_ty)
    if TAP_MAJOR:
        ptrs = (y_ptr + n.to(tl.int64)[:, None] * syn + channel.to(tl.int64)[None, :] * syc
                + (h * KH + r).to(tl.int64)[:, None] * syh
                + (w * KW + c).to(tl.int64)[:, None] * syw)
        tl.store(ptrs, out, mask=mmask[:, None] & nmask[None, :])
    else:
        # [m, (co, r, c)] -> [(co, r), (m, c)]: row (co, r) of the tile is
        # output row h*KH + r of channel co, its columns (m, c) the output x
        # positions w*KW + c of the tile's pixels
        CO_TILE: tl.constexpr = BLOCK_N // (KH * KW)
        out = tl.reshape(out, [BLOCK_M, CO_TILE, KH, KW])
        out = tl.reshape(tl.permute(out, (1, 2, 0, 3)), [CO_TILE * KH, BLOCK_M * KW])
        rows = tl.arange(0, CO_TILE * KH)
        co_out = (pid % tiles_n) * CO_TILE + rows // KH
        # g = m*KW + c counts output x positions of the image rows in order:
        # x = g % (W*KW), image row n*H + h = g // (W*KW)
        g = pid_m * (BLOCK_M * KW) + tl.arange(0, BLOCK_M * KW)
        image_row = g // (W * KW)
        oy = (image_row % H) * KH
        ptrs = (y_ptr + (image_row // H).to(tl.int64)[None, :] * syn
                + (group * C_out + co_out).to(tl.int64)[:, None] * syc
                + (oy[None, :] + rows[:, None] % KH).to(tl.int64) * syh
                + (g % (W * KW)).to(tl.int64)[None, :] * syw)
        tl.store(ptrs, out, mask=(co_out < C_out)[:, None] & (g < M * KW)[None, :])


def is_one_gemm(kernel_size, stride, padding, output_padding, dilation) -> bool:
    """kernel == stride, no padding, output padding or dilation."""
    return (tuple(kernel_size) == tuple(stride) and not any(padding)
            and not any(output_padding) and tuple(dilation) == (1, 1))


def conv_transpose2d_forward(x, w, bias, stride, padding, output_padding, dilation,
                             groups: int, *, config: dict | None = None) -> torch.Tensor:
    """y = conv_transpose2d(x, w) + bias; w is (C_in, C_out / groups, KH, KW).
    The output is channels_last when x or w is (ATen's rule)."""
    KH, KW = w.shape[-2:]
    out_hw = output_size(x.shape[-2:], (KH, KW), stride, padding, output_padding, dilation)
    memory_format = conv_memory_format(x, w)
    depthwise = groups > 1 and w.shape[1] == 1  # the gather has a direct kernel for it
    if depthwise or not is_one_gemm((KH, KW), stride, padding, output_padding, dilation):
        return conv.conv_transpose_gather(x, w, bias, out_hw, stride,
                                          [padding[0], padding[0], padding[1], padding[1]],
                                          dilation, groups, memory_format, config=config)
    N, C_in_total, H, W = x.shape
    C_in, C_out = C_in_total // groups, w.shape[1]
    y = empty((N, C_out * groups, *out_hw), dtype=x.dtype, device=x.device,
              memory_format=memory_format)
    if y.numel() == 0:
        return y
    if C_in == 0:
        fill_channels(y, bias)
        return y
    M, taps = N * H * W, KH * KW
    # NCHW output: the (co, r, c) column order and the reordering epilogue,
    # for the kernel sizes it can tile (powers of two, KH*KW <= 16, the
    # smallest BLOCK_N); channels_last output (or another kernel size,
    # through a channels_last buffer copied into y): one tap per program
    tap_major = (y.stride(1) == 1 or not _reorderable(KH, KW)
                 or (config is not None and config["BLOCK_N"] < taps))
    if tap_major:
        def grid(meta):
            return (cdiv(M, meta["BLOCK_M"]) * taps * cdiv(C_out, meta["BLOCK_N"]),
                    groups)
    else:
        def grid(meta):
            return (cdiv(M, meta["BLOCK_M"]) * cdiv(C_out * taps, meta["BLOCK_N"]),
                    groups)

    check_grid(grid)
    x, result = channels_last_operand(x), y
    if tap_major:
        y = channels_last_output(y)
    constexprs = dict(HAS_BIAS=bias is not None, **precision(x))
    w, flat = _weight_operand(w, tap_major, constexprs["ALLOW_TF32"])
    args = (x, w, bias_vector(bias, w), y, N, C_in, H, W, C_out,
            *x.stride(), *w.stride(), *y.stride(), tune_bucket(M))
    constexprs.update(KH=KH, KW=KW, TAP_MAJOR=tap_major, FLAT_WEIGHT=flat)
    launch(_conv_transpose_k_eq_s_kernel, grid, args, constexprs, config, M,
           C_out if tap_major else C_out * taps, C_in, x.device, _KEY)
    return result.copy_(y) if y is not result else y


def _reorderable(KH: int, KW: int) -> bool:
    """Whether the NCHW epilogue can reorder the tile: KH and KW powers of
    two, KH*KW within the smallest BLOCK_N (16)."""
    return KH & (KH - 1) == 0 and KW & (KW - 1) == 0 and KH * KW <= 16


def _is_flat(w: torch.Tensor) -> bool:
    """w[ci, co, r, c] at ci*stride(0) + (co*KH + r)*KW + c: the (co, r, c)
    axes are one contiguous run (a default weight, or a channel slice)."""
    _, C_out, KH, KW = w.shape
    return all(size == 1 or stride == expected for size, stride, expected in
               zip((C_out, KH, KW), w.stride()[1:], (KH * KW, KW, 1)))


def _weight_operand(w: torch.Tensor, tap_major: bool, allow_tf32: bool):
    """(the weight the kernel reads, FLAT_WEIGHT). The B tile must be
    contiguous along one axis for asynchronous 16-byte copies: along co
    (TAP_MAJOR with a channels_last weight), along the flat (co, r, c) run
    (NCHW with a default weight), else along ci, which one small copy of the
    weight (C_in x C_out x KH x KW elements, against the activations'
    N x (C_in + 4 C_out) x H x W) makes; TF32 always reads ci-contiguous
    tiles (Triton transposes others through 4-byte loads)."""
    if allow_tf32:
        return gemm_weight(w, 0), False
    if tap_major:
        return gemm_weight(w), False
    if _is_flat(w):
        return w, True
    return gemm_weight(w, 0), False


_KEY = ["tune_pixels", "sxc", "C_in", "C_out", "KH", "KW", "TAP_MAJOR"]
