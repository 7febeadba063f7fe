"""ConvTranspose2d: an nn.ConvTranspose2d whose forward runs segops' kernels."""
from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from .._checks import refuse_script
from .._geometry import conv_transpose_output_size
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
        if output_size is None:
            return conv_transpose2d(input, self.weight, self.bias, self.stride, self.padding,
                                    self.output_padding, self.groups, self.dilation)
        return conv_transpose2d_to_size(input, self.weight, self.bias, self.stride, self.padding,
                                        output_size, self.groups, self.dilation)


def conv_transpose2d_to_size(input: Tensor, weight: Tensor, bias: Tensor | None, stride,
                             padding, output_size, groups: int, dilation) -> Tensor:
    """:func:`conv_transpose2d` with the output padding that makes the
    output ``output_size`` (``(OH, OW)``, or with the leading batch/channel
    sizes), nn.ConvTranspose2d's rule: each size within [smallest, smallest
    + stride - 1], else ValueError. One function, so that torch.fx keeps
    it as one node: the size arithmetic cannot be traced."""
    spatial = 2
    leading = input.dim() - spatial
    # sizes as nn.ConvTranspose2d takes them: ints, 0-dim tensors, a 1-D tensor
    output_size = [int(size) if isinstance(size, Tensor) else size for size in output_size]
    if len(output_size) == leading + spatial:
        output_size = output_size[leading:]
    if len(output_size) != spatial:
        raise ValueError(f"ConvTranspose2D: for {input.dim()}D input, output_size must have "
                         f"{spatial} or {leading + spatial} elements (got {len(output_size)})")
    smallest = conv_transpose_output_size(input.shape[leading:], weight.shape[-2:], stride,
                                          padding, (0, 0), dilation)
    largest = [size + s - 1 for size, s in zip(smallest, stride)]
    if any(not lo <= size <= hi for size, lo, hi in zip(output_size, smallest, largest)):
        raise ValueError(f"requested an output size of {output_size}, but valid sizes range "
                         f"from {list(smallest)} to {largest} (for an input of "
                         f"{input.shape[leading:]})")
    output_padding = tuple(size - lo for size, lo in zip(output_size, smallest))
    return conv_transpose2d(input, weight, bias, stride, padding, output_padding, groups,
                            dilation)


torch.fx.wrap("conv_transpose2d_to_size")
conv_transpose2d_to_size.__prepare_scriptable__ = functools.partial(
    refuse_script, "segops.nn.conv_transpose.conv_transpose2d_to_size")
