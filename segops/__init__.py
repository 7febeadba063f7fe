"""segops: Triton kernels for segmentation, as autograd-aware PyTorch ops.

``segops.ops`` (functional), ``segops.nn`` (modules and losses),
``segops.metrics`` (stateful metrics). See README.md for the op table.
"""
from . import metrics, models, nn, ops
from ._checks import ArgumentError, ArgumentTypeError
from ._dispatch import path_for
from .nn.convert import convert_model, revert_model

__version__ = "0.1.0"
__all__ = ["ArgumentError", "ArgumentTypeError", "convert_model", "metrics", "models", "nn",
           "ops", "path_for", "revert_model"]
