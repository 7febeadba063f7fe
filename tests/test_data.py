"""SyntheticInstances (instance targets in torchvision's detection format) and
detection_collate. SyntheticShapes is tested in test_train.py."""
import pytest
import torch
from torch.utils.data import DataLoader

import segops
from segops.data import SyntheticInstances, SyntheticShapes, detection_collate


def _items(ds):
    return [ds[i] for i in range(len(ds))]


def test_item_contract():
    ds = SyntheticInstances(6, 64, max_shapes=4, seed=1)
    assert len(ds) == 6 and ds.num_classes == 4
    for index, (image, target) in enumerate(_items(ds)):
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32
        assert 0 <= image.min() and image.max() <= 1
        k = len(target["labels"])
        expected = {"boxes": ((k, 4), torch.float32), "labels": ((k,), torch.int64),
                    "masks": ((k, 64, 64), torch.uint8), "image_id": ((), torch.int64),
                    "area": ((k,), torch.float32), "iscrowd": ((k,), torch.int64)}
        assert target.keys() == expected.keys()
        for key, (shape, dtype) in expected.items():
            assert target[key].shape == shape and target[key].dtype == dtype, key
        assert int(target["image_id"]) == index
        assert target["iscrowd"].eq(0).all()
        assert target["masks"].le(1).all()


def test_is_deterministic_and_splits_differ():
    image, target = SyntheticInstances(4, 48, seed=3)[2]
    again_image, again_target = SyntheticInstances(4, 48, seed=3)[2]
    assert torch.equal(image, again_image)
    for key in target:
        assert torch.equal(target[key], again_target[key]), key
    for other in (SyntheticInstances(4, 48, split="val", seed=3),
                  SyntheticInstances(4, 48, split="test", seed=3),
                  SyntheticInstances(4, 48, seed=4)):
        assert not torch.equal(other[2][0], image)
    assert not torch.equal(SyntheticInstances(4, 48, seed=3)[1][0], image)


def test_boxes_are_the_bounding_boxes_of_the_visible_masks():
    for image, target in _items(SyntheticInstances(12, 64, max_shapes=5)):
        for box, mask, area in zip(target["boxes"], target["masks"], target["area"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            want = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
            assert torch.equal(box, want)
            assert area == mask.sum()


def test_masks_are_disjoint_visible_and_large_enough():
    ds = SyntheticInstances(16, 64, max_shapes=6, min_area=16)
    saw_occlusion = False
    for image, target in _items(ds):
        masks = target["masks"].bool()
        assert masks.sum(0).le(1).all()                    # disjoint
        assert target["area"].ge(16).all()
        # each instance's pixels are painted in one colour family: the
        # shapes are brighter than the background everywhere they are visible
        if len(masks):
            assert image[:, masks.any(0)].amax(0).gt(0.45).all()
        saw_occlusion |= len(masks) > 0 and bool((masks.sum((1, 2)) < 0.9 * masks.sum()).any())
    assert saw_occlusion


def test_small_visible_parts_are_dropped():
    ds = SyntheticInstances(40, 32, max_shapes=6, seed=2)
    strict = SyntheticInstances(40, 32, max_shapes=6, seed=2, min_area=200)
    kept = sum(len(t["labels"]) for _, t in _items(ds))
    kept_strict = sum(len(t["labels"]) for _, t in _items(strict))
    assert kept_strict < kept
    for (image, target), (strict_image, strict_target) in zip(_items(ds), _items(strict)):
        assert torch.equal(image, strict_image)            # same pixels, fewer instances
        assert strict_target["area"].ge(200).all()


def test_labels_cover_the_three_shapes():
    labels = torch.cat([t["labels"] for _, t in _items(SyntheticInstances(20, 64))])
    assert set(labels.tolist()) == {1, 2, 3}
    assert SyntheticInstances.CLASSES == ("background", "circle", "rectangle", "triangle")


def test_labels_name_the_shape_drawn():
    # lone, unclipped shapes: a circle fills pi/4 of its square box, a
    # rectangle all of its box, a triangle at most half of it
    fill = {1: [], 2: [], 3: []}
    for _, target in _items(SyntheticInstances(30, 96, max_shapes=1)):
        (label,), (box,), (area,) = target["labels"], target["boxes"], target["area"]
        w, h = box[2] - box[0], box[3] - box[1]
        if box.min() > 0 and box.max() < 96:
            fill[int(label)].append(float(area / (w * h)))
            if label == 1:
                assert abs(w - h) <= 1
    assert all(len(v) >= 2 for v in fill.values()), fill
    assert all(abs(f - torch.pi / 4) < 0.08 for f in fill[1])
    assert all(f == 1.0 for f in fill[2])
    assert all(f < 0.56 for f in fill[3])


def test_detection_collate_with_a_dataloader():
    ds = SyntheticInstances(5, 32)
    images, targets = detection_collate([ds[0], ds[1]])
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == 2
    assert torch.equal(images[1], ds[1][0]) and torch.equal(targets[0]["boxes"], ds[0][1]["boxes"])
    batches = list(DataLoader(ds, batch_size=2, collate_fn=detection_collate))
    assert [len(images) for images, _ in batches] == [2, 2, 1]
    assert detection_collate([]) == ([], [])
    with pytest.raises(ValueError, match="pairs"):
        detection_collate([ds[0][0]])


@pytest.mark.parametrize("kwargs,error,name", [
    (dict(split="holdout"), ValueError, "split"),
    (dict(length=-1), ValueError, "length"),
    (dict(length=1_000_004), ValueError, "length"),
    (dict(size=8), ValueError, "size"),
    (dict(max_shapes=0), ValueError, "max_shapes"),
    (dict(min_area=0), ValueError, "min_area"),
    (dict(size=32.5), TypeError, "size"),
    (dict(seed="a"), TypeError, "seed"),
])
def test_bad_arguments_name_the_argument(kwargs, error, name):
    with pytest.raises(error, match=name):
        SyntheticInstances(**kwargs)
    with pytest.raises((segops.ArgumentError, segops.ArgumentTypeError)):
        SyntheticInstances(**kwargs)


def test_items_of_other_splits_and_seeds_are_other_images():
    """The largest dataset allowed (1 000 003 items): its last item is not
    the next split's or seed's first (every item has a seed of its own),
    for both datasets; one item more is refused."""
    for cls, size in ((SyntheticInstances, 16), (SyntheticShapes, 8)):
        last = cls(1_000_003, size, split="train")[1_000_002][0]
        for other in (cls(1, size, split="val"), cls(1, size, split="test", seed=-1)):
            assert not torch.equal(last, other[0][0])
        with pytest.raises(ValueError, match="length"):
            cls(1_000_004, size)


def test_index_out_of_range():
    ds = SyntheticInstances(3, 32)
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(IndexError):
        ds[-1]
    with pytest.raises(TypeError):
        ds[1.5]


def test_perfect_predictions_from_the_targets_score_one():
    """The dataset's targets plug straight into MeanAveragePrecision."""
    ds = SyntheticInstances(4, 48)
    images, targets = detection_collate(_items(ds))
    preds = [dict(boxes=t["boxes"], labels=t["labels"], scores=torch.ones(len(t["labels"])),
                  masks=t["masks"][:, None].float()) for t in targets]
    out = segops.metrics.mean_average_precision(preds, targets)
    assert out["bbox_map"].item() == pytest.approx(1.0, abs=1e-12)
    assert out["segm_map"].item() == pytest.approx(1.0, abs=1e-12)


def test_synthetic_shapes_takes_numpy_and_tensor_indices():
    """Subset(ds, numpy array) hands the dataset numpy ints, as
    SyntheticInstances already accepts."""
    np = pytest.importorskip("numpy")
    ds = SyntheticShapes(4, 16)
    batch = next(iter(DataLoader(torch.utils.data.Subset(ds, np.arange(2, 4)), batch_size=2)))
    assert torch.equal(batch[1][0], ds[2][1]) and torch.equal(batch[1][1], ds[3][1])
    assert torch.equal(ds[torch.tensor(3)][1], ds[3][1])
    with pytest.raises(TypeError):
        ds[1.5]
    with pytest.raises(TypeError, match="seed"):
        SyntheticShapes(4, 16, seed=0.5)
    with pytest.raises(ValueError, match="size"):
        SyntheticShapes(4, 7)


@pytest.mark.parametrize("cls, size", [(SyntheticShapes, 8), (SyntheticInstances, 16)])
def test_any_int_seed_draws_items(cls, size):
    """64-bit seeds (torch.initial_seed(), `segops demo --seed`) draw items
    too; seeds that fitted before give the same items as before."""
    for seed in (2**43, 2**63, -(2**70)):
        a, b = cls(2, size, seed=seed)[1], cls(2, size, seed=seed)[1]
        assert torch.equal(a[0], b[0])
    for seed, split, index in ((-1, 2, 5), (7, 1, 1_000_002)):
        old = torch.Generator().manual_seed((seed * 3 + split) * 1_000_003 + index)
        assert torch.equal(segops.data._item_generator(seed, split, index).get_state(),
                           old.get_state())
