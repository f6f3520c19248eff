"""Attention modules for the ResNet bottleneck, and the one factory that builds them by name.

Each module takes its channel count first; everything else is a keyword argument whose default
is the value of the paper the module comes from. A module also has a *site*, the place in the
bottleneck it occupies:

- ``gate``:  reweights the bn3 output before the residual addition (SE, CBAM, ECA);
- ``merge``: replaces the residual addition itself, ``forward(x, residual)`` (AFF);
- ``conv``:  replaces the bottleneck's 3x3 convolution, so it also takes the stride (PSA).

Papers:
    SE    Hu, Shen, Sun. Squeeze-and-Excitation Networks. CVPR 2018.
    CBAM  Woo, Park, Lee, Kweon. CBAM: Convolutional Block Attention Module. ECCV 2018.
    ECA   Wang et al. ECA-Net: Efficient Channel Attention for Deep CNNs. CVPR 2020.
    AFF   Dai et al. Attentional Feature Fusion. WACV 2021 (its MS-CAM, with iterations = 1).
    PSA   Zhang et al. EPSANet: An Efficient Pyramid Squeeze Attention Block. ACCV 2022.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Site = Literal["gate", "merge", "conv"]


class SqueezeExcite(nn.Module):
    """SE: global average pool, 1x1 conv C -> C/r, ReLU, 1x1 conv C/r -> C, sigmoid, scale."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = _reduced(channels, reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """The sigmoid channel weights, shape [N, C, 1, 1] (PSA uses them without scaling)."""
        s = x.mean(dim=(2, 3), keepdim=True)
        return torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weights(x)


class CBAM(nn.Module):
    """CBAM: a channel gate (shared MLP on avg- and max-pooled features) then a spatial gate
    (7x7 conv on the channel-wise max and mean, BatchNorm, sigmoid)."""

    def __init__(self, channels: int, reduction: int = 16, spatial_kernel: int = 7):
        super().__init__()
        hidden = _reduced(channels, reduction)
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels)
        )
        self.spatial = nn.Conv2d(2, 1, spatial_kernel, padding=spatial_kernel // 2, bias=False)
        self.spatial_bn = nn.BatchNorm2d(1)

    members = 1  # trials side by side in the channels (a fused pack: fermodel.fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channel = self.mlp(x.mean(dim=(2, 3))) + self.mlp(x.amax(dim=(2, 3)))
        x = x * torch.sigmoid(channel)[:, :, None, None]
        n, _, h, w = x.shape
        per_member = x.view(n, self.members, -1, h, w)  # the spatial gate pools each one's own
        pooled = torch.stack([per_member.amax(2), per_member.mean(2)], 2).view(n, -1, h, w)
        gate = torch.sigmoid(self.spatial_bn(self.spatial(pooled)))
        return (per_member * gate[:, :, None]).reshape(x.shape)


def eca_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
    """ECA's adaptive kernel: the nearest odd integer to |(log2 C + b) / gamma| (rounded down
    first, then up to odd). 5, 5, 5, 7 for ResNet-50's 256, 512, 1024, 2048 channels."""
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


class ECA(nn.Module):
    """ECA: global average pool, a 1-D convolution across channels (no bias), sigmoid, scale."""

    def __init__(self, channels: int, kernel_size: int | None = None, gamma: int = 2, b: int = 1):
        super().__init__()
        k = kernel_size if kernel_size is not None else eca_kernel_size(channels, gamma, b)
        if k < 1 or k % 2 == 0:
            raise ValueError(f"ECA kernel_size must be a positive odd integer, got {k}")
        self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)

    members = 1  # trials side by side in the channels (a fused pack: fermodel.fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        s = x.mean(dim=(2, 3)).view(n, self.members, -1)  # each one's channels: a 1-D sequence
        w = torch.sigmoid(self.conv(s)).view(n, -1, 1, 1)
        return x * w


class AFF(nn.Module):
    """AFF: the MS-CAM weight w = sigmoid(local(z) + global(z)) of z = x + residual, and the fused
    output 2*x*w + 2*residual*(1 - w). It replaces the bottleneck's addition (the ReLU follows).

    The global branch applies BatchNorm to pooled [N, C, 1, 1] features, so training needs a
    batch of at least two images, as in the original code.
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = _reduced(channels, reduction)

        def branch() -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(channels, hidden, 1),
                nn.BatchNorm2d(hidden),
                nn.ReLU(inplace=True),
                nn.Conv2d(hidden, channels, 1),
                nn.BatchNorm2d(channels),
            )

        self.local_att = branch()
        self.global_att = branch()

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        z = x + residual
        w = torch.sigmoid(self.local_att(z) + self.global_att(z.mean(dim=(2, 3), keepdim=True)))
        return 2 * x * w + 2 * residual * (1 - w)


class PSA(nn.Module):
    """Pyramid split attention, EPSANet's replacement for the 3x3 convolution.

    Parallel grouped convolutions of kernels (3, 5, 7, 9) and groups (1, 4, 8, 16) each read the
    whole input and give channels/4 maps; one SE weight module, shared by all scales, scores
    every branch; the scores are softmax-normalised across the scales per channel, and the
    weighted branches are concatenated. As in EPSANet's official code the concatenation runs
    from the largest kernel to the smallest (9, 7, 5, 3), which fixes the channel order that
    the following 1x1 convolution sees. No BatchNorm or activation inside: bn2 + ReLU follow.

    ``crop_to(size)`` fits the kernels to a known input size: at 48x48 the last stages' maps are
    3x3 and 2x2, where a 9x9 kernel's outer taps only ever meet zero padding. The state dict
    keeps the full kernels either way, so cropped and whole modules load each other's.
    """

    def __init__(
        self,
        channels: int,
        stride: int = 1,
        kernel_sizes: tuple[int, ...] = (3, 5, 7, 9),
        groups: tuple[int, ...] = (1, 4, 8, 16),
        reduction: int = 16,
    ):
        super().__init__()
        if len(kernel_sizes) != len(groups):
            raise ValueError(
                f"PSA needs one group count per kernel size, got kernel_sizes={kernel_sizes} "
                f"and groups={groups}"
            )
        scales = len(kernel_sizes)
        if channels % scales:
            raise ValueError(f"PSA channels ({channels}) must divide into {scales} scales")
        split = channels // scales
        for g in groups:
            if channels % g or split % g:
                raise ValueError(
                    f"PSA group count {g} must divide both the input ({channels}) "
                    f"and each branch's output ({split}) channels"
                )
        self.branches = nn.ModuleList(
            nn.Conv2d(channels, split, k, stride=stride, padding=k // 2, groups=g, bias=False)
            for k, g in zip(kernel_sizes, groups, strict=True)
        )
        self.se = SqueezeExcite(split, reduction=reduction)
        self.kernel_sizes = tuple(kernel_sizes)
        self.register_state_dict_post_hook(_whole_kernels)
        self.register_load_state_dict_pre_hook(_fitted_kernels)

    members = 1  # trials side by side in the channels (a fused pack: fermodel.fused)

    def crop_to(self, size: int) -> None:
        """Keep of each kernel the taps that reach an input of ``size`` x ``size`` (offsets
        from the centre up to ``size - 1``; the others only ever multiply zero padding), with
        the padding cut to match: the same outputs and gradients, fewer multiplications, no
        extra kernels (the parameters themselves are cropped). Call it before building the
        optimiser; any smaller input gives the same results too."""
        for conv in self.branches:
            k = conv.kernel_size[0]
            radius = min(k // 2, size - 1)
            if radius < k // 2:
                conv.weight = nn.Parameter(fit_kernel(conv.weight.detach(), 2 * radius + 1))
                conv.kernel_size, conv.padding = (2 * radius + 1,) * 2, (radius,) * 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # largest kernel first, the order of EPSANet's concatenation (no flip to pay for)
        feats = torch.stack([branch(x) for branch in reversed(self.branches)], dim=1)
        n, s, c, h, w = feats.shape  # [N, S, C/S, H, W]
        scores = self.se.weights(feats.reshape(n * s, c, h, w)).reshape(n, s, c, 1, 1)
        # in at least fp32, as CUDA's autocast computes a softmax (also in a bf16 pack,
        # which casts by hand: fermodel.pack)
        weights = scores.softmax(dim=1, dtype=torch.promote_types(scores.dtype, torch.float32))
        weighted = feats * weights
        # each member's branches together (with one member, a view of the same order)
        per_member = weighted.unflatten(2, (self.members, -1)).transpose(1, 2)
        return per_member.reshape(n, s * c, h, w)


def fit_kernel(weight: torch.Tensor, size: int) -> torch.Tensor:
    """``weight`` [..., k, k] (k odd) cut to its central ``size`` x ``size`` taps, or padded to
    them with zeros."""
    k = weight.shape[-1]
    if k == size:
        return weight
    if k > size:
        cut = (k - size) // 2
        return weight[..., cut : cut + size, cut : cut + size].clone()
    pad = (size - k) // 2
    return F.pad(weight, (pad,) * 4)


def _whole_kernels(module: PSA, state: dict, prefix: str, _metadata) -> None:
    for i, k in enumerate(module.kernel_sizes):
        name = f"{prefix}branches.{i}.weight"
        if not isinstance(state.get(name), nn.Parameter):  # keep_vars asks for the live ones
            state[name] = fit_kernel(state[name], k)


def _fitted_kernels(module: PSA, state: dict, prefix: str, *_rest) -> None:
    for i, conv in enumerate(module.branches):
        name = f"{prefix}branches.{i}.weight"
        if name in state and state[name].ndim == 4:
            state[name] = fit_kernel(state[name], conv.kernel_size[0])


@dataclass(frozen=True)
class AttentionSpec:
    """How an attention name becomes a module, and where in the bottleneck it sits."""

    module: type[nn.Module] | None
    site: Site
    paper: str


ATTENTIONS: dict[str, AttentionSpec] = {
    "none": AttentionSpec(None, "gate", "He et al., Deep Residual Learning, CVPR 2016"),
    "se": AttentionSpec(SqueezeExcite, "gate", "Hu et al., Squeeze-and-Excitation, CVPR 2018"),
    "cbam": AttentionSpec(CBAM, "gate", "Woo et al., CBAM, ECCV 2018"),
    "eca": AttentionSpec(ECA, "gate", "Wang et al., ECA-Net, CVPR 2020"),
    "aff": AttentionSpec(AFF, "merge", "Dai et al., Attentional Feature Fusion, WACV 2021"),
    "psa": AttentionSpec(PSA, "conv", "Zhang et al., EPSANet, ACCV 2022"),
}


def attention_spec(name: str) -> AttentionSpec:
    try:
        return ATTENTIONS[name]
    except KeyError:
        raise ValueError(f"unknown attention {name!r}; known: {', '.join(ATTENTIONS)}") from None


def create_attention(name: str, channels: int, **kwargs) -> nn.Module:
    """Build attention ``name`` for ``channels`` channels; ``none`` gives ``nn.Identity``.

    Keyword arguments go to the module (``reduction``, ``kernel_size``, ``kernel_sizes``,
    ``groups``, ``stride`` for PSA ...); an argument the module does not take is a TypeError.
    """
    spec = attention_spec(name)
    if spec.module is None:
        if kwargs:
            raise TypeError(f"attention 'none' takes no arguments, got {sorted(kwargs)}")
        return nn.Identity()
    return spec.module(channels, **kwargs)


def _reduced(channels: int, reduction: int) -> int:
    if reduction < 1 or channels % reduction:
        raise ValueError(
            f"reduction {reduction} must be a positive divisor of the channel count {channels}"
        )
    return channels // reduction
