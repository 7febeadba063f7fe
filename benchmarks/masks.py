"""Mask op benchmarks against torchvision as Mask R-CNN calls it (DESIGN.md):

* ``paste_masks``: 100 predicted 28x28 masks pasted into an 800x1216 image,
  paste_masks (one launch) vs
  torchvision.models.detection.roi_heads.paste_masks_in_image (a Python loop
  with an interpolate, a zeros and a copy per mask, and host syncs); and the
  thresholded bool form vs torchvision's result ``> 0.5``.
* ``mask_targets``: 512 positive RoIs against 20 uint8 GT masks at 800x1216,
  M = 28: mask_targets (reads the uint8 masks) vs
  torchvision's project_masks_on_boxes (a float copy of every GT mask, then
  roi_align). The extra-memory column shows the float copy. And the same
  for two images passed as lists (maskrcnn_loss' form): one launch over the
  concatenated uint8 GT masks vs torchvision's per-image loop.

GB/s counts the output written plus, for the mask targets, 4 bytes read per
bilinear sample (as if uncached). Targets: pasting >= 20x, mask targets >= 5x.
"""
from __future__ import annotations

import functools

import torch

from segops.ops.masks import mask_targets, paste_masks

from .cases import Case, Step, run_cases, shared
from .harness import Record, peak_extra_memory, time_ms

IMAGE = (800, 1216)
PASTE_MASKS = 100
MASK_SIZE = 28
TARGET_ROIS = 512
GT_MASKS = 20
M = 28
THRESHOLD = 0.5
DEVICE = "cuda"  # the smoke test runs this module on CPU at tiny sizes
PROVIDERS = ["segops", "torchvision"]
PASTE_TARGET = 20.0
TARGETS_TARGET = 5.0


def make_boxes(count: int, seed: int) -> torch.Tensor:
    """Boxes with log-uniform sides from 16 to 512 pixels (clipped to the
    image's size), spread over the image, as detections are."""
    height, width = IMAGE  # read at call time: the smoke test shrinks it
    generator = torch.Generator().manual_seed(seed)
    sides = torch.exp(torch.empty(count, 2).uniform_(2.77, 6.24, generator=generator))
    sides = torch.minimum(sides, torch.tensor([width, height], dtype=torch.float32))
    corner = torch.rand(count, 2, generator=generator) * torch.tensor([width, height])
    return torch.cat([corner, corner + sides], 1).to(DEVICE)


def _paste_inputs():
    return (torch.rand(PASTE_MASKS, 1, MASK_SIZE, MASK_SIZE, device=DEVICE),
            make_boxes(PASTE_MASKS, 0))


def _paste_setup(direction, provider) -> Step:
    """One paste of the masks into the image: float (``direction`` 'float')
    or thresholded to bool ('bool'; torchvision: its float result > 0.5)."""
    from torchvision.models.detection.roi_heads import paste_masks_in_image
    masks, boxes = shared(("paste", PASTE_MASKS, MASK_SIZE, IMAGE, DEVICE), _paste_inputs)
    threshold, itemsize = (None, 4) if direction == "float" else (THRESHOLD, 1)

    def ours():
        return paste_masks(masks, boxes, IMAGE, threshold=threshold)

    def theirs():
        pasted = paste_masks_in_image(masks, boxes, IMAGE)
        return pasted if threshold is None else pasted > threshold
    fn = ours if provider == "segops" else theirs
    return Step(fn, nbytes=PASTE_MASKS * IMAGE[0] * IMAGE[1] * itemsize)


def _target_inputs():
    height, width = IMAGE
    generator = torch.Generator().manual_seed(1)
    gt = (torch.rand(GT_MASKS, height, width, generator=generator) > 0.5).to(torch.uint8)
    gt = gt.to(DEVICE)
    rois = make_boxes(TARGET_ROIS, 2)
    idx = torch.randint(0, GT_MASKS, (TARGET_ROIS,), generator=generator).to(DEVICE)
    sides = (rois[:, 2:] - rois[:, :2]).clamp(min=1.0)
    samples = float(torch.ceil(sides / M).prod(1).sum()) * M * M
    nbytes = TARGET_ROIS * M * M * 4 + 4 * samples
    # two images as maskrcnn_loss passes them (lists)
    two = ([gt, gt.clone()], [rois, rois.flip(0)], [idx, idx.flip(0)])
    return gt, rois, idx, two, nbytes


def _target_setup(images, provider) -> Step:
    """One computation of the mask targets: one image (segops: mask_targets
    on the uint8 masks; torchvision: project_masks_on_boxes) or two images as
    lists (segops: one launch over the concatenated masks; torchvision: its loop)."""
    from torchvision.models.detection.roi_heads import project_masks_on_boxes
    gt, rois, idx, (gts, rois2, idxs), nbytes = shared(
        ("targets", GT_MASKS, TARGET_ROIS, M, IMAGE, DEVICE), _target_inputs)
    if images == 1:
        fn = {"segops": lambda: mask_targets(gt, rois, idx, M),
              "torchvision": lambda: project_masks_on_boxes(gt, rois, idx, M)}[provider]
    else:
        fn = {"segops": lambda: mask_targets(gts, rois2, idxs, M),
              "torchvision": lambda: torch.cat([project_masks_on_boxes(*one, M)
                                                for one in zip(gts, rois2, idxs)])}[provider]
    return Step(fn, nbytes=images * nbytes)


def cases(quick: bool = False) -> list[Case]:
    """Pasting (float; bool too unless quick), mask targets (one image; two
    as lists too unless quick); segops and torchvision each."""
    height, width = IMAGE
    out = []
    for direction in ("float",) if quick else ("float", "bool"):
        out += [Case("masks", "paste_masks", f"{PASTE_MASKS}x{MASK_SIZE}^2 -> {height}x{width}",
                     "float32", "nchw", direction, provider,
                     functools.partial(_paste_setup, direction, provider), target=PASTE_TARGET)
                for provider in PROVIDERS]
    shape = f"{TARGET_ROIS} rois, {GT_MASKS}x{height}x{width} u8, M={M}"
    for images in (1,) if quick else (1, 2):
        prefix = "" if images == 1 else f"{images} images x "
        out += [Case("masks", "mask_targets", prefix + shape, "float32", "nchw", "fwd", provider,
                     functools.partial(_target_setup, images, provider), target=TARGETS_TARGET)
                for provider in PROVIDERS]
    return out


def run(quick: bool = False) -> list[Record]:
    return run_cases(cases(quick), timer=time_ms, memory=peak_extra_memory)
