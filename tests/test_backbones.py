"""Table 5's other backbones: torchvision's networks with a FER head, their ImageNet transfer."""

import importlib.util

import pytest
import torch
import torchvision

from fermodel import BACKBONES, build_model, load_pretrained

# every registered backbone outside the ResNet-50 family: torchvision's classifier submodule
# (dropped and replaced by the head ``fc``) and the embedding width
CLASSIFIER = {
    "vgg16": "classifier",
    "vgg16_bn": "classifier",
    "mobilenet_v2": "classifier",
    "densenet121": "classifier",
    "resnet18": "fc",
    "resnet34": "fc",
    "shufflenet_v2_x0_5": "fc",
}
WIDTH = {
    "vgg16": 512,
    "vgg16_bn": 512,
    "mobilenet_v2": 1280,
    "densenet121": 1024,
    "resnet18": 512,
    "resnet34": 512,
    "shufflenet_v2_x0_5": 1024,
}
# the same sizes as plain numbers, 7 classes, RGB (each checked against torchvision below)
PARAMS_7_RGB = {
    "vgg16": 14_718_279,
    "vgg16_bn": 14_726_727,
    "mobilenet_v2": 2_232_839,
    "densenet121": 6_961_031,
    "resnet18": 11_180_103,
    "resnet34": 21_288_263,
    "shufflenet_v2_x0_5": 348_967,
}
NAMES = list(CLASSIFIER)
# VGG's 138M-parameter ImageNet state dict takes seconds to build, save and load
TRANSFER_NAMES = [pytest.param(n, marks=pytest.mark.slow) if "vgg" in n else n for n in NAMES]


def count(module):
    return sum(p.numel() for p in module.parameters())


def torchvision_model(name):
    return getattr(torchvision.models, name)(weights=None)


def classifier_keys(name, state):
    return {k for k in state if k.startswith(CLASSIFIER[name] + ".")}


def reference_embedding(name, net, x):
    """What torchvision's ``net`` feeds its classifier, averaged over space: for VGG that input is
    the 7x7 adaptive pool of a 1x1 map at 48x48, the 512 values each repeated 49 times."""
    seen = []
    hook = net.get_submodule(CLASSIFIER[name]).register_forward_pre_hook(
        lambda _, args: seen.append(args[0])
    )
    try:
        with torch.no_grad():
            net.eval()(x)
    finally:
        hook.remove()
    copies = seen[0].reshape(len(x), WIDTH[name], -1)
    torch.testing.assert_close(copies, copies[..., :1].expand_as(copies))
    return copies[..., 0]


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    """Per backbone, once: torchvision's network and its state dict saved as an ImageNet file."""
    made = {}

    def get(name):
        if name not in made:
            torch.manual_seed(0)
            net = torchvision_model(name).eval()
            path = tmp_path_factory.mktemp("weights") / f"{name}.pth"
            torch.save(net.state_dict(), path)
            made[name] = net, path
        return made[name]

    return get


def test_the_tables_cover_every_registered_backbone_but_resnet50():
    assert set(BACKBONES) - {"resnet50"} == set(CLASSIFIER) == set(WIDTH) == set(PARAMS_7_RGB)


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_on_a_fer_batch(name, in_chans):
    torch.manual_seed(0)
    model = build_model(name, attention="none", in_chans=in_chans).train()
    assert model.num_features == WIDTH[name]
    x = torch.rand(2, in_chans, 48, 48)
    logits, emb = model(x, return_embedding=True)
    assert logits.shape == (2, 7) and emb.shape == (2, model.num_features)
    assert torch.isfinite(logits).all() and torch.isfinite(emb).all()
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 6])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{pname} received a zero gradient"
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.fc(model.forward_features(x)))


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("name", NAMES)
def test_names_and_sizes_are_torchvisions_less_the_classifier_plus_the_head(name, in_chans):
    with torch.device("meta"):  # sizes and names only: no memory, no initialisation
        reference = torchvision_model(name)
        model = build_model(name, attention="none", num_classes=7, in_chans=in_chans)
    ref_state = reference.state_dict()
    dropped = classifier_keys(name, ref_state)
    assert dropped, "torchvision's classifier was not found"
    assert set(model.state_dict()) == set(ref_state) - dropped | {"fc.weight", "fc.bias"}
    head = WIDTH[name] * 7 + 7
    stem = ref_state[model.stem_key]
    saving = stem[:, 1:].numel() if in_chans == 1 else 0  # the stem keeps one of three channels
    expected = count(reference) - count(reference.get_submodule(CLASSIFIER[name])) + head - saving
    assert count(model) == expected
    assert expected + saving == PARAMS_7_RGB[name]


@pytest.mark.parametrize("name", TRANSFER_NAMES)
def test_rgb_transfer_takes_every_tensor_but_the_classifier(name, imagenet):
    net, path = imagenet(name)
    model = build_model(name, attention="none", num_classes=7, in_chans=3)
    report = load_pretrained(model, path)
    source = net.state_dict()
    dropped = classifier_keys(name, source)
    assert set(report.unmatched) == dropped
    assert set(report.transferred) == set(source) - dropped and not report.adapted
    assert report.left_new == ["fc.weight", "fc.bias"]
    own = model.state_dict()
    for key in report.transferred:
        torch.testing.assert_close(own[key], source[key], rtol=0, atol=0)
    # the embedding is torchvision's pre-classifier feature, pooled to one value per channel
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        emb = model.eval().forward_features(x)
    torch.testing.assert_close(emb, reference_embedding(name, net, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", TRANSFER_NAMES)
def test_grayscale_transfer_sums_the_stem_over_rgb(name, imagenet):
    net, path = imagenet(name)
    model = build_model(name, attention="none", num_classes=7, in_chans=1, pretrained=path)
    report = model.transfer_report
    source = net.state_dict()
    assert report.adapted == [model.stem_key]
    assert set(report.transferred) == set(source) - classifier_keys(name, source)
    # a gray image through the summed stem equals the RGB stem on the image replicated 3 times
    stem_path = model.stem_key.removesuffix(".weight")
    gray = torch.rand(2, 1, 48, 48)
    rgb = gray.expand(-1, 3, -1, -1)
    with torch.no_grad():
        torch.testing.assert_close(
            model.get_submodule(stem_path)(gray), net.get_submodule(stem_path)(rgb)
        )
        emb = model.eval().forward_features(gray)
    torch.testing.assert_close(emb, reference_embedding(name, net, rgb), rtol=1e-4, atol=1e-5)


def test_resnet18_with_an_imagenet_head_is_torchvision_resnet18():
    torch.manual_seed(0)
    reference = torchvision_model("resnet18").eval()
    model = build_model("resnet18", attention="none", num_classes=1000, in_chans=3).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)


def test_the_grayscale_stem_at_initialisation_is_the_summed_rgb_one():
    # same seed, same draws: the one-channel stem is torchvision's RGB init summed over channels
    torch.manual_seed(0)
    rgb = build_model("mobilenet_v2", attention="none", in_chans=3)
    torch.manual_seed(0)
    gray = build_model("mobilenet_v2", attention="none", in_chans=1)
    conv_rgb, conv_gray = rgb.features[0][0], gray.features[0][0]
    assert (conv_gray.in_channels, conv_gray.out_channels) == (1, conv_rgb.out_channels)
    same = ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")
    assert all(getattr(conv_gray, a) == getattr(conv_rgb, a) for a in same)
    assert (conv_gray.bias is None) == (conv_rgb.bias is None)
    torch.testing.assert_close(conv_gray.weight, conv_rgb.weight.sum(1, keepdim=True))


@pytest.mark.parametrize("attention", ["psa", "se", "eca", "no_such_attention"])
@pytest.mark.parametrize("name", NAMES)
def test_attention_is_for_the_resnet50_family_only(name, attention):
    with pytest.raises(ValueError, match="attention modules are available for the resnet50 family"):
        build_model(name, attention=attention)


def test_attention_kwargs_without_attention_are_refused():
    with pytest.raises(TypeError, match=r"has no attention, so attention_kwargs \['reduction'\]"):
        build_model("vgg16", attention="none", attention_kwargs={"reduction": 8})


@pytest.mark.skipif(importlib.util.find_spec("timm") is not None, reason="timm is installed")
def test_a_timm_backbone_without_timm_says_how_to_install_it():
    with pytest.raises(ImportError, match=r'needs timm.*pip install -e "\.\[timm\]"'):
        build_model("timm:resnet18", attention="none")


def test_a_timm_backbone_needs_a_model_name():
    with pytest.raises(ValueError, match=r"timm:<model_name>"):
        build_model("timm:", attention="none")


def test_an_unknown_backbone_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown backbone 'vgg19'") as err:
        build_model("vgg19", attention="none")
    assert all(name in str(err.value) for name in BACKBONES)
    assert "timm:<model_name>" in str(err.value)
