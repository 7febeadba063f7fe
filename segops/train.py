"""A small training loop and evaluation for segmentation and detection
models: AMP on CUDA, channels_last, DDP-aware (metrics reduced across ranks,
progress on rank 0).

Two kinds of batch go through the same loop:

* segmentation: ``(images (N, 3, H, W), masks (N, H, W))``, with a
  ``loss(logits, masks)``;
* detection (torchvision's convention, e.g. segops' Mask R-CNN): ``(list of
  images (3, H_i, W_i), list of target dicts)``; the model returns its loss
  dict in training and the total is minimised (no ``loss`` argument).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .metrics import MeanIoU
from .metrics.overlap import _distributed, _reduction_device

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def logits_of(output) -> Tensor:
    """The logits of a model output: a tensor, or torchvision's {'out': ...}."""
    return output["out"] if isinstance(output, dict) else output


def _mean_over_ranks(total: float, count: int) -> float:
    """``total / count`` with both summed over the ranks of the default
    group (NaN when there is nothing to average)."""
    if _distributed():
        device = _reduction_device(torch.device("cpu"), str(dist.get_backend()))
        sums = torch.tensor([total, count], dtype=torch.float64, device=device)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        total, count = sums.tolist()
    return total / count if count else math.nan


def _is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _progress(iterable, total: int | None, description: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, total=total, desc=description, leave=False, dynamic_ncols=True)


def _autocast(device: torch.device, amp: str | None):
    if amp is None:
        return contextlib.nullcontext()
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be None or one of {tuple(AMP_DTYPES)}, got {amp!r}")
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def is_detection_batch(images) -> bool:
    """A detection batch holds a list of images (sizes may differ)."""
    return isinstance(images, (list, tuple))


def _to(batch, device: torch.device, channels_last: bool):
    images, targets = batch
    if is_detection_batch(images):  # the model batches (and lays out) the images itself
        images = [image.to(device, non_blocking=True) for image in images]
        targets = [{k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v
                    for k, v in t.items()} for t in targets]
        return images, targets
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets.to(device, non_blocking=True)


def _device_of(images) -> torch.device:
    return images[0].device if is_detection_batch(images) else images.device


def _loss(model: nn.Module, images, targets, loss_fn: Callable | None,
          aux_weight: float) -> Tensor:
    if is_detection_batch(images):
        return sum(model(list(images), list(targets)).values())
    output = model(images)
    loss = loss_fn(logits_of(output).float(), targets)
    if aux_weight and isinstance(output, dict) and "aux" in output:
        loss = loss + aux_weight * loss_fn(output["aux"].float(), targets)
    return loss


def train_step(model: nn.Module, images, masks, loss_fn: Callable | None,
               optimizer: torch.optim.Optimizer, *, amp: str | None = None,
               scaler: torch.amp.GradScaler | None = None, aux_weight: float = 0.0) -> float:
    """One optimisation step; returns the loss.

    Segmentation: ``images (N, 3, H, W)``, ``masks (N, H, W)``, the loss is
    ``loss_fn(logits, masks)``; with ``aux_weight`` and a model returning
    {'out', 'aux'} (torchvision's aux_loss=True) it is loss(out) +
    aux_weight * loss(aux), as torchvision's recipe (0.5).
    Detection: ``images`` a list of ``(3, H_i, W_i)``, ``masks`` the list of
    target dicts, ``loss_fn`` None: the loss is the sum of the model's loss
    dict.
    """
    if loss_fn is None and not is_detection_batch(images):
        raise ValueError("loss_fn is required for segmentation batches (only detection "
                         "models, given lists of images, compute their own losses)")
    optimizer.zero_grad(set_to_none=True)
    with _autocast(_device_of(images), amp):
        loss = _loss(model, images, masks, loss_fn, aux_weight)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, num_classes: int, *,
             device: torch.device | str | None = None, amp: str | None = None,
             channels_last: bool = False, ignore_index: int | None = None,
             progress: bool = False) -> Tensor:
    """Per-class IoU over ``loader`` ((images, masks) batches), reduced
    across DDP ranks; returns a (num_classes,) tensor (NaN for classes absent
    from predictions and masks, and for an ``ignore_index`` class within
    [0, num_classes)). Its nanmean is the mIoU (MeanIoU's and torchmetrics'
    macro average)."""
    device = torch.device(device or next(model.parameters()).device)
    was_training = model.training
    model.eval()
    metric = MeanIoU(num_classes, ignore_index=ignore_index, average="none")
    batches = _progress(loader, _length(loader), "eval", progress and _is_main_process())
    try:
        for batch in batches:
            images, masks = _to(batch, device, channels_last)
            with _autocast(device, amp):
                metric.update(logits_of(model(images)).float(), masks)
    finally:
        model.train(was_training)
    iou = metric.compute()
    if ignore_index is not None and 0 <= ignore_index < num_classes:
        # average='none' reports the ignored class (0 where it was predicted);
        # the means leave it out, and so must the nanmean
        iou[ignore_index] = float("nan")
    return iou


@torch.no_grad()
def evaluate_detection(model: nn.Module, loader: Iterable, *,
                       iou_type=("bbox", "segm"), device: torch.device | str | None = None,
                       amp: str | None = None, progress: bool = False) -> dict[str, Tensor]:
    """COCO-style AP/AR of a detector over ``loader`` (detection batches:
    lists of images and target dicts), with
    :class:`segops.metrics.MeanAveragePrecision` (pycocotools' numbers):
    returns its dict (``bbox_map``, ``bbox_map_50``, ``segm_map``, ...)."""
    from .metrics import MeanAveragePrecision
    device = torch.device(device or next(model.parameters()).device)
    was_training = model.training
    model.eval()
    metric = MeanAveragePrecision(iou_type=iou_type)
    batches = _progress(loader, _length(loader), "eval", progress and _is_main_process())
    try:
        for batch in batches:
            images, targets = _to(batch, device, False)
            with _autocast(device, amp):
                predictions = model(images)
            metric.update(predictions, targets)
    finally:
        model.train(was_training)
    return metric.compute()


def _length(loader) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def fit(model: nn.Module, loader: Iterable, loss: Callable | None = None, epochs: int = 1, *,
        optimizer: torch.optim.Optimizer | None = None, lr: float = 1e-3,
        device: torch.device | str | None = None, amp: str | None = None,
        channels_last: bool = False, val_loader: Iterable | None = None,
        num_classes: int | None = None, ignore_index: int | None = None,
        progress: bool = True, aux_weight: float = 0.0,
        on_epoch_end: Callable[[dict], None] | None = None) -> list[dict]:
    """Train ``model`` for ``epochs`` over ``loader`` ((images, masks)
    batches) with ``loss(logits, masks)``, or over detection batches (lists
    of images and target dicts, ``loss`` None: the model's loss dict summed).

    Args:
        optimizer: defaults to AdamW(lr).
        amp: None, 'bf16' or 'fp16' (autocast; fp16 adds a GradScaler).
        channels_last: move the model and each batch to channels_last.
        val_loader, num_classes: evaluate mIoU after each epoch
            (segmentation only; evaluate detectors with
            :func:`evaluate_detection`).
        ignore_index: the mask label that validation leaves out (a void
            label such as 255, or a class), as :func:`evaluate`.
        progress: a tqdm bar per epoch (rank 0 only).
        aux_weight: weight of the 'aux' output's loss (see train_step).
        on_epoch_end: called with each epoch's record.
    Works on a DDP-wrapped model (the sampler's set_epoch is called when the
    loader has one). Returns one record per epoch: {'epoch', 'loss'
    (mean over batches, those of every DDP rank; NaN without any), 'miou'
    and 'iou' when validated}.
    """
    device = torch.device(device or next(model.parameters()).device)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    history = []
    for epoch in range(epochs):
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        model.train()
        total, steps = 0.0, 0
        bar = _progress(loader, _length(loader), f"epoch {epoch + 1}/{epochs}",
                        progress and _is_main_process())
        for batch in bar:
            images, masks = _to(batch, device, channels_last)
            total += train_step(model, images, masks, loss, optimizer, amp=amp, scaler=scaler,
                                aux_weight=aux_weight)
            steps += 1
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{total / steps:.4f}")
        # the mean over every rank's batches (NaN for an epoch without any)
        record = {"epoch": epoch + 1, "loss": _mean_over_ranks(total, steps)}
        if val_loader is not None and num_classes is not None and loss is not None:
            iou = evaluate(model, val_loader, num_classes, device=device, amp=amp,
                           channels_last=channels_last, ignore_index=ignore_index)
            record.update(iou=iou.tolist(), miou=float(iou.nanmean()))
        history.append(record)
        if on_epoch_end is not None:
            on_epoch_end(record)
    return history
