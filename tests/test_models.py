"""ResNet-50 and its attention variants: exact sizes, torchvision equivalence, forward/backward."""

import copy

import pytest
import torch
import torchvision

from fermodel import ATTENTIONS, build_model
from fermodel.attention import fit_kernel

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


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def test_psa_kernels_cropped_to_the_input_give_the_whole_kernels_results():
    """At 48x48 the last stages' maps are 3x3 and 2x2: the taps a crop drops only ever meet
    zero padding, so the cropped model, loading the whole one's state dict, computes the same
    outputs and gradients (fp64, 1e-12), also on smaller inputs (TTA's crops)."""
    torch.manual_seed(0)
    whole = build_model(attention="psa").double().train()
    cropped = build_model(attention="psa", image_size=48).double().train()
    cropped.load_state_dict(whole.state_dict())

    sizes = lambda m, layer: [b.kernel_size[0] for b in getattr(m, layer)[-1].conv2.branches]  # noqa: E731
    assert sizes(cropped, "layer2") == [3, 5, 7, 9]  # 6x6 maps: a 9x9 kernel reaches them all
    assert sizes(cropped, "layer3") == [3, 5, 5, 5]  # 3x3 maps
    assert sizes(cropped, "layer4") == [3, 3, 3, 3]  # 2x2 maps
    assert sizes(cropped, "layer1") == sizes(whole, "layer4") == [3, 5, 7, 9]

    for size in (48, 42):
        x = torch.randn(4, 1, size, size, dtype=torch.float64)
        out_whole, out_cropped = whole(x), cropped(x)
        assert _relative(out_cropped, out_whole) < 1e-12
        out_whole.square().sum().backward()
        out_cropped.square().sum().backward()
        whole_params = dict(whole.named_parameters())
        for name, p in cropped.named_parameters():
            g = whole_params[name].grad
            k = p.shape[-1]
            if p.ndim == 4 and k < g.shape[-1]:  # a cropped kernel: the dropped taps learn nothing
                cut = (g.shape[-1] - k) // 2
                dropped = g.clone()
                dropped[..., cut : cut + k, cut : cut + k] = 0
                assert not dropped.any(), name
                g = g[..., cut : cut + k, cut : cut + k]
            assert _relative(p.grad, g) < 1e-12, (size, name)
        whole.zero_grad()
        cropped.zero_grad()


def test_cropped_and_whole_psa_load_each_others_state_dicts():
    torch.manual_seed(1)
    cropped = build_model(attention="psa", image_size=48).double().eval()
    state = cropped.state_dict()
    # the state dict is the architecture's: whole kernels, the dropped taps zero
    assert state["layer4.1.conv2.branches.3.weight"].shape[-2:] == (9, 9)
    assert state["layer4.1.conv2.branches.3.weight"][..., :3, :].abs().sum() == 0
    whole = build_model(attention="psa").double().eval()
    whole.load_state_dict(state)
    again = build_model(attention="psa", image_size=48).double().eval()
    again.load_state_dict(whole.state_dict())
    x = torch.randn(2, 1, 48, 48, dtype=torch.float64)
    with torch.no_grad():
        assert _relative(whole(x), cropped(x)) < 1e-12
        assert torch.equal(again(x), cropped(x))
    assert count(cropped) < count(whole) == PARAMS["psa"][1] - GRAYSCALE_SAVING


def test_a_checkpoints_whole_moments_are_cropped_with_the_weights():
    """An optimiser state saved by a whole-kernel model (a checkpoint from before the crop)
    resumes on the cropped one: the same next step on every tap that is kept."""
    from fermodel.engine import _fit_moments

    torch.manual_seed(2)
    whole = build_model(attention="psa").double().train()
    cropped = build_model(attention="psa", image_size=48).double().train()
    cropped.load_state_dict(whole.state_dict())
    x = torch.randn(2, 1, 48, 48, dtype=torch.float64)
    before = torch.optim.Adam(whole.parameters(), lr=1e-3)
    whole(x).sum().backward()
    before.step()
    cropped.load_state_dict(whole.state_dict())
    resumed = torch.optim.Adam(cropped.parameters(), lr=1e-3)
    resumed.load_state_dict(copy.deepcopy(before.state_dict()))  # as from the disk
    _fit_moments(resumed)
    for model, opt in ((whole, before), (cropped, resumed)):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    whole_params = dict(whole.named_parameters())
    for name, t in cropped.named_parameters():
        w = fit_kernel(whole_params[name], t.shape[-1]) if t.ndim == 4 else whole_params[name]
        # Adam divides by the root of the second moment: a gradient of rounding noise (the
        # stem's BatchNorm bias gets 1e-15) moves by up to 1e-9 either way, far below a step
        # (1e-3) taken with a moment cut in the wrong place
        torch.testing.assert_close(t, w, rtol=1e-9, atol=1e-8, msg=name)
