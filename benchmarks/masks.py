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
bilinear sample (as if uncached).
"""
from __future__ import annotations

import torch

from segops.ops.masks import mask_targets, paste_masks

from .harness import Record, peak_extra_memory, time_ms

IMAGE = (800, 1216)
PASTE_MASKS = 100
MASK_SIZE = 28
TARGET_ROIS = 512
GT_MASKS = 20
M = 28
THRESHOLD = 0.5
DEVICE = "cuda"  # the smoke test runs this module on CPU at tiny sizes


def make_boxes(count: int, seed: int) -> torch.Tensor:
    """Boxes with log-uniform sides from 16 to 512 pixels (clipped to the
    image's size), spread over the image, as detections are."""
    height, width = IMAGE  # read at call time: the smoke test shrinks it
    generator = torch.Generator().manual_seed(seed)
    sides = torch.exp(torch.empty(count, 2).uniform_(2.77, 6.24, generator=generator))
    sides = torch.minimum(sides, torch.tensor([width, height], dtype=torch.float32))
    corner = torch.rand(count, 2, generator=generator) * torch.tensor([width, height])
    return torch.cat([corner, corner + sides], 1).to(DEVICE)


def _record(op, shape, direction, provider, fn, nbytes) -> Record:
    ms = time_ms(fn)
    return Record(op=op, shape=shape, dtype="float32", direction=direction, provider=provider,
                  ms=ms, gbs=nbytes / ms / 1e6, extra_memory_mb=peak_extra_memory(fn) / 2**20)


def _paste_records(quick: bool) -> list[Record]:
    from torchvision.models.detection.roi_heads import paste_masks_in_image
    height, width = IMAGE
    masks = torch.rand(PASTE_MASKS, 1, MASK_SIZE, MASK_SIZE, device=DEVICE)
    boxes = make_boxes(PASTE_MASKS, 0)
    shape = f"{PASTE_MASKS}x{MASK_SIZE}^2 -> {height}x{width}"
    pixels = PASTE_MASKS * height * width
    records = []
    variants = [("float", None, 4)] + ([] if quick else [("bool", THRESHOLD, 1)])
    for direction, threshold, itemsize in variants:
        providers = {
            "segops": lambda t=threshold: paste_masks(masks, boxes, IMAGE,
                                                                 threshold=t),
            "torchvision": (lambda: paste_masks_in_image(masks, boxes, IMAGE)) if threshold
            is None else (lambda t=threshold: paste_masks_in_image(masks, boxes, IMAGE) > t),
        }
        for provider, fn in providers.items():
            records.append(_record("paste_masks", shape, direction, provider, fn,
                                   pixels * itemsize))
    return records


def _target_records(quick: bool) -> list[Record]:
    from torchvision.models.detection.roi_heads import project_masks_on_boxes
    height, width = IMAGE
    generator = torch.Generator().manual_seed(1)
    gt = (torch.rand(GT_MASKS, height, width, generator=generator) > 0.5).to(torch.uint8)
    gt = gt.to(DEVICE)
    rois = make_boxes(TARGET_ROIS, 2)
    idx = torch.randint(0, GT_MASKS, (TARGET_ROIS,), generator=generator).to(DEVICE)
    sides = (rois[:, 2:] - rois[:, :2]).clamp(min=1.0)
    samples = float(torch.ceil(sides / M).prod(1).sum()) * M * M
    nbytes = TARGET_ROIS * M * M * 4 + 4 * samples
    shape = f"{TARGET_ROIS} rois, {GT_MASKS}x{height}x{width} u8, M={M}"
    providers = {
        "segops": lambda: mask_targets(gt, rois, idx, M),
        "torchvision": lambda: project_masks_on_boxes(gt, rois, idx, M),
    }
    records = [_record("mask_targets", shape, "fwd", provider, fn, nbytes)
               for provider, fn in providers.items()]
    if quick:
        return records
    # two images as maskrcnn_loss passes them (lists): segops' one launch over
    # the concatenated GT masks vs torchvision's loop
    gts, rois2, idxs = [gt, gt.clone()], [rois, rois.flip(0)], [idx, idx.flip(0)]
    providers = {
        "segops": lambda: mask_targets(gts, rois2, idxs, M),
        "torchvision": lambda: torch.cat([project_masks_on_boxes(*one, M)
                                          for one in zip(gts, rois2, idxs)]),
    }
    return records + [_record("mask_targets", "2 images x " + shape, "fwd", provider, fn,
                              2 * nbytes) for provider, fn in providers.items()]


def run(quick: bool = False) -> list[Record]:
    records = _paste_records(quick) + _target_records(quick)
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return records
