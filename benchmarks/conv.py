"""Atrous convolution benchmarks against cuDNN (F.conv2d with
cudnn.benchmark=True) at DeepLab's dilated shapes (DESIGN.md): ASPP at output
stride 16 and 8, dilated ResNet layer3/layer4, and one non-dilated control.
fp32 (TF32 on both sides, PyTorch's default for convolutions) and bf16,
channels_last and NCHW, forward and forward+backward (input and weight
gradients). TFLOP/s count the nominal 2*N*OH*OW*C_out*C_in*KH*KW/groups
multiply-adds per pass (x3 for forward+backward), padding taps included. The
depthwise row is memory-bound: its TFLOP/s and roofline fraction say little,
its time and speedup are what count.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

import segops

from . import harness
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


def run(quick: bool = False) -> list[Record]:
    records = []
    layouts = (True,) if quick else (True, False)
    for (name, N, C_in, size, C_out, k, d, groups), dtype, channels_last in itertools.product(
            QUICK_SHAPES if quick else SHAPES, DTYPES, layouts):
        x, w = _tensors(N, C_in, size, C_out, k, groups, dtype, channels_last)
        shape = f"{name} {N}x{C_in}x{size}^2->{C_out}" + (" cl" if channels_last else "")
        flops = 2 * N * size * size * C_out * (C_in // groups) * k * k
        peak = _roofline(dtype)
        records += harness.fwd_bwd_records("atrous_conv2d", shape, dtype, x, w,
                                           _providers(d, groups), flops, peak)
        del x, w
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return records
