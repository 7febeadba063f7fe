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
"""
from __future__ import annotations

import torch

import segops.ops.boxes as box_ops

from .harness import Record, peak_extra_memory, time_ms

IMAGE = (800, 1216)
RPN_IMAGES = [2, 8]
RPN_LEVELS = 5
RPN_PER_LEVEL = 1000
BOX_HEAD = (1000, 90)  # proposals, classes
SCORE_THRESH = 0.05
DECODE_ROWS = 1000
DEVICE = "cuda"  # the smoke test runs this module on CPU at tiny sizes


def _boxes(n: int, generator: torch.Generator) -> torch.Tensor:
    """Boxes with log-uniform sides from 16 to 512 pixels over the image."""
    sides = torch.exp(torch.empty(n, 2).uniform_(2.77, 6.24, generator=generator))
    corner = torch.rand(n, 2, generator=generator) * torch.tensor(IMAGE[::-1], dtype=torch.float32)
    return torch.cat([corner, corner + sides], 1)


def _record(op, shape, provider, fn) -> Record:
    return Record(op=op, shape=shape, dtype="float32", direction="fwd", provider=provider,
                  ms=time_ms(fn), extra_memory_mb=peak_extra_memory(fn) / 2**20)


def _nms_records(op_shape, boxes, scores, idxs, image_ids, images, threshold, cap):
    import torchvision

    def ours():
        return box_ops.batched_nms_per_image(boxes, scores, idxs, image_ids, threshold, cap,
                                             num_images=images)

    rows = [torch.nonzero(image_ids == i).flatten() for i in range(images)]

    def theirs():
        return [r[torchvision.ops.batched_nms(boxes[r], scores[r], idxs[r], threshold)][:cap]
                for r in rows]

    return [_record("batched_nms", op_shape, "segops", ours),
            _record("batched_nms", op_shape, "torchvision", theirs)]


def _rpn(images: int, generator) -> list[Record]:
    n = images * RPN_LEVELS * RPN_PER_LEVEL
    boxes = _boxes(n, generator).to(DEVICE)
    scores = torch.rand(n, generator=generator).to(DEVICE)
    levels = torch.arange(RPN_LEVELS).repeat_interleave(RPN_PER_LEVEL).repeat(images)
    image_ids = torch.arange(images).repeat_interleave(RPN_LEVELS * RPN_PER_LEVEL)
    shape = f"rpn {images}x{RPN_LEVELS}x{RPN_PER_LEVEL}"
    return _nms_records(shape, boxes, scores, levels.to(DEVICE), image_ids.to(DEVICE), images,
                        0.7, 1000)


def _box_head(generator) -> list[Record]:
    proposals, classes = BOX_HEAD
    logits = torch.randn(proposals, classes + 1, generator=generator) * 3
    probs = torch.softmax(logits, -1)[:, 1:]
    keep = probs > SCORE_THRESH
    rows, cls = torch.nonzero(keep, as_tuple=True)
    boxes = _boxes(proposals, generator)[rows] + torch.randn(len(rows), 4, generator=generator)
    boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    scores = probs[keep]
    image_ids = torch.zeros(len(rows), dtype=torch.int64)
    shape = f"box head {proposals}x{classes} ({len(rows)} > {SCORE_THRESH})"
    return _nms_records(shape, boxes.to(DEVICE), scores.to(DEVICE), cls.to(DEVICE),
                        image_ids.to(DEVICE), 1, 0.5, 100)


def _decode(generator) -> list[Record]:
    from torchvision.models.detection._utils import BoxCoder
    from torchvision.ops import clip_boxes_to_image
    classes = BOX_HEAD[1] + 1
    codes = torch.randn(DECODE_ROWS, 4 * classes, generator=generator).to(DEVICE)
    boxes = _boxes(DECODE_ROWS, generator).to(DEVICE)
    weights = (10.0, 10.0, 5.0, 5.0)
    coder = BoxCoder(weights)
    shape = f"{DECODE_ROWS}x{classes}"
    records = [
        _record("decode_boxes", shape, "segops",
                lambda: box_ops.decode_boxes(codes, boxes, weights)),
        _record("decode_boxes", shape, "torchvision", lambda: coder.decode_single(codes, boxes)),
        _record("decode_boxes", shape + " +clip", "segops",
                lambda: box_ops.decode_boxes(codes, boxes, weights, image_size=IMAGE)),
        _record("decode_boxes", shape + " +clip", "torchvision",
                lambda: clip_boxes_to_image(coder.decode_single(codes, boxes), IMAGE)),
    ]
    return records


def run(quick: bool = False) -> list[Record]:
    generator = torch.Generator().manual_seed(0)
    records = []
    for images in RPN_IMAGES[:1] if quick else RPN_IMAGES:
        records += _rpn(images, generator)
    records += _box_head(generator)
    records += _decode(generator)
    return records
