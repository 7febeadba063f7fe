"""The benchmark suite as users run it (benchmarks/cases.py, plugin.py,
compare.py, harness.py): one set of cases behind `segops bench` and
`pytest benchmarks/ --benchmark-only`, pytest-benchmark's JSON with the
derived numbers, the comparison of saved runs, the plot. Timings are never
asserted (the CPU is shared); the code paths and the numbers' bookkeeping are."""
import contextlib
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
from helpers import DEVICE, RTOL, assert_close

from segops import _dispatch
from segops.benchmarks import cases, compare, harness, plugin
from segops.benchmarks.run import codegen_table

ROOT = Path(__file__).resolve().parents[1]
NO_GPU = "no CUDA device"


def pytest_benchmarks(*args, timeout=300) -> subprocess.CompletedProcess:
    """`python -m pytest benchmarks/ ARGS` from the repo root in a child
    process, without this run's xdist, interpreter or pytest variables."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTEST_", "TRITON_INTERPRET"))}
    return subprocess.run([sys.executable, "-m", "pytest", "benchmarks/", "-p", "no:xdist",
                           "-p", "no:randomly", *args], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=timeout, check=False)


# ----------------------------------------------------------------------------
# one set of cases
# ----------------------------------------------------------------------------
def test_every_family_lists_cases_with_unique_ids_and_a_baseline_per_group():
    everything = cases.collect()
    ids = [c.id for c in everything]
    assert len(ids) == len(set(ids))
    assert {c.family for c in everything} == set(cases.FAMILIES)
    groups = {}
    for c in everything:
        groups.setdefault((c.group, c.device), set()).add(c.provider)
    for (group, _), providers in groups.items():
        assert "segops" in providers and len(providers) >= 2, group
    quick = {c.id for c in cases.collect(quick=True)}
    assert quick < set(ids)


def test_mask_rcnn_is_in_the_models_family_and_its_quick_run():
    for quick in (False, True):
        rows = [c for c in cases.collect(["models"], quick=quick)
                if c.shape.startswith("maskrcnn_resnet50_fpn 2x3x800x1216")]
        assert {(c.direction, c.provider, c.target) for c in rows} == {
            ("infer", "segops", 1.3), ("infer", "torchvision", 1.3),
            ("train", "segops", 1.2), ("train", "torchvision", 1.2)}
    cpu_rows = [c for c in cases.collect(["models"], tiny=True) if c.device == cases.CPU]
    assert any(c.shape.startswith("maskrcnn_resnet50_fpn") for c in cpu_rows)


def test_pytest_collects_exactly_the_cases_segops_bench_runs(tmp_path):
    done = pytest_benchmarks("--collect-only", "-q", "--bench-quick", "--bench-family", "boxes",
                             "--bench-family", "masks", f"--benchmark-storage=file://{tmp_path}")
    assert done.returncode == 0, done.stdout + done.stderr
    collected = [line.split("[", 1)[1].rstrip("]") for line in done.stdout.splitlines()
                 if line.startswith("benchmarks/test_cases.py::test_case[")]
    assert collected == [c.id for c in cases.collect(["boxes", "masks"], quick=True)]


def test_shared_inputs_are_built_once_per_key():
    made = []
    first = cases.shared("a", lambda: made.append("a") or ["a"])
    assert cases.shared("a", lambda: made.append("again") or None) is first
    cases.shared("b", lambda: made.append("b") or ["b"])
    cases.release()
    assert made == ["a", "b"]


def test_run_cases_lets_cudnn_autotune_the_baselines(monkeypatch):
    """Every front end (segops bench, a family's run, the models module's
    main) runs its cases through run_cases, which turns cudnn.benchmark on
    (DESIGN.md's baseline: cuDNN autotuned)."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    seen = []
    case = cases.Case("x", "op", "shape", "float32", "nchw", "fwd", "torchvision",
                      lambda: cases.Step(lambda: seen.append(torch.backends.cudnn.benchmark)))
    cases.run_cases([case], timer=lambda fn, **_: fn() or 1.0, memory=lambda fn: 0)
    assert seen == [True] and torch.backends.cudnn.benchmark is False   # restored after


def test_roi_align_fp16_rows_give_torchvision_boxes_it_takes(monkeypatch):
    """torchvision's fp16 RoIAlign takes fp16 rois only: its fp16 rows get
    them (they raised, and a full run stopped at its first fp16 row)."""
    from segops.benchmarks import roi_align as family
    monkeypatch.setattr(family, "DEVICE", "cpu")
    monkeypatch.setattr(family, "IMAGE", (64, 96))
    monkeypatch.setattr(family, "LEVELS", [(16, 24), (8, 12), (4, 6), (2, 3)])
    monkeypatch.setattr(family, "CHANNELS", 3)
    rows = [c for c in family.cases() if c.dtype == "float16" and c.direction == "fwd"
            and c.shape.startswith("box") and c.provider == "torchvision"][:2]
    assert {c.op for c in rows} == set(family.OPS)
    try:
        for case in rows:
            case.setup().fn()
    finally:
        cases.release()


def test_measure_derives_the_row_and_leaves_out_what_runs_out_of_memory(capsys):
    def setup():
        return cases.Step(lambda: None, flops=4e9, nbytes=2e6, items=8, peak=lambda: 2.0,
                          info={"candidates": 3}, note="7 conv.")
    ok = cases.Case("x", "op", "shape", "float32", "nchw", "fwd", "segops", setup, target=2.0)
    record = cases.measure(ok, timer=lambda fn, **_: 2.0, memory=lambda fn: 2**20)
    assert (record.tflops, record.gbs, record.roofline_fraction) == (2.0, 1.0, 1.0)
    assert (record.items_per_s, record.extra_memory_mb, record.target) == (4000.0, 1.0, 2.0)
    assert record.shape == "shape (7 conv.)" and record.extra == {"candidates": 3}

    def oom():
        raise torch.OutOfMemoryError("test")
    gone = cases.Case("x", "op", "shape", "float32", "nchw", "fwd", "segops", oom)
    kept = cases.run_cases([gone, ok], timer=lambda fn, **_: 1.0, memory=lambda fn: 0)
    assert [r.op for r in kept] == ["op"]
    assert "out of memory, left out" in capsys.readouterr().out


# ----------------------------------------------------------------------------
# the pytest front end, off the GPU
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """`pytest benchmarks/ --benchmark-only --bench-tiny` with --benchmark-json
    and --bench-out, once for the tests below."""
    folder = tmp_path_factory.mktemp("bench")
    done = pytest_benchmarks("--benchmark-only", "--bench-tiny", "-rs",
                             f"--benchmark-json={folder / 'run.json'}",
                             f"--benchmark-storage=file://{folder / 'storage'}",
                             f"--bench-out={folder / 'out'}")
    return done, folder


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour")
def test_pytest_front_end_times_the_cpu_rows_and_skips_kernel_cases(cpu_run):
    done, folder = cpu_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert NO_GPU in done.stdout and "skipped" in done.stdout
    data = json.loads((folder / "run.json").read_text())
    rows = data["benchmarks"]
    expected = [c for c in cases.collect(tiny=True) if c.device == cases.CPU]
    assert sorted(r["param"] for r in rows) == sorted(c.id for c in expected)
    assert data["machine_info"]["card"] == "cpu"
    for row in rows:
        info = row["extra_info"]
        assert row["group"] == info["group"] and row["stats"]["median"] > 0
        assert info["card"] == "cpu" and info["commit"] == harness.git_commit()
        assert info["ms"] == pytest.approx(row["stats"]["median"] * 1e3)
        assert info["items_per_s"] > 0 and "conv.)" in info["shape"]
    for row in rows:
        if row["extra_info"]["provider"] == "segops":
            twin = next(r for r in rows if r["group"] == row["group"] and r is not row)
            assert row["extra_info"]["speedup"] == pytest.approx(
                twin["stats"]["median"] / row["stats"]["median"])
        else:
            assert "speedup" not in row["extra_info"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour")
def test_pytest_front_end_prints_tables_and_writes_the_harness_files(cpu_run):
    done, folder = cpu_run
    out = done.stdout
    assert "segops benchmark table" in out and "model-cpu" in out
    table = codegen_table()
    assert table in out and "| kernel |" in table and "speedup" not in table.lower()
    saved = json.loads((folder / "out" / "cpu.json").read_text())
    assert {r["op"] for r in saved["records"]} == {"model-cpu"}
    assert "model-cpu" in (folder / "out" / "table.txt").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour")
def test_compare_fail_flags_a_regression_against_a_saved_run(cpu_run, tmp_path):
    """A saved run 100x faster than now: --benchmark-compare-fail fails the
    session and names the slower rows; the harness comparison agrees."""
    _, folder = cpu_run
    data = json.loads((folder / "run.json").read_text())
    data["benchmarks"] = [b for b in data["benchmarks"] if "/unet_" in b["param"]]
    for bench in data["benchmarks"]:
        for field in ("min", "max", "mean", "median", "q1", "q3"):
            bench["stats"][field] /= 100
    machine = tmp_path / "storage" / "machine"
    machine.mkdir(parents=True)
    (machine / "0001_fast.json").write_text(json.dumps(data))
    done = pytest_benchmarks("--benchmark-only", "--bench-tiny", "-k", "unet",
                             f"--benchmark-storage=file://{tmp_path / 'storage'}",
                             f"--benchmark-compare={machine / '0001_fast.json'}",
                             "--benchmark-compare-fail=median:10%")
    assert done.returncode != 0
    assert "Performance has regressed" in done.stdout + done.stderr
    assert "unet_1x3x64^2/float32/nchw/train/segops" in done.stdout + done.stderr
    assert compare.main([str(machine / "0001_fast.json"), str(folder / "run.json")]) == 1


# ----------------------------------------------------------------------------
# comparing two saved runs
# ----------------------------------------------------------------------------
def _saved(path: Path, medians: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmarks": [
        {"fullname": name, "stats": {"median": ms / 1e3}} for name, ms in medians.items()]}))
    return path


def test_compare_two_saved_runs(tmp_path, capsys):
    old = _saved(tmp_path / "old.json", {"a": 1.0, "b": 2.0, "gone": 1.0})
    new = _saved(tmp_path / "new.json", {"a": 1.05, "b": 3.0, "added": 1.0})
    changes, gone, added = compare.compare(old, new)
    assert {c.name: round(c.percent, 6) for c in changes} == {"a": 5.0, "b": 50.0}
    assert (gone, added) == (["gone"], ["added"])
    assert [c.name for c in compare.regressions(changes, 10)] == ["b"]
    assert compare.main([str(old), str(new), "--threshold", "60"]) == 0
    assert compare.main([str(old), str(new)]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION" in out and "1 regressions beyond 10%" in out


def test_latest_saved_run_per_family(tmp_path, capsys):
    store = tmp_path / "nvidia_h100"
    for name in ("0001_abc_conv.json", "0002_abc_models.json", "0003_def_conv.json",
                 "notes.json"):
        _saved(store / "Linux-CPython-3.12-64bit" / name, {})
    assert compare.latest(store).name == "0003_def_conv.json"
    assert compare.latest(store, "models").name == "0002_abc_models.json"
    assert compare.latest(store, "boxes") is None and compare.latest(tmp_path / "none") is None
    assert compare.main(["--latest", str(store), "--family", "conv"]) == 0
    assert capsys.readouterr().out.strip().endswith("0003_def_conv.json")


# ----------------------------------------------------------------------------
# the pieces of the pytest front end
# ----------------------------------------------------------------------------
def test_fill_speedups_uses_the_fastest_baseline_of_each_group():
    def row(group, provider, median):
        return {"stats": {"median": median},
                "extra_info": {"group": group, "provider": provider}}
    rows = [row("g", "segops", 1.0), row("g", "slow", 4.0), row("g", "fast", 2.0),
            row("alone", "segops", 1.0), {"stats": {"median": 1.0}, "extra_info": {}}]
    plugin.fill_speedups(rows)
    assert rows[0]["extra_info"]["speedup"] == 2.0
    assert rows[0]["extra_info"]["baseline"] == "fast"
    assert "speedup" not in rows[1]["extra_info"] and "speedup" not in rows[3]["extra_info"]


def test_cuda_event_timer_gives_the_interval_between_two_readings(monkeypatch):
    """The runner reads the timer twice a round: 0 at the start, the
    event-to-event seconds at the end (fake events off the GPU)."""
    clock = iter(range(100))

    class FakeEvent:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            self.t = next(clock)

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return float(end.t - self.t) * 1e3  # ms

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    timer = plugin.CudaEventTimer()
    assert [timer(), timer(), timer(), timer()] == [0.0, 1.0, 0.0, 1.0]


def test_rounds_fill_the_step_budget():
    step = cases.Step(lambda: None, warmup=25, rep=100)
    assert plugin.rounds_for(step, 10.0) == (3, 10)
    assert plugin.rounds_for(step, 500.0) == (1, plugin.MIN_ROUNDS)
    assert plugin.rounds_for(step, 0.0) == (plugin.MAX_ROUNDS, plugin.MAX_ROUNDS)


def test_skip_reasons(monkeypatch):
    gpu_case = cases.Case("x", "op", "s", "float32", "nchw", "fwd", "segops", None)
    cpu_case = cases.Case("x", "op", "s", "float32", "nchw", "fwd", "segops", None,
                          device=cases.CPU)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert NO_GPU in plugin.skip_reason(gpu_case) and plugin.skip_reason(cpu_case) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert plugin.skip_reason(gpu_case) is None and "GPU" in plugin.skip_reason(cpu_case)


# ----------------------------------------------------------------------------
# harness: speedups, table, plot
# ----------------------------------------------------------------------------
def _records():
    R = harness.Record
    return [R("paste_masks", "100", "float32", "float", "segops", ms=1.0, layout="nchw",
              target=20.0),
            R("paste_masks", "100", "float32", "float", "torchvision", ms=30.0, layout="nchw"),
            R("paste_masks", "100", "float32", "float", "other", ms=10.0, layout="nchw"),
            R("conv", "s", "bfloat16", "fwd", "segops", ms=2.0, layout="channels_last",
              target=1.2),
            R("conv", "s", "bfloat16", "fwd", "cudnn", ms=1.0, layout="channels_last"),
            R("conv", "s", "bfloat16", "fwd", "cudnn", ms=9.0, layout="nchw")]


def test_speedups_per_layout_against_the_fastest_baseline():
    records = _records()
    harness.add_speedups(records)
    assert records[0].speedup == 10.0 and records[3].speedup == 0.5
    assert all(r.speedup is None for r in records if r.provider != "segops")
    table = harness.format_table(records)
    assert "10.00x" in table and "20.00x" in table and " cl " in table


def test_plot_shows_speedups_parity_and_targets(tmp_path):
    pytest.importorskip("matplotlib")
    records = _records()
    harness.add_speedups(records)
    path = harness.plot(records, tmp_path / "plot.png", title="test")
    assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert harness.plot(_records(), tmp_path / "none.png") is None  # no speedups: no plot


def test_plot_without_matplotlib_returns_none(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    records = _records()
    harness.add_speedups(records)
    assert harness.plot(records, tmp_path / "plot.png") is None
    assert not (tmp_path / "plot.png").exists()


# ----------------------------------------------------------------------------
# Mask R-CNN benchmark code at toy sizes
# ----------------------------------------------------------------------------
@pytest.mark.slow
def test_mask_rcnn_benchmark_code_runs_at_tiny_sizes(monkeypatch):
    """Both Mask R-CNNs (segops' loading torchvision's calibrated weights,
    strict), eval and train step, each called instead of timed; the parts
    measure NMS, RoI pooling, pasting (eval) and mask targets (train) in
    both, with detections present and the same count in both; the wrapped
    call sites are restored."""
    pytest.importorskip("torchvision")
    import torchvision.ops.boxes as tv_boxes

    from segops import _dispatch
    from segops.benchmarks import models as bench
    from segops.models.detection import roi_heads, rpn, transform
    sites = (rpn.batched_nms_per_image, roi_heads.batched_nms_per_image, roi_heads.mask_targets,
             transform.paste_masks, tv_boxes.batched_nms)

    def call_once(fn, **_):
        fn()
        return 1.0
    monkeypatch.setattr(bench, "DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(bench, "CASES", [("maskrcnn_resnet50_fpn", 2, (64, 96), 5)])
    monkeypatch.setattr(bench, "DETECTION_KWARGS", {
        "min_size": 64, "max_size": 96, "rpn_pre_nms_top_n_test": 100,
        "rpn_post_nms_top_n_test": 30, "rpn_pre_nms_top_n_train": 100,
        "rpn_post_nms_top_n_train": 30, "box_detections_per_img": 6,
        "box_batch_size_per_image": 16})
    monkeypatch.setattr(bench, "PART_RUNS", 1)
    with _dispatch.native_only():
        records = bench.run_cases(bench.cases(), timer=call_once, memory=lambda fn: 0)
    assert [(r.direction, r.provider) for r in records] == [
        ("infer", "segops"), ("infer", "torchvision"), ("train", "segops"),
        ("train", "torchvision")]
    assert all(r.items_per_s == 2e3 and r.shape == "maskrcnn_resnet50_fpn 2x3x64x96"
               for r in records)
    infer, train = records[:2], records[2:]
    assert infer[0].extra["detections"] == infer[1].extra["detections"] == 12
    for r in infer:
        assert r.extra["nms_ms"] > 0 and r.extra["roi_align_ms"] > 0 and r.extra["paste_ms"] > 0
    for r in train:
        assert r.extra["mask_targets_ms"] > 0 and r.extra["paste_ms"] == 0
    assert (rpn.batched_nms_per_image, roi_heads.batched_nms_per_image, roi_heads.mask_targets,
            transform.paste_masks, tv_boxes.batched_nms) == sites


# ----------------------------------------------------------------------------
# `segops bench` off the GPU
# ----------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour")
def test_bench_without_gpu_prints_the_codegen_report_as_a_table(monkeypatch, capsys):
    from segops import cli
    monkeypatch.setattr(cli, "check", lambda: 0)
    assert cli.main(["bench", "--ops", "conv"]) == 0
    out = capsys.readouterr().out
    report = out[out.index("== codegen report"):]
    assert "no timings" in report and codegen_table() in report
    assert "speedup" not in report.lower()


# ----------------------------------------------------------------------------
# the probe: where a case's time goes
# ----------------------------------------------------------------------------
def _tiny_conv_case(provider="segops", direction="fwd"):
    from segops.benchmarks import conv as bench
    spec = ("tiny d2", 1, 16, 6, 16, 3, 2, 1)
    setup = functools.partial(bench._setup, spec, torch.float32, True, direction != "fwd",
                              provider)
    return cases.Case("conv", "atrous_conv2d", "tiny", "float32", "channels_last", direction,
                      provider, setup)


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="CPU behaviour: CPU tensors reach the kernels only through the "
                           "interpreter, which a CUDA machine does not set (the next test "
                           "probes on the GPU)")
def test_probe_times_every_tuner_tile_of_the_launch_the_op_makes(monkeypatch):
    """On CPU: the GEMM launch the op makes is recorded, rerun with every
    tile that fits fp32 (each result checked against F.conv2d) and reported
    with the launcher's own (fixed) tile; the host time is measured."""
    import torch.nn.functional as F
    from segops.benchmarks import conv as bench
    from segops.benchmarks import probe
    from segops.kernels import _gemm
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    case = _tiny_conv_case()
    recorded = []
    real_recorder = probe.recorded_gemm_launches

    @contextlib.contextmanager
    def spy():
        with real_recorder() as launches:
            recorded.append(launches)
            yield launches

    monkeypatch.setattr(probe, "recorded_gemm_launches", spy)
    checked = []

    def checking_timer(fn, **_):
        """Times nothing; once the probe has recorded the launch, checks
        what each tile writes against F.conv2d."""
        if not recorded:  # the op's own call (event_ms)
            fn()
            return 2.0
        x, w, _, y = recorded[0][0]["args"][:4]
        y.fill_(float("nan"))
        fn()
        expected = F.conv2d(x.double(), w.double(), None, 1, 2, 2)
        torch.testing.assert_close(y.double(), expected, rtol=1e-3, atol=1e-3)
        checked.append(fn)
        return 2.0

    row = probe.probe_case(case, checking_timer, on_gpu=False)
    assert row["event_ms"] == 2.0 and row["host_us"] > 0 and "graph_ms" not in row
    (gemm,) = row["gemm"]
    assert gemm["kernel"] == "_conv2d_fwd_kernel" and gemm["MNK"] == [36, 16, 16]
    assert gemm["picked"] == "M64 N16 K16 w4 s3 (fixed)"  # default_config(36, 16, 16)
    launch = recorded[0][0]
    named = dict(zip(launch["kernel"].arg_names, launch["args"]))
    tiles = _gemm.prune_configs(_gemm.tuner_configs(), named)
    assert [t["config"] for t in gemm["tiles"]] == [
        probe._config_name(c.kwargs, c.num_warps, c.num_stages) for c in tiles]
    assert len(tiles) < len(_gemm.HOPPER_TILES)  # fp32 drops 128-row tiles on 4 warps
    assert all(t["ms"] == 2.0 and "error" not in t for t in gemm["tiles"])
    assert [t["grid"] for t in gemm["tiles"]] == [  # (tiles, groups, forward splits)
        [triton.cdiv(36, c.kwargs["BLOCK_M"]) * triton.cdiv(16, c.kwargs["BLOCK_N"]), 1, 1]
        for c in tiles]
    assert len(checked) == len(tiles)
    text = probe.format_row(row)
    assert "picked M64 N16 K16 w4 s3 (fixed)" in text and "host" in text


def test_probe_leaves_the_launcher_as_it_was_and_needs_a_gpu(monkeypatch, capsys):
    from segops.benchmarks import probe
    from segops.kernels import _gemm
    from segops.kernels import conv as conv_kernels
    with probe.recorded_gemm_launches():
        assert conv_kernels.launch is not _gemm.launch
    assert conv_kernels.launch is _gemm.launch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert probe.main(["--out", "unused"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and the profiler")
def test_probe_on_the_gpu_replays_a_graph_and_lists_the_kernels():
    from segops.benchmarks import probe
    row = probe.probe_case(_tiny_conv_case(direction="fwd+bwd"))
    assert isinstance(row["graph_ms"], float), row["graph_ms"]  # else why capture failed
    assert row["device_ms"] > 0
    names = " ".join(k["name"] for k in row["kernels"])
    assert "_conv2d_fwd_kernel" in names and "_conv2d_bwd_weight_kernel" in names
    kernels = {g["kernel"] for g in row["gemm"]}
    assert kernels == {"_conv2d_fwd_kernel", "_conv2d_bwd_input_kernel",
                       "_conv2d_bwd_weight_kernel"}
    assert all(isinstance(t["regs"], int) for g in row["gemm"] for t in g["tiles"])


def test_overlap_tile_sweep_runs_each_launcher_at_each_tile(tmp_path, monkeypatch, capsys):
    """The kernel-only sweep of kernels/overlap.py: each launcher (and the
    per-block confusion matrix) at the default tile and each variant, per
    layout, with their bytes and the check against the default's result;
    no GPU: exit 2."""
    from segops.benchmarks import overlap_tiles
    from segops.kernels import overlap as kernels
    forwards = []
    real = kernels.overlap_sums_forward

    def spy(*args, **kwargs):
        forwards.append((kwargs.get("block_s"), kwargs.get("num_warps")))
        return real(*args, **kwargs)
    monkeypatch.setattr(kernels, "overlap_sums_forward", spy)
    calls = []

    def timer(fn):
        calls.append(fn())
        return 0.5
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = overlap_tiles.run(tmp_path, shapes=[(2, 3, (4, 5))], dtype=torch.float32, timer=timer,
                             peak=100.0, device=device)
    names = ["fwd", "bwd", "cm", "cm per-block"]
    tiles = [(256, 1), (1024, 4), (512, 8)]
    assert [(r["kernel"], r["layout"], r["block"], r["warps"], r["default"]) for r in rows] == [
        (k, layout, [4, s], w, (s, w) == (256, 1) and k != "cm per-block")
        for layout in ("nchw", "cl") for s, w in tiles for k in names]
    assert all(r["same"] for r in rows)
    assert forwards[:6] == [(None, None)] * 2 + [(1024, 4)] * 2 + [(512, 8)] * 2  # run, timed
    x_bytes, t_bytes = 2 * 3 * 20 * 4, 2 * 20 * 8
    assert [r["gbs"] for r in rows[:4]] == pytest.approx(
        [(x_bytes + t_bytes) / 0.5e6, (2 * x_bytes + t_bytes) / 0.5e6]
        + [(x_bytes + t_bytes) / 0.5e6] * 2)
    assert rows[0]["of_copy"] == pytest.approx(rows[0]["gbs"] / 100.0)
    assert calls[2].sum() == 40 and calls[3].sum() == 40  # every pixel counted
    saved = json.loads((tmp_path / "overlap_tiles.json").read_text())
    assert len(saved["rows"]) == 24 and saved["copy_gbs"] == 100.0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert overlap_tiles.main([]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


# ----------------------------------------------------------------------------
# the providers of a group compute the same thing
# ----------------------------------------------------------------------------
# Each family at toy sizes (the interpreter runs segops' kernels on CPU): the
# module constants its cases read when they are set up.
TINY = {
    "conv": {"SHAPES": [("tiny d2", 1, 8, 6, 8, 3, 2, 1),
                        ("tiny dw d3", 1, 8, 7, 8, 3, 3, 8)]},
    "conv_transpose": {"SHAPES": [("tiny k2s2", 1, 8, 4, 4, 2, 2, 0, 0),
                                  ("tiny k3s2 overlap", 1, 8, 4, 4, 3, 2, 1, 1)]},
    "roi_align": {"IMAGE": (64, 96), "LEVELS": [(16, 24), (8, 12), (4, 6), (2, 3)],
                  "CHANNELS": 3, "HEADS": [("box", 12, 3)], "DENSE_HEADS": []},
    "overlap": {"SHAPES": [(2, 5, (8, 9)), (1, 3, (4, 5, 6))]},
    # a small image crowds the boxes: NMS suppresses some, the clip clips half
    "boxes": {"IMAGE": (48, 64), "RPN_IMAGES": [2], "RPN_LEVELS": 3, "RPN_PER_LEVEL": 100,
              "BOX_HEAD": (60, 12), "DECODE_ROWS": 20},
    "masks": {"IMAGE": (40, 56), "PASTE_MASKS": 5, "MASK_SIZE": 6, "TARGET_ROIS": 7,
              "GT_MASKS": 3, "M": 6},
}
# what each family's baselines need installed (overlap's fall back to formulas)
BASELINE_PACKAGES = {"conv": [], "conv_transpose": [], "roi_align": ["torchvision"],
                     "overlap": [], "boxes": ["torchvision"], "masks": ["torchvision"]}
# (family, op): results whose dtype differs by design; compared in float64
OTHER_DTYPES = {
    # segops' loss accumulates in float32 and returns float32 for bf16
    # logits; smp's formula returns the logits' dtype
    ("overlap", "dice_loss"),
    # segops' iou_score divides the int64 counts in float64; torchmetrics
    # returns float32
    ("overlap", "miou"),
}


def _rtol(family: str, case) -> float:
    """The tolerance of a group's results: the dtype's, except where a side
    computes in another precision by design."""
    dtype = getattr(torch, case.dtype)
    if family == "overlap" and case.op == "miou":
        return RTOL[torch.float32]  # from the same argmax counts: the float32 division only
    if family == "roi_align" and dtype == torch.float16:
        # torchvision's fp16 kernel takes fp16 boxes (the rows cast them) and
        # computes sample positions and weights in fp16; segops keeps the
        # fp32 boxes and computes in fp32 (it equals torchvision on fp32
        # features, rounded). At these sizes the two differ by up to ~2e-2
        # (relative RMS); at the benchmark's 800x1216 by ~6e-2.
        return 5e-2
    if DEVICE.type == "cuda" and family.startswith("conv") and dtype == torch.float32:
        return 5e-3  # TF32 on both sides (PyTorch's default for convolutions)
    return RTOL[dtype]


def _assert_same(actual, expected, rtol, name, same_dtype=True):
    """segops' output ``actual`` against a baseline's ``expected``: the same
    structure and dtypes (float dtypes may differ with ``same_dtype`` False),
    integer and bool tensors equal, floats within rtol."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), name
        for key in expected:
            _assert_same(actual[key], expected[key], rtol, f"{name}[{key!r}]", same_dtype)
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), \
            f"{name}: {len(actual)} items != {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            _assert_same(a, e, rtol, f"{name}[{i}]", same_dtype)
    else:
        assert isinstance(actual, torch.Tensor) and isinstance(expected, torch.Tensor), name
        floats = actual.is_floating_point() and expected.is_floating_point()
        assert actual.dtype == expected.dtype or (floats and not same_dtype), \
            f"{name}: {actual.dtype} != {expected.dtype}"
        if expected.is_floating_point():
            assert_close(actual, expected, rtol, name=name)
        else:
            assert torch.equal(actual.cpu(), expected.cpu()), f"{name}: not equal"


@pytest.mark.parametrize("family", list(TINY))
def test_each_groups_providers_compute_the_same_on_the_timed_calls(family, monkeypatch):
    """Every forward group of ``family`` at toy sizes: every provider's
    timed call (Step.fn, on the inputs the group shares) gives segops' result,
    within the dtype's tolerance (integer and bool results: equal). A
    baseline that computed something else would time other work."""
    for package in BASELINE_PACKAGES[family]:
        pytest.importorskip(package)
    # segops runs its kernels here (interpreted on CPU), not the native ops
    # the baselines call
    assert _dispatch.uses_kernel(torch.empty(0, device=DEVICE))
    module = cases.family_module(family)
    monkeypatch.setattr(module, "DEVICE", DEVICE.type)
    for name, value in TINY[family].items():
        monkeypatch.setattr(module, name, value)
    groups = {}
    for case in module.cases():
        if "bwd" not in case.direction:  # the forward groups (paste_masks': float, bool)
            groups.setdefault(case.group, []).append(case)
    assert groups
    try:
        for group, members in groups.items():
            assert members[0].provider == harness.SEGOPS and len(members) >= 2, group
            outputs, inputs = [], []
            for case in members:  # in list order: they share their inputs
                step = case.setup()
                inputs.append(cases._slot[0][1] if cases._slot else None)
                outputs.append(step.fn())
            assert inputs[0] is not None and all(held is inputs[0] for held in inputs), \
                f"{group}: inputs not shared"
            same_dtype = (family, members[0].op) not in OTHER_DTYPES
            for case, output in zip(members[1:], outputs[1:]):
                _assert_same(outputs[0], output, _rtol(family, case),
                             f"{group}: segops vs {case.provider}", same_dtype)
    finally:
        cases.release()
