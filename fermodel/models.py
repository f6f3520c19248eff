"""``build_model``: every network of the project from plain values (variants are data).

Only the ResNet-50 family is registered so far; its attention is chosen by name (see
``fermodel.attention``). Every model returns logits from ``model(x)`` and ``(logits, embedding)``
from ``model(x, return_embedding=True)``, and has ``num_features``, the embedding's width.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from fermodel.pretrained import load_pretrained
from fermodel.resnet import RESNET50_LAYERS, ResNet

BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet50": lambda **kw: ResNet(RESNET50_LAYERS, **kw),
}


def build_model(
    backbone: str = "resnet50",
    attention: str = "psa",
    num_classes: int = 7,
    in_chans: int = 1,
    pretrained=None,
    attention_kwargs: dict | None = None,
) -> nn.Module:
    """Build ``backbone`` with ``attention`` in every block.

    ``in_chans=1`` takes FER's grayscale images directly; with ImageNet weights its conv1 is the
    RGB filter summed over channels, which equals feeding the gray image replicated to RGB.
    ``pretrained`` is a path to a torchvision ResNet-50 state dict, a torchvision weights enum,
    or its name (``"ResNet50_Weights.IMAGENET1K_V1"``); what was transferred is logged and kept
    as ``model.transfer_report``.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; known: {', '.join(BACKBONES)}")
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 (grayscale) or 3 (RGB), got {in_chans}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    model = BACKBONES[backbone](
        attention=attention,
        num_classes=num_classes,
        in_chans=in_chans,
        attention_kwargs=attention_kwargs,
    )
    model.transfer_report = load_pretrained(model, pretrained) if pretrained is not None else None
    return model
