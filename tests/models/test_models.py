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
