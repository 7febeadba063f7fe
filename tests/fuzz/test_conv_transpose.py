"""Fuzz: segops.ops.conv_transpose2d and segops.nn.ConvTranspose2d against
F.conv_transpose2d / nn.ConvTranspose2d in float64 (issue 16, "A fuzz suite
in the project").

Each example draws a call: shapes (empty batch, no input channels), stride
(huge ones too), padding, output_padding (below the stride, below only the
dilation, or invalid), dilation, groups, bias, dtype, a memory format or
non-contiguous view of every tensor argument and of the incoming gradient,
special values in the input (NaN, ±inf, huge, tiny, zeros), and the
spellings the peer accepts (numpy ints, 1-tuples, lists). It runs on the
kernel path (the interpreter on CPU) and on the native and reference paths,
forward and backward, and must give F.conv_transpose2d's result (in float64
from the same rounded values) within the dtype's tolerance, or a segops
error naming the argument. A second property mutates one argument of a
valid call into a bad one; a third checks the module, ``output_size``
included.

``SEGOPS_FUZZ_EXAMPLES=N`` runs N examples per test instead of the CI
default (see tests/fuzz/strategies.py)::

    SEGOPS_FUZZ_EXAMPLES=300 python -m pytest -q -p no:xdist tests/fuzz/test_conv_transpose.py
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fuzz.strategies import (
    as_view,
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
)
from helpers import DEVICE, assert_close
from hypothesis import event, example, given
from hypothesis import strategies as st

import segops

NAMES = ("input", "weight", "bias", "stride", "padding", "output_padding", "dilation", "groups",
         "output", "channels", "kernel")


def pairs(low, high):
    return st.tuples(st.integers(low, high), st.integers(low, high))


@st.composite
def conv_transpose_calls(draw):
    """A call of conv_transpose2d that F.conv_transpose2d may or may not accept."""
    groups = draw(st.integers(1, 3))
    n = draw(st.sampled_from([1, 2, 0]))
    stride = draw(st.one_of(pairs(1, 3), st.sampled_from([(300, 1), (1, 40)])))
    dilation = draw(pairs(1, 3))
    # output_padding: mostly valid (below the stride or the dilation), sometimes not
    limit = [max(s, d) - 1 for s, d in zip(stride, dilation)]
    output_padding = draw(st.one_of(
        st.tuples(st.integers(0, min(limit[0], 3)), st.integers(0, min(limit[1], 3))),
        pairs(0, 3)))
    call = dict(
        # 17 and 18: unaligned channel counts above 16 (zero-padded to 32 when ungrouped)
        N=n, C_in=groups * draw(st.sampled_from([1, 2, 0, 17])),
        C_out=groups * draw(st.sampled_from([1, 2, 18])), H=draw(st.integers(1, 4)),
        W=draw(st.integers(1, 4)), kernel=draw(pairs(1, 3)), groups=groups, stride=stride,
        dilation=dilation, padding=draw(pairs(0, 2)), output_padding=output_padding,
        bias=draw(st.booleans()), unbatched=n == 1 and draw(st.booleans()),
        dtype=draw(float_dtypes), special=draw(specials), seed=draw(seeds),
        views={"input": draw(views), "weight": draw(views), "bias": draw(vector_views),
               "grad": draw(views)},
    )
    call["spelled"] = {name: draw(pair_spellings(call[name]))
                       for name in ("stride", "dilation", "padding", "output_padding")}
    call["spelled"]["groups"] = draw(spelled(groups))
    return call


def make_tensors(call, device=DEVICE):
    x_shape = (call["N"], call["C_in"], call["H"], call["W"])
    if call["unbatched"]:
        x_shape = x_shape[1:]
    x = random_tensor(x_shape, call["dtype"], call["seed"], call["special"], device)
    w = random_tensor((call["C_in"], call["C_out"] // call["groups"], *call["kernel"]),
                      call["dtype"], call["seed"] + 1, None, device)
    b = random_tensor((call["C_out"],), call["dtype"], call["seed"] + 2, None, device) \
        if call["bias"] else None
    return x, w, b


def peer(call, x, w, b):
    return F.conv_transpose2d(x, w, b, call["stride"], call["padding"], call["output_padding"],
                              call["groups"], call["dilation"])


def leaves(tensors):
    return [t.detach().requires_grad_() for t in tensors if t is not None]


def aten_in_dtype(call, x, w, b, grad):
    """ATen's output and gradients in the call's own dtype, on the CPU: the
    native path's oracle where ATen's NaN placement depends on the dtype
    (float16 grad_weight leaves 0 at taps that reach only padding, where
    float32/float64 multiply the NaN input by the padding's zeros)."""
    ref_leaves = leaves([t.cpu().contiguous() for t in (x, w, b) if t is not None])
    out = peer(call, *(ref_leaves + [None] * (3 - len(ref_leaves))))
    return out, torch.autograd.grad(out, ref_leaves, grad.cpu())


def run_segops(call, x, w, b, grad):
    v = call["views"]
    inputs = leaves([as_view(x, v["input"]), as_view(w, v["weight"]), as_view(b, v["bias"])])
    s = call["spelled"]
    out = segops.ops.conv_transpose2d(inputs[0], inputs[1], inputs[2] if b is not None else None,
                                      s["stride"], s["padding"], s["output_padding"],
                                      s["groups"], s["dilation"])
    if grad is None:
        return out, None
    return out, torch.autograd.grad(out, inputs, as_view(grad, v["grad"]))


# hypothesis 6.170's derandomized draw: a NaN input whose taps 0 and 2 reach
# only padding (ATen float16 gives them gradient 0, float64 NaN)
NAN_PAST_PADDING = dict(
    N=1, C_in=1, C_out=1, H=1, W=1, kernel=(1, 3), groups=1, stride=(300, 1), dilation=(1, 1),
    padding=(0, 1), output_padding=(0, 0), bias=False, unbatched=False, dtype=torch.float16,
    special="nan", seed=0,
    views=dict(input="contiguous", weight="contiguous", bias="contiguous", grad="contiguous"),
    spelled=dict(stride=(300, 1), dilation=(1, 1), padding=(0, 1), output_padding=(0, 0),
                 groups=1))


@fuzz_settings(45)
@given(call=conv_transpose_calls())
@example(call=NAN_PAST_PADDING)
def test_conv_transpose2d_matches_f_conv_transpose2d_or_names_the_argument(call):
    x, w, b = make_tensors(call)
    cpu = [None if t is None else t.detach().cpu().double() for t in (x, w, b)]
    want, peer_error = call_peer(lambda: peer(call, *cpu))
    event("F.conv_transpose2d refuses" if peer_error is not None else "compared")
    for path in paths_for(x.device):
        with on_path(path):
            if peer_error is not None:
                _, error = call_segops(lambda: run_segops(call, x, w, b, None), call)
                assert error is not None, f"segops accepted a call F.conv_transpose2d " \
                    f"refuses ({peer_error}) on the {path} path: {call}"
                check_segops_error(error, NAMES, call)
                continue
            grad = random_tensor(want.shape, call["dtype"], call["seed"] + 3, None, x.device)
            result, error = call_segops(lambda: run_segops(call, x, w, b, grad), call)
            if error is not None and call["N"] == 0:
                # ATen skips some checks for an empty batch (output_padding past
                # stride and dilation, an output with no rows); segops checks always
                check_segops_error(error, NAMES, call)
                continue
            assert error is None, f"segops refused a call F.conv_transpose2d accepts on the " \
                f"{path} path: {error}; {call}"
            out, grads = result
            rtol = tolerance(call["dtype"])
            assert out.dtype == call["dtype"]
            assert_close(out, want.to(call["dtype"]), rtol, name=f"{path} output")
            ref_leaves = leaves(cpu)
            ref_out = peer(call, *(ref_leaves + [None] * (3 - len(ref_leaves))))
            want_grads = torch.autograd.grad(ref_out, ref_leaves, grad.cpu().double())
            same_dtype = aten_in_dtype(call, x, w, b, grad)[1] if path == "native" else None
            for i, (name, got, expected) in enumerate(zip(["input", "weight", "bias"], grads,
                                                          want_grads)):
                assert got.dtype == call["dtype"]
                expected = expected.to(call["dtype"])
                if same_dtype is not None and not torch.equal(expected.isnan(),
                                                              same_dtype[i].isnan()):
                    expected = same_dtype[i]
                assert_close(got, expected, rtol, name=f"{path} grad_{name}")
            if (call["views"]["input"] == "channels_last" and not call["unbatched"]
                    and call["N"] > 0
                    and call["C_in"] > 1 and call["H"] * call["W"] > 1
                    and out.shape[1] > 1 and out.shape[2] * out.shape[3] > 1):
                assert out.is_contiguous(memory_format=torch.channels_last), path


# --------------------------------------------------------------------------
# one bad argument in a valid call: a segops error that names it
# --------------------------------------------------------------------------
def _t(*shape, dtype=torch.float64):
    return torch.ones(*shape, dtype=dtype)


BAD_ARGUMENTS = {
    "weight-none": ("weight", dict(weight=None)),
    "weight-int": ("weight", dict(weight=_t(4, 3, 3, 3, dtype=torch.int64))),
    "weight-3d": ("weight", dict(weight=_t(4, 3, 3))),
    "weight-no-input-channels": ("weight", dict(weight=_t(0, 3, 3, 3),
                                                input=_t(1, 0, 3, 3))),
    "weight-empty-kernel": ("weight", dict(weight=_t(4, 3, 0, 3))),
    "weight-float32": ("weight", dict(weight=_t(4, 3, 3, 3, dtype=torch.float32))),
    "input-channels": ("channels", dict(input=_t(1, 5, 3, 3))),
    "input-none": ("input", dict(input=None)),
    "input-5d": ("input", dict(input=_t(1, 1, 4, 3, 3))),
    "input-int": ("input", dict(input=_t(1, 4, 3, 3, dtype=torch.int64))),
    "input-empty-map": ("input", dict(input=_t(1, 4, 3, 0))),
    "bias-shape": ("bias", dict(bias=_t(4))),
    "bias-dtype": ("bias", dict(bias=_t(6, dtype=torch.bfloat16))),
    "stride-0": ("stride", dict(stride=0)),
    "stride-float": ("stride", dict(stride=2.0)),
    "stride-triple": ("stride", dict(stride=(1, 1, 1))),
    "stride-absurd": ("stride", dict(stride=2**31)),
    "padding-negative": ("padding", dict(padding=(0, -1))),
    "padding-string": ("padding", dict(padding="same")),
    "padding-too-much": ("output", dict(padding=4)),
    "output-padding-past-both": ("output_padding", dict(stride=2, output_padding=2)),
    "output-padding-negative": ("output_padding", dict(output_padding=-1)),
    "output-padding-float": ("output_padding", dict(output_padding=0.5)),
    "dilation-0": ("dilation", dict(dilation=(0, 1))),
    "dilation-absurd": ("dilation", dict(dilation=2**31)),
    "groups-0": ("groups", dict(groups=0)),
    "groups-not-dividing": ("groups", dict(groups=3)),
    "groups-float": ("groups", dict(groups=1.0)),
}


@fuzz_settings(40)
@given(case=st.sampled_from(sorted(BAD_ARGUMENTS)),
       path=st.sampled_from(("kernel", "native", "reference")))
def test_bad_argument_is_a_segops_error_naming_it(case, path):
    name, changes = BAD_ARGUMENTS[case]
    call = dict(input=_t(1, 4, 3, 3), weight=_t(4, 3, 3, 3), bias=_t(6), stride=1, padding=0,
                output_padding=0, groups=2, dilation=1)
    call.update(changes)
    call = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in call.items()}
    if DEVICE.type != "cpu":
        path = "kernel"
    with on_path(path):
        result, error = call_segops(lambda: segops.ops.conv_transpose2d(**call), case)
    assert error is not None, f"{case}: accepted, gave shape {tuple(result.shape)}"
    check_segops_error(error, [name], case)


# --------------------------------------------------------------------------
# the module against nn.ConvTranspose2d, forward(input, output_size)
# --------------------------------------------------------------------------
@fuzz_settings(12)
@given(groups=st.integers(1, 2), c_in=st.integers(1, 2), c_out=st.integers(1, 2),
       kernel=pairs(1, 3), stride=pairs(1, 3), dilation=pairs(1, 2), padding=pairs(0, 1),
       extra=pairs(0, 3), give_size=st.booleans(), bias=st.booleans(), view=views, seed=seeds)
def test_conv_transpose2d_module_matches_nn(groups, c_in, c_out, kernel, stride, dilation,
                                            padding, extra, give_size, bias, view, seed):
    torch.manual_seed(seed)
    theirs = torch.nn.ConvTranspose2d(c_in * groups, c_out * groups, kernel, stride, padding,
                                      groups=groups, bias=bias, dilation=dilation).double()
    ours = segops.nn.ConvTranspose2d(c_in * groups, c_out * groups, kernel, stride, padding,
                                     groups=groups, bias=bias, dilation=dilation)
    ours = ours.double().to(DEVICE)
    ours.load_state_dict(theirs.state_dict())
    x = as_view(random_tensor((2, c_in * groups, 3, 4), torch.float64, seed, device=DEVICE), view)
    size = None
    if give_size:   # a requested size: the minimum plus `extra` (too much is an error)
        base = [(n - 1) * s - 2 * p + d * (k - 1) + 1
                for n, s, p, d, k in zip((3, 4), stride, padding, dilation, kernel)]
        size = [b + e for b, e in zip(base, extra)]
    want, peer_error = call_peer(lambda: theirs(x.cpu(), size))
    if peer_error is not None:
        # the output_size check is nn.ConvTranspose2d's own (_output_padding):
        # the same error
        with pytest.raises(type(peer_error)):
            ours(x, size)
        return
    out, error = call_segops(lambda: ours(x, size), size)
    assert error is None, f"refused what nn.ConvTranspose2d accepts: {error}"
    assert_close(out, want, tolerance(torch.float64))


# --------------------------------------------------------------------------
# issue 16 items 11-12 not already covered in tests/ops/test_conv_transpose.py
# --------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    dict(stride=(np.int64(2),), padding=[np.int32(1)], output_padding=(np.int64(1),)),
    dict(stride=np.int16(3), dilation=(np.int64(2),), output_padding=np.int8(1)),
    dict(groups=np.int64(2), stride=[2, np.int32(1)]),
])
def test_issue16_item11_numpy_ints_and_one_sequences(kwargs):
    """Item 11: numpy ints of any width, 1-tuples and lists for stride,
    padding, output_padding, dilation and groups, like F.conv_transpose2d."""
    x = torch.randn(1, 4, 4, 3, dtype=torch.float64, device=DEVICE)
    w = torch.randn(4, 3, 3, 2, dtype=torch.float64, device=DEVICE)
    assert_close(segops.ops.conv_transpose2d(x, w, **kwargs),
                 F.conv_transpose2d(x.cpu(), w.cpu(), **kwargs), tolerance(torch.float64))


def test_issue16_item11_module_output_size_numpy_ints():
    """Item 11: output_size as numpy ints (and a torch.Size) like nn.ConvTranspose2d."""
    theirs = torch.nn.ConvTranspose2d(2, 3, 3, stride=2).double()
    ours = segops.nn.ConvTranspose2d(2, 3, 3, stride=2).double().to(DEVICE)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(1, 2, 4, 5, dtype=torch.float64)
    for size in ([np.int64(10), np.int32(12)], torch.Size([10, 12]), (np.int64(9), 11)):
        assert_close(ours(x.to(DEVICE), size), theirs(x, size), tolerance(torch.float64))



@pytest.mark.parametrize("path,shape", [
    ("kernel", (0, 3, 0, 4)), ("native", (0, 3, 0, 4)),
    ("reference", (0, 3, 0, 4)),
    ("kernel", (0, 3, 1, 1)), ("native", (0, 3, 1, 1)), ("reference", (0, 3, 1, 1))])
def test_issue16_item12_empty_batch_with_small_or_empty_map(path, shape):
    """Item 12: N = 0 (an empty map too) on every path: F.conv_transpose2d's
    empty output or a segops error naming the argument."""
    if path != "kernel" and DEVICE.type != "cpu":
        pytest.skip("the native and reference paths serve CPU tensors")
    x = torch.randn(*shape, dtype=torch.float64, device=DEVICE)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, device=DEVICE)
    with on_path(path):
        result, error = call_segops(lambda: segops.ops.conv_transpose2d(
            x, w, stride=2, output_padding=1), shape)
    want, peer_error = call_peer(lambda: F.conv_transpose2d(x.cpu(), w.cpu(), stride=2,
                                                            output_padding=1))
    if peer_error is not None:
        check_segops_error(error, NAMES, shape)
    else:
        assert error is None, error
        assert result.shape == want.shape
