"""2-D convolution (any stride, padding, dilation and groups) as implicit
GEMM, forward and backward. Tuned for dilated (atrous) convolutions.

Three kernels, each a GEMM whose operands are gathered on the fly (no im2col
buffer, no zero insertion):

* ``_conv2d_fwd_kernel``: y = conv(x, w). Rows (M) are output pixels
  N*OH*OW, columns output channels of one group, the reduction runs over
  taps (kh, kw) and input channels. Dilation and stride only change the
  gather addresses; zero padding is a load mask. A tap whose rows all fall
  in the padding for this tile is skipped (at dilation 36 on a 65x65 map
  most taps of a 3x3 kernel read only padding). Bias and ReLU are fused into
  the store. When the output has fewer tiles than two waves (ASPP at output
  stride 16), the reduction is split (``forward_splits``): each split writes
  partials in the accumulation dtype (fp32; fp64 for fp64 inputs) and
  ``_split_sum_kernel`` adds them in split order (the same bits every run),
  then bias and ReLU.
* ``_conv2d_bwd_input_kernel``: dx = conv_transpose(dy, w), which is also
  the forward of a transposed convolution (kernels/conv_transpose.py). By
  stride residue: the input pixels with ih % stride_h == rh (and the same
  for columns) are reached only by the taps with
  (rh + pad_h - kh * dil_h) % stride_h == 0, so each program takes one
  residue class and loops over just those taps: stride 2 does a quarter of
  the tap work a zero-inserted gradient would, and nothing is materialised.
* ``_conv2d_bwd_weight_kernel``: dw = sum over pixels of dy (x) x, one
  program per (output-channel tile, input-channel tile, tap, group, split):
  the pixel reduction is split (split-K) so small maps still fill the GPU;
  the splits write partials in the accumulation dtype that the launcher
  sums (deterministic). A tap sums only over the pixels it reads inside
  the input (a rectangle per tap).

Every tensor is addressed through its four strides, so NCHW, channels_last
and strided views share the code; int64 offsets, but in the grad_weight
loops, which use int32 when the launcher proves they fit (offset_type). fp32 inputs use
TF32 only when ``torch.backends.cudnn.allow_tf32`` allows it, like F.conv2d.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .._checks import accumulation_dtype
from .._format import conv_memory_format
from .._geometry import reached_residues, residue_candidates, tap_class_bounds, tap_interval
from .._geometry import conv_output_size as output_size
from ._gemm import (
    bias_vector,
    channels_last_operand,
    channels_last_output,
    fill_channels,
    gemm_weight,
    launch,
    mma,
    precision,
    tl_accumulation,
    tune_bucket,
)
from ._layout import (
    block_size,
    cdiv,
    check_grid,
    device_table,
    empty,
    offset_type,
    target_programs,
)
from ._math import divisor_magic, fast_div


# --------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------
@triton.jit
def _tap_block(acc, a_rows, a_tap, a_step, valid, b_cols, b_tap, b_step, offs_k, kmask, nmask,
               ALLOW_TF32: tl.constexpr, UPCAST: tl.constexpr):
    """acc += A @ B for one (tap, channel block): A[m, k] at a_rows[m] +
    a_tap + k*a_step (rows where ``valid``: the tap lands inside the map),
    B[k, n] at b_cols[n] + b_tap + k*b_step; masked elements read 0. The
    tap offsets are scalars: the per-row part of an address is computed
    once, outside the loop (as int64 products per row and tap, it was
    a third of the loop's instructions)."""
    a = tl.load(a_rows[:, None] + (a_tap + offs_k.to(tl.int64) * a_step)[None, :],
                mask=valid[:, None] & kmask[None, :], other=0.0)
    b = tl.load(b_cols[None, :] + (b_tap + offs_k.to(tl.int64) * b_step)[:, None],
                mask=kmask[:, None] & nmask[None, :], other=0.0)
    return mma(acc, a, b, ALLOW_TF32, UPCAST)


@triton.jit
def _next_step(kb, s, r, k_blocks, s_lo, s_hi):
    """The (channel block, column tap, row tap) after (kb, s, r) in the
    flattened loop: counters instead of a division per step."""
    kb += 1
    next_tap = kb == k_blocks
    kb = tl.where(next_tap, 0, kb)
    s = tl.where(next_tap, s + 1, s)
    next_row = s == s_hi
    return kb, tl.where(next_row, s_lo, s), tl.where(next_row, r + 1, r)


@triton.jit
def _tap_interval(first, last, dil, taps):
    """[t_lo, t_hi): the taps t in [0, taps) with first <= t * dil <= last
    (every operand of a division is kept non-negative: Triton's integer
    division truncates toward zero, like C, where the rule needs a floor)."""
    first = first.to(tl.int64)  # first + dil can pass 2^31
    last = last.to(tl.int64)
    t_lo = tl.where(first <= 0, 0, (tl.maximum(first, 0) + dil - 1) // dil)
    t_hi = tl.where(last < 0, 0, tl.minimum(tl.maximum(last, 0) // dil + 1, taps))
    return t_lo.to(tl.int32), tl.maximum(t_hi, t_lo).to(tl.int32)


@triton.jit
def _residue_taps(i_min, i_max, t0, period, pad, dil, stride, out_len, taps):
    """[j_lo, j_hi): the taps t0 + j*period of one stride residue class that
    can reach an output position in [0, out_len) from an input pixel in
    [i_min, i_max] (t*dil between i_min + pad - (out_len-1)*stride and
    i_max + pad)."""
    t_lo, t_hi = _tap_interval(i_min + pad - (out_len - 1) * stride, i_max + pad, dil, taps)
    j_lo = tl.where(t_lo <= t0, 0, (tl.maximum(t_lo - t0, 0) + period - 1) // period)
    j_hi = tl.where(t_hi <= t0, 0, (tl.maximum(t_hi - t0, 0) + period - 1) // period)
    return j_lo, tl.maximum(j_hi, j_lo)


@triton.jit
def _rows_of(length, residue, stride):
    """How many of 0..length-1 are congruent to ``residue`` mod ``stride``,
    without forming length + stride (which passes 2^31 for huge strides)."""
    return tl.where(residue < length, (length - 1 - residue) // stride + 1, 0)


@triton.jit
def _lane_range(values, mask):
    """(min, max) of the non-negative ``values`` over the lanes in ``mask``,
    and whether ``mask`` is empty (then (0, 0))."""
    lo = tl.min(tl.where(mask, values, 2147483647), axis=0)
    hi = tl.max(tl.where(mask, values, -1), axis=0)
    empty = hi < 0
    return tl.where(empty, 0, lo), tl.where(empty, 0, hi), empty


@triton.jit
def _split_pixels(offs, OH, OW):
    """Flat pixel index -> (n, row, column)."""
    n = offs // (OH * OW)
    rem = offs % (OH * OW)
    return n, rem // OW, rem % OW


@triton.jit
def _tap_rectangle(rect_ptr, tap):
    """Tap ``tap``'s row in the launcher's rectangle table (_tap_rectangles):
    the output pixels whose tap reads inside the input are rows
    [row0, row0 + area / width) x columns [col0, col0 + width) of each
    image, with the fast_div magic numbers of area and width."""
    rect = rect_ptr + tap * 8
    return (tl.load(rect), tl.load(rect + 1), tl.load(rect + 2), tl.load(rect + 3),
            tl.load(rect + 4), tl.load(rect + 5), tl.load(rect + 6), tl.load(rect + 7))


@triton.jit
def _rectangle_pixels(offs, row0, col0, width, area, area_mul, area_shift, width_mul,
                      width_shift):
    """Index into a tap's rectangle (all images) -> (n, row, column)."""
    n = fast_div(offs, area, area_mul, area_shift)
    rem = offs - n * area
    i = fast_div(rem, width, width_mul, width_shift)
    return n, row0 + i, col0 + rem - i * width


@triton.jit
def _class_of(offs, bounds_ptr, inner, scale, length):
    """(lo, hi): the class [lo, hi) of positions along an axis of ``length``
    split at the ``inner`` ascending bounds of the table, for offs in
    [lo * scale, hi * scale)."""
    lo = tl.zeros_like(offs)
    hi = tl.zeros_like(offs) + length
    for i in range(0, inner):
        bound = tl.load(bounds_ptr + i)
        past = offs >= bound * scale
        lo = tl.where(past, bound, lo)
        hi = tl.minimum(hi, tl.where(past, length, bound))
    return lo, hi


@triton.jit
def _grouped_pixels(offs, OH, OW, bounds_ptr, row_inner, col_inner):
    """Flat pixel index -> (n, row, column) with each image's pixels grouped
    by the taps they keep: the table holds the inner row bounds (row_inner
    of them, segops._geometry.tap_class_bounds without 0 and OH), then the
    inner column bounds; pixels run over row bands, then over the column
    classes inside a band (rectangles rows [r0, r1) x columns [c0, c1)),
    then row-major inside a rectangle. A tile then lies in one rectangle but
    at its edges, and the kernel's tap range skips the taps its pixels miss
    (at ASPP's d24 on 65^2 a fifth of the 3x3 taps' work; row-major tiles
    span every column class). No inner bounds is the plain row-major order."""
    n = offs // (OH * OW)
    rem = offs % (OH * OW)
    r0, r1 = _class_of(rem, bounds_ptr, row_inner, OW, OH)
    band = rem - r0 * OW  # inside the band: (r1 - r0) rows x OW columns
    height = r1 - r0
    c0, c1 = _class_of(band, bounds_ptr + row_inner, col_inner, height, OW)
    local = band - c0 * height
    width = tl.maximum(c1 - c0, 1)
    return n, r0 + local // width, c0 + local % width


@triton.jit
def _epilogue_store(acc, y_ptr, b_ptr, n, oh, ow, channels, mmask, cmask,
                    syn, syc, syh, syw, HAS_BIAS: tl.constexpr, RELU: tl.constexpr):
    if HAS_BIAS:
        bias = tl.load(b_ptr + channels, mask=cmask, other=0.0).to(acc.dtype)
        acc = acc + bias[None, :]
    if RELU:
        acc = tl.where(acc < 0, 0.0, acc)  # NaN stays NaN, as F.relu keeps it
    rows = n.to(tl.int64) * syn + oh.to(tl.int64) * syh + ow.to(tl.int64) * syw
    ptrs = y_ptr + rows[:, None] + channels.to(tl.int64)[None, :] * syc
    tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=mmask[:, None] & cmask[None, :])


# --------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------
@triton.jit(do_not_specialize=["tune_splits"])
def _conv2d_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, bounds_ptr,
    N, C_in, H, W, C_out, OH, OW, KH, KW,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, row_inner, col_inner,
    sxn, sxc, sxh, sxw, swo, swi, swh, sww, syn, syc, syh, syw, split_stride, tune_pixels,
    tune_splits,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr, ALLOW_TF32: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
):
    """C_in and C_out are per group; program axis 1 is the group, axis 2
    the split of the reduction (split-K): with S splits, split i takes the
    i-th of S equal runs of this tile's (tap, channel block) steps and
    writes its partial sum at y + i * split_stride (the launcher then sums
    the S partials in order, _split_sum_kernel). Pixels are ordered by the
    taps they keep (_grouped_pixels). ``tune_pixels`` and ``tune_splits``
    (S) only key the autotuner (see _gemm.tune_bucket): a split launch
    tunes its own tile."""
    pid = tl.program_id(0)
    group = tl.program_id(1)
    split = tl.program_id(2)
    tiles_n = tl.cdiv(C_out, BLOCK_N)
    offs_m = (pid // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < N * OH * OW
    nmask = offs_n < C_out
    n, oh, ow = _grouped_pixels(offs_m, OH, OW, bounds_ptr, row_inner, col_inner)
    co = group * C_out + offs_n
    # tap (r, s) reads row ih0 + r*dil_h, column iw0 + s*dil_w: the per-row
    # part of the address is fixed, the tap adds a scalar
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    x_rows = (x_ptr + n.to(tl.int64) * sxn + (group * C_in).to(tl.int64) * sxc
              + ih0.to(tl.int64) * sxh + iw0.to(tl.int64) * sxw)
    w_cols = w_ptr + co.to(tl.int64) * swo

    # the taps whose rows / columns can land inside the map for this tile's
    # pixels (the others read only padding: at dilation 36 on a 65x65 map
    # most of a 3x3 kernel), then one loop over (tap, channel block), so the
    # software pipeline runs across taps instead of restarting at each
    oh_min, oh_max, empty = _lane_range(oh, mmask)
    ow_min, ow_max, _ = _lane_range(ow, mmask)
    r_lo, r_hi = _tap_interval(pad_h - oh_max * stride_h, H - 1 + pad_h - oh_min * stride_h,
                               dil_h, KH)
    s_lo, s_hi = _tap_interval(pad_w - ow_max * stride_w, W - 1 + pad_w - ow_min * stride_w,
                               dil_w, KW)
    k_blocks = tl.cdiv(C_in, BLOCK_K)
    steps = tl.where(empty, 0, (r_hi - r_lo) * (s_hi - s_lo) * k_blocks)
    # this split's steps: [first, first + count) of the tile's steps
    per_split = tl.cdiv(steps, tl.num_programs(2))
    first = split * per_split
    count = tl.minimum(per_split, steps - first)  # <= 0: the loop runs no step
    taps_w = tl.maximum(s_hi - s_lo, 1)  # 0 only when steps is 0
    blocks = tl.maximum(k_blocks, 1)     # 0 only for C_in = 0 (the op returns before)
    kb = first % blocks
    r = r_lo + (first // blocks) // taps_w
    s = s_lo + (first // blocks) % taps_w
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for _ in range(0, count):
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = offs_k < C_in
        dh = r * dil_h
        dw = s * dil_w
        valid = mmask & (ih0 >= -dh) & (ih0 < H - dh) & (iw0 >= -dw) & (iw0 < W - dw)
        acc = _tap_block(acc, x_rows, dh.to(tl.int64) * sxh + dw.to(tl.int64) * sxw, sxc, valid,
                         w_cols, r * swh + s * sww, swi, offs_k, kmask, nmask, ALLOW_TF32, UPCAST)
        kb, s, r = _next_step(kb, s, r, k_blocks, s_lo, s_hi)
    _epilogue_store(acc, y_ptr + split.to(tl.int64) * split_stride, b_ptr, n, oh, ow, co,
                    mmask, nmask, syn, syc, syh, syw, HAS_BIAS, RELU)


@triton.jit
def _split_sum_kernel(
    part_ptr, b_ptr, y_ptr,
    M, C, OH, OW, splits, split_stride, syn, syc, syh, syw,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """y = sum of the forward's split-K partials, in split order (the same
    result every run), then bias and ReLU. part is (splits, M, C) with C
    contiguous: the pixels of y in rows."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mmask = offs_m < M
    cmask = offs_c < C
    ptrs = part_ptr + offs_m.to(tl.int64)[:, None] * C + offs_c[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    for _ in range(0, splits):
        acc += tl.load(ptrs, mask=mmask[:, None] & cmask[None, :], other=0.0)
        ptrs += split_stride
    n, oh, ow = _split_pixels(offs_m, OH, OW)
    _epilogue_store(acc, y_ptr, b_ptr, n, oh, ow, offs_c, mmask, cmask, syn, syc, syh, syw,
                    HAS_BIAS, RELU)


@triton.jit
def _nonfinite_extents_kernel(
    dy_ptr, ext_ptr, N, C, OH, OW, sdyn, sdyc, sdyh, sdyw,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, NONE: tl.constexpr,
):
    """ext[c] = min over the non-finite dy[:, c] of (row, -row, column,
    -column): the first and (negated) last row and column holding one,
    NONE where there is none (the launcher's fill). One atomic per channel
    and program, only where the tile holds a non-finite value."""
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pmask = offs_p < N * OH * OW
    cmask = offs_c < C
    n, oh, ow = _split_pixels(offs_p, OH, OW)
    rows = n.to(tl.int64) * sdyn + oh.to(tl.int64) * sdyh + ow.to(tl.int64) * sdyw
    g = tl.load(dy_ptr + rows[:, None] + offs_c.to(tl.int64)[None, :] * sdyc,
                mask=pmask[:, None] & cmask[None, :], other=0.0)
    if g.dtype != tl.float64:  # half types exactly in fp32 (the interpreter's bf16 NaN != NaN fails)
        g = g.to(tl.float32)
    bad = (g != g) | (tl.abs(g) == float("inf"))
    hit = cmask & (tl.max(bad.to(tl.int32), axis=0) > 0)
    ext = ext_ptr + offs_c * 4
    tl.atomic_min(ext, _least(bad, oh, NONE), mask=hit)
    tl.atomic_min(ext + 1, _least(bad, -oh, NONE), mask=hit)
    tl.atomic_min(ext + 2, _least(bad, ow, NONE), mask=hit)
    tl.atomic_min(ext + 3, _least(bad, -ow, NONE), mask=hit)


@triton.jit
def _least(bad, value, NONE: tl.constexpr):
    """Per column of ``bad`` (pixels x channels): the least ``value`` (one
    per pixel) over its set entries, NONE where none is set."""
    return tl.min(tl.where(bad, value[:, None], NONE), axis=0)


@triton.jit
def _poison_taps_kernel(
    w_ptr, ext_ptr, bounds_ptr, C, per_channel, taps,
    BLOCK_C: tl.constexpr, BLOCK_I: tl.constexpr,
):
    """w[c, i, tap] = NaN for every i where channel c has a non-finite dy
    outside the tap's rectangle (ext from _nonfinite_extents_kernel against
    bounds: row0, row_end, col0, col_end per tap). w is (C, per_channel,
    taps), contiguous; nothing is written elsewhere."""
    tap = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    first_row = tl.load(ext_ptr + offs_c * 4, mask=cmask, other=0)
    last_row = -tl.load(ext_ptr + offs_c * 4 + 1, mask=cmask, other=0)
    first_col = tl.load(ext_ptr + offs_c * 4 + 2, mask=cmask, other=0)
    last_col = -tl.load(ext_ptr + offs_c * 4 + 3, mask=cmask, other=0)
    outside = ((first_row < tl.load(bounds_ptr + tap * 4))
               | (last_row >= tl.load(bounds_ptr + tap * 4 + 1))
               | (first_col < tl.load(bounds_ptr + tap * 4 + 2))
               | (last_col >= tl.load(bounds_ptr + tap * 4 + 3)))
    poisoned = cmask & outside
    base = w_ptr + offs_c.to(tl.int64) * (per_channel * taps) + tap
    nan = tl.full([BLOCK_C, BLOCK_I], float("nan"), w_ptr.dtype.element_ty)
    for i0 in range(0, per_channel, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        tl.store(base[:, None] + offs_i.to(tl.int64)[None, :] * taps, nan,
                 mask=poisoned[:, None] & (offs_i < per_channel)[None, :])


# --------------------------------------------------------------------------
# grad_input (= transposed convolution forward)
# --------------------------------------------------------------------------
@triton.jit
def _conv2d_bwd_input_kernel(
    dy_ptr, w_ptr, b_ptr, dx_ptr, bounds_ptr,
    N, C_in, H, W, C_out, OH, OW, KH, KW,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, RES_W, period_h, period_w,
    row_inner, col_inner,
    sdyn, sdyc, sdyh, sdyw, swo, swi, swh, sww, sdxn, sdxc, sdxh, sdxw, tune_pixels,
    HAS_BIAS: tl.constexpr, ALLOW_TF32: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
):
    """dx (N, C_in, H, W) of y = conv(x, w) with y (N, C_out, OH, OW), per
    group (program axis 1) and stride residue class. The reduction runs
    over C_out. With HAS_BIAS, b (C_in * groups) is added: the
    transposed-convolution forward.

    Axis 0 is (residue, tile). Only the residues some tap reaches get
    programs: candidate (th, tw) is the residue that taps th, tw land on
    (``segops._geometry.candidate_residue``, distinct for th < RES_H); the
    launcher fills the classes no tap reaches."""
    pid = tl.program_id(0)
    group = tl.program_id(1)
    tiles_n = tl.cdiv(C_in, BLOCK_N)
    tiles = tl.cdiv(N * _rows_of(H, 0, stride_h) * _rows_of(W, 0, stride_w), BLOCK_M) * tiles_n
    residue = pid // tiles
    tile = pid % tiles
    # (t*dil - pad) mod stride with non-negative operands: Triton's %
    # truncates like C (the sign of the dividend), the rule needs Python's
    rh = (((residue // RES_W) * dil_h).to(tl.int64) + stride_h - pad_h % stride_h) % stride_h
    rw = (((residue % RES_W) * dil_w).to(tl.int64) + stride_w - pad_w % stride_w) % stride_w
    rh = rh.to(tl.int32)
    rw = rw.to(tl.int32)
    rows_h = _rows_of(H, rh, stride_h)  # 0 for a residue past the map (rh >= H)
    rows_w = _rows_of(W, rw, stride_w)
    offs_m = (tile // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (tile % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < N * rows_h * rows_w
    nmask = offs_n < C_in
    # a residue class can be empty (rh >= H): keep the divisions defined.
    # Along a stride-1 axis the pixels are grouped by the taps that reach
    # them, as in the forward (_grouped_pixels; no bounds along the others)
    n, i, j = _grouped_pixels(offs_m, tl.maximum(rows_h, 1), tl.maximum(rows_w, 1), bounds_ptr,
                              row_inner, col_inner)
    ih = rh + i * stride_h
    iw = rw + j * stride_w
    ci = group * C_in + offs_n
    # tap (r, s) of this residue class reads dy at row i + (rh + pad_h -
    # r*dil_h) / stride_h (an exact division) and the like for columns: the
    # per-row part of the address is fixed, the tap adds a scalar
    dy_rows = (dy_ptr + n.to(tl.int64) * sdyn + (group * C_out).to(tl.int64) * sdyc
               + i.to(tl.int64) * sdyh + j.to(tl.int64) * sdyw)
    w_cols = w_ptr + (group * C_out).to(tl.int64) * swo + offs_n.to(tl.int64) * swi

    # the taps of this residue class are th + j*period_h (th the candidate
    # index): step j over those that can reach an output row / column for
    # this tile's pixels, then one loop over (tap, channel block)
    th = residue // RES_W
    tw = residue % RES_W
    ih_min, ih_max, empty = _lane_range(ih, mmask)
    iw_min, iw_max, _ = _lane_range(iw, mmask)
    jh_lo, jh_hi = _residue_taps(ih_min, ih_max, th, period_h, pad_h, dil_h, stride_h, OH, KH)
    jw_lo, jw_hi = _residue_taps(iw_min, iw_max, tw, period_w, pad_w, dil_w, stride_w, OW, KW)
    k_blocks = tl.cdiv(C_out, BLOCK_K)
    steps = tl.where(empty, 0, (jh_hi - jh_lo) * (jw_hi - jw_lo) * k_blocks)
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    kb = tl.full([], 0, tl.int32)
    jh = jh_lo
    jw = jw_lo
    for _ in range(0, steps):
        r = th + jh * period_h
        s = tw + jw * period_w
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = offs_k < C_out
        dh = (rh + pad_h - r * dil_h) // stride_h
        dw = (rw + pad_w - s * dil_w) // stride_w
        valid = mmask & (i >= -dh) & (i < OH - dh) & (j >= -dw) & (j < OW - dw)
        acc = _tap_block(acc, dy_rows, dh.to(tl.int64) * sdyh + dw.to(tl.int64) * sdyw, sdyc,
                         valid, w_cols, r * swh + s * sww, swo, offs_k, kmask, nmask,
                         ALLOW_TF32, UPCAST)
        kb, jw, jh = _next_step(kb, jw, jh, k_blocks, jw_lo, jw_hi)
    _epilogue_store(acc, dx_ptr, b_ptr, n, ih, iw, ci, mmask, nmask, sdxn, sdxc, sdxh, sdxw,
                    HAS_BIAS, False)


# --------------------------------------------------------------------------
# grad_weight
# --------------------------------------------------------------------------
@triton.jit
def _conv2d_bwd_weight_kernel(
    dy_ptr, x_ptr, part_ptr, rect_ptr,
    N, C_in, H, W, C_out, OH, OW, KH, KW,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sdyn, sdyc, sdyh, sdyw, sxn, sxc, sxh, sxw, split_pixels, split_stride, tune_pixels,
    ALLOW_TF32: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr, OFFSET: tl.constexpr,
):
    """Partial dw over one split of the pixels, into part[split] of shape
    (C_out * groups, C_in, KH, KW), contiguous. Axis 0 is (tap, tile),
    axis 1 the group, axis 2 the split. A tap sums only over the pixels it
    reads inside the input (its rectangle, _tap_rectangle: at ASPP's d24
    on 65^2, 57% of the 3x3 taps' pixel work; what the skipped pixels give
    when their dy is not finite, the launcher adds: _poison). OFFSET
    is the type of the per-pixel
    offsets the loop computes (int32 when the launcher proved both tensors
    span less than 2^31 elements: a third of the loop's instructions were
    int64 products)."""
    group = tl.program_id(1)
    split = tl.program_id(2)
    tiles_n = tl.cdiv(C_in, BLOCK_N)
    tiles = tl.cdiv(C_out, BLOCK_M) * tiles_n
    tap = tl.program_id(0) // tiles
    pid = tl.program_id(0) % tiles
    r = tap // KW
    s = tap % KW
    offs_m = (pid // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)  # output channels
    offs_n = (pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)   # input channels
    mmask = offs_m < C_out
    nmask = offs_n < C_in
    dy_cols = dy_ptr + (group * C_out + offs_m).to(tl.int64) * sdyc
    x_cols = x_ptr + (group * C_in + offs_n).to(tl.int64) * sxc

    # this split's pixels start + [0, count) of the tap's rectangle:
    # start + split_pixels would pass 2^31 for the last split of a map near
    # MAX_PIXELS (masked lanes of start + local may wrap: they are never read)
    row0, col0, width, area, area_mul, area_shift, width_mul, width_shift = _tap_rectangle(
        rect_ptr, tap)
    start = split * split_pixels
    count = tl.minimum(split_pixels, N * area - start)
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for p0 in range(0, count, BLOCK_K):
        local = p0 + tl.arange(0, BLOCK_K)
        kmask = local < count
        n, oh, ow = _rectangle_pixels(start + local, row0, col0, width, area, area_mul,
                                      area_shift, width_mul, width_shift)
        # no bounds mask: inside the rectangle every pixel's tap reads inside the input
        ih = oh * stride_h - pad_h + r * dil_h
        iw = ow * stride_w - pad_w + s * dil_w
        dy_rows = n.to(OFFSET) * sdyn + oh.to(OFFSET) * sdyh + ow.to(OFFSET) * sdyw
        x_rows = n.to(OFFSET) * sxn + ih.to(OFFSET) * sxh + iw.to(OFFSET) * sxw
        a = tl.load(dy_cols[:, None] + dy_rows[None, :],
                    mask=mmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(x_cols[None, :] + x_rows[:, None],
                    mask=kmask[:, None] & nmask[None, :], other=0.0)
        acc = mma(acc, a, b, ALLOW_TF32, UPCAST)

    co = group * C_out + offs_m
    out = (part_ptr + split.to(tl.int64) * split_stride + co.to(tl.int64)[:, None] * (C_in * KH * KW)
           + offs_n.to(tl.int64)[None, :] * (KH * KW) + r * KW + s)
    tl.store(out, acc, mask=mmask[:, None] & nmask[None, :])


# --------------------------------------------------------------------------
# depthwise (one input channel per group): direct kernels, no GEMM
# --------------------------------------------------------------------------
# With one input channel per group the GEMM's reduction is just the taps and
# its N tile the channel multiplier (usually 1): tl.dot would pad both to 16.
# These kernels vectorise over (pixels, channels) instead; channel co reads
# input channel co // MULT.
@triton.jit
def _depthwise_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    N, C, H, W, MULT, OH, OW, KH, KW,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sxn, sxc, sxh, sxw, swo, swh, sww, syn, syc, syh, syw,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """y (N, C*MULT, OH, OW) from x (N, C, H, W) and w (C*MULT, 1, KH, KW)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    co = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mmask = offs_m < N * OH * OW
    cmask = co < C * MULT
    n, oh, ow = _split_pixels(offs_m, OH, OW)
    # as in the GEMM forward: a per-row base outside the loops, the tap as a
    # scalar, and the 2-D sum formed inside the loop (hoisted, a 2-D pointer
    # tile held 2 registers per element across it)
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    x_rows = x_ptr + n.to(tl.int64) * sxn + ih0.to(tl.int64) * sxh + iw0.to(tl.int64) * sxw
    x_channels = (co // MULT).to(tl.int64) * sxc
    w_base = w_ptr + co.to(tl.int64) * swo
    acc = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    for r in range(0, KH):
        dh = r * dil_h
        valid_h = mmask & (ih0 >= -dh) & (ih0 < H - dh)
        for s in range(0, KW):
            dw = s * dil_w
            valid = valid_h & (iw0 >= -dw) & (iw0 < W - dw)
            tap = dh.to(tl.int64) * sxh + dw.to(tl.int64) * sxw
            xv = tl.load((x_rows + tap)[:, None] + x_channels[None, :],
                         mask=valid[:, None] & cmask[None, :], other=0.0)
            wv = tl.load(w_base + r * swh + s * sww, mask=cmask, other=0.0)
            acc += xv.to(ACC) * wv.to(ACC)[None, :]
    _epilogue_store(acc, y_ptr, b_ptr, n, oh, ow, co, mmask, cmask, syn, syc, syh, syw,
                    HAS_BIAS, RELU)


@triton.jit
def _depthwise_bwd_input_kernel(
    dy_ptr, w_ptr, b_ptr, dx_ptr,
    N, C, H, W, MULT, OH, OW, KH, KW,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sdyn, sdyc, sdyh, sdyw, swo, swh, sww, sdxn, sdxc, sdxh, sdxw,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """dx (N, C, H, W): for each input pixel, the taps whose output position
    is integral and inside (OH, OW), over the MULT channels reading it. With
    HAS_BIAS, b (C) is added: the depthwise transposed-convolution forward."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ci = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mmask = offs_m < N * H * W
    cmask = ci < C
    n, ih, iw = _split_pixels(offs_m, H, W)
    dy_base = dy_ptr + n.to(tl.int64) * sdyn
    acc = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    for r in range(0, KH):
        num_h = ih + pad_h - r * dil_h
        oh = num_h // stride_h
        valid_h = mmask & (num_h >= 0) & (num_h % stride_h == 0) & (oh < OH)
        for s in range(0, KW):
            num_w = iw + pad_w - s * dil_w
            ow = num_w // stride_w
            valid = valid_h & (num_w >= 0) & (num_w % stride_w == 0) & (ow < OW)
            pixel = dy_base + oh.to(tl.int64) * sdyh + ow.to(tl.int64) * sdyw
            for j in range(0, MULT):
                co = (ci * MULT + j).to(tl.int64)
                g = tl.load(pixel[:, None] + co[None, :] * sdyc,
                            mask=valid[:, None] & cmask[None, :], other=0.0)
                wv = tl.load(w_ptr + co * swo + r * swh + s * sww, mask=cmask, other=0.0)
                acc += g.to(ACC) * wv.to(ACC)[None, :]
    _epilogue_store(acc, dx_ptr, b_ptr, n, ih, iw, ci, mmask, cmask, sdxn, sdxc, sdxh, sdxw,
                    HAS_BIAS, False)


@triton.jit
def _depthwise_bwd_weight_kernel(
    dy_ptr, x_ptr, part_ptr, rect_ptr,
    N, C, H, W, MULT, OH, OW, KH, KW,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sdyn, sdyc, sdyh, sdyw, sxn, sxc, sxh, sxw, split_pixels, split_stride,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr, OFFSET: tl.constexpr,
):
    """Partial dw over one split of the output pixels, into part[split] of
    shape (C*MULT, KH*KW), contiguous; program axis 0 is (tap, channel block).
    The pixel split and OFFSET as in _conv2d_bwd_weight_kernel."""
    blocks_c = tl.cdiv(C * MULT, BLOCK_C)
    tap = tl.program_id(0) // blocks_c
    co = (tl.program_id(0) % blocks_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(1)
    r = tap // KW
    s = tap % KW
    cmask = co < C * MULT
    dy_cols = dy_ptr + co.to(tl.int64) * sdyc
    x_cols = x_ptr + (co // MULT).to(tl.int64) * sxc
    # this split's pixels of the tap's rectangle: as in _conv2d_bwd_weight_kernel
    row0, col0, width, area, area_mul, area_shift, width_mul, width_shift = _tap_rectangle(
        rect_ptr, tap)
    start = split * split_pixels
    count = tl.minimum(split_pixels, N * area - start)
    acc = tl.zeros([BLOCK_C], ACC)
    for p0 in range(0, count, BLOCK_M):
        local = p0 + tl.arange(0, BLOCK_M)
        pmask = local < count
        n, oh, ow = _rectangle_pixels(start + local, row0, col0, width, area, area_mul,
                                      area_shift, width_mul, width_shift)
        ih = oh * stride_h - pad_h + r * dil_h  # inside the input (the tap's rectangle)
        iw = ow * stride_w - pad_w + s * dil_w
        dy_rows = n.to(OFFSET) * sdyn + oh.to(OFFSET) * sdyh + ow.to(OFFSET) * sdyw
        x_rows = n.to(OFFSET) * sxn + ih.to(OFFSET) * sxh + iw.to(OFFSET) * sxw
        g = tl.load(dy_cols[None, :] + dy_rows[:, None], mask=pmask[:, None] & cmask[None, :],
                    other=0.0)
        xv = tl.load(x_cols[None, :] + x_rows[:, None], mask=pmask[:, None] & cmask[None, :],
                     other=0.0)
        acc += tl.sum(g.to(ACC) * xv.to(ACC), axis=0)
    out = part_ptr + split.to(tl.int64) * split_stride + co.to(tl.int64) * (KH * KW) + tap
    tl.store(out, acc, mask=cmask)


# --------------------------------------------------------------------------
# configs and autotuning
# --------------------------------------------------------------------------
# autotune keys: the size bucket, the layout (the channel stride is 1 in
# channels_last), channels and geometry
_GEOMETRY_KEY = ["C_in", "C_out", "KH", "KW", "stride_h", "stride_w", "dil_h", "dil_w"]
_FORWARD_KEY = ["tune_pixels", "sxc", "tune_splits", *_GEOMETRY_KEY]
_GRAD_INPUT_KEY = ["tune_pixels", "sdyc", *_GEOMETRY_KEY]
_GRAD_WEIGHT_KEY = ["tune_pixels", "sxc", *_GEOMETRY_KEY]


def _conv_params(stride, padding, dilation):
    return (*stride, padding[0], padding[2], *dilation)


# programs a split-K reduction aims for under deterministic algorithms: an
# H100's 4 x 132, fixed, so the split (and the order of the partial sums)
# does not depend on the GPU the process runs on
_DETERMINISTIC_SPLIT_TARGET = 528


def _split_target(device) -> int:
    if torch.are_deterministic_algorithms_enabled():
        return _DETERMINISTIC_SPLIT_TARGET
    return target_programs(device)


def _has_unreached_residues(input_hw, stride, padding, dilation, kernel_size) -> bool:
    """Whether some stride residue class of the input rows or columns gets no
    tap at all (possible when stride > kernel extent, e.g. FCN's k16 s8 does
    not, a stride-3 1x1 conv does)."""
    pads = (padding[0], padding[2])
    return any(len(reached_residues(n, s, p, d, k)) < min(s, n)
               for n, s, p, d, k in zip(input_hw, stride, pads, dilation, kernel_size))


# --------------------------------------------------------------------------
# channel padding
# --------------------------------------------------------------------------
# A channel count above 16 that is not a multiple of 16 (VOC's 21 classes,
# Cityscapes' 19, ADE20K's 150) leaves the GEMM operands' strides without the
# JIT's 16-divisibility: every operand then loads element by element, with no
# cp.async, and only 64x64 tiles stay spill-free (codegen report: FCN-8s's
# upscore layers at 168-254 registers, 2 CTAs/SM). Such a convolution runs on
# copies zero-padded to the next multiple of 16 channels (the padded channels
# add 0 * 0 terms), and the real channels are copied out. Counts up to 16
# (RGB input) are left as they are: padding 3 to 16 would move 5x the bytes.
def padded_channels(count: int) -> int:
    """The channel count the GEMM kernels run with."""
    return count if count <= 16 or count % 16 == 0 else cdiv(count, 16) * 16


def _padded_counts(groups: int, C_in: int, C_out: int) -> tuple[int, int] | None:
    """(C_in, C_out) padded when an ungrouped GEMM convolution needs it, else None."""
    counts = padded_channels(C_in), padded_channels(C_out)
    return counts if groups == 1 and C_in > 1 and counts != (C_in, C_out) else None


def _pad_channels(t: torch.Tensor, count: int) -> torch.Tensor:
    """t (N, C, H, W) as a channels_last (N, count, H, W), zeros past C; t
    itself when it has count channels (a 256 -> 21 classifier pads only its
    output side)."""
    N, C, H, W = t.shape
    if C == count:
        return t
    out = empty((N, count, H, W), dtype=t.dtype, device=t.device,
                memory_format=torch.channels_last)
    out[:, C:].zero_()
    out[:, :C].copy_(t)
    return out


def _pad_weight(w: torch.Tensor, c_out: int, c_in: int) -> torch.Tensor:
    """w (C_out, C_in, KH, KW) as a (c_out, c_in, KH, KW) with zeros past
    each count, input channels contiguous (what gemm_weight keeps as is)."""
    out = empty((c_out, c_in) + tuple(w.shape[2:]), dtype=w.dtype, device=w.device,
                memory_format=torch.channels_last).zero_()
    out[:w.shape[0], :w.shape[1]].copy_(w)
    return out


def _real_channels(padded: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The padded launch's result itself where it has out's shape and strides
    (only the other side was padded), else its first channels copied into out."""
    if padded.shape == out.shape and padded.stride() == out.stride():
        return padded
    return out.copy_(padded[:, :out.shape[1]])


def _pad_bias(bias, count: int):
    if bias is None or bias.shape[0] == count:
        return bias
    out = torch.zeros(count, dtype=bias.dtype, device=bias.device)
    out[:bias.shape[0]].copy_(bias)
    return out


# --------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------
def conv2d_forward(x, w, bias, stride, padding, dilation, groups: int, relu: bool = False, *,
                   config: dict | None = None, splits: int | None = None) -> torch.Tensor:
    """y = conv2d(x, w) + bias (then ReLU). ``padding`` is (top, bottom,
    left, right); the output is channels_last when x or w is (ATen's rule,
    segops._format.conv_memory_format). ``splits``: how many
    parts the reduction is split into (default: forward_splits' choice)."""
    N, _, H, W = x.shape
    C_out_total, C_in, KH, KW = w.shape
    C_out = C_out_total // groups
    OH, OW = output_size((H, W), (KH, KW), stride, padding, dilation)
    y = empty((N, C_out_total, OH, OW), dtype=x.dtype, device=x.device,
              memory_format=conv_memory_format(x, w))
    if y.numel() == 0:
        return y
    M = N * OH * OW
    if C_in == 1:
        _depthwise_forward(x, w, bias, y, stride, padding, dilation, relu)
        return y
    if padded_counts := _padded_counts(groups, C_in, C_out):
        ci, co = padded_counts
        padded = conv2d_forward(_pad_channels(x, ci), _pad_weight(w, co, ci), _pad_bias(bias, co),
                                stride, padding, dilation, 1, relu, config=config, splits=splits)
        return _real_channels(padded, y)
    if splits is None:
        splits = forward_splits(cdiv(M, 128) * cdiv(C_out, 128) * groups,
                                KH * KW * cdiv(C_in, 64), _split_target(x.device))

    def grid(meta):
        return (cdiv(M, meta["BLOCK_M"]) * cdiv(C_out, meta["BLOCK_N"]), groups, splits)

    check_grid(grid)
    x, result = channels_last_operand(x), y
    # split-K: the GEMM writes (splits, N, OH, OW, C) partials in the accumulation dtype
    y = (channels_last_output(y) if splits == 1 else
         empty((splits, N, OH, OW, C_out_total), dtype=accumulation_dtype(x.dtype),
               device=x.device))
    out_strides = y.stride()[-4:] if splits == 1 else [y.stride(i) for i in (1, 4, 2, 3)]
    epilogue = dict(HAS_BIAS=bias is not None, RELU=relu)
    constexprs = dict(precision(x), **(epilogue if splits == 1 else
                                       dict(HAS_BIAS=False, RELU=False)))
    w = gemm_weight(w, 1 if constexprs["ALLOW_TF32"] else None)  # K: input channels
    rows = _pixel_classes(OH, H, KH, stride[0], padding[0], dilation[0])
    cols = _pixel_classes(OW, W, KW, stride[1], padding[2], dilation[1])
    args = (x, w, bias_vector(bias, w), y, _bounds_table(rows, cols, x.device),
            N, C_in, H, W, C_out, OH, OW, KH, KW, *_conv_params(stride, padding, dilation),
            len(rows), len(cols), *x.stride(), *w.stride(), *out_strides,
            y.stride(0) if splits > 1 else 0, tune_bucket(M), splits)
    launch(_conv2d_fwd_kernel, grid, args, constexprs, config, M, C_out, C_in, x.device,
           _FORWARD_KEY)
    if splits > 1:
        # summed into channels_last (an NCHW output is copied after, as the
        # GEMM's is: the sum's tiles store channel vectors, scattered in NCHW)
        out = channels_last_output(result)
        _split_sum(y, bias, out, **epilogue)
        y = out
    return result.copy_(y) if y is not result else y


# the most classes of output positions (by the taps they keep) per axis the
# forward groups its pixels by; a 3x3 kernel has at most 7
MAX_TAP_CLASSES = 7


@functools.lru_cache(maxsize=1024)
def _pixel_classes(out_len, in_len, taps, stride, pad, dil) -> tuple[int, ...]:
    """The inner bounds of tap_class_bounds (without 0 and out_len), or none
    (no grouping along this axis) past MAX_TAP_CLASSES: the kernels search
    the bounds per pixel."""
    bounds = tap_class_bounds(out_len, in_len, taps, stride, pad, dil)
    return bounds[1:-1] if len(bounds) <= MAX_TAP_CLASSES + 1 else ()


def _gradient_classes(in_len, out_len, taps, stride, pad, dil) -> tuple[int, ...]:
    """_pixel_classes for the input gradient along a stride-1 axis (none
    along a strided one: its residue classes have lengths of their own):
    input position i receives tap t from output i + pad - t*dil, the
    forward's rule with the padding and dilation negated."""
    return _pixel_classes(in_len, out_len, taps, 1, -pad, -dil) if stride == 1 else ()


def _bounds_table(rows: tuple, cols: tuple, device) -> torch.Tensor:
    """_grouped_pixels' table: the inner row bounds, then the column ones
    (one unread entry more: a kernel argument is never an empty tensor)."""
    return device_table(rows + cols + (0,), torch.int32, device)

# a split keeps at least this many (tap, 64-channel) steps of the reduction
SPLIT_MIN_STEPS = 8
MAX_FORWARD_SPLITS = 16


def forward_splits(tiles: int, k_steps: int, programs: int) -> int:
    """How many parts the forward splits its reduction into: 1 unless the
    output has fewer ``tiles`` (of 128x128) than two waves (``programs`` is
    the launchers' four-wave target), e.g. ASPP at output stride 16 (138
    tiles on an H100's 132 SMs: a second wave of 6 tiles doubles the time);
    then enough splits for two waves, each keeping >= SPLIT_MIN_STEPS of the
    ``k_steps`` (tap, 64-channel) steps."""
    if 2 * tiles >= programs:
        return 1
    return max(1, min(cdiv(programs // 2, tiles), k_steps // SPLIT_MIN_STEPS,
                      MAX_FORWARD_SPLITS))


@functools.lru_cache(maxsize=256)
def _tap_rectangles(OH, OW, H, W, KH, KW, stride_h, stride_w, pad_h, pad_w, dil_h,
                    dil_w) -> tuple[tuple, int, tuple | None]:
    """The grad_weight kernels' table, 8 int32 per tap (r, s) in r*KW + s
    order: row0, col0, width, area (height * width) of the output rectangle
    whose pixels read tap (r, s) inside the input (segops._geometry.
    tap_interval per axis), then divisor_magic of area and of width (of 1
    when 0); the largest N-free area (the pixels a split divides); and
    _poison's bounds, (row0, row_end, col0, col_end) per tap, or None when
    every rectangle is the whole map."""
    rows = [tap_interval(OH, H, r, stride_h, pad_h, dil_h) for r in range(KH)]
    cols = [tap_interval(OW, W, s, stride_w, pad_w, dil_w) for s in range(KW)]
    table, bounds, largest = [], [], 0
    for row0, row_end in rows:
        for col0, col_end in cols:
            width = col_end - col0
            area = (row_end - row0) * width
            largest = max(largest, area)
            table += [row0, col0, width, area, *divisor_magic(max(area, 1)),
                      *divisor_magic(max(width, 1))]
            bounds += [row0, row_end, col0, col_end]
    whole = all(r == (0, OH) for r in rows) and all(c == (0, OW) for c in cols)
    return tuple(table), largest, None if whole else tuple(bounds)


# the "none" value of the non-finite extents: every extent is kept as a
# minimum (the last row / column negated), so one fill value serves all four
# (above any coordinate: rows and columns are below 2^31 - 1)
_NO_EXTENT = 2**31 - 1


def _poison(total: torch.Tensor, dy: torch.Tensor, bounds: tuple | None) -> torch.Tensor:
    """The weight gradient ``total`` ((C, C_in per group or 1, taps) in tap
    order, any shape with those strides) with F.conv2d's NaN where a
    non-finite dy[:, c] lies outside tap t's rectangle: F.conv2d multiplies
    it by the padding's zero (NaN), the grad_weight kernels skip those
    pixels. Only for convolutions whose taps reach the padding; three
    launches, no host sync, and NaN written only where it belongs (in the
    grad_weight epilogue the select spilled the 128x128 tiles). ``bounds``:
    _tap_rectangles' third result."""
    if bounds is None:
        return total
    N, C, OH, OW = dy.shape
    extents = torch.full((C, 4), _NO_EXTENT, dtype=torch.int32, device=dy.device)
    grid = (cdiv(N * OH * OW, 64), cdiv(C, 64))
    check_grid(grid)
    _nonfinite_extents_kernel[grid](dy, extents, N, C, OH, OW, *dy.stride(),
                                    BLOCK_P=64, BLOCK_C=64, NONE=_NO_EXTENT)
    taps = len(bounds) // 4
    per_channel = total.numel() // (C * taps)
    grid = (taps, cdiv(C, 64))
    check_grid(grid)
    _poison_taps_kernel[grid](total, extents, device_table(bounds, torch.int32, dy.device), C,
                              per_channel, taps, BLOCK_C=64, BLOCK_I=16)
    return total


def _split_sum(partial, bias, y, HAS_BIAS: bool, RELU: bool) -> None:
    """y = sum over splits of ``partial`` (splits, N, OH, OW, C), + bias, ReLU."""
    splits, N, OH, OW, C = partial.shape
    M = N * OH * OW
    bc = block_size(C, 64, 16)
    bm = max(4096 // bc, 16)
    grid = (cdiv(M, bm), cdiv(C, bc))
    check_grid(grid)
    _split_sum_kernel[grid](partial, bias_vector(bias, partial), y, M, C, OH, OW, splits,
                            partial.stride(0), *y.stride(), HAS_BIAS=HAS_BIAS, RELU=RELU,
                            BLOCK_M=bm, BLOCK_C=bc, ACC=tl_accumulation(y.dtype))


def conv_transpose_gather(dy, w, bias, input_hw, stride, padding, dilation, groups: int,
                          memory_format, *, config: dict | None = None) -> torch.Tensor:
    """dx of y = conv2d(x, w): (N, C_in * groups, *input_hw) from dy
    (N, C_out * groups, OH, OW), plus ``bias`` per channel when given (which
    makes it conv_transpose2d's forward)."""
    N, _, OH, OW = dy.shape
    C_out_total, C_in, KH, KW = w.shape
    C_out = C_out_total // groups
    H, W = input_hw
    dx = empty((N, C_in * groups, H, W), dtype=dy.dtype, device=dy.device,
               memory_format=memory_format)
    if dx.numel() == 0:
        return dx
    if C_out == 0 or dy.numel() == 0:
        fill_channels(dx, bias)
        return dx
    if C_in == 1:
        _depthwise_backward_input(dy, w, bias, dx, stride, padding, dilation)
        return dx
    if padded_counts := _padded_counts(groups, C_in, C_out):
        ci, co = padded_counts
        padded = conv_transpose_gather(_pad_channels(dy, co), _pad_weight(w, co, ci),
                                       _pad_bias(bias, ci), input_hw, stride, padding, dilation,
                                       1, memory_format if ci == C_in else torch.channels_last,
                                       config=config)
        return _real_channels(padded, dx)
    res_h = residue_candidates(stride[0], dilation[0], KH)
    res_w = residue_candidates(stride[1], dilation[1], KW)
    M = N * cdiv(H, stride[0]) * cdiv(W, stride[1])

    def grid(meta):
        return (res_h * res_w * cdiv(M, meta["BLOCK_M"]) * cdiv(C_in, meta["BLOCK_N"]),
                groups)

    check_grid(grid)
    dy, out = channels_last_operand(dy), channels_last_output(dx)
    if _has_unreached_residues((H, W), stride, padding, dilation, (KH, KW)):
        fill_channels(out, bias)
    constexprs = dict(HAS_BIAS=bias is not None, **precision(dy))
    w = gemm_weight(w, 0 if constexprs["ALLOW_TF32"] else None)  # K: output channels
    rows = _gradient_classes(H, OH, KH, stride[0], padding[0], dilation[0])
    cols = _gradient_classes(W, OW, KW, stride[1], padding[2], dilation[1])
    args = (dy, w, bias_vector(bias, w), out, _bounds_table(rows, cols, dy.device),
            N, C_in, H, W, C_out, OH, OW, KH, KW,
            *_conv_params(stride, padding, dilation), res_w,
            *(s // math.gcd(s, d) for s, d in zip(stride, dilation)), len(rows), len(cols),
            *dy.stride(), *w.stride(), *out.stride(), tune_bucket(M))
    launch(_conv2d_bwd_input_kernel, grid, args, constexprs, config, M, C_in, C_out, dy.device,
           _GRAD_INPUT_KEY)
    return dx.copy_(out) if out is not dx else dx


def conv2d_grad_weight(dy, x, weight_shape, stride, padding, dilation, groups: int, *,
                       config: dict | None = None, splits: int | None = None) -> torch.Tensor:
    """dw (C_out * groups, C_in, KH, KW) in fp32 (fp64 for fp64 input)."""
    N, _, H, W = x.shape
    _, _, OH, OW = dy.shape
    C_out_total, C_in, KH, KW = weight_shape
    C_out = C_out_total // groups
    acc_dtype = accumulation_dtype(x.dtype)
    pixels = N * OH * OW
    if pixels == 0 or C_out_total * C_in * KH * KW == 0:
        return torch.zeros(weight_shape, dtype=acc_dtype, device=x.device)
    if C_in == 1:
        return _depthwise_grad_weight(dy, x, weight_shape, stride, padding, dilation, acc_dtype,
                                      splits)
    if padded_counts := _padded_counts(groups, C_in, C_out):
        ci, co = padded_counts
        padded = conv2d_grad_weight(_pad_channels(dy, co), _pad_channels(x, ci),
                                    (co, ci, KH, KW), stride, padding, dilation, 1,
                                    config=config, splits=splits)
        return padded[:C_out, :C_in].contiguous()
    rectangles, largest, bounds = _tap_rectangles(OH, OW, H, W, KH, KW,
                                                  *_conv_params(stride, padding, dilation))
    pixels = N * largest  # what the splits divide: the largest tap rectangle's pixels
    if pixels == 0:  # no tap reads inside the input: zeros, NaN where dy is not finite
        return _poison(torch.zeros(weight_shape, dtype=acc_dtype, device=x.device), dy,
                       bounds)
    tiles = cdiv(C_out, 64) * cdiv(C_in, 64) * KH * KW * groups
    if splits is None:
        # enough programs for a few waves, each with at least 256 pixels
        splits = max(1, min(_split_target(x.device) // max(tiles, 1), pixels // 256))
    per_split = cdiv(cdiv(pixels, splits), 64) * 64
    splits = cdiv(pixels, per_split)
    partial = empty((splits, C_out_total, C_in, KH, KW), dtype=acc_dtype, device=x.device)
    x, dy = channels_last_operand(x), channels_last_operand(dy)

    def grid(meta):
        return (KH * KW * cdiv(C_out, meta["BLOCK_M"]) * cdiv(C_in, meta["BLOCK_N"]),
                groups, splits)

    check_grid(grid)
    args = (dy, x, partial, device_table(rectangles, torch.int32, x.device),
            N, C_in, H, W, C_out, OH, OW, KH, KW,
            *_conv_params(stride, padding, dilation), *dy.stride(), *x.stride(), per_split,
            partial.stride(0), tune_bucket(N * OH * OW))
    constexprs = dict(precision(x), OFFSET=offset_type(dy, x))
    launch(_conv2d_bwd_weight_kernel, grid, args, constexprs, config, C_out, C_in, per_split,
           x.device, _GRAD_WEIGHT_KEY)
    total = partial[0] if splits == 1 else partial.sum(0)
    return _poison(total, dy, bounds)



# --------------------------------------------------------------------------
# depthwise launchers
# --------------------------------------------------------------------------
def _depthwise_tile(channels: int, channels_last: bool) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_C): wide in channels for channels_last (contiguous),
    wide in pixels otherwise. NCHW's tile is 128 x 8: its loads are scalar
    (a tap's pixel offset has no known alignment), each element costing ~11
    registers, and 128 x 16 took 179 (forward) and 209 (grad_input)
    registers, 2 CTAs/SM, against 96 and 113, 5 and 4 CTAs/SM (codegen, triton 3.8)."""
    if channels_last:
        bc = block_size(channels, 64, 4)
        return max(4096 // bc, 16) if bc < 64 else 64, bc
    return 128, block_size(channels, 8)


def _depthwise_forward(x, w, bias, y, stride, padding, dilation, relu: bool) -> None:
    N, C, H, W = x.shape
    C_out, _, KH, KW = w.shape
    OH, OW = y.shape[-2:]
    bm, bc = _depthwise_tile(C_out, x.stride(1) == 1)
    grid = (cdiv(N * OH * OW, bm), cdiv(C_out, bc))
    check_grid(grid)
    _depthwise_fwd_kernel[grid](
        x, w, bias_vector(bias, w), y, N, C, H, W, C_out // C, OH, OW, KH, KW,
        *_conv_params(stride, padding, dilation), *x.stride(), w.stride(0), w.stride(2),
        w.stride(3), *y.stride(),
        HAS_BIAS=bias is not None, RELU=relu, BLOCK_M=bm, BLOCK_C=bc, ACC=tl_accumulation(x.dtype))


def _depthwise_backward_input(dy, w, bias, dx, stride, padding, dilation) -> None:
    N, C, H, W = dx.shape
    C_out, _, KH, KW = w.shape
    OH, OW = dy.shape[-2:]
    bm, bc = _depthwise_tile(C, dx.stride(1) == 1)
    grid = (cdiv(N * H * W, bm), cdiv(C, bc))
    check_grid(grid)
    _depthwise_bwd_input_kernel[grid](
        dy, w, bias_vector(bias, w), dx, N, C, H, W, C_out // C, OH, OW, KH, KW,
        *_conv_params(stride, padding, dilation), *dy.stride(), w.stride(0), w.stride(2),
        w.stride(3), *dx.stride(),
        HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_C=bc, ACC=tl_accumulation(dy.dtype))


def _depthwise_grad_weight(dy, x, weight_shape, stride, padding, dilation, acc_dtype,
                           splits: int | None) -> torch.Tensor:
    N, C, H, W = x.shape
    C_out, _, KH, KW = weight_shape
    OH, OW = dy.shape[-2:]
    rectangles, largest, bounds = _tap_rectangles(OH, OW, H, W, KH, KW,
                                                  *_conv_params(stride, padding, dilation))
    pixels = N * largest  # what the splits divide: the largest tap rectangle's pixels
    if pixels == 0:  # no tap reads inside the input: zeros, NaN where dy is not finite
        return _poison(torch.zeros(weight_shape, dtype=acc_dtype, device=x.device), dy,
                       bounds)
    bm, bc = _depthwise_tile(C_out, x.stride(1) == 1)
    if splits is None:
        tiles = cdiv(C_out, bc) * KH * KW
        splits = max(1, min(_split_target(x.device) // tiles, pixels // 1024))
    per_split = cdiv(cdiv(pixels, splits), bm) * bm
    splits = cdiv(pixels, per_split)
    partial = empty((splits, C_out, KH * KW), dtype=acc_dtype, device=x.device)
    grid = (KH * KW * cdiv(C_out, bc), splits)
    check_grid(grid)
    _depthwise_bwd_weight_kernel[grid](
        dy, x, partial, device_table(rectangles, torch.int32, x.device),
        N, C, H, W, C_out // C, OH, OW, KH, KW,
        *_conv_params(stride, padding, dilation), *dy.stride(), *x.stride(), per_split,
        partial.stride(0),
        BLOCK_M=bm, BLOCK_C=bc, ACC=tl_accumulation(x.dtype), OFFSET=offset_type(dy, x))
    total = partial[0] if splits == 1 else partial.sum(0)
    return _poison(total, dy, bounds).view(weight_shape)
