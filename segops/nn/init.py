"""Weight initialisations the segmentation models use."""
from __future__ import annotations

import torch
from torch import Tensor


def bilinear_kernel(size: int, dtype=torch.float32) -> Tensor:
    """(size, size) bilinear interpolation kernel: the weights of a transposed
    convolution with stride (size + 1) // 2 that up-samples bilinearly."""
    factor = (size + 1) // 2
    centre = factor - 1 if size % 2 == 1 else factor - 0.5
    ramp = 1 - (torch.arange(size, dtype=torch.float64) - centre).abs() / factor
    return torch.outer(ramp, ramp).to(dtype)


@torch.no_grad()
def bilinear_upsampling_(weight: Tensor) -> Tensor:
    """Fill a transposed convolution's weight ``(C_in, C_out / groups, K, K)``
    so that it up-samples each channel bilinearly, as FCN initialises its
    deconvolution layers (Long et al.): channel i to channel i, zero
    elsewhere; with one output channel per group (depthwise), every filter.
    Returns ``weight``."""
    if weight.dim() != 4 or weight.shape[-1] != weight.shape[-2]:
        raise ValueError(f"weight must be (C_in, C_out / groups, K, K), got {tuple(weight.shape)}")
    kernel = bilinear_kernel(weight.shape[-1], weight.dtype).to(weight.device)
    weight.zero_()
    if weight.shape[1] == 1:
        weight[:, 0] = kernel
        return weight
    for i in range(min(weight.shape[0], weight.shape[1])):
        weight[i, i] = kernel
    return weight
