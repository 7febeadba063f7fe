"""Box-op benchmarks against torchvision as Mask R-CNN calls it (DESIGN.md).

* ``batched_nms`` RPN: 2 and 8 images x 5 levels x 1 000 boxes, NMS 0.7
  per (image, level): segops.ops.batched_nms_per_image (one call, one
  sync) vs torchvision.ops.batched_nms called per image (as the RPN does).
* ``batched_nms`` box head: 1 000 proposals x 90 classes per image (90 000
  candidates, scores from a softmax so that few pass 0.05, as
  postprocess_detections filters them), NMS 0.5, 100 per image.
* ``decode_boxes``: 1 000 proposals x 91 classes, weights (10, 10, 5, 5),
  vs BoxCoder.decode_single (and clipped, vs decode + clip_boxes_to_image).

Rows report milliseconds and extra memory; speedup is torchvision / segops.
Target: batched NMS >= 3x (decoding has none).
"""
from __future__ import annotations

import functools

import torch

import segops.ops.boxes as box_ops

from .cases import Case, Step, run_cases, shared
from .harness import Record, peak_extra_memory, time_ms

IMAGE = (800, 1216)
RPN_IMAGES = [2, 8]
RPN_LEVELS = 5
RPN_PER_LEVEL = 1000
BOX_HEAD = (1000, 90)  # proposals, classes
SCORE_THRESH = 0.05
DECODE_ROWS = 1000
DEVICE = "cuda"  # the smoke test runs this module on CPU at tiny sizes
PROVIDERS = ["segops", "torchvision"]
NMS_TARGET = 3.0


def _boxes(n: int, generator: torch.Generator) -> torch.Tensor:
    """Boxes with log-uniform sides from 16 to 512 pixels over the image."""
    sides = torch.exp(torch.empty(n, 2).uniform_(2.77, 6.24, generator=generator))
    corner = torch.rand(n, 2, generator=generator) * torch.tensor(IMAGE[::-1], dtype=torch.float32)
    return torch.cat([corner, corner + sides], 1)


def _nms_calls(boxes, scores, idxs, image_ids, images, threshold, cap) -> dict:
    """segops' one batch-wide call and torchvision's per-image loop."""
    import torchvision

    def ours():
        return box_ops.batched_nms_per_image(boxes, scores, idxs, image_ids, threshold, cap,
                                             num_images=images)

    rows = [torch.nonzero(image_ids == i).flatten() for i in range(images)]

    def theirs():
        return [r[torchvision.ops.batched_nms(boxes[r], scores[r], idxs[r], threshold)][:cap]
                for r in rows]

    return {"segops": ours, "torchvision": theirs}


def _rpn_inputs(images: int) -> dict:
    generator = torch.Generator().manual_seed(images)
    n = images * RPN_LEVELS * RPN_PER_LEVEL
    boxes = _boxes(n, generator).to(DEVICE)
    scores = torch.rand(n, generator=generator).to(DEVICE)
    levels = torch.arange(RPN_LEVELS).repeat_interleave(RPN_PER_LEVEL).repeat(images)
    image_ids = torch.arange(images).repeat_interleave(RPN_LEVELS * RPN_PER_LEVEL)
    return _nms_calls(boxes, scores, levels.to(DEVICE), image_ids.to(DEVICE), images, 0.7, 1000)


def _box_head_inputs() -> dict:
    proposals, classes = BOX_HEAD
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(proposals, classes + 1, generator=generator) * 3
    probs = torch.softmax(logits, -1)[:, 1:]
    keep = probs > SCORE_THRESH
    rows, cls = torch.nonzero(keep, as_tuple=True)
    boxes = _boxes(proposals, generator)[rows] + torch.randn(len(rows), 4, generator=generator)
    boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    image_ids = torch.zeros(len(rows), dtype=torch.int64)
    calls = _nms_calls(boxes.to(DEVICE), probs[keep].to(DEVICE), cls.to(DEVICE),
                       image_ids.to(DEVICE), 1, 0.5, 100)
    return {**calls, "info": {"candidates": len(rows)}}


def _decode_inputs() -> dict:
    from torchvision.models.detection._utils import BoxCoder
    from torchvision.ops import clip_boxes_to_image
    generator = torch.Generator().manual_seed(2)
    classes = BOX_HEAD[1] + 1
    codes = torch.randn(DECODE_ROWS, 4 * classes, generator=generator).to(DEVICE)
    boxes = _boxes(DECODE_ROWS, generator).to(DEVICE)
    weights = (10.0, 10.0, 5.0, 5.0)
    coder = BoxCoder(weights)
    return {
        ("", "segops"): lambda: box_ops.decode_boxes(codes, boxes, weights),
        ("", "torchvision"): lambda: coder.decode_single(codes, boxes),
        (" +clip", "segops"): lambda: box_ops.decode_boxes(codes, boxes, weights,
                                                           image_size=IMAGE),
        (" +clip", "torchvision"): lambda: clip_boxes_to_image(coder.decode_single(codes, boxes),
                                                               IMAGE),
    }


def _nms_setup(kind, images, provider) -> Step:
    """One NMS call (segops: the whole batch; torchvision: one per image)."""
    if kind == "rpn":
        calls = shared(("boxes rpn", images, RPN_LEVELS, RPN_PER_LEVEL, IMAGE, DEVICE),
                       lambda: _rpn_inputs(images))
    else:
        calls = shared(("boxes head", BOX_HEAD, IMAGE, DEVICE), _box_head_inputs)
    return Step(calls[provider], info=dict(calls.get("info", {})))


def _decode_setup(variant, provider) -> Step:
    """One decode (and clip) of DECODE_ROWS proposals x all classes."""
    calls = shared(("boxes decode", DECODE_ROWS, BOX_HEAD, IMAGE, DEVICE), _decode_inputs)
    return Step(calls[(variant, provider)])


def _case(op, shape, setup, target=None) -> list[Case]:
    return [Case("boxes", op, shape, "float32", "rows", "fwd", provider,
                 functools.partial(setup, provider), target=target) for provider in PROVIDERS]


def cases(quick: bool = False) -> list[Case]:
    """RPN NMS per image count (quick: 2 images), the box head's NMS, decoding
    with and without the clip; segops and torchvision each."""
    out = []
    for images in RPN_IMAGES[:1] if quick else RPN_IMAGES:
        out += _case("batched_nms", f"rpn {images}x{RPN_LEVELS}x{RPN_PER_LEVEL}",
                     functools.partial(_nms_setup, "rpn", images), NMS_TARGET)
    proposals, classes = BOX_HEAD
    out += _case("batched_nms", f"box head {proposals}x{classes} > {SCORE_THRESH}",
                 functools.partial(_nms_setup, "head", 1), NMS_TARGET)
    for variant in ("", " +clip"):
        out += _case("decode_boxes", f"{DECODE_ROWS}x{classes + 1}{variant}",
                     functools.partial(_decode_setup, variant))
    return out


def run(quick: bool = False) -> list[Record]:
    return run_cases(cases(quick), timer=time_ms, memory=peak_extra_memory)
