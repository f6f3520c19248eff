"""ResNet-50 and its attention variants: exact sizes, torchvision equivalence, forward/backward."""

import pytest
import torch
import torchvision

from fermodel import ATTENTIONS, build_model

# REFERENCE.md section 2: (1000 classes, 7 classes), three input channels
PARAMS = {
    "none": (25_557_032, 23_522_375),
    "se": (28_088_024, 26_053_367),
    "cbam": (28_089_624, 26_054_967),
    "eca": (25_557_118, 23_522_461),
    "aff": (30_683_208, 28_648_551),
    "psa": (22_561_715, 20_527_058),
}
GRAYSCALE_SAVING = 64 * 2 * 7 * 7  # conv1 loses two of its three input channels: 6,272


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_the_table_covers_every_registered_attention():
    assert set(PARAMS) == set(ATTENTIONS)


@pytest.mark.parametrize("in_chans", [3, 1])
@pytest.mark.parametrize("num_classes", [1000, 7])
@pytest.mark.parametrize("attention", list(PARAMS))
def test_parameter_counts_are_exact(attention, num_classes, in_chans):
    model = build_model(attention=attention, num_classes=num_classes, in_chans=in_chans)
    expected = PARAMS[attention][0 if num_classes == 1000 else 1]
    assert count(model) == expected - (GRAYSCALE_SAVING if in_chans == 1 else 0)


def test_plain_resnet50_is_torchvision_resnet50():
    torch.manual_seed(0)
    reference = torchvision.models.resnet50(weights=None).eval()
    model = build_model(attention="none", num_classes=1000, in_chans=3).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    assert list(model.state_dict()) == list(reference.state_dict())
    for size in (48, 112):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", list(ATTENTIONS))
def test_forward_backward_on_a_fer_batch(attention):
    torch.manual_seed(0)
    model = build_model(attention=attention).train()
    x = torch.rand(4, 1, 48, 48)
    logits, emb = model(x, return_embedding=True)
    assert logits.shape == (4, 7) and emb.shape == (4, model.num_features) == (4, 2048)
    assert torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} received a zero gradient"
    torch.testing.assert_close(model.eval()(x), model.fc(model.forward_features(x)))


def test_attention_sits_where_its_paper_puts_it():
    block = lambda attention: build_model(attention=attention).layer2[0]  # noqa: E731
    assert type(block("se").attn).__name__ == "SqueezeExcite" and block("se").merge is None
    assert type(block("aff").merge).__name__ == "AFF"
    assert isinstance(block("aff").attn, torch.nn.Identity)
    psa = block("psa").conv2
    assert type(psa).__name__ == "PSA"
    assert [b.stride for b in psa.branches] == [(2, 2)] * 4  # the block's stride on all four
    assert [(b.kernel_size[0], b.groups) for b in psa.branches] == [(3, 1), (5, 4), (7, 8), (9, 16)]


def test_attention_kwargs_are_passed_to_every_block():
    model = build_model(attention="se", attention_kwargs={"reduction": 8})
    assert model.layer1[0].attn.fc1.out_channels == 256 // 8


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backbone": "vit"}, "unknown backbone 'vit'; known: resnet50"),
        ({"attention": "sk"}, "unknown attention 'sk'"),
        ({"in_chans": 4}, "in_chans must be 1"),
        ({"num_classes": 1}, "num_classes must be at least 2"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_model(**kwargs)
