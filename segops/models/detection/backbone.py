"""The ResNet-FPN backbone of torchvision's detection models, with
torchvision's module names and ``state_dict`` keys: FrozenBatchNorm2d, the
feature pyramid (FPN) with its LastLevelMaxPool, and the resnet50 + FPN
extractor with its trainable-layer rule."""
from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..resnet import ResNet, resnet50

RETURN_LAYERS = {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (buffers, not
    parameters), torchvision's ``ops.FrozenBatchNorm2d``: the same keys
    without ``num_batches_tracked`` (dropped when a BatchNorm2d checkpoint is
    loaded).

    forward(x ``(N, C, H, W)``) -> ``x * w / sqrt(var + eps) + (b - mean * ...)``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight.reshape(1, -1, 1, 1) * \
            (self.running_var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
        shift = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        return x * scale + shift

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.weight.shape[0]}, eps={self.eps})"


def saved_before_version_2(local_metadata: dict) -> bool:
    """A checkpoint of a module from before its ``_version = 2`` renames (or
    one with no version metadata, which torchvision also migrates)."""
    return local_metadata.get("version") is None or local_metadata["version"] < 2


class RenamedInVersion2:
    """Mixin for torchvision modules whose ``_version = 2`` (torchvision 0.13)
    renamed their parameters: an older checkpoint's keys are migrated on
    load, as torchvision's own ``_load_from_state_dict`` does. Subclasses
    list the (old, new) name pairs in ``_renamed()``."""

    _version = 2

    def _renamed(self) -> list[tuple[str, str]]:
        raise NotImplementedError

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        if saved_before_version_2(local_metadata):
            for old, new in self._renamed():
                for kind in ("weight", "bias"):
                    if f"{prefix}{old}.{kind}" in state_dict:
                        state_dict[f"{prefix}{new}.{kind}"] = \
                            state_dict.pop(f"{prefix}{old}.{kind}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


def conv_norm_act(in_channels: int, out_channels: int, kernel_size: int, *,
                  norm_layer: Callable[[int], nn.Module] | None = None, activation: bool = True,
                  padding: int | None = None, dilation: int = 1) -> nn.Sequential:
    """torchvision's Conv2dNormActivation: conv (bias only without a norm),
    then the norm, then ReLU; keys ``0.*`` (conv) and ``1.*`` (norm)."""
    if padding is None:
        padding = (kernel_size - 1) // 2 * dilation
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, kernel_size,
                                         padding=padding, dilation=dilation,
                                         bias=norm_layer is None)]
    if norm_layer is not None:
        layers.append(norm_layer(out_channels))
    if activation:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class LastLevelMaxPool(nn.Module):
    """The FPN's extra level ``'pool'``: max_pool2d(kernel 1, stride 2) of the
    last output (a stride-2 subsample)."""

    def forward(self, results: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        return results + [F.max_pool2d(results[-1], 1, 2, 0)], names + ["pool"]


class FeaturePyramidNetwork(RenamedInVersion2, nn.Module):
    """torchvision's ``ops.FeaturePyramidNetwork``: 1x1 lateral convs
    (``inner_blocks.i.0``), nearest top-down up-sampling to each lateral's
    size, 3x3 output convs (``layer_blocks.i.0``); BatchNorm after each conv
    with ``norm_layer`` (v2).

    forward(x: OrderedDict of ``(N, C_i, H_i, W_i)``, finest first) ->
    OrderedDict of ``(N, out_channels, H_i, W_i)`` with the same names, and
    ``'pool'`` when ``extra_blocks`` is LastLevelMaxPool.
    """

    def __init__(self, in_channels_list: list[int], out_channels: int,
                 extra_blocks: nn.Module | None = None,
                 norm_layer: Callable[[int], nn.Module] | None = None):
        super().__init__()
        if any(c == 0 for c in in_channels_list):
            raise ValueError("in_channels=0 is not supported by FeaturePyramidNetwork")
        self.inner_blocks = nn.ModuleList(
            conv_norm_act(c, out_channels, 1, norm_layer=norm_layer, activation=False)
            for c in in_channels_list)
        self.layer_blocks = nn.ModuleList(
            conv_norm_act(out_channels, out_channels, 3, norm_layer=norm_layer, activation=False)
            for _ in in_channels_list)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.extra_blocks = extra_blocks

    def _renamed(self) -> list[tuple[str, str]]:  # inner_blocks.i -> inner_blocks.i.0
        return [(f"{block}.{i}", f"{block}.{i}.0") for block in ("inner_blocks", "layer_blocks")
                for i in range(len(self.inner_blocks))]

    def forward(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        names, features = list(x.keys()), list(x.values())
        last_inner = self.inner_blocks[-1](features[-1])
        results = [self.layer_blocks[-1](last_inner)]
        for idx in range(len(features) - 2, -1, -1):
            lateral = self.inner_blocks[idx](features[idx])
            last_inner = lateral + F.interpolate(last_inner, size=lateral.shape[-2:],
                                                 mode="nearest")
            results.insert(0, self.layer_blocks[idx](last_inner))
        if self.extra_blocks is not None:
            results, names = self.extra_blocks(results, names)
        return OrderedDict(zip(names, results))


class BackboneBody(nn.ModuleDict):
    """torchvision's IntermediateLayerGetter over a ResNet: its children up to
    the last returned layer (keys ``conv1``, ``bn1``, ``layer1``..), returning
    the named layers' outputs."""

    def __init__(self, model: ResNet, return_layers: dict[str, str]):
        layers = OrderedDict()
        remaining = dict(return_layers)
        for name, module in model.named_children():
            layers[name] = module
            remaining.pop(name, None)
            if not remaining:
                break
        if remaining:
            raise ValueError(f"return_layers {sorted(remaining)} are not layers of the backbone")
        super().__init__(layers)
        self.return_layers = dict(return_layers)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out = OrderedDict()
        for name, module in self.items():
            x = module(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out


class BackboneWithFPN(nn.Module):
    """``body`` (the ResNet stages) then ``fpn``; ``out_channels`` is the FPN
    width. forward(images ``(N, 3, H, W)``) -> OrderedDict ``'0'``..``'3'``,
    ``'pool'`` of ``(N, out_channels, H / 2^(i+2), W / 2^(i+2))``."""

    def __init__(self, backbone: ResNet, return_layers: dict[str, str],
                 in_channels_list: list[int], out_channels: int,
                 extra_blocks: nn.Module | None = None,
                 norm_layer: Callable[[int], nn.Module] | None = None):
        super().__init__()
        self.body = BackboneBody(backbone, return_layers)
        if extra_blocks is None:   # 'is None', as torchvision: a module may be falsy
            extra_blocks = LastLevelMaxPool()
        self.fpn = FeaturePyramidNetwork(in_channels_list, out_channels, extra_blocks,
                                         norm_layer)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.fpn(self.body(x))


def validate_trainable_layers(is_trained: bool, trainable_layers: int | None, max_value: int,
                              default_value: int) -> int:
    """torchvision's rule: without trained weights every layer trains (a
    warning if a count was asked for); otherwise ``default_value``."""
    if not is_trained:
        if trainable_layers is not None:
            warnings.warn("trainable_backbone_layers has no effect without trained weights: "
                          f"all {max_value} layers are trainable", stacklevel=3)
        trainable_layers = max_value
    if trainable_layers is None:
        trainable_layers = default_value
    if not 0 <= trainable_layers <= max_value:
        raise ValueError(f"trainable_backbone_layers must be in [0, {max_value}], "
                         f"got {trainable_layers}")
    return trainable_layers


def resnet_fpn_extractor(backbone: ResNet, trainable_layers: int,
                         norm_layer: Callable[[int], nn.Module] | None = None,
                         out_channels: int = 256) -> BackboneWithFPN:
    """Freeze all but the last ``trainable_layers`` of (conv1, layer1..4)
    (bn1 trains only with all 5) and put an FPN on layers 1-4."""
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers must be in [0, 5], got {trainable_layers}")
    trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        trainable.append("bn1")
    for name, parameter in backbone.named_parameters():
        if all(not name.startswith(layer) for layer in trainable):
            parameter.requires_grad_(False)
    in_channels = [256 * 2 ** i for i in range(4)]
    return BackboneWithFPN(backbone, RETURN_LAYERS, in_channels, out_channels,
                           LastLevelMaxPool(), norm_layer)


def resnet50_fpn_backbone(norm_layer: Callable[[int], nn.Module], trainable_layers: int,
                          fpn_norm_layer: Callable[[int], nn.Module] | None = None
                          ) -> BackboneWithFPN:
    """ResNet-50 (no classifier) + FPN, as torchvision's Mask R-CNN builds it."""
    return resnet_fpn_extractor(resnet50(num_classes=None, norm_layer=norm_layer),
                                trainable_layers, fpn_norm_layer)


class SmallConvNet(nn.Module):
    """A light ResNet-shaped trunk for small images and CPU training: a
    stride-2 stem, then four stages of two 3x3 conv-BN-ReLU (the first with
    stride 2), channels ``width * (1, 2, 4, 8)``; named ``conv1``, ``bn1``,
    ``layer1``..``layer4`` so :class:`BackboneBody` and the trainable-layer
    rule apply unchanged. Outputs of layer1..4 are at strides 4, 8, 16, 32."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        channels = width
        for i in range(4):
            out = width * 2 ** i
            setattr(self, f"layer{i + 1}", nn.Sequential(_conv_bn_relu(channels, out, stride=2),
                                                         _conv_bn_relu(out, out)))
            channels = out
        self.out_channels_list = [width * 2 ** i for i in range(4)]

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1,
                                   bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def small_fpn_backbone(width: int = 16, out_channels: int = 64) -> BackboneWithFPN:
    """:class:`SmallConvNet` + FPN (``out_channels`` wide) + LastLevelMaxPool:
    the same five maps ``'0'``..``'3'``, ``'pool'`` as the ResNet-50-FPN."""
    trunk = SmallConvNet(width)
    return BackboneWithFPN(trunk, RETURN_LAYERS, trunk.out_channels_list, out_channels,
                           LastLevelMaxPool())
