"""Stateful segmentation metrics over a confusion matrix (update / compute /
reset), summed across ranks under torch.distributed."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import check_int
from ..ops import overlap as F


def _reduction_device(device: torch.device, backend: str) -> torch.device:
    """Where every rank sums its state: on the current GPU whenever the
    backend sends CUDA tensors to NCCL ('nccl', 'cpu:gloo,cuda:nccl', or
    'undefined': init_process_group's default) and CUDA is available, the
    same answer on every rank, so a rank that never called update (its
    state still on the CPU) joins the same collective as the others."""
    if ("nccl" in backend or backend == "undefined") and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _distributed() -> bool:
    """Whether a default process group of more than one rank is running."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _ConfusionMetric:
    _score = None
    zero_division = math.nan   # what a metric pickled before the option reads

    def __init__(self, num_classes: int, ignore_index: int | None = None,
                 average: str | None = "macro", *, zero_division: float = math.nan,
                 validate_args: bool = True):
        """Args:
            num_classes: C; labels lie in [0, C).
            ignore_index: target label whose pixels are not counted (for
                MeanIoU, a class in [0, C) is also left out of the macro
                and micro averages, like torchmetrics).
            average: 'micro', 'macro' (classes absent from prediction and
                target are left out), 'weighted' or 'none' / None (per
                class).
            zero_division: 0, 1 or NaN (default): the score of a class
                absent from prediction and target in 'none', and of
                'micro' with nothing counted (torchmetrics: 0).
            validate_args: check label ranges on every update (on CUDA a
                device-side assert, without a host sync).
        """
        num_classes = check_int("num_classes", num_classes, minimum=1)
        self.num_classes = num_classes
        self.ignore_index = F._check_ignore_index(ignore_index)
        self.average = F._check_average(average)
        self.zero_division = F._check_zero_division(zero_division)
        self.validate_args = validate_args
        self.confusion = torch.zeros((num_classes, num_classes), dtype=torch.int64)
        self._counted = False  # whether self.confusion holds counts to keep

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch: ``pred`` labels ``(N, *spatial)`` or scores
        ``(N, C, *spatial)``, ``target`` labels ``(N, *spatial)``."""
        counts = F.confusion_matrix(pred, target, self.num_classes, self.ignore_index,
                                    validate_args=self.validate_args)
        if self.confusion.device != counts.device:
            # counts already accumulated move along (a copy from the host
            # waits for it); an empty state is made anew on counts' device
            self.confusion = (self.confusion.to(counts.device) if self._counted
                              else torch.zeros_like(counts))
        self.confusion += counts
        self._counted = True

    def compute(self) -> Tensor:
        """The score over everything seen since the last reset, on every rank."""
        # the local state itself when there is nothing to sum: the score
        # reads it and writes nothing (one copy fewer per call)
        confusion = self.synced_confusion() if _distributed() else self.confusion
        return type(self)._score(confusion, self.average, ignore_index=self.ignore_index,
                                 zero_division=self.zero_division)

    def synced_confusion(self) -> Tensor:
        """The confusion matrix summed over all ranks of the default group (a
        copy; the local state is left as is, so compute() can be called twice).
        Under NCCL every rank sums on, and gets the result on, the current
        GPU (see ``_reduction_device``)."""
        dist = torch.distributed
        if not _distributed():
            return self.confusion.clone()
        device = _reduction_device(self.confusion.device, str(dist.get_backend()))
        confusion = self.confusion.to(device, copy=True)
        dist.all_reduce(confusion, op=dist.ReduceOp.SUM)
        return confusion

    def reset(self) -> None:
        self.confusion.zero_()
        self._counted = False

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_classes={self.num_classes}, "
                f"ignore_index={self.ignore_index}, average={self.average!r}, "
                f"zero_division={self.zero_division})")


class MeanIoU(_ConfusionMetric):
    """Mean intersection over union (``average='macro'``) accumulated in int64
    over batches; see :func:`segops.ops.iou_score` for the averages. Gives
    torchmetrics' ``MulticlassJaccardIndex`` numbers, except that a division
    by zero (a class absent from prediction and target in ``'none'``) is NaN
    by default: ``zero_division=0`` gives torchmetrics' 0.

    Not ``torchmetrics.segmentation.MeanIoU``, despite the name: that one
    takes one-hot ``(N, C, *spatial)`` input by default (here an integer
    tensor of that shape reads as labels of a volume, ``(N, *spatial)``)
    and averages per-image scores, where this one scores the confusion
    matrix of everything seen."""
    _score = staticmethod(F.iou_score)


class DiceScore(_ConfusionMetric):
    """Dice / F1 score accumulated over batches; see
    :func:`segops.ops.dice_score`. torchmetrics' ``MulticlassF1Score``
    numbers; not ``torchmetrics.segmentation.DiceScore`` (one-hot input by
    default, per-image scores averaged): see :class:`MeanIoU`."""
    _score = staticmethod(F.dice_score)
