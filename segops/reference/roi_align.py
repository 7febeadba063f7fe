"""Pure-PyTorch RoIAlign: the CPU path and the test oracle of the kernels.

Semantics are torchvision's ``roi_align`` (see ``segops.ops.roi_align`` for
the conventions), extended to several feature levels at once and to max
pooling. It loops over RoIs in Python and vectorises inside one RoI, so its
memory stays O(C * bins * samples per bin) whatever the number of RoIs.
The backward is written out (it runs inside a custom op, below autograd):
for average pooling the bilinear weights of a bin factor into a row matrix
and a column matrix, so one RoI's gradient is rows^T @ grad @ cols.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import accumulation_dtype


def coordinate_dtype(input_dtype: torch.dtype) -> torch.dtype:
    """Boxes, sample coordinates and sums: float64 for float64 input, float32
    otherwise (torchvision computes them in the input dtype, which for fp16
    loses pixels on large images)."""
    return accumulation_dtype(input_dtype)


def _sample_axis(start: Tensor, size: Tensor, bins: int, grid: int) -> Tensor:
    """Sample coordinates along one axis, shape (bins, grid), with
    torchvision's operation order: start + p*bin + (i + .5)*bin/grid."""
    bin_size = size / bins
    p = torch.arange(bins, dtype=start.dtype, device=start.device).view(bins, 1)
    i = torch.arange(grid, dtype=start.dtype, device=start.device).view(1, grid)
    return start + p * bin_size + (i + 0.5) * bin_size / grid


def _bilinear_axis(coord: Tensor, length: int):
    """Per-axis bilinear pieces for ``coord`` (any shape): the low and high
    indices, their weights and whether the coordinate is inside [-1, length]
    (torchvision's bounds: samples further out contribute 0)."""
    inside = (coord >= -1.0) & (coord <= length)
    # clamp (and drop NaN) before the int cast: far-away samples would overflow it
    c = torch.where(inside, coord, 0.0).clamp(min=0)
    low = c.floor().long()
    at_edge = low >= length - 1
    low = torch.where(at_edge, torch.full_like(low, length - 1), low)
    high = torch.where(at_edge, low, low + 1)
    c = torch.where(at_edge, low.to(c.dtype), c)
    frac = c - low.to(c.dtype)
    return low.clamp(min=0), high.clamp(min=0), 1 - frac, frac, inside


def _sample_bilinear(plane: Tensor, ys: Tensor, xs: Tensor) -> Tensor:
    """Bilinear samples of ``plane`` (C, H, W) on the grid ys x xs (both 1-D):
    (C, len(ys), len(xs)); samples out of bounds are 0."""
    H, W = plane.shape[-2:]
    y0, y1, hy, ly, in_y = _bilinear_axis(ys, H)
    x0, x1, hx, lx, in_x = _bilinear_axis(xs, W)

    def corner(yi, xi):
        return plane[:, yi][:, :, xi]

    value = (hy[:, None] * hx[None, :] * corner(y0, x0)
             + hy[:, None] * lx[None, :] * corner(y0, x1)
             + ly[:, None] * hx[None, :] * corner(y1, x0)
             + ly[:, None] * lx[None, :] * corner(y1, x1))
    # where, not a product: out-of-bounds samples read clamped pixels, which
    # may be NaN or inf
    return torch.where(in_y[:, None] & in_x[None, :], value, 0.0)


def _adaptive_grid(size: Tensor, bins: int) -> int:
    """ceil(size / bins) samples per bin, the division in ``size``'s dtype
    (the coordinate dtype, as torchvision and the kernels divide: float64
    would round some float32 quotients to the next integer); 0 when that is
    <= 0, NaN or past int32 (torchvision's int overflows there and pools
    nothing)."""
    grid = (size / bins).item()
    if not math.isfinite(grid) or math.ceil(grid) >= 2 ** 31:
        return 0
    return max(math.ceil(grid), 0)


def _sample_grid(roi: Tensor, scale: float, pooled: tuple[int, int], sampling_ratio: int,
                 aligned: bool, map_hw) -> tuple[Tensor, Tensor] | None:
    """Sample coordinates of one RoI (x1, y1, x2, y2): rows (PH, grid_h) and
    columns (PW, grid_w), in torchvision's arithmetic; None when the RoI has
    no samples, when its per-bin count grid_h * grid_w is 2^31 or more (the
    kernels' int32 count would wrap; such a bin pools nothing), or when the
    map is empty."""
    PH, PW = pooled
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (roi[i] * scale - offset for i in range(4))
    width, height = x2 - x1, y2 - y1
    if not aligned:
        width, height = width.clamp(min=1.0), height.clamp(min=1.0)
    grid_h = sampling_ratio if sampling_ratio > 0 else _adaptive_grid(height, PH)
    grid_w = sampling_ratio if sampling_ratio > 0 else _adaptive_grid(width, PW)
    if grid_h <= 0 or grid_w <= 0 or grid_h * grid_w >= 2 ** 31 or 0 in tuple(map_hw):
        return None
    return _sample_axis(y1, height, PH, grid_h), _sample_axis(x1, width, PW, grid_w)


def _pool_one(plane: Tensor, roi: Tensor, scale: float, pooled: tuple[int, int],
              sampling_ratio: int, aligned: bool, pool_mode: str) -> Tensor:
    """(C, PH, PW) for one RoI (x1, y1, x2, y2) on one image's (C, H, W)."""
    PH, PW = pooled
    C = plane.shape[0]
    grid = _sample_grid(roi, scale, pooled, sampling_ratio, aligned, plane.shape[-2:])
    if grid is None:
        return plane.new_zeros((C, PH, PW))
    ys, xs = (coords.reshape(-1) for coords in grid)
    grid_h, grid_w = grid[0].shape[1], grid[1].shape[1]
    samples = _sample_bilinear(plane, ys, xs).reshape(C, PH, grid_h, PW, grid_w)
    samples = samples.permute(0, 1, 3, 2, 4).reshape(C, PH, PW, grid_h * grid_w)
    if pool_mode == "max":
        return _first_max(samples)[0]
    return samples.sum(dim=-1) / (grid_h * grid_w)


def _first_max(samples: Tensor) -> tuple[Tensor, Tensor]:
    """(values, indices) of the max over the last dim: the first largest
    sample, or the first NaN if there is one (NaN propagates)."""
    nan = torch.isnan(samples)
    first_nan = nan.to(torch.uint8).argmax(dim=-1)
    first_max = torch.where(nan, -math.inf, samples).argmax(dim=-1)
    index = torch.where(nan.any(dim=-1), first_nan, first_max)
    return samples.gather(-1, index.unsqueeze(-1)).squeeze(-1), index


def _pooled_rois(rois: Tensor, levels: Tensor | None, N: int):
    """(k, level, image, box (x1, y1, x2, y2)) for each RoI that pools
    anything: finite coordinates and a batch index that truncates (toward
    zero, as torchvision does) into [0, N); the others pool zeros."""
    for k in range(rois.shape[0]):
        roi = rois[k]
        batch = roi[0].item()
        if bool(torch.isfinite(roi).all()) and -1 < batch < N:
            yield k, 0 if levels is None else int(levels[k]), int(batch), roi[1:]


def roi_align(features: list[Tensor], rois: Tensor, levels: Tensor | None,
              scales: list[float], pooled_height: int, pooled_width: int,
              sampling_ratio: int, aligned: bool, pool_mode: str) -> Tensor:
    """RoIAlign over one or several feature levels.

    Args:
        features: L tensors (N, C, H_l, W_l).
        rois: (K, 5) rows (batch index, x1, y1, x2, y2), batch indices
            integral and in [0, N).
        levels: (K,) level of each RoI, or None when L == 1.
        scales: L spatial scales.
    Returns:
        (K, C, pooled_height, pooled_width) in the features' dtype. A RoI with
        a non-finite coordinate or a batch index outside [0, N) gives zeros.
    """
    acc = coordinate_dtype(features[0].dtype)
    rois = rois.to(acc)
    K, C = rois.shape[0], features[0].shape[1]
    rows = [features[0].new_zeros((C, pooled_height, pooled_width), dtype=acc)] * K
    for k, level, batch, box in _pooled_rois(rois, levels, features[0].shape[0]):
        plane = features[level][batch].to(acc)
        rows[k] = _pool_one(plane, box, scales[level], (pooled_height, pooled_width),
                            sampling_ratio, aligned, pool_mode)
    if not rows:
        return features[0].new_zeros((0, C, pooled_height, pooled_width))
    return torch.stack(rows).to(features[0].dtype)


def _axis_matrix(coords: Tensor, length: int) -> Tensor:
    """(bins, length) weights of each pixel along one axis in each bin: the
    sum over the bin's samples (coords: (bins, grid)) of their bilinear
    weights, zero for samples out of bounds."""
    low, high, w_low, w_high, inside = _bilinear_axis(coords, length)
    matrix = coords.new_zeros((coords.shape[0], length))
    matrix.scatter_add_(1, low, w_low * inside)
    matrix.scatter_add_(1, high, w_high * inside)
    return matrix


def _unpool_one(grad: Tensor, plane: Tensor, roi: Tensor, scale: float, sampling_ratio: int,
                aligned: bool, pool_mode: str) -> Tensor:
    """Gradient on one image's (C, H, W) from one RoI's (C, PH, PW) gradient."""
    C, PH, PW = grad.shape
    H, W = plane.shape[-2:]
    grid = _sample_grid(roi, scale, (PH, PW), sampling_ratio, aligned, (H, W))
    if grid is None:
        return torch.zeros_like(plane)
    ys, xs = grid
    grid_h, grid_w = ys.shape[1], xs.shape[1]
    if pool_mode == "avg":
        # bilinear weights and bounds both factor into a row and a column part
        rows, cols = _axis_matrix(ys, H), _axis_matrix(xs, W)
        return torch.einsum("py,cpq,qx->cyx", rows, grad / (grid_h * grid_w), cols)
    # max: the whole gradient of a bin goes to its first largest sample
    samples = _sample_bilinear(plane, ys.reshape(-1), xs.reshape(-1))
    samples = samples.reshape(C, PH, grid_h, PW, grid_w).permute(0, 1, 3, 2, 4)
    best = _first_max(samples.reshape(C, PH, PW, grid_h * grid_w))[1]
    ph = torch.arange(PH, device=grad.device).view(1, PH, 1)
    pw = torch.arange(PW, device=grad.device).view(1, 1, PW)
    y = ys[ph, best // grid_w]
    x = xs[pw, best % grid_w]
    y0, y1_, hy, ly, in_y = _bilinear_axis(y, H)
    x0, x1_, hx, lx, in_x = _bilinear_axis(x, W)
    g = grad * (in_y & in_x)
    c = torch.arange(C, device=grad.device).view(C, 1, 1).expand_as(y0)
    out = torch.zeros_like(plane)
    for yi, xi, w in ((y0, x0, hy * hx), (y0, x1_, hy * lx), (y1_, x0, ly * hx),
                      (y1_, x1_, ly * lx)):
        out.index_put_((c, yi, xi), g * w, accumulate=True)
    return out


def roi_align_backward(grad: Tensor, features: list[Tensor], rois: Tensor,
                       levels: Tensor | None, scales: list[float], pooled_height: int,
                       pooled_width: int, sampling_ratio: int, aligned: bool,
                       pool_mode: str) -> list[Tensor]:
    """Gradients of ``roi_align`` with respect to every feature level,
    computed in the accumulation dtype, RoI by RoI (deterministic)."""
    acc = coordinate_dtype(features[0].dtype)
    rois = rois.to(acc)
    grad = grad.to(acc)
    grads = [torch.zeros(f.shape, dtype=acc, device=f.device) for f in features]
    for k, level, batch, box in _pooled_rois(rois, levels, features[0].shape[0]):
        plane = features[level][batch].to(acc)
        grads[level][batch] += _unpool_one(grad[k], plane, box, scales[level], sampling_ratio,
                                           aligned, pool_mode)
    return [g.to(f.dtype) for g, f in zip(grads, features)]


def map_levels(boxes: Tensor, k_min: int, k_max: int, canonical_scale: float = 224,
               canonical_level: int = 4, eps: float = 1e-6) -> Tensor:
    """FPN level of each (x1, y1, x2, y2) box (Lin et al., eq. 1), as
    torchvision's LevelMapper: floor(canonical_level + log2(sqrt(area) /
    canonical_scale) + eps) clamped to [k_min, k_max], minus k_min (int64).
    A box with a NaN level (negative area: x2 < x1 or y2 < y1, but not both)
    gets -1, a level no feature map has (torchvision pools it nowhere).
    The area is torchvision's box_area: float16/bfloat16 boxes in float32,
    integer boxes in int32/int64 (the square root then in float32)."""
    boxes = upcast_boxes(boxes)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return area_levels(area, k_min, k_max, canonical_scale, canonical_level, eps)


def upcast_boxes(boxes: Tensor) -> Tensor:
    """Boxes in the dtype torchvision computes their area in (its
    ``_upcast``): float16/bfloat16 in float32 (a 300 x 300 box's area
    overflows float16), integers narrower than 32 bits in int32."""
    if boxes.is_floating_point():
        return boxes if boxes.dtype in (torch.float32, torch.float64) else boxes.float()
    return boxes if boxes.dtype in (torch.int32, torch.int64) else boxes.int()


def area_levels(area: Tensor, k_min: int, k_max: int, canonical_scale: float = 224,
                canonical_level: int = 4, eps: float = 1e-6) -> Tensor:
    """:func:`map_levels` of boxes of these areas, op for op as torchvision
    computes it (so with the rounding of the device and dtype in use)."""
    s = torch.sqrt(area)
    level = torch.floor(canonical_level + torch.log2(s / canonical_scale)
                        + torch.tensor(eps, dtype=s.dtype))
    level = torch.clamp(level, min=k_min, max=k_max) - k_min
    return torch.where(torch.isnan(level), -1.0, level).to(torch.int64)
