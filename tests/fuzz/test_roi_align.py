"""Fuzz: segops.ops.roi_align / multi_scale_roi_align and the modules
(segops.nn.RoIAlign, MultiScaleRoIAlign) against torchvision (issue 16, "A
fuzz suite in the project").

Each example draws features (dtype, memory format or non-contiguous view,
special values), boxes as a Tensor[K, 5] or a list of Tensor[L, 4] (zero
boxes, reversed, degenerate and far-away boxes, NaN/inf/huge coordinates,
out-of-range and fractional batch indices, float64/float32/int boxes,
non-contiguous boxes), output_size, spatial_scale, sampling_ratio,
aligned, validate_args and pool_mode. Average pooling must give
torchvision.ops.roi_align's result (in segops' coordinate dtype: float32
below float64 features, where sample counts and positions are decided)
forward and backward, with segops' documented differences applied to the
expectation: a box with a NaN/inf coordinate, an out-of-range batch index
(``validate_args=False``) or an adaptive sample count past int32 or below
0 pools zeros. Max pooling has no torchvision peer: the kernel must give the
reference path's result. Features with NaN/inf are compared where
torchvision's output is finite (see the test). With ``validate_args=True`` a bad batch index is a
segops error naming the boxes. The multi-scale module is compared to
torchvision's MultiScaleRoIAlign, reversed boxes included.

``SEGOPS_FUZZ_EXAMPLES=N`` runs N examples per test instead of the CI
default (see tests/fuzz/strategies.py)::

    SEGOPS_FUZZ_EXAMPLES=300 python -m pytest -q -p no:xdist tests/fuzz/test_roi_align.py
"""
from __future__ import annotations

import math

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
    views,
)
from helpers import DEVICE, assert_close, non_contiguous
from hypothesis import event, given
from hypothesis import strategies as st

import segops

torchvision_ops = pytest.importorskip("torchvision.ops")

NAMES = ("input", "boxes", "batch index", "output_size", "spatial_scale", "sampling_ratio",
         "pool_mode", "features", "scales")
FEATURE_SPECIALS = (None, "nan", "inf", "huge", "zeros")
INT32_MAX = 2**31 - 1


# --------------------------------------------------------------------------
# strategies
# --------------------------------------------------------------------------
@st.composite
def box_rows(draw, N, H, W, scale):
    """One (batch index, x1, y1, x2, y2) row in image coordinates."""
    kind = draw(st.sampled_from(["normal", "normal", "normal", "reversed", "degenerate", "far",
                                 "nan", "inf", "huge", "bad-index", "fractional-index"]))
    size_w, size_h = (W + 2) / scale, (H + 2) / scale
    x1 = draw(st.floats(-2 / scale, size_w, allow_nan=False))
    y1 = draw(st.floats(-2 / scale, size_h, allow_nan=False))
    x2 = x1 + draw(st.floats(0, size_w, allow_nan=False))
    y2 = y1 + draw(st.floats(0, size_h, allow_nan=False))
    index = float(draw(st.integers(0, N - 1)))
    if kind == "reversed":
        x1, x2 = x2 + 0.5, x1
    elif kind == "degenerate":
        x2, y2 = x1, y1
    elif kind == "far":
        x1, x2 = x1 + 1e4, x2 + 1e4
    elif kind in ("nan", "inf", "huge"):
        value = {"nan": math.nan, "inf": math.inf, "huge": 1e30}[kind]
        position = draw(st.integers(0, 3))
        coords = [x1, y1, x2, y2]
        coords[position] = value if position >= 2 or kind == "nan" else -value
        x1, y1, x2, y2 = coords
    elif kind == "bad-index":
        index = draw(st.sampled_from([-1.0, float(N), 7.0]))
    elif kind == "fractional-index":
        index = draw(st.sampled_from([0.5, N - 0.25, -0.5]))
    return [index, x1, y1, x2, y2], kind


@st.composite
def roi_align_calls(draw):
    N, C = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    H, W = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    scale = draw(st.sampled_from([1.0, 0.5, 0.25, 2.0, 1 / 3]))
    K = draw(st.integers(0, 4))
    rows = [draw(box_rows(N, H, W, scale)) for _ in range(K)]
    output_size = draw(st.one_of(st.integers(1, 3), st.tuples(st.integers(1, 3),
                                                              st.integers(1, 3))))
    return dict(
        N=N, C=C, H=H, W=W, rows=[r for r, _ in rows], kinds=[k for _, k in rows],
        output_size=output_size, spatial_scale=scale,
        sampling_ratio=draw(st.integers(-1, 3)), aligned=draw(st.booleans()),
        pool_mode=draw(st.sampled_from(["avg", "avg", "max"])),
        validate_args=draw(st.booleans()), dtype=draw(float_dtypes),
        special=draw(st.sampled_from(FEATURE_SPECIALS)), seed=draw(seeds),
        view=draw(views), boxes_form=draw(st.sampled_from(["tensor", "list"])),
        boxes_dtype=draw(st.sampled_from([torch.float64, torch.float32, torch.int64])),
        boxes_view=draw(st.sampled_from(["contiguous", "stride2", "transposed"])),
        grad_view=draw(views),
    )


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def coordinate_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def user_boxes(call) -> torch.Tensor:
    """The rows as a (K, 5) tensor of the drawn boxes dtype (int64 boxes
    only where every value is a finite, not huge number)."""
    rows = torch.tensor(call["rows"], dtype=torch.float64).reshape(-1, 5)
    dtype = call["boxes_dtype"]
    if dtype == torch.int64 and not bool((torch.isfinite(rows) & (rows.abs() < 2**40)).all()):
        dtype = torch.float64
    return rows.to(dtype)


def rois_of(call) -> torch.Tensor:
    """The float64 (K, 5) rois segops pools: the boxes cast to the
    coordinate dtype (float32, float64 for float64 features)."""
    return user_boxes(call).to(coordinate_dtype(call["dtype"])).double()


def boxes_argument(call, rois: torch.Tensor, device=DEVICE):
    """The boxes as the user passes them: a (K, 5) tensor, or a list with one
    (L, 4) tensor per image (when every batch index is valid)."""
    boxes = user_boxes(call).to(device)
    if call["boxes_form"] == "list" and not bad_index(rois, call["N"]):
        index = rois[:, 0].long()
        return [as_boxes_view(boxes[index == i, 1:], call["boxes_view"])
                for i in range(call["N"])]
    return as_boxes_view(boxes, call["boxes_view"])


def in_pooled_order(call, rois: torch.Tensor) -> torch.Tensor:
    """rois in the order segops returns their pools: the list form
    (boxes_argument) puts image 0's boxes first, then image 1's, ..."""
    if call["boxes_form"] == "list" and not bad_index(rois, call["N"]):
        return rois[torch.argsort(rois[:, 0], stable=True)]
    return rois


def bad_index(rois: torch.Tensor, N: int) -> bool:
    index = rois[:, 0]
    return bool((~torch.isfinite(index) | (index != index.trunc()) | (index < 0)
                 | (index >= N)).any())


def as_boxes_view(b: torch.Tensor, view: str) -> torch.Tensor:
    if view == "contiguous" or b.numel() == 0:
        return b
    return non_contiguous(b, view)


def adaptive_count_undefined(call, roi: torch.Tensor) -> bool:
    """torchvision's adaptive grid ceil(roi_size / bins) past int32, or below
    0 (a reversed box with aligned=True: torchvision's CPU kernel sizes a
    vector with the negative product and fails, its CUDA kernel pools 0);
    segops: 0 samples, zeros."""
    if call["sampling_ratio"] > 0:
        return False
    ph, pw = (call["output_size"],) * 2 if isinstance(call["output_size"], int) \
        else call["output_size"]
    # in the coordinate dtype, as the kernels (and the peer) compute them
    dtype = coordinate_dtype(call["dtype"])
    offset = 0.5 if call["aligned"] else 0.0
    scale = torch.tensor(call["spatial_scale"], dtype=dtype)
    x1, y1, x2, y2 = roi[1:].to(dtype) * scale
    h, w = (y2 - offset) - (y1 - offset), (x2 - offset) - (x1 - offset)
    if not call["aligned"]:
        h, w = h.clamp(min=1.0), w.clamp(min=1.0)
    counts = torch.ceil(h / ph).item(), torch.ceil(w / pw).item()
    return any(c > INT32_MAX or c < 0 for c in counts)


def zero_rows(call, rois: torch.Tensor) -> torch.Tensor:
    """Rows segops documents as zeros where torchvision is undefined: a
    non-finite coordinate, a batch index outside [0, N) after truncation,
    an adaptive sample count past int32 or below 0."""
    zero = ~torch.isfinite(rois[:, 1:]).all(1)
    index = rois[:, 0].trunc()
    zero |= (index < 0) | (index >= call["N"])
    for k in range(rois.shape[0]):
        if not zero[k] and adaptive_count_undefined(call, rois[k]):
            zero[k] = True
    return zero


def torchvision_peer(call, x64: torch.Tensor, rois: torch.Tensor):
    """torchvision's roi_align on the rows it defines, zeros elsewhere, in
    segops' coordinate dtype (float32 below float64 features): the sample
    counts and positions are decided in that precision (a box 5.00000023
    wide in float64 is 5.0 in float32: 5 samples, not 6, in torchvision's
    float32 kernel too). Returned in float64."""
    zero = zero_rows(call, rois)
    safe = rois.clone()
    safe[zero] = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    safe[:, 0] = safe[:, 0].trunc()
    dtype = coordinate_dtype(call["dtype"])
    out = torchvision_ops.roi_align(x64.to(dtype), safe.to(dtype), call["output_size"],
                                    call["spatial_scale"], call["sampling_ratio"],
                                    call["aligned"]).double()
    return out * (~zero).view(-1, 1, 1, 1).to(out.dtype)


def run_segops(call, x, boxes, grad):
    xi = as_view(x, call["view"]).detach().requires_grad_()
    out = segops.ops.roi_align(xi, boxes, call["output_size"], call["spatial_scale"],
                               call["sampling_ratio"], call["aligned"],
                               pool_mode=call["pool_mode"], validate_args=call["validate_args"])
    if grad is None:
        return out, None
    (gx,) = torch.autograd.grad(out, xi, as_view(grad, call["grad_view"]))
    return out, gx


# --------------------------------------------------------------------------
# the property
# --------------------------------------------------------------------------
@fuzz_settings(35)
@given(call=roi_align_calls())
def test_roi_align_matches_torchvision_or_names_the_argument(call):
    dtype = call["dtype"]
    x = random_tensor((call["N"], call["C"], call["H"], call["W"]), dtype, call["seed"],
                      call["special"], DEVICE)
    rois = rois_of(call)
    boxes = boxes_argument(call, rois)
    if call["validate_args"] and bad_index(rois, call["N"]):
        event("bad batch index refused")
        # on CUDA the check is a device-side assert, which ends the process's
        # CUDA context (tests/ops/test_roi_align.py checks it in a child
        # process): the host check is exercised on CPU copies instead
        x, boxes = x.cpu(), boxes_argument(call, rois, "cpu")
        for path in ("kernel", "reference"):
            with on_path(path):
                _, error = call_segops(lambda: run_segops(call, x, boxes, None), call)
            assert error is not None, f"a bad batch index was accepted on the {path} path"
            check_segops_error(error, ["batch index", "boxes"], call)
        return
    rtol = segops_tolerance(dtype)
    x64 = x.detach().cpu().double().requires_grad_()
    if call["pool_mode"] == "avg":
        event("avg vs torchvision")
        want = torchvision_peer(call, x64, in_pooled_order(call, rois))
        grad = random_tensor(want.shape, dtype, call["seed"] + 1, None, DEVICE)
        (want_grad,) = torch.autograd.grad(want, x64, grad.cpu().double()) if want.numel() \
            else (torch.zeros_like(x64),)
        paths = ("kernel", "native", "reference")
    else:
        event("max: kernel vs reference")
        with on_path("reference"):
            want, want_grad = run_segops(dict(call, view="contiguous", grad_view="contiguous"),
                                         x.cpu(), boxes_argument(call, rois, "cpu"),
                                         random_tensor((rois.shape[0], call["C"],
                                                        *pair(call["output_size"])), dtype,
                                                       call["seed"] + 1, None))
        grad = random_tensor(want.shape, dtype, call["seed"] + 1, None, DEVICE)
        paths = ("kernel",)
    for path in paths if DEVICE.type == "cpu" else ("kernel",):
        with on_path(path):
            result, error = call_segops(lambda: run_segops(call, x, boxes, grad), call)
        assert error is None, f"{path} path refused a valid call: {error}"
        out, gx = result
        assert out.dtype == dtype
        if call["pool_mode"] == "avg" and call["special"] in ("nan", "inf"):
            # torchvision's CPU kernel multiplies the zero weights of samples
            # outside the map by the plane's first element, so a NaN/inf
            # feature can make its output NaN where the kernels (and
            # torchvision's CUDA kernel) give a number: compare where
            # torchvision is finite, and allow no non-finite value elsewhere
            finite = torch.isfinite(want)
            assert_close(out.cpu()[finite], want[finite].to(dtype), rtol,
                         name=f"{path} output")
            assert bool(torch.isfinite(out.cpu()[finite]).all()), path
        else:
            assert_close(out, want.to(dtype), rtol, name=f"{path} output")
        assert_close(gx, want_grad.to(dtype), rtol, name=f"{path} grad_input")


def pair(size):
    return (size, size) if isinstance(size, int) else tuple(size)


def segops_tolerance(dtype):
    from helpers import RTOL
    # fp16/bf16 features: bilinear weights and sums in float32, output rounded
    return RTOL[dtype]


# --------------------------------------------------------------------------
# bad arguments: a segops error naming them
# --------------------------------------------------------------------------
def _x(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


BOX = [[0.0, 0.5, 0.5, 3.0, 2.5]]
BAD_ARGUMENTS = {
    "input-3d": ("input", dict(input=_x(2, 5, 5))),
    "input-int": ("input", dict(input=torch.ones(1, 2, 5, 5, dtype=torch.int64))),
    "input-none": ("input", dict(input=None)),
    "boxes-shape": ("boxes", dict(boxes=torch.zeros(1, 4))),
    "boxes-3d": ("boxes", dict(boxes=torch.zeros(1, 1, 5))),
    "boxes-bool": ("boxes", dict(boxes=torch.zeros(1, 5, dtype=torch.bool))),
    "boxes-complex": ("boxes", dict(boxes=torch.zeros(1, 5, dtype=torch.complex64))),
    "boxes-empty-list": ("boxes", dict(boxes=[])),
    "boxes-list-shape": ("boxes", dict(boxes=[torch.zeros(1, 5)])),
    "boxes-number": ("boxes", dict(boxes=3.0)),
    "boxes-nan-index": ("batch index", dict(boxes=torch.tensor([[math.nan, 0, 0, 1, 1.0]]))),
    "boxes-index-past-n": ("batch index", dict(boxes=torch.tensor([[2.0, 0, 0, 1, 1]]))),
    "output-size-0": ("output_size", dict(output_size=0)),
    "output-size-triple": ("output_size", dict(output_size=(1, 2, 3))),
    "output-size-float": ("output_size", dict(output_size=2.5)),
    "output-size-none": ("output_size", dict(output_size=None)),
    "scale-negative": ("spatial_scale", dict(spatial_scale=-1.0)),
    "scale-nan": ("spatial_scale", dict(spatial_scale=math.nan)),
    "scale-inf": ("spatial_scale", dict(spatial_scale=math.inf)),
    "scale-string": ("spatial_scale", dict(spatial_scale="1")),
    "scale-tensor": ("spatial_scale", dict(spatial_scale=torch.ones(2))),
    "sampling-ratio-float": ("sampling_ratio", dict(sampling_ratio=1.5)),
    "sampling-ratio-none": ("sampling_ratio", dict(sampling_ratio=None)),
    "pool-mode": ("pool_mode", dict(pool_mode="sum")),
}


@fuzz_settings(40)
@given(case=st.sampled_from(sorted(BAD_ARGUMENTS)),
       path=st.sampled_from(("kernel", "native", "reference")))
def test_bad_argument_is_a_segops_error_naming_it(case, path):
    name, changes = BAD_ARGUMENTS[case]
    call = dict(input=_x(2, 3, 5, 6), boxes=torch.tensor(BOX, dtype=torch.float64),
                output_size=2, spatial_scale=1.0, sampling_ratio=2)
    call.update(changes)
    # a bad batch index on CUDA is a device-side assert (see the property above)
    device = "cpu" if name == "batch index" else DEVICE
    call = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in call.items()}
    if DEVICE.type != "cpu":
        path = "kernel"
    with on_path(path):
        result, error = call_segops(lambda: segops.ops.roi_align(**call), case)
    assert error is not None, f"{case}: accepted, gave shape {tuple(result.shape)}"
    check_segops_error(error, [name], case)


# --------------------------------------------------------------------------
# the multi-scale module against torchvision's
# --------------------------------------------------------------------------
@st.composite
def multi_scale_calls(draw):
    N, C = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    image = (draw(st.sampled_from([16, 24, 32])), draw(st.sampled_from([16, 24, 32])))
    levels = draw(st.sampled_from([(2, 3), (1, 2, 3), (2, 4), (3,)]))
    boxes = []
    for _ in range(N):
        rows = []
        for _ in range(draw(st.integers(0, 3))):
            x1 = draw(st.floats(-2, image[1], allow_nan=False))
            y1 = draw(st.floats(-2, image[0], allow_nan=False))
            w = draw(st.floats(0, image[1], allow_nan=False))
            h = draw(st.floats(0, image[0], allow_nan=False))
            kind = draw(st.sampled_from(["normal", "normal", "reversed-x", "reversed-both"]))
            x2, y2 = x1 + w, y1 + h
            if kind != "normal":
                x1, x2 = x2 + 1, x1
            if kind == "reversed-both":
                y1, y2 = y2 + 1, y1
            rows.append([x1, y1, x2, y2])
        boxes.append(rows)
    return dict(N=N, C=C, image=image, levels=levels, boxes=boxes,
                output_size=draw(st.integers(1, 3)), sampling_ratio=draw(st.integers(-1, 2)),
                canonical=draw(st.sampled_from([(224, 4), (16, 3), (8, 2)])),
                dtype=draw(st.sampled_from([torch.float64, torch.float32])),
                view=draw(views), seed=draw(seeds))


@fuzz_settings(15)
@given(call=multi_scale_calls())
def test_multi_scale_module_matches_torchvision(call):
    H, W = call["image"]
    names = [str(k) for k in call["levels"]]
    features = {name: as_view(random_tensor((call["N"], call["C"], H // 2**k, W // 2**k),
                                            call["dtype"], call["seed"] + k, None, DEVICE),
                              call["view"])
                for name, k in zip(names, call["levels"])}
    boxes = [torch.tensor(rows, dtype=call["dtype"]).reshape(-1, 4) for rows in call["boxes"]]
    shapes = [(H, W)] * call["N"]
    scale, level = call["canonical"]
    options = dict(canonical_scale=scale, canonical_level=level)
    theirs = torchvision_ops.MultiScaleRoIAlign(names, call["output_size"],
                                                call["sampling_ratio"], **options)
    ours = segops.nn.MultiScaleRoIAlign(names, call["output_size"], call["sampling_ratio"],
                                        **options)
    features64 = {k: v.detach().cpu().double().requires_grad_() for k, v in features.items()}
    want = theirs(features64, [b.double() for b in boxes], shapes)
    leaves = {k: v.detach().requires_grad_() for k, v in features.items()}
    out, error = call_segops(lambda: ours(leaves, [b.to(DEVICE) for b in boxes], shapes), call)
    assert error is None, error
    rtol = segops_tolerance(call["dtype"])
    assert_close(out, want.to(call["dtype"]), rtol, name="output")
    if want.numel():
        grad = random_tensor(want.shape, call["dtype"], call["seed"] + 9, None, DEVICE)
        got = torch.autograd.grad(out, list(leaves.values()), grad)
        expected = torch.autograd.grad(want, list(features64.values()), grad.cpu().double(),
                                       allow_unused=True)
        for name, g, e in zip(names, got, expected):
            e = torch.zeros_like(features64[name]) if e is None else e
            assert_close(g, e.to(call["dtype"]), rtol, name=f"grad of level {name}")
