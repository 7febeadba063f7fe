"""Argument checks shared by every op. They raise ``ArgumentError`` /
``ArgumentTypeError`` naming the argument (never ``assert``, which
``python -O`` removes), before any work is done."""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch._C._functorch import peek_interpreter_stack
from torch.autograd import forward_ad


class ArgumentError(ValueError, RuntimeError):
    """A bad argument value. Also a RuntimeError, so code written against
    the ATen op it replaces (F.conv2d raises RuntimeError) still catches it."""


class ArgumentTypeError(TypeError, RuntimeError):
    """A bad argument type or dtype; also a RuntimeError (see ArgumentError)."""


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


def refuse_forward_ad(op: str, *tensors) -> None:
    """Raise where a forward-mode tangent would be lost: segops' custom ops
    have no forward-mode derivative, and both ``torch.func.jvp`` / ``jacfwd``
    / ``hessian`` and ``torch.autograd.forward_ad`` dual tensors among
    ``tensors`` (the op's differentiable inputs; lists of them too) would
    give the outputs no tangent without a word. A C call and an attribute
    read when neither is active. Not under torch.compile: a compiled jvp
    over these ops still gives a zero tangent (the check is skipped while
    tracing)."""
    if torch.compiler.is_compiling():
        return
    if _has_tangent(tensors) or _inside_jvp():
        raise NotImplementedError(
            f"segops.ops.{op} has no forward-mode derivative (torch.autograd.forward_ad, "
            "torch.func.jvp, jacfwd, hessian): use backward() or torch.autograd.grad, or "
            "revert_model")


def _has_tangent(tensors) -> bool:
    """Whether any tensor (or tensor in a list) is a forward_ad dual tensor
    of the current dual level."""
    if forward_ad._current_level < 0:
        return False
    for t in tensors:
        items = t if isinstance(t, (list, tuple)) else (t,)
        if any(isinstance(i, torch.Tensor) and forward_ad.unpack_dual(i).tangent is not None
               for i in items):
            return True
    return False


def _inside_jvp() -> bool:
    if peek_interpreter_stack() is None:
        return False
    from torch._functorch.pyfunctorch import JvpInterpreter, retrieve_all_functorch_interpreters
    return any(isinstance(i, JvpInterpreter) for i in retrieve_all_functorch_interpreters())


def refuse_script(what: str) -> None:
    """Raise the error of torch.jit.script meeting ``what``: TorchScript
    cannot compile segops' ops (Python argument checks around torch.library
    custom ops). Each public op function has this as its
    ``__prepare_scriptable__`` (TorchScript calls it when it compiles a call
    to the function, so a segops layer a scripted model holds but never calls
    is no error), and so do the detection modules."""
    raise ArgumentTypeError(
        f"torch.jit.script cannot compile {what} (segops' ops are Python). A model converted "
        "with segops.convert_model: script segops.revert_model(model, inplace=False).model, "
        "an independent copy on ATen's / torchvision's ops (script it again after further "
        "training). Any model: torch.compile or torch.export, which keep segops' kernels")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums of ``dtype`` values accumulate in: float64 for float64,
    float32 for everything else (fp16/bf16 never accumulate in themselves)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_tensor(name: str, value, *, dims: Sequence[int] | None = None,
                 dtypes: Sequence[torch.dtype] | None = None) -> None:
    if not isinstance(value, torch.Tensor):
        raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dims is not None and value.dim() not in dims:
        want = " or ".join(str(d) for d in dims)
        raise ArgumentError(
            f"{name} must have {want} dimensions, got shape {tuple(value.shape)}"
        )
    if dtypes is not None and value.dtype not in dtypes:
        want = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ArgumentTypeError(f"{name} must have dtype in ({want}), got {value.dtype}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ArgumentError(f"all tensors must be on one device, got {listing}")


def check_choice(name: str, value, choices: Sequence) -> None:
    try:
        known = value in choices
    except TypeError:  # e.g. an unhashable or tensor value
        known = False
    if not known:
        raise ArgumentError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def is_int(value) -> bool:
    """A Python or numpy integer (not a bool), as the peers accept."""
    if type(value) is int:  # the common case, without the ABC check's cost
        return True
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name: str, value, *, minimum: int | None = None,
              maximum: int | None = None) -> int:
    """``value`` as an int; numpy integers and 0-d integer tensors are accepted."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point() \
            and value.dtype != torch.bool:
        value = int(value)
    if not is_int(value):
        raise ArgumentTypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ArgumentError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ArgumentError(f"{name} must be <= {maximum}, got {value}")
    return value


def int_pair(name: str, value, minimum: int, maximum: int | None = None) -> list[int]:
    """An int or a 1- or 2-sequence of ints (numpy ints too) as a list of two,
    each >= ``minimum`` (and <= ``maximum``), like F.conv2d's arguments."""
    if is_int(value):
        value = (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 1:
        value = (value[0], value[0])
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(is_int(v) for v in value)):
        raise ArgumentTypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    value = [int(v) for v in value]
    if min(value) < minimum:
        kind = {0: "non-negative", 1: "positive"}.get(minimum, f">= {minimum}")
        raise ArgumentError(f"{name} must be {kind}, got {tuple(value)}")
    if maximum is not None and max(value) > maximum:
        raise ArgumentError(f"{name} must be <= {maximum}, got {tuple(value)}")
    return value


def values_checked_on_device(t: torch.Tensor) -> bool:
    """Whether a check of the values of ``t`` is an asynchronous assert on
    its device (``torch._assert_async``: a RuntimeError with the message)
    rather than a read on the host (an ArgumentError naming the value): on
    CUDA, where the read would wait for the GPU, and while torch.compile
    traces, where it would break the graph (the assert compiles). Elsewhere
    the read is free and the error is clearer."""
    return t.is_cuda or torch.compiler.is_compiling()


def check_number(name: str, value, *, minimum: float | None = None,
                 positive: bool = False) -> float:
    """A finite real number (Python or numpy)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    # comparisons, not math.isfinite: torch.compile(dynamic=True) makes a
    # float argument symbolic, and math.isfinite of it cannot be traced
    if value != value or value in (math.inf, -math.inf):
        raise ArgumentError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ArgumentError(f"{name} must be > 0, got {value}")
    if minimum is not None and value < minimum:
        raise ArgumentError(f"{name} must be >= {minimum}, got {value}")
    return value
