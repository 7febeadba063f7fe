"""Atrous convolution benchmarks against cuDNN (F.conv2d with
cudnn.benchmark=True) at DeepLab's dilated shapes (DESIGN.md): ASPP at output
stride 16 and 8, dilated ResNet layer3/layer4, and one non-dilated control.
fp32 (TF32 on both sides, PyTorch's default for convolutions) and bf16,
channels_last and NCHW, forward and forward+backward (input and weight
gradients). TFLOP/s count the nominal 2*N*OH*OW*C_out*C_in*KH*KW/groups
multiply-adds per pass (x3 for forward+backward), padding taps included. The
depthwise row is memory-bound: its TFLOP/s and roofline fraction say little,
its time and speedup are what count. Target: >= 1.2x (geomean) on the
dilated shapes.
"""
from __future__ import annotations

import functools
import itertools

import torch
import torch.nn.functional as F

import segops

from . import harness
from .cases import Case, Step, dtype_name, layout_name, run_cases, shared
from .harness import Record, matmul_peak_tflops

# (name, N, C_in, size, C_out, kernel, dilation, groups); stride 1, padding = dilation
SHAPES = [
    *[(f"aspp os16 d{d}", 8, 2048, 33, 256, 3, d, 1) for d in (6, 12, 18)],
    *[(f"aspp os8 d{d}", 8, 2048, 65, 256, 3, d, 1) for d in (12, 24, 36)],
    ("layer3 d2", 8, 256, 65, 256, 3, 2, 1),
    ("layer4 d4", 8, 512, 65, 512, 3, 4, 1),
    ("control d1", 8, 256, 65, 256, 3, 1, 1),
    # DeepLabV3+'s atrous separable convolution: the depthwise half
    ("aspp-sep os16 d12 dw", 8, 2048, 33, 2048, 3, 12, 2048),
]
QUICK_SHAPES = [SHAPES[4], SHAPES[6], SHAPES[8]]
DTYPES = [torch.bfloat16, torch.float32]
DEVICE = "cuda"  # the smoke test runs this module on CPU at tiny sizes
DIRECTIONS = [("fwd", False), ("fwd+bwd", True)]
PROVIDERS = ["segops", "cudnn"]
TARGET = 1.2


def _tensors(N, C_in, size, C_out, k, groups, dtype, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(N, C_in, size, size, device=DEVICE, dtype=dtype).contiguous(memory_format=fmt)
    fan_in = C_in // groups * k * k
    w = torch.randn(C_out, C_in // groups, k, k, device=DEVICE, dtype=dtype) / fan_in ** 0.5
    return x, w.contiguous(memory_format=fmt)


def _providers(dilation, groups):
    return {
        "segops": lambda x, w: segops.ops.atrous_conv2d(x, w, None, 1, dilation, dilation,
                                                        groups),
        "cudnn": lambda x, w: F.conv2d(x, w, None, 1, dilation, dilation, groups),
    }


def _roofline(dtype) -> float | None:
    return matmul_peak_tflops(dtype) if DEVICE == "cuda" else None


def _setup(spec, dtype, channels_last, backward, provider) -> Step:
    """One call of ``provider``'s convolution (and its backward) on the
    shape's shared input and weight."""
    name, N, C_in, size, C_out, k, d, groups = spec
    x, w = shared(("conv", spec, dtype, channels_last, DEVICE),
                  lambda: _tensors(N, C_in, size, C_out, k, groups, dtype, channels_last))
    x.requires_grad_(backward)
    w.requires_grad_(backward)
    fn = _providers(d, groups)[provider]
    flops = 2 * N * size * size * C_out * (C_in // groups) * k * k
    return Step(harness.forward_backward(lambda: fn(x, w), (x, w), backward),
                flops=flops * (3 if backward else 1), peak=lambda: _roofline(dtype))


def cases(quick: bool = False) -> list[Case]:
    """Every shape x dtype x layout (quick: three shapes, channels_last) x
    pass x provider."""
    out = []
    layouts = (True,) if quick else (True, False)
    for spec, dtype, channels_last in itertools.product(
            QUICK_SHAPES if quick else SHAPES, DTYPES, layouts):
        name, N, C_in, size, C_out, k, d, groups = spec
        shape = f"{name} {N}x{C_in}x{size}^2->{C_out}"
        for (direction, backward), provider in itertools.product(DIRECTIONS, PROVIDERS):
            out.append(Case("conv", "atrous_conv2d", shape, dtype_name(dtype),
                            layout_name(channels_last), direction, provider,
                            functools.partial(_setup, spec, dtype, channels_last, backward,
                                              provider),
                            target=TARGET if d > 1 else None))
    return out


def run(quick: bool = False) -> list[Record]:
    return run_cases(cases(quick))
