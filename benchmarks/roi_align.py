"""RoIAlign benchmarks against torchvision.ops at Mask R-CNN's shapes
(DESIGN.md): 4 FPN levels of 256 channels for 2 images of 800x1216, a box
head (1000 RoIs, 7x7) and mask heads (100 and 512 RoIs, 14x14), sampling
ratio 2.

* ``roi_align``: one level (stride 8), segops vs torchvision.ops.roi_align.
* ``multi_scale``: all levels, segops.nn.MultiScaleRoIAlign (one launch) vs
  torchvision.ops.MultiScaleRoIAlign (one launch and an index_put per level).
* heads: the box and mask heads above, and (bf16 channels_last, backward
  only; quick runs: segops' MultiScaleRoIAlign only) 2 000 and 10 000 RoIs
  per image: the gather kernel of the deterministic backward scans its
  image's RoIs per input tile, its cost against the atomic backward's is
  the pair of segops rows (DESIGN.md bounds it at 3x).
* directions: ``fwd``, ``fwd+bwd`` (atomic backward), ``fwd+bwd det``
  (under torch.use_deterministic_algorithms: segops' gather kernel vs
  torchvision's fallback, which materialises every sample and may run out
  of memory; then the row is left out and a line says so).

torchvision has no bf16 kernel: its bf16 rows cast the features to fp32 and
the result back, which is what a bf16 model has to do. Its fp16 kernel takes
fp16 boxes only and computes sample positions and weights in fp16: the same
work, less accurate (6.5e-2 relative RMS from segops' fp32-coordinate result
at these shapes, on the CPU). GB/s counts the
bilinear samples read (4 per sample, as if uncached) and the output written.
Targets: roi_align >= 2x (forward >= 2x and backward >= 3x make forward+backward
>= 2x too), MultiScaleRoIAlign >= 3x.
"""
from __future__ import annotations

import functools
import itertools

import torch

import segops
from segops._dispatch import deterministic_algorithms

from .cases import Case, Step, dtype_name, layout_name, run_cases, shared
from .harness import Record, forward_backward, peak_extra_memory, time_ms

IMAGE = (800, 1216)
LEVELS = [(200, 304), (100, 152), (50, 76), (25, 38)]
CHANNELS = 256
IMAGES = 2
# (name, number of RoIs, output size)
HEADS = [("box", 1000, 7), ("mask", 100, 14), ("mask", 512, 14)]
QUICK_HEADS = HEADS[:1] + HEADS[2:]
# 2 000 and 10 000 RoIs per image: the deterministic backward scans, for each
# input tile, the RoIs of its (level, image, row of tiles), so its cost grows
# with the RoIs per image; these rows bound it against the atomic backward
# (at 1c68c6d, when each tile scanned its whole (level, image), the H100 gave
# 3.5x and 5.4x the atomic fwd+bwd)
DENSE_HEADS = [("box", 4000, 7), ("box", 20000, 7)]
SAMPLING_RATIO = 2
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
QUICK_DTYPES = [torch.float32, torch.bfloat16]
DEVICE = "cuda"  # the smoke test runs this module on CPU at tiny sizes
OPS = ["roi_align", "multi_scale"]
PROVIDERS = ["segops", "torchvision"]
TARGETS = {"roi_align": 2.0, "multi_scale": 3.0}


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
    cast torchvision needs for bf16, and fp16 boxes for its fp16 kernel
    (which takes rois of the features' dtype only; segops takes the fp32
    boxes as they are)."""
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


def _boxes_for(provider: str, boxes: list[torch.Tensor], dtype) -> list[torch.Tensor]:
    """The boxes as ``provider`` takes them: torchvision's fp16 kernel needs
    fp16 rois (cast once, outside the timed call, as a fp16 model's
    proposals already are)."""
    if provider == "torchvision" and dtype == torch.float16:
        return [b.half() for b in boxes]
    return boxes


def _names():
    return [f"p{i}" for i in range(len(LEVELS))]


def _bytes(out_numel: int, samples_per_bin: int, itemsize: int) -> int:
    return out_numel * itemsize * (1 + 4 * samples_per_bin)


def _directions(quick: bool):
    directions = [("fwd", False, False), ("fwd+bwd", True, False)]
    if not quick:
        directions.append(("fwd+bwd det", True, True))
    return directions


def _step(fn, leaves, backward: bool, deterministic: bool):
    step = forward_backward(fn, leaves, backward)

    def run():
        with deterministic_algorithms(deterministic):
            return step()
    return run


def _inputs(head, dtype, channels_last):
    """The features, boxes and poolers one head x dtype x layout shares."""
    _, num_rois, size = head

    def make():
        tv_roi_align, tv_multi_scale = _torchvision_providers(dtype)
        return {"feats": make_features(dtype, channels_last), "boxes": make_boxes(num_rois),
                "shapes": [IMAGE] * IMAGES, "tv_roi_align": tv_roi_align,
                "ours_multi": segops.nn.MultiScaleRoIAlign(_names(), size, SAMPLING_RATIO),
                "theirs_multi": tv_multi_scale(size)}
    return shared(("roi_align", head, dtype, channels_last, DEVICE, IMAGE, tuple(LEVELS),
                   CHANNELS, IMAGES), make)


def _call(op, provider, inputs, size):
    """(the call, its leaves): one level (stride 8) or every level."""
    feats, shapes = inputs["feats"], inputs["shapes"]
    level = feats["p1"]
    boxes = _boxes_for(provider, inputs["boxes"], level.dtype)
    if op == "roi_align":
        if provider == "segops":
            return (lambda: segops.ops.roi_align(level, boxes, size, 1 / 8, SAMPLING_RATIO)), \
                [level]
        return (lambda: inputs["tv_roi_align"](level, boxes, size, 1 / 8)), [level]
    module = inputs["ours_multi" if provider == "segops" else "theirs_multi"]
    return (lambda: module(feats, boxes, shapes)), list(feats.values())


def _setup(head, dtype, channels_last, direction, op, provider) -> Step:
    """One call of ``provider``'s ``op`` in ``direction`` (forward; forward
    and atomic backward; forward and deterministic backward)."""
    _, num_rois, size = head
    inputs = _inputs(head, dtype, channels_last)
    _, backward, deterministic = next(d for d in _directions(False) if d[0] == direction)
    for leaf in inputs["feats"].values():
        leaf.requires_grad_(backward)
    fn, leaves = _call(op, provider, inputs, size)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return Step(_step(fn, leaves, backward, deterministic),
                nbytes=_bytes(num_rois * CHANNELS * size * size, SAMPLING_RATIO ** 2, itemsize))


def cases(quick: bool = False) -> list[Case]:
    """Every head x dtype x layout (quick: the box head and 512 mask RoIs,
    fp32 and bf16, channels_last) x pass x op x provider."""
    heads = QUICK_HEADS if quick else HEADS
    layouts = (True,) if quick else (False, True)
    out = []
    for head, dtype, channels_last in itertools.product(
            heads, QUICK_DTYPES if quick else DTYPES, layouts):
        out += _head_cases(head, dtype, channels_last, _directions(quick))
    for head in DENSE_HEADS:  # quick: segops' MultiScaleRoIAlign only
        out += _head_cases(head, torch.bfloat16, True, _directions(False)[1:],
                           OPS[1:] if quick else OPS, PROVIDERS[:1] if quick else PROVIDERS)
    return out


def _head_cases(head, dtype, channels_last, directions, ops=OPS,
                providers=PROVIDERS) -> list[Case]:
    name, num_rois, size = head
    shape = f"{name} {num_rois}x{CHANNELS}x{size}^2"
    return [Case("roi_align", op, shape, dtype_name(dtype), layout_name(channels_last),
                 direction, provider,
                 functools.partial(_setup, head, dtype, channels_last, direction, op, provider),
                 target=TARGETS[op])
            for (direction, _, _), op, provider in itertools.product(directions, ops, providers)]


def run(quick: bool = False) -> list[Record]:
    return run_cases(cases(quick), timer=time_ms, memory=peak_extra_memory)
