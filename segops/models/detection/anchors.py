"""AnchorGenerator: torchvision's anchors (rounded base anchors centred at 0,
shifted over each level's grid in (y, x, anchor) order), cached per grid
size, stride, dtype and device."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ...nn._share import refuse_script
from .transform import ImageList


def base_anchors(scales, aspect_ratios, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> Tensor:
    """``(len(ratios) * len(scales), 4)`` anchors ``(-w/2, -h/2, w/2, h/2)``
    rounded to integers, with h/w = ratio and area scale^2 (ratio-major)."""
    scales = torch.as_tensor(scales, dtype=dtype, device=device)
    aspect_ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
    h_ratios = torch.sqrt(aspect_ratios)
    w_ratios = 1 / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).view(-1)
    hs = (h_ratios[:, None] * scales[None, :]).view(-1)
    return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()


def box_dtype(feature_dtype: torch.dtype) -> torch.dtype:
    """The dtype boxes are computed in: the features' (as torchvision), but
    float32 for fp16/bf16 features. A departure from torchvision under
    autocast, where anchors, proposals and detections inherit bf16's 8-bit
    mantissa (an 8-pixel step past x = 1024); segops keeps every box in
    float32 and runs only the convolutions and RoIAlign in reduced
    precision."""
    return torch.float32 if feature_dtype in (torch.float16, torch.bfloat16) else feature_dtype


class AnchorGenerator(nn.Module):
    """Anchors for each feature level: ``sizes[l]`` x ``aspect_ratios[l]``
    at every grid cell of level l, the cell's top-left corner at
    (x * stride_w, y * stride_h).

    forward(image_list, feature_maps) -> one ``(sum_l H_l W_l A_l, 4)``
    tensor per image, in the feature maps' dtype (float32 for fp16/bf16
    features: see :func:`box_dtype`).
    """

    __prepare_scriptable__ = refuse_script   # a clear error from torch.jit.script

    def __init__(self, sizes=((128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),)):
        super().__init__()
        if not isinstance(sizes[0], (list, tuple)):
            sizes = tuple((s,) for s in sizes)
        if not isinstance(aspect_ratios[0], (list, tuple)):
            aspect_ratios = (aspect_ratios,) * len(sizes)
        if len(sizes) != len(aspect_ratios):
            raise ValueError(f"sizes has {len(sizes)} levels and aspect_ratios "
                             f"{len(aspect_ratios)}: give one entry per level")
        self.sizes = sizes
        self.aspect_ratios = aspect_ratios
        self.cell_anchors = [base_anchors(s, a) for s, a in zip(sizes, aspect_ratios)]
        self._cache: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}

    def num_anchors_per_location(self) -> list[int]:
        return [len(s) * len(a) for s, a in zip(self.sizes, self.aspect_ratios)]

    def grid_anchors(self, grid_sizes: list[tuple[int, int]], strides: list[tuple[int, int]],
                     dtype: torch.dtype, device: torch.device) -> list[Tensor]:
        """Per level ``(H * W * A, 4)``: every base anchor at every cell."""
        if len(grid_sizes) != len(self.cell_anchors):
            raise ValueError(f"{len(grid_sizes)} feature maps for anchors of "
                             f"{len(self.cell_anchors)} levels: pass one (sizes, "
                             "aspect_ratios) entry per feature map")
        anchors = []
        for (height, width), (stride_h, stride_w), base in zip(grid_sizes, strides,
                                                                 self.cell_anchors):
            base = base.to(dtype=dtype, device=device)
            shifts_x = torch.arange(0, width, dtype=torch.int32, device=device) * stride_w
            shifts_y = torch.arange(0, height, dtype=torch.int32, device=device) * stride_h
            shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
            shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
            shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
            anchors.append((shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4))
        return anchors

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        grid_sizes = [tuple(int(s) for s in f.shape[-2:]) for f in feature_maps]
        image_size = image_list.tensors.shape[-2:]
        dtype, device = box_dtype(feature_maps[0].dtype), feature_maps[0].device
        strides = [(int(image_size[0]) // g[0], int(image_size[1]) // g[1]) for g in grid_sizes]
        # the cell tensors by identity (the entry keeps them alive, so no new
        # tensor can take their id or address), data and in-place version
        cells = tuple((id(c), c.data_ptr(), c._version, tuple(c.shape))
                      for c in self.cell_anchors)
        key = (tuple(grid_sizes), tuple(strides), dtype, device, cells)
        levels = self._cache.get(key, (None,))[0]
        if levels is None:
            levels = self.grid_anchors(grid_sizes, strides, dtype, device)
            if not torch.compiler.is_compiling():
                # one entry: the last grid (sizes vary in training)
                self._cache = {key: (levels, list(self.cell_anchors))}
        return [torch.cat(levels) for _ in image_list.image_sizes]  # one tensor per image

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, aspect_ratios={self.aspect_ratios}"
