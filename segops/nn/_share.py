"""Re-typing a module in place of another, sharing its state."""
from __future__ import annotations

from torch import nn


def retype(module: nn.Module, cls: type) -> nn.Module:
    """``module`` as an instance of ``cls``, sharing its parameters, buffers,
    submodules and hooks (a shallow copy of its state, no tensor copied).
    The parameter, buffer and submodule dicts are copied, so a later swap of
    a child in one of the two does not show in the other."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    for name in ("_parameters", "_buffers", "_modules"):
        new.__dict__[name] = type(module.__dict__[name])(module.__dict__[name])
    return new



def refuse_script(module: nn.Module):
    """The layers' ``__prepare_scriptable__`` (torch.jit.script calls it on
    each submodule first): TorchScript cannot compile segops' ops (Python
    argument checks around torch.library custom ops). Returning the torch
    twin here would work, but torch then sets it into the parent module, so
    scripting would silently revert the caller's model: the error names the
    explicit way instead."""
    from .._checks import ArgumentTypeError
    raise ArgumentTypeError(
        f"torch.jit.script cannot compile segops' {type(module).__name__} (its ops are Python). "
        "A model converted with segops.convert_model: script "
        "segops.revert_model(model, inplace=False).model, the same function on ATen's / "
        "torchvision's ops with the parameters shared. Any model: torch.compile or "
        "torch.export, which keep segops' kernels")
