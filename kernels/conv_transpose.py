"""Transposed 2-D convolution. Its forward is a convolution's input gradient,
so the general case runs ``conv._conv2d_bwd_input_kernel`` (stride-residue
gather: no zero insertion, only the taps that land on each residue class),
and its backward runs the convolution kernels (grad_input is an ordinary
strided convolution of the output gradient, grad_weight the convolution's
weight gradient with the roles of input and gradient swapped).

One case gets its own kernel: kernel == stride, no padding, no dilation
(U-Net's and Mask R-CNN's 2x2 stride-2 up-convolutions). Then every output
pixel receives exactly one tap and the whole layer is one GEMM,
X (N*H*W, C_in) @ W (C_in, C_out*KH*KW), whose columns are scattered by the
store into their (r, c) position of each KHxKW output block: the pixel
shuffle is fused into the store.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._format import memory_format_of
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
from ._layout import check_grid, empty


@triton.jit
def _conv_transpose_k_eq_s_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    N, C_in, H, W, C_out, KH, KW,
    sxn, sxc, sxh, sxw, swi, swo, swh, sww, syn, syc, syh, syw, tune_pixels,
    HAS_BIAS: tl.constexpr, FLAT_COLUMNS: tl.constexpr, ALLOW_TF32: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    """y (N, C_out*g, H*KH, W*KW) from x (N, C_in*g, H, W); C_in and C_out
    per group (program axis 1). Columns j of the GEMM are (co, r, c) with
    j = (co*KH + r)*KW + c. FLAT_COLUMNS: the weight's (co, r, c) axes are
    contiguous (a default weight), so column j sits at offset j and the B
    tile loads as vectors (through co*swo + r*swh + c*sww the compiler
    cannot see that)."""
    pid = tl.program_id(0)
    group = tl.program_id(1)
    cols = C_out * KH * KW
    tiles_n = tl.cdiv(cols, BLOCK_N)
    offs_m = (pid // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < N * H * W
    nmask = offs_n < cols
    n = offs_m // (H * W)
    h = (offs_m % (H * W)) // W
    w = offs_m % W
    co = offs_n // (KH * KW)
    r = (offs_n % (KH * KW)) // KW
    c = offs_n % KW
    a_rows = x_ptr + n.to(tl.int64) * sxn + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw
    if FLAT_COLUMNS:
        b_cols = w_ptr + offs_n.to(tl.int64)
    else:
        b_cols = w_ptr + co.to(tl.int64) * swo + r * swh + c * sww
    ci0 = group * C_in

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
    oh = h[:, None] * KH + r[None, :]
    ow = w[:, None] * KW + c[None, :]
    ptrs = (y_ptr + n.to(tl.int64)[:, None] * syn + channel.to(tl.int64)[None, :] * syc
            + oh.to(tl.int64) * syh + ow.to(tl.int64) * syw)
    tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


def is_one_gemm(kernel_size, stride, padding, output_padding, dilation) -> bool:
    """kernel == stride, no padding, output padding or dilation."""
    return (tuple(kernel_size) == tuple(stride) and not any(padding)
            and not any(output_padding) and tuple(dilation) == (1, 1))


def conv_transpose2d_forward(x, w, bias, stride, padding, output_padding, dilation,
                             groups: int, *, config: dict | None = None) -> torch.Tensor:
    """y = conv_transpose2d(x, w) + bias; w is (C_in, C_out / groups, KH, KW).
    The output keeps x's memory format."""
    KH, KW = w.shape[-2:]
    out_hw = output_size(x.shape[-2:], (KH, KW), stride, padding, output_padding, dilation)
    memory_format = memory_format_of(x)
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
    M, cols = N * H * W, C_out * KH * KW

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(cols, meta["BLOCK_N"]), groups)

    check_grid(grid)
    x, y, result = channels_last_operand(x), channels_last_output(y), y
    constexprs = dict(HAS_BIAS=bias is not None, **precision(x))
    w = gemm_weight(w, 0) if constexprs["ALLOW_TF32"] else w  # K: input channels
    flat = w.stride(1) == KH * KW and w.stride(2) == KW and w.stride(3) == 1
    args = (x, w, bias_vector(bias, w), y, N, C_in, H, W, C_out, KH, KW,
            *x.stride(), *w.stride(), *y.stride(), tune_bucket(M))
    launch(_conv_transpose_k_eq_s_kernel, grid, args, dict(constexprs, FLAT_COLUMNS=flat),
           config, M, cols, C_in, x.device, _KEY)
    return result.copy_(y) if y is not result else y


_KEY = ["tune_pixels", "sxc", "C_in", "C_out", "KH", "KW"]
