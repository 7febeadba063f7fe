"""Which implementation runs an op (DESIGN.md, "Dispatch").

| input                                              | path                      |
| CUDA tensor                                        | Triton kernel             |
| CPU tensor, TRITON_INTERPRET=1 set before import   | Triton kernel, interpreted|
| anything else                                      | pure-PyTorch reference    |

The interpreter switch is read once, at import, because Triton itself decides
at ``@triton.jit`` time whether a kernel is compiled or interpreted.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import threading

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None

KERNEL = "triton"
INTERPRETER = "triton-interpreter"
REFERENCE = "reference"


_local = threading.local()


@contextlib.contextmanager
def reference_only():
    """Run every op on the pure-PyTorch reference inside the block (CPU tensors
    only: CUDA tensors have no reference path). For debugging and for
    gradcheck of the reference under the interpreter."""
    previous = getattr(_local, "reference_only", False)
    _local.reference_only = True
    try:
        yield
    finally:
        _local.reference_only = previous


def path_for(device: torch.device | str) -> str:
    """Name of the implementation that runs ops on ``device``."""
    device = torch.device(device)
    if device.type == "cpu" and getattr(_local, "reference_only", False):
        return REFERENCE
    if device.type == "cuda":
        return KERNEL
    if device.type == "cpu" and INTERPRET and TRITON_AVAILABLE:
        return INTERPRETER
    return REFERENCE


def uses_kernel(tensor: torch.Tensor) -> bool:
    """True when ``tensor``'s op should run the Triton kernel.

    There is no silent fallback on CUDA: without Triton a CUDA input is an
    error, not a slow path.
    """
    path = path_for(tensor.device)
    if path == KERNEL and not TRITON_AVAILABLE:
        raise RuntimeError(
            "segops: CUDA tensors need Triton, which is not installed "
            "(pip install triton)"
        )
    return path != REFERENCE
