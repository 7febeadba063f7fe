"""Mask pasting and mask targets: kernels vs torchvision's own functions
(paste_masks_in_image, project_masks_on_boxes) vs the reference, every
branch (boxes partly and wholly outside, 1-pixel, reversed, huge, truncation
toward zero of negative coordinates), thresholds, GT mask dtypes, views,
edges, errors, opcheck, one launch, and the benchmark's code at tiny sizes."""
import contextlib
import importlib

import pytest
import torch
from helpers import (DEVICE, RTOL, VIEW_KINDS, assert_checked_eager_and_compiled, assert_close,
                     assert_guards_intact, guarded_outputs, non_contiguous, record_launches)

from segops import _dispatch
from segops.kernels import masks as kernels
from segops.reference import masks as ref

torchvision = pytest.importorskip("torchvision")
from torchvision.models.detection.roi_heads import (  # noqa: E402
    paste_masks_in_image,
    project_masks_on_boxes,
)

ops_module = importlib.import_module("segops.ops.masks")
paste_masks, mask_targets = ops_module.paste_masks, ops_module.mask_targets

H, W = 40, 57  # small image: the interpreter is slow
F64 = RTOL[torch.float64]
F32 = RTOL[torch.float32]


def on_path(path):
    """kernel: the tests' default path; native / reference: forced (CPU)."""
    if path == "kernel":
        return contextlib.nullcontext()
    return _dispatch.forced_path(_dispatch.NATIVE if path == "native" else _dispatch.REFERENCE)


def device_for(path):
    return DEVICE if path == "kernel" else torch.device("cpu")


def paste_boxes(dtype=torch.float64):
    """Boxes torchvision pastes without error, covering every branch: inside,
    across each border, a fractional negative corner (truncated toward zero,
    not floored), 1-pixel and sub-pixel boxes, reversed boxes (paste nothing),
    larger than the image, touching the right edge from outside."""
    rows = [
        [3.2, 4.7, 20.1, 30.3],      # inside
        [-5.0, -3.0, 10.0, 8.0],     # across the top-left corner
        [45.0, 30.0, 70.0, 50.0],    # across the bottom-right corner
        [5.0, 5.0, 5.3, 5.2],        # sub-pixel: a 1-pixel paste
        [12.0, 9.0, 12.0, 9.0],      # degenerate point
        [-10.0, -10.0, 80.0, 60.0],  # larger than the image
        [10.6, -0.9, 14.2, 0.3],     # y0 expands to about -1.5 -> -1, y1 -> 0
        [-0.9, 20.0, 0.2, 25.0],     # x0 -> -1 (trunc), x1 -> 0: one column
        [30.0, 20.0, 22.0, 10.0],    # reversed in both
        [30.0, 10.0, 22.0, 20.0],    # reversed in x only
        [55.5, 2.0, 56.5, 6.0],      # at the right edge
        [-1.3, 35.0, 3.0, 45.0],     # across the bottom-left
    ]
    return torch.tensor(rows, dtype=dtype)


def outside_boxes(dtype=torch.float64):
    """Boxes wholly outside on which torchvision's negative slice ends wrap
    around and it raises a size mismatch: segops pastes nothing."""
    return torch.tensor([[60.0, 3.0, 95.0, 20.0],     # right of the image
                         [-40.0, 3.0, -10.0, 20.0],   # left of it
                         [3.0, 60.0, 20.0, 90.0],     # below
                         [3.0, -50.0, 20.0, -12.0]],  # above
                        dtype=dtype)


def rand_masks(n, mh=7, mw=7, dtype=torch.float64):
    return torch.rand(n, 1, mh, mw, dtype=torch.float64).to(dtype)


def mask_rois(dtype=torch.float32):
    """RoIs for the mask targets: inside, across borders, tiny (below 1 px:
    the aligned=False minimum size), huge (many samples per bin), reversed,
    wholly outside."""
    rows = [
        [3.2, 4.7, 20.1, 30.3],
        [-5.0, -3.0, 10.0, 8.0],
        [30.0, 20.0, 70.0, 50.0],
        [5.0, 5.0, 5.3, 5.2],
        [-20.0, -15.0, 90.0, 70.0],
        [30.0, 20.0, 22.0, 10.0],
        [70.0, 50.0, 90.0, 60.0],
        [0.0, 0.0, 56.0, 39.0],
    ]
    return torch.tensor(rows, dtype=dtype)


def gt_masks(G, dtype=torch.uint8):
    masks = torch.rand(G, H, W) > 0.5
    if dtype == torch.bool:
        return masks
    return masks.to(dtype)


# --------------------------------------------------------------------------
# paste_masks
# --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("padding,shape", [(1, (7, 7)), (0, (5, 5)), (2, (4, 6))])
def test_paste_matches_torchvision(dtype, padding, shape):
    boxes = paste_boxes(dtype)
    masks = rand_masks(boxes.shape[0], *shape, dtype=dtype)
    want = paste_masks_in_image(masks, boxes, (H, W), padding=padding)
    with record_launches(kernels, "_paste_masks_kernel") as rec:
        got = paste_masks(masks.to(DEVICE), boxes.to(DEVICE), (H, W), padding)
    assert rec.names_launched() == ["_paste_masks_kernel"]  # one launch, all masks
    assert rec.launches[0][1][0] == boxes.shape[0]
    assert got.dtype == dtype and got.shape == (boxes.shape[0], 1, H, W)
    assert_close(got, want, RTOL[dtype])
    # which pixels are pasted is exact (truncation, clipping)
    assert torch.equal(got.cpu() != 0, want != 0)


def test_paste_box_dtype_differs_from_mask_dtype():
    """float32 masks with float64 boxes: box arithmetic in float64, the
    interpolation in float32, as torchvision."""
    boxes = paste_boxes(torch.float64) + 0.37
    masks = rand_masks(boxes.shape[0], dtype=torch.float32)
    want = paste_masks_in_image(masks, boxes, (H, W))
    got = paste_masks(masks.to(DEVICE), boxes.to(DEVICE), (H, W))
    assert_close(got, want, F32)
    assert torch.equal(got.cpu() != 0, want != 0)


def test_paste_truncation_boundaries_float32():
    """Expanded corners landing exactly on and next to integers, in float32:
    the truncation must see torchvision's exact float32 arithmetic."""
    base = torch.arange(0, 24, dtype=torch.float32)
    boxes = torch.stack([base * 1.75 - 3.5, base * 1.5 - 2.25, base * 1.75 + 7.0,
                         base * 1.5 + 4.75], 1)
    boxes = torch.cat([boxes, torch.nextafter(boxes, boxes + 1),
                       torch.nextafter(boxes, boxes - 1)])
    masks = rand_masks(boxes.shape[0], 28, 28, torch.float32)
    want = paste_masks_in_image(masks, boxes, (H, W))
    got = paste_masks(masks.to(DEVICE), boxes.to(DEVICE), (H, W))
    assert torch.equal(got.cpu() != 0, want != 0)
    assert_close(got, want, F32)


def test_paste_boxes_wholly_outside_paste_nothing():
    boxes = outside_boxes()
    masks = rand_masks(boxes.shape[0])
    for i in range(boxes.shape[0]):  # torchvision raises on each of them
        with pytest.raises(RuntimeError):
            paste_masks_in_image(masks[i:i + 1], boxes[i:i + 1], (H, W), padding=0)
    got = paste_masks(masks.to(DEVICE), boxes.to(DEVICE), (H, W), 0)
    assert torch.equal(got.cpu(), torch.zeros(boxes.shape[0], 1, H, W, dtype=torch.float64))
    with _dispatch.reference_only():
        assert torch.equal(paste_masks(masks, boxes, (H, W), 0), got.cpu())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=str)
@pytest.mark.parametrize("threshold", [0.5, 0.3, 0.0, 1.0, 0.30000001])
def test_paste_threshold(dtype, threshold):
    """value > threshold in the masks' dtype, as torch compares (the
    threshold cast to it: 0.30000001 is 0.3 in bf16 and fp16). fp16/bf16
    once compared through a float64 -> bf16 cast that the interpreter gets
    wrong (all True)."""
    boxes = paste_boxes(torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
    masks = rand_masks(boxes.shape[0], dtype=dtype)
    masks[0, 0, 2:4, 2:4] = 0.3  # exactly at a threshold (float32: 0.3 rounded)
    masks[1, 0, 1:3, 1:3] = 1.0
    want = paste_masks_in_image(masks, boxes, (H, W)) > threshold
    got = paste_masks(masks.to(DEVICE), boxes.to(DEVICE), (H, W),
                                 threshold=threshold)
    assert got.dtype == torch.bool
    if dtype in (torch.float16, torch.bfloat16):
        # the pasted values may differ from torchvision's by an ulp (within
        # tolerance), which flips values next to the threshold: the bools
        # are those of segops' own values, compared as torch compares
        values = paste_masks(masks.to(DEVICE), boxes.to(DEVICE), (H, W))
        assert_close(values, paste_masks_in_image(masks, boxes, (H, W)), RTOL[dtype])
        want = values.cpu() > threshold
    assert torch.equal(got.cpu(), want)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="Triton's interpreter casts float32 to "
                    "bfloat16 toward zero, not to nearest even: the GPU's rounding")
def test_paste_bf16_values_round_to_nearest_even():
    """bfloat16 masks whose pasted values fall halfway between two bfloat16
    numbers (0.5 and 0.5078125 blended 3:1 and 1:1): torch's round to
    nearest even, values and threshold, exactly."""
    masks = torch.full((1, 1, 2, 2), 0.5, dtype=torch.bfloat16)
    masks[0, 0, 0, 0] = 0.5078125
    boxes = torch.tensor([[0.0, 0.0, 7.0, 7.0]])
    want = paste_masks_in_image(masks, boxes, (8, 8), padding=0)
    got = paste_masks(masks.to(DEVICE), boxes.to(DEVICE), (8, 8), padding=0)
    assert torch.equal(got.cpu(), want)
    above = paste_masks(masks.to(DEVICE), boxes.to(DEVICE), (8, 8), padding=0, threshold=0.5)
    assert torch.equal(above.cpu(), want > 0.5)


def test_paste_threshold_is_exact_in_float64():
    """A float64 threshold is not rounded to float32: values 1e-12 above 0.3
    are above it (they are below float32's 0.3, 0.30000001)."""
    boxes = paste_boxes()[:3]
    masks = torch.full((3, 1, 6, 6), 0.3 + 1e-12, dtype=torch.float64)
    want = paste_masks_in_image(masks, boxes, (H, W)) > 0.3
    got = paste_masks(masks.to(DEVICE), boxes.to(DEVICE), (H, W), threshold=0.3)
    assert want.sum() > 50
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("threshold", [-1e300, 1e300, -1e-300, 1e-300, -0.0, 3.5e38])
def test_paste_float64_threshold_past_float32_range(threshold):
    """float64 masks compare with the double threshold itself, past float32's
    range and below its smallest value too (pixels outside the box are 0:
    0 > -1e-300). The threshold once came as three float32 parts: NaN for
    1e300, -0.0 for -1e-300."""
    boxes = paste_boxes()[:3]
    masks = rand_masks(3)
    want = paste_masks_in_image(masks, boxes, (H, W)) > threshold
    got = paste_masks(masks.to(DEVICE), boxes.to(DEVICE), (H, W), threshold=threshold)
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("which", ["masks", "boxes"])
@pytest.mark.parametrize("kind", VIEW_KINDS)
def test_paste_non_contiguous(which, kind):
    boxes = paste_boxes().to(DEVICE)
    masks = rand_masks(boxes.shape[0], 5, 6).to(DEVICE)
    want = ref.paste_masks(masks.cpu(), boxes.cpu(), H, W, 1, None)
    if which == "masks":
        masks = non_contiguous(masks, kind)
    else:
        boxes = non_contiguous(boxes, kind)
    assert not (masks.is_contiguous() and boxes.is_contiguous())
    got = paste_masks(masks, boxes, (H, W))
    assert_close(got, want, F64)


@pytest.mark.parametrize("block_h,block_w", [(2, 16), (32, 64)])
def test_paste_kernel_tiles_match_reference(block_h, block_w):
    """Tiles much smaller than the image (many programs per mask, tiles that
    miss the box) and larger than it (row and column tails)."""
    boxes = torch.cat([paste_boxes(), outside_boxes()])
    masks = rand_masks(boxes.shape[0])
    got = kernels.paste_masks(masks.to(DEVICE), boxes.to(DEVICE), H, W, 1, None,
                              block_h=block_h, block_w=block_w)
    assert_close(got, ref.paste_masks(masks, boxes, H, W, 1, None), F64)
    got = kernels.paste_masks(masks.to(DEVICE), boxes.to(DEVICE), H, W, 1, 0.4,
                              block_h=block_h, block_w=block_w)
    assert torch.equal(got.cpu(), ref.paste_masks(masks, boxes, H, W, 1, 0.4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_paste_half_masks(dtype):
    boxes = paste_boxes(torch.float32)
    masks = rand_masks(boxes.shape[0], dtype=dtype)
    got = paste_masks(masks.to(DEVICE), boxes.to(DEVICE), (H, W))
    assert got.dtype == dtype
    want = paste_masks_in_image(masks.double(), boxes.double(), (H, W))
    assert_close(got, want, RTOL[dtype])


def test_paste_non_finite_boxes_paste_nothing():
    boxes = paste_boxes()[:3].clone()
    boxes[0, 2] = float("nan")
    boxes[1, 0] = -float("inf")
    masks = rand_masks(3)
    got = paste_masks(masks.to(DEVICE), boxes.to(DEVICE), (H, W)).cpu()
    assert torch.equal(got[:2], torch.zeros(2, 1, H, W, dtype=torch.float64))
    assert_close(got[2:], paste_masks_in_image(masks[2:], boxes[2:], (H, W)), F64)
    with _dispatch.reference_only():
        assert_close(paste_masks(masks, boxes, (H, W)), got, F64)


@pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan")], ids=str)
def test_paste_each_non_finite_coordinate_pastes_nothing(value):
    """A box with any one coordinate +-inf or NaN pastes nothing, whichever
    coordinate it is (every one of the four must be finite: the expanded
    corners of x0 = 3, x1 = inf are NaN and inf, which truncation would turn
    into a window over the whole row), while a finite box beside it pastes
    as torchvision does."""
    boxes = paste_boxes()[:1].repeat(5, 1)
    for i in range(4):
        boxes[i, i] = value
    masks = rand_masks(5)
    got = paste_masks(masks.to(DEVICE), boxes.to(DEVICE), (H, W)).cpu()
    assert torch.equal(got[:4], torch.zeros(4, 1, H, W, dtype=torch.float64))
    want = paste_masks_in_image(masks[4:], boxes[4:], (H, W))
    assert_close(got[4:], want, F64)
    above = paste_masks(masks.to(DEVICE), boxes.to(DEVICE), (H, W), threshold=0.0).cpu()
    assert not above[:4].any() and torch.equal(above[4:], want > 0)


def test_paste_writes_nothing_past_its_output(monkeypatch):
    """An image of 37 x 45 in 8 x 64 tiles (rows 37..39 and columns 45..63 of
    the last tiles masked off), the last box past the bottom-right corner:
    only the (N, 1, H, W) output is stored. A store at row H or column W
    would land on the next row or mask (which overwrite it) and, for the
    last mask, past the output: guard elements after it keep their value."""
    h, w = 37, 45
    boxes = paste_boxes()[[0, 1, 3, 5]]
    masks = rand_masks(boxes.shape[0])
    guards = guarded_outputs(monkeypatch, kernels)
    got = paste_masks(masks.to(DEVICE), boxes.to(DEVICE), (h, w))
    assert_close(got, paste_masks_in_image(masks, boxes, (h, w)), F64)
    assert_guards_intact(guards)


@pytest.mark.parametrize("path", ["kernel", "native", "reference"])
def test_paste_no_masks_of_width_0(path):
    """(0, 1, MH, 0) masks pass the checks (a width of 0 is refused only when
    there are masks); every path returns the empty paste (the reference
    once divided by the width first)."""
    masks, boxes = torch.zeros(0, 1, 4, 0, dtype=torch.float64), torch.zeros(0, 4)
    with on_path(path):
        assert paste_masks(masks.to(device_for(path)), boxes.to(device_for(path)),
                           (3, 5)).shape == (0, 1, 3, 5)
        got = paste_masks(masks.to(device_for(path)), boxes.to(device_for(path)), (3, 5),
                          threshold=0.5)
        assert got.shape == (0, 1, 3, 5) and got.dtype == torch.bool


def test_paste_empty():
    masks, boxes = torch.zeros(0, 1, 28, 28), torch.zeros(0, 4)
    got = paste_masks(masks.to(DEVICE), boxes.to(DEVICE), (H, W))
    assert got.shape == paste_masks_in_image(masks, boxes, (H, W)).shape == (0, 1, H, W)
    got = paste_masks(masks.to(DEVICE), boxes.to(DEVICE), (H, W), threshold=0.5)
    assert got.shape == (0, 1, H, W) and got.dtype == torch.bool
    got = paste_masks(rand_masks(2).to(DEVICE), paste_boxes()[:2].to(DEVICE), (0, 5))
    assert got.shape == (2, 1, 0, 5)


def test_paste_reference_path_matches_torchvision():
    boxes = paste_boxes(torch.float32)
    masks = rand_masks(boxes.shape[0], dtype=torch.float32)
    want = paste_masks_in_image(masks, boxes, (H, W))
    with _dispatch.native_only():  # off the GPU without the interpreter: the reference
        got = paste_masks(masks, boxes, (H, W))
    assert_close(got, want, F32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("padding,shape", [(1, (7, 7)), (2, (4, 6))])
def test_paste_reference_window_matches_torchvision(dtype, padding, shape, monkeypatch):
    """The reference's in-image window of the resize (what it pastes for a box
    whose resized mask would pass RESIZE_LIMIT pixels), forced for every
    box: torchvision's numbers, and exactly its pasted pixels."""
    monkeypatch.setattr(ref, "RESIZE_LIMIT", 0)
    boxes = paste_boxes(dtype)
    masks = rand_masks(boxes.shape[0], *shape, dtype=dtype)
    want = paste_masks_in_image(masks, boxes, (H, W), padding=padding)
    with _dispatch.reference_only():
        got = paste_masks(masks, boxes, (H, W), padding)
    assert_close(got, want, RTOL[dtype])
    assert torch.equal(got != 0, want != 0)


def test_paste_huge_boxes_paste_their_window():
    """Coordinates of 1e30 (clamped to 2^40) and a 5000 x 4000 box (past
    RESIZE_LIMIT): the kernel and the reference paste the window in the
    image without building the resize (for the first box torchvision
    raises or would allocate 2^41 pixels) and agree; the second box matches
    torchvision, which can still build it."""
    boxes = torch.tensor([[-1e30, 3.0, 20.0, 1e30], [-2000.0, -1500.0, 3000.0, 2500.0]],
                         dtype=torch.float64)
    masks = rand_masks(2, dtype=torch.float32)
    got = paste_masks(masks.to(DEVICE), boxes.to(DEVICE), (H, W)).cpu()
    with _dispatch.reference_only():
        got_ref = paste_masks(masks, boxes, (H, W))
    assert got[0].count_nonzero() > 0
    assert_close(got, got_ref, F32)
    assert_close(got_ref[1:], paste_masks_in_image(masks[1:], boxes[1:], (H, W)), F32)


@pytest.mark.parametrize("path", ["kernel", "native", "reference"])
def test_paste_resize_past_2_pow_24_rounds_dst_as_aten(path):
    """float32 masks resized to 3.2e7 columns or 2.1e7 rows: ATen rounds dst + 0.5 to
    float32 before the source index (inexact from 2^24 on), which moves the
    pasted values by ~1e-6; every path pastes torchvision's values."""
    masks = rand_masks(2, 28, 28, torch.float32)
    boxes = torch.tensor([[-3.0e7, 1.0, 11.0, 1.0], [1.0, -2.0e7, 1.0, 2.0]])
    want = paste_masks_in_image(masks, boxes, (3, 12))
    with on_path(path):
        got = paste_masks(masks.to(device_for(path)), boxes.to(device_for(path)), (3, 12))
    assert want.count_nonzero() == 15
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=2e-7)


# --------------------------------------------------------------------------
# mask_targets
# --------------------------------------------------------------------------
@pytest.mark.parametrize("mask_dtype", [torch.uint8, torch.bool, torch.float32], ids=str)
@pytest.mark.parametrize("roi_dtype", [torch.float32, torch.float64], ids=str)
def test_mask_targets_match_torchvision(mask_dtype, roi_dtype):
    masks = gt_masks(3, mask_dtype)
    rois = mask_rois(roi_dtype)
    idx = torch.tensor([0, 2, 1, 2, 0, 1, 2, 1])
    want = project_masks_on_boxes(masks, rois, idx, 6)
    with record_launches(kernels, "_mask_targets_kernel") as rec:
        got = mask_targets(masks.to(DEVICE), rois.to(DEVICE), idx.to(DEVICE), 6)
    assert rec.names_launched() == ["_mask_targets_kernel"]
    assert rec.launches[0][1][0] == rois.shape[0]
    assert got.dtype == roi_dtype and got.shape == (8, 6, 6)
    assert_close(got, want, RTOL[roi_dtype])


@pytest.mark.parametrize("which", ["gt_masks", "rois", "matched_idxs"])
@pytest.mark.parametrize("kind", VIEW_KINDS)
def test_mask_targets_non_contiguous(which, kind):
    args = {"gt_masks": gt_masks(2).to(DEVICE), "rois": mask_rois(torch.float64).to(DEVICE),
            "matched_idxs": torch.tensor([0, 1, 1, 0, 1, 0, 0, 1], device=DEVICE)}
    want = ref.mask_targets(*(a.cpu() for a in args.values()), 5, torch.float64)
    view = non_contiguous(args[which], kind)
    args[which] = view
    assert not view.is_contiguous()
    got = mask_targets(*args.values(), 5)
    assert_close(got, want, F64)


def test_mask_targets_kernel_blocks_and_bool_view():
    """Bin blocks smaller than M*M (several programs per RoI, a tail) and a
    bool mask read through its uint8 view."""
    masks = gt_masks(2, torch.bool)
    rois = mask_rois(torch.float64)
    idx = torch.tensor([1, 0, 1, 0, 1, 1, 0, 0])
    got = kernels.mask_targets(masks.to(DEVICE), rois.to(DEVICE), idx.to(DEVICE), 5,
                               torch.float64, block_p=8)
    assert_close(got, ref.mask_targets(masks, rois, idx, 5, torch.float64), F64)


def _list_form(masks, rois, idx):
    """mask_targets of per-image lists run on DEVICE (4x4 targets): the
    result, each launch's grid size, and torchvision's per-image result."""
    with record_launches(kernels, "_mask_targets_kernel") as rec:
        got = mask_targets([m.to(DEVICE) for m in masks], [r.to(DEVICE) for r in rois],
                           [i.to(DEVICE) for i in idx], 4)
    want = torch.cat([project_masks_on_boxes(m, r, i, 4) for m, r, i in zip(masks, rois, idx)])
    return got, [grid[0] for _, grid in rec.launches], want


@pytest.mark.parametrize("crop", [(30, 50), (30, W), (H, 50)], ids=["hw", "h", "w"])
def test_mask_targets_list_form(crop):
    """GT masks of different sizes (in either axis or both): one launch per
    image."""
    masks = [gt_masks(2), gt_masks(3)[:, :crop[0], :crop[1]]]
    rois = [mask_rois()[:3], mask_rois()[3:]]
    idx = [torch.tensor([0, 1, 1]), torch.tensor([2, 0, 1, 2, 0])]
    got, launches, want = _list_form(masks, rois, idx)
    assert launches == [3, 5]
    assert_close(got, want, F32)


@pytest.mark.parametrize("validate_args", [True, False])
def test_mask_targets_list_form_is_one_launch(validate_args):
    """GT masks of one size (uint8 and bool together): one launch for every
    image's RoIs, equal to the images' own results; unchecked indices out of
    an image's range give zeros, never another image's masks."""
    masks = [gt_masks(2), gt_masks(3, torch.bool), gt_masks(1), gt_masks(0)]
    small = mask_rois()[[0, 1, 2, 3, 5, 6]]  # no huge RoI: the interpreter is slow
    rois = [small[:3], small[1:], small[1:3], small[:0]]
    idx = [torch.tensor([0, 1, 1]), torch.tensor([2, 0, 1, 2, 0]), torch.tensor([0, 0]),
           torch.zeros(0, dtype=torch.int32)]
    if not validate_args:
        idx[0][1] = 2   # image 1's first mask once shifted
        idx[2][0] = -1  # image 1's last
    args = [[t.to(DEVICE) for t in ts] for ts in (masks, rois, idx)]
    with record_launches(kernels, "_mask_targets_kernel") as rec:
        got = mask_targets(*args, 4, validate_args=validate_args)
    assert rec.names_launched() == ["_mask_targets_kernel"]
    assert rec.launches[0][1][0] == 10
    want = torch.cat([mask_targets(*one, 4, validate_args=validate_args)
                      for one in zip(*args)])
    assert torch.equal(got, want)
    if validate_args:
        tv = torch.cat([project_masks_on_boxes(m, r, i, 4)
                        for m, r, i in zip(masks[:3], rois[:3], idx[:3])])
        assert_close(got, tv, F32)
    else:
        assert not got[[1, 8]].any() and got[[0, 2, 9]].any(dim=(1, 2)).all()


def test_mask_targets_list_form_mixed_roi_dtypes_run_per_image():
    masks = [gt_masks(2), gt_masks(2)]
    rois = [mask_rois(torch.float32)[:3], mask_rois(torch.float64)[[3, 5, 6]]]
    idx = [torch.tensor([0, 1, 1]), torch.tensor([1, 0, 1])]
    got, launches, want = _list_form(masks, rois, idx)
    assert len(launches) == 2 and got.dtype == torch.float64
    assert_close(got, want, F32)


def test_mask_targets_list_form_mixed_mask_dtypes_run_per_image():
    """uint8 and float GT masks of one size are not concatenated (that would
    be a float copy of the uint8 masks): one launch per image, torchvision's
    numbers."""
    masks = [gt_masks(2), gt_masks(2, torch.float32)]
    rois = [mask_rois()[:3], mask_rois()[[3, 5, 6]]]
    idx = [torch.tensor([0, 1, 1]), torch.tensor([1, 0, 1])]
    got, launches, want = _list_form(masks, rois, idx)
    assert launches == [3, 3]
    assert_close(got, want, F32)


def test_mask_targets_non_finite_rois_and_empty():
    rois = mask_rois(torch.float64)[:3].clone()
    rois[0, 1] = float("nan")
    masks, idx = gt_masks(2), torch.tensor([0, 1, 0])
    got = mask_targets(masks.to(DEVICE), rois.to(DEVICE), idx.to(DEVICE), 4).cpu()
    assert torch.equal(got[0], torch.zeros(4, 4, dtype=torch.float64))
    assert_close(got[1:], project_masks_on_boxes(masks, rois[1:], idx[1:], 4), F64)
    with _dispatch.native_only():
        assert_close(mask_targets(masks, rois, idx, 4), got, F64)
    empty = mask_targets(masks.to(DEVICE), torch.zeros(0, 4, device=DEVICE),
                                    torch.zeros(0, dtype=torch.int64, device=DEVICE), 28)
    assert empty.shape == (0, 28, 28) and empty.dtype == torch.float32
    zero_g = mask_targets(torch.zeros(0, H, W, dtype=torch.uint8, device=DEVICE),
                                     torch.zeros(0, 4, device=DEVICE),
                                     torch.zeros(0, dtype=torch.int64, device=DEVICE), 3)
    assert zero_g.shape == (0, 3, 3)


@pytest.mark.timeout(300)  # without the rule the kernel would loop 2^31 times: fail sooner
def test_mask_targets_per_bin_count_past_int32_gives_zeros():
    """A 2^16 x 2^15 sampling grid per bin (each axis fits an int32, the
    count does not) gives zeros on the kernel, native and reference paths,
    as in roi_align; a normal RoI beside it matches torchvision."""
    rois = torch.cat([torch.tensor([[0.0, 0.0, 2.0**16, 2.0**17]], dtype=torch.float64),
                      mask_rois(torch.float64)[:1]])
    masks, idx = gt_masks(2), torch.tensor([0, 1])
    got = mask_targets(masks.to(DEVICE), rois.to(DEVICE), idx.to(DEVICE), 2).cpu()
    with _dispatch.native_only():
        native = mask_targets(masks, rois, idx, 2)
    for result in (got, native, ref.mask_targets(masks, rois, idx, 2, torch.float64)):
        assert torch.equal(result[0], torch.zeros(2, 2, dtype=torch.float64))
        assert_close(result[1:], project_masks_on_boxes(masks, rois[1:], idx[1:], 2), F64)


@pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan")], ids=str)
def test_mask_targets_each_non_finite_coordinate_gives_zeros(value):
    """A RoI with any one coordinate +-inf or NaN gives zeros, whichever
    coordinate it is (with x2 = -inf, roi_align's width max(x2 - x1, 1) is 1:
    unchecked, it would pool a 1-pixel-wide RoI), while a finite RoI beside
    it matches torchvision."""
    rois = mask_rois(torch.float64)[:1].repeat(5, 1)
    for i in range(4):
        rois[i, i] = value
    masks, idx = gt_masks(2), torch.tensor([0, 1, 0, 1, 0])
    got = mask_targets(masks.to(DEVICE), rois.to(DEVICE), idx.to(DEVICE), 5).cpu()
    assert torch.equal(got[:4], torch.zeros(4, 5, 5, dtype=torch.float64))
    assert_close(got[4:], project_masks_on_boxes(masks, rois[4:], idx[4:], 5), F64)


def test_mask_targets_write_nothing_past_their_output(monkeypatch):
    """5 x 5 bins in 32-lane blocks (7 lanes masked off): only the (K, M, M)
    output is stored; a lane at bin M * M would store the next RoI's first
    bin and, for the last RoI, one element past the output: guard elements
    after it keep their value."""
    rois = mask_rois(torch.float64)
    masks = gt_masks(3)
    idx = torch.tensor([0, 2, 1, 2, 0, 1, 2, 1])
    guards = guarded_outputs(monkeypatch, kernels)
    got = mask_targets(masks.to(DEVICE), rois.to(DEVICE), idx.to(DEVICE), 5)
    assert_close(got, project_masks_on_boxes(masks, rois, idx, 5), F64)
    assert_guards_intact(guards)


@pytest.mark.parametrize("path", ["native", "reference"])
def test_mask_targets_cpu_paths(path):
    masks, rois = gt_masks(3), mask_rois()
    idx = torch.tensor([0, 2, 1, 2, 0, 1, 2, 1])
    with _dispatch.forced_path(_dispatch.NATIVE if path == "native" else _dispatch.REFERENCE):
        got = mask_targets(masks, rois, idx, 5)
    want = project_masks_on_boxes(masks, rois, idx, 5)
    assert_close(got, want, F32)
    if path == "native":   # torchvision's own roi_align: its numbers bit for bit
        assert torch.equal(got, want)


@pytest.mark.parametrize("path", ["kernel", "native", "reference"])
def test_mask_targets_follow_inputs_changed_in_place(path):
    """A second call on the same tensors, changed in place (a training
    loop's reused buffers), gives torchvision's answer for the new values
    (the native path once cached its result by tensor identity)."""
    device = device_for(path)
    masks, rois = gt_masks(3).to(device), mask_rois().to(device)
    idx = torch.tensor([0, 2, 1, 2, 0, 1, 2, 1], device=device)
    with on_path(path):
        first = mask_targets(masks, rois, idx, 5)
        masks.copy_(1 - masks)
        rois[:, 2:] += 3.0
        idx.copy_(idx.flip(0))
        second = mask_targets(masks, rois, idx, 5)
    want = project_masks_on_boxes(masks.cpu(), rois.cpu(), idx.cpu(), 5)
    assert not torch.equal(first.cpu(), want)
    assert_close(second, want, F32)


@pytest.mark.parametrize("path", ["kernel", "native", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_mask_targets_sample_count_past_int32_gives_zeros(path, dtype):
    """A finite RoI 1e30 wide has an adaptive sample count past int32, where
    torchvision raises (or is undefined): zeros on every path, as
    segops.ops.roi_align gives (the native path once passed it to
    torchvision)."""
    masks, rois = gt_masks(2), mask_rois(dtype)[:3].clone()
    rois[1, 0] = -1e30
    idx = torch.tensor([0, 1, 1])
    with on_path(path):
        got = mask_targets(masks.to(device_for(path)), rois.to(device_for(path)),
                           idx.to(device_for(path)), 5).cpu()
    assert torch.equal(got[1], torch.zeros(5, 5, dtype=dtype))
    keep = torch.tensor([0, 2])
    assert_close(got[keep], project_masks_on_boxes(masks, rois[keep], idx[keep], 5), RTOL[dtype])


# --------------------------------------------------------------------------
# op contract: opcheck, errors
# --------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["kernel", "native"])
def test_opcheck(path):
    device = DEVICE if path == "kernel" else "cpu"
    if path == "native" and DEVICE.type == "cuda":
        pytest.skip("the native path runs on CPU tensors")
    boxes = paste_boxes()[:4].to(device)
    masks = rand_masks(4, 5, 5).to(device)
    with _dispatch.native_only() if path == "native" else _nullcontext():
        torch.library.opcheck(torch.ops.segops.paste_masks.default,
                              (masks, boxes, 12, 15, 1, None))
        torch.library.opcheck(torch.ops.segops.paste_masks.default,
                              (masks.float(), boxes.float(), 12, 15, 1, 0.5))
        torch.library.opcheck(torch.ops.segops.mask_targets.default,
                              (gt_masks(2).to(device), mask_rois()[:3].to(device),
                               torch.tensor([0, 1, 1], device=device), 4))


def test_compile_fullgraph():
    """paste_masks (float and thresholded) and mask_targets (one image and
    the one-launch list form) in one graph, no break."""
    backend = "inductor" if DEVICE.type == "cuda" else "aot_eager"  # aot_eager: eager ops
    boxes = paste_boxes(torch.float32)[:4].to(DEVICE)
    masks = rand_masks(4, 5, 5, torch.float32).to(DEVICE)
    gts = [gt_masks(2).to(DEVICE), gt_masks(3).to(DEVICE)]
    rois = [mask_rois()[:3].to(DEVICE), mask_rois()[[3, 5]].to(DEVICE)]
    idx = [torch.tensor([0, 1, 1], device=DEVICE), torch.tensor([2, 0], device=DEVICE)]

    def fn(masks, boxes, gts, rois, idx):
        pasted = paste_masks(masks, boxes, (12, 15))
        binary = paste_masks(masks, boxes, (12, 15), threshold=0.5)
        one = mask_targets(gts[0], rois[0], idx[0], 4)
        every = mask_targets(gts, rois, idx, 4)
        return pasted * 2, binary, one + 1, every
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    for got, want in zip(compiled(masks, boxes, gts, rois, idx), fn(masks, boxes, gts, rois, idx)):
        assert torch.equal(got, want)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _bad_paste_cases():
    m, b = torch.rand(2, 1, 5, 5), torch.rand(2, 4)
    return [
        ("masks must be a torch.Tensor", TypeError, lambda: paste_masks([1], b, (4, 4))),
        ("masks must have 4 dimensions", ValueError,
         lambda: paste_masks(m[:, 0], b, (4, 4))),
        ("masks must have dtype", TypeError,
         lambda: paste_masks(m.to(torch.uint8), b, (4, 4))),
        (r"masks must have shape \(N, 1", ValueError,
         lambda: paste_masks(m.expand(2, 3, 5, 5), b, (4, 4))),
        ("boxes has 3 rows for 2 masks", ValueError,
         lambda: paste_masks(m, torch.rand(3, 4), (4, 4))),
        (r"boxes must have shape \(K, 4\)", ValueError,
         lambda: paste_masks(m, torch.rand(2, 5), (4, 4))),
        ("boxes must have dtype", TypeError,
         lambda: paste_masks(m, b.long(), (4, 4))),
        ("image_shape must be a pair", TypeError, lambda: paste_masks(m, b, 4)),
        (r"image_shape\[0\] \(height\) must be >= 0", ValueError,
         lambda: paste_masks(m, b, (-1, 4))),
        ("padding must be >= 0", ValueError, lambda: paste_masks(m, b, (4, 4), -1)),
        ("threshold must be finite", ValueError,
         lambda: paste_masks(m, b, (4, 4), threshold=float("nan"))),
        ("threshold must be a number", TypeError,
         lambda: paste_masks(m, b, (4, 4), threshold="0.5")),
    ]


def _bad_target_cases():
    g, r, i = gt_masks(2), mask_rois()[:2], torch.tensor([0, 1])
    mt = mask_targets
    return [
        ("gt_masks must have 3 dimensions", ValueError, lambda: mt(g[None], r, i, 4)),
        ("gt_masks must have dtype", TypeError, lambda: mt(g.to(torch.int32), r, i, 4)),
        (r"rois must have shape \(K, 4\)", ValueError, lambda: mt(g, r[:, :3], i, 4)),
        ("matched_idxs must have dtype", TypeError, lambda: mt(g, r, i.float(), 4)),
        ("matched_idxs has 1 entries for 2 rois", ValueError, lambda: mt(g, r, i[:1], 4)),
        (r"matched_idxs holds 2: indices must be in \[0, G\)", ValueError,
         lambda: mt(g, r, torch.tensor([0, 2]), 4)),
        ("matched_idxs holds -1", ValueError, lambda: mt(g, r, torch.tensor([-1, 0]), 4)),
        ("M must be >= 1", ValueError, lambda: mt(g, r, i, 0)),
        ("M must be an int", TypeError, lambda: mt(g, r, i, 2.5)),
        ("rois has 1 entries for 2 images", ValueError, lambda: mt([g, g], [r], [i, i], 4)),
        (r"matched_idxs\[1\] holds 5", ValueError,
         lambda: mt([g, g], [r, r], [i, torch.tensor([0, 5])], 4)),
        ("gt_masks must be a Tensor", TypeError, lambda: mt("g", r, i, 4)),
    ]


@pytest.mark.skipif(DEVICE.type == "cuda", reason="a failed device assert ends the CUDA "
                    "context; on CUDA the check is the same device assert as here")
@pytest.mark.parametrize("path", ["kernel", "native", "reference"])
def test_indices_are_checked_inside_torch_compile(path):
    """validate_args inside torch.compile(fullgraph=True): a device assert
    (a host read would break the graph); it was skipped, and an index 5 of
    3 GT masks gave zeros silently."""
    masks, rois = gt_masks(3), mask_rois()
    idx = torch.tensor([0, 2, 1, 5, 0, 1, 2, 1])

    def call(masks, rois, idx):
        return mask_targets(masks, rois, idx, 5)
    assert_checked_eager_and_compiled(call, (masks, rois, idx), path, "matched_idxs",
                                      "matched_idxs holds an index")


@pytest.mark.parametrize("match,error,make", _bad_paste_cases() + _bad_target_cases(),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_errors(match, error, make):
    with pytest.raises(error, match=match):
        make()


def test_unchecked_bad_index_gives_zeros():
    masks, rois = gt_masks(2), mask_rois()[:2]
    idx = torch.tensor([0, 7])
    got = mask_targets(masks.to(DEVICE), rois.to(DEVICE), idx.to(DEVICE), 3,
                                  validate_args=False).cpu()
    assert torch.equal(got[1], torch.zeros(3, 3))
    assert_close(got[:1], project_masks_on_boxes(masks, rois[:1], idx[:1], 3), F32)


# --------------------------------------------------------------------------
# the benchmark's code at tiny sizes
# --------------------------------------------------------------------------
def test_masks_benchmark_code_runs_at_tiny_sizes(monkeypatch):
    from segops.benchmarks import masks as bench

    def call_once(fn, **kwargs):
        fn()
        return 1.0

    monkeypatch.setattr(bench, "DEVICE", DEVICE.type)
    monkeypatch.setattr(bench, "IMAGE", (24, 31))
    monkeypatch.setattr(bench, "PASTE_MASKS", 3)
    monkeypatch.setattr(bench, "TARGET_ROIS", 4)
    monkeypatch.setattr(bench, "GT_MASKS", 2)
    monkeypatch.setattr(bench, "M", 5)
    monkeypatch.setattr(bench, "time_ms", call_once)
    monkeypatch.setattr(bench, "peak_extra_memory", lambda fn: 0)
    records = bench.run(quick=False)
    assert {r.op for r in records} == {"paste_masks", "mask_targets"}
    assert {r.provider for r in records} == {"segops", "torchvision"}
    assert all(r.ms == 1.0 for r in records)
