"""Tiny kernel-vs-reference comparisons, one per op, for `segops check`.

Run as ``python -m segops.selfcheck``. Without a GPU the kernels only run
under Triton's interpreter, so `segops check` starts this module in a child
process with TRITON_INTERPRET=1 set before triton is imported.
"""
from __future__ import annotations

import sys
import warnings

import torch

from . import _dispatch
from .ops import overlap
from .ops.boxes import (DEFAULT_BBOX_XFORM_CLIP, batched_nms, box_iou, clip_boxes_to_image,
                        decode_boxes)
from .ops.conv import atrous_conv2d
from .ops.conv_transpose import conv_transpose2d
from .ops.masks import mask_targets, paste_masks
from .ops.roi_align import roi_align
from .reference import boxes as boxes_reference
from .reference import conv as conv_reference
from .reference import conv_transpose as conv_transpose_reference
from .reference import masks as masks_reference
from .reference import overlap as overlap_reference
from .reference import roi_align as roi_align_reference


def _max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double().cpu() - expected.double().cpu()).abs().max().item()


def _check_overlap(device) -> float:
    x = torch.randn(2, 4, 9, 11, dtype=torch.float64)
    t = torch.randint(0, 4, (2, 9, 11))
    xd = x.to(device).requires_grad_()
    sums = overlap.overlap_sums(xd, t.to(device), ignore_index=None)
    grad_out = torch.randn_like(sums)
    (grad,) = torch.autograd.grad(sums, xd, grad_out)
    want = overlap_reference.overlap_sums(x, t, "softmax", None, False)
    want_grad = overlap_reference.overlap_sums_backward(grad_out[0].cpu(), grad_out[1].cpu(),
                                                        x, t, "softmax", None, False)
    return max(_max_error(sums, want), _max_error(grad, want_grad))


def _check_confusion(device) -> float:
    x = torch.randn(2, 5, 7, 13, dtype=torch.float64)
    t = torch.randint(0, 5, (2, 7, 13))
    cm = overlap.confusion_matrix(x.to(device), t.to(device), 5)
    return _max_error(cm, overlap_reference.confusion_matrix(x, t, 5, None))


def _check_roi_align(device) -> float:
    x = torch.randn(2, 3, 8, 9, dtype=torch.float64)
    rois = torch.tensor([[0, -1.5, 0.5, 6.2, 7.9], [1, 2.0, 1.0, 12.0, 4.5],
                         [1, 3.3, 3.3, 3.3, 3.3]], dtype=torch.float64)
    xd = x.to(device).requires_grad_()
    out = roi_align(xd, rois.to(device), (2, 3), 1.0, -1, True)
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, xd, grad_out)
    args = ([x], rois, None, [1.0], 2, 3, -1, True, "avg")
    want = roi_align_reference.roi_align(*args)
    (want_grad,) = roi_align_reference.roi_align_backward(grad_out.cpu(), *args)
    return max(_max_error(out, want), _max_error(grad, want_grad))


def _check_conv(device) -> float:
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64)
    xd, wd = x.to(device).requires_grad_(), w.to(device).requires_grad_()
    out = atrous_conv2d(xd, wd, b.to(device), stride=(2, 1), padding=2, dilation=2)
    grad_out = torch.randn_like(out)
    grad_x, grad_w = torch.autograd.grad(out, (xd, wd), grad_out)
    geometry = ([2, 1], [2, 2, 2, 2], [2, 2], 1)
    g = grad_out.cpu()
    return max(_max_error(out, conv_reference.conv2d(x, w, b, *geometry)),
               _max_error(grad_x, conv_reference.conv2d_grad_input(g, w, (9, 8), *geometry)),
               _max_error(grad_w, conv_reference.conv2d_grad_weight(g, x, w.shape, *geometry)))


def _check_conv_transpose(device) -> float:
    errors = []
    for k, s, p, op in ((2, 2, 0, 0), (3, 2, 1, 1)):  # one GEMM; residue gather
        x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
        w = torch.randn(3, 4, k, k, dtype=torch.float64, requires_grad=True)
        xd, wd = x.detach().to(device).requires_grad_(), w.detach().to(device).requires_grad_()
        out = conv_transpose2d(xd, wd, None, s, p, op)
        grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, (xd, wd), grad_out)
        # the reference is made of differentiable torch ops: autograd gives its gradients
        want = conv_transpose_reference.conv_transpose2d(x, w, None, [s, s], [p, p], [op, op],
                                                         [1, 1], 1)
        want_grads = torch.autograd.grad(want, (x, w), grad_out.cpu())
        errors += [_max_error(out, want)] + [_max_error(a, b) for a, b in zip(grads, want_grads)]
    return max(errors)


def _check_boxes(device) -> float:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [20.0, 5.0, 30.0, 9.0],
                          [-3.0, 2.0, 4.5, 40.0], [21.0, 5.5, 29.0, 9.0]], dtype=torch.float64)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.95], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 0, 1])
    codes = torch.randn(5, 8, dtype=torch.float64)
    on = (boxes.to(device), scores.to(device), labels.to(device))
    kept = batched_nms(*on, 0.5).cpu()
    want_kept = boxes_reference.batched_nms(boxes, scores, labels, 0.5)
    return max(_max_error(box_iou(on[0], on[0]), boxes_reference.box_iou(boxes, boxes)),
               _max_error(clip_boxes_to_image(on[0], (8, 25)),
                          boxes_reference.clip_boxes(boxes, 8, 25)),
               _max_error(decode_boxes(codes.to(device), on[0], (10.0, 10.0, 5.0, 5.0)),
                          boxes_reference.decode_boxes(codes, boxes, (10.0, 10.0, 5.0, 5.0),
                                                       DEFAULT_BBOX_XFORM_CLIP)),
               0.0 if torch.equal(kept, want_kept) else float("inf"))


def _check_masks(device) -> float:
    masks = torch.rand(3, 1, 7, 7, dtype=torch.float64)
    boxes = torch.tensor([[1.2, 0.5, 9.7, 6.1], [-2.0, 3.0, 4.0, 14.0], [6.0, 6.0, 6.5, 6.5]],
                         dtype=torch.float64)
    pasted = paste_masks(masks.to(device), boxes.to(device), (12, 10))
    gt = (torch.rand(2, 15, 13) > 0.5).to(torch.uint8)
    matched = torch.tensor([1, 0, 1])
    targets = mask_targets(gt.to(device), boxes.to(device), matched.to(device), 5)
    return max(_max_error(pasted, masks_reference.paste_masks(masks, boxes, 12, 10, 1, None)),
               _max_error(targets, masks_reference.mask_targets(gt, boxes, matched, 5,
                                                                targets.dtype)))


CHECKS = {
    "overlap_sums (fwd+bwd)": _check_overlap,
    "confusion_matrix": _check_confusion,
    "roi_align (fwd+bwd)": _check_roi_align,
    "atrous_conv2d (fwd+bwd)": _check_conv,
    "conv_transpose2d (fwd+bwd)": _check_conv_transpose,
    "box ops and batched_nms": _check_boxes,
    "paste_masks, mask_targets": _check_masks,
}


def run() -> bool:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    path = _dispatch.path_for(device)
    print(f"self-check on {device} ({path}), float64 vs reference")
    if path in (_dispatch.NATIVE, _dispatch.REFERENCE):
        print("  kernels are not active on this device: set TRITON_INTERPRET=1 or use a GPU")
        return False
    ok = True
    torch.manual_seed(0)
    for name, check in CHECKS.items():
        with warnings.catch_warnings():
            # the interpreter computes the masked-off lanes of a block too
            # (numpy's divide-by-zero there means nothing): not the user's concern
            warnings.filterwarnings("ignore", category=RuntimeWarning,
                                    module="triton.runtime.interpreter")
            error = check(device)
        passed = error <= 1e-9
        ok &= passed
        print(f"  {'ok  ' if passed else 'FAIL'} {name:<28} max abs error {error:.2e}")
    return ok


if __name__ == "__main__":
    sys.exit(0 if run() else 1)
