"""Box ops with torchvision's semantics: ``box_iou``, ``decode_boxes``
(BoxCoder.decode_single), ``clip_boxes_to_image``, ``nms``,
``batched_nms`` and the batch-aware ``batched_nms_per_image``.

NMS conventions
---------------
* A box is suppressed by a kept box of its segment (class for
  ``batched_nms``; image and class for ``batched_nms_per_image``) when
  their IoU is strictly above ``iou_threshold``. IoU has no +1 in widths;
  a degenerate or reversed box has intersection clamped at 0 and its signed
  area, exactly torchvision's CPU kernel's formula.
* Boxes are visited in decreasing score; equal scores by increasing index
  (a stable sort: torchvision's CPU ``nms`` sorts stably too, so results are
  equal to it; its CUDA kernel does not promise an order for ties, nor does
  its ``batched_nms`` past 1000 boxes, which re-sorts the kept indices
  unstably: on ties the same boxes are kept in another order, and a later
  top-k cut, such as the RPN's post_nms_top_n, can keep other ones). NaN
  scores sort first, as ``torch.sort(descending=True)`` and torchvision do.
* A box with a NaN coordinate has NaN area, so its IoU with every box is
  NaN, which is not above any threshold: it never suppresses and is never
  suppressed, and it is kept in its place in score order. torchvision's
  ``nms`` does the same. torchvision's ``batched_nms`` on up to 1000 boxes
  (the coordinate-offset trick) differs: one NaN coordinate makes every
  offset NaN, and nothing at all is suppressed; segops does not copy that.
  The offset trick also rounds coordinates (fp32), so near-threshold pairs
  can flip in torchvision; segops computes each segment's IoUs unshifted.
  Its other failures, where segops keeps to one segment per category (the
  result of torchvision's per-class path past 1000 boxes): an inf
  coordinate (nothing suppressed), a negative threshold (disjoint boxes of
  different categories, IoU 0, suppress each other), a largest coordinate
  of exactly -1 (zero offsets: categories merge), and category ids that
  float32 cannot tell apart (2^24 and 2^24 + 1 merge; near 2^62 the
  offsets swamp the boxes and nothing is suppressed).
* Output: int64 indices of the kept boxes in decreasing score order (ties by
  index), as torchvision's ``batched_nms`` returns them (up to the order of
  tied scores). Boxes in any float
  dtype; IoU in float32 (float64 for float64 boxes), compared with the
  threshold as torchvision compares with its double threshold.
* One host sync per call (the number of kept boxes), none before it. The
  kernel path's IoU bitmask holds sum over segments of n_s * ceil(n_s / 64)
  64-bit words; it is sized without a sync for segments of up to 2 048
  boxes (32 words per box at most), and a call with a longer segment (in
  ``batched_nms``/``batched_nms_per_image``; ``nms`` is one segment, sized
  exactly) runs the two kernels again, sized exactly, at one more sync.

Paths (``segops._dispatch``): the Triton kernels on CUDA and under
``TRITON_INTERPRET=1`` (one segmented computation: two launches however
many images and classes); elsewhere torchvision's ``nms`` per segment
(``box_iou`` likewise) where installed, else the reference.
``decode_boxes`` and ``clip_boxes_to_image`` off the GPU (and the latter
for integer boxes everywhere) run the reference
(pure PyTorch, vectorised: what BoxCoder and torchvision's clamp run;
integer boxes keep their dtype and every digit, where torchvision's clamp
returns float32 for a fractional size).

No op here has a gradient (torchvision runs them under no_grad in
detection); inputs requiring grad are treated as constants.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .. import _checks, _dispatch
from .._checks import (FLOAT_DTYPES, INDEX_DTYPES, ArgumentError, ArgumentTypeError,
                       accumulation_dtype, check_int, check_number, check_same_device,
                       check_tensor)
from ..reference import boxes as reference

DEFAULT_BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def _kernels():
    from ..kernels import boxes as kernels  # lazy: triton is slow to import
    return kernels


@functools.lru_cache(maxsize=None)
def _torchvision_ops():
    """torchvision.ops when installed with its compiled nms, else None."""
    try:
        import torchvision
        torch.ops.torchvision.nms  # noqa: B018
    except (ImportError, AttributeError, RuntimeError):
        return None
    return torchvision.ops


# --------------------------------------------------------------------------
# custom ops
# --------------------------------------------------------------------------
@torch.library.custom_op("segops::box_iou", mutates_args=())
def _box_iou(a: Tensor, b: Tensor) -> Tensor:
    out_dtype = accumulation_dtype(torch.promote_types(a.dtype, b.dtype))
    if _dispatch.uses_kernel(a):
        return _kernels().box_iou(a, b, out_dtype)
    # contiguous, as the fake promises (strided boxes give strided results there)
    if _dispatch.uses_native(a) and _torchvision_ops() is not None:
        return _torchvision_ops().box_iou(a.to(out_dtype), b.to(out_dtype)).contiguous()
    return reference.box_iou(a, b).contiguous()


@_box_iou.register_fake
def _(a, b):
    out_dtype = accumulation_dtype(torch.promote_types(a.dtype, b.dtype))
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


@torch.library.custom_op("segops::clip_boxes_to_image", mutates_args=())
def _clip_boxes(boxes: Tensor, height: float, width: float) -> Tensor:
    if boxes.is_floating_point() and _dispatch.uses_kernel(boxes):
        return _kernels().clip_boxes(boxes, height, width)
    # off the kernels, the reference's clamp: torchvision's gives the same
    # for float boxes, and turns integer boxes to float32 for a fractional
    # size (the documented result keeps their dtype and every digit)
    return reference.clip_boxes(boxes, height, width).contiguous()


@_clip_boxes.register_fake
def _(boxes, height, width):
    return torch.empty_like(boxes, memory_format=torch.contiguous_format)


@torch.library.custom_op("segops::decode_boxes", mutates_args=())
def _decode_boxes(rel_codes: Tensor, boxes: Tensor, weights: list[float], clip: float,
                  image_size: list[float] | None) -> Tensor:
    if _dispatch.uses_kernel(rel_codes):
        return _kernels().decode_boxes(rel_codes, boxes, weights, clip, image_size)
    return reference.decode_boxes(rel_codes, boxes, weights, clip, image_size).contiguous()


@_decode_boxes.register_fake
def _(rel_codes, boxes, weights, clip, image_size):
    return torch.empty_like(rel_codes, memory_format=torch.contiguous_format)


@torch.library.custom_op("segops::batched_nms", mutates_args=())
def _batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor | None,
                 iou_threshold: float) -> Tensor:
    if _dispatch.uses_kernel(boxes):
        keys = [] if idxs is None else [idxs]
        order, kept, counts = _kernel_nms(boxes, scores, keys, iou_threshold, _select_all)
        return _take(order, kept, counts)[0]
    if _dispatch.uses_native(boxes) and _torchvision_ops() is not None:
        return _native_batched_nms(boxes, scores, idxs, iou_threshold)
    return reference.batched_nms(boxes, scores, idxs, iou_threshold)


@_batched_nms.register_fake
def _(boxes, scores, idxs, iou_threshold):
    count = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((count,), dtype=torch.int64)


@torch.library.custom_op("segops::batched_nms_per_image", mutates_args=())
def _batched_nms_per_image(boxes: Tensor, scores: Tensor, idxs: Tensor | None,
                           image_ids: Tensor, iou_threshold: float, max_per_image: int,
                           num_images: int) -> list[Tensor]:
    cap = None if max_per_image < 0 else max_per_image
    if _dispatch.uses_kernel(boxes):
        keys = [image_ids] if idxs is None else [image_ids, idxs]

        def select(order, keep):
            return _select_per_image(order, keep, image_ids, cap, num_images)
        return _take(*_kernel_nms(boxes, scores, keys, iou_threshold, select))
    if _dispatch.uses_native(boxes) and _torchvision_ops() is not None:
        results = []
        for image in range(num_images):
            rows = torch.nonzero(image_ids == image).flatten()
            sub_idxs = None if idxs is None else idxs[rows]
            kept = rows[_native_batched_nms(boxes[rows], scores[rows], sub_idxs, iou_threshold)]
            results.append(kept if cap is None else kept[:cap].clone())
        return results
    return reference.batched_nms_per_image(boxes, scores, idxs, image_ids, iou_threshold, cap,
                                           num_images)


@_batched_nms_per_image.register_fake
def _(boxes, scores, idxs, image_ids, iou_threshold, max_per_image, num_images):
    ctx = torch.library.get_ctx()
    return [boxes.new_empty((ctx.new_dynamic_size(),), dtype=torch.int64)
            for _ in range(num_images)]


# --------------------------------------------------------------------------
# assembling results on the device (kernel path)
# --------------------------------------------------------------------------
def _kernel_nms(boxes: Tensor, scores: Tensor, keys: list[Tensor], iou_threshold: float,
                select) -> tuple[Tensor, Tensor, list[int]]:
    """Segmented NMS by the kernels, then ``select(order, keep) -> (order,
    kept, counts)`` on the device and ``counts`` read on the host: the call's
    one host sync. The bitmask's needed size rides along in that read: the
    kernels size it without a sync for segments of up to
    ``kernels.GUESS_SEGMENT`` boxes (exactly for a single segment), and
    skip longer ones; only then does NMS run again, sized exactly (two more
    launches and a second sync). Sizing exactly up front would need a sync
    before the launches as well as the one for the counts after them."""
    kernels = _kernels()
    order, keep, needed, size = kernels.nms_keep(boxes, scores, keys, iou_threshold)
    order, kept, counts = select(order, keep)
    *counts, longest, words = torch.cat([counts, needed]).tolist()  # the one host sync
    if longest > size[0]:
        order, keep, _, _ = kernels.nms_keep(boxes, scores, keys, iou_threshold,
                                             size=(longest, words))
        order, kept, counts = select(order, keep)
        counts = counts.tolist()
    return order, kept, counts


def _select_all(order: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Every kept box, in (-score, index) order."""
    kept = keep[order]
    return order, kept, kept.sum().view(1)


def _select_per_image(order: Tensor, keep: Tensor, image_ids: Tensor, cap: int | None,
                      num_images: int) -> tuple[Tensor, Tensor, Tensor]:
    """(order, kept, counts) on the device: ``order``, the (-score, index)
    permutation, re-sorted by (image, -score, index), ``kept`` marking its
    positions returned (the first ``cap`` kept boxes of each image),
    ``counts`` how many per image."""
    device = keep.device
    n = keep.shape[0]
    order = order[torch.sort(image_ids[order], stable=True).indices]
    kept = keep[order]
    images = image_ids[order].long()
    if cap is not None:
        running = torch.cumsum(kept.long(), 0)
        # kept boxes before each image's first position
        first = torch.searchsorted(images, images, side="left")
        before = torch.where(first > 0, running[(first - 1).clamp(min=0)], 0)
        kept = kept & (running - before <= cap)
    bounds = torch.searchsorted(images, torch.arange(num_images + 1, device=device),
                                side="left")
    running = torch.zeros(n + 1, dtype=torch.int64, device=device)
    running[1:] = torch.cumsum(kept.long(), 0)
    return order, kept, running[bounds[1:]] - running[bounds[:-1]]


def _take(order: Tensor, kept: Tensor, counts: list[int]) -> list[Tensor]:
    """The positions of ``order`` marked ``kept``, in order, split by
    ``counts`` (already on the host: no sync)."""
    total = sum(counts)
    # kept positions first, in order (a stable sort: no sync for their number)
    picked = order[torch.sort((~kept).to(torch.uint8), stable=True).indices[:total]]
    # separate tensors (a custom op's outputs may not alias one another)
    return [part.clone() for part in torch.split(picked, counts)]


# --------------------------------------------------------------------------
# native path: torchvision's nms per segment, off the GPU
# --------------------------------------------------------------------------
def _native_nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """torchvision's CPU nms (a stable sort, so ties by index), in float32
    for fp16/bf16 (which it does not implement) and with scores in the
    boxes' dtype (which it requires): scores wider than that (float64 with
    float32 boxes) are replaced by their dense rank, which keeps their order
    and ties where rounding them would merge neighbours."""
    acc = accumulation_dtype(boxes.dtype)
    if scores.dtype.itemsize > acc.itemsize:
        scores = _dense_rank(scores)
    return _torchvision_ops().nms(boxes.to(acc), scores.to(acc), iou_threshold)


def _dense_rank(scores: Tensor) -> Tensor:
    """Equal scores share a rank, a higher score has a higher rank (NaN is
    the highest, as torch.sort has it), all exact in float32 (< 2^24 boxes)."""
    if scores.numel() == 0:
        return scores.to(torch.int64)
    ordered, order = torch.sort(scores, stable=True)
    same = (ordered[1:] == ordered[:-1]) | (ordered[1:].isnan() & ordered[:-1].isnan())
    rank = torch.cat([ordered.new_zeros(1, dtype=torch.int64), (~same).long().cumsum(0)])
    return torch.empty_like(rank).scatter_(0, order, rank)


def _native_batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor | None,
                        iou_threshold: float) -> Tensor:
    """torchvision's nms per class (the exact 'vanilla' form of its
    batched_nms), then the kept boxes in (-score, index) order."""
    if idxs is None or boxes.shape[0] == 0:
        return _native_nms(boxes, scores, iou_threshold)
    keep = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    for value in torch.unique(idxs):
        rows = torch.nonzero(idxs == value).flatten()
        keep[rows[_native_nms(boxes[rows], scores[rows], iou_threshold)]] = True
    kept = torch.nonzero(keep).flatten()
    return kept[torch.sort(scores[kept], descending=True, stable=True).indices]


# --------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------
def _check_real(name: str, t: Tensor) -> None:
    if t.dtype.is_complex or t.dtype == torch.bool:
        raise ArgumentTypeError(f"{name} must hold real coordinates, got {t.dtype}")


def _check_boxes(name: str, t, dtypes=None) -> None:
    check_tensor(name, t, dims=(2,), dtypes=dtypes)
    if t.shape[1] != 4:
        raise ArgumentError(f"{name} must have shape (N, 4) = (x1, y1, x2, y2) per row, got "
                            f"{tuple(t.shape)}")
    _check_real(name, t)


def _check_vector(name: str, t, n: int, dtypes, boxes: Tensor) -> None:
    check_tensor(name, t, dims=(1,), dtypes=dtypes)
    if t.shape[0] != n:
        raise ArgumentError(f"{name} must have one entry per box ({n}), got {t.shape[0]}")
    check_same_device(boxes=boxes, **{name: t})


def _check_nms(boxes, scores, idxs, iou_threshold) -> float:
    _check_boxes("boxes", boxes, FLOAT_DTYPES)
    _check_vector("scores", scores, boxes.shape[0], FLOAT_DTYPES, boxes)
    if idxs is not None:
        _check_vector("idxs", idxs, boxes.shape[0], INDEX_DTYPES, boxes)
    return check_number("iou_threshold", iou_threshold)


def _check_image_ids(image_ids: Tensor, num_images: int) -> None:
    """Image ids in [0, num_images): a clear error on the CPU, a device-side
    assert on CUDA (no sync) and under torch.compile."""
    if image_ids.numel() == 0:
        return
    bad = (image_ids < 0) | (image_ids >= num_images)
    if _checks.values_checked_on_device(image_ids):
        torch._assert_async(~bad.any(), "segops batched_nms_per_image: image_ids hold a value "
                            f"outside [0, num_images) = [0, {num_images})")
        return
    if bool(bad.any()):
        raise ArgumentError(f"image_ids hold {image_ids[bad][0].item()}: image ids must be in "
                            f"[0, num_images) = [0, {num_images})")


# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------
def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU, ``torchvision.ops.box_iou`` for ``(x1, y1, x2, y2)`` boxes.

    Args:
        boxes1: ``(N, 4)``; boxes2: ``(M, 4)``; any real dtype.
    Returns:
        ``(N, M)`` float32 (float64 if either input is float64), as torchvision
        returns for fp16/bf16/integer boxes too. NaN coordinates give NaN
        IoUs; reversed boxes give torchvision's (signed-area) values.
        Widths, areas and the division are float32 (float64) arithmetic on
        the coordinates as given, also for fp16/bf16 and integer boxes,
        where torchvision subtracts in the box dtype: its fp16 widths round
        (IoU 1.000244 for two boxes 0.5 apart at x2 = 2050, segops 0.999756),
        its int32 areas overflow past 2^31 and uint8 differences wrap
        (negative IoUs); segops' do not.
    """
    _check_boxes("boxes1", boxes1)
    _check_boxes("boxes2", boxes2)
    check_same_device(boxes1=boxes1, boxes2=boxes2)
    return _box_iou(boxes1, boxes2)


def _size_pair(size) -> tuple[float, float]:
    if isinstance(size, Tensor) or not isinstance(size, Sequence) or len(size) != 2:
        raise ArgumentTypeError(f"size must be a (height, width) pair of numbers, got {size!r}")
    return (check_number("size[0] (height)", size[0]), check_number("size[1] (width)", size[1]))


def clip_boxes_to_image(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """``torchvision.ops.clip_boxes_to_image``: x coordinates (even columns)
    clamped to [0, width], y (odd columns) to [0, height]; NaN stays NaN.

    Args:
        boxes: ``(..., 4)`` (any even last dim: several boxes per row).
        size: ``(height, width)``.
    Returns:
        clipped boxes, same shape and dtype (contiguous).
    """
    check_tensor("boxes", boxes)
    if boxes.dim() == 0 or boxes.shape[-1] % 2:
        raise ArgumentError(f"boxes must have shape (..., 4), got {tuple(boxes.shape)}")
    _check_real("boxes", boxes)
    height, width = _size_pair(size)
    return _clip_boxes(boxes, height, width)


def decode_boxes(rel_codes: Tensor, boxes: Tensor | Sequence[Tensor],
                 weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                 bbox_xform_clip: float = DEFAULT_BBOX_XFORM_CLIP, *,
                 image_size: tuple[int, int] | None = None) -> Tensor:
    """Box decoding, ``BoxCoder(weights, bbox_xform_clip).decode_single``.

    Args:
        rel_codes: ``(N, 4K)`` deltas (dx, dy, dw, dh) for K classes.
        boxes: ``(N, 4)`` reference boxes, or a list of ``(L_i, 4)`` that
            concatenates to N rows (as ``BoxCoder.decode`` takes them).
        weights: ``(wx, wy, ww, wh)``: the deltas are divided by them.
        bbox_xform_clip: dw, dh are clamped to at most this before ``exp``.
        image_size: ``(height, width)``: also clip the decoded boxes to the
            image in the same pass (``clip_boxes_to_image``).
    Returns:
        ``(N, 4K)`` decoded boxes in ``rel_codes``' dtype, computed in float32
        (float64 for float64 codes).
    """
    check_tensor("rel_codes", rel_codes, dims=(2,), dtypes=FLOAT_DTYPES)
    if rel_codes.shape[1] % 4:
        raise ArgumentError(f"rel_codes must have shape (N, 4K), got {tuple(rel_codes.shape)}")
    if not isinstance(boxes, Tensor):
        if not isinstance(boxes, Sequence) or not boxes:
            raise ArgumentTypeError("boxes must be a Tensor[N, 4] or a non-empty list of "
                                    f"Tensor[L, 4], got {boxes!r}")
        for i, b in enumerate(boxes):
            _check_boxes(f"boxes[{i}]", b)
        boxes = torch.cat(list(boxes))
    _check_boxes("boxes", boxes)
    if boxes.shape[0] != rel_codes.shape[0]:
        raise ArgumentError(f"rel_codes has {rel_codes.shape[0]} rows for {boxes.shape[0]} "
                            "boxes: one row of codes per box")
    check_same_device(rel_codes=rel_codes, boxes=boxes)
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) \
            or len(weights) != 4:
        raise ArgumentTypeError(f"weights must be 4 numbers (wx, wy, ww, wh), got {weights!r}")
    weights = [check_number(f"weights[{i}]", w) for i, w in enumerate(weights)]
    clip = check_number("bbox_xform_clip", bbox_xform_clip)
    size = None if image_size is None else list(_size_pair(image_size))
    return _decode_boxes(rel_codes, boxes, weights, clip, size)


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Non-maximum suppression, ``torchvision.ops.nms`` (see the module
    docstring for ties, NaN and degenerate boxes).

    Args:
        boxes: ``(N, 4)`` in ``(x1, y1, x2, y2)``, any float dtype.
        scores: ``(N,)`` any float dtype.
        iou_threshold: suppress boxes with IoU > iou_threshold.
    Returns:
        int64 indices of the kept boxes in decreasing score order.
    """
    iou_threshold = _check_nms(boxes, scores, None, iou_threshold)
    return _batched_nms(boxes, scores, None, iou_threshold)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each category of ``idxs``, ``torchvision.ops.batched_nms``:
    one segmented computation (no coordinate offsets), IoUs only between
    boxes of a category.

    Args:
        boxes: ``(N, 4)``; scores: ``(N,)``; idxs: ``(N,)`` integer categories.
        iou_threshold: suppress boxes with IoU > iou_threshold.
    Returns:
        int64 indices of the kept boxes in decreasing score order (ties by
        index).
    """
    if idxs is None:
        raise ArgumentTypeError("idxs must be a torch.Tensor, got NoneType (use nms)")
    iou_threshold = _check_nms(boxes, scores, idxs, iou_threshold)
    return _batched_nms(boxes, scores, idxs, iou_threshold)


def batched_nms_per_image(boxes: Tensor, scores: Tensor, idxs: Tensor | None,
                          image_ids: Tensor, iou_threshold: float,
                          max_per_image: int | None = None, *,
                          num_images: int | None = None) -> list[Tensor]:
    """NMS for a whole batch of a detector in one call: within each (image,
    category) pair, all of them in one segmented computation and one host
    sync.

    Args:
        boxes: ``(N, 4)``, scores: ``(N,)`` for every image's boxes.
        idxs: ``(N,)`` integer categories (FPN level in the RPN, class in the
            box head), or None for one category per image.
        image_ids: ``(N,)`` integer image of each box, in [0, num_images).
        iou_threshold: suppress boxes with IoU > iou_threshold.
        max_per_image: keep at most this many per image (None: all).
        num_images: number of images; pass it (the detector knows it):
            without it, ``image_ids.max() + 1`` costs one more host sync.
    Returns:
        a list of ``num_images`` int64 tensors: image i's kept indices (into
        the whole batch) in decreasing score order, equal to
        ``batched_nms(boxes[m], scores[m], idxs[m], t)[:max_per_image]``
        mapped back through ``m = image_ids == i``.
    """
    iou_threshold = _check_nms(boxes, scores, idxs, iou_threshold)
    _check_vector("image_ids", image_ids, boxes.shape[0], INDEX_DTYPES, boxes)
    cap = -1 if max_per_image is None else check_int("max_per_image", max_per_image, minimum=0)
    if num_images is None:
        num_images = int(image_ids.max()) + 1 if image_ids.numel() else 0
    num_images = check_int("num_images", num_images, minimum=0)
    _check_image_ids(image_ids, num_images)
    return _batched_nms_per_image(boxes, scores, idxs, image_ids, iou_threshold, cap,
                                  num_images)


# graph leaves for torch.fx.symbolic_trace (see segops/ops/__init__.py)
for _name in ("box_iou", "clip_boxes_to_image", "decode_boxes", "nms", "batched_nms",
              "batched_nms_per_image"):
    torch.fx.wrap(_name)
del _name
