"""Box ops: nms / batched_nms / batched_nms_per_image / box_iou / decode /
clip against torchvision (fp64 and fp32), kernels against the reference,
every path, edge boxes, non-contiguous views, errors, opcheck, launches."""
import math

import pytest
import torch
from helpers import (DEVICE, ON_GPU, RTOL, assert_close, assert_guards_intact, guarded_outputs,
                     non_contiguous, record_launches, torchvision_nms_per_class)

import segops.ops.boxes as boxes_ops
from segops import _dispatch
from segops.kernels import boxes as kernels
from segops.reference import boxes as ref

torchvision = pytest.importorskip("torchvision")
tv_ops = torchvision.ops
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered")

PATHS = ["kernel", "native", "reference"]


def on_path(path):
    if path == "kernel":
        import contextlib
        return contextlib.nullcontext()
    return _dispatch.native_only() if path == "native" else _dispatch.reference_only()


def device_for(path):
    return DEVICE if path == "kernel" else torch.device("cpu")


def random_boxes(n, scale=100.0, dtype=torch.float64, generator=None):
    xy = torch.rand(n, 2, dtype=torch.float64, generator=generator) * scale
    wh = torch.rand(n, 2, dtype=torch.float64, generator=generator) * scale / 3 + 0.5
    return torch.cat([xy, xy + wh], 1).to(dtype)


def planted(threshold, eps, dtype):
    """Four boxes: a pair at IoU threshold + eps (suppressed), one at
    threshold - eps (kept), and an exact-threshold pair (kept: strict >)."""
    # B inside A=(0,0,10,10): IoU = height / 10
    rows = [[200, 200, 210, 210], [200, 200, 210, 200 + 10 * (threshold + eps)],
            [300, 300, 310, 310], [300, 300, 310, 300 + 10 * (threshold - eps)]]
    exact = {0.2: 2, 0.5: 5, 0.8: 8}[threshold]  # exactly representable IoU
    rows += [[400, 400, 410, 410], [400, 400, 410, 400 + exact]]
    return torch.tensor(rows, dtype=torch.float64).to(dtype), torch.tensor(
        [5.0, 4.9, 5.0, 4.9, 5.0, 4.9], dtype=dtype)


def tv_batched(boxes, scores, idxs, threshold):
    """torchvision's nms per class (its exact 'vanilla' batched_nms) on the
    CPU, any boxes and scores (cast to torchvision's one float dtype)."""
    boxes, scores = boxes.cpu(), scores.cpu()
    if boxes.dtype not in (torch.float32, torch.float64):
        boxes = boxes.float()
    return torchvision_nms_per_class(boxes, scores.to(boxes.dtype),
                                     None if idxs is None else idxs.cpu(), threshold)


def nms_case(n, dtype, threshold, classes=1, ties=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = random_boxes(n, dtype=dtype, generator=g)
    s = torch.rand(n, dtype=torch.float64, generator=g)
    if ties:
        s = torch.randint(0, 4, (n,), generator=g).double() / 4
    pb, ps = planted(threshold, 1e-3, dtype)
    b = torch.cat([b, pb])
    s = torch.cat([s.to(dtype), ps])
    idxs = torch.randint(0, classes, (len(b),), generator=g)
    idxs[-6:] = 0
    return b, s.to(dtype), idxs


# --------------------------------------------------------------------------
# NMS against torchvision
# --------------------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.8])
@pytest.mark.parametrize("seed", [1, 2])
def test_nms_matches_torchvision(path, dtype, threshold, seed):
    b, s, _ = nms_case(90, dtype, threshold, ties=seed == 2, seed=seed)
    want = tv_ops.nms(b, s, threshold)
    dev = device_for(path)
    with on_path(path):
        got = boxes_ops.nms(b.to(dev), s.to(dev), threshold)
    assert got.dtype == torch.int64 and got.device.type == dev.type
    assert torch.equal(got.cpu(), want)
    n = len(b)
    kept = set(got.tolist())
    assert n - 6 in kept and n - 5 not in kept       # IoU just above: suppressed
    assert {n - 4, n - 3} <= kept                    # just below: kept
    if dtype == torch.float64 or threshold == 0.5:   # IoU == threshold exactly
        assert {n - 2, n - 1} <= kept                # kept: strict >


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", ["negative threshold", "inf coordinate", "max coordinate -1",
                                  "ids 2^24 apart by 1", "ids near 2^62"])
def test_batched_nms_keeps_to_categories_where_torchvisions_offsets_fail(path, case):
    """torchvision's batched_nms shifts each category's boxes by id x (max
    coordinate + 1) below 1000 boxes; these inputs break that shift (see the
    module docstring). segops gives torchvision's per-class result."""
    boxes = torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60]])
    idxs = torch.tensor([0, 1])
    threshold = 0.5
    if case == "negative threshold":
        threshold = -0.1
    elif case == "inf coordinate":
        boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [0, 0, float("inf"), 5]])
        idxs = torch.tensor([0, 0, 1])
    elif case == "max coordinate -1":
        boxes = torch.tensor([[-11.0, -11, -1, -1]] * 2)
    else:
        boxes = torch.tensor([[0.0, 0, 10, 10]] * 2)
        idxs = (torch.tensor([2**24, 2**24 + 1]) if case == "ids 2^24 apart by 1"
                else torch.tensor([2**62, 2**62]))
    scores = torch.linspace(0.9, 0.8, len(boxes))
    want = tv_batched(boxes, scores, idxs, threshold)
    assert not torch.equal(torchvision.ops.batched_nms(boxes, scores, idxs, threshold), want)
    device = device_for(path)
    with on_path(path):
        got = boxes_ops.batched_nms(boxes.to(device), scores.to(device), idxs.to(device),
                                    threshold)
    assert got.cpu().tolist() == want.tolist()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.8])
def test_batched_nms_many_classes(path, dtype, threshold):
    b, s, idxs = nms_case(150, dtype, threshold, classes=7, ties=threshold == 0.5,
                          seed=int(threshold * 10))
    want = tv_batched(b, s, idxs, threshold)
    dev = device_for(path)
    with on_path(path):
        got = boxes_ops.batched_nms(b.to(dev), s.to(dev), idxs.to(dev), threshold)
    assert torch.equal(got.cpu(), want)
    if dtype == torch.float64 and threshold != 0.5:  # no ties: torchvision's own batched_nms
        assert torch.equal(got.cpu(), tv_ops.batched_nms(b, s, idxs, threshold))


def test_nms_long_segment_several_blocks_and_word_chunks(monkeypatch):
    """One segment over five 64-row blocks, later words OR-ed two at a time
    (several chunks), after tiny segments (so it starts mid-word at row 7):
    kernel == torchvision."""
    monkeypatch.setattr(kernels, "SCAN_BLOCK_W", 2)
    g = torch.Generator().manual_seed(5)
    n = 300
    b = random_boxes(n, scale=60.0, generator=g)
    s = torch.rand(n, dtype=torch.float64, generator=g)
    idxs = torch.full((n,), 9, dtype=torch.int64)
    idxs[:7] = torch.tensor([3, 3, 4, 5, 5, 5, 6])
    want = tv_batched(b, s, idxs, 0.4)
    got = boxes_ops.batched_nms(b.to(DEVICE), s.to(DEVICE), idxs.to(DEVICE), 0.4)
    assert torch.equal(got.cpu(), want)
    assert torch.equal(got.cpu(), ref.batched_nms(b, s, idxs, 0.4))


def many_segments(sizes, seed):
    """Boxes in segments (classes) of the given sizes, shuffled, and scores
    with ties."""
    g = torch.Generator().manual_seed(seed)
    idxs = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    idxs = idxs[torch.randperm(len(idxs), generator=g)]
    b = random_boxes(len(idxs), scale=40.0, generator=g)
    s = torch.randint(0, 8, (len(idxs),), generator=g).double() / 8
    return b, s, idxs


def record_mask_words(monkeypatch):
    """The sizes of the int64 buffers the NMS launcher allocates (the bitmask)."""
    sizes = []
    real_empty = kernels.empty

    def recording(*shape, **kwargs):
        out = real_empty(*shape, **kwargs)
        if kwargs.get("dtype") == torch.int64:
            sizes.append(out.numel())
        return out
    monkeypatch.setattr(kernels, "empty", recording)
    return sizes


def test_nms_bitmask_is_sized_per_segment(monkeypatch):
    """Many small segments: each box's row holds its own segment's words (one
    here), not ceil(N / 64); one launch of each kernel, results exact."""
    monkeypatch.setattr(kernels, "GUESS_SEGMENT", 64)
    b, s, idxs = many_segments([7, 1, 30, 64, 12, 50, 3, 40, 64, 20, 9, 33], seed=11)
    n = len(b)
    sizes = record_mask_words(monkeypatch)
    with record_launches(kernels, "_nms_mask_kernel", "_nms_scan_kernel") as rec:
        got = boxes_ops.batched_nms(b.to(DEVICE), s.to(DEVICE), idxs.to(DEVICE), 0.3)
    assert torch.equal(got.cpu(), tv_batched(b, s, idxs, 0.3))
    assert rec.names_launched() == ["_nms_mask_kernel", "_nms_scan_kernel"]
    assert sizes == [n]  # one word per box, where N * ceil(N / 64) held 6 per box


def test_nms_segment_past_the_guess_runs_again_sized_exactly(monkeypatch):
    """A segment longer than the sync-free guess: the first launch skips it,
    the second is sized exactly (sum n_s * ceil(n_s / 64) words), and the
    result equals torchvision's, for batched_nms and per image."""
    monkeypatch.setattr(kernels, "GUESS_SEGMENT", 64)
    sizes_ = [150, 5, 70, 1, 20]
    b, s, idxs = many_segments(sizes_, seed=12)
    n = len(b)
    words = sum(k * math.ceil(k / 64) for k in sizes_)
    sizes = record_mask_words(monkeypatch)
    with record_launches(kernels, "_nms_mask_kernel", "_nms_scan_kernel") as rec:
        got = boxes_ops.batched_nms(b.to(DEVICE), s.to(DEVICE), idxs.to(DEVICE), 0.4)
    assert torch.equal(got.cpu(), tv_batched(b, s, idxs, 0.4))
    assert rec.names_launched() == ["_nms_mask_kernel", "_nms_scan_kernel"] * 2
    assert sizes == [n, words]
    image_ids = (idxs % 2).to(DEVICE)
    per = boxes_ops.batched_nms_per_image(b.to(DEVICE), s.to(DEVICE), idxs.to(DEVICE),
                                          image_ids, 0.4, 9, num_images=2)
    for i, kept in enumerate(per):
        rows = torch.nonzero(image_ids.cpu() == i).flatten()
        assert torch.equal(kept.cpu(), rows[tv_batched(b[rows], s[rows], idxs[rows], 0.4)][:9])


def test_nms_whole_word_segments_beside_longer_ones():
    """Segments of exactly 64 and 128 boxes (whole words: 1 and 2 per row)
    in a launch whose longest segment needs 3 words per row, so the grid has
    word columns past theirs: no program writes a word past a row's own
    (it would land on the next row's first word and clear its bits)."""
    b, s, idxs = many_segments([64, 130, 128], seed=13)
    got = boxes_ops.batched_nms(b.to(DEVICE), s.to(DEVICE), idxs.to(DEVICE), 0.3)
    assert torch.equal(got.cpu(), tv_batched(b, s, idxs, 0.3))


def test_nms_bitmask_layout_and_size_at_the_box_head_scale():
    """Row offsets and the needed size on the device (no kernel runs): 90 000
    boxes in 90 classes of 1 000 need 16 words per box, and the launch sized
    without a sync allocates at most 32 per box (23 MB), not ceil(N / 64) =
    1 407 (1 GB)."""
    lengths = torch.tensor([1000] * 90)
    seg_start = torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    seg_end = torch.repeat_interleave(torch.cumsum(lengths, 0), lengths)
    row_offset, needed = kernels.bitmask_layout(seg_start, seg_end)
    assert needed.tolist() == [1000, 90_000 * 16]
    assert row_offset[:3].tolist() == [0, 16, 32] and row_offset[1000].item() == 16_000
    assert row_offset[-1].item() == 90_000 * 16 - 16
    longest, words = kernels.bitmask_size(90_000, segmented=True)
    assert longest == kernels.GUESS_SEGMENT and words == 90_000 * 32
    assert kernels.bitmask_size(300, segmented=False) == (300, 300 * 5)  # one segment: exact
    lengths = torch.tensor([3, 64, 65, 1, 200])  # the words of odd lengths
    seg_start = torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    seg_end = torch.repeat_interleave(torch.cumsum(lengths, 0), lengths)
    row_offset, needed = kernels.bitmask_layout(seg_start, seg_end)
    assert needed.tolist() == [200, 3 + 64 + 65 * 2 + 1 + 200 * 4]
    rows = [0, 3, 67, 68, 131, 132, 133, 134]
    assert row_offset[rows].tolist() == [0, 3, 67, 69, 195, 197, 198, 202]


def test_score_ties_by_index():
    b = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60.]])
    s = torch.tensor([0.5, 0.5, 0.5, 0.5])
    got = boxes_ops.nms(b.to(DEVICE), s.to(DEVICE), 0.5).cpu()
    assert got.tolist() == [0, 3]
    assert torch.equal(got, tv_ops.nms(b, s, 0.5))
    s2 = torch.tensor([0.5, 0.9, 0.5, 0.5])
    assert boxes_ops.nms(b.to(DEVICE), s2.to(DEVICE), 0.5).cpu().tolist() == [1, 3]
    idxs = torch.tensor([1, 0, 1, 0])
    got = boxes_ops.batched_nms(b.to(DEVICE), s.to(DEVICE), idxs.to(DEVICE), 0.5).cpu()
    assert got.tolist() == [0, 1, 3]  # (-score, index) across classes


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_degenerate_reversed_and_nan_boxes(path, dtype):
    nan = float("nan")
    b = torch.tensor([
        [0, 0, 10, 10], [0, 0, 10, 10], [5, 5, 5, 9], [5, 5, 5, 9],   # duplicate, zero-width
        [20, 20, 10, 10], [20, 20, 10, 10], [19, 19, 11, 11],         # reversed
        [nan, 0, 10, 10], [0, 0, 10, nan], [0, 0, 10, 10],            # NaN and a copy after
        [30, 30, 30, 30], [30, 30, 30, 30],                           # points
        [40, 40, 50, 50], [50, 40, 40, 50],                           # x reversed only
    ], dtype=dtype)
    s = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.4, 0.95, 0.35, 0.3, 0.2, 0.1, 0.05,
                      0.04], dtype=dtype)
    s[8] = nan  # a NaN score sorts first
    want = tv_ops.nms(b, s, 0.5)
    dev = device_for(path)
    with on_path(path):
        got = boxes_ops.nms(b.to(dev), s.to(dev), 0.5).cpu()
    assert torch.equal(got, want)
    assert {7, 8} <= set(got.tolist())  # NaN boxes are kept, and suppress nothing
    idxs = torch.tensor([0, 0, 1, 1, 0, 0, 0, 0, 1, 0, 2, 2, 2, 2])
    with on_path(path):
        got = boxes_ops.batched_nms(b.to(dev), s.to(dev), idxs.to(dev), 0.5).cpu()
    assert torch.equal(got, tv_batched(b, s, idxs, 0.5))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n", [0, 1])
def test_zero_and_one_box(path, n):
    b = random_boxes(n)
    s = torch.rand(n, dtype=torch.float64)
    idxs = torch.zeros(n, dtype=torch.int64)
    dev = device_for(path)
    with on_path(path):
        got = boxes_ops.nms(b.to(dev), s.to(dev), 0.5)
        got_b = boxes_ops.batched_nms(b.to(dev), s.to(dev), idxs.to(dev), 0.5)
        per = boxes_ops.batched_nms_per_image(b.to(dev), s.to(dev), idxs.to(dev),
                                              idxs.to(dev), 0.5, 3, num_images=2)
    for out in (got, got_b):
        assert out.dtype == torch.int64 and out.shape == (n,)
    assert [p.tolist() for p in per] == [list(range(n)), []]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_boxes_iou_in_float32(dtype):
    b, s, idxs = nms_case(60, torch.float64, 0.5, classes=3, seed=3)
    b, s = b.to(dtype), s.to(dtype)
    want = tv_batched(b.float(), s.float(), idxs, 0.5)
    for path in PATHS:
        dev = device_for(path)
        with on_path(path):
            got = boxes_ops.batched_nms(b.to(dev), s.to(dev), idxs.to(dev), 0.5)
        assert torch.equal(got.cpu(), want), path


@pytest.mark.parametrize("value", [0.1, 1 / 3, 1e-7, 1e-46, 5e-324, -0.0, 3.4028235e38,
                                   3.4028235677973366e38, 3.4028236e38, 1e39, -1e300])
def test_scalar_bits_round_like_torch(value):
    """A Python float passed to a float32 kernel: rounded to nearest as
    torch casts it, infinity past float32's range (not an error), every
    digit kept for float64."""
    import struct
    want = struct.unpack("<i", torch.tensor(value, dtype=torch.float32).numpy().tobytes())[0]
    assert kernels.scalar_bits(value, torch.float32) == want
    assert kernels.scalar_bits(value, torch.float64) == \
        struct.unpack("<q", struct.pack("<d", value))[0]


def test_threshold_compared_like_torchvision_double():
    """An fp32 IoU equal to float32(0.7) > 0.7? No (0.699999988 < 0.7); the
    next float32 up is above 0.7 and suppresses: the kernel rounds the
    threshold so that both match torchvision's double comparison."""
    t32 = torch.tensor(0.7, dtype=torch.float32)
    up = torch.nextafter(t32, torch.tensor(1.0)).item()
    assert kernels._threshold_bits(0.7, torch.float32) == \
        kernels.scalar_bits(0.7, torch.float32)  # fp32(0.7) < 0.7: kept as is
    t = 0.1 + 2 ** -30  # fp32 rounds it up: the kernel must round down
    bits = kernels._threshold_bits(t, torch.float32)
    import struct
    assert struct.unpack("<f", struct.pack("<i", bits))[0] < t
    b = torch.tensor([[0, 0, 100, 100], [0, 0, 100, 100 * up]], dtype=torch.float32)
    s = torch.tensor([1.0, 0.5])
    assert torch.equal(boxes_ops.nms(b.to(DEVICE), s.to(DEVICE), 0.7).cpu(),
                       tv_ops.nms(b, s, 0.7))


# --------------------------------------------------------------------------
# batched_nms_per_image
# --------------------------------------------------------------------------
def per_image_case(seed, images=3, classes=4, n=160, scale=100.0):
    g = torch.Generator().manual_seed(seed)
    b = random_boxes(n, scale=scale, generator=g)
    s = torch.randint(0, 6, (n,), generator=g).double() / 6 if seed % 2 else \
        torch.rand(n, dtype=torch.float64, generator=g)
    idxs = torch.randint(0, classes, (n,), generator=g)
    image_ids = torch.randint(0, images, (n,), generator=g)
    image_ids[image_ids == images - 1] = 0  # the last image has no boxes
    return b, s, idxs, image_ids


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cap", [None, 7])
@pytest.mark.parametrize("seed,classes", [(1, 4), (2, 4), (3, 1)])
def test_per_image_matches_torchvision_per_image(path, cap, seed, classes):
    """With one class the images' runs meet in the sorted order: only the
    image key keeps them apart."""
    b, s, idxs, image_ids = per_image_case(seed, classes=classes, scale=100.0 / classes)
    dev = device_for(path)
    with on_path(path):
        got = boxes_ops.batched_nms_per_image(b.to(dev), s.to(dev), idxs.to(dev),
                                              image_ids.to(dev), 0.5, cap, num_images=3)
    assert len(got) == 3
    for i, kept in enumerate(got):
        rows = torch.nonzero(image_ids == i).flatten()
        want = rows[tv_batched(b[rows], s[rows], idxs[rows], 0.5)]
        assert torch.equal(kept.cpu(), want if cap is None else want[:cap]), i


def test_per_image_without_idxs_and_num_images():
    b, s, idxs, image_ids = per_image_case(4, images=2)
    image_ids[-1] = 1
    got = boxes_ops.batched_nms_per_image(b.to(DEVICE), s.to(DEVICE), None,
                                          image_ids.to(DEVICE), 0.3)
    assert len(got) == 2
    for i, kept in enumerate(got):
        rows = torch.nonzero(image_ids == i).flatten()
        assert torch.equal(kept.cpu(), rows[tv_ops.nms(b[rows], s[rows], 0.3)])


def test_one_segmented_launch_covers_all_images_and_classes():
    b, s, idxs, image_ids = per_image_case(6, images=3, classes=5, n=120)
    with record_launches(kernels, "_nms_mask_kernel", "_nms_scan_kernel") as rec:
        got = boxes_ops.batched_nms_per_image(b.to(DEVICE), s.to(DEVICE), idxs.to(DEVICE),
                                              image_ids.to(DEVICE), 0.5, None, num_images=3)
        flat = boxes_ops.batched_nms(b.to(DEVICE), s.to(DEVICE), idxs.to(DEVICE), 0.5)
    assert rec.names_launched() == ["_nms_mask_kernel", "_nms_scan_kernel"] * 2
    assert len(got) == 3 and sum(len(k) for k in got) > 0 and len(flat) > 0


# --------------------------------------------------------------------------
# box_iou, clip, decode
# --------------------------------------------------------------------------
def edge_boxes(dtype):
    nan = float("nan")
    return torch.tensor([[0, 0, 10, 10], [5, 5, 5, 9], [20, 20, 10, 10], [nan, 0, 1, 1],
                         [3, 3, 8, 4]], dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_box_iou_matches_torchvision(path, dtype):
    a = torch.cat([random_boxes(37, dtype=dtype), edge_boxes(dtype)])
    b = torch.cat([random_boxes(41, dtype=dtype), edge_boxes(dtype)])
    want = tv_ops.box_iou(a, b)
    dev = device_for(path)
    with on_path(path):
        got = boxes_ops.box_iou(a.to(dev), b.to(dev))
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = RTOL[torch.float64] if dtype == torch.float64 else 1e-6
    if dtype in (torch.float16, torch.bfloat16):  # torchvision subtracts in half
        want = tv_ops.box_iou(a.float(), b.float())
    assert_close(got, want, tol)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_clip_matches_torchvision(path, dtype):
    x = (torch.randn(5, 3, 8, dtype=torch.float64) * 60 + 20).to(dtype)
    x[0, 0, 0] = float("nan")
    dev = device_for(path)
    with on_path(path):
        got = boxes_ops.clip_boxes_to_image(x.to(dev), (31, 47))
    want = tv_ops.clip_boxes_to_image(x, (31, 47))
    assert got.dtype == dtype and got.shape == x.shape
    assert_close(got, want, 0.0)


@pytest.mark.skipif(not ON_GPU, reason="Triton's interpreter casts float32 to bfloat16 "
                    "toward zero, not to nearest even (258 for 259): the GPU's rounding")
def test_clip_bf16_bound_rounds_to_nearest_even():
    """A bound bfloat16 cannot hold (259: between 258 and 260) is rounded
    as torch rounds it, to nearest even, on the GPU kernels."""
    x = (torch.rand(64, 4, dtype=torch.float64) * 700 - 50).to(torch.bfloat16)
    for size in ((259, 259), (333, 517), (31, 47)):
        want = tv_ops.clip_boxes_to_image(x, size)
        assert torch.equal(boxes_ops.clip_boxes_to_image(x.to(DEVICE), size).cpu(), want)


def box_coder(weights, clip=boxes_ops.DEFAULT_BBOX_XFORM_CLIP):
    from torchvision.models.detection._utils import BoxCoder
    return BoxCoder(weights, clip)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
# (10, 5, 2, 4): every weight differs, so one used for another shows
@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0),
                                     (10.0, 5.0, 2.0, 4.0)])
def test_decode_matches_box_coder(path, dtype, weights):
    n, k = 45, 3
    codes = (torch.randn(n, 4 * k, dtype=torch.float64) * 3).to(dtype)
    codes[0, 2] = 100.0  # past the clip
    ref_boxes = random_boxes(n, dtype=dtype)
    dev = device_for(path)
    with on_path(path):
        got = boxes_ops.decode_boxes(codes.to(dev), ref_boxes.to(dev), weights)
        clipped = boxes_ops.decode_boxes(codes.to(dev), ref_boxes.to(dev), weights,
                                         image_size=(70, 90))
    want = box_coder(weights).decode_single(codes, ref_boxes)
    assert_close(got, want, RTOL[dtype])
    assert_close(clipped, tv_ops.clip_boxes_to_image(want, (70, 90)), RTOL[dtype])


def test_decode_list_of_boxes_like_box_coder_decode():
    boxes = [random_boxes(5, dtype=torch.float32), random_boxes(7, dtype=torch.float32)]
    codes = torch.randn(12, 8)
    got = boxes_ops.decode_boxes(codes.to(DEVICE), [b.to(DEVICE) for b in boxes],
                                 (10.0, 10.0, 5.0, 5.0), 3.0)
    want = box_coder((10.0, 10.0, 5.0, 5.0), 3.0).decode(codes, boxes).reshape(12, 8)
    assert_close(got, want, RTOL[torch.float32])


@pytest.mark.parametrize("path", PATHS)
def test_float64_scores_order_float32_boxes_exactly(path):
    """Scores finer than the boxes' dtype are visited in their own order:
    0.5 + 1e-12 first, and seven equal points keep index order behind the
    top one (the native path once rounded the scores to float32, a tie)."""
    b = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10]]).to(device_for(path))
    s = torch.tensor([0.5, 0.5 + 1e-12], dtype=torch.float64).to(device_for(path))
    with on_path(path):
        assert boxes_ops.nms(b, s, 0.5).tolist() == [1]
        assert boxes_ops.batched_nms(b, s, torch.zeros(2, dtype=torch.long, device=b.device),
                                     0.5).tolist() == [1]
        points = torch.full((7, 4), 3.0, device=b.device)
        scores = torch.tensor([0.5] * 6 + [0.5 + 1e-12], dtype=torch.float64, device=b.device)
        scores[[2, 4]] = float("nan")  # NaN first (torch.sort), tied by index
        assert boxes_ops.nms(points, scores, 0.0).tolist() == [2, 4, 6, 0, 1, 3, 5]
        assert boxes_ops.nms(b[:0], s[:0], 0.5).tolist() == []


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_thresholds_past_float32_range(path, dtype):
    """+-1e300 keeps everything / suppresses everything, as torchvision's
    double comparison does (the kernel path once failed to pack it as a
    float32)."""
    b = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]], dtype=dtype)
    s = torch.tensor([0.9, 0.8, 0.7], dtype=dtype)
    b, s = b.to(device_for(path)), s.to(device_for(path))
    with on_path(path):
        assert boxes_ops.nms(b, s, 1e300).tolist() == [0, 1, 2]
        assert boxes_ops.nms(b, s, -1e300).tolist() == [0]  # an IoU of 0 > -1e300


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32], ids=str)
def test_clip_integer_boxes_keep_dtype_and_every_digit(path, dtype):
    """Integer boxes past 2^24 keep every digit, and a fractional size clips
    to its integer part (torchvision's float32 result cast back), on every
    path (the reference once clamped through float32; the native path
    returned torchvision's float32)."""
    big = 16777217 if dtype == torch.int32 else 1099511627777
    boxes = torch.tensor([[big, 16777217, -3, 4], [-3, 5, 40, 50]], dtype=dtype)
    with on_path(path):
        got = boxes_ops.clip_boxes_to_image(boxes.to(device_for(path)), (2**41, 2**41))
        assert got.dtype == dtype and got.cpu().tolist() == [[big, 16777217, 0, 4], [0, 5, 40, 50]]
        got = boxes_ops.clip_boxes_to_image(boxes.to(device_for(path)), (31.5, 20.5))
        assert got.dtype == dtype and got.cpu().tolist() == [[20, 31, 0, 4], [0, 5, 20, 31]]
    want = tv_ops.clip_boxes_to_image(boxes[1:], (31.5, 20.5))
    assert want.dtype == torch.float32 and want.to(dtype).tolist() == [[0, 5, 20, 31]]
    # float sizes bound as torchvision's float32 clamp does, cast back
    boxes = torch.tensor([[16777218, 5, -3, 4]], dtype=dtype)
    for v in (2.9999999999999996, -0.99999999999, 16777217.5, -3.5):
        with on_path(path):
            got = boxes_ops.clip_boxes_to_image(boxes.to(device_for(path)), (v, v)).cpu()
        assert torch.equal(got, tv_ops.clip_boxes_to_image(boxes, (v, v)).to(dtype)), v


@pytest.mark.parametrize("path", PATHS)
def test_bounds_past_the_dtype_range_do_not_clamp(path):
    """A clip size or decode bound past the dtype's range (1e300 for
    float32, 7e4 for fp16) clamps nothing, on every path (the reference
    once raised torch's overflow error)."""
    b = torch.tensor([[1.0, 2, float("inf"), 4]])
    c, r = torch.tensor([[0.1, 0.2, 0.3, 0.4]]), torch.tensor([[1.0, 2, 30, 40]])
    with on_path(path):
        for boxes, size in ((b, (1e300, 1e300)), (b.half(), (70000, 70000))):
            got = boxes_ops.clip_boxes_to_image(boxes.to(device_for(path)), size).cpu()
            assert torch.equal(got, boxes)
        free = boxes_ops.decode_boxes(c.to(device_for(path)), r.to(device_for(path))).cpu()
        clipped = boxes_ops.decode_boxes(c.to(device_for(path)), r.to(device_for(path)),
                                         image_size=(1e300, 9)).cpu()
        assert_close(clipped, torch.stack([free[:, 0].clamp(0, 9), free[:, 1],
                                           free[:, 2].clamp(0, 9), free[:, 3]], 1), RTOL[torch.float32])
        unclamped = boxes_ops.decode_boxes(c.to(device_for(path)), r.to(device_for(path)),
                                           (1.0, 1.0, 1.0, 1.0), 1e300).cpu()
        assert torch.isfinite(unclamped).all()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", [(0,), (2, 3, 0), (0, 4), (3, 0, 4)])
def test_clip_empty_boxes_of_any_shape(path, shape):
    """Empty boxes keep their shape (the kernel path once failed to reshape
    (2, 3, 0) into rows)."""
    boxes = torch.zeros(shape).to(device_for(path))
    with on_path(path):
        assert boxes_ops.clip_boxes_to_image(boxes, (5, 5)).shape == shape


def test_clip_writes_nothing_past_its_output(monkeypatch):
    """Boxes of 6 columns (an 8-lane tile, 2 lanes masked off) over two
    programs: only the R x C output is stored. A lane at column C would store
    the next row's first element (which the next row then overwrites) and,
    on the last row, one element past the output: guard elements after the
    buffer the launcher allocates keep their value."""
    guards = guarded_outputs(monkeypatch, kernels)
    x = torch.randn(37, 6, dtype=torch.float64) * 60 + 20
    got = boxes_ops.clip_boxes_to_image(x.to(DEVICE), (31, 47))
    assert torch.equal(got.cpu(), tv_ops.clip_boxes_to_image(x, (31, 47)))
    assert_guards_intact(guards)


# --------------------------------------------------------------------------
# views, errors, opcheck, benchmark smoke test
# --------------------------------------------------------------------------
def int_view(t, kind):
    """helpers.non_contiguous for integer vectors (it draws float padding)."""
    if kind == "transposed":
        wide = torch.zeros(t.shape[0], 2, dtype=t.dtype, device=t.device)
        wide[:, 1] = t
        return wide[:, 1]
    return torch.stack([t, t], 1).flatten()[::2]  # stride 2


@pytest.mark.parametrize("kind", ["stride2", "transposed", "slice"])
def test_non_contiguous_views(kind):
    b, s, idxs, image_ids = per_image_case(8, n=70)
    d = DEVICE
    want = tv_batched(b, s, idxs, 0.5)
    bv, sv = (non_contiguous(t.to(d), kind) for t in (b, s))
    iv = int_view(idxs.to(d), kind)
    assert not (bv.is_contiguous() or sv.is_contiguous() or iv.is_contiguous())
    assert torch.equal(boxes_ops.batched_nms(bv, sv, iv, 0.5).cpu(), want)
    imv = int_view(image_ids.to(d), kind)
    per = boxes_ops.batched_nms_per_image(bv, sv, iv, imv, 0.5, None, num_images=3)
    assert [p.tolist() for p in per] == \
        [p.tolist() for p in ref.batched_nms_per_image(b, s, idxs, image_ids, 0.5, None, 3)]
    a2 = random_boxes(9)
    assert_close(boxes_ops.box_iou(bv, non_contiguous(a2.to(d), kind)),
                 tv_ops.box_iou(b, a2), RTOL[torch.float64])
    codes = torch.randn(70, 8, dtype=torch.float64)
    assert_close(boxes_ops.decode_boxes(non_contiguous(codes.to(d), kind), bv),
                 box_coder((1.0, 1.0, 1.0, 1.0)).decode_single(codes, b), RTOL[torch.float64])
    assert_close(boxes_ops.clip_boxes_to_image(bv, (30, 40)),
                 tv_ops.clip_boxes_to_image(b, (30, 40)), 0.0)


def _bad_cases():
    b = torch.rand(5, 4)
    s = torch.rand(5)
    i = torch.zeros(5, dtype=torch.int64)
    nms, bnms, per = boxes_ops.nms, boxes_ops.batched_nms, boxes_ops.batched_nms_per_image
    return [
        ("boxes must have shape", ValueError, lambda: nms(torch.rand(5, 5), s, 0.5)),
        ("boxes must have 2", ValueError, lambda: nms(torch.rand(5), s, 0.5)),
        ("boxes must be a torch.Tensor", TypeError, lambda: nms([[0, 0, 1, 1]], s, 0.5)),
        ("boxes must have dtype", TypeError, lambda: nms(b.long(), s, 0.5)),
        ("scores must have one entry per box", ValueError, lambda: nms(b, s[:4], 0.5)),
        ("scores must have dtype", TypeError, lambda: nms(b, i, 0.5)),
        ("iou_threshold must be a number", TypeError, lambda: nms(b, s, "0.5")),
        ("iou_threshold must be finite", ValueError, lambda: nms(b, s, float("nan"))),
        ("idxs must have dtype", TypeError, lambda: bnms(b, s, s, 0.5)),
        ("idxs must have one entry", ValueError, lambda: bnms(b, s, i[:3], 0.5)),
        ("idxs must be a torch.Tensor", TypeError, lambda: bnms(b, s, None, 0.5)),
        ("image_ids must have one entry", ValueError, lambda: per(b, s, i, i[:2], 0.5)),
        ("image_ids hold 3", ValueError, lambda: per(b, s, i, i + 3, 0.5, num_images=2)),
        ("image_ids hold 2", ValueError, lambda: per(b, s, i, i * 0 + 2, 0.5, num_images=2)),
        ("max_per_image must be >= 0", ValueError, lambda: per(b, s, i, i, 0.5, -1)),
        ("num_images must be an int", TypeError, lambda: per(b, s, i, i, 0.5, num_images=1.5)),
        ("boxes2 must have shape", ValueError, lambda: boxes_ops.box_iou(b, torch.rand(3, 2))),
        ("boxes1 must hold real", TypeError, lambda: boxes_ops.box_iou(b.bool(), b)),
        ("rel_codes has 4 rows for 5", ValueError,
         lambda: boxes_ops.decode_boxes(torch.rand(4, 8), b)),
        ("rel_codes must have shape", ValueError,
         lambda: boxes_ops.decode_boxes(torch.rand(5, 6), b)),
        ("weights must be 4 numbers", TypeError,
         lambda: boxes_ops.decode_boxes(torch.rand(5, 4), b, (1.0, 1.0))),
        ("bbox_xform_clip must be a number", TypeError,
         lambda: boxes_ops.decode_boxes(torch.rand(5, 4), b, (1, 1, 1, 1), None)),
        ("size must be a", TypeError, lambda: boxes_ops.clip_boxes_to_image(b, 5)),
        ("boxes must have shape", ValueError,
         lambda: boxes_ops.clip_boxes_to_image(torch.rand(3, 3), (5, 5))),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_errors(case):
    match, error, call = _bad_cases()[case]
    with pytest.raises(error, match=match):
        call()


@pytest.mark.skipif(not ON_GPU, reason="needs a second device")
def test_tensors_on_different_devices():
    with pytest.raises(ValueError, match="one device"):
        boxes_ops.nms(torch.rand(3, 4, device="cuda"), torch.rand(3), 0.5)


@pytest.mark.parametrize("path", ["kernel", "native"])
def test_opcheck(path):
    dev = device_for(path)
    b = random_boxes(20).float().to(dev)
    s = torch.rand(20).to(dev)
    idxs = torch.randint(0, 3, (20,)).to(dev)
    ops = torch.ops.segops
    with on_path(path):
        torch.library.opcheck(ops.box_iou.default, (b, b[:7]))
        # column-major boxes: the result is contiguous on every path, as the fake says
        torch.library.opcheck(ops.box_iou.default, (b.t().contiguous().t(), b[:7]))
        torch.library.opcheck(ops.clip_boxes_to_image.default, (b, 30.0, 40.0))
        torch.library.opcheck(ops.decode_boxes.default,
                              (torch.randn(20, 8).to(dev), b, [10.0, 10.0, 5.0, 5.0], 4.0, None))
        torch.library.opcheck(ops.batched_nms.default, (b, s, idxs, 0.5),
                              test_utils=("test_schema", "test_faketensor"))
        torch.library.opcheck(ops.batched_nms_per_image.default,
                              (b, s, idxs, idxs, 0.5, 4, 3),
                              test_utils=("test_schema", "test_faketensor"))


COMPILE_BACKEND = "inductor" if ON_GPU else "aot_eager"  # aot_eager: the ops run eagerly


def test_compile_fullgraph_fixed_size_ops():
    """box_iou, decode_boxes (with the fused clip) and clip_boxes_to_image in
    one graph, no break."""
    b = random_boxes(11).float().to(DEVICE)
    codes = torch.randn(11, 8).to(DEVICE)

    def fn(b, codes):
        decoded = boxes_ops.decode_boxes(codes, b, (10.0, 10.0, 5.0, 5.0), image_size=(60, 70))
        clipped = boxes_ops.clip_boxes_to_image(decoded.reshape(-1, 4), (50, 65))
        return boxes_ops.box_iou(clipped, b) * 2
    compiled = torch.compile(fn, fullgraph=True, backend=COMPILE_BACKEND)
    assert_close(compiled(b, codes), fn(b, codes), RTOL[torch.float32])


def test_compile_fullgraph_nms_dynamic_sizes():
    """nms, batched_nms and batched_nms_per_image return data-dependent sizes:
    their fake kernels make them unbacked symbolic sizes, so a graph that
    indexes with the kept indices compiles whole (fullgraph: no break)."""
    b, s, idxs, image_ids = per_image_case(13, n=40)
    b, s, idxs, image_ids = (t.to(DEVICE) for t in (b.float(), s.float(), idxs, image_ids))

    def fn(b, s, idxs, image_ids):
        keep = boxes_ops.nms(b, s, 0.5)
        keep_b = boxes_ops.batched_nms(b, s, idxs, 0.5)
        per = boxes_ops.batched_nms_per_image(b, s, idxs, image_ids, 0.5, 5, num_images=3)
        return b[keep], s[keep_b] * 2, [s[k] for k in per]
    compiled = torch.compile(fn, fullgraph=True, backend=COMPILE_BACKEND)
    got, want = compiled(b, s, idxs, image_ids), fn(b, s, idxs, image_ids)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert len(got[2]) == 3 and all(torch.equal(g, w) for g, w in zip(got[2], want[2]))
    assert len(want[0]) > 0 and sum(len(k) for k in want[2]) > 0


def test_kernel_path_syncs_once(monkeypatch):
    """The kernel path's only host read is the final count (``.tolist()`` /
    a boolean index), counted by patching Tensor.item/tolist/__bool__."""
    b, s, idxs, image_ids = per_image_case(9, n=50)
    reads = []
    for name in ("item", "tolist", "__bool__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _original=original, _name=name, **k):
            reads.append(_name)
            return _original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, spy)
    d = DEVICE
    boxes_ops._batched_nms_per_image(b.to(d), s.to(d), idxs.to(d), image_ids.to(d), 0.5, 5, 3)
    monkeypatch.undo()
    assert reads == ["tolist"]


def test_boxes_benchmark_code_runs_at_tiny_sizes(monkeypatch):
    """Smoke test of benchmarks/boxes.py: tiny sizes, each provider called once."""
    from segops.benchmarks import boxes as bench

    def call_once(fn, **_):
        fn()
        return 1.0

    monkeypatch.setattr(bench, "DEVICE", str(DEVICE))
    monkeypatch.setattr(bench, "RPN_IMAGES", [2])
    monkeypatch.setattr(bench, "RPN_LEVELS", 2)
    monkeypatch.setattr(bench, "RPN_PER_LEVEL", 20)
    monkeypatch.setattr(bench, "BOX_HEAD", (12, 3))
    monkeypatch.setattr(bench, "DECODE_ROWS", 16)
    monkeypatch.setattr(bench, "time_ms", call_once)
    monkeypatch.setattr(bench, "peak_extra_memory", lambda fn: 0)
    records = bench.run(quick=True)
    keys = {(r.op, r.provider) for r in records}
    for op in ("batched_nms", "decode_boxes"):
        assert (op, "segops") in keys and (op, "torchvision") in keys
    assert math.isfinite(sum(r.ms for r in records))


def test_per_image_cap_of_zero_keeps_nothing():
    b = random_boxes(12).float().to(DEVICE)
    s, idxs = torch.rand(12).to(DEVICE), torch.randint(0, 2, (12,)).to(DEVICE)
    images = torch.randint(0, 3, (12,)).to(DEVICE)
    kept = boxes_ops.batched_nms_per_image(b, s, idxs, images, 0.5, 0, num_images=3)
    assert [k.numel() for k in kept] == [0, 0, 0]


def test_native_box_iou_is_torchvisions(monkeypatch):
    """native_only: box_iou is torchvision's call (a spy), with its values."""
    import torchvision
    calls = []
    real = torchvision.ops.box_iou
    monkeypatch.setattr(torchvision.ops, "box_iou", lambda a, b: calls.append(1) or real(a, b))
    a, b = random_boxes(5).float(), random_boxes(4).float()
    with on_path("native"):
        got = boxes_ops.box_iou(a, b)
    assert calls == [1]
    assert_close(got, real(a, b), RTOL[torch.float32])


@pytest.mark.parametrize("threshold", [math.inf, -math.inf])
def test_infinite_iou_threshold_is_an_argument_error(threshold):
    """check_number refuses +-inf as it refuses NaN: 'must be finite'."""
    b = torch.tensor([[0.0, 0, 10, 10], [1, 1, 9, 9]], device=DEVICE)
    with pytest.raises(ValueError, match="iou_threshold must be finite"):
        boxes_ops.nms(b, torch.rand(2, device=DEVICE), threshold)


@pytest.mark.parametrize("path", PATHS)
def test_box_iou_of_mixed_dtypes_promotes_like_torchvision(path):
    """float32 with float64 boxes gives float64 IoUs whichever comes first, as torchvision's."""
    a = torch.tensor([[0.0, 0, 10, 10], [2, 3, 7, 9]], dtype=torch.float32)
    b = torch.tensor([[1.0, 1, 9, 10.5], [0, 0, 4, 4], [5, 5, 6, 6]], dtype=torch.float64)
    dev = device_for(path)
    with on_path(path):
        ab = boxes_ops.box_iou(a.to(dev), b.to(dev))
        ba = boxes_ops.box_iou(b.to(dev), a.to(dev))
    want = tv_ops.box_iou(a, b)
    assert want.dtype == torch.float64
    assert ab.dtype == ba.dtype == torch.float64
    assert_close(ab, want, RTOL[torch.float64])
    assert_close(ba, want.t(), RTOL[torch.float64])


@pytest.mark.parametrize("path", PATHS)
def test_box_iou_of_fp16_and_integer_boxes_is_float32_arithmetic(path):
    """Widths and areas in float32, not the box dtype (the docstring's
    differences from torchvision): fp16 widths do not round, int32 areas do
    not overflow, uint8 differences do not wrap."""
    cases = [
        (torch.tensor([[0.5, 0, 2050, 1]]), torch.tensor([[0.0, 0, 2050, 1]]), torch.float16),
        (torch.tensor([[0, 0, 70000, 70000]]), torch.tensor([[0, 0, 70000, 35000]]),
         torch.int32),
        (torch.tensor([[0, 0, 10, 10]]), torch.tensor([[20, 20, 30, 30]]), torch.uint8)]
    dev = device_for(path)
    for a, b, dtype in cases:
        want = tv_ops.box_iou(a.to(dtype).float(), b.to(dtype).float())
        assert not torch.equal(tv_ops.box_iou(a.to(dtype), b.to(dtype)), want)
        with on_path(path):
            got = boxes_ops.box_iou(a.to(dtype).to(dev), b.to(dtype).to(dev))
        assert got.dtype == torch.float32
        assert_close(got, want, RTOL[torch.float32])


def test_clip_zero_dim_boxes_is_an_argument_error():
    """A 0-d tensor has no (..., 4) last axis: an ArgumentError, not an IndexError."""
    with pytest.raises(ValueError, match=r"boxes must have shape \(\.\.\., 4\)"):
        boxes_ops.clip_boxes_to_image(torch.tensor(3.0, device=DEVICE), (5, 5))


def test_decode_refuses_more_than_four_weights():
    """weights must be exactly (wx, wy, ww, wh): five are refused, not truncated."""
    b = torch.tensor([[0.0, 0, 10, 10]], device=DEVICE)
    with pytest.raises(TypeError, match="weights must be 4 numbers"):
        boxes_ops.decode_boxes(torch.zeros(1, 4, device=DEVICE), b, (1.0, 1.0, 1.0, 1.0, 1.0))


@pytest.mark.parametrize("path", PATHS)
def test_per_image_nms_of_no_boxes_without_num_images_is_no_images(path):
    """No boxes and no num_images: image_ids.max() + 1 of nothing is 0 images, an empty list."""
    dev = device_for(path)
    none = torch.zeros(0, dtype=torch.int64, device=dev)
    with on_path(path):
        got = boxes_ops.batched_nms_per_image(torch.zeros(0, 4, device=dev),
                                              torch.zeros(0, device=dev), none, none, 0.5)
    assert got == []
