"""Atrous conv2d: kernels vs F.conv2d and the reference over a randomized grid
of geometries (forward and all three gradients), dtypes, layouts, tiles,
edges, errors, opcheck, compile, autocast and the module."""
import contextlib
import math
import random

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from helpers import (
    DEVICE,
    KERNEL_DTYPES,
    LAYOUT_SHAPES,
    ON_GPU,
    RTOL,
    VIEW_KINDS,
    VIEW_PAIRS,
    assert_channels_last_like_aten,
    assert_close,
    assert_guards_intact,
    assert_second_order_close,
    assert_strides_like_aten,
    deterministic,
    guarded_outputs,
    like_layout,
    PATHS,
    non_contiguous,
    on_path,
    record_gemm_launches,
    record_launches,
    skip_off_kernel_path_on_gpu,
    strided_views,
)

import segops
from segops import _checks
from segops.kernels import _gemm as gemm
from segops.kernels import conv as kernels
from segops.kernels import conv_transpose as transpose_kernels
from segops.kernels._math import divisor_magic, fast_div
from segops._format import memory_format_of
from segops._geometry import conv_output_size, tap_class_bounds
from segops.reference import conv as ref

F64 = RTOL[torch.float64]
TF32_RTOL = 3e-3

DILATIONS = [1, 2, 3, (2, 3)]
STRIDES = [1, 2, (1, 2)]
PADDINGS = [0, 1, (2, 1), "same", "valid"]
KERNELS = [1, 3, 5, (1, 3)]
GROUPS = ["1", "2", "depthwise"]
LAYOUTS = ["contiguous", "channels_last", "strided"]


def random_case(seed: int) -> dict:
    """One geometry from the grid the issue names, sizes odd and small."""
    rng = random.Random(seed)
    stride = rng.choice(STRIDES)
    padding = rng.choice(PADDINGS)
    if padding == "same" and stride != 1:
        padding = 1
    groups = rng.choice(GROUPS)
    g = {"1": 1, "2": 2, "depthwise": rng.choice([3, 4])}[groups]
    c_in = g * rng.choice([1, 2, 3]) if groups != "depthwise" else g
    c_out = g * rng.choice([1, 2, 3])
    return dict(N=rng.choice([1, 2]), C_in=c_in, C_out=c_out, H=rng.choice([7, 9, 11]),
                W=rng.choice([8, 9, 13]), kernel=rng.choice(KERNELS), stride=stride,
                padding=padding, dilation=rng.choice(DILATIONS), groups=g,
                bias=rng.random() < 0.6, layout=rng.choice(LAYOUTS))


def make_tensors(case, dtype=torch.float64, device=DEVICE):
    k = case["kernel"] if isinstance(case["kernel"], tuple) else (case["kernel"],) * 2
    x = torch.randn(case["N"], case["C_in"], case["H"], case["W"], dtype=torch.float64)
    w = torch.randn(case["C_out"], case["C_in"] // case["groups"], *k, dtype=torch.float64)
    b = torch.randn(case["C_out"], dtype=torch.float64) if case["bias"] else None
    x = like_layout(x.to(dtype).to(device), case.get("layout", "contiguous"))
    w, b = w.to(dtype).to(device), None if b is None else b.to(dtype).to(device)
    return x, w, b


def conv_args(case):
    return dict(stride=case["stride"], padding=case["padding"], dilation=case["dilation"],
                groups=case["groups"])


def output_fits(case):
    k = case["kernel"] if isinstance(case["kernel"], tuple) else (case["kernel"],) * 2
    d = case["dilation"] if isinstance(case["dilation"], tuple) else (case["dilation"],) * 2
    p = case["padding"]
    if p == "same":
        return True
    p = (0, 0) if p == "valid" else p if isinstance(p, tuple) else (p, p)
    return all(size + 2 * pad >= dd * (kk - 1) + 1
               for size, pad, dd, kk in zip((case["H"], case["W"]), p, d, k))


def forward_and_grads(fn, x, w, b, grad):
    leaves = [t.detach().requires_grad_() for t in (x, w, b) if t is not None]
    out = fn(*leaves, *([None] if b is None else []))
    grads = torch.autograd.grad(out, leaves, grad)
    return out, grads


CASES = [random_case(seed) for seed in range(40)]
CASES = [c for c in CASES if output_fits(c)][:28]
# depthwise with different row and column dilations (the random grid draws none)
CASES += [dict(N=1, C_in=3, C_out=6, H=9, W=8, kernel=3, stride=1, padding=1, dilation=(2, 1),
               groups=3, bias=True, layout="contiguous"),
          dict(N=2, C_in=4, C_out=4, H=7, W=11, kernel=3, stride=(2, 1), padding=(1, 2),
               dilation=(1, 3), groups=4, bias=False, layout="channels_last")]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_matches_f_conv2d(case):
    """Forward, grad_input, grad_weight and grad_bias against F.conv2d (and
    the reference) in float64."""
    x, w, b = make_tensors(case)
    args = conv_args(case)
    ours, our_grads = None, None
    want = F.conv2d(x.cpu(), w.cpu(), None if b is None else b.cpu(), **args)
    grad = torch.randn_like(want)
    ours, our_grads = forward_and_grads(
        lambda *t: segops.ops.atrous_conv2d(*t, **args), x, w, b, grad.to(DEVICE))
    want, want_grads = forward_and_grads(
        lambda *t: F.conv2d(*t, **args), x.cpu(), w.cpu(), None if b is None else b.cpu(), grad)
    assert_close(ours, want, F64)
    for name, got, expected in zip(["input", "weight", "bias"], our_grads, want_grads):
        assert_close(got, expected, F64, name=f"grad_{name}")
    if case["layout"] == "channels_last" and ours.shape[1] > 1 and ours.shape[-1] > 1:
        assert ours.is_contiguous(memory_format=torch.channels_last)
        assert our_grads[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("case", CASES[:6], ids=[f"case{i}" for i in range(6)])
def test_reference_matches_f_conv2d(case):
    x, w, b = make_tensors(case, device="cpu")
    args = conv_args(case)
    stride = segops.ops.conv._pair("stride", args["stride"], 1)
    dilation = segops.ops.conv._pair("dilation", args["dilation"], 1)
    pads = segops.ops.conv.resolve_padding(args["padding"], w.shape[-2:], stride, dilation)
    y = ref.conv2d(x, w, b, stride, pads, dilation, args["groups"])
    want = F.conv2d(x, w, b, **args)
    assert_close(y, want, F64)
    grad = torch.randn_like(want)
    xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
    gx, gw = torch.autograd.grad(F.conv2d(xr, wr, b, **args), (xr, wr), grad)
    assert_close(ref.conv2d_grad_input(grad, w, x.shape[-2:], stride, pads, dilation,
                                       args["groups"]), gx, F64, name="grad_input")
    assert_close(ref.conv2d_grad_weight(grad, x, w.shape, stride, pads, dilation,
                                        args["groups"]), gw, F64, name="grad_weight")


# --------------------------------------------------------------------------
# dtypes, tf32, tiles
# --------------------------------------------------------------------------
SEG_CASE = dict(N=2, C_in=19, H=9, W=10, C_out=21, kernel=3, stride=1, padding=2, dilation=2,
                groups=1, bias=True, layout="channels_last")


@pytest.mark.parametrize("dtype", KERNEL_DTYPES[-3:], ids=str)
def test_dtypes_against_float64(dtype, monkeypatch):
    """fp32 (TF32 off), fp16, bf16 with fp32 accumulation; 19 input and 21
    output channels (K and N tiles padded by masking)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    x, w, b = make_tensors(SEG_CASE, dtype)
    args = conv_args(SEG_CASE)
    want = F.conv2d(*(t.double().cpu() for t in (x, w, b)), **args)
    grad = torch.randn_like(want).to(dtype)
    out, grads = forward_and_grads(lambda *t: segops.ops.atrous_conv2d(*t, **args), x, w, b,
                                   grad.to(DEVICE))
    assert out.dtype == dtype
    _, want_grads = forward_and_grads(lambda *t: F.conv2d(*t, **args),
                                      *(t.double().cpu() for t in (x, w, b)), grad.double())
    assert_close(out, want, RTOL[dtype])
    for name, got, expected in zip(["input", "weight", "bias"], grads, want_grads):
        assert got.dtype == dtype
        assert_close(got, expected, RTOL[dtype], name=f"grad_{name}")


def test_padded_channel_counts():
    assert [kernels.padded_channels(c) for c in (1, 3, 15, 16, 17, 19, 21, 24, 32, 33, 150, 256)] \
        == [1, 3, 15, 16, 32, 32, 32, 32, 32, 48, 160, 256]


@pytest.mark.parametrize("channels", [(21, 21), (17, 32), (32, 19), (9, 21), (21, 5)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_unaligned_channels_run_zero_padded(channels, layout, monkeypatch):
    """Channel counts above 16 that are not multiples of 16 run the GEMMs on
    copies zero-padded to the next multiple of 16 (aligned operands for the
    JIT); forward and every gradient match F.conv2d, the real channels only
    are written, and a NaN input stays where F.conv2d puts it."""
    launches = record_gemm_launches(monkeypatch, kernels)
    C_in, C_out = channels
    case = dict(N=1, C_in=C_in, C_out=C_out, H=6, W=7, kernel=3, stride=(1, 2), padding=(2, 1),
                dilation=(2, 1), groups=1, bias=True, layout=layout)
    x, w, b = make_tensors(case)
    x[0, C_in - 1, 3, 4] = math.nan
    args = conv_args(case)
    grad = torch.randn_like(F.conv2d(x.cpu(), w.cpu(), b.cpu(), **args)).to(DEVICE)
    grad[0, C_out - 1, 0, 0] = math.inf  # a corner: taps that reach padding (_poison)
    if layout == "strided":  # every other tensor argument as a view too
        w, b, grad = (non_contiguous(w, "transposed"), non_contiguous(b, "slice"),
                      non_contiguous(grad, "stride2"))
        assert not any(t.is_contiguous() for t in (w, b, grad))
    out, grads = forward_and_grads(lambda *t: segops.ops.atrous_conv2d(*t, **args), x, w, b,
                                   grad)
    want, want_grads = forward_and_grads(lambda *t: F.conv2d(*t, **args),
                                         *(t.cpu() for t in (x, w, b)), grad.cpu())
    assert_close(out, want, F64)
    for name, got, expected in zip(["input", "weight", "bias"], grads, want_grads):
        assert_close(got, expected, F64, name=f"grad_{name}")
    padded = {"C_in": kernels.padded_channels(C_in), "C_out": kernels.padded_channels(C_out)}
    assert padded != {"C_in": C_in, "C_out": C_out}
    for name in ("_conv2d_fwd_kernel", "_conv2d_bwd_input_kernel", "_conv2d_bwd_weight_kernel"):
        (launch,) = launches[name]
        assert {k: launch[k] for k in padded} == padded, name
    # a side that needs no padding is not copied (a 256 -> 21 classifier's input)
    same_input = launches["_conv2d_fwd_kernel"][0]["x_ptr"].data_ptr() == x.data_ptr()
    assert same_input == (padded["C_in"] == C_in and layout == "channels_last")


@pytest.mark.parametrize("channels, groups", [((9, 5), 1), ((32, 48), 1), ((42, 42), 2)])
def test_aligned_small_and_grouped_channels_run_unpadded(channels, groups, monkeypatch):
    """Counts up to 16, multiples of 16 and grouped convolutions keep their
    channel counts (the padding would cost more than it saves, or is not
    needed, or would have to be per group)."""
    launches = record_gemm_launches(monkeypatch, kernels)
    C_in, C_out = channels
    case = dict(N=1, C_in=C_in, C_out=C_out, H=5, W=6, kernel=3, stride=1, padding=1,
                dilation=1, groups=groups, bias=False, layout="channels_last")
    x, w, _ = make_tensors(case)
    args = conv_args(case)
    out, grads = forward_and_grads(lambda *t: segops.ops.atrous_conv2d(*t, **args), x, w, None,
                                   torch.ones(1, C_out, 5, 6, dtype=x.dtype, device=DEVICE))
    want, want_grads = forward_and_grads(lambda *t: F.conv2d(*t, **args), x.cpu(), w.cpu(),
                                         None, torch.ones(1, C_out, 5, 6, dtype=x.dtype))
    assert_close(out, want, F64)
    for name, got, expected in zip(["input", "weight"], grads, want_grads):
        assert_close(got, expected, F64, name=f"grad_{name}")
    for name in ("_conv2d_fwd_kernel", "_conv2d_bwd_input_kernel", "_conv2d_bwd_weight_kernel"):
        (launch,) = launches[name]
        assert (launch["C_in"], launch["C_out"]) == (C_in // groups, C_out // groups), name


@pytest.mark.skipif(not ON_GPU, reason="TF32 exists on the GPU only")
def test_tf32_follows_cudnn_flag(monkeypatch):
    x, w, b = make_tensors(SEG_CASE, torch.float32)
    want = F.conv2d(*(t.double() for t in (x, w, b)), padding=2, dilation=2)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert gemm.allow_tf32(torch.float32)
    assert_close(segops.ops.atrous_conv2d(x, w, b, padding=2, dilation=2), want, TF32_RTOL)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert_close(segops.ops.atrous_conv2d(x, w, b, padding=2, dilation=2), want,
                 RTOL[torch.float32])


@pytest.mark.parametrize("tile", [(16, 16, 16, 4, 2), (128, 64, 64, 4, 4), (64, 128, 32, 8, 3)])
def test_tuned_tiles(tile):
    """Tiles from the tuner's list (and a small one), all three kernels."""
    m, n, k, warps, stages = tile
    config = dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=warps, num_stages=stages)
    dtype = KERNEL_DTYPES[0]
    x = torch.randn(2, 40, 9, 10, dtype=torch.float64).to(dtype).to(DEVICE)
    w = torch.randn(36, 20, 3, 3, dtype=torch.float64).to(dtype).to(DEVICE)
    geometry = ([2, 1], [3, 3, 2, 2], [3, 2], 2)
    cpu = [t.double().cpu() for t in (x, w)]
    want = ref.conv2d(*cpu, None, *geometry)
    tol = RTOL[dtype] if dtype != torch.float32 else TF32_RTOL
    for splits in (1, 3):  # the forward's split-K with the same tile
        y = kernels.conv2d_forward(x, w, None, *geometry, config=config, splits=splits)
        assert_close(y, want, tol)
    grad = torch.randn(want.shape, dtype=torch.float64)
    dx = kernels.conv_transpose_gather(grad.to(dtype).to(DEVICE), w, None, x.shape[-2:],
                                       *geometry, torch.contiguous_format, config=config)
    assert_close(dx, ref.conv2d_grad_input(grad, cpu[1], x.shape[-2:], *geometry), tol)
    dw = kernels.conv2d_grad_weight(grad.to(dtype).to(DEVICE), x, w.shape, *geometry,
                                    config=config, splits=3)
    assert_close(dw, ref.conv2d_grad_weight(grad, cpu[0], w.shape, *geometry), tol)


# split-K forward: (x shape, w shape, stride, padding, dilation, groups, bias/relu)
SPLIT_CASES = {
    # 3 taps x 2 channel blocks of 16: 6 steps over 4 splits (uneven runs)
    "uneven": ((2, 32, 7, 6), (12, 32, 1, 3), (1, 1), (0, 0, 1, 1), (1, 2), 1, True),
    # dilation 5 on a 6x7 map: the corner tiles keep 1 of 9 taps, some splits get none
    "padding taps": ((1, 24, 6, 7), (16, 24, 3, 3), (1, 1), (5, 5, 5, 5), (5, 5), 1, True),
    # a 1x1 conv with one channel block: one step, splits past it write zeros
    "more splits than steps": ((2, 16, 5, 5), (8, 16, 1, 1), (2, 2), (0, 0, 0, 0), (1, 1), 1,
                               False),
    "groups": ((2, 40, 6, 5), (18, 20, 3, 3), (1, 2), (2, 2, 1, 1), (2, 1), 2, True),
}


@pytest.mark.parametrize("splits", [2, 4, 7])
@pytest.mark.parametrize("name", sorted(SPLIT_CASES))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_forward_split_k(name, splits, layout):
    """The forward with its reduction split (each split a run of the tile's
    (tap, channel block) steps, the partials summed in order with bias and
    ReLU after): F.conv2d's result, in the input's memory format, for any
    split count, including splits with no steps."""
    x_shape, w_shape, stride, padding, dilation, groups, fused = SPLIT_CASES[name]
    x = like_layout(torch.randn(x_shape, dtype=torch.float64, device=DEVICE), layout)
    w = torch.randn(w_shape, dtype=torch.float64, device=DEVICE)
    b = torch.randn(w_shape[0], dtype=torch.float64, device=DEVICE) if fused else None
    if layout == "strided":  # every argument a view: input, weight and bias
        w = non_contiguous(w, "transposed")
        b = None if b is None else non_contiguous(b, "slice")
    config = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)
    with record_launches(kernels, "_conv2d_fwd_kernel", "_split_sum_kernel") as launches:
        y = kernels.conv2d_forward(x, w, b, stride, padding, dilation, groups, relu=fused,
                                   config=config, splits=splits)
    assert launches.names_launched() == ["_conv2d_fwd_kernel", "_split_sum_kernel"]
    assert launches.launches[0][1][2] == splits
    pads = (padding[0], padding[2])
    want = F.conv2d(x.cpu(), w.cpu(), None if b is None else b.cpu(), stride, pads, dilation,
                    groups)
    assert_close(y, F.relu(want) if fused else want, F64)
    assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")


def test_forward_split_k_past_one_channel_block():
    """The split sum over 80 output channels, more than one 64-channel block
    of its grid: every channel is summed, with bias and ReLU."""
    x = torch.randn(1, 16, 3, 4, dtype=torch.float64, device=DEVICE)
    w = torch.randn(80, 16, 3, 3, dtype=torch.float64, device=DEVICE)
    b = torch.randn(80, dtype=torch.float64, device=DEVICE)
    with record_launches(kernels, "_conv2d_fwd_kernel", "_split_sum_kernel") as launches:
        y = kernels.conv2d_forward(x, w, b, (1, 1), (1, 1, 1, 1), (1, 1), 1, relu=True,
                                   splits=2)
    assert launches.names_launched() == ["_conv2d_fwd_kernel", "_split_sum_kernel"]
    want = F.relu(F.conv2d(x.cpu(), w.cpu(), b.cpu(), padding=1))
    assert_close(y, want, F64)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES[-3:], ids=str)
def test_forward_split_k_in_low_precision(dtype, monkeypatch):
    """bf16/fp16/fp32: fp32 partials, one rounding to the output dtype."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    x = torch.randn(2, 48, 6, 7, dtype=torch.float64)
    w = torch.randn(20, 48, 3, 3, dtype=torch.float64)
    b = torch.randn(20, dtype=torch.float64)
    geometry = ([1, 1], [2, 2, 2, 2], [2, 2], 1)
    args = [t.to(dtype).to(DEVICE) for t in (x, w, b)]
    y = kernels.conv2d_forward(*args, *geometry, relu=True, splits=3)
    want = F.relu(F.conv2d(*(t.double().cpu() for t in args), padding=2, dilation=2))
    assert y.dtype == dtype
    assert_close(y, want, RTOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_forward_split_k_partials_keep_the_accumulation_dtype(dtype):
    """Two splits whose partials nearly cancel (4097 and -4096 at one pixel):
    the fp32 partials keep the 1 that a 16-bit partial would round away
    (4097 is neither an fp16 nor a bf16 number); only the sum is rounded to
    the output dtype."""
    x = torch.ones(1, 32, 1, 1, dtype=dtype, device=DEVICE)
    w = torch.zeros(16, 32, 1, 1, dtype=dtype, device=DEVICE)
    w[:, 0], w[:, 1], w[:, 16] = 4096, 1, -4096
    y = kernels.conv2d_forward(x, w, None, (1, 1), (0, 0, 0, 0), (1, 1), 1,
                               config=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16), splits=2)
    want = F.conv2d(x.double().cpu(), w.double().cpu())
    assert torch.equal(want, torch.ones_like(want))
    assert y.dtype == dtype
    assert_close(y, want, RTOL[dtype])


def test_forward_splits_only_below_two_waves():
    """forward_splits: none from two waves of 128x128 tiles up; below, enough
    for two waves, each split keeping SPLIT_MIN_STEPS steps, at most
    MAX_FORWARD_SPLITS."""
    h100 = 4 * 132
    assert kernels.forward_splits(264, 1000, h100) == 1   # two waves exactly
    assert kernels.forward_splits(263, 1000, h100) == 2
    assert kernels.forward_splits(131, 1000, h100) == 3   # 264 / 131 -> 3
    assert kernels.forward_splits(138, 288, h100) == 2    # ASPP os16: 69 x 2 tiles, 9 x 32 steps
    assert kernels.forward_splits(1, 10_000, h100) == kernels.MAX_FORWARD_SPLITS
    assert kernels.forward_splits(1, 2 * kernels.SPLIT_MIN_STEPS, h100) == 2
    assert kernels.forward_splits(1, 2 * kernels.SPLIT_MIN_STEPS - 1, h100) == 1
    assert kernels.forward_splits(1, 0, h100) == 1


def test_autotune_keys_name_kernel_arguments():
    """Triton drops key names that are not arguments without a word: each
    key names arguments of its kernel, and the forward's holds the split
    count (a split launch, fp32 partials, tunes its own tile)."""
    for kernel, key in ((kernels._conv2d_fwd_kernel, kernels._FORWARD_KEY),
                        (kernels._conv2d_bwd_input_kernel, kernels._GRAD_INPUT_KEY),
                        (kernels._conv2d_bwd_weight_kernel, kernels._GRAD_WEIGHT_KEY),
                        (transpose_kernels._conv_transpose_k_eq_s_kernel, transpose_kernels._KEY)):
        assert set(key) <= set(kernel.arg_names), (kernel.__name__, set(key) - set(kernel.arg_names))
    assert "tune_splits" in kernels._FORWARD_KEY


def test_tuner_prunes_what_spills_and_what_does_not_fit():
    """128-row tiles on 4 warps go for fp32 operands (TF32) and for the
    forward's fp32 split-K partials under bf16 operands, not for bf16 with a
    bf16 output; tiles past 227 KB of shared memory go for fp32."""
    def kept(x_dtype, y_dtype):
        named = {"x_ptr": torch.empty(1, dtype=x_dtype), "w_ptr": torch.empty(1, dtype=x_dtype),
                 "y_ptr": torch.empty(1, dtype=y_dtype)}
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps,
                 c.num_stages) for c in gemm.prune_configs(gemm.tuner_configs(), named)}

    wide_4_warps = {t for t in gemm.HOPPER_TILES if t[0] >= 128 and t[3] < 8}
    assert wide_4_warps and wide_4_warps <= kept(torch.bfloat16, torch.bfloat16)
    assert kept(torch.bfloat16, torch.bfloat16) == set(gemm.HOPPER_TILES)
    assert not wide_4_warps & kept(torch.bfloat16, torch.float32)
    assert kept(torch.bfloat16, torch.float32) == set(gemm.HOPPER_TILES) - wide_4_warps
    fp32 = kept(torch.float32, torch.float32)
    assert not wide_4_warps & fp32
    assert all(gemm.shared_memory_bytes(m, n, k, s, 4) <= gemm.SHARED_MEMORY_LIMIT
               for m, n, k, _, s in fp32)


@pytest.mark.parametrize("channels, pruned", [((32, 48), False), ((21, 21), True),
                                              ((256, 24), True), ((24, 256), True),
                                              ((16, 16), False)])
def test_tuner_keeps_small_tiles_for_unaligned_channels(channels, pruned):
    """A channel count that is not a multiple of 16 (21 classes; 24) leaves
    the operands unaligned for the JIT: only tiles of at most 64x64 stay
    (the larger ones spill, codegen report)."""
    C_in, C_out = channels
    named = {"x_ptr": torch.empty(1, dtype=torch.bfloat16), "C_in": C_in, "C_out": C_out,
             "y_ptr": torch.empty(1, dtype=torch.bfloat16)}
    kept = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps,
             c.num_stages) for c in gemm.prune_configs(gemm.tuner_configs(), named)}
    small = {t for t in gemm.HOPPER_TILES if t[0] * t[1] <= 64 * 64}
    assert small and kept == (small if pruned else set(gemm.HOPPER_TILES))


def test_op_splits_a_forward_of_few_tiles(monkeypatch):
    """The op takes the split path by itself when the output has fewer tiles
    than two waves (an H100's SM count here): one 128x128 tile and 18 steps
    of (tap, 64 channels) give 2 splits; the result is F.conv2d's, and under
    deterministic algorithms the split count is the same."""
    monkeypatch.setattr(kernels, "target_programs", lambda device: 4 * 132)
    x = torch.randn(1, 128, 6, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.randn(16, 128, 3, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    b = torch.randn(16, dtype=torch.float64, device=DEVICE, requires_grad=True)
    xr, wr, br = (t.detach().cpu().requires_grad_() for t in (x, w, b))
    want = F.relu(F.conv2d(xr, wr, br, padding=2, dilation=2))
    expected = torch.autograd.grad(want.square().sum(), (xr, wr, br))
    for mode in (contextlib.nullcontext, deterministic):
        with mode(), record_launches(kernels, "_conv2d_fwd_kernel") as launches:
            out = segops.ops.atrous_conv2d(x, w, b, padding=2, dilation=2, activation="relu")
        assert launches.launches[0][1][2] == 2
        assert_close(out, want, F64)
        for got, e in zip(torch.autograd.grad(out.square().sum(), (x, w, b)), expected):
            assert_close(got, e, F64, name="grad")


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_depthwise_direct_kernels(dtype, layout, monkeypatch):
    """One input channel per group runs the direct depthwise kernels (no
    GEMM): channel multiplier 2, dilation, stride, every gradient; and a
    single-channel input (groups=1, C_in=1) takes the same path."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    case = dict(N=2, C_in=5, C_out=10, H=9, W=8, kernel=3, stride=(2, 1), padding=2,
                dilation=2, groups=5, bias=True, layout=layout)
    x, w, b = make_tensors(case, dtype)
    args = conv_args(case)
    cpu = [t.double().cpu() for t in (x, w, b)]
    want = F.conv2d(*cpu, **args)
    grad = torch.randn_like(want).to(dtype)
    out, grads = forward_and_grads(lambda *t: segops.ops.atrous_conv2d(*t, **args), x, w, b,
                                   grad.to(DEVICE))
    _, want_grads = forward_and_grads(lambda *t: F.conv2d(*t, **args), *cpu, grad.double())
    assert_close(out, want, RTOL[dtype])
    for name, got, expected in zip(["input", "weight", "bias"], grads, want_grads):
        assert_close(got, expected, RTOL[dtype], name=f"grad_{name}")
    single = dict(case, C_in=1, C_out=4, groups=1)
    x, w, b = make_tensors(single, dtype)
    assert_close(segops.ops.atrous_conv2d(x, w, b, padding=1),
                 F.conv2d(*(t.double().cpu() for t in (x, w, b)), padding=1), RTOL[dtype])


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "transposed"])
def test_depthwise_channels_last_weight_reads_a_channels_last_input(transposed):
    """An NCHW input with a channels_last depthwise weight gives a
    channels_last output, which the direct kernel writes from a channels_last
    copy of the input (its channel-wide tile, as the GEMMs read their
    operands), not from the NCHW input with the pixel-wide tile."""
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64, device=DEVICE)
    shape = (6, 1, 3, 3) if transposed else (12, 1, 3, 3)
    w = torch.randn(shape, dtype=torch.float64, device=DEVICE).to(
        memory_format=torch.channels_last)
    op = segops.ops.conv_transpose2d if transposed else segops.ops.atrous_conv2d
    name = "_depthwise_bwd_input_kernel" if transposed else "_depthwise_fwd_kernel"
    with record_launches(kernels, name) as launches:
        out = op(x, w, stride=2, groups=6)
    ((read, *_),) = [args for launched, args in launches.calls if launched == name]
    assert read.stride(1) == 1 and out.stride(1) == 1
    tile = kernels._depthwise_tile(6 if transposed else 12, True)
    assert (launches.constexprs(name)[0]["BLOCK_M"], launches.constexprs(name)[0]["BLOCK_C"]) \
        == tile
    want = (F.conv_transpose2d if transposed else F.conv2d)(x.cpu(), w.cpu(), stride=2, groups=6)
    assert_close(out, want, F64)


def test_depthwise_weight_gradient_splits():
    x = torch.randn(2, 3, 12, 11, dtype=torch.float64, device=DEVICE)
    grad = torch.randn(2, 6, 12, 11, dtype=torch.float64, device=DEVICE)
    geometry = ([1, 1], [1, 1, 1, 1], [1, 1], 3)
    dw = kernels.conv2d_grad_weight(grad, x, (6, 1, 3, 3), *geometry, splits=5)
    want = ref.conv2d_grad_weight(grad.cpu(), x.cpu(), (6, 1, 3, 3), *geometry)
    assert_close(dw, want, F64)


def test_tap_rectangles_hold_exactly_the_pixels_each_tap_reads_inside():
    """The grad_weight table: per tap, the rectangle of output pixels whose
    tap lands inside the input (brute force), its width and area, and the
    fast_div magic numbers of both; the largest area is what splits divide."""
    for OH, OW, H, W, KH, KW, sh, sw, ph, pw, dh, dw in [
            (65, 65, 65, 65, 3, 3, 1, 1, 24, 24, 24, 24), (3, 3, 3, 3, 3, 3, 1, 1, 5, 5, 5, 5),
            (5, 6, 9, 11, 3, 2, 2, 2, 1, 0, 1, 3), (4, 4, 4, 4, 1, 1, 1, 1, 0, 0, 1, 1)]:
        table, largest, _ = kernels._tap_rectangles(OH, OW, H, W, KH, KW, sh, sw, ph, pw, dh,
                                                    dw)
        assert len(table) == 8 * KH * KW
        areas = []
        for tap in range(KH * KW):
            r, s = divmod(tap, KW)
            row0, col0, width, area, *magic = table[8 * tap:8 * tap + 8]
            inside = {(oh, ow) for oh in range(OH) for ow in range(OW)
                      if 0 <= oh * sh - ph + r * dh < H and 0 <= ow * sw - pw + s * dw < W}
            height = area // width if width else 0
            assert inside == {(row0 + i, col0 + j) for i in range(height) for j in range(width)}
            assert len(inside) == area
            assert magic == [*divisor_magic(max(area, 1)), *divisor_magic(max(width, 1))]
            areas.append(area)
        assert largest == max(areas)


@pytest.mark.parametrize("groups", [1, 4], ids=["gemm", "depthwise"])
@pytest.mark.parametrize("special,where", [(math.nan, (0, 1, 0, 3)), (math.inf, (1, 2, 5, 0)),
                                           (-math.inf, (0, 3, 2, 6)), (math.nan, (1, 0, 3, 3)),
                                           (math.inf, (0, 1, 1, 3))],
                         ids=["nan-top-row", "inf-left-column", "minus-inf-right-column",
                              "nan-inside", "inf-on-a-rectangle-edge"])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_grad_weight_non_finite_gradient_in_the_padding_reach(groups, special, where, splits,
                                                              layout):
    """A non-finite output gradient at a pixel where some tap reads padding:
    F.conv2d multiplies it by the padding's zero (NaN in every such tap of
    its channel); the kernels skip those pixels (tap rectangles) and must
    still give NaN there, and nothing more (other channels stay finite; a
    value inside every rectangle poisons through the product itself)."""
    x = torch.randn(2, 4, 6, 7, dtype=torch.float64, device=DEVICE)
    w_shape = (4, 4 // groups, 3, 3)
    grad = torch.randn(2, 4, 6, 7, dtype=torch.float64, device=DEVICE)
    grad[where] = special
    geometry = ([1, 1], [1, 1, 1, 1], [1, 1], groups)
    dw = kernels.conv2d_grad_weight(like_layout(grad, layout), x, w_shape, *geometry,
                                    splits=splits)
    xr = x.cpu().requires_grad_()
    wr = torch.zeros(w_shape, dtype=torch.float64, requires_grad=True)
    out = F.conv2d(xr, wr, padding=1, groups=groups)
    (want,) = torch.autograd.grad(out, wr, grad.cpu())
    assert not torch.isfinite(want).all()
    assert_close(dw, want, F64)


@pytest.mark.parametrize("groups", [1, 2], ids=["gemm", "depthwise"])
def test_grad_weight_when_no_tap_reads_inside(groups):
    """Stride 2 and padding 1 on a 1-row input: the output's rows read only
    padding, every tap's rectangle is empty; F.conv2d's weight gradient is 0
    times dy, NaN for a channel whose dy is not finite."""
    x = torch.randn(1, 2, 1, 1, dtype=torch.float64, device=DEVICE)
    dy = torch.randn(1, 2, 2, 1, dtype=torch.float64, device=DEVICE)
    dy[0, 0, 0, 0] = math.inf
    w_shape = (2, 2 // groups, 1, 1)
    geometry = ([2, 1], [1, 1, 0, 0], [1, 1], groups)
    dw = kernels.conv2d_grad_weight(dy, x, w_shape, *geometry)
    xr = x.cpu().requires_grad_()
    wr = torch.zeros(w_shape, dtype=torch.float64, requires_grad=True)
    out = F.conv2d(xr, wr, stride=(2, 1), padding=(1, 0), groups=groups)
    assert out.shape == dy.shape
    (want,) = torch.autograd.grad(out, wr, dy.cpu())
    assert torch.isnan(want).any() and not torch.isnan(want[1]).any()
    assert_close(dw, want, F64)


def test_poison_writes_nan_only_where_a_skipped_pixel_is_not_finite():
    """_poison on a weight gradient of zeros: nothing without padding reach
    (every rectangle the whole map: not even a launch), else NaN exactly at
    (channel, any input channel, tap) where a non-finite dy of the channel
    lies outside the tap's rectangle, in every dtype the kernels accumulate in."""
    dy = torch.randn(2, 3, 5, 6, dtype=torch.float64, device=DEVICE)
    dy[1, 2, 4, 5] = math.inf     # the bottom-right corner: outside the last row and column of taps
    dy[0, 0, 2, 3] = math.nan     # the middle: inside every rectangle
    *_, valid = kernels._tap_rectangles(5, 6, 5, 6, 1, 1, 1, 1, 0, 0, 1, 1)
    with record_launches(kernels, "_nonfinite_extents_kernel") as launches:
        untouched = kernels._poison(torch.zeros(3, 2, 1, 1, dtype=torch.float64, device=DEVICE),
                                    dy, valid)
    assert not launches.launches and torch.equal(untouched, torch.zeros_like(untouched))
    *_, columns_only = kernels._tap_rectangles(5, 6, 5, 6, 1, 3, 1, 1, 0, 1, 1, 1)
    got = kernels._poison(torch.zeros(3, 2, 1, 3, dtype=torch.float32, device=DEVICE), dy,
                          columns_only)
    want = torch.zeros(3, 2, 1, 3, dtype=torch.bool)
    want[2, :, 0, 2] = True       # column 5 lies outside the right tap's rectangle only
    assert torch.equal(torch.isnan(got).cpu(), want)
    bf16_nan = torch.zeros(1, 1, 5, 6, dtype=torch.bfloat16, device=DEVICE)
    bf16_nan[0, 0, 0, 0] = math.nan  # the top-left corner: outside the first row and column
    got = kernels._poison(torch.zeros(1, 1, 1, 3, device=DEVICE), bf16_nan, columns_only)
    assert torch.isnan(got).cpu().tolist() == [[[[True, False, False]]]]
    *_, padded = kernels._tap_rectangles(5, 6, 5, 6, 3, 3, 1, 1, 1, 1, 1, 1)
    for dtype in (torch.float32, torch.float64):
        got = kernels._poison(torch.zeros(3, 2, 3, 3, dtype=dtype, device=DEVICE),
                              dy.to(torch.bfloat16 if dtype == torch.float32 else dtype), padded)
        want = torch.zeros(3, 2, 3, 3, dtype=torch.bool)
        want[2, :, 2, :] = want[2, :, :, 2] = True
        assert torch.equal(torch.isnan(got).cpu(), want)
        assert torch.equal(got[~torch.isnan(got)].cpu(), torch.zeros(int((~want).sum()),
                                                                         dtype=dtype))


def test_poison_reaches_channels_past_the_first_channel_block():
    """_poison with more output channels than one 64-channel block of its two
    kernels (the non-finite extents, the taps): a non-finite dy in channel 66
    still poisons exactly its taps whose rectangles miss it, as one in
    channel 1 does."""
    C = 70
    dy = torch.randn(1, C, 5, 6, dtype=torch.float64, device=DEVICE)
    dy[0, 66, 4, 5] = math.inf    # outside the last row and column of taps
    dy[0, 1, 0, 0] = math.nan     # outside the first row and column of taps
    *_, padded = kernels._tap_rectangles(5, 6, 5, 6, 3, 3, 1, 1, 1, 1, 1, 1)
    got = kernels._poison(torch.zeros(C, 2, 3, 3, dtype=torch.float64, device=DEVICE), dy,
                          padded)
    want = torch.zeros(C, 2, 3, 3, dtype=torch.bool)
    want[66, :, 2, :] = want[66, :, :, 2] = True
    want[1, :, 0, :] = want[1, :, :, 0] = True
    assert torch.equal(torch.isnan(got).cpu(), want)


@pytest.mark.parametrize("groups", [1, 3], ids=["gemm", "depthwise"])
@pytest.mark.parametrize("splits", [1, 4])
def test_grad_weight_of_taps_that_never_read_inside(groups, splits):
    """Row dilation 5 on 3 rows padded by 5: only the middle row of taps
    reads the input, the other rows' rectangles are empty and their
    gradient is zero; split in several parts of the largest rectangle (the
    empty taps' programs write zeros), for both kernels."""
    x = torch.randn(2, 3, 3, 40, dtype=torch.float64, device=DEVICE)
    w_shape = (6, 3 // groups, 3, 3)
    grad = torch.randn(2, 6, 3, 40, dtype=torch.float64, device=DEVICE)
    geometry = ([1, 1], [5, 5, 1, 1], [5, 1], groups)
    name = "_conv2d_bwd_weight_kernel" if groups == 1 else "_depthwise_bwd_weight_kernel"
    with record_launches(kernels, name) as launches:
        dw = kernels.conv2d_grad_weight(grad, x, w_shape, *geometry, splits=splits)
    assert (launches.launches[0][1][-1] > 1) == (splits > 1)
    want = ref.conv2d_grad_weight(grad.cpu(), x.cpu(), w_shape, *geometry)
    assert_close(dw, want, F64)
    assert torch.equal(dw[:, :, [0, 2]].cpu(), torch.zeros_like(dw[:, :, [0, 2]].cpu()))


# --------------------------------------------------------------------------
# edges
# --------------------------------------------------------------------------
def test_fused_bias_relu_and_its_gradient():
    x, w, b = make_tensors(SEG_CASE)
    grad = torch.randn(2, 21, 9, 10, dtype=torch.float64)
    out, grads = forward_and_grads(
        lambda *t: segops.ops.atrous_conv2d(*t, padding=2, dilation=2, activation="relu"),
        x, w, b, grad.to(DEVICE))
    want, want_grads = forward_and_grads(
        lambda *t: F.relu(F.conv2d(*t, padding=2, dilation=2)),
        *(t.cpu() for t in (x, w, b)), grad)
    assert (out == 0).any() and (out > 0).any()
    assert_close(out, want, F64)
    for got, expected in zip(grads, want_grads):
        assert_close(got, expected, F64, name="grad")


def test_taps_in_the_padding_are_skipped_correctly():
    """ASPP's worst case: dilation larger than the map, so every tap but the
    centre reads only padding."""
    x, w, b = make_tensors(dict(SEG_CASE, H=5, W=6, dilation=12, padding=12, layout="contiguous"))
    want = F.conv2d(x.cpu(), w.cpu(), b.cpu(), padding=12, dilation=12)
    assert_close(segops.ops.atrous_conv2d(x, w, b, padding=12, dilation=12), want, F64)
    assert_close(want, F.conv2d(x.cpu(), w.cpu()[:, :, 1:2, 1:2], b.cpu()), F64)


def test_empty_batch_and_unbatched_input():
    x, w, b = make_tensors(SEG_CASE)
    empty = segops.ops.atrous_conv2d(x[:0], w, b, padding=2, dilation=2)
    assert empty.shape == (0, 21, 9, 10)
    single = segops.ops.atrous_conv2d(x[0], w, b, padding=2, dilation=2)
    assert_close(single, F.conv2d(x[0].cpu(), w.cpu(), b.cpu(), padding=2, dilation=2), F64)


def test_one_by_one_map_stride_larger_than_input():
    x = torch.randn(2, 3, 1, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    out = segops.ops.atrous_conv2d(x, w, stride=3, padding=1)
    want = F.conv2d(x.detach().cpu(), w.detach().cpu(), stride=3, padding=1)
    assert_close(out, want, F64)
    out.sum().backward()
    xr, wr = x.detach().cpu().requires_grad_(), w.detach().cpu().requires_grad_()
    F.conv2d(xr, wr, stride=3, padding=1).sum().backward()
    assert_close(x.grad, xr.grad, F64, name="grad_input")
    assert_close(w.grad, wr.grad, F64, name="grad_weight")


def test_kernel_path_gradcheck():
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.randn(3, 2, 3, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *t: segops.ops.atrous_conv2d(*t, stride=(2, 1), padding=1, dilation=(1, 2)),
        (x, w, b))


DOUBLE_BACKWARD_CASES = {
    "dilated": dict(stride=1, padding=2, dilation=2, groups=1),
    "strided-grouped": dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2),
    # an even kernel column count: 'same' pads 0 left, 1 right
    "same-depthwise": dict(stride=1, padding="same", dilation=(2, 1), groups=4),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name", sorted(DOUBLE_BACKWARD_CASES))
def test_double_backward_matches_f_conv2d(name, layout, activation):
    """A gradient penalty's double backward (the gradients of <input, weight
    and bias gradients, probes> with respect to input, weight and the output
    gradient, the last as a leaf and as a constant), against F.conv2d's in
    float64: it runs the three ops' own backward formulas (grad_input and
    grad_weight differentiated)."""
    args = DOUBLE_BACKWARD_CASES[name]
    groups = args["groups"]
    x = like_layout(torch.randn(2, 4, 6, 7, dtype=torch.float64), layout)
    w = torch.randn(4, 4 // groups, 3, 2, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64)
    dy = torch.randn(F.conv2d(x, w, **args).shape, dtype=torch.float64)
    probes = [torch.randn_like(t) for t in (x, w, b)]
    relu = F.relu if activation else (lambda t: t)
    got = assert_second_order_close(
        lambda *t: segops.ops.atrous_conv2d(*t, activation=activation, **args),
        lambda *t: relu(F.conv2d(*t, **args)), (x, w, b), dy, probes, F64,
        ("input", "weight", "bias"))
    assert got[1][0].is_contiguous(memory_format=memory_format_of(x))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["dilated", "same-depthwise"])
def test_double_backward_half_precision_views(name, dtype):
    """The double backward in fp16/bf16 with the input, weight, bias and
    output gradient all non-contiguous views (a gradient penalty under AMP):
    against F.conv2d's in float64 of the same rounded values."""
    args = DOUBLE_BACKWARD_CASES[name]
    groups = args["groups"]

    def rounded(*shape):
        return torch.randn(*shape).to(dtype).double()

    x, w, b = rounded(2, 4, 6, 7), rounded(4, 4 // groups, 3, 2), rounded(4)
    dy = rounded(*F.conv2d(x, w, **args).shape)
    probes = [rounded(*t.shape) for t in (x, w, b)]
    assert_second_order_close(
        lambda *t: segops.ops.atrous_conv2d(*t, **args), lambda *t: F.conv2d(*t, **args),
        (x, w, b), dy, probes, RTOL[dtype], ("input", "weight", "bias"), dtype=dtype,
        view=lambda t: like_layout(t, "strided"))


def test_double_backward_frozen_weight():
    """A frozen weight (no gradient) and an output gradient that depends on
    the input (the gradient of 0.5 * |relu(conv(x))|^2): the penalty's
    input gradient flows back through that output gradient alone."""
    x = torch.randn(2, 4, 6, 7, dtype=torch.float64)
    w = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    probe = torch.randn_like(x)

    def penalty_grad(conv, x, w):
        x = x.clone().requires_grad_()
        energy = 0.5 * conv(x, w).pow(2).sum()
        (gx,) = torch.autograd.grad(energy, x, create_graph=True)
        return torch.autograd.grad((gx * probe.to(gx)).sum(), x)[0]

    got = penalty_grad(lambda *t: segops.ops.atrous_conv2d(*t, padding=2, dilation=2, groups=2,
                                                           activation="relu"),
                       x.to(DEVICE), w.to(DEVICE))
    want = penalty_grad(lambda *t: F.relu(F.conv2d(*t, padding=2, dilation=2, groups=2)), x, w)
    assert_close(got, want, F64)


def test_double_backward_gradgradcheck():
    """Numerical second derivatives (fast_mode: along random directions, as
    the interpreter is slow)."""
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.randn(1, 2, 2, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda *t: segops.ops.atrous_conv2d(*t, stride=(2, 1), padding=1, dilation=(1, 2)),
        (x, w), fast_mode=True)


OPCHECK_VIEWS = [("contiguous", "contiguous"), ("cl_channel_slice", "contiguous"),
                 ("contiguous", "channels_last")]


@pytest.mark.parametrize("x_view, w_view", OPCHECK_VIEWS)
@pytest.mark.parametrize("shape", [(2, 4, 6, 5), (2, 4, 1, 1)], ids=["maps", "1x1_maps"])
def test_opcheck(shape, x_view, w_view):
    """The fake kernels promise the real outputs' strides (ATen's layout
    rule), for non-dense and ambiguous inputs too."""
    x = strided_views(x_view, shape)[1].requires_grad_()
    w = strided_views(w_view, (6, 2, 3, 3))[1].requires_grad_()
    b = torch.randn(6, dtype=torch.float64, device=DEVICE, requires_grad=True)
    geometry = ([1, 2], [2, 2, 1, 1], [2, 1], 2)
    torch.library.opcheck(torch.ops.segops.conv2d.default, (x, w, b, *geometry, True))
    OH, OW = conv_output_size(shape[-2:], (3, 3), *geometry[:3])
    grad = torch.randn(2, 6, OH, OW, dtype=torch.float64, device=DEVICE, requires_grad=True)
    for channels_last in (False, True):
        torch.library.opcheck(torch.ops.segops.conv2d_grad_input.default,
                              (grad, w, list(shape[-2:]), *geometry, channels_last))
        torch.library.opcheck(torch.ops.segops.conv2d_grad_weight.default,
                              (grad, x, [6, 2, 3, 3], *geometry, channels_last))


def test_compile_fullgraph_through_module():
    conv = segops.nn.AtrousConv2d(4, 5, 3, padding=2, dilation=2).to(DEVICE, torch.float64)
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64, device=DEVICE, requires_grad=True)
    backend = "inductor" if ON_GPU else "aot_eager"
    compiled = torch.compile(conv, fullgraph=True, backend=backend)
    out = compiled(x)
    grads = torch.autograd.grad(out.sum(), (x, conv.weight, conv.bias))
    want = F.conv2d(x, conv.weight, conv.bias, padding=2, dilation=2)
    want_grads = torch.autograd.grad(want.sum(), (x, conv.weight, conv.bias))
    assert_close(out, want, F64)
    for got, expected in zip(grads, want_grads):
        assert_close(got, expected, F64, name="grad")


def test_autocast_like_f_conv2d():
    half = torch.float16 if ON_GPU else torch.bfloat16
    x = torch.randn(1, 3, 6, 6, device=DEVICE)
    w = torch.randn(4, 3, 3, 3, device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=half):
        out = segops.ops.atrous_conv2d(x, w, padding=2, dilation=2)
        want = F.conv2d(x, w, padding=2, dilation=2)
    assert out.dtype == want.dtype == half
    # against float64 on the autocast-rounded inputs: only our own rounding
    exact = F.conv2d(x.to(half).double(), w.to(half).double(), padding=2, dilation=2)
    assert_close(out, exact, RTOL[half])


def test_module_loads_conv2d_state_dict():
    plain = torch.nn.Conv2d(6, 8, 3, stride=(1, 2), padding=(2, 3), dilation=(2, 3), groups=2)
    ours = segops.nn.AtrousConv2d(6, 8, 3, stride=(1, 2), padding=(2, 3), dilation=(2, 3),
                                  groups=2)
    ours.load_state_dict(plain.state_dict())
    assert ours.state_dict().keys() == plain.state_dict().keys()
    plain, ours = plain.to(DEVICE, torch.float64), ours.to(DEVICE, torch.float64)
    x = torch.randn(2, 6, 9, 11, dtype=torch.float64, device=DEVICE)
    assert_close(ours(x), plain(x), F64)
    shared = segops.nn.AtrousConv2d.from_conv(plain)
    assert shared.weight is plain.weight
    assert_close(shared(x), plain(x), F64)


def test_module_padding_modes():
    for mode in ("reflect", "replicate", "circular"):
        plain = torch.nn.Conv2d(2, 3, 3, padding=2, dilation=2, padding_mode=mode).double()
        ours = segops.nn.AtrousConv2d(2, 3, 3, padding=2, dilation=2, padding_mode=mode).double()
        ours.load_state_dict(plain.state_dict())
        x = torch.randn(1, 2, 6, 7, dtype=torch.float64)
        assert_close(ours.to(DEVICE)(x.to(DEVICE)), plain(x), F64, name=mode)


@pytest.mark.skipif(not ON_GPU, reason="2^31-element tensors: too slow for the interpreter")
def test_offsets_past_2_to_the_31():
    """64 channels of 5793^2 (> 2^31 elements): the last rows are read through
    64-bit offsets."""
    side = 5793
    x = torch.zeros((1, 64, side, side), dtype=torch.bfloat16, device=DEVICE)
    x[..., -6:, -6:] = torch.randn(64, 6, 6, device=DEVICE).to(torch.bfloat16)
    assert x.numel() > 2**31
    w = torch.randn(1, 64, 3, 3, device=DEVICE, dtype=torch.bfloat16)
    out = segops.ops.atrous_conv2d(x, w, padding=2, dilation=2)
    want = F.conv2d(x[..., -10:, -10:].double(), w.double(), padding=2, dilation=2)
    assert_close(out[..., -8:, -8:], want[..., -8:, -8:], RTOL[torch.bfloat16])


@triton.jit
def _divide_kernel(x_ptr, out_ptr, d, multiplier, shift, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, fast_div(tl.load(x_ptr + offs), d, multiplier, shift))


@pytest.mark.parametrize("divisor", [1, 2, 3, 7, 65, 4225, 1089, 2**20 + 7, 2**30 + 3, 2**31 - 1])
def test_fast_div_is_exact_for_every_int32_dividend(divisor):
    """fast_div (the grad_weight loop's pixel split) equals // for dividends
    across [0, 2^31), the ends and the multiples of the divisor included."""
    generator = torch.Generator().manual_seed(divisor)
    edges = [0, 1, divisor - 1, divisor, divisor + 1, 2**31 - 2, 2**31 - 1,
             (2**31 - 1) // divisor * divisor, (2**31 - 1) // divisor * divisor - 1]
    x = torch.cat([torch.tensor(edges, dtype=torch.int64).clamp(0, 2**31 - 1),
                   torch.randint(0, 2**31 - 1, (1024 - len(edges),), generator=generator)])
    x = x.to(torch.int32).to(DEVICE)
    out = torch.empty_like(x)
    _divide_kernel[(1,)](x, out, divisor, *divisor_magic(divisor), BLOCK=1024)
    assert torch.equal(out.cpu(), x.cpu() // divisor)


@triton.jit
def _grouped_pixels_kernel(out_ptr, total, OH, OW, bounds_ptr, row_inner, col_inner,
                           BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    n, oh, ow = kernels._grouped_pixels(offs, OH, OW, bounds_ptr, row_inner, col_inner)
    tl.store(out_ptr + offs * 3, n, mask=mask)
    tl.store(out_ptr + offs * 3 + 1, oh, mask=mask)
    tl.store(out_ptr + offs * 3 + 2, ow, mask=mask)


def _class_major_order(N, rows, cols):
    """The forward's pixel order: per image, row bands, then column classes,
    then row-major inside each rectangle."""
    return [(n, oh, ow) for n in range(N)
            for r0, r1 in zip(rows, rows[1:]) for c0, c1 in zip(cols, cols[1:])
            for oh in range(r0, r1) for ow in range(c0, c1)]


def _executed_taps(order, rows, cols, block):
    """Sum over tiles of block pixels of (pixels x taps the tile runs): a tile
    runs the taps of every row and column class among its pixels (a tap
    interval: the classes between the smallest and largest coordinate)."""
    def taps_of(lo, hi, bounds, valid):
        return len({t for c in range(len(bounds) - 1) if bounds[c] <= hi and bounds[c + 1] > lo
                    for t in valid[c]})
    total = 0
    for start in range(0, len(order), block):
        tile = order[start:start + block]
        oh = [p[1] for p in tile]
        ow = [p[2] for p in tile]
        total += len(tile) * (taps_of(min(oh), max(oh), rows, ROW_TAPS)
                              * taps_of(min(ow), max(ow), cols, COL_TAPS))
    return total


# ASPP d24 on 65^2, 3x3 taps at -24, 0, +24: the taps each class keeps
ASPP_D24 = (0, 24, 41, 65)
ROW_TAPS = COL_TAPS = [{1, 2}, {0, 1, 2}, {0, 1}]


@pytest.mark.parametrize("rows,cols", [(ASPP_D24, ASPP_D24), ((0, 1, 4, 5), (0, 7)),
                                       ((0, 9), (0, 2, 3, 6, 8, 9)), ((0, 5), (0, 7))])
def test_forward_pixel_order_groups_pixels_by_their_taps(rows, cols):
    """_grouped_pixels gives each image's pixels once each, row bands first,
    then column classes, row-major inside a rectangle (one class per axis
    is row-major); at ASPP d24 on 65^2 the 128-pixel tiles then run 8.7%
    more tap work than the pixels need, where row-major tiles run 34% more
    (a 19% cut of the forward's MMA work)."""
    N, OH, OW = 2, rows[-1], cols[-1]
    total = N * OH * OW
    out = torch.full((total, 3), -1, dtype=torch.int32, device=DEVICE)
    table = kernels._bounds_table(rows[1:-1], cols[1:-1], DEVICE)
    _grouped_pixels_kernel[(triton.cdiv(total, 256),)](out, total, OH, OW, table, len(rows) - 2,
                                                       len(cols) - 2, BLOCK=256)
    want = _class_major_order(N, rows, cols)
    assert out.cpu().tolist() == [list(p) for p in want]
    if rows == ASPP_D24:
        useful = N * sum((r1 - r0) * (c1 - c0) * len(rt) * len(ct)
                         for r0, r1, rt in zip(rows, rows[1:], ROW_TAPS)
                         for c0, c1, ct in zip(cols, cols[1:], COL_TAPS))
        grouped = _executed_taps(want, rows, cols, 128)
        row_major = _executed_taps(_class_major_order(N, (0, OH), (0, OW)), rows, cols, 128)
        assert grouped < 1.09 * useful and row_major > 1.34 * useful


def test_tap_class_bounds():
    """Where the set of in-bounds taps changes along an axis: ASPP at output
    stride 8 and 16, a 3x3 'same' conv, strided, and a tap that never fits."""
    assert tap_class_bounds(65, 65, 3, 1, 24, 24) == (0, 24, 41, 65)
    assert tap_class_bounds(65, 65, 3, 1, 36, 36) == (0, 29, 36, 65)
    assert tap_class_bounds(33, 33, 3, 1, 18, 18) == (0, 15, 18, 33)
    assert tap_class_bounds(65, 65, 3, 1, 1, 1) == (0, 1, 64, 65)
    assert tap_class_bounds(5, 10, 3, 2, 1, 1) == (0, 1, 5)  # row -1 for o = 0 only
    assert tap_class_bounds(4, 4, 1, 1, 0, 1) == (0, 4)
    assert tap_class_bounds(3, 3, 3, 1, 5, 5) == (0, 3)  # only the middle tap, everywhere
    for out_len, in_len, taps, stride, pad, dil in [(9, 9, 3, 1, 2, 2), (7, 13, 5, 2, 3, 1),
                                                     (6, 6, 3, 1, 5, 5), (11, 8, 2, 1, 3, 3)]:
        bounds = tap_class_bounds(out_len, in_len, taps, stride, pad, dil)
        for lo, hi in zip(bounds, bounds[1:]):
            kept = [{t for t in range(taps) if 0 <= o * stride - pad + t * dil < in_len}
                    for o in range(lo, hi)]
            assert all(k == kept[0] for k in kept)  # one tap set per class
        for b in bounds[1:-1]:  # and each bound is a change
            before = {t for t in range(taps) if 0 <= (b - 1) * stride - pad + t * dil < in_len}
            after = {t for t in range(taps) if 0 <= b * stride - pad + t * dil < in_len}
            assert before != after


@pytest.mark.parametrize("in_len,out_len,taps,pad,dil", [(65, 65, 3, 24, 24), (33, 33, 3, 18, 18),
                                                        (9, 7, 3, 0, 1), (8, 12, 5, 4, 1),
                                                        (6, 6, 3, 5, 5)])
def test_grad_input_groups_pixels_by_the_taps_that_reach_them(in_len, out_len, taps, pad, dil):
    """Along a stride-1 axis the input gradient's classes are where the set
    of taps reaching an input position from inside the output changes (brute
    force); a strided axis is not grouped."""
    reach = [frozenset(t for t in range(taps) if 0 <= i + pad - t * dil < out_len)
             for i in range(in_len)]
    changes = tuple(i for i in range(1, in_len) if reach[i] != reach[i - 1])
    assert kernels._gradient_classes(in_len, out_len, taps, 1, pad, dil) == changes
    assert kernels._gradient_classes(in_len, out_len, taps, 2, pad, dil) == ()


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("kernel,dilation", [((4, 2), (3, 2)), ((2, 4), (2, 3))],
                         ids=["tall", "wide"])
def test_launchers_pass_the_tap_classes_of_their_geometry(monkeypatch, kernel, dilation):
    """The forward and grad_input launches carry the class bounds of their
    own geometry (rows from the top padding and row dilation, columns from
    the left padding and column dilation; grad_input's with both negated):
    any one-to-one pixel order gives the right numbers, so only this says
    the tiles get the taps they skip. 'same' with 4 taps of dilation 3 pads
    4 before and 5 after (rows when tall, columns when wide): the classes
    come from the padding before."""
    (KH, KW), (dh, dw) = kernel, dilation
    H, W = (9, 11) if KH > KW else (11, 9)
    before = [dh * (KH - 1) // 2, dw * (KW - 1) // 2]
    after = [dh * (KH - 1) - before[0], dw * (KW - 1) - before[1]]
    launches = record_gemm_launches(monkeypatch, kernels)
    x = torch.randn(1, 8, H, W, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.randn(8, 8, KH, KW, dtype=torch.float64, device=DEVICE, requires_grad=True)
    out = segops.ops.atrous_conv2d(x, w, padding="same", dilation=dilation)
    out.backward(torch.ones_like(out))
    (fwd,) = launches["_conv2d_fwd_kernel"]
    (gin,) = launches["_conv2d_bwd_input_kernel"]

    def classes(fn, pads):
        return fn(H, H, KH, 1, pads[0], dh), fn(W, W, KW, 1, pads[1], dw)

    def bounds(*args):
        return tap_class_bounds(*args)[1:-1]

    rows, cols = classes(bounds, before)
    assert rows and cols
    assert (rows, cols) != classes(bounds, after)  # the padding after would differ
    assert ((fwd["bounds_ptr"].tolist(), fwd["row_inner"], fwd["col_inner"])
            == (list(rows + cols) + [0], len(rows), len(cols)))
    assert fwd["tune_splits"] == 1
    grad_rows, grad_cols = classes(kernels._gradient_classes, before)
    assert (grad_rows, grad_cols) != (rows, cols)  # the negation matters here
    assert (grad_rows, grad_cols) != classes(kernels._gradient_classes, after)
    assert ((gin["bounds_ptr"].tolist(), gin["row_inner"], gin["col_inner"])
            == (list(grad_rows + grad_cols) + [0], len(grad_rows), len(grad_cols)))


def test_pixel_classes_fall_back_to_row_major_past_the_limit():
    """A 31-tap kernel row has up to 63 classes: the forward orders that axis
    row-major instead of searching them per pixel, and still gives F.conv2d."""
    assert len(tap_class_bounds(40, 40, 31, 1, 15, 1)) - 1 > kernels.MAX_TAP_CLASSES
    assert kernels._pixel_classes(40, 40, 31, 1, 15, 1) == ()
    assert kernels._pixel_classes(65, 65, 3, 1, 24, 24) == ASPP_D24[1:-1]
    # a 3x3 kernel's most: 7 classes (3 pixels padded by 3: each output column its own)
    assert kernels._pixel_classes(7, 3, 3, 1, 3, 1) == tuple(range(1, 7))
    x = torch.randn(1, 2, 5, 40, dtype=torch.float64, device=DEVICE)
    w = torch.randn(3, 2, 3, 31, dtype=torch.float64, device=DEVICE)
    y = kernels.conv2d_forward(x, w, None, [1, 1], [1, 1, 15, 15], [1, 1], 1)
    assert_close(y, F.conv2d(x.cpu(), w.cpu(), padding=(1, 15)), F64)


def test_offset_type_is_int64_from_2_to_the_31():
    """The grad_weight loop's per-pixel offsets are int32 only when both
    tensors span less than 2^31 elements (shapes and strides only: meta)."""
    from segops.kernels._layout import offset_type

    def spanning(last):  # its first and last elements ``last`` apart
        return torch.empty_strided((2, 2), (last - 1, 1), device="meta")
    largest = spanning(2**31 - 1)  # the last element's offset is int32's maximum
    assert offset_type(largest, spanning(10)) == tl.int32
    assert offset_type(largest, spanning(2**31)) == tl.int64
    assert offset_type(torch.empty_strided((3, 2), (2**30, 1), device="meta")) == tl.int64
    assert offset_type(torch.empty((0, 5), device="meta")) == tl.int32


DEPTHWISE_CASE = dict(x=(2, 4, 9, 11), w=(8, 1, 3, 3),
                      args=dict(stride=1, padding=2, dilation=2, groups=4))


# GEMM grad_weight geometries (several input channels per group), one grouped
GEMM_CASES = [c for c in CASES if c["C_in"] // c["groups"] > 1][:3]
GEMM_CASES += [c for c in CASES if c["C_in"] // c["groups"] > 1 and c["groups"] > 1][:1]


@pytest.mark.parametrize("case", GEMM_CASES + ["depthwise"],
                         ids=[f"gemm{i}" for i in range(len(GEMM_CASES))] + ["depthwise"])
def test_grad_weight_with_64_bit_offsets(case, monkeypatch):
    """The int64 variant of the grad_weight loops (GEMM and depthwise; taken
    past 2^31 elements) on small tensors, against F.conv2d."""
    monkeypatch.setattr(kernels, "offset_type", lambda *tensors: tl.int64)
    if case == "depthwise":
        x = torch.randn(DEPTHWISE_CASE["x"], dtype=torch.float64, device=DEVICE)
        w = torch.randn(DEPTHWISE_CASE["w"], dtype=torch.float64, device=DEVICE)
        args = DEPTHWISE_CASE["args"]
    else:
        x, w, _ = make_tensors(case)
        args = conv_args(case)
    want = F.conv2d(x.cpu(), w.cpu(), **args)
    grad = torch.randn_like(want)
    _, (_, got) = forward_and_grads(lambda *t: segops.ops.atrous_conv2d(*t, **args), x, w,
                                    None, grad.to(DEVICE))
    _, (_, expected) = forward_and_grads(lambda *t: F.conv2d(*t, **args), x.cpu(), w.cpu(),
                                         None, grad)
    assert_close(got, expected, F64, name="grad_weight")


def test_more_than_2_to_the_31_pixels_is_a_clear_error():
    """Past 2^31 - 2^16 pixels (the margin keeps a last tile's masked lane
    indices inside int32), on the input or the output side."""
    x = torch.empty((1, 1, 46341, 46341), dtype=torch.bfloat16, device="meta")
    w = torch.empty((1, 1, 1, 1), dtype=torch.bfloat16, device="meta")
    with pytest.raises(ValueError, match="2\\^31 - 2\\^16"):
        segops.ops.atrous_conv2d(x, w)
    limit = 2**31 - 2**16
    segops.ops.conv.check_pixel_count("output", limit)
    with pytest.raises(ValueError, match="output has 2147418113 pixels"):
        segops.ops.conv.check_pixel_count("output", limit + 1)


# --------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------
def _x(*shape):
    return torch.randn(*(shape or (1, 4, 6, 6)), device=DEVICE)


def _w(*shape):
    return torch.randn(*(shape or (6, 4, 3, 3)), device=DEVICE)


BAD_CALLS = [
    ("expects 4 input channels, got input of shape", lambda: ((_x(1, 5, 6, 6), _w()), {})),
    ("groups=4 must divide the output channels 6", lambda: ((_x(), _w(6, 1, 3, 3)),
                                                             {"groups": 4})),
    ("stride must be positive", lambda: ((_x(), _w()), {"stride": 0})),
    ("dilation must be positive", lambda: ((_x(), _w()), {"dilation": (1, -1)})),
    ("padding must be non-negative", lambda: ((_x(), _w()), {"padding": -1})),
    ("not supported for strided", lambda: ((_x(), _w()), {"padding": "same", "stride": 2})),
    ("padding must be one of", lambda: ((_x(), _w()), {"padding": "full"})),
    ("input must be \\(N, C, H, W\\)", lambda: ((_x(4, 6), _w()), {})),
    ("weight must be", lambda: ((_x(), _w(6, 4, 3)), {})),
    ("bias must have shape \\(6,\\)", lambda: ((_x(), _w(), torch.zeros(5, device=DEVICE)), {})),
    ("too small", lambda: ((_x(1, 4, 3, 3), _w()), {"dilation": 2})),
    ("same dtype", lambda: ((_x(), _w().double()), {})),
    ("activation must be one of", lambda: ((_x(), _w()), {"activation": "gelu"})),
]


@pytest.mark.parametrize("match,make", BAD_CALLS, ids=[m for m, _ in BAD_CALLS])
def test_bad_input_errors(match, make):
    args, kwargs = make()
    with pytest.raises(RuntimeError, match=match) as error:
        segops.ops.atrous_conv2d(*args, **kwargs)
    assert isinstance(error.value, (_checks.ArgumentError, _checks.ArgumentTypeError))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_same_padding_with_even_kernels():
    """An even dilated extent pads one more at the bottom/right, as PyTorch."""
    x = torch.randn(1, 2, 7, 8, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.randn(3, 2, 2, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    out = segops.ops.atrous_conv2d(x, w, padding="same", dilation=(1, 3))
    xr, wr = x.detach().cpu().requires_grad_(), w.detach().cpu().requires_grad_()
    want = F.conv2d(xr, wr, padding="same", dilation=(1, 3))
    assert_close(out, want, F64)
    grad = torch.randn_like(want)
    got = torch.autograd.grad(out, (x, w), grad.to(DEVICE))
    expected = torch.autograd.grad(want, (xr, wr), grad)
    for g, e in zip(got, expected):
        assert_close(g, e, F64, name="grad")


def test_gemm_weight_copies_only_without_the_contiguous_axis_it_needs():
    """gemm_weight: a weight with either channel axis contiguous is used as
    is, a default 3x3 weight (neither) is copied once with dim 0 contiguous;
    for TF32 the named reduction axis must be the contiguous one, else a copy
    makes it so. Every result is the same logical weight."""
    base = torch.randn(6, 4, 3, 3, dtype=torch.float64, device=DEVICE)
    dim0 = base.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)  # (C_in, KH, KW, C_out)
    dim1 = base.contiguous(memory_format=torch.channels_last)
    assert (dim0.stride(0), dim1.stride(1)) == (1, 1)
    for w, k_dim in ((dim0, None), (dim1, None), (dim0, 0), (dim1, 1)):
        got = gemm.gemm_weight(w, k_dim)
        assert got.data_ptr() == w.data_ptr() and got.stride() == w.stride()
    for w, k_dim, contiguous in ((base, None, 0), (base, 0, 0), (base, 1, 1), (dim1, 0, 0),
                                 (dim0, 1, 1)):
        got = gemm.gemm_weight(w, k_dim)
        assert got.data_ptr() != w.data_ptr() and got.stride(contiguous) == 1
        assert torch.equal(got, base)


@pytest.mark.parametrize("weight_layout", ["channels_last", "transposed-view"])
def test_weight_memory_layouts(weight_layout):
    """Weights already laid out with a contiguous channel axis, or as a
    non-contiguous view, give the same results and gradients."""
    x = torch.randn(2, 6, 7, 8, dtype=torch.float64, device=DEVICE)
    base = torch.randn(4, 6, 3, 3, dtype=torch.float64, device=DEVICE)
    if weight_layout == "channels_last":
        w = base.contiguous(memory_format=torch.channels_last)
    else:
        w = base.transpose(2, 3).contiguous().transpose(2, 3)
    assert torch.equal(w, base)
    leaf = w.detach().requires_grad_()
    out = segops.ops.atrous_conv2d(x, leaf, padding=2, dilation=2)
    want = F.conv2d(x.cpu(), base.cpu(), padding=2, dilation=2)
    assert_close(out, want, F64)
    grad = torch.randn_like(want)
    (got,) = torch.autograd.grad(out, leaf, grad.to(DEVICE))
    wr = base.cpu().requires_grad_()
    (expected,) = torch.autograd.grad(F.conv2d(x.cpu(), wr, padding=2, dilation=2), wr, grad)
    assert_close(got, expected, F64, name="grad_weight")


# --------------------------------------------------------------------------
# non-contiguous arguments (every tensor, the incoming gradient included)
# --------------------------------------------------------------------------
NONCONTIG_CASES = {
    "gemm": dict(N=2, C_in=4, C_out=6, H=7, W=6, kernel=3, stride=(2, 1), padding=2,
                 dilation=2, groups=2, bias=True),
    "depthwise": dict(N=2, C_in=3, C_out=6, H=7, W=6, kernel=3, stride=1, padding=1,
                      dilation=(1, 2), groups=3, bias=True),
}


@pytest.mark.parametrize("path", sorted(NONCONTIG_CASES))
@pytest.mark.parametrize("argument", ["input", "weight", "bias", "grad"])
@pytest.mark.parametrize("kind", VIEW_KINDS)
def test_non_contiguous_arguments(path, argument, kind):
    """Each argument as a non-contiguous view gives F.conv2d's output and
    gradients (a strided bias was once read as if contiguous)."""
    case = NONCONTIG_CASES[path]
    x, w, b = make_tensors(case)
    args = conv_args(case)
    want = F.conv2d(x.cpu(), w.cpu(), b.cpu(), **args)
    grad = torch.randn_like(want)
    _, want_grads = forward_and_grads(lambda *t: F.conv2d(*t, **args),
                                      x.cpu(), w.cpu(), b.cpu(), grad)
    views = {"input": x, "weight": w, "bias": b, "grad": grad.to(DEVICE)}
    views[argument] = non_contiguous(views[argument], kind)
    assert not views[argument].is_contiguous()
    out, grads = forward_and_grads(lambda *t: segops.ops.atrous_conv2d(*t, **args),
                                   views["input"], views["weight"], views["bias"],
                                   views["grad"])
    assert_close(out, want, F64)
    for name, got, expected in zip(["input", "weight", "bias"], grads, want_grads):
        assert_close(got, expected, F64, name=f"grad_{name}")


# --------------------------------------------------------------------------
# launches: only reached residue classes, grids within CUDA's limits
# --------------------------------------------------------------------------
@pytest.mark.parametrize("stride,padding,dilation,kernel", [
    (100, 1, 1, 3),     # 9 of 10 000 residue classes reached
    (4, 0, 2, 3),       # taps land on residues 0 and 2 only (dilation shares a factor)
    (3, 0, 1, 1),       # 1x1: a single residue; the others are zero
    ((2, 3), (1, 0), (1, 3), (3, 2)),
])
def test_grad_input_launches_only_reached_residues(stride, padding, dilation, kernel):
    """A huge stride does not launch a program per residue class: the
    classes no tap reaches are filled without a kernel, and the result is
    still F.conv2d's."""
    k = kernel if isinstance(kernel, tuple) else (kernel, kernel)
    x = torch.randn(1, 4, 23, 21, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.randn(6, 4, *k, dtype=torch.float64, device=DEVICE, requires_grad=True)
    args = dict(stride=stride, padding=padding, dilation=dilation)
    out = segops.ops.atrous_conv2d(x, w, **args)
    grad = torch.randn_like(out)
    with record_launches(kernels, "_conv2d_bwd_input_kernel") as launches:
        gx, gw = torch.autograd.grad(out, (x, w), grad)
    xr, wr = x.detach().cpu().requires_grad_(), w.detach().cpu().requires_grad_()
    ex, ew = torch.autograd.grad(F.conv2d(xr, wr, **args), (xr, wr), grad.cpu())
    assert_close(gx, ex, F64, name="grad_input")
    assert_close(gw, ew, F64, name="grad_weight")
    s = stride if isinstance(stride, tuple) else (stride, stride)
    d = dilation if isinstance(dilation, tuple) else (dilation, dilation)
    candidates = [min(kk, ss // math.gcd(ss, dd)) for kk, ss, dd in zip(k, s, d)]
    tiles = launches.programs("_conv2d_bwd_input_kernel") // (candidates[0] * candidates[1])
    assert launches.names_launched() == ["_conv2d_bwd_input_kernel"]
    assert tiles * candidates[0] * candidates[1] == launches.programs("_conv2d_bwd_input_kernel")
    assert candidates[0] * candidates[1] <= k[0] * k[1]


def test_grad_input_fills_a_column_residue_only_the_left_padding_leaves_unreached():
    """Stride 3 along a 2-column input with a 1x2 kernel: with the left
    padding 1 only column 0 receives a tap (column 1's gradient is zero,
    filled without a kernel), where without padding both would: the
    unreached-residue check must read the column padding, not the rows'."""
    x = torch.randn(1, 4, 5, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.randn(6, 4, 1, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    args = dict(stride=(1, 3), padding=(0, 1))
    out = segops.ops.atrous_conv2d(x, w, **args)
    grad = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, grad)
    xr = x.detach().cpu().requires_grad_()
    (ex,) = torch.autograd.grad(F.conv2d(xr, w.detach().cpu(), **args), xr, grad.cpu())
    assert torch.equal(ex[..., 1], torch.zeros_like(ex[..., 1]))
    assert_close(gx, ex, F64, name="grad_input")


def test_grids_past_cuda_limits_are_a_clear_error():
    """65 536 groups would need 65 536 programs on grid axis 1: refused
    before any launch (the native path, F.conv2d, has no such limit)."""
    groups = 65536
    x = torch.randn(1, 2 * groups, 1, 1, device=DEVICE)
    w = torch.randn(groups, 2, 1, 1, device=DEVICE)
    with pytest.raises(_checks.ArgumentError, match="grid axis 1"):
        segops.ops.atrous_conv2d(x, w, groups=groups)


def test_huge_stride_works_and_absurd_geometry_is_refused():
    x = torch.randn(1, 3, 5, 6, dtype=torch.float64, device=DEVICE)
    w = torch.randn(2, 3, 3, 3, dtype=torch.float64, device=DEVICE)
    got = segops.ops.atrous_conv2d(x, w, stride=2**31 - 1, padding=1)
    assert_close(got, F.conv2d(x.cpu(), w.cpu(), stride=2**31 - 1, padding=1), F64)
    for kwargs, name in [(dict(stride=2**31), "stride"), (dict(dilation=(1, 2**40)), "dilation"),
                         (dict(padding=2**31), "padding"), (dict(padding=2**30 + 5), "padding")]:
        with pytest.raises(_checks.ArgumentError, match=name):
            segops.ops.atrous_conv2d(x, w, **kwargs)


# --------------------------------------------------------------------------
# arguments the peers accept, and clear errors for the others
# --------------------------------------------------------------------------
def test_numpy_ints_and_one_tuples_like_f_conv2d():
    import numpy as np
    x = torch.randn(1, 4, 9, 8, dtype=torch.float64, device=DEVICE)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64, device=DEVICE)
    args = dict(stride=np.int64(2), padding=(1,), dilation=(np.int32(2),), groups=np.int64(2))
    want = F.conv2d(x.cpu(), w.cpu(), None, 2, 1, 2, 2)
    assert_close(segops.ops.atrous_conv2d(x, w, **args), want, F64)
    module = segops.nn.AtrousConv2d(4, 6, 3, stride=np.int64(2), padding=1, dilation=2,
                                    groups=2).double().to(DEVICE)
    module.weight.data.copy_(w)
    assert_close(module(x), want + module.bias.detach().cpu().view(1, -1, 1, 1), F64)


@pytest.mark.parametrize("weight,kind", [(None, "weight must be a torch.Tensor"),
                                         ("w", "weight must be a torch.Tensor")])
def test_weight_that_is_not_a_tensor(weight, kind):
    with pytest.raises(_checks.ArgumentTypeError, match=kind):
        segops.ops.atrous_conv2d(_x(), weight)


def test_groups_must_be_an_int():
    with pytest.raises(_checks.ArgumentTypeError, match="groups"):
        segops.ops.atrous_conv2d(_x(1, 4, 6, 6), _w(6, 2, 3, 3), groups=2.0)


def _on_path(path):
    skip_off_kernel_path_on_gpu(path)
    return on_path(path)


@pytest.mark.parametrize("path", PATHS)
def test_empty_batch_and_empty_input_channels_on_every_path(path):
    """N = 0 is F.conv2d's empty output; C_in = 0 gives the bias (the
    convolution's definition; F.conv2d returns no channels there); an empty
    map with a non-empty batch is an error, as in F.conv2d."""
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    with _on_path(path):
        empty = segops.ops.atrous_conv2d(torch.randn(0, 3, 5, 5, dtype=torch.float64,
                                                     device=DEVICE), w, b, padding=1)
        assert empty.shape == (0, 4, 5, 5)
        empty.sum().backward()
        assert torch.equal(w.grad, torch.zeros_like(w))
        x0 = torch.randn(2, 0, 5, 6, dtype=torch.float64, device=DEVICE)
        out = segops.ops.atrous_conv2d(x0, torch.randn(4, 0, 3, 3, dtype=torch.float64,
                                                       device=DEVICE), b, stride=2)
        assert_close(out, b.detach().cpu().view(1, 4, 1, 1).expand(2, 4, 2, 2), F64)
        with pytest.raises(_checks.ArgumentError, match="non-zero height and width"):
            segops.ops.atrous_conv2d(torch.randn(2, 3, 0, 5, device=DEVICE), w.float(),
                                     padding=1)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("args", [dict(stride=(2, 1), padding=(1, 2), dilation=(2, 1), groups=2),
                                  dict(padding="same", dilation=(1, 2), groups=2)],
                         ids=["strided", "same-even-kernel"])
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_every_path_gives_f_conv2d(path, args):
    """The native path is F.conv2d itself (bit for bit); the others agree
    within float64 rounding, fused ReLU and its gradient included."""
    x = torch.randn(2, 4, 7, 8, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.randn(6, 2, 2, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, device=DEVICE, requires_grad=True)
    with _on_path(path):
        out = segops.ops.atrous_conv2d(x, w, b, activation="relu", **args)
        got = torch.autograd.grad(out.square().sum(), (x, w, b))
    xr, wr, br = (t.detach().cpu().requires_grad_() for t in (x, w, b))
    want = F.relu(F.conv2d(xr, wr, br, **args))
    expected = torch.autograd.grad(want.square().sum(), (xr, wr, br))
    if path == "native":
        assert torch.equal(out, want)
    assert_close(out, want, F64)
    for g, e in zip(got, expected):
        assert_close(g, e, F64, name="grad")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("x_view, w_view", VIEW_PAIRS, ids=[f"x_{x}-w_{w}" for x, w in VIEW_PAIRS])
@pytest.mark.parametrize("shape", list(LAYOUT_SHAPES.values()), ids=list(LAYOUT_SHAPES))
def test_output_and_gradient_strides_are_atens(path, shape, x_view, w_view):
    """Output, input gradient and weight gradient with ATen's exact strides:
    channels_last when either operand's strides order it so (ATen's
    suggest_memory_format: channel slices and other non-dense views count;
    one channel or 1x1 maps go by their strides), contiguous otherwise."""
    x = strided_views(x_view, shape)
    w = strided_views(w_view, (4, shape[1], 3, 3))
    # ATen's slow dilated kernel returns this dense 1x1 output with NCHW
    # strides, though the input's strides read channels_last
    artifact = shape == LAYOUT_SHAPES["one_pixel"] and x_view == "overlapping_channels"
    assert_strides_like_aten(F.conv2d, segops.ops.atrous_conv2d, x, w, path, padding=2,
                             dilation=2, ambiguous=("output",) if artifact else ())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("x_view, w_view", VIEW_PAIRS, ids=[f"x_{x}-w_{w}" for x, w in VIEW_PAIRS])
@pytest.mark.parametrize("shape", [LAYOUT_SHAPES["1x1_maps"], LAYOUT_SHAPES["one_channel"]],
                         ids=["1x1_maps", "one_channel"])
def test_pointwise_output_and_gradient_strides_are_atens(path, shape, x_view, w_view):
    """The same for a 1x1 kernel without padding (DeepLabV3's image-pooling
    branch convolves 1x1 maps): no padding to crop, so the result of each
    path is dense as computed and only its strides say the format."""
    x = strided_views(x_view, shape)
    w = strided_views(w_view, (4, shape[1], 1, 1))
    assert_strides_like_aten(F.conv2d, segops.ops.atrous_conv2d, x, w, path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("x_view, w_view", VIEW_PAIRS, ids=[f"x_{x}-w_{w}" for x, w in VIEW_PAIRS])
def test_depthwise_output_and_gradient_strides_are_atens(path, x_view, w_view):
    """The same for the depthwise kernels (one input channel per group),
    whose tiles follow the layout."""
    x = strided_views(x_view, (2, 3, 5, 6))
    w = strided_views(w_view, (6, 1, 3, 3))
    assert_strides_like_aten(F.conv2d, segops.ops.atrous_conv2d, x, w, path, padding=2,
                             dilation=2, groups=3)


@pytest.mark.parametrize("path", PATHS)
def test_channels_last_weight_gives_channels_last_output_like_aten(path):
    """model.to(memory_format=torch.channels_last) with NCHW inputs: ATen
    runs the convolution in channels_last when either operand is, so the
    output and the input gradient are channels_last (the rest of the network
    then runs channels_last). Values unchanged."""
    assert_channels_last_like_aten(torch.nn.Conv2d(4, 6, 3, padding=2, dilation=2).double(),
                                   segops.nn.AtrousConv2d(4, 6, 3, padding=2, dilation=2).double(),
                                   torch.randn(2, 4, 5, 7, dtype=torch.float64), path)


# --------------------------------------------------------------------------
# the dtypes users run, on the random geometry grid (GPU: tensor cores)
# --------------------------------------------------------------------------
GPU_GRID_DTYPES = ["bf16", "fp16", "tf32"] if ON_GPU else []


@pytest.mark.skipif(not ON_GPU, reason="bf16/fp16/TF32 tensor-core paths run on the GPU; the "
                    "interpreter covers the grid in float64 and the dtypes on fixed cases")
@pytest.mark.parametrize("dtype_name", GPU_GRID_DTYPES or ["bf16"])
@pytest.mark.parametrize("case", CASES[:14], ids=[f"case{i}" for i in range(14)])
def test_geometry_grid_in_gpu_dtypes(case, dtype_name, monkeypatch):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "tf32": torch.float32}[dtype_name]
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", dtype_name == "tf32")
    x, w, b = make_tensors(case, dtype)
    args = conv_args(case)
    cpu = [None if t is None else t.double().cpu() for t in (x, w, b)]
    want = F.conv2d(*cpu, **args)
    grad = torch.randn_like(want).to(dtype)
    out, grads = forward_and_grads(lambda *t: segops.ops.atrous_conv2d(*t, **args), x, w, b,
                                   grad.to(DEVICE))
    _, want_grads = forward_and_grads(lambda *t: F.conv2d(*t, **args), *cpu, grad.double())
    tol = TF32_RTOL if dtype_name == "tf32" else RTOL[dtype]
    assert_close(out, want, tol)
    for name, got, expected in zip(["input", "weight", "bias"], grads, want_grads):
        assert_close(got, expected, tol, name=f"grad_{name}")


# --------------------------------------------------------------------------
# tiles: the real autotuner, and fixed tiles under deterministic algorithms
# --------------------------------------------------------------------------
@pytest.mark.skipif(not ON_GPU, reason="the autotuner times configs on a GPU")
def test_real_autotuner(monkeypatch):
    monkeypatch.setattr(gemm, "AUTOTUNE", True)
    x = torch.randn(2, 64, 17, 19, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(64, 64, 3, 3, device=DEVICE, dtype=torch.bfloat16)
    x, w = x.contiguous(memory_format=torch.channels_last), w
    xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
    out = segops.ops.atrous_conv2d(xr, wr, padding=2, dilation=2)
    gx, gw = torch.autograd.grad(out, (xr, wr), torch.ones_like(out))
    x64, w64 = (t.double().requires_grad_() for t in (x, w))
    want = F.conv2d(x64, w64, padding=2, dilation=2)
    ex, ew = torch.autograd.grad(want, (x64, w64), torch.ones_like(want))
    for got, expected in ((out, want), (gx, ex), (gw, ew)):
        assert_close(got, expected, RTOL[torch.bfloat16])


def test_launch_takes_the_default_tile_under_deterministic_algorithms(monkeypatch):
    """gemm.launch's choice on a GPU with autotuning on (host logic only: a
    stand-in kernel and tuner, a CUDA device object): the tuner, except
    under torch.use_deterministic_algorithms, where the default tile runs."""
    monkeypatch.setattr(gemm, "AUTOTUNE", True)
    tuned, direct = [], []

    class Kernel:
        def __init__(self, calls):
            self.calls = calls

        def __getitem__(self, grid):
            return lambda *args, **kwargs: self.calls.append(kwargs)

    monkeypatch.setattr(gemm, "tuned", lambda kernel, key: Kernel(tuned))
    cuda = torch.device("cuda")
    gemm.launch(Kernel(direct), None, (), dict(ACC=1), None, 100, 40, 24, cuda, ("C_in",))
    assert len(tuned) == 1 and not direct
    with deterministic():
        gemm.launch(Kernel(direct), None, (), dict(ACC=1), None, 100, 40, 24, cuda, ("C_in",))
    assert len(tuned) == 1
    assert direct == [dict(ACC=1, **gemm.default_config(100, 40, 24))]


def test_deterministic_mode_fixes_tiles_and_splits(monkeypatch):
    """Under torch.use_deterministic_algorithms(True) the tile does not come
    from the tuner and the split count does not depend on the GPU's SM
    count, so two processes (or two GPUs) give the same bits."""
    monkeypatch.setattr(gemm, "AUTOTUNE", True)

    def no_tuner(*args, **kwargs):
        raise AssertionError("the autotuner ran in deterministic mode")

    monkeypatch.setattr(gemm, "tuned", no_tuner)
    x = torch.randn(2, 20, 33, 17, dtype=torch.float64, device=DEVICE)
    grad = torch.randn(2, 24, 33, 17, dtype=torch.float64, device=DEVICE)
    geometry = ([1, 1], [2, 2, 2, 2], [2, 2], 1)
    results = []
    with deterministic():
        for sms in (4, 132):
            monkeypatch.setattr(kernels, "target_programs", lambda device, sms=sms: 4 * sms)
            results.append(kernels.conv2d_grad_weight(grad, x, (24, 20, 3, 3), *geometry))
            if ON_GPU:
                kernels.conv2d_forward(x.float(), x.new_ones(24, 20, 3, 3).float(), None,
                                       *geometry)
    assert torch.equal(results[0], results[1])
    want = ref.conv2d_grad_weight(grad.cpu(), x.cpu(), (24, 20, 3, 3), *geometry)
    assert_close(results[0], want, F64)


# --------------------------------------------------------------------------
# masks: stores and reads stay inside the tensors; edge tiles, huge values
# --------------------------------------------------------------------------
def _guarded_any_layout(monkeypatch):
    """helpers.guarded_outputs for both modules whose ``empty`` the conv
    launchers call (kernels.empty, and _gemm.empty for the GEMM's
    channels_last result), into one list."""
    guards = guarded_outputs(monkeypatch, kernels)
    return guarded_outputs(monkeypatch, gemm, guards=guards)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name,groups,C_in,C_out,splits", [
    ("gemm", 1, 5, 7, 1), ("split", 2, 6, 10, 3), ("depthwise", 3, 3, 6, 1)])
def test_kernels_store_nothing_past_their_outputs(name, groups, C_in, C_out, splits, layout,
                                                  monkeypatch):
    """Pixel and channel counts that are no multiple of any tile: every
    kernel's store is masked to its pixels and channels (forward, split-K
    partials and their sum, grad_input, grad_weight partials, the NaN of
    _poison), so the guard after each output stays intact, and the results
    match F.conv2d."""
    x = like_layout(torch.randn(2, C_in, 5, 7, dtype=torch.float64, device=DEVICE), layout)
    w = torch.randn(C_out, C_in // groups, 3, 2, dtype=torch.float64, device=DEVICE)
    b = torch.randn(C_out, dtype=torch.float64, device=DEVICE)
    geometry = ([1, 2], [2, 2, 1, 1], [2, 1], groups)
    guards = _guarded_any_layout(monkeypatch)
    y = kernels.conv2d_forward(x, w, b, *geometry, relu=True, splits=splits)
    grad = torch.randn(y.shape, dtype=torch.float64, device=DEVICE)
    grad[0, C_out - 1, 0, 0] = math.inf  # a corner: NaN written into dw (_poison)
    grad = like_layout(grad, layout)
    dx = kernels.conv_transpose_gather(grad, w, None, x.shape[-2:], *geometry,
                                       memory_format_of(x))
    dw = kernels.conv2d_grad_weight(grad, x, w.shape, *geometry, splits=splits)
    assert_guards_intact(guards)
    xr, wr = (t.cpu().requires_grad_() for t in (x, w))
    want = F.relu(F.conv2d(xr, wr, b.cpu(), stride=(1, 2), padding=(2, 1), dilation=(2, 1),
                           groups=groups))
    assert_close(y, want, F64)
    want_dx, want_dw = torch.autograd.grad(
        F.conv2d(xr, wr, stride=(1, 2), padding=(2, 1), dilation=(2, 1), groups=groups),
        (xr, wr), grad.cpu())
    assert_close(dx, want_dx, F64, name="grad_input")
    assert_close(dw, want_dw, F64, name="grad_weight")


def _inside_nan(t: torch.Tensor) -> torch.Tensor:
    """t (N, C, H, W) as a channels_last view of a NaN-filled tensor with one
    more image and a channel more on each side: a read past t's pixels or
    channels gives NaN."""
    N, C, H, W = t.shape
    big = torch.full((N + 1, C + 2, H, W), math.nan, dtype=t.dtype, device=t.device)
    big = big.contiguous(memory_format=torch.channels_last)
    big[:N, 1:C + 1] = t
    view = big[:N, 1:C + 1]
    assert view.stride(1) == 1
    return view


@pytest.mark.parametrize("name,groups,C_in,C_out,splits", [
    ("gemm", 1, 5, 7, 1), ("split", 2, 6, 10, 3), ("depthwise", 3, 3, 6, 2)])
def test_kernels_read_nothing_past_their_operands(name, groups, C_in, C_out, splits):
    """Input and output gradient are views inside NaN-filled tensors, read
    in place (channels_last): a masked-off pixel or channel that is read
    anyway (and multiplied by a masked zero) gives NaN. Every kernel,
    _poison's scan of the gradient included (padding reach), matches
    F.conv2d."""
    x = torch.randn(2, C_in, 5, 7, dtype=torch.float64, device=DEVICE)
    w = torch.randn(C_out, C_in // groups, 3, 2, dtype=torch.float64, device=DEVICE)
    grad = torch.randn(2, C_out, 5, 4, dtype=torch.float64, device=DEVICE)
    geometry = ([1, 2], [2, 2, 1, 1], [2, 1], groups)
    args = dict(stride=(1, 2), padding=(2, 1), dilation=(2, 1), groups=groups)
    xv, gv = _inside_nan(x), _inside_nan(grad)
    y = kernels.conv2d_forward(xv, w, None, *geometry, splits=splits)
    dx = kernels.conv_transpose_gather(gv, w, None, x.shape[-2:], *geometry,
                                       torch.channels_last)
    dw = kernels.conv2d_grad_weight(gv, xv, w.shape, *geometry, splits=splits)
    xr, wr = (t.cpu().requires_grad_() for t in (x, w))
    want = F.conv2d(xr, wr, **args)
    assert want.shape == grad.shape
    want_dx, want_dw = torch.autograd.grad(want, (xr, wr), grad.cpu())
    assert_close(y, want, F64)
    assert_close(dx, want_dx, F64, name="grad_input")
    assert_close(dw, want_dw, F64, name="grad_weight")


@pytest.mark.parametrize("padding", [0, 1])
def test_gradients_with_strides_near_2_to_the_31(padding):
    """Stride 2^31 - 1 (the largest) along both axes with a 3x3 kernel,
    every gradient: the grad_input residue of tap 2 (2 * dil + stride - pad)
    passes 2^31, which the kernel forms in 64 bits (the fuzz suite's 1x1
    kernels reach only tap 0)."""
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, device=DEVICE)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, device=DEVICE)
    b = torch.randn(4, dtype=torch.float64, device=DEVICE)
    args = dict(stride=2**31 - 1, padding=padding)
    want = F.conv2d(x.cpu(), w.cpu(), b.cpu(), **args)
    grad = torch.randn_like(want)
    out, grads = forward_and_grads(lambda *t: segops.ops.atrous_conv2d(*t, **args), x, w, b,
                                   grad.to(DEVICE))
    _, want_grads = forward_and_grads(lambda *t: F.conv2d(*t, **args),
                                      *(t.cpu() for t in (x, w, b)), grad)
    assert_close(out, want, F64)
    for name, got, expected in zip(["input", "weight", "bias"], grads, want_grads):
        assert_close(got, expected, F64, name=f"grad_{name}")


@pytest.mark.parametrize("groups", [1, 4], ids=["gemm", "depthwise"])
def test_grad_weight_huge_finite_float64_gradient_in_the_padding_reach(groups):
    """A float64 gradient past float32's range (1e300) at pixels where taps
    read padding is finite: F.conv2d multiplies it by the padding's zero
    (0), so _poison must not take it for a non-finite value (the scan keeps
    float64 in float64)."""
    x = torch.randn(2, 4, 6, 7, dtype=torch.float64, device=DEVICE)
    w_shape = (4, 4 // groups, 3, 3)
    grad = torch.randn(2, 4, 6, 7, dtype=torch.float64, device=DEVICE)
    grad[0, 1, 0, 3] = 1e300    # the top row
    grad[1, 2, 5, 6] = -1e300   # the bottom-right corner
    geometry = ([1, 1], [1, 1, 1, 1], [1, 1], groups)
    dw = kernels.conv2d_grad_weight(grad, x, w_shape, *geometry)
    xr = x.cpu().requires_grad_()
    wr = torch.zeros(w_shape, dtype=torch.float64, requires_grad=True)
    (want,) = torch.autograd.grad(F.conv2d(xr, wr, padding=1, groups=groups), wr, grad.cpu())
    assert torch.isfinite(want).all()
    assert_close(dw, want, F64)


def test_forward_tiles_inside_an_edge_column_class():
    """A tall map (40 rows) with padding 1: the pixels of column 0 (whose
    left taps read padding) fill whole tiles (_grouped_pixels), so a tile's
    column taps start past 0 and every row of taps must restart at that
    first column tap (16-pixel tiles); the right edge likewise ends early."""
    x = torch.randn(2, 3, 40, 5, dtype=torch.float64, device=DEVICE)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, device=DEVICE)
    b = torch.randn(4, dtype=torch.float64, device=DEVICE)
    config = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=2)
    got = kernels.conv2d_forward(x, w, b, [1, 1], [1, 1, 1, 1], [1, 1], 1, config=config,
                                 splits=1)
    assert_close(got, F.conv2d(x.cpu(), w.cpu(), b.cpu(), padding=1), F64)


def test_module_repr_is_conv2ds_plus_a_fused_activation():
    """AtrousConv2d's repr is nn.Conv2d's, with ``activation='relu'``
    appended only when an activation is fused."""
    plain = torch.nn.Conv2d(2, 3, 3, padding=2, dilation=2)
    assert segops.nn.AtrousConv2d(2, 3, 3, padding=2, dilation=2).extra_repr() \
        == plain.extra_repr()
    fused = segops.nn.AtrousConv2d(2, 3, 3, padding=2, dilation=2, activation="relu")
    assert fused.extra_repr() == plain.extra_repr() + ", activation='relu'"
