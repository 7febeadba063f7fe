"""ResNet-50/101 (He et al.) with torchvision's module names, so
``state_dict``s move between the two unchanged; dilated variants for
segmentation, whose dilated 3x3 convolutions are segops' AtrousConv2d."""
from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from ..nn import AtrousConv2d
from ._weights import load_state, overwrite_param


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding = dilation; AtrousConv2d when dilated."""
    layer = AtrousConv2d if dilation > 1 else nn.Conv2d
    return layer(in_channels, out_channels, 3, stride=stride, padding=dilation,
                 dilation=dilation, bias=False)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (stride on the 3x3 convolution, ResNet v1.5)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, dilation: int = 1,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d):
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet over Bottleneck blocks with torchvision's names (conv1, bn1,
    layer1..layer4, fc).

    Args:
        layers: blocks per stage ([3, 4, 6, 3] is ResNet-50).
        replace_stride_with_dilation: per stage 2-4, trade the stride for
            dilation (DeepLab's output stride 8 is [False, True, True]); None
            (the default) or 3 entries, as torchvision.
        num_classes: size of the classifier ``fc``; None drops ``avgpool``
            and ``fc`` (a backbone).
        norm_layer: the normalisation after each convolution (torchvision's
            detection models pass FrozenBatchNorm2d for trained weights).
    forward(x ``(N, 3, H, W)``) -> logits ``(N, num_classes)``, or the
    feature dict of :meth:`features` for a backbone.
    """

    def __init__(self, layers: list[int], replace_stride_with_dilation=None,
                 num_classes: int | None = 1000,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d):
        super().__init__()
        if replace_stride_with_dilation is None:   # torchvision's default
            replace_stride_with_dilation = (False, False, False)
        if len(replace_stride_with_dilation) != 3:
            raise ValueError("replace_stride_with_dilation should be None or a 3-element tuple, "
                             f"got {replace_stride_with_dilation}")
        self.inplanes, self.dilation = 64, 1
        self.norm_layer = norm_layer
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        dilate = (False, *replace_stride_with_dilation)
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", self._make_layer(planes, blocks, stride, dilate[i]))
        if num_classes is not None:
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)
        self._init_weights()

    def _make_layer(self, planes: int, blocks: int, stride: int, dilate: bool) -> nn.Sequential:
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, 1, stride=stride,
                          bias=False),
                self.norm_layer(planes * Bottleneck.expansion))
        layers = [Bottleneck(self.inplanes, planes, stride, downsample, previous_dilation,
                             self.norm_layer)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes, dilation=self.dilation,
                              norm_layer=self.norm_layer) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: Tensor) -> dict[str, Tensor]:
        """{'aux': layer3 output, 'out': layer4 output}."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        aux = self.layer3(x)
        return {"aux": aux, "out": self.layer4(aux)}

    def forward(self, x: Tensor):
        features = self.features(x)
        if not hasattr(self, "fc"):
            return features
        return self.fc(self.avgpool(features["out"]).flatten(1))


def _resnet(layers: list[int], weights, kwargs: dict) -> ResNet:
    """torchvision's builder rule: with ``weights``, num_classes is the
    weights' (their ``fc``; None for a backbone without one) and a different
    num_classes is a ValueError; the weights load strictly."""
    if weights is None:
        return ResNet(layers, **kwargs)
    state = load_state(weights)
    fc = state.get("fc.weight")
    kwargs["num_classes"] = overwrite_param("num_classes", kwargs.get("num_classes"),
                                            None if fc is None else fc.shape[0])
    model = ResNet(layers, **kwargs)
    model.load_state_dict(state)
    return model


def resnet50(*, weights=None, progress: bool = True, **kwargs) -> ResNet:
    """ResNet-50. ``weights``: a torchvision ``resnet50`` state_dict or its
    path (nothing is downloaded; ``progress`` is accepted and unused); other
    keyword arguments as :class:`ResNet`."""
    return _resnet([3, 4, 6, 3], weights, kwargs)


def resnet101(*, weights=None, progress: bool = True, **kwargs) -> ResNet:
    """ResNet-101; arguments as :func:`resnet50`."""
    return _resnet([3, 4, 23, 3], weights, kwargs)
