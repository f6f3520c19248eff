"""Batched augmentation and test-time augmentation against hand-computed geometry."""

import dataclasses
import math

import pytest
import torch
from torch import nn
from torchvision.transforms.v2 import functional as TF

from fermodel.augment import (
    TTA_MODES,
    AugmentConfig,
    AugmentParams,
    apply_params,
    augment,
    augment_copies,
    predict_tta,
    to_float,
    tta_views,
)

OFF = AugmentConfig.disabled()


def gen(seed: int = 0, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def faces(n: int = 8, seed: int = 1, h: int = 48, w: int = 48) -> torch.Tensor:
    """Random uint8 images with a smooth gradient, so every geometric change is visible."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 64, (n, 1, h, w), generator=g)
    ramp = torch.linspace(0, 180, w).expand(h, w).round().long()
    return (noise + ramp).clamp(0, 255).to(torch.uint8)


def planted(h: int = 48, w: int = 48, *pixels: tuple[int, int]) -> torch.Tensor:
    x = torch.zeros(1, 1, h, w)
    for row, col in pixels:
        x[0, 0, row, col] = 1.0
    return x


def centroid(img: torch.Tensor) -> tuple[float, float]:
    """Intensity-weighted (row, col) of a [H, W] image."""
    rows = torch.arange(img.shape[0], dtype=torch.float32)[:, None]
    cols = torch.arange(img.shape[1], dtype=torch.float32)[None, :]
    total = img.sum()
    return float((img * rows).sum() / total), float((img * cols).sum() / total)


# --- shapes, dtypes, identity ---------------------------------------------------------------


def test_to_float_maps_uint8_to_unit_interval():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    y = to_float(x)
    assert y.dtype == torch.float32
    assert torch.equal(y, torch.tensor([0.0, 0.2, 1.0]).view(1, 1, 1, 3))
    assert to_float(torch.rand(2, dtype=torch.float64)).dtype == torch.float32
    with pytest.raises(TypeError, match="uint8 or floating"):
        to_float(torch.zeros(2, dtype=torch.int64))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_augment_shape_dtype_and_range(dtype):
    x = faces(16)
    if dtype == torch.float32:
        x = to_float(x)
    y = augment(x, AugmentConfig(), gen())
    assert y.shape == (16, 1, 48, 48)
    assert y.dtype == torch.float32
    assert y.min() >= 0.0 and y.max() <= 1.0
    assert not torch.equal(y, to_float(x))


def test_everything_disabled_is_exactly_to_float():
    x = faces(8)
    assert torch.equal(augment(x, OFF, gen()), to_float(x))
    xf = torch.rand(4, 1, 48, 48)
    assert torch.equal(augment(xf, OFF, gen()), xf)


def test_augment_rejects_a_non_batch_and_a_generator_on_another_device():
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        augment(torch.zeros(48, 48, dtype=torch.uint8), AugmentConfig(), gen())
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="generator"):
            augment(faces(2), AugmentConfig(), gen(device="cuda"))


# --- randomness -----------------------------------------------------------------------------


def test_each_sample_gets_its_own_parameters():
    x = faces(1).expand(16, 1, 48, 48).contiguous()
    y = augment(x, AugmentConfig(), gen())
    flat = y.flatten(1)
    for i in range(16):
        for j in range(i + 1, 16):
            assert not torch.equal(flat[i], flat[j]), (i, j)


@pytest.mark.parametrize(
    "config",
    [
        AugmentConfig(hflip=0.0, brightness=0.0, contrast=0.0),  # geometry only
        dataclasses.replace(OFF, brightness=0.3),  # photometry only
        dataclasses.replace(OFF, hflip=0.5),  # flip only: half flipped, half not
    ],
    ids=["geometry", "brightness", "flip"],
)
def test_every_part_alone_varies_across_the_batch(config):
    x = faces(1).expand(32, 1, 48, 48).contiguous()
    y = augment(x, config, gen(3))
    distinct = {tuple(row.tolist()) for row in y.flatten(1)[:, ::97]}
    assert len(distinct) >= 2


def test_same_seed_same_output_other_seed_other_output():
    x = faces(8)
    a = augment(x, AugmentConfig(), gen(7))
    b = augment(x, AugmentConfig(), gen(7))
    c = augment(x, AugmentConfig(), gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_generator_state_restore_reproduces_the_next_batches():
    x = faces(8)
    g = gen(11)
    augment(x, AugmentConfig(), g)  # an epoch's worth of earlier batches
    state = g.get_state()  # saved in a checkpoint
    first = [augment(x, AugmentConfig(), g) for _ in range(3)]
    resumed = torch.Generator().manual_seed(999)
    resumed.set_state(state)
    second = [augment(x, AugmentConfig(), resumed) for _ in range(3)]
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], first[1])


def test_augment_does_not_touch_the_global_rng():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    augment(faces(4), AugmentConfig(), gen())
    assert torch.equal(torch.get_rng_state(), before)


# --- geometry, hand-computed ----------------------------------------------------------------


def test_flip_with_probability_one_is_torch_flip_exactly():
    x = faces(8)
    y = augment(x, dataclasses.replace(OFF, hflip=1.0), gen())
    assert torch.equal(y, to_float(x).flip(-1))


def test_flip_folded_into_the_affine_matrix_matches_torch_flip():
    x = to_float(faces(2))
    params = AugmentParams(flip=torch.tensor([True, False]), angle=torch.zeros(2))
    y = apply_params(x, params)
    torch.testing.assert_close(y[0], x[0].flip(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(y[1], x[1], atol=1e-5, rtol=0)


def test_rotation_by_90_degrees_moves_a_pixel_counter_clockwise():
    # Centre (23.5, 23.5). Pixel (row 10, col 30) is at x = +6.5, y = -13.5 (y down).
    # Counter-clockwise on screen by 90 degrees: (x, y) -> (y, -x) = (-13.5, -6.5),
    # i.e. row 23.5 - 6.5 = 17, col 23.5 - 13.5 = 10.
    x = planted(48, 48, (10, 30))
    y = apply_params(x, AugmentParams(angle=torch.tensor([90.0])))
    assert (y[0, 0] > 0.99).nonzero().tolist() == [[17, 10]]
    assert y.sum().item() == pytest.approx(1.0, abs=1e-4)
    torch.testing.assert_close(y, torch.rot90(x, 1, dims=(-2, -1)), atol=1e-5, rtol=0)


def test_small_rotation_moves_a_pixel_within_a_pixel_of_the_hand_computed_place():
    # Pixel (row 23, col 40): x = 16.5, y = -0.5. Rotating by +20 degrees counter-clockwise:
    # x' = x cos + y sin, y' = -x sin + y cos.
    angle = math.radians(20.0)
    xc, yc = 16.5, -0.5
    xr = xc * math.cos(angle) + yc * math.sin(angle)
    yr = -xc * math.sin(angle) + yc * math.cos(angle)
    x = planted(48, 48, (23, 40))
    y = apply_params(x, AugmentParams(angle=torch.tensor([20.0])))
    row, col = centroid(y[0, 0])
    assert row == pytest.approx(23.5 + yr, abs=1.0)
    assert col == pytest.approx(23.5 + xr, abs=1.0)
    assert row < 23  # counter-clockwise: a point right of centre moves up
    # Same convention (and centre) as torchvision's rotate.
    reference = TF.rotate(x, 20.0, interpolation=TF.InterpolationMode.BILINEAR)
    torch.testing.assert_close(y, reference, atol=1e-5, rtol=0)


def test_translation_moves_a_square_by_the_expected_offset():
    # 0.125 of 48 = 6 pixels right, -0.25 of 48 = 12 pixels up; whole pixels, so exact.
    x = torch.zeros(1, 1, 48, 48)
    x[0, 0, 20:26, 14:20] = 1.0
    y = apply_params(x, AugmentParams(translate=torch.tensor([[0.125, -0.25]])), "zeros")
    expected = torch.zeros_like(x)
    expected[0, 0, 8:14, 20:26] = 1.0
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=0)


def test_translation_is_a_fraction_of_each_side_on_non_square_images():
    x = torch.zeros(1, 1, 32, 48)
    x[0, 0, 10, 10] = 1.0
    y = apply_params(x, AugmentParams(translate=torch.tensor([[0.125, 0.25]])), "zeros")
    assert (y[0, 0] > 0.99).nonzero().tolist() == [[10 + 8, 10 + 6]]


def test_scale_two_doubles_the_distance_from_the_centre():
    # Pixel (row 23, col 29) is at x = 5.5, y = -0.5 from the centre; a zoom of 2 moves it to
    # x = 11, y = -1, i.e. around row 22.5, col 34.5.
    x = planted(48, 48, (23, 29))
    y = apply_params(x, AugmentParams(scale=torch.tensor([2.0])), "zeros")
    row, col = centroid(y[0, 0])
    assert col == pytest.approx(34.5, abs=0.5)
    assert row == pytest.approx(22.5, abs=0.5)


def test_border_padding_fills_from_the_edge_not_with_black():
    x = torch.full((1, 1, 48, 48), 0.6)
    y = apply_params(x, AugmentParams(translate=torch.tensor([[0.2, 0.2]])), "border")
    torch.testing.assert_close(y, x, atol=1e-6, rtol=0)
    z = apply_params(x, AugmentParams(translate=torch.tensor([[0.2, 0.2]])), "zeros")
    assert z[0, 0, 0, 0] == 0.0


def test_augment_geometry_stays_within_the_configured_ranges():
    # A bright dot at the centre moves at most translate * 48 = 4.8 pixels under the default
    # ranges (rotation and scale are about the centre and leave it in place).
    x = torch.zeros(64, 1, 48, 48)
    x[:, :, 23:25, 23:25] = 1.0
    y = augment(x, dataclasses.replace(AugmentConfig(), brightness=0.0, contrast=0.0), gen(5))
    shifts = torch.tensor([centroid(img[0]) for img in y]) - 23.5
    assert shifts.abs().max() <= 0.1 * 48 + 0.5
    assert shifts.abs().max() > 2.0  # and it does move


# --- photometry -----------------------------------------------------------------------------


def midtones(n: int = 256) -> torch.Tensor:
    """Float images in [0.3, 0.6] so that neither part clips."""
    return 0.3 + 0.3 * torch.rand(n, 1, 48, 48, generator=torch.Generator().manual_seed(2))


def test_brightness_scales_mean_and_std_by_one_factor_per_image():
    x = midtones()
    y = augment(x, dataclasses.replace(OFF, brightness=0.2), gen())
    factor = y.mean(dim=(1, 2, 3)) / x.mean(dim=(1, 2, 3))
    std_ratio = y.std(dim=(1, 2, 3)) / x.std(dim=(1, 2, 3))
    torch.testing.assert_close(std_ratio, factor, atol=1e-4, rtol=0)
    torch.testing.assert_close(y, x * factor[:, None, None, None], atol=1e-5, rtol=0)
    assert factor.min() >= 0.8 - 1e-5 and factor.max() <= 1.2 + 1e-5
    assert factor.min() < 0.85 and factor.max() > 1.15


def test_contrast_keeps_the_mean_and_scales_the_std():
    x = midtones()
    y = augment(x, dataclasses.replace(OFF, contrast=0.2), gen())
    torch.testing.assert_close(y.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=1e-5, rtol=0)
    ratio = y.std(dim=(1, 2, 3)) / x.std(dim=(1, 2, 3))
    assert ratio.min() >= 0.8 - 1e-4 and ratio.max() <= 1.2 + 1e-4
    assert ratio.min() < 0.85 and ratio.max() > 1.15


def test_photometry_clamps_to_the_unit_interval():
    x = torch.ones(16, 1, 48, 48)
    x[:, :, :24] = 0.0
    y = augment(x, dataclasses.replace(OFF, brightness=1.0, contrast=1.0), gen())
    assert y.min() >= 0.0 and y.max() <= 1.0


# --- offline copies -------------------------------------------------------------------------


def test_augment_copies_are_uint8_cycle_the_sources_and_differ_from_them():
    x = faces(3)
    copies = augment_copies(x, 7, AugmentConfig(), gen())
    assert copies.dtype == torch.uint8 and copies.shape == (7, 1, 48, 48)
    for i in range(7):
        assert not torch.equal(copies[i], x[i % 3])
    identity = augment_copies(x, 7, OFF, gen())
    assert torch.equal(identity, x[torch.arange(7) % 3])
    assert augment_copies(x, 0, AugmentConfig(), gen()).shape == (0, 1, 48, 48)


def test_augment_copies_rejects_bad_counts_and_empty_sources():
    with pytest.raises(ValueError, match="n"):
        augment_copies(faces(2), -1, AugmentConfig(), gen())
    with pytest.raises(ValueError, match="empty"):
        augment_copies(faces(2)[:0], 3, AugmentConfig(), gen())


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("hflip", 1.5),
        ("hflip", -0.1),
        ("rotation", -1.0),
        ("rotation", 200.0),
        ("rotation", float("nan")),
        ("translate", 1.0),
        ("translate", -0.1),
        ("scale", (1.1, 0.9)),
        ("scale", (0.0, 1.0)),
        ("scale", 1.0),
        ("scale", (0.9, float("inf"))),
        ("brightness", 1.5),
        ("contrast", -0.2),
        ("contrast", "high"),
        ("padding_mode", "wrap"),
    ],
)
def test_bad_config_values_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"AugmentConfig\.{field}"):
        AugmentConfig(**{field: value})


def test_config_normalises_numbers_and_disables_with_neutral_values():
    config = AugmentConfig(rotation=5, scale=[0.95, 1.05])
    assert config.rotation == 5.0 and config.scale == (0.95, 1.05)
    assert OFF.affine is False and AugmentConfig().affine is True
    assert AugmentConfig().hflip == 0.5 and AugmentConfig().padding_mode == "border"


# --- test-time augmentation -----------------------------------------------------------------


@pytest.mark.parametrize(("mode", "views"), [("none", 1), ("flip", 2), ("tencrop", 10)])
def test_tta_view_counts_and_shapes(mode, views):
    x = to_float(faces(4))
    v = tta_views(x, mode)
    assert v.shape == (views, 4, 1, 48, 48)
    assert v.dtype == torch.float32
    if mode != "tencrop":
        assert torch.equal(v[0], x)


def test_tta_flip_view_is_torch_flip():
    x = to_float(faces(4))
    v = tta_views(x, "flip")
    assert torch.equal(v[1], x.flip(-1))


def test_tencrop_views_are_resized_corner_and_centre_crops():
    x = to_float(faces(2))
    v = tta_views(x, "tencrop", crop_size=42)
    # A crop of 42 resized to 48 keeps the crop's mean closely; the top-left crop is the left of
    # the gradient, so it is darker than the top-right one.
    torch.testing.assert_close(
        v[0].mean(dim=(1, 2, 3)), x[..., :42, :42].mean(dim=(1, 2, 3)), atol=2e-3, rtol=0
    )
    assert (v[0].mean() < v[1].mean()).item()
    # Views 5 to 9 are the mirrored image's crops: the first is the flip of the top-right crop.
    torch.testing.assert_close(v[5], v[1].flip(-1), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="crop_size"):
        tta_views(x, "tencrop", crop_size=49)


class FlipInvariant(nn.Module):
    """Logits from the image plus its mirror: exactly invariant to a horizontal flip."""

    def __init__(self, num_classes: int = 7):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(48 * 48, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((x + x.flip(-1)).flatten(1))


def test_predict_tta_with_a_flip_invariant_model_agrees_across_none_and_flip():
    model = FlipInvariant().eval()
    x = to_float(faces(5))
    p_none = predict_tta(model, x, "none")
    p_flip = predict_tta(model, x, "flip")
    assert p_none.shape == (5, 7)
    torch.testing.assert_close(p_flip, p_none, atol=1e-6, rtol=0)
    for mode in TTA_MODES:
        p = predict_tta(model, x, mode)
        torch.testing.assert_close(p.sum(-1), torch.ones(5), atol=1e-5, rtol=0)


def test_predict_tta_averages_softmax_over_views_and_chunks_alike():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48 * 48, 3)).eval()
    x = to_float(faces(4))
    expected = torch.stack([model(v).softmax(-1) for v in tta_views(x, "tencrop")]).mean(0)
    torch.testing.assert_close(predict_tta(model, x, "tencrop"), expected)
    torch.testing.assert_close(predict_tta(model, x, "tencrop", batch_size=7), expected)


def test_unknown_tta_mode_lists_the_known_ones():
    x = to_float(faces(1))
    with pytest.raises(ValueError, match=r"'fivecrop'.*none, flip, tencrop"):
        tta_views(x, "fivecrop")
    with pytest.raises(ValueError, match="fivecrop"):
        predict_tta(nn.Flatten(), x, "fivecrop")


# --- CUDA (runs only where a GPU is present) ------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_same_ops_run_on_a_cuda_batch():
    x = faces(8).cuda()
    a = augment(x, AugmentConfig(), gen(4, "cuda"))
    b = augment(x, AugmentConfig(), gen(4, "cuda"))
    assert a.is_cuda and a.dtype == torch.float32 and a.shape == (8, 1, 48, 48)
    assert torch.equal(a, b)
    assert torch.equal(augment(x, OFF, gen(0, "cuda")), to_float(x))
    assert augment_copies(x, 5, AugmentConfig(), gen(0, "cuda")).is_cuda
    model = FlipInvariant().cuda().eval()
    p = predict_tta(model, to_float(x), "tencrop")
    assert p.is_cuda and p.shape == (8, 7)
