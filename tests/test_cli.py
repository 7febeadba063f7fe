"""The `segops` command and the benchmark harness's CPU behaviour."""
import subprocess
import sys

import pytest
import torch

import segops.ops
from segops import cli
from segops.benchmarks import harness


def test_info_names_versions_and_dispatch(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for word in ("torch", "triton", "numpy", "dispatch"):
        assert word in out


def test_check_runs_kernels_against_reference():
    """`python -m segops check` in a child process (interpreter on CPU)."""
    done = subprocess.run([sys.executable, "-m", "segops", "check"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FAIL" not in done.stdout and "ok" in done.stdout
    # every kernel family, forward and backward where it has one
    for name in ("overlap_sums (fwd+bwd)", "confusion_matrix", "roi_align (fwd+bwd)",
                 "atrous_conv2d (fwd+bwd)", "conv_transpose2d (fwd+bwd)",
                 "box ops and batched_nms", "paste_masks, mask_targets"):
        assert f"ok   {name}" in done.stdout, name
    assert "RuntimeWarning" not in done.stderr   # the interpreter's masked lanes are not news


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour")
def test_no_timings_without_gpu():
    with pytest.raises(harness.NoGPU):
        harness.time_ms(lambda: None)


def test_records_table_and_speedups(tmp_path):
    records = [
        harness.Record("dice_loss", "2x3x4x4", "float32", "fwd", "segops", ms=1.0, gbs=10.0),
        harness.Record("dice_loss", "2x3x4x4", "float32", "fwd", "smp", ms=4.0, gbs=2.5),
    ]
    harness.add_speedups(records)
    assert records[0].speedup == 4.0 and records[1].speedup is None
    table = harness.format_table(records)
    assert "4.00x" in table and "smp" in table
    path = harness.write_results(records, tmp_path)
    assert path.exists() and '"provider": "segops"' in path.read_text()


def test_bad_bench_family(capsys):
    assert cli.main(["bench", "--ops", "nonsense"]) == 2


def test_overlap_benchmark_code_runs_at_tiny_sizes(monkeypatch):
    """Smoke test of benchmarks/overlap.py on any machine: tiny shapes, each
    provider called once instead of timed (its numbers are not looked at)."""
    from segops.benchmarks import overlap as bench

    def call_once(fn, **_):
        fn()
        return 1.0

    monkeypatch.setattr(bench, "DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(bench, "QUICK_SHAPES", [(2, 3, (5, 6)), (1, 4, (3, 4, 5))])
    monkeypatch.setattr(bench, "time_ms", call_once)
    monkeypatch.setattr(bench, "peak_extra_memory", lambda fn: 0)
    monkeypatch.setattr(bench, "copy_bandwidth_gbs", lambda: 1.0)
    records = bench.run(quick=True)
    providers = {(r.op, r.direction, r.provider) for r in records}
    assert ("dice_loss", "fwd+bwd", "segops") in providers
    assert ("miou", "fwd", "segops") in providers
    assert len(records) >= 2 * 2 * 5


def test_roi_align_benchmark_code_runs_at_tiny_sizes(monkeypatch):
    """Smoke test of benchmarks/roi_align.py: tiny levels, every direction
    (deterministic included) and both layouts, each provider called once."""
    pytest.importorskip("torchvision")
    from segops.benchmarks import roi_align as bench

    def call_once(fn, **_):
        fn()
        return 1.0

    monkeypatch.setattr(bench, "DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(bench, "IMAGE", (32, 48))
    monkeypatch.setattr(bench, "LEVELS", [(8, 12), (4, 6), (2, 3), (1, 2)])
    monkeypatch.setattr(bench, "CHANNELS", 3)
    monkeypatch.setattr(bench, "HEADS", [("box", 5, 2)])
    monkeypatch.setattr(bench, "DENSE_HEADS", [("box", 12, 2)])
    monkeypatch.setattr(bench, "DTYPES", [torch.bfloat16])
    monkeypatch.setattr(bench, "time_ms", call_once)
    monkeypatch.setattr(bench, "peak_extra_memory", lambda fn: 0)
    records = bench.run(quick=False)
    keys = {(r.op, r.direction, r.provider) for r in records}
    for op in ("roi_align", "multi_scale"):
        for direction in ("fwd", "fwd+bwd", "fwd+bwd det"):
            assert (op, direction, "segops") in keys and (op, direction, "torchvision") in keys
    # the heads in both layouts, 3 directions; the dense head (bf16
    # channels_last) in the 2 backward directions; 2 ops x 2 providers each
    assert len(records) == (2 * 3 + 2) * 2 * 2
    assert {r.shape for r in records if r.direction == "fwd"} == {"box 5x3x2^2"}


def test_conv_benchmark_code_runs_at_tiny_sizes(monkeypatch):
    """Smoke test of benchmarks/conv.py: tiny shapes, both layouts and
    directions, each provider called once."""
    from segops.benchmarks import conv as bench

    def call_once(fn, **_):
        fn()
        return 1.0

    monkeypatch.setattr(bench, "DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(bench, "SHAPES", [("aspp d3", 1, 5, 6, 4, 3, 3, 1),
                                          ("sep d2", 1, 4, 6, 4, 3, 2, 4)])
    monkeypatch.setattr(bench, "DTYPES", [torch.float32])
    monkeypatch.setattr(harness, "time_ms", call_once)
    monkeypatch.setattr(harness, "peak_extra_memory", lambda fn: 0)
    monkeypatch.setattr(bench, "_roofline", lambda dtype: 1.0)
    records = bench.run(quick=False)
    keys = {(r.direction, r.provider) for r in records}
    assert keys == {(d, p) for d in ("fwd", "fwd+bwd") for p in ("segops", "cudnn")}
    assert len(records) == 2 * 2 * 2 * 2


def test_conv_transpose_benchmark_code_runs_at_tiny_sizes(monkeypatch):
    """Smoke test of benchmarks/conv_transpose.py: both kernels (k == stride
    and overlapping), both layouts and directions, each provider once."""
    from segops.benchmarks import conv_transpose as bench

    def call_once(fn, **_):
        fn()
        return 1.0

    monkeypatch.setattr(bench, "DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(bench, "SHAPES", [("up", 1, 4, 3, 2, 2, 2, 0, 0),
                                          ("overlap", 1, 3, 3, 2, 3, 2, 1, 1)])
    monkeypatch.setattr(bench, "DTYPES", [torch.float32])
    monkeypatch.setattr(harness, "time_ms", call_once)
    monkeypatch.setattr(harness, "peak_extra_memory", lambda fn: 0)
    monkeypatch.setattr(bench, "_roofline", lambda dtype: 1.0)
    records = bench.run(quick=False)
    assert len(records) == 2 * 2 * 2 * 2
    assert {r.provider for r in records} == {"segops", "cudnn"}


def test_models_benchmark_code_runs_at_tiny_sizes(monkeypatch):
    """Smoke test of benchmarks/models.py: the U-Net pair (segops vs reverted
    eager twin) and a torchvision pair, train and infer, each called once."""
    pytest.importorskip("torchvision")
    from segops.benchmarks import models as bench

    def call_once(fn, **_):
        fn()
        return 1.0

    monkeypatch.setattr(bench, "DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(bench, "CASES", [("unet", 2, 16, 2), ("fcn_resnet50", 2, 16, 3)])
    monkeypatch.setattr(bench, "UNET_WIDTH", 4)
    monkeypatch.setattr(bench, "time_ms", call_once)
    monkeypatch.setattr(bench, "peak_extra_memory", lambda fn: 0)
    from segops import ArgumentError, _dispatch
    with _dispatch.reference_only():  # the code path, not the kernels, is under test
        records = bench.run(quick=False)
    assert len(records) == 2 * 2 * 2
    assert {(r.provider, r.direction) for r in records} == {
        (p, d) for p in ("segops", "eager") for d in ("train", "infer")}
    assert all(r.items_per_s == 2e3 for r in records)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour")
def test_bench_without_gpu_runs_the_self_check_and_the_cpu_model_rows(monkeypatch, capsys):
    from segops.benchmarks import models
    calls = []
    monkeypatch.setattr(cli, "check", lambda: calls.append("check") or 0)
    monkeypatch.setattr(models, "run_cpu", lambda quick: calls.append(("cpu", quick)) or [
        harness.Record("model-cpu", "tiny", "float32", "infer", "segops", ms=1.0),
        harness.Record("model-cpu", "tiny", "float32", "infer", "eager", ms=1.0)])
    assert cli.main(["bench", "--ops", "models", "--quick"]) == 0
    assert calls == ["check", ("cpu", True)]
    assert "model-cpu" in capsys.readouterr().out
    calls.clear()
    assert cli.main(["bench", "--ops", "conv"]) == 0
    assert calls == ["check"]


def test_a_gpu_other_than_the_current_one_is_a_clear_error(monkeypatch):
    """segops' kernels launch on the current CUDA device (Triton's rule)
    while torch's work around them follows the tensors: tensors on another
    GPU are refused with the fix in the message, not run unordered
    (host-side check: the dispatch sees cuda:1 while cuda:0 is current)."""
    import types

    from segops import ArgumentError, _dispatch
    monkeypatch.setattr(_dispatch, "path_for", lambda device: _dispatch.KERNEL)
    monkeypatch.setattr(_dispatch, "TRITON_AVAILABLE", True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    on = types.SimpleNamespace
    assert _dispatch.uses_kernel(on(device=torch.device("cuda", 0)))
    assert _dispatch.uses_kernel(on(device=torch.device("cuda")))
    with pytest.raises(ArgumentError, match=r"torch.cuda.set_device\(1\)"):
        _dispatch.uses_kernel(on(device=torch.device("cuda", 1)))


def test_kernel_path_without_triton_is_an_error(monkeypatch):
    """No silent fallback on CUDA: without Triton a CUDA tensor raises."""
    import types

    from segops import _dispatch
    monkeypatch.setattr(_dispatch, "path_for", lambda device: _dispatch.KERNEL)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    cuda = types.SimpleNamespace(device=torch.device("cuda", 0))
    monkeypatch.setattr(_dispatch, "TRITON_AVAILABLE", False)
    with pytest.raises(RuntimeError, match="need Triton"):
        _dispatch.uses_kernel(cuda)
    monkeypatch.setattr(_dispatch, "TRITON_AVAILABLE", True)
    assert _dispatch.uses_kernel(cuda)


def test_forced_paths_nest_and_restore():
    """native_only inside reference_only, and each block gives back the
    path it found; deterministic_algorithms restores the flag it found;
    a meta tensor (no interpreter for it) takes the native path."""
    from segops import _dispatch
    default = _dispatch.path_for("cpu")
    with _dispatch.reference_only():
        assert _dispatch.path_for("cpu") == _dispatch.REFERENCE
        with _dispatch.native_only():
            assert _dispatch.path_for("cpu") == _dispatch.NATIVE
        assert _dispatch.path_for("cpu") == _dispatch.REFERENCE
    assert _dispatch.path_for("cpu") == default
    assert _dispatch.path_for("meta") == _dispatch.NATIVE
    before = torch.are_deterministic_algorithms_enabled()
    for enabled in (True, False):
        with _dispatch.deterministic_algorithms(enabled):
            assert torch.are_deterministic_algorithms_enabled() is enabled
        assert torch.are_deterministic_algorithms_enabled() is before


def test_deterministic_blocks_nest_and_restore_the_enclosing_flag():
    """deterministic_algorithms inside an enabled block gives back True, not False."""
    from segops import _dispatch
    before = torch.are_deterministic_algorithms_enabled()
    with _dispatch.deterministic_algorithms(True):
        for enabled in (False, True):
            with _dispatch.deterministic_algorithms(enabled):
                assert torch.are_deterministic_algorithms_enabled() is enabled
            assert torch.are_deterministic_algorithms_enabled() is True
    assert torch.are_deterministic_algorithms_enabled() is before


@pytest.mark.parametrize("path", ["triton", "triton-interpreter", "native_only"])
def test_forced_path_takes_only_native_or_reference(path):
    """forced_path refuses a path other than NATIVE or REFERENCE, before entering the block."""
    from segops import _dispatch
    default = _dispatch.path_for("cpu")
    with pytest.raises(ValueError, match="path must be"):
        with _dispatch.forced_path(path):
            pass
    assert _dispatch.path_for("cpu") == default


def test_check_int_refuses_a_float_tensor():
    from segops import ArgumentTypeError
    from segops._checks import check_int
    assert check_int("x", torch.tensor(3)) == 3
    with pytest.raises(ArgumentTypeError, match="x must be an int"):
        check_int("x", torch.tensor(2.5))


def test_check_int_bounds_are_inclusive():
    """Both bounds are allowed values; one past either raises, with the bound
    in the message (ignore_index takes any int64, classes index from -C)."""
    from segops import ArgumentError
    from segops._checks import check_int
    assert check_int("x", 5, minimum=2, maximum=5) == 5
    assert check_int("x", 2, minimum=2, maximum=5) == 2
    with pytest.raises(ArgumentError, match=r"x must be <= 5, got 6"):
        check_int("x", 6, minimum=2, maximum=5)
    with pytest.raises(ArgumentError, match=r"x must be >= 2, got 1"):
        check_int("x", 1, minimum=2, maximum=5)
    with pytest.raises(ArgumentError, match=r"x must be <= 5, got 6"):
        check_int("x", 6, maximum=5)
    with pytest.raises(ArgumentError, match=r"x must be >= 2, got 1"):
        check_int("x", 1, minimum=2)
    x, t = torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long)
    segops.ops.dice_loss(x, t, ignore_index=2**63 - 1)
    with pytest.raises(ArgumentError, match="ignore_index must be <="):
        segops.ops.dice_loss(x, t, ignore_index=2**63)
    segops.ops.dice_loss(x, t, classes=[-3, 2])
    with pytest.raises(ArgumentError, match="classes must be <= 2, got 3"):
        segops.ops.dice_loss(x, t, classes=[3])


@pytest.mark.parametrize("model", ["unet", "maskrcnn"])
def test_demo_arguments_are_checked_before_training(model, monkeypatch, tmp_path, capsys):
    """--epochs 0 or -1 and an --out in a missing folder are argument errors
    at once (0 used to train the default 10 epochs, -1 failed in the
    scheduler, a bad --out after the whole run); a given value is used."""
    from segops import demo as unet_demo
    from segops import demo_maskrcnn
    configs = []
    result = dict(seconds=0.0, miou=0.0, png="x.png",
                  metrics=dict(segm_map_50=0.0, bbox_map_50=0.0))
    for module in (unet_demo, demo_maskrcnn):
        monkeypatch.setattr(module, "run", lambda config: configs.append(config) or result)
    for argv, message in ((["--epochs", "0"], "must be at least 1, got 0"),
                          (["--epochs", "-1"], "must be at least 1, got -1"),
                          (["--out", str(tmp_path / "missing" / "x.png")], "does not exist")):
        with pytest.raises(SystemExit) as exit_:
            cli.main(["demo", model, *argv])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert configs == []
    assert cli.main(["demo", model, "--epochs", "1", "--out", str(tmp_path / "x.png")]) == 0
    assert configs[0].epochs == 1 and configs[0].out == str(tmp_path / "x.png")
    assert cli.main(["demo", model]) == 0 and configs[1].epochs == (10 if model == "unet" else 12)


def test_int_pair_bounds_are_inclusive():
    """int_pair allows both bounds; one past either raises naming the pair."""
    from segops import ArgumentError
    from segops._checks import int_pair
    assert int_pair("x", (1, 5), 1, 5) == [1, 5]
    assert int_pair("x", 5, 1, 5) == [5, 5]
    with pytest.raises(ArgumentError, match=r"x must be <= 5, got \(1, 6\)"):
        int_pair("x", (1, 6), 1, 5)
    with pytest.raises(ArgumentError, match=r"x must be positive, got \(0, 5\)"):
        int_pair("x", (0, 5), 1, 5)


def test_bench_codegen_refuses_unknown_families(monkeypatch, capsys):
    """`segops bench --codegen --ops conv nonsense` is an error naming
    'nonsense' (it was dropped silently); known families reach the report's
    command line as given."""
    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda argv, env: calls.append(argv) or 0)
    assert cli.main(["bench", "--codegen", "--ops", "conv", "nonsense"]) == 2
    assert "not ['nonsense']" in capsys.readouterr().err and calls == []
    assert cli.main(["bench", "--codegen", "--quick", "--ops", "conv", "roi_align"]) == 0
    assert calls[0][-4:] == ["--ops", "conv", "roi_align", "--ci"]
