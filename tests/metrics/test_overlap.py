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


def test_state_moves_to_the_counts_device_only_with_counts():
    """A fresh (or reset) metric makes its state on the device of the first
    counts (a copy from the host would wait for a GPU); counts already
    accumulated are moved. The meta device stands in for the other device."""
    scores, target = torch.randn(2, 3, 4, 5), torch.randint(0, 3, (2, 4, 5))
    counts = ref.confusion_matrix(scores, target, 3, None)
    metric = segops.metrics.MeanIoU(num_classes=3, validate_args=False)  # meta has no values
    metric.confusion = metric.confusion.to("meta")   # nothing counted: not copied
    metric.update(scores, target)
    assert metric.confusion.device.type == "cpu" and torch.equal(metric.confusion, counts)
    metric.update(scores.to("meta"), target.to("meta"))   # counted: moved
    assert metric.confusion.device.type == "meta"
    with pytest.raises(NotImplementedError, match="meta"):  # counted: copied back
        metric.update(scores, target)
    metric.reset()
    metric.update(scores, target)
    assert metric.confusion.device.type == "cpu" and torch.equal(metric.confusion, counts)


def test_dice_score_per_class():
    metric = segops.metrics.DiceScore(num_classes=3, average="none")
    t = torch.randint(0, 3, (2, 5, 5))
    metric.update(t.to(DEVICE), t.to(DEVICE))  # perfect labels
    assert torch.equal(metric.compute().cpu(), torch.ones(3, dtype=torch.float64))
    with pytest.raises(segops.ArgumentError, match="average"):
        segops.metrics.DiceScore(num_classes=3, average="median")


@pytest.mark.parametrize("num_classes,error", [(-1, segops.ArgumentError),
                                               (0, segops.ArgumentError),
                                               (2.5, segops.ArgumentTypeError),
                                               (None, segops.ArgumentTypeError)])
def test_num_classes_errors_name_the_argument(num_classes, error):
    for metric in (segops.metrics.MeanIoU, segops.metrics.DiceScore):
        with pytest.raises(error, match="num_classes"):
            metric(num_classes)
    with pytest.raises(segops.ArgumentTypeError, match="ignore_index"):
        segops.metrics.MeanIoU(3, ignore_index=1.5)


def _batches(C, ignore, seed_batches=2):
    scores = [torch.randn(2, C, 5, 6) for _ in range(seed_batches)]
    targets = [torch.randint(0, C, (2, 5, 6)) for _ in range(seed_batches)]
    return scores, targets


AVERAGES = ["macro", "micro", "weighted", "none"]


@pytest.mark.parametrize("average", AVERAGES)
@pytest.mark.parametrize("ignore", [1, 255, None])
def test_mean_iou_ignore_index_class_is_dropped_like_torchmetrics(average, ignore):
    """ignore_index = a valid class c: its target pixels are not counted and
    (torchmetrics' MulticlassJaccardIndex rule) class c leaves the macro and
    micro averages instead of adding an IoU of 0 from its predictions."""
    tm = pytest.importorskip("torchmetrics.classification")
    C = 4
    scores, targets = _batches(C, ignore)
    ours = segops.metrics.MeanIoU(C, ignore_index=ignore, average=average)
    theirs = tm.MulticlassJaccardIndex(num_classes=C, ignore_index=ignore, average=average)
    for s, t in zip(scores, targets):
        if ignore == 255:
            t[0, 0] = 255
        ours.update(s.to(DEVICE), t.to(DEVICE))
        theirs.update(s, t)
    got, want = ours.compute().cpu(), theirs.compute().double()
    present = ~torch.isnan(got)   # 'none': NaN where torchmetrics says 0 (absent)
    assert torch.equal(present | (want == 0), torch.ones_like(present))
    assert_close(got[present], want[present], 1e-6)


def test_zero_division_and_average_none_as_torchmetrics():
    """zero_division=0/1 and average=None give torchmetrics' numbers where
    a class is absent (here class 2), with and without an ignored class."""
    tm = pytest.importorskip("torchmetrics.classification")
    C = 4
    pred = torch.tensor([[0, 0, 1, 1, 3, 3]])     # class 3 predicted on a counted pixel
    target = torch.tensor([[0, 1, 1, 1, 3, 0]])
    for zero_division in (0, 1):
        for average in (None, "micro", "macro", "weighted"):
            for ignore_index in (None, 3):
                keyword = dict(average=average, ignore_index=ignore_index,
                               zero_division=zero_division)
                iou = segops.metrics.MeanIoU(C, **keyword)
                dice = segops.metrics.DiceScore(C, **keyword)
                iou.update(pred.to(DEVICE), target.to(DEVICE))
                dice.update(pred.to(DEVICE), target.to(DEVICE))
                name = str(keyword)
                assert_close(iou.compute(), tm.MulticlassJaccardIndex(C, **keyword)(pred, target),
                             1e-6, name=name)
                assert_close(dice.compute(), tm.MulticlassF1Score(C, **keyword)(pred, target),
                             1e-6, name=name)


def test_metric_pickled_before_zero_division_unpickles_with_nan():
    import pickle
    metric = segops.metrics.MeanIoU(3, average="none")
    metric.update(torch.tensor([[0, 1]]).to(DEVICE), torch.tensor([[0, 1]]).to(DEVICE))
    del metric.zero_division   # what an older segops pickled
    restored = pickle.loads(pickle.dumps(metric))
    assert torch.equal(restored.compute().cpu().isnan(), torch.tensor([False, False, True]))
    assert "zero_division=nan" in repr(restored)


def test_mean_iou_ignored_class_by_hand():
    """Class 1 ignored: its row is not counted, its false positives (column
    1) would give IoU 0; macro and micro leave class 1 out."""
    cm = torch.tensor([[3, 2, 0], [0, 0, 0], [1, 1, 4]])   # rows: target
    iou0, iou2 = 3 / (3 + 1 + 2), 4 / (4 + 0 + 2)
    iou = segops.ops.iou_score

    def f64(value):
        return torch.tensor(value, dtype=torch.float64)
    assert_close(iou(cm, "macro", ignore_index=1), f64((iou0 + iou2) / 2), 1e-12)
    assert_close(iou(cm, "macro"), f64((iou0 + iou2) / 3), 1e-12)
    tp, denom = 7, (3 + 1 + 2) + (4 + 0 + 2)
    assert_close(iou(cm, "micro", ignore_index=1), f64(tp / denom), 1e-12)
    assert iou(cm, "none", ignore_index=1)[1] == 0
    assert_close(iou(cm, "weighted", ignore_index=1), iou(cm, "weighted"), 1e-12)


@pytest.mark.parametrize("average", AVERAGES)
def test_dice_score_ignore_index_like_torchmetrics_f1(average):
    """torchmetrics' MulticlassF1Score keeps the ignored class in its
    averages (unlike its Jaccard index); DiceScore gives its numbers."""
    tm = pytest.importorskip("torchmetrics.classification")
    C = 4
    scores, targets = _batches(C, 1)
    ours = segops.metrics.DiceScore(C, ignore_index=1, average=average)
    theirs = tm.MulticlassF1Score(num_classes=C, ignore_index=1, average=average)
    for s, t in zip(scores, targets):
        ours.update(s.to(DEVICE), t.to(DEVICE))
        theirs.update(s, t)
    got, want = ours.compute().cpu(), theirs.compute().double()
    present = ~torch.isnan(got)
    assert_close(got[present], want[present], 1e-6)


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
        if rank < len(scores):
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


def test_a_rank_that_never_updated_joins_the_sum():
    """Rank 1 gets an empty shard: both ranks compute rank 0's mIoU, and rank
    1's local state stays empty."""
    scores, targets = [torch.randn(2, 5, 6, 6)], [torch.randint(0, 5, (2, 6, 6))]
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, _free_port(), scores, targets, results), nprocs=2, join=True)
    want = segops.ops.iou_score(ref.confusion_matrix(scores[0], targets[0], 5, None)).item()
    assert results[0] == (pytest.approx(want, abs=1e-12), 72)
    assert results[1] == (pytest.approx(want, abs=1e-12), 0)


@pytest.mark.parametrize("device, backend, cuda, want", [
    ("cpu", "nccl", True, "cuda"), ("cpu", "cpu:gloo,cuda:nccl", True, "cuda"),
    ("cpu", "undefined", True, "cuda"), ("cpu", "gloo", True, "cpu"),
    ("cpu", "nccl", False, "cpu"), ("meta", "gloo", True, "meta")])
def test_reduction_device_is_the_same_on_every_rank(device, backend, cuda, want, monkeypatch):
    """NCCL takes CUDA tensors only: whenever the backend sends CUDA tensors
    to it, every rank reduces on its current GPU, a rank that never called
    update (a CPU state) too, so that all join the same collective."""
    from segops.metrics.overlap import _reduction_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    got = _reduction_device(torch.device(device), backend)
    assert got.type == want


def test_synced_confusion_reduces_on_the_reduction_device(monkeypatch):
    """synced_confusion hands all_reduce the state moved where the backend
    reduces it (here a stand-in device and a recording all_reduce)."""
    from segops.metrics import overlap as metrics
    seen = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(dist, "all_reduce", lambda t, op: seen.append((t.device, op)))
    monkeypatch.setattr(metrics, "_reduction_device",
                        lambda device, backend: torch.device("meta") if backend == "nccl" else device)
    metric = segops.metrics.MeanIoU(num_classes=3)
    assert metric.synced_confusion().device == torch.device("meta")
    assert seen == [(torch.device("meta"), dist.ReduceOp.SUM)]
    assert metric.confusion.device == torch.device("cpu")


def test_synced_confusion_off_distributed_is_a_copy():
    """Without a process group synced_confusion returns a copy: writing to it
    leaves the metric's state (and the next compute) as it was."""
    metric = segops.metrics.MeanIoU(num_classes=3)
    t = torch.randint(0, 3, (2, 4, 5))
    metric.update(t, t)
    before = metric.confusion.clone()
    synced = metric.synced_confusion()
    assert torch.equal(synced, before)
    synced.zero_()
    assert torch.equal(metric.confusion, before)


def test_a_one_rank_group_does_not_communicate(monkeypatch):
    """An initialized default group of one rank is not distributed: compute()
    scores the local state without any all_reduce (nothing to sum)."""
    def no_collective(*args, **kwargs):
        raise AssertionError("all_reduce called for a one-rank group")

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 1)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "gloo")
    monkeypatch.setattr(dist, "all_reduce", no_collective)
    metric = segops.metrics.MeanIoU(num_classes=3)
    t = torch.randint(0, 3, (2, 4, 5))
    metric.update(t, t)
    assert torch.equal(metric.compute(), torch.ones(3, dtype=torch.float64).mean())
