"""pytest wiring of the benchmark cases: ``pytest benchmarks/ --benchmark-only``.
The hooks and options live in segops.benchmarks.plugin (see its docstring)."""
from segops.benchmarks.plugin import (  # noqa: F401 (pytest finds the hooks by name)
    pytest_addoption,
    pytest_benchmark_update_commit_info,
    pytest_benchmark_update_json,
    pytest_benchmark_update_machine_info,
    pytest_configure,
    pytest_generate_tests,
    pytest_sessionfinish,
    pytest_terminal_summary,
)
