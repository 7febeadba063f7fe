"""MeanIoU / DiceScore: accumulation over batches, reset, and the sum across
ranks under torch.distributed (gloo, 2 CPU processes)."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import DEVICE, assert_close

import segops
from segops.reference import overlap as ref


def test_mean_iou_accumulates_batches():
    metric = segops.metrics.MeanIoU(num_classes=4, ignore_index=255)
    scores = [torch.randn(2, 4, 6, 7) for _ in range(3)]
    targets = [torch.randint(0, 4, (2, 6, 7)) for _ in range(3)]
    targets[1][0, 0] = 255
    for s, t in zip(scores, targets):
        metric.update(s.to(DEVICE), t.to(DEVICE))
    total = sum(ref.confusion_matrix(s, t, 4, 255) for s, t in zip(scores, targets))
    assert torch.equal(metric.confusion.cpu(), total)
    assert metric.confusion.dtype == torch.int64
    assert_close(metric.compute(), segops.ops.iou_score(total), 1e-12)
    assert_close(metric.compute(), segops.ops.iou_score(total), 1e-12)  # compute twice
    metric.reset()
    assert metric.confusion.sum() == 0


def test_dice_score_per_class():
    metric = segops.metrics.DiceScore(num_classes=3, average="none")
    t = torch.randint(0, 3, (2, 5, 5))
    metric.update(t.to(DEVICE), t.to(DEVICE))  # perfect labels
    assert torch.equal(metric.compute().cpu(), torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="average"):
        segops.metrics.DiceScore(num_classes=3, average="median")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, scores, targets, results):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        metric = segops.metrics.MeanIoU(num_classes=5)
        metric.update(scores[rank], targets[rank])
        results[rank] = (metric.compute().item(), metric.confusion.sum().item())
    finally:
        dist.destroy_process_group()


def test_mean_iou_sums_across_ranks():
    """Each rank sees half the data; compute() on every rank gives the mIoU of
    all of it, while the local state keeps only the rank's own counts."""
    scores = [torch.randn(2, 5, 6, 6) for _ in range(2)]
    targets = [torch.randint(0, 5, (2, 6, 6)) for _ in range(2)]
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_ddp_worker, args=(2, _free_port(), scores, targets, results), nprocs=2, join=True)
    total = sum(ref.confusion_matrix(s, t, 5, None) for s, t in zip(scores, targets))
    want = segops.ops.iou_score(total).item()
    for rank in range(2):
        miou, local_count = results[rank]
        assert abs(miou - want) < 1e-12
        assert local_count == 2 * 36
