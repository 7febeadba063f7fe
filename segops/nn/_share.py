"""Re-typing a module in place of another, sharing its state."""
from __future__ import annotations

from torch import nn


def retype(module: nn.Module, cls: type) -> nn.Module:
    """``module`` as an instance of ``cls``, sharing its parameters, buffers,
    submodules and hooks (a shallow copy of its state, no tensor copied)."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    return new
