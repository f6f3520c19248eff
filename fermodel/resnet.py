"""ResNet-50 with an attention module injected into every bottleneck.

He, Zhang, Ren, Sun. Deep Residual Learning for Image Recognition. CVPR 2016; the torchvision
variant ("v1.5": the stride sits on the 3x3 convolution). Parameter names are torchvision's, so
with ``attention="none"`` torchvision's resnet50 state dict loads strictly and gives the same
outputs; ``attention="psa"`` is Gu & Jin's PSA-ResNet-50 (2025), whose pyramid split attention
takes the place of every 3x3 convolution (EPSANet, Zhang et al., ACCV 2022).
"""

from __future__ import annotations

import torch
from torch import nn

from fermodel.attention import attention_spec, create_attention

RESNET50_LAYERS = (3, 4, 6, 3)


class GlobalAvgPool(nn.Module):
    """``nn.AdaptiveAvgPool2d(1)`` as a mean over height and width: the same numbers, and
    ``torch.vmap`` (packed trials) batches it, where adaptive pooling falls back to a loop over
    the members (no batching rule for its ``as_strided_``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3), keepdim=True)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (or its replacement), 1x1 expand, with three injection points:

    ``conv2``   the 3x3 convolution, or a module of site ``conv`` (PSA);
    ``attn``    applied to the bn3 output, ``nn.Identity`` or a ``gate`` (SE, CBAM, ECA);
    ``merge``   ``None`` for the plain residual addition, or a ``merge`` module (AFF).
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        conv2: nn.Module | None = None,
        attn: nn.Module | None = None,
        merge: nn.Module | None = None,
    ):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv2 or nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.attn = attn or nn.Identity()
        self.merge = merge
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.attn(self.bn3(self.conv3(out)))
        out = out + identity if self.merge is None else self.merge(out, identity)
        return self.relu(out)


class ResNet(nn.Module):
    """A bottleneck ResNet whose forward also gives the pooled embedding (for Center/Island loss).

    ``model(x)`` returns logits; ``model(x, return_embedding=True)`` returns ``(logits, emb)``
    with ``emb`` of shape [N, ``num_features``].
    """

    def __init__(
        self,
        layers: tuple[int, ...] = RESNET50_LAYERS,
        attention: str = "none",
        num_classes: int = 7,
        in_chans: int = 1,
        attention_kwargs: dict | None = None,
    ):
        super().__init__()
        self.attention = attention
        self.site = attention_spec(attention).site
        self.attention_kwargs = dict(attention_kwargs or {})
        self.conv1 = nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        widths = (64, 128, 256, 512)
        inplanes = 64
        for i, (planes, depth) in enumerate(zip(widths, layers, strict=True)):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", self._make_layer(inplanes, planes, depth, stride))
            inplanes = planes * Bottleneck.expansion
        self.avgpool = GlobalAvgPool()
        self.num_features = inplanes
        self.fc = nn.Linear(self.num_features, num_classes)
        self._init_weights()

    def _block(self, inplanes: int, planes: int, stride: int, downsample) -> Bottleneck:
        def at(site: str, channels: int, **extra) -> nn.Module | None:
            if self.site != site:
                return None
            return create_attention(self.attention, channels, **extra, **self.attention_kwargs)

        out = planes * Bottleneck.expansion
        return Bottleneck(
            inplanes,
            planes,
            stride,
            downsample,
            conv2=at("conv", planes, stride=stride),
            attn=at("gate", out),
            merge=at("merge", out),
        )

    def _make_layer(self, inplanes: int, planes: int, depth: int, stride: int) -> nn.Sequential:
        out = planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or inplanes != out:
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )
        blocks = [self._block(inplanes, planes, stride, downsample)]
        blocks += [self._block(out, planes, 1, None) for _ in range(1, depth)]
        return nn.Sequential(*blocks)

    def _init_weights(self) -> None:
        # torchvision's scheme, extended to the attention modules' convolutions and norms
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def crop_to(self, image_size: int) -> None:
        """Fit every block's ``conv2`` that can (PSA: ``PSA.crop_to``) to the map it sees on
        ``image_size`` x ``image_size`` inputs (at 48: 12x12 in layer1, 2x2 in layer4)."""
        size = _strided(_strided(image_size, 2), 2)  # the stem's convolution, its max pool
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                if hasattr(block.conv2, "crop_to"):
                    block.conv2.crop_to(size)
                size = _strided(size, block.stride)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled, flattened embedding, shape [N, num_features]."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor, return_embedding: bool = False):
        emb = self.forward_features(x)
        logits = self.fc(emb)
        return (logits, emb) if return_embedding else logits


def _strided(size: int, stride: int) -> int:
    """The output size of a same-padded window of ``stride`` (k = 2p + 1) on ``size``."""
    return (size - 1) // stride + 1
