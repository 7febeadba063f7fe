"""Weights for the model builders, torchvision's keywords without the
downloads: a ``state_dict`` or the path of one."""
from __future__ import annotations

import torch
from torch import nn


def load_state(weights, name: str = "weights") -> dict:
    """``weights``: a state_dict, or the path of a file ``torch.save`` wrote
    one to. A torchvision ``Weights`` enum (or anything else) is a
    TypeError: segops downloads nothing."""
    if isinstance(weights, (str, bytes)) or hasattr(weights, "__fspath__"):
        weights = torch.load(weights, map_location="cpu", weights_only=True)
    if not isinstance(weights, dict):
        raise TypeError(f"{name} must be a state_dict or the path of one (segops downloads "
                        f"nothing), got {type(weights).__name__}")
    return weights


def load_backbone(backbone: nn.Module, weights_backbone) -> None:
    """An ImageNet ResNet state_dict (or path) into a backbone without the
    classifier: its ``fc`` entries are dropped, the rest must match."""
    state = load_state(weights_backbone, "weights_backbone")
    backbone.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})


def overwrite_param(name: str, given, expected):
    """torchvision's rule for a builder argument that the weights decide:
    None takes the weights' value, anything else must equal it."""
    if given is not None and given != expected:
        raise ValueError(f"The parameter '{name}' expected value {expected} but got {given} "
                         "instead.")
    return expected
