"""SyntheticShapes: an embedded segmentation dataset (no download), so the
models, the training loop and the demo run anywhere."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset


class SyntheticShapes(Dataset):
    """Images of random filled circles, rectangles and triangles on textured
    backgrounds, with per-pixel class masks.

    Item i: (image ``(3, size, size)`` float32, roughly zero-mean, unit
    variance; mask ``(size, size)`` int64 with 0 = background, 1 = circle,
    2 = rectangle, 3 = triangle). Shapes may overlap; the last drawn wins.
    Every item is a pure function of (seed, split, i): the splits never
    share an image and a dataset can be rebuilt exactly anywhere.
    """

    CLASSES = ("background", "circle", "rectangle", "triangle")
    _SPLITS = {"train": 0, "val": 1, "test": 2}

    def __init__(self, length: int = 512, size: int = 64, *, split: str = "train",
                 max_shapes: int = 3, seed: int = 0):
        if split not in self._SPLITS:
            raise ValueError(f"split must be one of {tuple(self._SPLITS)}, got {split!r}")
        if length < 0 or size < 8 or max_shapes < 1:
            raise ValueError("need length >= 0, size >= 8 and max_shapes >= 1")
        self.length, self.size, self.split = length, size, split
        self.max_shapes, self.seed = max_shapes, seed
        self.num_classes = len(self.CLASSES)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        g = torch.Generator().manual_seed(
            (self.seed * 3 + self._SPLITS[self.split]) * 1_000_003 + index)
        image = _texture(3, self.size, g)
        mask = torch.zeros(self.size, self.size, dtype=torch.int64)
        count = int(torch.randint(1, self.max_shapes + 1, (1,), generator=g))
        for _ in range(count):
            label = int(torch.randint(1, 4, (1,), generator=g))
            inside = _shape(label, self.size, g)
            colour = torch.rand(3, 1, 1, generator=g) * 2 - 1
            fill = colour + 0.3 * _texture(3, self.size, g)
            image = torch.where(inside, fill, image)
            mask[inside] = label
        return (image - image.mean()) / image.std().clamp(min=1e-3), mask


def _texture(channels: int, size: int, g: torch.Generator) -> Tensor:
    """Smooth random field plus fine noise, about unit amplitude."""
    coarse = torch.randn(1, channels, 4, 4, generator=g)
    smooth = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0]
    return 0.5 * smooth + 0.15 * torch.randn(channels, size, size, generator=g)


def _shape(label: int, size: int, g: torch.Generator) -> Tensor:
    """Boolean (size, size) mask of one random circle (1), rectangle (2) or
    triangle (3), between about 1/8 and 1/3 of the image across."""
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32),
                            torch.arange(size, dtype=torch.float32), indexing="ij")
    u = torch.rand(6, generator=g)
    cy, cx = (0.15 + 0.7 * u[0]) * size, (0.15 + 0.7 * u[1]) * size
    r = (0.08 + 0.1 * u[2]) * size
    if label == 1:
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2
    if label == 2:
        aspect = 0.6 + 0.8 * u[3]
        return ((yy - cy).abs() <= r * aspect) & ((xx - cx).abs() <= r / aspect)
    angle = 2 * math.pi * float(u[4])
    corners = [(cy + 1.3 * r * math.sin(angle + k * 2 * math.pi / 3),
                cx + 1.3 * r * math.cos(angle + k * 2 * math.pi / 3)) for k in range(3)]
    sides = []
    for (y0, x0), (y1, x1) in zip(corners, corners[1:] + corners[:1]):
        sides.append((x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0))
    return ((sides[0] >= 0) & (sides[1] >= 0) & (sides[2] >= 0)) | \
        ((sides[0] <= 0) & (sides[1] <= 0) & (sides[2] <= 0))
