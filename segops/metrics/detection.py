"""COCO-style mean average precision (AP / AR) for boxes and instance masks.

Gives pycocotools' ``COCOeval`` numbers (``evaluate``, ``accumulate``,
``summarize``) without pycocotools: IoU thresholds .50:.05:.95, 101-point
interpolated precision, at most 1 / 10 / 100 detections per image and class,
the all / small / medium / large area ranges, greedy matching in score order
with COCO's rules (a detection takes the unmatched ground truth of its class
with the highest IoU >= the threshold, the last one on ties; regular ground
truths before ignored ones), crowd ground truths (``iscrowd``: ignored,
matched any number of times, IoU over the detection's area) included.

Inputs follow torchvision / torchmetrics (boxes ``x1, y1, x2, y2`` in pixels;
a box's width and height are taken in its own dtype, as torchmetrics takes
them: float16/bfloat16 boxes round them, so an IoU near a threshold can
fall on the other side of it than the exact float64 IoU would):

* a prediction: ``{"boxes": (N, 4) float, "scores": (N,) float,
  "labels": (N,) int, "masks": (N, H, W) bool or (N, 1, H, W) probabilities}``
  (masks only for ``"segm"``, boxes only for ``"bbox"``); float masks are
  binarised at ``mask_threshold`` (strictly above, like torchvision's COCO
  evaluation), integer masks at != 0;
* a target: ``{"boxes": (K, 4) float, "labels": (K,) int, "masks": (K, H, W)
  uint8/bool, optional "iscrowd": (K,) 0/1, optional "area": (K,)}``.

Areas for the small / medium / large ranges: a detection's is its box area
(``"bbox"``) or mask pixel count (``"segm"``); a ground truth's is its
``"area"`` entry where that is > 0 (COCO's annotations give the mask area,
used for both IoU types), else like a detection's (torchmetrics' rule).

This is an evaluation metric, not an op: it moves data to the host.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .._checks import ArgumentError, ArgumentTypeError, check_number

__all__ = ["MeanAveragePrecision", "mean_average_precision", "box_iou_coco",
           "mask_iou_coco", "coco_iou_thresholds", "coco_recall_thresholds",
           "IOU_TYPES", "AREA_RANGES"]

IOU_TYPES = ("bbox", "segm")
# (name, lowest area, highest area), both ends inclusive, as pycocotools
AREA_RANGES = (("all", 0.0, 1e5 ** 2), ("small", 0.0, 32.0 ** 2),
               ("medium", 32.0 ** 2, 96.0 ** 2), ("large", 96.0 ** 2, 1e5 ** 2))


def coco_iou_thresholds() -> np.ndarray:
    """pycocotools' IoU thresholds .50:.05:.95 (10 float64 values, exactly
    as ``np.linspace`` gives them there)."""
    return np.linspace(.5, 0.95, int(np.round((0.95 - .5) / .05)) + 1, endpoint=True)


def coco_recall_thresholds() -> np.ndarray:
    """pycocotools' 101 recall points 0:.01:1."""
    return np.linspace(.0, 1.00, int(np.round((1.00 - .0) / .01)) + 1, endpoint=True)


# ----------------------------------------------------------------------------
# IoU, as pycocotools' maskApi.c computes it
# ----------------------------------------------------------------------------

def _xywh(boxes: Tensor) -> np.ndarray:
    """``(N, 4)`` xyxy -> float64 ``x, y, w, h`` (width and height taken in
    the boxes' own dtype, as a COCO results file written from them holds)."""
    wh = boxes[:, 2:] - boxes[:, :2]
    return torch.cat([boxes[:, :2], wh], 1).detach().cpu().double().numpy()


def box_iou_coco(dt_boxes: Tensor, gt_boxes: Tensor,
                 gt_crowd: Tensor | np.ndarray | None = None) -> np.ndarray:
    """IoU of every detection with every ground-truth box, pycocotools' way.

    Args:
        dt_boxes: ``(D, 4)`` xyxy.
        gt_boxes: ``(G, 4)`` xyxy.
        gt_crowd: ``(G,)`` bool/0-1; for a crowd box the union is the
            detection's area alone.
    Returns:
        ``(D, G)`` float64 numpy array.
    """
    return _xywh_iou(_xywh(dt_boxes), _xywh(gt_boxes), _crowd_flags(gt_crowd, len(gt_boxes)))


def _xywh_iou(d: np.ndarray, g: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """maskApi.c's bbIou on float64 ``(D, 4)`` / ``(G, 4)`` xywh arrays."""
    w = (np.minimum(d[:, None, 0] + d[:, None, 2], g[None, :, 0] + g[None, :, 2])
         - np.maximum(d[:, None, 0], g[None, :, 0]))
    h = (np.minimum(d[:, None, 1] + d[:, None, 3], g[None, :, 1] + g[None, :, 3])
         - np.maximum(d[:, None, 1], g[None, :, 1]))
    overlap = (w > 0) & (h > 0)
    inter = np.where(overlap, w * h, 0.0)
    dt_area = (d[:, 2] * d[:, 3])[:, None]
    union = np.where(crowd[None, :], dt_area, dt_area + (g[:, 2] * g[:, 3])[None, :] - inter)
    return np.divide(inter, union, out=np.zeros_like(inter), where=overlap)


def mask_iou_coco(dt_masks: Tensor, gt_masks: Tensor,
                  gt_crowd: Tensor | np.ndarray | None = None) -> np.ndarray:
    """IoU of every detection mask with every ground-truth mask, in pixels.

    Args:
        dt_masks: ``(D, H, W)`` bool.
        gt_masks: ``(G, H, W)`` bool.
        gt_crowd: ``(G,)``; for a crowd mask the union is the detection's area.
    Returns:
        ``(D, G)`` float64 numpy array (0 where the masks do not intersect).
    """
    return _mask_stats(dt_masks, gt_masks, _crowd_flags(gt_crowd, gt_masks.shape[0]))[0]


def _mask_stats(dt_masks: Tensor, gt_masks: Tensor,
                crowd: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(IoU ``(D, G)``, detection areas ``(D,)``, ground-truth areas ``(G,)``)
    in float64 from ``(D, H, W)`` / ``(G, H, W)`` bool masks (maskApi.c's
    rleIou: the union is the detection's area for a crowd)."""
    inter, dt_area, gt_area = _mask_counts(dt_masks, gt_masks)
    union = np.where(crowd[None, :], dt_area[:, None], dt_area[:, None] + gt_area[None, :] - inter)
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=inter > 0)
    return iou, dt_area, gt_area


def _mask_counts(dt_masks: Tensor, gt_masks: Tensor) -> tuple[np.ndarray, ...]:
    """Pixel counts as float64: ``dt & gt`` ``(D, G)``, ``dt`` ``(D,)``,
    ``gt`` ``(G,)``, from products and sums of 0/1 values (exact: float32
    below 2**24 pixels, float64 above), in chunks of detections that keep
    the float copy near 64 MiB, on the detections' device."""
    pixels = dt_masks.shape[-2] * dt_masks.shape[-1]
    dtype = torch.float32 if pixels < 2 ** 24 else torch.float64
    gt = gt_masks.flatten(1).to(dt_masks.device, dtype)
    rows = max(1, (1 << 24) // max(pixels, 1))
    inter, dt_area = [gt.new_zeros(0, gt.shape[0])], [gt.new_zeros(0)]
    for chunk in dt_masks.flatten(1).split(rows):
        chunk = chunk.to(dtype)
        inter.append(chunk @ gt.T)
        dt_area.append(chunk.sum(1))

    def host(t):
        return t.double().cpu().numpy()
    return host(torch.cat(inter)), host(torch.cat(dt_area)), host(gt.sum(1))


def _crowd_flags(gt_crowd, count: int) -> np.ndarray:
    if gt_crowd is None:
        return np.zeros(count, dtype=bool)
    if isinstance(gt_crowd, Tensor):
        gt_crowd = gt_crowd.detach().cpu().numpy()
    return np.asarray(gt_crowd).astype(bool).reshape(count)


# ----------------------------------------------------------------------------
# Matching (COCOeval.evaluateImg) and accumulation (COCOeval.accumulate)
# ----------------------------------------------------------------------------

@dataclass
class _ClassImage:
    """One class in one image, after matching (COCOeval's ``evalImgs``).

    scores: ``(D,)`` float64, descending (stable), at most the largest max
        detections. matched / ignored: ``(A, T, D)`` bool per area range and
        IoU threshold. num_gt: ``(A,)`` ground truths not ignored.
    """
    scores: np.ndarray
    matched: np.ndarray
    ignored: np.ndarray
    num_gt: np.ndarray


def _last_argmax(values: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """For each row of ``allowed`` ``(T, G)``: the column of the largest
    allowed ``values[col]``, the last such column on ties; -1 if none."""
    masked = np.where(allowed, values[None, :], -np.inf)[:, ::-1]
    column = allowed.shape[1] - 1 - masked.argmax(1)
    return np.where(allowed.any(1), column, -1)


def _greedy_match(ious: np.ndarray, gt_ignore: np.ndarray, gt_crowd: np.ndarray,
                 thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """COCO's greedy matching of one image and class, for every threshold.

    Args:
        ious: ``(D, G)`` with the detections in descending score order.
        gt_ignore: ``(G,)`` bool, ground truths that are ignored (crowd, or
            outside the area range).
        gt_crowd: ``(G,)`` bool; a crowd ground truth can take any number of
            detections.
        thresholds: ``(T,)`` IoU thresholds (a match needs IoU >= threshold,
            capped at 1 - 1e-10).
    Returns:
        ``matched`` ``(T, D)`` bool and ``on_ignored`` ``(T, D)`` bool (the
        detection matched an ignored ground truth).

    Each detection in turn takes, among the ground truths still free at that
    threshold, the not-ignored one with the highest IoU >= the threshold
    (the last in order on ties), or failing that the ignored one.
    """
    num_dt, num_gt = ious.shape
    matched = np.zeros((len(thresholds), num_dt), dtype=bool)
    on_ignored = np.zeros_like(matched)
    if num_dt == 0 or num_gt == 0:
        return matched, on_ignored
    limit = np.minimum(thresholds, 1 - 1e-10)[:, None]
    taken = np.zeros((len(thresholds), num_gt), dtype=bool)
    reachable = np.nonzero(ious.max(1) >= limit.min())[0]   # the rest match nothing
    for d in reachable:
        candidate = (~taken | gt_crowd[None, :]) & (ious[d][None, :] >= limit)
        best = _last_argmax(ious[d], candidate & ~gt_ignore[None, :])
        best = np.where(best >= 0, best, _last_argmax(ious[d], candidate & gt_ignore[None, :]))
        hit = np.nonzero(best >= 0)[0]
        taken[hit, best[hit]] = True
        matched[hit, d] = True
        on_ignored[hit, d] = gt_ignore[best[hit]]
    return matched, on_ignored


def _evaluate_class(ious: np.ndarray, scores: np.ndarray, dt_area: np.ndarray,
                    gt_area: np.ndarray, gt_crowd: np.ndarray,
                    thresholds: np.ndarray) -> _ClassImage:
    """Match one image's detections of one class (already sorted and cut to
    the largest max detections) in every area range."""
    matched, ignored, num_gt, done = [], [], [], {}
    for _, low, high in AREA_RANGES:
        gt_ignore = gt_crowd | (gt_area < low) | (gt_area > high)
        key = gt_ignore.tobytes()          # the matching depends on the area range only here
        if key not in done:
            done[key] = _greedy_match(ious, gt_ignore, gt_crowd, thresholds)
        hit, on_ignored = done[key]
        outside = (dt_area < low) | (dt_area > high)
        matched.append(hit)
        ignored.append(on_ignored | (~hit & outside[None, :]))
        num_gt.append(int((~gt_ignore).sum()))
    return _ClassImage(scores, np.stack(matched), np.stack(ignored), np.array(num_gt))


def _precision_recall(entries: list[_ClassImage], area: int, max_det: int, num_gt: int,
                      rec_thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Interpolated precision ``(T, R)`` and final recall ``(T,)`` of one
    class in one area range, the detections of every image pooled by score."""
    scores = np.concatenate([e.scores[:max_det] for e in entries])
    order = np.argsort(-scores, kind="mergesort")
    matched = np.concatenate([e.matched[area][:, :max_det] for e in entries], axis=1)[:, order]
    ignored = np.concatenate([e.ignored[area][:, :max_det] for e in entries], axis=1)[:, order]
    tp = np.cumsum(matched & ~ignored, axis=1).astype(float)
    fp = np.cumsum(~matched & ~ignored, axis=1).astype(float)
    recall = tp / num_gt
    precision = tp / (fp + tp + np.spacing(1))
    precision = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
    num_dt = tp.shape[1]
    interpolated = np.zeros((tp.shape[0], len(rec_thresholds)))
    for t in range(tp.shape[0]):
        index = np.searchsorted(recall[t], rec_thresholds, side="left")
        inside = index < num_dt
        interpolated[t, inside] = precision[t, index[inside]]
    final = recall[:, -1] if num_dt else np.zeros(tp.shape[0])
    return interpolated, final


def _accumulate(records: list[dict[int, _ClassImage]], classes: list[int],
                thresholds: np.ndarray, rec_thresholds: np.ndarray,
                max_dets: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """COCOeval's ``precision`` ``(T, R, K, A, M)`` and ``recall``
    ``(T, K, A, M)``, -1 for a class with no (not ignored) ground truth."""
    T, R, K, A, M = (len(thresholds), len(rec_thresholds), len(classes),
                     len(AREA_RANGES), len(max_dets))
    precision, recall = -np.ones((T, R, K, A, M)), -np.ones((T, K, A, M))
    for k, label in enumerate(classes):
        entries = [image[label] for image in records if label in image]
        for a in range(A):
            num_gt = sum(int(e.num_gt[a]) for e in entries)
            if num_gt == 0:
                continue
            for m, max_det in enumerate(max_dets):
                precision[:, :, k, a, m], recall[:, k, a, m] = _precision_recall(
                    entries, a, max_det, num_gt, rec_thresholds)
    return precision, recall


def _mean_valid(values: np.ndarray) -> float:
    """Mean of the entries > -1 (COCO's convention for absent classes), -1 if none."""
    valid = values[values > -1]
    return float(np.mean(valid)) if valid.size else -1.0


def _summarize(precision: np.ndarray, recall: np.ndarray, thresholds: np.ndarray,
               max_dets: tuple[int, ...]) -> dict[str, float]:
    """COCOeval.summarize's twelve numbers (map uses the largest max dets)."""
    areas = {name: a for a, (name, _, _) in enumerate(AREA_RANGES)}

    def ap(iou=None, area="all"):
        s = precision if iou is None else precision[np.where(thresholds == iou)[0]]
        return _mean_valid(s[:, :, :, areas[area], -1])

    def ar(m=-1, area="all"):
        return _mean_valid(recall[:, :, areas[area], m])

    out = {"map": ap(), "map_50": ap(0.5), "map_75": ap(0.75)}
    out.update({f"map_{n}": ap(area=n) for n in ("small", "medium", "large")})
    out.update({f"mar_{d}": ar(m) for m, d in enumerate(max_dets)})
    out.update({f"mar_{n}": ar(area=n) for n in ("small", "medium", "large")})
    return out


# ----------------------------------------------------------------------------
# Input checks and per-image preparation
# ----------------------------------------------------------------------------

def _check_iou_type(iou_type) -> tuple[str, ...]:
    types = (iou_type,) if isinstance(iou_type, str) else iou_type
    if not isinstance(types, (tuple, list)) or not types or len(set(types)) != len(types) \
            or any(t not in IOU_TYPES for t in types):
        raise ArgumentError(f"iou_type must be 'bbox', 'segm' or a tuple of them without "
                            f"repeats, got {iou_type!r}")
    return tuple(types)


def _check_thresholds(name: str, value, default: np.ndarray) -> np.ndarray:
    if value is None:
        return default
    try:
        values = np.asarray([check_number(f"{name}[{i}]", v) for i, v in enumerate(value)],
                            dtype=np.float64)
    except TypeError as error:
        raise ArgumentTypeError(f"{name} must be a sequence of numbers: {error}") from None
    if values.size == 0 or (values < 0).any() or (values > 1).any() \
            or (np.diff(values) <= 0).any():
        raise ArgumentError(f"{name} must be increasing numbers in [0, 1], got {value!r}")
    return values


def _check_max_dets(value) -> tuple[int, int, int]:
    if not isinstance(value, (tuple, list)) or len(value) != 3 or any(
            isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in value):
        raise ArgumentTypeError(f"max_detection_thresholds must be 3 ints, got {value!r}")
    value = tuple(int(v) for v in value)
    if value[0] < 1 or not value[0] < value[1] < value[2]:
        raise ArgumentError(f"max_detection_thresholds must be increasing and >= 1, got {value}")
    return value


def _get(item: dict, key: str, where: str, dims: tuple[int, ...], *,
         floating: bool | None = None) -> Tensor:
    """``item[key]`` checked to be a tensor of ``dims`` dimensions (and a
    float / integer dtype when ``floating`` is True / False)."""
    if key not in item:
        raise ArgumentError(f"{where} has no {key!r} entry")
    value = item[key]
    name = f"{where}[{key!r}]"
    if not isinstance(value, Tensor):
        raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() not in dims:
        raise ArgumentError(f"{name} must have {' or '.join(map(str, dims))} dimensions, "
                            f"got shape {tuple(value.shape)}")
    if floating is not None and value.is_floating_point() != floating:
        kind = "a floating" if floating else "an integer"
        raise ArgumentTypeError(f"{name} must have {kind} dtype, got {value.dtype}")
    return value


def _boxes(item: dict, where: str, count: int) -> Tensor:
    boxes = _get(item, "boxes", where, (1, 2), floating=True)
    if boxes.numel() == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.dim() != 2 or boxes.shape != (count, 4):
        raise ArgumentError(f"{where}['boxes'] must have shape ({count}, 4) to match its "
                            f"labels, got {tuple(boxes.shape)}")
    return boxes


def _masks(item: dict, where: str, count: int, threshold: float) -> Tensor:
    """``(N, H, W)`` bool masks from ``(N, H, W)`` or ``(N, 1, H, W)``."""
    masks = _get(item, "masks", where, (3, 4))
    if masks.dim() == 4:
        if masks.shape[1] != 1:
            raise ArgumentError(f"{where}['masks'] must be (N, H, W) or (N, 1, H, W), "
                                f"got {tuple(masks.shape)}")
        masks = masks[:, 0]
    if masks.shape[0] != count:
        raise ArgumentError(f"{where}['masks'] has {masks.shape[0]} masks for {count} labels")
    if masks.dtype == torch.bool:
        return masks
    return masks > threshold if masks.is_floating_point() else masks != 0


def _vector(item: dict, key: str, where: str, count: int, *, floating: bool | None,
            default=None) -> Tensor:
    if key not in item and default is not None:
        return default
    value = _get(item, key, where, (1,), floating=floating)
    if value.shape[0] != count:
        raise ArgumentError(f"{where}[{key!r}] has {value.shape[0]} entries for {count} labels")
    return value


@dataclass
class _Instances:
    """One image's detections or ground truths: everything on the host but
    the masks, which stay on their device for the IoU products."""
    labels: np.ndarray                 # (N,) int64
    scores: np.ndarray | None          # (N,) float64, detections only
    crowd: np.ndarray                  # (N,) bool
    area: np.ndarray | None            # (N,) float64 given areas (> 0 used), targets only
    xywh: np.ndarray | None            # (N, 4) float64 boxes, for "bbox"
    masks: Tensor | None               # (N, H, W) bool, for "segm"


def _instances(item, where: str, types: tuple[str, ...], is_pred: bool,
               mask_threshold: float) -> _Instances:
    if not isinstance(item, dict):
        raise ArgumentTypeError(f"{where} must be a dict, got {type(item).__name__}")
    labels = _get(item, "labels", where, (1,), floating=False)
    count = labels.shape[0]
    scores = _vector(item, "scores", where, count, floating=True) if is_pred else None
    crowd = area = None
    if not is_pred:
        crowd = _vector(item, "iscrowd", where, count, floating=None,
                        default=torch.zeros(count, dtype=torch.bool))
        area = _vector(item, "area", where, count, floating=None,
                       default=torch.zeros(count))
    xywh = _xywh(_boxes(item, where, count)) if "bbox" in types else None
    if "segm" in types and "masks" not in item:
        raise ArgumentError(f"{where} has no 'masks' entry, which iou_type 'segm' needs "
                            "(boxes only: iou_type='bbox')")
    masks = _masks(item, where, count, mask_threshold) if "segm" in types else None

    def host(t, dtype):
        if t is None:
            return None
        t = t.detach().cpu()
        # numpy has no bfloat16: floats go through float64 (exact for every float dtype)
        return (t.double() if t.is_floating_point() else t).numpy().astype(dtype)
    return _Instances(host(labels, np.int64), host(scores, np.float64),
                      np.zeros(count, bool) if crowd is None else host(crowd, bool),
                      host(area, np.float64), xywh, masks)


def _ious_and_areas(dt: _Instances, gt: _Instances, d: np.ndarray, g: np.ndarray,
                    iou_type: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU ``(len(d), len(g))`` of detections ``d`` with ground truths ``g``,
    and their areas: box w * h (as pycocotools computes them) or pixels."""
    if iou_type == "bbox":
        dt_xywh, gt_xywh = dt.xywh[d], gt.xywh[g]
        ious = _xywh_iou(dt_xywh, gt_xywh, gt.crowd[g])
        return ious, dt_xywh[:, 2] * dt_xywh[:, 3], gt_xywh[:, 2] * gt_xywh[:, 3]
    dt_masks = dt.masks[torch.as_tensor(d, device=dt.masks.device)]
    gt_masks = gt.masks[torch.as_tensor(g, device=gt.masks.device)]
    return _mask_stats(dt_masks, gt_masks, gt.crowd[g])


def _evaluate_image(dt: _Instances, gt: _Instances, iou_type: str, thresholds: np.ndarray,
                    max_det: int) -> dict[int, _ClassImage]:
    """Per-class matching of one image for one IoU type: the detections of
    each class in descending score order (stable), at most ``max_det``."""
    out = {}
    for label in np.union1d(dt.labels, gt.labels).tolist():
        d = np.nonzero(dt.labels == label)[0]
        d = d[np.argsort(-dt.scores[d], kind="mergesort")][:max_det]
        g = np.nonzero(gt.labels == label)[0]
        ious, dt_area, gt_area = _ious_and_areas(dt, gt, d, g, iou_type)
        gt_area = np.where(gt.area[g] > 0, gt.area[g], gt_area)
        out[label] = _evaluate_class(ious, dt.scores[d], dt_area, gt_area, gt.crowd[g],
                                     thresholds)
    return out


# ----------------------------------------------------------------------------
# The metric
# ----------------------------------------------------------------------------

class MeanAveragePrecision:
    """COCO mean average precision and recall of boxes and / or instance
    masks, accumulated over batches (update / compute / reset), gathered
    across ranks under torch.distributed. See the module docstring for the
    input format and the rules; the numbers are pycocotools' ``COCOeval``
    ones (tested against it and torchmetrics to 1e-6).

    Args:
        iou_type: 'bbox', 'segm' or a tuple of both.
        iou_thresholds: IoU thresholds (default COCO's .50:.05:.95, float64
            exactly as pycocotools builds them). ``map_50`` / ``map_75`` are
            -1 when 0.5 / 0.75 is not among them.
        rec_thresholds: recall points of the interpolated precision
            (default COCO's 101).
        max_detection_thresholds: three increasing ints (default 1, 10, 100):
            detections kept per image and class, highest scores first.
        mask_threshold: float masks are foreground where > this (default 0.5).
        class_metrics: also return per-class AP and AR.
        extended_summary: also return COCOeval's arrays (below).

    ``compute()`` returns a dict of float64 tensors, keys always prefixed by
    the IoU type ``t`` ('bbox' / 'segm'), scalars:

    * ``{t}_map``: AP over IoU .50:.95, all areas, ``max_detection_thresholds[-1]``
      detections; ``{t}_map_50``, ``{t}_map_75``; ``{t}_map_small``,
      ``{t}_map_medium``, ``{t}_map_large``;
    * ``{t}_mar_1``, ``{t}_mar_10``, ``{t}_mar_100`` (named after the max
      detections); ``{t}_mar_small``, ``{t}_mar_medium``, ``{t}_mar_large``;
    * with ``class_metrics``: ``{t}_map_per_class`` and ``{t}_mar_100_per_class``
      ``(K,)``, and ``classes`` ``(K,)`` int64: every label seen in
      predictions or targets, ascending;
    * with ``extended_summary``: ``{t}_precision`` ``(T, R, K, A, M)``
      (interpolated precision per IoU threshold, recall point, class, area
      range all/small/medium/large and max detections), ``{t}_recall``
      ``(T, K, A, M)``, and ``classes``.

    A class with no ground truth is left out of the means (its entries are
    -1), one with ground truths but no detections counts as 0; a number is -1
    when no class has a ground truth (COCO's conventions).

    Differences from torchmetrics' MeanAveragePrecision (pycocotools
    backend), which otherwise gives the same numbers: its default
    ``iou_type`` is 'bbox' (here both, so inputs without ``masks`` raise:
    pass ``iou_type='bbox'``); its keys have no prefix for a single IoU type;
    its default thresholds are float32 values (pass
    ``coco_iou_thresholds()`` to it to agree exactly); with
    ``iou_type='segm'`` alone it skips images without ground truth (and so
    their false positives), and with both types it takes the ground truths'
    mask area for the box area ranges unless ``area`` is given. With
    ``max_detection_thresholds`` other than (…, 100) last, its ``map`` and
    ``map_per_class`` (pycocotools' ``stats[0]``) look up the entry for 100
    detections: -1 when there is none, else that entry while the other AP
    numbers use the last one (a pycocotools bug torchmetrics keeps,
    Lightning-AI/torchmetrics#2560). Here every AP number uses the last.
    """

    def __init__(self, iou_type=("bbox", "segm"), *, iou_thresholds=None, rec_thresholds=None,
                 max_detection_thresholds=(1, 10, 100), mask_threshold: float = 0.5,
                 class_metrics: bool = False, extended_summary: bool = False):
        self.iou_types = _check_iou_type(iou_type)
        self.iou_thresholds = _check_thresholds("iou_thresholds", iou_thresholds,
                                                coco_iou_thresholds())
        self.rec_thresholds = _check_thresholds("rec_thresholds", rec_thresholds,
                                                coco_recall_thresholds())
        self.max_detection_thresholds = _check_max_dets(max_detection_thresholds)
        self.mask_threshold = check_number("mask_threshold", mask_threshold)
        for name, flag in (("class_metrics", class_metrics),
                           ("extended_summary", extended_summary)):
            if not isinstance(flag, bool):
                raise ArgumentTypeError(f"{name} must be a bool, got {flag!r}")
        self.class_metrics, self.extended_summary = class_metrics, extended_summary
        self.reset()

    def reset(self) -> None:
        """Forget every image seen."""
        self._records = {t: [] for t in self.iou_types}   # per image: {label: _ClassImage}
        self._labels = set()

    def update(self, preds: list[dict], targets: list[dict]) -> None:
        """Add a batch of images: ``preds[i]`` and ``targets[i]`` are the
        detections and ground truths of image i (format: module docstring)."""
        for name, value in (("preds", preds), ("targets", targets)):
            if not isinstance(value, (list, tuple)):
                raise ArgumentTypeError(
                    f"{name} must be a list of dicts, got {type(value).__name__}")
        if len(preds) != len(targets):
            raise ArgumentError(f"preds and targets must have the same length, got "
                                f"{len(preds)} and {len(targets)}")
        images = [self._prepare(i, p, t) for i, (p, t) in enumerate(zip(preds, targets))]
        # every image evaluated before any is recorded: an error leaves the state as it was
        records = [{t: _evaluate_image(dt, gt, t, self.iou_thresholds,
                                       self.max_detection_thresholds[-1])
                    for t in self.iou_types} for dt, gt in images]
        for (dt, gt), record in zip(images, records):
            self._labels.update(dt.labels.tolist() + gt.labels.tolist())
            for t in self.iou_types:
                self._records[t].append(record[t])

    def _prepare(self, i: int, pred, target) -> tuple[_Instances, _Instances]:
        dt = _instances(pred, f"preds[{i}]", self.iou_types, True, self.mask_threshold)
        gt = _instances(target, f"targets[{i}]", self.iou_types, False, self.mask_threshold)
        if dt.masks is not None and dt.masks.shape[0] and gt.masks.shape[0] \
                and dt.masks.shape[1:] != gt.masks.shape[1:]:
            raise ArgumentError(f"preds[{i}]['masks'] are {tuple(dt.masks.shape[1:])} but "
                                f"targets[{i}]['masks'] are {tuple(gt.masks.shape[1:])}")
        return dt, gt

    def compute(self) -> dict[str, Tensor]:
        """AP / AR over every image seen since the last reset, on every rank
        (keys: class docstring)."""
        records, labels = self._synced()
        classes = sorted(labels)
        out = {}
        for t in self.iou_types:
            precision, recall = _accumulate(records[t], classes, self.iou_thresholds,
                                            self.rec_thresholds, self.max_detection_thresholds)
            stats = _summarize(precision, recall, self.iou_thresholds,
                               self.max_detection_thresholds)
            out.update({f"{t}_{k}": torch.tensor(v, dtype=torch.float64) for k, v in stats.items()})
            if self.class_metrics:
                out.update(self._per_class(t, precision, recall, len(classes)))
            if self.extended_summary:
                out[f"{t}_precision"] = torch.from_numpy(precision)
                out[f"{t}_recall"] = torch.from_numpy(recall)
        if self.class_metrics or self.extended_summary:
            out["classes"] = torch.tensor(classes, dtype=torch.int64)
        return out

    def _per_class(self, t: str, precision: np.ndarray, recall: np.ndarray,
                   num_classes: int) -> dict[str, Tensor]:
        ap = [_mean_valid(precision[:, :, k, 0, -1]) for k in range(num_classes)]
        ar = [_mean_valid(recall[:, k, 0, -1]) for k in range(num_classes)]
        last = self.max_detection_thresholds[-1]
        return {f"{t}_map_per_class": torch.tensor(ap, dtype=torch.float64),
                f"{t}_mar_{last}_per_class": torch.tensor(ar, dtype=torch.float64)}

    def _synced(self) -> tuple[dict[str, list], set]:
        """The per-image records of every rank (rank order), and all labels."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self._records, self._labels
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (self._records, self._labels))
        records = {t: [r for rank, _ in gathered for r in rank[t]] for t in self.iou_types}
        return records, set().union(*(labels for _, labels in gathered))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(iou_type={self.iou_types}, "
                f"max_detection_thresholds={self.max_detection_thresholds}, "
                f"class_metrics={self.class_metrics})")


def mean_average_precision(preds: list[dict], targets: list[dict], iou_type=("bbox", "segm"),
                           **options) -> dict[str, Tensor]:
    """One-shot :class:`MeanAveragePrecision`: ``preds`` / ``targets`` are
    lists of per-image dicts, ``options`` the class's keyword arguments;
    returns the same dict as ``compute()``."""
    metric = MeanAveragePrecision(iou_type, **options)
    metric.update(preds, targets)
    return metric.compute()
