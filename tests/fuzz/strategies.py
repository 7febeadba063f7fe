"""Shared pieces of the property-based fuzz suite (tests/fuzz/test_*.py).

Every fuzz test draws one call (valid or not) per example and checks the
contract of DESIGN.md ("Op contract"): the call gives the peer's result
within the dtype's tolerance, or raises ``segops.ArgumentError`` /
``segops.ArgumentTypeError`` whose message names the offending argument.
Any other exception fails the example.

Budget: ``SEGOPS_FUZZ_EXAMPLES`` sets the number of examples of every fuzz
test (unset: each test's small CI default, seeded, all six files (conv,
conv_transpose, roi_align, overlap, boxes, masks) in about a minute and a
half single-process in the interpreter). The examples are
derandomized (the same ones every run) and no hypothesis database is
written, so CI leaves no files behind::

    python -m pytest -q -p no:xdist tests/fuzz                           # CI
    SEGOPS_FUZZ_EXAMPLES=500 python -m pytest -q -p no:xdist tests/fuzz  # more
"""
from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile

import torch
from helpers import non_contiguous
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

import segops
from segops import _dispatch

SEGOPS_ERRORS = (segops.ArgumentError, segops.ArgumentTypeError)

# hypothesis keeps a cache of constants and writes patches of failing examples
# under .hypothesis/: send them to a temporary directory, removed at exit, so
# a run leaves no files in the checkout
_HOME = tempfile.mkdtemp(prefix="segops-fuzz-hypothesis-")
set_hypothesis_home_dir(_HOME)
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# "layouts" of a tensor argument: memory formats and non-contiguous views
VIEWS = ("contiguous", "channels_last", "stride2", "transposed", "slice")
VECTOR_VIEWS = ("contiguous", "stride2", "transposed", "slice")
# special values mixed into a tensor (besides plain random numbers)
SPECIALS = (None, "nan", "inf", "huge", "tiny", "zeros")


def fuzz_settings(default_examples: int):
    """Seeded, bounded, database-free settings; ``SEGOPS_FUZZ_EXAMPLES``
    overrides the example count."""
    examples = int(os.environ.get("SEGOPS_FUZZ_EXAMPLES", default_examples))
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


# --------------------------------------------------------------------------
# paths
# --------------------------------------------------------------------------
PATHS = ("kernel", "native", "reference")


def on_path(path: str):
    """The kernel path is the tests' default (the interpreter on CPU, the
    compiled kernels on CUDA); native/reference force those CPU paths."""
    if path == "kernel":
        return contextlib.nullcontext()
    return _dispatch.native_only() if path == "native" else _dispatch.reference_only()


def paths_for(device: torch.device) -> tuple[str, ...]:
    """Every path the device can take (CUDA tensors always run the kernels)."""
    return PATHS if device.type == "cpu" else ("kernel",)


# --------------------------------------------------------------------------
# tensors
# --------------------------------------------------------------------------
def huge(dtype: torch.dtype) -> float:
    return 3e4 if dtype == torch.float16 else 1e30


def random_tensor(shape, dtype, seed: int, special=None, device="cpu") -> torch.Tensor:
    """Random normal values in ``dtype`` from ``seed``; ``special`` replaces
    about a quarter of them (at least one) by NaN / ±inf / huge / tiny
    values, or makes the whole tensor zero."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=gen, dtype=torch.float64)
    if special == "zeros":
        t.zero_()
    elif special is not None and t.numel():
        pick = torch.rand(t.shape, generator=gen) < 0.25
        pick.view(-1)[torch.randint(t.numel(), (1,), generator=gen)] = True
        sign = torch.where(torch.rand(t.shape, generator=gen) < 0.5, -1.0, 1.0).double()
        value = {"nan": float("nan"), "inf": float("inf"), "huge": huge(dtype),
                 "tiny": 1e-30}[special]
        t = torch.where(pick, sign * value if special != "nan" else t.new_tensor(value), t)
    return t.to(dtype).to(device)


def as_view(t: torch.Tensor, view: str) -> torch.Tensor:
    """``t``'s values in a memory format or as a non-contiguous view
    (helpers.non_contiguous); a format that does not apply keeps ``t``."""
    if t is None or view == "contiguous":
        return t
    if view == "channels_last":
        return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t
    if t.numel() == 0:
        return t
    return non_contiguous(t, view)


def tolerance(dtype: torch.dtype) -> float:
    from helpers import RTOL
    return RTOL[dtype]


# --------------------------------------------------------------------------
# strategies shared by the families
# --------------------------------------------------------------------------
float_dtypes = st.sampled_from(FLOAT_DTYPES)
views = st.sampled_from(VIEWS)
vector_views = st.sampled_from(VECTOR_VIEWS)
specials = st.sampled_from(SPECIALS)
seeds = st.integers(0, 2**31 - 1)


def spelled(value: int):
    """An int argument as a Python int or a numpy integer (the peers accept both)."""
    import numpy as np
    return st.sampled_from([value, np.int64(value), np.int32(value)]) \
        if -2**31 <= value < 2**31 else st.just(value)


def pair_spellings(pair: tuple[int, int]):
    """An (h, w) pair as int, numpy int, 1-tuple, tuple or list."""
    import numpy as np
    h, w = pair
    options = [(h, w), [h, w], (np.int64(h), w)]
    if h == w:
        options += [h, np.int64(h), (h,), [np.int32(h)]]
    return st.sampled_from(options)


# --------------------------------------------------------------------------
# the property
# --------------------------------------------------------------------------
def names_argument(error: BaseException, names) -> bool:
    message = str(error).lower()
    return any(name.lower() in message for name in names)


def check_segops_error(error: BaseException, names, call) -> None:
    """``error`` is a segops error whose message names one of ``names``."""
    assert isinstance(error, SEGOPS_ERRORS), \
        f"{type(error).__name__} (not a segops error) for {call}: {error}"
    assert names_argument(error, names), \
        f"segops error does not name any of {list(names)} for {call}: {error}"


def call_peer(fn):
    """(result, None) or (None, exception) from a peer call."""
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 - the peer's errors are data here
        return None, e


def call_segops(fn, call):
    """(result, None) or (None, segops error); any other exception fails."""
    try:
        return fn(), None
    except SEGOPS_ERRORS as e:
        return None, e
    except Exception as e:  # noqa: BLE001
        raise AssertionError(f"{type(e).__name__} (not a segops error) for {call}: {e}") from e
