"""RoIAlign: kernels vs reference vs torchvision (forward and gradient, every
branch), both backward paths, multi-level pooling, dtypes, layouts, edges,
errors, opcheck, compile and autocast."""
import collections

import pytest
import torch
from helpers import DEVICE, KERNEL_DTYPES, ON_GPU, RTOL, assert_close, like_layout

import segops
from segops import _dispatch
from segops.kernels import roi_align as kernels
from segops.ops.roi_align import _as_rois
from segops.reference import roi_align as ref

torchvision = pytest.importorskip("torchvision")

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
    want_grad = ref.roi_align_backward(grad, *cpu_args)
    return out, want, atomic, determ, want_grad


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
    x = like_layout(torch.randn(3, 5, 6, 8, dtype=torch.float64), layout).to(DEVICE)
    rois = make_rois(8, 3, 6, 8).to(DEVICE)
    results = kernel_and_reference([x], rois, None, [1.0], (3, 2), -1, layout == "strided",
                                   pool_mode)
    check_all(*results, F64)
    if layout == "channels_last":
        assert results[0].is_contiguous(memory_format=torch.channels_last)
        assert all(g.is_contiguous(memory_format=torch.channels_last) for g in results[2])


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
        (f"p{i}", like_layout(torch.randn(2, C, h, w, dtype=dtype), layout).to(DEVICE))
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


def test_multi_scale_one_level_and_names_filter():
    features, boxes, shapes = fpn_case()
    out = segops.nn.MultiScaleRoIAlign(["p1"], 2, 2)(features, boxes, shapes)
    want = torchvision.ops.MultiScaleRoIAlign(["p1"], 2, 2)(features, boxes, shapes)
    assert_close(out, want, F64)


# --------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------
def test_deterministic_mode_is_bit_identical():
    x = torch.randn(2, 4, 8, 8, dtype=KERNEL_DTYPES[0], device=DEVICE, requires_grad=True)
    rois = make_rois(8, 2, 8, 8).to(DEVICE)
    grad = torch.randn(8, 4, 2, 2, dtype=x.dtype, device=DEVICE)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [torch.autograd.grad(segops.ops.roi_align(x, rois, 2, 1.0, 2), x, grad)[0]
                for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(previous)
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
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        segops.ops.roi_align(x, [torch.zeros(0, 4, device=DEVICE)] * 2, 2).sum().backward()
    finally:
        torch.use_deterministic_algorithms(previous)
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


def test_opcheck():
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    rois = make_rois(3, 2, 5, 4, seed_kinds=False).to(DEVICE)
    options = ([1.0], 2, 2, 2, False, "avg")
    torch.library.opcheck(torch.ops.segops.roi_align.default, ([x], rois, None, *options))
    grad = torch.randn(3, 3, 2, 2, dtype=torch.float64, device=DEVICE)
    torch.library.opcheck(torch.ops.segops.roi_align_backward.default,
                          (grad, [x.detach()], rois, None, *options, True))


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
    assert "aligned=True" in repr(m) and m.state_dict() == {}
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
    ("boxes as a tensor must have shape", ValueError, lambda: ((_x(), torch.zeros(3, 4)), {})),
    ("must have shape \\(L, 4\\)", ValueError, lambda: ((_x(), [torch.zeros(3, 5)]), {})),
    ("empty list", ValueError, lambda: ((_x(), []), {})),
    ("must be a Tensor\\[K, 5\\]", TypeError, lambda: ((_x(), "boxes"), {})),
    ("batch index 2.0", ValueError,
     lambda: ((_x(), torch.tensor([[2.0, 0, 0, 1, 1]])), {})),
    ("batch index 0.5", ValueError,
     lambda: ((_x(), torch.tensor([[0.5, 0, 0, 1, 1]])), {})),
    ("batch index nan", ValueError,
     lambda: ((_x(), torch.tensor([[float("nan"), 0, 0, 1, 1]])), {})),
    ("real coordinates", TypeError, lambda: ((_x(), torch.zeros(1, 5, dtype=torch.bool)), {})),
    ("spatial_scale must be finite and >= 0", ValueError,
     lambda: ((_x(), torch.zeros(1, 5)), {"spatial_scale": -1.0})),
    ("output_size must be positive", ValueError,
     lambda: ((_x(), torch.zeros(1, 5)), {"output_size": (0, 2)})),
    ("output_size must be an int or a pair", TypeError,
     lambda: ((_x(), torch.zeros(1, 5)), {"output_size": 2.5})),
    ("sampling_ratio must be an int", TypeError,
     lambda: ((_x(), torch.zeros(1, 5)), {"sampling_ratio": 1.5})),
    ("pool_mode must be one of", ValueError,
     lambda: ((_x(), torch.zeros(1, 5)), {"pool_mode": "sum"})),
    ("input must have 4 dimensions", ValueError,
     lambda: ((torch.randn(3, 5, 5), torch.zeros(1, 5)), {})),
    ("input must have dtype", TypeError,
     lambda: ((torch.zeros(1, 2, 3, 3, dtype=torch.int32), torch.zeros(1, 5)), {})),
]


@pytest.mark.parametrize("match,error,make", BAD_CALLS, ids=[m for m, _, _ in BAD_CALLS])
def test_bad_input_errors(match, error, make):
    (x, boxes), kwargs = make()
    if isinstance(boxes, torch.Tensor):
        boxes = boxes.to(x.device)
    kwargs.setdefault("output_size", 2)
    with pytest.raises(error, match=match):
        segops.ops.roi_align(x, boxes, **kwargs)


def test_bad_multi_scale_input_errors():
    features, boxes, _ = fpn_case()
    maps = list(features.values())
    with pytest.raises(ValueError, match="consecutive powers of 2"):
        segops.ops.multi_scale_roi_align(maps[:2], boxes, 2, [1 / 4, 1 / 16])
    with pytest.raises(ValueError, match="2 scales for 4"):
        segops.ops.multi_scale_roi_align(maps, boxes, 2, [1 / 4, 1 / 8])
    with pytest.raises(TypeError, match="dtype"):
        segops.ops.multi_scale_roi_align([maps[0], maps[1].float()], boxes, 2, [1 / 4, 1 / 8])
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
