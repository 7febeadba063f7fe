"""Which implementation runs an op (DESIGN.md, "Dispatch").

| input                                              | path                       |
| CUDA tensor                                        | Triton kernel              |
| CPU tensor, TRITON_INTERPRET=1 set before import   | Triton kernel, interpreted |
| any other tensor                                   | native: ATen / torchvision |
|                                                    | where an op with the same  |
|                                                    | semantics exists, else the |
|                                                    | pure-PyTorch reference     |
| any non-CUDA tensor inside ``reference_only()``    | the reference              |

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
NATIVE = "native"
REFERENCE = "reference"

_local = threading.local()


@contextlib.contextmanager
def forced_path(path: str):
    """Run every op on non-CUDA tensors through ``path`` (NATIVE or
    REFERENCE) inside the block, whatever TRITON_INTERPRET says. CUDA tensors
    always run the kernels (there is no slow path on the GPU)."""
    if path not in (NATIVE, REFERENCE):
        raise ValueError(f"path must be {NATIVE!r} or {REFERENCE!r}, got {path!r}")
    previous = getattr(_local, "path", None)
    _local.path = path
    try:
        yield
    finally:
        _local.path = previous


def reference_only():
    """Run every op on the pure-PyTorch reference inside the block (non-CUDA
    tensors only). For debugging and for gradcheck of the reference."""
    return forced_path(REFERENCE)


def native_only():
    """Run every op on its native (ATen/torchvision) implementation inside the
    block where one exists, on non-CUDA tensors: what a CPU user gets without
    TRITON_INTERPRET. The tests use it to check that path under the interpreter."""
    return forced_path(NATIVE)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True):
    """torch.use_deterministic_algorithms(enabled) inside the block, restored
    after. It selects segops' deterministic kernels (RoIAlign's gather
    backward, fixed conv tiles and splits)."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def path_for(device: torch.device | str) -> str:
    """Name of the implementation that runs ops on ``device``. NATIVE means
    the ATen/torchvision op for ops that have one and the reference for the
    others (see each op's docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        return KERNEL
    forced = getattr(_local, "path", None)
    if forced is not None:
        return forced
    if device.type == "cpu" and INTERPRET and TRITON_AVAILABLE:
        return INTERPRETER
    return NATIVE


def uses_kernel(tensor: torch.Tensor) -> bool:
    """True when ``tensor``'s op should run the Triton kernel.

    There is no silent fallback on CUDA: without Triton a CUDA input is an
    error, not a slow path. Nor on another GPU than the current one: Triton
    launches on the current device and its stream, while torch's work around
    the launch follows the tensors, unordered with it (wrong answers or an
    illegal address), so that is an error too.
    """
    path = path_for(tensor.device)
    if path == KERNEL and not TRITON_AVAILABLE:
        raise RuntimeError(
            "segops: CUDA tensors need Triton, which is not installed "
            "(pip install triton)"
        )
    # (CUDA not initialised: no real CUDA tensor yet, e.g. the codegen
    # report's captured launches; current_device() would initialise it)
    if path == KERNEL and torch.cuda.is_initialized() \
            and tensor.device.index not in (None, torch.cuda.current_device()):
        from ._checks import ArgumentError
        raise ArgumentError(
            f"segops: tensors on {tensor.device} while the current CUDA device is "
            f"cuda:{torch.cuda.current_device()}: segops' kernels run on the current device; "
            f"call torch.cuda.set_device({tensor.device.index}) or run the call inside "
            f"torch.cuda.device({tensor.device.index})"
        )
    return path in (KERNEL, INTERPRETER)


def uses_native(tensor: torch.Tensor) -> bool:
    """True when an op that has a native (ATen/torchvision) implementation
    should run it for ``tensor``."""
    return path_for(tensor.device) == NATIVE
