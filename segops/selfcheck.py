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
from .ops.conv import atrous_conv2d
from .ops.conv_transpose import conv_transpose2d
from .ops.roi_align import roi_align
from .reference import conv as conv_reference
from .reference import conv_transpose as conv_transpose_reference
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
        x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
        w = torch.randn(3, 4, k, k, dtype=torch.float64)
        out = conv_transpose2d(x.to(device), w.to(device), None, s, p, op)
        want = conv_transpose_reference.conv_transpose2d(x, w, None, [s, s], [p, p], [op, op],
                                                         [1, 1], 1)
        errors.append(_max_error(out, want))
    return max(errors)


CHECKS = {
    "overlap_sums (fwd+bwd)": _check_overlap,
    "confusion_matrix": _check_confusion,
    "roi_align (fwd+bwd)": _check_roi_align,
    "atrous_conv2d (fwd+bwd)": _check_conv,
    "conv_transpose2d (fwd)": _check_conv_transpose,
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
