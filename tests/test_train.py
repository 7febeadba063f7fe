"""SyntheticShapes, the training loop (fit/evaluate, DDP) and the demo's code
path at tiny size."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import DEVICE
from torch.utils.data import DataLoader

import segops
from segops import _dispatch, _draw, demo, models, train
from segops.data import SyntheticShapes


def test_synthetic_shapes_is_deterministic_and_labelled():
    ds = SyntheticShapes(8, 32, seed=3)
    image, mask = ds[5]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert mask.shape == (32, 32) and mask.dtype == torch.int64
    assert torch.equal(ds[5][0], image) and torch.equal(SyntheticShapes(8, 32, seed=3)[5][1], mask)
    assert not torch.equal(SyntheticShapes(8, 32, split="val", seed=3)[5][0], image)
    labels = torch.cat([ds[i][1].flatten() for i in range(len(ds))]).unique().tolist()
    assert labels[0] == 0 and set(labels) <= {0, 1, 2, 3} and len(labels) >= 3
    with pytest.raises(IndexError):
        ds[8]
    with pytest.raises(ValueError, match="split"):
        SyntheticShapes(split="holdout")


def _loader(n=8, size=16, batch=4):
    return DataLoader(SyntheticShapes(n, size), batch_size=batch)


def test_fit_and_evaluate():
    model = models.unet(3, 4, base_channels=4, depth=2)
    history = train.fit(model, _loader(), segops.nn.DiceLoss("multiclass"), epochs=2,
                        device=DEVICE, val_loader=_loader(4), num_classes=4, progress=False,
                        channels_last=True)
    assert [r["epoch"] for r in history] == [1, 2]
    assert all(0 <= r["miou"] <= 1 and len(r["iou"]) == 4 for r in history)
    iou = train.evaluate(model, _loader(4), 4, device=DEVICE)
    assert iou.shape == (4,)


@pytest.mark.parametrize("ignore_index", [0, 3, 255])
def test_evaluate_and_fit_leave_the_ignored_label_out(ignore_index):
    """evaluate's nanmean is the macro mIoU of MeanIoU (and torchmetrics)
    with the same ignore_index: an ignored class is NaN in the per-class
    IoU (average='none' reports it, 0 where predicted); fit validates with
    the ignore_index it is given (a void label 255 raised before)."""
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 3, 1).to(DEVICE)
    images = torch.randn(2, 3, 8, 8)
    masks = torch.randint(0, 3, (2, 8, 8))
    masks[:, :2] = ignore_index
    iou = train.evaluate(model, [(images, masks)], 3, device=DEVICE, ignore_index=ignore_index)
    metric = segops.metrics.MeanIoU(3, ignore_index=ignore_index)
    with torch.no_grad():
        metric.update(model(images.to(DEVICE)), masks.to(DEVICE))
    assert iou.nanmean().item() == pytest.approx(metric.compute().item(), abs=1e-12)
    assert torch.isnan(iou[0]).item() == (ignore_index == 0)
    history = train.fit(model, [(images, masks.clamp(max=2))], lambda out, m: out.mean(),
                        device=DEVICE, val_loader=[(images, masks)], num_classes=3,
                        ignore_index=ignore_index, progress=False, lr=0.0)
    assert history[0]["miou"] == pytest.approx(metric.compute().item(), abs=1e-12)


def test_aux_loss_is_added_with_its_weight():
    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.out = torch.nn.Conv2d(3, 4, 1)
            self.aux = torch.nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return {"out": self.out(x), "aux": self.aux(x)}

    model = TwoHeads()
    images, masks = next(iter(_loader()))
    loss = torch.nn.functional.cross_entropy
    with torch.no_grad():
        want = loss(model.out(images), masks) + 0.5 * loss(model.aux(images), masks)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    got = train.train_step(model, images, masks, loss, optimizer, aux_weight=0.5)
    assert abs(got - want.item()) < 1e-6
    assert model.aux.weight.grad is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="autocast training needs CUDA")
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_fit_with_amp(amp):
    model = models.unet(3, 4, base_channels=4, depth=2)
    history = train.fit(model, _loader(), segops.nn.DiceLoss("multiclass"), device=DEVICE,
                        amp=amp, channels_last=True, progress=False)
    assert torch.isfinite(torch.tensor(history[0]["loss"]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join_gloo(rank: int, world: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _ddp_worker(rank, world, port, results):
    _join_gloo(rank, world, port)
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(models.unet(3, 4, 4, 2))
        data = SyntheticShapes(8, 16)
        sampler = torch.utils.data.distributed.DistributedSampler(data, shuffle=False)
        loader = DataLoader(data, batch_size=4, sampler=sampler)
        history = train.fit(model, loader, segops.nn.DiceLoss("multiclass"), epochs=1,
                            val_loader=loader, num_classes=4, progress=False)
        results[rank] = (history[0]["miou"],
                         model.module.head.weight.detach().clone())
    finally:
        dist.destroy_process_group()


def test_ddp_step_keeps_ranks_in_sync():
    """Two gloo processes, each with half the data: one epoch (one step)
    leaves identical weights on both ranks and the same reduced mIoU."""
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, _free_port(), results), nprocs=2, join=True)
    assert results[0][0] == results[1][0]
    assert torch.equal(results[0][1], results[1][1])


def test_demo_code_path_at_tiny_size(tmp_path, capsys):
    config = demo.DemoConfig(epochs=1, train_images=8, val_images=4, size=16, batch_size=4,
                             base_channels=4, depth=2, out=str(tmp_path / "grid.png"),
                             progress=False)
    result = demo.run(config)
    png = result["png"].read_bytes()
    assert png.startswith(b"\x89PNG")
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width == 3 * 128 + 2 * 4  # image | truth | prediction, 16 px scaled to 128
    assert height == 16 + 4 * (128 + 4) + 16  # titles, 4 rows, legend
    assert len(result["history"]) == 1 and 0 <= result["miou"] <= 1
    out = capsys.readouterr().out
    assert "epoch  1" in out and "mIoU" in out and "wrote" in out


def test_demo_picture_has_titles_legend_and_per_image_miou():
    rgb = demo._legend(400)
    assert (rgb[3:13, 4:14] == demo.PALETTE[0]).all()  # the background swatch
    row = _draw.title_row(["image", "ground truth"], 300, 150)
    ink = (row == 0).all(dim=-1)
    assert ink[:, :140].any() and ink[:, 150:].any() and not ink[:, 140:150].any()
    pred = torch.tensor([[0, 1], [1, 1]])
    mask = torch.tensor([[0, 1], [0, 1]])
    assert demo.image_miou(pred, mask, 4) == (1 / 2 + 2 / 3) / 2


def test_png_encoder_round_trip():
    pytest.importorskip("PIL")
    import io

    from PIL import Image
    rgb = torch.randint(0, 256, (5, 7, 3), dtype=torch.uint8)
    import numpy as np
    decoded = Image.open(io.BytesIO(demo.encode_png(rgb))).convert("RGB")
    assert torch.equal(torch.from_numpy(np.asarray(decoded).copy()), rgb)


# ------------------------------------------------------------- detection
def _detection_loader(count, size=48):
    from torch.utils.data import DataLoader
    data = segops.data.SyntheticInstances(count, size, split="train", max_shapes=2)
    return DataLoader(data, batch_size=2, collate_fn=segops.data.detection_collate)


def test_fit_and_evaluate_a_detector_with_the_same_loop():
    torch.manual_seed(0)
    model = models.maskrcnn_small(num_classes=4, width=4, fpn_channels=8, min_size=48,
                                  max_size=48)
    before = [p.detach().clone() for p in model.parameters()]
    with _dispatch.native_only():  # the loop, not the kernels (tests/models has those)
        history = train.fit(model, _detection_loader(4), epochs=1, progress=False,
                            channels_last=True, device="cpu")
        metrics = train.evaluate_detection(model, _detection_loader(2))
    assert len(history) == 1 and torch.isfinite(torch.tensor(history[0]["loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert model.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    for key in ("bbox_map", "bbox_map_50", "segm_map", "segm_map_50"):
        assert -1 <= float(metrics[key]) <= 1


def test_train_step_needs_a_loss_for_segmentation_batches():
    model = models.unet(3, 2, base_channels=4, depth=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="loss_fn is required"):
        train.train_step(model, torch.rand(1, 3, 16, 16), torch.zeros(1, 16, 16).long(), None,
                         optimizer)


def test_maskrcnn_demo_code_path_at_tiny_size(tmp_path, capsys):
    from segops import demo_maskrcnn
    config = demo_maskrcnn.MaskRCNNDemoConfig(epochs=1, train_images=4, val_images=2, size=48,
                                              out=str(tmp_path / "det.png"), progress=False,
                                              score_threshold=0.0)
    with _dispatch.native_only():
        result = demo_maskrcnn.run(config)
    png = result["png"].read_bytes()
    assert png.startswith(b"\x89PNG")
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width == 2 * 2 * 48 + 4 and height > 2 * 2 * 48  # two scaled columns, title row
    assert set(result["metrics"]) >= {"bbox_map", "segm_map", "segm_map_50"}
    out = capsys.readouterr().out
    assert "mask AP" in out and "box AP" in out and "wrote" in out


def test_fit_on_an_empty_loader_reports_nan_not_zero():
    """No batch, no loss: a 0.0 would read as a perfect epoch."""
    model = torch.nn.Conv2d(3, 4, 1)
    history = train.fit(model, [], torch.nn.functional.cross_entropy, progress=False)
    assert history[0]["loss"] != history[0]["loss"]  # NaN


def test_evaluate_restores_training_mode_when_the_loader_fails():
    model = torch.nn.Conv2d(3, 4, 1)

    def batches():
        yield torch.randn(1, 3, 4, 4), torch.randint(0, 4, (1, 4, 4))
        raise RuntimeError("loader broke")

    with pytest.raises(RuntimeError, match="loader broke"):
        train.evaluate(model, batches(), 4)
    assert model.training


def _ddp_loss_worker(rank, world, port, results):
    _join_gloo(rank, world, port)
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Conv2d(3, 4, 1))
        g = torch.Generator().manual_seed(rank)
        batch = (torch.randn(2, 3, 4, 4, generator=g), torch.randint(0, 4, (2, 4, 4), generator=g))
        with torch.no_grad():
            local = torch.nn.functional.cross_entropy(model.module(batch[0]), batch[1]).item()
        history = train.fit(model, [batch], torch.nn.functional.cross_entropy, lr=0.0,
                            progress=False)
        results[rank] = (local, history[0]["loss"])
    finally:
        dist.destroy_process_group()


def test_ddp_epoch_loss_is_the_mean_over_every_ranks_batches():
    """The record's loss, like its mIoU, is the same on every rank: the mean
    over all ranks' batches, not rank 0's shard alone."""
    results = mp.Manager().dict()
    mp.spawn(_ddp_loss_worker, args=(2, _free_port(), results), nprocs=2, join=True)
    want = (results[0][0] + results[1][0]) / 2
    assert results[0][1] == pytest.approx(want, rel=1e-6)
    assert results[1][1] == pytest.approx(want, rel=1e-6)
