"""Fused IoU/Dice reductions: per-(sample, class) overlap sums, Dice and
Jaccard losses built on them, and the confusion matrix behind mIoU.

Conventions
-----------
* ``input``: scores ``(N, C, *spatial)`` with 1-3 spatial dims, float16,
  bfloat16, float32 (float64 on the reference path). Any memory format.
* ``target``: class indices ``(N, *spatial)`` (int64/int32/int16/int8/uint8),
  or a dense mask ``(N, C, *spatial)`` (binary, multilabel or soft labels, any
  real dtype). A target with as many dims as the input is dense.
* Sums accumulate in float32 whatever the input dtype (float64 for float64).
* ``ignore_index``: index targets: pixels with that label count in no sum.
  Dense targets: elements equal to it count in no sum (smp's convention).
  It is compared as ``target != ignore_index`` compares in torch (and so in
  smp and torchmetrics): converted to the target's dtype first, so -1 drops
  the 255s of a uint8 target. It must fit in int64.
* The target never receives a gradient.

Where the conventions of other libraries differ (all offered here):

===================  ========================  ==========================  ==========================
                     segmentation-models-pt    MONAI DiceLoss              torchmetrics
                     0.6 (the defaults here)
===================  ========================  ==========================  ==========================
intersection         sum(min(p, t))            sum(p * t)                  counts
                                               (``intersection='product'``)
smoothing            (I + s) / ((P+T)/2 + s)   (2I + nr) / (P + T + dr);   none (``zero_division``)
                                               nr = dr = 2 * ``smooth``
reduction axes       batch and space, per      space per sample            --
                     class (``batch=True``)    (``batch=False``)
empty classes        loss 0 where the target   no special case             0 (here: excluded from
                     has no pixel              (``skip_empty=False``)      macro means, NaN per class)
squared denominator  no                        ``squared_pred``            no
background           all classes               ``include_background``      ``ignore_index``
class weights        weighted mean             multiply, then mean          --
===================  ========================  ==========================  ==========================
"""
from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor
from torch._C._functorch import peek_interpreter_stack

from .. import _checks, _dispatch
from .._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    ArgumentError,
    ArgumentTypeError,
    accumulation_dtype,
    check_choice,
    check_int,
    check_number,
    check_same_device,
    check_tensor,
    refuse_forward_ad,
)
from ..reference import overlap as reference

MODES = ("binary", "multiclass", "multilabel")
ACTIVATIONS = ("softmax", "sigmoid", "none")
AVERAGES = ("micro", "macro", "weighted", "none")
INTERSECTIONS = ("product", "min")
REDUCTIONS = ("mean", "sum", "none")


def _kernels():
    # imported lazily: importing triton is slow and not needed on the
    # reference path
    from ..kernels import overlap as kernels
    return kernels


def _sums_dtype(input: Tensor) -> torch.dtype:
    return accumulation_dtype(input.dtype)


# --------------------------------------------------------------------------
# custom ops: segops::overlap_sums and its backward
# --------------------------------------------------------------------------
@torch.library.custom_op("segops::overlap_sums", mutates_args=())
def _overlap_sums(input: Tensor, target: Tensor, activation: str,
                  ignore_index: int | None, squared: bool, min_intersection: bool) -> Tensor:
    args = (input, target, activation, ignore_index, squared, min_intersection)
    if _dispatch.uses_kernel(input):
        return _kernels().overlap_sums_forward(*args)
    return reference.overlap_sums(*args)


@_overlap_sums.register_fake
def _(input, target, activation, ignore_index, squared, min_intersection):
    N, C = input.shape[:2]
    return input.new_empty((3, N, C), dtype=_sums_dtype(input))


@torch.library.custom_op("segops::overlap_sums_backward", mutates_args=())
def _overlap_sums_backward(grad_intersection: Tensor, grad_pred_sum: Tensor,
                           input: Tensor, target: Tensor, activation: str,
                           ignore_index: int | None, squared: bool,
                           min_intersection: bool) -> Tensor:
    args = (grad_intersection, grad_pred_sum, input, target, activation, ignore_index,
            squared, min_intersection)
    if _dispatch.uses_kernel(input):
        return _laid_out_like(_kernels().overlap_sums_backward(*args), input)
    return _laid_out_like(reference.overlap_sums_backward(*args), input)


@_overlap_sums_backward.register_fake
def _(grad_intersection, grad_pred_sum, input, target, activation, ignore_index, squared,
      min_intersection):
    return torch.empty_like(input)


def _laid_out_like(grad: Tensor, input: Tensor) -> Tensor:
    """``grad`` with the strides ``torch.empty_like(input)`` has, as the
    fake kernels promise (torch.compile reads the result with them): the
    reference's gradient is contiguous, the kernels' too when the input's
    spatial axes cannot be viewed as one; a copy only then."""
    # a dense input's empty_like has its strides (the common case, no
    # dispatcher call); a dense gradient cannot have a strided input's
    if grad.stride() == input.stride() or \
            grad.stride() == torch.empty_like(input, device="meta").stride():
        return grad
    return torch.empty_like(input, dtype=grad.dtype).copy_(grad)


def _composite_input_grad(forward, input: Tensor, grad: Tensor) -> Tensor:
    """The input gradient of ``forward(input)`` as a differentiable function
    of ``input`` and ``grad``, for a double backward: autograd over the
    pure-PyTorch reference, whose backward the kernels' reproduce (written
    out as autograd computes it). Runs only under ``create_graph=True`` (grad
    mode is on inside a backward only then): the backward custom ops have no
    derivative of their own, and torch would raise."""
    (grad_input,) = torch.autograd.grad(forward(input), input, grad, create_graph=True)
    return grad_input


def _overlap_sums_setup_context(ctx, inputs, output):
    input, target, *options = inputs
    ctx.save_for_backward(input, target)
    ctx.options = tuple(options)


def _overlap_sums_grad(ctx, grad):
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None, None
    input, target = ctx.saved_tensors
    grad = grad.to(_sums_dtype(input))
    if torch.is_grad_enabled():
        grad_input = _composite_input_grad(
            lambda x: reference.overlap_sums(x, target, *ctx.options), input, grad)
    else:
        grad_input = _overlap_sums_backward(
            grad[0].contiguous(), grad[1].contiguous(), input, target, *ctx.options)
    return grad_input, None, None, None, None, None


_overlap_sums.register_autograd(_overlap_sums_grad, setup_context=_overlap_sums_setup_context)


# --------------------------------------------------------------------------
# custom ops: segops::overlap_loss (sums and the reduced loss in two
# launches) and its backward
# --------------------------------------------------------------------------
# Arguments: input, target, then the sums' options (activation, ignore_index,
# squared, min_intersection), check_labels (flag index-target labels outside
# [0, C) with a device assert), then the loss's: counts (C,) how often each
# class is selected (None: all once), weights (C,) class weights (None: 1),
# kind ('dice' or 'jaccard'), smooth, eps, log_loss, skip_empty, batch, mean.
@torch.library.custom_op("segops::overlap_loss", mutates_args=())
def _fused_loss(input: Tensor, target: Tensor, activation: str, ignore_index: int | None,
                squared: bool, min_intersection: bool, check_labels: bool,
                counts: Tensor | None, weights: Tensor | None, kind: str, smooth: float,
                eps: float, log_loss: bool, skip_empty: bool, batch: bool,
                mean: bool) -> tuple[Tensor, Tensor]:
    sums_options = (activation, ignore_index, squared, min_intersection)
    options = (counts, weights, kind, smooth, eps, log_loss, skip_empty, batch, mean)
    if not _dispatch.uses_kernel(input):
        if check_labels:
            _check_labels("target", target, input.shape[1], ignore_index)
        sums = reference.overlap_sums(input, target, *sums_options)
        return reference.reduced_loss(sums, *options), sums
    flag = target.new_zeros((), dtype=torch.int32) if check_labels else None
    sums = _kernels().overlap_sums_forward(input, target, *sums_options, bad_labels=flag)
    if check_labels:
        torch._assert_async(flag == 0, _labels_message("target", input.shape[1], ignore_index))
    return _kernels().overlap_loss_forward(sums, *options), sums


@_fused_loss.register_fake
def _(input, target, activation, ignore_index, squared, min_intersection, check_labels,
      *loss_options):
    N, C = input.shape[:2]
    dtype = _sums_dtype(input)
    return input.new_empty((), dtype=dtype), input.new_empty((3, N, C), dtype=dtype)


@torch.library.custom_op("segops::overlap_loss_backward", mutates_args=())
def _fused_loss_backward(grad: Tensor, sums: Tensor, input: Tensor, target: Tensor,
                         activation: str, ignore_index: int | None, squared: bool,
                         min_intersection: bool, counts: Tensor | None, weights: Tensor | None,
                         kind: str, smooth: float, eps: float, log_loss: bool,
                         skip_empty: bool, batch: bool, mean: bool) -> Tensor:
    sums_options = (activation, ignore_index, squared, min_intersection)
    options = (counts, weights, kind, smooth, eps, log_loss, skip_empty, batch, mean)
    if _dispatch.uses_kernel(input):
        grad_sums = _kernels().overlap_loss_backward(grad, sums, *options,
                                                     reference.CLAMP_MIN_PASSES_TIE)
        return _laid_out_like(_kernels().overlap_sums_backward(
            grad_sums[0], grad_sums[1], input, target, *sums_options), input)
    grad_sums = reference.reduced_loss_backward(grad, sums, *options)
    return _laid_out_like(reference.overlap_sums_backward(
        grad_sums[0].contiguous(), grad_sums[1].contiguous(), input, target, *sums_options),
        input)


@_fused_loss_backward.register_fake
def _(grad, sums, input, *options):
    return torch.empty_like(input)


def _fused_loss_setup_context(ctx, inputs, output):
    input, target, *sums_options = inputs[:6]
    counts, weights, *loss_options = inputs[7:]
    ctx.save_for_backward(input, target, output[1], counts, weights)
    ctx.mark_non_differentiable(output[1])   # the sums are returned for backward only
    ctx.set_materialize_grads(False)   # no zero-filled gradient for the unused sums output
    ctx.sums_options = tuple(sums_options)
    ctx.loss_options = tuple(loss_options)


def _fused_loss_grad(ctx, grad, grad_sums):
    none = (None,) * 15
    if grad is None or not ctx.needs_input_grad[0]:
        return (None, *none)
    input, target, sums, counts, weights = ctx.saved_tensors
    grad = grad.to(sums.dtype)
    if torch.is_grad_enabled():
        def loss(x):
            x_sums = reference.overlap_sums(x, target, *ctx.sums_options)
            return reference.reduced_loss(x_sums, counts, weights, *ctx.loss_options)
        return (_composite_input_grad(loss, input, grad), *none)
    grad_input = _fused_loss_backward(grad.contiguous(), sums, input, target,
                                      *ctx.sums_options, counts, weights, *ctx.loss_options)
    return (grad_input, *none)


_fused_loss.register_autograd(_fused_loss_grad, setup_context=_fused_loss_setup_context)


# --------------------------------------------------------------------------
# custom op: segops::confusion_matrix
# --------------------------------------------------------------------------
@torch.library.custom_op("segops::confusion_matrix", mutates_args=())
def _confusion_matrix(pred: Tensor, target: Tensor, num_classes: int,
                      ignore_index: int | None, check_labels: bool) -> Tensor:
    """``check_labels``: assert (on the device) that the target's labels and
    predicted labels lie in [0, num_classes) (or are ignored), in the
    kernel's own pass."""
    if not _dispatch.uses_kernel(target):
        if check_labels:
            if pred.dim() == target.dim():
                _check_labels("pred", pred, num_classes, None)
            _check_labels("target", target, num_classes, ignore_index)
        return reference.confusion_matrix(pred, target, num_classes, ignore_index)
    flag = target.new_zeros((), dtype=torch.int32) if check_labels else None
    cm = _kernels().confusion_matrix(pred, target, num_classes, ignore_index, bad_labels=flag)
    if check_labels:
        message = (f"segops: target holds a label outside {_allowed(num_classes, ignore_index)}"
                   f", or pred one outside [0, {num_classes})")
        torch._assert_async(flag == 0, message)
    return cm


@_confusion_matrix.register_fake
def _(pred, target, num_classes, ignore_index, check_labels):
    return target.new_empty((num_classes, num_classes), dtype=torch.int64)


# --------------------------------------------------------------------------
# custom op: segops::confusion_score
# --------------------------------------------------------------------------
@torch.library.custom_op("segops::confusion_score", mutates_args=())
def _confusion_score(confusion: Tensor, dice: bool, average: str, dropped: int | None,
                     zero_division: float) -> Tensor:
    """``reference.confusion_score``; on the kernel path one launch."""
    args = (confusion, dice, average, dropped, zero_division)
    if _dispatch.uses_kernel(confusion) and confusion.dtype in _SCORE_KERNEL_DTYPES:
        return _kernels().confusion_score(*args)
    return reference.confusion_score(*args)


@_confusion_score.register_fake
def _(confusion, dice, average, dropped, zero_division):
    shape = confusion.shape[:1] if average == "none" else ()
    return confusion.new_empty(shape, dtype=torch.float64)


_SCORE_KERNEL_DTYPES = INDEX_DTYPES + FLOAT_DTYPES


# --------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------
def _check_scores(input: Tensor) -> None:
    check_tensor("input", input, dims=(3, 4, 5), dtypes=FLOAT_DTYPES)


def _check_target(input: Tensor, target: Tensor, ignore_index: int | None,
                  validate_args: bool) -> None:
    """Shape and dtype of ``target`` against ``input``; with ``validate_args``,
    also that index targets hold class ids in [0, C) or ``ignore_index``
    (see ``_check_labels``)."""
    check_tensor("target", target)
    check_same_device(input=input, target=target)
    N, C = input.shape[:2]
    spatial = tuple(input.shape[2:])
    if target.dim() == input.dim():
        if tuple(target.shape) != tuple(input.shape):
            raise ArgumentError(f"dense target must have the input's shape "
                                f"{tuple(input.shape)}, got {tuple(target.shape)}")
        if target.dtype.is_complex:
            raise ArgumentTypeError(f"target must be real, got {target.dtype}")
        return
    if tuple(target.shape) != (N, *spatial):
        raise ArgumentError(f"target must have shape (N, *spatial) = {(N, *spatial)} for class "
                            f"indices or {tuple(input.shape)} for a dense mask, got "
                            f"{tuple(target.shape)}")
    if target.dtype not in INDEX_DTYPES:
        raise ArgumentTypeError(f"an index target (N, *spatial) must have an integer dtype, got "
                                f"{target.dtype}; pass dense (N, C, *spatial) masks for float "
                                f"targets")
    if validate_args:
        _check_labels("target", target, C, ignore_index)


def _check_labels(name: str, labels: Tensor, C: int, ignore_index: int | None) -> None:
    """Labels in [0, C) or equal to ``ignore_index``. On CUDA and inside
    torch.compile a device-side assert (no host sync; on CUDA a failure
    surfaces at the next sync, as CUDA errors do); elsewhere an
    ArgumentError naming the first bad label."""
    bad = (labels < 0) | (labels >= C)
    if ignore_index is not None:
        bad &= labels != ignore_index
    if _checks.values_checked_on_device(labels):
        torch._assert_async(~bad.any(), _labels_message(name, C, ignore_index))
        return
    if bool(bad.any()):
        value = labels[bad].reshape(-1)[0].item()
        raise ArgumentError(f"{name} holds label {value}, outside {_allowed(C, ignore_index)}")


def _allowed(C: int, ignore_index: int | None) -> str:
    return f"[0, {C})" + ("" if ignore_index is None else f" or ignore_index={ignore_index}")


def _labels_message(name: str, C: int, ignore_index: int | None) -> str:
    """The device-side assert's message for labels out of range."""
    return f"segops: {name} holds a label outside {_allowed(C, ignore_index)}"


def _labels_checked_in_kernel(input: Tensor, target: Tensor, validate_args: bool) -> bool:
    """Whether the fused loss checks an index target's labels in its forward
    kernel (one flag, one device assert) instead of the separate passes of
    ``_check_labels``: where those would be a device assert too (CUDA, or
    inside torch.compile), on the kernels' path, with classes to compare
    against."""
    return (target.dim() < input.dim() and input.shape[1] > 0
            and _checks_in_kernel(target, validate_args))


def _checks_in_kernel(target: Tensor, validate_args: bool) -> bool:
    return (validate_args and _checks.values_checked_on_device(target)
            and _dispatch.uses_kernel(target))


def _check_ignore_index(ignore_index) -> int | None:
    """An int in int64's range (torch's comparison would overflow beyond)."""
    if ignore_index is None:
        return None
    return check_int("ignore_index", ignore_index, minimum=-(2**63), maximum=2**63 - 1)


# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------
def overlap_sums(input: Tensor, target: Tensor, *, activation: str = "softmax",
                 ignore_index: int | None = None, squared: bool = False,
                 intersection: str = "product", validate_args: bool = True) -> Tensor:
    """The three sums every IoU/Dice variant needs, in one fused pass.

    Args:
        input: scores ``(N, C, *spatial)``, 1-3 spatial dims.
        target: class indices ``(N, *spatial)`` or dense masks ``(N, C, *spatial)``.
        activation: ``'softmax'`` (over C), ``'sigmoid'`` or ``'none'``
            (``input`` already holds probabilities), fused into the pass.
        ignore_index: label (index target) or value (dense target) that counts
            in no sum.
        squared: sum ``p**2`` and ``t**2`` instead of ``p`` and ``t`` (MONAI's
            ``squared_pred``).
        intersection: ``'product'``: ``sum(p*t)``; ``'min'``: the fuzzy
            ``sum(min(p, t))`` (= ``(sum p + sum t - |p - t|_1) / 2``) that
            segmentation-models-pytorch >= 0.6 uses. Equal for 0/1 targets.
        validate_args: check index targets lie in ``[0, C)`` (on CUDA a
            device-side assert, without a host sync).

    Returns:
        ``(3, N, C)`` float32 (float64 for float64 input): intersection
        ``sum(p*t)``, prediction sum, target sum over the unmasked pixels.
        Differentiable w.r.t. ``input``; no ``(N, C, *spatial)`` activation or
        one-hot tensor is kept for backward.
    """
    refuse_forward_ad("overlap_sums", input, target)
    return _overlap_sums(*_sums_arguments(input, target, activation, ignore_index, squared,
                                          intersection, validate_args))


def _sums_arguments(input: Tensor, target: Tensor, activation: str, ignore_index,
                    squared: bool, intersection: str, validate_args: bool) -> tuple:
    """Checked arguments of ``segops::overlap_sums``: (input, target,
    activation, ignore_index, squared, min_intersection)."""
    _check_scores(input)
    check_choice("activation", activation, ACTIVATIONS)
    ignore_index = _check_ignore_index(ignore_index)
    check_choice("intersection", intersection, INTERSECTIONS)
    _check_target(input, target, ignore_index, validate_args)
    if target.dtype == torch.bool:
        # torch's `target != ignore_index` promotes a bool target: only 0 and
        # 1 can match, any other value ignores nothing (it must not wrap)
        if ignore_index not in (0, 1):
            ignore_index = None
        target = target.view(torch.uint8)
    return input, target, activation, ignore_index, bool(squared), intersection == "min"


def _prepare_loss_inputs(input: Tensor, target: Tensor, mode: str, from_logits: bool):
    """smp's mode -> (input, target, activation) for ``overlap_sums``."""
    check_choice("mode", mode, MODES)
    check_tensor("input", input)
    check_tensor("target", target)
    if mode == "binary":
        input, target = _binary_shapes(input, target)
    _check_scores(input)
    if mode == "multiclass":
        target = _multiclass_labels(input, target)
    elif mode == "multilabel" and target.dim() != input.dim():
        raise ArgumentError(f"mode='multilabel' needs a target of shape {tuple(input.shape)}, "
                            f"got {tuple(target.shape)}")
    if not from_logits:
        activation = "none"
    else:
        activation = "softmax" if mode == "multiclass" else "sigmoid"
    return input, target, activation


def _binary_shapes(input: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """smp's binary shapes: input (N, 1, *spatial) as it is, any other
    (channel-less (N, *spatial), or several channels pooled) as smp views
    it, (N, 1, everything else); a target with as many elements, in the
    input's shape."""
    if not (input.dim() in (3, 4, 5) and input.shape[1] == 1):
        if input.dim() < 2:
            raise ArgumentError(f"mode='binary' needs input of shape (N, 1, *spatial) or "
                                f"(N, *spatial), got {tuple(input.shape)}")
        input = input.reshape(input.shape[0], 1, -1)
    if target.numel() != input.numel():
        raise ArgumentError(f"mode='binary' needs a target with the input's "
                            f"{input.numel()} elements, got shape {tuple(target.shape)}")
    return input, target.reshape(input.shape)


def _multiclass_labels(input: Tensor, target: Tensor) -> Tensor:
    """Integer labels (N, *spatial); (N, 1, *spatial) too, as smp reads them."""
    if target.dim() == input.dim() and target.shape[1] == 1 and \
            target.shape[2:] == input.shape[2:]:
        target = target.squeeze(1)
    if target.dim() == input.dim():
        raise ArgumentError("mode='multiclass' takes class indices (N, *spatial) or "
                            "(N, 1, *spatial) as target; for dense (N, C, *spatial) masks use "
                            "mode='multilabel'")
    if target.dtype.is_floating_point:
        raise ArgumentTypeError(f"mode='multiclass' needs an integer target, got {target.dtype}")
    return target


def _selected_classes(C: int, classes, include_background: bool, mode: str) -> list[int] | None:
    """Indices in [0, C) of the classes that enter the loss (None: all).
    ``classes`` may count from the end (-1 is the last class), as smp's
    tensor indexing allows."""
    if classes is not None and mode == "binary":
        raise ArgumentError("classes cannot be used with mode='binary'")
    if classes is not None and not include_background:
        raise ArgumentError("pass either classes or include_background=False, not both")
    if not include_background:
        return list(range(1, C))
    if classes is None:
        return None
    try:
        classes = list(classes)
    except TypeError:  # a single class
        classes = [classes]
    return [check_int("classes", c, minimum=-C, maximum=C - 1) % C for c in classes]


def _pick(values: Tensor, classes: list[int] | None) -> Tensor:
    """values[..., classes] without building an index tensor on the device
    (a host-to-device copy that would synchronise)."""
    if classes is None:
        return values
    start = classes[0] if classes else 0
    if classes == list(range(start, start + len(classes))):
        return values.narrow(-1, start, len(classes))
    return torch.stack([values.select(-1, c) for c in classes], dim=-1)


def _class_weights(class_weights, C: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(C,) weights of ``dtype`` on ``device``."""
    if isinstance(class_weights, Tensor):
        weights = class_weights.to(device, dtype)
    elif isinstance(class_weights, Iterable):   # list, tuple, numpy array
        values = tuple(check_number("class_weights", w) for w in class_weights)
        weights = _constant(values, dtype, device)
    else:
        raise ArgumentTypeError(f"class_weights must be a sequence of numbers or a tensor, "
                                f"got {type(class_weights).__name__}")
    if weights.dim() != 1 or weights.numel() != C:
        raise ArgumentError(f"class_weights must hold one weight per class ({C}), "
                            f"got shape {tuple(weights.shape)}")
    return weights


def _constant(values: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``values`` on ``device``, copied once per content: a copy per call
    from pageable host memory blocks the host and cannot be captured in a
    CUDA graph. Traced calls (torch.compile, fake tensors) build it afresh:
    a cached fake tensor would outlive its trace. Callers must not write to
    it."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return torch.tensor(values, dtype=dtype, device=device)
    return _cached_constant(values, dtype, device)


@functools.lru_cache(maxsize=64)
def _cached_constant(values: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    with torch.inference_mode(False):  # autograd may save it later, whatever the mode now
        return torch.tensor(values, dtype=dtype, device=device)


def _reduce(loss: Tensor, selected: list[int] | None, class_weights, reduction: str) -> Tensor:
    """Select classes, weight them, reduce. Weights are given per class (C of
    them) and selected with the classes, like smp; 'mean' with weights is the
    weighted mean sum(w*l)/sum(w) (smp's; MONAI divides by the count), over
    every element of ``loss``: per-sample losses (N, C) weigh each sample's
    classes alike, so the result is the mean over samples of their weighted
    class means."""
    C = loss.shape[-1]
    weights = None if class_weights is None else \
        _class_weights(class_weights, C, loss.dtype, loss.device)
    loss = _pick(loss, selected)
    if weights is None:
        return {"mean": loss.mean, "sum": loss.sum}.get(reduction, lambda: loss)()
    weights = _pick(weights, selected)
    if reduction == "mean":
        return (loss * weights).sum() / weights.expand_as(loss).sum()
    return (loss * weights).sum() if reduction == "sum" else loss * weights


def _overlap_loss(kind: str, input: Tensor, target: Tensor, mode: str, *, classes,
                  log_loss: bool, from_logits: bool, smooth: float, ignore_index,
                  eps: float, batch: bool, include_background: bool,
                  squared_pred: bool, class_weights, skip_empty: bool, intersection: str,
                  reduction: str, validate_args: bool) -> Tensor:
    check_choice("reduction", reduction, REDUCTIONS)
    input, target, activation = _prepare_loss_inputs(input, target, mode, from_logits)
    C = input.shape[1]
    selected = _selected_classes(C, classes, include_background, mode)
    loss_options = (kind, smooth, eps, log_loss, skip_empty, batch)
    if _fuses_loss(input, class_weights, reduction):
        in_kernel = _labels_checked_in_kernel(input, target, validate_args)
        sums_arguments = _sums_arguments(input, target, activation, ignore_index, squared_pred,
                                         intersection, validate_args and not in_kernel)
        dtype, device = _sums_dtype(input), input.device
        counts = _selection_counts(selected, C, dtype, device)
        weights = None if class_weights is None else \
            _class_weights(class_weights, C, dtype, device).contiguous()
        loss, _ = _fused_loss(*sums_arguments, in_kernel, counts, weights, *loss_options,
                              reduction == "mean")
        return loss
    sums_arguments = _sums_arguments(input, target, activation, ignore_index, squared_pred,
                                     intersection, validate_args)
    loss = reference.class_losses(_overlap_sums(*sums_arguments), *loss_options)
    return _reduce(loss, selected, class_weights, reduction)


def _fuses_loss(input: Tensor, class_weights, reduction: str) -> bool:
    """Whether the reduced loss comes from ``segops::overlap_loss`` (the
    kernels' path, 'mean' and 'sum'; class weights that need a gradient
    take the composite path, whose weights autograd follows)."""
    weights_need_grad = isinstance(class_weights, Tensor) and class_weights.requires_grad \
        and torch.is_grad_enabled()
    return _dispatch.uses_kernel(input) and reduction != "none" and not weights_need_grad


def _selection_counts(selected: list[int] | None, C: int, dtype: torch.dtype,
                      device: torch.device) -> Tensor | None:
    """(C,) how often ``selected`` names each class (None: all, once)."""
    if selected is None:
        return None
    counts = [0] * C
    for c in selected:
        counts[c] += 1
    return _constant(tuple(counts), dtype, device)


def dice_loss(input: Tensor, target: Tensor, mode: str = "multiclass", *,
              classes: Sequence[int] | None = None, log_loss: bool = False,
              from_logits: bool = True, smooth: float = 0.0,
              ignore_index: int | None = None, eps: float = 1e-7, batch: bool = True,
              include_background: bool = True, squared_pred: bool = False,
              class_weights: Sequence[float] | Tensor | None = None,
              skip_empty: bool = True, intersection: str = "min",
              reduction: str = "mean", validate_args: bool = True) -> Tensor:
    """Soft Dice loss ``1 - (I + smooth) / max((P + T) / 2 + smooth, eps)``, fused
    (I, P, T: intersection, prediction and target sums).

    With the defaults it gives segmentation-models-pytorch's (>= 0.6)
    ``DiceLoss`` numbers: the fuzzy intersection ``sum(min(p, t))``
    (``intersection='min'``; ``'product'`` gives ``sum(p*t)``, MONAI's, the
    same for 0/1 targets), smooth added to the halved denominator, classes
    with no target pixel zeroed (``skip_empty``), mean over classes. ``mode``: ``'binary'`` (input ``(N, 1, *)`` or
    ``(N, *)``, target with as many elements, sigmoid; any other input shape
    is read as smp does, ``(N, 1, -1)``), ``'multiclass'`` (input
    ``(N, C, *)``, integer target ``(N, *)`` or ``(N, 1, *)``, softmax), ``'multilabel'``
    (input and target ``(N, C, *)``, sigmoid). ``from_logits=False``: input
    already holds probabilities.

    Options beyond smp (MONAI-style): ``batch=False`` reduces per sample
    (``(N, C)`` scores) instead of over the batch; ``include_background=False``
    drops class 0; ``squared_pred`` uses sums of squares in the denominator;
    ``class_weights`` (one per class, smp's) gives a weighted mean
    ``sum(w*l) / sum(w)`` over the selected classes; ``skip_empty=False`` keeps the loss of classes with no target
    pixel (smp zeroes them). ``reduction``: ``'mean'``, ``'sum'`` or ``'none'``
    (per-class ``(C,)``, or ``(N, C)`` with ``batch=False``).

    Differences from smp: ``classes`` may be one int (that class; smp would
    take every class). Pixels of ``ignore_index`` are dropped, not
    multiplied by a zero mask: a NaN or inf logit or target there leaves the
    loss finite (smp's is NaN) and, as in torch's ``cross_entropy`` with
    ``ignore_index``, gives NaN gradients at that pixel only. The sigmoid's
    gradient is ``sigmoid(x) * sigmoid(-x)``, to a few float32 ulps wherever
    it is a float32 normal (|logit| up to ~87), as smp's ``logsigmoid().exp()``
    differentiates; ``torch.sigmoid``'s backward ``p * (1 - p)`` loses
    digits from |logit| ~ 5 and is 0 past ~17.
    """
    refuse_forward_ad("dice_loss", input, target)
    return _overlap_loss("dice", input, target, mode, classes=classes, log_loss=log_loss,
                         from_logits=from_logits, smooth=smooth, ignore_index=ignore_index,
                         eps=eps, batch=batch, include_background=include_background,
                         squared_pred=squared_pred, class_weights=class_weights,
                         skip_empty=skip_empty, intersection=intersection,
                         reduction=reduction, validate_args=validate_args)


def jaccard_loss(input: Tensor, target: Tensor, mode: str = "multiclass", *,
                 classes: Sequence[int] | None = None, log_loss: bool = False,
                 from_logits: bool = True, smooth: float = 0.0,
                 ignore_index: int | None = None, eps: float = 1e-7, batch: bool = True,
                 include_background: bool = True, squared_pred: bool = False,
                 class_weights: Sequence[float] | Tensor | None = None,
                 skip_empty: bool = True, intersection: str = "min",
                 reduction: str = "mean", validate_args: bool = True) -> Tensor:
    """Soft Jaccard (IoU) loss ``1 - (I + smooth) / max(P + T - I + smooth, eps)``.

    Same arguments and conventions as :func:`dice_loss`; the defaults give
    segmentation-models-pytorch's ``JaccardLoss`` numbers.
    """
    refuse_forward_ad("jaccard_loss", input, target)
    return _overlap_loss("jaccard", input, target, mode, classes=classes, log_loss=log_loss,
                         from_logits=from_logits, smooth=smooth, ignore_index=ignore_index,
                         eps=eps, batch=batch, include_background=include_background,
                         squared_pred=squared_pred, class_weights=class_weights,
                         skip_empty=skip_empty, intersection=intersection,
                         reduction=reduction, validate_args=validate_args)


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int,
                     ignore_index: int | None = None, *, validate_args: bool = True) -> Tensor:
    """``(num_classes, num_classes)`` int64 counts; row = target class, column =
    predicted class.

    Args:
        pred: predicted labels ``(N, *spatial)`` (integer) or scores
            ``(N, C, *spatial)`` (float; the argmax over C is fused, first
            index on ties like ``torch.argmax``).
        target: labels ``(N, *spatial)``.
        ignore_index: target label whose pixels are not counted.
        validate_args: check that labels lie in ``[0, C)`` (on CUDA a
            device-side assert made in the counting kernel's own pass,
            without a host sync); without it, out-of-range pairs are
            silently not counted (torchmetrics' unvalidated
            ``confusion_matrix`` may count them in another cell). Labels are
            compared at their full width (int64 2**32 + 1 is out of range,
            not 1).

    Deterministic: counts are integers, so the kernel's atomic adds give the
    same matrix in any order (no one-hot fallback under
    ``torch.use_deterministic_algorithms``).
    """
    num_classes = check_int("num_classes", num_classes, minimum=1)
    ignore_index = _check_ignore_index(ignore_index)
    check_tensor("target", target, dims=(2, 3, 4), dtypes=INDEX_DTYPES)
    check_tensor("pred", pred)
    check_same_device(pred=pred, target=target)
    if pred.dim() == target.dim() + 1:
        check_tensor("pred", pred, dtypes=FLOAT_DTYPES)
        expected = (target.shape[0], num_classes, *target.shape[1:])
        if tuple(pred.shape) != expected:
            raise ArgumentError(f"pred scores must have shape {expected}, got {tuple(pred.shape)}")
        pred = pred.detach()
    elif pred.dim() == target.dim():
        check_tensor("pred", pred, dtypes=INDEX_DTYPES)
        if pred.shape != target.shape:
            raise ArgumentError(f"pred labels must have the target's shape "
                                f"{tuple(target.shape)}, got {tuple(pred.shape)}")
    else:
        raise ArgumentError(f"pred must be labels shaped like target {tuple(target.shape)} or "
                            f"scores (N, C, *spatial), got {tuple(pred.shape)}")
    in_kernel = _checks_in_kernel(target, validate_args)
    if validate_args and not in_kernel:
        if pred.dim() == target.dim():
            _check_labels("pred", pred, num_classes, None)
        _check_labels("target", target, num_classes, ignore_index)
    return _confusion_matrix(pred, target, num_classes, ignore_index, in_kernel)


def _score(confusion: Tensor, dice: bool, average: str | None, ignore_index,
           zero_division) -> Tensor:
    check_tensor("confusion", confusion, dims=(2,))
    C = confusion.shape[0]
    if confusion.shape[1] != C:
        raise ArgumentError(f"confusion must be square (C, C), got {tuple(confusion.shape)}")
    average = _check_average(average)
    ignore_index = _check_ignore_index(ignore_index)
    zero_division = _check_zero_division(zero_division)
    dropped = None if dice else _class_to_drop(ignore_index, C)
    args = (confusion, dice, average, dropped, zero_division)
    if C == 0 or _differentiated(confusion):
        # the composite: differentiable in both modes, and no kernel to
        # launch for nothing
        return reference.confusion_score(*args)
    return _confusion_score(*args)


def _differentiated(confusion: Tensor) -> bool:
    """Whether a derivative of a float matrix's score may be asked for: it
    requires grad under grad mode, or a forward-AD level or a torch.func
    transform is active (a dual tensor does not require grad, and the
    custom op would give it no tangent)."""
    if not confusion.is_floating_point():
        return False
    if confusion.requires_grad and torch.is_grad_enabled():
        return True
    if torch.autograd.forward_ad._current_level >= 0:
        return True
    return not torch.compiler.is_compiling() and peek_interpreter_stack() is not None


def _check_average(average: str | None) -> str:
    """``average`` of the scores; None (torchmetrics' spelling) is 'none'."""
    average = "none" if average is None else average
    check_choice("average", average, AVERAGES)
    return average


def _check_zero_division(value) -> float:
    """0, 1 (torchmetrics' choices) or NaN, as 0.0, 1.0 or math.nan."""
    if not isinstance(value, bool) and isinstance(value, numbers.Real):
        if value in (0, 1):
            return float(value)
        if isinstance(value, float) and math.isnan(value) or \
                not isinstance(value, numbers.Integral) and math.isnan(float(value)):
            return math.nan
    raise ArgumentError(f"zero_division must be 0, 1 or nan, got {value!r}")


def _class_to_drop(ignore_index: int | None, C: int) -> int | None:
    return ignore_index if ignore_index is not None and 0 <= ignore_index < C else None


def iou_score(confusion: Tensor, average: str | None = "macro", *,
              ignore_index: int | None = None, zero_division: float = math.nan) -> Tensor:
    """Intersection over union ``tp / (tp + fp + fn)`` from a confusion matrix
    (rows = target). ``average``: ``'micro'`` (pooled counts), ``'macro'``
    (mean over present classes: mIoU), ``'weighted'`` (by target support),
    ``'none'`` or None (per class, ``(C,)``). float64 result.

    confusion: ``(C, C)`` counts (any integer or float dtype), or a float
    matrix normalised to fractions (the ratios are the same). On the kernel
    path one launch, no host sync; a float matrix that requires grad takes
    the differentiable composite instead.

    ``zero_division`` (0, 1 or NaN): the score of a class absent from
    prediction and target in ``'none'``, and of ``'micro'`` with nothing
    counted. NaN by default; torchmetrics' default is 0. ``'macro'`` and
    ``'weighted'`` leave absent classes out, and are NaN with none present
    (as torchmetrics' Jaccard index is; its F1 score gives 0 there).

    ``ignore_index`` (the one the matrix was counted with): when it is a
    class in [0, C), that class is left out of ``'macro'`` and ``'micro'``,
    as torchmetrics' ``MulticlassJaccardIndex`` does (its target pixels were
    not counted; its false positives would otherwise pull the mean down).
    ``'none'`` still reports it (0 where it was predicted, else
    ``zero_division``).
    """
    return _score(confusion, False, average, ignore_index, zero_division)


def dice_score(confusion: Tensor, average: str | None = "macro", *,
               ignore_index: int | None = None, zero_division: float = math.nan) -> Tensor:
    """Dice / F1 ``2tp / (2tp + fp + fn)`` from a confusion matrix; ``average``
    and ``zero_division`` as in :func:`iou_score`. ``ignore_index`` is
    accepted for symmetry and changes nothing: torchmetrics'
    ``MulticlassF1Score`` keeps an ignored class in every average, and so
    does this."""
    return _score(confusion, True, average, ignore_index, zero_division)


# graph leaves for torch.fx.symbolic_trace (see segops/ops/__init__.py)
torch.fx.wrap("overlap_sums")
torch.fx.wrap("dice_loss")
torch.fx.wrap("jaccard_loss")
torch.fx.wrap("confusion_matrix")
torch.fx.wrap("iou_score")
torch.fx.wrap("dice_score")
