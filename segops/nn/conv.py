"""AtrousConv2d: an nn.Conv2d whose forward runs segops' convolution kernels."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.conv import atrous_conv2d
from ._share import retype

torch.fx.wrap("atrous_conv2d")  # a graph leaf for torch.fx.symbolic_trace


class AtrousConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same constructor, parameters and ``state_dict``) on
    :func:`segops.ops.atrous_conv2d`, so it loads an ``nn.Conv2d``'s weights
    and gives its outputs. Any dilation, stride, padding and groups; the
    ``padding_mode``s other than ``'zeros'`` pad with ``F.pad`` first, as
    ``nn.Conv2d`` does.

    forward(input ``(N, C_in, H, W)``) -> ``(N, C_out, OH, OW)``.

    ``activation='relu'`` (keyword) fuses a ReLU into the store.
    """

    def __init__(self, *args, activation: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.activation = activation

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "AtrousConv2d":
        """An AtrousConv2d sharing ``conv``'s parameters (not a copy)."""
        new = retype(conv, cls)
        new.activation = None
        return new

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        else:
            padding = self.padding
        return atrous_conv2d(input, weight, bias, self.stride, padding, self.dilation,
                             self.groups, activation=self.activation)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text if self.activation is None else f"{text}, activation={self.activation!r}"
