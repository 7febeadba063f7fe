"""Mask R-CNN: torchvision's keys and checkpoints load, eval and training
match torchvision in float64 (detections present, not vacuous), the kernel
path matches the reference path, convert_model on torchvision's model,
errors, compile."""
import copy

import pytest
import torch
from helpers import DEVICE, RTOL, assert_close

import segops
from segops import _dispatch
from segops.benchmarks.models import calibrate  # BatchNorm statistics, spread-out scores
from segops.models import (
    detection,
    maskrcnn_resnet50_fpn,
    maskrcnn_resnet50_fpn_v2,
    maskrcnn_small,
)
from segops.models.detection import _utils as seg_utils
from segops.models.detection import roi_heads as seg_roi_heads

tv_detection = pytest.importorskip("torchvision.models.detection")
F64 = RTOL[torch.float64]
SMALL = dict(num_classes=4, min_size=64, max_size=96, box_score_thresh=0.0,
             box_detections_per_img=12, rpn_post_nms_top_n_test=60)


# ------------------------------------------------------------------ helpers
def torchvision_pair(version="v1", **kwargs):
    """(torchvision's model, segops' with its state_dict), float64, eval."""
    build = {"v1": (tv_detection.maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn),
             "v2": (tv_detection.maskrcnn_resnet50_fpn_v2, maskrcnn_resnet50_fpn_v2)}[version]
    options = {**SMALL, **kwargs}
    theirs = calibrate(build[0](weights=None, weights_backbone=None, **options))
    ours = build[1](**options)
    ours.load_state_dict(theirs.state_dict())
    return theirs.double().eval().to(DEVICE), ours.double().eval().to(DEVICE)


def detect(model, x):
    """Eval outputs on the native path off the GPU (the interpreter would
    take minutes on ResNet-50 heads; the kernel path has its own test)."""
    with torch.no_grad(), _dispatch.native_only():
        return model(x)


def images(*sizes, generator=None):
    return [torch.rand(3, h, w, dtype=torch.float64, generator=generator).to(DEVICE)
            for h, w in sizes]


def assert_same_detections(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert set(g) == set(w) == {"boxes", "labels", "scores", "masks"}
        assert torch.equal(g["labels"], w["labels"])
        for key in ("boxes", "scores", "masks"):
            assert g[key].shape == w[key].shape, key
            assert g[key].dtype == w[key].dtype, key
            assert_close(g[key], w[key], F64, name=key)


class FirstSampler:
    """A deterministic fg/bg sampler (the first positives and negatives in
    index order) to inject into both models: their random streams differ."""

    def __init__(self, batch_size_per_image, positive_fraction):
        self.batch_size = batch_size_per_image
        self.fraction = positive_fraction

    def __call__(self, labels):
        positives, negatives = [], []
        for label in labels:
            pos, neg = torch.where(label >= 1)[0], torch.where(label == 0)[0]
            num_pos = min(pos.numel(), int(self.batch_size * self.fraction))
            num_neg = min(neg.numel(), self.batch_size - num_pos)
            for chosen, out in ((pos[:num_pos], positives), (neg[:num_neg], negatives)):
                mask = torch.zeros_like(label, dtype=torch.uint8)
                mask[chosen] = 1
                out.append(mask)
        return positives, negatives


def rectangle_targets(sizes, counts, generator, dtype=torch.float64):
    targets = []
    for (h, w), k in zip(sizes, counts):
        masks = torch.zeros(k, h, w, dtype=torch.uint8)
        boxes = []
        for i in range(k):
            x0, y0 = (int(torch.randint(0, s // 2, (1,), generator=generator)) for s in (w, h))
            x1 = x0 + 8 + int(torch.randint(0, w // 2 - 8, (1,), generator=generator))
            y1 = y0 + 8 + int(torch.randint(0, h // 2 - 8, (1,), generator=generator))
            masks[i, y0:y1, x0 + 2:x1] = 1  # the mask need not fill its box
            boxes.append([x0, y0, x1, y1])
        targets.append({"boxes": torch.tensor(boxes, dtype=dtype).reshape(-1, 4).to(DEVICE),
                        "labels": torch.randint(1, 4, (k,), generator=generator).to(DEVICE),
                        "masks": masks.to(DEVICE)})
    return targets


def train_losses_and_grads(model, imgs, targets):
    model.train()
    model.rpn.fg_bg_sampler = FirstSampler(256, 0.5)
    model.roi_heads.fg_bg_sampler = FirstSampler(64, 0.25)
    model.zero_grad()
    with _dispatch.native_only():
        losses = model(imgs, copy.deepcopy(targets))
        sum(losses.values()).backward()
    return losses, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------- keys and loading
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_state_dict_keys_and_shapes_are_torchvisions(version):
    build = {"v1": (tv_detection.maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn),
             "v2": (tv_detection.maskrcnn_resnet50_fpn_v2, maskrcnn_resnet50_fpn_v2)}[version]
    theirs = build[0](weights=None, weights_backbone=None).state_dict()
    ours = build[1]().state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    if version == "v1":
        assert len(ours) == 360 and sum(k.endswith("num_batches_tracked") for k in ours) == 53


def frozen_torchvision_v1(num_classes=91):
    """torchvision's v1 as built for trained weights (FrozenBatchNorm2d,
    307 keys), without downloading any."""
    from torchvision.models import resnet50
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import FrozenBatchNorm2d
    backbone = _resnet_fpn_extractor(resnet50(norm_layer=FrozenBatchNorm2d), 3)
    return tv_detection.MaskRCNN(backbone, num_classes=num_classes)


def test_loads_a_frozen_batch_norm_checkpoint_both_ways():
    state = frozen_torchvision_v1().state_dict()
    assert len(state) == 307
    maskrcnn_resnet50_fpn().load_state_dict(state, strict=True)  # BatchNorm2d model
    trained = maskrcnn_resnet50_fpn(weights=state)
    frozen = [m for m in trained.modules() if isinstance(m, detection.FrozenBatchNorm2d)]
    assert len(frozen) == 53 and all(m.eps == 0.0 for m in frozen)
    trainable = {n.split(".")[1] for n, p in trained.backbone.named_parameters()
                 if p.requires_grad and n.startswith("body.")}
    assert trainable == {"layer2", "layer3", "layer4"}  # trainable_backbone_layers=3


def test_loads_torchvision_pre_0_13_key_names():
    theirs = tv_detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    state = theirs.state_dict()
    old = type(state)()
    renames = {"rpn.head.conv.0.0.": "rpn.head.conv."}
    renames.update({f"roi_heads.mask_head.{i}.0.": f"roi_heads.mask_head.mask_fcn{i + 1}."
                    for i in range(4)})
    renames.update({f"backbone.fpn.{b}.{i}.0.": f"backbone.fpn.{b}.{i}."
                    for b in ("inner_blocks", "layer_blocks") for i in range(4)})
    for key, value in state.items():
        for new, legacy in renames.items():
            if key.startswith(new):
                key = legacy + key[len(new):]
        old[key] = value
    old._metadata = {k: dict(v) for k, v in state._metadata.items()}
    for prefix in ("rpn.head", "roi_heads.mask_head", "backbone.fpn"):
        old._metadata[prefix]["version"] = 1
    assert "roi_heads.mask_head.mask_fcn1.weight" in old and "rpn.head.conv.weight" in old
    ours = maskrcnn_resnet50_fpn()
    ours.load_state_dict(old, strict=True)
    for key, value in state.items():
        assert torch.equal(ours.state_dict()[key], value), key


def test_backbone_weights_and_trainable_layers():
    body = maskrcnn_resnet50_fpn().backbone.body.state_dict()
    classifier = {k: torch.randn_like(v, dtype=torch.float32) if v.is_floating_point() else v
                  for k, v in body.items() if not k.endswith("num_batches_tracked")}
    classifier["fc.weight"] = torch.zeros(1000, 2048)
    model = maskrcnn_resnet50_fpn(weights_backbone=classifier, trainable_backbone_layers=5)
    assert torch.equal(model.backbone.body.conv1.weight, classifier["conv1.weight"])
    assert isinstance(model.backbone.body.bn1, detection.FrozenBatchNorm2d)
    assert all(p.requires_grad for p in model.backbone.body.parameters())
    with pytest.raises(ValueError, match=r"\[0, 5\]"):
        maskrcnn_resnet50_fpn(weights_backbone=classifier, trainable_backbone_layers=6)
    with pytest.warns(UserWarning, match="trainable_backbone_layers"):
        maskrcnn_resnet50_fpn(trainable_backbone_layers=2)


# ------------------------------------------------------------------- parity
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_eval_matches_torchvision_in_float64(version):
    theirs, ours = torchvision_pair(version)
    x = images((70, 90), (96, 64))
    want, got = detect(theirs, x), detect(ours, x)
    assert all(len(w["boxes"]) == SMALL["box_detections_per_img"] for w in want)
    assert want[0]["masks"].shape[-2:] == (70, 90) and want[1]["masks"].shape[-2:] == (96, 64)
    assert_same_detections(got, want)


def test_eval_with_no_detections_matches_torchvision():
    theirs, ours = torchvision_pair(box_score_thresh=1.0)
    x = images((64, 80))
    want, got = detect(theirs, x), detect(ours, x)
    assert want[0]["boxes"].shape == (0, 4) and want[0]["masks"].shape == (0, 1, 64, 80)
    assert_same_detections(got, want)


@pytest.mark.parametrize("counts", [(3, 2), (2, 0)], ids=["gt", "image-without-gt"])
def test_training_losses_and_gradients_match_torchvision(counts):
    theirs, ours = torchvision_pair()
    g = torch.Generator().manual_seed(1)
    sizes = [(70, 90), (96, 64)]
    x = images(*sizes, generator=g)
    targets = rectangle_targets(sizes, counts, g)
    want_losses, want_grads = train_losses_and_grads(theirs, x, targets)
    got_losses, got_grads = train_losses_and_grads(ours, x, targets)
    assert set(got_losses) == {"loss_classifier", "loss_box_reg", "loss_mask",
                               "loss_objectness", "loss_rpn_box_reg"}
    assert all(v > 0 for v in want_losses.values())
    for key, value in want_losses.items():
        assert_close(got_losses[key], value, F64, name=key)
    assert set(got_grads) == set(want_grads)
    for name, grad in want_grads.items():
        assert_close(got_grads[name], grad, F64, name=name)


def test_degenerate_gt_box_raises_torchvisions_error():
    _, ours = torchvision_pair()
    ours.train()
    target = {"boxes": torch.tensor([[1.0, 2.0, 30.0, 40.0], [5.0, 5.0, 5.0, 9.0]],
                                    dtype=torch.float64, device=DEVICE),
              "labels": torch.tensor([1, 2], device=DEVICE),
              "masks": torch.zeros(2, 64, 64, dtype=torch.uint8, device=DEVICE)}
    message = "All bounding boxes should have positive height and width. Found invalid box"
    with pytest.raises(AssertionError, match=message) as info, _dispatch.native_only():
        ours(images((64, 64)), [target])
    assert isinstance(info.value, ValueError) and "at index 0" in str(info.value)


def test_eval_with_targets_checks_their_types_as_torchvision():
    """torchvision's RoIHeads checks the target dtypes whenever targets are
    given, in eval too: int32 labels are a TypeError, not ignored."""
    theirs, ours = torchvision_pair()
    x = images((64, 64))
    target = {"boxes": torch.tensor([[1.0, 2.0, 30.0, 40.0]], dtype=torch.float64,
                                    device=DEVICE),
              "labels": torch.tensor([1], dtype=torch.int32, device=DEVICE)}
    for model in (theirs, ours):
        with pytest.raises(TypeError, match="target labels must"), torch.no_grad(), \
                _dispatch.native_only():
            model(x, [dict(target)])
    target["labels"] = target["labels"].long()
    with torch.no_grad(), _dispatch.native_only():
        assert_same_detections(ours(x, [dict(target)]), theirs(x, [dict(target)]))


def test_training_argument_errors():
    model = maskrcnn_small()
    model.train()
    with pytest.raises(ValueError, match="targets should not be none"):
        model([torch.rand(3, 32, 32)])
    with pytest.raises(ValueError, match=r"shape \[N, 4\]"):
        model([torch.rand(3, 32, 32)], [{"boxes": torch.zeros(4), "labels": torch.zeros(1)}])
    with pytest.raises(ValueError, match="num_classes should be None"):
        detection.MaskRCNN(detection.small_fpn_backbone(), 3,
                           box_predictor=detection.FastRCNNPredictor(1024, 3))
    with pytest.raises(TypeError, match="floating type"):
        model.eval()([torch.zeros(3, 32, 32, dtype=torch.uint8)])


# ---------------------------------------------------- kernel path, convert
def test_kernel_path_matches_the_reference_path():
    """The small model (segops' RoIAlign, transposed conv, NMS, paste) on the
    Triton kernels equals the same model on the references."""
    torch.manual_seed(0)
    model = calibrate(maskrcnn_small(num_classes=3, width=4, fpn_channels=8,
                                     min_size=48, max_size=48, box_score_thresh=0.0,
                                     box_detections_per_img=4, rpn_post_nms_top_n_test=12))
    model = model.eval().to(DEVICE)
    x = [torch.rand(3, 40, 48, device=DEVICE)]
    with torch.no_grad(), _dispatch.reference_only():
        want = model(x)
    with torch.no_grad():  # the kernels (interpreted off the GPU)
        got = model(x)
    assert len(want[0]["boxes"]) == 4
    assert torch.equal(got[0]["labels"], want[0]["labels"])
    for key in ("boxes", "scores", "masks"):
        assert_close(got[0][key], want[0][key], RTOL[torch.float32], name=key)


def test_convert_model_runs_torchvisions_maskrcnn_on_segops_and_back():
    theirs, _ = torchvision_pair()
    x = images((70, 90), (96, 64))
    want = detect(theirs, x)
    parameters = dict(theirs.named_parameters())
    report = segops.convert_model(theirs, inplace=False)
    converted = report.model
    replaced = {name: new for name, _, new in report.replaced}
    assert replaced["rpn"] == "RegionProposalNetwork" and replaced["roi_heads"] == "RoIHeads"
    assert replaced["transform"] == "GeneralizedRCNNTransform"
    assert replaced["roi_heads.box_roi_pool"] == "MultiScaleRoIAlign"
    assert replaced["roi_heads.mask_predictor.conv5_mask"] == "ConvTranspose2d"
    assert type(converted.roi_heads).__module__.startswith("segops")
    assert_same_detections(detect(converted, x), want)
    shared = segops.convert_model(theirs)  # in place: the very same parameters
    assert all(p is parameters[n] for n, p in shared.model.named_parameters())
    back = segops.revert_model(theirs).model
    assert type(back.roi_heads).__module__.startswith("torchvision")
    assert type(back.roi_heads.box_roi_pool).__module__.startswith("torchvision")
    assert_same_detections(detect(back, x), want)


def test_compile_backbone_and_heads_fullgraph():
    model = maskrcnn_small(width=4, fpn_channels=8).eval()
    x = torch.rand(1, 3, 64, 64)
    rois = torch.rand(3, 8, 14, 14)
    with torch.no_grad():
        want_features = model.backbone(x)
        want_masks = model.roi_heads.mask_predictor(model.roi_heads.mask_head(rois))
        features = torch.compile(model.backbone, fullgraph=True)(x)
        masks = torch.compile(torch.nn.Sequential(model.roi_heads.mask_head,
                                                  model.roi_heads.mask_predictor),
                              fullgraph=True)(rois)
    for key, value in want_features.items():
        assert_close(features[key], value, RTOL[torch.float32], name=key)
    assert_close(masks, want_masks, RTOL[torch.float32])


def _matched_fraction(got, want, min_iou):
    """Per image: the fraction of ``want``'s confident detections (score at
    least the median) that ``got`` finds with the same label at IoU >=
    ``min_iou``, and the score errors of those found."""
    from torchvision.ops import box_iou
    result = []
    for g, w in zip(got, want):
        confident = w["scores"] >= w["scores"].median()
        assert confident.sum() > 0
        iou = box_iou(w["boxes"][confident], g["boxes"].float())
        same_label = w["labels"][confident][:, None] == g["labels"][None, :]
        best, index = (iou * same_label).max(dim=1)
        matched = best >= min_iou
        error = (w["scores"][confident][matched] - g["scores"].float()[index[matched]]).abs()
        result.append((matched.float().mean().item(), error))
    return result


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernels and bf16 autocast "
                    "need CUDA; float64 parity above covers the semantics everywhere")
@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_detections_match_torchvision_by_iou(amp):
    """fp32 / bf16-autocast detections on the kernels against torchvision's
    fp32 ones: fp32 finds 90% of torchvision's confident detections with the
    same label at IoU >= 0.9 and a score within 0.02. Under bf16 the bar is
    torchvision's own bf16 autocast run against its fp32 one (IoU >= 0.8,
    scores within 0.08): with random weights many detections are near-ties
    that bf16 rounding reorders (the H100 run of e95192b found 21 of 26 at
    IoU 0.8, against a fixed 90%), so segops must match at most 10 points
    fewer than torchvision does."""
    theirs, ours = torchvision_pair(box_detections_per_img=50, rpn_post_nms_top_n_test=200)
    theirs, ours = theirs.float(), ours.float()
    x = [t.float() for t in images((200, 256), (256, 192))]
    with torch.no_grad():
        want = theirs(x)
        with torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None):
            got = ours(x)
            baseline = theirs(x) if amp is not None else want
    min_iou, score_tol = (0.9, 0.02) if amp is None else (0.8, 0.08)
    # (never below 60%: torchvision's bf16 run also rounds its boxes to bf16,
    # which segops keeps in float32, so its fraction can set a looser bar
    # than segops needs)
    bars = [0.9 if amp is None else max(0.6, min(0.9, fraction - 0.1))
            for fraction, _ in _matched_fraction(baseline, want, min_iou)]
    for (fraction, error), bar in zip(_matched_fraction(got, want, min_iou), bars):
        assert fraction >= bar, f"{fraction:.2f} of torchvision's detections matched, bar {bar:.2f}"
        assert error.numel() == 0 or error.max() <= score_tol


def test_compile_whole_model_matches_eager():
    """The whole detector under torch.compile: the graph breaks only where
    sizes depend on data (proposal and detection filtering, NMS), and the
    detections equal eager's."""
    torch.manual_seed(0)
    model = maskrcnn_small(width=4, fpn_channels=8, box_score_thresh=0.0).eval()
    x = [torch.rand(3, 64, 64)]
    with torch.no_grad(), _dispatch.native_only():
        want = model(x)
        got = torch.compile(model)(x)
    assert len(want[0]["boxes"]) > 0
    assert torch.equal(got[0]["labels"], want[0]["labels"])
    for key in ("boxes", "scores", "masks"):
        assert_close(got[0][key], want[0][key], RTOL[torch.float32], name=key)


def test_boxes_stay_float32_under_bf16_autocast():
    """Anchors, proposals and detections are float32 under autocast (a
    departure from torchvision, whose bf16 boxes step by 8 pixels past
    1024); training under autocast gives finite losses."""
    torch.manual_seed(0)
    model = calibrate(maskrcnn_small(width=4, fpn_channels=8, box_score_thresh=0.0,
                                     min_size=96, max_size=96)).eval().to(DEVICE)
    x = [torch.rand(3, 96, 96, device=DEVICE)]
    autocast = torch.autocast(DEVICE.type, dtype=torch.bfloat16)
    with torch.no_grad(), _dispatch.native_only(), autocast:
        image_list, _ = model.transform(x)
        features = model.backbone(image_list.tensors)
        assert features["0"].dtype == torch.bfloat16
        anchors = model.rpn.anchor_generator(image_list, list(features.values()))
        proposals, _ = model.rpn(image_list, features)
        detections = model(x)
    assert anchors[0].dtype == proposals[0].dtype == torch.float32
    assert detections[0]["boxes"].dtype == torch.float32 and len(detections[0]["boxes"]) > 0
    g = torch.Generator().manual_seed(0)
    targets = rectangle_targets([(96, 96)], [2], g, dtype=torch.float32)
    model.train()
    with _dispatch.native_only(), torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        losses = model(x, targets)
    assert all(torch.isfinite(v) for v in losses.values())


def test_convert_keeps_keypoint_rcnn_whole():
    """A Keypoint R-CNN converts (transform, RPN, pools) but keeps
    torchvision's RoIHeads, which owns the keypoint branch: keypoints are
    still predicted, resized to the image, and equal the original's."""
    theirs = tv_detection.keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                                    num_classes=2, num_keypoints=3,
                                                    min_size=64, max_size=96,
                                                    box_score_thresh=0.0,
                                                    box_detections_per_img=5).eval().double()
    theirs = theirs.to(DEVICE)
    x = images((70, 90))
    want = detect(theirs, x)
    report = segops.convert_model(theirs, inplace=False)
    replaced = {name for name, _, _ in report.replaced}
    assert {"transform", "rpn"} <= replaced and "roi_heads" not in replaced
    got = detect(report.model, x)
    assert got[0]["keypoints"].shape == want[0]["keypoints"].shape == (5, 3, 3)
    for key in ("boxes", "scores", "keypoints", "keypoints_scores"):
        assert_close(got[0][key], want[0][key], F64, name=key)


def test_converted_torchvision_maskrcnn_scripts_reverted():
    """torch.jit.script of torchvision's Mask R-CNN after convert_model
    raises, naming revert_model(inplace=False), and that copy scripts
    (segops' anchor cache left behind, after the converted model ran) with
    the detections of the model scripted before conversion (TorchScript runs
    torchvision's resize in another order of float operations than eager
    does: ~1e-8 apart, so scripted is compared with scripted)."""
    theirs, _ = torchvision_pair()
    x = images((70, 90))
    with torch.no_grad():
        _, want = torch.jit.script(copy.deepcopy(theirs))(x)
    segops.convert_model(theirs)
    detect(theirs, x)
    with pytest.raises(TypeError, match="revert_model"):
        torch.jit.script(theirs)
    scripted = torch.jit.script(segops.revert_model(theirs, inplace=False).model)
    assert type(theirs.roi_heads) is detection.RoIHeads
    with torch.no_grad():
        _, got = scripted(x)
    assert len(want[0]["boxes"]) > 0
    assert_same_detections(got, want)


def test_constructor_defaults_are_fresh_and_none_means_default():
    import numpy as np
    a = maskrcnn_small(image_mean=np.array([0.5, 0.5, 0.5]))
    b, c = maskrcnn_small(), maskrcnn_small()
    b.transform.image_mean[0] = 0.0
    b.roi_heads.box_roi_pool.featmap_names.append("pool")
    assert c.transform.image_mean[0] == 0.485 and c.roi_heads.box_roi_pool.featmap_names == \
        ["0", "1", "2", "3"]
    assert list(a.transform.image_mean) == [0.5, 0.5, 0.5]
    empty = torch.nn.Sequential()
    assert maskrcnn_small(mask_head=empty).roi_heads.mask_head is empty
    custom = detection.MaskRCNN(detection.small_fpn_backbone(), 3,
                                bbox_reg_weights=torch.tensor([1.0, 1.0, 1.0, 1.0]))
    assert custom.roi_heads.box_coder.weights[0] == 1.0
    from segops.models.resnet import resnet50
    falsy_block = torch.nn.ModuleList()   # an empty container is falsy: kept, as torchvision
    fpn = detection.BackboneWithFPN(resnet50(), {"layer1": "0"}, [256], 8, extra_blocks=falsy_block).fpn
    assert fpn.extra_blocks is falsy_block


def test_anchor_cache_follows_the_cell_anchors_and_images_get_their_own():
    generator = detection.AnchorGenerator(((8,),), ((1.0,),))
    image_list = detection.ImageList(torch.zeros(2, 3, 32, 32), [(32, 32), (32, 32)])
    feature = [torch.zeros(2, 4, 4, 4)]
    first = generator(image_list, feature)
    assert first[0] is not first[1] and torch.equal(first[0], first[1])
    base = generator.cell_anchors[0].clone()
    generator.cell_anchors[0].mul_(2)  # in place: the cache must notice
    again = generator(image_list, feature)
    shifts = first[0] - base  # the grid offsets of each cell
    assert torch.equal(again[0], shifts + 2 * base)


# ------------------------------------------------- parts against torchvision
def _random_boxes(shape, generator, span, size, low=0.0, least=1.0):
    """float64 xyxy boxes of ``shape`` (leading dims): corners uniform in
    [low, low + span), width and height uniform in [least, least + size)
    (two draws from ``generator``, corners first)."""
    xy = torch.rand(*shape, 2, dtype=torch.float64, generator=generator) * span + low
    wh = torch.rand(*shape, 2, dtype=torch.float64, generator=generator) * size + least
    return torch.cat((xy, xy + wh), -1)


def test_box_coder_matches_torchvision_with_distinct_weights_and_clipped_deltas():
    """encode and decode with four different weights, deltas past the
    default log(1000/16) clip and a custom clip, as torchvision's BoxCoder."""
    from torchvision.models.detection._utils import BoxCoder as TVBoxCoder
    g = torch.Generator().manual_seed(0)
    proposals = _random_boxes((12,), g, 50, 30).to(DEVICE)
    gt = _random_boxes((12,), g, 50, 30).to(DEVICE)
    codes = (torch.randn(12, 8, dtype=torch.float64, generator=g) * 2).to(DEVICE)
    codes[:4, 2:4] = 4.5  # past log(1000 / 16) = 4.135 (and weights 1, 1)
    codes[4:8, 6:8] = 3.9  # under it, past log(1000 / 32) = 3.44
    weights = (1.0, 2.0, 3.0, 4.0)
    for kwargs in ({}, {"bbox_xform_clip": 3.0}):
        for w in (weights, (1.0, 1.0, 1.0, 1.0)):
            ours, theirs = seg_utils.BoxCoder(w, **kwargs), TVBoxCoder(w, **kwargs)
            with _dispatch.native_only():
                got = ours.decode(codes, [proposals[:5], proposals[5:]])
            want = theirs.decode(codes, [proposals[:5], proposals[5:]])
            assert_close(got, want, F64, name="decode")
            got = ours.encode([gt[:5], gt[5:]], [proposals[:5], proposals[5:]])
            want = theirs.encode([gt[:5], gt[5:]], [proposals[:5], proposals[5:]])
            for a, b in zip(got, want):
                assert_close(a, b, F64, name="encode")


def _matcher_quality():
    """A (G=3, P=8) IoU matrix with values exactly at 0.3, 0.5 and 0.7, ties
    within a GT's row and across GTs, and a GT whose best IoU is 0."""
    return torch.tensor([
        [0.7, 0.3, 0.5, 0.2, 0.6, 0.0, 0.1, 0.45],
        [0.7, 0.29, 0.1, 0.6, 0.6, 0.0, 0.05, 0.45],
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    ], dtype=torch.float64, device=DEVICE)


@pytest.mark.parametrize("high, low, allow", [(0.7, 0.3, True), (0.7, 0.3, False),
                                              (0.5, 0.5, False), (0.6, 0.45, True)])
def test_matcher_matches_torchvision_at_exact_thresholds_and_ties(high, low, allow):
    """Matches at IoU exactly on each threshold, the first GT on ties, and the
    low-quality rule (ties at IoU 0 included) as torchvision's Matcher."""
    from torchvision.models.detection._utils import Matcher as TVMatcher
    quality = _matcher_quality()
    got = seg_utils.Matcher(high, low, allow)(quality.clone())
    want = TVMatcher(high, low, allow)(quality.clone())
    assert torch.equal(got, want)
    got = seg_utils.Matcher(high, low, allow)(quality[:2].clone())  # no all-zero GT
    want = TVMatcher(high, low, allow)(quality[:2].clone())
    assert torch.equal(got, want)


def test_sampler_matches_torchvision_under_the_same_seed():
    """Positives (any label >= 1), negatives (0), ignored (-1): the same
    randperm draws and quota rounding (14 * 0.25 = 3.5 -> 3) as torchvision."""
    from torchvision.models.detection._utils import BalancedPositiveNegativeSampler as TV
    g = torch.Generator().manual_seed(3)
    labels = [torch.randint(-1, 4, (40,), generator=g),      # many positives
              torch.tensor([0, 2, -1, 0, 0, 1, 0, -1, 3, 0, 0, 0]),  # few of each
              torch.full((9,), 0), torch.tensor([1, 2, 3, -1])]
    labels = [label.to(DEVICE) for label in labels]
    for batch, fraction in ((14, 0.25), (8, 0.5), (20, 0.6)):
        torch.manual_seed(7)
        got = seg_utils.BalancedPositiveNegativeSampler(batch, fraction)(labels)
        torch.manual_seed(7)
        want = TV(batch, fraction)(labels)
        for a, b in zip(got[0] + got[1], want[0] + want[1]):
            assert torch.equal(a.bool(), b.bool())


def test_anchor_generator_matches_torchvision_with_several_sizes_and_strides():
    """Two sizes per level (ratio-major order), rounding of the base anchors,
    a non-square padded batch, and one grid at two strides (the cache)."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator as TV
    from torchvision.models.detection.image_list import ImageList as TVImageList
    sizes, ratios = ((16, 40), (64,)), ((0.5, 1.0, 2.0), (0.7, 1.3))
    ours, theirs = detection.AnchorGenerator(sizes, ratios), TV(sizes, ratios)
    for h, w in ((64, 96), (128, 96)):
        tensors = torch.zeros(2, 3, h, w, dtype=torch.float64, device=DEVICE)
        features = [torch.zeros(2, 4, 16, 12, dtype=torch.float64, device=DEVICE),
                    torch.zeros(2, 4, 4, 3, dtype=torch.float64, device=DEVICE)]
        got = ours(detection.ImageList(tensors, [(h, w)] * 2), features)
        want = theirs(TVImageList(tensors, [(h, w)] * 2), features)
        assert len(got) == len(want) == 2
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def _rpn_pair(**kwargs):
    options = dict(fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=16,
                   positive_fraction=0.5, pre_nms_top_n={"training": 7, "testing": 5},
                   post_nms_top_n={"training": 12, "testing": 10}, nms_thresh=0.5,
                   score_thresh=0.5)
    options.update(kwargs)
    return (detection.RegionProposalNetwork(None, None, **options),
            tv_detection.rpn.RegionProposalNetwork(None, None, **options))


def test_rpn_filter_proposals_matches_torchvision_at_the_edges():
    """Per-level top-n (train and test counts), clipping to each image,
    boxes exactly min_size wide, a score exactly at score_thresh (kept),
    per-level NMS and the post-NMS count, as torchvision's filter_proposals."""
    g = torch.Generator().manual_seed(5)
    levels = [12, 8]
    proposals = _random_boxes((2, 20), g, 70, 30, low=-10.0, least=0.5)
    logits = torch.randn(2, 20, dtype=torch.float64, generator=g) + 1.0
    logits[0, 4:12] = -1.0 - torch.rand(8, dtype=torch.float64, generator=g)
    proposals[0, 0] = proposals.new_tensor([-5.0, 2.0, 1e-3, 20.0])    # 1e-3 wide once clipped
    proposals[0, 1] = proposals.new_tensor([-5.0, 2.0, 5e-3, 20.0])    # 5e-3 wide
    proposals[1, 13] = proposals.new_tensor([30.0, -8.0, 50.0, 1e-3])  # 1e-3 high
    proposals[0, 2] = proposals.new_tensor([2.0, 2.0, 30.0, 30.0])
    proposals[0, 3] = proposals.new_tensor([3.0, 3.0, 30.0, 30.0])     # overlaps 2, same level
    proposals[0, 14] = proposals.new_tensor([2.0, 3.0, 31.0, 30.0])    # overlaps 2, next level
    logits[0, :4] = torch.tensor([5.0, 4.5, 4.0, 3.5])
    logits[0, 14] = 3.0
    logits[1, 13] = 6.0
    logits[0, 5] = 0.0  # sigmoid exactly 0.5 = score_thresh, in level 0's top 5
    proposals, logits = proposals.to(DEVICE), logits.to(DEVICE)
    shapes = [(40, 50), (30, 60)]
    for training in (False, True):
        for kwargs in ({}, {"score_thresh": 0.0}):
            ours, theirs = _rpn_pair(**kwargs)
            ours.train(training), theirs.train(training)
            with _dispatch.native_only():
                got = ours.filter_proposals(proposals, logits.reshape(-1, 1), shapes, levels)
            want = theirs.filter_proposals(proposals, logits.reshape(-1, 1), shapes, levels)
            for a, b in zip(got[0] + got[1], want[0] + want[1]):
                assert a.shape == b.shape and a.dtype == b.dtype
                assert_close(a, b, F64)


def test_rpn_and_roi_heads_assign_targets_as_torchvision():
    """Anchor labels 1 / 0 / -1 and matched boxes (one GT, so a between-
    thresholds match must not index GT -2), proposal labels and clamped
    GT indices with fg 0.7 / bg 0.3, as torchvision's."""
    g = torch.Generator().manual_seed(2)
    gt_one = torch.tensor([[10.0, 10.0, 40.0, 40.0]], dtype=torch.float64)
    gt_three = torch.tensor([[10.0, 10.0, 40.0, 40.0], [30.0, 5.0, 60.0, 30.0],
                             [0.0, 30.0, 20.0, 60.0]], dtype=torch.float64)
    boxes = _random_boxes((60,), g, 50, 30, least=2.0)
    boxes[:3] = gt_three + torch.tensor([1.0, 1.0, 2.0, 1.0], dtype=torch.float64)
    anchors = [boxes.to(DEVICE), boxes.flip(0).to(DEVICE), boxes.to(DEVICE)]
    gts = [gt_one.to(DEVICE), gt_three.to(DEVICE), gt_one[:0].to(DEVICE)]
    labels = [torch.tensor([2]), torch.tensor([3, 1, 2]), torch.zeros(0, dtype=torch.int64)]
    labels = [label.to(DEVICE) for label in labels]
    ours, theirs = _rpn_pair()
    targets = [{"boxes": b, "labels": label} for b, label in zip(gts, labels)]
    got, want = ours.assign_targets_to_anchors(anchors, targets), \
        theirs.assign_targets_to_anchors(anchors, targets)
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert any((label == -1).any() for label in want[0])
    heads = dict(fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=16,
                 positive_fraction=0.25, bbox_reg_weights=None, score_thresh=0.05,
                 nms_thresh=0.5, detections_per_img=10)
    ours = seg_roi_heads.RoIHeads(None, None, None, **heads)
    theirs = tv_detection.roi_heads.RoIHeads(None, None, None, **heads)
    got = ours.assign_targets_to_proposals(anchors, gts, labels)
    want = theirs.assign_targets_to_proposals(anchors, gts, labels)
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert any((label == -1).any() for label in want[1])


def test_postprocess_detections_matches_torchvision_at_the_thresholds():
    """Scores exactly at score_thresh dropped (strict >), boxes exactly 1e-2
    wide kept and 5e-3 wide dropped, NMS per class (same place, other class
    kept), detections_per_img, as torchvision's postprocess_detections."""
    g = torch.Generator().manual_seed(4)
    counts, classes = [7, 5], 4
    proposals = _random_boxes((12,), g, 40, 20, least=2.0)
    proposals[0] = proposals.new_tensor([0.0, 0.0, 0.01, 3.0])    # exactly 1e-2 wide
    proposals[1] = proposals.new_tensor([0.0, 0.0, 0.005, 3.0])   # 5e-3 wide
    proposals[2] = proposals.new_tensor([10.0, 10.0, 30.0, 30.0])
    proposals[3] = proposals.new_tensor([11.0, 11.0, 31.0, 31.0])  # overlaps 2
    logits = torch.randn(12, classes, dtype=torch.float64, generator=g) * 2
    logits[4] = 0.0        # every class scores exactly 1 / 4
    logits[0] = logits.new_tensor([0.0, 4.0, -1.0, -1.0])
    logits[1] = logits.new_tensor([0.0, -1.0, 4.0, -1.0])
    logits[2] = torch.tensor([0.0, 3.0, 0.5, -1.0], dtype=torch.float64)
    logits[3] = torch.tensor([0.0, 0.2, 3.5, -1.0], dtype=torch.float64)
    regression = torch.randn(12, 4 * classes, dtype=torch.float64, generator=g) * 0.5
    regression[:4] = 0.0
    shapes = [(40, 50), (36, 30)]
    heads = dict(fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=16,
                 positive_fraction=0.25, bbox_reg_weights=None, nms_thresh=0.5)
    for thresh, per_image in ((0.25, 100), (0.0, 6)):
        ours = seg_roi_heads.RoIHeads(None, None, None, **heads, score_thresh=thresh,
                                      detections_per_img=per_image)
        theirs = tv_detection.roi_heads.RoIHeads(None, None, None, **heads,
                                                 score_thresh=thresh,
                                                 detections_per_img=per_image)
        args = (logits.to(DEVICE), regression.to(DEVICE),
                list(proposals.to(DEVICE).split(counts)), shapes)
        with _dispatch.native_only():
            got = ours.postprocess_detections(*args)
        want = theirs.postprocess_detections(*args)
        assert len(want[0][0]) > 0
        for a, b in zip(sum(got, []), sum(want, [])):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert_close(a.double(), b.double(), F64)


def test_maskrcnn_loss_matches_torchvision_with_and_without_positives():
    """The mask loss against roi_align'ed GT masks per positive, and zero
    (with a gradient) when no image has a positive, as torchvision's."""
    g = torch.Generator().manual_seed(6)
    masks = [(torch.rand(2, 40, 50, generator=g) > 0.5).to(torch.uint8).to(DEVICE),
             (torch.rand(1, 36, 30, generator=g) > 0.5).to(torch.uint8).to(DEVICE)]
    labels = [torch.tensor([1, 3], device=DEVICE), torch.tensor([2], device=DEVICE)]
    proposals = [torch.tensor([[2.0, 3.0, 30.0, 33.0], [10.5, 0.0, 49.0, 20.0],
                               [0.0, 0.0, 50.0, 40.0]], dtype=torch.float64, device=DEVICE),
                 torch.tensor([[4.0, 4.0, 20.0, 30.0]], dtype=torch.float64, device=DEVICE)]
    matched = [torch.tensor([0, 1, 1], device=DEVICE), torch.tensor([0], device=DEVICE)]
    logits = torch.randn(4, 4, 28, 28, dtype=torch.float64, generator=g).to(DEVICE)
    with _dispatch.native_only():
        got = seg_roi_heads.maskrcnn_loss(logits, proposals, masks, labels, matched)
    want = tv_detection.roi_heads.maskrcnn_loss(logits, proposals, masks, labels, matched)
    assert_close(got, want, F64)
    empty = torch.zeros(0, 4, 28, 28, dtype=torch.float64, device=DEVICE, requires_grad=True)
    no_positives = [p[:0] for p in proposals], [m[:0] for m in matched]
    got = seg_roi_heads.maskrcnn_loss(empty, no_positives[0], masks, labels, no_positives[1])
    want = tv_detection.roi_heads.maskrcnn_loss(empty, no_positives[0], masks, labels,
                                                no_positives[1])
    assert got.item() == want.item() == 0.0 and got.requires_grad
    # 16-bit logits: a float32 loss, torchvision's on the upcast logits
    for dtype in (torch.float16, torch.bfloat16):
        low = logits.float().to(dtype)
        with _dispatch.native_only():
            got = seg_roi_heads.maskrcnn_loss(low, [p.float() for p in proposals], masks,
                                              labels, matched)
        want = tv_detection.roi_heads.maskrcnn_loss(low.float(), [p.float() for p in proposals],
                                                    masks, labels, matched)
        assert got.dtype == torch.float32
        assert_close(got, want, 1e-6)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_transform_matches_torchvision_with_several_min_sizes(training):
    """Resize with a tuple min_size (the random choice in training, the last
    in eval), masks resized nearest with the recomputed scale, boxes scaled
    by float32 ratios, padding, and postprocess back, as torchvision's."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform as TV
    args = ((40, 56, 72), 100, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    ours, theirs = detection.GeneralizedRCNNTransform(*args), TV(*args)
    ours.train(training), theirs.train(training)
    g = torch.Generator().manual_seed(8)
    sizes = [(37, 53), (61, 29), (50, 50)]
    imgs = [torch.rand(3, h, w, dtype=torch.float64, generator=g).to(DEVICE) for h, w in sizes]
    targets = [{"boxes": torch.tensor([[1.3, 2.7, w - 3.1, h - 1.9]], dtype=torch.float64,
                                      device=DEVICE),
                "labels": torch.tensor([1], device=DEVICE),
                "masks": (torch.rand(1, h, w, generator=g) > 0.5).to(torch.uint8).to(DEVICE)}
               for h, w in sizes]
    for _ in range(3):
        seed = int(torch.randint(0, 1000, (1,), generator=g))
        torch.manual_seed(seed)
        got_list, got_targets = ours(imgs, [dict(t) for t in targets])
        torch.manual_seed(seed)
        want_list, want_targets = theirs(imgs, [dict(t) for t in targets])
        assert got_list.image_sizes == want_list.image_sizes
        assert_close(got_list.tensors, want_list.tensors, F64)
        for a, b in zip(got_targets, want_targets):
            assert torch.equal(a["masks"], b["masks"]) and a["masks"].dtype == torch.uint8
            assert torch.equal(a["boxes"], b["boxes"])
    ours.eval(), theirs.eval()
    result = [{"boxes": t["boxes"] * 0.9} for t in got_targets]
    got = ours.postprocess([dict(r) for r in result], got_list.image_sizes, sizes)
    want = theirs.postprocess([dict(r) for r in result], got_list.image_sizes, sizes)
    for a, b in zip(got, want):
        assert torch.equal(a["boxes"], b["boxes"])
    # _skip_resize skips the resize in training only
    ours = detection.GeneralizedRCNNTransform(*args, _skip_resize=True).train(training)
    theirs = TV(*args, _skip_resize=True).train(training)
    got, want = ours(imgs[:1]), theirs(imgs[:1])
    assert got[0].image_sizes == want[0].image_sizes
    assert_close(got[0].tensors, want[0].tensors, F64)


def test_default_hyperparameters_are_torchvisions():
    """maskrcnn_resnet50_fpn's defaults (thresholds, counts, fractions,
    box-coder weights, pooler settings, resize sizes) equal torchvision's."""
    theirs = tv_detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    ours = maskrcnn_resnet50_fpn()
    pairs = [(m.rpn, m.roi_heads, m.transform) for m in (ours, theirs)]
    (rpn, heads, transform), (tv_rpn, tv_heads, tv_transform) = pairs
    for mode in (True, False):
        rpn.train(mode), tv_rpn.train(mode)
        assert rpn.pre_nms_top_n() == tv_rpn.pre_nms_top_n()
        assert rpn.post_nms_top_n() == tv_rpn.post_nms_top_n()
    for a, b in ((rpn, tv_rpn), (heads, tv_heads)):
        assert (a.proposal_matcher.high_threshold, a.proposal_matcher.low_threshold,
                a.proposal_matcher.allow_low_quality_matches) == \
            (b.proposal_matcher.high_threshold, b.proposal_matcher.low_threshold,
             b.proposal_matcher.allow_low_quality_matches)
        assert (a.fg_bg_sampler.batch_size_per_image, a.fg_bg_sampler.positive_fraction) == \
            (b.fg_bg_sampler.batch_size_per_image, b.fg_bg_sampler.positive_fraction)
        assert tuple(a.box_coder.weights) == tuple(b.box_coder.weights)
        assert a.box_coder.bbox_xform_clip == b.box_coder.bbox_xform_clip
    assert (rpn.nms_thresh, rpn.score_thresh, rpn.min_size) == \
        (tv_rpn.nms_thresh, tv_rpn.score_thresh, tv_rpn.min_size)
    assert (heads.score_thresh, heads.nms_thresh, heads.detections_per_img) == \
        (tv_heads.score_thresh, tv_heads.nms_thresh, tv_heads.detections_per_img)
    for name in ("box_roi_pool", "mask_roi_pool"):
        a, b = getattr(heads, name), getattr(tv_heads, name)
        assert (list(a.featmap_names), a.output_size, a.sampling_ratio) == \
            (list(b.featmap_names), b.output_size, b.sampling_ratio)
    assert (tuple(transform.min_size), transform.max_size, transform.size_divisible) == \
        (tuple(tv_transform.min_size), tv_transform.max_size, tv_transform.size_divisible)
    assert list(transform.image_mean) == list(tv_transform.image_mean)
    assert list(transform.image_std) == list(tv_transform.image_std)


def test_frozen_batch_norm_matches_torchvision_with_nonzero_eps():
    """FrozenBatchNorm2d with random statistics and eps 1e-5 (the
    weights_backbone case) and eps 0, as torchvision.ops.FrozenBatchNorm2d."""
    from torchvision.ops import FrozenBatchNorm2d as TV
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 5, 4, 3, dtype=torch.float64, generator=g).to(DEVICE)
    for eps in (1e-5, 0.0):
        ours, theirs = detection.FrozenBatchNorm2d(5, eps=eps), TV(5, eps=eps)
        state = {"weight": torch.randn(5, generator=g), "bias": torch.randn(5, generator=g),
                 "running_mean": torch.randn(5, generator=g),
                 "running_var": torch.rand(5, generator=g) * 1e-4}
        ours.load_state_dict(state), theirs.load_state_dict(state)
        ours, theirs = ours.double().to(DEVICE), theirs.double().to(DEVICE)
        assert_close(ours(x), theirs(x), F64)


def test_fpn_matches_torchvision_on_odd_sizes():
    """Top-down nearest up-sampling to laterals that are not twice the
    coarser map (odd sizes), and the 'pool' level, as torchvision's FPN."""
    from collections import OrderedDict
    from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork as TV
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool as TVPool
    g = torch.Generator().manual_seed(10)
    channels = [3, 5, 6]
    theirs = TV(channels, 4, extra_blocks=TVPool()).double().to(DEVICE)
    ours = detection.FeaturePyramidNetwork(channels, 4, detection.LastLevelMaxPool())
    ours = ours.double().to(DEVICE)
    ours.load_state_dict(theirs.state_dict())
    x = OrderedDict((str(i), torch.randn(1, c, h, w, dtype=torch.float64, generator=g).to(DEVICE))
                    for i, (c, (h, w)) in enumerate(zip(channels, [(13, 11), (7, 6), (3, 4)])))
    got, want = ours(x), theirs(x)
    assert list(got) == list(want) == ["0", "1", "2", "pool"]
    for key in want:
        assert_close(got[key], want[key], F64, name=key)


@pytest.mark.parametrize("layers", [4, 5])
def test_trainable_layers_freeze_as_torchvision(layers):
    """resnet_fpn_extractor's trainable parameters for 4 and 5 layers on a
    BatchNorm2d ResNet-50 (bn1 trains only with all 5), as torchvision's."""
    from torchvision.models import resnet50 as tv_resnet50
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from segops.models.detection.backbone import resnet_fpn_extractor
    from segops.models.resnet import resnet50
    ours = resnet_fpn_extractor(resnet50(num_classes=None), layers)
    theirs = _resnet_fpn_extractor(tv_resnet50(), layers)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in theirs.named_parameters() if p.requires_grad}
