"""The benchmark cases, defined once, and the harness's way of running them.

A :class:`Case` is one row of the benchmark tables: op family, op, shape,
dtype, layout, pass (``direction``) and provider (``segops`` or a baseline),
plus ``setup``, which builds what is timed (a :class:`Step`). Each family
module (overlap.py, roi_align.py, conv.py, conv_transpose.py, boxes.py,
masks.py, models.py) lists its cases with ``cases(quick)``; two front ends
run the same lists:

* ``segops bench`` (run.py): :func:`run_cases` times each case with
  ``harness.time_ms`` (``triton.testing.do_bench``: CUDA events, median)
  and returns :class:`harness.Record` rows;
* ``pytest benchmarks/ --benchmark-only`` (plugin.py): one pytest-benchmark
  test per case, grouped by (op, shape, dtype, layout, pass), timed with
  CUDA events.

Cases that share inputs (the providers of a group, the passes of a shape)
are listed one after the other and get their tensors from :func:`shared`, so
each input is built once per group in both front ends.
"""
from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Callable

import torch

from . import harness

FAMILIES = ["overlap", "roi_align", "conv", "conv_transpose", "boxes", "masks", "models"]
GPU = "cuda"  # Case.device of the cases that time CUDA kernels
CPU = "cpu"   # Case.device of the CPU rows (models.py: converted vs unconverted)


@dataclasses.dataclass
class Step:
    """What one case times: ``fn()`` is one call (one pass of the op or one
    model step). ``flops`` / ``nbytes`` / ``items`` are per call and give
    TFLOP/s, GB/s and items/s; ``peak()`` is the roofline in the same unit
    (TFLOP/s or GB/s) or None. ``warmup`` and ``rep`` are milliseconds of
    warm-up and of timed calls (do_bench's meaning). ``parts()``, when set,
    returns case-specific numbers measured in separate runs (e.g. the time per
    op inside a model); ``info`` holds static ones; ``note`` is appended to the
    row's shape in the harness table."""
    fn: Callable[[], object]
    flops: float | None = None
    nbytes: float | None = None
    items: int | None = None
    peak: Callable[[], float | None] | None = None
    warmup: int = 25
    rep: int = 100
    parts: Callable[[], dict] | None = None
    info: dict = dataclasses.field(default_factory=dict)
    note: str | None = None


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark row (see the module docstring). ``device`` says what the
    case needs: ``"cuda"`` (kernel and GPU model cases, skipped off the GPU)
    or ``"cpu"`` (the CPU model rows). ``target`` is the speedup DESIGN.md
    asks of segops in this case (None where it sets none)."""
    family: str
    op: str
    shape: str
    dtype: str
    layout: str
    direction: str
    provider: str
    setup: Callable[[], Step] = dataclasses.field(compare=False, repr=False)
    device: str = GPU
    target: float | None = None

    @property
    def group(self) -> str:
        """pytest-benchmark's group: the rows compared side by side."""
        return f"{self.op} | {self.shape} | {self.dtype} | {self.layout} | {self.direction}"

    @property
    def id(self) -> str:
        """A stable test id (pytest-benchmark compares runs by it)."""
        parts = (self.family, self.op, self.shape, self.dtype, self.layout, self.direction,
                 self.provider)
        return "/".join(re.sub(r"\s+", "_", p.strip()) for p in parts)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def layout_name(channels_last: bool) -> str:
    return "channels_last" if channels_last else "nchw"


# ----------------------------------------------------------------------------
# inputs shared by consecutive cases
# ----------------------------------------------------------------------------
_slot: list = []  # [(key, value)] of the last inputs built, or empty


def shared(key, make: Callable[[], object]):
    """``make()``'s result for ``key``, kept until inputs for another key are
    asked for (then the old ones are freed first): consecutive cases with the
    same key get the same tensors and models."""
    if _slot and _slot[0][0] == key:
        return _slot[0][1]
    release()
    value = make()
    _slot.append((key, value))
    return value


def release() -> None:
    """Drop the shared inputs (and, on a GPU, return their memory)."""
    _slot.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------
# the registry
# ----------------------------------------------------------------------------
def family_module(family: str):
    if family not in FAMILIES:
        raise ValueError(f"unknown op family {family!r}; choose from {FAMILIES}")
    return importlib.import_module(f"{__package__}.{family}")


def collect(families=None, *, quick: bool = False, tiny: bool = False) -> list[Case]:
    """Every case of ``families`` (default: all) in running order: each
    family's GPU cases, and with ``models`` the CPU rows last (``tiny``:
    the CPU rows at toy sizes, seconds in all)."""
    out = []
    for family in families or FAMILIES:
        out += family_module(family).cases(quick)
    if "models" in (families or FAMILIES):
        out += family_module("models").cpu_cases(quick, tiny=tiny)
    return out


# ----------------------------------------------------------------------------
# the harness front end
# ----------------------------------------------------------------------------
def to_record(case: Case, step: Step, ms: float, extra_memory_mb: float | None,
              parts: dict | None = None) -> harness.Record:
    """The table row of ``case`` timed at ``ms`` per call: GB/s, TFLOP/s,
    roofline fraction and items/s from the step's counts."""
    gbs = step.nbytes / ms / 1e6 if step.nbytes else None
    tflops = step.flops / ms / 1e9 if step.flops else None
    peak = step.peak() if step.peak else None
    achieved = tflops if tflops is not None else gbs
    extra = {**step.info, **(parts or {})} or None
    shape = f"{case.shape} ({step.note})" if step.note else case.shape
    return harness.Record(
        op=case.op, shape=shape, dtype=case.dtype, direction=case.direction,
        provider=case.provider, ms=ms, gbs=gbs, tflops=tflops,
        roofline_fraction=achieved / peak if peak and achieved is not None else None,
        extra_memory_mb=extra_memory_mb,
        items_per_s=step.items / ms * 1e3 if step.items else None,
        layout=case.layout, target=case.target, extra=extra)


def measure(case: Case, *, timer=None, memory=None) -> harness.Record | None:
    """Time one case as ``segops bench`` does: the median ms of its step
    (``timer``, default harness.time_ms: do_bench, CUDA events), the extra
    memory of one call (``memory``, default harness.peak_extra_memory), then
    its ``parts``. Returns None, after a line saying so, when it runs out of
    GPU memory."""
    timer = timer or harness.time_ms
    memory = memory or harness.peak_extra_memory
    try:
        step = case.setup()
        ms = timer(step.fn, warmup=step.warmup, rep=step.rep)
        extra_mb = memory(step.fn) / 2**20
        parts = step.parts() if step.parts else None
    except torch.OutOfMemoryError:
        print(f"  {case.provider} {case.op} {case.shape} {case.direction}: out of memory, "
              "left out", flush=True)
        release()
        return None
    return to_record(case, step, ms, extra_mb, parts)


def run_cases(cases: list[Case], *, timer=None, memory=None) -> list[harness.Record]:
    """:func:`measure` each case in order (rows that ran out of memory left
    out), then free the shared inputs. cuDNN autotunes its baselines
    (``cudnn.benchmark``) in every front end: ``segops bench``, a family
    module's ``run`` and ``python -m segops.benchmarks.models``."""
    autotuned = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        records = [measure(case, timer=timer, memory=memory) for case in cases]
    finally:
        torch.backends.cudnn.benchmark = autotuned
        release()
    return [r for r in records if r is not None]
