"""Model benchmarks: a training step (forward, backward, AdamW step) and
inference of segops' models against the same models in eager PyTorch /
torchvision, same weights, in the same run. bf16 autocast, channels_last.

* U-Net (base 64, depth 4, transposed-conv up-sampling) on 4x3x512^2;
  the baseline is the same model with its segops layers reverted to
  nn.ConvTranspose2d (segops.revert_model).
* FCN-ResNet50 and DeepLabV3-ResNet50 on 8x3x520^2 against torchvision's
  models loaded with the same state_dict.

Throughput is images/s; ``ms`` is per batch. Loss: cross-entropy on random
21-class (U-Net: 2-class) masks.

CPU rows (:func:`run_cpu`, issue 10 "Native path off the GPU"): a model
converted with ``segops.convert_model`` against the same model unconverted,
same weights, same CPU, float32, on the native path (ATen/torchvision ops,
what a CPU user gets without TRITON_INTERPRET). The target is a ratio
converted / unconverted within 1.05. Cases:

* torchvision's DeepLabV3-ResNet50 inference at 1x3x320^2, converted with
  the default ops (its dilated convs -> AtrousConv2d);
* a U-Net training step (forward, backward, AdamW), every conv and
  transposed conv converted (``ops=("conv", "conv_transpose")``) so every
  layer goes through segops' dispatch.

Timing is wall-clock (``time.perf_counter``), the two models interleaved,
median of ``rep`` runs after ``warmup``. Run ``python -m
segops.benchmarks.models --cpu [--quick]``.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

import segops
from segops import models
from segops.train import logits_of

from .harness import Record, add_speedups, format_table, peak_extra_memory, time_ms

# (name, batch, size, classes)
CASES = [("unet", 4, 512, 2), ("fcn_resnet50", 8, 520, 21), ("deeplabv3_resnet50", 8, 520, 21)]
QUICK_CASES = [CASES[0], CASES[2]]
DEVICE = "cuda"  # the smoke test runs this module on CPU at tiny sizes
UNET_WIDTH = 64


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


def run(quick: bool = False) -> list[Record]:
    records = []
    for name, batch, size, classes in QUICK_CASES if quick else CASES:
        ours, theirs = _pair(name, classes)
        images = torch.randn(batch, 3, size, size, device=DEVICE).contiguous(
            memory_format=torch.channels_last)
        masks = torch.randint(0, classes, (batch, size, size), device=DEVICE)
        shape = f"{name} {batch}x3x{size}^2 cl"
        for provider, model in (("segops", ours), ("eager", theirs)):
            model = _prepare(model)
            for direction, fn in (("train", _train_step(model.train(), images, masks)),
                                  ("infer", _inference(model, images))):
                if direction == "infer":
                    model.eval()
                ms = time_ms(fn, warmup=5, rep=20)
                records.append(Record(op="model", shape=shape, dtype="bf16-autocast",
                                      direction=direction, provider=provider, ms=ms,
                                      extra_memory_mb=peak_extra_memory(fn) / 2**20,
                                      items_per_s=batch / ms * 1e3))
            model.cpu()
        del ours, theirs, images, masks
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return records


# --------------------------------------------------------------------------
# CPU: converted vs unconverted, native path
# --------------------------------------------------------------------------
# (name, direction, batch, size, classes, convert_model's ops)
CPU_CASES = [("deeplabv3_resnet50", "infer", 1, 320, 21, ("atrous_conv", "conv_transpose")),
             ("unet", "train", 2, 192, 2, ("conv", "conv_transpose"))]
CPU_UNET_WIDTH = 32  # U-Net depth 4: 23 convs and transposed convs
CPU_TARGET = 1.05  # converted / unconverted


def _cpu_pair(name: str, classes: int, ops):
    """(converted, unconverted, number of layers converted): the unconverted
    model is plain torch/torchvision; the converted one a deep copy through
    segops.convert_model (same weights)."""
    if name == "unet":
        plain = segops.revert_model(models.unet(3, classes, base_channels=CPU_UNET_WIDTH,
                                                depth=4)).model
    else:
        import torchvision.models.segmentation as tv
        plain = getattr(tv, name)(weights=None, weights_backbone=None, num_classes=classes)
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


def run_cpu(quick: bool = False, *, cases=None, warmup: int = 2, rep: int = 7) -> list[Record]:
    """CPU rows: each case timed converted ('segops') and unconverted
    ('eager') on the native path; prints converted / unconverted."""
    from .. import _dispatch
    records = []
    for name, direction, batch, size, classes, ops in cases or CPU_CASES:
        torch.manual_seed(0)
        ours, theirs, converted = _cpu_pair(name, classes, ops)
        images = torch.randn(batch, 3, size, size)
        masks = torch.randint(0, classes, (batch, size, size))
        make = _plain_train_step if direction == "train" else _plain_inference
        fns = {}
        for provider, model in (("segops", ours), ("eager", theirs)):
            model.train(direction == "train")
            fns[provider] = make(model, images, masks) if direction == "train" \
                else make(model, images)
        with _dispatch.native_only():  # what CPU users get (also under TRITON_INTERPRET)
            ms = cpu_time_ms(fns, warmup=warmup, rep=1 if quick else rep)
        shape = f"{name} {batch}x3x{size}^2 ({converted} conv.)"
        for provider in fns:
            records.append(Record(op="model-cpu", shape=shape, dtype="float32",
                                  direction=direction, provider=provider, ms=ms[provider][0],
                                  items_per_s=batch / ms[provider][0] * 1e3))
        ratios = [ours_ms / eager_ms for ours_ms, eager_ms in zip(ms["segops"], ms["eager"])]
        verdict = "ok" if ratios[0] <= CPU_TARGET else f"over the {CPU_TARGET:.2f} target"
        print(f"{shape} {direction}: converted / unconverted = {ratios[0]:.3f} ({verdict}); "
              f"wall median {ms['segops'][0]:.1f} vs {ms['eager'][0]:.1f} ms, "
              f"wall min {ms['segops'][1]:.1f} vs {ms['eager'][1]:.1f} ms "
              f"(ratio {ratios[1]:.3f}), CPU time {ms['segops'][2]:.1f} vs "
              f"{ms['eager'][2]:.1f} ms (ratio {ratios[2]:.3f})", flush=True)
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
