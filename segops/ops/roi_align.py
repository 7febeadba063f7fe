"""RoIAlign (Mask R-CNN's RoI pooling) with torchvision's semantics, over one
or several feature levels in one launch, average or max pooling.

Conventions (torchvision's ``roi_align``)
-----------------------------------------
* ``input``: features ``(N, C, H, W)``; float16, bfloat16, float32 (float64 on
  the reference and interpreter paths). Any memory format; the output keeps
  the input's (channels_last in, channels_last out).
* ``boxes``: ``Tensor[K, 5]`` rows ``(batch index, x1, y1, x2, y2)`` or a list
  of ``Tensor[L_i, 4]`` rows ``(x1, y1, x2, y2)`` for image i, in the input
  image's coordinates; ``spatial_scale`` maps them onto the feature map.
  Boxes of any real dtype are accepted and cast to the coordinate dtype:
  float32 (float64 for float64 input), also for fp16/bf16 features, so large
  images keep sub-pixel precision. Boxes receive no gradient.
* Each of the ``output_size`` bins averages (or, with ``pool_mode='max'``,
  takes the largest of) ``sampling_ratio`` x ``sampling_ratio`` bilinear
  samples, or ceil(roi_size / output_size) per axis when ``sampling_ratio
  <= 0`` (per RoI).
* ``aligned=False``: box corners are scaled as is and RoIs are at least 1x1;
  ``aligned=True``: shifted by half a pixel (pixel centres at +0.5, Detectron2's
  ROIAlignV2), no minimum size.
* Samples with y < -1, y > H, x < -1 or x > W contribute 0; others are clamped
  into the map. Empty bins (possible with ``aligned=True`` and degenerate
  boxes) give 0 in both modes.
* A box with a NaN or infinite coordinate gives zeros and no gradient
  (torchvision's kernels are undefined there).
* Under ``torch.use_deterministic_algorithms(True)`` the backward runs a
  gather kernel without atomics: bit-identical results, memory O(input +
  output).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .. import _dispatch
from .._format import memory_format_of
from .._checks import FLOAT_DTYPES, check_choice, check_int, check_same_device, check_tensor
from ..reference import roi_align as reference

POOL_MODES = ("avg", "max")


def _kernels():
    from ..kernels import roi_align as kernels  # lazy: triton is slow to import
    return kernels


# --------------------------------------------------------------------------
# custom ops: segops::roi_align and its backward
# --------------------------------------------------------------------------
@torch.library.custom_op("segops::roi_align", mutates_args=())
def _roi_align(features: list[Tensor], rois: Tensor, levels: Tensor | None,
               scales: list[float], pooled_height: int, pooled_width: int,
               sampling_ratio: int, aligned: bool, pool_mode: str) -> Tensor:
    args = (features, rois, levels, scales, pooled_height, pooled_width, sampling_ratio,
            aligned, pool_mode)
    if _dispatch.uses_kernel(features[0]):
        return _kernels().roi_align_forward(*args)
    return reference.roi_align(*args).contiguous(memory_format=memory_format_of(features[0]))


@_roi_align.register_fake
def _(features, rois, levels, scales, pooled_height, pooled_width, sampling_ratio, aligned,
      pool_mode):
    shape = (rois.shape[0], features[0].shape[1], pooled_height, pooled_width)
    return features[0].new_empty(shape).contiguous(memory_format=memory_format_of(features[0]))


@torch.library.custom_op("segops::roi_align_backward", mutates_args=())
def _roi_align_backward(grad: Tensor, features: list[Tensor], rois: Tensor,
                        levels: Tensor | None, scales: list[float], pooled_height: int,
                        pooled_width: int, sampling_ratio: int, aligned: bool, pool_mode: str,
                        deterministic: bool) -> list[Tensor]:
    args = (grad, features, rois, levels, scales, pooled_height, pooled_width, sampling_ratio,
            aligned, pool_mode)
    if _dispatch.uses_kernel(features[0]):
        if deterministic:
            return _kernels().roi_align_backward_deterministic(*args)
        return _kernels().roi_align_backward_atomic(*args)
    grads = reference.roi_align_backward(*args)
    return [g.contiguous(memory_format=memory_format_of(f)) for g, f in zip(grads, features)]


@_roi_align_backward.register_fake
def _(grad, features, rois, levels, scales, pooled_height, pooled_width, sampling_ratio, aligned,
      pool_mode, deterministic):
    return [torch.empty_like(f, memory_format=memory_format_of(f)) for f in features]


def _roi_align_setup_context(ctx, inputs, output):
    features, rois, levels, *options = inputs
    ctx.num_levels = len(features)
    ctx.save_for_backward(*features, rois, levels)
    ctx.options = tuple(options)


def _roi_align_grad(ctx, grad):
    nones = (None,) * 8
    if not ctx.needs_input_grad[0]:
        return (None, *nones)
    *features, rois, levels = ctx.saved_tensors
    deterministic = torch.are_deterministic_algorithms_enabled()
    grads = _roi_align_backward(grad, features, rois, levels, *ctx.options, deterministic)
    return (grads, *nones)


_roi_align.register_autograd(_roi_align_grad, setup_context=_roi_align_setup_context)


# --------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------
def _check_features(name: str, features: Sequence[Tensor]) -> None:
    for i, f in enumerate(features):
        label = name if len(features) == 1 else f"{name}[{i}]"
        check_tensor(label, f, dims=(4,), dtypes=FLOAT_DTYPES)
        if f.dtype != features[0].dtype:
            raise TypeError(f"{label} has dtype {f.dtype}, {name}[0] has {features[0].dtype}")
        if f.shape[:2] != features[0].shape[:2]:
            raise ValueError(f"{label} has (N, C) = {tuple(f.shape[:2])}, {name}[0] has "
                             f"{tuple(features[0].shape[:2])}")
        check_same_device(**{f"{name}[0]": features[0], label: f})


def _check_box_dtype(name: str, t: Tensor) -> None:
    if t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold real coordinates, got {t.dtype}")


def _as_rois(boxes) -> Tensor:
    """(K, 5) rois from a Tensor[K, 5] or a list of Tensor[L_i, 4]."""
    if isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError("boxes as a tensor must have shape (K, 5) = (batch index, x1, y1, "
                             f"x2, y2) per row, got {tuple(boxes.shape)}")
        _check_box_dtype("boxes", boxes)
        return boxes
    if not isinstance(boxes, (list, tuple)):
        raise TypeError("boxes must be a Tensor[K, 5] or a list of Tensor[L, 4], got "
                        f"{type(boxes).__name__}")
    if not boxes:
        raise ValueError("boxes is an empty list: pass one Tensor[L, 4] per image")
    for i, b in enumerate(boxes):
        check_tensor(f"boxes[{i}]", b)
        if b.dim() != 2 or b.shape[1] != 4:
            raise ValueError(f"boxes[{i}] must have shape (L, 4) = (x1, y1, x2, y2) per row, "
                             f"got {tuple(b.shape)}")
        _check_box_dtype(f"boxes[{i}]", b)
        check_same_device(**{"boxes[0]": boxes[0], f"boxes[{i}]": b})
    dtype = boxes[0].dtype if boxes[0].is_floating_point() else torch.float32
    ids = [torch.full((b.shape[0], 1), i, dtype=dtype, device=b.device)
           for i, b in enumerate(boxes)]
    return torch.cat([torch.cat(ids), torch.cat([b.to(dtype) for b in boxes])], dim=1)


def _check_batch_indices(rois: Tensor, N: int) -> None:
    """Batch indices integral and in [0, N) (reads the values: one sync)."""
    index = rois[:, 0]
    bad = ~torch.isfinite(index) | (index != torch.floor(index)) | (index < 0) | (index >= N)
    if bool(bad.any()):
        value = index[bad][0].item()
        raise ValueError(f"boxes hold batch index {value}: batch indices must be integers in "
                         f"[0, N) = [0, {N})")


def _pair(name: str, value) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    for v in value:
        if v <= 0:
            raise ValueError(f"{name} must be positive, got {tuple(value)}")
    return int(value[0]), int(value[1])


def _check_scale(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return float(value)


def _prepare(features, boxes, output_size, sampling_ratio, pool_mode, validate_args):
    _check_features("input", features)
    rois = _as_rois(boxes)
    check_same_device(input=features[0], boxes=rois)
    pooled = _pair("output_size", output_size)
    check_int("sampling_ratio", sampling_ratio)
    check_choice("pool_mode", pool_mode, POOL_MODES)
    if validate_args and not torch.compiler.is_compiling():
        _check_batch_indices(rois, features[0].shape[0])
    return rois, pooled


# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------
def roi_align(input: Tensor, boxes: Tensor | list[Tensor], output_size: int | tuple[int, int],
              spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False, *,
              pool_mode: str = "avg", validate_args: bool = True) -> Tensor:
    """RoIAlign (He et al., Mask R-CNN), a drop-in for ``torchvision.ops.roi_align``.

    Args:
        input: features ``(N, C, H, W)``.
        boxes: ``Tensor[K, 5]`` (batch index, x1, y1, x2, y2) or a list of N
            ``Tensor[L_i, 4]`` (x1, y1, x2, y2).
        output_size: ``PH`` or ``(PH, PW)`` bins per RoI.
        spatial_scale: feature-map size / image size (e.g. 1/16).
        sampling_ratio: samples per bin and axis; ``<= 0`` is adaptive.
        aligned: shift boxes by -0.5 pixel (see the module docstring).
        pool_mode: ``'avg'`` (torchvision) or ``'max'`` (mmcv's max mode:
            the largest bilinear sample of each bin; the gradient goes to
            that sample's four neighbours).
        validate_args: check that batch indices are integers in [0, N); this
            reads them (one device sync). Without it a bad index gives zeros.
    Returns:
        ``(K, C, PH, PW)`` in the input's dtype and memory format.
    """
    spatial_scale = _check_scale("spatial_scale", spatial_scale)
    rois, (ph, pw) = _prepare([input], boxes, output_size, sampling_ratio, pool_mode,
                              validate_args)
    return _roi_align([input], rois, None, [spatial_scale], ph, pw, sampling_ratio,
                      bool(aligned), pool_mode)


def level_range(scales: Sequence[float]) -> tuple[int, int]:
    """(k_min, k_max): the FPN levels of the first and last scale (2^-k)."""
    return int(-math.log2(scales[0])), int(-math.log2(scales[-1]))


def multi_scale_roi_align(features: Sequence[Tensor], boxes: Tensor | list[Tensor],
                          output_size: int | tuple[int, int], scales: Sequence[float],
                          sampling_ratio: int = -1, *, canonical_scale: float = 224,
                          canonical_level: int = 4, aligned: bool = False,
                          pool_mode: str = "avg", validate_args: bool = True) -> Tensor:
    """RoIAlign of each box on its FPN level, every level in one kernel launch.

    The level of a box is torchvision's (FPN eq. 1): floor(canonical_level +
    log2(sqrt(area) / canonical_scale) + 1e-6), clamped to the levels of
    ``scales`` (areas in image coordinates).

    Args:
        features: L maps ``(N, C, H_l, W_l)``, finest first, same N, C, dtype.
        boxes: as in :func:`roi_align`.
        scales: L spatial scales, powers of 2 (e.g. 1/4, 1/8, 1/16, 1/32).
    Returns:
        ``(K, C, PH, PW)`` in ``features[0]``'s dtype and memory format.
    """
    features = list(features)
    if not features:
        raise ValueError("features is empty: pass at least one feature map")
    if len(scales) != len(features):
        raise ValueError(f"got {len(scales)} scales for {len(features)} feature maps")
    scales = [_check_scale(f"scales[{i}]", s) for i, s in enumerate(scales)]
    rois, (ph, pw) = _prepare(features, boxes, output_size, sampling_ratio, pool_mode,
                              validate_args)
    levels = None
    if len(features) > 1:
        k_min, k_max = level_range(scales)
        if k_max - k_min + 1 != len(features):
            raise ValueError(f"scales {scales} must be consecutive powers of 2 (one level "
                             "apart), finest first, like an FPN's")
        levels = reference.map_levels(rois[:, 1:], k_min, k_max, canonical_scale,
                                      canonical_level)
        # a box with a non-finite area maps to no level: keep it in range
        # (it pools zeros anyway)
        levels = levels.clamp(0, len(features) - 1)
    return _roi_align(features, rois, levels, scales, ph, pw, sampling_ratio, bool(aligned),
                      pool_mode)
