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
def bilinear_upsampling_(weight: Tensor, groups: int | None = None) -> Tensor:
    """Fill a transposed convolution's weight ``(C_in, C_out / groups, K, K)``
    so that it up-samples each channel bilinearly, as FCN initialises its
    deconvolution layers (Long et al.): input channel i to output channel i,
    zero elsewhere (an input channel with no output channel i in its group
    gets zeros). ``groups``: the layer's (``module.groups``); a weight alone
    does not show it, so without it one output channel per group
    (``C_out / groups == 1``) is taken as depthwise (every filter set) and
    anything else as ``groups=1``. Returns ``weight``."""
    if weight.dim() != 4 or weight.shape[-1] != weight.shape[-2]:
        raise ValueError(f"weight must be (C_in, C_out / groups, K, K), got {tuple(weight.shape)}")
    c_in, c_out_per_group = weight.shape[:2]
    if groups is None:
        groups = c_in if c_out_per_group == 1 else 1
    if not isinstance(groups, int) or groups < 1 or c_in % groups:
        raise ValueError(f"groups must be a positive int dividing C_in = {c_in}, got {groups!r}")
    kernel = bilinear_kernel(weight.shape[-1], weight.dtype).to(weight.device)
    weight.zero_()
    c_in_per_group = c_in // groups
    for i in range(c_in):
        local = i - (i // c_in_per_group) * c_out_per_group  # output channel i in i's group
        if 0 <= local < c_out_per_group:
            weight[i, local] = kernel
    return weight
