"""Fused IoU/Dice: kernels vs reference (forward and gradient), losses vs the
smp formula, confusion matrix vs reference and torchmetrics, edges, errors."""
import numpy as np
import pytest
import torch
from helpers import (DEVICE, KERNEL_DTYPES, ON_GPU, PATHS, RTOL, DispatchCalls, LaunchRecorder,
                     assert_checked_eager_and_compiled, assert_close,
                     assert_device_assert_in_child, deterministic, like_layout,
                     on_path, second_order_grads, skip_off_kernel_path_on_gpu)

import segops
from segops import _checks, _dispatch
from segops.kernels import overlap as kernels
from segops.ops import overlap as ops
from segops.reference import overlap as ref

ACTIVATIONS = ["softmax", "sigmoid", "none"]
# tests computed in the kernels' main dtype here: float64 in the interpreter,
# float32 on a GPU
TOL = RTOL[KERNEL_DTYPES[0]]
NAN, INF = float("nan"), float("inf")


def make_case(N, C, spatial, dense, activation, ignore_index=None, dtype=torch.float64):
    """Random scores (probabilities for activation 'none') and a target with
    some pixels/elements set to ignore_index."""
    x = torch.randn(N, C, *spatial, dtype=torch.float64) * 2
    if activation == "none":
        x = x.sigmoid()
    if dense:
        t = torch.rand(N, C, *spatial, dtype=torch.float64).round()
        if ignore_index is not None:
            t[torch.rand(t.shape) < 0.2] = ignore_index
    else:
        t = torch.randint(0, C, (N, *spatial))
        if ignore_index is not None:
            t[torch.rand(t.shape) < 0.2] = ignore_index
    return x.to(dtype), t


def reference_sums_and_grad(x, t, activation, ignore_index, squared, grad_out,
                            min_intersection=False):
    """float64 reference of the sums and of the input gradient."""
    x64 = x.detach().double().cpu()
    sums = ref.overlap_sums(x64, t.cpu(), activation, ignore_index, squared, min_intersection)
    grad = ref.overlap_sums_backward(grad_out[0].double().cpu(), grad_out[1].double().cpu(),
                                     x64, t.cpu(), activation, ignore_index, squared,
                                     min_intersection)
    return sums, grad


@pytest.mark.parametrize("shape, layout, want", [
    ((2, 21, 8, 8), "contiguous", (32, 32, 1)),
    ((2, 21, 8, 8), "channels_last", (32, 32, 1)),
    ((2, 4, 4, 4, 4), "channels_last", (4, 256, 1)),
    ((2, 4, 4, 4, 4), "contiguous", (4, 256, 1)),
    ((2, 60, 4, 4), "contiguous", (64, 16, 1)),
    ((2, 65, 4, 4), "contiguous", (128, 16, 8)),
    ((2, 150, 4, 4), "channels_last", (256, 16, 8)),
    ((2, 1, 8, 8), "channels_last", (1, 1024, 1)),
    ((2, 2, 8, 8), "contiguous", (2, 512, 1)),
])
def test_tiles_per_class_count(shape, layout, want, monkeypatch):
    """The forward, the backward and the confusion matrix on scores take one
    warp per program up to 64 classes, 32 elements per thread (a pixel's
    classes reduced inside the warp: the H100 sweep's 2.2-5.5x over 8-warp
    tiles); beyond, 2048 elements on 8 warps, at least 16 pixels."""
    tiles = []
    real = kernels._tile

    def spy(*args):
        tiles.append(real(*args))
        return tiles[-1]

    monkeypatch.setattr(kernels, "_tile", spy)
    x = like_layout(torch.randn(shape).to(DEVICE), layout)
    target = torch.randint(0, shape[1], (shape[0],) + shape[2:]).to(DEVICE)
    kernels.overlap_sums_forward(x, target, "softmax", None, False)
    grad = torch.ones(shape[:2], device=DEVICE)
    kernels.overlap_sums_backward(grad, grad, x, target, "softmax", None, False)
    kernels.confusion_matrix(x, target, shape[1], None)
    assert tiles == [want, want, want]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("ignore_index", [None, 2], ids=["no-ignore", "ignore-2"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_per_pixel_paths_with_labels_out_of_range(dtype, ignore_index, layout):
    """The one-chunk softmax paths (forward and backward) with labels outside
    [0, C): negative, in the padded classes [C, BLOCK_C), past BLOCK_C,
    and an ignore_index inside [0, C): sums and gradient as the reference
    (such a label counts its pixel for no class, as a one-hot of it would)."""
    x, t = make_case(2, 5, (4, 9), False, "softmax")
    t[0, 0, :5] = torch.tensor([-3, 5, 6, 9, 1000])
    t[1, 1, :2] = 2
    x = like_layout(x.to(dtype), layout)
    grad_out = torch.randn(3, 2, 5, dtype=torch.float64)
    options = ("softmax", ignore_index, False, True)
    sums = kernels.overlap_sums_forward(x.to(DEVICE), t.to(DEVICE), *options, block_s=16)
    gsum = grad_out.to(DEVICE, kernels.sums_dtype(x))
    grad = kernels.overlap_sums_backward(gsum[0].contiguous(), gsum[1].contiguous(),
                                         x.to(DEVICE), t.to(DEVICE), *options, block_s=16)
    want_sums, want_grad = reference_sums_and_grad(x, t, "softmax", ignore_index, False,
                                                   grad_out, True)
    rtol = RTOL[dtype] if dtype == torch.float64 else 1e-5
    assert_close(sums, want_sums, rtol, name="sums")
    assert_close(grad.double(), want_grad.to(dtype).double(), max(rtol, RTOL[dtype]),
                 name="grad")


@pytest.mark.parametrize("C, activation, dense, want", [
    (21, "softmax", False, True),     # one-warp tile, every class: per-pixel masks
    (64, "softmax", False, True),
    (65, "softmax", False, False),    # 8-warp tile: the generic path (registers)
    (21, "sigmoid", False, False),
    (21, "softmax", True, False),
])
def test_forward_takes_per_pixel_masks_where_it_claims(C, activation, dense, want):
    """The forward's PIXEL_MASKS launches (softmax, index targets, one-warp
    tiles holding every class) and the sums equal the reference's."""
    x = torch.randn(2, C, 3, 5, dtype=KERNEL_DTYPES[0], device=DEVICE)
    t = (torch.rand(2, C, 3, 5) > 0.5).to(x.dtype) if dense else torch.randint(0, C, (2, 3, 5))
    t = t.to(DEVICE)
    with LaunchRecorder(kernels, ["_overlap_sums_fwd_kernel"]) as rec:
        sums = kernels.overlap_sums_forward(x, t, activation, None, False)
    assert [c["PIXEL_MASKS"] for c in rec.constexprs("_overlap_sums_fwd_kernel")] == [want]
    assert_close(sums, ref.overlap_sums(x.double(), t, activation, None, False), TOL)


@pytest.mark.parametrize("C, layout, dtype, block_c, one_chunk, group", [
    (4, "contiguous", torch.float32, None, True, 4),       # C == BLOCK_C: one chunk
    (4, "channels_last", torch.float32, None, True, 256),  # pixels across lanes: whole tile
    (4, "contiguous", torch.float16, None, True, 8),       # 16 bytes of pixels
    (4, "contiguous", torch.float64, None, True, 256),     # float64: whole tile
    (5, "contiguous", torch.float32, None, True, 4),       # C < BLOCK_C
    (4, "contiguous", torch.float32, 2, False, 4),         # chunks of 2
])
def test_one_chunk_and_pixel_group_launch_where_they_claim(C, layout, dtype, block_c,
                                                           one_chunk, group):
    """ONE_CHUNK (every class in one tile, the logits read once: C <= BLOCK_C,
    equality included) of the forward and the backward, and the forward's
    GROUP (one thread's 16-byte vector of pixels where pixels are contiguous,
    else the whole tile), recorded from the launches of dense softmax (the
    generic path), with sums and gradient as the reference."""
    x = like_layout(torch.randn(2, C, 8, 8, dtype=torch.float64), layout)
    t = (torch.rand(2, C, 8, 8) > 0.5).double()
    grad_out = torch.randn(3, 2, C, dtype=torch.float64)
    xd = x.to(DEVICE, dtype)
    gsum = grad_out.to(DEVICE, kernels.sums_dtype(xd))
    names = ["_overlap_sums_fwd_kernel", "_overlap_sums_bwd_kernel"]
    with LaunchRecorder(kernels, names) as rec:
        sums = kernels.overlap_sums_forward(xd, t.to(DEVICE, dtype), "softmax", None, False,
                                            block_c=block_c)
        grad = kernels.overlap_sums_backward(gsum[0].contiguous(), gsum[1].contiguous(), xd,
                                             t.to(DEVICE, dtype), "softmax", None, False,
                                             block_c=block_c)
    fwd, bwd = (rec.constexprs(name) for name in names)
    assert [c["ONE_CHUNK"] for c in fwd + bwd] == [one_chunk, one_chunk]
    assert [c["GROUP"] for c in fwd] == [group]
    want_sums, want_grad = reference_sums_and_grad(xd, t, "softmax", None, False, grad_out)
    rtol = max(RTOL[dtype], 1e-5) if dtype != torch.float64 else RTOL[dtype]
    assert_close(sums, want_sums, rtol, name="sums")
    assert_close(grad.double(), want_grad.to(dtype).double(), rtol, name="grad")


# --------------------------------------------------------------------------
# kernels against the reference
# --------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dense", [False, True], ids=["index", "dense"])
@pytest.mark.parametrize("squared", [False, True], ids=["linear", "squared"])
@pytest.mark.parametrize("ignore_index", [None, 3])
@pytest.mark.parametrize("min_intersection", [False, True], ids=["product", "min"])
@pytest.mark.parametrize("block_c", [4, 16], ids=["chunks", "one-chunk"])
def test_kernel_small_tiles_match_reference(activation, dense, squared, ignore_index,
                                            min_intersection, block_c):
    """Forced tiny tiles: several class chunks (C=10, BLOCK_C=4) or every
    class in one padded tile (BLOCK_C=16, the kernels' single-read path),
    several pixel blocks per program and a ragged tail, several programs.
    Dense targets are soft labels, where the two intersections differ."""
    x, t = make_case(2, 10, (5, 13), dense, activation, ignore_index, dtype=KERNEL_DTYPES[0])
    if dense:
        t = torch.where(t == ignore_index, t, torch.rand_like(t)) if ignore_index else torch.rand_like(t)
    x, t = x.to(DEVICE), t.to(DEVICE)
    grad_out = torch.randn(3, 2, 10, dtype=torch.float64)
    options = (activation, ignore_index, squared, min_intersection)
    # 4 programs: two per sample, each with several pixel blocks
    sums = kernels.overlap_sums_forward(x, t, *options, block_c=block_c, block_s=16, programs=4)
    gsum = grad_out.to(DEVICE, kernels.sums_dtype(x))
    grad = kernels.overlap_sums_backward(gsum[0].contiguous(), gsum[1].contiguous(), x, t,
                                         *options, block_c=block_c, block_s=16)
    want_sums, want_grad = reference_sums_and_grad(x, t, activation, ignore_index, squared,
                                                   grad_out, min_intersection)
    rtol = RTOL[x.dtype] if x.dtype == torch.float64 else 1e-5
    assert_close(sums, want_sums, rtol, name="sums")
    assert_close(grad, want_grad, rtol, name="grad")


@pytest.mark.parametrize("dense", [False, True], ids=["index", "dense"])
def test_min_intersection_gradient_at_nan_and_ties_is_torch_minimums(dense):
    """d min(p, t)/dp as autograd differentiates torch.minimum: 0 above t,
    1/2 at a tie, 1 below, and 1 where p or t is NaN (the kernel and the
    reference backward once gave 0 there)."""
    p = torch.tensor([[[0.2, 0.7, 0.5, float("nan"), 0.0, 1.0, 0.3]],
                      [[0.9, 0.1, 0.4, 0.6, 1.0, 0.0, float("nan")]]], dtype=torch.float64)
    x = torch.cat([p, 1 - p], 1)
    if dense:
        t = torch.tensor([[[0.5, 0.5, 0.5, 0.5, 0.0, 1.0, float("nan")]]], dtype=torch.float64)
        t = torch.cat([t, 1 - t], 1).expand(2, -1, -1).contiguous()
    else:
        t = torch.tensor([[1, 0, 0, 0, 1, 0, 1], [0, 1, 1, 1, 0, 0, 1]])
    x64 = x.clone().requires_grad_()
    want = ref.overlap_sums(x64, t, "none", None, False, True)
    grad_out = torch.randn(3, 2, 2, dtype=torch.float64)
    (want_grad,) = torch.autograd.grad(want, x64, grad_out)
    got_ref = ref.overlap_sums_backward(grad_out[0], grad_out[1], x, t, "none", None, False, True)
    g = grad_out.to(DEVICE, kernels.sums_dtype(x.to(KERNEL_DTYPES[0])))
    got = kernels.overlap_sums_backward(g[0].contiguous(), g[1].contiguous(),
                                        x.to(DEVICE, KERNEL_DTYPES[0]), t.to(DEVICE),
                                        "none", None, False, True)
    assert torch.equal(got_ref, want_grad)
    assert_close(got, want_grad, TOL, name="kernel grad")


@pytest.mark.parametrize("squared", [False, True], ids=["linear", "squared"])
@pytest.mark.parametrize("min_intersection", [False, True], ids=["product", "min"])
@pytest.mark.parametrize("block_c", [4, 16], ids=["chunks", "one-chunk"])
def test_softmax_over_classes_masked_with_minus_inf(squared, min_intersection, block_c):
    """Logits of -inf (classes masked out) filling the first class chunk, the
    first two, or every chunk but the last real class: softmax gives those
    classes 0, as torch's does. (The chunked statistics once computed
    exp(-inf - -inf) there: NaN for the whole pixel.)"""
    x, t = make_case(2, 10, (5, 13), False, "softmax", dtype=KERNEL_DTYPES[0])
    x[0, :4, :2] = float("-inf")
    x[0, :8, 2:4] = float("-inf")
    x[1, :9, 1:3] = float("-inf")
    x[1, 2:6, 4] = float("-inf")
    x, t = x.to(DEVICE), t.to(DEVICE)
    grad_out = torch.randn(3, 2, 10, dtype=torch.float64)
    options = ("softmax", None, squared, min_intersection)
    # 4 programs: two per sample, each with several pixel blocks
    sums = kernels.overlap_sums_forward(x, t, *options, block_c=block_c, block_s=16, programs=4)
    gsum = grad_out.to(DEVICE, kernels.sums_dtype(x))
    grad = kernels.overlap_sums_backward(gsum[0].contiguous(), gsum[1].contiguous(), x, t,
                                         *options, block_c=block_c, block_s=16)
    want_sums, want_grad = reference_sums_and_grad(x, t, "softmax", None, squared, grad_out,
                                                   min_intersection)
    assert not want_sums.isnan().any() and not want_grad.isnan().any()
    rtol = RTOL[x.dtype] if x.dtype == torch.float64 else 1e-5
    assert_close(sums, want_sums, rtol, name="sums")
    assert_close(grad, want_grad, rtol, name="grad")


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("squared", [False, True], ids=["linear", "squared"])
@pytest.mark.parametrize("min_intersection", [False, True], ids=["product", "min"])
def test_softmax_sums_of_large_logits_and_nonfinite_ignored_pixels(dtype, squared,
                                                                   min_intersection):
    """Softmax shifted by each pixel's largest logit: logits near +-3000
    (exp overflows without the shift, and with a shift of the wrong sign or
    scale) give the reference's sums and gradient. NaN and inf logits of
    ignored pixels do not reach the sums, as the reference masks the
    probabilities, but give NaN gradients there, as the reference's softmax
    backward does; a pixel that counts with every logit -inf gives NaN in
    its sample, as torch.softmax does. One class chunk (the per-pixel
    masking paths) and classes padded past C."""
    x, t = make_case(2, 5, (4, 9), False, "softmax", ignore_index=255)
    x = x * 4 + torch.tensor([3000.0, -3000.0]).view(2, 1, 1, 1)
    t[0, 0, :3] = 255
    x[0, :, 0, 0] = float("nan")
    x[0, 2, 0, 1] = float("inf")
    x[0, :, 0, 2] = float("-inf")
    x[1, 3, 1, 1] += 200    # p = 1 and 0 exactly: the min intersection's ties
    t[1, 1, 1] = 3
    x = x.to(dtype)
    options = ("softmax", 255, squared, min_intersection)
    grad_out = torch.randn(3, 2, 5, dtype=torch.float64)
    sums = kernels.overlap_sums_forward(x.to(DEVICE), t.to(DEVICE), *options, block_s=16)
    gsum = grad_out.to(DEVICE, kernels.sums_dtype(x))
    grad = kernels.overlap_sums_backward(gsum[0].contiguous(), gsum[1].contiguous(),
                                         x.to(DEVICE), t.to(DEVICE), *options, block_s=16)
    want_sums, want_grad = reference_sums_and_grad(x, t, "softmax", 255, squared, grad_out,
                                                   min_intersection)
    assert want_sums.isfinite().all() and want_grad[0, :, 0, :3].isnan().all()
    rtol = RTOL[dtype] if dtype == torch.float64 else 1e-5
    assert_close(sums, want_sums, rtol, name="sums")
    assert_close(grad.double(), want_grad.to(dtype).double(), max(rtol, RTOL[dtype]),
                 name="grad")
    x[1, :, 2, 5] = float("-inf")
    t[1, 2, 5] = 1
    sums = kernels.overlap_sums_forward(x.to(DEVICE), t.to(DEVICE), *options, block_s=16)
    assert sums[:2, 0].isfinite().all() and sums[:2, 1].isnan().all()

SIGMOID_TAIL_LOGITS = [-80.0, -40.0, -20.0, -17.5, -10.0, -1.0, -0.0, 0.0, 0.5, 10.0, 17.5,
                       20.0, 40.0, 80.0, INF, -INF, NAN]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("block_c", [1, 16], ids=["chunks", "one-chunk"])
def test_sigmoid_gradient_keeps_its_digits_at_large_logits(path, block_c):
    """float32 logits out to +-80: the gradient of the prediction sum is
    sigmoid'(x) = sigmoid(x) * sigmoid(-x) to float32 rounding at every
    element (p * (1 - p) gives 0 past x ~ 17 and loses digits from x ~ 5),
    0 at +-inf and NaN at NaN, in a class chunk of its own and in one tile
    of every class."""
    skip_off_kernel_path_on_gpu(path)
    x = torch.tensor(SIGMOID_TAIL_LOGITS).repeat(2, 1).view(1, 2, -1)
    x[0, 1] = -x[0, 1]
    t = torch.zeros_like(x)
    grad = torch.tensor([[0.0, 0.0], [1.0, 1.0]])   # d/d(prediction sums)
    with on_path(path):
        if path == "kernel":
            g = kernels.overlap_sums_backward(grad[0:1].to(DEVICE), grad[1:2].to(DEVICE),
                                              x.to(DEVICE), t.to(DEVICE), "sigmoid", None,
                                              False, block_c=block_c, block_s=16)
        else:
            xg = x.clone().requires_grad_()
            (g,) = torch.autograd.grad(ops.overlap_sums(xg, t, activation="sigmoid")[1].sum(),
                                       xg)
    x64 = x.double()
    want = (x64.sigmoid() * (-x64).sigmoid()).float()
    assert want[0, 0, 0] > 0 and want[0, 0, 12] > 0   # the tails are float32 normals
    torch.testing.assert_close(g.cpu(), want, rtol=4e-6, atol=0, equal_nan=True)
    # the same first derivative where the gradient must be differentiable
    xg = x.to(DEVICE).requires_grad_()
    with on_path(path):
        sums = ops.overlap_sums(xg, t.to(DEVICE), activation="sigmoid")
    (g,) = torch.autograd.grad(sums[1].sum(), xg, create_graph=True)
    torch.testing.assert_close(g.detach().cpu(), want, rtol=4e-6, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("spatial", [(37,), (9, 23), (3, 5, 7)], ids=["1d", "2d", "3d"])
def test_op_matches_reference(dtype, activation, spatial):
    """The public op (default tile) on 1-, 2- and 3-D inputs, every dtype,
    forward and gradient, against float64 on the same (rounded) values."""
    x, t = make_case(3, 6, spatial, False, activation, ignore_index=255, dtype=dtype)
    x = x.to(DEVICE).requires_grad_()
    sums = ops.overlap_sums(x, t.to(DEVICE), activation=activation, ignore_index=255)
    grad_out = torch.randn(sums.shape, dtype=torch.float64)
    (grad,) = torch.autograd.grad(sums, x, grad_out.to(DEVICE, sums.dtype))
    want_sums, want_grad = reference_sums_and_grad(x, t, activation, 255, False, grad_out)
    assert sums.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grad.dtype == dtype
    # sums accumulate in fp32 from exactly-representable inputs: fp32 accuracy
    assert_close(sums, want_sums, RTOL[torch.float32] if dtype != torch.float64 else RTOL[dtype])
    assert_close(grad, want_grad, RTOL[dtype], name="grad")


def test_overlap_sums_default_intersection_is_the_product():
    """overlap_sums' default intersection is sum(p*t) (MONAI's), which soft
    targets tell apart from sum(min(p, t))."""
    x, _ = make_case(2, 3, (4, 5), True, "softmax", dtype=KERNEL_DTYPES[0])
    t = torch.rand(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sums = ops.overlap_sums(x.to(DEVICE), t.to(DEVICE, x.dtype))
    p = x.double().softmax(1)
    t = t.to(x.dtype).double()
    want = torch.stack([(p * t).sum((2, 3)), p.sum((2, 3)), t.sum((2, 3))])
    assert_close(sums, want, TOL)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("dims", [2, 3])
def test_memory_formats(layout, dims):
    """channels_last(_3d) and non-contiguous inputs and targets; the gradient
    keeps the input's memory format like ATen."""
    spatial = (6, 7) if dims == 2 else (3, 4, 5)
    x, t = make_case(2, 5, spatial, True, "sigmoid", dtype=KERNEL_DTYPES[0])
    x = like_layout(x.to(DEVICE), layout).requires_grad_()
    td = like_layout(t.to(DEVICE), layout)
    sums = ops.overlap_sums(x, td, activation="sigmoid")
    grad_out = torch.randn(sums.shape, dtype=torch.float64)
    (grad,) = torch.autograd.grad(sums, x, grad_out.to(DEVICE, sums.dtype))
    want_sums, want_grad = reference_sums_and_grad(x, t, "sigmoid", None, False, grad_out)
    assert_close(sums, want_sums, TOL)
    assert_close(grad, want_grad, TOL, name="grad")
    if layout == "channels_last":
        fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
        assert grad.is_contiguous(memory_format=fmt)


def test_channel_slice_input():
    """A channel slice is non-contiguous but flattenable: no copy, same result."""
    x, t = make_case(2, 8, (5, 6), False, "softmax", dtype=KERNEL_DTYPES[0])
    x = x.to(DEVICE)[:, 2:6]
    t = (t % 4).to(DEVICE)
    assert not x.is_contiguous()
    sums = ops.overlap_sums(x, t)
    assert_close(sums, ref.overlap_sums(x.cpu().double(), t.cpu(), "softmax", None, False), TOL)


def test_fp16_sums_do_not_overflow():
    """80 000 pixels of probability 1 in fp16: the sum (> 65504) is exact,
    because the kernel accumulates in fp32."""
    x = torch.ones(1, 1, 80_000, dtype=torch.float16, device=DEVICE)
    t = torch.ones_like(x)
    sums = ops.overlap_sums(x, t, activation="none")
    assert sums.dtype == torch.float32
    assert sums.flatten().tolist() == [80_000.0] * 3


def test_150_classes():
    x, t = make_case(2, 150, (4, 5), False, "softmax", ignore_index=7, dtype=KERNEL_DTYPES[0])
    x, t = x.to(DEVICE), t.to(DEVICE)
    sums = ops.overlap_sums(x, t, ignore_index=7)
    assert_close(sums, ref.overlap_sums(x.cpu().double(), t.cpu(), "softmax", 7, False), TOL)


def test_reference_backward_is_the_gradient_of_reference_forward():
    """gradcheck of the reference path (float64): validates the explicit
    backward formula that the kernels are compared against."""
    for activation in ACTIVATIONS:
        for dense, squared, ignore in [(False, False, None), (False, True, 2), (True, False, 1),
                                       (True, True, None)]:
            x, t = make_case(2, 3, (2, 3), dense, activation, ignore)
            x.requires_grad_()
            with _dispatch.reference_only():
                assert torch.autograd.gradcheck(
                    lambda x: ops.overlap_sums(x, t, activation=activation, ignore_index=ignore,
                                               squared=squared),
                    (x,))


@pytest.mark.skipif(not (ON_GPU or _dispatch.INTERPRET), reason="kernels inactive")
def test_gradcheck_kernel_float64():
    """gradcheck straight through the kernel path (interpreter or GPU, float64)."""
    x, t = make_case(1, 3, (2, 3), False, "softmax", 1)
    x = x.to(DEVICE).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: ops.overlap_sums(x, t.to(DEVICE), ignore_index=1, squared=True), (x,))


# --------------------------------------------------------------------------
# op contract
# --------------------------------------------------------------------------
@pytest.mark.parametrize("dense", [False, True], ids=["index", "dense"])
def test_opcheck(dense):
    x, t = make_case(2, 4, (3, 5), dense, "softmax", dtype=KERNEL_DTYPES[0])
    x, t = x.to(DEVICE).requires_grad_(), t.to(DEVICE)
    options = ("softmax", None, False, dense)
    torch.library.opcheck(torch.ops.segops.overlap_sums.default, (x, t, *options))
    g = torch.randn(2, 4, dtype=kernels.sums_dtype(x), device=DEVICE)
    torch.library.opcheck(torch.ops.segops.overlap_sums_backward.default,
                          (g, g.clone(), x.detach(), t, *options))
    labels = torch.randint(0, 4, (2, 3, 5), device=DEVICE)
    for check_labels in (False, True):
        torch.library.opcheck(torch.ops.segops.confusion_matrix.default,
                              (x.detach(), labels, 4, None, check_labels))


def _permuted(x, layout):
    """x in a dense layout: contiguous, channels_last, or its last two axes
    swapped in memory (dense, but not viewable as one spatial axis)."""
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "hw-swapped":
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    return x.contiguous()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "hw-swapped"])
@pytest.mark.parametrize("path", PATHS)
def test_input_gradient_has_the_strides_the_fake_kernels_promise(path, layout):
    """The gradient ops' fake kernels give torch.empty_like(input)'s strides,
    which torch.compile then reads the real result with: the real gradient of
    overlap_sums and of the fused Dice loss has them on every path (the
    reference's was contiguous for a channels_last input, the kernels' for
    a dense input whose spatial axes cannot be viewed as one: inductor
    raised, or with size_asserts off read the wrong elements)."""
    x, t = make_case(2, 3, (4, 5), False, "softmax", dtype=KERNEL_DTYPES[0])
    device = DEVICE if path == "kernel" else torch.device("cpu")
    x = _permuted(x.to(device), layout).requires_grad_()
    t = t.to(device)
    want = torch.empty_like(x, device="meta").stride()
    with on_path(path):
        sums = ops.overlap_sums(x, t)
        (grad,) = torch.autograd.grad(sums, x, torch.ones_like(sums))
        assert grad.stride() == want
        (grad,) = torch.autograd.grad(ops.dice_loss(x, t, "multiclass"), x)
        assert grad.stride() == want
        torch.library.opcheck(torch.ops.segops.overlap_sums_backward.default,
                              (torch.ones_like(sums[0]), torch.ones_like(sums[1]), x.detach(), t,
                               "softmax", None, False, False))


@pytest.mark.skipif(ON_GPU, reason="a failed device assert ends the CUDA context: "
                                   "test_bad_labels_assert_on_cuda runs them in a child")
@pytest.mark.parametrize("call", [
    lambda x, t: ops.dice_loss(x, t, "multiclass"),
    lambda x, t: ops.overlap_sums(x, t),
    lambda x, t: ops.confusion_matrix(x, t, 3),
    lambda x, t: ops.confusion_matrix(t, t, 3),
], ids=["dice_loss", "overlap_sums", "confusion_matrix", "confusion_matrix-labels"])
@pytest.mark.parametrize("path", PATHS)
def test_labels_are_checked_inside_torch_compile(call, path):
    """validate_args inside torch.compile(fullgraph=True): the check is a
    device assert there (a host read would break the graph), on every
    device; it was skipped, and a label 7 of 3 gave a loss or dropped
    pixels silently."""
    x, t = make_case(1, 3, (4, 4), False, "softmax", dtype=KERNEL_DTYPES[0])
    t[0, 1, 2] = 7
    assert_checked_eager_and_compiled(call, (x, t), path, "label", "label outside")


def test_compile_fullgraph_through_dice_loss():
    loss_fn = segops.nn.DiceLoss("multiclass", validate_args=False)
    x, t = make_case(2, 4, (6, 7), False, "softmax", dtype=KERNEL_DTYPES[0])
    x, t = x.to(DEVICE).requires_grad_(), t.to(DEVICE)
    backend = "inductor" if ON_GPU else "aot_eager"
    compiled = torch.compile(loss_fn, fullgraph=True, backend=backend)
    loss = compiled(x, t)
    (grad,) = torch.autograd.grad(loss, x)
    x2 = x.detach().requires_grad_()
    want = loss_fn(x2, t)
    (want_grad,) = torch.autograd.grad(want, x2)
    assert_close(loss, want, TOL)
    assert_close(grad, want_grad, TOL, name="grad")


def test_autocast_gives_fp32_sums_and_input_dtype_grad():
    device_type = DEVICE.type
    half = torch.float16 if ON_GPU else torch.bfloat16
    x = torch.randn(2, 3, 4, 5, device=DEVICE, dtype=half, requires_grad=True)
    t = torch.randint(0, 3, (2, 4, 5), device=DEVICE)
    with torch.autocast(device_type, dtype=half):
        loss = ops.dice_loss(x, t)
    assert loss.dtype == torch.float32
    loss.backward()
    assert x.grad.dtype == half


# --------------------------------------------------------------------------
# losses against the smp formula (and smp itself when installed)
# --------------------------------------------------------------------------
LOSS_CASES = [
    # mode, C, options
    ("multiclass", 5, dict()),
    ("multiclass", 5, dict(ignore_index=255, smooth=1.0)),
    ("multiclass", 5, dict(classes=[0, 2], log_loss=True)),
    ("multiclass", 5, dict(from_logits=False)),
    ("binary", 1, dict()),
    ("binary", 1, dict(ignore_index=-1, smooth=0.5)),
    ("multilabel", 4, dict(log_loss=True, eps=1e-3)),
    ("multilabel", 4, dict(ignore_index=2)),
    ("multilabel", 4, dict(soft=True, smooth=0.3)),
    ("multiclass", 5, dict(classes=[1, 3, 4], class_weights=[1.0, 2.0, 0.5, 3.0, 1.5])),
]


def loss_inputs(mode, C, options, dtype):
    """Inputs for a LOSS_CASES row; pops the test-only 'soft' flag (soft
    labels in [0, 1], where the fuzzy and product intersections differ)."""
    soft = options.pop("soft", False)
    spatial = (7, 9)
    x = torch.randn(3, C, *spatial, dtype=torch.float64) * 2
    if not options.get("from_logits", True):
        x = x.softmax(1) if mode == "multiclass" else x.sigmoid()
    if mode == "multiclass":
        t = torch.randint(0, C, (3, *spatial))
        t[:, :, 0] = 0  # class 4 may still be absent: skip_empty matters
        t[t == 4] = 3
    elif mode == "binary":
        t = torch.randint(0, 2, (3, *spatial))
    else:
        t = torch.rand(3, C, *spatial, dtype=torch.float64)
        t = t if soft else t.round()
    ignore = options.get("ignore_index")
    if ignore is not None:
        t[torch.rand(t.shape) < 0.2] = ignore
    return x.to(dtype), t


@pytest.mark.parametrize("kind", ["dice", "jaccard"])
@pytest.mark.parametrize("mode,C,options", LOSS_CASES)
def test_loss_matches_smp_formula(kind, mode, C, options):
    options = dict(options)
    dtype = KERNEL_DTYPES[0]
    x, t = loss_inputs(mode, C, options, dtype)
    fn = ops.dice_loss if kind == "dice" else ops.jaccard_loss
    # copies: on the CPU .to(DEVICE) and .double() of a float64 tensor
    # return the tensor itself, and the two gradients would be one
    xd = x.clone().to(DEVICE).requires_grad_()
    loss = fn(xd, t.to(DEVICE), mode, **options)
    loss.backward()
    x64 = x.clone().double().requires_grad_()
    want = ref.smp_overlap_loss(kind, x64, t, mode, **options)
    want.backward()
    assert_close(loss, want, TOL, name="loss")
    assert_close(xd.grad, x64.grad, TOL, name="grad")


@pytest.mark.parametrize("kind", ["dice", "jaccard"])
@pytest.mark.parametrize("mode,C,options", [LOSS_CASES[i] for i in (1, 2, 5, 8, 9)])
def test_loss_double_backward_matches_smp_formula(kind, mode, C, options):
    """create_graph=True through the loss (MAML, input-gradient penalties):
    the second-order gradients (input, and the incoming gradient as a leaf
    and as a constant) of <input gradient, probe>, against smp's formula
    under autograd. The first-order gradient is the same function there
    (autograd over the reference) as without create_graph (the kernels)."""
    options = dict(options)
    dtype = KERNEL_DTYPES[0]
    x, t = loss_inputs(mode, C, options, dtype)
    fn = ops.dice_loss if kind == "dice" else ops.jaccard_loss
    probe = torch.randn(x.shape, dtype=torch.float64)
    dy = torch.tensor(0.75, dtype=torch.float64)
    xd = x.clone().to(DEVICE).requires_grad_()
    (plain,) = torch.autograd.grad(fn(xd, t.to(DEVICE), mode, **options), xd, dy.to(DEVICE))
    for dy_is_leaf in (True, False):
        got = second_order_grads(lambda v: fn(v, t.to(DEVICE), mode, **options), [x.to(DEVICE)],
                                 dy.to(DEVICE, dtype), [probe.to(DEVICE, dtype)], dy_is_leaf)
        want = second_order_grads(lambda v: ref.smp_overlap_loss(kind, v, t, mode, **options),
                                  [x.double()], dy, [probe], dy_is_leaf)
        assert_close(got[0][0], plain, TOL, name="first order, create_graph vs kernels")
        for name, g, w in zip(("first order", "input", "dy"), (*got[0], *got[1]),
                              (*want[0], *want[1])):
            assert_close(g, w, TOL, name=f"{name}, dy leaf {dy_is_leaf}")


@pytest.mark.parametrize("options", [dict(activation="softmax", ignore_index=2),
                                     dict(activation="sigmoid", squared=True),
                                     dict(activation="none", intersection="min")])
def test_sums_double_backward_matches_reference(options):
    """overlap_sums under create_graph=True: second-order gradients against
    autograd over the reference sums (what the op then computes: this
    checks the options reach it), and the create_graph first-order gradient
    against the kernels' (without create_graph)."""
    x, t = make_case(2, 4, (3, 5), False, options["activation"], options.get("ignore_index"),
                     dtype=KERNEL_DTYPES[0])
    if options["activation"] == "none":
        t = torch.rand(x.shape, dtype=x.dtype)   # dense soft labels: min() has both sides
    grad = torch.randn(3, 2, 4, dtype=torch.float64)
    probe = torch.randn(x.shape, dtype=torch.float64)
    sums_options = (options["activation"], options.get("ignore_index"),
                    options.get("squared", False), options.get("intersection") == "min")
    got = second_order_grads(lambda v: ops.overlap_sums(v, t.to(DEVICE), **options),
                             [x.to(DEVICE)], grad.to(DEVICE, kernels.sums_dtype(x)),
                             [probe.to(DEVICE, x.dtype)])
    want = second_order_grads(lambda v: ref.overlap_sums(v, t.double(), *sums_options),
                              [x.double()], grad, [probe])
    xd = x.clone().to(DEVICE).requires_grad_()
    (plain,) = torch.autograd.grad(ops.overlap_sums(xd, t.to(DEVICE), **options), xd,
                                   grad.to(DEVICE, kernels.sums_dtype(x)))
    assert_close(got[0][0], plain, TOL, name="first order, create_graph vs kernels")
    for name, g, w in zip(("first order", "input", "grad"), (*got[0], *got[1]),
                          (*want[0], *want[1])):
        assert_close(g, w, TOL, name=name)


@pytest.mark.parametrize("kind", ["dice", "jaccard"])
@pytest.mark.parametrize("mode,C,options", LOSS_CASES)
def test_loss_matches_smp_package(kind, mode, C, options):
    smp_losses = pytest.importorskip("segmentation_models_pytorch.losses")
    options = dict(options)
    x, t = loss_inputs(mode, C, options, torch.float32)
    name = "DiceLoss" if kind == "dice" else "JaccardLoss"
    xd = x.clone().to(DEVICE).requires_grad_()   # a copy on the CPU too
    ours = getattr(segops.nn, name)(mode, **options)(xd, t.to(DEVICE))
    ours.backward()
    x.requires_grad_()
    theirs = getattr(smp_losses, name)(mode, **options)(x, t)
    theirs.backward()
    assert_close(ours, theirs, 1e-5)
    assert_close(xd.grad, x.grad, 1e-5, name="grad")


SMP_SHAPES = [
    # mode, input shape, target shape: the shapes smp reads besides ours
    ("multiclass", (2, 4, 5, 6), (2, 1, 5, 6)),      # labels with a channel
    ("multiclass", (2, 1, 5, 6), (2, 1, 5, 6)),      # one class: labels, not a mask
    ("binary", (2, 5, 6), (2, 5, 6)),                # no channel
    ("binary", (2, 5, 6), (2, 1, 5, 6)),
    ("binary", (2, 3, 5, 6), (2, 3, 5, 6)),          # several channels, pooled
    ("binary", (2, 7), (2, 7)),
]


@pytest.mark.parametrize("kind", ["dice", "jaccard"])
@pytest.mark.parametrize("mode, input_shape, target_shape", SMP_SHAPES)
def test_loss_takes_the_shapes_smp_takes(kind, mode, input_shape, target_shape):
    """Each gives the loss and gradient of the canonical shapes ((N, 1, *)
    binary input, (N, *) multiclass labels), with and without ignore_index,
    and smp's own numbers where smp is installed."""
    fn = ops.dice_loss if kind == "dice" else ops.jaccard_loss
    x = torch.randn(input_shape, dtype=KERNEL_DTYPES[0]) * 2
    C = input_shape[1] if mode == "multiclass" else 2
    t = torch.randint(0, C, target_shape)
    t.view(-1)[::5] = -1
    for options in (dict(), dict(ignore_index=-1, smooth=0.5)):
        if not options:
            t = t.clamp_min(0)
        xd = x.clone().to(DEVICE).requires_grad_()
        loss = fn(xd, t.to(DEVICE), mode, **options)
        loss.backward()
        if mode == "binary":
            canonical_x, canonical_t = x.reshape(x.shape[0], 1, -1), t.reshape(x.shape[0], 1, -1)
        else:
            canonical_x, canonical_t = x, t.squeeze(1)
        xc = canonical_x.clone().to(DEVICE).requires_grad_()
        want = fn(xc, canonical_t.to(DEVICE), mode, **options)
        want.backward()
        assert_close(loss, want, 1e-12, name=str(options))
        assert_close(xd.grad, xc.grad.reshape(x.shape), 1e-12, name=f"grad {options}")
        smp_losses = pytest.importorskip("segmentation_models_pytorch.losses")
        x32 = x.clone().float().requires_grad_()
        name = "DiceLoss" if kind == "dice" else "JaccardLoss"
        theirs = getattr(smp_losses, name)(mode, **options)(x32, t)
        theirs.backward()
        assert_close(loss, theirs, 1e-5, name=f"smp {options}")
        assert_close(xd.grad, x32.grad, 1e-5, name=f"smp grad {options}")


@pytest.mark.parametrize("mode, x_shape, t_shape, t_dtype, error, match", [
    ("multiclass", (2, 4, 5, 6), (2, 4, 5, 6), torch.float32, ValueError, "use mode='multilabel'"),
    ("multiclass", (2, 4, 5, 6), (2, 1, 5, 6), torch.float32, TypeError, "integer target"),
    ("multiclass", (2, 4, 5, 6), (2, 1, 5, 7), torch.int64, ValueError, "use mode='multilabel'"),
    ("binary", (6,), (6,), torch.float32, ValueError, r"\(N, 1, \*spatial\) or \(N, \*spatial\)"),
    ("binary", (2, 5, 6), (2, 5, 7), torch.float32, ValueError, "the input's 60 elements"),
])
def test_loss_shapes_smp_does_not_take_raise(mode, x_shape, t_shape, t_dtype, error, match):
    x = torch.randn(x_shape, device=DEVICE)
    t = torch.zeros(t_shape, dtype=t_dtype, device=DEVICE)
    with pytest.raises(error, match=match):
        ops.dice_loss(x, t, mode)


def test_monai_style_options():
    """batch=False, include_background=False, squared_pred, class_weights,
    skip_empty=False, product intersection against MONAI's formula written out
    (1 - (2I + nr) / (P + T + dr) with smooth_nr = smooth_dr = 2 * smooth)."""
    x, t = make_case(2, 4, (5, 6), False, "softmax", dtype=KERNEL_DTYPES[0])
    w = torch.tensor([9.0, 0.5, 1.0, 2.0])
    loss = ops.dice_loss(x.to(DEVICE), t.to(DEVICE), batch=False, include_background=False,
                         squared_pred=True, class_weights=w, skip_empty=False, smooth=1e-5,
                         eps=1e-12, intersection="product", reduction="none")
    p = x.double().softmax(1).flatten(2)
    onehot = torch.nn.functional.one_hot(t.flatten(1), 4).permute(0, 2, 1).double()
    dice = (2 * (p * onehot).sum(-1) + 2e-5) / ((p * p).sum(-1) + onehot.sum(-1) + 2e-5)
    want = (1 - dice)[:, 1:] * w[1:].double()
    assert loss.shape == (2, 3)
    assert_close(loss, want, TOL)


@pytest.mark.parametrize("kind", ["dice", "jaccard"])
def test_per_sample_weighted_mean_is_the_mean_of_sample_means(kind):
    """batch=False with class_weights and reduction='mean': each sample's
    weighted class mean sum(w*l)/sum(w), averaged over samples (it once
    divided by sum(w) alone, N times too large)."""
    fn = ops.dice_loss if kind == "dice" else ops.jaccard_loss
    x, t = make_case(3, 4, (5, 6), False, "softmax", dtype=KERNEL_DTYPES[0])
    x, t = x.to(DEVICE), t.to(DEVICE)
    w = [1.0, 2.0, 0.5, 3.0]
    options = dict(batch=False, class_weights=w, classes=[0, 1, 3])
    weighted = fn(x, t, reduction="none", **options)   # w * l per (sample, class)
    assert weighted.shape == (3, 3)
    want = (weighted.sum(1) / (w[0] + w[1] + w[3])).mean()
    assert_close(fn(x, t, reduction="mean", **options), want, TOL)
    # one sample: the per-sample mean is the batch mean
    one = fn(x[:1], t[:1], reduction="mean", **options)
    assert_close(one, fn(x[:1], t[:1], reduction="mean", class_weights=w, classes=[0, 1, 3]), TOL)


@pytest.mark.parametrize("kind", ["dice", "jaccard"])
@pytest.mark.parametrize("route", ["reference", "weights_need_grad"])
def test_per_sample_weighted_mean_on_the_composite_path(kind, route):
    """batch=False, class weights, 'mean' off the fused kernel: the mean over samples of each
    sample's weighted class mean sum(w*l)/sum(w), as on the fused path."""
    fn = ops.dice_loss if kind == "dice" else ops.jaccard_loss
    x, t = make_case(3, 4, (5, 6), False, "softmax", dtype=KERNEL_DTYPES[0])
    path = "reference" if route == "reference" else "kernel"
    dev = DEVICE if path == "kernel" else torch.device("cpu")
    x, t = x.to(dev), t.to(dev)
    w = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=x.dtype, device=dev,
                     requires_grad=route == "weights_need_grad")
    options = dict(batch=False, classes=[0, 1, 3])
    with on_path(path):
        weighted = fn(x, t, reduction="none", class_weights=w, **options)   # w * l, (N, 3)
        got = fn(x, t, reduction="mean", class_weights=w, **options)
    assert weighted.shape == (3, 3)
    want = (weighted.detach().sum(1) / (w[0] + w[1] + w[3]).detach()).mean()
    assert_close(got.detach(), want, TOL)


@pytest.mark.parametrize("module", ["DiceLoss", "JaccardLoss"])
def test_loss_module_passes_validate_args(module):
    """validate_args=False on the module reaches the op: a label past C is not an error,
    and the loss is the functional one's with validate_args=False."""
    x, t = make_case(2, 3, (4, 5), False, "softmax", dtype=KERNEL_DTYPES[0])
    t[0, 1, 2] = 7
    fn = ops.dice_loss if module == "DiceLoss" else ops.jaccard_loss
    with pytest.raises(ValueError, match="label 7"):
        getattr(segops.nn, module)("multiclass")(x, t)   # CPU: a host-side check
    unchecked = getattr(segops.nn, module)("multiclass", validate_args=False)
    x, t = x.to(DEVICE), t.to(DEVICE)
    assert_close(unchecked(x, t), fn(x, t, "multiclass", validate_args=False), TOL)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_negative_classes_wrap_like_positive_ones(reduction):
    """classes=[-1, 0] selects the last class then class 0, as classes=[C - 1, 0] does."""
    x, t = make_case(2, 4, (3, 5), False, "softmax", dtype=KERNEL_DTYPES[0])
    x, t = x.to(DEVICE), t.to(DEVICE)
    w = [1.0, 2.0, 0.5, 3.0]
    for fn in (ops.dice_loss, ops.jaccard_loss):
        want = fn(x, t, classes=[3, 0], class_weights=w, reduction=reduction)
        got = fn(x, t, classes=[-1, 0], class_weights=w, reduction=reduction)
        assert got.shape == want.shape
        assert_close(got, want, TOL)


def test_loss_modules_are_smp_compatible():
    dice = segops.nn.DiceLoss("multiclass", [1, 2], False, True, 0.5, 255, 1e-6, [1, 2, 3])
    assert dice.options["ignore_index"] == 255 and dice.options["eps"] == 1e-6
    assert dice.options["class_weights"] == [1, 2, 3]
    jac = segops.nn.JaccardLoss("multilabel", None, True, True, 0.0, None, 1e-5)
    assert jac.options["eps"] == 1e-5 and jac.options["ignore_index"] is None
    with pytest.raises(ValueError, match="binary"):
        segops.nn.DiceLoss("binary", classes=[0])


def test_loss_module_pickled_with_an_options_dict_still_loads():
    """Modules pickled before the options became attributes kept them in
    ``options``: unpickling moves them to the attributes."""
    import pickle
    loss = segops.nn.DiceLoss("multiclass", smooth=3.0)
    state = dict(loss.__dict__)
    state["options"] = {name: state.pop(name) for name in loss.OPTIONS}
    old = segops.nn.DiceLoss.__new__(segops.nn.DiceLoss)
    old.__dict__.update(state)
    restored = pickle.loads(pickle.dumps(old))
    assert restored.smooth == 3.0 and restored.options == loss.options
    assert "options" not in restored.__dict__


@pytest.mark.parametrize("module", ["DiceLoss", "JaccardLoss"])
def test_loss_module_attributes_set_later_take_effect(module):
    """smp's losses read self.smooth, self.eps, self.classes, ... at every
    call; so do segops' (they were copied into a dict at construction, and
    ``loss.smooth = 10`` changed nothing)."""
    x, t = make_case(2, 4, (3, 5), False, "softmax", dtype=KERNEL_DTYPES[0])
    x, t = x.to(DEVICE), t.to(DEVICE)
    loss = getattr(segops.nn, module)("multiclass")
    assert isinstance(loss, torch.nn.modules.loss._Loss)
    fn = ops.dice_loss if module == "DiceLoss" else ops.jaccard_loss
    changes = dict(smooth=10.0, eps=0.5, classes=[0, 2], log_loss=True, ignore_index=1,
                   class_weights=[1.0, 2.0, 3.0, 4.0])
    for name, value in changes.items():
        setattr(loss, name, value)
        assert loss.options[name] == value
    want = fn(x, t, "multiclass", **changes)
    assert_close(loss(x, t), want, TOL)
    assert not torch.allclose(want, fn(x, t, "multiclass"))


# --------------------------------------------------------------------------
# edge cases
# --------------------------------------------------------------------------
def test_empty_batch():
    x = torch.randn(0, 3, 4, 4, device=DEVICE, dtype=KERNEL_DTYPES[0], requires_grad=True)
    t = torch.zeros(0, 4, 4, dtype=torch.long, device=DEVICE)
    sums = ops.overlap_sums(x, t)
    assert sums.shape == (3, 0, 3)
    loss = ops.dice_loss(x, t)
    loss.backward()
    assert loss.item() == 0.0 and x.grad.shape == x.shape
    assert ops.confusion_matrix(x, t, 3).sum().item() == 0


def test_all_pixels_ignored():
    x = torch.randn(2, 3, 4, 4, device=DEVICE, dtype=KERNEL_DTYPES[0], requires_grad=True)
    t = torch.full((2, 4, 4), 255, device=DEVICE)
    sums = ops.overlap_sums(x, t, ignore_index=255)
    assert torch.count_nonzero(sums) == 0
    loss = ops.dice_loss(x, t, ignore_index=255)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(x.grad) == 0
    assert ops.confusion_matrix(x, t, 3, 255).sum().item() == 0


def test_single_pixel_and_binary_c1():
    x = torch.randn(1, 1, 1, 1, device=DEVICE, dtype=KERNEL_DTYPES[0])
    t = torch.ones(1, 1, 1, device=DEVICE)
    loss = ops.dice_loss(x, t, "binary")
    p = x.double().sigmoid().item()
    assert_close(loss, torch.tensor(1 - 2 * p / (p + 1), dtype=torch.float64), TOL)


def test_uint8_and_int32_targets_and_bool_masks():
    x, t = make_case(2, 4, (5, 6), False, "softmax", dtype=KERNEL_DTYPES[0])
    x = x.to(DEVICE)
    want = ops.overlap_sums(x, t.to(DEVICE))
    for dtype in (torch.uint8, torch.int32):
        assert torch.equal(ops.overlap_sums(x, t.to(DEVICE, dtype)), want)
    mask = torch.rand(x.shape, device=DEVICE) > 0.5
    assert torch.equal(ops.overlap_sums(x, mask, activation="sigmoid"),
                       ops.overlap_sums(x, mask.to(x.dtype), activation="sigmoid"))


# --------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------
def test_bad_input_errors():
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    t = torch.randint(0, 3, (2, 4, 4), device=DEVICE)
    # label values are checked on the host off CUDA (on CUDA: a device-side
    # assert, test_bad_labels_assert_on_cuda): CPU copies here
    x_cpu, t_cpu = x.cpu(), t.cpu()
    with pytest.raises(ValueError, match="label 7"):
        ops.overlap_sums(x_cpu, torch.full_like(t_cpu, 7))
    with pytest.raises(ValueError, match="label 255"):
        ops.overlap_sums(x_cpu, torch.full_like(t_cpu, 255), ignore_index=254)
    ops.overlap_sums(x, torch.full_like(t, 255), ignore_index=255)
    with pytest.raises(ValueError, match="target must have shape"):
        ops.overlap_sums(x, t[:, :3])
    with pytest.raises(ValueError, match="dense target"):
        ops.overlap_sums(x, torch.rand(2, 3, 4, 5, device=DEVICE))
    with pytest.raises(TypeError, match="target must be real"):
        ops.overlap_sums(x, torch.rand(2, 3, 4, 4, device=DEVICE, dtype=torch.complex64))
    with pytest.raises(TypeError, match="integer target"):
        ops.dice_loss(x, t.float(), "multiclass")
    with pytest.raises(TypeError, match="input must have dtype"):
        ops.overlap_sums(x.long(), t)
    with pytest.raises(ValueError, match="input must have 3 or 4 or 5 dimensions"):
        ops.overlap_sums(x[0, 0], t[0])
    with pytest.raises(ValueError, match="one device"):
        ops.overlap_sums(x, t.to("meta"))
    with pytest.raises(ValueError, match="activation"):
        ops.overlap_sums(x, t, activation="relu")
    with pytest.raises(ValueError, match="mode"):
        ops.dice_loss(x, t, "multi")
    with pytest.raises(ValueError, match="class_weights"):
        ops.dice_loss(x, t, class_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="intersection"):
        ops.overlap_sums(x, t, intersection="max")
    with pytest.raises(ValueError, match="label 3"):
        ops.confusion_matrix(x_cpu, torch.full_like(t_cpu, 3), 3)
    with pytest.raises(ValueError, match="pred scores"):
        ops.confusion_matrix(x, t, 4)
    with pytest.raises(TypeError, match="num_classes"):
        ops.confusion_matrix(x, t, 3.0)


@pytest.mark.skipif(not ON_GPU, reason="the device-side assert exists only on CUDA")
@pytest.mark.parametrize("call", ["overlap_sums(x, t{})", "dice_loss(x, t{})",
                                  "confusion_matrix(x, t, 3{})"])
def test_bad_labels_assert_on_cuda(call):
    """validate_args on CUDA checks labels without a sync
    (torch._assert_async): a bad label fails the CUDA context, as torch's
    own index checks do, so the calls run in a child process. Unchecked,
    the same call runs (out-of-range labels match no class)."""
    assert_device_assert_in_child(
        "import torch\nfrom segops import ops\n"
        "x = torch.randn(2, 3, 4, 4, device='cuda')\n"
        "t = torch.full((2, 4, 4), 7, device='cuda')",
        f"ops.{call.format(', validate_args=False')}", f"ops.{call.format('')}")


# --------------------------------------------------------------------------
# confusion matrix and scores
# --------------------------------------------------------------------------
@pytest.mark.parametrize("C", [1, 5, 50], ids=["C1", "C5", "C50-direct-atomics"])
@pytest.mark.parametrize("pred_kind", ["labels", "scores"])
def test_confusion_matrix_matches_reference(C, pred_kind):
    scores = torch.randn(3, C, 9, 17, dtype=KERNEL_DTYPES[0])
    t = torch.randint(0, C, (3, 9, 17), dtype=torch.int32)
    t[0, 0] = 255
    pred = scores if pred_kind == "scores" else scores.argmax(1).to(torch.uint8)
    cm = ops.confusion_matrix(pred.to(DEVICE), t.to(DEVICE), C, 255)
    assert torch.equal(cm.cpu(), ref.confusion_matrix(pred, t, C, 255))


def test_confusion_matrix_class_chunks_and_ties():
    """argmax across class chunks keeps the first maximum, like torch.argmax."""
    scores = torch.randint(0, 3, (2, 7, 5, 6)).to(KERNEL_DTYPES[0])  # many ties
    t = torch.randint(0, 7, (2, 5, 6))
    cm = kernels.confusion_matrix(scores.to(DEVICE), t.to(DEVICE), 7, None, block_c=2, block_s=16)
    assert torch.equal(cm.cpu(), ref.confusion_matrix(scores, t, 7, None))


def test_confusion_matrix_deterministic_mode():
    """Under use_deterministic_algorithms the op neither raises (no ATen op
    without a deterministic CUDA kernel) nor falls back: exact counts."""
    scores = torch.randn(2, 6, 20, 20)
    t = torch.randint(0, 6, (2, 20, 20))
    with deterministic():
        cm = ops.confusion_matrix(scores.to(DEVICE), t.to(DEVICE), 6)
    assert torch.equal(cm.cpu(), ref.confusion_matrix(scores, t, 6, None))


def f64(*values):
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize("path", PATHS)
def test_scores_with_ignore_index_past_the_classes_ignore_nothing(path):
    """ignore_index = C (a void label outside the matrix, e.g. 255 of a
    C-class one) leaves every class in, as torchmetrics does, on every path."""
    cm = torch.tensor([[3, 1, 0], [2, 4, 1], [0, 2, 5]])
    cm = cm.to(DEVICE if path == "kernel" else torch.device("cpu"))
    with on_path(path):
        for score in (ops.iou_score, ops.dice_score):
            for average in ("macro", "micro", "weighted", "none"):
                assert torch.equal(score(cm, average, ignore_index=3), score(cm, average))


def test_dice_score_ignore_index_changes_nothing():
    """dice_score keeps an ignore_index class in every average (torchmetrics'
    MulticlassF1Score does); only iou_score leaves it out."""
    cm = torch.tensor([[3, 1, 0], [2, 4, 1], [0, 2, 5]])
    for average in ("macro", "micro", "weighted", "none"):
        assert torch.equal(ops.dice_score(cm, average, ignore_index=1), ops.dice_score(cm, average))
    assert not torch.equal(ops.iou_score(cm, ignore_index=1), ops.iou_score(cm))


def test_dense_targets_pass_the_device_check(monkeypatch):
    """With the label check on the device (CUDA, torch.compile), a dense
    target (binary, multilabel, soft labels) is not read as labels: no
    assert fires, the loss is the one checked on the host."""
    x = torch.randn(2, 1, 4, 5, dtype=KERNEL_DTYPES[0], device=DEVICE)
    hard = torch.randint(0, 2, x.shape, device=DEVICE).to(x.dtype)   # 1 is no label of 1 class
    targets = [hard, torch.rand_like(x)]
    want = [ops.dice_loss(x, t, mode) for t in targets for mode in ("binary", "multilabel")]
    monkeypatch.setattr(_checks, "values_checked_on_device", lambda t: True)
    got = [ops.dice_loss(x, t, mode) for t in targets for mode in ("binary", "multilabel")]
    for g, w in zip(got, want):
        assert_close(g, w, TOL)


def test_iou_and_dice_scores_by_hand():
    # rows = target, columns = prediction; class 2 never appears anywhere
    cm = torch.tensor([[3, 1, 0], [2, 4, 0], [0, 0, 0]])
    iou0, iou1 = 3 / (3 + 2 + 1), 4 / (4 + 1 + 2)
    assert_close(ops.iou_score(cm, "none")[:2], f64(iou0, iou1), 1e-12)
    assert torch.isnan(ops.iou_score(cm, "none")[2])
    assert_close(ops.iou_score(cm, "macro"), f64((iou0 + iou1) / 2)[0], 1e-12)
    assert_close(ops.iou_score(cm, "micro"), f64(7 / (7 + 3 + 3))[0], 1e-12)
    assert_close(ops.iou_score(cm, "weighted"), f64((4 * iou0 + 6 * iou1) / 10)[0], 1e-12)
    dice0, dice1 = 6 / (6 + 3), 8 / (8 + 3)
    assert_close(ops.dice_score(cm, "macro"), f64((dice0 + dice1) / 2)[0], 1e-12)
    assert torch.isnan(ops.iou_score(torch.zeros(3, 3, dtype=torch.long)))


def test_iou_matches_torchmetrics_formula():
    C = 6
    scores = torch.randn(4, C, 11, 13)
    t = torch.randint(0, C - 1, (4, 11, 13))  # class 5 absent from the target
    t[:, 0] = 255
    cm = ops.confusion_matrix(scores.to(DEVICE), t.to(DEVICE), C, 255)
    per_class = ops.iou_score(cm, "none").cpu()
    want = ref.torchmetrics_jaccard(scores, t, C, 255)
    present = ~torch.isnan(per_class)
    assert_close(per_class[present], want[present], 1e-12)


def test_iou_matches_torchmetrics_package():
    tm = pytest.importorskip("torchmetrics.classification")
    C = 5
    scores = torch.randn(4, C, 11, 13)
    t = torch.randint(0, C, (4, 11, 13))
    cm = ops.confusion_matrix(scores.to(DEVICE), t.to(DEVICE), C)
    theirs = tm.MulticlassJaccardIndex(num_classes=C, average="none")(scores, t)
    assert_close(ops.iou_score(cm, "none"), theirs.double(), 1e-6)
    theirs = tm.MulticlassJaccardIndex(num_classes=C, average="micro")(scores, t)
    assert_close(ops.iou_score(cm, "micro"), theirs.double(), 1e-6)


SCORE_KERNEL = ["_confusion_score_kernel"]


def random_confusion(C, dtype, absent=(), seed=0):
    """A (C, C) matrix of counts (fractions for float dtypes) with the
    classes ``absent`` in neither target (row) nor prediction (column)."""
    g = torch.Generator().manual_seed(seed)
    cm = torch.randint(0, 9, (C, C), generator=g).double()
    cm += torch.diag(torch.randint(0, 30, (C,), generator=g)).double()
    if dtype.is_floating_point:
        cm = cm * torch.rand(C, C, generator=g, dtype=torch.float64)
    for c in absent:
        cm[c, :] = 0
        cm[:, c] = 0
    return cm.to(dtype)


def each_score(call, C):
    """call(dice, average, dropped, zero_division) for every choice of the
    four (dropped: none, the first class, the last)."""
    for dice in (False, True):
        for average in ops.AVERAGES:
            for dropped in (None, 0, C - 1):
                for zero_division in (NAN, 0.0, 1.0):
                    options = (dice, average, dropped, zero_division)
                    yield options, call(*options)


def kernel_and_reference(cm, **blocks):
    def both(*options):
        return (kernels.confusion_score(cm.to(DEVICE), *options, **blocks),
                ref.confusion_score(cm, *options))
    return both


@pytest.mark.parametrize("C", [1, 2, 5, 19])
@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.float32, torch.float16],
                         ids=str)
@pytest.mark.parametrize("blocks", [{}, {"block_c": 4, "block_k": 2}], ids=["tuned", "4x2"])
def test_confusion_score_kernel_matches_reference(C, dtype, blocks):
    """IoU/Dice, every average, with and without a dropped class, each
    zero_division, absent classes, one or several class blocks (forced
    4 x 2: ragged tails)."""
    cm = random_confusion(C, dtype, absent=[C // 2] if C > 2 else [])
    for options, (got, want) in each_score(kernel_and_reference(cm, **blocks), C):
        assert got.dtype == torch.float64, options
        assert_close(got, want, 1e-13, name=str(options))


def test_confusion_score_of_more_classes_than_a_block():
    """Past 256 classes the tuned tile takes several class blocks."""
    cm = random_confusion(300, torch.int64, absent=[5, 299])
    both = kernel_and_reference(cm)
    for options in [(False, "macro", 7, NAN), (True, "none", None, 0.0),
                    (False, "micro", 299, 1.0)]:
        got, want = both(*options)
        assert_close(got, want, 1e-13, name=str(options))


def test_normalised_confusion_keeps_its_ratios():
    """A matrix of fractions (a normalised one) scores as its counts do: the
    denominators below 1 are divided by, not clamped to 1."""
    counts = random_confusion(6, torch.int64, absent=[4])
    fractions = counts.double() / counts.sum()
    for options, (got, want) in each_score(lambda *options: (
            kernels.confusion_score(fractions.to(DEVICE), *options),
            ref.confusion_score(counts, *options)), 6):
        assert_close(got, want, 1e-13, name=str(options))
    half = torch.tensor([[0.4, 0.1], [0.1, 0.4]], device=DEVICE)
    assert_close(ops.iou_score(half, "none"), f64(2 / 3, 2 / 3), 1e-7)


@pytest.mark.parametrize("zero_division", [0.0, 1.0])
def test_nan_counts_give_nan_not_an_absent_class(zero_division):
    """A row-normalised matrix with an empty row (0/0: NaN) and a NaN count:
    torchmetrics' ratios (NaN where a denominator is NaN, the averages
    NaN), not zero_division as for an absent class (micro scored 1.0 with
    zero_division=1)."""
    counts = torch.tensor([[5.0, 1, 0], [2, 3, 0], [0, 0, 0]], dtype=torch.float64)
    normalised = counts / counts.sum(1, keepdim=True)
    one_nan = counts.clone()
    one_nan[1, 1] = NAN
    for matrix in (normalised, one_nan):
        for average in ("micro", "macro", "weighted"):
            for score in (ops.iou_score, ops.dice_score):
                got = score(matrix.to(DEVICE), average, zero_division=zero_division)
                assert torch.isnan(got), (score.__name__, average, matrix)
    per_class = ops.iou_score(one_nan.to(DEVICE), None, zero_division=zero_division).cpu()
    assert torch.isnan(per_class[1]) and per_class[0] == 5 / 8 and per_class[2] == zero_division
    tm = pytest.importorskip("torchmetrics.functional.classification.jaccard")
    for average in ("micro", "macro", "weighted", "none"):
        theirs = tm._jaccard_index_reduce(one_nan, average, None, zero_division)
        ours = ops.iou_score(one_nan.to(DEVICE), None if average == "none" else average,
                             zero_division=zero_division)
        assert torch.equal(ours.cpu().isnan(), theirs.isnan()), average


@pytest.mark.parametrize("matrix", [
    [[NAN, 1.0], [0.0, 2.0]],
    [[INF, 1.0], [0.0, 2.0]],
    [[1.0, INF], [0.0, 2.0]],
    [[1.0, 0.0], [-INF, 2.0]],
    [[0.0, 0.0], [0.0, 0.0]],
    [[0.0, 0.0], [0.0, 3.0]],
    [[1e300, 1e300], [0.0, 1e300]],
    [[1.0, -0.5], [-0.5 + 1e-310, 1.0]],
], ids=["nan-tp", "inf-tp", "inf-fp", "minus-inf-fn", "zeros", "one-class", "huge",
        "infinite-ratio"])
def test_confusion_score_odd_entries_as_the_reference(matrix):
    """NaN, infinite and negative entries (a float matrix from user code)
    and empty classes: the kernel gives the reference's NaN, inf and
    values."""
    cm = torch.tensor(matrix, dtype=torch.float64)
    for options, (got, want) in each_score(kernel_and_reference(cm), 2):
        assert_close(got, want, 1e-13, name=str(options))


@pytest.mark.parametrize("view", ["transposed", "strided"])
def test_confusion_score_of_a_view(view):
    big = random_confusion(10, torch.int64, absent=[3])
    cm = big.t() if view == "transposed" else big[::2, 1::2]
    assert not cm.is_contiguous()
    both = kernel_and_reference(cm, block_c=2, block_k=2)
    for options, (got, want) in each_score(both, 5):
        assert_close(got, want, 1e-13, name=str(options))


def test_zero_division_where_nothing_is_counted():
    """Nothing counted: micro and 'none' give zero_division, macro and
    weighted NaN (no class to average), as torchmetrics does."""
    nothing = torch.zeros(3, 3, dtype=torch.int64, device=DEVICE)
    assert ops.iou_score(nothing, "micro", zero_division=1) == 1
    assert ops.dice_score(nothing, "micro", zero_division=0) == 0
    assert torch.isnan(ops.iou_score(nothing, "micro"))
    assert torch.isnan(ops.iou_score(nothing, "macro", zero_division=0))
    assert torch.isnan(ops.dice_score(nothing, "weighted", zero_division=1))
    assert torch.equal(ops.iou_score(nothing, None, zero_division=1).cpu(), f64(1, 1, 1))


@pytest.mark.parametrize("value", [0.5, -1, float("inf"), True, "0", None, torch.tensor(0.0),
                                   10**400])
def test_zero_division_must_be_0_1_or_nan(value):
    cm = torch.eye(2, dtype=torch.int64)
    assert ops.iou_score(cm, "micro", zero_division=np.float32(0)) == 1   # numpy numbers pass
    with pytest.raises(segops.ArgumentError, match="zero_division must be 0, 1 or nan"):
        ops.iou_score(cm, zero_division=value)
    with pytest.raises(segops.ArgumentError, match="zero_division must be 0, 1 or nan"):
        segops.metrics.DiceScore(2, zero_division=value)


def test_scores_launch_one_kernel_and_grad_takes_the_composite():
    """A count matrix (or a float one under no_grad) is scored by the one
    kernel; a float matrix that requires grad by the differentiable
    composite, whose gradient is the reference's (finite where a ratio's
    denominator is 0)."""
    counts = random_confusion(5, torch.int64).to(DEVICE)
    with LaunchRecorder(kernels, SCORE_KERNEL) as launched:
        for average in ops.AVERAGES:
            ops.iou_score(counts, average, ignore_index=0)
            ops.dice_score(counts, average)
    assert launched.names_launched() == SCORE_KERNEL * 8
    for average in ops.AVERAGES:
        fractions = random_confusion(5, torch.float64, absent=[1]).to(DEVICE).requires_grad_()
        with LaunchRecorder(kernels, SCORE_KERNEL) as launched:
            score = ops.iou_score(fractions, average, ignore_index=2, zero_division=0)
            score.sum().backward()
            with torch.no_grad():
                assert_close(ops.iou_score(fractions, average, ignore_index=2, zero_division=0),
                             score, 1e-13)
        assert launched.names_launched() == SCORE_KERNEL
        leaf = fractions.detach().cpu().requires_grad_()
        ref.confusion_score(leaf, False, average, 2, 0.0).sum().backward()
        assert torch.isfinite(leaf.grad).all()
        assert_close(fractions.grad, leaf.grad, 1e-13, name="grad")


def test_scores_launch_with_one_nan_object():
    """The kernel's NaN zero_division is always math.nan: the JIT keys its
    cache on the constexpr, and a fresh NaN (the custom op passes a new
    float) would be a new key, an entry per call."""
    import math
    counts = random_confusion(3, torch.int64).to(DEVICE)
    with LaunchRecorder(kernels, SCORE_KERNEL) as launched:
        ops.iou_score(counts, "none", zero_division=float("nan"))
        ops.dice_score(counts)
        ops.iou_score(counts, zero_division=0)
    given = [c["ZERO_DIVISION"] for c in launched.constexprs("_confusion_score_kernel")]
    assert given[0] is math.nan and given[1] is math.nan and given[2] == 0.0


@pytest.mark.parametrize("average", ["none", "macro", "micro", "weighted"])
def test_scores_forward_mode_derivative_is_the_composites(average):
    """A dual tensor does not require grad: forward AD and torch.func.jvp
    take the composite, whose tangent is the reference's (the custom op
    would give none, silently)."""
    cm = random_confusion(4, torch.float64, absent=[2]).to(DEVICE)
    tangent = torch.randn(4, 4, dtype=torch.float64, device=DEVICE)

    def reference(m):
        return ref.confusion_score(m, False, average, 1, 0.0)

    want = torch.func.jvp(reference, (cm,), (tangent,))[1]
    got = torch.func.jvp(lambda m: ops.iou_score(m, average, ignore_index=1, zero_division=0),
                         (cm,), (tangent,))[1]
    assert_close(got, want, 1e-13)
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        score = ops.iou_score(fwAD.make_dual(cm, tangent), average, ignore_index=1,
                              zero_division=0)
        assert_close(fwAD.unpack_dual(score).tangent, want, 1e-13, name="forward_ad")


def test_scores_are_one_dispatcher_call():
    """iou_score and dice_score reach the dispatcher once (the host cost of
    twenty aten ops was the metric's time), MeanIoU.compute too."""
    counts = random_confusion(4, torch.int64).to(DEVICE)
    metric = segops.metrics.MeanIoU(4, ignore_index=1)
    metric.confusion = counts.clone()
    with DispatchCalls() as calls:
        ops.iou_score(counts, "macro", ignore_index=1)
        ops.dice_score(counts, "none")
        metric.compute()
    assert calls.names == ["segops.confusion_score.default"] * 3
    assert_close(metric.compute(), ops.iou_score(counts, "macro", ignore_index=1), 0)


def test_scores_of_an_empty_matrix_and_bool_matrix():
    """C = 0 (nothing to launch) and a bool matrix (no kernel dtype) take the
    reference and answer as it does."""
    empty = torch.zeros(0, 0, dtype=torch.int64, device=DEVICE)
    assert ops.iou_score(empty, "none").shape == (0,)
    assert torch.isnan(ops.iou_score(empty, "macro"))
    flags = torch.eye(3, dtype=torch.bool, device=DEVICE)
    assert_close(ops.iou_score(flags, "none"), f64(1.0, 1.0, 1.0), 0)


@pytest.mark.parametrize("dtype", [torch.int64, torch.float32], ids=str)
def test_confusion_score_opcheck(dtype):
    cm = random_confusion(4, dtype).to(DEVICE)
    for average in ("none", "macro"):
        torch.library.opcheck(torch.ops.segops.confusion_score.default,
                              (cm, False, average, 1, 0.0))


# --------------------------------------------------------------------------
# regression tests: fuzz findings (issue 16) and limits (issue 10)
# --------------------------------------------------------------------------
# per-pixel score vectors (C = 5) and the class torch.argmax picks: NaN is
# the maximum, the first NaN or first maximum wins; with BLOCK_C = 2 the
# deciding values sit in different class chunks
ARGMAX_CASES = [
    [0.0, NAN, 1.0, 0.0, 0.0],
    [INF, NAN, 0.0, 0.0, 0.0],
    [NAN, NAN, 0.0, 0.0, 0.0],
    [0.0, 1.0, 2.0, 2.0, NAN],
    [NAN, INF, INF, 0.0, 0.0],
    [1.0, 1.0, 0.0, 1.0, 1.0],
    [0.0, 0.0, 3.0, 0.0, 3.0],
    [-INF, -INF, -INF, -INF, -INF],
    [-INF, -INF, -INF, -INF, -1.0],
    [INF, 0.0, 0.0, 0.0, INF],
    [0.0, 0.0, 0.0, 0.0, NAN],
]


@pytest.mark.parametrize("block_c", [None, 2], ids=["one-chunk", "chunks-of-2"])
def test_confusion_matrix_argmax_nan_and_ties_like_torch(block_c):
    """torch.argmax's rule (torchmetrics and the reference use it): NaN is
    the maximum, the first NaN wins, and ties go to the first index."""
    rows = torch.tensor(ARGMAX_CASES, dtype=KERNEL_DTYPES[0])  # (P, 5)
    scores = rows.t().reshape(1, 5, 1, -1)                     # one pixel per case
    want_labels = rows.argmax(1)
    for target_label in range(5):
        t = torch.full((1, 1, len(ARGMAX_CASES)), target_label)
        cm = kernels.confusion_matrix(scores.to(DEVICE), t.to(DEVICE), 5, None, block_c=block_c)
        assert torch.equal(cm[target_label].cpu(), torch.bincount(want_labels, minlength=5))
        assert torch.equal(cm.cpu(), ref.confusion_matrix(scores, t, 5, None))


@pytest.mark.parametrize("path", PATHS)
def test_confusion_matrix_of_scores_inside_torch_func_grad(path):
    """Counts from scores inside torch.func.grad (a loss weighted by the
    batch's confusion) are a constant, as torch's argmax-and-bincount count
    is: the scores' gradient comes from the rest of the loss only."""
    C = 3
    x, t = make_case(2, C, (4, 5), False, "softmax", dtype=KERNEL_DTYPES[0])

    def weighted(count):
        return lambda x: (count(x).diagonal().double() * x.sum((0, 2, 3))).sum()

    def torchs(x):
        return torch.bincount((t * C + x.argmax(1)).flatten(), minlength=C * C).reshape(C, C)

    want = torch.func.grad(weighted(torchs))(x)
    device = DEVICE if path == "kernel" else torch.device("cpu")
    with on_path(path):
        got = torch.func.grad(weighted(lambda x: ops.confusion_matrix(x, t.to(device), C)))(
            x.to(device))
    assert torch.equal(got.cpu(), want)


def test_confusion_matrix_nan_score_matches_torchmetrics():
    tm = pytest.importorskip("torchmetrics.classification")
    scores = torch.tensor([0.0, NAN, 1.0]).reshape(1, 3, 1, 1)
    t = torch.ones(1, 1, 1, dtype=torch.long)
    cm = ops.confusion_matrix(scores.to(DEVICE, KERNEL_DTYPES[0]), t.to(DEVICE), 3)
    theirs = tm.MulticlassConfusionMatrix(num_classes=3, validate_args=False)(scores, t)
    assert torch.equal(cm.cpu(), theirs)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_confusion_matrix_wide_labels_are_not_truncated(dtype):
    """Labels are compared at their full width: 2**32 + 1 is out of range,
    not class 1 (documented rule: out-of-range pairs are not counted)."""
    info = torch.iinfo(dtype)
    wide = [info.max, info.min, 2**31 - 1, -(2**31)]
    if dtype == torch.int64:
        wide += [2**32 + 1, 2**32, -(2**32) + 2]
    pred = torch.tensor([1, 2, 0, *wide] + [1] * len(wide), dtype=dtype).reshape(1, 1, -1)
    t = torch.tensor([1, 2, 0] + [1] * len(wide) + wide, dtype=dtype).reshape(1, 1, -1)
    cm = ops.confusion_matrix(pred.to(DEVICE), t.to(DEVICE), 3, validate_args=False)
    assert torch.equal(cm.cpu(), ref.confusion_matrix(pred, t, 3, None))
    assert cm.sum() == 3 and torch.equal(cm.diagonal().cpu(), torch.ones(3, dtype=torch.long))


@pytest.mark.parametrize("dtype,ignore", [(torch.uint8, -1), (torch.int8, 255),
                                          (torch.int16, -1), (torch.uint8, 255 - 512),
                                          (torch.uint8, 258), (torch.int8, 2 - 256),
                                          (torch.int64, -(2**63)), (torch.int64, 2**63 - 1)])
def test_index_target_ignore_index_wraps_like_torch(dtype, ignore):
    """`target != ignore_index` converts ignore_index to the target's dtype
    (uint8: -1 is 255, 258 is class 2): torch, smp, torchmetrics and the
    reference drop those pixels, and so must the kernels."""
    C = 4
    x, t = make_case(2, C, (5, 6), False, "softmax", dtype=KERNEL_DTYPES[0])
    t = t.to(dtype)
    wrapped = torch.tensor(ignore).to(dtype)  # torch's conversion of the scalar
    t[:, ::2, 1] = wrapped
    x, t = x.to(DEVICE), t.to(DEVICE)
    sums = ops.overlap_sums(x, t, ignore_index=ignore)
    want = ref.overlap_sums(x.cpu().double(), t.cpu(), "softmax", ignore, False)
    assert_close(sums, want, TOL)
    assert sums[2].sum() == (t != wrapped).sum()   # target sum: the kept pixels
    cm = ops.confusion_matrix(x, t, C, ignore)
    assert torch.equal(cm.cpu(), ref.confusion_matrix(x.cpu(), t.cpu(), C, ignore))
    assert cm.sum() == (t != wrapped).sum()
    tm = pytest.importorskip("torchmetrics.classification")
    theirs = tm.MulticlassConfusionMatrix(C, ignore_index=ignore, validate_args=False)
    assert torch.equal(cm.cpu(), theirs(x.cpu(), t.cpu()))


@pytest.mark.parametrize("ignore", [0, 1, 256, 257, -255, -1])
def test_bool_mask_ignore_index_compares_as_torch_promotes(ignore):
    """`mask != ignore_index` promotes a bool mask to int64: 0 and 1 drop the
    pixels equal to them, every other value (256, -255: 0 and 1 once wrapped
    to uint8) drops nothing."""
    x, _ = make_case(2, 3, (5, 6), False, "sigmoid", dtype=KERNEL_DTYPES[0])
    mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) > 0.5
    x, mask = x.to(DEVICE), mask.to(DEVICE)
    sums = ops.overlap_sums(x, mask, activation="sigmoid", ignore_index=ignore)
    want = ref.overlap_sums(x.cpu().double(), mask.cpu(), "sigmoid", ignore, False)
    assert_close(sums, want, TOL)
    assert sums[2].sum() == (mask & (mask != ignore)).sum()   # target sum: kept ones


def test_uint8_ignore_minus_one_dice_matches_smp():
    smp_losses = pytest.importorskip("segmentation_models_pytorch.losses")
    x, t = make_case(2, 4, (5, 6), False, "softmax", dtype=torch.float32)
    t = t.to(torch.uint8)
    t[:, 0] = 255
    xd = x.clone().to(DEVICE).requires_grad_()   # a copy on the CPU too
    ours = ops.dice_loss(xd, t.to(DEVICE), ignore_index=-1)
    ours.backward()
    x.requires_grad_()
    theirs = smp_losses.DiceLoss("multiclass", ignore_index=-1)(x, t)
    theirs.backward()
    assert_close(ours, theirs, 1e-5)
    assert_close(xd.grad, x.grad, 1e-5, name="grad")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float64, torch.float32,
                                   torch.float16, torch.bfloat16, torch.uint8], ids=str)
def test_dense_target_compared_with_ignore_index_in_its_own_dtype(dtype):
    """Dense targets: elements equal to ignore_index (converted to the
    target's dtype, as `t != ignore_index` does) count in no sum; an integer
    target is compared exactly, not after a cast to float32. bfloat16: torch
    rounds the int to float32 first, then to bfloat16 (2^24 + 2^16 + 1 ->
    2^24 + 2^16 -> 2^24, a tie to even), where one rounding would give
    2^24 + 2^17."""
    ignore = {torch.float16: 2049, torch.bfloat16: 2**24 + 2**16 + 1,
              torch.uint8: -1}.get(dtype, 2**24 + 1)
    near = {torch.float16: [2048, 2050], torch.bfloat16: [2**24, 2**24 + 2**17],
            torch.uint8: [254, 255]}.get(dtype, [2**24, 2**24 + 2])
    x = torch.rand(2, 3, 4, 5, dtype=torch.float64)
    t = torch.randint(0, 2, (2, 3, 4, 5)).to(dtype)
    t[0, :, 0] = torch.tensor(near, dtype=torch.float64).repeat(3)[:5].to(dtype)
    if dtype.is_floating_point or dtype == torch.uint8:
        t[1, 1, 1] = torch.tensor(ignore).to(dtype)
    else:
        t[1, 1, 1] = ignore
    # float32 input: the sums (and, before the fix, the comparison) are float32
    x, t = x.to(DEVICE, torch.float32), t.to(DEVICE)
    sums = ops.overlap_sums(x, t, activation="none", ignore_index=ignore)
    want = ref.overlap_sums(x.cpu().double(), t.cpu(), "none", ignore, False)
    assert_close(sums, want, RTOL[torch.float32])


def _nocontig(t: torch.Tensor, view: str) -> torch.Tensor:
    """The same values as a non-contiguous view: 'stride2' (stride 2 along the
    last dim), 'transposed' (last two dims swapped in memory) or 'slice' (a
    slice of a larger tensor along dim 1, the channels for 4-D tensors)."""
    if view == "stride2":
        out = like_layout(t, "strided")
    elif view == "transposed":
        out = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    else:
        pad = torch.zeros_like(t.narrow(1, 0, 1))
        out = torch.cat([pad, t, pad], dim=1).narrow(1, 1, t.shape[1])
    assert not out.is_contiguous() and torch.equal(out, t)
    return out


VIEWS = ["stride2", "transposed", "slice"]


@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize("dense", [False, True], ids=["index", "dense"])
def test_noncontiguous_input_target_and_grad(view, dense):
    """Every tensor argument of overlap_sums as a non-contiguous view: input,
    target and the incoming gradient of backward."""
    x, t = make_case(2, 5, (4, 6), dense, "softmax", ignore_index=2, dtype=KERNEL_DTYPES[0])
    x, t = x.to(DEVICE), t.to(DEVICE)
    xv = _nocontig(x, view).requires_grad_()
    sums = ops.overlap_sums(xv, _nocontig(t, view), ignore_index=2)
    g = torch.randn(3, 2, 5, dtype=torch.float64)
    gv = _nocontig(g.to(DEVICE, sums.dtype), view)
    (grad,) = torch.autograd.grad(sums, xv, gv)
    want_sums, want_grad = reference_sums_and_grad(x, t, "softmax", 2, False, g)
    assert_close(sums, want_sums, TOL)
    assert_close(grad, want_grad, TOL, name="grad")


@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize("pred_kind", ["scores", "labels"])
def test_noncontiguous_confusion_matrix(view, pred_kind):
    scores = torch.randn(2, 5, 4, 6, dtype=KERNEL_DTYPES[0])
    t = torch.randint(0, 5, (2, 4, 6))
    pred = scores if pred_kind == "scores" else scores.argmax(1)
    cm = ops.confusion_matrix(_nocontig(pred.to(DEVICE), view), _nocontig(t.to(DEVICE), view), 5)
    assert torch.equal(cm.cpu(), ref.confusion_matrix(pred, t, 5, None))


# C -> the launch variant: NUM_BINS of the histogram of every (target,
# prediction) pair (up to 45 classes), else DIAG_BINS of the diagonal's
# histogram (up to 2047 classes), else 0 and 0: one atomic per pixel.
HISTOGRAM_CASES = [(2, 8, 0), (12, 256, 0), (21, 512, 0), (23, 1024, 0), (45, 2048, 0),
                   (46, 0, 64), (150, 0, 256), (1000, 0, 1024), (2047, 0, 2048), (2048, 0, 0)]


@pytest.mark.parametrize("C,bins,diag_bins", HISTOGRAM_CASES,
                         ids=[f"C{c}" for c, _, _ in HISTOGRAM_CASES])
@pytest.mark.parametrize("pred_kind", ["scores", "labels"])
def test_confusion_matrix_histogram_and_atomics_variants(monkeypatch, C, bins, diag_bins,
                                                         pred_kind):
    """Each class count runs the variant the table above names (recorded from
    the launch), against the reference and torchmetrics. About half the
    pixels are predicted right, so the diagonal histogram counts many hits
    (the same class several times) next to the per-pixel mismatches; the
    ignored pixels predict the ignored value (a class from C = 256)."""
    scores = torch.randn(2, C, 5, 7, dtype=KERNEL_DTYPES[0])
    wins = torch.rand(2, 5, 7) < 0.4  # class 1 wins there: repeated hits of one class
    scores[:, min(1, C - 1)] = torch.where(wins, scores.amax(1) + 1, scores[:, min(1, C - 1)])
    if C > 255:  # ignored pixels predicted as class 255: not a hit
        scores[0, 255, 0, :3] = scores.amax() + 2
    labels = scores.argmax(1)
    t = torch.where(torch.rand(labels.shape) < 0.5, labels, torch.randint(0, C, labels.shape))
    t[0, 0, :3] = 255
    pred = scores if pred_kind == "scores" else labels.to(torch.int32)
    with LaunchRecorder(kernels, ["_confusion_matrix_kernel"]) as recorder:
        cm = ops.confusion_matrix(pred.to(DEVICE), t.to(DEVICE), C, 255)
    assert [(launch["NUM_BINS"], launch["DIAG_BINS"])
            for launch in recorder.constexprs("_confusion_matrix_kernel")] == [(bins, diag_bins)]
    want = ref.confusion_matrix(pred, t, C, 255)
    assert want.diagonal().sum() > 20 and want.diagonal().max() > 2
    assert torch.equal(cm.cpu(), want)
    tm = pytest.importorskip("torchmetrics.classification")
    theirs = tm.MulticlassConfusionMatrix(num_classes=C, ignore_index=255)(pred, t)
    assert torch.equal(cm.cpu(), theirs)


@pytest.mark.parametrize("C", [1, 2, 3])
@pytest.mark.parametrize("pred_kind", ["scores", "labels"])
def test_confusion_matrix_writes_nothing_past_the_matrix(monkeypatch, C, pred_kind):
    """The pair histogram's last bin takes the pixels that do not count
    (ignored, past the end); at one class it is bin C*C = 1, one past the
    (1, 1) matrix, so only bins < C*C may be stored: guard elements after the
    matrix the launcher allocates keep their value."""
    guards = []

    class GuardedTorch:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def zeros(size, **kwargs):
            n = int(np.prod(size))
            buf = torch.full((n + 8,), -7, **kwargs)
            buf[:n] = 0
            guards.append((buf, n))
            return buf[:n].view(size)

    monkeypatch.setattr(kernels, "torch", GuardedTorch())
    scores = torch.randn(2, C, 3, 5, dtype=KERNEL_DTYPES[0])
    t = torch.randint(0, C, (2, 3, 5))
    t[0, 0, :2] = 255   # ignored
    pred = scores if pred_kind == "scores" else scores.argmax(1).to(torch.int32)
    cm = kernels.confusion_matrix(pred.to(DEVICE), t.to(DEVICE), C, 255, block_s=16)
    assert torch.equal(cm.cpu(), ref.confusion_matrix(pred, t, C, 255))
    assert guards and all(torch.equal(buf[n:].cpu(), torch.full((8,), -7)) for buf, n in guards)


def test_forward_programs_take_several_pixel_blocks():
    """The forward's grid: (N, programs per sample), 32 warps per SM by
    default (one-warp tiles: 8 programs per 8-warp program), or the
    ``programs`` asked for, each program reducing a run of pixel blocks."""
    x = torch.randn(2, 3, 5, 13, dtype=KERNEL_DTYPES[0])
    t = torch.randint(0, 3, (2, 5, 13))
    want = ref.overlap_sums(x.double(), t, "softmax", None, False, False)
    s_blocks = -(-65 // 16)
    for programs, per_sample in ((4, 2), (None, min(s_blocks, 4 * kernels.target_programs(DEVICE)))):
        with LaunchRecorder(kernels, ["_overlap_sums_fwd_kernel"]) as launched:
            sums = kernels.overlap_sums_forward(x.to(DEVICE), t.to(DEVICE), "softmax", None, False,
                                                block_s=16, programs=programs)
        assert launched.launches == [("_overlap_sums_fwd_kernel", (2, per_sample))]
        assert_close(sums, want, RTOL[KERNEL_DTYPES[0]])


@pytest.mark.parametrize("pixel_limit", [None, 40])
@pytest.mark.parametrize("C", [5, 60], ids=["pairs", "diagonal"])
def test_confusion_matrix_programs_sum_several_blocks(monkeypatch, C, pixel_limit):
    """The persistent grid: 32 warps per SM (scores take one warp per
    program, labels 4); with fewer programs than pixel blocks each program
    adds several blocks (from different samples too) to one histogram (of
    every pair, or of the diagonal past 45 classes) before its one merge;
    with HISTOGRAM_PIXELS (int32 counts) lowered there are enough programs
    that none counts more pixels than that (blocks are taken in turn)."""
    N, S, block_s = 3, 63, 16
    if pixel_limit is not None:
        monkeypatch.setattr(kernels, "HISTOGRAM_PIXELS", pixel_limit)
    scores = torch.randn(N, C, 9, 7, dtype=KERNEL_DTYPES[0])
    t = torch.where(torch.rand(N, 9, 7) < 0.5, scores.argmax(1), torch.randint(0, C, (N, 9, 7)))
    blocks = N * -(-S // block_s)
    at_least = -(-blocks // max(1, (pixel_limit or 2**31 - 1) // block_s))
    for pred, warps in ((scores, 1), (scores.argmax(1), 4)):
        for programs, want in ((None, (8 // warps) * kernels.target_programs(DEVICE)), (5, 5)):
            with LaunchRecorder(kernels, ["_confusion_matrix_kernel"]) as launched:
                cm = kernels.confusion_matrix(pred.to(DEVICE), t.to(DEVICE), C, None,
                                              block_s=block_s, programs=programs)
            grid = (min(blocks, max(want, at_least)),)
            assert launched.launches == [("_confusion_matrix_kernel", grid)]
            if pixel_limit is not None:  # the most blocks one program takes, in pixels
                assert -(-blocks // grid[0]) * block_s <= pixel_limit
            assert torch.equal(cm.cpu(), ref.confusion_matrix(pred, t, C, None))


def test_grid_limit_raises_before_any_allocation():
    """The kernels index pixels with 64-bit offsets; the one 32-bit quantity
    left is the number of programs on grid axis 0. Past it: ArgumentError,
    raised before any buffer is allocated (expanded, stride-0 inputs of
    ~2^36 pixels cost no memory)."""
    x = torch.zeros(1, 1, 1, dtype=KERNEL_DTYPES[0], device=DEVICE).expand(2**12, 1, 2**24)
    t = torch.zeros(1, 1, dtype=torch.uint8, device=DEVICE).expand(2**12, 2**24)
    g = torch.zeros(2**12, 1, dtype=kernels.sums_dtype(x), device=DEVICE)
    with pytest.raises(segops.ArgumentError, match="input.*2\\^31"):
        kernels.overlap_sums_backward(g, g, x, t, "sigmoid", None, False, block_s=16)
    big = t.unsqueeze(0).expand(2**6, 2**12, 2**24).reshape(2**18, 2**24)
    with pytest.raises(segops.ArgumentError, match="target.*2\\^31"):
        kernels.confusion_matrix(big, big, 3, None)
    assert kernels.max_programs_ok(2**31 - 1) and not kernels.max_programs_ok(2**31)


@pytest.mark.skipif(not ON_GPU, reason="2^31 pixels take hours in the interpreter")
def test_more_than_2_31_pixels_per_sample():
    """One sample of 2^31 + 37 pixels (2 GiB of uint8 each): 64-bit pixel
    offsets count the pixels past 2^31 and read none beyond the end."""
    S = 2**31 + 37
    pred = torch.zeros(1, S, dtype=torch.uint8, device=DEVICE)
    t = torch.zeros(1, S, dtype=torch.uint8, device=DEVICE)
    pred[0, -5:] = 1
    t[0, -3:] = 2
    cm = ops.confusion_matrix(pred, t, 3)
    assert torch.equal(cm, torch.tensor([[S - 5, 2, 0], [0, 0, 0], [0, 3, 0]], device=DEVICE))
    del pred
    x = torch.full((1, 1, S), 0.5, dtype=torch.float16, device=DEVICE)
    intersection, pred_sum, target_sum = ops.overlap_sums(
        x, t.view(1, 1, S) == 2, activation="none").flatten().tolist()
    assert (intersection, target_sum) == (1.5, 3.0)   # the last 3 pixels were read
    assert abs(pred_sum - S * 0.5) <= 1e-6 * S        # a float32 sum of 2^30
    x.requires_grad_()   # d(prediction sum)/dx: sigmoid' where the dense target is not 0
    pred_sums = ops.overlap_sums(x, t.view(1, 1, S), activation="sigmoid", ignore_index=0)[1]
    (grad,) = torch.autograd.grad(pred_sums.sum(), x)
    p = torch.tensor(0.5, dtype=torch.float64).sigmoid().item()
    assert grad[0, 0, -1].item() == pytest.approx(p * (1 - p), rel=1e-3)
    assert grad[0, 0, 0].item() == 0.0   # ignored pixel (label 0)


# --------------------------------------------------------------------------
# errors name the argument (issue 16)
# --------------------------------------------------------------------------
def test_ignore_index_out_of_int64_is_an_argument_error():
    x = torch.randn(1, 3, 2, 2, device=DEVICE)
    t = torch.zeros(1, 2, 2, dtype=torch.long, device=DEVICE)
    for call in (lambda: ops.overlap_sums(x, t, ignore_index=2**64),
                 lambda: ops.dice_loss(x, t, ignore_index=-(2**63) - 1),
                 lambda: ops.confusion_matrix(x, t, 3, 2**63),
                 lambda: segops.metrics.MeanIoU(3, ignore_index=2**64)):
        with pytest.raises(segops.ArgumentError, match="ignore_index"):
            call()
    with pytest.raises(segops.ArgumentTypeError, match="ignore_index"):
        ops.overlap_sums(x, t, ignore_index=1.5)


@pytest.mark.parametrize("kind", ["dice", "jaccard"])
def test_classes_out_of_range_and_negative_like_smp(kind):
    fn = ops.dice_loss if kind == "dice" else ops.jaccard_loss
    x, t = make_case(2, 5, (4, 6), False, "softmax", dtype=KERNEL_DTYPES[0])
    x, t = x.to(DEVICE), t.to(DEVICE)
    for bad in ([5], [0, -6], (7,)):
        with pytest.raises(segops.ArgumentError, match="classes"):
            fn(x, t, classes=bad)
    with pytest.raises(segops.ArgumentTypeError, match="classes"):
        fn(x, t, classes=[1.5])
    # negative classes count from the end, as smp's tensor indexing does
    assert_close(fn(x, t, classes=[-1, 0]), fn(x, t, classes=[4, 0]), TOL)
    assert_close(fn(x, t, classes=[-1], class_weights=[1, 2, 3, 4, 5.0]),
                 fn(x, t, classes=[4]), TOL)
    want = ref.smp_overlap_loss(kind, x.cpu().double(), t.cpu(), "multiclass", classes=[-1, 2],
                                class_weights=[1.0, 2.0, 3.0, 4.0, 5.0])
    assert_close(fn(x, t, classes=[-1, 2], class_weights=[1.0, 2.0, 3.0, 4.0, 5.0]), want, TOL)
    smp_losses = pytest.importorskip("segmentation_models_pytorch.losses")
    name = "DiceLoss" if kind == "dice" else "JaccardLoss"
    theirs = getattr(smp_losses, name)("multiclass", classes=[-1, 2])(x.cpu().float(), t.cpu())
    ours = getattr(segops.nn, name)("multiclass", classes=[-1, 2])(x.float(), t)
    assert_close(ours, theirs, 1e-5)


# --------------------------------------------------------------------------
# no host synchronisation in the hot path (issue 10)
# --------------------------------------------------------------------------
def _count_segops_syncs(monkeypatch) -> list:
    """Record every .item(), .tolist(), bool/int/float(tensor) that segops
    code (not the tests, not the Triton interpreter) calls: each one waits
    for the GPU."""
    import sys
    calls = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("segops"):
                calls.append(f"{_name} in {caller}")
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


def test_hot_paths_do_not_synchronise(monkeypatch):
    """With validate_args=False (and for the scores always) no op reads a
    value back to the host; the validate_args=True checks do so only on
    non-CUDA devices (on CUDA they are device-side asserts, tested below)."""
    x, t = make_case(2, 4, (5, 6), False, "softmax", ignore_index=255, dtype=KERNEL_DTYPES[0])
    x, t = x.to(DEVICE).requires_grad_(), t.to(DEVICE)
    calls = _count_segops_syncs(monkeypatch)
    loss = ops.dice_loss(x, t, ignore_index=255, classes=[0, -1], class_weights=[1.0, 2, 3, 4],
                         validate_args=False)
    loss = loss + ops.jaccard_loss(x, t, ignore_index=255, include_background=False,
                                   validate_args=False)
    loss.backward()
    metric = segops.metrics.MeanIoU(4, ignore_index=255, validate_args=False)
    metric.update(x.detach(), t)
    metric.compute()
    for average in ops.AVERAGES:
        ops.iou_score(metric.confusion, average)
        ops.dice_score(metric.confusion, average, ignore_index=1)
    assert calls == []


@pytest.mark.skipif(not ON_GPU, reason="CUDA sync debug mode")
def test_validate_args_does_not_synchronise_on_cuda():
    x, t = make_case(2, 4, (5, 6), False, "softmax", ignore_index=255, dtype=torch.float32)
    x, t = x.cuda().requires_grad_(), t.cuda()
    # a first call may copy the class weights to the device once (content-keyed)
    ops.dice_loss(x, t, ignore_index=255, classes=[0, 2], class_weights=[1.0, 2, 3, 4])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = ops.dice_loss(x, t, ignore_index=255, classes=[0, 2], class_weights=[1.0, 2, 3, 4])
        loss.backward()
        metric = segops.metrics.MeanIoU(4, ignore_index=255)
        metric.update(x.detach(), t)
        metric.update(x.detach().argmax(1), t)
        metric.compute()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_class_weights_go_to_the_device_once():
    """A list of class weights is copied to the device once per content (a
    pageable copy per call blocks the host and cannot be captured in a CUDA
    graph). The cached copy is an ordinary tensor even when first made under
    inference_mode (a training step then saves it for backward), and a
    traced call (fake tensors) does not leave a fake one in the cache."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    weights = [1.0, 2.0, 3.0, 4.25]   # content no other test uses
    x, t = make_case(2, 4, (3, 4), False, "softmax", dtype=torch.float32)
    x, t = x.to(DEVICE), t.to(DEVICE)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = ops.dice_loss(mode.from_tensor(x), mode.from_tensor(t), class_weights=weights,
                             validate_args=False)
    assert fake.shape == ()
    with torch.inference_mode():
        first = ops.dice_loss(x, t, class_weights=weights)
    cached = ops._cached_constant.cache_info()
    xg = x.clone().requires_grad_()
    loss = ops.dice_loss(xg, t, class_weights=weights)
    loss.backward()
    assert ops._cached_constant.cache_info().hits == cached.hits + 1
    assert ops._cached_constant.cache_info().misses == cached.misses
    assert_close(loss, first, 1e-6)
    assert xg.grad is not None


# --------------------------------------------------------------------------
# the fused loss epilogue (segops::overlap_loss): the reduced loss and its
# gradient back to the sums, against the composite torch ops
# --------------------------------------------------------------------------
def edge_sums(N=3, dtype=KERNEL_DTYPES[0]):
    """Random (3, N, 9) sums with every clamp and mask of the loss active:
    class 1 has no target pixel (skip_empty), class 2 no intersection
    (score 0 < eps), class 3 all-zero sums (denominator 0 < eps), class 5
    NaN sums (it must drop out when left unselected). Classes 4 and 6-8 sit
    on the clamps' bounds for eps = 1/4 and smooth = 0 (only sample 0 has
    pixels, so the batch sums are the same): Dice score 1/4 (4), Jaccard
    score 1/4 (6), Dice denominator 1/4 (7), Jaccard denominator 1/4 (8);
    clamp_min passes the gradient there."""
    torch.manual_seed(1)
    C = 9
    inter = torch.rand(N, C, dtype=torch.float64)
    pred = inter + torch.rand(N, C, dtype=torch.float64)
    target = inter + torch.rand(N, C, dtype=torch.float64)
    target[:, 1] = 0
    inter[:, 1] = 0
    inter[:, 2] = 0
    inter[:, 3] = pred[:, 3] = target[:, 3] = 0
    inter[:, 5] = float("nan")
    for c, (i, p, t) in {4: (1, 4, 4), 6: (1, 2.5, 2.5), 7: (0.125, 0.25, 0.25),
                         8: (0.125, 0.25, 0.125)}.items():
        inter[:, c] = pred[:, c] = target[:, c] = 0
        inter[0, c], pred[0, c], target[0, c] = i, p, t
    return torch.stack([inter, pred, target]).to(DEVICE, dtype)


LOSS_SELECTIONS = [   # (counts, weights) per class of 9; None: all once / unweighted
    ([1, 1, 1, 1, 1, 0, 1, 1, 1], None),
    ([0, 2, 1, 1, 1, 0, 0, 1, 1], None),                       # class 1 named twice
    ([1, 1, 1, 1, 1, 0, 1, 1, 1], [0.5, 2.0, 1.0, -1.5, 3.0, float("inf"), 1.5, 0.75, 2.5]),
    ([0, 0, 0, 0, 1, 0, 1, 0, 0], [1.0, 1.0, 1.0, 1.0, 4.0, 1.0, 2.0, 1.0, 1.0]),
    ([0] * 9, None),                              # classes=[]: NaN loss, zero gradient
    ([1, 1, 0, 0, 0, 0, 0, 0, 0], [0.0] * 9),      # weights summing to 0: NaN gradient
]


def composite_loss(sums, counts, weights, kind, smooth, eps, log_loss, skip_empty, batch,
                   reduction):
    """The public API's composite path: per-class losses, then classes
    picked (with repeats), weighted, reduced."""
    selected = [c for c, k in enumerate(counts) for _ in range(k)]
    loss = ref.class_losses(sums, kind, smooth, eps, log_loss, skip_empty, batch)
    return ops._reduce(loss, selected, as_tensor(weights, sums), reduction)


def as_tensor(values, like):
    return None if values is None else torch.tensor(values, dtype=like.dtype, device=like.device)


@pytest.mark.parametrize("kind", ["dice", "jaccard"])
@pytest.mark.parametrize("batch", [True, False])
@pytest.mark.parametrize("log_loss", [False, True])
@pytest.mark.parametrize("skip_empty", [True, False])
def test_loss_epilogue_kernels_match_composite(kind, batch, log_loss, skip_empty):
    sums = edge_sums()
    grad = torch.tensor(0.75, dtype=sums.dtype, device=DEVICE)
    for (counts, weights), reduction, smooth, eps in [
            (LOSS_SELECTIONS[0], "mean", 0.0, 1e-7), (LOSS_SELECTIONS[1], "sum", 0.5, 1e-7),
            (LOSS_SELECTIONS[2], "mean", 0.0, 0.25), (LOSS_SELECTIONS[3], "sum", 0.0, 0.25),
            (LOSS_SELECTIONS[0], "sum", 1e-5, 1e-3), (LOSS_SELECTIONS[4], "mean", 0.0, 1e-7),
            (LOSS_SELECTIONS[5], "mean", 0.0, 1e-7)]:
        options = (kind, smooth, eps, log_loss, skip_empty, batch)
        leaf = sums.clone().requires_grad_()
        want = composite_loss(leaf, counts, weights, *options, reduction)
        want_grad, = torch.autograd.grad(want, leaf, grad)
        args = (sums, as_tensor(counts, sums), as_tensor(weights, sums), *options,
                reduction == "mean")
        got = kernels.overlap_loss_forward(*args)
        got_grad = kernels.overlap_loss_backward(grad, *args, ref.CLAMP_MIN_PASSES_TIE)
        case = f"{counts} {weights} {reduction} smooth={smooth} eps={eps}"
        assert got.shape == () and got.dtype == sums.dtype
        assert_close(got, want.detach(), TOL, name=case)
        assert_close(got_grad, want_grad[:2], TOL, name=f"grad {case}")
        # and the torch path of the custom op (off the kernels) agrees
        assert_close(ref.reduced_loss(*args), want.detach(), TOL, name=f"torch {case}")
        assert_close(ref.reduced_loss_backward(grad, *args), want_grad[:2], TOL,
                     name=f"torch grad {case}")
        # the clamps' rule at their bound that the torch in use does not
        # follow: kernel and reference formula still agree
        other = not ref.CLAMP_MIN_PASSES_TIE
        assert_close(kernels.overlap_loss_backward(grad, *args, other),
                     ref.reduced_loss_backward(grad, *args, clamp_passes_tie=other), TOL,
                     name=f"grad {case}, clamp_passes_tie={other}")


@pytest.mark.parametrize("batch", [True, False])
def test_loss_epilogue_without_selection_or_weights(batch):
    """counts and weights None (every class once, weight 1): NaN class 5
    counts, so take it out of the sums first."""
    sums = edge_sums()[:, :, :5].contiguous()   # classes 0-4
    grad = torch.tensor(-1.25, dtype=sums.dtype, device=DEVICE)
    for reduction in ("mean", "sum"):
        options = ("dice", 0.0, 1e-7, False, True, batch)
        leaf = sums.clone().requires_grad_()
        want = composite_loss(leaf, [1] * 5, None, *options, reduction)
        want_grad, = torch.autograd.grad(want, leaf, grad)
        args = (sums, None, None, *options, reduction == "mean")
        assert_close(kernels.overlap_loss_forward(*args), want.detach(), TOL)
        assert_close(kernels.overlap_loss_backward(grad, *args, ref.CLAMP_MIN_PASSES_TIE),
                     want_grad[:2], TOL)


def test_loss_epilogue_loops_over_blocks():
    """More (sample, class) pairs and classes than one block of the
    epilogue holds."""
    N, C = 3, kernels._LOSS_BLOCK + 7
    torch.manual_seed(2)
    inter = torch.rand(N, C, dtype=torch.float64)
    sums = torch.stack([inter, inter + torch.rand(N, C), inter + torch.rand(N, C)])
    sums = sums.to(DEVICE, KERNEL_DTYPES[0])
    counts = [1 + c % 2 for c in range(C)]
    weights = [0.5 + (c % 5) for c in range(C)]
    grad = torch.tensor(1.0, dtype=sums.dtype, device=DEVICE)
    for batch in (True, False):
        options = ("jaccard", 0.0, 1e-7, False, True, batch)
        leaf = sums.clone().requires_grad_()
        want = composite_loss(leaf, counts, weights, *options, "mean")
        want_grad, = torch.autograd.grad(want, leaf, grad)
        args = (sums, as_tensor(counts, sums), as_tensor(weights, sums), *options, True)
        assert_close(kernels.overlap_loss_forward(*args), want.detach(), TOL)
        assert_close(kernels.overlap_loss_backward(grad, *args, ref.CLAMP_MIN_PASSES_TIE),
                     want_grad[:2], TOL)


FUSED_LOSS_KERNELS = ["_overlap_loss_kernel", "_overlap_loss_bwd_kernel"]


@pytest.mark.parametrize("kind", ["dice", "jaccard"])
@pytest.mark.parametrize("options", [
    dict(),
    dict(batch=False, classes=[0, 2, 2], class_weights=[1.0, 2.0, 0.5, 3.0], log_loss=True),
    dict(include_background=False, reduction="sum", smooth=1.0, skip_empty=False),
])
def test_loss_takes_the_fused_epilogue(kind, options, monkeypatch):
    """On the kernels' path dice_loss/jaccard_loss launch the two epilogue
    kernels (forward, backward) and give the composite's loss and input
    gradient."""
    fn = ops.dice_loss if kind == "dice" else ops.jaccard_loss
    x, t = make_case(2, 4, (5, 6), False, "softmax", ignore_index=255, dtype=KERNEL_DTYPES[0])
    t[t == 1] = 2   # class 1 empty
    x, t = x.to(DEVICE), t.to(DEVICE)
    xf = x.clone().requires_grad_()
    with LaunchRecorder(kernels, FUSED_LOSS_KERNELS) as launched:
        loss = fn(xf, t, ignore_index=255, **options)
        loss.backward()
    assert launched.names_launched() == FUSED_LOSS_KERNELS
    monkeypatch.setattr(ops, "_fuses_loss", lambda *args: False)
    xc = x.clone().requires_grad_()
    want = fn(xc, t, ignore_index=255, **options)
    want.backward()
    assert_close(loss, want, TOL)
    assert_close(xf.grad, xc.grad, TOL, name="grad")


def test_loss_composite_where_fusing_cannot_serve(monkeypatch):
    """reduction='none' (a per-class result) and class weights that need a
    gradient stay on the composite path; the weights get theirs."""
    x, t = make_case(2, 4, (5, 6), False, "softmax", dtype=KERNEL_DTYPES[0])
    x, t = x.to(DEVICE), t.to(DEVICE)
    w = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=x.dtype, device=DEVICE, requires_grad=True)
    with LaunchRecorder(kernels, FUSED_LOSS_KERNELS) as launched:
        assert ops.dice_loss(x, t, reduction="none").shape == (4,)
        loss = ops.dice_loss(x, t, class_weights=w)
        loss.backward()
        assert ops.dice_loss(x, t, class_weights=w.detach()).shape == ()
    assert launched.names_launched() == ["_overlap_loss_kernel"]
    per_class = ops.dice_loss(x, t, reduction="none").detach()
    assert_close(w.grad, (per_class - loss.detach()) / w.detach().sum(), TOL, name="weights grad")


def test_fused_loss_op_off_the_kernels_matches():
    """segops::overlap_loss on the reference path (what runs it off the
    kernels) gives the kernels' loss and input gradient."""
    x, t = make_case(2, 4, (3, 5), False, "softmax", dtype=torch.float64)
    counts = torch.tensor([1.0, 0.0, 2.0, 1.0], dtype=torch.float64)
    weights = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    args = ("softmax", None, False, True, False, counts, weights, "dice", 0.0, 1e-7, True,
            True, False, True)
    xr = x.clone().requires_grad_()
    with _dispatch.reference_only():
        loss, sums = torch.ops.segops.overlap_loss(xr, t, *args)
        loss.backward()
    assert_close(sums, ref.overlap_sums(x, t, "softmax", None, False, True), 1e-12)
    xk = x.to(DEVICE, KERNEL_DTYPES[0]).requires_grad_()
    kernel_loss, _ = torch.ops.segops.overlap_loss(
        xk, t.to(DEVICE), *args[:5], counts.to(xk), weights.to(xk), *args[7:])
    kernel_loss.backward()
    assert not sums.requires_grad   # returned for the backward only
    assert_close(kernel_loss.cpu().double(), loss, TOL)
    assert_close(xk.grad.cpu().double(), xr.grad, TOL, name="grad")


def test_fused_loss_opcheck():
    x, t = make_case(2, 3, (4, 4), False, "softmax", dtype=KERNEL_DTYPES[0])
    x = x.to(DEVICE).requires_grad_()
    weights = torch.tensor([1.0, 2.0, 3.0], dtype=x.dtype, device=DEVICE)
    args = (x, t.to(DEVICE), "softmax", None, False, True, False, None, weights, "jaccard", 0.0,
            1e-7, False, True, True, True)
    torch.library.opcheck(torch.ops.segops.overlap_loss.default, args)
    # its backward op too, channels_last (the fake's strides are empty_like's)
    _, sums = torch.ops.segops.overlap_loss.default(*args)
    x_cl = x.detach().contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.segops.overlap_loss_backward.default,
                          (torch.ones((), dtype=sums.dtype, device=DEVICE), sums, x_cl,
                           *args[1:6], *args[7:]))


@pytest.mark.parametrize("dtype, bad, ignore_index, flagged", [
    (torch.int64, 4, None, True),            # = C
    (torch.int64, 3, None, False),           # C - 1
    (torch.int64, -1, None, True),
    (torch.int64, -1, -1, False),            # ignored
    (torch.int64, 2**32 + 1, None, True),    # compared at full width, not as 1
    (torch.uint8, 255, -1, False),           # -1 is 255 in uint8, as torch compares
    (torch.uint8, 255, 254, True),
    (torch.int16, -7, 9, True),
])
def test_forward_kernel_flags_bad_labels(dtype, bad, ignore_index, flagged):
    """The forward kernel's label check (the fused loss's validate_args),
    with the label at the first and at the last pixel of the sample, across
    several programs and class chunks."""
    C = 4
    x = torch.randn(2, C, 5, 7, dtype=KERNEL_DTYPES[0], device=DEVICE)
    t = torch.randint(0, C, (2, 5, 7), device=DEVICE).to(dtype)
    for where in ((0, 0, 0), (1, 4, 6)):
        target = t.clone()
        target[where] = torch.tensor(bad).to(dtype)
        flag = torch.zeros((), dtype=torch.int32, device=DEVICE)
        sums = kernels.overlap_sums_forward(x, target, "softmax", ignore_index, False,
                                            block_c=2, block_s=4, programs=6, bad_labels=flag)
        assert flag.item() == int(flagged), (where, flag.item())
        want = ref.overlap_sums(x.cpu(), target.cpu(), "softmax", ignore_index, False)
        assert_close(sums, want, TOL)   # the check changes no sum


@pytest.mark.skipif(ON_GPU, reason="a CUDA device assert fails the context: "
                                   "test_bad_labels_assert_on_cuda checks it in a child")
def test_fused_loss_checks_labels_in_its_kernel(monkeypatch):
    """Where the label check is a device assert (CUDA; here forced on the
    CPU, where torch._assert_async raises at once), the fused loss makes it
    in its forward kernel: no separate passes over the labels, one assert.
    Unchecked or in range, no error."""
    monkeypatch.setattr(_checks, "values_checked_on_device", lambda t: True)
    x = torch.randn(2, 3, 4, 4, dtype=KERNEL_DTYPES[0], device=DEVICE)
    t = torch.randint(0, 3, (2, 4, 4), device=DEVICE)
    t[1, 3, 3] = 255
    separate_checks = []
    check_labels = ops._check_labels
    monkeypatch.setattr(ops, "_check_labels",
                        lambda *args: separate_checks.append(args) or check_labels(*args))
    ops.dice_loss(x, t, ignore_index=255)
    with pytest.raises(RuntimeError, match=r"target holds a label outside \[0, 3\)$"):
        ops.jaccard_loss(x, t)
    assert separate_checks == []
    for unchecked in (dict(validate_args=False), dict(reduction="none", validate_args=False)):
        ops.dice_loss(x, t, **unchecked)
    with pytest.raises(RuntimeError, match="holds a label outside"):
        ops.dice_loss(x, t, reduction="none")   # the composite path checks apart
    assert len(separate_checks) == 1
    # without classes, every label that is not ignored is out of range
    with pytest.raises(RuntimeError, match="holds a label outside"):
        ops.dice_loss(x[:, :0], t)


@pytest.mark.parametrize("C", [3, 50])   # a histogram of every pair; of the diagonal
@pytest.mark.parametrize("pred_kind", ["labels", "scores"])
@pytest.mark.parametrize("where, value, ignore_index, flagged", [
    ("target", "C", None, True),
    ("target", "C - 1", None, False),
    ("target", -1, None, True),
    ("target", -1, -1, False),           # ignored
    ("target", 2**32 + 1, None, True),   # full width
    ("pred", "C", None, True),
    ("pred", -1, -1, True),              # ignore_index applies to the target only
    ("pred", "C - 1", None, False),
])
def test_confusion_kernel_flags_bad_labels(C, pred_kind, where, value, ignore_index, flagged):
    """The confusion matrix kernel's label check, at the first and the last
    pixel, over several programs; the counts stay those of the reference."""
    if where == "pred" and pred_kind == "scores":
        pytest.skip("an argmax is always in range")
    value = {"C": C, "C - 1": C - 1}.get(value, value)
    torch.manual_seed(0)
    scores = torch.randn(2, C, 5, 7, dtype=KERNEL_DTYPES[0])
    t = torch.randint(0, C, (2, 5, 7))
    for pixel in ((0, 0, 0), (1, 4, 6)):
        target, labels = t.clone(), scores.argmax(1)
        (target if where == "target" else labels)[pixel] = value
        pred = scores if pred_kind == "scores" else labels
        flag = torch.zeros((), dtype=torch.int32, device=DEVICE)
        cm = kernels.confusion_matrix(pred.to(DEVICE), target.to(DEVICE), C, ignore_index,
                                      block_s=8, programs=3, bad_labels=flag)
        assert flag.item() == int(flagged), (pixel, flag.item())
        assert torch.equal(cm.cpu(), ref.confusion_matrix(pred, target, C, ignore_index))


@pytest.mark.skipif(ON_GPU, reason="a CUDA device assert fails the context: "
                                   "test_bad_labels_assert_on_cuda checks it in a child")
def test_confusion_matrix_checks_labels_in_its_kernel(monkeypatch):
    """Where the label checks are device asserts (here forced on the CPU),
    confusion_matrix makes them in its kernel: no separate passes."""
    monkeypatch.setattr(_checks, "values_checked_on_device", lambda t: True)
    separate_checks = []
    check_labels = ops._check_labels
    monkeypatch.setattr(ops, "_check_labels",
                        lambda *args: separate_checks.append(args) or check_labels(*args))
    t = torch.randint(0, 3, (2, 4, 4), device=DEVICE)
    pred = t.clone()
    ops.confusion_matrix(pred, t, 3)
    pred[1, 2, 2] = 3
    with pytest.raises(RuntimeError, match=r"or pred one outside \[0, 3\)"):
        ops.confusion_matrix(pred, t, 3)
    t[0, 0, 0] = 7
    with pytest.raises(RuntimeError, match=r"target holds a label outside \[0, 3\) or "
                                           r"ignore_index=255"):
        ops.confusion_matrix(torch.randn(2, 3, 4, 4, device=DEVICE), t, 3, 255)
    assert separate_checks == []
    ops.confusion_matrix(pred, t, 3, validate_args=False)


def test_unselected_class_weight_may_be_infinite(monkeypatch):
    """Inverse-frequency weights give inf to a class without pixels, often
    the background that include_background=False leaves out: it must not
    reach the mean (the composite picks the selected weights first)."""
    x, t = make_case(2, 4, (5, 6), False, "softmax", dtype=KERNEL_DTYPES[0])
    t[t == 0] = 1
    x, t = x.to(DEVICE), t.to(DEVICE)
    weights = torch.tensor([float("inf"), 1.0, 2.0, 0.5], dtype=x.dtype, device=DEVICE)
    options = dict(include_background=False, class_weights=weights)
    xf = x.clone().requires_grad_()
    loss = ops.dice_loss(xf, t, **options)
    loss.backward()
    monkeypatch.setattr(ops, "_fuses_loss", lambda *args: False)
    xc = x.clone().requires_grad_()
    want = ops.dice_loss(xc, t, **options)
    want.backward()
    assert torch.isfinite(want) and torch.isfinite(xc.grad).all()
    assert_close(loss, want, TOL)
    assert_close(xf.grad, xc.grad, TOL, name="grad")


def test_import_asks_torch_about_clamp_under_any_defaults():
    """The import-time question (how clamp_min's gradient treats its bound)
    works inside inference mode and with another default device."""
    import subprocess
    import sys
    code = ("import torch\ntorch.set_default_device('meta')\n"
            "with torch.inference_mode():\n    import segops.reference.overlap as r\n"
            "print(r.CLAMP_MIN_PASSES_TIE)")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.strip() == str(ref.CLAMP_MIN_PASSES_TIE)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("view", VIEWS)
def test_fused_loss_views_and_dtypes(dtype, view, monkeypatch):
    """The fused loss with every tensor argument a non-contiguous view (input,
    target, class weights, the incoming gradient) in each input dtype users
    run: the composite's loss and input gradient, both from the same sums."""
    x, t = make_case(2, 5, (4, 6), False, "softmax", ignore_index=255, dtype=dtype)
    x, t = _nocontig(x.to(DEVICE), view), _nocontig(t.to(DEVICE), view)
    acc = kernels.sums_dtype(x)
    weights = torch.tensor([1.0, 0.0, 2.0, 0.0, 0.5, 0.0, 3.0, 0.0, 1.5, 0.0], dtype=acc,
                           device=DEVICE)[::2]
    grad_out = torch.tensor([0.75, 0.0], dtype=acc, device=DEVICE)[0]
    options = dict(ignore_index=255, batch=False, class_weights=weights, classes=[0, 2, 3])
    xf = x.detach().clone().requires_grad_()
    with LaunchRecorder(kernels, FUSED_LOSS_KERNELS) as launched:
        loss = ops.jaccard_loss(xf, t, **options)
        loss.backward(grad_out)
    assert launched.names_launched() == FUSED_LOSS_KERNELS
    monkeypatch.setattr(ops, "_fuses_loss", lambda *args: False)
    xc = x.detach().clone().requires_grad_()
    want = ops.jaccard_loss(xc, t, **options)
    want.backward(grad_out)
    assert loss.dtype == want.dtype == acc and xf.grad.dtype == dtype
    assert_close(loss, want, RTOL[acc])
    assert_close(xf.grad, xc.grad, RTOL[dtype], name="grad")


@pytest.mark.parametrize("module", ["DiceLoss", "JaccardLoss"])
def test_loss_module_defaults_are_smps_and_the_functional_losses(module):
    """The constructor defaults: smp's (0.6) for smp's arguments, the
    functional loss's for the keyword-only ones; so a default module gives
    the functional loss with its defaults."""
    import inspect
    ours = inspect.signature(getattr(segops.nn, module).__init__).parameters
    fn = ops.dice_loss if module == "DiceLoss" else ops.jaccard_loss
    functional = inspect.signature(fn).parameters
    smp = {"classes": None, "log_loss": False, "from_logits": True, "smooth": 0.0,
           "ignore_index": None, "eps": 1e-7, "class_weights": None}
    for name in segops.nn.DiceLoss.OPTIONS:
        want = smp[name] if name in smp else functional[name].default
        assert ours[name].default == want, name
        assert functional[name].default == want, name
    x, t = make_case(2, 4, (3, 5), False, "softmax", dtype=KERNEL_DTYPES[0])
    t[t == 3] = 0    # class 3 absent from the target: skip_empty matters
    x, t = x.to(DEVICE), t.to(DEVICE)
    assert_close(getattr(segops.nn, module)("multiclass")(x, t), fn(x, t, "multiclass"), TOL)
