"""ConvTranspose2d: an nn.ConvTranspose2d whose forward runs segops' kernels."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops.conv_transpose import conv_transpose2d
from ._share import retype

torch.fx.wrap("conv_transpose2d")  # a graph leaf for torch.fx.symbolic_trace


class ConvTranspose2d(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` (same constructor, parameters and
    ``state_dict``) on :func:`segops.ops.conv_transpose2d`.

    forward(input ``(N, C_in, H, W)``, output_size=None) -> ``(N, C_out, OH,
    OW)``; ``output_size`` picks the output padding as nn.ConvTranspose2d
    does (and rejects sizes no output padding can give).
    """

    @classmethod
    def from_conv_transpose(cls, conv: nn.ConvTranspose2d) -> "ConvTranspose2d":
        """A ConvTranspose2d sharing ``conv``'s parameters (not a copy)."""
        return retype(conv, cls)

    def forward(self, input: Tensor, output_size: list[int] | None = None) -> Tensor:
        if self.padding_mode != "zeros":
            raise ValueError("only 'zeros' padding_mode is supported for ConvTranspose2d")
        num_spatial_dims = 2
        output_padding = self._output_padding(input, output_size, self.stride, self.padding,
                                              self.kernel_size, num_spatial_dims, self.dilation)
        return conv_transpose2d(input, self.weight, self.bias, self.stride, self.padding,
                                tuple(output_padding), self.groups, self.dilation)
