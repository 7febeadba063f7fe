"""Forward mode (torch.func's jvp and jacfwd, torch.autograd.forward_ad's
dual tensors) over the differentiable ops raises: the custom ops have no
forward-mode derivative, and torch would give their outputs a zero or no
tangent without a word."""
import pytest
import torch
from helpers import DEVICE, PATHS, on_path
from torch.autograd import forward_ad

from segops import ops


def _atrous_conv2d():
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, device=DEVICE)
    return lambda x: ops.atrous_conv2d(x, w, padding=2, dilation=2), (1, 2, 6, 6)


def _conv_transpose2d():
    w = torch.randn(2, 3, 2, 2, dtype=torch.float64, device=DEVICE)
    return lambda x: ops.conv_transpose2d(x, w, stride=2), (1, 2, 3, 3)


def _boxes():
    return [torch.tensor([[1.0, 1.0, 6.0, 5.0]], dtype=torch.float64, device=DEVICE)]


def _roi_align():
    return lambda x: ops.roi_align(x, _boxes(), 2, 1.0, 2), (1, 2, 8, 8)


def _multi_scale_roi_align():
    return (lambda x: ops.multi_scale_roi_align([x, x[..., ::2, ::2]], _boxes(), 2,
                                                [1.0, 0.5], 2, canonical_scale=8),
            (1, 2, 8, 8))


def _target():
    return torch.tensor([[[0, 1, 2], [2, 1, 0]]], device=DEVICE)


def _overlap_sums():
    return lambda x: ops.overlap_sums(x, _target()), (1, 3, 2, 3)


def _dice_loss():
    return lambda x: ops.dice_loss(x, _target()), (1, 3, 2, 3)


def _jaccard_loss():
    return lambda x: ops.jaccard_loss(x, _target()), (1, 3, 2, 3)


OPS = {f.__name__[1:]: f for f in (_atrous_conv2d, _conv_transpose2d, _roi_align, _multi_scale_roi_align,
                                   _overlap_sums, _dice_loss, _jaccard_loss)}


@pytest.mark.parametrize("name", OPS)
def test_forward_mode_raises(name):
    fn, shape = OPS[name]()
    x = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    with pytest.raises(NotImplementedError, match=f"segops.ops.{name} has no forward-mode"):
        torch.func.jvp(fn, (x,), (torch.ones_like(x),))
    with pytest.raises(NotImplementedError, match="forward-mode"):
        torch.func.jacfwd(fn)(x)
    leaf = x.clone().requires_grad_()
    fn(leaf).sum().backward()   # reverse mode outside the transforms: unaffected
    assert leaf.grad is not None and leaf.grad.isfinite().all()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", OPS)
def test_forward_ad_dual_input_raises(name, path):
    """torch.autograd.forward_ad: a dual input would leave the output
    without a tangent (the custom ops have no forward derivative), so it
    raises, on every path (ATen's forward derivatives on the native
    convolution path would make the answer depend on the device). A
    dual level with plain inputs runs as usual."""
    fn, shape = OPS[name]()
    device = DEVICE if path == "kernel" else torch.device("cpu")
    x = torch.randn(shape, dtype=torch.float64).to(device)
    with on_path(path):
        plain = fn(x)
        with forward_ad.dual_level():
            with pytest.raises(NotImplementedError,
                               match=f"segops.ops.{name} has no forward-mode"):
                fn(forward_ad.make_dual(x, torch.ones_like(x)))
            out = fn(x)
    assert forward_ad.unpack_dual(out).tangent is None
    assert torch.equal(out, plain)


@pytest.mark.parametrize("op", ["atrous_conv2d", "conv_transpose2d"])
def test_forward_ad_dual_weight_or_bias_raises(op):
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, device=DEVICE)
    w = torch.randn(*((3, 2) if op == "atrous_conv2d" else (2, 3)), 3, 3, dtype=torch.float64,
                    device=DEVICE)
    b = torch.randn(3, dtype=torch.float64, device=DEVICE)
    with forward_ad.dual_level():
        for args in ((x, forward_ad.make_dual(w, torch.ones_like(w)), b),
                     (x, w, forward_ad.make_dual(b, torch.ones_like(b)))):
            with pytest.raises(NotImplementedError, match="forward-mode"):
                getattr(ops, op)(*args)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize("name", sorted(set(OPS) - {"roi_align", "multi_scale_roi_align"}))
def test_vmap_matches_a_loop(name):
    """torch.func.vmap runs the op once per sample (torch's fallback for a
    custom op without a batching rule), as the README says."""
    fn, shape = OPS[name]()
    x = torch.randn((3, *shape), dtype=torch.float64, device=DEVICE)
    assert torch.equal(torch.func.vmap(fn)(x), torch.stack([fn(sample) for sample in x]))


@pytest.mark.parametrize("name", OPS)
def test_reverse_transforms_raise_torchs_error(name):
    """What the README states for torch.func.grad over the custom ops (a
    torch limitation: when this starts to pass, torch fixed it, and the
    README and this test should say so)."""
    fn, shape = OPS[name]()
    x = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.grad(lambda t: fn(t).sum())(x)
