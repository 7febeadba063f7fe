"""Transposed convolution benchmarks against cuDNN (F.conv_transpose2d with
cudnn.benchmark=True) at the design's shapes: U-Net's 2x2 stride-2
up-convolutions at four levels, FCN-8s's upscore layers (k4 s2 and k16 s8,
21 classes), Mask R-CNN's mask-head up-convolution (256 RoIs of 14x14, k2
s2) and a decoder layer with overlap (k3 s2 p1 output_padding 1). fp32
(TF32 on both sides, PyTorch's default) and bf16, channels_last and NCHW,
forward and forward+backward. TFLOP/s count 2*N*H*W*C_in*C_out*KH*KW/groups
per pass (x3 for forward+backward). Targets: >= 1.5x where kernel == stride,
>= 1.0x with overlap.
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

# (name, N, C_in, size, C_out, kernel, stride, padding, output_padding)
SHAPES = [
    *[(f"unet up {c}@{s}", 4, c, s, c // 2, 2, 2, 0, 0)
      for c, s in ((1024, 32), (512, 64), (256, 128), (128, 256))],
    ("fcn8s upscore2", 1, 21, 16, 21, 4, 2, 0, 0),
    ("fcn8s upscore8", 1, 21, 70, 21, 16, 8, 0, 0),
    ("maskrcnn mask", 256, 256, 14, 256, 2, 2, 0, 0),
    ("decoder overlap", 1, 512, 128, 256, 3, 2, 1, 1),
]
QUICK_SHAPES = [SHAPES[1], SHAPES[6], SHAPES[7]]
DTYPES = [torch.bfloat16, torch.float32]
DEVICE = "cuda"  # the smoke test runs this module on CPU at tiny sizes
DIRECTIONS = [("fwd", False), ("fwd+bwd", True)]
PROVIDERS = ["segops", "cudnn"]


def _tensors(N, C_in, size, C_out, k, dtype, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(N, C_in, size, size, device=DEVICE, dtype=dtype).contiguous(memory_format=fmt)
    w = torch.randn(C_in, C_out, k, k, device=DEVICE, dtype=dtype) / (C_in * k * k) ** 0.5
    return x, w.contiguous(memory_format=fmt)


def _providers(stride, padding, output_padding):
    return {
        "segops": lambda x, w: segops.ops.conv_transpose2d(x, w, None, stride, padding,
                                                           output_padding),
        "cudnn": lambda x, w: F.conv_transpose2d(x, w, None, stride, padding, output_padding),
    }


def _roofline(dtype) -> float | None:
    return matmul_peak_tflops(dtype) if DEVICE == "cuda" else None


def _setup(spec, dtype, channels_last, backward, provider) -> Step:
    """One call of ``provider``'s transposed convolution (and its backward)
    on the shape's shared input and weight."""
    name, N, C_in, size, C_out, k, s, p, op = spec
    x, w = shared(("conv_transpose", spec, dtype, channels_last, DEVICE),
                  lambda: _tensors(N, C_in, size, C_out, k, dtype, channels_last))
    x.requires_grad_(backward)
    w.requires_grad_(backward)
    fn = _providers(s, p, op)[provider]
    flops = 2 * N * size * size * C_in * C_out * k * k
    return Step(harness.forward_backward(lambda: fn(x, w), (x, w), backward),
                flops=flops * (3 if backward else 1), peak=lambda: _roofline(dtype))


def cases(quick: bool = False) -> list[Case]:
    """Every shape x dtype x layout (quick: three shapes, channels_last) x
    pass x provider."""
    out = []
    layouts = (True,) if quick else (True, False)
    for spec, dtype, channels_last in itertools.product(
            QUICK_SHAPES if quick else SHAPES, DTYPES, layouts):
        name, N, C_in, size, C_out, k, s, p, op = spec
        shape = f"{name} {N}x{C_in}x{size}^2 k{k}s{s}"
        for (direction, backward), provider in itertools.product(DIRECTIONS, PROVIDERS):
            out.append(Case("conv_transpose", "conv_transpose2d", shape, dtype_name(dtype),
                            layout_name(channels_last), direction, provider,
                            functools.partial(_setup, spec, dtype, channels_last, backward,
                                              provider),
                            target=1.5 if k == s else 1.0))
    return out


def run(quick: bool = False) -> list[Record]:
    return run_cases(cases(quick))
