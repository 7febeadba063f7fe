"""Fuzz: segops.ops.atrous_conv2d and segops.nn.AtrousConv2d against F.conv2d
/ nn.Conv2d in float64 (issue 16, "A fuzz suite in the project").

Each example draws a call: shapes (empty batch and C_in = 0 included),
stride (huge ones too), padding (ints, pairs, 'same', 'valid'), dilation,
groups, bias, fused ReLU, dtype, a memory format or non-contiguous view of
every tensor argument and of the incoming gradient, special values in the
input (NaN, ±inf, huge, tiny, zeros), and the spellings the peer accepts
(numpy ints, 1-tuples, lists). It runs on the kernel path (the interpreter
on CPU) and on the native and reference paths, forward and backward, and
must give F.conv2d's result (computed in float64 from the same rounded
values) within the dtype's tolerance, or a segops error naming the
argument. Documented difference: C_in = 0 gives the bias (F.conv2d returns
no channels). A second property mutates one argument of a valid call into
a bad one and expects a segops error naming it.

``SEGOPS_FUZZ_EXAMPLES=N`` runs N examples per test instead of the CI
default (see tests/fuzz/strategies.py)::

    SEGOPS_FUZZ_EXAMPLES=300 python -m pytest -q -p no:xdist tests/fuzz/test_conv.py
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fuzz.strategies import (
    call_peer,
    call_segops,
    check_segops_error,
    float_dtypes,
    fuzz_settings,
    on_path,
    pair_spellings,
    paths_for,
    random_tensor,
    seeds,
    specials,
    spelled,
    tolerance,
    vector_views,
    views,
    as_view,
)
from helpers import DEVICE, assert_close
from hypothesis import event, given
from hypothesis import strategies as st

import segops

CONV_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups", "output",
              "kernel", "channels")


# --------------------------------------------------------------------------
# strategies
# --------------------------------------------------------------------------
def pairs(low, high):
    return st.tuples(st.integers(low, high), st.integers(low, high))


@st.composite
def conv_calls(draw):
    """A call of atrous_conv2d that F.conv2d may or may not accept."""
    groups = draw(st.integers(1, 3))
    # 0: no input channels; 17 and 18: above 16 and unaligned, so an ungrouped
    # call runs on channels zero-padded to 32 (kernels/conv.py padded_channels)
    c_in = groups * draw(st.sampled_from([1, 2, 0, 17]))
    c_out = groups * draw(st.sampled_from([1, 2, 18]))
    n = draw(st.sampled_from([1, 2, 0]))
    call = dict(
        N=n, C_in=c_in, C_out=c_out, H=draw(st.integers(1, 6)), W=draw(st.integers(1, 6)),
        kernel=draw(pairs(1, 3)), groups=groups,
        # huge strides too, up to the largest the kernels take (2**31 - 1)
        stride=draw(st.one_of(pairs(1, 3), st.sampled_from([(7, 7), (100, 100),
                                                              (2**31 - 16, 1), (1, 2**31 - 1)]))),
        dilation=draw(pairs(1, 3)),
        padding=draw(st.one_of(pairs(0, 2), st.sampled_from(["same", "valid"]))),
        bias=draw(st.booleans()), activation=draw(st.sampled_from([None, "relu"])),
        unbatched=n == 1 and draw(st.booleans()),
        dtype=draw(float_dtypes), special=draw(specials), seed=draw(seeds),
        views={"input": draw(views), "weight": draw(views), "bias": draw(vector_views),
               "grad": draw(views)},
    )
    # how the user spells the geometry: ints, numpy ints, 1-tuples, lists
    call["spelled"] = {
        "stride": draw(pair_spellings(call["stride"])),
        "dilation": draw(pair_spellings(call["dilation"])),
        "padding": call["padding"] if isinstance(call["padding"], str)
        else draw(pair_spellings(call["padding"])),
        "groups": draw(spelled(groups)),
    }
    return call


def make_tensors(call, device=DEVICE):
    x_shape = (call["N"], call["C_in"], call["H"], call["W"])
    if call["unbatched"]:
        x_shape = x_shape[1:]
    x = random_tensor(x_shape, call["dtype"], call["seed"], call["special"], device)
    w = random_tensor((call["C_out"], call["C_in"] // call["groups"], *call["kernel"]),
                      call["dtype"], call["seed"] + 1, None, device)
    b = random_tensor((call["C_out"],), call["dtype"], call["seed"] + 2, None, device) \
        if call["bias"] else None
    return x, w, b


def peer(call, x, w, b):
    """F.conv2d (+ ReLU) in float64; for C_in = 0 the bias (segops'
    documented convolution of no channels, where F.conv2d returns none)."""
    args = (call["stride"], call["padding"], call["dilation"], call["groups"])
    if call["C_in"] == 0:
        probe = F.conv2d(x.new_zeros(*x.shape[:-3], call["groups"], *x.shape[-2:]),
                         w.new_zeros(call["C_out"], 1, *call["kernel"]), None, *args)
        out = probe + 0 * (x.sum() + w.sum())
        if b is not None:
            out = out + (b.view(-1, 1, 1))
    else:
        out = F.conv2d(x, w, b, *args)
    return F.relu(out) if call["activation"] == "relu" else out


def leaves(tensors):
    return [t.detach().requires_grad_() for t in tensors if t is not None]


def run_segops(call, x, w, b, grad):
    """Forward on the viewed arguments, then the gradients of every input
    for the (viewed) incoming gradient."""
    v = call["views"]
    args = [as_view(x, v["input"]), as_view(w, v["weight"]), as_view(b, v["bias"])]
    inputs = leaves(args)
    xi, wi = inputs[:2]
    bi = inputs[2] if b is not None else None
    s = call["spelled"]
    out = segops.ops.atrous_conv2d(xi, wi, bi, s["stride"], s["padding"], s["dilation"],
                                   s["groups"], activation=call["activation"])
    if grad is None:
        return out, None
    grads = torch.autograd.grad(out, inputs, as_view(grad, v["grad"]), allow_unused=True)
    return out, grads


# --------------------------------------------------------------------------
# the property on random calls
# --------------------------------------------------------------------------
@fuzz_settings(45)
@given(call=conv_calls())
@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_atrous_conv2d_matches_f_conv2d_or_names_the_argument(call):
    x, w, b = make_tensors(call)
    cpu = [None if t is None else t.detach().cpu().double() for t in (x, w, b)]
    want, peer_error = call_peer(lambda: peer(call, *cpu))
    event("F.conv2d refuses" if peer_error is not None else "compared")
    for path in paths_for(x.device):
        with on_path(path):
            if peer_error is not None:
                _, error = call_segops(lambda: run_segops(call, x, w, b, None), call)
                assert error is not None, f"segops accepted a call F.conv2d refuses " \
                    f"({peer_error}) on the {path} path: {call}"
                check_segops_error(error, CONV_NAMES, call)
                continue
            grad = random_tensor(want.shape, call["dtype"], call["seed"] + 3, None, x.device)
            result, error = call_segops(lambda: run_segops(call, x, w, b, grad), call)
            assert error is None, f"segops refused a call F.conv2d accepts on the {path} " \
                f"path: {error}; {call}"
            out, grads = result
            rtol = tolerance(call["dtype"])
            if path == "native" and call["dtype"] in (torch.float16, torch.bfloat16):
                rtol *= 4   # ATen's CPU conv sums the bias gradient in half precision
            assert out.dtype == call["dtype"]
            assert_close(out, want.to(call["dtype"]), rtol, name=f"{path} output")
            ref_leaves = leaves(cpu)
            ref_out = peer(call, *(ref_leaves + [None] * (3 - len(ref_leaves))))
            want_grads = torch.autograd.grad(ref_out, ref_leaves, grad.cpu().double(),
                                             allow_unused=True)
            for name, got, expected in zip(["input", "weight", "bias"], grads, want_grads):
                expected = torch.zeros_like(ref_leaves[0]) if expected is None else expected
                assert got.dtype == call["dtype"]
                assert_close(got, expected.to(call["dtype"]), rtol, name=f"{path} grad_{name}")
            if (call["views"]["input"] == "channels_last" and not call["unbatched"]
                    and call["N"] > 0
                    and call["C_in"] > 1 and call["H"] * call["W"] > 1
                    and out.shape[1] > 1 and out.shape[2] * out.shape[3] > 1):
                assert out.is_contiguous(memory_format=torch.channels_last), path


# --------------------------------------------------------------------------
# one bad argument in a valid call: a segops error that names it
# --------------------------------------------------------------------------
def _x(dtype=torch.float64, shape=(2, 4, 6, 5)):
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


BAD_ARGUMENTS = {
    # name: (argument the message must name, kwargs replacing the valid call's)
    "weight-none": ("weight", dict(weight=None)),
    "weight-list": ("weight", dict(weight=[[1.0]])),
    "weight-int": ("weight", dict(weight=torch.ones(6, 2, 3, 3, dtype=torch.int64))),
    "weight-3d": ("weight", dict(weight=torch.ones(6, 2, 3, dtype=torch.float64))),
    "weight-empty-kernel": ("weight", dict(weight=torch.ones(6, 2, 0, 3, dtype=torch.float64))),
    "weight-channels": ("channels", dict(weight=torch.ones(6, 3, 3, 3, dtype=torch.float64))),
    "weight-float32": ("weight", dict(weight=torch.ones(6, 2, 3, 3))),
    "input-none": ("input", dict(input=None)),
    "input-2d": ("input", dict(input=torch.ones(6, 5, dtype=torch.float64))),
    "input-5d": ("input", dict(input=torch.ones(1, 2, 4, 6, 5, dtype=torch.float64))),
    "input-int": ("input", dict(input=torch.ones(2, 4, 6, 5, dtype=torch.int32))),
    "input-bool": ("input", dict(input=torch.ones(2, 4, 6, 5, dtype=torch.bool))),
    "input-complex": ("input", dict(input=torch.ones(2, 4, 6, 5, dtype=torch.complex128))),
    "input-empty-map": ("input", dict(input=torch.ones(2, 4, 0, 5, dtype=torch.float64))),
    "input-small": ("output", dict(input=torch.ones(2, 4, 1, 1, dtype=torch.float64),
                                   padding=0)),
    "bias-shape": ("bias", dict(bias=torch.ones(5, dtype=torch.float64))),
    "bias-2d": ("bias", dict(bias=torch.ones(6, 1, dtype=torch.float64))),
    "bias-dtype": ("bias", dict(bias=torch.ones(6, dtype=torch.float16))),
    "bias-list": ("bias", dict(bias=[0.0] * 6)),
    "stride-0": ("stride", dict(stride=0)),
    "stride-negative": ("stride", dict(stride=(1, -2))),
    "stride-float": ("stride", dict(stride=1.5)),
    "stride-triple": ("stride", dict(stride=(1, 2, 3))),
    "stride-none": ("stride", dict(stride=None)),
    "stride-string": ("stride", dict(stride="2")),
    "stride-bool": ("stride", dict(stride=True)),
    "stride-absurd": ("stride", dict(stride=2**31)),
    "stride-numpy-float": ("stride", dict(stride=np.float64(2.0))),
    "padding-negative": ("padding", dict(padding=-1)),
    "padding-word": ("padding", dict(padding="full")),
    "padding-same-strided": ("padding", dict(padding="same", stride=2)),
    "padding-float": ("padding", dict(padding=(1.0, 1))),
    "padding-absurd": ("padding", dict(padding=2**31)),
    "padding-huge": ("padding", dict(padding=2**30 + 5)),
    "dilation-0": ("dilation", dict(dilation=0)),
    "dilation-float": ("dilation", dict(dilation=2.0)),
    "dilation-absurd": ("dilation", dict(dilation=(1, 2**40))),
    "groups-0": ("groups", dict(groups=0)),
    "groups-float": ("groups", dict(groups=2.0)),
    "groups-not-dividing": ("groups", dict(groups=4, weight=torch.ones(6, 1, 3, 3,
                                                                       dtype=torch.float64))),
    "groups-none": ("groups", dict(groups=None)),
    "activation": ("activation", dict(activation="gelu")),
}


@fuzz_settings(45)
@given(case=st.sampled_from(sorted(BAD_ARGUMENTS)), path=st.sampled_from(("kernel",
                                                                         "reference")),
       unbatched=st.booleans())
def test_bad_argument_is_a_segops_error_naming_it(case, path, unbatched):
    name, changes = BAD_ARGUMENTS[case]
    call = dict(input=_x(), weight=torch.randn(6, 2, 3, 3, dtype=torch.float64, device=DEVICE),
                bias=torch.randn(6, dtype=torch.float64, device=DEVICE), stride=1, padding=1,
                dilation=1, groups=2, activation=None)
    call.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v
                 for k, v in changes.items()})
    if unbatched and isinstance(call["input"], torch.Tensor) and call["input"].dim() == 4:
        call["input"] = call["input"][0]
    if path == "reference" and DEVICE.type != "cpu":
        path = "kernel"
    with on_path(path):
        result, error = call_segops(lambda: segops.ops.atrous_conv2d(**call), case)
    assert error is not None, f"{case}: accepted, gave shape {tuple(result.shape)}"
    check_segops_error(error, [name], case)


# --------------------------------------------------------------------------
# the module against nn.Conv2d (same constructor and state_dict)
# --------------------------------------------------------------------------
@fuzz_settings(12)
@given(groups=st.integers(1, 2), c_in=st.integers(1, 2), c_out=st.integers(1, 2),
       kernel=pairs(1, 3), stride=pairs(1, 2), dilation=pairs(1, 2),
       padding=st.one_of(pairs(0, 2), st.sampled_from(["same", "valid"])),
       padding_mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
       bias=st.booleans(), view=views, seed=seeds)
@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_atrous_conv2d_module_matches_nn_conv2d(groups, c_in, c_out, kernel, stride, dilation,
                                                padding, padding_mode, bias, view, seed):
    torch.manual_seed(seed)
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias,
                   padding_mode=padding_mode)
    x = as_view(random_tensor((2, c_in * groups, 6, 5), torch.float64, seed, device=DEVICE),
                view)
    theirs, peer_error = call_peer(lambda: torch.nn.Conv2d(c_in * groups, c_out * groups,
                                                           kernel, **options).double())
    if peer_error is not None:
        # the constructor is nn.Conv2d's own: the same check, the same error
        with pytest.raises(type(peer_error)):
            segops.nn.AtrousConv2d(c_in * groups, c_out * groups, kernel, **options)
        return
    want, peer_error = call_peer(lambda: theirs(x.cpu()))
    ours = segops.nn.AtrousConv2d(c_in * groups, c_out * groups, kernel,
                                  **options).double().to(DEVICE)
    ours.load_state_dict(theirs.state_dict())
    out, error = call_segops(lambda: ours(x), options)
    if peer_error is not None:
        assert error is not None, f"accepted what nn.Conv2d refuses ({peer_error}): {options}"
        check_segops_error(error, CONV_NAMES, options)
        return
    assert error is None, f"refused what nn.Conv2d accepts: {error}; {options}"
    assert_close(out, want, tolerance(torch.float64))


# --------------------------------------------------------------------------
# issue 16 items 9-12 not already covered in tests/ops/test_conv.py
# --------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [dict(stride=(np.int64(2),)), dict(padding=[np.int32(1)]),
                                    dict(dilation=np.int16(2), padding=(np.int64(2), 1)),
                                    dict(groups=np.int8(2))])
def test_issue16_item11_numpy_ints_and_one_sequences(kwargs):
    """Item 11: what F.conv2d accepts (numpy ints of any width, 1-tuples and
    1-lists) gives F.conv2d's result."""
    x = torch.randn(1, 4, 7, 6, dtype=torch.float64, device=DEVICE)
    w = torch.randn(6, 4 // int(kwargs.get("groups", 1)), 3, 3, dtype=torch.float64,
                    device=DEVICE)
    assert_close(segops.ops.atrous_conv2d(x, w, **kwargs), F.conv2d(x.cpu(), w.cpu(), **kwargs),
                 tolerance(torch.float64))


@pytest.mark.parametrize("path", ["kernel", "native", "reference"])
def test_issue16_item12_empty_batch_with_empty_map(path):
    """Item 12: N = 0 on every path, with an empty map as well (the shape
    check refuses an empty map only for a non-empty batch)."""
    if path != "kernel" and DEVICE.type != "cpu":
        pytest.skip("the native and reference paths serve CPU tensors")
    x = torch.randn(0, 2, 0, 4, dtype=torch.float64, device=DEVICE)
    w = torch.randn(3, 2, 1, 1, dtype=torch.float64, device=DEVICE)
    with on_path(path):
        result, error = call_segops(lambda: segops.ops.atrous_conv2d(x, w), "N=0, H=0")
    want, peer_error = call_peer(lambda: F.conv2d(x.cpu(), w.cpu()))
    if peer_error is not None:
        check_segops_error(error, CONV_NAMES, "N=0, H=0")
    else:
        assert error is None, error
        assert result.shape == want.shape


# --------------------------------------------------------------------------
# fuzz findings, fixed: regression tests
# --------------------------------------------------------------------------
@pytest.mark.parametrize("groups", [(2, 3), [2, 2]])
def test_groups_sequence_of_two_is_refused(groups):
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64, device=DEVICE)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64, device=DEVICE)
    with pytest.raises(segops.ArgumentTypeError, match="groups"):
        segops.ops.atrous_conv2d(x, w, groups=groups)


@pytest.mark.parametrize("stride,shape", [((2**31 - 1, 1), (1, 2, 2, 1)),
                                          ((1, 2**31 - 1), (1, 2, 1, 2)),
                                          ((2**31 - 2, 1), (1, 2, 3, 1))])
def test_grad_input_with_stride_near_2_to_the_31(stride, shape):
    x = torch.arange(1.0, 5.0 if shape[2] * shape[3] == 2 else 7.0, dtype=torch.float64)
    x = x.reshape(shape).to(DEVICE).requires_grad_()
    w = torch.ones(1, 2, 1, 1, dtype=torch.float64, device=DEVICE)
    out = segops.ops.atrous_conv2d(x, w, stride=stride)
    (got,) = torch.autograd.grad(out, x, torch.ones_like(out))
    xr = x.detach().cpu().requires_grad_()
    want = F.conv2d(xr, w.cpu(), stride=stride)
    (expected,) = torch.autograd.grad(want, xr, torch.ones_like(want))
    # expected: 1 at the first row/column of each channel, 0 elsewhere
    assert_close(got, expected, tolerance(torch.float64), name="grad_input")



@pytest.mark.parametrize("path", ["kernel", "native", "reference"])
def test_fused_relu_keeps_nan_like_f_relu(path):
    if path != "kernel" and DEVICE.type != "cpu":
        pytest.skip("the native and reference paths serve CPU tensors")
    x = torch.tensor([math.nan, 1.0, -1.0], dtype=torch.float64).reshape(1, 1, 1, 3)
    w = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    xs = x.to(DEVICE).requires_grad_()
    with on_path(path):
        out = segops.ops.atrous_conv2d(xs, w.to(DEVICE), activation="relu")
        (got,) = torch.autograd.grad(out, xs, torch.ones_like(out))
    xr = x.clone().requires_grad_()
    want = F.relu(F.conv2d(xr, w))                       # [nan, 1, 0]
    (expected,) = torch.autograd.grad(want, xr, torch.ones_like(want))   # [1, 1, 0]
    assert_close(out, want, tolerance(torch.float64))
    assert_close(got, expected, tolerance(torch.float64), name="grad_input")
