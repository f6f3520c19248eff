"""The attention factory and each module on its own (the ResNet-level checks are in test_models)."""

import math

import pytest
import torch

from fermodel.attention import ATTENTIONS, PSA, create_attention, eca_kernel_size


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(ATTENTIONS))
def test_every_attention_keeps_the_shape_and_passes_gradients(name, training):
    """In evaluation mode every parameter gets a gradient. In training mode so does every one
    but the biases of convolutions that a BatchNorm follows (AFF's): the batch's mean takes
    them out again, so their gradient is zero but for rounding (float64 here: it is tiny)."""
    torch.manual_seed(0)
    module = create_attention(name, 64).double().train(training)
    x = torch.randn(2, 64, 6, 6, dtype=torch.float64, requires_grad=True)
    other = torch.randn(2, 64, 6, 6, dtype=torch.float64)
    out = module(x, other) if ATTENTIONS[name].site == "merge" else module(x)
    assert out.shape == x.shape
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    modules = dict(module.named_modules())
    for pname, p in module.named_parameters():
        owner, _, kind = pname.rpartition(".")
        prefix, _, index = owner.rpartition(".")
        following = modules.get(f"{prefix}.{int(index) + 1}") if index.isdigit() else None
        if training and kind == "bias" and isinstance(following, torch.nn.BatchNorm2d):
            assert p.grad is not None and p.grad.abs().max() < 1e-9, pname
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


def test_unknown_attention_lists_the_known_ones():
    with pytest.raises(
        ValueError, match="unknown attention 'sk'; known: none, se, cbam, eca, aff, psa"
    ):
        create_attention("sk", 64)


def test_keyword_arguments_reach_the_module():
    se = create_attention("se", 64, reduction=8)
    assert se.fc1.out_channels == 8
    eca = create_attention("eca", 64, kernel_size=3)
    assert eca.conv.kernel_size == (3,)
    psa = create_attention("psa", 64, stride=2)
    assert psa(torch.randn(1, 64, 8, 8)).shape == (1, 64, 4, 4)
    with pytest.raises(TypeError):
        create_attention("eca", 64, reduction=16)
    with pytest.raises(ValueError, match="reduction 16 must be a positive divisor"):
        create_attention("se", 40)


def test_eca_kernel_sizes_follow_the_formula_for_resnet50_stages():
    assert [eca_kernel_size(c) for c in (256, 512, 1024, 2048)] == [5, 5, 5, 7]
    assert [create_attention("eca", c).conv.kernel_size[0] for c in (256, 2048)] == [5, 7]


def test_psa_rejects_channel_counts_its_groups_cannot_split():
    with pytest.raises(ValueError, match="group count 16 must divide"):
        PSA(32)


def test_psa_output_is_the_softmax_weighted_reversed_concatenation():
    # On a 1x1 input of ones only each kernel's centre tap sees data, so branch i (groups g_i,
    # 64/g_i inputs per output) gives the constant v_i when all its weights are v_i * g_i / 64.
    # The shared SE module is set to pass the branch mean straight through: its score is
    # sigmoid(v_i), and the four scores are softmax-normalised across the scales.
    psa = PSA(64)
    values = [1.0, 2.0, 3.0, 4.0]
    with torch.no_grad():
        for branch, v, g in zip(psa.branches, values, (1, 4, 8, 16), strict=True):
            branch.weight.fill_(v * g / 64)
        psa.se.fc1.weight.fill_(1 / 16)
        psa.se.fc1.bias.zero_()
        psa.se.fc2.weight.fill_(1.0)
        psa.se.fc2.bias.zero_()
        out = psa(torch.ones(1, 64, 1, 1)).flatten()

    scores = [1 / (1 + math.exp(-v)) for v in values]
    norm = sum(math.exp(s) for s in scores)
    weights = [math.exp(s) / norm for s in scores]
    # 16 channels per branch, concatenated from the 9x9 branch down to the 3x3 one
    expected = [v * w for v, w in zip(values, weights, strict=True)][::-1]
    for block, value in enumerate(expected):
        torch.testing.assert_close(out[16 * block : 16 * (block + 1)], torch.full((16,), value))
    assert sum(weights) == pytest.approx(1.0)


def test_the_config_names_every_attention_and_only_those():
    from fermodel import config

    assert tuple(ATTENTIONS) == config.ATTENTIONS
