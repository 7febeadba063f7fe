"""Shared benchmark harness: timing, records, the JSON writer, the table, the plot.

Timing uses CUDA events through ``triton.testing.do_bench`` (median of many
runs after warm-up). There is no CPU timing of kernels: without a GPU the
suite self-checks the kernels and reports no kernel speedups (the CPU model
rows of models.py time whole models with the wall clock instead).

The cases themselves (what is timed) are defined once, in cases.py and the
family modules; this module only measures and reports.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import subprocess
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SEGOPS = "segops"  # the provider every other provider of a group is compared with


class NoGPU(RuntimeError):
    """Raised when a timing is asked for without a CUDA device."""


def time_ms(fn, *, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn()`` on the GPU: CUDA events around each
    call, L2 flushed between calls (``triton.testing.do_bench``); ``warmup``
    and ``rep`` are milliseconds of warm-up and of timed calls."""
    if not torch.cuda.is_available():
        raise NoGPU("timings need a CUDA device; on CPU the suite only self-checks")
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def forward_backward(fn, leaves, backward: bool):
    """A callable running ``fn()`` and, with ``backward``, its backward pass
    (ones as the output gradient), clearing the leaves' gradients after. It
    returns ``fn()``'s output (the tests compare each group's providers on it;
    what is timed is the same)."""
    def run():
        out = fn()
        if backward:
            out.backward(torch.ones_like(out))
            for leaf in leaves:
                leaf.grad = None
        return out
    return run


def peak_extra_memory(fn) -> int:
    """Bytes allocated by ``fn()`` beyond what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


_copy_bandwidth = None
_matmul_peak: dict = {}


def matmul_peak_tflops(dtype: torch.dtype) -> float:
    """Measured dense matmul throughput (8192^3, TF32 for fp32 when cuDNN's
    flag allows it, as the convolutions do): the compute roofline."""
    if dtype not in _matmul_peak:
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
        try:
            a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
            b = torch.randn(8192, 8192, device="cuda", dtype=dtype)
            ms = time_ms(lambda: a @ b)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
        _matmul_peak[dtype] = 2 * 8192**3 / ms / 1e9
    return _matmul_peak[dtype]


def copy_bandwidth_gbs() -> float:
    """Measured device-to-device copy bandwidth (read + write), GB/s: the
    roofline the memory-bound kernels are judged against."""
    global _copy_bandwidth
    if _copy_bandwidth is None:
        src = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        ms = time_ms(lambda: dst.copy_(src))
        _copy_bandwidth = 2 * src.numel() / ms / 1e6
    return _copy_bandwidth


@dataclasses.dataclass
class Record:
    """One measurement: op/shape/dtype/direction/provider (and layout)."""
    op: str
    shape: str
    dtype: str
    direction: str  # the pass: 'fwd' | 'fwd+bwd' | 'train' | 'infer' | ...
    provider: str   # 'segops' or the baseline's name
    ms: float
    gbs: float | None = None
    tflops: float | None = None
    roofline_fraction: float | None = None
    extra_memory_mb: float | None = None
    items_per_s: float | None = None  # throughput where it means more (images/s for models)
    speedup: float | None = None  # fastest baseline ms / segops ms, on the segops record
    layout: str | None = None  # 'channels_last' | 'nchw' | 'rows' | ...
    target: float | None = None  # the speedup DESIGN.md asks for (None: no target)
    extra: dict | None = None  # case-specific numbers (e.g. Mask R-CNN's time per op)


def group_key(r: Record) -> tuple:
    """The rows compared with each other: same op, shape, dtype, layout, pass."""
    return r.op, r.shape, r.dtype, r.layout, r.direction


def add_speedups(records: list[Record]) -> None:
    """Fill ``speedup`` on each segops record: the fastest baseline measured
    for the same op/shape/dtype/layout/pass in the same run, divided by
    segops' time (the strictest comparison when a group has several baselines)."""
    groups: dict[tuple, list[Record]] = {}
    for r in records:
        groups.setdefault(group_key(r), []).append(r)
    for group in groups.values():
        ours = [r for r in group if r.provider == SEGOPS]
        base = [r.ms for r in group if r.provider != SEGOPS]
        if ours and base and ours[0].ms > 0:
            ours[0].speedup = min(base) / ours[0].ms


def git_commit() -> str:
    """The short commit of the checkout benchmarks/ lives in ('unknown' outside
    git); $COMMIT overrides it (gpu_check.sh on a copy whose .git is stale)."""
    if os.environ.get("COMMIT"):
        return os.environ["COMMIT"]
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, check=False)
        return done.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def card_name() -> str:
    """The GPU's name, or 'cpu'."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def environment() -> dict:
    import triton
    return {
        "gpu": card_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "copy_bandwidth_gbs": _copy_bandwidth,
    }


def gpu_slug() -> str:
    """The card's name as a file name: 'nvidia_h100_80gb_hbm3', or 'cpu'."""
    return "".join(ch if ch.isalnum() else "_" for ch in card_name()).strip("_").lower()


def write_results(records: list[Record], out_dir: str | os.PathLike | None = None) -> Path:
    """Write ``<out_dir>/<gpu>.json`` (default benchmarks/results/)."""
    out = Path(out_dir) if out_dir else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{gpu_slug()}.json"
    payload = {"environment": environment(),
               "records": [dataclasses.asdict(r) for r in records]}
    path.write_text(json.dumps(payload, indent=1))
    return path


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


_LAYOUTS = {"channels_last": "cl", "nchw": "nchw", None: "-"}


def format_table(records: list[Record]) -> str:
    """One line per record; speedup (on segops' rows) = fastest baseline / segops."""
    shape_w = max([34] + [len(r.shape) for r in records])
    provider_w = max([12] + [len(r.provider) for r in records])
    header = f"{'op':<18} {'shape':<{shape_w}} {'dtype':<13} {'lay':<5} {'pass':<11} " \
             f"{'provider':<{provider_w}} {'ms':>9} {'GB/s':>7} {'TFLOP/s':>7} {'roof':>5} " \
             f"{'mem MB':>8} {'items/s':>8} {'speedup':>7} {'target':>6}"
    lines = [header, "-" * len(header)]
    for r in records:
        layout = _LAYOUTS.get(r.layout, r.layout)
        lines.append(f"{r.op:<18} {r.shape:<{shape_w}} {r.dtype:<13} {layout:<5} "
                     f"{r.direction:<11} {r.provider:<{provider_w}} {r.ms:>9.3f} "
                     f"{_fmt(r.gbs, '7.0f'):>7} {_fmt(r.tflops, '7.1f'):>7} "
                     f"{_fmt(r.roofline_fraction, '5.2f'):>5} "
                     f"{_fmt(r.extra_memory_mb, '8.1f'):>8} {_fmt(r.items_per_s, '8.1f'):>8} "
                     f"{_fmt(r.speedup, '.2f') + ('x' if r.speedup else ''):>7} "
                     f"{_fmt(r.target, '.2f') + ('x' if r.target else ''):>6}")
    lines += _format_extra(records)
    return "\n".join(lines)


def _format_extra(records: list[Record]) -> list[str]:
    """The records' case-specific numbers (e.g. time per op inside a model), one line each."""
    lines = []
    for r in records:
        if r.extra:
            items = ", ".join(f"{k} {_fmt(v, '.3f') if isinstance(v, float) else v}"
                              for k, v in r.extra.items())
            lines.append(f"  {r.op} {r.shape} {r.direction} {r.provider}: {items}")
    return ["", "details:"] + lines if lines else []


def _label(r: Record) -> str:
    layout = "" if r.layout in (None, "rows") else f" {_LAYOUTS.get(r.layout, r.layout)}"
    return f"{r.op} {r.shape} {r.dtype}{layout} {r.direction}"


def _colour(r: Record) -> str:
    if not r.target:
        return "tab:gray"
    return "tab:blue" if r.speedup >= r.target else "tab:orange"


def plot(records: list[Record], path: Path, title: str | None = None) -> Path | None:
    """Horizontal bars of segops' speedup over the fastest baseline, one per
    case, with the 1.0 line (parity) and a red tick at each case's target;
    blue bars meet their target, orange ones miss it, grey ones have none. Needs matplotlib (the
    `bench` extra): returns None without it or without any speedup."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in records if r.speedup]
    if not rows:
        return None
    from matplotlib.patches import Patch
    fig, ax = plt.subplots(figsize=(11, 0.28 * len(rows) + 1.8))
    ys = list(range(len(rows)))
    # bars from parity: to the right when faster than the baseline, to the left when slower
    ax.barh(ys, [r.speedup - 1.0 for r in rows], left=1.0, color=[_colour(r) for r in rows])
    for y, r in zip(ys, rows):
        ax.annotate(f"{r.speedup:.2f}x", (r.speedup, y), xytext=(3 if r.speedup >= 1 else -3, 0),
                    textcoords="offset points", va="center", fontsize=6,
                    ha="left" if r.speedup >= 1 else "right")
    ax.set_yticks(ys, [_label(r) for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=1.0)
    targets = [(y, r.target) for y, r in zip(ys, rows) if r.target]
    if targets:
        ax.scatter([t for _, t in targets], [y for y, _ in targets], marker="|", s=160,
                   color="red", zorder=3)
    ax.legend(handles=[Patch(color="tab:blue", label="meets its target"),
                       Patch(color="tab:orange", label="below its target"),
                       Patch(color="tab:gray", label="no target"),
                       plt.Line2D([], [], color="black", label="1.0: as fast as the baseline"),
                       plt.Line2D([], [], color="red", marker="|", linestyle="none",
                                  markersize=12, label="target (DESIGN.md)")],
              loc="lower right", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("speedup over the fastest baseline (same run, log scale)")
    ax.set_title(title or f"segops on {card_name()} at {git_commit()}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
