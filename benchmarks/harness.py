"""Shared benchmark harness: timing, records, the JSON writer, the table.

Timing uses CUDA events through ``triton.testing.do_bench`` (median of many
runs after warm-up). There is no CPU timing: without a GPU the suite only
self-checks the kernels and reports no speedups.
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


class NoGPU(RuntimeError):
    """Raised when a timing is asked for without a CUDA device."""


def time_ms(fn, *, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn()`` on the GPU."""
    if not torch.cuda.is_available():
        raise NoGPU("timings need a CUDA device; on CPU the suite only self-checks")
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def forward_backward(fn, leaves, backward: bool):
    """A callable running ``fn()`` and, with ``backward``, its backward pass
    (ones as the output gradient), clearing the leaves' gradients after."""
    def run():
        out = fn()
        if backward:
            out.backward(torch.ones_like(out))
            for leaf in leaves:
                leaf.grad = None
    return run


def gemm_record(op, shape, dtype, direction, provider, step, flops, peak) -> Record:
    """Time ``step`` and report TFLOP/s, fraction of ``peak`` (TFLOP/s or
    None) and extra memory."""
    ms = time_ms(step)
    tflops = flops / ms / 1e9
    return Record(op=op, shape=shape, dtype=str(dtype).replace("torch.", ""),
                  direction=direction, provider=provider, ms=ms, tflops=tflops,
                  roofline_fraction=None if peak is None else tflops / peak,
                  extra_memory_mb=peak_extra_memory(step) / 2**20)


def fwd_bwd_records(op, shape, dtype, x, w, providers: dict, flops: float, peak) -> list[Record]:
    """Forward and forward+backward records of each ``providers[name](x, w)``
    (a convolution-like op: backward costs twice the forward's ``flops``)."""
    records = []
    for direction, backward in (("fwd", False), ("fwd+bwd", True)):
        x.requires_grad_(backward)
        w.requires_grad_(backward)
        for provider, fn in providers.items():
            step = forward_backward(lambda fn=fn: fn(x, w), (x, w), backward)
            records.append(gemm_record(op, shape, dtype, direction, provider, step,
                                       flops * (3 if backward else 1), peak))
    return records


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
    """One measurement: op/shape/dtype/direction/provider."""
    op: str
    shape: str
    dtype: str
    direction: str  # 'fwd' | 'fwd+bwd' | ...
    provider: str   # 'segops' or the baseline's name
    ms: float
    gbs: float | None = None
    tflops: float | None = None
    roofline_fraction: float | None = None
    extra_memory_mb: float | None = None
    items_per_s: float | None = None  # throughput where it means more (images/s for models)
    speedup: float | None = None  # baseline ms / segops ms, on the segops record


def add_speedups(records: list[Record]) -> None:
    """Fill ``speedup`` on each segops record: the first baseline measured for
    the same op/shape/dtype/direction in the same run, divided by segops."""
    groups: dict[tuple, list[Record]] = {}
    for r in records:
        groups.setdefault((r.op, r.shape, r.dtype, r.direction), []).append(r)
    for group in groups.values():
        ours = [r for r in group if r.provider == "segops"]
        base = [r for r in group if r.provider != "segops"]
        if ours and base:
            ours[0].speedup = base[0].ms / ours[0].ms


def environment() -> dict:
    import triton
    commit = "unknown"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).parent).stdout.strip() or commit
    except OSError:
        pass
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "copy_bandwidth_gbs": _copy_bandwidth,
    }


def gpu_slug() -> str:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return "".join(ch if ch.isalnum() else "_" for ch in name).strip("_").lower()


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


def format_table(records: list[Record]) -> str:
    header = f"{'op':<22} {'shape':<28} {'dtype':<9} {'dir':<8} {'provider':<22} " \
             f"{'ms':>9} {'GB/s':>8} {'TFLOP/s':>8} {'roof':>6} {'mem MB':>9} {'items/s':>8} " \
             f"{'speedup':>8}"
    lines = [header, "-" * len(header)]
    for r in records:
        lines.append(f"{r.op:<22} {r.shape:<28} {r.dtype:<9} {r.direction:<8} {r.provider:<22} "
                     f"{r.ms:>9.3f} {_fmt(r.gbs, '8.0f')} {_fmt(r.tflops, '8.1f')} "
                     f"{_fmt(r.roofline_fraction, '6.2f')} {_fmt(r.extra_memory_mb, '9.1f')} "
                     f"{_fmt(r.items_per_s, '8.1f')} "
                     f"{_fmt(r.speedup, '7.2f') + ('x' if r.speedup else '')}")
    return "\n".join(lines)


def plot(records: list[Record], path: Path) -> Path | None:
    """Bar chart of speedups (needs matplotlib, the `bench` extra)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in records if r.speedup]
    if not rows:
        return None
    labels = [f"{r.op} {r.shape} {r.dtype} {r.direction}" for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.3 * len(rows) + 1.5))
    ax.barh(labels, [r.speedup for r in rows])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("speedup over baseline (same run)")
    ax.set_title(f"segops on {environment()['gpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
