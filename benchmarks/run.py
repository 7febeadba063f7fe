"""`segops bench`: run the benchmark modules, print the table, write
``<gpu>.json`` and a plot. Without a GPU: interpreter self-check, no timings."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch

from . import harness

FAMILIES = ["overlap", "roi_align", "conv", "conv_transpose", "models"]


def main(args) -> int:
    families = args.ops or FAMILIES
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        print(f"unknown op families {unknown}; choose from {FAMILIES}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        from .. import cli
        print("No CUDA device: benchmarks need a GPU, so no timings or speedups are reported.\n"
              "Running the kernels' self-check through Triton's interpreter instead.\n")
        return cli.check()
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
