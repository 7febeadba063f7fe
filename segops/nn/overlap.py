"""Dice and Jaccard losses as modules, constructor-compatible with
segmentation-models-pytorch (``smp.losses.DiceLoss`` / ``JaccardLoss``)."""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor
from torch.nn.modules.loss import _Loss

from .._checks import ArgumentError, check_choice
from ..ops import overlap as F


class _OverlapLoss(_Loss):  # as smp's losses: isinstance(loss, _Loss)
    # read at every call, as smp's losses read their attributes: setting
    # ``loss.smooth = 1.0`` after construction takes effect
    OPTIONS = ("classes", "log_loss", "from_logits", "smooth", "ignore_index", "eps", "batch",
               "include_background", "squared_pred", "class_weights", "skip_empty",
               "intersection", "reduction", "validate_args")

    def __init__(self, mode: str, classes: Sequence[int] | None = None, log_loss: bool = False,
                 from_logits: bool = True, smooth: float = 0.0, ignore_index: int | None = None,
                 eps: float = 1e-7, class_weights=None, *, batch: bool = True,
                 include_background: bool = True, squared_pred: bool = False,
                 skip_empty: bool = True, intersection: str = "min", reduction: str = "mean",
                 validate_args: bool = True):
        super().__init__()
        check_choice("mode", mode, F.MODES)
        if classes is not None and mode == "binary":
            raise ArgumentError("classes cannot be used with mode='binary'")
        self.mode = mode
        self.__dict__.update(classes=classes, log_loss=log_loss, from_logits=from_logits,
                             smooth=smooth, ignore_index=ignore_index, eps=eps, batch=batch,
                             include_background=include_background, squared_pred=squared_pred,
                             class_weights=class_weights, skip_empty=skip_empty,
                             intersection=intersection, reduction=reduction,
                             validate_args=validate_args)

    def __setstate__(self, state: dict) -> None:
        # modules pickled before the options became attributes held them in a dict
        state = dict(state)
        state.update(state.pop("options", {}))
        super().__setstate__(state)

    @property
    def options(self) -> dict:
        """The keyword arguments each call passes to the functional loss."""
        return {name: getattr(self, name) for name in self.OPTIONS}

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, " + ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class DiceLoss(_OverlapLoss):
    """Soft Dice loss on the fused overlap kernel; see :func:`segops.ops.dice_loss`.

    ``DiceLoss(mode, classes=None, log_loss=False, from_logits=True, smooth=0.0,
    ignore_index=None, eps=1e-7, class_weights=None)`` is smp's (0.6)
    constructor; the MONAI-style options are keyword-only. Shapes, smp's:
    ``y_pred (N, C, *spatial)`` (binary: ``(N, 1, *spatial)`` or
    ``(N, *spatial)``); ``y_true`` ``(N, *spatial)`` or ``(N, 1, *spatial)``
    (binary/multiclass) or ``(N, C, *spatial)`` (multilabel). Returns a
    scalar with ``reduction='mean'``.
    """

    def forward(self, y_pred: Tensor, y_true: Tensor) -> Tensor:
        # F.dice_loss (not a bound copy): the name torch.fx.wrap patches
        return F.dice_loss(y_pred, y_true, self.mode, **self.options)


class JaccardLoss(_OverlapLoss):
    """Soft Jaccard (IoU) loss on the fused overlap kernel; see
    :func:`segops.ops.jaccard_loss`.

    Same constructor as :class:`DiceLoss`, which is smp's (0.6)
    ``JaccardLoss(mode, classes, log_loss, from_logits, smooth, ignore_index,
    eps, class_weights)``.
    """

    def forward(self, y_pred: Tensor, y_true: Tensor) -> Tensor:
        return F.jaccard_loss(y_pred, y_true, self.mode, **self.options)
