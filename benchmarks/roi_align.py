"""RoIAlign benchmarks against torchvision.ops at Mask R-CNN's shapes
(DESIGN.md): 4 FPN levels of 256 channels for 2 images of 800x1216, a box
head (1000 RoIs, 7x7) and mask heads (100 and 512 RoIs, 14x14), sampling
ratio 2.

* ``roi_align``: one level (stride 8), segops vs torchvision.ops.roi_align.
* ``multi_scale``: all levels, segops.nn.MultiScaleRoIAlign (one launch) vs
  torchvision.ops.MultiScaleRoIAlign (one launch and an index_put per level).
* directions: ``fwd``, ``fwd+bwd`` (atomic backward), ``fwd+bwd det``
  (under torch.use_deterministic_algorithms: segops' gather kernel vs
  torchvision's fallback, which materialises every sample and may run out
  of memory; then the row is left out and a line says so).

torchvision has no bf16 kernel: its bf16 rows cast the features to fp32 and
the result back, which is what a bf16 model has to do. GB/s counts the
bilinear samples read (4 per sample, as if uncached) and the output written.
"""
from __future__ import annotations

import itertools

import torch

import segops
from segops._dispatch import deterministic_algorithms

from .harness import Record, forward_backward, peak_extra_memory, time_ms

IMAGE = (800, 1216)
LEVELS = [(200, 304), (100, 152), (50, 76), (25, 38)]
CHANNELS = 256
IMAGES = 2
# (name, number of RoIs, output size)
HEADS = [("box", 1000, 7), ("mask", 100, 14), ("mask", 512, 14)]
QUICK_HEADS = HEADS[:1] + HEADS[2:]
SAMPLING_RATIO = 2
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
QUICK_DTYPES = [torch.float32, torch.bfloat16]
DEVICE = "cuda"  # the smoke test runs this module on CPU at tiny sizes


def make_boxes(num_rois: int) -> list[torch.Tensor]:
    """Boxes with log-uniform sides from 16 to 512 pixels, spread over the
    images, as a region proposal network's top proposals are."""
    images, size = IMAGES, IMAGE  # read at call time: the smoke test shrinks them
    generator = torch.Generator().manual_seed(num_rois)
    per_image = [num_rois // images + (i < num_rois % images) for i in range(images)]
    boxes = []
    for count in per_image:
        sides = torch.exp(torch.empty(count, 2).uniform_(2.77, 6.24, generator=generator))
        corner = torch.rand(count, 2, generator=generator) * torch.tensor(size[::-1])
        boxes.append(torch.cat([corner, corner + sides], 1).to(DEVICE))
    return boxes


def make_features(dtype, channels_last: bool):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return {f"p{i}": torch.randn(IMAGES, CHANNELS, h, w, device=DEVICE, dtype=dtype)
            .contiguous(memory_format=fmt) for i, (h, w) in enumerate(LEVELS)}


def _torchvision_providers(dtype):
    """(roi_align, MultiScaleRoIAlign factory) from torchvision, with the fp32
    cast torchvision needs for bf16."""
    import torchvision

    def roi_align(x, boxes, size, scale):
        if dtype == torch.bfloat16:
            return torchvision.ops.roi_align(x.float(), boxes, size, scale,
                                             SAMPLING_RATIO).to(dtype)
        return torchvision.ops.roi_align(x, boxes, size, scale, SAMPLING_RATIO)

    def multi_scale(size):
        module = torchvision.ops.MultiScaleRoIAlign(list(_names()), size, SAMPLING_RATIO)
        if dtype != torch.bfloat16:
            return module
        return lambda feats, boxes, shapes: module(
            {k: v.float() for k, v in feats.items()}, boxes, shapes).to(dtype)

    return roi_align, multi_scale


def _names():
    return [f"p{i}" for i in range(len(LEVELS))]


def _bytes(out_numel: int, samples_per_bin: int, itemsize: int) -> int:
    return out_numel * itemsize * (1 + 4 * samples_per_bin)


def _measure(op, shape, dtype, direction, provider, fn, nbytes) -> Record | None:
    try:
        ms = time_ms(fn)
        extra = peak_extra_memory(fn) / 2**20
    except torch.OutOfMemoryError:
        print(f"  {provider} {op} {shape} {direction}: out of memory, left out")
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        return None
    return Record(op=op, shape=shape, dtype=str(dtype).replace("torch.", ""),
                  direction=direction, provider=provider, ms=ms, gbs=nbytes / ms / 1e6,
                  extra_memory_mb=extra)


def _directions(quick: bool):
    directions = [("fwd", False, False), ("fwd+bwd", True, False)]
    if not quick:
        directions.append(("fwd+bwd det", True, True))
    return directions


def _step(fn, leaves, backward: bool, deterministic: bool):
    step = forward_backward(fn, leaves, backward)

    def run():
        with deterministic_algorithms(deterministic):
            step()
    return run


def _cases(quick: bool):
    heads = QUICK_HEADS if quick else HEADS
    layouts = (True,) if quick else (False, True)
    return itertools.product(heads, QUICK_DTYPES if quick else DTYPES, layouts)


def run(quick: bool = False) -> list[Record]:
    records = []
    for (head, num_rois, size), dtype, channels_last in _cases(quick):
        feats = make_features(dtype, channels_last)
        boxes = make_boxes(num_rois)
        shapes = [IMAGE] * IMAGES
        tv_roi_align, tv_multi_scale = _torchvision_providers(dtype)
        ours_multi_scale = segops.nn.MultiScaleRoIAlign(_names(), size, SAMPLING_RATIO)
        theirs_multi_scale = tv_multi_scale(size)
        level = feats["p1"]
        shape = f"{head} {num_rois}x{CHANNELS}x{size}^2" + (" cl" if channels_last else "")
        itemsize = level.element_size()
        nbytes = _bytes(num_rois * CHANNELS * size * size, SAMPLING_RATIO ** 2, itemsize)
        for direction, backward, deterministic in _directions(quick):
            for leaf in feats.values():
                leaf.requires_grad_(backward)
            single = {
                "segops": lambda: segops.ops.roi_align(level, boxes, size, 1 / 8, SAMPLING_RATIO),
                "torchvision": lambda: tv_roi_align(level, boxes, size, 1 / 8),
            }
            multi = {
                "segops": lambda: ours_multi_scale(feats, boxes, shapes),
                "torchvision": lambda: theirs_multi_scale(feats, boxes, shapes),
            }
            for op, providers, leaves in (("roi_align", single, [level]),
                                          ("multi_scale", multi, list(feats.values()))):
                for provider, fn in providers.items():
                    record = _measure(op, shape, dtype, direction, provider,
                                      _step(fn, leaves, backward, deterministic), nbytes)
                    if record is not None:
                        records.append(record)
        del feats, level
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return records
