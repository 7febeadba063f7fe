"""Fuzz: the overlap family (issue 16, "A fuzz suite in the project"):
segops.ops.overlap_sums against segops' reference, dice_loss / jaccard_loss
and nn.DiceLoss / JaccardLoss against segmentation-models-pytorch,
confusion_matrix, iou_score / dice_score and metrics.MeanIoU against
torchmetrics (and the reference where torchmetrics is undefined).

Each example draws scores (1-3 spatial dims, empty batches, dtype, a memory
format or non-contiguous view, NaN/inf/huge values, classes masked with
-inf; 1-4 classes, or 257/300 in class chunks), an index or dense
target (its dtype, a non-contiguous view, labels out of range, ignore_index
inside, outside or wrapping the target's dtype), the activation,
squared/intersection options and validate_args. It runs on the kernel path
(the interpreter on CPU) and the reference path, forward and backward, and
must give the peer's result within the dtype's tolerance, or a segops error
naming the argument. With validate_args=True an out-of-range label is such
an error; with validate_args=False it counts in no class (documented).

``SEGOPS_FUZZ_EXAMPLES=N`` runs N examples per test instead of the CI
default (see tests/fuzz/strategies.py)::

    SEGOPS_FUZZ_EXAMPLES=300 python -m pytest -q -p no:xdist tests/fuzz/test_overlap.py
"""
from __future__ import annotations

import pytest
import torch
from fuzz.strategies import (
    as_view,
    call_segops,
    check_segops_error,
    float_dtypes,
    fuzz_settings,
    on_path,
    random_tensor,
    seeds,
)
from helpers import DEVICE, RTOL, assert_close, non_contiguous
from hypothesis import event, given
from hypothesis import strategies as st

import segops
from segops.ops import overlap as ops
from segops.reference import overlap as ref

INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)
TARGET_VIEWS = ("contiguous", "stride2", "transposed", "slice")
INPUT_VIEWS = ("contiguous", "channels_last", "stride2", "transposed", "slice")


# --------------------------------------------------------------------------
# strategies
# --------------------------------------------------------------------------
@st.composite
def overlap_calls(draw):
    # more than 256 classes: softmax over class chunks
    N, C = draw(st.sampled_from([1, 2, 0])), draw(st.sampled_from([1, 2, 3, 4] * 2 + [257, 300]))
    spatial = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    dense = draw(st.booleans())
    return dict(
        N=N, C=C, spatial=spatial, dense=dense,
        target_dtype=draw(st.sampled_from(
            (torch.float64, torch.float32, torch.int64, torch.uint8, torch.bool) if dense
            else INDEX_DTYPES)),
        labels=draw(st.sampled_from(["valid", "valid", "out-of-range"])),
        ignore_index=draw(st.sampled_from([None, None, 0, 1, 255, -1, 300, 2**40])),
        activation=draw(st.sampled_from(["softmax", "sigmoid", "none"])),
        squared=draw(st.booleans()), intersection=draw(st.sampled_from(["product", "min"])),
        validate_args=draw(st.booleans()), dtype=draw(float_dtypes),
        special=draw(st.sampled_from([None, None, "nan", "inf", "huge", "zeros", "masked"])),
        input_view=draw(st.sampled_from(INPUT_VIEWS)),
        target_view=draw(st.sampled_from(TARGET_VIEWS)), seed=draw(seeds))


def fix_call(call):
    """The combinations of open findings would be left out here (none open)."""
    return call


def make_target(call, gen_seed):
    """Index labels in [0, C) (one out of range when drawn so) or a dense
    mask (0/1, soft for float dtypes), about a fifth set to ignore_index,
    then converted to the target dtype as torch converts (-1 is 255 in uint8)."""
    gen = torch.Generator().manual_seed(gen_seed)
    N, C, spatial = call["N"], call["C"], call["spatial"]
    dtype, ignore = call["target_dtype"], call["ignore_index"]
    if call["dense"]:
        t = torch.rand(N, C, *spatial, generator=gen, dtype=torch.float64)
        t = t if dtype.is_floating_point else t.round()
        if dtype == torch.bool:
            return t.bool()
        if ignore is not None and t.numel():
            t = torch.where(torch.rand(t.shape, generator=gen) < 0.2, float(ignore), t)
        return t.to(dtype) if dtype.is_floating_point else _wrap(t.to(torch.int64), dtype)
    t = torch.randint(0, C, (N, *spatial), generator=gen)
    if call["labels"] == "out-of-range" and t.numel():
        t.view(-1)[0] = C + 1
    if ignore is not None and t.numel() and abs(ignore) < 2**31:
        t = torch.where(torch.rand(t.shape, generator=gen) < 0.2, ignore, t)
    return _wrap(t, dtype)


def _wrap(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(torch.int64).to(dtype)


def make_input(call):
    """Scores; 'masked' sets the leading classes of about half the pixels to
    -inf (classes masked out before a softmax: the first chunks can be all
    -inf)."""
    masked = call["special"] == "masked"
    x = random_tensor((call["N"], call["C"], *call["spatial"]), torch.float64, call["seed"],
                      None if masked else call["special"]) * 2
    if call["activation"] == "none" and call["special"] in (None, "masked"):
        x = x.sigmoid()
    elif masked and call["C"] > 1:
        gen = torch.Generator().manual_seed(call["seed"] + 3)
        # 1, about half or all but one class (more than a 256-class chunk)
        k = [1, max(1, call["C"] // 2), call["C"] - 1][call["seed"] % 3]
        pixels = torch.rand(x[:, 0].shape, generator=gen) < 0.5
        x[:, :k] = torch.where(pixels.unsqueeze(1), float("-inf"), x[:, :k])
    return x.to(call["dtype"])


def view(t, kind):
    """A memory format or non-contiguous view (integer tensors too)."""
    if kind == "contiguous" or t.numel() == 0:
        return t
    if kind == "channels_last":
        return as_view(t, kind)
    if kind == "slice" and not t.is_floating_point():
        dim = 0 if t.dim() == 1 else 1
        pad = list(t.shape)
        pad[dim] = 2
        big = torch.cat([t.new_zeros(pad), t, t.new_zeros(pad)], dim=dim)
        return big.narrow(dim, 2, t.shape[dim])
    return non_contiguous(t, kind)


def labels_out_of_range(call, t) -> bool:
    """Index labels outside [0, C) that are not ignore_index (in the target's dtype)."""
    if call["dense"] or t.numel() == 0:
        return False
    bad = (t < 0) | (t >= call["C"])
    if call["ignore_index"] is not None:
        bad &= t != call["ignore_index"]
    return bool(bad.any())


def sums_tolerance(dtype):
    return RTOL[torch.float64] * 1e3 if dtype == torch.float64 else RTOL[torch.float32] * 10


# --------------------------------------------------------------------------
# overlap_sums against the reference
# --------------------------------------------------------------------------
@fuzz_settings(50)
@given(call=overlap_calls())
def test_overlap_sums_matches_reference_or_names_the_argument(call):
    call = fix_call(call)
    x, t = make_input(call), make_target(call, call["seed"] + 1)
    options = dict(activation=call["activation"], ignore_index=call["ignore_index"],
                   squared=call["squared"], intersection=call["intersection"],
                   validate_args=call["validate_args"])
    if call["validate_args"] and labels_out_of_range(call, t):
        event("out-of-range label refused")
        # on CUDA the check is a device-side assert, which ends the process's
        # CUDA context (tests/ops/test_overlap.py checks it in a child
        # process): the host check is exercised on CPU tensors instead
        for path in ("kernel", "reference"):
            with on_path(path):
                _, error = call_segops(lambda: ops.overlap_sums(x, t, **options), call)
            assert error is not None, f"out-of-range label accepted on the {path} path"
            check_segops_error(error, ["target"], call)
        return
    event("compared")
    x64 = x.double().requires_grad_()
    paths = ("kernel", "reference") if DEVICE.type == "cpu" else ("kernel",)
    # the reference in the input's accumulation dtype (float32 below
    # float64: huge values overflow there as in the kernel)
    x64 = x.detach().requires_grad_()
    want = ref.overlap_sums(x64, t, call["activation"], call["ignore_index"],
                            call["squared"], call["intersection"] == "min")
    grad = random_tensor(want.shape, want.dtype, call["seed"] + 2)
    (want_grad,) = torch.autograd.grad(want, x64, grad) if want.numel() and want.requires_grad \
        else (torch.zeros_like(x64),)
    for path in paths:
        xi = view(x.to(DEVICE), call["input_view"]).detach().requires_grad_()
        ti = view(t.to(DEVICE), call["target_view"])
        with on_path(path):
            sums, error = call_segops(lambda: ops.overlap_sums(xi, ti, **options), call)
            assert error is None, f"{path}: {error}"
            assert sums.dtype == (torch.float64 if call["dtype"] == torch.float64
                                  else torch.float32)
            assert_close(sums, want, sums_tolerance(call["dtype"]), name=f"{path} sums")
            if sums.numel():
                (gx,) = torch.autograd.grad(sums, xi, grad.to(DEVICE, sums.dtype))
                assert gx.dtype == call["dtype"]
                assert_close(gx, want_grad.to(call["dtype"]), RTOL[call["dtype"]],
                             name=f"{path} grad")


# --------------------------------------------------------------------------
# the losses against segmentation-models-pytorch
# --------------------------------------------------------------------------
@st.composite
def loss_calls(draw):
    mode = draw(st.sampled_from(["binary", "multiclass", "multilabel"]))
    C = 1 if mode == "binary" else draw(st.integers(2, 4))
    classes = None
    if mode != "binary" and draw(st.booleans()):
        classes = draw(st.lists(st.integers(-C, C - 1), min_size=1, max_size=C, unique=True))
    return dict(mode=mode, C=C, N=draw(st.integers(1, 2)),
                spatial=tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=2))),
                classes=classes, log_loss=draw(st.booleans()),
                from_logits=draw(st.booleans()),
                smooth=draw(st.sampled_from([0.0, 0.5, 1.0])),
                ignore_index=draw(st.sampled_from([None, None, 255, -1, 1])),
                eps=draw(st.sampled_from([1e-7, 1e-3])),
                target_dtype=draw(st.sampled_from([torch.int64, torch.uint8, torch.float64])),
                kind=draw(st.sampled_from(["dice", "jaccard"])),
                dtype=draw(st.sampled_from([torch.float64, torch.float32])),
                input_view=draw(st.sampled_from(INPUT_VIEWS)),
                target_view=draw(st.sampled_from(TARGET_VIEWS)), seed=draw(seeds))


def loss_target(call):
    gen = torch.Generator().manual_seed(call["seed"] + 1)
    N, C, spatial = call["N"], call["C"], call["spatial"]
    if call["mode"] == "multiclass":
        t = torch.randint(0, C, (N, *spatial), generator=gen)
        dtype = torch.int64   # smp's one_hot takes int64 only
    else:
        shape = (N, *spatial) if call["mode"] == "binary" else (N, C, *spatial)
        t = torch.randint(0, 2, shape, generator=gen)
        dtype = call["target_dtype"]
    if call["ignore_index"] is not None and t.numel():
        t = torch.where(torch.rand(t.shape, generator=gen) < 0.2, call["ignore_index"], t)
    return t.to(dtype)


@fuzz_settings(30)
@given(call=loss_calls())
def test_losses_match_smp(call):
    smp_losses = pytest.importorskip("segmentation_models_pytorch.losses")
    x = random_tensor((call["N"], call["C"], *call["spatial"]), torch.float64, call["seed"])
    if not call["from_logits"]:
        x = x.softmax(1) if call["mode"] == "multiclass" else x.sigmoid()
    x = x.to(call["dtype"])
    t = loss_target(call)
    name = "DiceLoss" if call["kind"] == "dice" else "JaccardLoss"
    options = dict(classes=call["classes"], log_loss=call["log_loss"],
                   from_logits=call["from_logits"], smooth=call["smooth"],
                   ignore_index=call["ignore_index"], eps=call["eps"])
    if call["mode"] == "binary":
        options.pop("classes")
    x64 = x.double().requires_grad_()
    want = getattr(smp_losses, name)(call["mode"], **options)(x64, t)
    (want_grad,) = torch.autograd.grad(want, x64)
    for path in ("kernel", "reference") if DEVICE.type == "cpu" else ("kernel",):
        xi = view(x.to(DEVICE), call["input_view"]).detach().requires_grad_()
        ti = view(t.to(DEVICE), call["target_view"])
        with on_path(path):
            module = getattr(segops.nn, name)(call["mode"], **options)
            loss, error = call_segops(lambda: module(xi, ti), call)
            assert error is None, f"{path}: {error}"
            (gx,) = torch.autograd.grad(loss, xi)
        rtol = 1e-9 if call["dtype"] == torch.float64 else 1e-5
        assert_close(loss, want, rtol, atol=1e-12, name=f"{path} loss")
        assert_close(gx, want_grad, rtol, atol=1e-12, name=f"{path} grad")


# --------------------------------------------------------------------------
# confusion matrix, IoU and MeanIoU against torchmetrics
# --------------------------------------------------------------------------
@st.composite
def confusion_calls(draw):
    C = draw(st.integers(1, 5))
    return dict(C=C, N=draw(st.sampled_from([1, 2, 0])),
                spatial=tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))),
                pred_kind=draw(st.sampled_from(["scores", "labels"])),
                ignore_index=draw(st.sampled_from([None, None, 0, C - 1, 255, -1])),
                labels=draw(st.sampled_from(["valid", "valid", "out-of-range"])),
                validate_args=draw(st.booleans()),
                label_dtype=draw(st.sampled_from(INDEX_DTYPES)),
                score_dtype=draw(float_dtypes),
                special=draw(st.sampled_from([None, None, "nan", "inf"])),
                average=draw(st.sampled_from(["macro", "micro", "none", "weighted"])),
                pred_view=draw(st.sampled_from(TARGET_VIEWS)),
                target_view=draw(st.sampled_from(TARGET_VIEWS)), seed=draw(seeds))


@fuzz_settings(50)
@given(call=confusion_calls())
def test_confusion_matrix_and_iou_match_torchmetrics(call):
    tm = pytest.importorskip("torchmetrics.classification")
    gen = torch.Generator().manual_seed(call["seed"])
    N, C, spatial = call["N"], call["C"], call["spatial"]
    t = torch.randint(0, C, (N, *spatial), generator=gen)
    if call["ignore_index"] is not None and t.numel():
        t = torch.where(torch.rand(t.shape, generator=gen) < 0.2, call["ignore_index"], t)
    if call["labels"] == "out-of-range" and t.numel():
        t.view(-1)[-1] = C + 3
    t = _wrap(t, call["label_dtype"])
    if call["pred_kind"] == "scores":
        pred = random_tensor((N, C, *spatial), call["score_dtype"], call["seed"] + 1,
                             call["special"])
    else:
        pred = _wrap(torch.randint(0, C, (N, *spatial), generator=gen), call["label_dtype"])
    args = (C, call["ignore_index"])
    out_of_range = labels_out_of_range(dict(call, dense=False), t)
    refused = call["validate_args"] and out_of_range
    device = "cpu" if refused else DEVICE  # CUDA would assert on the device (see above)
    for path in ("kernel", "reference") if DEVICE.type == "cpu" else ("kernel",):
        pi, ti = view(pred.to(device), call["pred_view"]), view(t.to(device), call["target_view"])
        with on_path(path):
            cm, error = call_segops(lambda: ops.confusion_matrix(
                pi, ti, *args, validate_args=call["validate_args"]), call)
        if refused:
            event("out-of-range label refused")
            check_segops_error(error, ["target"], call)
            continue
        assert error is None, f"{path}: {error}"
        # the documented rule (the reference): out-of-range pairs are not counted
        assert torch.equal(cm.cpu(), ref.confusion_matrix(pred, t, *args)), path
        if out_of_range:
            continue   # torchmetrics is undefined there
        event("compared with torchmetrics")
        theirs = tm.MulticlassConfusionMatrix(C, ignore_index=call["ignore_index"],
                                              validate_args=False)(pred, t)
        assert torch.equal(cm.cpu(), theirs.reshape(C, C)), path
        if t.numel() == 0 or C == 1:
            continue
        jaccard = tm.MulticlassJaccardIndex(C, average=call["average"],
                                            ignore_index=call["ignore_index"],
                                            validate_args=False)(pred, t).double()
        metric = segops.metrics.MeanIoU(C, call["ignore_index"], call["average"],
                                        validate_args=False)
        with on_path(path):
            metric.update(pi, ti)
            ours = metric.compute().cpu()
        # documented difference: a class absent from prediction and target
        # is NaN in 'none' (torchmetrics: 0) and left out of 'macro' (torchmetrics: 0,
        # counted in the mean unless it is the ignored class)
        present = (cm.sum(0) + cm.sum(1)).cpu() > 0
        if call["average"] == "none":
            assert torch.isnan(ours[~present]).all()
            assert_close(ours[present], jaccard[present], 1e-6, name="IoU per class")
        elif call["average"] != "macro" or bool(present.all()):
            assert_close(ours, jaccard, 1e-6, name=f"IoU {call['average']}")


# --------------------------------------------------------------------------
# fuzz findings, fixed: regression tests
# --------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["kernel", "native", "reference"])
@pytest.mark.parametrize("fn", ["overlap_sums", "dice_loss", "jaccard_loss"])
def test_empty_batch_on_the_cpu_paths(path, fn):
    if path != "kernel" and DEVICE.type != "cpu":
        pytest.skip("the native and reference paths serve CPU tensors")
    x = torch.randn(0, 3, 4, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    t = torch.zeros(0, 4, 4, dtype=torch.long, device=DEVICE)
    with on_path(path):
        result, error = call_segops(lambda: getattr(ops, fn)(x, t), fn)
        assert error is None, error
        if fn == "overlap_sums":
            assert result.shape == (3, 0, 3)
        else:
            assert result.item() == 0.0
            result.backward()


@pytest.mark.parametrize("C", [1, 2])
def test_min_intersection_propagates_nan(C):
    x = torch.zeros(1, C, 1, dtype=torch.float64)
    x[0, -1, 0] = float("nan")
    t = torch.zeros(1, 1, dtype=torch.long)
    sums = ops.overlap_sums(x.to(DEVICE), t.to(DEVICE), intersection="min")
    want = ref.overlap_sums(x, t, "softmax", None, False, True)   # intersection NaN
    assert_close(sums, want, sums_tolerance(torch.float64))


@pytest.mark.parametrize("ignore", [256, 2**40])
def test_bool_target_ignore_index_not_wrapped(ignore):
    x = torch.ones(1, 1, 2, dtype=torch.float64)
    t = torch.tensor([[[False, True]]])
    sums = ops.overlap_sums(x.to(DEVICE), t.to(DEVICE), activation="none", ignore_index=ignore)
    want = ref.overlap_sums(x, t, "none", ignore, False)     # [1, 2, 1]: nothing ignored
    assert_close(sums, want, sums_tolerance(torch.float64))
