"""Dice/IoU benchmarks: the fused loss against smp's DiceLoss formula run
eagerly (one-hot, softmax, sums) and smp's DiceLoss itself when installed,
and the fused confusion matrix against the torchmetrics
MulticlassJaccardIndex path (the package when installed, its formula
otherwise). Shapes from DESIGN.md. GB/s count the logits and labels read
(forward) plus the gradient written (backward); the roofline is the measured
copy bandwidth. Targets: Dice/IoU loss forward+backward >= 5x, mIoU >= 3x."""
from __future__ import annotations

import functools
import importlib.util
import itertools

import torch

from segops import ops
from segops.reference import overlap as ref

from .cases import Case, Step, dtype_name, run_cases, shared
from .harness import Record, copy_bandwidth_gbs, peak_extra_memory, time_ms

# (N, C, spatial) from DESIGN.md "Dice / IoU"
SHAPES = [
    (16, 21, (512, 512)),
    (4, 150, (512, 512)),
    (2, 4, (128, 128, 128)),
]
QUICK_SHAPES = SHAPES[:1] + SHAPES[2:]
DTYPES = [torch.bfloat16, torch.float32]
DEVICE = "cuda"  # the smoke test runs this module on CPU at tiny sizes
TARGETS = {("dice_loss", "fwd+bwd"): 5.0, ("miou", "fwd"): 3.0}


def _inputs(N, C, spatial, dtype, channels_last):
    x = torch.randn(N, C, *spatial, device=DEVICE, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if len(spatial) == 2
                         else torch.channels_last_3d)
    t = torch.randint(0, C, (N, *spatial), device=DEVICE)
    return x, t


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _loss_providers() -> list[str]:
    names = ["segops", "smp-eager-formula"]
    return names + (["smp.DiceLoss"] if _installed("segmentation_models_pytorch") else [])


def _loss(provider):
    if provider == "segops":
        return lambda x, t: ops.dice_loss(x, t, "multiclass", validate_args=False)
    if provider == "smp-eager-formula":
        return lambda x, t: ref.smp_overlap_loss("dice", x, t, "multiclass")
    from segmentation_models_pytorch.losses import DiceLoss
    return DiceLoss("multiclass")


def _miou_providers() -> list[str]:
    return ["segops", "torchmetrics" if _installed("torchmetrics") else "torchmetrics-formula"]


def _miou(provider, C):
    if provider == "segops":
        return lambda x, t: ops.iou_score(ops.confusion_matrix(x, t, C, validate_args=False))
    if provider == "torchmetrics":
        from torchmetrics.functional.classification import multiclass_jaccard_index
        return lambda x, t: multiclass_jaccard_index(x, t, num_classes=C, validate_args=False)
    return lambda x, t: ref.torchmetrics_jaccard(x, t, C)


def _setup(spec, dtype, channels_last, op, direction, provider) -> Step:
    """One call of ``provider``'s loss (forward, or forward and backward) or
    mIoU (confusion matrix and IoU) on the shape's shared logits and labels."""
    N, C, spatial = spec
    x, t = shared(("overlap", spec, dtype, channels_last, DEVICE),
                  lambda: _inputs(N, C, spatial, dtype, channels_last))
    x_bytes, t_bytes = x.numel() * x.element_size(), t.numel() * t.element_size()

    def peak():  # the module's copy_bandwidth_gbs, looked up when measured
        return copy_bandwidth_gbs()
    if op == "miou":
        miou = _miou(provider, C)
        return Step(lambda: miou(x, t), nbytes=x_bytes + t_bytes, peak=peak)
    loss = _loss(provider)
    if direction == "fwd":
        return Step(lambda: loss(x, t), nbytes=x_bytes + t_bytes, peak=peak)
    xg = x.detach().requires_grad_()

    def step():
        loss(xg, t).backward()
        xg.grad = None
    # forward reads x and t; backward reads them again and writes grad
    return Step(step, nbytes=3 * x_bytes + 2 * t_bytes, peak=peak)


def cases(quick: bool = False) -> list[Case]:
    """Every shape x dtype x layout (quick: two shapes, NCHW only): the loss
    forward and forward+backward, and mIoU, per provider."""
    out = []
    layouts = (False,) if quick else (False, True)
    for spec, dtype, channels_last in itertools.product(
            QUICK_SHAPES if quick else SHAPES, DTYPES, layouts):
        N, C, spatial = spec
        shape = f"{N}x{C}x{'x'.join(map(str, spatial))}"
        rows = [("dice_loss", d, p) for p in _loss_providers() for d in ("fwd", "fwd+bwd")]
        rows += [("miou", "fwd", p) for p in _miou_providers()]
        for op, direction, provider in rows:
            out.append(Case("overlap", op, shape, dtype_name(dtype),
                            "channels_last" if channels_last else "nchw", direction, provider,
                            functools.partial(_setup, spec, dtype, channels_last, op,
                                              direction, provider),
                            target=TARGETS.get((op, direction))))
    return out


def run(quick: bool = False) -> list[Record]:
    """Every case of :func:`cases`, timed by the harness."""
    return run_cases(cases(quick), timer=time_ms, memory=peak_extra_memory)
