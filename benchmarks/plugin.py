"""The pytest front end of the benchmark cases: ``pytest benchmarks/
--benchmark-only`` (pytest-benchmark). benchmarks/conftest.py wires these
hooks in; benchmarks/test_cases.py has the one test, run once per case.

* Each case of cases.py is one test, in pytest-benchmark group
  ``op | shape | dtype | layout | pass`` so segops and its baselines sit side
  by side. Test ids are stable (``family/op/shape/dtype/layout/pass/provider``):
  ``--benchmark-compare`` matches runs by them.
* GPU cases are timed with ``benchmark.pedantic`` and :class:`CudaEventTimer`
  (every round's duration is a CUDA-event interval; L2 flushed before each
  round, as do_bench does), so ``--benchmark-json``, ``--benchmark-compare``
  and ``--benchmark-histogram`` show GPU times. Off the GPU they are skipped
  with the reason. The CPU model rows (models.py: converted vs unconverted)
  are timed with the wall clock, each provider in its own test: unlike
  ``segops bench``'s interleaved timing (models.run_cpu), other load on a
  shared machine can skew their ratio.
* ``extra_info`` of each row: ms (median), GB/s or TFLOP/s, roofline fraction,
  items/s, target, card, commit, and (filled in when the JSON is written,
  :func:`fill_speedups`) the speedup of segops over the fastest baseline of
  its group.
* Saved runs (``--benchmark-save`` / ``--benchmark-autosave``) go to
  ``benchmarks/results/<card>/`` unless ``--benchmark-storage`` says
  otherwise: one history per card, which ``--benchmark-compare`` reads.
* Options: ``--bench-quick`` (the subset ``segops bench --quick`` runs),
  ``--bench-tiny`` (CPU rows at toy sizes), ``--bench-family NAME``
  (repeatable), ``--bench-out DIR`` (also write the harness's
  ``<card>.json``, PNG and table there).
* The terminal summary adds the harness table (speedups, targets) and, off
  the GPU, the saved codegen report (a table of compiled kernels, no timings).
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from . import harness
from .cases import CPU, FAMILIES, Case, collect, release, to_record

DEFAULT_STORAGE = "file://./.benchmarks"  # pytest-benchmark's default
RECORDS = pytest.StashKey[list]()
L2_FLUSH_BYTES = 256 * 2**20
MAX_ROUNDS = 1000
MIN_ROUNDS = 5
CPU_ROUNDS = {"tiny": (1, 2), "quick": (2, 5), "full": (2, 7)}  # (warm-up, timed) rounds


def pytest_addoption(parser):
    group = parser.getgroup("segops benchmarks")
    group.addoption("--bench-quick", action="store_true",
                    help="the quick subset of cases (as `segops bench --quick`)")
    group.addoption("--bench-tiny", action="store_true",
                    help="the CPU model rows at toy sizes (seconds; the CI check)")
    group.addoption("--bench-family", action="append", choices=FAMILIES, default=None,
                    help="an op family to run (repeatable; default: all)")
    group.addoption("--bench-out", default=None,
                    help="also write the harness's <card>.json, PNG and table in this folder")


def card_storage() -> str:
    """benchmarks/results/<card>/ as a pytest-benchmark storage URI."""
    return f"file://{harness.RESULTS_DIR / harness.gpu_slug()}"


def pytest_configure(config):
    """Saved runs per card (unless --benchmark-storage was given), cuDNN
    autotuning for the baselines, and the list the rows are collected in.
    Runs before pytest-benchmark's own pytest_configure (trylast), which
    opens the storage."""
    if getattr(config.option, "benchmark_storage", None) == DEFAULT_STORAGE:
        config.option.benchmark_storage = card_storage()
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
    config.stash[RECORDS] = []


def selected_cases(config) -> list[Case]:
    return collect(config.getoption("bench_family"), quick=config.getoption("bench_quick"),
                   tiny=config.getoption("bench_tiny"))


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = selected_cases(metafunc.config)
        metafunc.parametrize("case", cases, ids=[c.id for c in cases])


def skip_reason(case: Case) -> str | None:
    """Why ``case`` cannot run here (None: it can)."""
    gpu = torch.cuda.is_available()
    if case.device != CPU and not gpu:
        return "no CUDA device: kernel and GPU model timings need a GPU (no speedup is " \
               "reported from a CPU)"
    if case.device == CPU and gpu:
        return "a GPU is present: the CPU rows are the off-GPU check " \
               "(python -m segops.benchmarks.models --cpu runs them anywhere)"
    return None


# ----------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------
class CudaEventTimer:
    """A pytest-benchmark timer for GPU cases. The runner reads the timer
    before and after each round: the first reading records a start event
    and returns 0 (no wait, so the round's launches queue right behind it);
    the second records an end event, waits for it and returns the elapsed
    seconds. A round's duration is thus CUDA-event time on the stream, as in
    do_bench."""
    __name__ = "CudaEventTimer"

    def __init__(self):
        self._start = None

    def __call__(self) -> float:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        if self._start is None:
            self._start = event
            return 0.0
        start, self._start = self._start, None
        event.synchronize()
        return start.elapsed_time(event) / 1e3

    def __repr__(self) -> str:
        return "CudaEventTimer"


def estimate_ms(fn, calls: int = 5) -> float:
    """Mean CUDA-event milliseconds of ``fn()`` over a few calls (after one)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def rounds_for(step, estimate: float) -> tuple[int, int]:
    """(warm-up rounds, timed rounds) filling the step's warm-up and timed
    milliseconds, as do_bench sizes its runs (at least MIN_ROUNDS timed)."""
    estimate = max(estimate, 1e-3)
    warmup = max(1, math.ceil(step.warmup / estimate))
    return min(warmup, MAX_ROUNDS), min(max(MIN_ROUNDS, math.ceil(step.rep / estimate)),
                                        MAX_ROUNDS)


_l2: list = []


def flush_l2() -> None:
    """Overwrite a 256 MB buffer so no round starts with its inputs in L2."""
    if not _l2:
        _l2.append(torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda"))
    _l2[0].zero_()


def time_gpu(benchmark, step) -> None:
    """``step.fn`` timed by pytest-benchmark with CUDA events, one call per
    round, the L2 flushed before each."""
    warmup, rounds = rounds_for(step, estimate_ms(step.fn))
    benchmark._timer = CudaEventTimer()  # read by pedantic's runner
    benchmark.pedantic(step.fn, setup=flush_l2, rounds=rounds, warmup_rounds=warmup,
                       iterations=1)


def time_cpu(benchmark, step, config) -> None:
    """``step.fn`` timed by pytest-benchmark with its wall clock."""
    size = "tiny" if config.getoption("bench_tiny") else \
        "quick" if config.getoption("bench_quick") else "full"
    warmup, rounds = CPU_ROUNDS[size]
    benchmark.pedantic(step.fn, rounds=rounds, warmup_rounds=warmup, iterations=1)


def median_ms(benchmark) -> float | None:
    """The run's median in ms (None when benchmarks are disabled)."""
    stats = getattr(benchmark.stats, "stats", None)
    return None if stats is None else stats.median * 1e3


def run_case(benchmark, case: Case, config) -> None:
    """The body of the one benchmark test: skip with the reason when the case
    cannot run here; otherwise build its step, time it (GPU: CUDA events;
    CPU rows: wall clock), then record the derived numbers in
    ``benchmark.extra_info`` and the harness row for the summary."""
    reason = skip_reason(case)
    if reason:
        pytest.skip(reason)
    benchmark.group = case.group
    try:
        step = case.setup()
        if case.device == CPU:
            time_cpu(benchmark, step, config)
        else:
            time_gpu(benchmark, step)
        ms = median_ms(benchmark)
        if ms is None:
            return
        on_gpu = case.device != CPU
        extra_mb = harness.peak_extra_memory(step.fn) / 2**20 if on_gpu else None
        parts = step.parts() if step.parts else None
    except torch.OutOfMemoryError:
        release()
        pytest.skip("out of GPU memory")
    record = to_record(case, step, ms, extra_mb, parts)
    benchmark.extra_info.update(extra_info(case, record))
    config.stash[RECORDS].append(record)


_environment: dict = {}


def extra_info(case: Case, record: harness.Record) -> dict:
    """What pytest-benchmark stores with the row besides its times."""
    if not _environment:
        _environment.update(card=harness.card_name(), commit=harness.git_commit())
    info = {"family": case.family, "op": case.op, "shape": record.shape, "dtype": case.dtype,
            "layout": case.layout, "pass": case.direction, "provider": case.provider,
            "group": case.group, "ms": record.ms, "gbs": record.gbs, "tflops": record.tflops,
            "roofline_fraction": record.roofline_fraction,
            "extra_memory_mb": record.extra_memory_mb, "items_per_s": record.items_per_s,
            "target": record.target, **_environment}
    if record.extra:
        info.update(record.extra)
    return {k: v for k, v in info.items() if v is not None}


# ----------------------------------------------------------------------------
# pytest-benchmark hooks
# ----------------------------------------------------------------------------
def fill_speedups(benchmarks: list[dict]) -> None:
    """On each segops row of pytest-benchmark's JSON: ``speedup`` = the
    fastest baseline's median in its group / segops' median, and
    ``baseline`` (that provider's name). Rows without a baseline in the run
    get none."""
    groups: dict[str, list[dict]] = {}
    for bench in benchmarks:
        info = bench.get("extra_info", {})
        if "group" in info and "provider" in info:
            groups.setdefault(info["group"], []).append(bench)
    for rows in groups.values():
        ours = [b for b in rows if b["extra_info"]["provider"] == harness.SEGOPS]
        base = [b for b in rows if b["extra_info"]["provider"] != harness.SEGOPS]
        if ours and base:
            fastest = min(base, key=lambda b: b["stats"]["median"])
            ours[0]["extra_info"]["speedup"] = \
                fastest["stats"]["median"] / ours[0]["stats"]["median"]
            ours[0]["extra_info"]["baseline"] = fastest["extra_info"]["provider"]


def pytest_benchmark_update_json(config, benchmarks, output_json):
    fill_speedups(output_json["benchmarks"])


def pytest_benchmark_update_machine_info(config, machine_info):
    import triton
    machine_info.update(card=harness.card_name(), torch=torch.__version__,
                        triton=triton.__version__, cuda=torch.version.cuda)


def pytest_benchmark_update_commit_info(config, commit_info):
    commit_info.setdefault("short_id", harness.git_commit())


def pytest_sessionfinish(session):
    release()
    records = session.config.stash.get(RECORDS, [])
    out = session.config.getoption("bench_out", None)
    if records and out:
        harness.add_speedups(records)
        path = harness.write_results(records, out)
        Path(out, "table.txt").write_text(harness.format_table(records) + "\n")
        harness.plot(records, path.with_suffix(".png"))


def pytest_terminal_summary(terminalreporter, config):
    records = config.stash.get(RECORDS, [])
    if records:
        harness.add_speedups(records)
        terminalreporter.write_sep("-", "segops benchmark table (speedup = fastest baseline / "
                                   "segops, same run)")
        terminalreporter.write_line(harness.format_table(records))
    if not torch.cuda.is_available():
        from .run import CODEGEN_REPORT, codegen_table
        terminalreporter.write_sep("-", "no CUDA device: kernel cases skipped, no kernel "
                                   "timings or speedups")
        table = codegen_table()
        if table:
            terminalreporter.write_line(f"codegen report ({CODEGEN_REPORT.name}; compiled for "
                                        "sm_90, not run; regenerate with `segops bench "
                                        f"--codegen`):\n{table}")
