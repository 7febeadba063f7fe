"""DeepLabV3 (Chen et al. 2017) with torchvision's modules and ``state_dict``
keys: dilated ResNet at output stride 8, ASPP with rates 12/24/36 and image
pooling; the dilated convolutions are segops' AtrousConv2d."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import AtrousConv2d
from .fcn import SegmentationModel, build_segmentation_model


class ASPPConv(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, dilation: int):
        super().__init__(AtrousConv2d(in_channels, out_channels, 3, padding=dilation,
                                      dilation=dilation, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU())


class ASPPPooling(nn.Sequential):
    """Image-level features: global average, 1x1 conv, BN, ReLU, broadcast
    back to the map's size."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, out_channels, 1,
                                                            bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        for module in self:
            x = module(x)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 branch, one dilated 3x3 branch
    per rate and image pooling, concatenated and projected to out_channels."""

    def __init__(self, in_channels: int, atrous_rates, out_channels: int = 256):
        super().__init__()
        branches = [nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                  nn.BatchNorm2d(out_channels), nn.ReLU())]
        branches += [ASPPConv(in_channels, out_channels, rate) for rate in atrous_rates]
        branches.append(ASPPPooling(in_channels, out_channels))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(
            nn.Conv2d(len(self.convs) * out_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(), nn.Dropout(0.5))

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([branch(x) for branch in self.convs], dim=1))


class DeepLabHead(nn.Sequential):
    def __init__(self, in_channels: int, num_classes: int, atrous_rates=(12, 24, 36)):
        super().__init__(ASPP(in_channels, atrous_rates),
                         nn.Conv2d(256, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256),
                         nn.ReLU(), nn.Conv2d(256, num_classes, 1))


def deeplabv3_resnet50(num_classes: int | None = None, aux_loss: bool | None = None, *,
                       weights=None, progress: bool = True, weights_backbone=None
                       ) -> SegmentationModel:
    """torchvision's ``deeplabv3_resnet50``: its modules and ``state_dict``
    keys, its outputs, its builder's keywords (see
    :func:`segops.models.fcn_resnet50`: ``weights`` is a state_dict or
    path, nothing is downloaded). Input ``(N, 3, H, W)``; output
    {'out': ``(N, num_classes, H, W)``[, 'aux': same]}."""
    return build_segmentation_model(DeepLabHead, 50, num_classes, aux_loss, weights,
                                    weights_backbone)


def deeplabv3_resnet101(num_classes: int | None = None, aux_loss: bool | None = None, *,
                        weights=None, progress: bool = True, weights_backbone=None
                        ) -> SegmentationModel:
    """torchvision's ``deeplabv3_resnet101`` (see deeplabv3_resnet50)."""
    return build_segmentation_model(DeepLabHead, 101, num_classes, aux_loss, weights,
                                    weights_backbone)
