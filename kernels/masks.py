"""Mask R-CNN's mask post-processing and mask targets.

Two kernels:

* ``_paste_masks_kernel``: torchvision's ``paste_masks_in_image`` for every
  mask in one launch. One program per (mask, tile of image pixels). Each
  program expands its mask's box by the padding scale (torchvision's
  ``expand_boxes``, in the boxes' precision), truncates it to integers, and
  for each output pixel inside the truncated box computes the source
  coordinate in the zero-padded mask directly with
  ``F.interpolate(bilinear, align_corners=False)``'s arithmetic (so neither
  the padded nor the resized mask is ever built). Tiles that miss the box
  only write zeros. An optional threshold writes ``value > threshold`` as
  bool instead of the float value.
* ``_mask_targets_kernel``: torchvision's ``project_masks_on_boxes``:
  RoIAlign (spatial scale 1, adaptive sampling, aligned=False) of GT mask
  ``matched_idxs[k]`` over RoI ``k``, reading uint8 (bool as uint8) or float
  masks as they are; bilinear weights and sums in float32 (float64 for
  float64 RoIs). One program per (RoI, block of output bins).

The paste kernel is compiled without floating-point contraction
(``enable_fp_fusion=False``): torchvision computes the box expansion in
separate element-wise kernels, and an FMA could move an expanded corner
across an integer, which truncation turns into a one-pixel shift.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._layout import block_size, cdiv, check_grid, double_bits, empty, tl_accumulation
from ._math import div
from .roi_align import _adaptive_grid, _bilinear, _fitting_grid, _sample_coord

# box coordinates are clamped to +-2^40 before the int64 cast: far past any
# image (torchvision would try to allocate a mask that size), and safe to cast
_COORD_LIMIT = tl.constexpr(float(1 << 40))


# --------------------------------------------------------------------------
# paste
# --------------------------------------------------------------------------
@triton.jit
def _expand_and_truncate(boxes_ptr, n, stride_bn, stride_bc, MW, padding,
                         BOX_ACC: tl.constexpr):
    """torchvision's expand_boxes(box, (MW + 2p) / MW).to(int64) for box n,
    and whether every coordinate is finite."""
    row = boxes_ptr + n.to(tl.int64) * stride_bn
    x0 = tl.load(row).to(BOX_ACC)
    y0 = tl.load(row + stride_bc).to(BOX_ACC)
    x1 = tl.load(row + 2 * stride_bc).to(BOX_ACC)
    y1 = tl.load(row + 3 * stride_bc).to(BOX_ACC)
    inf = float("inf")
    finite = (tl.abs(x0) < inf) & (tl.abs(y0) < inf) & (tl.abs(x1) < inf) & (tl.abs(y1) < inf)
    # expand_masks' scale: float(M + 2 * padding) / M, M the mask's width
    scale = div(tl.cast(MW + 2 * padding, BOX_ACC), tl.cast(MW, BOX_ACC))
    w_half = (x1 - x0) * 0.5
    h_half = (y1 - y0) * 0.5
    x_c = (x1 + x0) * 0.5
    y_c = (y1 + y0) * 0.5
    w_half = w_half * scale
    h_half = h_half * scale
    lo = -_COORD_LIMIT
    hi = _COORD_LIMIT
    # .to(int64) truncates toward zero (-0.7 -> 0), as torch's cast does
    b0 = tl.minimum(tl.maximum(x_c - w_half, lo), hi).to(tl.int64)
    b1 = tl.minimum(tl.maximum(y_c - h_half, lo), hi).to(tl.int64)
    b2 = tl.minimum(tl.maximum(x_c + w_half, lo), hi).to(tl.int64)
    b3 = tl.minimum(tl.maximum(y_c + h_half, lo), hi).to(tl.int64)
    return b0, b1, b2, b3, finite


@triton.jit
def _source_axis(dst, size, in_size, ACC: tl.constexpr):
    """F.interpolate(bilinear, align_corners=False) along one axis: for output
    indices ``dst`` of an axis resized from ``in_size`` to ``size``, the low
    and high input index and their weights (ATen's
    area_pixel_compute_source_index and its edge rule)."""
    scale = div(tl.cast(in_size, ACC), tl.cast(size, ACC))
    # ATen rounds dst + 0.5 to ACC (not exact from 2^24 on in float32), then
    # evaluates scale * (dst + 0.5) - 0.5 with a fused multiply-add (nvcc,
    # and gcc's contraction on the CPU): float64 reproduces that for float32
    # (the product is exact in it) in the compiler and the interpreter
    src = (tl.cast(scale, tl.float64) * tl.cast(tl.cast(dst, ACC) + 0.5, tl.float64)
           - 0.5).to(ACC)
    src = tl.where(src < 0.0, 0.0, src)
    low = tl.minimum(src.to(tl.int64), in_size - 1)  # src >= 0: the cast is floor
    high = low + tl.where(low < in_size - 1, 1, 0)
    lam = src - tl.cast(low, ACC)
    return low, high, 1.0 - lam, lam


@triton.jit
def _padded_tap(mask_plane, r, c, MH, MW, padding, stride_mh, stride_mw, active):
    """Value at (r, c) of the mask zero-padded by ``padding`` on every side."""
    r = r - padding
    c = c - padding
    ok = active & (r >= 0) & (r < MH) & (c >= 0) & (c < MW)
    return tl.load(mask_plane + r * stride_mh + c * stride_mw, mask=ok, other=0.0)


# W is specialised (divisible by 16 or not): rows of such a width start
# 16-byte aligned, and the float output is written with 128-bit stores
@triton.jit(do_not_specialize=["H", "MH", "MW", "padding", "t_bits_hi", "t_bits_lo"])
def _paste_masks_kernel(
    masks_ptr, boxes_ptr, out_ptr, H, W, MH, MW, padding,
    t_float, t_bits_hi, t_bits_lo,
    stride_mn, stride_mh, stride_mw, stride_bn, stride_bc,
    THRESHOLD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    ACC: tl.constexpr, BOX_ACC: tl.constexpr,
):
    n = tl.program_id(0)
    row0 = tl.program_id(1) * BLOCK_H
    col0 = tl.program_id(2) * BLOCK_W
    rows = row0 + tl.arange(0, BLOCK_H)
    cols = col0 + tl.arange(0, BLOCK_W)
    b0, b1, b2, b3, finite = _expand_and_truncate(boxes_ptr, n, stride_bn, stride_bc, MW,
                                                  padding, BOX_ACC)
    # the resized mask's size: max(x1 - x0 + 1, 1) by max(y1 - y0 + 1, 1)
    out_w = tl.maximum(b2 - b0 + 1, 1)
    out_h = tl.maximum(b3 - b1 + 1, 1)
    val = tl.zeros([BLOCK_H, BLOCK_W], ACC)
    # pixels x0 <= x <= x1, y0 <= y <= y1 (clipped to the image) get the
    # resized mask's (y - y0, x - x0); a reversed box pastes nothing
    hit = finite & (b0 < col0 + BLOCK_W) & (b2 >= col0) & (b1 < row0 + BLOCK_H) & (b3 >= row0)
    if hit:
        in_x = (cols >= b0) & (cols <= b2)
        in_y = (rows >= b1) & (rows <= b3)
        inside = in_y[:, None] & in_x[None, :]
        x_lo, x_hi, wx0, wx1 = _source_axis(cols - b0, out_w, MW + 2 * padding, ACC)
        y_lo, y_hi, wy0, wy1 = _source_axis(rows - b1, out_h, MH + 2 * padding, ACC)
        plane = masks_ptr + n.to(tl.int64) * stride_mn
        v00 = _padded_tap(plane, y_lo[:, None], x_lo[None, :], MH, MW, padding, stride_mh,
                          stride_mw, inside).to(ACC)
        v01 = _padded_tap(plane, y_lo[:, None], x_hi[None, :], MH, MW, padding, stride_mh,
                          stride_mw, inside).to(ACC)
        v10 = _padded_tap(plane, y_hi[:, None], x_lo[None, :], MH, MW, padding, stride_mh,
                          stride_mw, inside).to(ACC)
        v11 = _padded_tap(plane, y_hi[:, None], x_hi[None, :], MH, MW, padding, stride_mh,
                          stride_mw, inside).to(ACC)
        interp = (wy0[:, None] * (wx0[None, :] * v00 + wx1[None, :] * v01)
                  + wy1[:, None] * (wx0[None, :] * v10 + wx1[None, :] * v11))
        val = tl.where(inside, interp, 0.0)

    out = (out_ptr + n.to(tl.int64) * H * W
           + (rows.to(tl.int64) * W)[:, None] + cols[None, :])
    store_mask = (rows < H)[:, None] & (cols < W)[None, :]
    MASK_DT: tl.constexpr = masks_ptr.dtype.element_ty
    if THRESHOLD:
        # torchvision's result (in the mask dtype) > threshold (a Python
        # float, which torch casts to the mask dtype). For float64 masks the
        # threshold comes as its 64 bits in two int32 halves (a float
        # argument is float32); otherwise t_float is already cast to the mask
        # dtype on the host, and both sides compare in float32 (exact: no
        # float64 -> bf16 cast, no bf16 comparison, neither of which the
        # interpreter gets right)
        if MASK_DT == tl.float64:
            bits = (t_bits_hi.to(tl.int64) << 32) | (t_bits_lo.to(tl.int64) & 0xFFFFFFFF)
            above = val.to(tl.float64) > bits.to(tl.float64, bitcast=True)
        else:
            above = val.to(MASK_DT).to(tl.float32) > t_float
        tl.store(out, above.to(tl.uint8), mask=store_mask)
    else:
        tl.store(out, val.to(MASK_DT), mask=store_mask)


def _threshold_args(threshold: float, dtype: torch.dtype) -> tuple[float, int, int]:
    """(t_float, t_bits_hi, t_bits_lo): the threshold as the masks' dtype
    compares it. float64: its bits, high and low 32 as signed int32 (any
    double, 1e300 and 1e-300 too); otherwise cast to ``dtype`` as torch
    casts a Python scalar, which float32 holds exactly."""
    if dtype != torch.float64:
        return float(torch.tensor(threshold, dtype=torch.float64).to(dtype)), 0, 0
    bits = double_bits(threshold)
    low = bits & 0xFFFFFFFF
    return 0.0, bits >> 32, low - (1 << 32) if low >= 1 << 31 else low


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, image_height: int, image_width: int,
                padding: int, threshold: float | None, *, block_h: int | None = None,
                block_w: int | None = None, num_warps: int = 4) -> torch.Tensor:
    """(N, 1, H, W): masks (N, 1, MH, MW) pasted into their boxes (N, 4);
    float in the masks' dtype, or bool (value > threshold)."""
    N, _, MH, MW = masks.shape
    H, W = image_height, image_width
    dtype = torch.bool if threshold is not None else masks.dtype
    out = empty((N, 1, H, W), dtype=dtype, device=masks.device)
    if out.numel() == 0:
        return out
    bh = block_h or block_size(H, 8)
    bw = block_w or block_size(W, 128)
    grid = (N, cdiv(H, bh), cdiv(W, bw))
    check_grid(grid)
    parts = _threshold_args(threshold, masks.dtype) if threshold is not None else (0.0, 0, 0)
    _paste_masks_kernel[grid](
        masks, boxes, out.view(torch.uint8) if threshold is not None else out,
        H, W, MH, MW, padding, *parts,
        masks.stride(0), masks.stride(2), masks.stride(3), boxes.stride(0), boxes.stride(1),
        THRESHOLD=threshold is not None, BLOCK_H=bh, BLOCK_W=bw,
        ACC=tl_accumulation(masks.dtype), BOX_ACC=tl_accumulation(boxes.dtype),
        num_warps=num_warps, enable_fp_fusion=False,
    )
    return out


# --------------------------------------------------------------------------
# mask targets
# --------------------------------------------------------------------------
@triton.jit(do_not_specialize=["G", "H", "W", "M"])
def _mask_targets_kernel(
    gt_ptr, rois_ptr, idx_ptr, out_ptr, G, H, W, M,
    stride_gg, stride_gh, stride_gw, stride_rk, stride_rc, stride_ik,
    BLOCK_P: tl.constexpr, ACC: tl.constexpr,
):
    k = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = offs < M * M
    ph = offs // M
    pw = offs % M
    roi = rois_ptr + k.to(tl.int64) * stride_rk
    x1 = tl.load(roi).to(ACC)
    y1 = tl.load(roi + stride_rc).to(ACC)
    x2 = tl.load(roi + 2 * stride_rc).to(ACC)
    y2 = tl.load(roi + 3 * stride_rc).to(ACC)
    g = tl.load(idx_ptr + k.to(tl.int64) * stride_ik).to(tl.int64)
    inf = float("inf")
    valid = (tl.abs(x1) < inf) & (tl.abs(y1) < inf) & (tl.abs(x2) < inf) & (tl.abs(y2) < inf)
    valid = valid & (g >= 0) & (g < G)
    # roi_align, spatial_scale 1, aligned=False: RoIs at least 1 x 1
    roi_w = tl.maximum(x2 - x1, 1.0)
    roi_h = tl.maximum(y2 - y1, 1.0)
    bin_h = roi_h / tl.cast(M, ACC)
    bin_w = roi_w / tl.cast(M, ACC)
    grid_h, grid_w = _fitting_grid(tl.where(valid, _adaptive_grid(roi_h, M), 0),
                                   tl.where(valid, _adaptive_grid(roi_w, M), 0))
    plane = gt_ptr + tl.where(valid, g, 0) * stride_gg
    acc = tl.zeros([BLOCK_P], ACC)
    for iy in range(0, grid_h):
        y = _sample_coord(y1, ph, bin_h, iy, grid_h, ACC)
        for ix in range(0, grid_w):
            x = _sample_coord(x1, pw, bin_w, ix, grid_w, ACC)
            acc += _bilinear(plane, y, x, H, W, stride_gh, stride_gw, pmask, ACC)
    result = acc / tl.cast(tl.maximum(grid_h * grid_w, 1), ACC)
    tl.store(out_ptr + k.to(tl.int64) * M * M + offs, result.to(out_ptr.dtype.element_ty),
             mask=pmask)


def mask_targets(gt_masks: torch.Tensor, rois: torch.Tensor, matched_idxs: torch.Tensor,
                 M: int, out_dtype: torch.dtype, *, block_p: int | None = None,
                 num_warps: int = 4) -> torch.Tensor:
    """(K, M, M) in ``out_dtype`` (float32 or float64, also the accumulation
    dtype): RoIAlign of gt_masks[matched_idxs[k]] (G, H, W; uint8, bool or
    float, any strides) over rois[k] (K, 4)."""
    K = rois.shape[0]
    G, H, W = gt_masks.shape
    out = empty((K, M, M), dtype=out_dtype, device=rois.device)
    if out.numel() == 0:
        return out
    if G == 0 or H == 0 or W == 0:
        return out.zero_()
    if gt_masks.dtype == torch.bool:
        gt_masks = gt_masks.view(torch.uint8)  # same bytes, no copy
    bp = block_p or block_size(M * M, 256)
    grid = (K, cdiv(M * M, bp))
    check_grid(grid)
    _mask_targets_kernel[grid](
        gt_masks, rois, matched_idxs, out, G, H, W, M,
        *gt_masks.stride(), *rois.stride(), matched_idxs.stride(0),
        BLOCK_P=bp, ACC=tl_accumulation(out_dtype), num_warps=num_warps,
    )
    return out
