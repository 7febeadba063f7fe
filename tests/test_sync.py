"""No host synchronisation in the ops' hot paths (DESIGN.md, "Testing";
issue 12): RoIAlign (single level, several levels, both backwards) and the
overlap family (Dice/Jaccard losses, overlap sums, confusion matrix, scores).

On every machine, each op's forward and backward run on the kernel path (on
the CPU: Triton's interpreter behind the same launchers) while the calls
that would make the host wait for a CUDA device are counted: reading values
(``item``, ``tolist``, ``bool``/``int``/``float`` of a tensor, ``cpu``,
``numpy``), data-dependent shapes (``nonzero``, boolean-mask indexing,
``unique``, ``masked_select``) and host data put on the device
(``torch.tensor(..., device=...)``, ``.to(device)``/``.cuda()``/``copy_`` of
a tensor made from host values). Only calls made by segops' own code count
(not the tests', not Triton's interpreter). A first call may build the
launchers' content-keyed device tables; the counted call comes after it, on
fresh tensors at other addresses. Value checks (``validate_args``) take
their CUDA branch, a device-side assert, also on the CPU. The ops with
data-dependent output sizes (NMS) are counted with their one documented
sync.

On CUDA every sync-free op also runs under ``torch.cuda.set_sync_debug_mode
("error")`` and inside a captured CUDA graph, whose replay on new inputs is
compared with eager.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import sys
import weakref
from collections.abc import Callable

import pytest
import torch
from helpers import DEVICE, ON_GPU, RTOL, assert_close, deterministic

import segops
from segops import _checks, ops



# --------------------------------------------------------------------------
# counting the calls that would synchronise on CUDA
# --------------------------------------------------------------------------
_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy",
          "nonzero", "masked_select", "unique")
_TORCH_SHAPES = ("nonzero", "argwhere", "masked_select", "unique", "unique_consecutive")
_TORCH_FROM_HOST = ("tensor", "as_tensor", "from_numpy")


def _from_segops(depth: int = 2) -> str | None:
    """The calling module when it is segops' own code, else None."""
    caller = sys._getframe(depth).f_globals.get("__name__", "")
    return caller if caller.startswith("segops") else None


def _names_device(args, kwargs) -> bool:
    if kwargs.get("device") is not None:
        return True
    return any(isinstance(a, (torch.device, str, torch.Tensor)) for a in args)


def _bool_mask(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class SyncCounter:
    """Patches torch for the duration of a ``with`` block and lists (in
    ``calls``) each would-be synchronisation segops' code makes."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        self._host: set[int] = set()   # ids of live tensors made from host values
        self._active = False
        self._install(monkeypatch)

    @contextlib.contextmanager
    def counting(self):
        self.calls.clear()
        self._active = True
        try:
            with _BooleanMaskIndexing(self):
                yield self.calls
        finally:
            self._active = False

    def _record(self, what: str, module: str | None) -> None:
        if self._active and module is not None:
            self.calls.append(f"{what} in {module}")

    def _install(self, monkeypatch):
        for name in _READS:
            self._wrap(monkeypatch, torch.Tensor, name, lambda *a, **k: True, f"Tensor.{name}")
        for name in _TORCH_SHAPES:
            self._wrap(monkeypatch, torch, name, lambda *a, **k: True, f"torch.{name}")
        host = self._host
        self._wrap(monkeypatch, torch.Tensor, "to",
                   lambda t, *a, **k: id(t) in host and _names_device(a, k),
                   "host data .to(device)")
        self._wrap(monkeypatch, torch.Tensor, "cuda", lambda t, *a, **k: id(t) in host,
                   "host data .cuda()")
        self._wrap(monkeypatch, torch.Tensor, "copy_", lambda t, src, *a, **k: id(src) in host,
                   "copy_ of host data")
        for name in _TORCH_FROM_HOST:
            self._wrap_factory(monkeypatch, name)

    def _wrap(self, monkeypatch, owner, name, syncs: Callable[..., bool], what: str):
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            if self._active and syncs(*args, **kwargs):
                self._record(what, _from_segops())
            return original(*args, **kwargs)
        monkeypatch.setattr(owner, name, counted)

    def _wrap_factory(self, monkeypatch, name):
        original = getattr(torch, name)

        def factory(*args, **kwargs):
            out = original(*args, **kwargs)
            if not self._active:
                return out
            if kwargs.get("device") is not None:
                self._record(f"torch.{name}(..., device=...)", _from_segops())
            else:
                self._host.add(id(out))
                weakref.finalize(out, self._host.discard, id(out))
            return out
        monkeypatch.setattr(torch, name, factory)


class _BooleanMaskIndexing(torch.overrides.TorchFunctionMode):
    """Sees ``t[mask]`` and ``t[mask] = v`` with a boolean mask while a
    SyncCounter counts. (Not a patch of ``Tensor.__getitem__``: defining it
    on the class swaps CPython's C indexing slot for a generic one that
    deleting it does not restore, and ``torch.tensor`` of a list of tensors
    then fails in every later test of the process.)"""

    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and _bool_mask(args[1]):
            self.counter._record(f"Tensor.{func.__name__} with a boolean mask", _from_segops())
        return func(*args, **(kwargs or {}))


class KernelLaunches:
    """Names of the Triton kernels launched (compiled or interpreted)."""

    def __init__(self, monkeypatch):
        self.names: list[str] = []
        kind = type(importlib.import_module("segops.kernels.roi_align")._roi_align_fwd_kernel)
        original = kind.run

        def run(kernel, *args, **kwargs):
            self.names.append(kernel.fn.__name__)
            return original(kernel, *args, **kwargs)
        monkeypatch.setattr(kind, "run", run)


def _checks_stay_on_device(monkeypatch):
    """validate_args takes its CUDA branch (a device-side assert) on any
    device."""
    monkeypatch.setattr(_checks, "values_checked_on_device", lambda t: True)


# --------------------------------------------------------------------------
# the cases
# --------------------------------------------------------------------------
@dataclasses.dataclass
class Case:
    inputs: Callable[[], dict]            # fresh tensors on DEVICE
    forward: Callable[[dict], torch.Tensor]
    kernels: tuple[str, ...]              # launched by forward (+ backward)
    backward: bool = True
    deterministic: bool = False
    syncs: int = 0                        # expected in the forward (on CUDA)


def _features(*sizes, channels_last=False, dtype=torch.float32):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [torch.randn(2, 4, h, w, dtype=dtype, device=DEVICE).contiguous(memory_format=fmt)
            .requires_grad_() for h, w in sizes]


def _boxes(count: int, image: int):
    corner = torch.rand(count, 2) * image * 0.7
    size = torch.rand(count, 2) * image * 0.5 + 1.0
    return torch.cat([corner, corner + size], 1).to(DEVICE)


def _rois():
    return torch.cat([torch.tensor([[0.0], [1.0], [1.0]]), _boxes(3, 8).cpu()], 1).to(DEVICE)


def _roi_inputs(*sizes, channels_last=False):
    return lambda: {"x": _features(*sizes, channels_last=channels_last), "rois": _rois(),
                    "boxes": [_boxes(3, 32), _boxes(2, 32)]}


_FWD = ("_roi_align_fwd_kernel",)
_ATOMIC = _FWD + ("_roi_align_bwd_atomic_kernel",)
_GATHER = _FWD + ("_roi_align_bwd_deterministic_kernel",)
_LEVELS = ("_roi_levels_kernel",)
_SUMS = ("_overlap_sums_fwd_kernel", "_overlap_sums_bwd_kernel")
_LOSS = _SUMS + ("_overlap_loss_kernel", "_overlap_loss_bwd_kernel")
_ONE_LEVEL = _roi_inputs((6, 7))
_TWO_LEVELS = _roi_inputs((8, 8), (4, 4))


def _single(pool_mode="avg"):
    return lambda d: ops.roi_align(d["x"][0], d["rois"], 2, 1.0, 2, pool_mode=pool_mode)


def _multi(d):
    # canonical_scale=8 spreads these small boxes over both levels
    return ops.multi_scale_roi_align(d["x"], d["boxes"], 2, [0.25, 0.125], 2, canonical_scale=8)


def _scores(shape=(2, 4, 5, 6), dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, device=DEVICE).requires_grad_()


def _labels(shape=(2, 5, 6), classes=4, ignore=255):
    t = torch.randint(0, classes, shape)
    t[torch.rand(shape) < 0.2] = ignore
    return t.to(DEVICE)


def _overlap_inputs():
    return {"x": _scores(), "t": _labels()}


def _dice(d):
    return ops.dice_loss(d["x"], d["t"], ignore_index=255, classes=[0, -1],
                         class_weights=[1.0, 2.0, 3.0, 4.0])


def _jaccard_multilabel(d):
    return ops.jaccard_loss(d["x"], (d["x"].detach() > 0).float(), "multilabel", batch=False,
                            squared_pred=True, intersection="product")


def _sums(d):
    return ops.overlap_sums(d["x"], d["t"], activation="sigmoid", ignore_index=255,
                            intersection="min")


def _confusion_and_scores(d):
    scores = d["x"].detach()
    cm = ops.confusion_matrix(scores, d["t"], 4, 255)
    cm = cm + ops.confusion_matrix(scores.argmax(1), d["t"], 4, 255)
    return torch.stack([f(cm, average, ignore_index=255) for f in (ops.iou_score, ops.dice_score)
                        for average in ("micro", "macro", "weighted")])


def _nms_inputs():
    boxes = _boxes(12, 16)
    return {"boxes": boxes, "scores": torch.rand(12, device=DEVICE),
            "idxs": torch.arange(12, device=DEVICE) % 3,
            "images": torch.arange(12, device=DEVICE) // 6}


def _per_image(d):
    kept = ops.batched_nms_per_image(d["boxes"], d["scores"], d["idxs"], d["images"], 0.5,
                                     num_images=2)
    return torch.cat(kept)


CASES = {
    "roi_align avg": Case(_ONE_LEVEL, _single(), _ATOMIC),
    "roi_align max": Case(_ONE_LEVEL, _single("max"), _ATOMIC),
    "roi_align deterministic": Case(_ONE_LEVEL, _single(), _GATHER, deterministic=True),
    "roi_align max deterministic": Case(_ONE_LEVEL, _single("max"), _GATHER,
                                        deterministic=True),
    "roi_align channels_last": Case(_roi_inputs((6, 7), channels_last=True), _single(), _ATOMIC),
    "multi_scale_roi_align": Case(_TWO_LEVELS, _multi, _LEVELS + _ATOMIC),
    "multi_scale_roi_align deterministic": Case(_TWO_LEVELS, _multi, _LEVELS + _GATHER,
                                                deterministic=True),
    "dice_loss": Case(_overlap_inputs, _dice, _LOSS),
    "jaccard_loss multilabel": Case(_overlap_inputs, _jaccard_multilabel, _LOSS),
    "overlap_sums": Case(_overlap_inputs, _sums, _SUMS),
    "confusion_matrix, iou_score, dice_score": Case(
        _overlap_inputs, _confusion_and_scores, ("_confusion_matrix_kernel",), backward=False),
    # data-dependent output sizes: the number of kept boxes is read once
    "nms": Case(_nms_inputs, lambda d: ops.nms(d["boxes"], d["scores"], 0.5),
                ("_nms_mask_kernel",), backward=False, syncs=1),
    "batched_nms_per_image": Case(_nms_inputs, _per_image, ("_nms_mask_kernel",),
                                  backward=False, syncs=1),
}
SYNC_FREE = [name for name, case in CASES.items() if case.syncs == 0]


def _leaves(d) -> list[torch.Tensor]:
    flat = [t for v in d.values() for t in (v if isinstance(v, list) else [v])]
    return [t for t in flat if t.requires_grad]


def _run(case, d):
    out = case.forward(d)
    if case.backward:
        out.backward(torch.ones_like(out))
    return out


def _count(case, monkeypatch):
    """(forward calls, backward calls, kernels launched) after a warm-up."""
    counter = SyncCounter(monkeypatch)
    launches = KernelLaunches(monkeypatch)
    with deterministic(case.deterministic):
        warm = case.inputs()
        _run(case, warm)
        fresh = case.inputs()     # new allocations: `warm` still holds the old ones
        launches.names.clear()
        with counter.counting() as calls:
            out = case.forward(fresh)
        forward = list(calls)
        grad = torch.ones_like(out)
        with counter.counting() as calls:
            if case.backward:
                out.backward(grad)
        return forward, list(calls), launches.names


@pytest.mark.parametrize("name", list(CASES))
def test_hot_path_sync_count(name, monkeypatch):
    case = CASES[name]
    _checks_stay_on_device(monkeypatch)
    forward, backward, launched = _count(case, monkeypatch)
    assert len(forward) == case.syncs, forward
    assert backward == []
    missing = set(case.kernels) - set(launched)
    assert not missing, f"kernels not launched: {missing} (launched: {launched})"


def test_counter_sees_each_kind_of_sync(monkeypatch):
    """The counter itself: each kind of call it must catch, made from segops
    code (a module named segops.*), is caught once; harmless look-alikes and
    the same calls from a test are not."""
    counter = SyncCounter(monkeypatch)
    source = """
import torch
def syncs(t):
    t[0].item(); t.tolist(); bool(t[0]); int(t[0]); float(t[0]); t.cpu(); t.nonzero()
    t[t > 0]; torch.nonzero(t); torch.unique(t)
    torch.tensor([1.0], device=t.device)
    torch.tensor([1.0, 2.0]).to(t.device); t.copy_(torch.tensor([2.0, 3.0]))
def free(t):
    (t + 1).sum(); t.to(torch.float64); torch.tensor(1e-6, dtype=t.dtype) + t
    t[t.argmax()]; t[0:1].copy_(t[1:2]); t.to(t.device)
"""
    module = type(sys)("segops._sync_probe")
    exec(source, module.__dict__)
    t = torch.tensor([1.0, 2.0], device=DEVICE)
    with counter.counting() as calls:
        module.syncs(t)
        caught = list(calls)
        module.free(t)
        t[0].item()                   # from the test: not counted
    assert len(caught) == 13, caught
    assert calls == caught
    # and torch itself is left as it was (see _BooleanMaskIndexing)
    assert "__getitem__" not in torch.Tensor.__dict__
    assert torch.tensor([torch.tensor([0.5]), torch.tensor([0.25])]).tolist() == [0.5, 0.25]


@pytest.mark.skipif(ON_GPU, reason="a failed device-side assert leaves the CUDA context "
                    "unusable for the tests after it")
def test_device_checks_raise(monkeypatch):
    """The device-side branch of validate_args still refuses bad values (on
    the CPU, _assert_async raises at once)."""
    _checks_stay_on_device(monkeypatch)
    x = torch.randn(1, 2, 4, 4, device=DEVICE)
    bad_rois = torch.tensor([[1.0, 0, 0, 2, 2]], device=DEVICE)
    bad_labels = torch.tensor([[0, 7]], device=DEVICE)
    for call in (lambda: ops.roi_align(x, bad_rois, 2),
                 lambda: ops.dice_loss(torch.randn(1, 3, 2, device=DEVICE), bad_labels),
                 lambda: ops.confusion_matrix(bad_labels, bad_labels.clamp(max=2), 3)):
        with pytest.raises(RuntimeError, match="segops") as raised:
            call()
        assert not isinstance(raised.value, segops.ArgumentError)  # not the host-side check


# --------------------------------------------------------------------------
# on CUDA: sync debug mode and CUDA-graph capture
# --------------------------------------------------------------------------
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="host-device syncs and CUDA graphs need a GPU")


@contextlib.contextmanager
def _sync_debug_errors():
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@needs_gpu
@pytest.mark.parametrize("name", SYNC_FREE)
def test_no_sync_in_cuda_debug_mode(name):
    case = CASES[name]
    with deterministic(case.deterministic):
        _run(case, case.inputs())            # compiles, builds the tables
        d = case.inputs()
        torch.cuda.synchronize()
        with _sync_debug_errors():
            _run(case, d)
        torch.cuda.synchronize()


def _copy_into(static: dict, fresh: dict) -> None:
    with torch.no_grad():
        for key, value in static.items():
            pairs = zip(value, fresh[key]) if isinstance(value, list) else [(value, fresh[key])]
            for s, f in pairs:
                s.copy_(f)


@needs_gpu
@pytest.mark.parametrize("name", SYNC_FREE)
def test_cuda_graph_replay_matches_eager(name):
    """Forward and backward captured in one CUDA graph, replayed on new
    inputs copied into the captured ones, equal eager on those inputs."""
    case = CASES[name]
    with deterministic(case.deterministic):
        static = case.inputs()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                _run(case, static)
        torch.cuda.current_stream().wait_stream(side)
        for leaf in _leaves(static):
            leaf.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = _run(case, static)
        fresh = case.inputs()
        _copy_into(static, fresh)
        graph.replay()
        want = _run(case, fresh)
        torch.cuda.synchronize()
    tol = RTOL[torch.float32]
    assert_close(out, want, tol)
    for got, expected in zip(_leaves(static), _leaves(fresh)) if case.backward else ():
        assert_close(got.grad, expected.grad, tol, name="gradient")
