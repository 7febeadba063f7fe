"""Fuzz: segops.ops.paste_masks and segops.ops.mask_targets against
torchvision's roi_heads.paste_masks_in_image and project_masks_on_boxes
(issue 16, "A fuzz suite in the project").

paste_masks: each example draws 0-3 masks of 1-9 x 1-9 pixels (non-square),
an image of 0-10 x 1-10 pixels, the padding, a threshold (None, 0, 0.5, 1,
one of the masks' own values, others; as a float, an int or a numpy
number), one box per mask (inside, across borders, touching an edge,
sub-pixel, degenerate, reversed, wholly outside, huge, NaN, inf), the
masks' values (probabilities, a few levels that tie with the thresholds,
constant, zeros, normal values with NaN / inf / huge / tiny ones), the
masks' and boxes' dtypes (float64/32/16/bf16), a memory format or
non-contiguous view of each, and the spelling of image_shape and padding.
mask_targets: the tensor form and the list form (1-3 images whose GT masks
share size and dtype, so one launch, or not), 0-3 GT masks per image
(uint8 with 0/1 or any byte, bool, float64/32/16/bf16), 0-3 RoIs per image
(inside, across borders, below a pixel, reversed, far away, huge, NaN,
inf; float64/32/16/bf16), matched indices of every index dtype, in range
or not, validate_args on and off, M, and non-contiguous views of every
tensor.

Every call runs on each path the device takes (kernel, native, reference
on the CPU) and must give torchvision's result within the dtype's tolerance
(bool results exactly), or raise a segops error naming the argument. The
expectation follows the differences segops.ops.masks documents (each is
cited where it is applied): a box wholly outside the image, or reversed,
pastes nothing (torchvision raises on some), a non-finite box or RoI gives
zeros, paste coordinates are clamped to +-2^40 (torchvision cannot allocate
that mask: the documented per-pixel rule is evaluated instead), fp16/bf16
boxes and RoIs are computed in float32, the threshold is torch's ``>`` on
the pasted value in the masks' dtype (that value is torchvision's within
tolerance), a NaN/inf mask value may reach pixels of zero weight, and an
unchecked index outside [0, G) gives zeros.

``SEGOPS_FUZZ_EXAMPLES=N`` runs N examples per test instead of the CI
default (see tests/fuzz/strategies.py)::

    SEGOPS_FUZZ_EXAMPLES=200 python -m pytest -q -p no:xdist tests/fuzz/test_masks.py
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fuzz.strategies import (
    SPECIALS,
    as_view,
    call_segops,
    check_segops_error,
    float_dtypes,
    fuzz_settings,
    on_path,
    paths_for,
    random_tensor,
    seeds,
    spelled,
    tolerance,
    vector_views,
    views,
)
from helpers import DEVICE, assert_close
from hypothesis import event, given
from hypothesis import strategies as st

import segops

roi_heads = pytest.importorskip("torchvision.models.detection.roi_heads")

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
GT_DTYPES = (torch.uint8, torch.bool, *FLOAT_DTYPES)
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)
# segops.ops.masks: "Coordinates are clamped to +-2^40 before the cast"
COORD_LIMIT = float(2 ** 40)
# a resized mask larger than this is not built by torchvision here (it
# could not allocate the clamped ones): the documented rule is evaluated
PEER_PIXELS = 1 << 22
INT32_LIMIT = 2 ** 31


def box_dtype(dtype: torch.dtype) -> torch.dtype:
    """segops.ops.masks: box arithmetic in float32, float64 for float64
    boxes (torchvision runs it in the boxes' dtype)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def accumulation(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------
# paste_masks: strategies
# --------------------------------------------------------------------------
HUGE_COORDS = (1e30, 2.0 ** 41, 3e3)   # 3e3: exact in fp16, not clamped
MASK_VALUES = ("prob", "prob", "prob", "levels", "levels", "constant", "zeros", "normal")


@st.composite
def paste_box(draw, H, W):
    """One (x0, y0, x1, y1) box of an H x W image, and its kind."""
    kind = draw(st.sampled_from(["inside", "inside", "across", "across", "edge", "sub-pixel",
                                 "degenerate", "reversed", "outside", "outside", "huge",
                                 "nan", "inf"]))
    h, w = max(H, 1), max(W, 1)
    x0 = draw(st.floats(-3, w + 1, allow_nan=False))
    y0 = draw(st.floats(-3, h + 1, allow_nan=False))
    x1 = x0 + draw(st.floats(0, w + 3, allow_nan=False))
    y1 = y0 + draw(st.floats(0, h + 3, allow_nan=False))
    if kind == "inside":
        x0, y0 = draw(st.floats(0, w, allow_nan=False)), draw(st.floats(0, h, allow_nan=False))
        x1 = x0 + draw(st.floats(0, w - x0, allow_nan=False))
        y1 = y0 + draw(st.floats(0, h - y0, allow_nan=False))
    elif kind == "edge":
        # corners on or half a pixel from the borders (truncation of -0.x to 0)
        x0 = draw(st.sampled_from([-1.0, -0.5, -0.3, 0.0, 0.5]))
        y0 = draw(st.sampled_from([-1.0, -0.5, 0.0, 0.7]))
        x1 = draw(st.sampled_from([w - 1.0, w - 0.5, float(w), w + 0.5]))
        y1 = draw(st.sampled_from([h - 1.0, h - 0.5, float(h), h + 0.5]))
    elif kind == "sub-pixel":
        x1 = x0 + draw(st.floats(0, 0.99, allow_nan=False))
        y1 = y0 + draw(st.floats(0, 0.99, allow_nan=False))
    elif kind == "degenerate":
        x1, y1 = x0, y0
    elif kind == "reversed":
        which = draw(st.sampled_from(["x", "y", "xy"]))
        if "x" in which:
            x0, x1 = x1 + draw(st.floats(0.1, 4, allow_nan=False)), x0
        if "y" in which:
            y0, y1 = y1 + draw(st.floats(0.1, 4, allow_nan=False)), y0
    elif kind == "outside":
        side = draw(st.sampled_from(["left", "right", "above", "below"]))
        gap = draw(st.sampled_from([0.3, 1.0, 2.5, 7.0, 1e4]))
        width, height = x1 - x0, y1 - y0
        if side == "left":
            x0, x1 = -gap - width, -gap
        elif side == "right":
            x0, x1 = w + gap, w + gap + width
        elif side == "above":
            y0, y1 = -gap - height, -gap
        else:
            y0, y1 = h + gap, h + gap + height
    elif kind in ("nan", "inf"):
        coords = [x0, y0, x1, y1]
        coords[draw(st.integers(0, 3))] = math.nan if kind == "nan" else \
            draw(st.sampled_from([math.inf, -math.inf]))
        x0, y0, x1, y1 = coords
    elif kind == "huge":
        # on one axis (3e3 on both would make the peers build a 1e8-pixel
        # mask): the low end far below, the high end far above (a box over
        # the image, cut by the clamp), both, or random signs
        value = draw(st.sampled_from(HUGE_COORDS))
        axis = draw(st.integers(0, 1))
        coords = [x0, y0, x1, y1]
        pattern = draw(st.sampled_from(["low", "high", "both", "random"]))
        if pattern in ("low", "both"):
            coords[axis] = -value
        if pattern in ("high", "both"):
            coords[axis + 2] = value
        if pattern == "random":
            coords[axis + 2 * draw(st.integers(0, 1))] = value * draw(st.sampled_from([1, -1]))
        x0, y0, x1, y1 = coords
    return [x0, y0, x1, y1], kind


@st.composite
def paste_calls(draw):
    N = draw(st.sampled_from([1, 2, 3, 1, 0]))
    MH, MW = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    if N == 0 and draw(st.integers(0, 3)) == 0:
        MH, MW = draw(st.sampled_from([(0, 5), (4, 0), (0, 0)]))   # empty and allowed
    H, W = draw(st.sampled_from([*range(1, 11), 0])), draw(st.integers(1, 10))
    boxes = [draw(paste_box(H, W)) for _ in range(N)]
    threshold = draw(st.sampled_from(["none"] * 6 + [0.0, 0.5, 1.0, "value", "value", "uniform",
                                                     "int", "numpy"]))
    if threshold == "uniform":
        threshold = draw(st.floats(-0.5, 1.5, allow_nan=False))
    padding = draw(st.sampled_from([0, 1, 1, 2, 3]))
    return dict(
        N=N, MH=MH, MW=MW, H=H, W=W, rows=[b for b, _ in boxes], kinds=[k for _, k in boxes],
        padding=padding, padding_arg=draw(spelled(padding)),
        shape_form=draw(st.sampled_from(["tuple", "list", "size", "numpy"])),
        threshold=threshold, values=draw(st.sampled_from(MASK_VALUES)),
        special=draw(st.sampled_from(SPECIALS)), dtype=draw(float_dtypes),
        boxes_dtype=draw(float_dtypes), seed=draw(seeds), masks_view=draw(views),
        boxes_view=draw(vector_views),
    )


def make_masks(call) -> torch.Tensor:
    shape = (call["N"], 1, call["MH"], call["MW"])
    gen = torch.Generator().manual_seed(call["seed"])
    kind = call["values"]
    if kind == "prob":
        t = torch.rand(shape, generator=gen, dtype=torch.float64)
    elif kind == "levels":   # values that tie with the thresholds and each other
        t = torch.randint(0, 5, shape, generator=gen).double() / 4
    elif kind == "constant":
        t = torch.full(shape, [0.25, 0.5, 1.0][call["seed"] % 3], dtype=torch.float64)
    elif kind == "zeros":
        t = torch.zeros(shape, dtype=torch.float64)
    else:
        return random_tensor(shape, call["dtype"], call["seed"], call["special"])
    return t.to(call["dtype"])


def make_threshold(call, masks):
    """The drawn threshold as the user passes it (None, a float, an int, a
    numpy number, or one of the masks' values, which may be NaN/inf)."""
    t = call["threshold"]
    if t == "none":
        return None
    if t == "int":
        return call["seed"] % 2
    if t == "numpy":
        return np.float64(0.5) if call["seed"] % 2 else np.float32(0.25)
    if t == "value":
        flat = masks.flatten()
        return float(flat[call["seed"] % flat.numel()]) if flat.numel() else 0.5
    return t


def image_shape_arg(call):
    H, W = call["H"], call["W"]
    return {"tuple": (H, W), "list": [H, W], "size": torch.Size([H, W]),
            "numpy": (np.int64(H), np.int32(W))}[call["shape_form"]]


# --------------------------------------------------------------------------
# paste_masks: the expectation
# --------------------------------------------------------------------------
def int_box(box: torch.Tensor, mask_width: int, padding: int):
    """torchvision's expand_boxes(box, (MW + 2p) / MW).to(int64) (its own
    function, in segops' box dtype), with segops.ops.masks' clamp:
    "Coordinates are clamped to +-2^40 before the cast"."""
    scale = float(mask_width + 2 * padding) / mask_width
    expanded = roi_heads.expand_boxes(box[None].clone(), scale)[0]
    return [int(v) for v in expanded.clamp(-COORD_LIMIT, COORD_LIMIT).to(torch.int64)]


def _axis(dst: torch.Tensor, out_size: int, in_size: int, acc: torch.dtype):
    """F.interpolate(bilinear, align_corners=False) along one axis, as
    segops.ops.masks documents it (ATen's area_pixel_compute_source_index,
    scale * (dst + 0.5) - 0.5 clamped at 0, the product exact as in ATen's
    fused multiply-add; the last index repeats at the edge; an axis whose
    size is unchanged is copied, as ATen's CPU kernel does)."""
    if out_size == in_size:
        one = torch.ones(dst.shape, dtype=acc)
        return dst, dst, one, one * 0
    scale = torch.tensor(in_size, dtype=acc) / torch.tensor(out_size, dtype=acc)
    src = (scale.double() * (dst.double() + 0.5) - 0.5).to(acc).clamp(min=0)
    low = src.long().clamp(max=in_size - 1)
    lam = (src - low.to(acc)).clamp(0, 1)
    high = low + (low < in_size - 1).long()
    return low, high, 1 - lam, lam


def documented_paste(mask: torch.Tensor, box, H: int, W: int, padding: int) -> torch.Tensor:
    """(H, W) in the mask's accumulation dtype: segops.ops.masks' rule
    "pixel (y, x) with x0 <= x <= x1 and y0 <= y <= y1 gets the resized
    mask's (y - y0, x - x0); every other pixel is 0", the resized mask being
    the padded mask's bilinear resize to max(y1 - y0 + 1, 1) x
    max(x1 - x0 + 1, 1), evaluated only at the image's pixels (for boxes
    whose resized mask torchvision cannot build)."""
    acc = accumulation(mask.dtype)
    padded = F.pad(mask.to(acc), (padding,) * 4)
    x0, y0, x1, y1 = box
    out = torch.zeros((H, W), dtype=acc)
    ys = torch.arange(max(y0, 0), min(y1 + 1, H))
    xs = torch.arange(max(x0, 0), min(x1 + 1, W))
    if ys.numel() == 0 or xs.numel() == 0:
        return out
    ylo, yhi, wy0, wy1 = _axis(ys - y0, max(y1 - y0 + 1, 1), padded.shape[0], acc)
    xlo, xhi, wx0, wx1 = _axis(xs - x0, max(x1 - x0 + 1, 1), padded.shape[1], acc)

    def tap(r, c):
        return padded[r][:, c]

    value = (wy0[:, None] * (wx0[None, :] * tap(ylo, xlo) + wx1[None, :] * tap(ylo, xhi))
             + wy1[:, None] * (wx0[None, :] * tap(yhi, xlo) + wx1[None, :] * tap(yhi, xhi)))
    out[ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1] = value
    return out


def paste_expectation(call, masks: torch.Tensor, boxes: torch.Tensor):
    """(expected, compared): torchvision's paste of each mask, with the
    documented differences; ``compared`` marks the pixels to compare (all,
    except where the peer is NaN/inf for masks with NaN/inf values)."""
    N, H, W, p = call["N"], call["H"], call["W"], call["padding"]
    dtype = masks.dtype
    floats = torch.zeros((N, 1, H, W), dtype=torch.float64)   # the peer in the accumulation dtype
    peer = torch.zeros((N, 1, H, W), dtype=dtype)              # the peer in the masks' dtype
    kinds = []
    for i in range(N):
        box = boxes[i].to(box_dtype(boxes.dtype))   # documented: fp16/bf16 boxes in float32
        if not bool(torch.isfinite(box).all()):
            # documented: "A box with a non-finite coordinate pastes nothing"
            kinds.append("non-finite")
            continue
        x0, y0, x1, y1 = int_box(box, call["MW"], p)
        if max(x0, 0) >= min(x1 + 1, W) or max(y0, 0) >= min(y1 + 1, H):
            # no pixel x0 <= x <= x1, y0 <= y <= y1 in the image (wholly
            # outside, or reversed): documented "pastes nothing", where
            # torchvision's negative slice ends raise or paste nothing
            kinds.append("nothing")
            continue
        if max(x1 - x0 + 1, 1) * max(y1 - y0 + 1, 1) > PEER_PIXELS:
            # clamped (or huge) coordinates: torchvision would allocate the
            # whole resized mask; the documented rule, at the image's pixels
            kinds.append("documented rule")
            one = documented_paste(masks[i, 0], (x0, y0, x1, y1), H, W, p)
            floats[i, 0] = one.double()
            peer[i, 0] = one.to(dtype)
            continue
        kinds.append("torchvision")
        acc = accumulation(dtype)
        # fp16/bf16 masks: torchvision's interpolation in float32 (segops'
        # accumulation dtype), for the float result; torchvision's CPU kernel
        # rounds the bilinear weights to the masks' dtype
        floats[i] = roi_heads.paste_masks_in_image(masks[i:i + 1].to(acc), box[None], (H, W),
                                                   padding=p)[0].double()
        if bool(torch.isfinite(masks[i]).all()):
            # the oracle's own check: the rule used for clamped boxes above is
            # torchvision's where torchvision runs
            assert_close(documented_paste(masks[i, 0], (x0, y0, x1, y1), H, W, p),
                         floats[i, 0].to(acc), tolerance(acc), name="documented rule (oracle)")
        # torchvision's own result in the masks' dtype (where it is NaN/inf
        # the pixel is not compared)
        peer[i] = roi_heads.paste_masks_in_image(masks[i:i + 1], box[None], (H, W),
                                                 padding=p)[0]
    for kind in set(kinds):
        event(f"paste box: {kind}")
    # masks with NaN/inf values: ATen's bilinear kernels multiply zero weights
    # by neighbouring pixels, and which neighbours depends on the device (the
    # CPU kernel copies an axis whose size is unchanged, the CUDA kernel only
    # when both are), so the peer's NaN pattern is not the contract: compared
    # where the peer is finite (as tests/fuzz/test_roi_align.py does)
    compared = torch.isfinite(floats) & torch.isfinite(peer.double())
    return floats.to(dtype), compared


# --------------------------------------------------------------------------
# paste_masks: the property
# --------------------------------------------------------------------------
@fuzz_settings(60)
@given(call=paste_calls())
def test_paste_masks_matches_torchvision_or_names_the_argument(call):
    masks = make_masks(call)
    boxes = torch.tensor(call["rows"], dtype=torch.float64).reshape(-1, 4).to(call["boxes_dtype"])
    threshold = make_threshold(call, masks)
    masks_arg = as_view(masks.to(DEVICE), call["masks_view"])
    boxes_arg = as_view(boxes.to(DEVICE), call["boxes_view"])

    def run():
        return segops.ops.paste_masks(masks_arg, boxes_arg, image_shape_arg(call),
                                      call["padding_arg"], threshold=threshold)

    if threshold is not None and not math.isfinite(float(threshold)):
        event("non-finite threshold refused")
        for path in paths_for(DEVICE):
            with on_path(path):
                _, error = call_segops(run, dict(call, path=path))
            assert error is not None, f"threshold {threshold} accepted on the {path} path"
            check_segops_error(error, ["threshold"], call)
        return
    event("thresholded" if threshold is not None else "float")
    want, compared = paste_expectation(call, masks, boxes)
    for path in paths_for(DEVICE):
        with on_path(path):
            got, error = call_segops(run, dict(call, path=path))
        assert error is None, f"{path} path refused a valid call: {error}"
        assert got.shape == (call["N"], 1, call["H"], call["W"]), path
        got = got.cpu()
        if threshold is not None:
            # documented: torch's > on the pasted value in the masks' dtype,
            # the value being torchvision's within tolerance (checked below);
            # its last bits may differ (fp16/bf16: one rounding where
            # torchvision rounds its weights too; float64: no fused
            # multiply-add in the source index, so 0 where torchvision has
            # 1e-17), so the bools are compared with segops' own value
            assert got.dtype == torch.bool, path
            with on_path(path):
                values = segops.ops.paste_masks(masks_arg, boxes_arg, image_shape_arg(call),
                                                call["padding_arg"]).cpu()
            mismatch = got != (values > threshold)
            assert not mismatch.any(), (
                f"{path} path: {int(mismatch.sum())} pixel(s) differ from the pasted value "
                f"> {threshold}, first at {torch.nonzero(mismatch)[0].tolist()}")
            got = values
        assert got.dtype == call["dtype"], path
        if not bool(torch.isfinite(masks).all()):
            # documented: a NaN/inf mask value may also reach pixels whose
            # bilinear weight for it is 0 (0 * NaN)
            compared = compared & torch.isfinite(got)
        assert_close(got[compared], want[compared], tolerance(call["dtype"]),
                     name=f"{path} pasted masks")


# --------------------------------------------------------------------------
# mask_targets: strategies
# --------------------------------------------------------------------------
@st.composite
def roi_row(draw, H, W):
    """One (x1, y1, x2, y2) RoI of an H x W mask, and its kind."""
    kind = draw(st.sampled_from(["inside", "inside", "across", "across", "tiny", "reversed",
                                 "far", "huge", "nan", "inf"]))
    x1 = draw(st.floats(-2, W + 1, allow_nan=False))
    y1 = draw(st.floats(-2, H + 1, allow_nan=False))
    x2 = x1 + draw(st.floats(0, W + 2, allow_nan=False))
    y2 = y1 + draw(st.floats(0, H + 2, allow_nan=False))
    if kind == "inside":
        x1, y1 = draw(st.floats(0, W, allow_nan=False)), draw(st.floats(0, H, allow_nan=False))
        x2 = x1 + draw(st.floats(0, W - x1, allow_nan=False))
        y2 = y1 + draw(st.floats(0, H - y1, allow_nan=False))
    elif kind == "tiny":   # below a pixel: aligned=False makes it 1 x 1
        x2 = x1 + draw(st.floats(0, 0.9, allow_nan=False))
        y2 = y1 + draw(st.floats(0, 0.9, allow_nan=False))
    elif kind == "reversed":
        x1, x2 = x2 + draw(st.floats(0.1, 3, allow_nan=False)), x1
    elif kind == "far":
        x1, x2 = x1 + 1e4, x2 + 1e4
    elif kind in ("huge", "nan", "inf"):
        value = {"huge": 1e30, "nan": math.nan, "inf": math.inf}[kind]
        coords = [x1, y1, x2, y2]
        position = draw(st.integers(0, 3))
        coords[position] = value if position >= 2 or kind == "nan" else -value
        x1, y1, x2, y2 = coords
    return [x1, y1, x2, y2], kind


@st.composite
def target_images(draw, count, shared):
    """Per image: GT masks, RoIs, matched indices (and their dtypes, views)."""
    H, W = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    gt_dtype = draw(st.sampled_from(GT_DTYPES))
    roi_dtype = draw(float_dtypes)
    images = []
    for _ in range(count):
        if not shared:
            H, W = draw(st.integers(1, 7)), draw(st.integers(1, 7))
            gt_dtype, roi_dtype = draw(st.sampled_from(GT_DTYPES)), draw(float_dtypes)
        G = draw(st.sampled_from([0, 1, 1, 2, 3]))
        K = draw(st.sampled_from([0, 1, 2, 2, 3]))
        rows = [draw(roi_row(H, W)) for _ in range(K)]
        index_kind = draw(st.sampled_from(["valid", "valid", "valid", "out-of-range"]))
        idx = [draw(st.integers(0, max(G - 1, 0))) for _ in range(K)]
        if index_kind == "out-of-range" and K:
            idx[draw(st.integers(0, K - 1))] = draw(st.sampled_from([-1, G, G + 5, 100]))
        images.append(dict(
            G=G, H=H, W=W, gt_dtype=gt_dtype, roi_dtype=roi_dtype,
            gt_values=draw(st.sampled_from(["binary", "binary", "bytes"])),
            rows=[r for r, _ in rows], kinds=[k for _, k in rows], idx=idx,
            idx_dtype=draw(st.sampled_from(INDEX_DTYPES)), seed=draw(seeds),
            gt_view=draw(views), rois_view=draw(vector_views), idx_view=draw(vector_views)))
    return images


@st.composite
def target_calls(draw):
    form = draw(st.sampled_from(["tensor", "tensor", "list"]))
    count = 1 if form == "tensor" else draw(st.integers(1, 3))
    shared = draw(st.booleans())
    M = draw(st.integers(1, 4))
    return dict(form=form, shared=shared, images=draw(target_images(count, shared)), M=M,
                M_arg=draw(spelled(M)), validate_args=draw(st.booleans()))


def make_image(image):
    """(gt_masks, rois, matched_idxs) of one image, contiguous, on the CPU."""
    gen = torch.Generator().manual_seed(image["seed"])
    shape = (image["G"], image["H"], image["W"])
    dtype = image["gt_dtype"]
    if dtype == torch.bool:
        gt = torch.rand(shape, generator=gen) < 0.5
    elif dtype == torch.uint8 and image["gt_values"] == "bytes":
        gt = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    elif dtype == torch.uint8:
        gt = torch.randint(0, 2, shape, generator=gen, dtype=torch.uint8)
    elif image["gt_values"] == "bytes":   # float masks: soft values
        gt = torch.rand(shape, generator=gen, dtype=torch.float64).to(dtype)
    else:
        gt = torch.randint(0, 2, shape, generator=gen).to(dtype)
    rois = torch.tensor(image["rows"], dtype=torch.float64).reshape(-1, 4).to(image["roi_dtype"])
    # out-of-range values wrap into the index dtype (-1 is 255 in uint8)
    idx = torch.tensor(image["idx"], dtype=torch.int64).to(image["idx_dtype"])
    return gt, rois, idx


def bad_indices(gt, idx) -> torch.Tensor:
    i = idx.long()
    return (i < 0) | (i >= gt.shape[0])


def count_past_int32(rois: torch.Tensor, M: int) -> torch.Tensor:
    """torchvision's adaptive samples per bin, ceil(max(size, 1) / M), past
    int32 on either axis (in the RoIs' computation dtype)."""
    w = (rois[:, 2] - rois[:, 0]).clamp(min=1.0)
    h = (rois[:, 3] - rois[:, 1]).clamp(min=1.0)
    return (torch.ceil(w / M) >= INT32_LIMIT) | (torch.ceil(h / M) >= INT32_LIMIT)


def targets_expectation(gt, rois, idx, M) -> torch.Tensor:
    """torchvision's project_masks_on_boxes for one image, with segops'
    documented differences; (K, M, M) in segops' output dtype."""
    dtype = box_dtype(rois.dtype)   # documented: fp16/bf16 RoIs in float32
    r = rois.to(dtype)
    # documented (segops.ops.masks): "A RoI with a non-finite coordinate
    # gives zeros" and "a RoI with an index outside [0, G) gives zeros when
    # unchecked"; and, mask_targets being documented as segops' roi_align
    # (segops.ops.roi_align: "an adaptive sample count past int32" gives 0,
    # where torchvision's int overflows), a RoI 1e30 wide gives zeros
    zero = ~torch.isfinite(r).all(1) | bad_indices(gt, idx)
    huge = count_past_int32(torch.where(zero[:, None], 0.0, r), M)
    zero |= huge
    for kind, rows in (("non-finite", ~torch.isfinite(r).all(1)),
                       ("bad index", bad_indices(gt, idx)), ("1e30-wide", huge)):
        if rows.any():
            event(f"targets: {kind} RoI gives zeros")
    out = torch.zeros((r.shape[0], M, M), dtype=dtype)
    keep = torch.nonzero(~zero).flatten()
    if keep.numel():
        out[keep] = roi_heads.project_masks_on_boxes(gt, r[keep], idx[keep].long(), M)
    return out


def check_refused(call, images):
    """validate_args=True with an index outside [0, G): a segops error
    naming matched_idxs on every path. On CUDA the check is a device-side
    assert, which ends the process's CUDA context (tests/ops/test_masks.py
    checks it in a child process): CPU tensors are used instead."""
    args = targets_args(call, images, "cpu")
    for path in ("kernel", "native", "reference"):
        with on_path(path):
            _, error = call_segops(lambda: segops.ops.mask_targets(
                *args, call["M_arg"], validate_args=True), dict(call, path=path))
        assert error is not None, f"an out-of-range index was accepted on the {path} path"
        check_segops_error(error, ["matched_idxs"], call)


def targets_args(call, images, device):
    """(gt_masks, rois, matched_idxs) as the user passes them: tensors, or
    lists with one entry per image, each in its drawn view."""
    per = [(as_view(g.to(device), im["gt_view"]), as_view(r.to(device), im["rois_view"]),
            as_view(i.to(device), im["idx_view"]))
           for (g, r, i), im in zip(images, call["images"])]
    if call["form"] == "tensor":
        return per[0]
    return tuple(list(column) for column in zip(*per))


# --------------------------------------------------------------------------
# mask_targets: the property
# --------------------------------------------------------------------------
@fuzz_settings(50)
@given(call=target_calls())
def test_mask_targets_matches_torchvision_or_names_the_argument(call):
    images = [make_image(im) for im in call["images"]]
    if call["validate_args"] and any(bad_indices(g, i).any() for g, _, i in images):
        event("out-of-range index refused")
        check_refused(call, images)
        return
    event(f"{call['form']} form" + (", one launch" if call["form"] == "list"
                                    and call["shared"] else ""))
    want = torch.cat([targets_expectation(g, r, i, call["M"]) for g, r, i in images])
    rtol = tolerance(want.dtype)
    args = targets_args(call, images, DEVICE)
    for path in paths_for(DEVICE):
        with on_path(path):
            got, error = call_segops(lambda: segops.ops.mask_targets(
                *args, call["M_arg"], validate_args=call["validate_args"]), dict(call, path=path))
        assert error is None, f"{path} path refused a valid call: {error}"
        assert got.dtype == want.dtype, f"{path}: {got.dtype} != {want.dtype}"
        assert_close(got, want, rtol, name=f"{path} mask targets")


# --------------------------------------------------------------------------
# bad arguments: a segops error naming them
# --------------------------------------------------------------------------
def _masks(*shape, dtype=torch.float64):
    return torch.rand(*shape, dtype=dtype)


_BOXES = torch.tensor([[1.0, 1.0, 4.0, 3.0], [0.0, 2.0, 2.0, 5.0]], dtype=torch.float64)
_GT = torch.randint(0, 2, (2, 6, 7), dtype=torch.uint8)
_ROIS = torch.tensor([[0.5, 0.5, 4.0, 3.0], [1.0, 0.0, 6.0, 5.0]])
_IDX = torch.tensor([0, 1])

BAD_PASTE = {
    "masks-none": ("masks", dict(masks=None)),
    "masks-3d": ("masks", dict(masks=_masks(2, 5, 5))),
    "masks-int": ("masks", dict(masks=torch.ones(2, 1, 5, 5, dtype=torch.int64))),
    "masks-uint8": ("masks", dict(masks=torch.ones(2, 1, 5, 5, dtype=torch.uint8))),
    "masks-channels": ("masks", dict(masks=_masks(2, 2, 5, 5))),
    "masks-empty": ("masks", dict(masks=_masks(2, 1, 0, 5))),
    "boxes-count": ("boxes", dict(boxes=_BOXES[:1])),
    "boxes-shape": ("boxes", dict(boxes=torch.zeros(2, 5))),
    "boxes-3d": ("boxes", dict(boxes=torch.zeros(2, 1, 4))),
    "boxes-int": ("boxes", dict(boxes=_BOXES.long())),
    "boxes-list": ("boxes", dict(boxes=[[1.0, 1.0, 4.0, 3.0]] * 2)),
    "shape-int": ("image_shape", dict(image_shape=8)),
    "shape-triple": ("image_shape", dict(image_shape=(8, 8, 1))),
    "shape-negative": ("image_shape", dict(image_shape=(-1, 8))),
    "shape-float": ("image_shape", dict(image_shape=(8.0, 8))),
    "shape-none": ("image_shape", dict(image_shape=None)),
    "padding-negative": ("padding", dict(padding=-1)),
    "padding-float": ("padding", dict(padding=1.5)),
    "padding-none": ("padding", dict(padding=None)),
    "threshold-nan": ("threshold", dict(threshold=math.nan)),
    "threshold-inf": ("threshold", dict(threshold=-math.inf)),
    "threshold-string": ("threshold", dict(threshold="0.5")),
    "threshold-bool": ("threshold", dict(threshold=True)),
    "threshold-tensor": ("threshold", dict(threshold=torch.tensor([0.5, 0.5]))),
}
BAD_TARGETS = {
    "gt-none": ("gt_masks", dict(gt_masks=None)),
    "gt-2d": ("gt_masks", dict(gt_masks=_GT[0])),
    "gt-int32": ("gt_masks", dict(gt_masks=_GT.int())),
    "rois-shape": ("rois", dict(rois=torch.zeros(2, 5))),
    "rois-int": ("rois", dict(rois=_ROIS.long())),
    "rois-none": ("rois", dict(rois=None)),
    "idx-float": ("matched_idxs", dict(matched_idxs=_IDX.float())),
    "idx-bool": ("matched_idxs", dict(matched_idxs=_IDX.bool())),
    "idx-2d": ("matched_idxs", dict(matched_idxs=_IDX[:, None])),
    "idx-count": ("matched_idxs", dict(matched_idxs=_IDX[:1])),
    "idx-high": ("matched_idxs", dict(matched_idxs=torch.tensor([0, 2]))),
    "idx-negative": ("matched_idxs", dict(matched_idxs=torch.tensor([-1, 0]))),
    "idx-uint8-wrapped": ("matched_idxs", dict(matched_idxs=torch.tensor([0, 255],
                                                                          dtype=torch.uint8))),
    "M-zero": ("M", dict(M=0)),
    "M-float": ("M", dict(M=2.5)),
    "M-none": ("M", dict(M=None)),
    "list-rois-tensor": ("rois", dict(gt_masks=[_GT], rois=_ROIS, matched_idxs=[_IDX])),
    "list-idx-short": ("matched_idxs", dict(gt_masks=[_GT, _GT], rois=[_ROIS, _ROIS],
                                            matched_idxs=[_IDX])),
    "list-empty": ("gt_masks", dict(gt_masks=[], rois=[], matched_idxs=[])),
    "list-idx-high": ("matched_idxs", dict(gt_masks=[_GT, _GT[:1]], rois=[_ROIS, _ROIS],
                                           matched_idxs=[_IDX, _IDX])),
    "list-gt-dtype": ("gt_masks", dict(gt_masks=[_GT, _GT.long()], rois=[_ROIS, _ROIS],
                                       matched_idxs=[_IDX, _IDX])),
    "list-rois-shape": ("rois", dict(gt_masks=[_GT], rois=[_ROIS[:, :3]], matched_idxs=[_IDX])),
}


@fuzz_settings(40)
@given(case=st.sampled_from(sorted(BAD_PASTE) + sorted(BAD_TARGETS)),
       path=st.sampled_from(("kernel", "native", "reference")))
def test_bad_argument_is_a_segops_error_naming_it(case, path):
    if case in BAD_PASTE:
        name, changes = BAD_PASTE[case]
        call = dict(masks=_masks(2, 1, 5, 5), boxes=_BOXES, image_shape=(8, 9), padding=1,
                    threshold=None)
        op = segops.ops.paste_masks
    else:
        name, changes = BAD_TARGETS[case]
        call = dict(gt_masks=_GT, rois=_ROIS, matched_idxs=_IDX, M=3)
        op = segops.ops.mask_targets
    call.update(changes)
    # a bad index on CUDA is a device-side assert (see check_refused)
    device = "cpu" if name == "matched_idxs" else DEVICE

    def move(v):
        if isinstance(v, torch.Tensor):
            return v.to(device)
        return [move(x) for x in v] if isinstance(v, list) else v

    call = {k: v if k == "threshold" else move(v) for k, v in call.items()}
    if DEVICE.type != "cpu" and device != "cpu":
        path = "kernel"
    with on_path(path):
        result, error = call_segops(lambda: op(**call), f"{case} on the {path} path")
    assert error is not None, f"{case}: accepted, gave shape {tuple(result.shape)}"
    check_segops_error(error, [name], case)
