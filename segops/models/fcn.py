"""Fully convolutional networks: torchvision's FCN-ResNet50/101 (same
modules and ``state_dict`` keys, dilated backbone on segops' AtrousConv2d)
and the original FCN-8s of Long et al. (VGG16, transposed-convolution
up-sampling on segops' ConvTranspose2d, initialised bilinear)."""
from __future__ import annotations

from collections import OrderedDict

import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import ConvTranspose2d, init
from ._weights import load_backbone, load_state, overwrite_param
from .resnet import ResNet, resnet50, resnet101


class FCNHead(nn.Sequential):
    """3x3 conv to in_channels / 4, BN, ReLU, dropout 0.1, 1x1 conv to the
    classes (torchvision's FCNHead)."""

    def __init__(self, in_channels: int, channels: int):
        inter = in_channels // 4
        super().__init__(nn.Conv2d(in_channels, inter, 3, padding=1, bias=False),
                         nn.BatchNorm2d(inter), nn.ReLU(), nn.Dropout(0.1),
                         nn.Conv2d(inter, channels, 1))


class SegmentationModel(nn.Module):
    """backbone -> classifier (and aux_classifier on layer3), each up-sampled
    bilinearly to the input size; torchvision's _SimpleSegmentationModel.

    forward(x ``(N, 3, H, W)``) -> {'out': ``(N, classes, H, W)``, 'aux': the
    same from layer3 when there is an aux_classifier}.
    """

    def __init__(self, backbone: ResNet, classifier: nn.Module,
                 aux_classifier: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.aux_classifier = aux_classifier

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        size = x.shape[-2:]
        features = self.backbone(x)
        result = OrderedDict()
        result["out"] = F.interpolate(self.classifier(features["out"]), size=size,
                                      mode="bilinear", align_corners=False)
        if self.aux_classifier is not None:
            result["aux"] = F.interpolate(self.aux_classifier(features["aux"]), size=size,
                                          mode="bilinear", align_corners=False)
        return result


def dilated_backbone(depth: int) -> ResNet:
    """ResNet-50/101 at output stride 8 (layer3 and layer4 dilated by 2 and
    4), without avgpool and fc."""
    make = {50: resnet50, 101: resnet101}[depth]
    return make(replace_stride_with_dilation=[False, True, True], num_classes=None)


def build_segmentation_model(head: type[nn.Module], depth: int, num_classes: int | None,
                             aux_loss: bool | None, weights, weights_backbone
                             ) -> SegmentationModel:
    """A dilated ResNet-``depth`` with ``head(2048, classes)`` (and an FCNHead
    on layer3 with aux_loss), as torchvision's builders make it: with
    ``weights`` (a state_dict or path; loaded), num_classes and aux_loss
    default to the weights' and must agree with them; without, to 21 and
    False. ``weights_backbone`` (an ImageNet ResNet state_dict or path)
    initialises the backbone when there are no ``weights``."""
    state = None if weights is None else load_state(weights)
    if state is not None:
        num_classes = overwrite_param("num_classes", num_classes,
                                      state["classifier.4.weight"].shape[0])
        aux_loss = overwrite_param("aux_loss", aux_loss,
                                   any(key.startswith("aux_classifier.") for key in state))
    num_classes = 21 if num_classes is None else num_classes
    backbone = dilated_backbone(depth)
    if state is None and weights_backbone is not None:
        load_backbone(backbone, weights_backbone)
    aux = FCNHead(1024, num_classes) if aux_loss else None
    model = SegmentationModel(backbone, head(2048, num_classes), aux)
    if state is not None:
        model.load_state_dict(state)
    return model


def fcn_resnet50(num_classes: int | None = None, aux_loss: bool | None = None, *,
                 weights=None, progress: bool = True, weights_backbone=None
                 ) -> SegmentationModel:
    """torchvision's ``fcn_resnet50``: its modules and ``state_dict`` keys,
    its outputs, its builder's keywords. Input ``(N, 3, H, W)``; output
    {'out': ``(N, num_classes, H, W)``[, 'aux': same]}.

    Args:
        num_classes: 21 by default, or the ``weights``'.
        aux_loss: an FCNHead on layer3 ('aux'); False by default, or
            whether the ``weights`` hold one.
        weights: a torchvision ``fcn_resnet50`` state_dict, or its path, to
            load. segops downloads nothing: a torchvision ``Weights`` enum is
            a TypeError.
        progress: accepted for torchvision's signature; nothing is
            downloaded.
        weights_backbone: an ImageNet ResNet-50 state_dict (or path) for the
            backbone. torchvision's default is IMAGENET1K_V1 (a download);
            here None, a random backbone.
    """
    return build_segmentation_model(FCNHead, 50, num_classes, aux_loss, weights,
                                    weights_backbone)


def fcn_resnet101(num_classes: int | None = None, aux_loss: bool | None = None, *,
                  weights=None, progress: bool = True, weights_backbone=None
                  ) -> SegmentationModel:
    """torchvision's ``fcn_resnet101`` (arguments as :func:`fcn_resnet50`)."""
    return build_segmentation_model(FCNHead, 101, num_classes, aux_loss, weights,
                                    weights_backbone)


# --------------------------------------------------------------------------
# FCN-8s (Long, Shelhamer, Darrell 2015)
# --------------------------------------------------------------------------
_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def _vgg16_stages(base: int) -> nn.ModuleList:
    """VGG16's five conv stages, each ending in a 2x2 max pool; the first conv
    pads by 100 as in the original, so any input size survives fc6's 7x7."""
    stages, layers, channels = [], [], 3
    for item in _VGG16:
        if item == "M":
            layers.append(nn.MaxPool2d(2, stride=2, ceil_mode=True))
            stages.append(nn.Sequential(*layers))
            layers = []
            continue
        width = item * base // 64
        first = not stages and not layers  # conv1_1 only (never a later 3-channel conv)
        layers += [nn.Conv2d(channels, width, 3, padding=100 if first else 1),
                   nn.ReLU(inplace=True)]
        channels = width
    return nn.ModuleList(stages)


class FCN8s(nn.Module):
    """FCN-8s: VGG16 features, fc6/fc7 as convolutions, class scores at pool3,
    pool4 and fc7, fused by summation after 2x, 2x and 8x transposed-
    convolution up-sampling (initialised bilinear), cropped to the input.

    forward(x ``(N, 3, H, W)``) -> ``(N, num_classes, H, W)``.
    ``base_channels`` scales VGG's widths (64 is the paper's; fc6/fc7 have
    64 * base_channels channels).
    """

    # Crop offsets aligning each map's pixel centres with the up-sampled map's
    # (Caffe's crop layers): in input coordinates pool4 is 16u - 91.5, pool3
    # 8u - 95.5, upscore2 16u - 11.5, upscore_pool4 8u - 23.5 and upscore8
    # u - 31 (the 100-pixel padding, 2x2 pools, fc6's 7x7, the 4/2 and 16/8
    # transposed convs), so (91.5 - 11.5) / 16 = 5, (95.5 - 23.5) / 8 = 9, 31.
    # tests/models/test_models.py derives them independently.
    POOL4_OFFSET, POOL3_OFFSET, OUTPUT_OFFSET = 5, 9, 31

    def __init__(self, num_classes: int, base_channels: int = 64):
        super().__init__()
        self.stages = _vgg16_stages(base_channels)
        wide, c3, c4 = 64 * base_channels, 4 * base_channels, 8 * base_channels
        self.fc6 = nn.Sequential(nn.Conv2d(c4, wide, 7), nn.ReLU(inplace=True), nn.Dropout2d())
        self.fc7 = nn.Sequential(nn.Conv2d(wide, wide, 1), nn.ReLU(inplace=True), nn.Dropout2d())
        self.score_fr = nn.Conv2d(wide, num_classes, 1)
        self.score_pool4 = nn.Conv2d(c4, num_classes, 1)
        self.score_pool3 = nn.Conv2d(c3, num_classes, 1)
        self.upscore2 = ConvTranspose2d(num_classes, num_classes, 4, stride=2, bias=False)
        self.upscore_pool4 = ConvTranspose2d(num_classes, num_classes, 4, stride=2, bias=False)
        self.upscore8 = ConvTranspose2d(num_classes, num_classes, 16, stride=8, bias=False)
        for up in (self.upscore2, self.upscore_pool4, self.upscore8):
            init.bilinear_upsampling_(up.weight, up.groups)
        for score in (self.score_fr, self.score_pool4, self.score_pool3):
            nn.init.zeros_(score.weight)
            nn.init.zeros_(score.bias)

    @staticmethod
    def _crop(x: Tensor, offset: int, like: Tensor) -> Tensor:
        return x[:, :, offset:offset + like.shape[-2], offset:offset + like.shape[-1]]

    def forward(self, x: Tensor) -> Tensor:
        h = x
        pools = []
        for stage in self.stages:
            h = stage(h)
            pools.append(h)
        pool3, pool4 = pools[2], pools[3]
        up2 = self.upscore2(self.score_fr(self.fc7(self.fc6(h))))
        fused4 = up2 + self._crop(self.score_pool4(pool4), self.POOL4_OFFSET, up2)
        up4 = self.upscore_pool4(fused4)
        fused3 = up4 + self._crop(self.score_pool3(pool3), self.POOL3_OFFSET, up4)
        return self._crop(self.upscore8(fused3), self.OUTPUT_OFFSET, x)


def fcn8s(num_classes: int, backbone: str = "vgg16", *, base_channels: int = 64) -> FCN8s:
    """FCN-8s on VGG16 (the only backbone of the paper). Input ``(N, 3, H,
    W)``, output ``(N, num_classes, H, W)``."""
    if backbone != "vgg16":
        raise ValueError(f"fcn8s is defined on backbone='vgg16', got {backbone!r}")
    return FCN8s(num_classes, base_channels)
