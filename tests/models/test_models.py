"""Models: output shapes and dtypes, torchvision parity (same state_dict,
same eval outputs), FCN-8s and U-Net geometry, a training step, compile."""
import pytest
import torch
from helpers import DEVICE, ON_GPU, RTOL, assert_close

import segops
from segops import _dispatch, models
from segops.train import train_step

F64 = RTOL[torch.float64]


def randomise_batch_norm(model):
    """Non-trivial running statistics and affine parameters, so eval-mode
    parity tests the BN wiring too."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


PARITY = [("fcn_resnet50", models.fcn_resnet50), ("deeplabv3_resnet50", models.deeplabv3_resnet50)]


@pytest.mark.parametrize("name,build", PARITY, ids=[p[0] for p in PARITY])
def test_torchvision_parity(name, build):
    """load_state_dict(torchvision's) works and eval outputs match in float64."""
    segmentation = pytest.importorskip("torchvision.models.segmentation")
    theirs = getattr(segmentation, name)(weights=None, weights_backbone=None, num_classes=5,
                                         aux_loss=True)
    randomise_batch_norm(theirs)
    ours = build(num_classes=5, aux_loss=True)
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours, theirs = ours.eval().double().to(DEVICE), theirs.eval().double().to(DEVICE)
    x = torch.randn(1, 3, 40, 36, dtype=torch.float64, device=DEVICE)
    with torch.no_grad():
        got, want = ours(x), theirs(x)
    assert list(got) == ["out", "aux"]
    for key in ("out", "aux"):
        assert_close(got[key], want[key], F64, name=key)


@pytest.mark.parametrize("name,build", PARITY, ids=[p[0] for p in PARITY])
def test_torchvision_builder_keywords_and_weights(name, build, tmp_path):
    """torchvision's keywords: weights (its state_dict, or the file) decide
    num_classes and aux_loss and load; weights_backbone (an ImageNet ResNet
    state_dict) initialises the backbone; weights=None, weights_backbone=None
    as users write to avoid a download."""
    segmentation = pytest.importorskip("torchvision.models.segmentation")
    tv = pytest.importorskip("torchvision.models")
    theirs = getattr(segmentation, name)(weights=None, weights_backbone=None, num_classes=4,
                                         aux_loss=True)
    randomise_batch_norm(theirs)
    torch.save(theirs.state_dict(), tmp_path / "weights.pth")
    for weights in (theirs.state_dict(), tmp_path / "weights.pth", str(tmp_path / "weights.pth")):
        ours = build(weights=weights, progress=False)
        assert ours.aux_classifier is not None
        for key, value in theirs.state_dict().items():
            assert torch.equal(ours.state_dict()[key], value), key
    without_aux = {k: v for k, v in theirs.state_dict().items() if not k.startswith("aux_")}
    assert build(weights=without_aux).aux_classifier is None
    plain = build(weights=None, weights_backbone=None, num_classes=3)
    assert plain.classifier[4].out_channels == 3 and plain.aux_classifier is None
    assert build().classifier[4].out_channels == 21
    imagenet = randomise_batch_norm(tv.resnet50(weights=None))
    backbone = build(weights_backbone=imagenet.state_dict()).backbone.state_dict()
    assert list(backbone) == [k for k in imagenet.state_dict() if not k.startswith("fc.")]
    for key, value in backbone.items():
        assert torch.equal(value, imagenet.state_dict()[key]), key


@pytest.mark.parametrize("call, error, match", [
    (lambda build, sd: build(weights=sd, num_classes=5), ValueError,
     "'num_classes' expected value 4 but got 5"),
    (lambda build, sd: build(weights=sd, aux_loss=False), ValueError,
     "'aux_loss' expected value True but got False"),
    (lambda build, sd: build(weights="DEFAULT"), FileNotFoundError, "DEFAULT"),
    (lambda build, sd: build(weights=object()), TypeError, "segops downloads nothing"),
    (lambda build, sd: build(weights_backbone=[1]), TypeError, "weights_backbone must be"),
])
def test_builder_weights_errors(call, error, match):
    sd = models.fcn_resnet50(num_classes=4, aux_loss=True).state_dict()
    with pytest.raises(error, match=match):
        call(models.fcn_resnet50, sd)


@pytest.mark.parametrize("name", ["fcn_resnet101", "deeplabv3_resnet101"])
def test_resnet101_variants_have_torchvision_keys(name):
    segmentation = pytest.importorskip("torchvision.models.segmentation")
    theirs = getattr(segmentation, name)(weights=None, weights_backbone=None, num_classes=3)
    ours = getattr(models, name)(num_classes=3)
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}


def test_resnet_classifier_matches_torchvision():
    tv = pytest.importorskip("torchvision.models")
    theirs = randomise_batch_norm(tv.resnet50(weights=None, num_classes=7)).eval().double()
    ours = models.resnet50(num_classes=7)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    assert_close(ours.eval().double()(x), theirs(x), F64)


def test_resnet_builders_take_torchvisions_weights_keyword(tmp_path):
    """weights=None (torchvision's call), a state_dict or its path: loaded
    strictly, num_classes the weights' (a backbone's: none), a different
    num_classes torchvision's ValueError, a Weights enum a TypeError."""
    tv = pytest.importorskip("torchvision.models")
    theirs = randomise_batch_norm(tv.resnet50(weights=None, num_classes=7)).eval().double()
    assert models.resnet50(weights=None, progress=False).fc.out_features == 1000
    torch.save(theirs.state_dict(), tmp_path / "r50.pth")
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    for weights in (theirs.state_dict(), tmp_path / "r50.pth", str(tmp_path / "r50.pth")):
        ours = models.resnet50(weights=weights).eval().double()
        assert_close(ours(x), theirs(x), F64)
    with pytest.raises(ValueError, match="'num_classes' expected value 7 but got 5"):
        models.resnet50(weights=theirs.state_dict(), num_classes=5)
    backbone = {k: v for k, v in theirs.state_dict().items() if not k.startswith("fc.")}
    assert not hasattr(models.resnet50(weights=backbone), "fc")
    with pytest.raises(TypeError, match="segops downloads nothing"):
        models.resnet101(weights=tv.ResNet101_Weights.DEFAULT)


def test_segmentation_models_never_use_dilated_nn_conv2d_or_conv_transpose():
    for model in (models.deeplabv3_resnet50(3, aux_loss=True), models.fcn8s(3, base_channels=4),
                  models.unet(3, 2, 4, 2)):
        for m in model.modules():
            assert type(m) is not torch.nn.ConvTranspose2d
            if type(m) is torch.nn.Conv2d:
                assert max(m.dilation) == 1


@pytest.mark.parametrize("build", [models.fcn_resnet101, models.deeplabv3_resnet101],
                         ids=["fcn_resnet101", "deeplabv3_resnet101"])
def test_resnet101_forward_shape(build):
    """(The reference path on CPU: the kernels are checked by the parity tests.)"""
    model = build(num_classes=4, aux_loss=True).eval().to(DEVICE)
    with torch.no_grad(), _dispatch.reference_only():
        out = model(torch.randn(1, 3, 17, 20, device=DEVICE))
    assert out["out"].shape == out["aux"].shape == (1, 4, 17, 20)
    assert out["out"].dtype == torch.float32


@pytest.mark.parametrize("size,path", [((32, 32), "kernel"), ((37, 45), "reference"),
                                       ((50, 29), "reference")])
def test_fcn8s_output_is_cropped_to_the_input(size, path):
    model = models.fcn8s(5, base_channels=4).to(DEVICE)
    torch.nn.init.normal_(model.score_fr.weight)
    with _dispatch.reference_only() if path == "reference" else torch.enable_grad():
        out = model(torch.randn(2 if path == "reference" else 1, 3, *size, device=DEVICE))
    assert out.shape[1:] == (5, *size)
    assert out.abs().sum() > 0
    with pytest.raises(ValueError, match="vgg16"):
        models.fcn8s(5, backbone="resnet50")


# --- FCN-8s crop offsets, derived independently of the model --------------
# A feature map's pixel u has its centre at input coordinate a * u + b; each
# layer maps (a, b) of its output to its input's (kind, kernel, stride, pad):
# a conv or pool's output pixel u is centred on its input's s * u - p + (k - 1) / 2,
# a transposed conv's on its input's (u + p - (k - 1) / 2) / s.


def _centre_map(layers):
    """(a, b) with input coordinate = a * u + b for the last layer's pixel u
    (exact fractions); layers are (kind, kernel, stride, padding), input first."""
    from fractions import Fraction
    a, b = Fraction(1), Fraction(0)
    for kind, k, s, p in layers:
        if kind == "up":
            a, b = a / s, b + a * Fraction(2 * p - (k - 1), 2 * s)
        else:
            a, b = a * s, b + a * Fraction(k - 1 - 2 * p, 2)
    return a, b


def _crop_offset(of, to):
    """The crop offset o with map ``of``'s pixel u + o centred where map
    ``to``'s pixel u is (both (a, b) with the same a)."""
    (a, b), (a2, b2) = of, to
    assert a == a2, (a, a2)
    offset = (b2 - b) / a
    assert offset.denominator == 1, f"no integer crop aligns {of} with {to}"
    return int(offset)


def _fcn8s_offsets(trunk, pool3_at, pool4_at, heads):
    """(pool4, pool3, output) crop offsets from the VGG trunk (layers up to
    pool5), the indices of pool3 and pool4 in it, and the heads: fc6, fc7,
    score_fr, then upscore2, upscore_pool4 and upscore8."""
    fr = trunk + heads[:3]
    up2 = fr + [heads[3]]
    pool4, pool3 = trunk[:pool4_at + 1], trunk[:pool3_at + 1]
    up4 = up2 + [heads[4]]  # score_pool4 + upscore2 -> upscore_pool4 (upscore2's grid)
    out = up4 + [heads[5]]
    return (_crop_offset(_centre_map(pool4), _centre_map(up2)),
            _crop_offset(_centre_map(pool3), _centre_map(up4)),
            _crop_offset(_centre_map(out), (1, 0)))


def _paper_fcn8s_layers():
    """VGG16 as in Long et al.'s voc-fcn8s prototxt, written out by hand."""
    trunk = [("conv", 3, 1, 100), ("conv", 3, 1, 1), ("pool", 2, 2, 0)]
    trunk += [("conv", 3, 1, 1)] * 2 + [("pool", 2, 2, 0)]
    for _ in range(3):  # stages 3, 4 and 5: three 3x3 convs and a pool each
        trunk += [("conv", 3, 1, 1)] * 3 + [("pool", 2, 2, 0)]
    heads = [("conv", 7, 1, 0), ("conv", 1, 1, 0), ("conv", 1, 1, 0),
             ("up", 4, 2, 0), ("up", 4, 2, 0), ("up", 16, 8, 0)]
    pools = [i for i, layer in enumerate(trunk) if layer[0] == "pool"]
    return trunk, pools[2], pools[3], heads


def _model_fcn8s_layers(model):
    """The same list read from a built model's modules."""
    def geometry(m):
        kind = {torch.nn.MaxPool2d: "pool"}.get(type(m), "up" if isinstance(
            m, torch.nn.ConvTranspose2d) else "conv")
        pair = (lambda v: v if isinstance(v, tuple) else (v, v))
        (k, k2), (s, s2), (p, p2) = (pair(m.kernel_size), pair(m.stride), pair(m.padding))
        assert (k, s, p) == (k2, s2, p2), "square geometry expected"
        if kind == "conv":
            assert pair(m.dilation) == (1, 1)
        return (kind, k, s, p)

    trunk, pools = [], []
    for stage in model.stages:
        for m in stage:
            if isinstance(m, (torch.nn.Conv2d, torch.nn.MaxPool2d)):
                trunk.append(geometry(m))
        pools.append(len(trunk) - 1)
    heads = [geometry(model.fc6[0]), geometry(model.fc7[0]), geometry(model.score_fr),
             geometry(model.upscore2), geometry(model.upscore_pool4), geometry(model.upscore8)]
    for score in (model.score_pool3, model.score_pool4):
        assert geometry(score) == ("conv", 1, 1, 0)
    return trunk, pools[2], pools[3], heads


def test_fcn8s_crop_offsets_match_the_receptive_field_alignment():
    """Propagate pixel centres through the paper's layers: the crops that
    align the maps are Caffe's 5, 9 and 31, and the model's constants."""
    want = _fcn8s_offsets(*_paper_fcn8s_layers())
    assert want == (5, 9, 31)
    model = models.FCN8s
    assert (model.POOL4_OFFSET, model.POOL3_OFFSET, model.OUTPUT_OFFSET) == want


@pytest.mark.parametrize("base_channels", [1, 2, 3, 4, 64])
def test_fcn8s_built_layers_give_the_model_offsets(base_channels):
    """The same derivation from the layers the model builds (conv1_1 alone
    pads by 100, whatever the widths: base_channels=3 gives 3-channel convs)."""
    model = models.fcn8s(2, base_channels=base_channels)
    got = _fcn8s_offsets(*_model_fcn8s_layers(model))
    assert got == (model.POOL4_OFFSET, model.POOL3_OFFSET, model.OUTPUT_OFFSET)


def _coordinate_fcn8s(base_channels, score):
    """An FCN-8s whose layers carry the input's pixel coordinate: channels 0
    and 1 hold K + r and K - r (identity 3x3 / 7x7 / 1x1 convs at the centre
    tap; a 2x2 max pool gives K + centre + 1/2 and K - centre + 1/2), the
    score layer named ``score`` outputs (c0 - c1) / 2 = the input coordinate
    of its pixel's centre and the other two score layers are zero, the
    bilinear up-sampling reproduces a linear ramp exactly. Correct crops then
    give back the input ramp in the interior of the output."""
    model = models.fcn8s(1, base_channels=base_channels).double().eval()
    with torch.no_grad():
        convs = [m for stage in model.stages for m in stage if isinstance(m, torch.nn.Conv2d)]
        for conv in convs + [model.fc6[0], model.fc7[0]]:
            conv.weight.zero_()
            conv.bias.zero_()
            centre = conv.kernel_size[0] // 2
            for c in (0, 1):
                conv.weight[c, c, centre, centre] = 1
        for name in ("score_fr", "score_pool4", "score_pool3"):
            layer = getattr(model, name)
            layer.weight.zero_()
            layer.bias.zero_()
            if name == score:
                layer.weight[0, 0], layer.weight[0, 1] = 0.5, -0.5
    return model


@pytest.mark.parametrize("score", ["score_fr", "score_pool4", "score_pool3"])
@pytest.mark.parametrize("axis", ["x", "y"])
def test_fcn8s_maps_each_input_pixel_to_the_same_output_pixel(score, axis):
    """An input carrying its own pixel coordinate comes out unchanged through
    each of the three score paths: every crop aligns the maps exactly (an
    offset off by one shifts the ramp by 1, 8 or 16 pixels)."""
    model = _coordinate_fcn8s(3, score)  # 3: the width that once padded conv1_2 too
    long, short, K = 192, 96, 1000.0
    H, W = (short, long) if axis == "x" else (long, short)
    ramp = torch.arange(long, dtype=torch.float64)
    ramp = ramp.expand(H, W) if axis == "x" else ramp[:, None].expand(H, W)
    x = torch.stack([K + ramp, K - ramp, torch.zeros_like(ramp)])[None]
    with torch.no_grad(), _dispatch.reference_only():  # geometry only: the kernels are tested elsewhere
        out = model(x)[0, 0]
    # the interior (pools and up-sampling near the border see the zero padding)
    rows, cols = slice(H // 2 - 16, H // 2 + 16), slice(W // 2 - 16, W // 2 + 16)
    if axis == "x":
        cols = slice(W // 2 - 32, W // 2 + 32)
    else:
        rows = slice(H // 2 - 32, H // 2 + 32)
    torch.testing.assert_close(out[rows, cols], ramp[rows, cols], rtol=0, atol=1e-9)


def test_fcn8s_upscore_layers_start_bilinear():
    model = models.fcn8s(3, base_channels=4)
    kernel = segops.nn.init.bilinear_kernel(16)
    assert torch.allclose(model.upscore8.weight[1, 1], kernel)
    assert model.upscore8.weight[0, 1].abs().sum() == 0


@pytest.mark.parametrize("up", ["transpose", "bilinear"])
@pytest.mark.parametrize("norm", ["batch", "none"])
@pytest.mark.parametrize("size", [(32, 32), (27, 41)])
def test_unet_shapes(up, norm, size):
    model = models.unet(in_channels=2, num_classes=3, base_channels=4, depth=3, up=up,
                        norm=norm).to(DEVICE)
    out = model(torch.randn(2, 2, *size, device=DEVICE))
    assert out.shape == (2, 3, *size) and out.dtype == torch.float32


@pytest.mark.parametrize("up", ["transpose", "bilinear"])
def test_unet_batch_statistics_see_only_the_image(up):
    """An odd-sized input is not padded before the encoder (its zeros would
    enter every encoder BatchNorm's batch statistics: 33x33 padded to 48x48
    halved them): the first BN sees (N, C, 33, 35) and its running mean is
    that of the image's pixels; where pooling halved an odd size, the
    up-sampled map gets the missing row or column, so the logits come out
    at the input's size. An input under 2**depth is padded and cropped."""
    model = models.unet(in_channels=2, num_classes=3, base_channels=4, depth=3, up=up).train()
    seen = []
    model.inc[1].register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    x = torch.randn(2, 2, 33, 35)
    out = model.to(DEVICE)(x.to(DEVICE))
    assert seen == [(2, 4, 33, 35)] and out.shape == (2, 3, 33, 35)
    mean = model.inc[0](x.to(DEVICE)).mean(dim=(0, 2, 3))
    running = model.inc[1].running_mean
    assert_close(running, 0.1 * mean, 1e-5, name="running mean")   # momentum 0.1 from 0
    tiny = model.eval()(torch.randn(1, 2, 5, 9, device=DEVICE))   # under 2**depth: padded
    assert tiny.shape == (1, 3, 5, 9)


def test_unet_bad_arguments():
    with pytest.raises(ValueError, match="up must be"):
        models.unet(up="nearest")
    with pytest.raises(ValueError, match="norm must be"):
        models.unet(norm="group")


def test_one_training_step_lowers_the_loss():
    torch.manual_seed(0)
    model = models.unet(3, 4, base_channels=4, depth=2).to(DEVICE)
    images = torch.randn(4, 3, 16, 16, device=DEVICE)
    masks = torch.randint(0, 4, (4, 16, 16), device=DEVICE)
    loss_fn = segops.nn.DiceLoss("multiclass")

    def loss(logits, target):
        return torch.nn.functional.cross_entropy(logits, target) + loss_fn(logits, target)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model.eval()  # batch statistics would change with the weights
    with torch.no_grad():
        before = loss(model(images), masks).item()
    model.train()
    train_step(model.eval(), images, masks, loss, optimizer)
    with torch.no_grad():
        after = loss(model(images), masks).item()
    assert after < before


def test_compile_unet_forward_and_backward():
    model = models.unet(3, 2, base_channels=4, depth=2).to(DEVICE, torch.float64)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, device=DEVICE)
    backend = "inductor" if ON_GPU else "aot_eager"
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    want = model(x)
    want_grads = torch.autograd.grad(want.square().sum(), list(model.parameters()))
    assert_close(out, want, F64)
    for g, w in zip(grads, want_grads):
        assert_close(g, w, F64, name="grad")


def test_cpu_benchmark_rows_run_at_tiny_sizes(capsys, monkeypatch):
    """Smoke test of benchmarks/models.py's CPU rows (converted vs
    unconverted on the native path): the code runs and gives one record per
    model and case; no timing is asserted."""
    pytest.importorskip("torchvision")
    from segops.benchmarks import models as bench
    monkeypatch.setattr(bench, "CPU_UNET_WIDTH", 4)
    cases = [("unet", "train", 2, 16, 2, ("conv", "conv_transpose")),
             ("deeplabv3_resnet50", "infer", 1, 24, 3, ("atrous_conv",))]
    records = bench.run_cpu(cases=cases, warmup=0, rep=1)
    assert [(r.shape.split()[0], r.direction, r.provider) for r in records] == [
        ("unet", "train", "segops"), ("unet", "train", "eager"),
        ("deeplabv3_resnet50", "infer", "segops"), ("deeplabv3_resnet50", "infer", "eager")]
    assert all(r.ms > 0 and r.op == "model-cpu" for r in records)
    printed = capsys.readouterr().out
    assert printed.count("converted / unconverted") == 2
    assert "(23 conv.)" in records[0].shape  # every conv of the U-Net went through segops


@pytest.mark.parametrize("value", [None, [False, True], [False, False, False, True]],
                         ids=["none", "two", "four"])
def test_resnet_replace_stride_with_dilation_like_torchvision(value):
    """torchvision's default None builds the plain ResNet; a list without
    exactly 3 entries is its ValueError (was a TypeError, an IndexError, or
    a 4th entry silently ignored)."""
    tv = pytest.importorskip("torchvision.models")
    if value is None:
        theirs = tv.resnet50(weights=None, replace_stride_with_dilation=None)
        ours = models.resnet50(replace_stride_with_dilation=None)
        ours.load_state_dict(theirs.state_dict())
        assert [m.dilation for m in ours.modules() if isinstance(m, torch.nn.Conv2d)] == \
            [m.dilation for m in theirs.modules() if isinstance(m, torch.nn.Conv2d)]
        return
    with pytest.raises(ValueError, match="3-element"):
        tv.resnet50(weights=None, replace_stride_with_dilation=value)
    with pytest.raises(ValueError, match="3-element"):
        models.resnet50(replace_stride_with_dilation=value)
