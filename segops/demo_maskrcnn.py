"""`segops demo maskrcnn`: train the small Mask R-CNN (segops.models.
maskrcnn_small) on SyntheticInstances, print box and mask AP on a held-out
split, and write a PNG of predicted masks over validation images with each
instance's class and score. The default sizes finish in about five minutes
on a 2-core CPU."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from .data import SyntheticInstances, detection_collate
from .demo import _stepping, encode_png
from .models import maskrcnn_small
from .train import evaluate_detection, fit

# instance outline / fill colours per class: circle, rectangle, triangle
CLASS_COLOURS = torch.tensor([[230, 80, 60], [70, 160, 230], [250, 210, 60]], dtype=torch.uint8)


@dataclasses.dataclass
class MaskRCNNDemoConfig:
    epochs: int = 12
    train_images: int = 384
    val_images: int = 64
    size: int = 128
    batch_size: int = 4
    lr: float = 0.02
    seed: int = 0
    score_threshold: float = 0.5
    out: str = "segops-maskrcnn-demo.png"
    progress: bool = True


class _Cached(torch.utils.data.Dataset):
    """A dataset's items computed once (the synthetic images are drawn in
    Python; training reads each one ``epochs`` times)."""

    def __init__(self, dataset):
        self.items = [dataset[i] for i in range(len(dataset))]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def run(config: MaskRCNNDemoConfig) -> dict:
    """Train, evaluate, draw. Returns {'history', 'metrics', 'png', 'seconds'}."""
    torch.manual_seed(config.seed)
    start = time.perf_counter()
    train = _Cached(SyntheticInstances(config.train_images, config.size, split="train",
                                       seed=config.seed))
    val = SyntheticInstances(config.val_images, config.size, split="val", seed=config.seed)
    train_loader = DataLoader(train, batch_size=config.batch_size, shuffle=True,
                              collate_fn=detection_collate)
    val_loader = DataLoader(val, batch_size=8, collate_fn=detection_collate)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = maskrcnn_small(num_classes=len(SyntheticInstances.CLASSES),
                           min_size=config.size, max_size=config.size).to(device)
    print(f"Mask R-CNN, small FPN backbone ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}"
          f" M parameters) on SyntheticInstances ({len(train)} train / {len(val)} val images "
          f"of {config.size}^2), {device}", flush=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9,
                                weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, config.lr, total_steps=config.epochs * len(train_loader), pct_start=0.1)

    def report(record):
        print(f"epoch {record['epoch']:>2}  loss {record['loss']:.4f}  "
              f"({time.perf_counter() - start:.0f} s)", flush=True)

    history = fit(model, _stepping(train_loader, schedule), None, config.epochs,
                  optimizer=optimizer, device=device, progress=config.progress,
                  on_epoch_end=report)
    metrics = {k: float(v) for k, v in evaluate_detection(model, val_loader, device=device).items()
               if v.dim() == 0}
    print(f"validation box AP {metrics['bbox_map']:.3f} (AP50 {metrics['bbox_map_50']:.3f}), "
          f"mask AP {metrics['segm_map']:.3f} (AP50 {metrics['segm_map_50']:.3f})")
    png = write_detections(model, val, config.out, device, config.score_threshold)
    print(f"wrote {png}")
    return {"history": history, "metrics": metrics, "png": png,
            "seconds": time.perf_counter() - start}


@torch.no_grad()
def write_detections(model, dataset, path: str | Path, device, score_threshold: float = 0.5,
                     count: int = 6, scale: int = 2) -> Path:
    """PNG of ``count`` validation images in pairs: ground truth | the
    detections with score >= ``score_threshold`` (masks tinted by class,
    boxes outlined, each labelled with its class and score), scaled up
    ``scale`` times, under a title row."""
    model.eval()
    rows = []
    for i in range(min(count, len(dataset))):
        image, target = dataset[i]
        prediction = model([image.to(device)])[0]
        keep = prediction["scores"] >= score_threshold
        truth = _draw(image, target["masks"].bool(), target["boxes"], target["labels"], None,
                      scale)
        found = _draw(image, prediction["masks"][keep, 0].cpu() > 0.5,
                      prediction["boxes"][keep].cpu(), prediction["labels"][keep].cpu(),
                      prediction["scores"][keep].cpu(), scale)
        gap = torch.full((truth.shape[0], 4, 3), 255, dtype=torch.uint8)
        rows.append(torch.cat([truth, gap, found], dim=1))
        rows.append(torch.full((4, rows[-1].shape[1], 3), 255, dtype=torch.uint8))
    grid = torch.cat(rows[:-1], dim=0)
    header = _text_row(["ground truth", f"segops Mask R-CNN (score >= {score_threshold})"],
                       grid.shape[1], rows[0].shape[1] // 2)
    path = Path(path)
    path.write_bytes(encode_png(torch.cat([header, grid], dim=0)))
    return path.resolve()


def _draw(image: Tensor, masks: Tensor, boxes: Tensor, labels: Tensor, scores, scale: int
          ) -> Tensor:
    """(H*scale, W*scale, 3) uint8: the image with each instance's mask
    tinted, its box outlined and a label (class initial and score)."""
    canvas = (image.clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0)
    canvas = canvas.repeat_interleave(scale, 0).repeat_interleave(scale, 1).clone()
    for k in range(len(labels)):
        colour = CLASS_COLOURS[(int(labels[k]) - 1) % len(CLASS_COLOURS)]
        mask = masks[k].repeat_interleave(scale, 0).repeat_interleave(scale, 1)
        canvas[mask] = (canvas[mask].float() * 0.45 + colour.float() * 0.55).to(torch.uint8)
        x0, y0, x1, y1 = (int(v * scale) for v in boxes[k].tolist())
        _outline(canvas, x0, y0, x1 - 1, y1 - 1, colour)
        text = SyntheticInstances.CLASSES[int(labels[k])][0].upper()
        if scores is not None:
            text += f"{float(scores[k]):.2f}"[1:]
        _write(canvas, text, max(x0, 0), max(y0 - 8, 0), colour)
    return canvas


def _outline(canvas: Tensor, x0: int, y0: int, x1: int, y1: int, colour: Tensor) -> None:
    h, w, _ = canvas.shape
    x0, x1 = max(0, min(x0, w - 1)), max(0, min(x1, w - 1))
    y0, y1 = max(0, min(y0, h - 1)), max(0, min(y1, h - 1))
    canvas[y0, x0:x1 + 1] = colour
    canvas[y1, x0:x1 + 1] = colour
    canvas[y0:y1 + 1, x0] = colour
    canvas[y0:y1 + 1, x1] = colour


# a 3x5 pixel font for the labels and titles (digits, '.', capitals used)
_GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111",
    "3": "111001111001111", "4": "101101111001001", "5": "111100111001111",
    "6": "111100111101111", "7": "111001001001001", "8": "111101111101111",
    "9": "111101111001111", ".": "000000000000010", " ": "000000000000000",
    ">": "100010001010100", "=": "000111000111000", "(": "010100100100010",
    ")": "010001001001010", "-": "000000111000000",
}
_LETTERS = {
    "A": "010101111101101", "B": "110101110101110", "C": "011100100100011",
    "D": "110101101101110", "E": "111100110100111", "F": "111100110100100",
    "G": "011100101101011", "H": "101101111101101", "I": "111010010010111",
    "K": "101101110101101", "L": "100100100100111", "M": "101111111101101",
    "N": "110101101101101", "O": "010101101101010", "P": "110101110100100",
    "R": "110101110101101", "S": "011100010001110", "T": "111010010010010",
    "U": "101101101101111", "W": "101101111111101", "Y": "101101010010010",
}
_GLYPHS.update(_LETTERS)


def _write(canvas: Tensor, text: str, x: int, y: int, colour: Tensor, size: int = 1) -> None:
    """Draw ``text`` (upper-cased) with its top-left at (x, y), clipped."""
    h, w, _ = canvas.shape
    for i, char in enumerate(text.upper()):
        bits = _GLYPHS.get(char, _GLYPHS[" "])
        for j, bit in enumerate(bits):
            if bit != "1":
                continue
            top = y + (j // 3) * size
            left = x + (i * 4 + j % 3) * size
            if 0 <= top and top + size <= h and 0 <= left and left + size <= w:
                canvas[top:top + size, left:left + size] = colour


def _text_row(titles: list[str], width: int, column: int) -> Tensor:
    """A white strip with each title at the start of its column."""
    row = torch.full((16, width, 3), 255, dtype=torch.uint8)
    black = torch.zeros(3, dtype=torch.uint8)
    for i, title in enumerate(titles):
        _write(row, title, i * column + 4, 3, black, size=2)
    return row
