"""Pure-PyTorch mask pasting and mask targets: the CPU path and the test
oracle of the kernels in ``segops.kernels.masks``.

Semantics are torchvision's (``roi_heads.paste_masks_in_image`` and
``roi_heads.project_masks_on_boxes``; see ``segops.ops.masks``), written
out step by step: the padded mask and the resized mask are built here, as
torchvision does, where the kernel computes each pixel's source directly
(so does this module for a box whose resized mask would pass RESIZE_LIMIT
pixels).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import roi_align as roi_align_reference
from .._checks import accumulation_dtype

# see kernels/masks.py: box coordinates are clamped to +-2^40 before the cast
COORD_LIMIT = float(1 << 40)
# a box whose resized mask has more pixels pastes only its part in the image
RESIZE_LIMIT = 1 << 24


def box_dtype(dtype: torch.dtype) -> torch.dtype:
    """The box arithmetic's dtype: float64 for float64 boxes, else float32."""
    return accumulation_dtype(dtype)


def expanded_int_boxes(boxes: Tensor, mask_width: int, padding: int) -> tuple[Tensor, Tensor]:
    """torchvision's ``expand_boxes(boxes, (M + 2p) / M).to(torch.int64)``
    (M the masks' width), computed in ``box_dtype``; and which boxes are
    finite (the others paste nothing)."""
    boxes = boxes.to(box_dtype(boxes.dtype))
    scale = float(mask_width + 2 * padding) / mask_width
    w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5
    h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5
    x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
    y_c = (boxes[:, 3] + boxes[:, 1]) * 0.5
    w_half = w_half * scale
    h_half = h_half * scale
    expanded = torch.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], dim=1)
    finite = torch.isfinite(boxes).all(dim=1)
    expanded = torch.where(finite[:, None], expanded, 0.0)
    return expanded.clamp(-COORD_LIMIT, COORD_LIMIT).to(torch.int64), finite


def paste_one(mask: Tensor, box: list[int], im_h: int, im_w: int, padding: int) -> Tensor:
    """One (MH, MW) mask pasted into integer box (x0, y0, x1, y1) of an
    (im_h, im_w) image, in the mask's dtype (computed in float32, float64
    for float64)."""
    acc = accumulation_dtype(mask.dtype)
    out = torch.zeros((im_h, im_w), dtype=acc, device=mask.device)
    x0, y0, x1, y1 = box
    # the part of the box inside the image (a reversed box has none)
    cx0, cx1 = max(x0, 0), min(x1 + 1, im_w)
    cy0, cy1 = max(y0, 0), min(y1 + 1, im_h)
    if cx0 >= cx1 or cy0 >= cy1:
        return out.to(mask.dtype)
    w = max(x1 - x0 + 1, 1)
    h = max(y1 - y0 + 1, 1)
    padded = F.pad(mask.to(acc), (padding,) * 4)
    if h * w <= RESIZE_LIMIT:
        resized = F.interpolate(padded[None, None], size=(h, w), mode="bilinear",
                                align_corners=False)[0, 0]
        out[cy0:cy1, cx0:cx1] = resized[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
    else:
        out[cy0:cy1, cx0:cx1] = _resized_window(padded, h, w, range(cy0 - y0, cy1 - y0),
                                                range(cx0 - x0, cx1 - x0))
    return out.to(mask.dtype)


def _source_axis(dst: Tensor, size: int, in_size: int, acc: torch.dtype):
    """ATen's bilinear source of output indices ``dst`` along an axis resized
    from ``in_size`` to ``size`` (align_corners=False): low and high input
    index and their weights. dst + 0.5 is rounded to ``acc`` (inexact from
    2^24 on in float32), then scale * (dst + 0.5) - 0.5 is evaluated in
    float64, as ATen's fused multiply-add gives it for float32."""
    scale = torch.tensor(in_size, dtype=acc) / torch.tensor(size, dtype=acc)
    scale = scale.to(dst.device)
    src = (scale.double() * (dst.to(acc) + 0.5).double() - 0.5).to(acc).clamp(min=0)
    low = src.to(torch.int64).clamp(max=in_size - 1)  # src >= 0: the cast is floor
    high = low + (low < in_size - 1).to(torch.int64)
    lam = src - low.to(acc)
    return low, high, 1 - lam, lam


def _resized_window(padded: Tensor, h: int, w: int, rows: range, cols: range) -> Tensor:
    """Rows ``rows`` and columns ``cols`` of ``padded`` resized to (h, w) as
    F.interpolate(bilinear, align_corners=False) gives them, without
    building the (h, w) resize (a huge box's would not fit in memory)."""
    acc = padded.dtype
    device = padded.device
    y_lo, y_hi, wy0, wy1 = _source_axis(torch.arange(rows.start, rows.stop, device=device), h,
                                        padded.shape[0], acc)
    x_lo, x_hi, wx0, wx1 = _source_axis(torch.arange(cols.start, cols.stop, device=device), w,
                                        padded.shape[1], acc)
    top = wx0 * padded[y_lo][:, x_lo] + wx1 * padded[y_lo][:, x_hi]
    bottom = wx0 * padded[y_hi][:, x_lo] + wx1 * padded[y_hi][:, x_hi]
    return wy0[:, None] * top + wy1[:, None] * bottom


def paste_masks(masks: Tensor, boxes: Tensor, image_height: int, image_width: int,
                padding: int, threshold: float | None) -> Tensor:
    """(N, 1, H, W): each masks[i, 0] (MH, MW) pasted into its expanded,
    truncated box, in the masks' dtype, or ``> threshold`` as bool."""
    if masks.shape[0] == 0:  # (the masks' width may be 0 then)
        out = masks.new_zeros((0, 1, image_height, image_width))
        return out > threshold if threshold is not None else out
    int_boxes, finite = expanded_int_boxes(boxes, masks.shape[-1], padding)
    rows = []
    for i, (box, ok) in enumerate(zip(int_boxes.tolist(), finite.tolist())):
        if ok:
            rows.append(paste_one(masks[i, 0], box, image_height, image_width, padding))
        else:
            rows.append(masks.new_zeros((image_height, image_width)))
    out = torch.stack(rows)[:, None]
    if threshold is not None:
        return out > threshold
    return out


def mask_targets(gt_masks: Tensor, rois: Tensor, matched_idxs: Tensor, M: int,
                 out_dtype: torch.dtype) -> Tensor:
    """(K, M, M): roi_align(gt_masks[:, None] as float, (matched_idxs, rois),
    (M, M), spatial_scale 1, sampling_ratio -1, aligned False)[:, 0], in
    ``out_dtype``. A RoI whose index is outside [0, G) gives zeros."""
    K = rois.shape[0]
    if K == 0 or 0 in gt_masks.shape:
        return torch.zeros((K, M, M), dtype=out_dtype, device=rois.device)
    features = gt_masks[:, None].to(out_dtype)
    batch = matched_idxs.to(out_dtype)[:, None]
    full_rois = torch.cat([batch, rois.to(out_dtype)], dim=1)
    out = roi_align_reference.roi_align([features], full_rois, None, [1.0], M, M, -1, False,
                                        "avg")
    return out[:, 0]
