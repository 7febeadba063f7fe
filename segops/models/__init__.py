"""Segmentation models on segops' ops: U-Net, FCN-8s, torchvision's
FCN-ResNet, DeepLabV3 and Mask R-CNN (same ``state_dict`` keys), and the
ResNet backbone."""
from .deeplabv3 import ASPP, DeepLabHead, deeplabv3_resnet50, deeplabv3_resnet101
from .detection import (
    MaskRCNN,
    maskrcnn_resnet50_fpn,
    maskrcnn_resnet50_fpn_v2,
    maskrcnn_small,
)
from .fcn import FCN8s, FCNHead, SegmentationModel, fcn8s, fcn_resnet50, fcn_resnet101
from .resnet import ResNet, resnet50, resnet101
from .unet import UNet, unet

__all__ = ["ASPP", "DeepLabHead", "FCN8s", "FCNHead", "MaskRCNN", "ResNet", "SegmentationModel",
           "UNet", "deeplabv3_resnet50", "deeplabv3_resnet101", "fcn8s", "fcn_resnet50",
           "fcn_resnet101", "maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2",
           "maskrcnn_small", "resnet50", "resnet101", "unet"]
