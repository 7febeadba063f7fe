"""RoIAlign over one or several feature levels, forward and backward.

Three kernels, and a fourth that maps RoIs to levels:

* ``_roi_align_fwd_kernel``: one program per (RoI, block of channels, block
  of bins). The bilinear samples of a bin are looped over (their number is
  per RoI with ``sampling_ratio <= 0``); each sample reads a
  [BLOCK_C, BLOCK_P] tile of its four neighbours. In channels_last the
  channel axis is contiguous, so those reads are vectorised.
* ``_roi_align_bwd_atomic_kernel``: the same walk, scattering
  grad * weight / count into a float32 buffer with atomic adds (never fp16
  or bf16 atomics); the launcher casts at the end.
* ``_roi_align_bwd_deterministic_kernel``: one program per (input tile,
  block of channels) gathers the contributions of the RoIs of its image and
  level, in a fixed order, without atomics, so results are bit-identical run
  to run. RoIs are sorted by (level, image), and each tile scans only the
  RoIs listed for its row of tiles (``_row_bands``: memory O(input + output
  + K * rows of tiles), capped; past the cap, its (level, image) segment,
  O(input + output)), with the same sums either way. For average pooling the bilinear
  weights of a bin factor into a row part and a column part (the bounds test
  is per axis too), so a bin costs O(samples_h + samples_w) vector work
  instead of O(samples_h * samples_w).
* ``_roi_levels_kernel``: multi_scale_roi_align's level of each RoI (FPN
  eq. 1, torchvision's LevelMapper) in one launch, where torch's composite
  takes about 30 small ones: the level is a count of area thresholds that
  the caller finds once per (dtype, device, level range) from the
  reference formula itself, so every rounding of torch's sqrt, division and
  log2 on that device is reproduced.

Several levels in one launch: the level maps stay where they are; the
kernels get a tuple of their pointers (kernel arguments, so a new
allocation costs nothing), a device table of (H, W, strides) per level
(cached on its content: shapes and strides, not addresses) and each RoI's
level. Nothing in a launch copies from the host or waits for the device once
a layout has been seen, so the calls can be captured in a CUDA graph.
"""
from __future__ import annotations

import functools
import itertools

import torch
import triton
import triton.language as tl

from .._checks import accumulation_dtype
from .._format import memory_format_of
from ._layout import block_size, cdiv, device_table, empty, tl_accumulation
from ._math import div

# adaptive sample counts from here up do not fit torchvision's int: no samples
_INT32_LIMIT = tl.constexpr(float(1 << 31))
# nor do per-bin counts (grid_h * grid_w) from here up; an int, so the test
# is exact where float32 would round 2^31 - 1 up
_INT32_COUNT_LIMIT = tl.constexpr(1 << 31)


# --------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------
@triton.jit
def _level_geometry(ptrs, table_ptr, lvl, CHANNELS_LAST: tl.constexpr, VEC: tl.constexpr):
    """Level ``lvl``'s map: its pointer (``ptrs`` holds one per level), H, W
    and its n, c, h, w strides (row ``lvl`` of ``_level_table``). VEC > 1:
    the launcher proved the n, h, w strides multiples of VEC
    (``_vector_width``), which the compiler cannot see in a loaded value."""
    base = ptrs[0]
    for i in tl.static_range(1, len(ptrs)):
        base = tl.where(lvl == i, ptrs[i], base)
    row = table_ptr + lvl * 6
    stride_n = tl.load(row + 2)
    stride_c = tl.load(row + 3)
    stride_h = tl.load(row + 4)
    stride_w = tl.load(row + 5)
    if CHANNELS_LAST:
        stride_c = 1
    if VEC > 1:
        stride_n = tl.multiple_of(stride_n, VEC)
        stride_h = tl.multiple_of(stride_h, VEC)
        stride_w = tl.multiple_of(stride_w, VEC)
    return (base, tl.load(row + 0).to(tl.int32), tl.load(row + 1).to(tl.int32),
            stride_n, stride_c, stride_h, stride_w)


@triton.jit
def _adaptive_grid(roi_size, bins):
    """ceil(roi_size / bins) samples per bin, 0 when that is <= 0, NaN or past
    int32 (torchvision's int overflows there and pools nothing)."""
    # IEEE division (a plain / compiles to an approximate one): a quotient
    # that is a whole number must not round up to another sample row
    grid = tl.ceil(div(roi_size, tl.cast(bins, roi_size.dtype)))
    grid = tl.where((grid > 0.0) & (grid < _INT32_LIMIT), grid, 0.0)
    return grid.to(tl.int32)


@triton.jit
def _roi_geometry(rois_ptr, k, scale, N, PH, PW, sampling_ratio,
                  ALIGNED: tl.constexpr, ADAPTIVE: tl.constexpr, ACC: tl.constexpr):
    """Image, top-left corner, bin size and samples per bin of RoI k, in
    torchvision's arithmetic. A RoI with a non-finite coordinate or a batch
    index outside [0, N) gets zero samples, so it contributes nothing."""
    roi = rois_ptr + k.to(tl.int64) * 5
    b = tl.load(roi)
    x1 = tl.load(roi + 1)
    y1 = tl.load(roi + 2)
    x2 = tl.load(roi + 3)
    y2 = tl.load(roi + 4)
    inf = float("inf")
    valid = (tl.abs(x1) < inf) & (tl.abs(y1) < inf) & (tl.abs(x2) < inf) & (tl.abs(y2) < inf)
    # the index is truncated toward zero as torchvision does: (-1, N) is valid
    valid = valid & (b > -1.0) & (b < N)
    n = tl.where(valid, b, 0.0).to(tl.int32)
    x_start = x1 * scale
    y_start = y1 * scale
    x_end = x2 * scale
    y_end = y2 * scale
    if ALIGNED:  # aligned: pixel centres at +0.5
        x_start -= 0.5
        y_start -= 0.5
        x_end -= 0.5
        y_end -= 0.5
    roi_w = x_end - x_start
    roi_h = y_end - y_start
    if not ALIGNED:
        roi_w = tl.maximum(roi_w, 1.0)
        roi_h = tl.maximum(roi_h, 1.0)
    bin_h = roi_h / PH
    bin_w = roi_w / PW
    # a constexpr choice: the IEEE divisions of the adaptive count are calls,
    # and registers live across a call are spilled
    # (a fixed sampling_ratio is at most segops.ops.roi_align.MAX_SAMPLING_RATIO:
    # its square fits an int32)
    if ADAPTIVE:
        grid_h, grid_w = _fitting_grid(_adaptive_grid(roi_h, PH), _adaptive_grid(roi_w, PW))
    else:
        grid_h = sampling_ratio
        grid_w = sampling_ratio
    grid_h = tl.where(valid, grid_h, 0)
    grid_w = tl.where(valid, grid_w, 0)
    return n, y_start, x_start, bin_h, bin_w, grid_h, grid_w


@triton.jit
def _fitting_grid(grid_h, grid_w):
    """(grid_h, grid_w), or (0, 0) when the per-bin count grid_h * grid_w is
    2^31 or more: such a bin pools nothing (its count, the divisor, is an
    int32 product, which would wrap; torchvision's int does)."""
    fits = grid_h.to(tl.int64) * grid_w < _INT32_COUNT_LIMIT
    return tl.where(fits, grid_h, 0), tl.where(fits, grid_w, 0)


@triton.jit
def _sample_coord(start, bin_index, bin_size, i, grid, ACC: tl.constexpr):
    # torchvision's order of operations: start + p*bin + (i + .5)*bin/grid
    return (start + tl.cast(bin_index, ACC) * bin_size
            + (tl.cast(i, ACC) + 0.5) * bin_size / tl.cast(grid, ACC))


@triton.jit
def _axis(coord, length, ACC: tl.constexpr):
    """Bilinear pieces along one axis (any shape): low and high index, their
    weights, and whether the sample counts (coord in [-1, length])."""
    inside = (coord >= -1.0) & (coord <= length.to(ACC)) & (length > 0)
    # clamp before the int cast so far-away samples cannot overflow it; a
    # sample outside (NaN included) is moved to 0: its loads are masked, but
    # a NaN weight times their 0 would still be NaN, and whether
    # tl.maximum(NaN, 0) is 0 is left unspecified (the compiler's is, numpy's
    # in older interpreters is not)
    c = tl.where(inside, tl.minimum(tl.maximum(coord, 0.0), length.to(ACC)), 0.0)
    low = c.to(tl.int32)
    at_edge = low >= length - 1
    low = tl.where(at_edge, length - 1, low)
    high = tl.where(at_edge, low, low + 1)
    c = tl.where(at_edge, low.to(ACC), c)
    frac = c - low.to(ACC)
    low = tl.maximum(low, 0)
    high = tl.maximum(high, 0)
    return low, high, 1.0 - frac, frac, inside


@triton.jit
def _bilinear(plane, y, x, H, W, stride_h, stride_w, mask, ACC: tl.constexpr):
    """Bilinear sample of ``plane`` (a pointer tile already offset to the image
    and channels) at (y, x); 0 outside torchvision's bounds."""
    y0, y1, hy, ly, in_y = _axis(y, H, ACC)
    x0, x1, hx, lx, in_x = _axis(x, W, ACC)
    m = mask & in_y & in_x
    row0 = y0.to(tl.int64) * stride_h
    row1 = y1.to(tl.int64) * stride_h
    col0 = x0.to(tl.int64) * stride_w
    col1 = x1.to(tl.int64) * stride_w
    v1 = tl.load(plane + row0 + col0, mask=m, other=0.0).to(ACC)
    v2 = tl.load(plane + row0 + col1, mask=m, other=0.0).to(ACC)
    v3 = tl.load(plane + row1 + col0, mask=m, other=0.0).to(ACC)
    v4 = tl.load(plane + row1 + col1, mask=m, other=0.0).to(ACC)
    return hy * hx * v1 + hy * lx * v2 + ly * hx * v3 + ly * lx * v4


@triton.jit
def _scatter_bilinear(plane, g, y, x, H, W, stride_h, stride_w, mask, ACC: tl.constexpr):
    """Atomic adds of g * bilinear weight at the four neighbours of (y, x)."""
    y0, y1, hy, ly, in_y = _axis(y, H, ACC)
    x0, x1, hx, lx, in_x = _axis(x, W, ACC)
    m = mask & in_y & in_x
    row0 = y0.to(tl.int64) * stride_h
    row1 = y1.to(tl.int64) * stride_h
    col0 = x0.to(tl.int64) * stride_w
    col1 = x1.to(tl.int64) * stride_w
    tl.atomic_add(plane + row0 + col0, g * (hy * hx), mask=m, sem="relaxed")
    tl.atomic_add(plane + row0 + col1, g * (hy * lx), mask=m, sem="relaxed")
    tl.atomic_add(plane + row1 + col0, g * (ly * hx), mask=m, sem="relaxed")
    tl.atomic_add(plane + row1 + col1, g * (ly * lx), mask=m, sem="relaxed")


@triton.jit
def _argmax_sample(plane, y_start, x_start, bin_h, bin_w, ph, pw, grid_h, grid_w, H, W,
                   stride_h, stride_w, mask, SHAPE_LIKE, ACC: tl.constexpr):
    """Max pooling: the first sample with the largest value, as its raw
    coordinates (y, x), per lane of ``mask``'s shape. NaN propagates as in
    torch's max pooling: the first NaN sample wins (and gets the gradient)."""
    best = tl.full(SHAPE_LIKE.shape, float("-inf"), ACC)
    best_y = tl.zeros(SHAPE_LIKE.shape, ACC)
    best_x = tl.zeros(SHAPE_LIKE.shape, ACC)
    for iy in range(0, grid_h):
        y = _sample_coord(y_start, ph, bin_h, iy, grid_h, ACC)
        for ix in range(0, grid_w):
            x = _sample_coord(x_start, pw, bin_w, ix, grid_w, ACC)
            val = _bilinear(plane, y, x, H, W, stride_h, stride_w, mask, ACC)
            # the first sample always counts (all samples may be -inf)
            better = (val > best) | ((val != val) & (best == best)) | (iy + ix == 0)
            best = tl.where(better, val, best)
            best_y = tl.where(better, y, best_y)
            best_x = tl.where(better, x, best_x)
    return best, best_y, best_x


@triton.jit
def _channel_mask(offs_c, C, VEC: tl.constexpr):
    """offs_c < C; with VEC > 1 the launcher proved C a multiple of VEC, so
    the mask is uniform over each vector of VEC channels."""
    if VEC > 1:
        C = tl.multiple_of(C, VEC)
    return offs_c < C


@triton.jit
def _bin_tile(level_ptr, C, PH, PW, HAS_LEVELS: tl.constexpr, VEC: tl.constexpr,
              BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """This program's RoI k, channels, bins (ph, pw), their mask, and the
    RoI's level (grid: RoIs, channel blocks, bin blocks)."""
    k = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = _channel_mask(offs_c, C, VEC)[:, None] & (offs_p < PH * PW)[None, :]
    if HAS_LEVELS:
        lvl = tl.load(level_ptr + k).to(tl.int32)
    else:
        lvl = 0
    return k, offs_c, offs_p // PW, offs_p % PW, mask, lvl


# --------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------
@triton.jit
def _roi_align_fwd_kernel(
    x_ptrs, rois_ptr, level_ptr, table_ptr, scale_ptr, out_ptr, bad_ptr,
    C, PH, PW, N, sampling_ratio,
    stride_ok, stride_oc, stride_oh, stride_ow,
    ALIGNED: tl.constexpr, ADAPTIVE: tl.constexpr, MAX_POOL: tl.constexpr,
    HAS_LEVELS: tl.constexpr, CHECK_BATCH: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, VEC: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr, ACC: tl.constexpr,
):
    # CHECK_BATCH: the first program of each RoI sets bad_ptr (an int32 the
    # launcher zeroed) when its batch index is not an integer in [0, N)
    if CHECK_BATCH:
        if (tl.program_id(1) == 0) & (tl.program_id(2) == 0):
            b = tl.load(rois_ptr + tl.program_id(0).to(tl.int64) * 5)
            # NaN fails the first test, +-inf the range
            bad = (b != tl.floor(b)) | (b < 0) | (b >= N)
            tl.atomic_max(bad_ptr, 1, mask=bad, sem="relaxed")
    k, offs_c, ph, pw, mask, lvl = _bin_tile(level_ptr, C, PH, PW, HAS_LEVELS, VEC, BLOCK_C,
                                             BLOCK_P)
    x_ptr, H, W, stride_n, stride_c, stride_h, stride_w = _level_geometry(
        x_ptrs, table_ptr, lvl, CHANNELS_LAST, VEC)
    scale = tl.load(scale_ptr + lvl)
    n, y_start, x_start, bin_h, bin_w, grid_h, grid_w = _roi_geometry(
        rois_ptr, k, scale, N, PH, PW, sampling_ratio, ALIGNED, ADAPTIVE, ACC)

    plane = x_ptr + n.to(tl.int64) * stride_n + offs_c.to(tl.int64)[:, None] * stride_c
    if MAX_POOL:
        tile = tl.zeros([BLOCK_C, BLOCK_P], ACC)
        best, best_y, best_x = _argmax_sample(
            plane, y_start, x_start, bin_h, bin_w, ph[None, :], pw[None, :], grid_h, grid_w,
            H, W, stride_h, stride_w, mask, tile, ACC)
        result = tl.where(grid_h * grid_w > 0, best, 0.0)
    else:
        acc = tl.zeros([BLOCK_C, BLOCK_P], ACC)
        for iy in range(0, grid_h):
            y = _sample_coord(y_start, ph, bin_h, iy, grid_h, ACC)
            for ix in range(0, grid_w):
                x = _sample_coord(x_start, pw, bin_w, ix, grid_w, ACC)
                acc += _bilinear(plane, y[None, :], x[None, :], H, W, stride_h, stride_w,
                                 mask, ACC)
        result = acc / tl.maximum(grid_h * grid_w, 1).to(ACC)

    out = (out_ptr + k.to(tl.int64) * stride_ok + offs_c.to(tl.int64)[:, None] * stride_oc
           + (ph.to(tl.int64) * stride_oh + pw.to(tl.int64) * stride_ow)[None, :])
    tl.store(out, result.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------
# backward with atomics
# --------------------------------------------------------------------------
@triton.jit
def _roi_align_bwd_atomic_kernel(
    grad_ptr, x_ptrs, rois_ptr, level_ptr, x_table_ptr, gx_table_ptr, scale_ptr, gx_ptrs,
    C, PH, PW, N, sampling_ratio,
    stride_gk, stride_gc, stride_gh, stride_gw,
    ALIGNED: tl.constexpr, ADAPTIVE: tl.constexpr, MAX_POOL: tl.constexpr,
    HAS_LEVELS: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, VEC: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr, ACC: tl.constexpr,
):
    k, offs_c, ph, pw, mask, lvl = _bin_tile(level_ptr, C, PH, PW, HAS_LEVELS, VEC, BLOCK_C,
                                             BLOCK_P)
    gx_ptr, H, W, gx_sn, gx_sc, gx_sh, gx_sw = _level_geometry(
        gx_ptrs, gx_table_ptr, lvl, CHANNELS_LAST, VEC)
    scale = tl.load(scale_ptr + lvl)
    n, y_start, x_start, bin_h, bin_w, grid_h, grid_w = _roi_geometry(
        rois_ptr, k, scale, N, PH, PW, sampling_ratio, ALIGNED, ADAPTIVE, ACC)

    g = tl.load(grad_ptr + k.to(tl.int64) * stride_gk + offs_c.to(tl.int64)[:, None] * stride_gc
                + (ph.to(tl.int64) * stride_gh + pw.to(tl.int64) * stride_gw)[None, :],
                mask=mask, other=0.0).to(ACC)
    gx_plane = gx_ptr + n.to(tl.int64) * gx_sn + offs_c.to(tl.int64)[:, None] * gx_sc
    if MAX_POOL:
        x_ptr, _, _, x_sn, x_sc, x_sh, x_sw = _level_geometry(x_ptrs, x_table_ptr, lvl,
                                                              CHANNELS_LAST, VEC)
        plane = x_ptr + n.to(tl.int64) * x_sn + offs_c.to(tl.int64)[:, None] * x_sc
        best, best_y, best_x = _argmax_sample(
            plane, y_start, x_start, bin_h, bin_w, ph[None, :], pw[None, :], grid_h, grid_w,
            H, W, x_sh, x_sw, mask, g, ACC)
        _scatter_bilinear(gx_plane, g, best_y, best_x, H, W, gx_sh, gx_sw,
                          mask & (grid_h * grid_w > 0), ACC)
    else:
        g = g / tl.maximum(grid_h * grid_w, 1).to(ACC)
        for iy in range(0, grid_h):
            y = _sample_coord(y_start, ph, bin_h, iy, grid_h, ACC)
            for ix in range(0, grid_w):
                x = _sample_coord(x_start, pw, bin_w, ix, grid_w, ACC)
                _scatter_bilinear(gx_plane, g, y[None, :], x[None, :], H, W, gx_sh, gx_sw,
                                  mask, ACC)


# --------------------------------------------------------------------------
# deterministic backward: gather per input tile
# --------------------------------------------------------------------------
@triton.jit
def _rows_touched(a, b, length, first, last):
    """Whether samples with coordinates between a and b (either order: bins of
    reversed boxes have negative sizes) can touch the pixels first..last
    along an axis of ``length`` (conservative by one pixel)."""
    lo = tl.minimum(a, b)
    hi = tl.maximum(a, b)
    top = length.to(lo.dtype) - 1.0
    touched_lo = tl.minimum(tl.floor(tl.maximum(lo, 0.0)), top) - 1.0
    touched_hi = tl.minimum(tl.floor(tl.maximum(hi, 0.0)) + 1.0, top) + 1.0
    return (touched_hi >= first.to(lo.dtype)) & (touched_lo <= last.to(lo.dtype))


@triton.jit
def _axis_weights_on(pixels, coord, length, ACC: tl.constexpr):
    """Weight of a sample at ``coord`` (scalar, or one per row of a 2-D
    result) on each pixel index in ``pixels`` along one axis."""
    low, high, w_low, w_high, inside = _axis(coord, length, ACC)
    w = tl.where(pixels == low, w_low, 0.0) + tl.where(pixels == high, w_high, 0.0)
    return tl.where(inside, w, 0.0)


@triton.jit
def _gather_roi(acc, k, grad_ptr, rois_ptr, x_ptr, scale, n, H, W, N, PH, PW, sampling_ratio,
                x_sn, x_sc, x_sh, x_sw, stride_gk, stride_gc, stride_gh, stride_gw,
                offs_c, cmask, py, px, row0, row_end, col0, col_end,
                ALIGNED: tl.constexpr, ADAPTIVE: tl.constexpr, MAX_POOL: tl.constexpr,
                ACC: tl.constexpr):
    """acc ([BLOCK_C, TILE_H * TILE_W]) plus RoI k's gradient on the tile's
    pixels (py, px), rows row0..row_end, columns col0..col_end; only the
    bins whose samples can reach the tile are visited."""
    _, y_start, x_start, bin_h, bin_w, grid_h, grid_w = _roi_geometry(
        rois_ptr, k, scale, N, PH, PW, sampling_ratio, ALIGNED, ADAPTIVE, ACC)
    hit = (grid_h > 0) & (grid_w > 0)
    hit = hit & _rows_touched(y_start, y_start + PH * bin_h, H, row0, row_end)
    hit = hit & _rows_touched(x_start, x_start + PW * bin_w, W, col0, col_end)
    if hit:
        g_roi = grad_ptr + k.to(tl.int64) * stride_gk + offs_c.to(tl.int64) * stride_gc
        inv_count = 1.0 / (grid_h * grid_w).to(ACC)
        for ph in range(0, PH):
            y_lo = y_start + ph * bin_h
            if _rows_touched(y_lo, y_lo + bin_h, H, row0, row_end):
                row_w = tl.zeros(py.shape, ACC)
                if not MAX_POOL:
                    for iy in range(0, grid_h):
                        y = _sample_coord(y_start, ph, bin_h, iy, grid_h, ACC)
                        row_w += _axis_weights_on(py, y, H, ACC)
                for pw in range(0, PW):
                    x_lo = x_start + pw * bin_w
                    if _rows_touched(x_lo, x_lo + bin_w, W, col0, col_end):
                        g = tl.load(g_roi + ph * stride_gh + pw * stride_gw,
                                    mask=cmask, other=0.0).to(ACC)
                        if MAX_POOL:
                            plane = x_ptr + n * x_sn + offs_c.to(tl.int64) * x_sc
                            # per-channel coordinates (a vector, not a scalar: the
                            # interpreter mis-types broadcast scalar float comparisons)
                            lane = tl.zeros(offs_c.shape, tl.int32)
                            best, best_y, best_x = _argmax_sample(
                                plane, y_start, x_start, bin_h, bin_w, ph + lane, pw + lane,
                                grid_h, grid_w, H, W, x_sh, x_sw, cmask, g, ACC)
                            wy = _axis_weights_on(py[None, :], best_y[:, None], H, ACC)
                            wx = _axis_weights_on(px[None, :], best_x[:, None], W, ACC)
                            acc += g[:, None] * (wy * wx)
                        else:
                            col_w = tl.zeros(px.shape, ACC)
                            for ix in range(0, grid_w):
                                x = _sample_coord(x_start, pw, bin_w, ix, grid_w, ACC)
                                col_w += _axis_weights_on(px, x, W, ACC)
                            acc += (g * inv_count)[:, None] * (row_w * col_w)[None, :]
    return acc


@triton.jit
def _roi_align_bwd_deterministic_kernel(
    grad_ptr, x_ptrs, rois_ptr, order_ptr, reach_ptr, entry_ptr, bucket_ptr, bands_ptr,
    tiles_ptr, x_table_ptr, gx_table_ptr, scale_ptr, gx_ptrs,
    C, PH, PW, N, sampling_ratio,
    stride_gk, stride_gc, stride_gh, stride_gw,
    ALIGNED: tl.constexpr, ADAPTIVE: tl.constexpr, MAX_POOL: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, ROW_BANDS: tl.constexpr,
    VEC: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):
    # The RoIs a tile gathers come from its bucket of bucket_ptr's offsets:
    # ROW_BANDS, the entries (positions in the gather order, entry_ptr) of
    # its (level, image, row of tiles), bands_ptr numbering those per level;
    # else the positions of its (level, image) segment. Either way in
    # increasing position, so the sums are the same bit for bit.
    tile = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = _channel_mask(offs_c, C, VEC)

    # which level, image and tile this program owns (tiles_ptr: prefix counts)
    lvl = tl.full([], 0, tl.int32)
    for i in tl.static_range(1, len(gx_ptrs)):
        lvl += (tile >= tl.load(tiles_ptr + i)).to(tl.int32)
    # int32 from here (a grid axis is < 2**31): 64-bit division is a call
    local = (tile - tl.load(tiles_ptr + lvl)).to(tl.int32)
    x_ptr, H, W, x_sn, x_sc, x_sh, x_sw = _level_geometry(x_ptrs, x_table_ptr, lvl,
                                                          CHANNELS_LAST, VEC)
    tiles_w = tl.cdiv(W, TILE_W)
    tiles_h = tl.cdiv(H, TILE_H)
    tiles_per_image = tiles_h * tiles_w
    n = local // tiles_per_image
    rem = local % tiles_per_image
    row0 = (rem // tiles_w) * TILE_H
    col0 = (rem % tiles_w) * TILE_W
    offs_t = tl.arange(0, TILE_H * TILE_W)
    py = row0 + offs_t // TILE_W
    px = col0 + offs_t % TILE_W
    tmask = (py < H) & (px < W)
    scale = tl.load(scale_ptr + lvl)

    acc = tl.zeros([BLOCK_C, TILE_H * TILE_W], ACC)
    if ROW_BANDS:
        bucket = tl.load(bands_ptr + lvl) + n * tiles_h + rem // tiles_w
    else:
        bucket = lvl * N + n
    row_end = row0 + TILE_H - 1
    col_end = col0 + TILE_W - 1
    for i in range(tl.load(bucket_ptr + bucket), tl.load(bucket_ptr + bucket + 1)):
        j = tl.load(entry_ptr + i) if ROW_BANDS else i
        # one look at the RoI's reach skips the far ones; written as "not
        # outside", a NaN reach is kept for the exact test below
        reach = reach_ptr + j * 4
        near = ~((tl.load(reach + 1) < row0) | (tl.load(reach) > row_end)
                 | (tl.load(reach + 3) < col0) | (tl.load(reach + 2) > col_end))
        if near:
            acc = _gather_roi(acc, tl.load(order_ptr + j), grad_ptr, rois_ptr, x_ptr, scale, n,
                              H, W, N, PH, PW, sampling_ratio, x_sn, x_sc, x_sh, x_sw,
                              stride_gk, stride_gc, stride_gh, stride_gw, offs_c, cmask, py, px,
                              row0, row_end, col0, col_end, ALIGNED, ADAPTIVE, MAX_POOL,
                              ACC)

    # the gradient's geometry only now: live across the loop it spilled
    gx_ptr, _, _, gx_sn, gx_sc, gx_sh, gx_sw = _level_geometry(gx_ptrs, gx_table_ptr, lvl,
                                                               CHANNELS_LAST, VEC)
    gx = (gx_ptr + n * gx_sn + offs_c.to(tl.int64)[:, None] * gx_sc
          + (py.to(tl.int64) * gx_sh + px.to(tl.int64) * gx_sw)[None, :])
    tl.store(gx, acc.to(gx_ptr.dtype.element_ty), mask=cmask[:, None] & tmask[None, :])


# --------------------------------------------------------------------------
# level of each RoI (multi_scale_roi_align)
# --------------------------------------------------------------------------
@triton.jit
def _roi_levels_kernel(
    rois_ptr, thresholds_ptr, out_rois_ptr, levels_ptr,
    K, num_levels,
    stride_k, stride_c,
    NUM_BOUNDS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Each RoI's level index: how many of the NUM_BOUNDS area thresholds
    its box area, (x2 - x1) * (y2 - y1) in the rois' dtype as torchvision
    computes it, reaches. A NaN or negative area, or an index past the
    ``num_levels`` maps, matches no map: the RoI's batch index becomes -1
    (it pools nothing) and its level 0 (a valid table row)."""
    k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = k < K
    row = rois_ptr + k.to(tl.int64) * stride_k
    batch = tl.load(row, mask=mask, other=0)
    x1 = tl.load(row + stride_c, mask=mask, other=0)
    y1 = tl.load(row + 2 * stride_c, mask=mask, other=0)
    x2 = tl.load(row + 3 * stride_c, mask=mask, other=0)
    y2 = tl.load(row + 4 * stride_c, mask=mask, other=0)
    area = (x2 - x1) * (y2 - y1)
    level = tl.zeros([BLOCK], tl.int32)
    for b in tl.static_range(NUM_BOUNDS):
        level += (area >= tl.load(thresholds_ptr + b)).to(tl.int32)
    matched = (area >= 0) & (level < num_levels)
    out = out_rois_ptr + k.to(tl.int64) * 5
    tl.store(out, tl.where(matched, batch, -1.0), mask=mask)
    tl.store(out + 1, x1, mask=mask)
    tl.store(out + 2, y1, mask=mask)
    tl.store(out + 3, x2, mask=mask)
    tl.store(out + 4, y2, mask=mask)
    tl.store(levels_ptr + k, tl.where(matched, level, 0).to(tl.int64), mask=mask)


# --------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------
def _accumulation(features) -> tuple[torch.dtype, object]:
    """(torch, Triton) accumulation dtypes of the features (segops' one rule)."""
    return accumulation_dtype(features[0].dtype), tl_accumulation(features[0].dtype)


def _level_table(tensors) -> torch.Tensor:
    """(L, 6) int64 on the device: H, W and the (n, c, h, w) strides of each
    level. It holds no addresses (those are kernel arguments, ``_pointers``),
    so it is built once per layout."""
    rows = tuple((t.shape[2], t.shape[3], *_strides(t)) for t in tensors)
    return device_table(rows, torch.int64, tensors[0].device)


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """t's (n, c, h, w) strides with 0 for a size-1 n, h or w, whose only
    index the kernels use is 0 (PyTorch gives such a dim any stride: a
    channels_last 1x1 map has h and w strides of 1, which would cost a
    multi-level launch its vector accesses)."""
    n, c, h, w = t.stride()
    return (n if t.shape[0] > 1 else 0, c, h if t.shape[2] > 1 else 0,
            w if t.shape[3] > 1 else 0)


def _pointers(tensors) -> tuple[torch.Tensor, ...]:
    """The level maps as a tuple kernel argument. An empty map (no element
    is ever addressed: H or W is 0) stands in as a non-empty one, since a
    null pointer is not a valid argument."""
    filler = next((t for t in tensors if t.numel() > 0), tensors[0])
    return tuple(t if t.numel() > 0 else filler for t in tensors)


def _vector_width(tensors, C: int) -> int:
    """VEC for the kernels: the channels of one 16-byte vector when every
    access to ``tensors`` (the level maps, and gradient buffers) provably
    splits into aligned vectors of them: channels_last, C and the n, h, w
    strides multiples of it (a size-1 dim's stride counts as 0,
    ``_strides``), 16-byte-aligned addresses. Else 1 (scalar accesses):
    NCHW, other channel counts or strides, offset views."""
    vec = 16 // tensors[0].element_size()
    return vec if C % vec == 0 and all(_splits_into(t, vec) for t in tensors) else 1


def _splits_into(t: torch.Tensor, vec: int) -> bool:
    """Whether every access to t's channels splits into aligned vectors of vec."""
    n, c, h, w = _strides(t)
    return c == 1 and t.data_ptr() % 16 == 0 and all(s % vec == 0 for s in (n, h, w))


def _tile(C: int, P: int, channels_last: bool, block_c, block_p) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_P), ~1024 elements. Channels_last: every channel up
    to 256 (contiguous, vectorised loads) and the bins in blocks that waste
    the fewest lanes (``_bin_block``: 4 for 7x7, where 16 left 23% masked);
    NCHW: wide in the bins of one channel plane, [16, 64]. On 7x7 bins that
    masks 15 of 64 lanes, but a thread's channels share each bin's sample
    coordinates, weights and indices: a flat tile of (channel, bin) pairs,
    no lane masked, compiled to 107 registers against 64 (2 against 4
    CTAs/SM, bf16 forward, triton 3.8) and [256, 4] (6% masked) to 77 (3
    CTAs/SM). Which is faster is for a GPU to say."""
    if channels_last:
        bc = block_c or block_size(C, 256)
        bp = block_p or _bin_block(P, max(1024 // bc, 1))
    else:
        bp = block_p or block_size(P, 64)
        bc = block_c or block_size(C, max(1024 // bp, 1))
    return bc, bp


@functools.lru_cache(maxsize=None)
def _bin_block(P: int, most: int) -> int:
    """The largest power of 2 up to ``most`` whose blocks cover the P bins
    with at most P / 16 lanes masked, else the one that masks fewest."""
    sizes = [b for b in (1 << i for i in range(11)) if b <= max(most, 1)]
    masked = {b: cdiv(P, b) * b - P for b in sizes}
    good = [b for b in sizes if masked[b] * 16 <= P]
    return max(good) if good else min(sizes, key=lambda b: (masked[b], -b))


def casts_exactly(dtype: torch.dtype, features) -> bool:
    """Whether rois of ``dtype`` keep every value in the kernels' coordinate
    dtype (the features' accumulation dtype): a float no wider than it."""
    return (dtype.is_floating_point
            and torch.finfo(dtype).bits <= torch.finfo(_accumulation(features)[0]).bits)


def _common(features, rois, levels, scales):
    acc_dtype, acc = _accumulation(features)
    rois = rois.to(acc_dtype).contiguous()
    scale_table = device_table(tuple(scales), acc_dtype, rois.device)
    level_arg = rois if levels is None else levels.contiguous()
    return acc_dtype, acc, rois, scale_table, level_arg


def _warps(channels_last: bool, spills_at_8: bool = False) -> int:
    """num_warps: 4 in channels_last; 8 in NCHW, where each element of a
    thread's share of the tile carries its own 64-bit gather addresses (at 4
    warps the NCHW kernels took 96-244 registers under triton 3.8 and
    147-184 under 3.6; at 8, 57-128 and no spills). ``spills_at_8``: the
    max-pool gather, which ptxas holds to 128 registers at 8 warps with ~50
    spill instructions (see ``_gather_channels`` for 4)."""
    return 4 if channels_last or spills_at_8 else 8


def _gather_channels(channels_last: bool, pool_mode: str) -> int:
    """The deterministic backward's largest channel block: 32, but 16 for
    max pooling in NCHW, where each thread keeps every channel's argmax
    search (value, coordinates, addresses) of its pixel column: at 32
    channels 254 registers and 12-18 spill instructions under triton 3.8
    (244-254 and none under 3.6: 2 CTAs per SM), at 16 128-167 registers
    (117-126) and no spills (sm_90; compiled, not timed). In channels_last
    16 spills more than 32 under 3.6."""
    return 16 if pool_mode == "max" and not channels_last else 32


def roi_align_forward(features, rois, levels, scales, pooled_height: int, pooled_width: int,
                      sampling_ratio: int, aligned: bool, pool_mode: str, *,
                      block_c: int | None = None, block_p: int | None = None,
                      bad_batch: torch.Tensor | None = None) -> torch.Tensor:
    """(K, C, PH, PW) in the first level's dtype and memory format.
    ``bad_batch``: a zeroed int32 tensor, set to 1 when a batch index is not
    an integer in [0, N); the rois must cast exactly (``casts_exactly``) and
    the output must have elements (C > 0) when K > 0."""
    K, C, N = rois.shape[0], features[0].shape[1], features[0].shape[0]
    out = empty((K, C, pooled_height, pooled_width), dtype=features[0].dtype,
                device=features[0].device, memory_format=memory_format_of(features[0]))
    if bad_batch is not None and not casts_exactly(rois.dtype, features):
        raise ValueError("bad_batch needs rois that the accumulation dtype holds exactly: "
                         "a narrowing cast could round 1 + 1e-10 to an integer")
    if bad_batch is not None and out.numel() == 0 and K > 0:
        raise ValueError("bad_batch needs an output with elements: no program runs for an "
                         "empty one (0 channels), so nothing would set the flag")
    if out.numel() == 0:
        return out
    _, acc, rois, scale_table, level_arg = _common(features, rois, levels, scales)
    check_batch = bad_batch is not None
    channels_last = all(f.stride(1) == 1 for f in features)
    P = pooled_height * pooled_width
    bc, bp = _tile(C, P, channels_last, block_c, block_p)
    grid = (K, cdiv(C, bc), cdiv(P, bp))
    _roi_align_fwd_kernel[grid](
        _pointers(features), rois, level_arg, _level_table(features), scale_table, out,
        bad_batch if check_batch else out,
        C, pooled_height, pooled_width, N, sampling_ratio,
        *out.stride(),
        ALIGNED=aligned, ADAPTIVE=sampling_ratio <= 0, MAX_POOL=pool_mode == "max",
        HAS_LEVELS=levels is not None, CHECK_BATCH=check_batch,
        CHANNELS_LAST=channels_last, VEC=_vector_width(features, C), BLOCK_C=bc, BLOCK_P=bp,
        ACC=acc, num_warps=_warps(channels_last),
    )
    return out


def _grad_buffers(features, dtype: torch.dtype) -> list[torch.Tensor]:
    return [empty(f.shape, dtype=dtype, device=f.device, memory_format=memory_format_of(f))
            for f in features]


def roi_align_backward_atomic(grad, features, rois, levels, scales, pooled_height: int,
                              pooled_width: int, sampling_ratio: int, aligned: bool,
                              pool_mode: str, *, block_c: int | None = None,
                              block_p: int | None = None) -> list[torch.Tensor]:
    """Gradients for every level: atomic adds into float32 (float64 for
    float64 input) buffers, then a cast to the features' dtype."""
    acc_dtype, acc, rois, scale_table, level_arg = _common(features, rois, levels, scales)
    buffers = [b.zero_() for b in _grad_buffers(features, acc_dtype)]
    K, C, N = rois.shape[0], features[0].shape[1], features[0].shape[0]
    if grad.numel() > 0 and any(b.numel() > 0 for b in buffers):
        channels_last = all(t.stride(1) == 1 for t in (*features, *buffers))
        P = pooled_height * pooled_width
        bc, bp = _tile(C, P, channels_last, block_c, block_p)
        grid = (K, cdiv(C, bc), cdiv(P, bp))
        _roi_align_bwd_atomic_kernel[grid](
            grad, _pointers(features), rois, level_arg, _level_table(features),
            _level_table(buffers), scale_table, _pointers(buffers),
            C, pooled_height, pooled_width, N, sampling_ratio,
            *grad.stride(),
            ALIGNED=aligned, ADAPTIVE=sampling_ratio <= 0, MAX_POOL=pool_mode == "max",
            HAS_LEVELS=levels is not None,
            CHANNELS_LAST=channels_last, VEC=_vector_width((*features, *buffers), C),
            BLOCK_C=bc, BLOCK_P=bp, ACC=acc, num_warps=_warps(channels_last),
        )
    return [b.to(f.dtype) for b, f in zip(buffers, features)]


def _segments(rois, levels, num_levels: int, N: int):
    """RoI order sorted by (level, image), stable, the (L*N + 1) offsets of
    each (level, image) segment in it, and each position's segment
    (level * N + image)."""
    image = rois[:, 0].to(torch.int64).clamp(0, max(N - 1, 0))
    key = image if levels is None else levels.to(torch.int64) * N + image
    sorted_key, order = torch.sort(key, stable=True)
    bounds = torch.arange(num_levels * N + 1, device=rois.device, dtype=torch.int64)
    return order, torch.searchsorted(sorted_key, bounds), sorted_key


def _roi_reach(rois, levels, scale_table, order) -> torch.Tensor:
    """(K, 4): y_lo, y_hi, x_lo, x_hi per RoI in the gather order, a box in
    its level's pixels holding every pixel its samples can touch: the RoI
    times its scale, 2 pixels wider each way (aligned's half-pixel shift, a
    non-aligned RoI's 1-pixel minimum size, the bilinear neighbour)."""
    scale = scale_table[0] if levels is None else scale_table[levels.to(torch.int64)[order]]
    boxes = rois[order, 1:] * (scale if levels is None else scale[:, None])
    x, y = boxes[:, 0::2], boxes[:, 1::2]
    return torch.stack([y.amin(1) - 2, y.amax(1) + 2, x.amin(1) - 2, x.amax(1) + 2], 1)


# the most (RoI, row of tiles) entries the row-band schedule lists: its
# temporaries (int32 rows and keys, a mask, the sort's int64 indices and
# scratch) take about 40 bytes an entry, 170 MB at the cap; past it, and
# where every level is one row of tiles (the bands are the segments), the
# segment scan
MAX_BAND_ENTRIES = 1 << 22


def _row_bands(segment_of, reach, features, N: int, tile_h: int):
    """(entries, bucket offsets, band numbering) for the row-band schedule,
    or None for the segment scan (see MAX_BAND_ENTRIES). ``segment_of``:
    each position's level * N + image (``_segments``). A bucket is a
    (level, image, row of tiles) band; bucket = bands[level] + image *
    rows(level) + row. Each RoI (by position in the gather order) is listed in every band of its level and
    image that its reach's rows [y_lo, y_hi] meet (a NaN reach: none; such
    a RoI pools nothing), in increasing position: a stable sort of the
    band keys laid out position-major. Every RoI a tile's reach test keeps
    is in its band (y_lo <= the band's last row and y_hi >= its first), so
    the gather sums the same RoIs in the same order as the segment scan,
    scanning a band's RoIs instead of its whole image's."""
    rows = [cdiv(f.shape[2], tile_h) for f in features]
    most = max(rows)
    K = segment_of.shape[0]
    total = N * sum(rows)
    if K * most > MAX_BAND_ENTRIES or most <= 1 or total + most >= 2**31:
        return None
    device = segment_of.device
    bands = device_table(tuple(itertools.accumulate((0, *rows[:-1]), lambda a, r: a + N * r)),
                         torch.int64, device)
    level = torch.div(segment_of, N, rounding_mode="floor")
    own_rows = device_table(tuple(rows), torch.int64, device)[level]
    image = segment_of - level * N
    first = torch.nan_to_num(torch.floor(reach[:, 0] / tile_h), nan=most).clamp(0, most)
    last = torch.nan_to_num(torch.floor(reach[:, 1] / tile_h), nan=-1).clamp(-1, most - 1)
    last = torch.minimum(last.to(torch.int64), own_rows - 1)
    row = first.to(torch.int32)[:, None] + torch.arange(most, device=device, dtype=torch.int32)
    start = (bands[level] + image * own_rows).to(torch.int32)
    key = torch.where(row <= last[:, None], start[:, None] + row, total)   # int32: checked
    del row
    sorted_key, entry = torch.sort(key.flatten(), stable=True)
    del key
    bounds = torch.searchsorted(sorted_key, torch.arange(total + 1, device=device,
                                                         dtype=torch.int32))
    return torch.div(entry, most, rounding_mode="floor"), bounds, bands


def roi_align_backward_deterministic(grad, features, rois, levels, scales,
                                     pooled_height: int, pooled_width: int,
                                     sampling_ratio: int, aligned: bool, pool_mode: str, *,
                                     tile: tuple[int, int] = (8, 8),
                                     block_c: int | None = None,
                                     row_bands: bool = True) -> list[torch.Tensor]:
    """Gradients for every level without atomics: bit-identical run to run.
    ``row_bands``: each tile scans the RoIs of its row of tiles
    (``_row_bands``), else of its whole (level, image) segment; the sums are
    the same bit for bit."""
    _, acc, rois, scale_table, _ = _common(features, rois, levels, scales)
    buffers = _grad_buffers(features, features[0].dtype)
    C, N = features[0].shape[1], features[0].shape[0]
    tile_h, tile_w = tile
    counts = [N * cdiv(f.shape[2], tile_h) * cdiv(f.shape[3], tile_w)
              for f in features]
    total = sum(counts)
    if total == 0 or C == 0:
        return buffers
    prefix = device_table((0, *itertools.accumulate(counts)), torch.int64, rois.device)
    order, segments, segment_of = _segments(rois, levels, len(features), N)
    reach = _roi_reach(rois, levels, scale_table, order)
    banded = _row_bands(segment_of, reach, features, N, tile_h) if row_bands else None
    entries, buckets, bands = banded if banded is not None else (order, segments, prefix)
    channels_last = all(t.stride(1) == 1 for t in (*features, *buffers))
    bc = block_c or block_size(C, _gather_channels(channels_last, pool_mode))
    grid = (total, cdiv(C, bc))
    _roi_align_bwd_deterministic_kernel[grid](
        grad, _pointers(features), rois, order, reach, entries, buckets, bands, prefix,
        _level_table(features), _level_table(buffers), scale_table, _pointers(buffers),
        C, pooled_height, pooled_width, N, sampling_ratio,
        *grad.stride(),
        ALIGNED=aligned, ADAPTIVE=sampling_ratio <= 0, MAX_POOL=pool_mode == "max",
        CHANNELS_LAST=channels_last, ROW_BANDS=banded is not None,
        VEC=_vector_width((*features, *buffers), C), TILE_H=tile_h, TILE_W=tile_w, BLOCK_C=bc,
        ACC=acc, num_warps=_warps(channels_last, spills_at_8=pool_mode == "max"),
    )
    return buffers


def roi_levels(rois: torch.Tensor, thresholds: torch.Tensor,
               num_levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rois, levels) for ``num_levels`` maps: ``rois`` (K, 5) float32 or
    float64, any strides, copied contiguous with the batch index of each
    RoI that matches no map set to -1; ``levels`` (K,) int64. ``thresholds``
    (B,) in the rois' dtype, ascending: the smallest area of each level
    index 1..B (segops.ops.roi_align builds them from the reference)."""
    K = rois.shape[0]
    out = empty((K, 5), dtype=rois.dtype, device=rois.device)
    levels = empty((K,), dtype=torch.int64, device=rois.device)
    if K:
        block = 256
        _roi_levels_kernel[(cdiv(K, block),)](
            rois, thresholds if thresholds.numel() else rois, out, levels,
            K, num_levels, *rois.stride(),
            NUM_BOUNDS=thresholds.numel(), BLOCK=block, num_warps=4,
        )
    return out, levels
