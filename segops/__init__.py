"""segops: Triton kernels for segmentation, as autograd-aware PyTorch ops.

``segops.ops`` (functional), ``segops.nn`` (modules and losses),
``segops.metrics`` (stateful metrics). See README.md for the op table.
"""
import re as _re

import torch as _torch

#: The oldest torch segops runs on (setup.py's floor): torch.library reads
#: the custom ops' ``list[Tensor]`` / ``Tensor | None`` annotations (postponed,
#: ``from __future__ import annotations``) from 2.7 on; 2.4-2.6 fail in
#: ``infer_schema`` while segops is imported.
MIN_TORCH = (2, 7)


def _require_torch(version: str) -> None:
    """Raise ImportError naming both versions when ``version`` (torch's
    ``__version__``, e.g. '2.7.1+cu126') is older than MIN_TORCH."""
    found = _re.match(r"(\d+)\.(\d+)", version)
    if found is None or tuple(map(int, found.groups())) < MIN_TORCH:
        raise ImportError(f"segops needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]}, "
                          f"found torch {version}")


_require_torch(_torch.__version__)

from . import metrics, models, nn, ops  # noqa: E402
from ._checks import ArgumentError, ArgumentTypeError  # noqa: E402
from ._dispatch import path_for  # noqa: E402
from .nn.convert import convert_model, revert_model  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ArgumentError", "ArgumentTypeError", "convert_model", "metrics", "models", "nn",
           "ops", "path_for", "revert_model"]
