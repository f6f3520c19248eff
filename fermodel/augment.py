"""Batched data augmentation and test-time augmentation for in-memory FER images.

Why batched: the datasets are small enough to live in memory as uint8 tensors ``[N, 1, 48, 48]``
(on the GPU when there is one), so the training loop gathers a batch of indices and augments the
whole batch where it lies. There is no per-sample PIL work, no Python loop over samples and no
DataLoader worker. torchvision's ``transforms.v2`` applied to a batch tensor draws one set of
parameters for the whole batch, so the geometric part here is built by hand: every sample gets
its own affine matrix (flip, rotation, scale, translation) and the whole batch is resampled by a
single ``F.affine_grid`` + ``F.grid_sample``. The photometric part (brightness, contrast) is a
per-sample broadcast. Nothing in :func:`augment` reads a value back to the host, so on a GPU it
queues kernels without synchronising.

How the randomness is controlled: every random number comes from the ``torch.Generator`` passed
in (it must live on the batch's device), never from the global RNG. A batch of N images draws
exactly one ``torch.rand(N, 7)`` from it, whatever parts are enabled, so a training run that saves
``generator.get_state()`` in its checkpoint and restores it with ``set_state`` on resumption
reproduces the same augmentations batch for batch.

Choices:

- Padding is ``"border"`` (``AugmentConfig.padding_mode``): pixels brought in by a rotation or
  translation repeat the nearest edge pixel. Zeros would paint black corners that the network
  can learn as a cue; reflection would mirror facial parts (half an eye, a mouth corner) into the
  frame, whereas the rim of a FER crop is hair, background or cheek, which replicates plausibly.
- Brightness is multiplicative and contrast blends with the per-image mean, as torchvision's
  ``ColorJitter`` does: ``x <- b * x`` with ``b ~ U(1 - brightness, 1 + brightness)``, then
  ``x <- m + c * (x - m)`` with ``m`` the mean of the image (over channels and pixels) and
  ``c ~ U(1 - contrast, 1 + contrast)``, brightness first; the result is clamped to [0, 1] once,
  at the end.
- A horizontal flip alone (rotation, scale and translation disabled) is done by indexing, so it is
  exact; otherwise it is folded into the per-sample affine matrix. Sampling is bilinear with
  ``align_corners=False``; rotation and scaling are about the image centre.
- Test-time augmentation: ``"none"``, ``"flip"`` (original and mirror) and ``"tencrop"``
  (torchvision's ``ten_crop``, crops of 42 of 48 pixels by default, each resized back to the
  input size with bilinear antialiased interpolation); softmax probabilities are averaged over
  the views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fermodel.config import TTA_MODES

__all__ = [
    "PADDING_MODES",
    "TTA_MODES",
    "AugmentConfig",
    "AugmentParams",
    "apply_params",
    "augment",
    "augment_copies",
    "draw",
    "params_from_draws",
    "predict_tta",
    "sample_params",
    "to_float",
    "tta_views",
]

PADDING_MODES: tuple[str, ...] = ("border", "reflection", "zeros")
TTAMode = Literal["none", "flip", "tencrop"]

# Columns of the single uniform draw made per batch; fixed so that the stream a generator feeds
# does not depend on which parts are enabled.
_FLIP, _ANGLE, _SCALE, _TX, _TY, _BRIGHT, _CONTRAST = range(7)
_NUM_DRAWS = 7


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images to float32 in [0, 1] (``x / 255``); a floating input is cast to float32.

    A float32 input is returned as is, not copied.
    """
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    if images.is_floating_point():
        return images.to(torch.float32)
    raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")


def _number(name: str, value: object) -> float:
    if isinstance(value, bool):
        raise ValueError(f"AugmentConfig.{name} must be a number, got {value!r}")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"AugmentConfig.{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"AugmentConfig.{name} must be finite, got {value!r}")
    return number


@dataclass(frozen=True)
class AugmentConfig:
    """Per-sample augmentation ranges; each field at its neutral value disables that part.

    - ``hflip``: probability of a horizontal flip, in [0, 1] (0 disables).
    - ``rotation``: maximum angle in degrees, drawn from U(-rotation, rotation), in [0, 180];
      positive angles turn the face counter-clockwise as displayed (0 disables).
    - ``translate``: maximum shift as a fraction of the width (x) and of the height (y), each drawn
      from U(-translate, translate), in [0, 1) (0 disables).
    - ``scale``: ``(low, high)`` zoom factor drawn from U(low, high), ``0 < low <= high``; above 1
      zooms in ((1, 1) disables).
    - ``brightness``: multiplicative factor drawn from U(1 - brightness, 1 + brightness), in
      [0, 1] (0 disables).
    - ``contrast``: blend factor with the per-image mean, drawn from U(1 - contrast, 1 + contrast),
      in [0, 1] (0 disables).
    - ``padding_mode``: how ``grid_sample`` fills pixels from outside the image, one of
      ``PADDING_MODES``.
    """

    hflip: float = 0.5
    rotation: float = 10.0
    translate: float = 0.1
    scale: tuple[float, float] = (0.9, 1.1)
    brightness: float = 0.2
    contrast: float = 0.2
    padding_mode: str = "border"

    def __post_init__(self) -> None:
        def store(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        hflip = _number("hflip", self.hflip)
        if not 0.0 <= hflip <= 1.0:
            raise ValueError(f"AugmentConfig.hflip is a probability in [0, 1], got {self.hflip}")
        rotation = _number("rotation", self.rotation)
        if not 0.0 <= rotation <= 180.0:
            raise ValueError(
                "AugmentConfig.rotation is a maximum angle in [0, 180] degrees, "
                f"got {self.rotation}"
            )
        translate = _number("translate", self.translate)
        if not 0.0 <= translate < 1.0:
            raise ValueError(
                "AugmentConfig.translate is a fraction of the image size in [0, 1), "
                f"got {self.translate}"
            )
        try:
            low, high = self.scale
        except (TypeError, ValueError):
            raise ValueError(
                f"AugmentConfig.scale must be a pair (low, high), got {self.scale!r}"
            ) from None
        low, high = _number("scale", low), _number("scale", high)
        if not 0.0 < low <= high:
            raise ValueError(
                f"AugmentConfig.scale must satisfy 0 < low <= high, got {self.scale!r}"
            )
        brightness = _number("brightness", self.brightness)
        if not 0.0 <= brightness <= 1.0:
            raise ValueError(f"AugmentConfig.brightness must be in [0, 1], got {self.brightness}")
        contrast = _number("contrast", self.contrast)
        if not 0.0 <= contrast <= 1.0:
            raise ValueError(f"AugmentConfig.contrast must be in [0, 1], got {self.contrast}")
        if self.padding_mode not in PADDING_MODES:
            raise ValueError(
                f"AugmentConfig.padding_mode must be one of {PADDING_MODES}, "
                f"got {self.padding_mode!r}"
            )
        store("hflip", hflip)
        store("rotation", rotation)
        store("translate", translate)
        store("scale", (low, high))
        store("brightness", brightness)
        store("contrast", contrast)

    @classmethod
    def disabled(cls) -> AugmentConfig:
        """A config with every part off: :func:`augment` then returns ``to_float(images)``."""
        return cls(
            hflip=0.0, rotation=0.0, translate=0.0, scale=(1.0, 1.0), brightness=0.0, contrast=0.0
        )

    @property
    def affine(self) -> bool:
        """Whether rotation, scaling or translation is on (the parts that need grid_sample)."""
        return self.rotation > 0 or self.translate > 0 or self.scale != (1.0, 1.0)


class AugmentParams(NamedTuple):
    """Per-sample parameters of one batch; ``None`` marks a disabled part.

    ``flip`` is bool ``[N]``; ``angle`` degrees ``[N]`` (counter-clockwise as displayed);
    ``scale`` ``[N]``; ``translate`` ``[N, 2]`` as fractions of (width, height), positive moving
    the content right and down; ``brightness`` and ``contrast`` factors ``[N]``.
    """

    flip: torch.Tensor | None = None
    angle: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    translate: torch.Tensor | None = None
    brightness: torch.Tensor | None = None
    contrast: torch.Tensor | None = None


def sample_params(n: int, config: AugmentConfig, generator: torch.Generator) -> AugmentParams:
    """Draw the parameters of ``n`` samples from ``generator``, on the generator's device."""
    return params_from_draws(draw(n, generator), config)


def draw(n: int, generator: torch.Generator) -> torch.Tensor:
    """The uniform draws ``[n, 7]`` that ``params_from_draws`` turns into parameters (several
    generators' draws concatenated give the parameters of all their samples at once)."""
    return torch.rand(n, _NUM_DRAWS, generator=generator, device=generator.device)


def params_from_draws(u: torch.Tensor, config: AugmentConfig) -> AugmentParams:
    """Per-sample parameters from uniform draws ``u`` ``[N, 7]``."""

    def symmetric(column: int, half_width: float) -> torch.Tensor:
        return (2.0 * u[:, column] - 1.0) * half_width

    low, high = config.scale
    return AugmentParams(
        flip=u[:, _FLIP] < config.hflip if config.hflip > 0 else None,
        angle=symmetric(_ANGLE, config.rotation) if config.rotation > 0 else None,
        scale=low + (high - low) * u[:, _SCALE] if (low, high) != (1.0, 1.0) else None,
        translate=(
            torch.stack([symmetric(_TX, config.translate), symmetric(_TY, config.translate)], 1)
            if config.translate > 0
            else None
        ),
        brightness=1.0 + symmetric(_BRIGHT, config.brightness) if config.brightness > 0 else None,
        contrast=1.0 + symmetric(_CONTRAST, config.contrast) if config.contrast > 0 else None,
    )


def _affine_theta(params: AugmentParams, n: int, height: int, width: int, device: torch.device):
    """Per-sample ``[N, 2, 3]`` matrices for ``affine_grid``: output coordinates to input ones.

    In pixel coordinates centred on the image, the content moves by ``p' = s R(angle) Fl p + t``;
    grid_sample needs the inverse, ``p = Fl R(-angle) (p' - t) / s``, expressed in the normalised
    coordinates of ``affine_grid`` (x scaled by W/2, y by H/2, which keeps rotations rigid on
    non-square images).
    """
    zeros = torch.zeros(n, device=device)
    angle = params.angle if params.angle is not None else zeros
    radians = torch.deg2rad(angle.to(device=device, dtype=torch.float32))
    cos, sin = torch.cos(radians), torch.sin(radians)
    if params.scale is not None:
        inv_scale = 1.0 / params.scale.to(device=device, dtype=torch.float32)[:, None]
    else:
        inv_scale = torch.ones(n, 1, device=device)
    # Rows of R(-angle) / s in y-down pixel coordinates (counter-clockwise on screen is +angle),
    # conjugated by D = diag(W/2, H/2) into normalised coordinates: entry (i, j) times D_j / D_i.
    row_x = torch.stack([cos, -sin * (height / width)], 1) * inv_scale
    row_y = torch.stack([sin * (width / height), cos], 1) * inv_scale
    if params.flip is not None:
        row_x = torch.where(params.flip.to(device)[:, None], -row_x, row_x)
    linear = torch.stack([row_x, row_y], 1)  # [N, 2, 2]
    if params.translate is not None:
        shift = 2.0 * params.translate.to(device, torch.float32)  # normalised: fraction * 2
        bias = -(linear @ shift[:, :, None])
    else:
        bias = torch.zeros(n, 2, 1, device=device)
    return torch.cat([linear, bias], 2)


def apply_params(
    images: torch.Tensor, params: AugmentParams, padding_mode: str = "border"
) -> torch.Tensor:
    """Apply given per-sample parameters to a batch ``[N, C, H, W]`` (uint8 or float in [0, 1]).

    Returns float32 on the batch's device; with every parameter ``None`` it is exactly
    ``to_float(images)``.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be a batch [N, C, H, W], got shape {tuple(images.shape)}")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    x = to_float(images)
    n, _, height, width = x.shape
    if n == 0:  # affine_grid refuses an empty batch
        return x
    changed = False
    if params.angle is not None or params.scale is not None or params.translate is not None:
        theta = _affine_theta(params, n, height, width, x.device)
        grid = F.affine_grid(theta, [n, x.shape[1], height, width], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)
        changed = True
    elif params.flip is not None:
        x = torch.where(params.flip.to(x.device)[:, None, None, None], x.flip(-1), x)
    if params.brightness is not None:
        x = x * params.brightness.to(x.device, torch.float32)[:, None, None, None]
        changed = True
    if params.contrast is not None:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = mean + params.contrast.to(x.device, torch.float32)[:, None, None, None] * (x - mean)
        changed = True
    return x.clamp_(0.0, 1.0) if changed else x


def augment(
    images: torch.Tensor, config: AugmentConfig, generator: torch.Generator
) -> torch.Tensor:
    """Augment a batch ``[N, C, H, W]`` (uint8, or float in [0, 1]) with per-sample parameters.

    ``generator`` must be on the batch's device; the result is float32 ``[N, C, H, W]`` in [0, 1]
    on that device. With every part of ``config`` disabled it is exactly ``to_float(images)``.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be a batch [N, C, H, W], got shape {tuple(images.shape)}")
    if generator.device.type != images.device.type:
        raise ValueError(
            f"generator is on {generator.device} but images are on {images.device}; "
            "create the generator on the batch's device"
        )
    params = sample_params(images.shape[0], config, generator)
    return apply_params(images, params, config.padding_mode)


def augment_copies(
    images: torch.Tensor, n: int, config: AugmentConfig, generator: torch.Generator
) -> torch.Tensor:
    """``n`` augmented uint8 copies ``[n, C, H, W]`` of ``images``, cycling through them.

    Copy ``i`` is drawn from ``images[i % len(images)]``; used offline to enlarge a minority class
    (the paper balances FER2013's disgust class with flipped, rotated and shifted copies).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n (the number of copies) must be a non-negative int, got {n!r}")
    if images.dim() != 4:
        raise ValueError(f"images must be a batch [N, C, H, W], got shape {tuple(images.shape)}")
    if n > 0 and images.shape[0] == 0:
        raise ValueError("images is empty: there is nothing to copy")
    index = torch.arange(n, device=images.device) % max(images.shape[0], 1)
    out = augment(images[index], config, generator)
    return out.mul_(255.0).round_().to(torch.uint8)


def tta_views(images: torch.Tensor, mode: TTAMode | str, crop_size: int = 42) -> torch.Tensor:
    """The test-time views of a batch ``[N, C, H, W]`` as ``[V, N, C, H, W]``.

    ``"none"``: V = 1, the images. ``"flip"``: V = 2, the images and their horizontal mirror.
    ``"tencrop"``: V = 10, torchvision's ``ten_crop`` at ``crop_size`` (the four corners and the
    centre, then the same of the mirrored image), each resized back to H x W (bilinear,
    antialiased). uint8 input is converted with :func:`to_float`; floating input keeps its dtype.
    """
    if mode not in TTA_MODES:
        raise ValueError(f"unknown TTA mode {mode!r}; known modes: {', '.join(TTA_MODES)}")
    if images.dim() != 4:
        raise ValueError(f"images must be a batch [N, C, H, W], got shape {tuple(images.shape)}")
    # torchvision is imported here, not with the module: it costs a second at every start
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    x = images if images.is_floating_point() else to_float(images)
    if mode == "none":
        return x.unsqueeze(0)
    if mode == "flip":
        return torch.stack([x, TF.horizontal_flip(x)])
    height, width = x.shape[-2:]
    if isinstance(crop_size, bool) or not isinstance(crop_size, int):
        raise ValueError(f"crop_size must be an int, got {crop_size!r}")
    if not 1 <= crop_size <= min(height, width):
        raise ValueError(
            f"crop_size must be in [1, {min(height, width)}] for {height}x{width} images, "
            f"got {crop_size}"
        )
    crops = torch.cat(TF.ten_crop(x, [crop_size, crop_size]))  # [10 N, C, crop, crop]
    resized = TF.resize(
        crops, [height, width], interpolation=InterpolationMode.BILINEAR, antialias=True
    )
    return resized.reshape(10, *x.shape)


@torch.no_grad()
def predict_tta(
    model: nn.Module,
    images: torch.Tensor,
    mode: TTAMode | str = "none",
    crop_size: int = 42,
    batch_size: int | None = None,
    members: int = 1,
) -> torch.Tensor:
    """Class probabilities ``[N, K]``: softmax of ``model`` averaged over the TTA views.

    ``model`` maps ``[B, C, H, W]`` to logits ``[B, K]`` and should be in eval mode (views are
    batched together, which would mix BatchNorm statistics in training mode). All V x N views go
    through the model in one call, or in chunks of at most ``batch_size`` images when given.
    With ``members`` M > 1 the images and logits are M networks' side by side in the channels
    (a fused pack, ``fermodel.fused``): logits ``[B, M*K]``, probabilities ``[N, M, K]``.
    """
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    views = tta_views(images, mode, crop_size)
    num_views, n = views.shape[:2]
    flat = views.reshape(num_views * n, *views.shape[2:])
    step = batch_size or max(flat.shape[0], 1)
    outputs = []
    for start in range(0, flat.shape[0], step):
        chunk = flat[start : start + step]
        logits = model(chunk)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            raise ValueError(
                "model must return logits of shape [B, K], got "
                f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)}"
            )
        if logits.shape[0] != chunk.shape[0]:
            raise ValueError(
                f"model returned {logits.shape[0]} rows of logits for a batch of {chunk.shape[0]}"
            )
        outputs.append(logits.float().view(len(chunk), members, -1).softmax(dim=-1))
    probs = torch.cat(outputs).reshape(num_views, n, members, -1).mean(dim=0)
    return probs[:, 0] if members == 1 else probs
