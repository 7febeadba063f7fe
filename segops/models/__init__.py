"""Segmentation models on segops' ops: U-Net, FCN-8s, torchvision's
FCN-ResNet and DeepLabV3 (same ``state_dict`` keys), and the ResNet
backbone."""
from .deeplabv3 import ASPP, DeepLabHead, deeplabv3_resnet50, deeplabv3_resnet101
from .fcn import FCN8s, FCNHead, SegmentationModel, fcn8s, fcn_resnet50, fcn_resnet101
from .resnet import ResNet, resnet50, resnet101
from .unet import UNet, unet

__all__ = ["ASPP", "DeepLabHead", "FCN8s", "FCNHead", "ResNet", "SegmentationModel", "UNet",
           "deeplabv3_resnet50", "deeplabv3_resnet101", "fcn8s", "fcn_resnet50",
           "fcn_resnet101", "resnet50", "resnet101", "unet"]
