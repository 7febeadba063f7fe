"""RoIAlign: kernels vs reference vs torchvision (forward and gradient, every
branch), both backward paths, multi-level pooling, dtypes, layouts, edges,
errors, opcheck, compile and autocast."""
import collections
import importlib

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from helpers import (
    CHANNELS_LAST_VIEWS,
    DEVICE,
    DispatchCalls,
    KERNEL_DTYPES,
    ON_GPU,
    PATHS,
    RTOL,
    STRIDE_VIEWS,
    assert_checked_eager_and_compiled,
    assert_close,
    assert_device_assert_in_child,
    assert_guards_intact,
    deterministic,
    guarded_outputs,
    like_layout,
    on_path,
    second_order_grads,
    skip_off_kernel_path_on_gpu,
    strided_views,
)

import segops
from segops import _checks, _dispatch
from segops._format import format_strides
from segops.kernels import roi_align as kernels
from segops.kernels.roi_align import _fitting_grid, _roi_geometry
from segops.ops.roi_align import _as_rois
from segops.reference import roi_align as ref

torchvision = pytest.importorskip("torchvision")
ops_module = importlib.import_module("segops.ops.roi_align")  # segops.ops.roi_align: the function

F64 = RTOL[torch.float64]


def make_rois(K, N, H, W, scale=1.0, dtype=torch.float64, seed_kinds=True):
    """K well-formed boxes (x1 <= x2, y1 <= y2) in image coordinates over
    every kind of placement: inside, crossing each border, wholly outside,
    degenerate, sub-pixel, and several times the image."""
    h, w = H / scale, W / scale
    x1 = torch.rand(K, dtype=torch.float64) * (w + 8) - 4
    y1 = torch.rand(K, dtype=torch.float64) * (h + 8) - 4
    bw = torch.rand(K, dtype=torch.float64) * w * 0.8
    bh = torch.rand(K, dtype=torch.float64) * h * 0.8
    if seed_kinds and K >= 8:
        x1[0], y1[0], bw[0], bh[0] = -3 * w, -2 * h, 6 * w, 5 * h        # huge
        x1[1], y1[1], bw[1], bh[1] = w / 3, h / 3, 0.0, 0.0              # degenerate
        x1[2], y1[2], bw[2], bh[2] = w / 2, h / 2, 0.1, 0.2              # sub-pixel
        x1[3], y1[3] = w + 5, h + 5                                      # outside
        x1[4], y1[4], bw[4], bh[4] = -w / 4, -h / 4, w / 2, h / 2        # top-left
        x1[5], y1[5], bw[5], bh[5] = 3 * w / 4, 3 * h / 4, w / 2, h / 2  # bottom-right
        x1[6], y1[6], bw[6], bh[6] = -1.5, h - 0.5, w + 3, 2.0           # left to right
        x1[7], y1[7], bw[7], bh[7] = w - 0.5, -1.5, 2.0, h + 3           # top to bottom
    batch = torch.randint(0, N, (K,)).double()
    return torch.stack([batch, x1, y1, x1 + bw, y1 + bh], 1).to(dtype)


def kernel_and_reference(features, rois, levels, scales, pooled, sampling_ratio, aligned,
                         pool_mode, grad=None):
    """Kernel forward, both kernel backwards, and the reference of each."""
    args = (features, rois, levels, scales, *pooled, sampling_ratio, aligned, pool_mode)
    cpu_args = ([f.detach().cpu() for f in features], rois.cpu(),
                None if levels is None else levels.cpu(), *args[3:])
    out = kernels.roi_align_forward(*args)
    want = ref.roi_align(*cpu_args)
    grad = torch.randn(want.shape, dtype=features[0].dtype) if grad is None else grad
    atomic = kernels.roi_align_backward_atomic(grad.to(DEVICE), *args)
    determ = kernels.roi_align_backward_deterministic(grad.to(DEVICE), *args)
    want_grad = ref.roi_align_backward(grad.cpu(), *cpu_args)
    return out, want, atomic, determ, want_grad


class Launches:
    """Stands in for a Triton kernel object: counts its launches and keeps
    each launch's keyword (constexpr) arguments."""

    def __init__(self, kernel):
        self.kernel, self.count, self.constexprs = kernel, 0, []

    def __getitem__(self, grid):
        self.count += 1

        def launch(*args, **kwargs):
            self.constexprs.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.fixture
def launches(monkeypatch):
    """{name: Launches} for the RoIAlign kernels, patched in place."""
    names = ("_roi_align_fwd_kernel", "_roi_align_bwd_atomic_kernel",
             "_roi_align_bwd_deterministic_kernel", "_roi_levels_kernel")
    recorded = {}
    for name in names:
        recorded[name] = Launches(getattr(kernels, name))
        monkeypatch.setattr(kernels, name, recorded[name])
    return recorded


def path_device(path):
    return DEVICE if path == "kernel" else torch.device("cpu")


def check_all(out, want, atomic, determ, want_grad, tol):
    assert_close(out, want, tol)
    for level, (a, d, w) in enumerate(zip(atomic, determ, want_grad)):
        assert_close(a, w, tol, name=f"atomic grad, level {level}")
        assert_close(d, w, tol, name=f"deterministic grad, level {level}")


# --------------------------------------------------------------------------
# against torchvision, every branch, float64
# --------------------------------------------------------------------------
@pytest.mark.parametrize("aligned", [False, True], ids=["legacy", "aligned"])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2, 3])
def test_matches_torchvision(aligned, sampling_ratio):
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64, device=DEVICE, requires_grad=True)
    rois = make_rois(9, 2, 7, 9, scale=0.5).to(DEVICE)
    out = segops.ops.roi_align(x, rois, (2, 3), 0.5, sampling_ratio, aligned)
    want = torchvision.ops.roi_align(x, rois, (2, 3), 0.5, sampling_ratio, aligned)
    assert_close(out, want, F64)
    grad = torch.randn_like(want)
    (got_grad,) = torch.autograd.grad(out, x, grad)
    (want_grad,) = torch.autograd.grad(want, x, grad)
    assert_close(got_grad, want_grad, F64, name="grad")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("pool_mode", ["avg", "max"])
def test_kernels_match_reference(layout, pool_mode):
    x = like_layout(torch.randn(3, 5, 6, 8, dtype=torch.float64).to(DEVICE), layout)
    rois = make_rois(8, 3, 6, 8).to(DEVICE)
    results = kernel_and_reference([x], rois, None, [1.0], (3, 2), -1, layout == "strided",
                                   pool_mode)
    check_all(*results, F64)
    if layout == "channels_last":
        assert results[0].is_contiguous(memory_format=torch.channels_last)
        assert all(g.is_contiguous(memory_format=torch.channels_last) for g in results[2])


@pytest.mark.parametrize("C,P,channels_last,want", [
    (256, 49, True, (256, 4)),    # 7x7: 52 lanes (16 would give 64, 23% masked)
    (256, 196, True, (256, 4)),   # 14x14: no lane masked
    (64, 196, True, (64, 16)),    # fewer channels: larger bin blocks
    (256, 9, True, (256, 1)),     # 3x3: blocks of 4 or 2 would mask 1/4 or 1/10
    (64, 12, True, (64, 4)),      # a divisor: nothing masked
    (1, 1024, True, (1, 1024)),   # one channel: a 32x32 output is one block of bins
    (256, 49, False, (16, 64)),   # NCHW: the bins of one plane
])
def test_tile_sizes_bins_to_waste_few_lanes(C, P, channels_last, want):
    assert kernels._tile(C, P, channels_last, None, None) == want


@pytest.mark.parametrize("pool_mode", ["avg", "max"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_num_warps_per_layout(channels_last, pool_mode, launches):
    """The warps each kernel launches with (kernels._warps): 8 in NCHW, where
    4 took up to 244 registers, but 4 for the max-pool gather, which ptxas
    spills at 8; 4 in channels_last (codegen report)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 16, 6, 7, device=DEVICE).contiguous(memory_format=fmt)
    rois = make_rois(8, 2, 6, 7).to(DEVICE)
    kernel_and_reference([x], rois, None, [1.0], (2, 2), 2, False, pool_mode)
    wide = 4 if channels_last else 8
    gather = 4 if channels_last or pool_mode == "max" else 8
    names = ("_roi_align_fwd_kernel", "_roi_align_bwd_atomic_kernel",
             "_roi_align_bwd_deterministic_kernel")
    assert [(launches[n].count, launches[n].constexprs[-1]["num_warps"]) for n in names] == [
        (1, wide), (1, wide), (1, gather)]


def _banded_case():
    """Three levels of unequal sizes, 2 images with unequal RoI counts, and
    every kind of box: huge, degenerate, sub-pixel, outside, crossing each
    border, NaN, infinite, reversed."""
    torch.manual_seed(7)
    features = [torch.randn(2, 2, h, w, dtype=torch.float64, device=DEVICE)
                for h, w in ((9, 7), (5, 4), (3, 2))]
    rois = make_rois(18, 2, 9, 7, 1 / 4)
    rois[:, 0] = (torch.arange(18) % 4 == 0).double()     # image 1: 5 RoIs, image 0: 13
    rois[9, 2] = float("nan")
    rois[10, 3] = float("inf")
    rois[11, [1, 3]] = rois[11, [3, 1]]
    levels = torch.arange(18) % 3
    return features, rois.to(DEVICE), levels.to(DEVICE), [1 / 4, 1 / 8, 1 / 16]


@pytest.mark.parametrize("pool_mode, aligned, sampling_ratio, tile", [
    ("avg", False, 2, (4, 4)), ("avg", True, -1, (1, 8)), ("max", True, 2, (2, 4))])
def test_row_bands_sum_what_the_segment_scan_sums(pool_mode, aligned, sampling_ratio, tile,
                                                  launches):
    """The deterministic gather's row-band schedule against its segment scan,
    bit for bit (the same RoIs in the same order for every tile), and
    against the reference; past MAX_BAND_ENTRIES the launch takes the scan."""
    features, rois, levels, scales = _banded_case()
    grad = torch.randn(18, 2, 2, 3, dtype=torch.float64, device=DEVICE)
    args = (features, rois, levels, scales, 2, 3, sampling_ratio, aligned, pool_mode)
    banded = kernels.roi_align_backward_deterministic(grad, *args, tile=tile)
    scanned = kernels.roi_align_backward_deterministic(grad, *args, tile=tile, row_bands=False)
    rows = max(-(-f.shape[2] // tile[0]) for f in features)
    with pytest.MonkeyPatch.context() as patch:   # 18 RoIs x the most rows: the cap
        patch.setattr(kernels, "MAX_BAND_ENTRIES", 18 * rows)
        at_cap = kernels.roi_align_backward_deterministic(grad, *args, tile=tile)
        patch.setattr(kernels, "MAX_BAND_ENTRIES", 18 * rows - 1)
        capped = kernels.roi_align_backward_deterministic(grad, *args, tile=tile)
    flags = [c["ROW_BANDS"] for c in launches["_roi_align_bwd_deterministic_kernel"].constexprs]
    assert flags == [True, False, True, False]
    assert all(torch.equal(a, b) for a, b in zip(at_cap, banded))
    want = ref.roi_align_backward(grad.cpu(), [f.cpu() for f in features], rois.cpu(),
                                  levels.cpu(), *args[3:])
    for level, (b, s, c, w) in enumerate(zip(banded, scanned, capped, want)):
        assert torch.equal(b, s) and torch.equal(b, c), f"level {level}"
        assert_close(b, w, F64, name=f"level {level}")


@pytest.mark.parametrize("tile_h", [1, 2, 4])
def test_row_bands_list_each_roi_in_the_bands_it_reaches(tile_h):
    """Each band (level, image, row of tiles r) lists, in increasing
    position, the RoIs of its level and image with floor(y_lo / tile_h) <=
    r <= floor(y_hi / tile_h) for their reach [y_lo, y_hi], and no others:
    every RoI a tile's reach test keeps (y_lo <= its last row, y_hi >= its
    first) is there; a NaN reach is nowhere. Fewer (RoI, band) pairs than
    a scan of each segment for each of its bands."""
    features, rois, levels, scales = _banded_case()
    order, segments, segment_of = kernels._segments(rois, levels, 3, 2)
    scale_table = torch.tensor(scales, dtype=torch.float64, device=DEVICE)
    reach = kernels._roi_reach(rois, levels, scale_table, order)
    entries, bounds, bands = kernels._row_bands(segment_of, reach, features, 2, tile_h)
    rows = [-(-f.shape[2] // tile_h) for f in features]
    assert bands.tolist() == [0, 2 * rows[0], 2 * (rows[0] + rows[1])]
    image, level_of = rois[order, 0].long().tolist(), levels[order].tolist()
    want, kept = collections.defaultdict(list), []
    for j, (y_lo, y_hi) in enumerate(reach[:, :2].tolist()):
        for r in range(rows[level_of[j]]):
            band = bands[level_of[j]].item() + image[j] * rows[level_of[j]] + r
            if np.floor(y_lo / tile_h) <= r <= np.floor(y_hi / tile_h):  # NaN: never
                want[band].append(j)
            if y_lo <= r * tile_h + tile_h - 1 and y_hi >= r * tile_h:  # the kernel's test
                kept.append((band, j))
    listed = {b: entries[bounds[b]:bounds[b + 1]].tolist() for b in range(bounds.numel() - 1)}
    assert listed == {b: want.get(b, []) for b in listed}
    assert all(j in listed[band] for band, j in kept) and kept
    every_band = sum(rows[segment // 2] * size for segment, size
                     in enumerate(segments.diff().tolist()))   # what a scan visits
    assert sum(map(len, listed.values())) < every_band


@pytest.mark.parametrize("block_c,block_p,tile", [(2, 2, (4, 2)), (8, 16, (2, 8))])
def test_other_tile_configs(block_c, block_p, tile):
    """Tiles smaller than the problem (several programs per RoI, channel and
    bin tails) and larger than it."""
    x = torch.randn(2, 5, 9, 7, dtype=torch.float64, device=DEVICE)
    rois = make_rois(8, 2, 9, 7)[[0, 4, 5, 6, 7]].to(DEVICE)
    args = ([x], rois, None, [1.0], 2, 3, 2, False, "avg")
    out = kernels.roi_align_forward(*args, block_c=block_c, block_p=block_p)
    grad = torch.randn(out.shape, dtype=torch.float64, device=DEVICE)
    atomic = kernels.roi_align_backward_atomic(grad, *args, block_c=block_c, block_p=block_p)
    determ = kernels.roi_align_backward_deterministic(grad, *args, tile=tile, block_c=block_c)
    cpu = ([x.cpu()], rois.cpu(), *args[2:])
    check_all(out, ref.roi_align(*cpu), atomic, determ, ref.roi_align_backward(grad.cpu(), *cpu),
              F64)


# --------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", KERNEL_DTYPES[-3:], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_dtypes_against_float64(dtype, layout):
    """fp32/fp16/bf16 features with fp32 accumulation, against the float64
    reference computed from the same (rounded) inputs."""
    x = like_layout(torch.randn(2, 6, 8, 9, dtype=torch.float64).to(dtype), layout)
    rois = make_rois(8, 2, 8, 9, scale=0.25)
    xd = x.to(DEVICE).requires_grad_()
    out = segops.ops.roi_align(xd, rois.to(DEVICE), (3, 3), 0.25, 2, False)
    assert out.dtype == dtype
    want = ref.roi_align([x.double()], rois, None, [0.25], 3, 3, 2, False, "avg")
    assert_close(out, want, RTOL[dtype])
    grad = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    (got_grad,) = torch.autograd.grad(out, xd, grad.to(DEVICE))
    assert got_grad.dtype == dtype
    want_grad = ref.roi_align_backward(grad.double(), [x.double()], rois, None, [0.25], 3, 3, 2,
                                       False, "avg")[0]
    assert_close(got_grad, want_grad, RTOL[dtype], name="grad")


@pytest.mark.skipif(not ON_GPU, reason="the fp16/bf16/fp32 kernels users run are the GPU's; "
                    "the interpreter covers this grid in float64 (test_matches_torchvision)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("aligned", [False, True], ids=["legacy", "aligned"])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 2])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_geometry_grid_in_gpu_dtypes(dtype, aligned, sampling_ratio, layout):
    """The torchvision grid (random and edge boxes, both alignments, fixed
    and adaptive sampling) in the dtypes users run, forward and both
    backward kernels, against the float64 reference on the rounded inputs."""
    x = like_layout(torch.randn(2, 16, 7, 9, dtype=torch.float64).to(dtype), layout)
    rois = make_rois(9, 2, 7, 9, scale=0.5)
    want = ref.roi_align([x.double()], rois, None, [0.5], 2, 3, sampling_ratio, aligned, "avg")
    grad = torch.randn(want.shape, dtype=torch.float64).to(dtype)
    want_grad = ref.roi_align_backward(grad.double(), [x.double()], rois, None, [0.5], 2, 3,
                                       sampling_ratio, aligned, "avg")[0]
    for mode in (False, True):
        xd = x.to(DEVICE).requires_grad_()
        with deterministic(mode):
            out = segops.ops.roi_align(xd, rois.to(DEVICE), (2, 3), 0.5, sampling_ratio, aligned)
            (got_grad,) = torch.autograd.grad(out, xd, grad.to(DEVICE))
        assert out.dtype == got_grad.dtype == dtype
        assert_close(out, want, RTOL[dtype])
        assert_close(got_grad, want_grad, RTOL[dtype], name=f"grad (deterministic={mode})")


def _cl(shape, dtype=torch.bfloat16):
    return torch.zeros(shape, dtype=dtype, device=DEVICE).contiguous(
        memory_format=torch.channels_last)


def test_vector_width_is_proven_or_1():
    """VEC (channels per aligned 16-byte vector) only where every map is
    channels_last with C and its n, h, w strides multiples of it and a
    16-byte-aligned address."""
    width = kernels._vector_width
    assert width([_cl((2, 16, 5, 6)), _cl((2, 16, 3, 3))], 16) == 8
    assert width([_cl((2, 8, 5, 6), torch.float32)], 8) == 4
    assert width([_cl((2, 4, 5, 6), torch.float64)], 4) == 2
    assert width([_cl((2, 16, 5, 6)), _cl((2, 16, 3, 3), torch.float32)], 16) == 8
    assert width([_cl((2, 16, 5, 6)).contiguous()], 16) == 1              # NCHW
    assert width([_cl((2, 12, 5, 6))], 12) == 1                            # C % 8
    assert width([_cl((2, 24, 5, 6))[:, 1:9]], 8) == 1                     # 2-byte offset
    assert width([_cl((2, 24, 5, 6))[:, 4:12]], 8) == 1                    # 8-byte offset
    assert width([_cl((2, 32, 5, 6))[:, 8:16]], 8) == 8                    # 16-byte offset
    assert width([_cl((2, 16, 5, 6))[:, :, :, ::3]], 16) == 8              # w stride 48
    assert width([_cl((2, 16, 5, 6))[:, :, ::2, ::3]], 16) == 8
    assert width([torch.zeros(2, 5, 6, 24, dtype=torch.bfloat16,
                              device=DEVICE).permute(0, 3, 1, 2)[:, :16]], 16) == 8
    assert width([torch.zeros(2, 5, 6, 20, dtype=torch.bfloat16,
                              device=DEVICE).permute(0, 3, 1, 2)], 20) == 1  # C % 8
    assert width([torch.zeros(2, 5, 6, 17, dtype=torch.bfloat16,
                              device=DEVICE).permute(0, 3, 1, 2)[:, :16]], 16) == 1  # w stride
    assert width([_cl((2, 20, 5, 2))[:, :16]], 16) == 1      # w stride 20 alone (n 200, h 40)
    assert width([_cl((2, 16, 5, 6)).as_strided((2, 16, 2, 6), (241, 1, 96, 16))], 16) == 1  # n
    assert width([_cl((2, 16, 5, 6)), _cl((2, 16, 6, 6))[:, :, :, 1:]], 16) == 8
    assert width([_cl((2, 16, 5, 6)), _cl((2, 24, 6, 6))[:, 4:20]], 16) == 1  # one level off
    # size-1 dims: only index 0 is used, whatever stride PyTorch gives them
    assert _cl((2, 16, 1, 1)).stride()[2:] == (1, 1)
    assert width([_cl((2, 16, 5, 6)), _cl((2, 16, 1, 1))], 16) == 8
    assert width([_cl((1, 16, 1, 6)).as_strided((1, 16, 1, 6), (3, 1, 5, 16))], 16) == 8
    assert width([_cl((1, 16, 2, 6)).as_strided((1, 16, 2, 6), (3, 1, 5, 16))], 16) == 1


@pytest.mark.parametrize("pool_mode", ["avg", "max"])
def test_vector_path_with_a_1x1_level(pool_mode, launches):
    """A 1x1 map among the levels (channels_last gives it h and w strides of
    1) keeps the launch's vector accesses, and every kernel still matches
    the reference on it."""
    dtype = KERNEL_DTYPES[-1]
    features = [_cl((2, 16, 6, 5), dtype).normal_(), _cl((2, 16, 1, 1), dtype).normal_()]
    rois = make_rois(8, 2, 6, 5).float().to(DEVICE)
    levels = torch.tensor([0, 1] * 4, dtype=torch.int64, device=DEVICE)
    args = (features, rois, levels, [1.0, 0.25], 2, 2, 2, False, pool_mode)
    cpu = ([f.cpu().double() for f in features], rois.cpu().double(), levels.cpu(), *args[3:])
    grad = torch.randn((8, 16, 2, 2), dtype=torch.float64).to(dtype)
    out = kernels.roi_align_forward(*args)
    grads = {"atomic": kernels.roi_align_backward_atomic(grad.to(DEVICE), *args),
             "deterministic": kernels.roi_align_backward_deterministic(grad.to(DEVICE), *args)}
    for name in ("_roi_align_fwd_kernel", "_roi_align_bwd_atomic_kernel",
                 "_roi_align_bwd_deterministic_kernel"):
        assert launches[name].constexprs[-1]["VEC"] == 16 // features[0].element_size(), name
    assert_close(out, ref.roi_align(*cpu), RTOL[dtype])
    want = ref.roi_align_backward(grad.double(), *cpu)
    for kind, got in grads.items():
        for level, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, RTOL[dtype], name=f"{kind} grad, level {level}")


@pytest.mark.parametrize("dtype", KERNEL_DTYPES[-3:], ids=str)
@pytest.mark.parametrize("pool_mode", ["avg", "max"])
def test_vector_path_multi_level(dtype, pool_mode, launches):
    """channels_last maps of 16 channels (aligned vectors: VEC > 1, the
    alignment hints on a GPU) at four levels: forward and both backward
    kernels against the float64 reference on the rounded inputs."""
    features, boxes, _ = fpn_case(dtype, "channels_last", C=16)
    features = list(features.values())
    rois = _as_rois(boxes).float()
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    levels = ref.map_levels(rois[:, 1:], 2, 5, canonical_scale=28)
    args = (features, rois, levels, scales, 2, 2, 2, True, pool_mode)
    cpu = ([f.cpu().double() for f in features], rois.cpu().double(), levels.cpu(), *args[3:])
    grad = torch.randn((rois.shape[0], 16, 2, 2), dtype=torch.float64).to(dtype)
    out = kernels.roi_align_forward(*args)
    grads = {"atomic": kernels.roi_align_backward_atomic(grad.to(DEVICE), *args),
             "deterministic": kernels.roi_align_backward_deterministic(grad.to(DEVICE), *args)}
    vec = 16 // features[0].element_size()
    for name in ("_roi_align_fwd_kernel", "_roi_align_bwd_atomic_kernel",
                 "_roi_align_bwd_deterministic_kernel"):
        assert launches[name].constexprs[-1]["VEC"] == vec, name
    assert_close(out, ref.roi_align(*cpu), RTOL[dtype])
    want = ref.roi_align_backward(grad.double(), *cpu)
    for kind, got in grads.items():
        for level, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, RTOL[dtype], name=f"{kind} grad, level {level}")


def test_integer_boxes_as_a_list_keep_every_digit():
    """A list of int64 boxes pools as the same (K, 5) tensor does: with
    float64 features a coordinate past 2**24 keeps its last digit (float32
    would round 2**24 + 1 to 2**24)."""
    big = 2 ** 24 + 1
    # x = big * 2**-22 = 4 + 2**-22, inside the map: the last digit moves the samples
    x = torch.randn(1, 2, 3, 8, dtype=torch.float64, device=DEVICE)
    boxes = torch.tensor([[big, 0, big + 3, 2]], dtype=torch.int64, device=DEVICE)
    rows = torch.cat([torch.zeros(1, 1, dtype=torch.int64, device=DEVICE), boxes], 1)
    from_list = segops.ops.roi_align(x, [boxes], 2, 2.0 ** -22, 2)
    from_rows = segops.ops.roi_align(x, rows, 2, 2.0 ** -22, 2)
    assert torch.equal(from_list, from_rows)
    assert torch.equal(_as_rois([boxes])[:, 1:], boxes.double())
    assert not torch.equal(from_rows, segops.ops.roi_align(x, rows.float(), 2, 2.0 ** -22, 2))
    # and so do both in the multi-scale op, whose level mapping runs in float32
    maps = [x, torch.randn(1, 2, 2, 4, dtype=torch.float64, device=DEVICE)]
    want = segops.ops.multi_scale_roi_align(maps, rows.double(), 2, [2.0 ** -22, 2.0 ** -23], 2)
    for given in (rows, [boxes]):
        got = segops.ops.multi_scale_roi_align(maps, given, 2, [2.0 ** -22, 2.0 ** -23], 2)
        assert torch.equal(got, want)


def test_half_boxes_are_cast_not_rounded_to_half():
    """float32 boxes stay float32 coordinates with fp16 features: a box at
    x = 1000.3 keeps its fraction (fp16 would round it to 1000.5, as
    torchvision's fp16 kernel does)."""
    x = torch.randn(1, 2, 4, 1100, dtype=torch.float64)
    rois = torch.tensor([[0, 1000.3, 0.2, 1003.7, 3.1]], dtype=torch.float64)
    out = segops.ops.roi_align(x.to(DEVICE, torch.float16), rois.to(DEVICE, torch.float32), 2)
    want = ref.roi_align([x.half().double()], rois.float(), None, [1.0], 2, 2, -1, False, "avg")
    assert_close(out, want, RTOL[torch.float16])


# --------------------------------------------------------------------------
# several levels in one launch
# --------------------------------------------------------------------------
def fpn_case(dtype=torch.float64, layout="contiguous", C=3):
    sizes = [(32, 24), (16, 12), (8, 6), (4, 3)]
    features = collections.OrderedDict(
        (f"p{i}", like_layout(torch.randn(2, C, h, w, dtype=dtype).to(DEVICE), layout))
        for i, (h, w) in enumerate(sizes))
    boxes = []
    for _ in range(2):
        b = make_rois(6, 1, 128, 96, seed_kinds=False)[:, 1:]
        b[0] = torch.tensor([0.0, 0.0, 127.0, 95.0])   # the coarsest level
        b[1] = torch.tensor([10.0, 20.0, 14.0, 23.0])  # the finest level
        boxes.append(b.to(dtype).to(DEVICE))
    return features, boxes, [(128, 96), (120, 90)]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_multi_scale_matches_torchvision(layout):
    features, boxes, shapes = fpn_case(layout=layout)
    for f in features.values():
        f.requires_grad_()
    names = ["p0", "p1", "p2", "p3"]
    # a small canonical scale spreads these small images' boxes over all levels
    out = segops.nn.MultiScaleRoIAlign(names, 3, 2, canonical_scale=28)(features, boxes, shapes)
    want = torchvision.ops.MultiScaleRoIAlign(names, 3, 2, canonical_scale=28)(
        features, boxes, shapes)
    assert_close(out, want, F64)
    grad = torch.randn_like(want)
    got_grads = torch.autograd.grad(out, list(features.values()), grad)
    want_grads = torch.autograd.grad(want, list(features.values()), grad)
    for level, (g, w) in enumerate(zip(got_grads, want_grads)):
        assert_close(g, w, F64, name=f"grad, level {level}")


@pytest.mark.parametrize("pool_mode", ["avg", "max"])
def test_multi_scale_aligned_and_deterministic(pool_mode):
    """Detectron2's aligned multi-level pooling; every level's gradient from
    both backward kernels against the reference."""
    features, boxes, _ = fpn_case()
    features = list(features.values())
    rois = _as_rois(boxes)
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    levels = ref.map_levels(rois[:, 1:], 2, 5, canonical_scale=28)
    assert levels.unique().numel() >= 3
    results = kernel_and_reference(features, rois, levels, scales, (2, 2), 2, True, pool_mode)
    check_all(*results, F64)
    out = segops.ops.multi_scale_roi_align(features, boxes, 2, scales, 2, aligned=True,
                                           pool_mode=pool_mode, canonical_scale=28)
    assert_close(out, results[1], F64)


@pytest.mark.parametrize("pool_mode", ["avg", "max"])
def test_multi_level_with_an_empty_map(pool_mode):
    """A 0-row map among the levels: its RoIs pool zeros and its gradient is
    empty; the other levels are pooled and get their gradients from both
    backward kernels."""
    features, boxes, _ = fpn_case()
    features = list(features.values())
    features[1] = features[1][:, :, :0]
    rois = _as_rois(boxes)
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    levels = ref.map_levels(rois[:, 1:], 2, 5, canonical_scale=28)
    assert (levels == 1).any() and (levels != 1).any()
    results = kernel_and_reference(features, rois, levels, scales, (2, 2), 2, False, pool_mode)
    check_all(*results, F64)
    assert results[2][0].abs().sum() > 0


def test_multi_scale_one_level_and_names_filter():
    features, boxes, shapes = fpn_case()
    out = segops.nn.MultiScaleRoIAlign(["p1"], 2, 2)(features, boxes, shapes)
    want = torchvision.ops.MultiScaleRoIAlign(["p1"], 2, 2)(features, boxes, shapes)
    assert_close(out, want, F64)


# --------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------
def test_deterministic_mode_is_bit_identical(launches):
    x = torch.randn(2, 4, 8, 8, dtype=KERNEL_DTYPES[0], device=DEVICE, requires_grad=True)
    rois = make_rois(8, 2, 8, 8).to(DEVICE)
    grad = torch.randn(8, 4, 2, 2, dtype=x.dtype, device=DEVICE)
    with deterministic():
        runs = [torch.autograd.grad(segops.ops.roi_align(x, rois, 2, 1.0, 2), x, grad)[0]
                for _ in range(2)]
    assert launches["_roi_align_bwd_deterministic_kernel"].count == 2
    assert launches["_roi_align_bwd_atomic_kernel"].count == 0
    assert torch.equal(runs[0], runs[1])
    want = ref.roi_align_backward(grad.cpu(), [x.detach().cpu()], rois.cpu(), None, [1.0], 2, 2,
                                  2, False, "avg")[0]
    assert_close(runs[0], want, RTOL[x.dtype], name="grad")


def test_deterministic_backward_memory_is_small():
    """The deterministic path allocates the gradient and O(K) indices, not a
    K x C x PH x PW x samples tensor."""
    if ON_GPU:
        x = torch.randn(2, 16, 64, 64, device=DEVICE)
        rois = make_rois(64, 2, 64, 64).to(DEVICE, torch.float32)
        grad = torch.randn(64, 16, 7, 7, device=DEVICE)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        kernels.roi_align_backward_deterministic(grad, [x], rois, None, [1.0], 7, 7, -1, False,
                                                 "avg")
        extra = torch.cuda.max_memory_allocated() - before
        assert extra <= 2 * x.numel() * 4 + (1 << 20)
    else:
        pytest.skip("needs CUDA memory statistics")


# --------------------------------------------------------------------------
# edges
# --------------------------------------------------------------------------
def test_zero_rois():
    x = torch.randn(2, 3, 5, 5, device=DEVICE, dtype=KERNEL_DTYPES[0], requires_grad=True)
    out = segops.ops.roi_align(x, torch.zeros(0, 5, device=DEVICE), (2, 3))
    assert out.shape == (0, 3, 2, 3)
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    x.grad = None
    with deterministic():
        segops.ops.roi_align(x, [torch.zeros(0, 4, device=DEVICE)] * 2, 2).sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_boxes_give_zeros(bad):
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64, device=DEVICE)
    rois = make_rois(4, 1, 6, 6).to(DEVICE)
    rois[1, 3] = bad
    results = kernel_and_reference([x], rois, None, [1.0], (2, 2), -1, False, "avg")
    check_all(*results, F64)
    assert torch.equal(results[0][1], torch.zeros_like(results[0][1]))


def test_inverted_boxes_aligned_adaptive_give_zeros():
    """aligned=True, adaptive sampling and x2 < x1: no samples, output 0
    (torchvision's CPU kernel throws here)."""
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64, device=DEVICE)
    rois = torch.tensor([[0, 4.0, 4.0, 1.0, 1.0], [0, 1.0, 1.0, 4.0, 4.0]], device=DEVICE,
                        dtype=torch.float64)
    results = kernel_and_reference([x], rois, None, [1.0], (2, 2), -1, True, "avg")
    check_all(*results, F64)
    assert torch.equal(results[0][0], torch.zeros_like(results[0][0]))


def test_reference_path_gradcheck():
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    rois = make_rois(3, 1, 5, 6, seed_kinds=False)
    with _dispatch.reference_only():
        for aligned, mode in [(False, "avg"), (True, "max")]:
            assert torch.autograd.gradcheck(
                lambda t: segops.ops.roi_align(t, rois, 2, 1.0, 2, aligned, pool_mode=mode), (x,))


def test_kernel_path_gradcheck():
    x = torch.randn(1, 2, 4, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    rois = make_rois(2, 1, 4, 5, seed_kinds=False).to(DEVICE)
    assert torch.autograd.gradcheck(lambda t: segops.ops.roi_align(t, rois, 2, 1.0, 1), (x,))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("aligned", [False, True])
def test_double_backward_matches_autograd_over_the_reference(path, aligned):
    """A gradient penalty through RoIAlign (create_graph=True): the
    second-order gradients of <input gradient, probe> with respect to the
    input (zero: the pooling is linear) and to the output gradient (the
    pooling of the probe), against autograd over the pure-PyTorch reference,
    on every path, with the atomic and the deterministic backward. (With a
    constant output gradient the input gradient is a constant: there is no
    second order to take.)"""
    device = path_device(path)
    x = like_layout(torch.randn(2, 3, 6, 7, dtype=torch.float64), "channels_last")
    rois = make_rois(5, 2, 6, 7, 0.5, seed_kinds=False)
    dy = torch.randn(5, 3, 2, 3, dtype=torch.float64)
    probe = torch.randn_like(x)
    options = dict(output_size=(2, 3), spatial_scale=0.5, sampling_ratio=2, aligned=aligned)
    want = second_order_grads(
        lambda t: ref.roi_align([t], rois, None, [0.5], 2, 3, 2, aligned, "avg"),
        [x], dy, [probe])
    for determ in (False, True):
        with on_path(path), deterministic(determ):
            got = second_order_grads(lambda t: segops.ops.roi_align(t, rois.to(device), **options),
                                     [x.to(device)], dy.to(device), [probe.to(device)])
        for name, g, w in zip(("input, first order", "input", "grad_out"), (*got[0], *got[1]),
                              (*want[0], *want[1])):
            assert_close(g, w, F64, name=f"{name}, deterministic {determ}")
        assert got[1][0].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("determ", [False, True], ids=["atomic", "deterministic"])
def test_double_backward_half_precision_views(dtype, determ):
    """A gradient penalty under AMP: fp16/bf16 features and output gradient,
    both non-contiguous views, through both backwards, against autograd over
    the reference in float64 of the same rounded values (the boxes on a
    quarter-pixel grid, exact in either dtype). The output gradient is a
    leaf: with a constant one the input gradient has no second order."""
    def rounded(*shape):
        return torch.randn(*shape).to(dtype).double()

    x, dy, probe = rounded(2, 3, 6, 7), rounded(5, 3, 2, 3), rounded(2, 3, 6, 7)
    rois = make_rois(5, 2, 6, 7, 0.5, seed_kinds=False)
    rois[:, 1:] = (rois[:, 1:] * 4).round() / 4
    options = dict(output_size=(2, 3), spatial_scale=0.5, sampling_ratio=2, aligned=True)
    with deterministic(determ):
        got = second_order_grads(
            lambda t: segops.ops.roi_align(t, rois.to(DEVICE, dtype), **options),
            [x.to(DEVICE, dtype)], dy.to(DEVICE, dtype), [probe.to(DEVICE, dtype)],
            view=lambda t: like_layout(t, "strided"))
    want = second_order_grads(
        lambda t: ref.roi_align([t], rois, None, [0.5], 2, 3, 2, True, "avg"), [x], dy, [probe])
    for name, g, w in zip(("input, first order", "input", "grad_out"), (*got[0], *got[1]),
                          (*want[0], *want[1])):
        assert g.dtype == dtype
        assert_close(g, w, RTOL[dtype], name=name)
    first, second = got
    assert first[0].dtype == dtype and second[0].abs().max() == 0


def test_double_backward_through_one_level_of_several():
    """A penalty on one level's input gradient only: the other level's
    second-order term arrives as None and the output gradient's is the
    pooling of the probe on that level alone."""
    maps = [torch.randn(1, 2, 8, 8, dtype=torch.float64, device=DEVICE, requires_grad=True),
            torch.randn(1, 2, 4, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)]
    boxes = [torch.tensor([[0.0, 0.0, 30.0, 30.0], [1.0, 1.0, 5.0, 6.5]], dtype=torch.float64,
                          device=DEVICE)]
    args = (boxes, 2, [1.0, 0.5], 2)
    out = segops.ops.multi_scale_roi_align(maps, *args, canonical_scale=8, canonical_level=0)
    dy = torch.randn_like(out).requires_grad_()
    g0, _ = torch.autograd.grad(out, maps, dy, create_graph=True)
    probe = torch.randn_like(g0)
    (got,) = torch.autograd.grad((g0 * probe).sum(), dy)
    want = segops.ops.multi_scale_roi_align([probe, torch.zeros_like(maps[1])], *args,
                                            canonical_scale=8,
                                            canonical_level=0)
    assert_close(got, want, F64)
    assert got.abs().max() > 0


def test_zero_spatial_scale_is_torchvisions():
    """spatial_scale = 0 is allowed (every box collapses to the origin), as
    in torchvision."""
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64)
    rois = make_rois(3, 1, 5, 6, seed_kinds=False)
    want = torchvision.ops.roi_align(x, rois, 2, 0.0, 2)
    assert_close(segops.ops.roi_align(x.to(DEVICE), rois.to(DEVICE), 2, 0.0, 2), want, F64)


@pytest.mark.parametrize("path", PATHS)
def test_multi_scale_double_backward_gradgradcheck(path):
    """Numerical second derivatives through every level of the multi-scale
    op (fast_mode: along random directions), one level without RoIs."""
    device = path_device(path)
    maps = [torch.randn(1, 2, 8, 8, dtype=torch.float64, device=device, requires_grad=True),
            torch.randn(1, 2, 4, 4, dtype=torch.float64, device=device, requires_grad=True),
            torch.randn(1, 2, 2, 2, dtype=torch.float64, device=device, requires_grad=True)]
    boxes = [torch.tensor([[0.0, 0.0, 30.0, 30.0], [1.0, 1.0, 5.0, 6.5]], dtype=torch.float64,
                          device=device)]
    with on_path(path):
        assert torch.autograd.gradgradcheck(
            lambda *t: segops.ops.multi_scale_roi_align(list(t), boxes, 2, [1.0, 0.5, 0.25], 2,
                                                        canonical_scale=8),
            tuple(maps), fast_mode=True)


def test_max_pool_double_backward():
    """Max pooling: the second-order gradient with respect to the features
    is zero (almost everywhere), as autograd over the reference gives; with
    respect to the output gradient it raises, naming the pool mode."""
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, device=DEVICE, requires_grad=True)
    rois = make_rois(2, 1, 5, 6, seed_kinds=False).to(DEVICE)
    out = segops.ops.roi_align(x, rois, 2, 1.0, 2, pool_mode="max")
    (gx,) = torch.autograd.grad(out, x, torch.ones_like(out), create_graph=True)
    (second,) = torch.autograd.grad(gx.sum(), x, materialize_grads=True)
    assert second.abs().max() == 0
    dy = torch.ones_like(out).requires_grad_()
    (gx,) = torch.autograd.grad(segops.ops.roi_align(x, rois, 2, 1.0, 2, pool_mode="max"), x,
                                dy, create_graph=True)
    with pytest.raises(NotImplementedError, match="pool_mode='max'"):
        torch.autograd.grad(gx.sum(), dy)


@pytest.mark.parametrize("path", ["kernel", "native"])
def test_opcheck(path):
    device = path_device(path)
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, device=device, requires_grad=True)
    rois = make_rois(3, 2, 5, 4, seed_kinds=False).to(device)
    options = ([1.0], 2, 2, 2, False, "avg")
    grad = torch.randn(3, 3, 2, 2, dtype=torch.float64, device=device)
    with on_path(path):
        for check_batch in (False, True):
            torch.library.opcheck(torch.ops.segops.roi_align.default,
                                  ([x], rois, None, *options, check_batch))
        torch.library.opcheck(torch.ops.segops.roi_align_backward.default,
                              (grad, [x.detach()], rois, None, *options, True))
        torch.library.opcheck(torch.ops.segops.roi_levels.default, (rois, 2, 5, 3, 56.0, 4))


class _BoxHead(torch.nn.Module):
    """A Mask R-CNN box head's pooling step: multi-level RoIAlign then a
    linear layer."""

    def __init__(self, C):
        super().__init__()
        self.pool = segops.nn.MultiScaleRoIAlign(["p0", "p1", "p2", "p3"], 2, 2)
        self.fc = torch.nn.Linear(C * 4, 5, dtype=torch.float64)

    def forward(self, features, boxes, shapes):
        return self.fc(self.pool(features, boxes, shapes).flatten(1))


def test_compile_fullgraph_through_multi_scale():
    features, boxes, shapes = fpn_case(dtype=torch.float64, C=2)
    head = _BoxHead(2).to(DEVICE)
    head.pool.scales = head.pool.setup_scales(list(features.values()), shapes)
    backend = "inductor" if ON_GPU else "aot_eager"
    compiled = torch.compile(head, fullgraph=True, backend=backend)
    leaves = {k: v.requires_grad_() for k, v in features.items()}
    out = compiled(leaves, boxes, shapes)
    grads = torch.autograd.grad(out.sum(), list(leaves.values()))
    want = head(leaves, boxes, shapes)
    want_grads = torch.autograd.grad(want.sum(), list(leaves.values()))
    assert_close(out, want, F64)
    for g, w in zip(grads, want_grads):
        assert_close(g, w, F64, name="grad")


def test_compile_dynamic_with_float_arguments():
    """torch.compile(fullgraph=True, dynamic=True) makes the modules' and the
    defaults' floats symbolic (spatial_scale, the inferred scales): the
    argument checks trace them (math.isfinite could not)."""
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64, device=DEVICE)
    rois = make_rois(3, 1, 16, 16, seed_kinds=False).to(DEVICE)
    single = segops.nn.RoIAlign(2, 0.5, 2)
    features = {"0": torch.randn(1, 2, 16, 16, dtype=torch.float64, device=DEVICE), "1": x}
    multi = segops.nn.MultiScaleRoIAlign(["0", "1"], 2, 2)
    calls = [lambda: single(x, rois), lambda: segops.ops.roi_align(x, rois, 2),
             lambda: multi(features, [rois[:, 1:] * 4], [(64, 64)])]
    for call in calls:
        want = call()
        torch._dynamo.reset()
        got = torch.compile(call, backend="eager", fullgraph=True, dynamic=True)()
        assert_close(got, want, F64)


@pytest.mark.skipif(ON_GPU, reason="a failed device assert ends the CUDA context: the "
                                   "child-process test covers CUDA")
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("multi", [False, True])
def test_batch_indices_are_checked_inside_torch_compile(path, multi):
    """validate_args inside torch.compile(fullgraph=True): a device assert
    (a host read would break the graph); it was skipped, and a batch index
    3 of 1 pooled zeros silently."""
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    rois = torch.tensor([[3.0, 1.0, 1.0, 4.0, 5.0]], dtype=torch.float64)

    def call(x, rois):
        if multi:
            return segops.ops.multi_scale_roi_align([x, x[..., ::2, ::2]], rois, 2, [1, 0.5])
        return segops.ops.roi_align(x, rois, 2)
    assert_checked_eager_and_compiled(call, (x, rois), path, "batch index",
                                      "batch index that is not an integer")


def test_autocast_keeps_input_dtype():
    half = torch.float16 if ON_GPU else torch.bfloat16
    x = torch.randn(1, 2, 5, 5, device=DEVICE, dtype=half, requires_grad=True)
    rois = make_rois(3, 1, 5, 5, seed_kinds=False).to(DEVICE, torch.float32)
    with torch.autocast(DEVICE.type, dtype=half):
        out = segops.ops.roi_align(x, rois, 2, 1.0, 2)
        out32 = segops.ops.roi_align(x.float(), rois, 2, 1.0, 2)
    assert out.dtype == half and out32.dtype == torch.float32
    out.float().sum().backward()
    assert x.grad.dtype == half


def test_module_repr_and_state():
    m = segops.nn.RoIAlign((7, 7), 0.25, 2, aligned=True)
    assert repr(m) == repr(torchvision.ops.RoIAlign((7, 7), 0.25, 2, aligned=True))
    assert m.state_dict() == {}
    x = torch.randn(1, 2, 8, 8, device=DEVICE, dtype=KERNEL_DTYPES[0])
    rois = make_rois(2, 1, 32, 32, seed_kinds=False).to(DEVICE, KERNEL_DTYPES[0])
    want = torchvision.ops.RoIAlign((7, 7), 0.25, 2, aligned=True)(x, rois)
    assert_close(m(x, rois), want, RTOL[KERNEL_DTYPES[0]])


# --------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------
def _x():
    return torch.randn(2, 3, 5, 5, device=DEVICE)


BAD_CALLS = [
    ("boxes as a tensor must have shape", segops.ArgumentError,
     lambda: ((_x(), torch.zeros(3, 4)), {})),
    ("must have shape \\(L, 4\\)", segops.ArgumentError,
     lambda: ((_x(), [torch.zeros(3, 5)]), {})),
    ("empty list", segops.ArgumentError, lambda: ((_x(), []), {})),
    ("must be a Tensor\\[K, 5\\]", segops.ArgumentTypeError,
     lambda: ((_x(), "boxes"), {})),
    ("batch index 2.0", segops.ArgumentError,
     lambda: ((_x(), torch.tensor([[2.0, 0, 0, 1, 1]])), {})),
    ("batch index 0.5", segops.ArgumentError,
     lambda: ((_x(), torch.tensor([[0.5, 0, 0, 1, 1]])), {})),
    ("batch index nan", segops.ArgumentError,
     lambda: ((_x(), torch.tensor([[float("nan"), 0, 0, 1, 1]])), {})),
    ("3 tensors, one per image, for a batch of 2", segops.ArgumentError,
     lambda: ((_x(), [torch.zeros(1, 4)] * 3), {})),
    ("3 tensors, one per image, for a batch of 2", segops.ArgumentError,
     lambda: ((_x(), [torch.zeros(1, 4)] * 3), {"validate_args": False})),
    ("real coordinates", segops.ArgumentTypeError,
     lambda: ((_x(), torch.zeros(1, 5, dtype=torch.bool)), {})),
    ("spatial_scale must be >= 0", segops.ArgumentError,
     lambda: ((_x(), torch.zeros(1, 5)), {"spatial_scale": -1.0})),
    ("output_size must be positive", segops.ArgumentError,
     lambda: ((_x(), torch.zeros(1, 5)), {"output_size": (0, 2)})),
    ("output_size must be an int or a pair", segops.ArgumentTypeError,
     lambda: ((_x(), torch.zeros(1, 5)), {"output_size": 2.5})),
    ("sampling_ratio must be an int", segops.ArgumentTypeError,
     lambda: ((_x(), torch.zeros(1, 5)), {"sampling_ratio": 1.5})),
    ("sampling_ratio must be <= 46340, got 46341", segops.ArgumentError,
     lambda: ((_x(), torch.zeros(0, 5)), {"sampling_ratio": 46341})),
    ("pool_mode must be one of", segops.ArgumentError,
     lambda: ((_x(), torch.zeros(1, 5)), {"pool_mode": "sum"})),
    ("input must have 4 dimensions", segops.ArgumentError,
     lambda: ((torch.randn(3, 5, 5), torch.zeros(1, 5)), {})),
    ("input must have dtype", segops.ArgumentTypeError,
     lambda: ((torch.zeros(1, 2, 3, 3, dtype=torch.int32), torch.zeros(1, 5)), {})),
]


@pytest.mark.parametrize("match,error,make", BAD_CALLS,
                         ids=[f"{m} {i}" for i, (m, _, _) in enumerate(BAD_CALLS)])
def test_bad_input_errors(match, error, make):
    (x, boxes), kwargs = make()
    if match.startswith("batch index"):
        x = x.cpu()  # on CUDA a device-side assert: test_bad_batch_index_asserts_on_cuda
    if isinstance(boxes, torch.Tensor):
        boxes = boxes.to(x.device)
    elif isinstance(boxes, list):
        boxes = [b.to(x.device) for b in boxes]
    kwargs.setdefault("output_size", 2)
    with pytest.raises(error, match=match):
        segops.ops.roi_align(x, boxes, **kwargs)


def test_bad_multi_scale_input_errors():
    features, boxes, _ = fpn_case()
    maps = list(features.values())
    with pytest.raises(segops.ArgumentError, match="2 scales for 4"):
        segops.ops.multi_scale_roi_align(maps, boxes, 2, [1 / 4, 1 / 8])
    with pytest.raises(segops.ArgumentError, match="3 scales for 2"):
        segops.ops.multi_scale_roi_align(maps[:2], boxes, 2, [1 / 4, 1 / 8, 1 / 16])
    for bad in (0, -224.0):
        with pytest.raises(segops.ArgumentError, match="canonical_scale must be > 0"):
            segops.ops.multi_scale_roi_align(maps[:2], boxes, 2, [1 / 4, 1 / 8],
                                             canonical_scale=bad)
    for bad in (0, 0.0, -0.25):
        with pytest.raises(segops.ArgumentError, match=r"scales\[1\] must be > 0"):
            segops.ops.multi_scale_roi_align(maps[:2], boxes, 2, [1 / 4, bad])
    with pytest.raises(segops.ArgumentError, match=r"scales\[0\] must be finite"):
        segops.ops.multi_scale_roi_align(maps[:2], boxes, 2, [float("nan"), 1 / 8])
    with pytest.raises(segops.ArgumentTypeError, match=r"scales\[0\] must be a number"):
        segops.ops.multi_scale_roi_align(maps[:2], boxes, 2, ["1/4", 1 / 8])
    with pytest.raises(segops.ArgumentTypeError, match="dtype"):
        segops.ops.multi_scale_roi_align([maps[0], maps[1].float()], boxes, 2, [1 / 4, 1 / 8])
    for other in (maps[1][:, :1], maps[1][:1]):   # fewer channels, fewer images
        with pytest.raises(segops.ArgumentError, match=r"input\[1\] has \(N, C\)"):
            segops.ops.multi_scale_roi_align([maps[0], other], boxes, 2, [1 / 4, 1 / 8])
    with pytest.raises(ValueError, match="image_shapes is empty"):
        segops.nn.MultiScaleRoIAlign(["p0"], 2, 2)(features, boxes, [])


@pytest.mark.skipif(not ON_GPU, reason="needs a second device")
def test_boxes_on_another_device():
    with pytest.raises(ValueError, match="one device"):
        segops.ops.roi_align(_x(), torch.zeros(1, 5), 2)


def test_offsets_past_2_to_the_31():
    """A single-channel map of 46341^2 > 2^31 elements: a box in its last rows
    and columns reads through 64-bit offsets (forward; only the region near
    the box is initialised, the rest is never read)."""
    side = 46341
    try:
        x = torch.empty((1, 1, side, side), dtype=torch.bfloat16, device=DEVICE)
    except RuntimeError:
        pytest.skip("not enough memory for a 4.3 GB map")
    corner = torch.randn(1, 1, 8, 8, dtype=torch.float64).to(torch.bfloat16)
    x[:, :, -8:, -8:] = corner.to(DEVICE)
    rois = torch.tensor([[0, side - 6.5, side - 7.0, side - 1.2, side - 0.5]],
                        dtype=torch.float64)
    out = segops.ops.roi_align(x, rois.to(DEVICE), 2, 1.0, 2)
    local = rois.clone()
    local[:, 1:] -= side - 8
    want = ref.roi_align([corner.double()], local, None, [1.0], 2, 2, 2, False, "avg")
    assert_close(out, want, RTOL[torch.bfloat16])


# --------------------------------------------------------------------------
# reversed and degenerate boxes (negative and zero bin sizes)
# --------------------------------------------------------------------------
# (x1, y1, x2, y2) in a 10x11 map (two 8x8 tiles of the deterministic kernel
# per axis, which the boxes cross): x reversed, y reversed, both, zero-size,
# zero width, a normal box for contrast, and two boxes whose samples reach
# the next tile although the box itself stops short of it (what the gather
# kernel's per-RoI reach must allow for): a 0.1-pixel box, which legacy mode
# widens to 1 pixel, and a box from 8.2, which aligned mode shifts to 7.7
ODD_BOXES = [[9.5, 1.0, 1.2, 9.0], [1.0, 9.2, 10.0, 0.7], [10.0, 9.5, 0.5, 1.5],
             [8.5, 2.5, 8.5, 2.5], [3.0, 0.5, 3.0, 9.5], [0.5, 1.0, 9.0, 9.0],
             [6.5, 6.5, 6.6, 6.6], [8.2, 8.2, 9.8, 9.8]]


def odd_rois(dtype=torch.float64):
    boxes = torch.tensor(ODD_BOXES, dtype=torch.float64)
    batch = torch.arange(len(ODD_BOXES), dtype=torch.float64)[:, None] % 2
    return torch.cat([batch, boxes], 1).to(dtype)


def torchvision_rows(rois, sampling_ratio, aligned):
    """Rows torchvision's CPU kernel accepts: with aligned adaptive sampling
    it throws on a box reversed along one axis only."""
    if not aligned or sampling_ratio > 0:
        return torch.arange(rois.shape[0])
    reversed_x = rois[:, 3] < rois[:, 1]
    reversed_y = rois[:, 4] < rois[:, 2]
    return torch.nonzero(reversed_x == reversed_y).flatten()


@pytest.mark.parametrize("aligned", [False, True], ids=["legacy", "aligned"])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2])
def test_reversed_and_degenerate_boxes(aligned, sampling_ratio, launches):
    """Forward and both backward kernels against the reference, and the op
    (atomic and deterministic backward) against torchvision itself."""
    x = torch.randn(2, 3, 10, 11, dtype=torch.float64)
    rois = odd_rois()
    results = kernel_and_reference([x.to(DEVICE)], rois.to(DEVICE), None, [1.0], (2, 3),
                                   sampling_ratio, aligned, "avg")
    check_all(*results, F64)

    rows = torchvision_rows(rois, sampling_ratio, aligned)
    xt = x.clone().requires_grad_()
    want = torchvision.ops.roi_align(xt, rois[rows], (2, 3), 1.0, sampling_ratio, aligned)
    grad = torch.randn(rois.shape[0], 3, 2, 3, dtype=torch.float64)
    (want_grad,) = torch.autograd.grad(want, xt, grad[rows])
    xd = x.to(DEVICE).requires_grad_()
    for determ in (False, True):
        with deterministic(determ):
            out = segops.ops.roi_align(xd, rois.to(DEVICE), (2, 3), 1.0, sampling_ratio, aligned)
            (got_grad,) = torch.autograd.grad(out, xd, grad.to(DEVICE))
        assert_close(out[rows.to(DEVICE)], want, F64)
        assert_close(got_grad, want_grad, F64, name=f"grad, deterministic={determ}")
    assert launches["_roi_align_bwd_deterministic_kernel"].count == 2  # helper + op
    assert launches["_roi_align_bwd_atomic_kernel"].count == 2

    # the native path keeps torchvision away from the rows it throws on
    xn = x.clone().requires_grad_()
    with _dispatch.native_only():
        out = segops.ops.roi_align(xn, rois, (2, 3), 1.0, sampling_ratio, aligned)
        (got_grad,) = torch.autograd.grad(out, xn, grad)
    assert_close(out[rows], want, F64)
    assert_close(out, results[1], F64, name="native vs reference")
    assert_close(got_grad, want_grad, F64, name="native grad")


# --------------------------------------------------------------------------
# multi-scale: maps not one level apart, boxes with no level
# --------------------------------------------------------------------------
def sparse_pyramid_case():
    """torchvision's MultiScaleRoIAlign docstring example: maps at 1/8 and
    1/32 of a 512x512 image (levels 3 and 5; level 4 is missing), with boxes
    on every level index (0, 1 and 2, which matches no map), boxes reversed
    along one axis (NaN level) and along both (positive area)."""
    features = collections.OrderedDict([
        ("feat1", torch.randn(2, 3, 64, 64, dtype=torch.float64)),
        ("feat2", torch.randn(2, 3, 32, 32, dtype=torch.float64)),  # not pooled
        ("feat3", torch.randn(2, 3, 16, 16, dtype=torch.float64)),
    ])
    boxes = [torch.tensor([[10.0, 20.0, 60.0, 70.0],      # small: level 3 -> index 0
                           [0.0, 0.0, 300.0, 260.0],      # level 4 -> index 1 (feat3)
                           [5.0, 5.0, 500.0, 510.0],      # level 5 -> index 2: zeros
                           [200.0, 20.0, 40.0, 300.0],    # x reversed: NaN level, zeros
                           [300.0, 400.0, 100.0, 90.0]],  # both reversed: pooled
                          dtype=torch.float64),
             torch.tensor([[100.0, 120.0, 130.0, 400.0], [30.0, 300.0, 31.0, 100.0]],
                          dtype=torch.float64)]
    return features, boxes, [(512, 512), (500, 480)]


@pytest.mark.parametrize("path", PATHS)
def test_multi_scale_levels_not_one_apart(path, launches):
    device = path_device(path)
    features, boxes, shapes = sparse_pyramid_case()
    names = ["feat1", "feat3"]
    leaves = {k: v.clone().requires_grad_() for k, v in features.items()}
    want = torchvision.ops.MultiScaleRoIAlign(names, 3, 2)(leaves, boxes, shapes)
    grad = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, [leaves[n] for n in names], grad)
    assert torch.equal(want[[2, 3]], torch.zeros_like(want[[2, 3]]))
    assert want[[0, 1, 4]].abs().amin(dim=(1, 2, 3)).gt(0).all()  # pooled, on both maps

    ours = {k: v.to(device).requires_grad_() for k, v in features.items()}
    module = segops.nn.MultiScaleRoIAlign(names, 3, 2)
    for determ in (False, True):
        with on_path(path), deterministic(determ):
            out = module(ours, [b.to(device) for b in boxes], shapes)
            got_grads = torch.autograd.grad(out, [ours[n] for n in names], grad.to(device))
        assert_close(out, want, F64)
        for level, (g, w) in enumerate(zip(got_grads, want_grads)):
            assert_close(g, w, F64, name=f"grad, level {level}, deterministic={determ}")
    if path == "kernel":  # one launch for all levels, each direction
        assert launches["_roi_levels_kernel"].count == 2
        assert launches["_roi_align_fwd_kernel"].count == 2
        assert launches["_roi_align_bwd_atomic_kernel"].count == 1
        assert launches["_roi_align_bwd_deterministic_kernel"].count == 1


# --------------------------------------------------------------------------
# the level of each RoI: segops::roi_levels (kernel) against its composite
# --------------------------------------------------------------------------
# (canonical_scale, canonical_level, k_min, k_max, number of maps)
LEVEL_RULES = [(224, 4, 2, 5, 4),   # torchvision's defaults on P2-P5
               (28, 4, 2, 5, 4),
               (16, 3, 1, 3, 2),    # maps not one level apart: index 2 matches none
               (224, 4, 2, 2, 2)]   # scales 1/4 and 1/5: one level, no threshold


def _int_view(dtype):
    return torch.int64 if dtype == torch.float64 else torch.int32


def _rois_of_areas(areas: torch.Tensor) -> torch.Tensor:
    """Boxes (0, 0, a, 1), whose area (a - 0) * (1 - 0) is a exactly."""
    zero = torch.zeros_like(areas)
    return torch.stack([zero, zero, zero, areas, zero + 1], 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rule", LEVEL_RULES)
def test_roi_levels_kernel_matches_composite_at_every_threshold(dtype, rule, launches):
    """The kernel's level (a count of area thresholds) against torch's
    formula on the same device, bit for bit: on the 2001 areas nearest each
    threshold (where the rounding of sqrt, division and log2 decides the
    level), at 0, -0, +-inf, NaN, negative, subnormal and the largest areas,
    and on random, degenerate and reversed boxes; the rois a column-major
    view."""
    scale, level, k_min, k_max, maps = rule
    thresholds = ops_module._level_thresholds(dtype, DEVICE, k_min, k_max, scale, level)
    assert thresholds.dtype == dtype and thresholds.shape == (k_max - k_min,)
    windows = [(t.view(_int_view(dtype)) + torch.arange(-1000, 1001, device=DEVICE)
                .to(_int_view(dtype))).view(dtype) for t in thresholds]
    info = torch.finfo(dtype)
    special = torch.tensor([0.0, -0.0, np.inf, -np.inf, np.nan, -1.0, info.tiny / 4, info.max,
                            info.eps], dtype=dtype, device=DEVICE)
    random = make_rois(24, 2, 64, 64, 1 / 8, dtype).to(DEVICE)
    random[:4, [1, 3]] = random[:4, [3, 1]]          # x reversed: negative area
    random[4:8, 1:] = random[4:8, [3, 4, 1, 2]]      # both reversed: positive area
    rois = torch.cat([_rois_of_areas(torch.cat([special, *windows])), random])
    rois[:, 0] = torch.arange(rois.shape[0], device=DEVICE) % 2
    view = rois.t().contiguous().t()
    got = ops_module._roi_levels(view, k_min, k_max, maps, scale, level)
    want = ops_module._levels_composite(rois, k_min, k_max, maps, scale, level)
    assert launches["_roi_levels_kernel"].count == 1
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0, equal_nan=True)
    for b, window in enumerate(windows, 1):
        reached = ref.area_levels(window, k_min, k_max, scale, level) >= b
        assert not reached[999] and reached[1000:].all(), f"threshold {b} is not the smallest"
        assert not reached[:1000].any(), f"level {b} reached below threshold {b}"


@pytest.mark.parametrize("dtype, k_range, in_kernel", [
    (torch.float32, (2, 5), True), (torch.float64, (2, 5), True),
    (torch.float16, (2, 5), False), (torch.bfloat16, (2, 5), False),
    (torch.float32, (3, 3), True),     # one level (e.g. scales 1/8 and 1/12)
    (torch.float32, (5, 2), False)])   # maps coarsest first: every box unmatched
def test_roi_levels_dispatch(dtype, k_range, in_kernel, launches):
    """float32/float64 boxes and an ascending level range take the kernel;
    the others torch's composite (half-precision boxes round each step of
    the formula in their dtype, as torchvision does), with its answer."""
    rois = make_rois(16, 2, 64, 64, 1 / 8, dtype).to(DEVICE)
    with on_path("kernel"):
        got = ops_module._roi_levels(rois, *k_range, 4, 56, 4)
    assert launches["_roi_levels_kernel"].count == int(in_kernel)
    want = ops_module._levels_composite(rois, *k_range, 4, 56, 4)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    if k_range[0] > k_range[1]:
        assert got[0][:, 0].eq(-1).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int16, torch.int64,
                                   torch.float32, torch.float64])
@pytest.mark.parametrize("path", PATHS)
def test_levels_follow_level_mapper_for_every_box_dtype(dtype, path):
    """Levels as torchvision's LevelMapper gives them for boxes of any dtype:
    its box_area computes float16/bfloat16 areas in float32 (a 300 x 300
    box's area, 90000, overflows float16) and integer areas exactly; the
    pooled coordinates keep their digits (float64 for a list of integer
    boxes)."""
    from torchvision.ops import poolers

    sides = torch.tensor([[10, 12], [100, 90], [224, 224], [300, 300], [700, 650], [40, 500]])
    corner = torch.tensor([[3, 5], [20, 7], [0, 0], [11, 13], [1, 2], [9, 4]])
    boxes = torch.cat([corner, corner + sides], 1).to(dtype)
    want = poolers.LevelMapper(2, 5)([boxes])
    assert want.tolist() == [0, 0, 2, 2, 3, 1]   # in every dtype
    assert ref.map_levels(boxes, 2, 5).tolist() == want.tolist()
    device = path_device(path)
    rois = _as_rois([boxes.to(device)])
    with on_path(path):
        out, levels = ops_module._assign_levels(rois, [1 / 4, 1 / 8, 1 / 16, 1 / 32], 224, 4,
                                                dtype)
    assert levels.cpu().tolist() == want.tolist()
    assert torch.equal(out[:, 1:], rois[:, 1:].to(out.dtype)) and out[:, 0].eq(0).all()
    assert out.dtype == (torch.float64 if not dtype.is_floating_point or dtype == torch.float64
                         else torch.float32)


@pytest.mark.parametrize("path", PATHS)
def test_float64_boxes_at_a_level_threshold_take_torchvisions_level(path):
    """float64 boxes get their level from float64 arithmetic, as torchvision's
    LevelMapper computes it: a box just under level 5's side (448 * 2^-1e-6
    for 224 / 4) is on level 4 there, on level 5 in float32."""
    from torchvision.ops import poolers
    side = 448 * 2 ** -1e-6 - 3.5e-5
    boxes = torch.tensor([[1.0, 2.0, 1.0 + side, 2.0 + side], [3.0, 1.0, 40.0, 30.0]],
                         dtype=torch.float64)
    assert poolers.LevelMapper(2, 5)([boxes]).tolist() == [2, 0]
    assert poolers.LevelMapper(2, 5)([boxes.float()]).tolist() == [3, 0]
    names = ["p0", "p1", "p2", "p3"]
    features = {n: torch.randn(1, 2, 32 >> i, 24 >> i, dtype=torch.float64)
                for i, n in enumerate(names)}
    want = torchvision.ops.MultiScaleRoIAlign(names, 2, 2)(features, [boxes], [(128, 96)])
    device = path_device(path)
    with on_path(path):
        got = segops.ops.multi_scale_roi_align([f.to(device) for f in features.values()],
                                               [boxes.to(device)], 2,
                                               [1 / 4, 1 / 8, 1 / 16, 1 / 32], 2)
    assert_close(got, want, F64)


@pytest.mark.parametrize("path", PATHS)
def test_a_box_list_of_mixed_dtypes_is_promoted_like_torch_cat(path):
    """torchvision cats a box list (dtype promotion), so an empty float32
    (or int64) first image does not round image 1's float64 boxes to float32: the
    level (the box at level 5's threshold above) and the pooling are
    float64's. Likewise an empty fp16 tensor before float32 boxes keeps
    1000.3 (fp16 would round it to 1000.5)."""
    side = 448 * 2 ** -1e-6 - 3.5e-5
    box = torch.tensor([[1.0, 2.0, 1.0 + side, 2.0 + side]], dtype=torch.float64)
    names = ["p0", "p1", "p2", "p3"]
    features = {n: torch.randn(2, 2, 32 >> i, 24 >> i, dtype=torch.float64)
                for i, n in enumerate(names)}
    device = path_device(path)
    for empty in (torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.int64)):
        boxes = [empty, box]
        want = torchvision.ops.MultiScaleRoIAlign(names, 2, 2)(features, boxes, [(128, 96)] * 2)
        with on_path(path):
            got = segops.nn.MultiScaleRoIAlign(names, 2, 2)(
                {n: f.to(device) for n, f in features.items()}, [b.to(device) for b in boxes],
                [(128, 96)] * 2)
        assert_close(got, want, F64)
    x = torch.randn(2, 1, 4, 1100)
    boxes = [torch.zeros(0, 4, dtype=torch.float16), torch.tensor([[1000.3, 0.2, 1003.7, 3.1]])]
    want = torchvision.ops.roi_align(x, boxes, 2, 1.0, 2)
    with on_path(path):
        got = segops.ops.roi_align(x.to(device), [b.to(device) for b in boxes], 2, 1.0, 2)
    assert_close(got, want, RTOL[torch.float32])


def test_integer_box_list_takes_torchvisions_float32_level():
    """A list of integer boxes gets torchvision's level, whose box_area takes
    them to float32: [0, 0, 7159, 7177] (area 51380143) is on level 9 there,
    on 8 in float64; the pooling keeps every digit."""
    from torchvision.ops import poolers
    boxes = torch.tensor([[0, 0, 7159, 7177], [100, 200, 1000, 900]])
    levels = poolers.LevelMapper(8, 9)([boxes])
    assert levels.tolist() == [1, 0] and poolers.LevelMapper(8, 9)([boxes.double()])[0] == 0
    maps = [torch.randn(1, 2, 32, 32, dtype=torch.float64),
            torch.randn(1, 2, 16, 16, dtype=torch.float64)]
    scales = [1 / 256, 1 / 512]
    rois = torch.cat([torch.zeros(2, 1), boxes], 1).double()
    want = torch.cat([torchvision.ops.roi_align(maps[level], rois[i:i + 1], 2, scales[level], 2)
                      for i, level in enumerate(levels.tolist())])
    got = segops.ops.multi_scale_roi_align([m.to(DEVICE) for m in maps], [boxes.to(DEVICE)], 2,
                                           scales, 2)
    assert_close(got, want, F64)


def test_roi_levels_first_call_refuses_graph_capture(monkeypatch):
    """The threshold table is built eagerly, never inside a CUDA graph
    capture (its ops would run only at replay, the table would stay
    unwritten): a clear error; once built, capture may use it."""
    rois = make_rois(4, 1, 64, 64, 1 / 8, torch.float32).to(DEVICE)
    args = (2, 4, 3, 56.0 + 1 / 3, 4)
    monkeypatch.setattr(ops_module, "_THRESHOLDS", {})
    monkeypatch.setattr(ops_module, "_capturing", lambda device: True)
    with on_path("kernel"), pytest.raises(RuntimeError, match="warm-up"):
        ops_module._roi_levels(rois, *args)
    with on_path("kernel"):   # no RoI, no table needed
        assert ops_module._roi_levels(rois[:0], *args)[1].shape == (0,)
    monkeypatch.setattr(ops_module, "_capturing", lambda device: False)
    with on_path("kernel"):
        want = ops_module._roi_levels(rois, *args)
    monkeypatch.setattr(ops_module, "_capturing", lambda device: True)
    with on_path("kernel"):
        got = ops_module._roi_levels(rois, *args)
    assert torch.equal(got[1], want[1])


def test_multi_scale_forward_makes_few_dispatcher_calls():
    """The level mapping is one op: the forward of a list of boxes on two
    maps is 2 segops ops and the list's stacking (LevelMapper's composite
    was 31 more calls, each a launch and host time on a GPU)."""
    maps = [torch.randn(2, 4, 16, 16, device=DEVICE), torch.randn(2, 4, 8, 8, device=DEVICE)]
    boxes = [make_rois(5, 1, 64, 64, 1 / 4, torch.float32)[:, 1:].to(DEVICE)] * 2
    with on_path("kernel"):
        segops.ops.multi_scale_roi_align(maps, boxes, 2, [1 / 4, 1 / 8], 2)  # thresholds
        with DispatchCalls() as calls:
            segops.ops.multi_scale_roi_align(maps, boxes, 2, [1 / 4, 1 / 8], 2)
    assert [n for n in calls.names if n.startswith("segops.")] == [
        "segops.roi_levels.default", "segops.roi_align.default"]
    assert len(calls.names) <= 8, calls.names


@pytest.mark.parametrize("pool_mode", ["avg", "max"])
def test_multi_scale_unmatched_boxes_on_both_backward_kernels(pool_mode):
    """The rois/levels the op builds for a sparse pyramid, through the kernels
    and the reference directly: unmatched boxes pool nothing on any path."""
    features, boxes, _ = sparse_pyramid_case()
    maps = [features["feat1"], features["feat3"]]
    rois, levels = ops_module._assign_levels(_as_rois(boxes), [1 / 8, 1 / 32], 224, 4,
                                             torch.float64)
    assert rois[[2, 3], 0].eq(-1).all() and levels.lt(2).all()
    results = kernel_and_reference([m.to(DEVICE) for m in maps], rois.to(DEVICE),
                                   levels.to(DEVICE), [1 / 8, 1 / 32], (2, 2), 2, False,
                                   pool_mode)
    check_all(*results, F64)
    assert torch.equal(results[1][[2, 3]], torch.zeros_like(results[1][[2, 3]]))


@pytest.mark.parametrize("path", PATHS)
def test_multi_scale_scales_not_powers_of_two(path):
    """Scales 0.3 and 0.1: levels int(-log2 s) = 1 and 3, as torchvision's
    LevelMapper (truncation); boxes on level index 2 match no map."""
    from torchvision.ops import poolers

    device = path_device(path)
    maps = [torch.randn(1, 2, 29, 29, dtype=torch.float64),
            torch.randn(1, 2, 10, 10, dtype=torch.float64)]
    boxes = [torch.tensor([[1.0, 2.0, 9.0, 12.0], [3.0, 3.0, 40.0, 50.0],
                           [0.0, 0.0, 95.0, 90.0]], dtype=torch.float64)]
    scales = [0.3, 0.1]
    mapper = poolers.LevelMapper(1, 3, canonical_scale=32, canonical_level=2)
    assert mapper(boxes).tolist() == [0, 1, 2]
    want = poolers._multiscale_roi_align(maps, boxes, (2, 2), 2, scales, mapper)
    with on_path(path):
        out = segops.ops.multi_scale_roi_align([m.to(device) for m in maps],
                                               [b.to(device) for b in boxes], 2, scales, 2,
                                               canonical_scale=32, canonical_level=2)
    assert_close(out, want, F64)


def test_multi_scale_one_map_pools_reversed_boxes():
    """One map: no level mapping (torchvision calls roi_align directly), so a
    box reversed along one axis is pooled, not dropped."""
    features, boxes, shapes = sparse_pyramid_case()
    want = torchvision.ops.MultiScaleRoIAlign(["feat2"], 2, 2)(features, boxes, shapes)
    ours = {k: v.to(DEVICE) for k, v in features.items()}
    out = segops.nn.MultiScaleRoIAlign(["feat2"], 2, 2)(ours, [b.to(DEVICE) for b in boxes],
                                                        shapes)
    assert_close(out, want, F64)
    assert want[3].abs().sum() > 0


# --------------------------------------------------------------------------
# max pooling: NaN propagates
# --------------------------------------------------------------------------
def _nan_case():
    """4x4 maps; one RoI, one bin, samples at (1, 1), (1, 3), (3, 1), (3, 3)
    (integers: each reads one pixel with weight 1). Channel 0 has NaN at
    pixels (3, 3) and (1, 1): the bin is NaN and its gradient goes to (1, 1),
    the first NaN sample. Channel 1 is -inf at samples' pixels... no: channel
    1 is finite, its max at (3, 1)."""
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    x[0, 0, 3, 3] = float("nan")
    x[0, 0, 1, 1] = float("nan")
    x[0, 1] = torch.arange(16, dtype=torch.float64).view(4, 4) * 0.1
    x[0, 1, 3, 1] = 5.0
    rois = torch.tensor([[0, 0.0, 0.0, 4.0, 4.0]], dtype=torch.float64)
    return x, rois


@pytest.mark.parametrize("path", PATHS)
def test_max_pool_nan_propagates(path):
    x, rois = _nan_case()
    device = path_device(path)
    xd = x.to(device).requires_grad_()
    with on_path(path):
        out = segops.ops.roi_align(xd, rois.to(device), 1, 1.0, 2, pool_mode="max")
        for determ in (False, True):
            with deterministic(determ):
                (grad,) = torch.autograd.grad(out, xd, torch.full_like(out, 2.0),
                                              retain_graph=True)
            want = torch.zeros_like(x)
            want[0, 0, 1, 1] = 2.0
            want[0, 1, 3, 1] = 2.0
            assert torch.equal(grad.cpu(), want), f"deterministic={determ}"
    assert torch.isnan(out[0, 0, 0, 0]) and out[0, 1, 0, 0].item() == 5.0


def test_max_pool_all_minus_inf_bin_gradient_to_first_sample():
    """A bin whose samples are all -inf: the output is -inf and the gradient
    goes to the first sample (at (1.25, 1.25): fractional, so its four
    weights are all non-zero and no 0 * inf NaN appears)."""
    x = torch.full((1, 1, 4, 4), -float("inf"), dtype=torch.float64)
    rois = torch.tensor([[0, 0.5, 0.5, 3.5, 3.5]], dtype=torch.float64)
    results = kernel_and_reference([x.to(DEVICE)], rois.to(DEVICE), None, [1.0], (1, 1), 2,
                                   False, "max", grad=torch.ones(1, 1, 1, 1, dtype=torch.float64))
    check_all(*results, F64)
    want = torch.zeros(4, 4, dtype=torch.float64)
    want[1:3, 1:3] = torch.tensor([[0.75 * 0.75, 0.75 * 0.25], [0.25 * 0.75, 0.25 * 0.25]])
    assert torch.equal(results[4][0][0, 0], want)


def test_max_pool_finite_ties_gradient_to_first_sample():
    """Ties on finite values (a map of zeros: every sample is exactly 0):
    the first sample of each bin (row-major) takes the gradient, as in
    the reference and torch's max pooling, on both backward kernels."""
    x = torch.zeros(1, 2, 6, 7, dtype=torch.float64)
    rois = torch.tensor([[0, 0.3, 0.6, 5.2, 4.9], [0, 1.1, 0.2, 6.0, 5.5]], dtype=torch.float64)
    results = kernel_and_reference([x.to(DEVICE)], rois.to(DEVICE), None, [1.0], (2, 2), 2,
                                   True, "max")
    check_all(*results, F64)
    assert results[4][0].abs().amax(dim=(2, 3)).min() > 0


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_max_pool_nan_kernels_match_reference(layout):
    """Random maps with NaN pixels, every kind of box: forward (NaN in the
    same places) and both backward kernels against the reference."""
    x = torch.randn(2, 3, 6, 8, dtype=torch.float64)
    x.view(-1)[torch.randperm(x.numel())[:6]] = float("nan")
    x[:, :, 2:4, 3] = float("nan")
    x = like_layout(x.to(DEVICE), layout)
    rois = make_rois(8, 2, 6, 8).to(DEVICE)
    results = kernel_and_reference([x], rois, None, [1.0], (2, 2), 2, True, "max")
    check_all(*results, F64)
    assert torch.isnan(results[1]).any() and not torch.isnan(results[1]).all()


# --------------------------------------------------------------------------
# far boxes, huge scales, fractional batch indices
# --------------------------------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_far_boxes_and_huge_scale_match_torchvision(path, sampling_ratio, dtype):
    """A box at 1e30 and spatial_scale=1e30 pool zeros, as in torchvision
    (the adaptive count for 1e30 is past int32: no samples)."""
    device = path_device(path)
    x = torch.randn(1, 2, 5, 6, dtype=dtype)
    cases = [(torch.tensor([[0, 1e30, 1e30, 1e30 + 5, 1e30 + 5], [0, 1.0, 1.0, 4.0, 3.0],
                            [0, 0.0, 0.0, 1e30, 1e30]], dtype=dtype), 1.0),
             (torch.tensor([[0, 0.0, 0.0, 1.0, 1.0], [0, -1e30, 0.0, 1.0, 1.0]],
                           dtype=dtype), 1e30)]
    for rois, scale in cases:
        xt = x.clone().requires_grad_()
        want = torchvision.ops.roi_align(xt, rois, 2, scale, sampling_ratio)
        (want_grad,) = torch.autograd.grad(want.sum(), xt)
        xd = x.to(device).requires_grad_()
        with on_path(path):
            out = segops.ops.roi_align(xd, rois.to(device), 2, scale, sampling_ratio)
            (grad,) = torch.autograd.grad(out.sum(), xd)
        assert_close(out, want, RTOL[dtype])
        assert_close(grad, want_grad, RTOL[dtype], name="grad")


@pytest.mark.parametrize("path", ["kernel", "native"])
def test_aligned_count_past_int32_after_the_half_pixel_shift_pools_zeros(path):
    """aligned=True: the sample count comes from the shifted corners. Here
    x2 - x1 rounds to 2^31 - 128 in float32 but (x2 - 0.5) - (x1 - 0.5) to
    2^31, past int32: the RoI pools zeros and no gradient on every path
    (torchvision's int would overflow on it: the native path must not pass
    it on)."""
    device = path_device(path)
    x = torch.randn(1, 2, 8, 8, device=device, requires_grad=True)
    rois = torch.tensor([[0.0, -63.5, 1.0, 2.0**31 - 128, 2.0]], device=device)
    with on_path(path):
        out = segops.ops.roi_align(x, rois, 1, 1.0, -1, True)
        (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(out.cpu(), torch.zeros(1, 2, 1, 1))
    assert torch.equal(grad.cpu(), torch.zeros(1, 2, 8, 8))


@pytest.mark.parametrize("box, output_size, sampling_ratio, samples", [
    ((0.0, 0.0, 2.0**31, 1.0), (1, 2), -1, 2**31),      # 1 x 2^30 per bin, 2 bins
    ((0.0, 0.0, 2.0**16 - 2, 2.0**16), (1, 2), -1, 2 * (2**31 - 2**16)),  # per bin < 2^31
    ((0.0, 0.0, 4.0, 4.0), (7, 7), 6621, 6621**2 * 49),  # fixed ratio: ratio^2 x bins
])
def test_native_path_refuses_the_sample_counts_that_crash_torchvision(
        box, output_size, sampling_ratio, samples):
    """torchvision's CPU RoIAlign sizes a buffer by grid_h x grid_w x bins in
    an int: from 2^31 on it segfaults or throws. Each axis's count is below
    2^31 here, so segops' rules pool these RoIs; the native path says it
    cannot instead of handing them on."""
    x = torch.randn(1, 2, 8, 8)
    rois = torch.tensor([[0.0, *box]])
    with on_path("native"):
        with pytest.raises(segops.ArgumentError, match=f"RoI 0 needs {samples} bilinear samples"):
            segops.ops.roi_align(x, rois, output_size, 1.0, sampling_ratio, False)


@pytest.mark.timeout(300)  # without the rule a kernel would loop 2^31 times: fail sooner
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("pool_mode", ["avg", "max"])
def test_per_bin_count_past_int32_pools_zeros(path, pool_mode):
    """Adaptive counts 2^16 rows x 2^15 columns: each axis fits an int32,
    their product, the per-bin count (the divisor), does not. The bin pools
    zeros and no gradient on every path and both backwards (the kernels'
    int32 product would wrap after 2^31 samples; torchvision's does)."""
    device = path_device(path)
    x = torch.randn(1, 2, 8, 8, device=device, requires_grad=True)
    rois = torch.tensor([[0.0, 0.0, 0.0, 2.0**15, 2.0**16]], device=device)
    for determ in (False, True):
        with on_path(path), deterministic(determ):
            out = segops.ops.roi_align(x, rois, 1, 1.0, -1, False, pool_mode=pool_mode)
            (grad,) = torch.autograd.grad(out.sum(), x)
        assert torch.equal(out.cpu(), torch.zeros(1, 2, 1, 1))
        assert torch.equal(grad.cpu(), torch.zeros(1, 2, 8, 8))


@triton.jit
def _fitting_grid_probe(h_ptr, w_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    grid_h, grid_w = _fitting_grid(tl.load(h_ptr + offs, mask=mask),
                                   tl.load(w_ptr + offs, mask=mask))
    tl.store(out_ptr + offs, grid_h, mask=mask)
    tl.store(out_ptr + n + offs, grid_w, mask=mask)


def test_kernel_per_bin_count_limit_is_exact_at_2_pow_31():
    """The kernels' per-bin rule on both sides of 2^31, in int64 (an int32
    product wraps past 2^32: (2^16 + 1) x 2^16 to 2^16, (2^31 - 1) x 3 to
    2^31 - 3; float32 would round 2^31 - 1 up)."""
    pairs = [(2**16, 2**15), (2**16, 2**15 - 1), (2**31 - 1, 1), (2**31 - 1, 2),
             (46341, 46341), (46340, 46340), (0, 2**31 - 1), (3, 5),
             (2**16 + 1, 2**16), (2**31 - 1, 3)]
    fits = [False, True, True, False, False, True, True, True, False, False]
    h, w = (torch.tensor(axis, dtype=torch.int32, device=DEVICE) for axis in zip(*pairs))
    out = torch.empty(2, len(pairs), dtype=torch.int32, device=DEVICE)
    _fitting_grid_probe[(1,)](h, w, out, len(pairs), BLOCK=triton.next_power_of_2(len(pairs)))
    want = [(gh, gw) if ok else (0, 0) for (gh, gw), ok in zip(pairs, fits)]
    assert list(zip(*out.cpu().tolist())) == want


@triton.jit
def _roi_grid_probe(rois_ptr, out_ptr, PH, PW):
    k = tl.program_id(0)
    _, _, _, _, _, grid_h, grid_w = _roi_geometry(rois_ptr, k, 1.0, 1, PH, PW, -1,
                                                  False, True, tl.float32)
    tl.store(out_ptr + 2 * k, grid_h)
    tl.store(out_ptr + 2 * k + 1, grid_w)


def test_kernel_roi_geometry_applies_the_per_bin_limit():
    """Every RoIAlign kernel takes its sample grid from _roi_geometry: a
    2^16 x 2^15 grid is none there, 2^16 x (2^15 - 1) stays (the op-level
    test above could only hang, 2^31 samples later, without the rule)."""
    rois = torch.tensor([[0.0, 0.0, 0.0, 2.0**15, 2.0**16], [0.0, 0.0, 0.0, 2.0**15 - 1, 2.0**16],
                         [0.0, 1.0, 1.0, 7.0, 5.0]], device=DEVICE)
    out = torch.empty(3, 2, dtype=torch.int32, device=DEVICE)
    _roi_grid_probe[(3,)](rois, out, 1, 1)
    assert out.cpu().tolist() == [[0, 0], [2**16, 2**15 - 1], [4, 6]]


def test_reference_per_bin_count_limit_is_exact_at_2_pow_31():
    """The reference's per-bin rule (only the coordinates are built here:
    pooling 2^31 samples would take hours)."""
    def grid(width, height):
        roi = torch.tensor([0.0, 0.0, width, height], dtype=torch.float64)
        return ref._sample_grid(roi, 1.0, (1, 1), -1, False, (8, 8))
    assert grid(2.0**15, 2.0**16) is None
    rows, cols = grid(2.0**15 - 1, 2.0**16)
    assert rows.shape == (1, 2**16) and cols.shape == (1, 2**15 - 1)
    assert ref._sample_grid(torch.tensor([0.0, 0.0, 1.0, 1.0]), 1.0, (1, 1), 46341, False,
                            (8, 8)) is None


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("sampling_ratio", [0, -(2**32) + 1, -(2**32) + 2**31 - 1, -(2**70)])
def test_every_non_positive_sampling_ratio_is_adaptive(path, sampling_ratio):
    """Any ratio <= 0 samples adaptively, as -1 does in torchvision (which
    narrows the value to a C int: -(2^32) + 1 would be a fixed ratio of 1
    there, -(2^32) + 2^31 - 1 one of 2^31 - 1)."""
    device = path_device(path)
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    rois = torch.tensor([[0.0, 0.5, 1.0, 6.5, 7.0]], dtype=torch.float64)
    xt = x.clone().requires_grad_()
    want = torchvision.ops.roi_align(xt, rois, 1, 1.0, -1)
    (want_grad,) = torch.autograd.grad(want.sum(), xt)
    xd = x.to(device).requires_grad_()
    with on_path(path):
        out = segops.ops.roi_align(xd, rois.to(device), 1, 1.0, sampling_ratio)
        (grad,) = torch.autograd.grad(out.sum(), xd)
    assert_close(out, want, F64)
    assert_close(grad, want_grad, F64, name="grad")


def test_reference_divides_the_adaptive_count_in_the_coordinate_dtype():
    """ceil(96155984 / 3) is 32051994 in float32, as torchvision and the
    kernels divide float32 boxes, but 32051995 in float64."""
    assert ref._adaptive_grid(torch.tensor(96155984.0), 3) == 32051994
    assert ref._adaptive_grid(torch.tensor(96155984.0, dtype=torch.float64), 3) == 32051995


def test_sampling_ratio_limit_is_its_int32_square_root():
    """46340^2 < 2^31 <= 46341^2: the largest fixed ratio is accepted by
    both ops, the next refused."""
    assert 46340**2 < 2**31 <= 46341**2
    x = torch.randn(1, 2, 4, 4)
    out = segops.ops.roi_align(x, torch.zeros(0, 5), 2, 1.0, 46340)
    assert out.shape == (0, 2, 2, 2)
    out = segops.ops.multi_scale_roi_align([x, x[..., ::2, ::2]], torch.zeros(0, 5), 2,
                                           [1.0, 0.5], 46340)
    assert out.shape == (0, 2, 2, 2)
    for op, args in ((segops.ops.roi_align, (x, torch.zeros(0, 5), 2, 1.0)),
                     (segops.ops.multi_scale_roi_align, ([x], torch.zeros(0, 5), 2, [1.0]))):
        with pytest.raises(segops.ArgumentError, match="sampling_ratio must be <= 46340"):
            op(*args, 46341)


def test_native_path_ignores_the_sample_count_of_a_roi_that_pools_nothing():
    """A RoI whose batch index is out of range pools zeros whatever its
    sample count: it never reaches torchvision, so it is not refused."""
    x = torch.randn(1, 1, 2, 2, dtype=torch.float64)
    rois = torch.tensor([[5.0, 0.0, 0.0, 4.0, 4.0]], dtype=torch.float64)
    with on_path("native"):
        out = segops.ops.roi_align(x, rois, 7, 1.0, 6621, False, validate_args=False)
    assert torch.equal(out, torch.zeros(1, 1, 7, 7, dtype=torch.float64))


@pytest.mark.parametrize("path", PATHS)
def test_fractional_batch_indices_truncate_like_torchvision(path):
    """validate_args=False: indices are truncated toward zero (-0.5 -> 0,
    1.9 -> 1); one that truncates outside [0, N) pools zeros (torchvision
    reads out of bounds there, so it is left out of the comparison). The
    maps are a view one image into a larger tensor: an index taken as -1
    would pool that real image (a wrong value), not read out of bounds."""
    device = path_device(path)
    store = torch.randn(3, 2, 5, 6, dtype=torch.float64)
    x = store[1:]
    rois = torch.tensor([[-0.5, 0.5, 1.0, 4.0, 3.5], [0.7, 1.0, 0.0, 5.0, 4.0],
                         [1.9, 0.0, 1.5, 3.0, 4.5], [2.0, 0.0, 0.0, 3.0, 3.0],
                         [-1.0, 0.0, 0.0, 3.0, 3.0]], dtype=torch.float64)
    xt = x.clone().requires_grad_()
    want = torchvision.ops.roi_align(xt, rois[:3], 2, 1.0, 2)
    grad = torch.randn(5, 2, 2, 2, dtype=torch.float64)
    (want_grad,) = torch.autograd.grad(want, xt, grad[:3])
    xd = store.to(device)[1:].requires_grad_()
    with on_path(path):
        out = segops.ops.roi_align(xd, rois.to(device), 2, 1.0, 2, validate_args=False)
        for determ in (False, True):
            with deterministic(determ):
                (got,) = torch.autograd.grad(out, xd, grad.to(device), retain_graph=True)
            assert_close(got, want_grad, F64, name=f"grad, deterministic={determ}")
    assert_close(out[:3], want, F64)
    assert torch.equal(out[3:].cpu(), torch.zeros(2, 2, 2, 2, dtype=torch.float64))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("view", list(STRIDE_VIEWS))
def test_output_and_gradient_keep_the_features_stride_order(path, view):
    """The output and the features' gradient are channels_last exactly when
    the features' stride order is (ATen's suggest_memory_format: channel
    slices, strided rows and permuted NHWC storage count), with the strides
    torch.empty gives that format, on every path and both backwards."""
    skip_off_kernel_path_on_gpu(path)
    x_cpu, x = strided_views(view, (2, 3, 6, 5))
    x = x.requires_grad_()
    rois = make_rois(6, 2, 6, 5)
    want = torchvision.ops.roi_align(x_cpu, rois, 2, 1.0, 2, True)
    grad = torch.randn(want.shape, dtype=torch.float64)
    (want_grad,) = torch.autograd.grad(torchvision.ops.roi_align(
        x_cpu.requires_grad_(), rois, 2, 1.0, 2, True), x_cpu, grad)
    fmt = torch.channels_last if view in CHANNELS_LAST_VIEWS else torch.contiguous_format
    with on_path(path):
        out = segops.ops.roi_align(x, rois.to(DEVICE), 2, 1.0, 2, True)
        assert out.stride() == format_strides(out.shape, fmt)
        assert_close(out, want, F64)
        for determ in (False, True):
            with deterministic(determ):
                (got,) = torch.autograd.grad(out, x, grad.to(DEVICE), retain_graph=True)
            assert got.stride() == format_strides(x.shape, fmt), determ
            assert_close(got, want_grad, F64, name=f"grad, deterministic={determ}")


# --------------------------------------------------------------------------
# non-contiguous views of every tensor argument
# --------------------------------------------------------------------------
def input_view(x, view):
    """x's values as a non-contiguous view."""
    if view == "stride2":
        return like_layout(x, "strided")
    if view == "transposed":
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    N, C, H, W = x.shape
    fmt = torch.channels_last if view == "channel_slice_cl" else torch.contiguous_format
    wide = torch.randn(N, C + 3, H, W, dtype=x.dtype, device=x.device).contiguous(
        memory_format=fmt)
    wide[:, 2:2 + C] = x
    return wide[:, 2:2 + C]


@pytest.mark.parametrize("view", ["stride2", "transposed", "channel_slice", "channel_slice_cl"])
def test_non_contiguous_views(view):
    """Input, boxes (a strided Tensor[K, 5], a list of strided Tensor[L, 4])
    and the incoming gradient as non-contiguous views: forward, both backward
    kernels and the op against torchvision. The views are made on the
    device: .to() of a view to another device copies it contiguous."""
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    xv = input_view(x.to(DEVICE), view)
    assert not xv.is_contiguous() and torch.equal(xv.cpu(), x)
    rois = make_rois(8, 2, 6, 5)
    rois_view = like_layout(rois.to(DEVICE), "strided")
    grad = torch.randn(8, 3, 2, 2, dtype=torch.float64)
    grad_view = grad.to(DEVICE).transpose(2, 3).contiguous().transpose(2, 3)
    assert not rois_view.is_contiguous() and not grad_view.is_contiguous()
    results = kernel_and_reference([xv], rois_view, None, [1.0], (2, 2), 2, True, "avg",
                                   grad=grad_view)
    check_all(*results, F64)

    per_image = [like_layout(rois[rois[:, 0] == i, 1:].to(DEVICE), "strided") for i in (0, 1)]
    assert not any(r.is_contiguous() for r in per_image)
    order = torch.argsort(rois[:, 0], stable=True)
    xt = x.clone().requires_grad_()
    want = torchvision.ops.roi_align(xt, rois[order], 2, 1.0, 2, True)
    (want_grad,) = torch.autograd.grad(want, xt, grad[order])
    leaf = xv.detach().requires_grad_()
    for determ in (False, True):
        with deterministic(determ):
            out = segops.ops.roi_align(leaf, per_image, 2, 1.0, 2, True)
            (got,) = torch.autograd.grad(out, leaf, grad_view[order.to(DEVICE)])
        assert_close(out, want, F64)
        assert_close(got, want_grad, F64, name=f"grad, deterministic={determ}")


# --------------------------------------------------------------------------
# native path (off the GPU without the interpreter)
# --------------------------------------------------------------------------
class TorchvisionCalls:
    """Stands in for torch.ops.torchvision and counts RoIAlign calls."""

    def __init__(self, ops):
        self.ops, self.forward, self.backward = ops, 0, 0

    def roi_align(self, *args):
        self.forward += 1
        return self.ops.roi_align(*args)

    def _roi_align_backward(self, *args):
        self.backward += 1
        return self.ops._roi_align_backward(*args)


@pytest.fixture
def tv_calls(monkeypatch):
    calls = TorchvisionCalls(ops_module._torchvision_ops())
    monkeypatch.setattr(ops_module, "_torchvision_ops", lambda: calls)
    return calls


@pytest.mark.parametrize("aligned", [False, True], ids=["legacy", "aligned"])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_native_path_runs_torchvision(aligned, sampling_ratio, layout, tv_calls):
    x = like_layout(torch.randn(2, 3, 7, 9, dtype=torch.float64), layout).requires_grad_()
    rois = make_rois(9, 2, 7, 9, scale=0.5)
    with _dispatch.native_only(), deterministic(sampling_ratio > 0):
        out = segops.ops.roi_align(x, rois, (2, 3), 0.5, sampling_ratio, aligned)
        grad = torch.randn(out.shape, dtype=torch.float64)
        (got,) = torch.autograd.grad(out, x, grad)
    assert (tv_calls.forward, tv_calls.backward) == (1, 1)
    assert out.is_contiguous(memory_format=memory_format(layout))
    assert got.is_contiguous(memory_format=memory_format(layout))
    xt = x.detach().clone().requires_grad_()
    want = torchvision.ops.roi_align(xt, rois, (2, 3), 0.5, sampling_ratio, aligned)
    (want_grad,) = torch.autograd.grad(want, xt, grad)
    assert torch.equal(out, want) and torch.equal(got, want_grad)


def memory_format(layout):
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_native_path_half_dtypes_in_float32(dtype, tv_calls):
    """fp16/bf16 (torchvision's CPU kernel has no bf16) run torchvision in
    float32 coordinates and sums, like the kernels."""
    x = torch.randn(2, 3, 6, 8, dtype=torch.float64).to(dtype).requires_grad_()
    rois = make_rois(8, 2, 6, 8)
    with _dispatch.native_only():
        out = segops.ops.roi_align(x, rois, 2, 1.0, 2)
        grad = torch.randn(out.shape, dtype=torch.float64).to(dtype)
        (got,) = torch.autograd.grad(out, x, grad)
    assert tv_calls.forward == 1 and out.dtype == got.dtype == dtype
    cpu = ([x.detach().double()], rois.float(), None, [1.0], 2, 2, 2, False, "avg")
    assert_close(out, ref.roi_align(*cpu), RTOL[dtype])
    assert_close(got, ref.roi_align_backward(grad.double(), *cpu)[0], RTOL[dtype], name="grad")


@pytest.mark.parametrize("case", ["max_pool", "nan_box", "bad_index", "overflowing_box"])
def test_native_path_falls_back_or_skips_to_reference_answer(case, tv_calls):
    """Max pooling runs the reference; NaN boxes, out-of-range indices and
    boxes whose scaled corners overflow float32 are kept away from
    torchvision (zeros, as the reference gives)."""
    dtype = torch.float32 if case == "overflowing_box" else torch.float64
    x = torch.randn(2, 3, 6, 8, dtype=dtype, requires_grad=True)
    rois = make_rois(8, 2, 6, 8, dtype=dtype)
    scale = 1.0
    if case == "overflowing_box":
        rois[4, 3:] = 1e10
        scale = 1e30
    mode = "max" if case == "max_pool" else "avg"
    if case == "nan_box":
        rois[3, 2] = float("nan")
    if case == "bad_index":
        rois[2, 0], rois[5, 0] = 2.0, -3.0
    with _dispatch.native_only():
        out = segops.ops.roi_align(x, rois, 2, scale, 2, pool_mode=mode, validate_args=False)
        grad = torch.randn(out.shape, dtype=dtype)
        (got,) = torch.autograd.grad(out, x, grad)
    assert tv_calls.forward == (0 if case == "max_pool" else 1)
    cpu = ([x.detach()], rois, None, [scale], 2, 2, 2, False, mode)
    assert_close(out, ref.roi_align(*cpu), RTOL[dtype])
    assert_close(got, ref.roi_align_backward(grad, *cpu)[0], RTOL[dtype], name="grad")


def test_native_path_empty_map_and_zero_rois(tv_calls):
    """torchvision crashes on a 0-row map: the native path never calls it
    there; zero RoIs give an empty output."""
    with _dispatch.native_only():
        x = torch.randn(1, 2, 0, 5, dtype=torch.float64, requires_grad=True)
        out = segops.ops.roi_align(x, torch.tensor([[0, 0.0, 0.0, 3.0, 3.0]]), 2, 1.0, 2)
        out.sum().backward()
        empty = segops.ops.roi_align(torch.randn(1, 2, 4, 4), torch.zeros(0, 5), 2)
    assert torch.equal(out, torch.zeros(1, 2, 2, 2, dtype=torch.float64))
    assert x.grad.shape == x.shape and empty.shape == (0, 2, 2, 2)
    assert tv_calls.forward == 0


# --------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------
@pytest.mark.parametrize("output_size", [np.int64(2), (2,), (np.int32(2), 3), [2, 3]],
                         ids=["numpy int", "1-tuple", "numpy pair", "list"])
def test_output_size_forms_like_torchvision(output_size):
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, device=DEVICE)
    rois = make_rois(2, 1, 5, 5, seed_kinds=False).to(DEVICE)
    out = segops.ops.roi_align(x, rois, output_size, 1.0, 2)
    size = tuple(int(v) for v in np.atleast_1d(output_size))
    size = size * 2 if len(size) == 1 else size
    assert_close(out, torchvision.ops.roi_align(x, rois, size, 1.0, 2), F64)


@pytest.mark.parametrize("output_size", [1, (1, 3), (3, 1)])
def test_output_size_of_one_bin_like_torchvision(output_size):
    """An output size of 1 on an axis is valid (int_pair's minimum is inclusive)."""
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64, device=DEVICE)
    rois = torch.tensor([[0, 0.5, 1.0, 4.5, 5.0], [1, 2.0, 0.0, 6.0, 3.5]],
                        dtype=torch.float64, device=DEVICE)
    out = segops.ops.roi_align(x, rois, output_size, 1.0, 2)
    assert_close(out, torchvision.ops.roi_align(x, rois, output_size, 1.0, 2), F64)


@pytest.mark.parametrize("kwargs", [{"output_size": True}, {"output_size": (2, False)},
                                    {"output_size": 2, "sampling_ratio": True}])
def test_bools_are_not_ints(kwargs):
    """A bool is refused where an int is expected (is_int excludes bool)."""
    x = torch.randn(1, 2, 5, 5, device=DEVICE)
    rois = torch.tensor([[0, 0.0, 0.0, 3.0, 3.0]], device=DEVICE)
    with pytest.raises(TypeError, match="must be an int"):
        segops.ops.roi_align(x, rois, **kwargs)


@pytest.mark.parametrize("path,pool_mode", [("native", "max"), ("reference", "avg"),
                                            ("reference", "max")])
def test_reference_answers_keep_channels_last(path, pool_mode):
    """Where the reference answers (max pooling off the kernels, reference_only), a
    channels_last input gives a channels_last output and input gradient, like the kernels."""
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64).to(memory_format=torch.channels_last)
    x.requires_grad_()
    rois = torch.tensor([[0, 0.5, 1.0, 4.5, 5.0], [1, 2.0, 0.0, 6.0, 3.5]], dtype=torch.float64)
    with on_path(path):
        out = segops.ops.roi_align(x, rois, (2, 3), 1.0, 2, pool_mode=pool_mode)
        (grad,) = torch.autograd.grad(out, x, torch.randn(out.shape, dtype=torch.float64))
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert grad.is_contiguous(memory_format=torch.channels_last)
    want = segops.ops.roi_align(x.detach().contiguous(), rois, (2, 3), 1.0, 2,
                                pool_mode=pool_mode)
    assert_close(out, want, F64)


def test_batch_index_check_stays_on_cpu_error():
    """validate_args on the CPU: an ArgumentError naming the bad index."""
    with pytest.raises(segops.ArgumentError, match="batch index -1.0"):
        segops.ops.roi_align(torch.randn(1, 1, 4, 4), torch.tensor([[-1.0, 0, 0, 2, 2]]), 2)


@pytest.mark.skipif(ON_GPU, reason="on CUDA the assert ends the context: the test below")
@pytest.mark.parametrize("rois_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("index", [0.0, 1.0, 2.0, -1.0, 0.5, 1.0 + 1e-10, float("nan"),
                                   float("inf"), float("-inf")])
def test_batch_index_check_in_the_forward_kernel(monkeypatch, rois_dtype, index):
    """A Tensor[K, 5] on CUDA on the kernels' path: the forward kernel flags
    a batch index that is not an integer in [0, N) and the op asserts on
    the device (here the CPU's _assert_async raises at once), without the
    aten check. float64 rois for float32 maps are judged as given, by the
    aten check: 1 + 1e-10 would pass as 1.0 in float32."""
    monkeypatch.setattr(_checks, "values_checked_on_device", lambda t: True)
    aten_checks = []
    real_check = ops_module._check_batch_indices

    def recorded_check(rois, N):
        aten_checks.append(rois.dtype)
        real_check(rois, N)

    monkeypatch.setattr(ops_module, "_check_batch_indices", recorded_check)
    x = torch.randn(2, 3, 6, 5, device=DEVICE)
    rois = torch.tensor([[1.0, 0, 0, 3, 3], [index, 1, 1, 4, 4]], dtype=torch.float64)
    rois = rois.to(DEVICE, rois_dtype)
    good = index in (0.0, 1.0) or (index == 1.0 + 1e-10 and rois_dtype == torch.float32)
    if good:
        got = segops.ops.roi_align(x, rois, 2, 1.0, 2)
        assert torch.equal(got, segops.ops.roi_align(x, rois, 2, 1.0, 2, validate_args=False))
    else:
        with pytest.raises(RuntimeError, match="batch index that is not an integer"):
            segops.ops.roi_align(x, rois, 2, 1.0, 2)
    assert aten_checks == ([torch.float64] if rois_dtype == torch.float64 else [])


@pytest.mark.skipif(ON_GPU, reason="on CUDA the assert ends the context: the test below")
def test_batch_index_check_without_channels(monkeypatch):
    """0-channel maps on the device-check path: the output is empty, so no
    program runs to flag a batch index; the op checks with the aten check
    instead (a bad index passed unchecked before), and the launcher refuses
    a flag it would leave unset."""
    monkeypatch.setattr(_checks, "values_checked_on_device", lambda t: True)
    aten_checks = []
    real_check = ops_module._check_batch_indices
    monkeypatch.setattr(ops_module, "_check_batch_indices",
                        lambda rois, N: aten_checks.append(N) or real_check(rois, N))
    x = torch.randn(2, 0, 6, 5, device=DEVICE)
    good = torch.tensor([[1.0, 0, 0, 3, 3], [0.0, 1, 1, 4, 4]], device=DEVICE)
    assert segops.ops.roi_align(x, good, 2, 1.0, 2).shape == (2, 0, 2, 2)
    assert aten_checks == [2]
    for index in (2.0, -1.0, 0.5, float("nan")):
        rois = good.clone()
        rois[1, 0] = index
        with pytest.raises(RuntimeError, match="batch index that is not an integer"):
            segops.ops.roi_align(x, rois, 2, 1.0, 2)
    flag = torch.zeros((), dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="bad_batch needs an output with elements"):
        kernels.roi_align_forward([x], good, None, [1.0], 2, 2, 2, False, "avg", bad_batch=flag)
    no_rois = good[:0]
    assert kernels.roi_align_forward([x], no_rois, None, [1.0], 2, 2, 2, False, "avg",
                                     bad_batch=flag).shape == (0, 0, 2, 2)


@pytest.mark.skipif(not ON_GPU, reason="the device-side assert exists only on CUDA")
@pytest.mark.parametrize("index,pools", [("2.0", "zeros"), ("float('nan')", "zeros"),
                                         ("0.5", "image 0")])
def test_bad_batch_index_asserts_on_cuda(index, pools):
    """validate_args on CUDA checks without a sync (torch._assert_async):
    a bad index fails the CUDA context, as torch's own index checks do, so
    the call runs in a child process. Unchecked, an index outside [0, N)
    pools zeros and a fractional one is truncated as in torchvision."""
    expected = "torch.zeros(1, 3, 2, 2, device='cuda')" if pools == "zeros" else \
        "segops.ops.roi_align(x, torch.tensor([[0.0, 0, 0, 1, 1]], device='cuda'), 2)"
    assert_device_assert_in_child(
        "import torch, segops\n"
        "x = torch.rand(2, 3, 5, 5, device='cuda') + 1\n"
        f"boxes = torch.tensor([[{index}, 0, 0, 1, 1]], device='cuda')",
        "got = segops.ops.roi_align(x, boxes, 2, validate_args=False)\n"
        f"assert torch.equal(got, {expected})",
        "segops.ops.roi_align(x, boxes, 2)")


@pytest.mark.skipif(not ON_GPU, reason="host-device syncs exist only with a GPU")
def test_batch_index_check_does_not_sync_on_cuda():
    rois = torch.tensor([[0.0, 0, 0, 2, 2], [1.0, 1, 1, 3, 3]], device="cuda")
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops_module._check_batch_indices(rois, 2)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()


def test_multi_scale_module_repr_matches_torchvision():
    names = ["p0", "p1"]
    m = segops.nn.MultiScaleRoIAlign(names, 7, 2)
    assert repr(m) == repr(torchvision.ops.MultiScaleRoIAlign(names, 7, 2))
    extra = segops.nn.MultiScaleRoIAlign(names, (7, 7), 2, aligned=True, pool_mode="max")
    assert repr(extra) == repr(m)[:-1] + ", aligned=True, pool_mode='max')"
    single = segops.nn.RoIAlign(7, 0.5, -1, pool_mode="max")
    assert repr(single) == repr(torchvision.ops.RoIAlign(7, 0.5, -1))[:-1] + ", pool_mode='max')"


def test_module_repr_compares_options_by_value():
    """An option equal to its default is not listed, whatever object holds it
    (0 for aligned=False, a pool_mode string built at run time): the repr is
    torchvision's."""
    names = ["p0", "p1"]
    m = segops.nn.MultiScaleRoIAlign(names, 7, 2, aligned=0, pool_mode="AVG".lower())
    assert repr(m) == repr(torchvision.ops.MultiScaleRoIAlign(names, 7, 2))
    single = segops.nn.RoIAlign(7, 0.5, 2, aligned=0, pool_mode="AVG".lower())
    assert repr(single) == repr(torchvision.ops.RoIAlign(7, 0.5, 2, aligned=0))


def test_tables_are_built_once_per_layout():
    """The scale, level and tile tables are device tensors cached on their
    content (shapes and strides; the maps' addresses are kernel arguments):
    a second forward and both backwards, on new maps and into new gradient
    buffers of the same layout, build none (a fresh torch.tensor(...,
    device=cuda) per call blocks the host)."""
    from segops.kernels import _layout

    def call():
        feats = [torch.randn(2, 4, 16, 16, device=DEVICE, requires_grad=True),
                 torch.randn(2, 4, 8, 8, device=DEVICE, requires_grad=True)]
        boxes = [torch.tensor([[1.0, 2.0, 30.0, 40.0], [0.0, 0.0, 200.0, 150.0]], device=DEVICE),
                 torch.tensor([[3.0, 3.0, 9.0, 12.0]], device=DEVICE)]
        out = segops.ops.multi_scale_roi_align(feats, boxes, 2, [0.25, 0.125], 2)
        grads = torch.autograd.grad(out, feats, torch.ones_like(out))
        with deterministic():
            out = segops.ops.multi_scale_roi_align(feats, boxes, 2, [0.25, 0.125], 2)
            grads += torch.autograd.grad(out, feats, torch.ones_like(out))
        return feats, out, grads

    first = call()
    misses = _layout.device_table.cache_info().misses
    second = call()   # `first` keeps its tensors: the new ones live elsewhere
    assert _layout.device_table.cache_info().misses == misses
    assert first[0][0].data_ptr() != second[0][0].data_ptr()


@pytest.mark.parametrize("pool_mode", ["avg", "max"])
def test_samples_exactly_on_the_bounds_count(pool_mode):
    """Samples at exactly -1 and exactly H (W) are inside torchvision's
    bounds ([-1, H]): they take the edge pixel's value, not 0. One sample
    per bin (sampling_ratio 1, 1x1 output) lands on the bound itself."""
    H, W = 4, 5
    x = torch.randn(1, 2, H, W, dtype=torch.float64)
    rois = torch.tensor([[0, -2.0, -2.0, 0.0, 0.0],            # sample (-1, -1)
                         [0, W - 1.0, H - 1.0, W + 1.0, H + 1.0],  # sample (H, W)
                         [0, -2.0, H - 1.0, 0.0, H + 1.0],     # sample (H, -1)
                         [0, W - 1.0, -2.0, W + 1.0, 0.0]],    # sample (-1, W)
                        dtype=torch.float64)
    corners = x[0, :, [0, H - 1, H - 1, 0], [0, W - 1, 0, W - 1]].T.reshape(4, 2, 1, 1)
    grad = torch.randn(4, 2, 1, 1, dtype=torch.float64)
    results = kernel_and_reference([x.to(DEVICE)], rois.to(DEVICE), None, [1.0], (1, 1), 1,
                                   False, pool_mode, grad=grad)
    check_all(*results, F64)
    assert torch.equal(results[0].cpu(), corners)
    want_grad = torch.zeros_like(x)
    want_grad[0, :, [0, H - 1, H - 1, 0], [0, W - 1, 0, W - 1]] = grad.reshape(4, 2).T
    for got in (results[2][0], results[3][0]):
        assert torch.equal(got.cpu(), want_grad)
    if pool_mode == "avg":
        want = torchvision.ops.roi_align(x, rois, (1, 1), 1.0, 1, False)
        assert torch.equal(results[0].cpu(), want)



# --------------------------------------------------------------------------
# the deterministic gather's schedule, launch decisions, writes past outputs
# --------------------------------------------------------------------------
@pytest.mark.parametrize("pooled", [(4, 1), (1, 4)], ids=["tall", "wide"])
def test_gather_bins_longer_along_one_axis(pooled):
    """More bins along one axis than the other (PH > PW and PH < PW) with
    tiles smaller than the RoIs: the gather's per-RoI reach test spans all
    PH rows and PW columns of bins. Both backwards against the reference."""
    x = torch.randn(2, 2, 9, 7, dtype=torch.float64, device=DEVICE)
    rois = make_rois(8, 2, 9, 7).to(DEVICE)
    grad = torch.randn(8, 2, *pooled, dtype=torch.float64, device=DEVICE)
    args = ([x], rois, None, [1.0], *pooled, 2, False, "avg")
    determ = kernels.roi_align_backward_deterministic(grad, *args, tile=(2, 2))
    atomic = kernels.roi_align_backward_atomic(grad, *args)
    want = ref.roi_align_backward(grad.cpu(), [x.cpu()], rois.cpu(), *args[2:])
    assert_close(determ[0], want[0], F64, name="deterministic grad")
    assert_close(atomic[0], want[0], F64, name="atomic grad")


@pytest.mark.parametrize("H, banded", [(8, False), (9, True)])
def test_gather_scans_the_segments_where_each_level_is_one_row_of_tiles(H, banded, launches):
    """The row-band schedule only where a level has several rows of tiles:
    with every level one row (H <= TILE_H: the bands are the segments) the
    launch takes the segment scan and _row_bands builds nothing; one row
    more and it takes the bands. Either way the reference's gradient."""
    x = torch.randn(2, 2, H, 5, dtype=torch.float64, device=DEVICE)
    rois = make_rois(8, 2, H, 5).to(DEVICE)
    grad = torch.randn(8, 2, 2, 2, dtype=torch.float64, device=DEVICE)
    args = ([x], rois, None, [1.0], 2, 2, 2, False, "avg")
    (got,) = kernels.roi_align_backward_deterministic(grad, *args)
    flags = [c["ROW_BANDS"] for c in launches["_roi_align_bwd_deterministic_kernel"].constexprs]
    assert flags == [banded]
    order, _, segment_of = kernels._segments(rois, None, 1, 2)
    reach = kernels._roi_reach(rois, None, torch.ones(1, dtype=torch.float64, device=DEVICE),
                               order)
    assert (kernels._row_bands(segment_of, reach, [x], 2, 8) is not None) == banded
    cpu = ([x.cpu()], rois.cpu(), *args[2:])
    assert_close(got, ref.roi_align_backward(grad.cpu(), *cpu)[0], F64)


def test_row_bands_leave_out_rois_below_their_map():
    """A RoI whose reach starts below its map's last row of tiles (4-row
    tiles over 9 rows: rows 0-11; this reach starts at 13) meets no band:
    it is listed nowhere, not in the last band, as one above the map."""
    features = [torch.zeros(1, 1, 9, 4, dtype=torch.float64, device=DEVICE)]
    rois = torch.tensor([[0, 0.0, 15.0, 3.0, 17.0], [0, 0.0, -9.0, 3.0, -5.0],
                         [0, 0.0, 2.0, 3.0, 4.0]], dtype=torch.float64, device=DEVICE)
    order, _, segment_of = kernels._segments(rois, None, 1, 1)
    reach = kernels._roi_reach(rois, None, torch.ones(1, dtype=torch.float64, device=DEVICE),
                               order)
    entries, bounds, _ = kernels._row_bands(segment_of, reach, features, 1, 4)
    assert [entries[bounds[b]:bounds[b + 1]].tolist() for b in range(3)] == [[2], [2], []]


def test_gather_bands_with_batch_indices_outside_the_batch(launches):
    """validate_args=False: RoIs whose index truncates outside [0, N) pool
    nothing; the row-band schedule sorts them into their level's first or
    last image (_segments clamps the index), never past its band table, and
    both backwards give the reference's gradient."""
    x = torch.randn(2, 2, 10, 7, dtype=torch.float64, device=DEVICE)
    rois = make_rois(8, 2, 10, 7).to(DEVICE)
    rois[[1, 4, 6], 0] = torch.tensor([2.0, 7.0, -1.0], dtype=torch.float64, device=DEVICE)
    results = kernel_and_reference([x], rois, None, [1.0], (2, 2), 2, False, "avg")
    check_all(*results, F64)
    assert [c["ROW_BANDS"] for c in
            launches["_roi_align_bwd_deterministic_kernel"].constexprs] == [True]


@pytest.mark.parametrize("layout, pool_mode, block_c", [
    ("contiguous", "avg", 32), ("channels_last", "avg", 32), ("channels_last", "max", 32),
    ("contiguous", "max", 16)])
def test_gather_channel_block(launches, layout, pool_mode, block_c):
    """The deterministic gather's channel block is block_size(C, 32) (the
    BLOCK_C = 32 that test_codegen's pin for issue 12 describes), 16 for
    max pooling in NCHW (kernels._gather_channels: at 32 it spills): 33
    channels are full blocks and a masked tail, with the reference's
    gradient."""
    x = like_layout(torch.randn(1, 33, 5, 6, dtype=torch.float64).to(DEVICE), layout)
    rois = make_rois(3, 1, 5, 6, seed_kinds=False).to(DEVICE)
    grad = torch.randn(3, 33, 1, 2, dtype=torch.float64, device=DEVICE)
    args = ([x], rois, None, [1.0], 1, 2, 2, False, pool_mode)
    (got,) = kernels.roi_align_backward_deterministic(grad, *args)
    (constexprs,) = launches["_roi_align_bwd_deterministic_kernel"].constexprs
    assert (constexprs["BLOCK_C"], constexprs["CHANNELS_LAST"]) == (
        block_c, layout == "channels_last")
    cpu = ([x.cpu()], rois.cpu(), *args[2:])
    assert_close(got, ref.roi_align_backward(grad.cpu(), *cpu)[0], F64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gather_16_channel_blocks_in_half_precision_with_a_strided_grad(launches, dtype):
    """The NCHW max-pool gather's 16-channel blocks (33 channels: two blocks
    and a tail) in the 16-bit dtypes users run, the output gradient a
    non-contiguous view: the float64 reference's gradient on the rounded
    inputs."""
    x = torch.randn(1, 33, 5, 6, dtype=torch.float64).to(dtype).to(DEVICE)
    rois = make_rois(3, 1, 5, 6, seed_kinds=False).to(DEVICE)
    wide = torch.randn(3, 33, 1, 4, dtype=torch.float64).to(dtype).to(DEVICE)
    grad = wide[..., ::2]
    assert not grad.is_contiguous()
    args = ([x], rois, None, [1.0], 1, 2, 2, False, "max")
    (got,) = kernels.roi_align_backward_deterministic(grad, *args)
    (constexprs,) = launches["_roi_align_bwd_deterministic_kernel"].constexprs
    assert constexprs["BLOCK_C"] == 16 and got.dtype == dtype
    cpu = ([x.cpu().double()], rois.cpu().double(), *args[2:])
    want = ref.roi_align_backward(grad.cpu().double(), *cpu)[0]
    assert_close(got, want, RTOL[dtype])


def test_multi_level_maps_in_mixed_memory_formats(launches):
    """One channels_last level and one NCHW level: every kernel takes the
    strided path (CHANNELS_LAST off: each level's channel stride as loaded,
    not 1) and matches the reference, forward and both backwards."""
    features = [like_layout(torch.randn(2, 3, 8, 6, dtype=torch.float64).to(DEVICE),
                            "channels_last"),
                torch.randn(2, 3, 4, 3, dtype=torch.float64, device=DEVICE)]
    rois = make_rois(8, 2, 8, 6, 1 / 4).to(DEVICE)   # 32x24 images
    levels = torch.tensor([0, 1] * 4, device=DEVICE)
    results = kernel_and_reference(features, rois, levels, [1 / 4, 1 / 8], (2, 2), 2, False,
                                   "avg")
    check_all(*results, F64)
    for name in ("_roi_align_fwd_kernel", "_roi_align_bwd_atomic_kernel",
                 "_roi_align_bwd_deterministic_kernel"):
        assert [c["CHANNELS_LAST"] for c in launches[name].constexprs] == [False], name


def test_an_empty_level_map_is_passed_as_a_non_empty_one():
    """A map with no element (H or W 0) is never addressed, but a null
    pointer (an empty CUDA tensor's address) is not a valid kernel
    argument: _pointers passes a non-empty level in its place."""
    full = torch.randn(2, 3, 4, 4, device=DEVICE)
    empty = full[:, :, :0]
    assert [p is full for p in kernels._pointers([empty, full])] == [True, True]
    assert [p is full for p in kernels._pointers([full, empty, full[:, :, :, :0]])] == [True] * 3


def test_kernels_write_nothing_past_their_outputs(monkeypatch):
    """Channel and bin tails (3 channels in blocks of 4, 6 bins in blocks of
    4): the forward's output and both backwards' gradient buffers keep the
    guard elements after them, with the reference's values. The map and the
    output gradient are views into larger tensors, so a channel or RoI past
    the end is memory a kernel may read."""
    guards = guarded_outputs(monkeypatch, kernels)
    x = torch.randn(2, 5, 6, 7, dtype=torch.float64, device=DEVICE)[:, :3]
    rois = make_rois(8, 2, 6, 7).to(DEVICE)
    grad = torch.randn(9, 3, 2, 3, dtype=torch.float64, device=DEVICE)[:8]
    args = ([x], rois, None, [1.0], 2, 3, 2, False, "avg")
    out = kernels.roi_align_forward(*args, block_c=4, block_p=4)
    atomic = kernels.roi_align_backward_atomic(grad, *args, block_c=4, block_p=4)
    determ = kernels.roi_align_backward_deterministic(grad, *args, block_c=4)
    cpu = ([x.cpu()], rois.cpu(), *args[2:])
    check_all(out, ref.roi_align(*cpu), atomic, determ, ref.roi_align_backward(grad.cpu(), *cpu),
              F64)
    assert len(guards) == 3
    assert_guards_intact(guards)


def test_gather_writes_nothing_past_each_levels_gradient(monkeypatch):
    """The deterministic gather stores a tile's pixels inside its own level
    and image only (rows < H, columns < W): the guard elements after each
    gradient buffer keep their value, and every level's gradient is the
    reference's (10x7 and 5x3 maps: 8x8 tiles cut on both axes; the second
    level's first tile follows the first level's last)."""
    guards = guarded_outputs(monkeypatch, kernels)
    features = [torch.randn(2, 2, 10, 7, dtype=torch.float64, device=DEVICE),
                torch.randn(2, 2, 5, 3, dtype=torch.float64, device=DEVICE)]
    rois = make_rois(8, 2, 10, 7).to(DEVICE)
    levels = torch.tensor([0, 1] * 4, device=DEVICE)
    grad = torch.randn(8, 2, 2, 2, dtype=torch.float64, device=DEVICE)
    args = (features, rois, levels, [1.0, 0.5], 2, 2, 2, False, "avg")
    got = kernels.roi_align_backward_deterministic(grad, *args)
    want = ref.roi_align_backward(grad.cpu(), [f.cpu() for f in features], rois.cpu(),
                                  levels.cpu(), *args[3:])
    for level, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, F64, name=f"level {level}")
    assert len(guards) == 2
    assert_guards_intact(guards)


def test_roi_levels_write_nothing_past_the_rois(monkeypatch):
    """The level kernel's block of RoIs is masked at K: the guard elements
    after the (K, 5) rois and (K,) levels it allocates keep their value
    (the rois are a view into a larger tensor: a row K exists to read)."""
    guards = guarded_outputs(monkeypatch, kernels)
    store = make_rois(8, 2, 64, 64, 1 / 8, torch.float32).to(DEVICE)
    thresholds = torch.tensor([500.0, 2000.0], device=DEVICE)
    rois, levels = kernels.roi_levels(store[:5], thresholds, 3)
    area = (store[:5, 3] - store[:5, 1]) * (store[:5, 4] - store[:5, 2])
    assert torch.equal(levels, (area[:, None] >= thresholds).sum(1))
    assert torch.equal(rois, store[:5])
    assert len(guards) == 2
    assert_guards_intact(guards)


def _assert_module_is_torchvisions(features, boxes, image_shapes, scales):
    """segops' and torchvision's MultiScaleRoIAlign over maps "a" and "b"
    (2x2 bins, sampling ratio 2): the same output and inferred scales."""
    ours = segops.nn.MultiScaleRoIAlign(["a", "b"], 2, 2)
    theirs = torchvision.ops.MultiScaleRoIAlign(["a", "b"], 2, 2)
    want = theirs(features, boxes, image_shapes)
    assert_close(ours(features, boxes, image_shapes), want, F64)
    assert ours.scales == theirs.scales == scales


def test_multi_scale_scales_come_from_the_largest_image_whichever_comes_first():
    """The scales are inferred from the largest height and width over all
    images, as torchvision's, also when the largest image is not the first."""
    features = {"a": torch.randn(2, 2, 16, 16, dtype=torch.float64, device=DEVICE),
                "b": torch.randn(2, 2, 8, 8, dtype=torch.float64, device=DEVICE)}
    boxes = [torch.tensor([[1.0, 2.0, 30.0, 35.0]], dtype=torch.float64, device=DEVICE),
             torch.tensor([[0.0, 0.0, 20.0, 12.0]], dtype=torch.float64, device=DEVICE)]
    _assert_module_is_torchvisions(features, boxes, [(40, 40), (64, 64)], [0.25, 0.125])


def test_multi_scale_scales_round_the_height_ratio_like_torchvision():
    """Each scale is the map's height over the image's rounded to a power of
    2 in log2 (13/64 -> 1/4, 7/64 -> 1/8: rounded, not floored), as in
    torchvision; the widths (4/64, 2/64) play no part."""
    features = {"a": torch.randn(1, 2, 13, 4, dtype=torch.float64, device=DEVICE),
                "b": torch.randn(1, 2, 7, 2, dtype=torch.float64, device=DEVICE)}
    boxes = [torch.tensor([[1.0, 2.0, 30.0, 35.0], [0.0, 0.0, 60.0, 50.0]],
                          dtype=torch.float64, device=DEVICE)]
    _assert_module_is_torchvisions(features, boxes, [(64, 64)], [0.25, 0.125])


def test_multi_scale_uses_the_maps_in_the_order_of_x():
    """featmap_names selects maps but x's order gives the levels, as in
    torchvision: names listed finest-last pool as names listed finest-first."""
    features = {"a": torch.randn(1, 2, 16, 16, dtype=torch.float64, device=DEVICE),
                "skip": torch.randn(1, 2, 12, 12, dtype=torch.float64, device=DEVICE),
                "b": torch.randn(1, 2, 8, 8, dtype=torch.float64, device=DEVICE)}
    boxes = [torch.tensor([[1.0, 2.0, 30.0, 35.0], [0.0, 0.0, 63.0, 60.0]],
                          dtype=torch.float64, device=DEVICE)]
    want = torchvision.ops.MultiScaleRoIAlign(["b", "a"], 2, 2)(features, boxes, [(64, 64)])
    ours = segops.nn.MultiScaleRoIAlign(["b", "a"], 2, 2)
    assert_close(ours(features, boxes, [(64, 64)]), want, F64)
    assert ours.scales == [0.25, 0.125]


def test_multi_scale_scales_set_by_hand_fix_the_level_rule_at_the_next_call():
    """Scales set by hand are kept, and the next call fixes the level rule:
    a canonical_scale changed afterwards does not change the output."""
    features = {"a": torch.randn(1, 2, 16, 16, dtype=torch.float64, device=DEVICE),
                "b": torch.randn(1, 2, 8, 8, dtype=torch.float64, device=DEVICE)}
    boxes = [torch.tensor([[1.0, 2.0, 30.0, 35.0]], dtype=torch.float64, device=DEVICE)]
    module = segops.nn.MultiScaleRoIAlign(["a", "b"], 2, 2)
    module.scales = [0.25, 0.125]
    first = module(features, boxes, [(64, 64)])
    assert module.scales == [0.25, 0.125] and module.level_rule == (224, 4)
    module.canonical_scale = 8     # would send the box to map "b"
    assert_close(module(features, boxes, [(64, 64)]), first, F64)
    fresh = segops.nn.MultiScaleRoIAlign(["a", "b"], 2, 2, canonical_scale=8)
    fresh.scales = [0.25, 0.125]
    assert not torch.allclose(fresh(features, boxes, [(64, 64)]), first)
