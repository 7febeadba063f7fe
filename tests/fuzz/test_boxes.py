"""Fuzz: the box ops of segops.ops.boxes (box_iou, clip_boxes_to_image,
decode_boxes, nms, batched_nms, batched_nms_per_image) against
torchvision.ops and torchvision's BoxCoder.

Each example draws one call, valid or not: 0, 1, a few or (now and then)
70 boxes; float64/float32/float16/bfloat16 boxes and scores, each in
its own dtype, and integer boxes where the op takes them (box_iou, clip,
decode); normal, duplicate, reversed, zero-width, point and NaN/±inf/huge
boxes, and pairs planted at, just above and just below the IoU threshold;
distinct, tied (0.0 and -0.0 too), near-tied (equal in float32 only) and
NaN/±inf/huge scores; thresholds 0, 1, exactly representable ones, 0.7,
out-of-range ones (negative, above 1, past float32's range) as Python or
numpy numbers; one, a few, many (one per box) or huge (wrapping) class ids
in every index dtype; image ids, num_images and max_per_image; weights,
bbox_xform_clip and image_size for decode, boxes as a tensor or a list;
sizes for clip; a non-contiguous view of every tensor argument; for NMS
the sync-free bitmask guess (kernels.GUESS_SEGMENT) shrunk so that segments
overflow it and the exact re-launch runs. Or one argument made bad (a
dtype, a shape, a length, a NaN/inf/str/bool/tensor number, an image id
out of range). Every call runs on every path of the device
(``paths_for(DEVICE)``).

The property: the call gives torchvision's result, or raises
``segops.ArgumentError`` / ``ArgumentTypeError`` naming the argument (a
bad call must). NMS kept indices must be EXACTLY torchvision's, in its
order: ``torchvision.ops.nms`` per class (its exact 'vanilla'
batched_nms, tests/helpers.py's ``torchvision_nms_per_class``), kept boxes in
(-score, index) order, per image for batched_nms_per_image (then the first
max_per_image); ``torchvision.ops.batched_nms`` itself too where its
coordinate-offset trick is exact (one class, id 0, finite boxes). box_iou
and decode within ``tolerance(dtype)`` (helpers.assert_close), clip exactly.
Where segops documents a rule of its own, the oracle follows it (comments
cite segops/ops/boxes.py): IoU and decode computed in float32 (float64 for
float64 inputs), NaN boxes never suppressing nor suppressed (torchvision's
nms, not its offset-trick batched_nms), boxes visited in decreasing score of
the scores as given, clip keeping the boxes' dtype. Where torchvision
refuses a valid call (a clip limit past the boxes' dtype's range) segops
may clip (exactly, rounded once) or name the argument.

``SEGOPS_FUZZ_EXAMPLES=N`` runs N examples per test instead of the CI
default (see tests/fuzz/strategies.py)::

    SEGOPS_FUZZ_EXAMPLES=200 python -m pytest -q -p no:xdist tests/fuzz/test_boxes.py
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
from fuzz.strategies import (
    VECTOR_VIEWS,
    as_view,
    call_segops,
    check_segops_error,
    float_dtypes,
    fuzz_settings,
    on_path,
    paths_for,
    seeds,
    tolerance,
)
from helpers import DEVICE, assert_close, torchvision_nms_per_class
from hypothesis import event, given
from hypothesis import strategies as st

import segops.ops.boxes as boxes_ops

torchvision = pytest.importorskip("torchvision")
tv_ops = torchvision.ops
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered",
                                        "ignore:overflow encountered",
                                        "ignore:divide by zero encountered")

INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)
INT_BOX_DTYPES = (torch.int64, torch.int32, torch.int16)
NAN, INF = math.nan, math.inf
BAD_SHARE = (None,) * 3  # three valid calls for each bad one


# --------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------
def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype segops computes IoUs and decoded boxes in (documented in
    segops/ops/boxes.py: "IoU in float32 (float64 for float64 boxes)",
    decode "computed in float32 (float64 for float64 codes)")."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def view_of(t, kind: str):
    """strategies.as_view for a tensor of any dtype: integer tensors get
    zero padding (helpers.non_contiguous draws random float padding)."""
    if not isinstance(t, torch.Tensor) or kind == "contiguous" or t.numel() == 0:
        return t
    if t.is_floating_point():
        return as_view(t, kind)
    if kind == "transposed" and t.dim() >= 2 and t.shape[-1] > 1 and t.shape[-2] > 1:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "slice":
        dim = 0 if t.dim() == 1 else 1
        pad = list(t.shape)
        pad[dim] = 3
        big = torch.cat([t.new_zeros(pad), t, t.new_zeros(pad)], dim=dim)
        return big.narrow(dim, 3, t.shape[dim])
    # stride2 (and transposed where it does not apply): every other element
    return torch.stack([t, torch.zeros_like(t)], -1).flatten(-2)[..., ::2]


def rounded(value: float, dtype: torch.dtype) -> float:
    """A Python number as torch rounds it for a tensor of ``dtype``."""
    return float(torch.tensor(float(value), dtype=torch.float64).to(dtype))


@contextlib.contextmanager
def bitmask_guess(segment):
    """kernels.GUESS_SEGMENT (the segment length the kernel path sizes the
    NMS bitmask for without a sync) set to ``segment`` (None: as is): a
    longer segment is skipped by the first launch and run again, sized
    exactly (segops/ops/boxes.py, _kernel_nms)."""
    if segment is None:
        yield
        return
    from segops.kernels import boxes as kernels
    saved = kernels.GUESS_SEGMENT
    kernels.GUESS_SEGMENT = segment
    try:
        yield
    finally:
        kernels.GUESS_SEGMENT = saved


def run_paths(fn, call, device=None):
    """[(path, result, error)] of ``fn()`` on every path of ``device``'s
    type (DEVICE's by default); errors other than segops' fail."""
    device = DEVICE if device is None else torch.device(device)
    out = []
    for path in paths_for(device):
        with on_path(path):
            result, error = call_segops(fn, call)
        out.append((path, result, error))
    return out


def expect_error(outcomes, names, call):
    for path, result, error in outcomes:
        assert error is not None, f"{path} path accepted a bad call ({call['bad']})"
        check_segops_error(error, names, f"{path}: {call['bad']}")


def expect_result(outcomes):
    for path, result, error in outcomes:
        assert error is None, f"{path} path refused a valid call: {error}"
    return [(path, result) for path, result, _ in outcomes]


# --------------------------------------------------------------------------
# strategies: boxes, scores, thresholds, class ids
# --------------------------------------------------------------------------
ROW_KINDS = ("normal", "normal", "normal", "copy", "copy", "reversed", "degenerate", "point",
             "nan", "inf", "huge", "plant", "plant")
INT_ROW_KINDS = ("normal", "normal", "copy", "reversed", "degenerate", "point")
# offsets of the planted box's IoU from the threshold
PLANT_EPS = (0.0, 0.0, 1e-3, -1e-3, 2**-24, -2**-24, 2**-23, 1e-7, -1e-7, 1e-9)
HUGE = (6e4, 1e30, 1e200)
SIZES = (0, 1, 1, 2, 2, 3, 4, 5, 7, 9, 12, 70)  # 70: two 64-row blocks
MANY = 12  # more boxes than this come from a seed, not from hypothesis


def coordinates(lo, hi, integer):
    ints = st.integers(int(lo), int(hi)).map(float)
    return ints if integer else st.one_of(ints, st.floats(lo, hi, allow_nan=False))


@st.composite
def box_rows(draw, n, threshold=0.5, integer=False):
    """n rows (x1, y1, x2, y2) as Python floats, in a small region (so that
    boxes overlap), of the kinds above; integer rows hold whole numbers."""
    rows = []
    coord = coordinates(0, 16, integer)
    size = coordinates(1, 12, integer) if integer else coordinates(0.5, 12, False)
    while len(rows) < n:
        kind = draw(st.sampled_from(INT_ROW_KINDS if integer else ROW_KINDS))
        x1, y1 = draw(coord), draw(coord)
        x2, y2 = x1 + draw(size), y1 + draw(size)
        row = [x1, y1, x2, y2]
        if kind == "copy" and rows:
            row = list(draw(st.sampled_from(rows)))
        elif kind == "reversed":
            row = draw(st.sampled_from([[x2, y2, x1, y1], [x2, y1, x1, y2], [x1, y2, x2, y1]]))
        elif kind == "degenerate":
            row = draw(st.sampled_from([[x1, y1, x1, y2], [x1, y1, x2, y1]]))
        elif kind == "point":
            row = [x1, y1, x1, y1]
        elif kind in ("nan", "inf", "huge"):
            value = {"nan": NAN, "inf": INF}.get(kind) or draw(st.sampled_from(HUGE))
            row[draw(st.integers(0, 3))] = value * draw(st.sampled_from([1.0, -1.0]))
        elif kind == "plant":
            # B inside A = (x1, y1, x1 + s, y1 + s), as tall as IoU(A, B) = t + eps
            t = min(max(threshold, 0.0), 1.0) + draw(st.sampled_from(PLANT_EPS))
            s = draw(st.sampled_from([10.0, 1.0, 100.0, 3.0]))
            rows.append([x1, y1, x1 + s, y1 + s])
            row = [x1, y1, x1 + s, y1 + s * t]
        rows.append(row)
    return rows[:n]


def seeded_rows(n, seed):
    """n clustered rows from a seed (about a fifth copies of earlier rows)."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * 30
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * 12 + 0.5
    rows = torch.cat([xy, xy + wh], 1)
    for i in range(1, n):
        if torch.rand(1, generator=g).item() < 0.2:
            rows[i] = rows[torch.randint(i, (1,), generator=g).item()]
    return rows.tolist()


SCORE_MODES = ("distinct", "ties", "near-ties", "special")


def score_values(mode):
    return {
        "distinct": st.floats(0, 1),
        "ties": st.sampled_from([0.0, -0.0, 0.25, 0.5, 0.5, 1.0]),
        # distinct in float64, equal once rounded to float32 (or not)
        "near-ties": st.sampled_from([0.5, 0.5 + 1e-12, 0.5 - 1e-12, 0.5 + 2**-30,
                                      0.5 + 2**-25, 0.5 - 2**-26, 0.5 + 2**-20]),
        "special": st.one_of(st.floats(0, 1), st.sampled_from([NAN, INF, -INF, 1e30, -1e30,
                                                               1e300, 0.0])),
    }[mode]


def seeded_scores(n, mode, seed):
    g = torch.Generator().manual_seed(seed + 1)
    if mode == "ties":
        return (torch.randint(0, 4, (n,), generator=g).double() / 4).tolist()
    if mode == "near-ties":
        return (0.5 + torch.randint(-2, 3, (n,), generator=g).double() * 1e-12).tolist()
    s = torch.rand(n, generator=g, dtype=torch.float64)
    if mode == "special":
        s[torch.rand(n, generator=g) < 0.1] = NAN
    return s.tolist()


# thresholds: 0, 1, exactly representable, not (0.7, 1/3, 0.1 + 2^-30: float32
# rounds it up), out of range, past float32's range
THRESHOLDS = (0.0, 1.0, 0.5, 0.25, 0.75, 0.7, 0.3, 1 / 3, 0.1 + 2**-30, 1 - 1e-7, 1e-7,
              -0.5, -1e-9, 1.5, 3.0, 1e300, -1e300)
BAD_THRESHOLDS = (NAN, INF, -INF, "0.5", None, True, "tensor")


@st.composite
def thresholds(draw):
    """(value the user passes, its float): a Python float or int, or a numpy
    float64 / float32 / int64 (the float32 spelling rounds the value)."""
    t = draw(st.one_of(st.sampled_from(THRESHOLDS), st.floats(0, 1)))
    options = [t, np.float64(t)]
    if abs(t) < 3e38:
        options.append(np.float32(t))
    if abs(t) < 2**62 and t == int(t):
        options += [int(t), np.int64(int(t))]
    value = draw(st.sampled_from(options))
    return value, float(value)


CLASS_MODES = ("one", "few", "many", "wide")
WIDE_IDS = (0, 1, -1, 127, 128, 255, 256, 2**31 - 1, 2**31, -2**31, 2**40, 2**63 - 1)


@st.composite
def class_ids(draw, n):
    """n int64 class ids: one class, a few, one per box (ids spread out) or
    ids that wrap in the smaller index dtypes."""
    mode = draw(st.sampled_from(CLASS_MODES))
    if mode == "one":
        return [draw(st.sampled_from([0, 0, 3, -1, 2**40]))] * n, mode
    if n > MANY:
        g = torch.Generator().manual_seed(draw(seeds))
        top = {"few": 3, "many": n, "wide": 1000}[mode]
        return torch.randint(0, top, (n,), generator=g).tolist(), mode
    if mode == "few":
        return draw(st.lists(st.integers(0, 2), min_size=n, max_size=n)), mode
    if mode == "many":
        spread = draw(st.sampled_from([1, 1000, 2**33]))
        return [k * spread for k in draw(st.permutations(range(n)))], mode
    return draw(st.lists(st.sampled_from(WIDE_IDS), min_size=n, max_size=n)), mode


def scores_dtypes(boxes_dtype):
    """The scores' dtype: the boxes', float64 (finer than the boxes' IoU
    dtype: near-tied scores stay apart) or any float dtype."""
    return st.one_of(st.just(boxes_dtype), st.just(torch.float64), float_dtypes)


def index_tensor(values, dtype):
    """int64 values converted to ``dtype`` as torch converts (wrapping)."""
    return torch.tensor(values, dtype=torch.int64).reshape(-1).to(dtype)


def threshold_argument(call):
    value = call["threshold"]
    if call["bad"] == "threshold":
        value = call["bad_threshold"]
        return torch.tensor(0.5) if value == "tensor" else value
    return value


# --------------------------------------------------------------------------
# the NMS oracle: torchvision's nms per class
# --------------------------------------------------------------------------
def visiting_scores(scores: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """Scores in ``acc`` (torchvision's nms wants the boxes' dtype) that
    make torchvision visit the boxes in segops' documented order: "Boxes are
    visited in decreasing score; equal scores by increasing index ... NaN
    scores sort first" (segops/ops/boxes.py), of the scores AS GIVEN. The
    scores themselves where ``acc`` holds them exactly; float64 scores of
    lower-precision boxes are replaced by their (stable, descending) ranks,
    so that scores distinct in float64 but equal in float32 stay apart
    (torchvision refuses scores in another dtype than the boxes')."""
    s = scores.detach().cpu()
    if s.dtype != torch.float64 or acc == torch.float64:
        return s.to(acc)
    order = torch.sort(s, descending=True, stable=True).indices
    ranks = torch.empty(len(s), dtype=acc)
    ranks[order] = torch.arange(len(s), 0, -1, dtype=acc)
    return ranks


# torchvision's nms per class, the NMS oracle (tests/helpers.py explains why
# not its batched_nms); segops documents that it compares the IoU with the
# threshold as torchvision compares its double threshold
tv_batched = torchvision_nms_per_class


def nms_inputs(boxes, scores):
    """The boxes in the compute dtype (segops: "IoU in float32 (float64 for
    float64 boxes)", fp16/bf16 boxes included) and the visiting scores."""
    acc = compute_dtype(boxes.dtype)
    return boxes.detach().cpu().to(acc), visiting_scores(scores, acc)


# --------------------------------------------------------------------------
# nms / batched_nms
# --------------------------------------------------------------------------
NMS_BAD = ("threshold", "boxes-int", "boxes-shape", "boxes-1d", "boxes-list", "scores-length",
           "scores-int", "scores-2d", "idxs-float", "idxs-length", "idxs-bool", "idxs-none")
NMS_BAD_NAMES = {"threshold": ["iou_threshold"], "boxes": ["boxes"], "scores": ["scores"],
                 "idxs": ["idxs"]}


@st.composite
def nms_rows_and_scores(draw, n, threshold):
    if n > MANY:
        seed = draw(seeds)
        mode = draw(st.sampled_from(SCORE_MODES))
        return seeded_rows(n, seed), seeded_scores(n, mode, seed), mode
    rows = draw(box_rows(n, threshold))
    mode = draw(st.sampled_from(SCORE_MODES))
    return rows, draw(st.lists(score_values(mode), min_size=n, max_size=n)), mode


@st.composite
def nms_calls(draw):
    op = draw(st.sampled_from(["nms", "batched_nms", "batched_nms"]))
    n = draw(st.sampled_from(SIZES))
    threshold, t = draw(thresholds())
    rows, scores, score_mode = draw(nms_rows_and_scores(n, t))
    boxes_dtype = draw(float_dtypes)
    ids, class_mode = draw(class_ids(n))
    bad = draw(st.sampled_from(BAD_SHARE * len(NMS_BAD) + NMS_BAD))
    if bad is not None and bad.startswith("idxs") and op == "nms":
        bad = None
    return dict(
        op=op, n=n, rows=rows, scores=scores, score_mode=score_mode, threshold=threshold,
        t=t, boxes_dtype=boxes_dtype,
        scores_dtype=draw(scores_dtypes(boxes_dtype)),
        ids=ids, class_mode=class_mode, idxs_dtype=draw(st.sampled_from(INDEX_DTYPES)),
        boxes_view=draw(st.sampled_from(VECTOR_VIEWS)),
        scores_view=draw(st.sampled_from(VECTOR_VIEWS)),
        idxs_view=draw(st.sampled_from(VECTOR_VIEWS)),
        guess=draw(st.sampled_from([None, None, None, 1, 2, 64])),
        bad=bad, bad_threshold=draw(st.sampled_from(BAD_THRESHOLDS)),
    )


def nms_tensors(call):
    """(boxes, scores, idxs) on the CPU as drawn, before views and bad changes."""
    boxes = torch.tensor(call["rows"], dtype=torch.float64).reshape(-1, 4).to(call["boxes_dtype"])
    scores = torch.tensor(call["scores"], dtype=torch.float64).reshape(-1).to(call["scores_dtype"])
    return boxes, scores, index_tensor(call["ids"], call["idxs_dtype"])


def nms_arguments(call, boxes, scores, idxs):
    """The arguments as the user passes them: on DEVICE, in the drawn
    views, with the drawn bad change."""
    n, bad = call["n"], call["bad"]
    b = view_of(boxes.to(DEVICE), call["boxes_view"])
    s = view_of(scores.to(DEVICE), call["scores_view"])
    i = view_of(idxs.to(DEVICE), call["idxs_view"])
    if bad == "boxes-int":
        b = torch.ones(n, 4, dtype=torch.int64, device=DEVICE)
    elif bad == "boxes-shape":
        b = torch.zeros(n, 5, device=DEVICE)
    elif bad == "boxes-1d":
        b = torch.zeros(4 * n, device=DEVICE)
    elif bad == "boxes-list":
        b = boxes.tolist()
    elif bad == "scores-length":
        s = torch.zeros(n + 1, device=DEVICE)
    elif bad == "scores-int":
        s = torch.ones(n, dtype=torch.int64, device=DEVICE)
    elif bad == "scores-2d":
        s = s.reshape(n, 1)
    elif bad == "idxs-float":
        i = torch.zeros(n, device=DEVICE)
    elif bad == "idxs-length":
        i = torch.zeros(n + 2, dtype=torch.int64, device=DEVICE)
    elif bad == "idxs-bool":
        i = torch.zeros(n, dtype=torch.bool, device=DEVICE)
    elif bad == "idxs-none":
        i = None
    return b, s, i


@fuzz_settings(60)
@given(call=nms_calls())
def test_nms_and_batched_nms_match_torchvision_or_name_the_argument(call):
    boxes, scores, idxs = nms_tensors(call)
    b, s, i = nms_arguments(call, boxes, scores, idxs)
    threshold = threshold_argument(call)
    if call["op"] == "nms":
        def fn():
            return boxes_ops.nms(b, s, threshold)
    else:
        def fn():
            return boxes_ops.batched_nms(b, s, i, threshold)
    with bitmask_guess(call["guess"]):
        outcomes = run_paths(fn, call)
    if call["bad"] is not None:
        event(f"bad: {call['bad']}")
        expect_error(outcomes, NMS_BAD_NAMES[call["bad"].split("-")[0]], call)
        return
    event(f"{call['op']}, {call['class_mode']} classes, {call['score_mode']} scores")
    b_acc, s_tv = nms_inputs(boxes, scores)
    want = tv_batched(b_acc, s_tv, None if call["op"] == "nms" else idxs, call["t"])
    for path, kept in expect_result(outcomes):
        assert kept.dtype == torch.int64 and kept.device.type == DEVICE.type, path
        assert torch.equal(kept.cpu(), want), \
            f"{path} path kept {kept.tolist()}, torchvision {want.tolist()}"
    # torchvision's own batched_nms where its coordinate-offset trick changes
    # no box (every id 0, finite boxes: offsets 0) and the scores are its own
    if call["op"] == "batched_nms" and call["n"] and bool((idxs == 0).all()) \
            and bool(torch.isfinite(b_acc).all()) and torch.equal(s_tv, scores.to(s_tv.dtype)):
        assert torch.equal(want, tv_ops.batched_nms(b_acc, s_tv, idxs, call["t"]))


# --------------------------------------------------------------------------
# batched_nms_per_image
# --------------------------------------------------------------------------
PER_IMAGE_BAD = ("threshold", "scores-length", "idxs-float", "image_ids-float",
                 "image_ids-length", "image_ids-range", "num_images-negative",
                 "num_images-float", "num_images-small", "max_per_image-negative",
                 "max_per_image-float", "max_per_image-bool")


@st.composite
def per_image_calls(draw):
    n = draw(st.sampled_from(SIZES))
    images = draw(st.integers(1, 3))
    threshold, t = draw(thresholds())
    rows, scores, score_mode = draw(nms_rows_and_scores(n, t))
    if n > MANY:
        g = torch.Generator().manual_seed(draw(seeds))
        image_ids = torch.randint(0, images, (n,), generator=g).tolist()
    else:
        image_ids = draw(st.lists(st.integers(0, images - 1), min_size=n, max_size=n))
    ids, class_mode = draw(class_ids(n))
    boxes_dtype = draw(float_dtypes)
    num_images = draw(st.sampled_from(["given", "given", "numpy", "tensor", None]))
    bad = draw(st.sampled_from(BAD_SHARE * len(PER_IMAGE_BAD) + PER_IMAGE_BAD))
    if bad in ("image_ids-range", "num_images-small") and n == 0:
        bad = None
    return dict(
        n=n, images=images, rows=rows, scores=scores, score_mode=score_mode,
        threshold=threshold, t=t, image_ids=image_ids, ids=ids, class_mode=class_mode,
        boxes_dtype=boxes_dtype, scores_dtype=draw(scores_dtypes(boxes_dtype)),
        idxs_dtype=draw(st.sampled_from(INDEX_DTYPES)),
        image_ids_dtype=draw(st.sampled_from(INDEX_DTYPES)),
        with_idxs=draw(st.booleans()), num_images=num_images,
        max_per_image=draw(st.sampled_from([None, None, 0, 1, 2, 100, "numpy", "tensor"])),
        boxes_view=draw(st.sampled_from(VECTOR_VIEWS)),
        scores_view=draw(st.sampled_from(VECTOR_VIEWS)),
        idxs_view=draw(st.sampled_from(VECTOR_VIEWS)),
        image_ids_view=draw(st.sampled_from(VECTOR_VIEWS)),
        guess=draw(st.sampled_from([None, None, 1, 2])),
        bad=bad, bad_threshold=draw(st.sampled_from(BAD_THRESHOLDS)),
        bad_id=draw(st.sampled_from(["num_images", "negative", "large"])),
        bad_position=draw(st.integers(0, max(n - 1, 0))),
    )


def spelled_int(value, spelling):
    if spelling == "numpy":
        return np.int64(value)
    if spelling == "tensor":
        return torch.tensor(value)
    return value


@fuzz_settings(30)
@given(call=per_image_calls())
def test_batched_nms_per_image_matches_torchvision_per_image(call):
    n, bad, images = call["n"], call["bad"], call["images"]
    boxes, scores, idxs = nms_tensors(call)
    image_ids = torch.tensor(call["image_ids"], dtype=torch.int64).reshape(-1)
    num_images = None if call["num_images"] is None else \
        spelled_int(images, call["num_images"])
    cap = call["max_per_image"]
    cap = spelled_int(1, cap) if cap in ("numpy", "tensor") else cap
    if bad == "image_ids-range":
        # without num_images a large id only adds images: a negative one then
        image_ids[call["bad_position"]] = -1 if num_images is None else \
            {"num_images": images, "negative": -1, "large": 2**40}[call["bad_id"]]
    image_ids = image_ids.to(call["image_ids_dtype"])   # -1 is 255 in uint8
    if bad == "num_images-small":
        num_images = int(image_ids.max())
    elif bad == "num_images-negative":
        num_images = -1
    elif bad == "num_images-float":
        num_images = float(images)
    elif bad == "max_per_image-negative":
        cap = -1
    elif bad == "max_per_image-float":
        cap = 1.5
    elif bad == "max_per_image-bool":
        cap = True
    # the images segops returns: num_images, or the largest id + 1
    if num_images is not None and bad not in ("num_images-negative", "num_images-float"):
        count = int(num_images)
    else:
        count = int(image_ids.max()) + 1 if n else 0
    if bad == "image_ids-range" and not bool(((image_ids < 0) | (image_ids >= count)).any()):
        bad = None  # the id wrapped into range (or is uint8's 255 without num_images)
    call = dict(call, bad=bad)
    # an image id out of range is a device-side assert on CUDA (see
    # test_roi_align's batch index): checked on CPU copies there
    device = torch.device("cpu") if bad in ("image_ids-range", "num_images-small") else DEVICE
    b, s, i = nms_arguments(dict(call, bad=bad if bad in ("scores-length", "idxs-float")
                                 else None), boxes, scores, idxs)
    b, s, i = (x.to(device) for x in (b, s, i))
    i = i if call["with_idxs"] or bad == "idxs-float" else None
    ids = view_of(image_ids.to(device), call["image_ids_view"])
    if bad == "image_ids-float":
        ids = ids.double()
    elif bad == "image_ids-length":
        ids = torch.zeros(n + 1, dtype=torch.int64, device=device)
    threshold = threshold_argument(call)

    def fn():
        return boxes_ops.batched_nms_per_image(b, s, i, ids, threshold, cap,
                                               num_images=num_images)
    with bitmask_guess(call["guess"]):
        outcomes = run_paths(fn, call, device)
    if bad is not None:
        event(f"bad: {bad}")
        names = {"threshold": ["iou_threshold"]}.get(bad, [bad.split("-")[0]])
        if bad in ("image_ids-range", "num_images-small"):
            names = ["image_ids", "num_images"] if num_images is None else ["image_ids"]
        expect_error(outcomes, names, call)
        return
    event(f"idxs {'given' if call['with_idxs'] else 'None'}, "
          f"num_images {'given' if num_images is not None else 'None'}")
    b_acc, s_tv = nms_inputs(boxes, scores)
    cap = None if cap is None else int(cap)
    want = []
    for image in range(count):
        rows = torch.nonzero(image_ids == image).flatten()
        sub = idxs[rows] if call["with_idxs"] else None
        kept = rows[tv_batched(b_acc[rows], s_tv[rows], sub, call["t"])]
        want.append(kept if cap is None else kept[:cap])
    for path, got in expect_result(outcomes):
        assert len(got) == count, f"{path}: {len(got)} images, want {count}"
        for image, (k, w) in enumerate(zip(got, want)):
            assert k.dtype == torch.int64, path
            assert torch.equal(k.cpu(), w), \
                f"{path} path, image {image}: kept {k.tolist()}, torchvision {w.tolist()}"


# --------------------------------------------------------------------------
# box_iou
# --------------------------------------------------------------------------
IOU_BAD = ("boxes1-shape", "boxes2-3d", "boxes1-bool", "boxes2-complex", "boxes1-list",
           "boxes2-none")
BOX_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16) + INT_BOX_DTYPES


@st.composite
def box_iou_calls(draw):
    dtypes = [draw(st.sampled_from(BOX_DTYPES))]
    dtypes.append(draw(st.one_of(st.just(dtypes[0]), st.sampled_from(BOX_DTYPES))))
    # integer boxes hold whole numbers below 2^5: areas and IoUs exact in float32
    sets = [draw(box_rows(draw(st.sampled_from([0, 1, 2, 3, 5])), 0.5,
                          integer=not d.is_floating_point)) for d in dtypes]
    return dict(rows=sets, dtypes=dtypes, views=[draw(st.sampled_from(VECTOR_VIEWS)),
                                                 draw(st.sampled_from(VECTOR_VIEWS))],
                bad=draw(st.sampled_from(BAD_SHARE * len(IOU_BAD) + IOU_BAD)))


@fuzz_settings(50)
@given(call=box_iou_calls())
def test_box_iou_matches_torchvision_or_names_the_argument(call):
    a, b = (torch.tensor(r, dtype=torch.float64).reshape(-1, 4).to(d)
            for r, d in zip(call["rows"], call["dtypes"]))
    args = [view_of(t.to(DEVICE), v) for t, v in zip((a, b), call["views"])]
    bad = call["bad"]
    if bad is not None:
        k = 0 if bad.startswith("boxes1") else 1
        args[k] = {"shape": torch.zeros(2, 3, device=DEVICE),
                   "3d": torch.zeros(1, 2, 4, device=DEVICE),
                   "bool": torch.zeros(2, 4, dtype=torch.bool, device=DEVICE),
                   "complex": torch.zeros(2, 4, dtype=torch.complex64, device=DEVICE),
                   "list": [[0.0, 0.0, 1.0, 1.0]], "none": None}[bad.split("-")[1]]
    outcomes = run_paths(lambda: boxes_ops.box_iou(*args), call)
    if bad is not None:
        event(f"bad: {bad}")
        expect_error(outcomes, [bad.split("-")[0]], call)
        return
    # documented: "(N, M) float32 (float64 if either input is float64)",
    # "IoU in float32 (float64 for float64 boxes)": torchvision's box_iou of
    # the boxes in that dtype (torchvision itself subtracts fp16/bf16 in half)
    acc = compute_dtype(torch.promote_types(a.dtype, b.dtype))
    want = tv_ops.box_iou(a.to(acc), b.to(acc))
    if not (a.is_floating_point() or b.is_floating_point()):
        # small whole numbers: torchvision's integer arithmetic gives the same
        assert_close(tv_ops.box_iou(a, b), want, 0.0, name="oracle")
    event(f"{a.dtype} x {b.dtype}")
    for path, iou in expect_result(outcomes):
        assert iou.dtype == acc, f"{path}: {iou.dtype}"
        assert_close(iou, want, tolerance(acc), name=f"{path} IoU")


# --------------------------------------------------------------------------
# clip_boxes_to_image
# --------------------------------------------------------------------------
CLIP_SHAPES = ((0, 4), (1, 4), (3, 4), (4,), (2, 3, 4), (3, 8), (3, 2), (0, 2, 4), (2, 3, 0),
               (0,))
CLIP_SIZES = (0, 1, 7, 31, 47, 20.5, 0.25, -3, -2.5, 70000, 1e30, 1e300)
CLIP_SPECIALS = (None, None, "nan", "inf", "huge", "big-int")
SIZE_BAD = ("size-scalar", "size-triple", "size-nan", "size-inf", "size-str", "size-tensor",
            "size-none", "boxes-odd", "boxes-0d", "boxes-bool", "boxes-complex", "boxes-list")


@st.composite
def sizes(draw):
    """(size the user passes, (height, width) as floats)."""
    h, w = draw(st.sampled_from(CLIP_SIZES)), draw(st.sampled_from(CLIP_SIZES))
    spelling = draw(st.sampled_from(["tuple", "list", "numpy", "size"]))
    if spelling == "numpy":
        size = (np.float64(h), np.int64(w) if abs(w) < 2**62 and w == int(w) else
                np.float32(w) if abs(w) < 3e38 else np.float64(w))
    elif spelling == "size" and h == int(h) and w == int(w) and max(abs(h), abs(w)) < 2**62:
        size = torch.Size([int(h), int(w)])
    else:
        size = [h, w] if spelling == "list" else (h, w)
    return size, (float(size[0]), float(size[1]))


@st.composite
def clip_calls(draw):
    dtype = draw(st.sampled_from(BOX_DTYPES))
    size, hw = draw(sizes())
    return dict(shape=draw(st.sampled_from(CLIP_SHAPES)), dtype=dtype, seed=draw(seeds),
                special=draw(st.sampled_from(CLIP_SPECIALS)), size=size, hw=hw,
                view=draw(st.sampled_from(VECTOR_VIEWS)),
                bad=draw(st.sampled_from(BAD_SHARE * len(SIZE_BAD) + SIZE_BAD)))


def clip_values(call):
    """Values in [-10, 60) around the image (whole numbers for integer
    dtypes), a quarter of them special: NaN, ±inf, huge, or integers past
    2^24 / 2^40 (int64), 2^24 + 1 (int32)."""
    g = torch.Generator().manual_seed(call["seed"])
    dtype = call["dtype"]
    x = torch.rand(call["shape"], generator=g, dtype=torch.float64) * 70 - 10
    special = call["special"]
    if not dtype.is_floating_point:
        x = x.round()
        special = {"big-int": special}.get(special)
    elif special == "big-int":
        special = None
    if special is not None and x.numel():
        pick = torch.rand(x.shape, generator=g) < 0.25
        pick.view(-1)[0] = True
        sign = torch.where(torch.rand(x.shape, generator=g) < 0.5, -1.0, 1.0).double()
        if special == "big-int":
            value = torch.tensor({torch.int64: 2**40 + 3, torch.int32: 2**24 + 1,
                                  torch.int16: 2**14 + 1}[dtype], dtype=torch.float64)
        else:
            value = torch.tensor({"nan": NAN, "inf": INF, "huge": 1e30}[special],
                                 dtype=torch.float64)
        x = torch.where(pick, sign * value, x)
    return x.to(dtype)


def clip_oracle(boxes: torch.Tensor, height: float, width: float) -> torch.Tensor:
    """torchvision's clip_boxes_to_image done exactly (in float64) and
    rounded once to the boxes' dtype. Where torchvision's own clip is
    defined this is its result (rounding is monotone: clamping and rounding
    commute); integer boxes keep their dtype, as documented ("clipped
    boxes, same shape and dtype"; torchvision returns float32 for a
    fractional size), a fractional limit truncated as a cast truncates."""
    exact = tv_ops.clip_boxes_to_image(boxes.cpu().double(), (height, width))
    return exact.to(boxes.dtype)


def torchvision_clip_defined(boxes: torch.Tensor, height: float, width: float) -> bool:
    """False where torchvision refuses the call (a limit past the boxes'
    dtype's range: "value cannot be converted to type ... without overflow"):
    segops may then name the size instead of clipping."""
    try:
        tv_ops.clip_boxes_to_image(boxes.cpu(), (height, width))
    except RuntimeError:
        return False
    return True


@fuzz_settings(50)
@given(call=clip_calls())
def test_clip_boxes_to_image_matches_torchvision_or_names_the_argument(call):
    boxes = clip_values(call)
    x = view_of(boxes.to(DEVICE), call["view"])
    size, bad = call["size"], call["bad"]
    if bad is not None:
        kind = bad.split("-")[1]
        if bad.startswith("size"):
            size = {"scalar": 31, "triple": (1, 2, 3), "nan": (NAN, 5), "inf": (5, INF),
                    "str": ("31", 47), "tensor": torch.tensor([31, 47]), "none": None}[kind]
        else:
            x = {"odd": torch.zeros(2, 3, device=DEVICE), "0d": torch.tensor(1.0, device=DEVICE),
                 "bool": torch.zeros(2, 4, dtype=torch.bool, device=DEVICE),
                 "complex": torch.zeros(2, 4, dtype=torch.complex64, device=DEVICE),
                 "list": [[0.0, 0.0, 1.0, 1.0]]}[kind]
    outcomes = run_paths(lambda: boxes_ops.clip_boxes_to_image(x, size), call)
    if bad is not None:
        event(f"bad: {bad}")
        expect_error(outcomes, [bad.split("-")[0]], call)
        return
    height, width = call["hw"]
    want = clip_oracle(boxes, height, width)
    defined = torchvision_clip_defined(boxes, height, width)
    event(f"{call['dtype']}, torchvision {'defined' if defined else 'refuses'}")
    for path, result, error in outcomes:
        if error is not None and not defined:
            check_segops_error(error, ["size"], f"{path}: {call}")
            continue
        assert error is None, f"{path} path refused a valid call: {error}"
        assert result.dtype == boxes.dtype and result.is_contiguous(), \
            f"{path}: {result.dtype}, contiguous {result.is_contiguous()}"
        assert_close(result, want, 0.0, name=f"{path} clipped boxes")  # exact


# --------------------------------------------------------------------------
# decode_boxes
# --------------------------------------------------------------------------
WEIGHTS = ((1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0), (1.0, 2.0, 0.5, 4.0),
           (0.1, 3.0, 1e-3, 7.0), (0.0, 1.0, 1.0, 1.0), (-1.0, 1.0, -2.0, 1.0),
           (1e30, 1e-30, 1.0, 1.0))
CLIPS = (boxes_ops.DEFAULT_BBOX_XFORM_CLIP, boxes_ops.DEFAULT_BBOX_XFORM_CLIP, 0.0, 2.0,
         -1.0, 1e10, 1e300)
IMAGE_SIZES = (None, None, (31, 47), (20.5, 0.25), (-3, 5), (7, 1e30), (1e300, 9))
CODE_SPECIALS = (None, None, "nan", "inf", "huge", "past-clip")
DECODE_BAD = ("rel_codes-int", "rel_codes-shape", "rel_codes-1d", "rel_codes-rows",
              "boxes-shape", "boxes-empty-list", "boxes-list-element", "boxes-none",
              "weights-three", "weights-str", "weights-nan", "weights-none",
              "bbox_xform_clip-none", "bbox_xform_clip-nan", "image_size-scalar",
              "image_size-nan")


@st.composite
def decode_calls(draw):
    n = draw(st.sampled_from([0, 1, 2, 3, 5]))
    codes_dtype = draw(float_dtypes)
    boxes_dtype = draw(st.one_of(st.just(codes_dtype), st.sampled_from(BOX_DTYPES)))
    weights = draw(st.sampled_from(WEIGHTS))
    spelling = draw(st.sampled_from(["tuple", "list", "numpy"]))
    if spelling == "list":
        weights = list(weights)
    elif spelling == "numpy":
        weights = tuple(np.float64(w) for w in weights[:2]) + tuple(np.float32(w) if abs(w) < 1e30
                                                                   else w for w in weights[2:])
    clip = draw(st.sampled_from(CLIPS))
    clip = draw(st.sampled_from([clip, np.float64(clip)] + ([int(clip)] if clip == int(clip)
                                                             and abs(clip) < 1e20 else [])))
    return dict(
        n=n, k=draw(st.sampled_from([1, 1, 2, 3, 0])), codes_dtype=codes_dtype,
        boxes_dtype=boxes_dtype, rows=draw(box_rows(n, 0.5, not boxes_dtype.is_floating_point)),
        seed=draw(seeds), special=draw(st.sampled_from(CODE_SPECIALS)), weights=weights,
        clip=clip, image_size=draw(st.sampled_from(IMAGE_SIZES)),
        boxes_form=draw(st.sampled_from(["tensor", "tensor", "list"])),
        split=draw(st.lists(st.integers(0, 5), min_size=1, max_size=3)),
        codes_view=draw(st.sampled_from(VECTOR_VIEWS)),
        boxes_view=draw(st.sampled_from(VECTOR_VIEWS)),
        bad=draw(st.sampled_from(BAD_SHARE * len(DECODE_BAD) + DECODE_BAD)),
    )


def decode_codes(call):
    """(n, 4k) deltas, normal * 2, a quarter special where drawn: NaN, ±inf,
    huge, or dw/dh past the clip (100)."""
    g = torch.Generator().manual_seed(call["seed"])
    x = torch.randn(call["n"], 4 * call["k"], generator=g, dtype=torch.float64) * 2
    special = call["special"]
    if special is not None and x.numel():
        pick = torch.rand(x.shape, generator=g) < 0.25
        pick.view(-1)[0] = True
        sign = torch.where(torch.rand(x.shape, generator=g) < 0.5, -1.0, 1.0).double()
        value = {"nan": NAN, "inf": INF, "huge": 1e30, "past-clip": 100.0}[special]
        x = torch.where(pick, sign * value, x)
    return x.to(call["codes_dtype"])


def split_boxes(boxes: torch.Tensor, split):
    """boxes as a list of (L_i, 4) pieces (some empty) that concatenate to them."""
    pieces, start = [], 0
    for length in split:
        pieces.append(boxes[start:start + length])
        start += len(pieces[-1])
    pieces.append(boxes[start:])
    return pieces


def decode_oracle(codes, boxes, weights, clip, image_size):
    """(want, refused): BoxCoder(weights, bbox_xform_clip).decode_single in
    segops' documented dtype: "(N, 4K) decoded boxes in rel_codes' dtype,
    computed in float32 (float64 for float64 codes)" (BoxCoder itself first
    rounds the boxes to the codes' dtype, fp16 too), then clip_oracle for
    image_size. Weights and the clip are rounded to that dtype as torch
    rounds a scalar for it. ``refused`` names the arguments torchvision
    refuses (a clip or image size past that dtype's range: "value cannot be
    converted to type float without overflow"): segops may name them
    instead."""
    from torchvision.models.detection._utils import BoxCoder
    dtype, acc = codes.dtype, compute_dtype(codes.dtype)
    codes, boxes = codes.cpu().to(acc), boxes.cpu().to(acc)
    refused = []
    try:
        BoxCoder(tuple(float(w) for w in weights), float(clip)).decode_single(codes, boxes)
    except RuntimeError:
        refused.append("bbox_xform_clip")
    coder = BoxCoder(tuple(rounded(w, acc) for w in weights), rounded(clip, acc))
    out = coder.decode_single(codes, boxes)
    if image_size is not None:
        height, width = float(image_size[0]), float(image_size[1])
        if not torchvision_clip_defined(out, height, width):
            refused += ["image_size", "size"]
        out = clip_oracle(out, height, width)
    return out.to(dtype), refused


@fuzz_settings(50)
@given(call=decode_calls())
def test_decode_boxes_matches_box_coder_or_names_the_argument(call):
    codes = decode_codes(call)
    boxes = torch.tensor(call["rows"], dtype=torch.float64).reshape(-1, 4).to(call["boxes_dtype"])
    c = view_of(codes.to(DEVICE), call["codes_view"])
    if call["boxes_form"] == "list":
        b = [view_of(p.to(DEVICE), call["boxes_view"]) for p in split_boxes(boxes, call["split"])]
    else:
        b = view_of(boxes.to(DEVICE), call["boxes_view"])
    weights, clip, image_size, bad = call["weights"], call["clip"], call["image_size"], call["bad"]
    kind = None if bad is None else bad.rsplit("-", 1)[1]
    if bad is None:
        pass
    elif bad.startswith("rel_codes"):
        c = {"int": torch.ones(call["n"], 4, dtype=torch.int64, device=DEVICE),
             "shape": torch.zeros(call["n"], 6, device=DEVICE),
             "1d": torch.zeros(4, device=DEVICE),
             "rows": torch.zeros(call["n"] + 1, 4, device=DEVICE)}[kind]
    elif bad.startswith("boxes"):
        b = {"shape": torch.zeros(call["n"], 5, device=DEVICE), "list": [],
             "element": [torch.zeros(call["n"], 3, device=DEVICE)], "none": None}[kind]
    elif bad.startswith("weights"):
        weights = {"three": (1.0, 1.0, 1.0), "str": "abcd", "nan": (1.0, NAN, 1.0, 1.0),
                   "none": None}[kind]
    elif bad.startswith("bbox_xform_clip"):
        clip = {"none": None, "nan": NAN}[kind]
    else:
        image_size = {"scalar": 31, "nan": (31, NAN)}[kind]

    def fn():
        return boxes_ops.decode_boxes(c, b, weights, clip, image_size=image_size)
    outcomes = run_paths(fn, call)
    if bad is not None:
        event(f"bad: {bad}")
        names = {"rel_codes-rows": ["rel_codes", "boxes"],
                 "image_size-scalar": ["image_size", "size"],
                 "image_size-nan": ["image_size", "size"]}.get(bad, [bad.split("-")[0]])
        expect_error(outcomes, names, call)
        return
    event(f"{call['codes_dtype']} codes, {call['boxes_dtype']} boxes, {call['boxes_form']}")
    want, refused = decode_oracle(codes, boxes, weights, clip, image_size)
    for path, out, error in outcomes:
        if error is not None and refused:
            check_segops_error(error, refused, f"{path}: {call}")
            continue
        assert error is None, f"{path} path refused a valid call: {error}"
        assert out.dtype == codes.dtype, f"{path}: {out.dtype}"
        assert_close(out, want, tolerance(codes.dtype), name=f"{path} decoded boxes")
