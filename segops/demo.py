"""`segops demo`: train a small U-Net on SyntheticShapes with the fused
Dice + cross-entropy loss, print mIoU per epoch, and write a PNG grid of
image / ground truth / prediction. Its default sizes finish in under three
minutes on a 2-core CPU."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from ._draw import encode_png, title_row, upscale, write_text
from .data import SyntheticShapes
from .models import unet
from .nn import DiceLoss
from .train import evaluate, fit, logits_of

# class colours for the masks: background, circle, rectangle, triangle
PALETTE = torch.tensor([[20, 20, 20], [230, 80, 60], [70, 160, 230], [250, 210, 60]],
                       dtype=torch.uint8)


@dataclasses.dataclass
class DemoConfig:
    epochs: int = 10
    train_images: int = 768
    val_images: int = 128
    size: int = 64
    batch_size: int = 16
    base_channels: int = 16
    depth: int = 3
    lr: float = 3e-3
    seed: int = 0
    out: str = "segops-demo.png"
    progress: bool = True


class DiceCrossEntropy(torch.nn.Module):
    """Cross-entropy plus segops' fused multiclass Dice loss, on logits."""

    def __init__(self):
        super().__init__()
        self.dice = DiceLoss("multiclass")

    def forward(self, logits: Tensor, masks: Tensor) -> Tensor:
        return F.cross_entropy(logits, masks) + self.dice(logits, masks)


def run(config: DemoConfig) -> dict:
    """Train, report, draw. Returns {'history', 'miou', 'png', 'seconds'}."""
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    train = SyntheticShapes(config.train_images, config.size, split="train", seed=config.seed)
    val = SyntheticShapes(config.val_images, config.size, split="val", seed=config.seed)
    train_loader = DataLoader(train, batch_size=config.batch_size, shuffle=True)
    val_loader = DataLoader(val, batch_size=64)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = unet(3, train.num_classes, base_channels=config.base_channels, depth=config.depth)
    model.to(device)
    print(f"U-Net ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters) on "
          f"SyntheticShapes ({len(train)} train / {len(val)} val images of {config.size}^2), "
          f"{device}", flush=True)

    def report(record):
        print(f"epoch {record['epoch']:>2}  loss {record['loss']:.4f}  mIoU {record['miou']:.3f}  "
              f"({time.perf_counter() - start:.0f} s)", flush=True)

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    steps = config.epochs * len(train_loader)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=steps)
    history = fit(model, _stepping(train_loader, schedule), DiceCrossEntropy(), config.epochs,
                  optimizer=optimizer, device=device, val_loader=val_loader,
                  num_classes=train.num_classes, progress=config.progress, on_epoch_end=report)
    iou = evaluate(model, val_loader, train.num_classes, device=device)
    names = ", ".join(f"{n} {v:.3f}" for n, v in zip(SyntheticShapes.CLASSES, iou.tolist()))
    print(f"validation IoU: {names}")
    png = write_grid(model, val, config.out, device)
    print(f"wrote {png}")
    return {"history": history, "miou": float(iou.nanmean()), "png": png,
            "seconds": time.perf_counter() - start}


class _stepping:
    """A loader that advances a per-batch learning-rate schedule."""

    def __init__(self, loader, schedule):
        self.loader, self.schedule = loader, schedule

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield batch
            self.schedule.step()


@torch.no_grad()
def write_grid(model, dataset: SyntheticShapes, path: str | Path, device, rows: int = 4,
               tile: int = 128) -> Path:
    """PNG of ``rows`` validation images under a title row: image | ground
    truth | prediction (labelled with the image's mIoU), each scaled to at
    least ``tile`` pixels, and a legend of the class colours."""
    model.eval()
    scale = max(1, -(-tile // dataset.size))
    gap = 4
    lines = []
    for i in range(min(rows, len(dataset))):
        image, mask = dataset[i]
        pred = logits_of(model(image[None].to(device))).argmax(1)[0].cpu()
        shown = image - image.amin()
        shown = (shown / shown.amax().clamp(min=1e-6) * 255).to(torch.uint8).permute(1, 2, 0)
        tiles = [upscale(t, scale) for t in (shown, PALETTE[mask], PALETTE[pred])]
        tiles[2] = tiles[2].clone()
        write_text(tiles[2], f"MIOU {image_miou(pred, mask, len(PALETTE)):.2f}", 3, 3,
                   torch.tensor([255, 255, 255], dtype=torch.uint8), size=2)
        white = torch.full((tiles[0].shape[0], gap, 3), 255, dtype=torch.uint8)
        lines.append(torch.cat([tiles[0], white, tiles[1], white, tiles[2]], dim=1))
        lines.append(torch.full((gap, lines[-1].shape[1], 3), 255, dtype=torch.uint8))
    width = lines[0].shape[1]
    column = dataset.size * scale + gap
    grid = torch.cat([title_row(["image", "ground truth", "prediction"], width, column),
                      *lines, _legend(width)], dim=0)
    path = Path(path)
    path.write_bytes(encode_png(grid))
    return path.resolve()


def image_miou(pred: Tensor, mask: Tensor, num_classes: int) -> float:
    """Mean IoU over the classes present in the prediction or the mask."""
    ious = []
    for c in range(num_classes):
        union = ((pred == c) | (mask == c)).sum()
        if union > 0:
            ious.append(float(((pred == c) & (mask == c)).sum()) / float(union))
    return sum(ious) / len(ious)


def _legend(width: int) -> Tensor:
    """A white strip with a swatch and the name of each class."""
    strip = torch.full((16, width, 3), 255, dtype=torch.uint8)
    x = 4
    for name, colour in zip(SyntheticShapes.CLASSES, PALETTE):
        strip[3:13, x:x + 10] = colour
        write_text(strip, name, x + 14, 3, torch.zeros(3, dtype=torch.uint8), size=2)
        x += 14 + 8 * len(name) + 12
    return strip
