"""convert_model / revert_model: which layers are swapped, parameters shared,
state_dict unchanged, outputs unchanged (torchvision FCN and DeepLabV3, a
plain-torch U-Net, torchvision's RoIAlign poolers)."""
import pytest
import torch
from helpers import DEVICE, RTOL, assert_close
from torch import nn

import segops
from segops.nn import AtrousConv2d, ConvTranspose2d, MultiScaleRoIAlign, RoIAlign

F64 = RTOL[torch.float64]
segmentation = pytest.importorskip("torchvision.models.segmentation")


class PlainUNet(nn.Module):
    """A small U-Net written with plain torch layers, a dilated bottleneck."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(8, 16, 3, padding=2, dilation=2), nn.ReLU())
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.head = nn.Conv2d(16, 3, 1)

    def forward(self, x):
        skip = self.enc(x)
        h = self.up(self.mid(nn.functional.max_pool2d(skip, 2)))
        return self.head(torch.cat([skip, h], 1))


def _snapshot(model):
    return {k: (v.data_ptr(), v.clone()) for k, v in model.state_dict().items()}


def _assert_same_state(model, snapshot):
    state = model.state_dict()
    assert list(state) == list(snapshot)
    for key, (pointer, value) in snapshot.items():
        assert state[key].data_ptr() == pointer, key
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize("name", ["fcn_resnet50", "deeplabv3_resnet50"])
def test_torchvision_models_convert_with_unchanged_outputs(name):
    model = getattr(segmentation, name)(weights=None, weights_backbone=None, num_classes=3,
                                        aux_loss=True).eval().double().to(DEVICE)
    x = torch.randn(1, 3, 33, 30, dtype=torch.float64, device=DEVICE)
    with torch.no_grad():
        want = model(x)
    snapshot = _snapshot(model)
    report = segops.convert_model(model)
    dilated = [n for n, old, new in report.replaced if new == "AtrousConv2d"]
    assert report.model is model and len(dilated) >= 8  # dilated 3x3s of layer3/4 (+ ASPP)
    assert all(max(m.dilation) > 1 for m in model.modules() if type(m) is AtrousConv2d)
    assert not any(type(m) is nn.Conv2d and max(m.dilation) > 1 for m in model.modules())
    _assert_same_state(model, snapshot)
    with torch.no_grad():
        got = model(x)
    for key in want:
        assert_close(got[key], want[key], F64, name=key)
    reverted = segops.revert_model(model)
    assert len(reverted) == len(report)
    assert not any(type(m) is AtrousConv2d for m in model.modules())
    _assert_same_state(model, snapshot)


def test_plain_unet_all_convs_and_not_inplace():
    model = PlainUNet().double().to(DEVICE)
    x = torch.randn(2, 3, 12, 10, dtype=torch.float64, device=DEVICE)
    want = model(x)
    report = segops.convert_model(model, ops=("conv", "conv_transpose"), inplace=False)
    assert report.model is not model
    assert type(model.up) is nn.ConvTranspose2d  # the original is untouched
    converted = report.model
    assert type(converted.up) is ConvTranspose2d and type(converted.enc[0]) is AtrousConv2d
    assert {new for _, _, new in report.replaced} == {"AtrousConv2d", "ConvTranspose2d"}
    assert len(report) == 4 and "4 layers replaced" in str(report)
    assert_close(converted(x), want, F64)
    loss = converted(x).sum()
    loss.backward()
    assert converted.up.weight.grad is not None


def test_default_ops_leave_undilated_convs():
    model = PlainUNet()
    report = segops.convert_model(model)
    assert sorted(name for name, _, _ in report.replaced) == ["mid.0", "up"]
    assert type(model.enc[0]) is nn.Conv2d


@pytest.mark.parametrize("inplace", [True, False])
def test_the_model_itself_is_converted_and_reverted(inplace):
    """A lone layer is converted too: the report's model is its twin (the
    object passed in cannot change class), sharing the parameters, with the
    same outputs."""
    conv = nn.Conv2d(3, 4, 3, padding=2, dilation=2).double()
    x = torch.randn(1, 3, 6, 7, dtype=torch.float64)
    want = conv(x)
    report = segops.convert_model(conv, inplace=inplace)
    assert type(report.model) is AtrousConv2d and report.replaced == [("", "Conv2d",
                                                                        "AtrousConv2d")]
    assert "(the model itself): Conv2d -> AtrousConv2d" in str(report)
    assert (report.model.weight is conv.weight) is inplace
    assert_close(report.model(x), want, F64)
    back = segops.revert_model(report.model, inplace=inplace)
    assert type(back.model) is nn.Conv2d and len(back) == 1
    assert torch.equal(back.model.weight, conv.weight)
    assert len(segops.convert_model(nn.Conv2d(3, 4, 3))) == 0   # undilated: left
    assert len(segops.convert_model(nn.ConvTranspose2d(3, 4, 2))) == 1


def test_a_layer_compiled_with_module_compile_is_refused():
    """Module.compile() on a layer: its twin would run the original class's
    compiled forward (torch's conv, silently), so conversion refuses it,
    before changing anything; a compiled parent is converted as usual."""
    model = nn.Sequential(nn.Conv2d(2, 2, 3, dilation=2), nn.Conv2d(2, 2, 3, dilation=2))
    model[1].compile()
    with pytest.raises(segops.ArgumentError, match="compiled with Module.compile"):
        segops.convert_model(model)
    assert [type(m) for m in model] == [nn.Conv2d, nn.Conv2d]
    parent = nn.Sequential(nn.Conv2d(2, 2, 3, dilation=2))
    parent.compile()
    assert len(segops.convert_model(parent)) == 1 and type(parent[0]) is AtrousConv2d
    parent[0].compile()
    with pytest.raises(segops.ArgumentError, match="revert_model: a AtrousConv2d"):
        segops.revert_model(parent)


def test_subclasses_are_not_replaced_and_are_reported():
    """Subclasses of a replaced layer are left and listed: a user's own, a
    parametrized conv (weight_norm), a torchvision pooler's; an undilated
    one only when every conv is converted; segops' own layers never."""
    class Custom(nn.Conv2d):
        pass

    tv_ops = pytest.importorskip("torchvision.ops")

    class Pooler(tv_ops.RoIAlign):
        pass

    normed = nn.utils.parametrizations.weight_norm(nn.Conv2d(2, 2, 3, dilation=2))
    model = nn.Sequential(Custom(2, 2, 3, dilation=2), normed, Custom(2, 2, 3), Pooler(2, 1.0, 2),
                          AtrousConv2d(2, 2, 3), nn.Conv2d(2, 2, 3, dilation=2))
    report = segops.convert_model(model, inplace=False)
    assert report.replaced == [("5", "Conv2d", "AtrousConv2d")]
    assert report.left == [("0", "Custom"), ("1", "ParametrizedConv2d"), ("3", "Pooler")]
    assert "3 subclasses left as they are:\n  0: Custom" in str(report)
    every = segops.convert_model(model, ops=("conv",), inplace=False)
    assert [name for name, _ in every.left] == ["0", "1", "2"]
    assert segops.convert_model(Custom(2, 2, 3, dilation=2)).left == [("", "Custom")]


def test_revert_model_reports_the_subclasses_it_leaves():
    """revert_model replaces only segops' exact classes and lists the
    subclasses it leaves: an AtrousConv2d parametrized after conversion, a
    user's RoIAlign or RoIHeads subclass; convert_model lists a subclass of
    torchvision's RoIHeads it leaves under 'detection'."""
    from segops.models.detection.roi_heads import RoIHeads

    class Pooler(RoIAlign):
        pass

    class Heads(RoIHeads):
        pass

    model = nn.Sequential(nn.Conv2d(2, 2, 3, dilation=2), nn.Conv2d(2, 2, 3, dilation=2))
    segops.convert_model(model)
    nn.utils.parametrizations.weight_norm(model[0])
    model.append(Pooler(2, 1.0, 2))
    model.append(Heads(None, None, None, 0.5, 0.5, 512, 0.25, None, 0.05, 0.5, 100))
    report = segops.revert_model(model)
    assert report.replaced == [("1", "AtrousConv2d", "Conv2d")]
    assert report.left == [("0", "ParametrizedAtrousConv2d"), ("2", "Pooler"), ("3", "Heads")]
    assert "3 subclasses left as they are:\n  0: ParametrizedAtrousConv2d" in str(report)
    tv_heads = pytest.importorskip("torchvision.models.detection.roi_heads")

    class TvHeads(tv_heads.RoIHeads):
        pass

    heads = nn.Sequential(TvHeads(None, None, None, 0.5, 0.5, 512, 0.25, None, 0.05, 0.5, 100))
    assert segops.convert_model(heads, ops="detection").left == [("0", "TvHeads")]
    assert segops.convert_model(heads, ops="roi_align").left == []


def test_roi_align_modules():
    tv_ops = pytest.importorskip("torchvision.ops")
    pooler = tv_ops.MultiScaleRoIAlign(["a", "b"], 3, 2)
    model = nn.ModuleDict({"pool": pooler, "single": tv_ops.RoIAlign(2, 0.5, 2, aligned=True)})
    features = {"a": torch.randn(1, 2, 16, 16, dtype=torch.float64, device=DEVICE),
                "b": torch.randn(1, 2, 8, 8, dtype=torch.float64, device=DEVICE)}
    boxes = [torch.tensor([[1.0, 2.0, 30.0, 40.0], [0.0, 0.0, 63.0, 63.0]],
                          dtype=torch.float64, device=DEVICE)]
    want = model["pool"](features, boxes, [(64, 64)])
    want_single = model["single"](features["a"], boxes)
    report = segops.convert_model(model)
    assert type(model["pool"]) is MultiScaleRoIAlign and type(model["single"]) is RoIAlign
    assert len(report) == 2
    assert_close(model["pool"](features, boxes, [(64, 64)]), want, F64)
    assert_close(model["single"](features["a"], boxes), want_single, F64)
    segops.revert_model(model)
    assert type(model["pool"]) is tv_ops.MultiScaleRoIAlign


def test_multi_scale_pooler_keeps_its_scales_and_level_rule_both_ways():
    """A pooler keeps the scales and the canonical scale/level of its first
    call (torchvision's cached scales and LevelMapper) through convert_model
    and revert_model: a later smaller image (same padded maps) and a
    changed canonical_scale give what a module never converted gives."""
    tv_ops = pytest.importorskip("torchvision.ops")
    features = {"a": torch.randn(1, 2, 16, 16, dtype=torch.float64, device=DEVICE),
                "b": torch.randn(1, 2, 8, 8, dtype=torch.float64, device=DEVICE)}
    boxes = [torch.tensor([[1.0, 2.0, 30.0, 40.0], [0.0, 0.0, 39.0, 39.0]],
                          dtype=torch.float64, device=DEVICE)]

    def called_once(module):
        module(features, boxes, [(64, 64)])
        module.canonical_scale = 8    # after the first call: no effect in torchvision
        return module

    def second_call(module):
        return module(features, boxes, [(40, 40)])   # scales would infer as 1/2, 1/4

    plain = called_once(tv_ops.MultiScaleRoIAlign(["a", "b"], 3, 2))
    want = second_call(plain)
    model = nn.ModuleDict({"pool": called_once(tv_ops.MultiScaleRoIAlign(["a", "b"], 3, 2))})
    segops.convert_model(model)
    assert model["pool"].scales == [0.25, 0.125] and model["pool"].level_rule == (224, 4)
    assert_close(second_call(model["pool"]), want, F64)
    segops.revert_model(model)
    assert type(model["pool"]) is tv_ops.MultiScaleRoIAlign
    assert_close(second_call(model["pool"]), want, F64)
    ours = nn.ModuleDict({"pool": called_once(MultiScaleRoIAlign(["a", "b"], 3, 2))})
    assert_close(second_call(ours["pool"]), want, F64)
    segops.revert_model(ours)
    assert_close(second_call(ours["pool"]), want, F64)
    fresh = nn.ModuleDict({"pool": tv_ops.MultiScaleRoIAlign(["a", "b"], 3, 2)})
    segops.convert_model(fresh)   # never called: both infer at the first call
    assert fresh["pool"].scales is None and fresh["pool"].level_rule is None


def test_scales_are_inferred_as_torchvision_infers_them():
    """The power of 2 nearest to feature / image size, its log2 in float32
    as torchvision's: ratios next to 2**(k + 1/2) (2378 / 3363 is 1.0 there,
    0.5 in float64) and ordinary strides."""
    poolers = pytest.importorskip("torchvision.ops.poolers")
    from segops.nn.roi_align import infer_scale
    cases = [(2378, 3363), (1189, 3363), (7, 10), (17, 24), (25, 100), (13, 800), (200, 800)]
    for feature, image in cases:
        f = torch.empty(0, 0, feature, 1)
        assert infer_scale(f, (image, 1)) == poolers._infer_scale(f, [image, 1]), (feature, image)
    assert infer_scale(torch.empty(0, 0, 2378, 1), (3363, 1)) == 1.0


def test_scales_follow_the_default_dtype_as_torchvisions():
    """torchvision takes the log2 in torch's default dtype: under float64,
    2378 / 3363 is scale 0.5, as in torchvision."""
    poolers = pytest.importorskip("torchvision.ops.poolers")
    from segops.nn.roi_align import infer_scale
    f = torch.empty(0, 0, 2378, 1)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert infer_scale(f, (3363, 1)) == poolers._infer_scale(f, [3363, 1]) == 0.5
    finally:
        torch.set_default_dtype(previous)


def test_a_module_used_twice_gets_one_twin():
    """nn.Sequential(c, relu, c, relu): one AtrousConv2d at both places (torch sees
    one module: hooks registered once, one training flag, weights tied),
    and one nn.Conv2d back."""
    conv = nn.Conv2d(2, 2, 3, padding=2, dilation=2).double().to(DEVICE)
    relu = nn.ReLU()
    model = nn.Sequential(conv, relu, conv, relu)
    x = torch.randn(1, 2, 7, 7, dtype=torch.float64, device=DEVICE)
    want = model(x)
    report = segops.convert_model(model)
    assert type(model[0]) is AtrousConv2d and model[0] is model[2]
    assert [name for name, _, _ in report.replaced] == ["0", "2"]
    assert len(list(model.modules())) == 3 and model[1] is model[3]
    calls = []
    for m in model.modules():
        if isinstance(m, AtrousConv2d):
            m.register_forward_hook(lambda *args: calls.append(1))
    assert_close(model(x), want, F64)
    assert len(calls) == 2
    model[0].weight = nn.Parameter(torch.zeros_like(conv.weight))
    assert model[2].weight is model[0].weight
    segops.revert_model(model)
    assert type(model[0]) is nn.Conv2d and model[0] is model[2]


def test_roi_align_twins_keep_hooks_and_training_flag():
    tv_ops = pytest.importorskip("torchvision.ops")
    model = nn.ModuleDict({"pool": tv_ops.MultiScaleRoIAlign(["a"], 2, 2),
                           "single": tv_ops.RoIAlign(2, 0.5, 2)}).eval()
    fired = []
    for name in ("pool", "single"):
        model[name].register_forward_hook(lambda m, args, out, name=name: fired.append(name))
        model[name].register_forward_pre_hook(lambda m, args: fired.append("pre"))
    model["single"].register_full_backward_hook(lambda m, gin, gout: fired.append("backward"))
    features = {"a": torch.randn(1, 2, 8, 8, dtype=torch.float64, device=DEVICE,
                                 requires_grad=True)}
    boxes = [torch.tensor([[1.0, 2.0, 10.0, 12.0]], dtype=torch.float64, device=DEVICE)]
    for convert in (segops.convert_model, segops.revert_model):
        convert(model)
        fired.clear()
        model["pool"](features, boxes, [(16, 16)])
        model["single"](features["a"], boxes).sum().backward()
        assert fired == ["pre", "pool", "pre", "single", "backward"]
        assert not model["pool"].training and not model["single"].training


def test_torch_jit_script_names_the_way_to_script():
    """torch.jit.script cannot compile segops' ops: a clear error where a
    scripted forward calls one, naming the recipe, which scripts (the torch /
    torchvision twins of a reverted copy) with the converted model's outputs
    and leaves the converted model as it was. A segops layer the scripted
    code never calls (an ignored attribute) is no error."""
    tv_ops = pytest.importorskip("torchvision.ops")

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = PlainUNet()
            self.pool = tv_ops.MultiScaleRoIAlign(["a"], 2, 2)
            self.single = tv_ops.RoIAlign(2, 0.5, 2, aligned=True)

        def forward(self, x, boxes: list[torch.Tensor]):
            y = self.unet(x)
            return y, self.pool({"a": y}, boxes, [(16, 16)]), self.single(y, boxes)

    model = Model().double().to(DEVICE)
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64, device=DEVICE)
    boxes = [torch.tensor([[1.0, 2.0, 10.0, 12.0]], dtype=torch.float64, device=DEVICE)]
    segops.convert_model(model, ops=("conv", "conv_transpose", "roi_align"))
    want = model(x, boxes)
    for layer, op in ((model, r"ops\.atrous_conv2d"), (model.unet.up, r"ops\.conv_transpose2d"),
                      (model.pool, r"nn\.MultiScaleRoIAlign"), (model.single, r"ops\.roi_align")):
        with pytest.raises(TypeError, match=rf"cannot compile segops\.{op} .*"
                                            r"revert_model\(model, inplace=False\)\.model.*"
                                            r"torch\.export"):
            torch.jit.script(layer)
    scripted = torch.jit.script(segops.revert_model(model, inplace=False).model)
    assert type(model.unet.up) is ConvTranspose2d and type(model.single) is RoIAlign
    assert scripted.unet.up.original_name == "ConvTranspose2d"
    assert scripted.pool.original_name == "MultiScaleRoIAlign"
    for got, expected in zip(scripted(x, boxes), want):
        assert_close(got, expected, F64)

    class Holder(nn.Module):
        __jit_ignored_attributes__ = ["unused"]

        def __init__(self):
            super().__init__()
            self.unused = AtrousConv2d(2, 2, 3, padding=2, dilation=2)
            self.plain = nn.Conv2d(2, 2, 1)

        def forward(self, x):
            return self.plain(x)

    holder = Holder().double().to(DEVICE)
    y = torch.randn(1, 2, 5, 5, dtype=torch.float64, device=DEVICE)
    assert_close(torch.jit.script(holder)(y), holder(y), F64)
    with pytest.raises(TypeError, match=r"segops\.nn\.conv_transpose\.conv_transpose2d_to_size"):
        torch.jit.script(segops.nn.conv_transpose.conv_transpose2d_to_size)


def test_unknown_ops_and_unrevertible_layers():
    with pytest.raises(ValueError, match="unknown ops"):
        segops.convert_model(nn.Conv2d(1, 1, 1), ops=("attention",))
    fused = nn.Sequential(AtrousConv2d(2, 2, 3, activation="relu"))
    with pytest.raises(segops.ArgumentError, match="fused activation"):
        segops.revert_model(fused)


@pytest.mark.parametrize("function", [segops.convert_model, segops.revert_model])
@pytest.mark.parametrize("model", [None, "resnet50", {"conv": nn.Conv2d(1, 1, 1)},
                                   [nn.Conv2d(1, 1, 1)], nn.Conv2d])
def test_a_non_module_is_an_argument_type_error(function, model):
    """Not an AttributeError from deep inside: an ArgumentTypeError naming
    the argument (a class, not an instance, is refused too)."""
    with pytest.raises(segops.ArgumentTypeError, match="model must be a torch.nn.Module"):
        function(model)
    with pytest.raises(segops.ArgumentTypeError, match="model"):
        function(model, inplace=False)


def test_ops_and_inplace_are_checked():
    conv = nn.Sequential(nn.Conv2d(1, 1, 3, dilation=2))
    with pytest.raises(segops.ArgumentError, match="unknown ops"):
        segops.convert_model(conv, ops=("conv", "attention"))
    with pytest.raises(segops.ArgumentTypeError, match="ops"):
        segops.convert_model(conv, ops=3)
    with pytest.raises(segops.ArgumentTypeError, match="ops"):
        segops.convert_model(conv, ops=[None])
    with pytest.raises(segops.ArgumentTypeError, match="inplace"):
        segops.convert_model(conv, inplace="no")
    with pytest.raises(segops.ArgumentTypeError, match="inplace"):
        segops.revert_model(conv, inplace=None)
    report = segops.convert_model(conv, ops="atrous_conv")  # one name alone
    assert type(conv[0]) is AtrousConv2d and len(report) == 1


def test_a_conv_transpose_subclass_is_left_and_segops_own_is_not_reported():
    """A user's nn.ConvTranspose2d subclass is not replaced but listed in
    ``left``; a segops ConvTranspose2d already in the model is neither."""
    class Custom(nn.ConvTranspose2d):
        pass

    model = nn.Sequential(Custom(2, 2, 2, stride=2), ConvTranspose2d(2, 2, 2, stride=2),
                          nn.ConvTranspose2d(2, 2, 2, stride=2))
    report = segops.convert_model(model, ops=("conv_transpose",))
    assert type(model[0]) is Custom and type(model[1]) is ConvTranspose2d
    assert report.replaced == [("2", "ConvTranspose2d", "ConvTranspose2d")]
    assert report.left == [("0", "Custom")]


def test_max_pooling_roi_align_is_refused_by_revert_model():
    """torchvision's RoIAlign has no max pooling: reverting a segops RoIAlign
    or MultiScaleRoIAlign with pool_mode='max' is an ArgumentError, the
    layer left as it is."""
    for layer in (RoIAlign(2, 0.5, 2, pool_mode="max"),
                  MultiScaleRoIAlign(["a"], 2, 2, pool_mode="max")):
        model = nn.Sequential(layer)
        with pytest.raises(segops.ArgumentError, match="has no torchvision twin"):
            segops.revert_model(model)
        assert model[0] is layer


def test_reverted_conv_has_exactly_an_nn_conv2d_attributes():
    """revert_model gives an nn.Conv2d whose attributes are a fresh
    nn.Conv2d's: no ``activation`` left over from AtrousConv2d."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3, dilation=2))
    segops.convert_model(model)
    assert model[0].activation is None
    segops.revert_model(model)
    assert type(model[0]) is nn.Conv2d and not hasattr(model[0], "activation")
    assert set(vars(model[0])) == set(vars(nn.Conv2d(2, 3, 3, dilation=2)))


def test_retyped_layers_have_their_own_parameter_and_child_dicts():
    """The twin shares the tensors but not the dicts: a parameter or child
    swapped in the twin after conversion does not show in the original,
    and the other way round."""
    conv = nn.Conv2d(2, 2, 3, dilation=2)
    twin = segops.convert_model(conv, inplace=True).model
    assert twin.weight is conv.weight
    old_weight = conv.weight
    twin.weight = nn.Parameter(torch.zeros_like(old_weight))
    assert conv.weight is old_weight
    conv.bias = nn.Parameter(torch.ones(2))
    assert twin.bias is not conv.bias
    twin.register_buffer("extra", torch.zeros(1))
    assert "extra" not in dict(conv.named_buffers())
    twin.add_module("child", nn.ReLU())
    assert "child" not in conv._modules
