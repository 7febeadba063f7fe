"""torch.fx.symbolic_trace of models that use segops (issue 10).

Every public function is registered with ``torch.fx.wrap`` in each module
whose globals a caller looks it up in, as torchvision does for its ops:

* ``segops/ops/__init__.py``: a model calling ``segops.ops.atrous_conv2d(...)``
  (attribute access on the package);
* the defining modules (``segops/ops/conv.py``, ...): ``segops.ops.conv.atrous_conv2d``;
* the segops.nn modules that call the functions by their bare names.

The tracer patches those globals while it traces, so each call stays one
``call_function`` node (never traced into, where the argument checks would
meet Proxies), and the GraphModule gives the eager outputs. A function
imported by name into a user's own module (``from segops.ops import
atrous_conv2d``) lives in that module's globals, which no ``wrap`` inside
segops can reach: ``torch.fx.Tracer(autowrap_functions=...)`` covers it.

Kernels run in the interpreter at tiny shapes; the whole-model checks run on
the native path (tracing does not depend on the path).
"""
import pytest
import torch
from helpers import DEVICE, RTOL, assert_close
from torch import fx, nn

import segops
from segops import _dispatch
from segops.ops import atrous_conv2d as bare_atrous_conv2d

F64 = RTOL[torch.float64]
D = dict(dtype=torch.float64, device=DEVICE)


def _targets(graph_module):
    return [n.target for n in graph_module.graph.nodes if n.op == "call_function"]


def _assert_traced_same(model, *inputs, leaf=None):
    """symbolic_trace(model) keeps ``leaf`` as one call_function node and
    the GraphModule's outputs equal the model's."""
    graph_module = fx.symbolic_trace(model)
    if leaf is not None:
        assert leaf in _targets(graph_module), graph_module.code
    want = model(*inputs)
    got = graph_module(*inputs)
    flat_want, flat_got = _flatten(want), _flatten(got)
    assert len(flat_got) == len(flat_want)
    for g, w in zip(flat_got, flat_want):
        assert_close(g, w, F64)
    return graph_module


def _flatten(out):
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flatten(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flatten(v)]
    return [out]


# ---------------------------------------------------------------------------
# functions, called as segops.ops.<name>(...)
# ---------------------------------------------------------------------------
class _OpModel(nn.Module):
    def __init__(self, call):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3, **D))
        self.bias = nn.Parameter(torch.randn(4, **D))
        self.call = call

    def forward(self, x, y):  # fx traces fixed arguments, not *args
        return self.call(self, x, y)


def _boxes():
    return torch.tensor([[0, 1.0, 2.0, 9.0, 7.5], [1, 0.0, 0.5, 11.0, 11.0]], **D)


def _scores_and_labels():
    return torch.randn(2, 3, 5, 4, **D), torch.randint(0, 3, (2, 5, 4), device=DEVICE)


OPS = {
    "atrous_conv2d": (
        lambda m, x, _: segops.ops.atrous_conv2d(x, m.weight, m.bias, padding=2, dilation=2,
                                              activation="relu"),
        lambda: (torch.randn(2, 3, 7, 6, **D), torch.zeros(1))),
    "conv_transpose2d": (
        lambda m, x, _: segops.ops.conv_transpose2d(x, m.weight, m.bias[:3], stride=2, padding=1),
        lambda: (torch.randn(2, 4, 4, 5, **D), torch.zeros(1))),
    "roi_align": (
        lambda m, x, boxes: segops.ops.roi_align(x, boxes, (2, 3), 0.5, 2, aligned=True),
        lambda: (torch.randn(2, 3, 8, 8, **D), _boxes())),
    "multi_scale_roi_align": (
        lambda m, x, boxes: segops.ops.multi_scale_roi_align(
            [x, x[..., ::2, ::2]], [boxes[:1, 1:] * 4, boxes[1:, 1:] * 4], 2, [0.25, 0.125], 2),
        lambda: (torch.randn(2, 3, 12, 12, **D), _boxes())),
    "overlap_sums": (
        lambda m, x, y: segops.ops.overlap_sums(x, y, ignore_index=1),
        _scores_and_labels),
    "dice_loss": (
        lambda m, x, y: segops.ops.dice_loss(x, y, "multiclass", smooth=1.0),
        _scores_and_labels),
    "jaccard_loss": (
        lambda m, x, y: segops.ops.jaccard_loss(x, y, "multiclass", log_loss=True),
        _scores_and_labels),
    "confusion_matrix": (
        lambda m, x, y: segops.ops.confusion_matrix(x.argmax(1), y, 3).double(),
        _scores_and_labels),
    "iou_score": (
        lambda m, x, y: segops.ops.iou_score(segops.ops.confusion_matrix(x.argmax(1), y, 3)),
        _scores_and_labels),
    "dice_score": (
        lambda m, x, y: segops.ops.dice_score(segops.ops.confusion_matrix(x, y, 3), "micro"),
        _scores_and_labels),
    "paste_masks": (
        lambda m, masks, boxes: segops.ops.paste_masks(masks, boxes, (12, 14)),
        lambda: (torch.rand(2, 1, 5, 5, **D), _boxes()[:, 1:])),
    "mask_targets": (
        lambda m, gt, rois: segops.ops.mask_targets(gt, rois, torch.tensor([1, 0], device=DEVICE),
                                                    4).double(),
        lambda: ((torch.rand(2, 12, 13, device=DEVICE) > 0.5).to(torch.uint8),
                 _boxes()[:, 1:])),
    "box_iou": (
        lambda m, a, b: segops.ops.box_iou(a, b).double(),
        lambda: (_boxes()[:, 1:], _boxes()[:1, 1:] + 1)),
    "clip_boxes_to_image": (
        lambda m, a, _: segops.ops.clip_boxes_to_image(a, (8, 10)),
        lambda: (_boxes()[:, 1:], torch.zeros(1))),
    "decode_boxes": (
        lambda m, codes, boxes: segops.ops.decode_boxes(codes, boxes, (10.0, 10.0, 5.0, 5.0)),
        lambda: (torch.randn(2, 4, **D), _boxes()[:, 1:])),
    "nms": (
        lambda m, boxes, scores: segops.ops.nms(boxes, scores, 0.5).double(),
        lambda: (_boxes()[:, 1:], torch.tensor([0.9, 0.8], **D))),
    "batched_nms": (
        lambda m, boxes, scores: segops.ops.batched_nms(
            boxes, scores, torch.tensor([0, 1], device=DEVICE), 0.5).double(),
        lambda: (_boxes()[:, 1:], torch.tensor([0.9, 0.8], **D))),
    "batched_nms_per_image": (
        lambda m, boxes, scores: segops.ops.batched_nms_per_image(
            boxes, scores, None, torch.tensor([0, 1], device=DEVICE), 0.5, num_images=2)[1].double(),
        lambda: (_boxes()[:, 1:], torch.tensor([0.9, 0.8], **D))),
}


def test_every_public_function_is_covered():
    assert set(OPS) == set(segops.ops.__all__)


@pytest.mark.parametrize("name", sorted(OPS))
def test_public_function_called_through_the_package_traces(name):
    call, make_inputs = OPS[name]
    _assert_traced_same(_OpModel(call), *make_inputs(), leaf=getattr(segops.ops, name))


@pytest.mark.parametrize("name", ["atrous_conv2d", "dice_loss"])
def test_public_function_called_through_its_module_traces(name):
    module = {"atrous_conv2d": segops.ops.conv, "dice_loss": segops.ops.overlap}[name]
    call, make_inputs = OPS[name]
    function = getattr(module, name)

    def through_module(m, x, y):  # module.<name> instead of segops.ops.<name>
        if name == "atrous_conv2d":
            return module.atrous_conv2d(x, m.weight, m.bias, padding=2, dilation=2)
        return module.dice_loss(x, y, "multiclass")

    _assert_traced_same(_OpModel(through_module), *make_inputs(), leaf=function)


def test_function_imported_by_name_traces_with_autowrap_functions():
    """A name bound in the user's module is the user's global: FX's own
    ``autowrap_functions`` wraps it (segops' wrap calls cannot)."""
    model = _OpModel(lambda m, x, _: bare_atrous_conv2d(x, m.weight, m.bias, padding=1))
    x = torch.randn(1, 3, 5, 5, **D)
    tracer = fx.Tracer(autowrap_functions=(bare_atrous_conv2d,))
    graph_module = fx.GraphModule(model, tracer.trace(model))
    assert segops.ops.atrous_conv2d in _targets(graph_module)
    assert_close(graph_module(x, None), model(x, None), F64)


def test_untraced_calls_are_unchanged():
    """Outside tracing the public names are the plain functions again."""
    fx.symbolic_trace(_OpModel(OPS["atrous_conv2d"][0]))
    assert segops.ops.atrous_conv2d is segops.ops.conv.atrous_conv2d
    assert segops.ops.dice_loss is segops.ops.overlap.dice_loss
    assert segops.nn.conv.atrous_conv2d is segops.ops.atrous_conv2d


# ---------------------------------------------------------------------------
# modules
# ---------------------------------------------------------------------------
class _Holder(nn.Module):
    def __init__(self, module, call):
        super().__init__()
        self.module = module
        self.call = call

    def forward(self, x, y):
        return self.call(self.module, x, y)


MODULES = {
    "AtrousConv2d": (
        lambda: segops.nn.AtrousConv2d(3, 4, 3, padding=2, dilation=2, groups=1),
        lambda m, x, _: m(x), lambda: (torch.randn(2, 3, 6, 7, **D), None), "atrous_conv2d"),
    "AtrousConv2d-reflect-relu": (
        lambda: segops.nn.AtrousConv2d(3, 4, 3, padding=1, padding_mode="reflect",
                                       activation="relu"),
        lambda m, x, _: m(x), lambda: (torch.randn(1, 3, 5, 5, **D), None), "atrous_conv2d"),
    "ConvTranspose2d": (
        lambda: segops.nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1),
        lambda m, x, _: m(x), lambda: (torch.randn(2, 3, 4, 3, **D), None), "conv_transpose2d"),
    "RoIAlign": (
        lambda: segops.nn.RoIAlign((2, 2), 0.5, 2, aligned=True),
        lambda m, x, boxes: m(x, boxes), lambda: (torch.randn(2, 3, 8, 8, **D), _boxes()),
        "roi_align"),
    "RoIAlign-list-of-boxes": (
        lambda: segops.nn.RoIAlign(2, 0.5, -1),
        lambda m, x, boxes: m(x, [boxes[:1, 1:], boxes[1:, 1:]]),
        lambda: (torch.randn(2, 3, 8, 8, **D), _boxes()), "roi_align"),
    "MultiScaleRoIAlign": (
        lambda: segops.nn.MultiScaleRoIAlign(["p2", "p3"], 2, 2),
        lambda m, x, boxes: m({"p2": x, "p3": x[..., ::2, ::2]},
                              [boxes[:1, 1:] * 4, boxes[1:, 1:] * 4], [(48, 48), (40, 44)]),
        lambda: (torch.randn(2, 3, 12, 12, **D), _boxes()), "multi_scale_roi_align"),
    "DiceLoss": (
        lambda: segops.nn.DiceLoss("multiclass", classes=[0, 2], smooth=0.5),
        lambda m, x, y: m(x, y), _scores_and_labels, "dice_loss"),
    "JaccardLoss": (
        lambda: segops.nn.JaccardLoss("multiclass", ignore_index=1),
        lambda m, x, y: m(x, y), _scores_and_labels, "jaccard_loss"),
}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_traces(name):
    build, call, make_inputs, op = MODULES[name]
    module = build()
    if isinstance(module, nn.Module) and list(module.parameters()):
        module = module.double().to(DEVICE)
    graph_module = _assert_traced_same(_Holder(module, call), *make_inputs(),
                                       leaf=getattr(segops.ops, op))
    # one node per call, not the op traced into
    assert _targets(graph_module).count(getattr(segops.ops, op)) == 1


def test_conv_transpose_output_size_from_a_graph_input_traces():
    """ConvTranspose2d(x, output_size=skip.shape[-2:]), as U-Nets call it:
    the size arithmetic stays inside one node (nn.ConvTranspose2d is an fx
    leaf module; segops' twin is traced into, and its output padding cannot
    be computed from Proxies), and the graph gives nn.ConvTranspose2d's output
    for sizes the trace did not see."""
    plain = nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1).to(**D)
    ours = segops.nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1).to(**D)
    ours.load_state_dict(plain.state_dict())
    call = lambda m, x, skip: m(x, output_size=skip.shape[-2:])  # noqa: E731
    graph_module = fx.symbolic_trace(_Holder(ours, call))
    assert segops.nn.conv_transpose.conv_transpose2d_to_size in _targets(graph_module)
    x = torch.randn(2, 3, 4, 5, **D)
    for size in ((7, 9), (8, 10), (8, 9)):
        skip = torch.zeros(2, 2, *size, **D)
        assert_close(graph_module(x, skip), plain(x, output_size=skip.shape[-2:]), F64)


def test_multi_scale_roi_align_traces_with_the_feature_dict_as_input():
    """As torchvision's MultiScaleRoIAlign: the dict and image sizes are graph
    inputs and the scales are not known before the first call."""
    pooler = segops.nn.MultiScaleRoIAlign(["p2", "p3"], 2, 2)
    graph_module = fx.symbolic_trace(pooler)
    x = torch.randn(2, 3, 12, 12, **D)
    features = {"p2": x, "p3": x[..., ::2, ::2], "other": x}
    boxes = [_boxes()[:1, 1:] * 4, _boxes()[1:, 1:] * 4]
    shapes = [(48, 48), (40, 44)]
    got = graph_module(features, boxes, shapes)
    want = segops.nn.MultiScaleRoIAlign(["p2", "p3"], 2, 2)(features, boxes, shapes)
    assert_close(got, want, F64)
    assert pooler.scales is None or all(isinstance(s, float) for s in pooler.scales)


def test_modules_of_a_converted_torchvision_model_are_leaf_calls():
    """torchvision's own RoIAlign poolers, converted: the traced graph calls
    segops' functions and agrees with torchvision's."""
    tv_ops = pytest.importorskip("torchvision.ops")
    model = nn.ModuleDict({"pool": tv_ops.MultiScaleRoIAlign(["a", "b"], 3, 2),
                           "single": tv_ops.RoIAlign(2, 0.5, 2, aligned=True)})

    class Detector(nn.Module):
        def __init__(self):
            super().__init__()
            self.poolers = model

        def forward(self, a, b, boxes):
            features = {"a": a, "b": b}
            return (self.poolers["pool"](features, boxes, [(64, 64)]),
                    self.poolers["single"](a, boxes))

    detector = Detector()
    inputs = (torch.randn(1, 2, 16, 16, **D), torch.randn(1, 2, 8, 8, **D),
              [torch.tensor([[1.0, 2.0, 30.0, 40.0], [0.0, 0.0, 63.0, 63.0]], **D)])
    want = detector(*inputs)
    segops.convert_model(detector)
    graph_module = fx.symbolic_trace(detector)
    targets = _targets(graph_module)
    assert segops.ops.roi_align in targets and segops.ops.multi_scale_roi_align in targets
    for got, expected in zip(graph_module(*inputs), want):
        assert_close(got, expected, F64)


# ---------------------------------------------------------------------------
# whole models
# ---------------------------------------------------------------------------
def _segops_models():
    return {
        "unet": (lambda: segops.models.unet(3, 2, base_channels=4, depth=2),
                 (1, 3, 13, 18), "conv_transpose2d"),
        "unet-bilinear": (lambda: segops.models.unet(3, 2, base_channels=4, depth=2,
                                                     up="bilinear"), (1, 3, 16, 16), None),
        "fcn8s": (lambda: segops.models.fcn8s(3, base_channels=2), (1, 3, 20, 26),
                  "conv_transpose2d"),
        "deeplabv3_resnet50": (lambda: segops.models.deeplabv3_resnet50(3, aux_loss=True),
                               (1, 3, 24, 20), "atrous_conv2d"),
    }


@pytest.mark.parametrize("name", sorted(_segops_models()))
def test_segops_models_trace(name):
    build, shape, op = _segops_models()[name]
    model = build().double().eval()
    with torch.no_grad():
        for p in model.parameters():  # FCN-8s starts with zero scores
            p.copy_(torch.randn_like(p) * 0.1)
    model = model.to(DEVICE)
    x = torch.randn(*shape, **D)
    with torch.no_grad(), _dispatch.native_only():
        _assert_traced_same(model, x, leaf=None if op is None else getattr(segops.ops, op))


@pytest.mark.parametrize("name", ["fcn_resnet50", "deeplabv3_resnet50"])
def test_converted_torchvision_segmentation_model_traces(name):
    segmentation = pytest.importorskip("torchvision.models.segmentation")
    model = getattr(segmentation, name)(weights=None, weights_backbone=None, num_classes=3,
                                        aux_loss=True).eval().double().to(DEVICE)
    report = segops.convert_model(model)
    assert len(report) >= 8
    x = torch.randn(1, 3, 26, 22, **D)
    with torch.no_grad(), _dispatch.native_only():
        graph_module = _assert_traced_same(model, x, leaf=segops.ops.atrous_conv2d)
    assert _targets(graph_module).count(segops.ops.atrous_conv2d) == len(report)
