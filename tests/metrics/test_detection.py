"""MeanAveragePrecision (COCO box / mask AP): pycocotools' COCOeval itself
and torchmetrics as peers on randomised images, plus hand-computed cases that
pin every matching rule without any peer installed."""
import contextlib
import io
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import DEVICE

import segops
from segops.metrics.detection import (MeanAveragePrecision, coco_iou_thresholds,
                                      coco_recall_thresholds, mean_average_precision)

STATS = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large",
         "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large"]


# ----------------------------------------------------------------------------
# random images: ground-truth ellipses / rectangles of every size class and
# predictions shifted by a few pixels (so the IoUs spread over .5-.95),
# wrong labels, false positives, duplicates, images with no ground truth
# ----------------------------------------------------------------------------

def _random_case(seed, n_images=20, H=150, W=170, crowd=False, score_step=None):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")

    def u():
        return torch.rand((), generator=g).item()

    def randint(lo, hi):
        return int(torch.randint(lo, hi, (), generator=g))

    def blob(cy, cx, ry, rx, ellipse):
        if ellipse:
            return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        return ((yy - cy).abs() <= ry) & ((xx - cx).abs() <= rx)

    def boxes_of(masks, jitter):
        out = torch.zeros(len(masks), 4)
        for k, m in enumerate(masks):
            ys, xs = torch.nonzero(m, as_tuple=True)
            out[k] = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
            if jitter:
                out[k] += (torch.rand(4, generator=g) - 0.5) * 2
        return out

    def stack(masks):
        return torch.stack(masks) if masks else torch.zeros(0, H, W, dtype=torch.bool)

    preds, targets = [], []
    for i in range(n_images):
        gt_masks, gt_labels = [], []
        for _ in range(randint(0, 6) if i % 7 else 0):     # images 0, 7, 14: no GT
            radius = [2 + 60 * u() * u(), 2 + 60 * u() * u()]
            m = blob(u() * H, u() * W, *radius, u() < 0.5)
            if m.any():
                gt_masks.append(m)
                gt_labels.append(randint(1, 4))
        dt_masks, dt_labels = [], []
        for m, label in zip(gt_masks, gt_labels):
            for _ in range(randint(0, 3)):                     # 0, 1 or 2 detections
                dt_masks.append(torch.roll(m, (randint(-3, 4), randint(-3, 4)), (0, 1)))
                dt_labels.append(label if u() < 0.85 else randint(1, 5))   # 4: never in GT
        for _ in range(randint(0, 3)):                         # false positives
            m = blob(u() * H, u() * W, 3 + 20 * u(), 3 + 20 * u(), True)
            if m.any():
                dt_masks.append(m)
                dt_labels.append(randint(1, 5))
        scores = torch.rand(len(dt_masks), generator=g)
        if score_step:
            scores = (scores / score_step).round() * score_step  # ties
        preds.append(dict(boxes=boxes_of(dt_masks, True), scores=scores,
                          labels=torch.tensor(dt_labels, dtype=torch.int64),
                          masks=stack(dt_masks)))
        target = dict(boxes=boxes_of(gt_masks, False),
                      labels=torch.tensor(gt_labels, dtype=torch.int64), masks=stack(gt_masks))
        if crowd:
            target["iscrowd"] = (torch.rand(len(gt_labels), generator=g) < 0.2).long()
        targets.append(target)
    return preds, targets


def _to(items, device):
    return [{k: v.to(device) for k, v in item.items()} for item in items]


def _cocoeval(preds, targets, iou_type, max_dets=(1, 10, 100)):
    """pycocotools' COCOeval on the same data: every image registered, the
    categories every label seen (torchmetrics' choice), areas like ours."""
    mask_utils = pytest.importorskip("pycocotools.mask")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def xywh(box):
        box = box.clone()
        box[2:] -= box[:2]              # in float32, as a results file written from them
        return box.double().tolist()

    def rle(mask):
        return mask_utils.encode(np.asfortranarray(mask.cpu().numpy().astype(np.uint8)))

    labels = sorted(set(torch.cat([x["labels"] for x in preds + targets]).tolist()))
    H, W = targets[0]["masks"].shape[1:] if "masks" in targets[0] else (256, 256)
    annotations, results = [], []
    for i, (p, t) in enumerate(zip(preds, targets)):
        crowd = t.get("iscrowd", torch.zeros(len(t["labels"])))
        for k in range(len(t["labels"])):
            box = xywh(t["boxes"][k])
            segm = rle(t["masks"][k]) if iou_type == "segm" else None
            area = box[2] * box[3] if iou_type == "bbox" else float(mask_utils.area(segm))
            annotations.append(dict(id=len(annotations) + 1, image_id=i, bbox=box, area=area,
                                    category_id=int(t["labels"][k]), iscrowd=int(crowd[k]),
                                    segmentation=segm))
        for k in range(len(p["labels"])):
            result = dict(image_id=i, category_id=int(p["labels"][k]), score=float(p["scores"][k]))
            if iou_type == "bbox":
                result["bbox"] = xywh(p["boxes"][k])
            else:
                result["segmentation"] = rle(p["masks"][k])
            results.append(result)
    gt = COCO()
    gt.dataset = dict(images=[dict(id=i, height=H, width=W) for i in range(len(targets))],
                      annotations=annotations, categories=[dict(id=c) for c in labels])
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        evaluation = COCOeval(gt, gt.loadRes(results), iou_type)
        evaluation.params.maxDets = list(max_dets)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation


def _assert_matches_cocoeval(ours, evaluation, iou_type, skip=()):
    max_dets = evaluation.params.maxDets
    names = [{"mar_1": f"mar_{max_dets[0]}", "mar_10": f"mar_{max_dets[1]}",
              "mar_100": f"mar_{max_dets[2]}"}.get(n, n) for n in STATS]
    for k, name in enumerate(names):
        if name not in skip:
            got = ours[f"{iou_type}_{name}"].item()
            assert abs(got - evaluation.stats[k]) <= 1e-6, (name, got, evaluation.stats[k])
    np.testing.assert_allclose(ours[f"{iou_type}_precision"].numpy(),
                               evaluation.eval["precision"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours[f"{iou_type}_recall"].numpy(),
                               evaluation.eval["recall"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
@pytest.mark.parametrize("seed,crowd,score_step", [(0, False, None), (1, True, None),
                                                   (2, False, 0.1)])
def test_matches_pycocotools(iou_type, seed, crowd, score_step):
    """All twelve numbers and the full precision / recall arrays (every IoU
    threshold, recall point, class, area range and max detections), with
    crowds and with tied scores (stable ordering within and across images)."""
    preds, targets = _random_case(seed, crowd=crowd, score_step=score_step)
    evaluation = _cocoeval(preds, targets, iou_type)
    assert (evaluation.eval["precision"] > 0).any() and (evaluation.stats[:3] > 0.05).all()
    ours = mean_average_precision(_to(preds, DEVICE), _to(targets, DEVICE), iou_type,
                                  extended_summary=True)
    _assert_matches_cocoeval(ours, evaluation, iou_type)


def test_both_types_in_one_metric_match_pycocotools():
    preds, targets = _random_case(3, n_images=12)
    ours = mean_average_precision(preds, targets, ("bbox", "segm"), extended_summary=True)
    for iou_type in ("bbox", "segm"):
        _assert_matches_cocoeval(ours, _cocoeval(preds, targets, iou_type), iou_type)


def test_max_detections_per_image_and_class_match_pycocotools():
    """More than 100 detections of one class in an image (cut to the 100 best),
    scores with many ties (kept in input order: a stable sort within and
    across images) and small custom max detections."""
    g = torch.Generator().manual_seed(5)
    preds, targets = [], []
    for _ in range(3):
        gt = torch.rand(60, 2, generator=g) * 200
        gt = torch.cat([gt, gt + 5 + 30 * torch.rand(60, 2, generator=g)], 1)
        dt = gt.repeat(3, 1)[:150] + torch.randn(150, 4, generator=g) * 2
        scores = (torch.rand(150, generator=g) * 10).round() / 10
        preds.append(dict(boxes=dt, scores=scores,
                          labels=torch.ones(150, dtype=torch.int64)))
        targets.append(dict(boxes=gt, labels=torch.ones(60, dtype=torch.int64)))
    ours = mean_average_precision(preds, targets, "bbox", extended_summary=True)
    _assert_matches_cocoeval(ours, _cocoeval(preds, targets, "bbox"), "bbox")
    ours = mean_average_precision(preds, targets, "bbox", extended_summary=True,
                                  max_detection_thresholds=(1, 3, 20))
    evaluation = _cocoeval(preds, targets, "bbox", max_dets=(1, 3, 20))
    # COCOeval's summarize looks up maxDets=100 for stats[0]: -1 here (a
    # pycocotools bug); ours is the AP at the last max-detections, as for the
    # other AP numbers
    _assert_matches_cocoeval(ours, evaluation, "bbox", skip={"map"})
    assert ours["bbox_mar_3"].item() == evaluation.stats[7]
    assert evaluation.stats[0] == -1
    precision = evaluation.eval["precision"][:, :, :, 0, -1]
    assert ours["bbox_map"].item() == pytest.approx(precision[precision > -1].mean(), abs=1e-12)


@pytest.mark.parametrize("iou_type", ["bbox", "segm", ("bbox", "segm")])
def test_matches_torchmetrics(iou_type):
    """torchmetrics (pycocotools backend), thresholds set to COCO's float64
    ones (its defaults are float32 values), per-class numbers included.
    torchmetrics' segm-only path drops images without ground-truth masks
    (so their false positives), and with both types it takes the ground
    truths' mask area for the box ranges: we give every image a ground truth
    there and pass the areas explicitly."""
    tm = pytest.importorskip("torchmetrics.detection")
    pytest.importorskip("pycocotools")
    preds, targets = _random_case(4, crowd=True)
    if iou_type == "segm":
        keep = [i for i, t in enumerate(targets) if len(t["labels"])]
        preds, targets = [preds[i] for i in keep], [targets[i] for i in keep]
    if isinstance(iou_type, tuple):
        targets = [dict(t, area=t["masks"].flatten(1).sum(1).float()) for t in targets]
    peer = tm.MeanAveragePrecision(iou_type=iou_type, class_metrics=True,
                                   iou_thresholds=coco_iou_thresholds().tolist(),
                                   rec_thresholds=coco_recall_thresholds().tolist())
    peer.update(preds, targets)
    want = peer.compute()
    got = mean_average_precision(preds, targets, iou_type, class_metrics=True)
    types = (iou_type,) if isinstance(iou_type, str) else iou_type
    names = STATS + ["map_per_class", "mar_100_per_class"]
    for t in types:
        for name in names:
            peer_name = name if len(types) == 1 else f"{t}_{name}"
            torch.testing.assert_close(got[f"{t}_{name}"], want[peer_name].double(),
                                       rtol=0, atol=1e-6, msg=f"{t}_{name}")
    assert torch.equal(got["classes"], want["classes"].long())


# ----------------------------------------------------------------------------
# hand-computed cases (no peer): each pins one rule
# ----------------------------------------------------------------------------

def _pred(boxes, scores, labels=None):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    labels = [1] * len(boxes) if labels is None else labels
    return dict(boxes=boxes.to(DEVICE), scores=torch.tensor(scores, dtype=torch.float32),
                labels=torch.tensor(labels, dtype=torch.int64))


def _target(boxes, labels=None, **extra):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    labels = [1] * len(boxes) if labels is None else labels
    return dict(boxes=boxes.to(DEVICE), labels=torch.tensor(labels, dtype=torch.int64), **extra)


def _bbox(preds, targets, **options):
    """bbox results without the prefix, as floats rounded to 1e-12 (COCO's
    precision tp / (tp + fp + eps) is 1 - 2e-16 when perfect)."""
    out = mean_average_precision(preds, targets, "bbox", **options)
    return {k.removeprefix("bbox_"): np.round(v.numpy(), 12).tolist() for k, v in out.items()}


def _box_mask(box, size=40):
    m = torch.zeros(size, size, dtype=torch.bool)
    m[box[1]:box[3], box[0]:box[2]] = True
    return m


BOX, FAR = [0, 0, 10, 10], [20, 20, 30, 30]


def test_perfect_predictions_score_one_for_boxes_and_masks():
    boxes = [[2, 3, 12, 14], [20, 5, 31, 30], [1, 25, 9, 33]]
    masks = torch.stack([_box_mask(b) for b in boxes]).to(DEVICE)
    pred = dict(_pred(boxes, [0.9, 0.3, 0.6], [1, 2, 3]), masks=masks[:, None].float() * 0.9)
    target = dict(_target(boxes, [1, 2, 3]), masks=masks.to(torch.uint8))
    out = mean_average_precision([pred], [target])
    for t in ("bbox", "segm"):
        for name in ["map", "map_50", "map_75", "map_small", "mar_1", "mar_10", "mar_100",
                     "mar_small"]:
            assert out[f"{t}_{name}"].item() == pytest.approx(1.0, abs=1e-12), (t, name)
        for name in ["map_medium", "map_large", "mar_medium", "mar_large"]:
            assert out[f"{t}_{name}"].item() == -1.0, (t, name)   # no object that big
    assert out["bbox_map"].dtype == torch.float64 and out["bbox_map"].dim() == 0


def test_higher_scored_false_positive_halves_precision():
    # FP first: precision 0 then 1/2 at recall 1 -> every recall point 1/2
    assert _bbox([_pred([FAR, BOX], [0.9, 0.8])], [_target([BOX])])["map"] == 0.5
    # the FP ranked last costs nothing
    assert _bbox([_pred([FAR, BOX], [0.7, 0.8])], [_target([BOX])])["map"] == 1.0


def test_missing_detection():
    out = _bbox([_pred([BOX], [0.9])], [_target([BOX, FAR])])
    assert out["map"] == pytest.approx(51 / 101, abs=1e-12)  # recall points 0, .01 .. .50
    assert out["mar_100"] == 0.5


def test_iou_exactly_at_a_threshold_matches():
    # IoU = 50/100 = 0.5: a match at .50 only
    out = _bbox([_pred([[0, 0, 10, 5]], [0.9])], [_target([BOX])])
    assert (out["map"], out["map_50"], out["map_75"]) == (0.1, 1.0, 0.0)
    # IoU = 75/100 = 0.75: a match at .50 .. .75, six of ten thresholds
    out = _bbox([_pred([[0, 0, 10, 7.5]], [0.9])], [_target([BOX])])
    assert out["map"] == pytest.approx(0.6, abs=1e-12)
    assert (out["map_50"], out["map_75"]) == (1.0, 1.0)
    assert out["mar_100"] == pytest.approx(0.6, abs=1e-12)


def test_image_without_ground_truth_counts_its_false_positives():
    preds = [_pred([BOX], [0.8]), _pred([FAR], [0.9]), _pred([], [])]
    targets = [_target([BOX]), _target([]), _target([])]
    assert _bbox(preds, targets)["map"] == 0.5


def test_classes_without_ground_truth_are_left_out():
    preds = [_pred([BOX, FAR], [0.9, 0.8], [1, 2])]         # class 2: no ground truth
    out = _bbox(preds, [_target([BOX], [1])], class_metrics=True)
    assert out["map"] == 1.0 and out["map_per_class"] == [1.0, -1.0]
    assert out["classes"] == [1, 2]
    # a class with ground truth but no detection counts as 0
    out = _bbox([_pred([BOX], [0.9], [1])], [_target([BOX, FAR], [1, 3])], class_metrics=True)
    assert out["map"] == 0.5 and out["map_per_class"] == [1.0, 0.0]
    # nothing to find at all: -1 everywhere
    out = _bbox([_pred([BOX], [0.9])], [_target([])])
    assert set(out.values()) == {-1.0}


def test_detection_takes_the_best_free_ground_truth():
    # det 1 is B (IoU .82 with A): it must take B, not the first GT above .5,
    # leaving A to det 2, which overlaps A at .54 and B at .43
    a, b = [0, 0, 10, 10], [1, 0, 11, 10]
    det2 = [-3, 0, 7, 10]
    out = _bbox([_pred([b, det2], [0.9, 0.8])], [_target([a, b])])
    assert out["map_50"] == 1.0


def test_equal_iou_ties_go_to_the_last_ground_truth():
    a, b = [0, 0, 10, 10], [2, 0, 12, 10]
    det1 = [1, 0, 11, 10]       # IoU 90/110 with both
    det2 = [-2, 0, 8, 10]       # IoU 80/120 with A, 60/140 with B
    out = _bbox([_pred([det1, det2], [0.9, 0.8])], [_target([a, b])])
    assert out["map_50"] == 1.0
    # the other way round (A listed last) det 1 takes A and det 2 is left out
    out = _bbox([_pred([det1, det2], [0.9, 0.8])], [_target([b, a])])
    assert out["map_50"] < 1.0


def test_a_ground_truth_is_matched_once():
    # duplicate on A ranks before the detection of B: precision 1, 1/2, 2/3
    preds = [_pred([BOX, BOX, FAR], [0.9, 0.8, 0.7])]
    out = _bbox(preds, [_target([BOX, FAR])])
    assert out["map"] == pytest.approx((51 + 50 * 2 / 3) / 101, abs=1e-12)


def test_crowd_regions_are_ignored_and_absorb_detections():
    crowd = [0, 0, 40, 40]
    inside = [[25, 25, 30, 30], [30, 30, 35, 35]]    # IoU with the crowd box 25/1600,
    preds = [_pred([*inside, BOX], [0.95, 0.9, 0.8])]  # but all of each detection
    targets = [_target([crowd, BOX], iscrowd=torch.tensor([1, 0]))]
    out = _bbox(preds, targets)
    assert out["map"] == 1.0 and out["mar_100"] == 1.0
    targets = [_target([crowd, BOX], iscrowd=torch.tensor([0, 0]))]
    assert _bbox(preds, targets)["map"] < 0.5


def test_regular_ground_truth_wins_over_an_ignored_one():
    # the detection overlaps a crowd box perfectly and a regular one at .8:
    # it must match the regular one (a true positive), not the crowd
    regular, det = [0, 0, 10, 10], [0, 0, 10, 8]
    preds = [_pred([det], [0.9])]
    targets = [_target([det, regular], iscrowd=torch.tensor([1, 0]))]
    assert _bbox(preds, targets)["map_50"] == 1.0


def test_area_ranges():
    small, medium = [0, 0, 10, 10], [0, 50, 40, 90]        # 100 and 1600 px
    preds = [_pred([small, [60, 60, 100, 100]], [0.8, 0.9])]  # unmatched medium FP first
    out = _bbox(preds, [_target([small, medium])])
    assert out["map_small"] == 1.0          # the medium FP is outside: ignored
    assert out["map_medium"] == 0.0 and out["map_large"] == -1.0
    assert out["mar_small"] == 1.0 and out["mar_medium"] == 0.0
    # both ends of a range are inclusive: 32 x 32 is small and medium
    out = _bbox([_pred([[0, 0, 32, 32]], [0.8])], [_target([[0, 0, 32, 32]])])
    assert out["map_small"] == out["map_medium"] == 1.0 and out["map_large"] == -1.0
    # a given area overrides the box area (COCO gives the mask area)
    out = _bbox([_pred([small], [0.8])], [_target([small], area=torch.tensor([2000.0]))])
    assert out["map_small"] == -1.0 and out["map_medium"] == 1.0


def test_max_detections():
    preds = [_pred([FAR, BOX], [0.9, 0.8])]
    out = _bbox(preds, [_target([BOX])])
    assert (out["mar_1"], out["mar_10"], out["mar_100"]) == (0.0, 1.0, 1.0)
    out = _bbox(preds, [_target([BOX])], max_detection_thresholds=(1, 2, 3))
    assert out["mar_2"] == 1.0 and "mar_10" not in out


def test_mask_probabilities_are_thresholded_above_half():
    gt = _box_mask([0, 0, 10, 10])
    prob = torch.where(_box_mask([0, 0, 10, 20]), 0.5, 0.0)
    prob[gt] = 0.51                                   # 0.5 exactly is background
    pred = dict(_pred([[0, 0, 10, 20]], [0.9]), masks=prob[None, None].to(DEVICE))
    target = dict(_target([BOX]), masks=gt[None].to(DEVICE, torch.uint8))
    out = mean_average_precision([pred], [target], "segm")
    assert out["segm_map"].item() == pytest.approx(1.0, abs=1e-12)
    out = mean_average_precision([pred], [target], "segm", mask_threshold=0.4)
    assert out["segm_map"].item() == pytest.approx(0.1, abs=1e-12)    # IoU .5


def test_segm_needs_no_boxes_and_bbox_no_masks():
    m = _box_mask([0, 0, 10, 10])[None]
    pred = dict(scores=torch.tensor([0.5]), labels=torch.tensor([1]), masks=m)
    out = mean_average_precision([pred], [dict(labels=torch.tensor([1]), masks=m)], "segm")
    assert out["segm_map"].item() == pytest.approx(1.0, abs=1e-12)
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    pred = dict(boxes=box, scores=torch.tensor([0.5]), labels=torch.tensor([1]))
    out = mean_average_precision([pred], [dict(labels=torch.tensor([1]), boxes=box)], "bbox")
    assert out["bbox_map"].item() == pytest.approx(1.0, abs=1e-12)


def test_accumulates_over_batches_and_resets():
    preds, targets = _random_case(6, n_images=8)
    metric = MeanAveragePrecision(class_metrics=True)
    for lo in range(0, 8, 3):
        metric.update(preds[lo:lo + 3], targets[lo:lo + 3])
    first = metric.compute()
    whole = mean_average_precision(preds, targets, class_metrics=True)
    assert first.keys() == whole.keys()
    for k in whole:
        assert torch.equal(first[k], whole[k]), k
    assert torch.equal(metric.compute()["segm_map"], first["segm_map"])    # compute twice
    metric.reset()
    assert metric.compute()["bbox_map"].item() == -1.0


def test_an_update_that_fails_leaves_the_state_as_it_was():
    """An error while matching (here masks on the meta device, which hold no
    data) records none of the batch's images, for neither IoU type."""
    masks = torch.stack([_box_mask(BOX), _box_mask(FAR)])
    preds, targets = ([dict(_pred([b], [0.9]), masks=m[None]) for b, m in zip((BOX, FAR), masks)],
                      [dict(_target([b]), masks=m[None]) for b, m in zip((BOX, FAR), masks)])
    metric = MeanAveragePrecision()
    metric.update(preds[:1], targets[:1])
    before = metric.compute()
    bad_pred = dict(_pred([[40, 40, 50, 50]], [0.95]), masks=masks[:1].to("meta"))
    with pytest.raises(NotImplementedError):
        metric.update([preds[1], bad_pred], [targets[1], targets[0]])
    after = metric.compute()
    for key in before:
        assert torch.equal(after[key], before[key]), key


def test_masks_on_two_devices_and_bfloat16_scores_and_areas():
    """Detection masks on the device and ground-truth masks on the CPU (as a
    model's outputs and a data loader's targets are), and bfloat16 scores
    and areas (numpy has no bfloat16): the numbers of float32 on one device."""
    boxes = [[2, 3, 12, 14], [20, 5, 31, 30], [1, 25, 9, 33]]
    masks = torch.stack([_box_mask(b) for b in boxes])
    pred = dict(_pred(boxes, [0.875, 0.25, 0.5], [1, 2, 1]), masks=masks.flip(1).to(DEVICE))
    target = dict(_target(boxes, [1, 2, 2]), masks=masks, area=torch.tensor([90.0, 300.0, 64.0]))
    want = mean_average_precision([pred], [target], class_metrics=True)
    half = dict(pred, scores=pred["scores"].bfloat16())
    half_target = dict(target, area=target["area"].bfloat16())
    got = mean_average_precision([half], [half_target], class_metrics=True)
    for key in want:
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("call,error,match", [
    (lambda: MeanAveragePrecision("keypoints"), ValueError, "iou_type"),
    (lambda: MeanAveragePrecision(("bbox", "bbox")), ValueError, "iou_type"),
    (lambda: MeanAveragePrecision(iou_thresholds=[0.7, 0.5]), ValueError, "iou_thresholds"),
    (lambda: MeanAveragePrecision(rec_thresholds=["a"]), TypeError, "rec_thresholds"),
    (lambda: MeanAveragePrecision(max_detection_thresholds=(1, 10)), TypeError,
     "max_detection_thresholds"),
    (lambda: MeanAveragePrecision(max_detection_thresholds=(10, 1, 100)), ValueError,
     "max_detection_thresholds"),
    (lambda: MeanAveragePrecision(mask_threshold="half"), TypeError, "mask_threshold"),
    (lambda: MeanAveragePrecision(class_metrics=1), TypeError, "class_metrics"),
])
def test_bad_options_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def _update(preds, targets, iou_type="bbox"):
    MeanAveragePrecision(iou_type).update(preds, targets)


@pytest.mark.parametrize("preds,targets,iou_type,error,match", [
    ({}, [], "bbox", TypeError, "preds"),
    ([_pred([BOX], [0.9])], [], "bbox", ValueError, "same length"),
    ([dict(boxes=torch.zeros(1, 4), labels=torch.ones(1, dtype=torch.int64))],
     [_target([BOX])], "bbox", ValueError, r"preds\[0\] has no 'scores'"),
    ([_pred([BOX], [0.9])], [dict(_target([BOX]), labels=torch.tensor([1.0]))], "bbox", TypeError,
     r"targets\[0\]\['labels'\].*integer"),
    ([dict(_pred([BOX], [0.9]), boxes=torch.zeros(1, 5))], [_target([BOX])], "bbox",
     ValueError, r"preds\[0\]\['boxes'\].*\(1, 4\)"),
    ([dict(_pred([BOX], [0.9]), scores=torch.ones(2))], [_target([BOX])], "bbox",
     ValueError, r"preds\[0\]\['scores'\] has 2"),
    ([_pred([BOX], [0.9])], [_target([BOX])], "segm", ValueError, r"preds\[0\] has no 'masks'"),
    ([_pred([BOX], [0.9])], [_target([BOX])], ("bbox", "segm"), ValueError,
     r"preds\[0\] has no 'masks'.*iou_type='bbox'"),
    ([dict(_pred([BOX], [0.9]), masks=torch.ones(1, 2, 8, 8))],
     [dict(_target([BOX]), masks=torch.ones(1, 8, 8))], "segm", ValueError, r"\(N, 1, H, W\)"),
    ([dict(_pred([BOX], [0.9]), masks=torch.ones(1, 8, 9, dtype=torch.bool))],
     [dict(_target([BOX]), masks=torch.ones(1, 8, 8))], "segm", ValueError,
     r"preds\[0\]\['masks'\] are \(8, 9\)"),
    ([_pred([BOX], [0.9])], ["target"], "bbox", TypeError, r"targets\[0\] must be a dict"),
])
def test_bad_inputs_name_the_argument(preds, targets, iou_type, error, match):
    with pytest.raises(error, match=match):
        _update(preds, targets, iou_type)


def test_errors_are_segops_errors():
    with pytest.raises(segops.ArgumentError):
        MeanAveragePrecision("keypoints")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, preds, targets, results):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        metric = MeanAveragePrecision(class_metrics=True)
        half = len(preds) // 2
        part = slice(rank * half, (rank + 1) * half)
        metric.update(preds[part], targets[part])
        results[rank] = {k: v.tolist() for k, v in metric.compute().items()}
    finally:
        dist.destroy_process_group()


def test_gathers_images_across_ranks():
    preds, targets = _random_case(7, n_images=6, H=40, W=40)
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, _free_port(), preds, targets, results), nprocs=2, join=True)
    want = {k: v.tolist() for k, v in mean_average_precision(preds, targets,
                                                             class_metrics=True).items()}
    assert results[0] == want and results[1] == want
