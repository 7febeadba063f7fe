"""Transposed conv2d: kernels vs F.conv_transpose2d and the reference over a
randomized grid (forward and all gradients), both forward kernels (and the
one-GEMM kernel's two column orders), dtypes, output_size, edges, errors,
opcheck, compile, autocast, the module and the bilinear initialisation."""
import contextlib
import math
import random

import pytest
import torch
import torch.nn.functional as F
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
    assert_second_order_close,
    assert_strides_like_aten,
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
from segops.kernels import conv as conv_kernels
from segops.kernels import conv_transpose as kernels

F64 = RTOL[torch.float64]

STRIDES = [1, 2, 3, (2, 1)]
KERNELS = [1, 2, 3, 4, (2, 3)]
DILATIONS = [1, 2]
GROUPS = ["1", "2", "depthwise"]
LAYOUTS = ["contiguous", "channels_last", "strided"]


def random_case(seed: int) -> dict:
    rng = random.Random(seed)
    stride = rng.choice(STRIDES)
    kernel = rng.choice(KERNELS)
    dilation = rng.choice(DILATIONS)
    s = stride if isinstance(stride, tuple) else (stride, stride)
    d = (dilation, dilation)
    k = kernel if isinstance(kernel, tuple) else (kernel, kernel)
    padding = tuple(rng.randint(0, (dd * (kk - 1)) // 2) for dd, kk in zip(d, k))
    output_padding = tuple(rng.randint(0, max(ss, dd) - 1) for ss, dd in zip(s, d))
    groups = rng.choice(GROUPS)
    g = {"1": 1, "2": 2, "depthwise": 3}[groups]
    c_in = g * (1 if groups == "depthwise" else rng.choice([1, 2, 3]))
    c_out = g * rng.choice([1, 2])
    return dict(N=rng.choice([1, 2]), C_in=c_in, C_out=c_out, H=rng.choice([3, 4, 5]),
                W=rng.choice([4, 5, 7]), kernel=k, stride=stride, padding=padding,
                output_padding=output_padding, dilation=dilation, groups=g,
                bias=rng.random() < 0.6, layout=rng.choice(LAYOUTS))


def make_tensors(case, dtype=torch.float64):
    x = torch.randn(case["N"], case["C_in"], case["H"], case["W"], dtype=torch.float64)
    w = torch.randn(case["C_in"], case["C_out"] // case["groups"], *case["kernel"],
                    dtype=torch.float64)
    b = torch.randn(case["C_out"], dtype=torch.float64) if case["bias"] else None
    x = like_layout(x.to(dtype).to(DEVICE), case.get("layout", "contiguous"))
    return x, w.to(dtype).to(DEVICE), None if b is None else b.to(dtype).to(DEVICE)


def conv_args(case):
    return dict(stride=case["stride"], padding=case["padding"],
                output_padding=case["output_padding"], groups=case["groups"],
                dilation=case["dilation"])


def forward_and_grads(fn, x, w, b, grad):
    leaves = [t.detach().requires_grad_() for t in (x, w, b) if t is not None]
    out = fn(*leaves, *([None] if b is None else []))
    return out, torch.autograd.grad(out, leaves, grad)


FORWARD_KERNELS = ("_conv_transpose_k_eq_s_kernel", "_conv2d_bwd_input_kernel",
                   "_depthwise_bwd_input_kernel")


def check_against_f(case, dtype=torch.float64, rtol=F64, view=None):
    """Output and every gradient against F.conv_transpose2d; ``view``
    (argument, kind) passes that argument as a non-contiguous view. Returns
    (output, grads, names of the kernels the forward launched)."""
    x, w, b = make_tensors(case, dtype)
    args = conv_args(case)
    cpu = [None if t is None else t.double().cpu() for t in (x, w, b)]
    want = F.conv_transpose2d(*cpu, **args)
    grad = torch.randn_like(want).to(dtype).to(DEVICE)
    tensors = {"input": x, "weight": w, "bias": b, "grad": grad}
    if view is not None:
        tensors[view[0]] = non_contiguous(tensors[view[0]], view[1])
        assert not tensors[view[0]].is_contiguous()
    leaves = [t.detach().requires_grad_() for t in (tensors["input"], tensors["weight"],
                                                    tensors["bias"]) if t is not None]
    with record_launches(kernels, FORWARD_KERNELS[0]) as ours, \
            record_launches(conv_kernels, *FORWARD_KERNELS[1:]) as gathers:
        out = segops.ops.conv_transpose2d(*leaves, *([None] if b is None else []), **args)
    launched = ours.names_launched() + gathers.names_launched()
    grads = torch.autograd.grad(out, leaves, tensors["grad"])
    _, want_grads = forward_and_grads(lambda *t: F.conv_transpose2d(*t, **args), *cpu,
                                      grad.double().cpu())
    assert out.dtype == dtype
    assert_close(out, want, rtol)
    for name, got, expected in zip(["input", "weight", "bias"], grads, want_grads):
        assert got.dtype == dtype
        assert_close(got, expected, rtol, name=f"grad_{name}")
    return out, grads, launched


CASES = [random_case(seed) for seed in range(24)]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_matches_f_conv_transpose2d(case):
    out, grads, _ = check_against_f(case)
    if case["layout"] == "channels_last" and case["C_in"] > 1 and out.shape[1] > 1:
        # (one channel is contiguous in both formats, so either is right)
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert grads[0].is_contiguous(memory_format=torch.channels_last)


ONE_GEMM = dict(N=2, C_in=6, C_out=4, H=3, W=5, kernel=(2, 2), stride=2, padding=(0, 0),
                output_padding=(0, 0), dilation=1, groups=1, bias=True)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kernel,groups", [((2, 2), 1), ((3, 3), 2), ((2, 3), 1)])
def test_kernel_equals_stride_is_one_gemm(layout, kernel, groups):
    """U-Net's and Mask R-CNN's up-convolutions take the one-GEMM kernel."""
    case = dict(ONE_GEMM, kernel=kernel, stride=kernel, groups=groups, layout=layout)
    *_, launched = check_against_f(case)
    assert launched == ["_conv_transpose_k_eq_s_kernel"]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES[-3:], ids=str)
@pytest.mark.parametrize("kernel,stride,padding,output_padding",
                         [(2, 2, 0, 0), (3, 2, 1, 1)], ids=["k2s2", "k3s2p1op1"])
def test_dtypes_against_float64(dtype, kernel, stride, padding, output_padding, monkeypatch):
    """fp32 (TF32 off), fp16 and bf16 with fp32 accumulation; 21 channels as
    FCN's score layers have (the one-GEMM kernel masks its tiles' extra
    channels; the gather runs on 32 zero-padded ones)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    case = dict(ONE_GEMM, C_in=21, C_out=21, kernel=(kernel, kernel), stride=stride,
                padding=(padding, padding), output_padding=(output_padding, output_padding),
                layout="channels_last")
    check_against_f(case, dtype, RTOL[dtype])


@pytest.mark.parametrize("options", [dict(dilation=2), dict(padding=(1, 0)),
                                     dict(output_padding=(0, 1), dilation=2),
                                     dict(stride=(2, 2)), dict(stride=(1, 3))],
                         ids=["dilation", "padding", "output-padding", "stride-rows-only",
                              "stride-columns-only"])
def test_kernel_equals_stride_with_more_takes_the_gather(options):
    """kernel == stride is one GEMM only on both axes and without dilation,
    padding and output padding: otherwise output pixels receive several
    taps or none (a 2x3 kernel at stride (2, 2) or (1, 3) matches on one)."""
    case = {**ONE_GEMM, "kernel": (2, 3), "stride": (2, 3), **options}
    geometry = [case[k] if isinstance(case[k], tuple) else (case[k],) * 2
                for k in ("kernel", "stride", "padding", "output_padding", "dilation")]
    assert not kernels.is_one_gemm(*geometry)  # before a wrong launch could crash
    *_, launched = check_against_f(case)
    assert launched == ["_conv2d_bwd_input_kernel"]


# --------------------------------------------------------------------------
# the one-GEMM kernel's column orders, weight operands and masks
# --------------------------------------------------------------------------
@contextlib.contextmanager
def one_gemm_launches():
    """Records each launch of the one-GEMM kernel: its constexprs and block
    sizes, ``args`` (the tensors and sizes it got) and ``programs``."""
    real = kernels._conv_transpose_k_eq_s_kernel
    calls = []

    class Recording:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                calls.append(dict(kwargs, args=args, programs=math.prod(grid(kwargs))))
                return real[grid](*args, **kwargs)
            return launch

        def __getattr__(self, name):
            return getattr(real, name)

    kernels._conv_transpose_k_eq_s_kernel = Recording()
    try:
        yield calls
    finally:
        kernels._conv_transpose_k_eq_s_kernel = real


SMALL_TILE = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)


def run_one_gemm(x, w, b, kernel, groups, dtype=torch.float64, rtol=F64):
    """The launcher at 16x16x16 tiles (every program axis has several
    programs and a tail: 30 pixels, 20 input and 19 output channels per
    group) against F.conv_transpose2d in float64; returns the one launch."""
    with one_gemm_launches() as calls:
        out = kernels.conv_transpose2d_forward(x, w, b, kernel, (0, 0), (0, 0), (1, 1), groups,
                                               config=dict(SMALL_TILE))
    want = F.conv_transpose2d(x.double().cpu(), w.double().cpu(),
                              None if b is None else b.double().cpu(), kernel, groups=groups)
    assert out.dtype == dtype
    assert_close(out, want, rtol)
    assert len(calls) == 1
    return out, calls[0]


def one_gemm_tensors(kernel, x_layout, w_layout, dtype=torch.float64):
    groups, C_in, C_out = 2, 20, 19
    x = torch.randn(2, groups * C_in, 3, 5, dtype=dtype, device=DEVICE)
    w = torch.randn(groups * C_in, C_out, *kernel, dtype=dtype, device=DEVICE)
    b = torch.randn(groups * C_out, dtype=dtype, device=DEVICE)
    return like_layout(x, x_layout), like_layout(w, w_layout), b, groups


# (kernel, input layout, weight layout) -> (TAP_MAJOR, FLAT_WEIGHT, the weight
# the kernel reads: "as is" or "ci-contiguous" (the launcher's copy), whether the
# kernel writes the output itself or a channels_last buffer copied into it)
ORDERS = {
    ((2, 4), "channels_last", "channels_last"): (True, False, "as is", True),
    ((2, 4), "channels_last", "contiguous"): (True, False, "ci-contiguous", True),
    ((2, 4), "contiguous", "contiguous"): (False, True, "as is", True),
    # a channels_last weight makes the output channels_last (ATen's rule)
    ((2, 4), "contiguous", "channels_last"): (True, False, "as is", True),
    ((4, 1), "contiguous", "contiguous"): (False, True, "as is", True),
    # 6 taps: not a power of two, the NCHW epilogue cannot reorder the tile
    ((3, 2), "contiguous", "contiguous"): (True, False, "ci-contiguous", False),
    ((3, 2), "channels_last", "channels_last"): (True, False, "as is", True),
}


@pytest.mark.parametrize("kernel,x_layout,w_layout", list(ORDERS),
                         ids=[f"k{k[0]}x{k[1]}-{x}-w_{w}" for k, x, w in ORDERS])
def test_one_gemm_column_orders(kernel, x_layout, w_layout):
    """channels_last output: one tap per program, channels along the tile
    (vector stores); NCHW output: (co, r, c) columns reordered into output
    rows by the epilogue; the weight read as is where one of its axes makes
    the B tile contiguous, else as a ci-contiguous copy."""
    tap_major, flat, weight, in_place = ORDERS[(kernel, x_layout, w_layout)]
    x, w, b, groups = one_gemm_tensors(kernel, x_layout, w_layout)
    out, call = run_one_gemm(x, w, b, kernel, groups)
    assert out.is_contiguous(memory_format=torch.channels_last if "channels_last" in
                             (x_layout, w_layout) else torch.contiguous_format)
    assert (call["TAP_MAJOR"], call["FLAT_WEIGHT"]) == (tap_major, flat)
    assert (call["KH"], call["KW"]) == kernel
    w_arg, y_arg = call["args"][1], call["args"][3]
    if weight == "as is":
        assert w_arg.data_ptr() == w.data_ptr() and w_arg.stride() == w.stride()
    else:
        assert w_arg.stride(0) == 1
    assert (y_arg.data_ptr() == out.data_ptr()) == in_place
    tiles_m, taps = 2, kernel[0] * kernel[1]
    columns = 2 if tap_major else math.ceil(19 * taps / 16)  # N tiles per tap / in all
    assert call["programs"] == tiles_m * (taps if tap_major else 1) * columns * groups


@pytest.mark.parametrize("mode", ["tap-major", "flat"])
def test_one_gemm_reads_only_its_channels(mode):
    """Input and weight are channel slices of NaN-filled tensors, read in
    place: a tile that reads past its group's input channels (a missing K
    mask) or stores past its pixels or channels (a missing store mask) gives
    NaN or overwrites results."""
    kernel, groups, C_in, C_out = (2, 4), 2, 20, 19
    x = torch.randn(2, groups * C_in, 3, 5, dtype=torch.float64, device=DEVICE)
    w = torch.randn(groups * C_in, C_out, *kernel, dtype=torch.float64, device=DEVICE)
    b = torch.randn(groups * C_out, dtype=torch.float64, device=DEVICE)
    big_w = torch.full((groups * C_in + 6, C_out + 6, *kernel), float("nan"),
                       dtype=torch.float64, device=DEVICE)
    if mode == "tap-major":  # channels_last input and weight
        big_w = big_w.contiguous(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        big_w[3:-3, 3:-3] = w
        w = big_w[3:-3, 3:-3]
    else:  # a flat weight, and a channel slice of an input whose channels are
        # contiguous but whose columns are outside its rows: NCHW by ATen's
        # stride order (an NCHW output), its channels read in place
        big_x = torch.full((2, 5, 3, groups * C_in + 6), float("nan"), dtype=torch.float64,
                           device=DEVICE).permute(0, 3, 2, 1)
        big_x[:, 3:-3] = x
        x = big_x[:, 3:-3]
        big_w[3:-3, :C_out] = w
        w = big_w[3:-3, :C_out]
    _, call = run_one_gemm(x, w, b, kernel, groups)
    assert call["TAP_MAJOR"] == (mode == "tap-major")
    assert call["args"][0].data_ptr() == x.data_ptr()
    assert call["args"][1].data_ptr() == w.data_ptr()


@pytest.mark.parametrize("dtype", KERNEL_DTYPES[-3:], ids=str)
@pytest.mark.parametrize("x_layout", ["contiguous", "channels_last"])
def test_one_gemm_column_orders_in_kernel_dtypes(dtype, x_layout, monkeypatch):
    """Both column orders in fp32 (TF32 off), fp16 and bf16, and TF32 (a
    ci-contiguous weight, whatever the layout)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    x, w, b, groups = one_gemm_tensors((2, 2), x_layout, "contiguous", dtype)
    _, call = run_one_gemm(x, w, b, (2, 2), groups, dtype, RTOL[dtype])
    assert call["TAP_MAJOR"] == (x_layout == "channels_last")
    if dtype == torch.float32:
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
        _, call = run_one_gemm(x, w, b, (2, 2), groups, dtype, 3e-3)
        assert call["ALLOW_TF32"] and call["args"][1].stride(0) == 1


def test_fcn_upscore_k16_s8():
    case = dict(ONE_GEMM, C_in=3, C_out=3, H=2, W=3, kernel=(16, 16), stride=8, padding=(4, 4))
    check_against_f(case)


@pytest.mark.parametrize("channels", [(21, 21), (21, 40), (40, 19)])
def test_fcn_upscore_with_unaligned_channels_runs_zero_padded(channels, monkeypatch):
    """FCN-8s's upscore2 (k4 s2) with VOC's 21 classes: the gather (the
    forward), the conv forward (grad_input) and grad_weight run on copies
    zero-padded to multiples of 16 channels (conv.padded_channels); every
    result, the bias's included, matches F.conv_transpose2d."""
    C_in, C_out = channels
    launches = record_gemm_launches(monkeypatch, conv_kernels)
    case = dict(ONE_GEMM, C_in=C_in, C_out=C_out, H=3, W=4, kernel=(4, 4), stride=2,
                padding=(1, 1), bias=True, layout="channels_last")
    check_against_f(case)
    # conv_transpose(x, w) is conv2d's input gradient: its C_in is our C_out
    padded = (conv_kernels.padded_channels(C_out), conv_kernels.padded_channels(C_in))
    for name in ("_conv2d_bwd_input_kernel", "_conv2d_fwd_kernel", "_conv2d_bwd_weight_kernel"):
        (launch,) = launches[name]
        assert (launch["C_in"], launch["C_out"]) == padded, name


def test_output_size_argument():
    plain = torch.nn.ConvTranspose2d(4, 3, 3, stride=3, padding=1).double()
    ours = segops.nn.ConvTranspose2d(4, 3, 3, stride=3, padding=1).double()
    ours.load_state_dict(plain.state_dict())
    plain, ours = plain.to(DEVICE), ours.to(DEVICE)
    x = torch.randn(1, 4, 3, 4, dtype=torch.float64, device=DEVICE)
    for size in ([7, 10], [8, 11], [9, 12]):
        out = ours(x, output_size=size)
        assert tuple(out.shape[-2:]) == tuple(size)
        assert_close(out, plain(x, output_size=size), F64)
    with pytest.raises(ValueError, match="output"):
        ours(x, output_size=[12, 12])
    # with the leading sizes, unbatched, and the wrong number of sizes: as nn.ConvTranspose2d
    assert_close(ours(x, output_size=[1, 3, 8, 11]), plain(x, output_size=[1, 3, 8, 11]), F64)
    assert_close(ours(x[0], output_size=[3, 9, 10]), plain(x[0], output_size=[3, 9, 10]), F64)
    for bad in ([3, 8, 11], [8]):
        with pytest.raises(ValueError, match=r"output_size must have 2 or 4 elements") as ours_error:
            ours(x, output_size=bad)
        with pytest.raises(ValueError) as torch_error:
            plain(x, output_size=bad)
        assert str(ours_error.value) == str(torch_error.value)
    with pytest.raises(ValueError,
                       match=r"valid sizes range from \[7, 10\] to \[9, 12\]") as ours_error:
        ours(x, output_size=[6, 10])
    with pytest.raises(ValueError) as torch_error:
        plain(x, output_size=[6, 10])
    assert str(ours_error.value) == str(torch_error.value)
    for sizes in (torch.tensor([8, 11]), [torch.tensor(8), torch.tensor(11)]):
        assert_close(ours(x, output_size=sizes), plain(x, output_size=sizes), F64)


def test_module_loads_state_dict_and_shares_parameters():
    plain = torch.nn.ConvTranspose2d(4, 6, (2, 3), stride=(2, 1), padding=(0, 1), groups=2,
                                     dilation=(1, 2)).double().to(DEVICE)
    ours = segops.nn.ConvTranspose2d(4, 6, (2, 3), stride=(2, 1), padding=(0, 1), groups=2,
                                     dilation=(1, 2)).double().to(DEVICE)
    ours.load_state_dict(plain.state_dict())
    assert ours.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, device=DEVICE)
    assert_close(ours(x), plain(x), F64)
    shared = segops.nn.ConvTranspose2d.from_conv_transpose(plain)
    assert shared.weight is plain.weight
    assert_close(shared(x), plain(x), F64)


def test_bilinear_upsampling_init():
    """A k4 s2 p1 layer initialised bilinear reproduces F.interpolate's
    bilinear (align_corners=False) up-sampling away from the border."""
    up = segops.nn.ConvTranspose2d(3, 3, 4, stride=2, padding=1, bias=False).double()
    segops.nn.init.bilinear_upsampling_(up.weight)
    x = torch.randn(1, 3, 6, 7, dtype=torch.float64)
    got = up.to(DEVICE)(x.to(DEVICE))
    want = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    assert_close(got[..., 1:-1, 1:-1], want[..., 1:-1, 1:-1], F64)
    assert torch.equal(up.weight[0, 1], torch.zeros(4, 4, dtype=torch.float64, device=DEVICE))
    depthwise = torch.empty(5, 1, 3, 3)
    segops.nn.init.bilinear_upsampling_(depthwise)
    assert torch.allclose(depthwise[4, 0], segops.nn.init.bilinear_kernel(3))
    assert segops.nn.init.bilinear_kernel(3)[1, 1] == 1.0


@pytest.mark.parametrize("c_in, c_out, groups, want", [
    (4, 4, 2, [1.0, 1.0, 1.0, 1.0]),     # each output channel from its own input channel
    (3, 1, 1, [1.0]),                    # channel 0 only, not the sum of the 3
    (3, 3, 3, [1.0, 1.0, 1.0]),          # depthwise
    (2, 4, 2, [1.0, 0.0, 0.0, 0.0]),     # output 1 lies in group 0: no input channel 1 there
])
def test_bilinear_upsampling_init_follows_groups(c_in, c_out, groups, want):
    """Input channel i to output channel i within the layer's groups: a
    constant input gives 1 at every interior output pixel of channel i."""
    up = torch.nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, groups=groups,
                                  bias=False).double()
    segops.nn.init.bilinear_upsampling_(up.weight, up.groups)
    got = up(torch.ones(1, c_in, 3, 3, dtype=torch.float64))[0, :, 2, 2]
    assert got.tolist() == want
    with pytest.raises(ValueError, match="groups"):
        segops.nn.init.bilinear_upsampling_(up.weight, 2 if c_in % 2 else 3)


def test_empty_batch_and_unbatched_input():
    x, w, b = make_tensors(ONE_GEMM)
    assert segops.ops.conv_transpose2d(x[:0], w, b, 2).shape == (0, 4, 6, 10)
    single = segops.ops.conv_transpose2d(x[0], w, b, 2)
    assert_close(single, F.conv_transpose2d(x[0].cpu(), w.cpu(), b.cpu(), 2), F64)


def test_kernel_path_gradcheck():
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.randn(2, 3, 3, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *t: segops.ops.conv_transpose2d(*t, stride=2, padding=1, output_padding=1),
        (x, w, b))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("options", [
    dict(stride=2, padding=1, output_padding=1, dilation=1, groups=1),
    # output_padding 2 >= stride: the last rows and columns reach no input
    dict(stride=(2, 1), padding=(1, 0), output_padding=(2, 1), dilation=3, groups=2),
], ids=["fcn", "output-padding-past-stride"])
def test_double_backward_matches_f_conv_transpose2d(layout, options):
    """A gradient penalty's double backward against F.conv_transpose2d's in
    float64 (the second-order gradients of input and weight, and of the
    output gradient when it is a leaf, not a constant)."""
    groups = options["groups"]
    x = like_layout(torch.randn(2, 4, 4, 5, dtype=torch.float64), layout)
    w = torch.randn(4, 4 // groups, 3, 2, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64)
    dy = torch.randn(F.conv_transpose2d(x, w, **options).shape, dtype=torch.float64)
    probes = [torch.randn_like(t) for t in (x, w, b)]
    got = assert_second_order_close(lambda *t: segops.ops.conv_transpose2d(*t, **options),
                                    lambda *t: F.conv_transpose2d(*t, **options), (x, w, b),
                                    dy, probes, F64, ("input", "weight", "bias"))
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert got[1][0].is_contiguous(memory_format=fmt)   # the input's layout


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_double_backward_half_precision_views(dtype):
    """The double backward in fp16/bf16 with the input, weight, bias and
    output gradient all non-contiguous views: against F.conv_transpose2d's
    in float64 of the same rounded values."""
    options = dict(stride=2, padding=1, output_padding=1, dilation=1, groups=2)

    def rounded(*shape):
        return torch.randn(*shape).to(dtype).double()

    x, w, b = rounded(2, 4, 4, 5), rounded(4, 2, 3, 2), rounded(4)
    dy = rounded(*F.conv_transpose2d(x, w, **options).shape)
    probes = [rounded(*t.shape) for t in (x, w, b)]
    assert_second_order_close(lambda *t: segops.ops.conv_transpose2d(*t, **options),
                              lambda *t: F.conv_transpose2d(*t, **options), (x, w, b), dy,
                              probes, RTOL[dtype], ("input", "weight", "bias"), dtype=dtype,
                              view=lambda t: like_layout(t, "strided"))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_input_gradient_is_dense_in_the_input_layout(layout):
    """output_padding >= stride: the convolution giving the input gradient
    has extra rows and columns, cropped; the gradient is still dense in the
    input's memory format (it was a strided slice of neither)."""
    x = like_layout(torch.randn(1, 4, 3, 3, dtype=torch.float64), layout).to(DEVICE)
    w = torch.randn(4, 4, 2, 3, dtype=torch.float64, device=DEVICE)
    options = dict(stride=(1, 1), output_padding=(1, 2), dilation=(2, 3))
    leaf = x.detach().requires_grad_()
    out = segops.ops.conv_transpose2d(leaf, w, **options)
    (grad,) = torch.autograd.grad(out, leaf, torch.ones_like(out))
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert grad.is_contiguous(memory_format=fmt)
    plain = x.detach().cpu().requires_grad_()
    (want,) = torch.autograd.grad(F.conv_transpose2d(plain, w.cpu(), **options).sum(), plain)
    assert_close(grad, want, F64)


def _plain_conv_transpose2d(x, w, stride, padding, output_padding, dilation):
    """F.conv_transpose2d (groups 1) from differentiable aten ops: each tap's
    product scattered at stride into the (output-padded) map, then cropped.
    Unlike F.conv_transpose2d it can be differentiated a third time with
    output_padding (ATen's double backward there is a convolution, which has
    no output_padding)."""
    N, _, H, W = x.shape
    (sh, sw), (ph, pw), (oh, ow), (dh, dw) = stride, padding, output_padding, dilation
    KH, KW = w.shape[-2:]
    full_h, full_w = (H - 1) * sh + dh * (KH - 1) + 1 + oh, (W - 1) * sw + dw * (KW - 1) + 1 + ow
    out = x.new_zeros(N, w.shape[1], full_h, full_w)
    for r in range(KH):
        for c in range(KW):
            tap = torch.einsum("nihw,io->nohw", x, w[:, :, r, c])
            spread = x.new_zeros(N, w.shape[1], (H - 1) * sh + 1, (W - 1) * sw + 1)
            spread[..., ::sh, ::sw] = tap
            out = out + F.pad(spread, (c * dw, full_w - c * dw - spread.shape[-1],
                                       r * dh, full_h - r * dh - spread.shape[-2]))
    return out[..., ph:full_h - ph, pw:full_w - pw]


@pytest.mark.parametrize("options", [
    dict(stride=(1, 1), padding=(0, 0), output_padding=(1, 2), dilation=(2, 3)),
    dict(stride=(2, 2), padding=(1, 1), output_padding=(1, 1), dilation=(1, 1)),
], ids=["output-padding-past-stride", "fcn"])
def test_third_order_gradients(options):
    """A third derivative (the gradient of a penalty on a penalty's
    gradients), where the output gradient's crop matters in both gradient
    ops, against the plain-op transposed conv."""
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    w = torch.randn(2, 2, 2, 3, dtype=torch.float64)
    dy = torch.randn(_plain_conv_transpose2d(x, w, **options).shape, dtype=torch.float64)
    probes = [torch.randn_like(t) for t in (x, w, x, w, dy)]

    def third(fn, device):
        leaves = [t.to(device).requires_grad_() for t in (x, w)]
        grad_out = dy.to(device).requires_grad_()
        first = torch.autograd.grad(fn(*leaves), leaves, grad_out, create_graph=True)
        penalty = sum((g * p.to(device)).sum() for g, p in zip(first, probes))
        second = torch.autograd.grad(penalty, [*leaves, grad_out], create_graph=True)
        penalty = sum((g * p.to(device)).sum() for g, p in zip(second, probes[2:]))
        return torch.autograd.grad(penalty, [*leaves, grad_out], allow_unused=True,
                                   materialize_grads=True)

    got = third(lambda *t: segops.ops.conv_transpose2d(*t, **options), DEVICE)
    want = third(lambda *t: _plain_conv_transpose2d(*t, **options), "cpu")
    for name, g, e in zip(("input", "weight", "grad_out"), got, want):
        assert_close(g, e, F64, name=name)


@pytest.mark.parametrize("x_view, w_view", [("contiguous", "contiguous"),
                                            ("cl_channel_slice", "contiguous"),
                                            ("contiguous", "channels_last")])
@pytest.mark.parametrize("shape", [(2, 4, 3, 4), (2, 4, 1, 1)], ids=["maps", "1x1_maps"])
def test_opcheck(shape, x_view, w_view):
    """The fake kernel promises the real output's strides (ATen's rule)."""
    x = strided_views(x_view, shape)[1].requires_grad_()
    w = strided_views(w_view, (4, 3, 3, 3))[1].requires_grad_()
    b = torch.randn(6, dtype=torch.float64, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.segops.conv_transpose2d.default,
                          (x, w, b, [2, 1], [1, 0], [1, 0], [1, 2], 2))


def test_compile_fullgraph_through_module():
    up = segops.nn.ConvTranspose2d(4, 3, 2, stride=2).to(DEVICE, torch.float64)
    x = torch.randn(2, 4, 3, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    backend = "inductor" if ON_GPU else "aot_eager"
    compiled = torch.compile(up, fullgraph=True, backend=backend)
    out = compiled(x)
    grads = torch.autograd.grad(out.sum(), (x, up.weight, up.bias))
    want = F.conv_transpose2d(x, up.weight, up.bias, 2)
    want_grads = torch.autograd.grad(want.sum(), (x, up.weight, up.bias))
    assert_close(out, want, F64)
    for got, expected in zip(grads, want_grads):
        assert_close(got, expected, F64, name="grad")


def test_autocast_like_aten():
    half = torch.float16 if ON_GPU else torch.bfloat16
    x = torch.randn(1, 3, 4, 4, device=DEVICE)
    w = torch.randn(3, 2, 2, 2, device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=half):
        out = segops.ops.conv_transpose2d(x, w, stride=2)
        want = F.conv_transpose2d(x, w, stride=2)
    assert out.dtype == want.dtype == half
    exact = F.conv_transpose2d(x.to(half).double(), w.to(half).double(), stride=2)
    assert_close(out, exact, RTOL[half])


BAD_CALLS = [
    ("output_padding .* must be smaller", dict(stride=2, output_padding=2)),
    ("expects 4 input channels", dict(x_channels=5)),
    ("groups=3 must divide", dict(groups=3)),
    ("stride must be positive", dict(stride=0)),
    ("padding must be non-negative", dict(padding=-1)),
    ("output size .* too small", dict(padding=4)),
    ("bias must have shape \\(3,\\)", dict(bias=5)),
    ("no output channels along dim 1", dict(w_out_channels=0)),
]


@pytest.mark.parametrize("match,options", BAD_CALLS, ids=[m for m, _ in BAD_CALLS])
def test_bad_input_errors(match, options):
    options = dict(options)
    x = torch.randn(1, options.pop("x_channels", 4), 3, 3, device=DEVICE)
    w = torch.randn(4, options.pop("w_out_channels", 3), 3, 3, device=DEVICE)
    bias = options.pop("bias", None)
    bias = None if bias is None else torch.zeros(bias, device=DEVICE)
    groups = options.get("groups", 1)
    if groups == 3:
        options["groups"] = 3
    with pytest.raises(RuntimeError, match=match):
        segops.ops.conv_transpose2d(x, w, bias, **options)


@pytest.mark.parametrize("case", CASES[:4], ids=[f"case{i}" for i in range(4)])
def test_reference_path_matches_f_conv_transpose2d(case):
    """The CPU reference path (forward, and the backward through the
    convolution ops' reference)."""
    from segops import _dispatch
    if ON_GPU:
        pytest.skip("the reference path serves CPU tensors")
    with _dispatch.reference_only():
        check_against_f(case)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("kernel,stride,padding", [(2, 2, 0), (4, 2, 1)])
def test_depthwise_takes_the_direct_kernel(layout, kernel, stride, padding):
    """groups == C_in with one output channel per group: the direct depthwise
    gather, for the k == stride case too."""
    case = dict(N=2, C_in=5, C_out=5, H=4, W=3, kernel=(kernel, kernel), stride=stride,
                padding=(padding, padding), output_padding=(0, 0), dilation=1, groups=5,
                bias=True, layout=layout)
    *_, launched = check_against_f(case)
    assert launched == ["_depthwise_bwd_input_kernel"]


@pytest.mark.parametrize("C_in", [2, 4], ids=["depthwise", "two-inputs-per-group"])
def test_two_groups_of_one_output_channel_take_the_direct_kernel(C_in):
    """groups == 2, the fewest groups, with one output channel per group and
    kernel == stride: the direct depthwise gather too, not the one-GEMM
    kernel."""
    case = dict(ONE_GEMM, C_in=C_in, C_out=2, H=4, W=3, groups=2, layout="contiguous")
    *_, launched = check_against_f(case)
    assert launched == ["_depthwise_bwd_input_kernel"]


def test_general_case_takes_the_residue_gather():
    *_, launched = check_against_f(dict(ONE_GEMM, kernel=(3, 3), stride=2, padding=(1, 1),
                                        output_padding=(1, 1)))
    assert launched == ["_conv2d_bwd_input_kernel"]


# --------------------------------------------------------------------------
# non-contiguous arguments (every tensor, the incoming gradient included)
# --------------------------------------------------------------------------
NONCONTIG_CASES = {
    "one-gemm": dict(ONE_GEMM, groups=2, C_in=6, C_out=4),
    "gather": dict(ONE_GEMM, kernel=(3, 3), stride=2, padding=(1, 1), output_padding=(1, 0)),
    "depthwise": dict(ONE_GEMM, C_in=3, C_out=6, groups=3, kernel=(3, 2), stride=(2, 1),
                      padding=(1, 0), dilation=2),
}


@pytest.mark.parametrize("path", sorted(NONCONTIG_CASES))
@pytest.mark.parametrize("argument", ["input", "weight", "bias", "grad"])
@pytest.mark.parametrize("kind", VIEW_KINDS)
def test_non_contiguous_arguments(path, argument, kind):
    check_against_f(NONCONTIG_CASES[path], view=(argument, kind))


# --------------------------------------------------------------------------
# every path: kernel, native (F.conv_transpose2d itself), reference
# --------------------------------------------------------------------------
def _on_path(path):
    skip_off_kernel_path_on_gpu(path)
    return on_path(path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("options", [
    dict(stride=2, padding=1, output_padding=2, dilation=3),        # output_padding >= stride
    dict(stride=(3, 2), padding=(0, 1), output_padding=(1, 0), groups=2),
    dict(stride=7),                                                   # residues no tap reaches
], ids=["output-padding-past-stride", "groups", "stride-past-kernel"])
def test_every_path_gives_f_conv_transpose2d(path, options):
    x = torch.randn(2, 4, 4, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.randn(4, 3, 3, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    b = torch.randn(3 * options.get("groups", 1), dtype=torch.float64, device=DEVICE,
                    requires_grad=True)
    with _on_path(path):
        out = segops.ops.conv_transpose2d(x, w, b, **options)
        got = torch.autograd.grad(out.square().sum(), (x, w, b))
    xr, wr, br = (t.detach().cpu().requires_grad_() for t in (x, w, b))
    want = F.conv_transpose2d(xr, wr, br, **options)
    expected = torch.autograd.grad(want.square().sum(), (xr, wr, br))
    if path == "native":
        assert torch.equal(out, want)
    assert_close(out, want, F64)
    for g, e in zip(got, expected):
        assert_close(g, e, F64, name="grad")


@pytest.mark.parametrize("path", PATHS)
def test_channels_last_weight_gives_channels_last_output_like_aten(path):
    """A channels_last model on NCHW inputs: channels_last output and input
    gradient, as ATen gives when either operand is channels_last."""
    options = dict(stride=2, padding=1)
    assert_channels_last_like_aten(torch.nn.ConvTranspose2d(4, 6, 3, **options).double(),
                                   segops.nn.ConvTranspose2d(4, 6, 3, **options).double(),
                                   torch.randn(2, 4, 4, 5, dtype=torch.float64), path,
                                   output_size=[8, 10])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("x_view, w_view", VIEW_PAIRS, ids=[f"x_{x}-w_{w}" for x, w in VIEW_PAIRS])
@pytest.mark.parametrize("shape", list(LAYOUT_SHAPES.values()), ids=list(LAYOUT_SHAPES))
def test_output_and_gradient_strides_are_atens(path, shape, x_view, w_view):
    """ATen's exact strides for the output and both gradients (see the
    convolution's test): the weight (C_in, C_out, KH, KW) counts as the
    convolution's does, by its own strides."""
    x = strided_views(x_view, shape)
    w = strided_views(w_view, (shape[1], 4, 3, 3))
    assert_strides_like_aten(F.conv_transpose2d, segops.ops.conv_transpose2d, x, w, path,
                             stride=2, padding=1, output_padding=1)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("x_view, w_view", VIEW_PAIRS, ids=[f"x_{x}-w_{w}" for x, w in VIEW_PAIRS])
@pytest.mark.parametrize("shape", [LAYOUT_SHAPES["1x1_maps"], LAYOUT_SHAPES["one_channel"]],
                         ids=["1x1_maps", "one_channel"])
def test_pointwise_output_and_gradient_strides_are_atens(path, shape, x_view, w_view):
    """The same for a 1x1 kernel, stride 1, no padding: each path's result
    is dense as computed, and only its strides say the format."""
    x = strided_views(x_view, shape)
    w = strided_views(w_view, (shape[1], 4, 1, 1))
    assert_strides_like_aten(F.conv_transpose2d, segops.ops.conv_transpose2d, x, w, path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("x_view, w_view", VIEW_PAIRS, ids=[f"x_{x}-w_{w}" for x, w in VIEW_PAIRS])
@pytest.mark.parametrize("kernel", [3, 2], ids=["gather", "one_gemm"])
def test_depthwise_and_one_gemm_strides_are_atens(path, x_view, w_view, kernel):
    """The same for the depthwise gather (one output channel per group) and
    the kernel == stride GEMM, whose tiles and column orders follow the
    layout."""
    x = strided_views(x_view, (2, 3, 4, 5))
    w = strided_views(w_view, (3, 1 if kernel == 3 else 4, kernel, kernel))
    assert_strides_like_aten(F.conv_transpose2d, segops.ops.conv_transpose2d, x, w, path,
                             stride=2, groups=3 if kernel == 3 else 1)

@pytest.mark.parametrize("path", PATHS)
def test_empty_batch_on_every_path(path):
    w = torch.randn(3, 4, 3, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    with _on_path(path):
        out = segops.ops.conv_transpose2d(torch.randn(0, 3, 5, 5, dtype=torch.float64,
                                                      device=DEVICE), w, stride=2)
        assert out.shape == (0, 4, 11, 11)
        out.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape, k, options", [
    ((0, 2, 0, 3), 2, dict(stride=2)), ((0, 2, 3, 0), 1, {}), ((0, 2, 0, 0), 1, {}),
    ((0, 2, 1, 1), 2, dict(padding=1)), ((0, 2, 0, 3), 3, dict(padding=1)),
])
def test_empty_batch_with_an_empty_output_size(path, shape, k, options):
    """An empty batch whose output has 0 rows or columns (an empty input
    map, or padding that takes every row): F.conv_transpose2d's empty
    output and zero weight gradient, where a batch of 1 is refused; a
    negative output size is refused either way."""
    x = torch.zeros(shape, dtype=torch.float64, device=DEVICE)
    w = torch.randn(2, 3, k, k, dtype=torch.float64, device=DEVICE, requires_grad=True)
    want = F.conv_transpose2d(x.cpu(), w.detach().cpu(), **options)
    with _on_path(path):
        out = segops.ops.conv_transpose2d(x, w, **options)
        (grad,) = torch.autograd.grad(out.sum(), w)
        with pytest.raises(segops.ArgumentError, match="output size|height and width"):
            segops.ops.conv_transpose2d(torch.zeros(1, *shape[1:], dtype=torch.float64,
                                                    device=DEVICE), w, **options)
    assert out.shape == want.shape and torch.equal(grad, torch.zeros_like(w))
    with pytest.raises(segops.ArgumentError, match="output size"):
        segops.ops.conv_transpose2d(torch.zeros(0, 2, 0, 3, dtype=torch.float64, device=DEVICE),
                                    torch.zeros(2, 3, 1, 1, dtype=torch.float64, device=DEVICE),
                                    stride=2)


def test_huge_stride_launches_only_reached_residues():
    """Stride 300 with a 2x3 kernel: 6 residue classes of 90 000 get a
    program; the rest are the bias, filled without a kernel."""
    x = torch.randn(1, 2, 2, 2, dtype=torch.float64, device=DEVICE)
    w = torch.randn(2, 3, 2, 3, dtype=torch.float64, device=DEVICE)
    b = torch.randn(3, dtype=torch.float64, device=DEVICE)
    with record_launches(conv_kernels, "_conv2d_bwd_input_kernel") as launches:
        out = segops.ops.conv_transpose2d(x, w, b, stride=300, padding=1)
    assert_close(out, F.conv_transpose2d(x.cpu(), w.cpu(), b.cpu(), stride=300, padding=1), F64)
    assert launches.programs("_conv2d_bwd_input_kernel") <= 6 * 4


def test_weight_that_is_not_a_tensor():
    with pytest.raises(_checks.ArgumentTypeError, match="weight must be a torch.Tensor"):
        segops.ops.conv_transpose2d(torch.randn(1, 3, 4, 4, device=DEVICE), None)


@pytest.mark.skipif(not ON_GPU, reason="bf16/fp16/TF32 tensor-core paths run on the GPU; the "
                    "interpreter covers the grid in float64 and the dtypes on fixed cases")
@pytest.mark.parametrize("dtype_name", ["bf16", "fp16", "tf32"])
@pytest.mark.parametrize("case", CASES[:12], ids=[f"case{i}" for i in range(12)])
def test_geometry_grid_in_gpu_dtypes(case, dtype_name, monkeypatch):
    """The random geometry grid in the dtypes users run (tensor cores)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "tf32": torch.float32}[dtype_name]
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", dtype_name == "tf32")
    check_against_f(case, dtype, 3e-3 if dtype_name == "tf32" else RTOL[dtype])


def test_module_refuses_a_padding_mode_set_after_construction_like_torch():
    """A padding_mode other than 'zeros' set after construction: forward
    raises ValueError, as nn.ConvTranspose2d's does, rather than ignoring it."""
    plain = torch.nn.ConvTranspose2d(2, 2, 2, stride=2)
    ours = segops.nn.ConvTranspose2d(2, 2, 2, stride=2)
    x = torch.randn(1, 2, 3, 3)
    for module in (plain, ours):
        module.padding_mode = "reflect"
        with pytest.raises(ValueError, match="padding_mode|padding mode"):
            module(x)
        with pytest.raises(ValueError, match="padding_mode|padding mode"):
            module(x, output_size=[6, 6])


def test_output_size_range_follows_each_axis_stride():
    """Stride (2, 3): each axis takes sizes up to its own smallest + stride - 1
    (H 9..10, W 15..17 here), as nn.ConvTranspose2d; one past raises."""
    plain = torch.nn.ConvTranspose2d(2, 2, 3, stride=(2, 3)).double()
    ours = segops.nn.ConvTranspose2d(2, 2, 3, stride=(2, 3)).double()
    ours.load_state_dict(plain.state_dict())
    x = torch.randn(1, 2, 4, 5, dtype=torch.float64)
    for size in ([9, 17], [10, 15], [10, 17]):
        assert_close(ours.to(DEVICE)(x.to(DEVICE), output_size=size), plain(x, output_size=size),
                     F64)
    for size in ([11, 15], [9, 18], [8, 15], [9, 14]):
        with pytest.raises(ValueError):
            plain(x, output_size=size)
        with pytest.raises(ValueError, match="valid sizes range"):
            ours(x.to(DEVICE), output_size=size)
