"""Pure-PyTorch references of the box ops (segops.ops.boxes), written for
clarity: the test oracle and the path of last resort.

IoUs are computed in float32 (float64 for float64 boxes). The IoU NMS uses
is torchvision's CPU nms kernel's, step for step (``std::max(a, b)`` is
``a < b ? b : a``, so a NaN coordinate never propagates through max/min,
but it makes the box's area NaN and hence every IoU with it NaN, which is
never above the threshold), and the threshold comparison is done in float64
as torchvision's C++ compares with the double threshold.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from .._checks import accumulation_dtype


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """torchvision.ops.box_iou: (N, M), NaN propagating, in float32/float64."""
    acc = accumulation_dtype(torch.promote_types(a.dtype, b.dtype))
    a, b = a.to(acc), b.to(acc)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    top_left = torch.max(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / union


def clip_boxes(boxes: Tensor, height: float, width: float) -> Tensor:
    """torchvision.ops.clip_boxes_to_image: x columns (even) clamped to
    [0, width], y columns (odd) to [0, height], in the boxes' dtype. Float
    boxes clamp in their accumulation dtype (a bound past its range is
    +-inf); integer boxes clamp to the bounds truncated toward zero, which
    is torchvision's float result cast back, without its float32 rounding
    of coordinates past 2^24 (see ``_integer_bound``)."""
    if boxes.is_floating_point():
        acc = accumulation_dtype(boxes.dtype)
        height, width = (_in_range(v, acc) for v in (height, width))
        work = boxes.to(acc)
    else:
        height, width = (_integer_bound(v, boxes.dtype) for v in (height, width))
        work = boxes
    out = work.clone()
    out[..., 0::2] = work[..., 0::2].clamp(min=0, max=width)
    out[..., 1::2] = work[..., 1::2].clamp(min=0, max=height)
    return out.to(boxes.dtype)


def _integer_bound(value, dtype: torch.dtype) -> int:
    """The bound an integer box clamps to: torchvision clamps against an int
    size as it is and against a float size rounded to float32 (the dtype
    its clamp promotes to), then segops casts back (toward zero)."""
    if not float(value).is_integer():
        value = float(torch.tensor(value, dtype=torch.float32))
    return int(_in_range(value, dtype))


def _in_range(value, dtype: torch.dtype):
    """value clamped into what ``dtype`` holds (floats: +-inf beyond)."""
    if dtype.is_floating_point:
        big = torch.finfo(dtype).max
        return value if abs(value) <= big else math.copysign(math.inf, value)
    info = torch.iinfo(dtype)
    return min(max(value, info.min), info.max)


def decode_boxes(rel_codes: Tensor, boxes: Tensor, weights, clip: float,
                 image_size=None) -> Tensor:
    """BoxCoder(weights, clip).decode_single(rel_codes, boxes): (N, 4K) in
    rel_codes' dtype, computed in float32 (float64 for float64 codes);
    optionally clipped to ``image_size = (height, width)``."""
    acc = accumulation_dtype(rel_codes.dtype)
    codes = rel_codes.to(acc)
    boxes = boxes.to(acc)
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx = codes[:, 0::4] / wx
    dy = codes[:, 1::4] / wy
    clip = _in_range(clip, acc)  # past the dtype's range: no clamp, as in the kernel
    dw = (codes[:, 2::4] / ww).clamp(max=clip)
    dh = (codes[:, 3::4] / wh).clamp(max=clip)
    pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
    pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
    pred_w = torch.exp(dw) * widths[:, None]
    pred_h = torch.exp(dh) * heights[:, None]
    out = torch.stack((pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h,
                       pred_ctr_x + 0.5 * pred_w, pred_ctr_y + 0.5 * pred_h), dim=2).flatten(1)
    if image_size is not None:
        out = clip_boxes(out, *image_size)
    return out.to(rel_codes.dtype)


def _tv_max(a: Tensor, b: Tensor) -> Tensor:
    return torch.where(a < b, b, a)  # std::max


def _tv_min(a: Tensor, b: Tensor) -> Tensor:
    return torch.where(b < a, b, a)  # std::min


def nms_iou(box: Tensor, others: Tensor) -> Tensor:
    """IoU of one box (4,) with boxes (K, 4), torchvision's CPU nms formula."""
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    xx1 = _tv_max(box[0].expand_as(others[:, 0]), others[:, 0])
    yy1 = _tv_max(box[1].expand_as(others[:, 1]), others[:, 1])
    xx2 = _tv_min(box[2].expand_as(others[:, 2]), others[:, 2])
    yy2 = _tv_min(box[3].expand_as(others[:, 3]), others[:, 3])
    zero = torch.zeros((), dtype=box.dtype)
    w = _tv_max(zero, xx2 - xx1)
    h = _tv_max(zero, yy2 - yy1)
    inter = w * h
    return inter / (area + areas - inter)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor | None,
                iou_threshold: float) -> Tensor:
    """Greedy NMS within each class of ``idxs`` (one class when None).

    Boxes are visited in decreasing score, ties by index (NaN scores first,
    as torch.sort does); a visited box that is not suppressed is kept and
    suppresses every later box of its class whose IoU with it is above the
    threshold (strictly). Returns the kept indices in that visiting order.
    """
    n = boxes.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    device = boxes.device
    boxes = boxes.detach().cpu().to(accumulation_dtype(boxes.dtype))
    order = torch.sort(scores.detach().cpu(), descending=True, stable=True).indices
    classes = torch.zeros(n, dtype=torch.int64) if idxs is None else idxs.cpu().long()
    suppressed = torch.zeros(n, dtype=torch.bool)
    keep = []
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        same = classes == classes[i]
        overlap = nms_iou(boxes[i], boxes).double() > iou_threshold
        hit = same & overlap
        hit[i] = False
        suppressed |= hit
    return torch.tensor(keep, dtype=torch.int64).to(device)


def batched_nms_per_image(boxes: Tensor, scores: Tensor, idxs: Tensor | None,
                          image_ids: Tensor, iou_threshold: float, max_per_image: int | None,
                          num_images: int) -> list[Tensor]:
    """For each image i: ``batched_nms`` of its boxes, as indices into the
    whole batch, the first ``max_per_image`` of them."""
    results = []
    for image in range(num_images):
        rows = torch.nonzero(image_ids == image).flatten()
        keep = rows[batched_nms(boxes[rows], scores[rows],
                                None if idxs is None else idxs[rows], iou_threshold)]
        results.append(keep if max_per_image is None else keep[:max_per_image].clone())
    return results
