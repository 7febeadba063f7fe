"""Mask R-CNN on segops' ops, a drop-in for torchvision's
``maskrcnn_resnet50_fpn`` / ``maskrcnn_resnet50_fpn_v2``: the same
constructor keywords, module names, ``state_dict`` keys (older names
migrated on load) and outputs. RoI pooling (all FPN levels in one launch),
the mask predictor's transposed convolution, NMS (one call per batch), mask
targets and mask pasting run segops' kernels; see shared/MASKRCNN.md for the
semantics this reproduces."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..._format import is_channels_last
from ...nn import ConvTranspose2d, MultiScaleRoIAlign
from .._weights import load_backbone, load_state
from .anchors import AnchorGenerator
from .backbone import (
    BackboneWithFPN,
    FrozenBatchNorm2d,
    RenamedInVersion2,
    conv_norm_act,
    resnet50_fpn_backbone,
    small_fpn_backbone,
    validate_trainable_layers,
)
from .roi_heads import RoIHeads
from .rpn import RegionProposalNetwork, RPNHead
from .transform import GeneralizedRCNNTransform

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
FPN_LEVELS = ["0", "1", "2", "3"]


class InvalidTargetError(ValueError, AssertionError):
    """Missing or malformed training targets. torchvision raises an
    AssertionError (``torch._assert``) with the same message; this is both."""


class DegenerateBoxError(InvalidTargetError):
    """A GT box with no positive width or height (torchvision's message)."""


# ------------------------------------------------------------------- heads
class TwoMLPHead(nn.Module):
    """Flatten, then ``fc6`` and ``fc7`` (Linear + ReLU).
    forward(``(K, C, 7, 7)``) -> ``(K, representation_size)``."""

    def __init__(self, in_channels: int, representation_size: int):
        super().__init__()
        self.fc6 = nn.Linear(in_channels, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.fc6(x.flatten(start_dim=1)))
        return torch.relu(self.fc7(x))


class FastRCNNConvFCHead(nn.Sequential):
    """v2's box head: 3x3 conv (+ norm) + ReLU layers, Flatten, Linear + ReLU
    layers (keys ``{i}.0``, ``{i}.1``, then the Linear indices)."""

    def __init__(self, input_size: tuple[int, int, int], conv_layers: list[int],
                 fc_layers: list[int], norm_layer: Callable[[int], nn.Module] | None = None):
        channels, height, width = input_size
        blocks: list[nn.Module] = []
        for out in conv_layers:
            blocks.append(conv_norm_act(channels, out, 3, norm_layer=norm_layer))
            channels = out
        blocks.append(nn.Flatten())
        features = channels * height * width
        for out in fc_layers:
            blocks += [nn.Linear(features, out), nn.ReLU(inplace=True)]
            features = out
        super().__init__(*blocks)
        _kaiming_conv_init(self)


class FastRCNNPredictor(nn.Module):
    """Class logits ``cls_score`` ``(K, num_classes)`` and per-class deltas
    ``bbox_pred`` ``(K, 4 * num_classes)``."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, num_classes * 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.dim() == 4 and list(x.shape[2:]) != [1, 1]:
            raise ValueError(f"x has shape {list(x.shape)}: expected [K, C, 1, 1] or [K, C]")
        x = x.flatten(1)
        return self.cls_score(x), self.bbox_pred(x)


class MaskRCNNHeads(RenamedInVersion2, nn.Sequential):
    """3x3 conv (+ norm) + ReLU layers over the pooled RoI features (keys
    ``{i}.0``; torchvision's pre-0.13 ``mask_fcn{i+1}`` migrated on load).
    forward(``(K, C, 14, 14)``) -> ``(K, layers[-1], 14, 14)``."""

    def __init__(self, in_channels: int, layers: list[int], dilation: int = 1,
                 norm_layer: Callable[[int], nn.Module] | None = None):
        blocks = []
        for out in layers:
            blocks.append(conv_norm_act(in_channels, out, 3, norm_layer=norm_layer,
                                        padding=dilation, dilation=dilation))
            in_channels = out
        super().__init__(*blocks)
        _kaiming_conv_init(self)

    def _renamed(self) -> list[tuple[str, str]]:
        return [(f"mask_fcn{i + 1}", f"{i}.0") for i in range(len(self))]


class MaskRCNNPredictor(nn.Sequential):
    """``conv5_mask`` (segops' ConvTranspose2d, kernel 2, stride 2) + ReLU,
    then ``mask_fcn_logits`` (1x1): ``(K, C, 14, 14)`` -> ``(K,
    num_classes, 28, 28)`` logits."""

    def __init__(self, in_channels: int, dim_reduced: int, num_classes: int):
        super().__init__(OrderedDict([
            ("conv5_mask", ConvTranspose2d(in_channels, dim_reduced, 2, 2, 0)),
            ("relu", nn.ReLU(inplace=True)),
            ("mask_fcn_logits", nn.Conv2d(dim_reduced, num_classes, 1, 1, 0)),
        ]))
        for name, parameter in self.named_parameters():
            if "weight" in name:
                nn.init.kaiming_normal_(parameter, mode="fan_out", nonlinearity="relu")


def _kaiming_conv_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# ------------------------------------------------------------------- model
class MaskRCNN(nn.Module):
    """torchvision's ``MaskRCNN`` (a GeneralizedRCNN): ``transform``,
    ``backbone``, ``rpn``, ``roi_heads``, with torchvision's keywords and
    defaults (see shared/MASKRCNN.md).

    forward(images: list of N ``(3, H_i, W_i)`` floats in [0, 1], targets:
    list of {boxes ``(K, 4)`` float xyxy, labels ``(K,)`` int64, masks
    ``(K, H_i, W_i)`` uint8} in training) -> in training the loss dict
    {loss_classifier, loss_box_reg, loss_mask, loss_objectness,
    loss_rpn_box_reg}; in eval a list of {boxes ``(D, 4)``, labels ``(D,)``,
    scores ``(D,)``, masks ``(D, 1, H_i, W_i)`` float probabilities} in
    the original image coordinates.
    """

    def __init__(self, backbone: nn.Module, num_classes: int | None = None, *,
                 min_size=800, max_size: int = 1333, image_mean=None, image_std=None,
                 rpn_anchor_generator=None, rpn_head=None, rpn_pre_nms_top_n_train=2000,
                 rpn_pre_nms_top_n_test=1000, rpn_post_nms_top_n_train=2000,
                 rpn_post_nms_top_n_test=1000, rpn_nms_thresh=0.7, rpn_fg_iou_thresh=0.7,
                 rpn_bg_iou_thresh=0.3, rpn_batch_size_per_image=256, rpn_positive_fraction=0.5,
                 rpn_score_thresh=0.0, box_roi_pool=None, box_head=None, box_predictor=None,
                 box_score_thresh=0.05, box_nms_thresh=0.5, box_detections_per_img=100,
                 box_fg_iou_thresh=0.5, box_bg_iou_thresh=0.5, box_batch_size_per_image=512,
                 box_positive_fraction=0.25, bbox_reg_weights=None, mask_roi_pool=None,
                 mask_head=None, mask_predictor=None, **kwargs):
        super().__init__()
        if not hasattr(backbone, "out_channels"):
            raise ValueError("backbone should contain an attribute out_channels specifying the "
                             "number of output channels (assumed the same for all levels)")
        _check_num_classes(num_classes, box_predictor, "box_predictor")
        _check_num_classes(num_classes, mask_predictor, "mask_predictor")
        channels = backbone.out_channels
        anchor_generator = _default(rpn_anchor_generator, default_anchor_generator)
        rpn_head = _default(rpn_head, lambda: RPNHead(
            channels, anchor_generator.num_anchors_per_location()[0]))
        self.transform = GeneralizedRCNNTransform(
            min_size, max_size, _default(image_mean, lambda: list(IMAGENET_MEAN)),
            _default(image_std, lambda: list(IMAGENET_STD)), **kwargs)
        self.backbone = backbone
        self.rpn = RegionProposalNetwork(
            anchor_generator, rpn_head, rpn_fg_iou_thresh, rpn_bg_iou_thresh,
            rpn_batch_size_per_image, rpn_positive_fraction,
            {"training": rpn_pre_nms_top_n_train, "testing": rpn_pre_nms_top_n_test},
            {"training": rpn_post_nms_top_n_train, "testing": rpn_post_nms_top_n_test},
            rpn_nms_thresh, score_thresh=rpn_score_thresh)
        box_roi_pool = _default(box_roi_pool, lambda: MultiScaleRoIAlign(list(FPN_LEVELS), 7, 2))
        resolution = box_roi_pool.output_size[0]
        box_head = _default(box_head, lambda: TwoMLPHead(channels * resolution ** 2, 1024))
        box_predictor = _default(box_predictor, lambda: FastRCNNPredictor(1024, num_classes))
        self.roi_heads = RoIHeads(
            box_roi_pool, box_head, box_predictor, box_fg_iou_thresh, box_bg_iou_thresh,
            box_batch_size_per_image, box_positive_fraction, bbox_reg_weights, box_score_thresh,
            box_nms_thresh, box_detections_per_img,
            _default(mask_roi_pool, lambda: MultiScaleRoIAlign(list(FPN_LEVELS), 14, 2)),
            _default(mask_head, lambda: MaskRCNNHeads(channels, [256] * 4, 1)),
            _default(mask_predictor, lambda: MaskRCNNPredictor(256, 256, num_classes)))

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        if self.training:
            _check_training_targets(targets)
        original_sizes = []
        for image in images:
            if image.dim() < 2:
                raise ValueError("expecting the last two dimensions of the Tensor to be H and "
                                 f"W instead got {tuple(image.shape[-2:])}")
            original_sizes.append((int(image.shape[-2]), int(image.shape[-1])))
        image_list, targets = self.transform(images, targets)
        if targets is not None:
            _check_degenerate_boxes(targets)
        features = self.backbone(_like_the_weights(image_list.tensors, self.backbone))
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        proposals, proposal_losses = self.rpn(image_list, features, targets)
        detections, detector_losses = self.roi_heads(features, proposals,
                                                     image_list.image_sizes, targets)
        detections = self.transform.postprocess(detections, image_list.image_sizes,
                                                original_sizes)
        if self.training:
            return {**detector_losses, **proposal_losses}
        return detections


def _like_the_weights(batch: Tensor, backbone: nn.Module) -> Tensor:
    """The padded batch in channels_last when the backbone's first
    convolution is (``model.to(memory_format=torch.channels_last)``): the
    transform builds it NCHW."""
    conv = next((m for m in backbone.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is not None and is_channels_last(conv.weight):
        return batch.contiguous(memory_format=torch.channels_last)
    return batch


def _default(value, build):
    """``value``, or ``build()`` when it is None (not when it is merely
    falsy: an empty nn.Sequential or a numpy mean are real arguments)."""
    return build() if value is None else value


def _check_num_classes(num_classes, predictor, name: str) -> None:
    if predictor is not None and num_classes is not None:
        raise ValueError(f"num_classes should be None when {name} is specified")
    if predictor is None and num_classes is None:
        raise ValueError(f"num_classes should not be None when {name} is not specified")


def _check_training_targets(targets) -> None:
    if targets is None:
        raise InvalidTargetError("targets should not be none when in training mode")
    for target in targets:
        boxes = target["boxes"]
        if not isinstance(boxes, Tensor):
            raise InvalidTargetError("Expected target boxes to be of type Tensor, got "
                                     f"{type(boxes)}.")
        if boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise InvalidTargetError("Expected target boxes to be a tensor of shape [N, 4], got "
                             f"{boxes.shape}.")


def _check_degenerate_boxes(targets: list[dict[str, Tensor]]) -> None:
    for index, target in enumerate(targets):
        boxes = target["boxes"]
        degenerate = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
        if degenerate.any():
            box = boxes[torch.where(degenerate)[0][0]].tolist()
            raise DegenerateBoxError("All bounding boxes should have positive height and width."
                                     f" Found invalid box {box} for target at index {index}.")


def default_anchor_generator() -> AnchorGenerator:
    """Sizes 32..512 (one per FPN level) x aspect ratios (0.5, 1, 2)."""
    return AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)


# ------------------------------------------------------------ constructors
def _load_weights(model: nn.Module, weights) -> None:
    """``weights``: a state_dict or a path to one (segops downloads nothing)."""
    model.load_state_dict(load_state(weights))


def _backbone_is_trained(weights, weights_backbone) -> bool:
    return weights is not None or weights_backbone is not None


def _build_backbone(weights, weights_backbone, trainable_backbone_layers, norm_layer,
                    fpn_norm_layer) -> BackboneWithFPN:
    is_trained = _backbone_is_trained(weights, weights_backbone)
    trainable = validate_trainable_layers(is_trained, trainable_backbone_layers, 5, 3)
    backbone = resnet50_fpn_backbone(norm_layer, trainable, fpn_norm_layer)
    if weights_backbone is not None and weights is None:
        load_backbone(backbone.body, weights_backbone)
    return backbone


def maskrcnn_resnet50_fpn(*, weights=None, progress: bool = True, num_classes: int | None = None,
                          weights_backbone=None, trainable_backbone_layers: int | None = None,
                          **kwargs) -> MaskRCNN:
    """Mask R-CNN, ResNet-50-FPN (torchvision's v1; 44.4 M parameters at 91
    classes).

    Args:
        weights: a torchvision ``maskrcnn_resnet50_fpn`` state_dict (or its
            path) to load; segops downloads nothing.
        num_classes: including background (91 without weights).
        weights_backbone: an ImageNet ResNet-50 state_dict (or path) for the
            backbone. Unlike torchvision (whose default is IMAGENET1K_V1),
            the default is None: nothing is downloaded.
        trainable_backbone_layers: 0-5, default 3 with weights; all 5
            without (torchvision's rule).
        **kwargs: :class:`MaskRCNN`'s keywords.
    With any weights the backbone uses FrozenBatchNorm2d, as torchvision,
    and with ``weights`` its eps is 0 (torchvision sets that for COCO_V1,
    the only published v1 checkpoint).
    """
    if num_classes is None:
        num_classes = 91
    is_trained = _backbone_is_trained(weights, weights_backbone)
    norm_layer = FrozenBatchNorm2d if is_trained else nn.BatchNorm2d
    backbone = _build_backbone(weights, weights_backbone, trainable_backbone_layers,
                               norm_layer, None)
    model = MaskRCNN(backbone, num_classes=num_classes, **kwargs)
    if weights is not None:
        _load_weights(model, weights)
        for m in model.modules():  # torchvision does this for its (only) COCO_V1 weights
            if isinstance(m, FrozenBatchNorm2d):
                m.eps = 0.0
    return model


def maskrcnn_resnet50_fpn_v2(*, weights=None, progress: bool = True,
                             num_classes: int | None = None, weights_backbone=None,
                             trainable_backbone_layers: int | None = None,
                             **kwargs) -> MaskRCNN:
    """Mask R-CNN v2 (Li et al., "Benchmarking detection transfer learning
    with vision transformers"): BatchNorm in the FPN, box and mask heads, a
    two-conv RPN head and a 4-conv + 1-FC box head; arguments as
    :func:`maskrcnn_resnet50_fpn`."""
    if num_classes is None:
        num_classes = 91
    backbone = _build_backbone(weights, weights_backbone, trainable_backbone_layers,
                               nn.BatchNorm2d, nn.BatchNorm2d)
    anchors = default_anchor_generator()
    rpn_head = RPNHead(backbone.out_channels, anchors.num_anchors_per_location()[0],
                       conv_depth=2)
    box_head = FastRCNNConvFCHead((backbone.out_channels, 7, 7), [256] * 4, [1024],
                                  norm_layer=nn.BatchNorm2d)
    mask_head = MaskRCNNHeads(backbone.out_channels, [256] * 4, 1, norm_layer=nn.BatchNorm2d)
    model = MaskRCNN(backbone, num_classes=num_classes, rpn_anchor_generator=anchors,
                     rpn_head=rpn_head, box_head=box_head, mask_head=mask_head, **kwargs)
    if weights is not None:
        _load_weights(model, weights)
    return model


def maskrcnn_small(*, num_classes: int = 4, width: int = 16, fpn_channels: int = 64,
                   **kwargs) -> MaskRCNN:
    """A light Mask R-CNN for ~128-pixel images that trains on a CPU in
    minutes (the demo's model): :func:`small_fpn_backbone` (stride-2 stages
    of ``width * (1, 2, 4, 8)`` channels, an ``fpn_channels``-wide FPN),
    anchors 8-128 pixels, a 256-wide box head, a two-conv mask head, and
    proposal/detection counts scaled to small images. Every default can be
    overridden through :class:`MaskRCNN`'s keywords."""
    backbone = small_fpn_backbone(width, fpn_channels)
    options = dict(
        min_size=128, max_size=128,
        rpn_anchor_generator=AnchorGenerator(((8,), (16,), (32,), (64,), (128,)),
                                             ((0.5, 1.0, 2.0),) * 5),
        rpn_pre_nms_top_n_train=600, rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_train=300, rpn_post_nms_top_n_test=100,
        box_batch_size_per_image=128, box_detections_per_img=20,
        box_head=TwoMLPHead(fpn_channels * 7 * 7, 256),
        box_predictor=FastRCNNPredictor(256, num_classes),
        mask_head=MaskRCNNHeads(fpn_channels, [fpn_channels] * 2),
        mask_predictor=MaskRCNNPredictor(fpn_channels, fpn_channels, num_classes))
    options.update(kwargs)
    return MaskRCNN(backbone, None, **options)
