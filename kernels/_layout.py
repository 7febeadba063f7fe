"""Helpers the launchers share: how a tensor's memory is walked, grids."""
from __future__ import annotations

import functools
import math
import os
import struct

import torch
import triton.language as tl

from .._checks import ArgumentError, accumulation_dtype

# CUDA's launch limits: 2^31 - 1 programs on grid axis 0, 65535 on axes 1, 2
MAX_GRID = (2**31 - 1, 65535, 65535)
# the smallest tile any config uses: grids built from META are largest with it
_SMALLEST_META = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "BLOCK_C": 1, "BLOCK_P": 1}

# Tests set SEGOPS_POISON_OUTPUTS=1 so that outputs start as NaN (or -1 for
# integers): an element a kernel forgets to write then fails the comparison.
_POISON = os.environ.get("SEGOPS_POISON_OUTPUTS", "0") == "1"


def _poisoned(t: torch.Tensor) -> torch.Tensor:
    if _POISON:
        t.fill_(float("nan") if t.dtype.is_floating_point else -1)
    return t


def empty(*shape, **kwargs) -> torch.Tensor:
    """torch.empty for kernel outputs (poisoned under the tests)."""
    return _poisoned(torch.empty(*shape, **kwargs))


def empty_like(t: torch.Tensor, **kwargs) -> torch.Tensor:
    """torch.empty_like for kernel outputs (poisoned under the tests)."""
    return _poisoned(torch.empty_like(t, **kwargs))


def flatten_trailing(t: torch.Tensor, start: int) -> torch.Tensor:
    """View ``t`` with dims ``start:`` merged into one, without copying when
    the strides allow it (contiguous NCHW, channels_last, channels_last_3d,
    channel slices) and with one copy otherwise.

    Kernels then address element (n, c, s) as n*stride0 + c*stride1 + s*stride2,
    which is the same code for every memory format.
    """
    trailing = 1
    for size in t.shape[start:]:
        trailing *= size
    shape = tuple(t.shape[:start]) + (trailing,)
    try:
        return t.view(shape)
    except RuntimeError:
        return t.contiguous().view(shape)


@functools.lru_cache(maxsize=None)
def multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """How many programs a reduction grid should aim for: a few waves on a GPU,
    a handful in the interpreter (enough to exercise several program ids)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return 4 * multiprocessor_count(index)
    return 4


def tl_accumulation(dtype: torch.dtype):
    """The Triton accumulator dtype for inputs of ``dtype``: segops._checks'
    rule (float64 for float64, float32 otherwise, never a half type)."""
    return tl.float64 if accumulation_dtype(dtype) == torch.float64 else tl.float32


@functools.cache
def device_table(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small constant table (a tuple of numbers, or of equal-length tuples)
    as a tensor on ``device``, built once per distinct content: a fresh
    ``torch.tensor(..., device=cuda)`` is a pageable copy that blocks the host
    on every call and cannot be captured in a CUDA graph. The key is the
    content itself, so a hit is always exact. (Only a table's first use
    copies; a graph captured after warm-up keeps using the cached tensor.)
    Never evicted: a captured graph holds the table's address, and an
    evicted table's memory would be reused under it. The contents are
    geometry (sizes, strides, scales, tap bounds), never addresses or data,
    so the cache grows with the distinct shapes a process runs, a few
    hundred bytes each."""
    return torch.tensor(values, dtype=dtype, device=device)


def block_size(n: int, cap: int, floor: int = 1) -> int:
    """The launchers' one tile rule: ``n`` rounded up to a power of 2, at
    least ``floor`` (tl.dot needs 16) and at most ``cap``."""
    return min(max(next_pow2(n), floor), cap)


def next_pow2(n: int) -> int:
    """The smallest power of 2 >= n (1 for n <= 1), in plain Python: Triton's
    own is a ConstexprFunction, several microseconds a call from the host."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def offset_type(*tensors: torch.Tensor):
    """tl.int32 when every element of ``tensors`` lies less than 2^31
    elements from its first one (the kernels' per-element offsets then fit
    32 bits, one instruction a product instead of three), else tl.int64."""
    span = max(sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
               for t in tensors if t.numel() > 0) if any(t.numel() for t in tensors) else 0
    return tl.int32 if span < 2**31 else tl.int64


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host ints (triton.cdiv costs what next_pow2's note says)."""
    return -(-a // b)


def check_grid(grid) -> None:
    """Raise a clear error (before any launch) when a grid, or a grid function
    of META at the smallest tile, exceeds CUDA's per-axis limits."""
    sizes = grid(_SMALLEST_META) if callable(grid) else grid
    for axis, (size, limit) in enumerate(zip(sizes, MAX_GRID)):
        if size > limit:
            raise ArgumentError(
                f"segops: this call needs {size} programs on grid axis {axis}, past CUDA's "
                f"limit of {limit}; the problem is too large for one launch (split the batch "
                "or the channels)")


def double_bits(value: float) -> int:
    """The 64 bits of a Python float as a signed int64 (a kernel argument
    that keeps every digit of a double; Triton would pass a float as float32)."""
    return struct.unpack("<q", struct.pack("<d", value))[0]


def float_bits(value: float) -> int:
    """The 32 bits of ``value`` rounded to float32 (to nearest, as torch
    casts; past float32's range, infinity) as a signed int32."""
    try:
        packed = struct.pack("<f", value)
    except OverflowError:   # rounds past float32's largest finite value
        packed = struct.pack("<f", math.copysign(math.inf, value))
    return struct.unpack("<i", packed)[0]


def scalar_bits(value: float, dtype: torch.dtype) -> int:
    """A Python float as the kernels take it: the bit pattern of ``value``
    rounded to ``dtype`` (float64 or float32, as torch casts a Python scalar
    for a tensor of that dtype), read back in the kernel by
    ``_math.from_bits``. Triton would pass a Python float as float32, losing
    float64 digits."""
    if dtype == torch.float64:
        return double_bits(value)
    return float_bits(value)
