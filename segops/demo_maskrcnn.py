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
from ._draw import encode_png, outline, title_row, upscale, write_text
from .demo import _stepping
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
    header = title_row(["ground truth", f"segops Mask R-CNN (score >= {score_threshold})"],
                       grid.shape[1], rows[0].shape[1] // 2)
    path = Path(path)
    path.write_bytes(encode_png(torch.cat([header, grid], dim=0)))
    return path.resolve()


def _draw(image: Tensor, masks: Tensor, boxes: Tensor, labels: Tensor, scores, scale: int
          ) -> Tensor:
    """(H*scale, W*scale, 3) uint8: the image with each instance's mask
    tinted, its box outlined and a label (class initial and score)."""
    canvas = (image.clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0)
    canvas = upscale(canvas, scale).clone()
    for k in range(len(labels)):
        colour = CLASS_COLOURS[(int(labels[k]) - 1) % len(CLASS_COLOURS)]
        mask = upscale(masks[k], scale)
        canvas[mask] = (canvas[mask].float() * 0.45 + colour.float() * 0.55).to(torch.uint8)
        x0, y0, x1, y1 = (int(v * scale) for v in boxes[k].tolist())
        outline(canvas, x0, y0, x1 - 1, y1 - 1, colour)
        text = SyntheticInstances.CLASSES[int(labels[k])][0].upper()
        if scores is not None:
            text += f"{float(scores[k]):.2f}".lstrip("0")
        write_text(canvas, text, max(x0, 0), max(y0 - 8, 0), colour)
    return canvas
