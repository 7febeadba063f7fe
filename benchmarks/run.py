"""`segops bench`: run the benchmark modules, print the table, write
``<gpu>.json`` and a plot. Without a GPU: interpreter self-check, no timings."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch

from . import harness

FAMILIES = ["overlap", "roi_align", "conv", "conv_transpose", "boxes", "masks", "models"]


def main(args) -> int:
    families = args.ops or FAMILIES
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        print(f"unknown op families {unknown}; choose from {FAMILIES}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        return _without_gpu(families, args)
    torch.backends.cudnn.benchmark = True
    records = []
    for family in families:
        module = importlib.import_module(f"{__package__}.{family}")
        print(f"== {family}", flush=True)
        records += module.run(quick=args.quick)
    harness.add_speedups(records)
    print(harness.format_table(records))
    path = harness.write_results(records, args.out)
    print(f"\nwrote {path}")
    picture = harness.plot(records, Path(path).with_suffix(".png"))
    if picture:
        print(f"wrote {picture}")
    return 0


def _without_gpu(families, args) -> int:
    """No kernel timings off the GPU: the interpreter self-check, then (with
    the models family) the CPU rows, a converted model against the
    unconverted one on the native path (target: within 5%)."""
    from .. import cli
    print("No CUDA device: kernel benchmarks need a GPU, so no kernel timings or speedups are "
          "reported.\nRunning the kernels' self-check through Triton's interpreter instead.\n")
    code = cli.check()
    if "models" in families:
        from . import models
        print("\n== models on this CPU (native path): converted / unconverted", flush=True)
        records = models.run_cpu(args.quick)
        harness.add_speedups(records)
        print(harness.format_table(records))
    return code
