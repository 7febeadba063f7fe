"""Memory-format rules the ops share (pure torch, so the kernels, the fake
kernels and the references agree without importing triton)."""
from __future__ import annotations

import torch


def is_channels_last(t: torch.Tensor) -> bool:
    """Dense in channels_last and not also contiguous (a tensor with one
    channel or 1x1 maps is both; it then counts as contiguous, like ATen)."""
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """The format an op's output takes from its input ``t``."""
    return torch.channels_last if is_channels_last(t) else torch.contiguous_format
