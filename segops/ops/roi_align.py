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
  Boxes of any real dtype (a list: the dtype torch.cat promotes its
  tensors to, as in torchvision) are accepted and cast to the coordinate dtype:
  float32 (float64 for float64 input), also for fp16/bf16 features, so large
  images keep sub-pixel precision. Boxes receive no gradient.
* Each of the ``output_size`` bins averages (or, with ``pool_mode='max'``,
  takes the largest of) ``sampling_ratio`` x ``sampling_ratio`` bilinear
  samples, or ceil(roi_size / output_size) per axis when ``sampling_ratio
  <= 0`` (per RoI).
* ``aligned=False``: box corners are scaled as is and RoIs are at least 1x1;
  ``aligned=True``: shifted by half a pixel (pixel centres at +0.5, Detectron2's
  ROIAlignV2), no minimum size. A reversed box (x2 < x1 or y2 < y1) then
  has negative bin sizes: with ``sampling_ratio > 0`` it is sampled as
  torchvision does, with adaptive sampling its bins are empty.
* Samples with y < -1, y > H, x < -1 or x > W contribute 0; others are clamped
  into the map. Empty bins (possible with ``aligned=True`` and degenerate
  boxes) give 0 in both modes, as does an adaptive sample count past int32,
  per axis (e.g. ``spatial_scale=1e30``) or per bin (grid_h x grid_w >=
  2^31): torchvision's int overflows there. A fixed ``sampling_ratio`` above
  ``MAX_SAMPLING_RATIO`` (46340, whose square fits an int32) is an
  ArgumentError. On the devices where torchvision's RoIAlign runs (the
  CPU), a RoI that pools and needs 2^31 or more samples in all (grid_h x
  grid_w x bins) is an ArgumentError: torchvision's CPU kernel crashes there.
* Max pooling: NaN propagates, as in torch's max pooling. A bin with a NaN
  sample is NaN and its gradient goes to its first NaN sample's neighbours;
  otherwise to the first largest sample's.
* A box with a NaN or infinite coordinate gives zeros and no gradient
  (torchvision's kernels are undefined there). Batch indices are truncated
  toward zero as torchvision does (so -0.5 pools image 0); one that does not
  truncate into [0, N) gives zeros and no gradient (``validate_args=True``,
  the default, refuses non-integral or out-of-range indices instead).
* Under ``torch.use_deterministic_algorithms(True)`` the backward runs a
  gather kernel without atomics: bit-identical results, memory O(input +
  output + K x rows of 8-pixel tiles), capped (past the cap O(input +
  output), scanning more RoIs per tile for the same sums).

Paths (``segops._dispatch``): the Triton kernels on CUDA (and on CPU under
``TRITON_INTERPRET=1``); elsewhere torchvision's own ``roi_align`` kernels
(forward and backward) for average pooling when torchvision is installed,
per level and on the RoIs that pool anything (the others are zeros, so
NaN boxes and bad indices never reach it), in float32 for fp16/bf16
features; the pure-PyTorch reference otherwise (max pooling, no
torchvision) or inside ``segops.reference_only()``.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .. import _checks, _dispatch
from .._checks import (FLOAT_DTYPES, ArgumentError, ArgumentTypeError, accumulation_dtype,
                       check_choice, check_int, check_number, check_same_device, check_tensor,
                       int_pair, refuse_forward_ad)
from .._format import empty_in_format, in_format, memory_format_of
from ..reference import roi_align as reference

POOL_MODES = ("avg", "max")
# the largest fixed sampling_ratio: its square, the samples per bin, fits an
# int32 (the kernels' and torchvision's count; 46341^2 > 2^31 - 1)
MAX_SAMPLING_RATIO = 46340


def _kernels():
    from ..kernels import roi_align as kernels  # lazy: triton is slow to import
    return kernels


# --------------------------------------------------------------------------
# custom ops: segops::roi_align and its backward
# --------------------------------------------------------------------------
@torch.library.custom_op("segops::roi_align", mutates_args=())
def _roi_align(features: list[Tensor], rois: Tensor, levels: Tensor | None,
               scales: list[float], pooled_height: int, pooled_width: int,
               sampling_ratio: int, aligned: bool, pool_mode: str,
               check_batch: bool) -> Tensor:
    """check_batch: assert on the device that the batch indices are integers
    in [0, N), flagged by the forward kernel (one launch for the flag and
    one for the assert, where the aten check takes about ten).

    No argument of a segops custom op has a default: the dispatcher drops an
    argument equal to its default, and before torch 2.14 the generated
    backward then wants one gradient fewer than register_autograd's formula
    returns (every backward fails)."""
    args = (features, rois, levels, scales, pooled_height, pooled_width, sampling_ratio,
            aligned, pool_mode)
    if _dispatch.uses_kernel(features[0]):
        flag = rois.new_zeros((), dtype=torch.int32) if check_batch else None
        out = _kernels().roi_align_forward(*args, bad_batch=flag)
        if check_batch:
            torch._assert_async(flag == 0, _batch_message(features[0].shape[0]))
        return out
    if check_batch:
        _check_batch_indices(rois, features[0].shape[0])
    if _native_applies(features[0], pool_mode, deterministic=False):
        return _native_forward(*args[:-1])
    return in_format(reference.roi_align(*args), memory_format_of(features[0]))


@_roi_align.register_fake
def _(features, rois, levels, scales, pooled_height, pooled_width, sampling_ratio, aligned,
      pool_mode, check_batch):
    shape = (rois.shape[0], features[0].shape[1], pooled_height, pooled_width)
    return empty_in_format(features[0], shape, memory_format_of(features[0]))


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
    if _native_applies(features[0], pool_mode, deterministic):
        return _native_backward(*args[:-1])
    grads = reference.roi_align_backward(*args)
    return [in_format(g, memory_format_of(f)) for g, f in zip(grads, features)]


@_roi_align_backward.register_fake
def _(grad, features, rois, levels, scales, pooled_height, pooled_width, sampling_ratio, aligned,
      pool_mode, deterministic):
    return [empty_in_format(f, f.shape, memory_format_of(f)) for f in features]


def _roi_align_setup_context(ctx, inputs, output):
    features, rois, levels, *options, _check_batch = inputs
    ctx.num_levels = len(features)
    ctx.save_for_backward(*features, rois, levels)
    ctx.options = tuple(options)


def _roi_align_grad(ctx, grad):
    nones = (None,) * 9
    if not ctx.needs_input_grad[0]:
        return (None, *nones)
    *features, rois, levels = ctx.saved_tensors
    deterministic = torch.are_deterministic_algorithms_enabled()
    grads = _roi_align_backward(grad, features, rois, levels, *ctx.options, deterministic)
    return (grads, *nones)


_roi_align.register_autograd(_roi_align_grad, setup_context=_roi_align_setup_context)


def _roi_align_backward_setup_context(ctx, inputs, output):
    _grad, features, rois, levels, *options, _deterministic = inputs
    ctx.set_materialize_grads(False)   # a level the penalty does not use: None, no zeros
    ctx.save_for_backward(rois, levels)
    ctx.options = tuple(options)
    ctx.levels_like = [(f.shape, memory_format_of(f)) for f in features]


def _roi_align_backward_grad(ctx, grads):
    """Double backward: average pooling is linear in the features, so its
    backward is linear in the output gradient, and the derivative of
    <backward(grad), v> with respect to grad is the forward pooling of v
    (the adjoint); it does not depend on the features (zero, as None; for
    max pooling too, almost everywhere)."""
    nones = ([None] * len(ctx.levels_like),) + (None,) * 9   # features, then the rest
    if not ctx.needs_input_grad[0] or all(g is None for g in grads):
        return (None, *nones)
    if ctx.options[-1] != "avg":
        raise NotImplementedError("double backward through RoIAlign with pool_mode='max' is "
                                  "not supported with respect to the output gradient "
                                  "(pool_mode='avg' is)")
    rois, levels = ctx.saved_tensors
    like = next(g for g in grads if g is not None)
    probes = [empty_in_format(like, shape, fmt).zero_() if g is None else g
              for g, (shape, fmt) in zip(grads, ctx.levels_like)]
    return (_roi_align(probes, rois, levels, *ctx.options, False), *nones)


_roi_align_backward.register_autograd(_roi_align_backward_grad,
                                      setup_context=_roi_align_backward_setup_context)


# --------------------------------------------------------------------------
# native path: torchvision's kernels, off the GPU
# --------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _torchvision_ops():
    """torch.ops.torchvision when torchvision's compiled RoIAlign ops are
    installed, else None."""
    try:
        import torchvision  # noqa: F401  (registers torch.ops.torchvision)
    except ImportError:
        return None
    ops = torch.ops.torchvision
    try:
        ops.roi_align, ops._roi_align_backward
    except (AttributeError, RuntimeError):
        return None
    return ops


def _native_applies(x: Tensor, pool_mode: str, deterministic: bool) -> bool:
    """torchvision has average pooling only; its kernels on devices other
    than the CPU use atomics in the backward."""
    return (_dispatch.uses_native(x) and pool_mode == "avg" and _torchvision_ops() is not None
            and (x.device.type == "cpu" or not deterministic))


def _native_rows(features, rois, levels, scales, pooled, sampling_ratio, aligned):
    """[(level, rows)]: the RoIs each level pools with torchvision: those
    that pool anything in segops' rules (finite box and scaled box, batch
    index truncating into [0, N), a matched level, adaptive sample counts
    in [1, 2^31) and a per-bin count grid_h x grid_w below 2^31); rows is
    None for all K RoIs. The others stay zeros:
    torchvision would read out of bounds or throw on them. A pooling RoI
    whose samples (grid_h x grid_w x bins) reach 2^31 is an ArgumentError:
    torchvision's CPU kernel sizes a buffer by that int and crashes."""
    batch = rois[:, 0]
    pools = torch.isfinite(rois).all(1) & (batch > -1) & (batch < features[0].shape[0])
    offset = 0.5 if aligned else 0.0
    groups = []
    for level, (f, scale) in enumerate(zip(features, scales)):
        if 0 in f.shape[2:]:
            continue
        ok = pools if levels is None else pools & (levels == level)
        corners = rois[:, 1:] * scale - offset
        ok = ok & torch.isfinite(corners).all(1)
        if sampling_ratio > 0:
            per_bin = torch.full_like(corners[:, 0], float(sampling_ratio) ** 2,
                                      dtype=torch.float64)
        else:
            per_bin = torch.ones_like(corners[:, 0], dtype=torch.float64)
            for size, bins in ((corners[:, 2] - corners[:, 0], pooled[1]),
                               (corners[:, 3] - corners[:, 1], pooled[0])):
                grid = torch.ceil((size if aligned else size.clamp(min=1.0)) / bins)
                ok = ok & (grid > 0) & (grid < 2 ** 31)
                per_bin = per_bin * grid.double()
        ok = ok & (per_bin < 2 ** 31)
        _refuse_past_torchvisions_int(per_bin * math.prod(pooled), ok)
        rows = None if levels is None and bool(ok.all()) else torch.nonzero(ok).flatten()
        groups.append((level, rows))
    return groups


def _refuse_past_torchvisions_int(samples: Tensor, pools: Tensor) -> None:
    """ArgumentError for the first pooling RoI whose sample count (float64,
    per RoI) is past torchvision's int (CPU only: the host reads it)."""
    past = pools & (samples >= 2 ** 31)
    if bool(past.any()):
        k = int(torch.nonzero(past)[0])
        raise ArgumentError(
            f"RoI {k} needs {samples[k].item():.0f} bilinear samples (sampling grid x bins); "
            "torchvision's RoIAlign, which runs on this device, takes fewer than 2^31 "
            "(past that its CPU kernel crashes)")


def _native_forward(features, rois, levels, scales, pooled_height, pooled_width,
                    sampling_ratio, aligned) -> Tensor:
    """torchvision's RoIAlign forward per level, in the accumulation dtype."""
    x = features[0]
    acc = accumulation_dtype(x.dtype)
    rois = rois.to(acc)
    fmt = memory_format_of(x)
    shape = (rois.shape[0], x.shape[1], pooled_height, pooled_width)
    groups = _native_rows(features, rois, levels, scales, shape[2:], sampling_ratio, aligned)
    if math.prod(shape) == 0 or not groups:
        return empty_in_format(x, shape, fmt).zero_()
    results = [(rows, _torchvision_ops().roi_align(
        features[level].to(acc), rois if rows is None else rois[rows], scales[level],
        pooled_height, pooled_width, sampling_ratio, aligned)) for level, rows in groups]
    if results[0][0] is None:  # one level, every RoI: torchvision's output as it is
        return in_format(results[0][1].to(x.dtype), fmt)
    out = empty_in_format(x, shape, fmt).zero_()
    for rows, result in results:
        out[rows] = result.to(x.dtype)
    return out


def _native_backward(grad, features, rois, levels, scales, pooled_height, pooled_width,
                     sampling_ratio, aligned) -> list[Tensor]:
    """torchvision's RoIAlign backward per level, in the accumulation dtype."""
    acc = accumulation_dtype(features[0].dtype)
    rois, grad = rois.to(acc), grad.to(acc)
    grads = [None] * len(features)
    pooled = (pooled_height, pooled_width)
    groups = _native_rows(features, rois, levels, scales, pooled, sampling_ratio, aligned)
    for level, rows in groups if grad.numel() else ():
        if rows is not None and rows.numel() == 0:
            continue
        N, C, H, W = features[level].shape
        grads[level] = _torchvision_ops()._roi_align_backward(
            grad if rows is None else grad[rows], rois if rows is None else rois[rows],
            scales[level], pooled_height, pooled_width, N, C, H, W, sampling_ratio, aligned)
    return [torch.zeros_like(f, memory_format=memory_format_of(f)) if g is None
            else in_format(g.to(f.dtype), memory_format_of(f))
            for g, f in zip(grads, features)]


# --------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------
def _check_features(name: str, features: Sequence[Tensor]) -> None:
    for i, f in enumerate(features):
        label = name if len(features) == 1 else f"{name}[{i}]"
        check_tensor(label, f, dims=(4,), dtypes=FLOAT_DTYPES)
        if f.dtype != features[0].dtype:
            raise ArgumentTypeError(f"{label} has dtype {f.dtype}, {name}[0] has "
                                    f"{features[0].dtype}")
        if f.shape[:2] != features[0].shape[:2]:
            raise ArgumentError(f"{label} has (N, C) = {tuple(f.shape[:2])}, {name}[0] has "
                                f"{tuple(features[0].shape[:2])}")
        check_same_device(**{f"{name}[0]": features[0], label: f})


def _check_box_dtype(name: str, t: Tensor) -> None:
    if t.dtype.is_complex or t.dtype == torch.bool:
        raise ArgumentTypeError(f"{name} must hold real coordinates, got {t.dtype}")


def _as_rois(boxes) -> Tensor:
    """(K, 5) rois from a Tensor[K, 5] or a list of Tensor[L_i, 4]."""
    if isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ArgumentError("boxes as a tensor must have shape (K, 5) = (batch index, x1, "
                                f"y1, x2, y2) per row, got {tuple(boxes.shape)}")
        _check_box_dtype("boxes", boxes)
        return boxes
    if not isinstance(boxes, (list, tuple)):
        raise ArgumentTypeError("boxes must be a Tensor[K, 5] or a list of Tensor[L, 4], got "
                                f"{type(boxes).__name__}")
    if not boxes:
        raise ArgumentError("boxes is an empty list: pass one Tensor[L, 4] per image")
    for i, b in enumerate(boxes):
        check_tensor(f"boxes[{i}]", b)
        if b.dim() != 2 or b.shape[1] != 4:
            raise ArgumentError(f"boxes[{i}] must have shape (L, 4) = (x1, y1, x2, y2) per "
                                f"row, got {tuple(b.shape)}")
        _check_box_dtype(f"boxes[{i}]", b)
        check_same_device(**{"boxes[0]": boxes[0], f"boxes[{i}]": b})
    # integer boxes: float64 is exact for them (the kernels then cast to the
    # coordinate dtype, as they do a Tensor[K, 5] of integers)
    dtype = _list_box_dtype(boxes)
    dtype = dtype if dtype.is_floating_point else torch.float64
    ids = [torch.full((b.shape[0], 1), i, dtype=dtype, device=b.device)
           for i, b in enumerate(boxes)]
    return torch.cat([torch.cat(ids), torch.cat([b.to(dtype) for b in boxes])], dim=1)


def _list_box_dtype(boxes: Sequence[Tensor]) -> torch.dtype:
    """The dtype of a list of per-image boxes: what torch.cat (so
    torchvision) promotes them to, not the first tensor's (an image without
    boxes is often an empty float32 or int64 tensor)."""
    first = boxes[0].dtype
    if all(b.dtype == first for b in boxes):   # the usual case: no dispatcher call
        return first
    return functools.reduce(torch.promote_types, (b.dtype for b in boxes))


def _batch_message(N: int) -> str:
    """The device-side assert's message for a bad batch index."""
    return f"segops roi_align: boxes hold a batch index that is not an integer in [0, N) = [0, {N})"


def _check_batch_indices(rois: Tensor, N: int) -> None:
    """Batch indices integral and in [0, N)."""
    index = rois[:, 0]
    bad = ~torch.isfinite(index) | (index != torch.floor(index)) | (index < 0) | (index >= N)
    if _checks.values_checked_on_device(index):
        torch._assert_async(~bad.any(), _batch_message(N))
        return
    if bool(bad.any()):
        value = index[bad][0].item()
        raise ArgumentError(f"boxes hold batch index {value}: batch indices must be integers "
                            f"in [0, N) = [0, {N})")


def _prepare(features, boxes, output_size, sampling_ratio, pool_mode, validate_args,
             kernel_may_check=False):
    """(rois, pooled size, sampling_ratio, check_batch): check_batch, the
    batch indices are left to the forward kernel (``kernel_may_check``, a
    Tensor[K, 5] on CUDA on the kernels' path whose values the kernels'
    coordinate dtype holds exactly: float64 rois on float32 maps could round
    1 + 1e-10 to 1; and maps with channels: for an empty output no program
    runs to check), else checked here."""
    _check_features("input", features)
    rois = _as_rois(boxes)
    check_same_device(input=features[0], boxes=rois)
    pooled = int_pair("output_size", output_size, 1)
    sampling_ratio = check_int("sampling_ratio", sampling_ratio, maximum=MAX_SAMPLING_RATIO)
    # every ratio <= 0 is adaptive; passed on as -1, since torchvision narrows
    # it to a C int (-(2^32) + 1 would become a fixed ratio of 1)
    sampling_ratio = max(sampling_ratio, -1)
    check_choice("pool_mode", pool_mode, POOL_MODES)
    N = features[0].shape[0]
    if isinstance(boxes, (list, tuple)):
        # the batch indices are the list positions: checked here, on the
        # host, for free (the device check costs a dozen small launches)
        if len(boxes) > N:
            raise ArgumentError(f"boxes holds {len(boxes)} tensors, one per image, for a "
                                f"batch of {N} images")
    elif validate_args:
        if (kernel_may_check and _checks.values_checked_on_device(rois)
                and _dispatch.uses_kernel(features[0]) and features[0].shape[1] > 0
                and _kernels().casts_exactly(rois.dtype, features)):
            return rois, pooled, sampling_ratio, True
        _check_batch_indices(rois, N)
    return rois, pooled, sampling_ratio, False


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
        spatial_scale: feature-map size / image size (e.g. 1/16), >= 0.
        sampling_ratio: samples per bin and axis, at most
            ``MAX_SAMPLING_RATIO``; ``<= 0`` is adaptive.
        aligned: shift boxes by -0.5 pixel (see the module docstring).
        pool_mode: ``'avg'`` (torchvision) or ``'max'`` (mmcv's max mode:
            the largest bilinear sample of each bin, NaN if any is NaN; the
            gradient goes to that sample's four neighbours).
        validate_args: check that batch indices are integers in [0, N): a
            clear error on the CPU, a device-side assert on CUDA (no sync)
            and inside torch.compile.
            Without it an index is truncated toward zero as in torchvision,
            and one outside [0, N) then gives zeros.
    Returns:
        ``(K, C, PH, PW)`` in the input's dtype and memory format.
    """
    refuse_forward_ad("roi_align", input)
    spatial_scale = check_number("spatial_scale", spatial_scale, minimum=0)
    rois, (ph, pw), sampling_ratio, check_batch = _prepare(
        [input], boxes, output_size, sampling_ratio, pool_mode, validate_args,
        kernel_may_check=True)
    return _roi_align([input], rois, None, [spatial_scale], ph, pw, sampling_ratio,
                      bool(aligned), pool_mode, check_batch)


def level_range(scales: Sequence[float]) -> tuple[int, int]:
    """(k_min, k_max): the FPN levels of the first and last scale, as
    torchvision's: int(-log2(scale)), truncated toward zero (so a scale that
    is not a power of 2 takes the level above it in size)."""
    return int(-math.log2(scales[0])), int(-math.log2(scales[-1]))


def _assign_levels(rois: Tensor, scales: list[float], canonical_scale: float,
                   canonical_level: int, box_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(rois, levels) for several feature maps, torchvision's rule: each box
    gets LevelMapper's level in [0, k_max - k_min] and is pooled on
    ``features[level]`` by position. A box whose level matches no map (the
    level is past the list when the maps are not one level apart, or NaN:
    a box with x2 < x1 or y2 < y1 but not both) pools zeros in torchvision:
    its batch index becomes -1, so every path pools nothing for it, and its
    level 0 keeps the table lookup in range. ``box_dtype``: the dtype of the
    boxes as given, which decides torchvision's arithmetic (its box_area
    takes float16/bfloat16 and integer boxes to float32 by the end): the
    level is computed from float32 rois then, the pooling keeps ``rois``'
    digits (float64 for a list of integer boxes)."""
    rois = rois.detach() if rois.requires_grad else rois
    k_min, k_max = level_range(scales)
    if box_dtype in (torch.float32, torch.float64) and rois.is_floating_point():
        return _roi_levels(rois, k_min, k_max, len(scales), canonical_scale, canonical_level)
    level_rois, levels = _roi_levels(rois.float(), k_min, k_max, len(scales), canonical_scale,
                                     canonical_level)
    if rois.dtype in (torch.float16, torch.bfloat16, torch.float32):
        return level_rois, levels
    # float64 and integer rois keep every digit (float64 is exact for
    # integers), as roi_align keeps them
    return torch.cat([level_rois[:, :1].double(), rois[:, 1:].double()], dim=1), levels


@torch.library.custom_op("segops::roi_levels", mutates_args=())
def _roi_levels(rois: Tensor, k_min: int, k_max: int, num_levels: int,
                canonical_scale: float, canonical_level: int) -> tuple[Tensor, Tensor]:
    if rois.shape[0] > 0 and _levels_in_kernel(rois, k_min, k_max):
        thresholds = _level_thresholds(rois.dtype, rois.device, k_min, k_max, canonical_scale,
                                       canonical_level)
        return _kernels().roi_levels(rois, thresholds, num_levels)
    return _levels_composite(rois, k_min, k_max, num_levels, canonical_scale, canonical_level)


@_roi_levels.register_fake
def _(rois, k_min, k_max, num_levels, canonical_scale, canonical_level):
    return rois.new_empty(rois.shape[0], 5), rois.new_empty(rois.shape[0], dtype=torch.int64)


def _levels_composite(rois: Tensor, k_min: int, k_max: int, num_levels: int,
                      canonical_scale: float, canonical_level: int) -> tuple[Tensor, Tensor]:
    """segops::roi_levels in torch ops (the level kernel's oracle)."""
    levels = reference.map_levels(rois[:, 1:], k_min, k_max, canonical_scale, canonical_level)
    matched = (levels >= 0) & (levels < num_levels)
    batch = torch.where(matched, rois[:, 0], -1.0)
    return torch.cat([batch[:, None], rois[:, 1:]], dim=1), torch.where(matched, levels, 0)


def _levels_in_kernel(rois: Tensor, k_min: int, k_max: int) -> bool:
    """The level kernel takes float32/float64 rois (multi_scale_roi_align
    passes no others; the composite upcasts others as torchvision's
    box_area does) and an ascending level range (k_min > k_max, maps
    listed coarsest first, clamps every box to k_max and matches none:
    left to the composite)."""
    return (_dispatch.uses_kernel(rois) and rois.dtype in (torch.float32, torch.float64)
            and k_min <= k_max)


_THRESHOLDS: dict[tuple, Tensor] = {}


def _level_thresholds(dtype: torch.dtype, device: torch.device, k_min: int, k_max: int,
                      canonical_scale: float, canonical_level: int) -> Tensor:
    """(k_max - k_min,) ``dtype`` on ``device``: for each level index b >= 1
    the smallest non-negative area that ``reference.area_levels`` maps to b
    or above. Found once per key and kept for the process (a CUDA graph
    captured after the first call keeps using it); the first call must not
    be inside a capture, whose ops would fill the table only at replay. On
    CUDA the first call waits for the table once, so that a call on another
    stream never reads it unwritten."""
    key = (dtype, device, k_min, k_max, canonical_scale, canonical_level)
    if key not in _THRESHOLDS:
        if _capturing(device):
            raise RuntimeError(
                "segops multi_scale_roi_align: the first call for this device, box dtype and "
                "level range builds a table on the device and cannot be inside CUDA graph "
                "capture; run the model once before capturing it (as a warm-up)")
        table = _bisect_thresholds(*key)
        if device.type == "cuda":   # once per key: later calls may be on other streams
            torch.cuda.synchronize(device)
        _THRESHOLDS[key] = table
    return _THRESHOLDS[key]


def _capturing(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def _bisect_thresholds(dtype, device, k_min, k_max, canonical_scale, canonical_level) -> Tensor:
    """The thresholds by bisection over the bit patterns of ``dtype``'s
    non-negative values (their order as integers is their order as
    numbers), each step evaluated by torch on ``device`` itself: the
    kernel's ``area >= threshold`` then reproduces that device's rounding
    of sqrt, division and log2 exactly, as the formula is monotone in the
    area. A fixed 31 (float32) or 63 (float64) rounds of a few device ops,
    no host sync."""
    bits, rounds, top = ((torch.int64, 63, 0x7FF0000000000000) if dtype == torch.float64
                         else (torch.int32, 31, 0x7F800000))   # top: +inf
    bound = torch.arange(1, k_max - k_min + 1, device=device)
    lo = torch.full(bound.shape, -1, dtype=bits, device=device)   # below every area
    hi = torch.full(bound.shape, top, dtype=bits, device=device)  # +inf reaches k_max
    for _ in range(rounds):
        mid = lo + (hi - lo) // 2
        reached = reference.area_levels(mid.view(dtype), k_min, k_max, canonical_scale,
                                        canonical_level) >= bound
        hi = torch.where(reached, mid, hi)
        lo = torch.where(reached, lo, mid)
    return hi.view(dtype)


def multi_scale_roi_align(features: Sequence[Tensor], boxes: Tensor | list[Tensor],
                          output_size: int | tuple[int, int], scales: Sequence[float],
                          sampling_ratio: int = -1, *, canonical_scale: float = 224,
                          canonical_level: int = 4, aligned: bool = False,
                          pool_mode: str = "avg", validate_args: bool = True) -> Tensor:
    """RoIAlign of each box on its FPN level, every level in one kernel launch,
    with torchvision's MultiScaleRoIAlign's numbers.

    The level of a box is torchvision's (FPN eq. 1): floor(canonical_level +
    log2(sqrt(area) / canonical_scale) + 1e-6), clamped to [k_min, k_max]
    with k = int(-log2(scale)) of ``scales[0]`` and ``scales[-1]``, minus
    k_min; the box is pooled on ``features[level]`` with ``scales[level]``.
    Maps need not be one level apart: as in torchvision, a box whose level
    index is past the last map gives zeros, and so does a box with x2 < x1
    or y2 < y1 (but not both: its area is negative, its level NaN). With one
    map every box is pooled on it (no level mapping).

    Args:
        features: L maps ``(N, C, H_l, W_l)``, finest first, same N, C, dtype.
        boxes: as in :func:`roi_align`.
        scales: L positive spatial scales, normally powers of 2 (e.g. 1/4,
            1/8, 1/16, 1/32).
    Returns:
        ``(K, C, PH, PW)`` in ``features[0]``'s dtype and memory format.
    """
    refuse_forward_ad("multi_scale_roi_align", features)
    if isinstance(features, Tensor) or not isinstance(features, Sequence):
        raise ArgumentTypeError(f"features must be a list of tensors, got "
                                f"{type(features).__name__}")
    features = list(features)
    if not features:
        raise ArgumentError("features is empty: pass at least one feature map")
    if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence):
        raise ArgumentTypeError(f"scales must be a list of numbers, got {type(scales).__name__}")
    if len(scales) != len(features):
        raise ArgumentError(f"got {len(scales)} scales for {len(features)} feature maps")
    scales = [check_number(f"scales[{i}]", s, positive=True) for i, s in enumerate(scales)]
    canonical_scale = check_number("canonical_scale", canonical_scale, positive=True)
    canonical_level = check_int("canonical_level", canonical_level)
    # the level kernel rewrites the batch index of a RoI past the maps to -1:
    # the indices are checked before it
    rois, (ph, pw), sampling_ratio, _ = _prepare(features, boxes, output_size, sampling_ratio,
                                                 pool_mode, validate_args)
    levels = None
    if len(features) > 1:
        box_dtype = boxes.dtype if isinstance(boxes, Tensor) else _list_box_dtype(boxes)
        rois, levels = _assign_levels(rois, scales, canonical_scale, canonical_level, box_dtype)
    return _roi_align(features, rois, levels, scales, ph, pw, sampling_ratio, bool(aligned),
                      pool_mode, False)


# graph leaves for torch.fx.symbolic_trace (see segops/ops/__init__.py)
torch.fx.wrap("roi_align")
torch.fx.wrap("multi_scale_roi_align")
