"""Every benchmark case (cases.py) as one pytest-benchmark test:
``pytest benchmarks/ --benchmark-only [--bench-quick] [--bench-family conv]``.
Options and hooks: segops.benchmarks.plugin."""
from segops.benchmarks import plugin


def test_case(benchmark, case, request):
    """One case: a GPU case timed with CUDA events (skipped, with the reason,
    without a GPU), a CPU model row with the wall clock; derived numbers in
    ``benchmark.extra_info``."""
    plugin.run_case(benchmark, case, request.config)
