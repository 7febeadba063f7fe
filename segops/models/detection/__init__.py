"""Mask R-CNN and its parts, laid out as torchvision.models.detection (one
file per part: transform, backbone, anchors, rpn, roi_heads, mask_rcnn)."""
from .anchors import AnchorGenerator
from .backbone import (
    BackboneWithFPN,
    FeaturePyramidNetwork,
    FrozenBatchNorm2d,
    LastLevelMaxPool,
    SmallConvNet,
    small_fpn_backbone,
)
from .mask_rcnn import (
    DegenerateBoxError,
    FastRCNNConvFCHead,
    FastRCNNPredictor,
    MaskRCNN,
    MaskRCNNHeads,
    MaskRCNNPredictor,
    TwoMLPHead,
    maskrcnn_resnet50_fpn,
    maskrcnn_resnet50_fpn_v2,
    maskrcnn_small,
)
from .roi_heads import RoIHeads
from .rpn import RegionProposalNetwork, RPNHead
from .transform import GeneralizedRCNNTransform, ImageList

__all__ = ["AnchorGenerator", "BackboneWithFPN", "DegenerateBoxError", "FastRCNNConvFCHead",
           "FastRCNNPredictor", "FeaturePyramidNetwork", "FrozenBatchNorm2d",
           "GeneralizedRCNNTransform", "ImageList", "LastLevelMaxPool", "MaskRCNN",
           "MaskRCNNHeads", "MaskRCNNPredictor", "RPNHead", "RegionProposalNetwork", "RoIHeads", "SmallConvNet",
           "TwoMLPHead", "maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2",
           "maskrcnn_small", "small_fpn_backbone"]
