"""The region proposal network, with torchvision's numbers: per-level top-k
of the objectness, decode, clip, small-box and score filters, and per-level
NMS; every image and level of the batch in one segops
``batched_nms_per_image`` call (one host sync)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...nn._share import refuse_script
from ...ops import batched_nms_per_image, box_iou
from ._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher
from .anchors import AnchorGenerator
from .backbone import RenamedInVersion2, conv_norm_act
from .transform import ImageList


class RPNHead(RenamedInVersion2, nn.Module):
    """``conv_depth`` 3x3 conv + ReLU layers (``conv.i.0``), then per
    location A objectness logits (``cls_logits``) and 4A deltas
    (``bbox_pred``); weights N(0, 0.01), biases 0.

    forward(features: list of ``(N, C, H_l, W_l)``) -> (list of ``(N, A,
    H_l, W_l)``, list of ``(N, 4A, H_l, W_l)``).
    """

    def __init__(self, in_channels: int, num_anchors: int, conv_depth: int = 1):
        super().__init__()
        self.conv = nn.Sequential(*(conv_norm_act(in_channels, in_channels, 3)
                                    for _ in range(conv_depth)))
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def _renamed(self) -> list[tuple[str, str]]:
        return [("conv", "conv.0.0")]

    def forward(self, x: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        logits, deltas = [], []
        for feature in x:
            t = self.conv(feature)
            logits.append(self.cls_logits(t))
            deltas.append(self.bbox_pred(t))
        return logits, deltas


def flatten_level(x: Tensor, channels: int) -> Tensor:
    """``(N, A * C, H, W)`` -> ``(N, H * W * A, C)`` in (y, x, anchor) order."""
    n, _, h, w = x.shape
    return x.view(n, -1, channels, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, channels)


def concat_box_prediction_layers(logits: list[Tensor], deltas: list[Tensor]
                                 ) -> tuple[Tensor, Tensor]:
    """All levels' predictions as ``(N * sum HWA, C)`` logits and
    ``(N * sum HWA, 4)`` deltas, in the anchors' order."""
    flat_logits, flat_deltas = [], []
    for cls, reg in zip(logits, deltas):
        anchors = reg.shape[1] // 4
        flat_logits.append(flatten_level(cls, cls.shape[1] // anchors))
        flat_deltas.append(flatten_level(reg, 4))
    return (torch.cat(flat_logits, dim=1).flatten(0, -2),
            torch.cat(flat_deltas, dim=1).reshape(-1, 4))


class RegionProposalNetwork(nn.Module):
    """torchvision's ``RegionProposalNetwork`` (same attributes and
    keywords). ``pre_nms_top_n``/``post_nms_top_n`` are dicts
    {'training': n, 'testing': n}: per level before NMS, per image after.

    forward(images: ImageList, features: OrderedDict of ``(N, C, H_l, W_l)``,
    targets) -> (list of N ``(L_i, 4)`` proposals, loss dict).
    """

    __prepare_scriptable__ = refuse_script   # a clear error from torch.jit.script

    def __init__(self, anchor_generator: AnchorGenerator, head: nn.Module,
                 fg_iou_thresh: float, bg_iou_thresh: float, batch_size_per_image: int,
                 positive_fraction: float, pre_nms_top_n: dict[str, int],
                 post_nms_top_n: dict[str, int], nms_thresh: float, score_thresh: float = 0.0):
        super().__init__()
        self.anchor_generator = anchor_generator
        self.head = head
        self.box_coder = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.box_similarity = box_iou
        self.proposal_matcher = Matcher(fg_iou_thresh, bg_iou_thresh,
                                        allow_low_quality_matches=True)
        self.fg_bg_sampler = BalancedPositiveNegativeSampler(batch_size_per_image,
                                                             positive_fraction)
        self._pre_nms_top_n = pre_nms_top_n
        self._post_nms_top_n = post_nms_top_n
        self.nms_thresh = nms_thresh
        self.score_thresh = score_thresh
        self.min_size = 1e-3

    def pre_nms_top_n(self) -> int:
        return self._pre_nms_top_n["training" if self.training else "testing"]

    def post_nms_top_n(self) -> int:
        return self._post_nms_top_n["training" if self.training else "testing"]

    def _top_n_idx(self, objectness: Tensor, num_anchors_per_level: list[int]) -> Tensor:
        """``(N, sum k_l)``: per level the indices of its top-k logits."""
        indices, offset = [], 0
        for level in objectness.split(num_anchors_per_level, 1):
            k = min(self.pre_nms_top_n(), level.shape[1])
            indices.append(level.topk(k, dim=1).indices + offset)
            offset += level.shape[1]
        return torch.cat(indices, dim=1)

    def filter_proposals(self, proposals: Tensor, objectness: Tensor,
                         image_shapes: list[tuple[int, int]],
                         num_anchors_per_level: list[int]) -> tuple[list[Tensor], list[Tensor]]:
        """Top-k per level, clip, drop tiny and low-score boxes, NMS per
        (image, level), keep post_nms_top_n per image: boxes ``(L_i, 4)``
        and sigmoid scores ``(L_i,)`` per image."""
        num_images = proposals.shape[0]
        device = proposals.device
        # scores in the boxes' dtype (float32 under autocast: fewer ties than bf16)
        objectness = objectness.detach().to(proposals.dtype).reshape(num_images, -1)
        levels = torch.cat([torch.full((n,), i, dtype=torch.int64, device=device)
                            for i, n in enumerate(num_anchors_per_level)])
        top = self._top_n_idx(objectness, num_anchors_per_level)
        rows = torch.arange(num_images, device=device)[:, None]
        scores = torch.sigmoid(objectness[rows, top])
        levels = levels[top]
        boxes = _clip_per_image(proposals[rows, top], image_shapes)
        sizes = boxes[..., 2:] - boxes[..., :2]
        keep = (sizes >= self.min_size).all(dim=-1) & (scores >= self.score_thresh)
        image_ids, columns = torch.nonzero(keep, as_tuple=True)
        boxes, scores, levels = (t[image_ids, columns] for t in (boxes, scores, levels))
        kept = batched_nms_per_image(boxes, scores, levels, image_ids, self.nms_thresh,
                                     self.post_nms_top_n(), num_images=num_images)
        return [boxes[k] for k in kept], [scores[k] for k in kept]

    def assign_targets_to_anchors(self, anchors: list[Tensor], targets: list[dict[str, Tensor]]
                                  ) -> tuple[list[Tensor], list[Tensor]]:
        """Per image: label 1 (object), 0 (background) or -1 (ignored) per
        anchor, and its matched GT box."""
        labels, matched_boxes = [], []
        for anchors_i, target in zip(anchors, targets):
            gt_boxes = target["boxes"]
            if gt_boxes.numel() == 0:
                matched_boxes.append(torch.zeros(anchors_i.shape, dtype=torch.float32,
                                                 device=anchors_i.device))
                labels.append(torch.zeros(anchors_i.shape[0], dtype=torch.float32,
                                          device=anchors_i.device))
                continue
            matched = self.proposal_matcher(self.box_similarity(gt_boxes, anchors_i))
            matched_boxes.append(gt_boxes[matched.clamp(min=0)])
            label = (matched >= 0).to(dtype=torch.float32)
            label[matched == Matcher.BELOW_LOW_THRESHOLD] = 0.0
            label[matched == Matcher.BETWEEN_THRESHOLDS] = -1.0
            labels.append(label)
        return labels, matched_boxes

    def compute_loss(self, objectness: Tensor, pred_bbox_deltas: Tensor, labels: list[Tensor],
                     regression_targets: list[Tensor]) -> tuple[Tensor, Tensor]:
        """BCE on the sampled anchors, smooth-L1 (beta 1/9, summed) on the
        positives' deltas, both over the number sampled."""
        positives, negatives = self.fg_bg_sampler(labels)
        positive = torch.where(torch.cat(positives))[0]
        negative = torch.where(torch.cat(negatives))[0]
        sampled = torch.cat([positive, negative])
        labels = torch.cat(labels)
        regression_targets = torch.cat(regression_targets)
        box_loss = F.smooth_l1_loss(pred_bbox_deltas[positive], regression_targets[positive],
                                    beta=1 / 9, reduction="sum") / sampled.numel()
        objectness_loss = F.binary_cross_entropy_with_logits(
            objectness.flatten()[sampled], labels[sampled])
        return objectness_loss, box_loss

    def forward(self, images: ImageList, features: dict[str, Tensor],
                targets: list[dict[str, Tensor]] | None = None
                ) -> tuple[list[Tensor], dict[str, Tensor]]:
        features = list(features.values())
        objectness, deltas = self.head(features)
        anchors = self.anchor_generator(images, features)
        num_images = len(anchors)
        num_anchors_per_level = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = self.box_coder.decode(deltas.detach().to(anchors[0].dtype), anchors)
        proposals = proposals.view(num_images, -1, 4)
        boxes, _ = self.filter_proposals(proposals, objectness, images.image_sizes,
                                         num_anchors_per_level)
        losses = {}
        if self.training:
            if targets is None:
                raise ValueError("targets should not be None in training mode")
            labels, matched_boxes = self.assign_targets_to_anchors(anchors, targets)
            regression_targets = self.box_coder.encode(matched_boxes, anchors)
            loss_objectness, loss_rpn_box_reg = self.compute_loss(objectness, deltas, labels,
                                                                  regression_targets)
            losses = {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_rpn_box_reg}
        return boxes, losses


def _clip_per_image(boxes: Tensor, image_shapes: list[tuple[int, int]]) -> Tensor:
    """``(N, L, 4)`` boxes clamped to each image's ``[0, w] x [0, h]`` (NaN
    stays NaN, as torch.clamp)."""
    limits = torch.tensor([[w, h, w, h] for h, w in image_shapes], dtype=boxes.dtype,
                          device=boxes.device)
    return torch.minimum(boxes.clamp(min=0), limits[:, None, :])
