"""`segops bench`: time the benchmark cases (cases.py) with the harness,
print the table, write ``<gpu>.json`` and a plot. Without a GPU: the
interpreter self-check, the CPU model rows (with ``models``) and the saved
codegen report; no kernel timings.

The same cases run under pytest-benchmark: ``pytest benchmarks/
--benchmark-only`` (see plugin.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from . import harness
from .cases import FAMILIES, family_module

CODEGEN_REPORT = harness.RESULTS_DIR / "codegen-sm90.md"


def main(args) -> int:
    families = args.ops or FAMILIES
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        print(f"unknown op families {unknown}; choose from {FAMILIES}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        return _without_gpu(families, args)
    records = []
    for family in families:
        print(f"== {family}", flush=True)
        records += family_module(family).run(quick=args.quick)
    harness.add_speedups(records)
    print(harness.format_table(records))
    path = harness.write_results(records, args.out)
    print(f"\nwrote {path}")
    picture = harness.plot(records, Path(path).with_suffix(".png"))
    if picture:
        print(f"wrote {picture}")
    return 0


def codegen_table(path: Path = CODEGEN_REPORT) -> str | None:
    """The saved codegen report (compiled for sm_90, not run): its heading
    lines and its table, or None when there is none. It has no timings, so
    nothing in it is a speedup."""
    if not path.exists():
        return None
    lines = path.read_text().splitlines()
    table = [line for line in lines if line.startswith("|")]
    intro = [line for line in lines[:12] if line and not line.startswith("|")]
    return "\n".join(intro + [""] + table)


def _without_gpu(families, args) -> int:
    """No kernel timings off the GPU: the interpreter self-check, then (with
    the models family) the CPU rows, a converted model against the
    unconverted one on the native path (target: within 5%), then the saved
    codegen report as a table."""
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
    table = codegen_table()
    if table:
        print(f"\n== codegen report ({CODEGEN_REPORT.name}; regenerate with `segops bench "
              "--codegen`): what the compiler builds, no timings\n" + table)
    return code
