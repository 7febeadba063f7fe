"""U-Net (Ronneberger et al. 2015) on segops' ConvTranspose2d."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import ConvTranspose2d


def double_conv(in_channels: int, out_channels: int, norm: str) -> nn.Sequential:
    """(3x3 conv, [BN], ReLU) twice; with BN the convs have no bias."""
    layers = []
    for c_in in (in_channels, out_channels):
        layers.append(nn.Conv2d(c_in, out_channels, 3, padding=1, bias=norm == "none"))
        if norm == "batch":
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class Up(nn.Module):
    """Up-sample by 2 to half the channels (a 2x2 stride-2 transposed conv,
    or bilinear interpolation then a 1x1 conv), concatenate the skip, then a
    double conv."""

    def __init__(self, in_channels: int, out_channels: int, up: str, norm: str):
        super().__init__()
        if up == "transpose":
            self.up = ConvTranspose2d(in_channels, in_channels // 2, 2, stride=2)
        else:
            self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear",
                                                align_corners=False),
                                    nn.Conv2d(in_channels, in_channels // 2, 1))
        self.conv = double_conv(in_channels // 2 + out_channels, out_channels, norm)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """``x`` zero-padded at the bottom/right to H, W multiples of ``multiple``
    (``x`` itself when they are). A leaf of torch.fx traces: the test on the
    sizes needs concrete sizes."""
    H, W = x.shape[-2:]
    pad_h, pad_w = -H % multiple, -W % multiple
    return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x


torch.fx.wrap("pad_to_multiple")


class UNet(nn.Module):
    """U-Net: ``depth`` 2x down-samplings (max pool, double conv, channels
    doubling from ``base_channels``) and as many up-samplings with skip
    concatenation, then a 1x1 conv to the classes.

    forward(x ``(N, in_channels, H, W)``) -> logits ``(N, num_classes, H, W)``.
    Any H, W: the input is zero-padded at the bottom/right to the next
    multiple of 2**depth and the logits cropped back.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 2, base_channels: int = 64,
                 depth: int = 4, up: str = "transpose", norm: str = "batch"):
        super().__init__()
        if up not in ("transpose", "bilinear"):
            raise ValueError(f"up must be 'transpose' or 'bilinear', got {up!r}")
        if norm not in ("batch", "none"):
            raise ValueError(f"norm must be 'batch' or 'none', got {norm!r}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        widths = [base_channels * 2 ** i for i in range(depth + 1)]
        self.depth = depth
        self.inc = double_conv(in_channels, widths[0], norm)
        self.down = nn.ModuleList(double_conv(widths[i], widths[i + 1], norm)
                                  for i in range(depth))
        self.up = nn.ModuleList(Up(widths[i + 1], widths[i], up, norm)
                                for i in reversed(range(depth)))
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        H, W = x.shape[-2:]
        skips = [self.inc(pad_to_multiple(x, 2 ** self.depth))]
        for down in self.down:
            skips.append(down(F.max_pool2d(skips[-1], 2)))
        h = skips.pop()
        for up in self.up:
            h = up(h, skips.pop())
        return self.head(h)[..., :H, :W]


def unet(in_channels: int = 3, num_classes: int = 2, base_channels: int = 64, depth: int = 4,
         up: str = "transpose", norm: str = "batch") -> UNet:
    """Ronneberger's U-Net; see :class:`UNet` for shapes."""
    return UNet(in_channels, num_classes, base_channels, depth, up, norm)
