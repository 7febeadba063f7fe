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
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

import segops
from segops import models
from segops.train import logits_of

from .harness import Record, peak_extra_memory, time_ms

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
