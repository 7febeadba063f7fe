"""Dice/IoU benchmarks: the fused loss against smp's DiceLoss formula run
eagerly (one-hot, softmax, sums), and the fused confusion matrix against the
torchmetrics MulticlassJaccardIndex path (the package when installed, its
formula otherwise). Shapes from DESIGN.md."""
from __future__ import annotations

import itertools

import torch

from segops import ops
from segops.reference import overlap as ref

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


def _inputs(N, C, spatial, dtype, channels_last):
    x = torch.randn(N, C, *spatial, device=DEVICE, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if len(spatial) == 2
                         else torch.channels_last_3d)
    t = torch.randint(0, C, (N, *spatial), device=DEVICE)
    return x, t


def _loss_providers():
    def segops_loss(x, t):
        return ops.dice_loss(x, t, "multiclass", validate_args=False)

    def smp_formula(x, t):
        return ref.smp_overlap_loss("dice", x, t, "multiclass")

    providers = {"segops": segops_loss, "smp-eager-formula": smp_formula}
    try:
        from segmentation_models_pytorch.losses import DiceLoss
        providers["smp.DiceLoss"] = DiceLoss("multiclass")
    except ImportError:
        pass
    return providers


def _miou_providers(C):
    def segops_miou(x, t):
        return ops.iou_score(ops.confusion_matrix(x, t, C, validate_args=False))

    providers = {"segops": segops_miou}
    try:
        from torchmetrics.functional.classification import multiclass_jaccard_index

        providers["torchmetrics"] = lambda x, t: multiclass_jaccard_index(
            x, t, num_classes=C, validate_args=False)
    except ImportError:
        providers["torchmetrics-formula"] = lambda x, t: ref.torchmetrics_jaccard(x, t, C)
    return providers


def _record(op, shape, dtype, direction, provider, fn, nbytes):
    ms = time_ms(fn)
    gbs = nbytes / ms / 1e6
    extra = peak_extra_memory(fn) / 2**20
    return Record(op=op, shape=shape, dtype=str(dtype).replace("torch.", ""),
                  direction=direction, provider=provider, ms=ms, gbs=gbs,
                  roofline_fraction=gbs / copy_bandwidth_gbs(), extra_memory_mb=extra)


def run(quick: bool = False) -> list[Record]:
    """Every shape x dtype x layout (quick: two shapes, NCHW only)."""
    records = []
    layouts = (False,) if quick else (False, True)
    for (N, C, spatial), dtype, channels_last in itertools.product(
            QUICK_SHAPES if quick else SHAPES, DTYPES, layouts):
        x, t = _inputs(N, C, spatial, dtype, channels_last)
        shape = f"{N}x{C}x{'x'.join(map(str, spatial))}" + (" cl" if channels_last else "")
        x_bytes, t_bytes = x.numel() * x.element_size(), t.numel() * t.element_size()
        for name, loss in _loss_providers().items():
            records.append(_record("dice_loss", shape, dtype, "fwd", name,
                                   lambda: loss(x, t), x_bytes + t_bytes))
            xg = x.detach().requires_grad_()

            def step():
                loss(xg, t).backward()
                xg.grad = None
            # forward reads x and t; backward reads them again and writes grad
            records.append(_record("dice_loss", shape, dtype, "fwd+bwd", name, step,
                                   3 * x_bytes + 2 * t_bytes))
        for name, miou in _miou_providers(C).items():
            records.append(_record("miou", shape, dtype, "fwd", name,
                                   lambda: miou(x, t), x_bytes + t_bytes))
        del x, t
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return records
