"""Where a benchmark case's time goes, on a GPU: the numbers that tell a slow
kernel from a slow host path or a bad tuner pick (the first H100 run had
atrous conv at 0.14x cuDNN with no way to tell which).

For each quick case of the chosen families (segops and its baselines):

* ``event_ms``: the benchmark's own number (``harness.time_ms``: CUDA events
  around each call, L2 flushed);
* ``host_us``: host time per call with nothing waited for (the enqueue cost:
  when it exceeds the device time the op is host-bound);
* ``graph_ms``: the same call replayed from a captured CUDA graph, which
  removes the host (or why the call cannot be captured);
* ``kernels``: each kernel (and copy) the call runs, from torch.profiler:
  name, launches per call and device microseconds per call; ``device_ms``
  is their sum;
* ``gemm``: for every launch through ``kernels/_gemm.launch`` (the conv
  families), the tile the tuner picked and the time of that launch alone
  with every tuner tile, with the compiled kernel's registers and spills.

    python -m segops.benchmarks.probe [--family F ...] [--out DIR]

prints a table and writes ``DIR/probe.json``. It needs a GPU (``NoGPU``
otherwise); the functions take a ``timer`` so the CPU tests can run them
through the interpreter.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

from . import harness
from .cases import collect, release

DEFAULT_FAMILIES = ["conv", "conv_transpose", "roi_align", "overlap"]
HOST_CALLS = 20
PROFILED_CALLS = 5
TOP_KERNELS = 8


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def host_us(fn, calls: int = HOST_CALLS) -> float:
    """Microseconds of host time per call of ``fn``, nothing waited for."""
    _sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    _sync()
    return elapsed / calls * 1e6


def graph_ms(fn, timer) -> float | str:
    """``fn`` captured once in a CUDA graph and timed replaying it, or the
    reason it could not be captured (an op that synchronises, say)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(stream):  # warm up off the capture, as capture requires
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as error:
        _sync()
        return f"not capturable: {str(error).splitlines()[0][:120]}"
    return timer(graph.replay)


def _device_us(event) -> float:
    for name in ("self_device_time_total", "self_cuda_time_total"):  # torch >= 2.4 / older
        if hasattr(event, name):
            return float(getattr(event, name))
    return 0.0


def kernel_times(fn, calls: int = PROFILED_CALLS) -> list[dict]:
    """The device work of one call of ``fn``: per kernel (or memcpy/memset)
    name, launches and device microseconds per call, largest first."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    _sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        _sync()
    rows = [{"name": e.key[:90], "launches": e.count / calls, "us": _device_us(e) / calls}
            for e in prof.key_averages()]
    return sorted((r for r in rows if r["us"] > 0), key=lambda r: -r["us"])


# ----------------------------------------------------------------------------
# GEMM launches: the tuner's pick against every tile
# ----------------------------------------------------------------------------
@contextlib.contextmanager
def recorded_gemm_launches():
    """Record (kernel, grid, args, constexprs, key) of every launch through
    kernels/_gemm.launch while the block runs (the launches still happen)."""
    from ..kernels import _gemm
    from ..kernels import conv as conv_kernels
    from ..kernels import conv_transpose as transpose_kernels
    launches = []
    original = _gemm.launch

    def record(kernel, grid_fn, args, constexprs, config, M, N, K, device, key):
        launch = {"kernel": kernel, "grid": grid_fn, "args": args, "constexprs": constexprs,
                  "M": M, "N": N, "K": K, "key": tuple(key)}
        result = original(kernel, grid_fn, args, constexprs, config, M, N, K, device, key)
        launch["picked"] = _picked(launch)  # now: the tuner's last run is this launch's
        launches.append(launch)
        return result

    modules = (conv_kernels, transpose_kernels)
    for module in modules:
        module.launch = record
    try:
        yield launches
    finally:
        for module in modules:
            module.launch = original


def _config_name(kwargs: dict, num_warps, num_stages) -> str:
    return (f"M{kwargs['BLOCK_M']} N{kwargs['BLOCK_N']} K{kwargs['BLOCK_K']} "
            f"w{num_warps} s{num_stages}")


def _picked(launch: dict) -> str:
    """The tile the launcher used, read right after the launch: the tuner's
    pick on a GPU with autotuning on (``best_config`` is its last run's),
    else the fixed tile."""
    from ..kernels import _gemm
    if _gemm.AUTOTUNE and torch.cuda.is_available():
        best = getattr(_gemm.tuned(launch["kernel"], launch["key"]), "best_config", None)
        if best is not None:
            return _config_name(best.kwargs, best.num_warps, best.num_stages)
    config = _gemm.default_config(launch["M"], launch["N"], launch["K"])
    return _config_name(config, 4, 3) + " (fixed)"


def _resources(compiled) -> tuple:
    """(registers, spills) of a compiled kernel (what ``kernel[grid](...)``
    returns on a GPU; None in the interpreter)."""
    return getattr(compiled, "n_regs", None), getattr(compiled, "n_spills", None)


def tile_times(launch: dict, timer) -> list[dict]:
    """The recorded launch alone with each tuner tile that fits its dtype:
    ms, registers and spills per tile."""
    from ..kernels import _gemm
    kernel, args = launch["kernel"], launch["args"]
    named = dict(zip(kernel.arg_names, args))
    rows = []
    for config in _gemm.prune_configs(_gemm.tuner_configs(), named):
        compiled = []

        def run(config=config, compiled=compiled):
            compiled.append(kernel[launch["grid"]](
                *args, **launch["constexprs"], **config.kwargs, num_warps=config.num_warps,
                num_stages=config.num_stages))
        row = {"config": _config_name(config.kwargs, config.num_warps, config.num_stages),
               "grid": list(launch["grid"](config.kwargs))}
        try:
            row["ms"] = timer(run)
        except Exception as error:  # noqa: BLE001 - a tile that fails is a finding, not a crash
            row["error"] = str(error).splitlines()[0][:120]
        else:
            row["regs"], row["spills"] = _resources(compiled[-1])
        rows.append(row)
    return rows


def gemm_report(fn, timer) -> list[dict]:
    """Per GEMM launch of one call of ``fn``: kernel, (M, N, K), the
    launcher's pick and every tile's time."""
    with recorded_gemm_launches() as launches:
        fn()
    _sync()
    return [{"kernel": launch["kernel"].__name__, "MNK": [launch["M"], launch["N"], launch["K"]],
             "picked": launch["picked"], "tiles": tile_times(launch, timer)}
            for launch in launches]


# ----------------------------------------------------------------------------
# one case, the table, the command
# ----------------------------------------------------------------------------
def probe_case(case, timer=None, on_gpu: bool | None = None) -> dict:
    """Every number of the module docstring for one benchmark case."""
    timer = timer or harness.time_ms
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    step = case.setup()
    row = {"family": case.family, "op": case.op, "shape": case.shape, "dtype": case.dtype,
           "layout": case.layout, "direction": case.direction, "provider": case.provider,
           "event_ms": timer(step.fn), "host_us": host_us(step.fn)}
    if on_gpu:
        row["graph_ms"] = graph_ms(step.fn, timer)
        row["kernels"] = kernel_times(step.fn)
        row["device_ms"] = sum(k["us"] for k in row["kernels"]) / 1e3
    if case.provider == harness.SEGOPS and case.family in ("conv", "conv_transpose"):
        row["gemm"] = gemm_report(step.fn, timer)
    return row


def _ms(value) -> str:
    return f"{value:8.3f}" if isinstance(value, float) else f"{'-':>8}"


def format_row(row: dict) -> str:
    """A case's numbers as a few readable lines."""
    graph = row.get("graph_ms")
    lines = [f"{row['op']} | {row['shape']} | {row['dtype']} | {row['layout']} | "
             f"{row['direction']} | {row['provider']}",
             f"  event {_ms(row['event_ms'])} ms   device {_ms(row.get('device_ms'))} ms   "
             f"graph {_ms(graph)} ms   host {row['host_us']:8.1f} us/call"]
    if isinstance(graph, str):
        lines.append(f"  graph: {graph}")
    for k in row.get("kernels", [])[:TOP_KERNELS]:
        lines.append(f"  {k['us']:9.1f} us  x{k['launches']:<4g} {k['name']}")
    for g in row.get("gemm", []):
        lines.append(f"  gemm {g['kernel']} MNK={g['MNK']} picked {g['picked']}")
        for t in g["tiles"]:
            detail = t.get("error") or (f"{_ms(t['ms'])} ms  regs {t['regs']}  "
                                        f"spills {t['spills']}  grid {t['grid']}")
            lines.append(f"    {t['config']:<24} {detail}")
    return "\n".join(lines)


def run(families=None, timer=None, out: Path | None = None) -> list[dict]:
    """Probe every quick GPU case of ``families`` (default DEFAULT_FAMILIES),
    printing each; with ``out``, ``out/probe.json`` is rewritten after each
    case, so a run stopped at a time cap keeps what it measured."""
    if not torch.cuda.is_available():
        raise harness.NoGPU("the probe times kernels: it needs a CUDA device")
    torch.backends.cudnn.benchmark = True
    rows = []
    try:
        for case in collect(families or DEFAULT_FAMILIES, quick=True):
            if case.device != "cuda":
                continue
            try:
                row = probe_case(case, timer)
            except torch.OutOfMemoryError:
                release()
                continue
            print(format_row(row), flush=True)
            rows.append(row)
            if out is not None:
                _write(out, rows)
    finally:
        release()
    return rows


def _write(out: Path, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps({"environment": harness.environment(),
                                                "rows": rows}, indent=1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m segops.benchmarks.probe",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", action="append", default=None,
                        help=f"an op family (repeatable; default {DEFAULT_FAMILIES})")
    parser.add_argument("--out", default=".", help="folder for probe.json")
    args = parser.parse_args(argv)
    try:
        run(args.family, out=Path(args.out))
    except harness.NoGPU as error:
        print(error, file=sys.stderr)
        return 2
    print(f"wrote {Path(args.out) / 'probe.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
