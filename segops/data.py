"""Embedded datasets (no download), so the models, the training loop and the
demo run anywhere: SyntheticShapes (semantic segmentation) and
SyntheticInstances (instance segmentation / detection, torchvision's
detection format), plus :func:`detection_collate`."""
from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ._checks import check_choice, check_int

# item i of (seed, split) is drawn from seed (3 * seed + split) * _SEEDS_PER_SPLIT + i:
# distinct for every item of a dataset of at most _SEEDS_PER_SPLIT items
_SEEDS_PER_SPLIT = 1_000_003


def _item_generator(seed: int, split: int, index: int) -> torch.Generator:
    # torch seeds are 64-bit: manual_seed refuses anything outside
    # [-2**63, 2**64) and maps a negative seed s to s + 2**64, so reducing mod
    # 2**64 keeps every item that had a seed and gives one to any int seed
    # (e.g. a 64-bit torch.initial_seed())
    return torch.Generator().manual_seed(
        ((seed * 3 + split) * _SEEDS_PER_SPLIT + index) % 2**64)


class SyntheticShapes(Dataset):
    """Images of random filled circles, rectangles and triangles on textured
    backgrounds, with per-pixel class masks.

    Item i: (image ``(3, size, size)`` float32, roughly zero-mean, unit
    variance; mask ``(size, size)`` int64 with 0 = background, 1 = circle,
    2 = rectangle, 3 = triangle). Shapes may overlap; the last drawn wins.
    Every item is a pure function of (seed, split, i): the splits (and the
    seeds) never share an image and a dataset can be rebuilt exactly
    anywhere; ``length`` is at most 1 000 003 for that.
    """

    CLASSES = ("background", "circle", "rectangle", "triangle")
    _SPLITS = {"train": 0, "val": 1, "test": 2}

    def __init__(self, length: int = 512, size: int = 64, *, split: str = "train",
                 max_shapes: int = 3, seed: int = 0):
        check_choice("split", split, tuple(self._SPLITS))
        self.length = check_int("length", length, minimum=0, maximum=_SEEDS_PER_SPLIT)
        self.size = check_int("size", size, minimum=8)
        self.max_shapes = check_int("max_shapes", max_shapes, minimum=1)
        self.seed = check_int("seed", seed)
        self.split = split
        self.num_classes = len(self.CLASSES)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        index = operator.index(index)   # numpy ints (Subset of a numpy array), 0-d tensors
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        g = _item_generator(self.seed, self._SPLITS[self.split], index)
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


class SyntheticInstances(Dataset):
    """The shapes of :class:`SyntheticShapes` as object instances, in
    torchvision's detection format (Mask R-CNN, Faster R-CNN).

    Item i is ``(image, target)``:

    * ``image``: ``(3, size, size)`` float32 in [0, 1], not normalised (the
      detector's transform normalises). A dark, muted textured background;
      each shape is filled with a bright colour from a palette of well
      separated hues, lightly textured, and shapes drawn in the same image
      never share a colour (up to the palette's eight).
    * ``target``: a dict with, for the K instances kept,

      - ``boxes`` ``(K, 4)`` float32 ``x1, y1, x2, y2``: the bounding box of
        the instance's visible pixels, with exclusive right/bottom edges
        (``x2`` = largest visible column + 1), so box area = width * height
        in pixels;
      - ``labels`` ``(K,)`` int64: 1 circle, 2 rectangle, 3 triangle
        (0 is the background and never appears);
      - ``masks`` ``(K, size, size)`` uint8 in {0, 1}: the instance's visible
        pixels. Shapes are drawn in order and later ones occlude earlier ones,
        so the masks are disjoint;
      - ``image_id`` 0-d int64 tensor: the index i;
      - ``area`` ``(K,)`` float32: visible pixel count (COCO's convention:
        the mask area, used for the small/medium/large ranges of both box
        and mask AP);
      - ``iscrowd`` ``(K,)`` int64 zeros.

    An instance whose visible region has fewer than ``min_area`` pixels after
    occlusion is dropped from the target (it stays painted in the image), so
    K may be smaller than the number of shapes drawn, and even 0 at tiny
    ``size``. Instances are listed in drawing order.

    Every item is a pure function of (seed, split, i), like SyntheticShapes:
    the splits never share an image and a dataset can be rebuilt anywhere.

    Args:
        length: number of items (0 to 1 000 003).
        size: image side in pixels (>= 16).
        split: 'train', 'val' or 'test'.
        max_shapes: each image has between 1 and ``max_shapes`` shapes (>= 1).
        seed: base seed (int).
        min_area: smallest visible area, in pixels, of an instance kept (>= 1).
    """

    CLASSES = SyntheticShapes.CLASSES
    _SPLITS = SyntheticShapes._SPLITS
    # saturated, well separated RGB colours (the background stays below ~0.45)
    PALETTE = torch.tensor([
        [1.00, 0.15, 0.15], [0.15, 0.90, 0.20], [0.20, 0.40, 1.00], [1.00, 0.90, 0.10],
        [1.00, 0.20, 0.95], [0.10, 0.95, 0.95], [1.00, 0.55, 0.05], [0.95, 0.95, 0.95],
    ])

    def __init__(self, length: int = 512, size: int = 128, *, split: str = "train",
                 max_shapes: int = 4, seed: int = 0, min_area: int = 16):
        check_choice("split", split, tuple(self._SPLITS))
        self.length = check_int("length", length, minimum=0, maximum=_SEEDS_PER_SPLIT)
        self.size = check_int("size", size, minimum=16)
        self.max_shapes = check_int("max_shapes", max_shapes, minimum=1)
        self.seed = check_int("seed", seed)
        self.min_area = check_int("min_area", min_area, minimum=1)
        self.split = split
        self.num_classes = len(self.CLASSES)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        index = operator.index(index)
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        g = _item_generator(self.seed, self._SPLITS[self.split], index)
        image, owner, labels = self._draw(g)
        return image, _instance_target(owner, labels, index, self.min_area)

    def _draw(self, g: torch.Generator) -> tuple[Tensor, Tensor, list[int]]:
        """The image, the ``(size, size)`` int64 map of which shape owns each
        pixel (-1 background) and the label of every shape drawn."""
        size = self.size
        image = (0.25 + 0.12 * _texture(3, size, g)).clamp(0.0, 0.45)
        grain = 0.08 * _texture(3, size, g)             # the shapes' texture
        owner = torch.full((size, size), -1, dtype=torch.int64)
        count = int(torch.randint(1, self.max_shapes + 1, (1,), generator=g))
        colours = torch.randperm(len(self.PALETTE), generator=g)
        labels = []
        for j in range(count):
            label = int(torch.randint(1, 4, (1,), generator=g))
            inside = _shape(label, size, g)
            colour = self.PALETTE[colours[j % len(colours)]].view(3, 1, 1)
            fill = (0.85 * colour + grain).clamp(0.0, 1.0)
            image = torch.where(inside, fill, image)
            owner[inside] = j
            labels.append(label)
        return image, owner, labels


def _instance_target(owner: Tensor, labels: list[int], index: int,
                     min_area: int) -> dict[str, Tensor]:
    """Target dict of the shapes in ``owner`` (``(H, W)`` int64, -1 = none)
    whose visible area is at least ``min_area`` pixels."""
    height, width = owner.shape
    ids = torch.arange(len(labels)).view(-1, 1, 1)
    masks = owner.unsqueeze(0) == ids                     # (N, H, W) bool
    area = masks.flatten(1).sum(1)
    keep = area >= min_area
    masks, area = masks[keep], area[keep]
    boxes = _mask_boxes(masks)
    return {
        "boxes": boxes,
        "labels": torch.tensor(labels, dtype=torch.int64)[keep],
        "masks": masks.to(torch.uint8),
        "image_id": torch.tensor(index, dtype=torch.int64),
        "area": area.to(torch.float32),
        "iscrowd": torch.zeros(len(boxes), dtype=torch.int64),
    }


def _mask_boxes(masks: Tensor) -> Tensor:
    """``(K, 4)`` float32 xyxy boxes of non-empty ``(K, H, W)`` bool masks,
    right/bottom edges exclusive (largest index + 1)."""
    if masks.shape[0] == 0:
        return torch.zeros((0, 4), dtype=torch.float32)
    rows, cols = masks.any(2), masks.any(1)               # (K, H), (K, W)

    def span(hit: Tensor) -> tuple[Tensor, Tensor]:
        index = torch.arange(hit.shape[1])
        first = torch.where(hit, index, hit.shape[1]).amin(1)
        return first, torch.where(hit, index, -1).amax(1) + 1

    y1, y2 = span(rows)
    x1, x2 = span(cols)
    return torch.stack([x1, y1, x2, y2], 1).to(torch.float32)


def detection_collate(batch):
    """Collate ``(image, target)`` items into ``(list of images, list of
    targets)``: detection images differ in their number of instances (and,
    in general, in size), so nothing is stacked. Use as a DataLoader's
    ``collate_fn``."""
    images, targets = [], []
    for item in batch:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ValueError(
                f"batch items must be (image, target) pairs, got {type(item).__name__}")
        images.append(item[0])
        targets.append(item[1])
    return images, targets
