"""The RoI heads of Mask R-CNN with torchvision's numbers: proposal matching
and sampling, the box and mask losses (mask targets from segops'
``mask_targets``, no float copy of the GT masks), and the detection
post-processing (class-wise NMS for every image in one segops
``batched_nms_per_image`` call)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...nn._share import refuse_script
from ...ops import batched_nms_per_image, box_iou, mask_targets
from ._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher


def fastrcnn_loss(class_logits: Tensor, box_regression: Tensor, labels: list[Tensor],
                  regression_targets: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Cross-entropy over the sampled proposals, and smooth-L1 (beta 1/9,
    summed) of each positive's GT-class deltas over the number sampled."""
    labels = torch.cat(labels, dim=0)
    regression_targets = torch.cat(regression_targets, dim=0)
    classification_loss = F.cross_entropy(class_logits, labels)
    positive = torch.where(labels > 0)[0]
    n = class_logits.shape[0]
    box_regression = box_regression.reshape(n, box_regression.size(-1) // 4, 4)
    box_loss = F.smooth_l1_loss(box_regression[positive, labels[positive]],
                                regression_targets[positive], beta=1 / 9, reduction="sum")
    return classification_loss, box_loss / labels.numel()


def maskrcnn_loss(mask_logits: Tensor, proposals: list[Tensor], gt_masks: list[Tensor],
                  gt_labels: list[Tensor], matched_idxs: list[Tensor]) -> Tensor:
    """BCE-with-logits of each positive RoI's GT-class logit map against its
    GT mask RoI-aligned to the map size (``mask_targets``); zero (with a
    gradient path) when there are no positives. The loss is computed in the
    promoted dtype of the logits and the (float32) targets: fp16/bf16
    logits give a float32 loss, where torchvision computes part of it in
    the logits' dtype (bf16: ~5e-4 apart); under autocast both are float32."""
    size = mask_logits.shape[-1]
    labels = torch.cat([gt[idx] for gt, idx in zip(gt_labels, matched_idxs)], dim=0)
    if labels.numel() == 0:
        return mask_logits.sum() * 0
    gt_masks = [m if m.dtype in (torch.uint8, torch.bool) or m.is_floating_point()
                else m.float() for m in gt_masks]  # e.g. int64 masks with _skip_resize
    targets = mask_targets(gt_masks, list(proposals), list(matched_idxs), size)
    logits = mask_logits[torch.arange(labels.shape[0], device=labels.device), labels]
    dtype = torch.promote_types(logits.dtype, targets.dtype)  # float32 targets stay float32
    return F.binary_cross_entropy_with_logits(logits.to(dtype), targets.to(dtype))


def maskrcnn_inference(x: Tensor, labels: list[Tensor]) -> list[Tensor]:
    """Each detection's predicted-class mask probabilities ``(K_i, 1, M, M)``."""
    counts = [len(label) for label in labels]
    labels = torch.cat(labels)
    probs = x.sigmoid()[torch.arange(x.shape[0], device=labels.device), labels][:, None]
    return list(probs.split(counts, dim=0))


class RoIHeads(nn.Module):
    """torchvision's ``RoIHeads`` for boxes and masks (same attributes,
    keywords and ``state_dict`` keys).

    forward(features: OrderedDict of FPN maps, proposals: list of ``(L_i,
    4)``, image_shapes: list of (h, w), targets) -> (list of {boxes ``(K,
    4)``, labels ``(K,)``, scores ``(K,)``, masks ``(K, 1, 28, 28)``}
    in eval, loss dict in training).
    """

    __prepare_scriptable__ = refuse_script   # a clear error from torch.jit.script

    def __init__(self, box_roi_pool: nn.Module, box_head: nn.Module, box_predictor: nn.Module,
                 fg_iou_thresh: float, bg_iou_thresh: float, batch_size_per_image: int,
                 positive_fraction: float, bbox_reg_weights, score_thresh: float,
                 nms_thresh: float, detections_per_img: int, mask_roi_pool: nn.Module | None = None,
                 mask_head: nn.Module | None = None, mask_predictor: nn.Module | None = None):
        super().__init__()
        self.box_similarity = box_iou
        self.proposal_matcher = Matcher(fg_iou_thresh, bg_iou_thresh,
                                        allow_low_quality_matches=False)
        self.fg_bg_sampler = BalancedPositiveNegativeSampler(batch_size_per_image,
                                                             positive_fraction)
        self.box_coder = BoxCoder((10.0, 10.0, 5.0, 5.0) if bbox_reg_weights is None
                                  else bbox_reg_weights)
        self.box_roi_pool = box_roi_pool
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.mask_roi_pool = mask_roi_pool
        self.mask_head = mask_head
        self.mask_predictor = mask_predictor

    def has_mask(self) -> bool:
        return None not in (self.mask_roi_pool, self.mask_head, self.mask_predictor)

    # ---------------------------------------------------------------- training
    @staticmethod
    def check_target_types(targets: list[dict[str, Tensor]]) -> None:
        """Float boxes and int64 labels: checked by forward whenever targets
        are given, in eval too, as torchvision does."""
        for t in targets:
            if not t["boxes"].is_floating_point():
                raise TypeError(f"target boxes must be of float type, instead got "
                                f"{t['boxes'].dtype}")
            if t["labels"].dtype != torch.int64:
                raise TypeError(f"target labels must be of int64 type, instead got "
                                f"{t['labels'].dtype}")

    def check_targets(self, targets: list[dict[str, Tensor]] | None) -> None:
        if targets is None:
            raise ValueError("targets should not be None in training mode")
        for t in targets:
            if self.has_mask() and "masks" not in t:
                raise ValueError("target masks are required in training mode for Mask R-CNN")

    def assign_targets_to_proposals(self, proposals: list[Tensor], gt_boxes: list[Tensor],
                                    gt_labels: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per image: each proposal's GT index (clamped to >= 0) and label
        (its GT's class, 0 for background, -1 ignored)."""
        matched_idxs, labels = [], []
        for proposals_i, gt_boxes_i, gt_labels_i in zip(proposals, gt_boxes, gt_labels):
            if gt_boxes_i.numel() == 0:
                zeros = torch.zeros(proposals_i.shape[0], dtype=torch.int64,
                                    device=proposals_i.device)
                matched_idxs.append(zeros)
                labels.append(zeros.clone())
                continue
            matched = self.proposal_matcher(self.box_similarity(gt_boxes_i, proposals_i))
            clamped = matched.clamp(min=0)
            label = gt_labels_i[clamped].to(dtype=torch.int64)
            label[matched == Matcher.BELOW_LOW_THRESHOLD] = 0
            label[matched == Matcher.BETWEEN_THRESHOLDS] = -1
            matched_idxs.append(clamped)
            labels.append(label)
        return matched_idxs, labels

    def subsample(self, labels: list[Tensor]) -> list[Tensor]:
        positives, negatives = self.fg_bg_sampler(labels)
        return [torch.where(p | n)[0] for p, n in zip(positives, negatives)]

    def select_training_samples(self, proposals: list[Tensor], targets: list[dict[str, Tensor]]):
        """Add the GT boxes to the proposals, match, sample; returns the
        sampled proposals, their GT indices, labels and regression targets."""
        self.check_targets(targets)
        dtype, device = proposals[0].dtype, proposals[0].device
        gt_boxes = [t["boxes"].to(dtype) for t in targets]
        gt_labels = [t["labels"] for t in targets]
        proposals = [torch.cat((p, gt)) for p, gt in zip(proposals, gt_boxes)]
        matched_idxs, labels = self.assign_targets_to_proposals(proposals, gt_boxes, gt_labels)
        matched_gt_boxes = []
        for i, sampled in enumerate(self.subsample(labels)):
            proposals[i] = proposals[i][sampled]
            labels[i] = labels[i][sampled]
            matched_idxs[i] = matched_idxs[i][sampled]
            gt = gt_boxes[i] if gt_boxes[i].numel() else torch.zeros((1, 4), dtype=dtype,
                                                                        device=device)
            matched_gt_boxes.append(gt[matched_idxs[i]])
        regression_targets = self.box_coder.encode(matched_gt_boxes, proposals)
        return proposals, matched_idxs, labels, regression_targets

    # --------------------------------------------------------------- inference
    def postprocess_detections(self, class_logits: Tensor, box_regression: Tensor,
                               proposals: list[Tensor], image_shapes: list[tuple[int, int]]
                               ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Softmax, decode per class, clip, drop the background column,
        scores > score_thresh, boxes >= 1e-2, class-wise NMS, the first
        detections_per_img per image."""
        device = class_logits.device
        num_classes = class_logits.shape[-1]
        pred_boxes = self.box_coder.decode(box_regression.to(proposals[0].dtype), proposals)
        pred_scores = F.softmax(class_logits, -1)
        counts = [len(p) for p in proposals]
        image_ids = torch.cat([torch.full((n,), i, dtype=torch.int64, device=device)
                               for i, n in enumerate(counts)])
        limits = torch.tensor([[w, h, w, h] for h, w in image_shapes], dtype=pred_boxes.dtype,
                              device=device)[image_ids]
        boxes = torch.minimum(pred_boxes.clamp(min=0), limits[:, None, :])[:, 1:]
        scores = pred_scores[:, 1:]
        labels = torch.arange(1, num_classes, device=device).expand_as(scores)
        sizes = boxes[..., 2:] - boxes[..., :2]
        keep = (scores > self.score_thresh) & (sizes >= 1e-2).all(dim=-1)
        rows, cols = torch.nonzero(keep, as_tuple=True)
        boxes, scores, labels = boxes[rows, cols], scores[rows, cols], labels[rows, cols]
        kept = batched_nms_per_image(boxes, scores, labels, image_ids[rows], self.nms_thresh,
                                     self.detections_per_img, num_images=len(counts))
        return [boxes[k] for k in kept], [scores[k] for k in kept], [labels[k] for k in kept]

    # ----------------------------------------------------------------- forward
    def forward(self, features: dict[str, Tensor], proposals: list[Tensor],
                image_shapes: list[tuple[int, int]],
                targets: list[dict[str, Tensor]] | None = None):
        if targets is not None:
            self.check_target_types(targets)
        if self.training:
            proposals, matched_idxs, labels, regression_targets = \
                self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        result: list[dict[str, Tensor]] = []
        losses: dict[str, Tensor] = {}
        if self.training:
            loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels,
                                                          regression_targets)
            losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
        else:
            boxes, scores, labels = self.postprocess_detections(class_logits, box_regression,
                                                                proposals, image_shapes)
            result = [{"boxes": b, "labels": label, "scores": s}
                      for b, s, label in zip(boxes, scores, labels)]
        if self.has_mask():
            losses.update(self._mask_branch(features, proposals, image_shapes, targets,
                                            result, labels, matched_idxs if self.training
                                            else None))
        return result, losses

    def _mask_branch(self, features, proposals, image_shapes, targets, result, labels,
                     matched_idxs) -> dict[str, Tensor]:
        if self.training:
            positive = [torch.where(label > 0)[0] for label in labels]
            mask_proposals = [p[pos] for p, pos in zip(proposals, positive)]
            pos_matched_idxs = [m[pos] for m, pos in zip(matched_idxs, positive)]
        else:
            mask_proposals = [r["boxes"] for r in result]
        mask_logits = self.mask_predictor(
            self.mask_head(self.mask_roi_pool(features, mask_proposals, image_shapes)))
        if self.training:
            loss = maskrcnn_loss(mask_logits, mask_proposals, [t["masks"] for t in targets],
                                 [t["labels"] for t in targets], pos_matched_idxs)
            return {"loss_mask": loss}
        for probs, r in zip(maskrcnn_inference(mask_logits, [r["labels"] for r in result]),
                            result):
            r["masks"] = probs
        return {}
