"""Model benchmarks: inference and a training step (forward, backward, AdamW
step) of segops' models against the same models in eager PyTorch /
torchvision, same weights, in the same run. bf16 autocast, channels_last.

* U-Net (base 64, depth 4, transposed-conv up-sampling) on 4x3x512^2;
  the baseline is the same model with its segops layers reverted to
  nn.ConvTranspose2d (segops.revert_model).
* FCN-ResNet50 and DeepLabV3-ResNet50 on 8x3x520^2 against torchvision's
  models loaded with the same state_dict. Loss: cross-entropy on random
  21-class (U-Net: 2-class) masks.
* Mask R-CNN (ResNet-50-FPN, 91 classes) on 2 images of 800x1216:
  ``segops.models.maskrcnn_resnet50_fpn`` against torchvision's
  ``maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)`` whose
  state_dict it loads (strict). Both use ``box_score_thresh=0.0`` and heads
  calibrated as tests/models/test_maskrcnn.py does (:func:`calibrate`), so
  that eval keeps 100 detections per image in both (at torchvision's init no
  score passes 0.05 and the mask head and pasting would not run). Both models
  are ``.to(memory_format=torch.channels_last)``. Eval: ``model(images)``
  (detections with pasted masks). Train step: ``model(images, targets)``
  with ``GT_BOXES`` random boxes and uint8 masks per image, the loss dict
  summed, backward, AdamW. Besides the timing, a separate instrumented pass
  (:func:`op_times`) reports the milliseconds per call spent in NMS, RoI
  pooling (both MultiScaleRoIAlign modules), mask pasting and mask targets
  in each model. Targets: eval >= 1.3x, train step >= 1.2x.

Throughput is images/s; ``ms`` is per batch. Targets for the other models:
>= 1.2x.

CPU rows (:func:`cpu_cases`, :func:`run_cpu`, issue 10 "Native path off the
GPU"): a model converted with ``segops.convert_model`` against the same model
unconverted, same weights, same CPU, float32, on the native path
(ATen/torchvision ops, what a CPU user gets without TRITON_INTERPRET). The
target is a ratio converted / unconverted within 1.05. Cases:

* torchvision's DeepLabV3-ResNet50 inference at 1x3x320^2, converted with
  the default ops (its dilated convs -> AtrousConv2d);
* a U-Net training step (forward, backward, AdamW), every conv and
  transposed conv converted (``ops=("conv", "conv_transpose")``) so every
  layer goes through segops' dispatch;
* torchvision's Mask R-CNN inference on one 128x128 image (RPN 64
  proposals, 4 detections), converted with the default ops (RoI pooling,
  detection parts, mask predictor).

``segops bench`` times the two models interleaved, wall clock, median of
``rep`` runs after ``warmup``; run ``python -m segops.benchmarks.models --cpu
[--quick]``. Under pytest each is a pytest-benchmark row.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import functools
import statistics
import time

import torch
import torch.nn.functional as F

import segops
from segops import _dispatch, models
from segops.train import logits_of

from .cases import CPU, Case, Step, release, run_cases, shared, to_record
from .harness import Record, add_speedups, format_table, peak_extra_memory, time_ms

# (name, batch, size (int: square; or (height, width)), classes)
CASES = [("unet", 4, 512, 2), ("fcn_resnet50", 8, 520, 21), ("deeplabv3_resnet50", 8, 520, 21),
         ("maskrcnn_resnet50_fpn", 2, (800, 1216), 91)]
QUICK_CASES = [CASES[0], CASES[2], CASES[3]]
DEVICE = "cuda"  # the smoke test runs this module on CPU at tiny sizes
UNET_WIDTH = 64
DIRECTIONS = ["infer", "train"]  # inference first: it sees the weights as built
TARGETS = {"infer": 1.2, "train": 1.2}
MASKRCNN_TARGETS = {"infer": 1.3, "train": 1.2}
DETECTION_KWARGS: dict = {}  # more constructor keywords for both Mask R-CNNs (the smoke test)
GT_BOXES = 4  # ground-truth instances per image in the Mask R-CNN training step
PART_RUNS = 3  # calls instrumented by op_times
# (warm-up ms, timed ms) per model step, do_bench's meaning: several calls each
WARMUP_MS, REP_MS = 200, 1500


def _is_detection(name: str) -> bool:
    return name.startswith("maskrcnn")


def _hw(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def _size_name(size) -> str:
    height, width = _hw(size)
    return f"{height}^2" if height == width else f"{height}x{width}"


def _pair(name: str, classes: int):
    """(segops model, baseline model) with identical weights."""
    if name == "unet":
        ours = models.unet(3, classes, base_channels=UNET_WIDTH, depth=4)
        theirs = segops.revert_model(copy.deepcopy(ours)).model
        return ours, theirs
    import torchvision.models.segmentation as tv
    theirs = getattr(tv, name)(weights=None, weights_backbone=None, num_classes=classes)
    ours = getattr(models, name)(num_classes=classes)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _prepare(model):
    return model.to(DEVICE).to(memory_format=torch.channels_last)


def _train_step(model, images, masks):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(images.device.type, dtype=torch.bfloat16):
            logits = logits_of(model(images))
        F.cross_entropy(logits.float(), masks).backward()
        optimizer.step()
    return step


def _inference(model, images):
    @torch.no_grad()
    def infer():
        with torch.autocast(images.device.type, dtype=torch.bfloat16):
            return logits_of(model(images))
    return infer


def _segmentation_inputs(name, batch, size, classes) -> dict:
    ours, theirs = _pair(name, classes)
    height, width = _hw(size)
    images = torch.randn(batch, 3, height, width, device=DEVICE).contiguous(
        memory_format=torch.channels_last)
    masks = torch.randint(0, classes, (batch, height, width), device=DEVICE)
    return {"segops": _prepare(ours), "eager": _prepare(theirs), "images": images,
            "masks": masks}


def _segmentation_setup(spec, direction, provider) -> Step:
    """One inference (no_grad) or training step of ``provider``'s model,
    bf16 autocast, channels_last, on the model's shared batch."""
    name, batch, size, classes = spec
    inputs = shared(("models", spec, DEVICE, UNET_WIDTH), lambda: _segmentation_inputs(*spec))
    model, images = inputs[provider], inputs["images"]
    if direction == "train":
        fn = _train_step(model.train(), images, inputs["masks"])
    else:
        fn = _inference(model.eval(), images)
    return Step(fn, items=batch, warmup=WARMUP_MS, rep=REP_MS)


# --------------------------------------------------------------------------
# Mask R-CNN
# --------------------------------------------------------------------------
def calibrate(model):
    """A random-init Mask R-CNN made fit for parity checks (the tests and
    this benchmark use it): BatchNorm statistics from one train-mode pass
    over random images (random affine parameters), head weights that spread
    the objectness and class scores (torchvision's init gives ~equal scores,
    whose NMS order no one specifies) with small deltas. BatchNorm's momentum
    is left at its default afterwards."""
    with torch.no_grad():
        norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for m in norms:
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.2, 0.2)
            m.reset_running_stats()
            m.momentum = None
        model.backbone.train()(torch.rand(4, 3, 64, 64) * 2 - 1)
        for m in norms:
            m.momentum = 0.1
        model.rpn.head.cls_logits.weight.normal_(0, 0.001)
        model.rpn.head.bbox_pred.weight.mul_(0.01)
        predictor = model.roi_heads.box_predictor
        predictor.cls_score.weight.normal_(0, 0.002)
        predictor.bbox_pred.weight.mul_(0.1)
    return model


def _detection_pair(classes: int):
    """(segops' Mask R-CNN, torchvision's) with torchvision's calibrated
    weights loaded into segops' (strict)."""
    import torchvision.models.detection as tv
    options = {"num_classes": classes, "box_score_thresh": 0.0, **DETECTION_KWARGS}
    torch.manual_seed(0)
    theirs = calibrate(tv.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **options))
    ours = models.maskrcnn_resnet50_fpn(**options)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def _random_targets(height, width, classes, generator) -> dict:
    """GT_BOXES boxes (sides 10-50% of the image), labels in 1..classes-1 and
    uint8 masks filling each box."""
    scale = torch.tensor([width, height], dtype=torch.float32)
    sides = torch.empty(GT_BOXES, 2).uniform_(0.1, 0.5, generator=generator) * scale
    corner = torch.rand(GT_BOXES, 2, generator=generator) * (scale - sides)
    boxes = torch.cat([corner, corner + sides], 1).floor()
    masks = torch.zeros(GT_BOXES, height, width, dtype=torch.uint8)
    for i, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
        masks[i, y0:y1, x0:x1] = 1
    labels = torch.randint(1, classes, (GT_BOXES,), generator=generator)
    return {"boxes": boxes.to(DEVICE), "labels": labels.to(DEVICE), "masks": masks.to(DEVICE)}


def _detection_inputs(name, batch, size, classes) -> dict:
    ours, theirs = _detection_pair(classes)
    height, width = _hw(size)
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, height, width, generator=generator).to(DEVICE) for _ in range(batch)]
    targets = [_random_targets(height, width, classes, generator) for _ in range(batch)]
    return {"segops": _prepare(ours), "torchvision": _prepare(theirs), "images": images,
            "targets": targets}


def _detection_train_step(model, images, targets):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(images[0].device.type, dtype=torch.bfloat16):
            losses = model(images, targets)
        sum(losses.values()).backward()
        optimizer.step()
    return step


def _detection_inference(model, images):
    @torch.no_grad()
    def infer():
        with torch.autocast(images[0].device.type, dtype=torch.bfloat16):
            return model(images)
    return infer


def op_sites(provider: str, model) -> dict[str, list[tuple[object, str]]]:
    """Where each op is called from in ``provider``'s Mask R-CNN: (object,
    attribute) pairs whose callable :func:`op_times` wraps. RoI pooling is
    the two MultiScaleRoIAlign modules' forward (torchvision: level mapping,
    one roi_align per level, index_put; segops: one launch)."""
    pools = [(model.roi_heads.box_roi_pool, "forward"), (model.roi_heads.mask_roi_pool, "forward")]
    if provider == "torchvision":
        import torchvision.models.detection.roi_heads as tv_heads
        import torchvision.models.detection.transform as tv_transform
        import torchvision.ops.boxes as tv_boxes
        return {"nms": [(tv_boxes, "batched_nms")], "roi_align": pools,
                "paste": [(tv_transform, "paste_masks_in_image")],
                "mask_targets": [(tv_heads, "project_masks_on_boxes")]}
    from segops.models.detection import roi_heads, rpn, transform
    return {"nms": [(rpn, "batched_nms_per_image"), (roi_heads, "batched_nms_per_image")],
            "roi_align": pools, "paste": [(transform, "paste_masks")],
            "mask_targets": [(roi_heads, "mask_targets")]}


class _OpClock:
    """Brackets each call of a wrapped callable with CUDA events (the wall
    clock off the GPU) and sums the spans per name."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.spans = collections.defaultdict(list)

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            start = self._mark()
            out = fn(*args, **kwargs)
            self.spans[name].append((start, self._mark()))
            return out
        return timed

    def totals_ms(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
            return {n: sum(s.elapsed_time(e) for s, e in spans) for n, spans in self.spans.items()}
        return {n: sum(e - s for s, e in spans) * 1e3 for n, spans in self.spans.items()}


@contextlib.contextmanager
def _wrapped(sites: dict, clock: _OpClock):
    """Every site's callable replaced by ``clock.wrap(name, it)`` inside the
    block; a missing attribute fails loudly (a renamed call site)."""
    saved = []
    try:
        for name, places in sites.items():
            for obj, attr in places:
                original = getattr(obj, attr)
                saved.append((obj, attr, attr in vars(obj), original))
                setattr(obj, attr, clock.wrap(name, original))
        yield
    finally:
        for obj, attr, had, original in reversed(saved):
            if had:
                setattr(obj, attr, original)
            else:
                delattr(obj, attr)


def op_times(fn, sites: dict, runs: int = PART_RUNS) -> tuple[dict, object]:
    """(milliseconds per call of ``fn`` spent inside each op of ``sites``,
    the last call's output), over ``runs`` calls with every site wrapped
    (CUDA events around each op call: stream time from the op's first launch
    to its last kernel's end, host syncs inside included). Separate from the
    timed runs, which carry no wrappers or events."""
    clock = _OpClock(cuda=DEVICE == "cuda" and torch.cuda.is_available())
    with _wrapped(sites, clock):
        for _ in range(runs):
            out = fn()
    totals = clock.totals_ms()
    return {f"{name}_ms": totals.get(name, 0.0) / runs for name in sites}, out


def _detection_parts(fn, provider, model, direction) -> dict:
    times, out = op_times(fn, op_sites(provider, model))
    if direction == "infer":
        times["detections"] = sum(len(o["boxes"]) for o in out)
    return times


def _detection_setup(spec, direction, provider) -> Step:
    """One eval call (detections with pasted masks, no_grad) or training
    step (losses summed, backward, AdamW) of ``provider``'s Mask R-CNN, bf16
    autocast, channels_last; parts: time in NMS / RoI pooling / pasting /
    mask targets."""
    name, batch, size, classes = spec
    inputs = shared(("models", spec, DEVICE, tuple(sorted(DETECTION_KWARGS.items()))),
                    lambda: _detection_inputs(*spec))
    model, images = inputs[provider], inputs["images"]
    if direction == "train":
        fn = _detection_train_step(model.train(), images, inputs["targets"])
    else:
        fn = _detection_inference(model.eval(), images)
    return Step(fn, items=batch, warmup=WARMUP_MS, rep=REP_MS,
                parts=lambda: _detection_parts(fn, provider, model, direction))


def cases(quick: bool = False) -> list[Case]:
    """Every model (quick: U-Net, DeepLabV3, Mask R-CNN) x pass (inference,
    training step) x provider (segops, then the eager/torchvision twin)."""
    out = []
    for spec in QUICK_CASES if quick else CASES:
        name, batch, size, classes = spec
        detection = _is_detection(name)
        setup = _detection_setup if detection else _segmentation_setup
        targets = MASKRCNN_TARGETS if detection else TARGETS
        shape = f"{name} {batch}x3x{_size_name(size)}"
        for direction in DIRECTIONS:
            for provider in ("segops", "torchvision" if detection else "eager"):
                out.append(Case("models", "model", shape, "bf16-autocast", "channels_last",
                                direction, provider,
                                functools.partial(setup, spec, direction, provider),
                                target=targets[direction]))
    return out


def run(quick: bool = False) -> list[Record]:
    return run_cases(cases(quick), timer=time_ms, memory=peak_extra_memory)


# --------------------------------------------------------------------------
# CPU: converted vs unconverted, native path
# --------------------------------------------------------------------------
# (name, direction, batch, size, classes, convert_model's ops)
DETECTION_OPS = ("atrous_conv", "conv_transpose", "roi_align", "detection")
CPU_CASES = [("deeplabv3_resnet50", "infer", 1, 320, 21, ("atrous_conv", "conv_transpose")),
             ("unet", "train", 2, 192, 2, ("conv", "conv_transpose")),
             ("maskrcnn_resnet50_fpn", "infer", 1, 128, 91, DETECTION_OPS)]
# the same at toy sizes (`pytest benchmarks/ --bench-tiny`: seconds in all)
TINY_CPU_CASES = [("deeplabv3_resnet50", "infer", 1, 64, 21, ("atrous_conv", "conv_transpose")),
                  ("unet", "train", 1, 64, 2, ("conv", "conv_transpose")),
                  ("maskrcnn_resnet50_fpn", "infer", 1, 96, 91, DETECTION_OPS)]
CPU_UNET_WIDTH = 32  # U-Net depth 4: 23 convs and transposed convs
TINY_UNET_WIDTH = 8
CPU_MASKRCNN_KWARGS = {"box_score_thresh": 0.0, "rpn_pre_nms_top_n_test": 200,
                       "rpn_post_nms_top_n_test": 64, "box_detections_per_img": 4}
CPU_TARGET = 1.05  # converted / unconverted
CPU_PROVIDERS = ["segops", "eager"]  # converted, unconverted


def _cpu_plain(name: str, classes: int, size: int, width: int):
    """The unconverted model: plain torch / torchvision."""
    if name == "unet":
        return segops.revert_model(models.unet(3, classes, base_channels=width, depth=4)).model
    if _is_detection(name):
        import torchvision.models.detection as tv
        return tv.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=classes,
                                        min_size=size, max_size=size, **CPU_MASKRCNN_KWARGS)
    import torchvision.models.segmentation as tv
    return getattr(tv, name)(weights=None, weights_backbone=None, num_classes=classes)


def _cpu_pair(name: str, classes: int, ops, size: int = 0, width: int | None = None):
    """(converted, unconverted, number of layers converted): the unconverted
    model is plain torch/torchvision; the converted one a deep copy through
    segops.convert_model (same weights)."""
    plain = _cpu_plain(name, classes, size, width or CPU_UNET_WIDTH)
    report = segops.convert_model(plain, ops=ops, inplace=False)
    return report.model, plain, len(report)


def _plain_train_step(model, images, masks):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(logits_of(model(images)), masks).backward()
        optimizer.step()
    return step


def _plain_inference(model, images):
    @torch.no_grad()
    def infer():
        return logits_of(model(images))
    return infer


def _plain_detection(model, images):
    @torch.no_grad()
    def infer():
        return model(images)
    return infer


def _native(fn):
    """``fn`` on segops' native CPU path (what CPU users get, also under
    TRITON_INTERPRET)."""
    def run():
        with _dispatch.native_only():
            return fn()
    return run


def _cpu_inputs(spec, width) -> dict:
    name, direction, batch, size, classes, ops = spec
    torch.manual_seed(0)
    ours, theirs, converted = _cpu_pair(name, classes, ops, size, width)
    if _is_detection(name):
        images = [torch.rand(3, size, size) for _ in range(batch)]
    else:
        images = torch.randn(batch, 3, size, size)
    masks = torch.randint(0, classes, (batch, size, size))
    return {"segops": ours, "eager": theirs, "converted": converted, "images": images,
            "masks": masks}


def _cpu_setup(spec, provider, width) -> Step:
    """One float32 call on the CPU, native path: ``provider`` 'segops' is the
    converted model, 'eager' the unconverted one (inference under no_grad,
    or a training step with AdamW)."""
    name, direction, batch, size, classes, ops = spec
    inputs = shared(("models-cpu", spec, width), lambda: _cpu_inputs(spec, width))
    model, images = inputs[provider], inputs["images"]
    model.train(direction == "train")
    if direction == "train":
        fn = _plain_train_step(model, images, inputs["masks"])
    elif _is_detection(name):
        fn = _plain_detection(model, images)
    else:
        fn = _plain_inference(model, images)
    return Step(_native(fn), items=batch, note=f"{inputs['converted']} conv.")


def cpu_cases(quick: bool = False, *, tiny: bool = False, specs=None,
              width: int | None = None) -> list[Case]:
    """The CPU rows (``device="cpu"``): each spec of ``specs`` (default
    CPU_CASES, or TINY_CPU_CASES with ``tiny``) converted ('segops') and
    unconverted ('eager'). Target: converted within 5% of unconverted."""
    specs = specs or (TINY_CPU_CASES if tiny else CPU_CASES)
    width = width or (TINY_UNET_WIDTH if tiny else CPU_UNET_WIDTH)
    out = []
    for spec in specs:
        name, direction, batch, size, classes, ops = spec
        for provider in CPU_PROVIDERS:
            out.append(Case("models", "model-cpu", f"{name} {batch}x3x{size}^2", "float32",
                            "nchw", direction, provider,
                            functools.partial(_cpu_setup, spec, provider, width),
                            device=CPU, target=1 / CPU_TARGET))
    return out


def cpu_time_ms(fns: dict, *, warmup: int = 2, rep: int = 7) -> dict:
    """Per ``fns[name]``: (median wall-clock ms, minimum wall-clock ms, median
    process CPU ms) of ``fns[name]()``, the callables run in turn (A B A B
    ...) so that drifts and other load on the machine hit them alike. The
    CPU time (all threads) is the steadier number on a shared machine."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for _ in range(rep):
        for name, fn in fns.items():
            start_cpu, start = time.process_time(), time.perf_counter()
            fn()
            wall[name].append((time.perf_counter() - start) * 1e3)
            cpu[name].append((time.process_time() - start_cpu) * 1e3)
    return {name: (statistics.median(wall[name]), min(wall[name]), statistics.median(cpu[name]))
            for name in fns}


def _cpu_verdict(shape: str, direction: str, ms: dict) -> str:
    ratios = [ours_ms / eager_ms for ours_ms, eager_ms in zip(ms["segops"], ms["eager"])]
    verdict = "ok" if ratios[0] <= CPU_TARGET else f"over the {CPU_TARGET:.2f} target"
    return (f"{shape} {direction}: converted / unconverted = {ratios[0]:.3f} ({verdict}); "
            f"wall median {ms['segops'][0]:.1f} vs {ms['eager'][0]:.1f} ms, "
            f"wall min {ms['segops'][1]:.1f} vs {ms['eager'][1]:.1f} ms "
            f"(ratio {ratios[1]:.3f}), CPU time {ms['segops'][2]:.1f} vs "
            f"{ms['eager'][2]:.1f} ms (ratio {ratios[2]:.3f})")


def run_cpu(quick: bool = False, *, cases=None, warmup: int = 2, rep: int = 7) -> list[Record]:
    """CPU rows (``segops bench`` off the GPU): each spec of ``cases``
    (default CPU_CASES) timed converted ('segops') and unconverted ('eager')
    on the native path, interleaved (:func:`cpu_time_ms`); prints converted /
    unconverted."""
    records = []
    rows = cpu_cases(quick, specs=cases or CPU_CASES, width=CPU_UNET_WIDTH)
    try:
        for pair in (rows[i:i + 2] for i in range(0, len(rows), 2)):
            steps = {case.provider: case.setup() for case in pair}
            ms = cpu_time_ms({p: s.fn for p, s in steps.items()}, warmup=warmup,
                             rep=1 if quick else rep)
            records += [to_record(case, steps[case.provider], ms[case.provider][0], None)
                        for case in pair]
            print(_cpu_verdict(records[-1].shape, pair[0].direction, ms), flush=True)
    finally:
        release()
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the CPU rows (converted vs not)")
    parser.add_argument("--quick", action="store_true", help="one timed run per model")
    parser.add_argument("--rep", type=int, default=7)
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA device: pass --cpu for the CPU rows")
    records = run_cpu(args.quick, rep=args.rep) if args.cpu else run(args.quick)
    add_speedups(records)
    print(format_table(records))
    print(f"machine: {torch.get_num_threads()} CPU threads, torch {torch.__version__}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
