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
        return self.conv(torch.cat([skip, pad_to_match(self.up(x), skip)], dim=1))


def pad_to_match(x: Tensor, like: Tensor) -> Tensor:
    """``x`` zero-padded to ``like``'s H, W, the odd row or column at the
    bottom/right (``x`` itself when they match): an odd size halved by max
    pooling and doubled back is one short. A leaf of torch.fx traces: the
    test on the sizes needs concrete sizes."""
    pad_h, pad_w = like.shape[-2] - x.shape[-2], like.shape[-1] - x.shape[-1]
    if pad_h or pad_w:
        return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    return x


def pad_to_at_least(x: Tensor, size: int) -> Tensor:
    """``x`` zero-padded at the bottom/right to H, W of at least ``size``
    (``x`` itself when they are). A leaf of torch.fx traces."""
    H, W = x.shape[-2:]
    pad_h, pad_w = max(0, size - H), max(0, size - W)
    return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x


torch.fx.wrap("pad_to_match")
torch.fx.wrap("pad_to_at_least")


class UNet(nn.Module):
    """U-Net: ``depth`` 2x down-samplings (max pool, double conv, channels
    doubling from ``base_channels``) and as many up-samplings with skip
    concatenation, then a 1x1 conv to the classes.

    forward(x ``(N, in_channels, H, W)``) -> logits ``(N, num_classes, H, W)``.
    Any H, W: where max pooling halves an odd size, the up-sampled map is
    zero-padded by one row or column at the bottom/right to its skip's size
    (the encoder and its batch statistics see the image's pixels only). An
    input smaller than 2**depth is zero-padded to that size, and the logits
    cropped back.
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
        skips = [self.inc(pad_to_at_least(x, 2 ** self.depth))]
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
