"""Mask R-CNN's mask ops with torchvision's numbers: pasting predicted masks
into the image (inference) and building mask targets (training).

``paste_masks(masks, boxes, image_shape, padding=1, *, threshold=None)``
-------------------------------------------------------------------------
Equal to ``torchvision.models.detection.roi_heads.paste_masks_in_image``,
in one kernel launch for all masks and with no host synchronisation:

* ``masks`` ``(N, 1, MH, MW)`` float (usually 28 x 28 probabilities) is
  zero-padded by ``padding`` on each side; the box ``(x0, y0, x1, y1)`` is
  expanded about its centre by ``(MW + 2 * padding) / MW`` (torchvision's
  ``expand_masks`` scale uses the mask's width for both axes) and truncated
  toward zero to integers (``.to(torch.int64)``: -0.7 becomes 0).
* The padded mask is resized with ``F.interpolate(mode='bilinear',
  align_corners=False)`` to ``max(y1 - y0 + 1, 1)`` x ``max(x1 - x0 + 1, 1)``
  and written at ``(y0, x0)``, clipped to the ``(H, W)`` image: pixel
  ``(y, x)`` with ``x0 <= x <= x1`` and ``y0 <= y <= y1`` gets the resized
  mask's ``(y - y0, x - x0)``; every other pixel is 0. The kernel computes
  each pixel's source in the padded mask directly (ATen's
  ``area_pixel_compute_source_index``: ``scale * (dst + 0.5) - 0.5``,
  clamped at 0; the last row/column repeats at the edge); neither the padded
  nor the resized mask is built.
* Returns ``(N, 1, H, W)`` in the masks' dtype, or with ``threshold`` a bool
  mask equal to torchvision's result ``> threshold`` (the comparison torch
  makes: the value in the masks' dtype against the threshold cast to it).

Box arithmetic runs in float32 (float64 for float64 boxes); torchvision runs
it in the boxes' dtype, so fp16/bf16 boxes may truncate differently (they
are unusual here: the box head predicts float32). Where segops and
torchvision differ: torchvision's Python slicing raises a size-mismatch
error for a box wholly left of the image by more than a pixel or wholly
right of it (a negative slice end wraps around); segops pastes nothing for
those. A box with a non-finite coordinate pastes nothing (torchvision's
cast of it is undefined). Coordinates are clamped to +-2^40 before the cast
(torchvision would allocate a mask that large). A NaN or inf mask value
may also reach pixels whose bilinear weight for it is 0 (0 * NaN is NaN;
ATen's CPU kernel skips such a neighbour on some axes). The pasted value
may differ from torchvision's in its last bits (fp16/bf16: segops rounds
its float32 interpolation once; float64: ATen's source index uses a fused
multiply-add, so a weight segops computes as 0 may be 1e-17 there), and so
may the bools of a value next to the threshold. Not differentiable.

``mask_targets(gt_masks, rois, matched_idxs, M)``
-------------------------------------------------
Equal to torchvision's ``roi_heads.project_masks_on_boxes``:
``roi_align(gt_masks[:, None].to(rois), cat([matched_idxs, rois]), (M, M),
spatial_scale=1.0, sampling_ratio=-1, aligned=False)[:, 0]``, for one image:

* ``gt_masks``: ``(G, H, W)`` uint8, bool or float, the image's GT masks
  (read as they are: no float copy is made on the kernel path).
* ``rois``: ``(K, 4)`` float ``(x1, y1, x2, y2)`` in that image's pixels.
* ``matched_idxs``: ``(K,)`` integer, the GT mask of each RoI, in [0, G)
  (checked: a clear error on the CPU, a device-side assert on CUDA; a
  RoI with an index outside [0, G) gives zeros when unchecked).
* ``M``: output size. Returns ``(K, M, M)`` float32 (float64 for float64
  RoIs, as torchvision's ``.to(rois)``): bilinear weights and sums in that
  dtype. A RoI with a non-finite coordinate gives zeros.

Lists (torchvision's per-image form): ``gt_masks``, ``rois`` and
``matched_idxs`` may each be a list with one entry per image; the result is
the images' targets concatenated, as ``maskrcnn_loss`` builds them. When
the images' GT masks share (H, W), dtype (bool counts as uint8) and device
and their RoIs share a dtype, all images run in one launch: the GT masks
are concatenated (one copy in their own dtype: one byte per pixel for
uint8/bool, never a float copy), the RoIs too, and each RoI's index is
shifted by its image's first mask. Otherwise (GT masks of different sizes,
e.g. torchvision's transform resizes each image's masks without padding
them) the images run one launch each.

Paths (``segops._dispatch``): the Triton kernels on CUDA and under
``TRITON_INTERPRET=1``; elsewhere the reference for ``paste_masks`` (the
same per-mask ``F.interpolate`` torchvision runs, without its wrap-around
slicing) and torchvision's own ``roi_align`` on the float masks for
``mask_targets`` when torchvision is installed (the reference otherwise).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import _checks, _dispatch
from .._checks import (FLOAT_DTYPES, INDEX_DTYPES, ArgumentError, ArgumentTypeError,
                       check_int, check_number, check_same_device, check_tensor)
from ..reference import masks as reference
from .roi_align import _native_forward, _torchvision_ops

GT_MASK_DTYPES = (torch.uint8, torch.bool, *FLOAT_DTYPES)


def _kernels():
    from ..kernels import masks as kernels  # lazy: triton is slow to import
    return kernels


# --------------------------------------------------------------------------
# custom ops
# --------------------------------------------------------------------------
@torch.library.custom_op("segops::paste_masks", mutates_args=())
def _paste_masks(masks: Tensor, boxes: Tensor, image_height: int, image_width: int,
                 padding: int, threshold: float | None) -> Tensor:
    args = (masks, boxes, image_height, image_width, padding, threshold)
    if _dispatch.uses_kernel(masks):
        return _kernels().paste_masks(*args)
    return reference.paste_masks(*args)


@_paste_masks.register_fake
def _(masks, boxes, image_height, image_width, padding, threshold):
    dtype = torch.bool if threshold is not None else masks.dtype
    return masks.new_empty((masks.shape[0], 1, image_height, image_width), dtype=dtype)


@torch.library.custom_op("segops::mask_targets", mutates_args=())
def _mask_targets(gt_masks: Tensor, rois: Tensor, matched_idxs: Tensor, M: int) -> Tensor:
    out_dtype = reference.box_dtype(rois.dtype)
    if _dispatch.uses_kernel(rois):
        return _kernels().mask_targets(gt_masks, rois, matched_idxs, M, out_dtype)
    if _dispatch.uses_native(rois) and _torchvision_ops() is not None:
        return _native_mask_targets(gt_masks, rois, matched_idxs, M, out_dtype)
    return reference.mask_targets(gt_masks, rois, matched_idxs, M, out_dtype)


@_mask_targets.register_fake
def _(gt_masks, rois, matched_idxs, M):
    return rois.new_empty((rois.shape[0], M, M), dtype=reference.box_dtype(rois.dtype))


def _native_mask_targets(gt_masks, rois, matched_idxs, M, out_dtype):
    """torchvision's project_masks_on_boxes through segops.ops.roi_align's
    native path, which pools only the RoIs torchvision defines (finite,
    index in [0, G), adaptive sample counts below 2^31 per axis and per
    bin) and leaves zeros for the others."""
    full = torch.cat([matched_idxs.to(out_dtype)[:, None], rois.to(out_dtype)], dim=1)
    return _native_forward([gt_masks[:, None].to(out_dtype)], full, None, [1.0], M, M, -1,
                           False)[:, 0]


# --------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------
def _image_shape(image_shape) -> tuple[int, int]:
    if isinstance(image_shape, torch.Size):
        image_shape = tuple(image_shape)
    if not isinstance(image_shape, (tuple, list)) or len(image_shape) != 2:
        raise ArgumentTypeError(f"image_shape must be a pair (height, width) of ints, got "
                                f"{image_shape!r}")
    return (check_int("image_shape[0] (height)", image_shape[0], minimum=0),
            check_int("image_shape[1] (width)", image_shape[1], minimum=0))


def _check_boxes(name: str, boxes, count: int | None, what: str) -> None:
    check_tensor(name, boxes, dims=(2,), dtypes=FLOAT_DTYPES)
    if boxes.shape[1] != 4:
        raise ArgumentError(f"{name} must have shape (K, 4) = (x1, y1, x2, y2) per row, got "
                            f"{tuple(boxes.shape)}")
    if count is not None and boxes.shape[0] != count:
        raise ArgumentError(f"{name} has {boxes.shape[0]} rows for {count} {what}")


def _check_indices(matched_idxs: Tensor, G: int, name: str) -> None:
    """Indices in [0, G): a device-side assert on CUDA (no host sync) and
    under torch.compile, a clear error elsewhere."""
    bad = (matched_idxs < 0) | (matched_idxs >= G)
    if _checks.values_checked_on_device(matched_idxs):
        torch._assert_async(~bad.any(), "segops mask_targets: matched_idxs holds an index "
                            f"outside [0, G) = [0, {G})")
        return
    if bool(bad.any()):
        value = int(matched_idxs[bad][0])
        raise ArgumentError(f"{name} holds {value}: indices must be in [0, G) = "
                            f"[0, {G}) for {G} GT masks")


# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------
def paste_masks(masks: Tensor, boxes: Tensor, image_shape, padding: int = 1, *,
                threshold: float | None = None) -> Tensor:
    """Paste each mask into its box of an image, as torchvision's
    ``paste_masks_in_image`` (see this module's docstring), in one launch.

    Args:
        masks: ``(N, 1, MH, MW)`` float masks (probabilities).
        boxes: ``(N, 4)`` float boxes ``(x0, y0, x1, y1)`` in image pixels.
        image_shape: ``(H, W)``.
        padding: pixels of zeros around each mask before resizing (>= 0).
        threshold: if given, return ``result > threshold`` as bool.
    Returns:
        ``(N, 1, H, W)`` in the masks' dtype, or bool with ``threshold``.
    """
    check_tensor("masks", masks, dims=(4,), dtypes=FLOAT_DTYPES)
    if masks.shape[1] != 1:
        raise ArgumentError(f"masks must have shape (N, 1, MH, MW), got {tuple(masks.shape)}")
    if masks.shape[0] > 0 and 0 in masks.shape[2:]:
        raise ArgumentError(f"masks must not be empty in MH or MW, got {tuple(masks.shape)}")
    _check_boxes("boxes", boxes, masks.shape[0], "masks")
    check_same_device(masks=masks, boxes=boxes)
    height, width = _image_shape(image_shape)
    padding = check_int("padding", padding, minimum=0)
    if threshold is not None:
        threshold = check_number("threshold", threshold)
    return _paste_masks(masks, boxes, height, width, padding, threshold)


def _check_targets(gt_masks, rois, matched_idxs, validate_args, suffix="") -> bool:
    """Argument checks of one image's mask targets; whether its indices were
    checked to be in [0, G)."""
    check_tensor(f"gt_masks{suffix}", gt_masks, dims=(3,), dtypes=GT_MASK_DTYPES)
    _check_boxes(f"rois{suffix}", rois, None, "")
    check_tensor(f"matched_idxs{suffix}", matched_idxs, dims=(1,), dtypes=INDEX_DTYPES)
    if matched_idxs.shape[0] != rois.shape[0]:
        raise ArgumentError(f"matched_idxs{suffix} has {matched_idxs.shape[0]} entries for "
                            f"{rois.shape[0]} rois")
    check_same_device(**{f"gt_masks{suffix}": gt_masks, f"rois{suffix}": rois,
                         f"matched_idxs{suffix}": matched_idxs})
    if not validate_args:
        return False
    _check_indices(matched_idxs, gt_masks.shape[0], f"matched_idxs{suffix}")
    return True


def _as_bytes(gt_masks: Tensor) -> Tensor:
    return gt_masks.view(torch.uint8) if gt_masks.dtype == torch.bool else gt_masks


def _one_launch(gt_masks, rois) -> bool:
    """Whether the images' targets can be computed together: GT masks of one
    size, dtype (bool as uint8) and device, RoIs of one dtype."""
    first, kind = gt_masks[0], _as_bytes(gt_masks[0]).dtype
    return (all(g.shape[1:] == first.shape[1:] and _as_bytes(g).dtype == kind
                and g.device == first.device for g in gt_masks)
            and all(r.dtype == rois[0].dtype for r in rois))


def _mask_targets_together(gt_masks, rois, matched_idxs, M, checked) -> Tensor:
    """Every image's targets in one launch: the GT masks concatenated (one
    copy in their own dtype), each RoI's index shifted to its image's first
    mask. An index not checked to be in [0, G_i) becomes -1 (zeros), so it
    never reaches another image's masks."""
    shifted, offset = [], 0
    for g, i, ok in zip(gt_masks, matched_idxs, checked):
        index = i.long() + offset
        if not ok:
            index = torch.where((i >= 0) & (i < g.shape[0]), index, -1)
        shifted.append(index)
        offset += g.shape[0]
    masks = torch.cat([_as_bytes(g) for g in gt_masks])
    return _mask_targets(masks, torch.cat(list(rois)), torch.cat(shifted), M)


def _check_lists(gt_masks, rois, matched_idxs) -> None:
    if not isinstance(gt_masks, (list, tuple)):
        raise ArgumentTypeError(f"gt_masks must be a Tensor[G, H, W] or a list of them, got "
                                f"{type(gt_masks).__name__}")
    for name, value in (("rois", rois), ("matched_idxs", matched_idxs)):
        if not isinstance(value, (list, tuple)):
            raise ArgumentTypeError(f"{name} must be a list like gt_masks, got "
                                    f"{type(value).__name__}")
        if len(value) != len(gt_masks):
            raise ArgumentError(f"{name} has {len(value)} entries for {len(gt_masks)} images "
                                "in gt_masks")
    if not gt_masks:
        raise ArgumentError("gt_masks is an empty list: pass one Tensor[G, H, W] per image")


def mask_targets(gt_masks: Tensor | Sequence[Tensor], rois: Tensor | Sequence[Tensor],
                 matched_idxs: Tensor | Sequence[Tensor], M: int, *,
                 validate_args: bool = True) -> Tensor:
    """Mask R-CNN's mask targets, as torchvision's ``project_masks_on_boxes``
    (see this module's docstring), reading uint8/bool GT masks directly.

    Args:
        gt_masks: ``(G, H, W)`` uint8, bool or float masks of one image, or a
            list of those (one per image).
        rois: ``(K, 4)`` positive proposals ``(x1, y1, x2, y2)`` of that
            image, or a list.
        matched_idxs: ``(K,)`` integer index of each RoI's GT mask, or a list.
        M: output size (28 in Mask R-CNN).
        validate_args: check that the indices are in [0, G).
    Returns:
        ``(K, M, M)`` float32 (float64 for float64 RoIs); with lists, the
        images' results concatenated. Lists whose GT masks share (H, W),
        dtype (bool and uint8 alike) and device, with RoIs of one dtype, run
        in one launch (the GT masks are concatenated: one copy in their own
        dtype, never a float one); otherwise one launch per image.
    """
    M = check_int("M", M, minimum=1)
    if isinstance(gt_masks, Tensor):
        _check_targets(gt_masks, rois, matched_idxs, validate_args)
        return _mask_targets(gt_masks, rois, matched_idxs, M)
    _check_lists(gt_masks, rois, matched_idxs)
    checked = [_check_targets(g, r, i, validate_args, f"[{n}]")
               for n, (g, r, i) in enumerate(zip(gt_masks, rois, matched_idxs))]
    if _one_launch(gt_masks, rois):
        return _mask_targets_together(gt_masks, rois, matched_idxs, M, checked)
    return torch.cat([_mask_targets(g, r, i, M)
                      for g, r, i in zip(gt_masks, rois, matched_idxs)], dim=0)


# graph leaves for torch.fx.symbolic_trace (see segops/ops/__init__.py)
torch.fx.wrap("paste_masks")
torch.fx.wrap("mask_targets")
