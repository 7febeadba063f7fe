"""Box coding, proposal matching and fg/bg sampling, with torchvision's
numbers (``models/detection/_utils.py``); decoding runs segops'
``decode_boxes`` kernel."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ...ops import decode_boxes

DEFAULT_BBOX_XFORM_CLIP = math.log(1000.0 / 16)


class BoxCoder:
    """Encodes boxes as (dx, dy, dw, dh) deltas against reference boxes and
    decodes them back (torchvision's ``BoxCoder``): centre offsets in units
    of the reference size times (wx, wy), log size ratios times (ww, wh)."""

    def __init__(self, weights: tuple[float, float, float, float],
                 bbox_xform_clip: float = DEFAULT_BBOX_XFORM_CLIP):
        self.weights = tuple(weights)
        self.bbox_xform_clip = bbox_xform_clip

    def encode(self, reference_boxes: list[Tensor], proposals: list[Tensor]) -> list[Tensor]:
        """Per image: the deltas ``(L_i, 4)`` taking each proposal to its
        reference (GT) box."""
        counts = [len(b) for b in reference_boxes]
        targets = self.encode_single(torch.cat(reference_boxes), torch.cat(proposals))
        return list(targets.split(counts, 0))

    def encode_single(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        weights = torch.as_tensor(self.weights, dtype=reference_boxes.dtype,
                                  device=reference_boxes.device)
        wx, wy, ww, wh = weights.unbind()
        ex_w = proposals[:, 2:3] - proposals[:, 0:1]
        ex_h = proposals[:, 3:4] - proposals[:, 1:2]
        ex_x = proposals[:, 0:1] + 0.5 * ex_w
        ex_y = proposals[:, 1:2] + 0.5 * ex_h
        gt_w = reference_boxes[:, 2:3] - reference_boxes[:, 0:1]
        gt_h = reference_boxes[:, 3:4] - reference_boxes[:, 1:2]
        gt_x = reference_boxes[:, 0:1] + 0.5 * gt_w
        gt_y = reference_boxes[:, 1:2] + 0.5 * gt_h
        return torch.cat((wx * (gt_x - ex_x) / ex_w, wy * (gt_y - ex_y) / ex_h,
                          ww * torch.log(gt_w / ex_w), wh * torch.log(gt_h / ex_h)), dim=1)

    def decode(self, rel_codes: Tensor, boxes: list[Tensor]) -> Tensor:
        """``rel_codes`` ``(sum L_i, 4K)`` against the concatenated ``boxes``
        -> ``(sum L_i, K, 4)``."""
        total = sum(len(b) for b in boxes)
        if total > 0:
            rel_codes = rel_codes.reshape(total, -1)
        decoded = decode_boxes(rel_codes, torch.cat(boxes), self.weights, self.bbox_xform_clip)
        return decoded.reshape(total, decoded.shape[-1] // 4, 4)


class Matcher:
    """Assigns each prediction (column of the ``(G, P)`` IoU matrix) its best
    GT (row; the first on ties), or BELOW_LOW_THRESHOLD (-1) /
    BETWEEN_THRESHOLDS (-2). With ``allow_low_quality_matches`` every
    prediction tied with a GT's best IoU keeps that match (ties at IoU 0
    included, as torchvision)."""

    BELOW_LOW_THRESHOLD = -1
    BETWEEN_THRESHOLDS = -2

    def __init__(self, high_threshold: float, low_threshold: float,
                 allow_low_quality_matches: bool = False):
        if low_threshold > high_threshold:
            raise ValueError(f"low_threshold ({low_threshold}) must be <= high_threshold "
                             f"({high_threshold})")
        self.high_threshold = high_threshold
        self.low_threshold = low_threshold
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, match_quality_matrix: Tensor) -> Tensor:
        if match_quality_matrix.numel() == 0:
            if match_quality_matrix.shape[0] == 0:
                raise ValueError("No ground-truth boxes available for one of the images "
                                 "during training")
            raise ValueError("No proposal boxes available for one of the images during "
                             "training")
        matched_vals, matches = match_quality_matrix.max(dim=0)
        all_matches = matches.clone() if self.allow_low_quality_matches else None
        below = matched_vals < self.low_threshold
        between = (matched_vals >= self.low_threshold) & (matched_vals < self.high_threshold)
        matches[below] = self.BELOW_LOW_THRESHOLD
        matches[between] = self.BETWEEN_THRESHOLDS
        if all_matches is not None:
            best_per_gt = match_quality_matrix.max(dim=1).values
            ties = torch.where(match_quality_matrix == best_per_gt[:, None])[1]
            matches[ties] = all_matches[ties]
        return matches


class BalancedPositiveNegativeSampler:
    """Per image, up to ``batch_size_per_image * positive_fraction``
    positives (label >= 1) and negatives (label 0) to fill the batch, each
    drawn with ``torch.randperm``. Returns per image uint8 masks (positives,
    negatives)."""

    def __init__(self, batch_size_per_image: int, positive_fraction: float):
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction

    def __call__(self, matched_idxs: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        positives, negatives = [], []
        for labels in matched_idxs:
            positive = torch.where(labels >= 1)[0]
            negative = torch.where(labels == 0)[0]
            num_pos = min(positive.numel(),
                          int(self.batch_size_per_image * self.positive_fraction))
            num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
            pos = positive[torch.randperm(positive.numel(), device=positive.device)[:num_pos]]
            neg = negative[torch.randperm(negative.numel(), device=negative.device)[:num_neg]]
            positives.append(_index_mask(labels, pos))
            negatives.append(_index_mask(labels, neg))
        return positives, negatives


def _index_mask(like: Tensor, index: Tensor) -> Tensor:
    mask = torch.zeros_like(like, dtype=torch.uint8)
    mask[index] = 1
    return mask


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices of the boxes at least ``min_size`` wide and high."""
    sizes = boxes[:, 2:] - boxes[:, :2]
    return torch.where((sizes >= min_size).all(dim=1))[0]
