"""Comparison helpers for the tests (imported as `helpers`; tests/ is on
pytest's pythonpath)."""
from __future__ import annotations

import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"

# relative RMS error allowed for results computed from inputs of each dtype
RTOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
}
# float dtypes the kernels run in on this machine: float64 in the interpreter
# (exact comparisons), the GPU dtypes on CUDA
KERNEL_DTYPES = (
    [torch.float32, torch.float16, torch.bfloat16] if ON_GPU
    else [torch.float64, torch.float32, torch.float16, torch.bfloat16]
)


def error_report(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(relative RMS error, max abs error) of actual against expected, in float64."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    finite = torch.isfinite(e)
    diff = (a - e)[finite]
    norm = e[finite].norm().item()
    rel_rms = diff.norm().item() / max(norm, 1e-30) if diff.numel() else 0.0
    max_abs = diff.abs().max().item() if diff.numel() else 0.0
    return rel_rms, max_abs


# how far one element may stray, in units of the dtype's relative tolerance,
# from |expected| + RMS(expected) (the RMS term covers elements that are
# ~0 after cancellation)
ELEMENT_FACTOR = 8.0


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float,
                 atol: float = 0.0, name: str = "output") -> None:
    """Same shape, NaN/inf in the same places, relative RMS error <= rtol
    (or every element within atol, for tensors that are ~0 everywhere), and
    every element within ELEMENT_FACTOR * rtol * (|expected| + RMS(expected))
    + atol: one wrong element fails even when the RMS error is small."""
    assert tuple(actual.shape) == tuple(expected.shape), \
        f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert torch.equal(torch.isnan(a), torch.isnan(e)), \
        f"{name}: NaN at {torch.nonzero(torch.isnan(a) != torch.isnan(e))[:5].tolist()}"
    inf_a, inf_e = torch.isinf(a), torch.isinf(e)
    assert torch.equal(inf_a, inf_e) and torch.equal(a[inf_a], e[inf_e]), f"{name}: inf mismatch"
    rel_rms, max_abs = error_report(a, e)
    ok = rel_rms <= rtol or max_abs <= atol
    assert ok, f"{name}: relative RMS error {rel_rms:.3e} > {rtol:.1e} (max abs error {max_abs:.3e})"
    finite = torch.isfinite(e)
    if not finite.any():
        return
    a, e = a[finite], e[finite]
    rms = e.norm().item() / e.numel() ** 0.5
    bound = ELEMENT_FACTOR * rtol * (e.abs() + rms) + atol
    over = (a - e).abs() > bound
    if over.any():
        i = int(torch.nonzero(over)[0])
        raise AssertionError(
            f"{name}: {int(over.sum())} element(s) off by more than {ELEMENT_FACTOR:g} * rtol "
            f"* (|expected| + RMS); first: {a[i].item():.6g} vs {e[i].item():.6g} "
            f"(RMS of expected {rms:.3g})")


def like_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """t in a memory format: 'contiguous', 'channels_last' (4-D and 5-D) or
    'strided' (a non-contiguous view with the same values)."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
        return t.contiguous(memory_format=fmt) if t.dim() in (4, 5) else t.contiguous()
    if layout == "strided":
        wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    raise ValueError(layout)


class LaunchRecorder:
    """Records the Triton kernels a block of code launches, by name, with the
    grid each launch used (evaluated with its block sizes): tests that claim
    a kernel ran check this, not the predicate the dispatch uses."""

    def __init__(self, module, names):
        self.module = module
        self.names = names
        self.launches: list[tuple[str, tuple]] = []
        self.arguments: list[tuple[str, dict]] = []
        self.calls: list[tuple[str, tuple]] = []   # the positional arguments
        self._saved = {}

    def __enter__(self):
        for name in self.names:
            kernel = getattr(self.module, name)
            self._saved[name] = kernel
            setattr(self.module, name, _RecordingKernel(name, kernel, self))
        return self

    def __exit__(self, *exc):
        for name, kernel in self._saved.items():
            setattr(self.module, name, kernel)

    def constexprs(self, name: str) -> list[dict]:
        """The keyword arguments (constexprs, num_warps) of each launch of
        kernel ``name``."""
        return [kwargs for launched, kwargs in self.arguments if launched == name]

    def names_launched(self) -> list[str]:
        return [name for name, _ in self.launches]

    def programs(self, name: str) -> int:
        """Programs launched for kernel ``name`` in total."""
        total = 0
        for launched, grid in self.launches:
            if launched == name:
                count = 1
                for size in grid:
                    count *= size
                total += count
        return total


class _RecordingKernel:
    def __init__(self, name, kernel, recorder):
        self.name, self.kernel, self.recorder = name, kernel, recorder

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            sizes = grid(kwargs) if callable(grid) else grid
            self.recorder.launches.append((self.name, tuple(sizes)))
            self.recorder.arguments.append((self.name, dict(kwargs)))
            self.recorder.calls.append((self.name, args))
            return self.kernel[grid](*args, **kwargs)
        return launch

    def __getattr__(self, attr):
        return getattr(self.kernel, attr)


def record_launches(module, *names) -> LaunchRecorder:
    """``with record_launches(kernels_module, "_kernel_a", ...) as rec:``."""
    return LaunchRecorder(module, names)


def record_gemm_launches(monkeypatch, module) -> dict:
    """{kernel name: [named arguments of each launch]} of ``module.launch``
    (the GEMM launcher the conv kernels call) while the test runs."""
    launches = {}
    real = module.launch

    def spy(kernel, grid, args, *rest):
        launches.setdefault(kernel.__name__, []).append(dict(zip(kernel.arg_names, args)))
        return real(kernel, grid, args, *rest)

    monkeypatch.setattr(module, "launch", spy)
    return launches


MIN_GUARD = 64  # guard elements after each output of guarded_outputs, at least


def guarded_outputs(monkeypatch, module, value: float = -7.0, guards: list | None = None) -> list:
    """Each output ``module.empty`` allocates while the test runs (in any
    memory format) is the start of a buffer followed by max(MIN_GUARD,
    numel) guard elements of ``value`` (a stray row, channel or image fits);
    returns ``guards`` (a new list if None), to which each (buffer, numel)
    is appended, for assert_guards_intact (a store past the output shows
    there, a crash or nothing without it)."""
    guards = [] if guards is None else guards
    real_empty = module.empty

    def guarded(*shape, memory_format=torch.contiguous_format, **kwargs):
        if len(shape) == 1 and not isinstance(shape[0], int):
            shape = tuple(shape[0])
        n = math.prod(shape)
        strides = torch.empty(shape, device="meta", memory_format=memory_format).stride()
        buf = real_empty(n + max(MIN_GUARD, n), **kwargs)
        buf[n:] = value
        guards.append((buf, n))
        return buf.as_strided(shape, strides)
    monkeypatch.setattr(module, "empty", guarded)
    return guards


def assert_guards_intact(guards: list, value: float = -7.0) -> None:
    assert guards, "no output was allocated"
    for buf, n in guards:
        tail = buf[n:].cpu()
        assert torch.equal(tail, torch.full_like(tail, value)), \
            f"stored past the {n}-element output: {tail.tolist()}"


VIEW_KINDS = ("stride2", "transposed", "slice")


def _filler(shape, like: torch.Tensor) -> torch.Tensor:
    """Values around a view: random for floats (a read past the view shows),
    zeros for integer and bool tensors."""
    if like.is_floating_point():
        return torch.randn(shape, dtype=like.dtype, device=like.device)
    return torch.zeros(shape, dtype=like.dtype, device=like.device)


def non_contiguous(t: torch.Tensor, kind: str) -> torch.Tensor:
    """A non-contiguous view holding t's values (any dtype): 'stride2'
    (stride 2 along the last dim), 'transposed' (the last two dims stored
    swapped; for a vector, a column of a (n, 2) matrix), 'slice' (a slice
    along dim 1, or dim 0 of a vector, of a larger tensor)."""
    if kind == "stride2":
        return like_layout(t, "strided")
    if kind == "transposed":
        if t.dim() == 1:
            wide = _filler((t.shape[0], 2), t)
            wide[:, 1] = t
            return wide[:, 1]
        view = t.transpose(-1, -2).contiguous().transpose(-1, -2)
        if view.is_contiguous():  # a 1-wide dim: fall back to a stride-2 view
            return like_layout(t, "strided")
        return view
    if kind == "slice":
        dim = 0 if t.dim() == 1 else 1
        pad_shape = list(t.shape)
        pad_shape[dim] = 3
        big = torch.cat([_filler(pad_shape, t), t, _filler(pad_shape, t)], dim=dim)
        view = big.narrow(dim, 3, t.shape[dim])
        return view if not view.is_contiguous() else like_layout(t, "strided")
    raise ValueError(kind)


# the three ways an op can run; "kernel" is CUDA or the interpreter (the
# tests' default), "native" and "reference" serve non-CUDA tensors only
PATHS = ("kernel", "native", "reference")


def on_path(path: str):
    """A context running the ops on ``path`` for CPU tensors (the kernel path
    needs nothing: it is the default under the tests)."""
    import contextlib

    from segops import _dispatch
    if path == "kernel":
        return contextlib.nullcontext()
    return _dispatch.native_only() if path == "native" else _dispatch.reference_only()


def skip_off_kernel_path_on_gpu(path: str) -> None:
    """On a GPU only the kernel path exists for the tests' CUDA tensors."""
    import pytest
    if path != "kernel" and ON_GPU:
        pytest.skip("the native and reference paths serve non-CUDA tensors")


def assert_channels_last_like_aten(plain, ours, x, path: str, **call) -> None:
    """torch's layer ``plain`` and its segops twin ``ours`` (same weights),
    both moved to channels_last and fed the NCHW ``x``: ours, on DEVICE and
    ``path``, gives the channels_last output, input gradient and weight
    gradient torch gives (ATen runs channels_last when either operand is;
    ``torch.autograd.grad`` hands the weight gradient over in that layout),
    with torch's values."""
    from segops._format import memory_format_of
    skip_off_kernel_path_on_gpu(path)
    ours.load_state_dict(plain.state_dict())
    plain = plain.to(memory_format=torch.channels_last)
    ours = ours.to(DEVICE, memory_format=torch.channels_last)
    xr, xo = x.clone().requires_grad_(), x.to(DEVICE).requires_grad_()
    want = plain(xr, **call)
    with on_path(path):
        out = ours(xo, **call)
        grad, grad_w = torch.autograd.grad(out, (xo, ours.weight), torch.ones_like(out))
    want_grad, want_grad_w = torch.autograd.grad(want, (xr, plain.weight), torch.ones_like(want))
    for t in (want, want_grad, want_grad_w, out, grad, grad_w):
        assert memory_format_of(t) == torch.channels_last
    assert_close(out, want, RTOL[x.dtype])
    assert_close(grad, want_grad, RTOL[x.dtype], name="grad")
    assert_close(grad_w, want_grad_w, RTOL[x.dtype], name="weight grad")


# (N, C, H, W) views whose memory format ATen reads from the stride order,
# dense or not: name -> (the dense tensor viewed, as a function of the view's
# shape; the view of it, a function of that tensor and the shape)
def _slice_of_wider(axis: int, index: slice, fmt=torch.channels_last):
    def base(shape):
        wide = list(shape)
        wide[axis] = 2 * wide[axis] + 1
        return torch.randn(wide, dtype=torch.float64).contiguous(memory_format=fmt)

    def view(t, shape):
        t = t[(slice(None),) * axis + (index,)]
        return t[tuple(slice(0, n) for n in shape)]
    return base, view


def _permuted(order):
    inverse = [order.index(axis) for axis in range(4)]

    def base(shape):
        return torch.randn([shape[axis] for axis in order], dtype=torch.float64)
    return base, lambda t, shape: t.permute(inverse)


STRIDE_VIEWS = {
    "contiguous": _permuted((0, 1, 2, 3)),
    # .to, not .contiguous, gives one channel or 1x1 maps channels_last strides
    "channels_last": (lambda shape: torch.randn(shape, dtype=torch.float64).to(
        memory_format=torch.channels_last), lambda t, shape: t),
    "cl_channel_slice": _slice_of_wider(1, slice(1, None)),
    "cl_row_step": _slice_of_wider(2, slice(None, None, 2)),
    "cl_column_slice": _slice_of_wider(3, slice(1, None)),
    "nchw_channel_slice": _slice_of_wider(1, slice(1, None), torch.contiguous_format),
    "nhwc_permuted": _permuted((0, 2, 3, 1)),
    "nwhc_permuted": _permuted((0, 3, 2, 1)),
    "expanded_batch": (lambda shape: torch.randn(1, *shape[1:], dtype=torch.float64),
                       lambda t, shape: t.expand(*shape)),
    # channels at stride 1 overlapping the columns at stride 2 (unfold-like
    # windows): the strides grow along C, W, H, N but ATen requires each to
    # pass the last axis's extent, so it is contiguous
    "overlapping_channels": (lambda shape: torch.randn(
        shape[0] * 2 * shape[2] * shape[3] + shape[1], dtype=torch.float64),
        lambda t, shape: t.as_strided(shape, (2 * shape[2] * shape[3], 1, 2 * shape[3], 2))),
    # a channel stride of 0 (ATen: contiguous, whatever the other strides)
    "expanded_channels": (lambda shape: torch.randn(shape[0], 1, *shape[2:],
                                                    dtype=torch.float64),
                          lambda t, shape: t.expand(*shape)),
}


# (input view, weight view): every input view with either dense weight, and
# the weight's own views with a contiguous input (but a weight overlapping
# itself, where ATen's CPU convolutions do not follow their stated rule)
VIEW_PAIRS = ([(x, w) for w in ("contiguous", "channels_last") for x in STRIDE_VIEWS]
              + [("contiguous", w) for w in STRIDE_VIEWS
                 if w not in ("contiguous", "channels_last", "overlapping_channels")])
# (N, C, H, W) shapes; with one channel or 1x1 maps only the strides say the format
LAYOUT_SHAPES = {"maps": (2, 3, 5, 6), "one_channel": (2, 1, 5, 6), "1x1_maps": (2, 3, 1, 1),
                 "one_pixel": (2, 1, 1, 1)}
# the views whose stride order is channels_last at every LAYOUT_SHAPES entry
# with several channels and maps larger than 1x1
CHANNELS_LAST_VIEWS = ("channels_last", "cl_channel_slice", "cl_row_step", "cl_column_slice",
                       "nhwc_permuted")


def strided_views(name: str, shape, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """STRIDE_VIEWS[name] of ``shape``: the view on the CPU and the same view
    of the same values on ``device`` (DEVICE by default; ``.to`` would make
    a non-dense view dense). With one channel or 1x1 maps, 'contiguous' and
    'channels_last' are the ambiguous cases ATen decides by the strides."""
    base, view = STRIDE_VIEWS[name]
    t = base(shape)
    return view(t, shape), view(t.to(device or DEVICE), shape)


def assert_strides_like_aten(theirs, ours, x, w, path: str, ambiguous=(), **call) -> None:
    """ours(x, w, **call) on ``path`` gives the output, input gradient and
    weight gradient of theirs (ATen, on the CPU) with ATen's exact strides
    (its memory format comes from the stride order of both operands, dense
    or not, and the next ATen op reads it back) and values. ``x`` and ``w``
    are (CPU, DEVICE) pairs of one view (``strided_views``).

    ``ambiguous`` names results dense in both layouts (size-1 axes) whose
    strides ATen's slow CPU backends leave as their computation made them
    rather than as the format's: those need only be dense in the format
    ATen's strides read as. So does the weight gradient of a weight dense
    in both layouts (C_in = 1 or a 1x1 kernel): ATen's backends disagree
    there, and ``.backward()`` lays it out like the weight anyway."""
    from segops._format import memory_format_of
    skip_off_kernel_path_on_gpu(path)
    xr, xo = (t.detach().requires_grad_() for t in x)
    wr, wo = (t.detach().requires_grad_() for t in w)
    want = theirs(xr, wr, **call)
    # contiguous whatever the output's layout: the gradients' layout is the
    # convolution's, not the incoming gradient's
    dy = torch.randn(want.shape, dtype=want.dtype)
    want_grads = torch.autograd.grad(want, (xr, wr), dy)
    with on_path(path):
        out = ours(xo, wo, **call)
        grads = torch.autograd.grad(out, (xo, wo), dy.to(out.device))
    for name, got, expected in zip(("output", "grad", "weight grad"), (out, *grads),
                                   (want, *want_grads)):
        both = (expected.is_contiguous()
                and expected.is_contiguous(memory_format=torch.channels_last))
        if name in ambiguous or (name == "weight grad" and both):
            assert got.is_contiguous(memory_format=memory_format_of(expected)), name
        else:
            assert got.stride() == expected.stride(), (name, got.stride(), expected.stride())
        assert_close(got, expected, RTOL[torch.float64], name=name)


def deterministic(enabled: bool = True):
    """A context with torch.use_deterministic_algorithms(enabled)."""
    from segops import _dispatch
    return _dispatch.deterministic_algorithms(enabled)


def second_order_grads(fn, tensors, grad_out, probes, dy_is_leaf=True, view=None):
    """Double backward as a gradient penalty takes it: out = fn(*tensors);
    the first-order gradients of out against grad_out with create_graph=True;
    then the gradients of sum(<gradient, probe>) with respect to every
    tensor, and to grad_out when ``dy_is_leaf`` (else grad_out is a constant,
    as torch.ones_like(out) is in a penalty, and only the tensors' come
    back). Returns (first, second). A None tensor (no bias) stays out of both.
    ``view`` (e.g. a non-contiguous view) is applied to every tensor and to
    grad_out on their way into fn and its backward; the gradients are still
    those of the leaves."""
    view = view or (lambda t: t)
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    present = [t for t in leaves if t is not None]
    dy = grad_out.detach().clone().requires_grad_(dy_is_leaf)
    out = fn(*(None if t is None else view(t) for t in leaves))
    first = torch.autograd.grad(out, present, view(dy), create_graph=True)
    penalty = sum((g * p).sum() for g, p in zip(first, probes))
    second = torch.autograd.grad(penalty, present + ([dy] if dy_is_leaf else []),
                                 allow_unused=True, materialize_grads=True)
    return first, second


def assert_second_order_close(fn, want_fn, tensors, grad_out, probes, rtol, names,
                              dtype=None, view=None):
    """second_order_grads of ``fn`` (on DEVICE, in ``dtype`` when given,
    through ``view``) and ``want_fn`` (on the CPU, in the tensors' float64)
    agree, with grad_out a leaf and a constant; ``names`` name the tensors.
    Returns the last (first, second) of ``fn``."""
    def to_device(t):
        return None if t is None else t.to(DEVICE, dtype or t.dtype)

    for dy_is_leaf in (True, False):
        got = second_order_grads(fn, [to_device(t) for t in tensors], to_device(grad_out),
                                 [to_device(p) for p in probes], dy_is_leaf, view)
        want = second_order_grads(want_fn, tensors, grad_out, probes, dy_is_leaf)
        assert len(got[1]) == len(want[1]) == len(probes) + dy_is_leaf
        for order, order_names in ((0, names), (1, (*names, "grad_out"))):
            for name, g, e in zip(order_names, got[order], want[order]):
                assert_close(g, e, rtol, name=f"order {order + 1}, {name}, "
                                              f"grad_out leaf {dy_is_leaf}")
    return got


def assert_checked_eager_and_compiled(call, args, path: str, eager_match: str,
                                      compiled_match: str) -> None:
    """``call(*args)`` on ``path`` raises segops.ArgumentError eagerly and,
    compiled with fullgraph=True, the device assert's RuntimeError (the
    value checks inside torch.compile; CPU tensors: on CUDA a failed assert
    ends the context)."""
    import pytest

    import segops
    with on_path(path):
        with pytest.raises(segops.ArgumentError, match=eager_match):
            call(*args)
        torch._dynamo.reset()
        with pytest.raises(RuntimeError, match=compiled_match):
            torch.compile(call, backend="aot_eager", fullgraph=True)(*args)


def assert_device_assert_in_child(prelude: str, unchecked: str, checked: str) -> None:
    """Runs ``prelude``, ``unchecked`` (which must pass) and ``checked``
    (which must trip a CUDA device-side assert) in a child process: a failed
    device-side assert leaves the CUDA context unusable for the process."""
    import subprocess
    import sys
    code = (f"{prelude}\n{unchecked}\ntorch.cuda.synchronize()\n"
            "print('unchecked call ran', flush=True)\n"
            f"{checked}\ntorch.cuda.synchronize()\nprint('no error')\n")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=600)
    assert "unchecked call ran" in child.stdout, child.stderr[-2000:]
    assert child.returncode != 0 and "no error" not in child.stdout, "the check did not fire"
    assert "device-side assert" in child.stderr, child.stderr[-2000:]


def torchvision_nms_per_class(boxes, scores, idxs, threshold):
    """The oracle of the NMS tests: torchvision's ``nms`` run per class of
    ``idxs`` (one class when None), kept indices in (-score, index) order (a
    stable sort, as torchvision's CPU nms sorts). CPU tensors, boxes and
    scores in one float dtype (torchvision's requirement).

    Its nms, not its batched_nms: a box with a NaN coordinate never
    suppresses and is never suppressed in both segops and torchvision's
    nms, while batched_nms' coordinate-offset trick lets one NaN coordinate
    suppress nothing at all, and its offsets round coordinates."""
    from torchvision import ops as tv_ops
    if idxs is None:
        return tv_ops.nms(boxes, scores, threshold)
    keep = torch.zeros(len(boxes), dtype=torch.bool)
    for c in torch.unique(idxs):
        rows = torch.nonzero(idxs == c).flatten()
        keep[rows[tv_ops.nms(boxes[rows], scores[rows], threshold)]] = True
    kept = torch.nonzero(keep).flatten()
    return kept[torch.sort(scores[kept], descending=True, stable=True).indices]


class DispatchCalls(TorchDispatchMode):
    """The operators a block of code reaches the dispatcher with, by name
    (``names``), seen from outside: a custom op counts once, whatever it
    runs inside."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))
