"""Re-typing a module in place of another, sharing its state."""
from __future__ import annotations

from torch import nn

from .. import _checks


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
    """The detection modules' ``__prepare_scriptable__`` (torch.jit.script
    calls it on every submodule first): their forwards call segops' ops
    among much else TorchScript cannot compile. Returning the torchvision
    twin here would work, but torch sets it into the parent module, so
    scripting would silently revert the caller's model."""
    _checks.refuse_script(f"segops' {type(module).__name__}")
