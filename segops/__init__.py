"""segops: Triton kernels for segmentation, as autograd-aware PyTorch ops.

``segops.ops`` (functional), ``segops.nn`` (modules and losses),
``segops.metrics`` (stateful metrics). See README.md for the op table.
"""
from . import metrics, nn, ops
from ._checks import ArgumentError, ArgumentTypeError
from ._dispatch import path_for

__version__ = "0.1.0"
__all__ = ["ArgumentError", "ArgumentTypeError", "metrics", "nn", "ops", "path_for"]
