"""Pure-PyTorch fused IoU/Dice reductions: the CPU path and the test oracle.

Written for clarity (it does materialise the one-hot target); float64 inputs
are computed in float64, everything else in float32. A target is *dense*
(N, C, *spatial) when it has as many dims as the input, otherwise it holds
class indices (N, *spatial).
"""
from __future__ import annotations

import math

import torch

from .._checks import accumulation_dtype


def _flat(input: torch.Tensor, target: torch.Tensor):
    """(N, C, S) scores in the accumulation dtype and the target, flattened."""
    N, C = input.shape[:2]
    S = math.prod(input.shape[2:])
    dtype = accumulation_dtype(input.dtype)
    x = input.reshape(N, C, S).to(dtype)  # explicit S: -1 is ambiguous for N = 0
    dense = target.dim() == input.dim()
    t = target.reshape(N, C, S) if dense else target.reshape(N, S)
    return x, t, dense


def probabilities(x: torch.Tensor, activation: str) -> torch.Tensor:
    """(N, C, S) scores -> (N, C, S) probabilities."""
    if activation == "softmax":
        return torch.softmax(x, dim=1)
    if activation == "sigmoid":
        # autograd differentiates this to sigmoid(x) * sigmoid(-x) (the
        # kernels' slope, used by the double backward), where torch.sigmoid's
        # backward p * (1 - p) is 0 past |x| ~ 17 in float32
        return torch.nn.functional.logsigmoid(x).exp()
    return x


def target_and_mask(t: torch.Tensor, dense: bool, C: int, dtype: torch.dtype,
                    ignore_index: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense (N, C, S) target values (zero where masked) and the (N, C, S)
    boolean mask of elements that count.

    Index targets (N, S) are one-hot encoded and an ignored pixel is masked in
    every class; dense targets are masked element by element.
    """
    mask = torch.ones_like(t, dtype=torch.bool) if ignore_index is None else t != ignore_index
    if dense:
        values = t.to(dtype)
    else:
        classes = torch.arange(C, device=t.device).view(1, C, 1)
        values = (t.long().unsqueeze(1) == classes).to(dtype)
        mask = mask.unsqueeze(1).expand_as(values)
    return torch.where(mask, values, 0), mask


def overlap_sums(input: torch.Tensor, target: torch.Tensor, activation: str,
                 ignore_index: int | None, squared: bool,
                 min_intersection: bool = False) -> torch.Tensor:
    """[3, N, C]: intersection sum(p*t) (sum(min(p, t)) with
    ``min_intersection``), prediction sum sum(p) and target sum sum(t) per
    (sample, class), over unmasked elements; with ``squared`` the last two are
    sum(p^2) and sum(t^2)."""
    x, t, dense = _flat(input, target)
    C = x.shape[1]
    t, mask = target_and_mask(t, dense, C, x.dtype, ignore_index)
    p = torch.where(mask, probabilities(x, activation), 0)
    intersection = torch.minimum(p, t) if min_intersection else p * t
    if squared:
        return torch.stack([intersection.sum(-1), (p * p).sum(-1), (t * t).sum(-1)])
    return torch.stack([intersection.sum(-1), p.sum(-1), t.sum(-1)])


def overlap_sums_backward(grad_intersection: torch.Tensor, grad_pred_sum: torch.Tensor,
                          input: torch.Tensor, target: torch.Tensor, activation: str,
                          ignore_index: int | None, squared: bool,
                          min_intersection: bool = False) -> torch.Tensor:
    """Gradient of ``overlap_sums`` w.r.t. ``input`` given the (N, C) gradients
    of the intersection and prediction sums (the target sum does not depend on
    the input). d min(p, t)/dp is 0 above t, 1/2 at a tie and 1 otherwise (a
    NaN p too), as autograd differentiates torch.minimum(p, t)."""
    x, t, dense = _flat(input, target)
    C = x.shape[1]
    t, mask = target_and_mask(t, dense, C, x.dtype, ignore_index)
    p = probabilities(x, activation)
    gi = grad_intersection.to(x.dtype).unsqueeze(-1)
    gp = grad_pred_sum.to(x.dtype).unsqueeze(-1)
    if min_intersection:
        d_intersection = torch.where(p > t, 0.0, torch.where(p == t, 0.5, 1.0)).to(x.dtype)
    else:
        d_intersection = t
    g = gi * d_intersection + (gp * 2 * p if squared else gp)
    g = torch.where(mask, g, 0)
    if activation == "softmax":
        g = p * (g - (g * p).sum(dim=1, keepdim=True))
    elif activation == "sigmoid":
        # p * sigmoid(-x), not p * (1 - p): 1 - p rounds to 0 past |x| ~ 17 in float32
        g = g * p * torch.sigmoid(-x)
    return g.reshape(input.shape).to(input.dtype)


def _clamp_min_passes_tie() -> bool:
    """Whether autograd passes clamp_min's gradient where the input equals
    the bound. torch did (subgradient 1) until mid-2026; newer releases give
    the minimum-norm subgradient 0 (pytorch/pytorch#184572). Asked once, at
    import: custom ops run below autograd and cannot ask."""
    # on the CPU and outside inference mode, whatever the caller's defaults
    with torch.inference_mode(False), torch.enable_grad():
        x = torch.ones((), dtype=torch.float64, device="cpu", requires_grad=True)
        grad, = torch.autograd.grad(x.clamp_min(1.0), x)
    return bool(grad == 1)


# the gradient of the losses' clamps at their bound follows the torch in use,
# so the fused loss and the composite agree on every version
CLAMP_MIN_PASSES_TIE = _clamp_min_passes_tie()


def class_losses(sums: torch.Tensor, kind: str, smooth: float, eps: float, log_loss: bool,
                 skip_empty: bool, batch: bool) -> torch.Tensor:
    """Dice (``kind='dice'``) or Jaccard loss per class (C,) of the sums
    (3, N, C) over the batch (``batch``), or per (sample, class) (N, C).
    smp >= 0.6 writes both as Tversky scores
    (I + s) / max(I + a*fp + b*fn + s, eps): a = b = 1/2 for Dice, 1 for
    Jaccard; the loss is 1 - score or -log(max(score, eps)), zeroed for
    classes without target (``skip_empty``)."""
    if batch:
        sums = sums.sum(dim=1)
    inter, pred_sum, target_sum = sums
    if kind == "dice":
        denominator = (pred_sum + target_sum) / 2
    else:
        denominator = pred_sum + target_sum - inter
    score = (inter + smooth) / (denominator + smooth).clamp_min(eps)
    loss = -torch.log(score.clamp_min(eps)) if log_loss else 1.0 - score
    if skip_empty:
        loss = loss * (target_sum > 0).to(loss.dtype)
    return loss


def _selected_weights(count: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Each class's weight times how often it is selected; 0 for classes left
    out, whatever their weight (an inf weight of an unselected class must
    not reach the mean's denominator)."""
    if weights is None:
        return count
    return torch.where(count > 0, count * weights, 0)


def reduced_loss(sums: torch.Tensor, counts: torch.Tensor | None, weights: torch.Tensor | None,
                 kind: str, smooth: float, eps: float, log_loss: bool, skip_empty: bool,
                 batch: bool, mean: bool) -> torch.Tensor:
    """``class_losses`` weighted and summed to a 0-dim tensor: each class
    ``counts[c]`` times (it was selected that often; None: once) with
    weight ``weights[c]`` (None: 1); divided by the weights' total over the
    losses (``mean``). Classes selected 0 times drop out, NaN or not."""
    loss = class_losses(sums, kind, smooth, eps, log_loss, skip_empty, batch)
    count = loss.new_ones(loss.shape[-1]) if counts is None else counts
    weight = _selected_weights(count, weights)
    total = torch.where(count > 0, weight * loss, 0).sum()
    return total / weight.expand_as(loss).sum() if mean else total


def reduced_loss_backward(grad: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor | None,
                          weights: torch.Tensor | None, kind: str, smooth: float, eps: float,
                          log_loss: bool, skip_empty: bool, batch: bool, mean: bool,
                          clamp_passes_tie: bool = CLAMP_MIN_PASSES_TIE) -> torch.Tensor:
    """(2, N, C): the gradient of ``reduced_loss`` with respect to the
    intersection and prediction sums, written out as autograd computes it
    (clamp_min passes the gradient where its input exceeds the bound, and
    where it equals it when ``clamp_passes_tie``; classes left out get 0,
    times NaN where their sums are NaN)."""
    passes = torch.ge if clamp_passes_tie else torch.gt
    N, C = sums.shape[1:]
    summed = sums.sum(dim=1) if batch else sums
    inter, pred_sum, target_sum = summed
    count = sums.new_ones(C) if counts is None else counts
    weight = _selected_weights(count, weights)
    coef = grad / (weight.sum() * (1 if batch else N)) if mean else grad
    d_loss = torch.where(count > 0, coef * weight, 0).expand_as(inter)
    if kind == "dice":
        denominator = (pred_sum + target_sum) / 2
    else:
        denominator = pred_sum + target_sum - inter
    bound = (denominator + smooth).clamp_min(eps)
    score = (inter + smooth) / bound
    if skip_empty:
        d_loss = d_loss * (target_sum > 0).to(d_loss.dtype)
    if log_loss:
        d_score = torch.where(passes(score, eps), -d_loss / score.clamp_min(eps), 0)
    else:
        d_score = -d_loss
    d_inter = d_score / bound
    d_denominator = torch.where(passes(denominator + smooth, eps), -d_score * (score / bound), 0)
    if kind == "dice":
        grads = torch.stack([d_inter, d_denominator / 2])
    else:
        grads = torch.stack([d_inter - d_denominator, d_denominator])
    return grads.unsqueeze(1).expand(2, N, C) if batch else grads


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int | None) -> torch.Tensor:
    """(C, C) int64 counts, rows = target class, columns = predicted class.

    pred is (N, *spatial) labels or (N, C, *spatial) scores (argmax taken).
    Pairs with either label outside [0, C), or target == ignore_index, are
    not counted. ``target != ignore_index`` is taken in the target's own
    dtype, as torchmetrics does (for uint8 labels -1 means 255).
    """
    C = num_classes
    if pred.dim() == target.dim() + 1:
        pred = pred.argmax(dim=1)
    pred = pred.reshape(-1).long()
    target = target.reshape(-1)
    ignored = torch.zeros_like(target, dtype=torch.bool) if ignore_index is None \
        else target == ignore_index
    target = target.long()
    keep = (target >= 0) & (target < C) & (pred >= 0) & (pred < C) & ~ignored
    bins = target[keep] * C + pred[keep]
    return torch.bincount(bins, minlength=C * C).reshape(C, C)


def confusion_score(confusion: torch.Tensor, dice: bool, average: str,
                    dropped: int | None, zero_division: float = math.nan) -> torch.Tensor:
    """IoU ``tp / (tp + fp + fn)`` (or Dice ``2tp / (2tp + fp + fn)``) of each
    class of a (C, C) confusion matrix (rows = target), in float64, averaged:
    ``'micro'`` (pooled counts), ``'macro'`` (mean over the classes with a
    positive denominator), ``'weighted'`` (by target support tp + fn) or
    ``'none'`` ((C,)). A ratio whose denominator is not positive (a class
    absent from prediction and target; micro with nothing counted) is
    ``zero_division``; a NaN denominator (NaN counts) gives NaN, which the
    averages carry; macro and weighted with no class to average are NaN.
    Class ``dropped`` (or None) is left out of ``'macro'`` and of the micro
    denominator. Differentiable for float matrices."""
    confusion = confusion.double()
    tp = confusion.diagonal()
    fp = confusion.sum(dim=0) - tp
    fn = confusion.sum(dim=1) - tp
    numerator, denominator = (2 * tp, 2 * tp + fp + fn) if dice else (tp, tp + fp + fn)
    keep = torch.ones_like(denominator, dtype=torch.bool)
    if dropped is not None:
        keep[dropped] = False
    if average == "micro":
        numerator, denominator = numerator.sum(), torch.where(keep, denominator, 0).sum()
    # NaN counts: the class is not absent, its ratio is NaN (as torchmetrics)
    present = (denominator > 0) | denominator.isnan()
    # divided by the denominator where present (never clamped to 1: a
    # normalised matrix keeps its ratios), by 1 elsewhere so that the
    # gradient of the branch not taken stays finite
    ratio = torch.where(present, numerator / torch.where(present, denominator, 1),
                        zero_division)
    if average in ("none", "micro"):
        return ratio
    weights = (present & keep).to(ratio.dtype) if average == "macro" else \
        torch.where(present, tp + fn, 0)
    return torch.where(weights != 0, ratio * weights, 0).sum() / weights.sum()


# --------------------------------------------------------------------------
# The formulas of the libraries segops replaces, written out eagerly. They are
# test oracles and benchmark baselines: this is what a user runs today.
# --------------------------------------------------------------------------
def smp_overlap_loss(kind: str, y_pred: torch.Tensor, y_true: torch.Tensor, mode: str,
                     classes=None, log_loss: bool = False, from_logits: bool = True,
                     smooth: float = 0.0, ignore_index: int | None = None,
                     eps: float = 1e-7, class_weights=None) -> torch.Tensor:
    """segmentation-models-pytorch's (0.6) DiceLoss (kind='dice') / JaccardLoss
    (kind='jaccard') forward: activation, one-hot target, Tversky score with
    the fuzzy intersection (sum p + sum t - |p - t|_1) / 2 over batch and
    space per class, classes without target pixels zeroed, (weighted) mean."""
    bs, num_classes = y_true.shape[0], y_pred.shape[1]
    if from_logits:
        if mode == "multiclass":
            y_pred = y_pred.log_softmax(dim=1).exp()
        else:
            y_pred = torch.nn.functional.logsigmoid(y_pred).exp()
    if mode == "multiclass":
        y_true = y_true.reshape(bs, -1)
        y_pred = y_pred.reshape(bs, num_classes, -1)
        if ignore_index is not None:
            mask = y_true != ignore_index
            y_pred = y_pred * mask.unsqueeze(1)
            y_true = torch.nn.functional.one_hot((y_true * mask).long(), num_classes)
            y_true = y_true.permute(0, 2, 1) * mask.unsqueeze(1)
        else:
            y_true = torch.nn.functional.one_hot(y_true.long(), num_classes).permute(0, 2, 1)
    else:
        channels = 1 if mode == "binary" else num_classes
        y_true = y_true.reshape(bs, channels, -1)
        y_pred = y_pred.reshape(bs, channels, -1)
        if ignore_index is not None:
            mask = y_true != ignore_index
            y_pred = y_pred * mask
            y_true = y_true * mask
    y_true = y_true.type_as(y_pred)
    pred_sum, true_sum = y_pred.sum(dim=(0, 2)), y_true.sum(dim=(0, 2))
    difference = torch.linalg.vector_norm(y_pred - y_true, ord=1, dim=(0, 2))
    tp = (pred_sum + true_sum - difference) / 2
    fp, fn = pred_sum - tp, true_sum - tp
    alpha = beta = 0.5 if kind == "dice" else 1.0
    scores = (tp + smooth) / (tp + alpha * fp + beta * fn + smooth).clamp_min(eps)
    loss = -torch.log(scores.clamp_min(eps)) if log_loss else 1.0 - scores
    loss = loss * (true_sum > 0).to(loss.dtype)
    weights = None if class_weights is None else torch.as_tensor(class_weights, dtype=loss.dtype)
    if classes is not None:
        index = torch.as_tensor(classes, dtype=torch.long)
        loss = loss[index]
        weights = None if weights is None else weights[index]
    if weights is not None:
        return (loss * weights).sum() / weights.sum()
    return loss.mean()


def torchmetrics_jaccard(preds: torch.Tensor, target: torch.Tensor, num_classes: int,
                         ignore_index: int | None = None) -> torch.Tensor:
    """torchmetrics' MulticlassJaccardIndex(average='none') path: argmax,
    one-hot-free bincount confusion matrix, per-class tp / (tp + fp + fn)
    (0 where the denominator is 0, torchmetrics' zero_division)."""
    if preds.is_floating_point():
        preds = preds.argmax(dim=1)
    preds, target = preds.reshape(-1), target.reshape(-1)
    if ignore_index is not None:
        keep = target != ignore_index
        preds, target = preds[keep], target[keep]
    confusion = torch.bincount(target * num_classes + preds, minlength=num_classes ** 2)
    confusion = confusion.reshape(num_classes, num_classes).double()
    tp = confusion.diagonal()
    denominator = confusion.sum(0) + confusion.sum(1) - tp
    return torch.where(denominator > 0, tp / denominator.clamp_min(1), 0.0)
