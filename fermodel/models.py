"""``build_model``: every network of the project from plain values (variants are data).

``resnet50`` is the ResNet-50 family, its attention chosen by name (see ``fermodel.attention``);
the other backbones of the paper's Table 5 (``vgg16``, ``vgg16_bn``, ``mobilenet_v2``,
``densenet121``, and ``resnet18``, ``resnet34``) and any timm model (``timm:<model_name>``) are
in ``fermodel.backbones`` and take ``attention="none"`` only. Every model returns logits from
``model(x)`` and ``(logits, embedding)`` from ``model(x, return_embedding=True)``, its embedding
from ``model.forward_features(x)``, and has ``num_features``, the embedding's width.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from torch import nn

from fermodel.backbones import TIMM_PREFIX, TORCHVISION_BACKBONES, build_timm
from fermodel.pretrained import load_pretrained, weights_file
from fermodel.resnet import RESNET50_LAYERS, ResNet

BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet50": lambda **kw: ResNet(RESNET50_LAYERS, **kw),
    **TORCHVISION_BACKBONES,
}


def build_model(
    backbone: str = "resnet50",
    attention: str = "psa",
    num_classes: int = 7,
    in_chans: int = 1,
    pretrained=None,
    attention_kwargs: dict | None = None,
    image_size: int | None = None,
) -> nn.Module:
    """Build ``backbone`` with ``attention`` in every block.

    ``backbone`` is a name of ``BACKBONES`` or ``"timm:<model_name>"`` (needs the ``timm``
    extra). Attention modules exist for ``resnet50`` only: every other backbone must be given
    ``attention="none"`` (the default, ``"psa"``, is the paper's model) and raises ValueError
    otherwise.
    ``in_chans=1`` takes FER's grayscale images directly; with ImageNet weights the stem (the
    model's ``stem_key``, conv1 for ResNets) is the RGB filter summed over channels, which equals
    feeding the gray image replicated to RGB. ``pretrained`` is a path to a torchvision state
    dict of the same architecture, a folder of torchvision's files (the backbone's own is
    taken: ``fermodel.pretrained.weights_file``), a torchvision weights enum, or a ResNet-50
    weights name (``"ResNet50_Weights.IMAGENET1K_V1"``); what was transferred is logged and kept
    as ``model.transfer_report``.
    ``image_size``, the input size the model will see, crops PSA's kernels to the taps that
    reach its maps (``ResNet.crop_to``: the same numbers, fewer multiplications); None keeps
    them whole, for any size.
    """
    if isinstance(backbone, str) and backbone.startswith(TIMM_PREFIX):
        builder = partial(build_timm, backbone[len(TIMM_PREFIX) :])
    elif backbone in BACKBONES:
        builder = BACKBONES[backbone]
    else:
        raise ValueError(
            f"unknown backbone {backbone!r}; known: {', '.join(BACKBONES)}, "
            f"or {TIMM_PREFIX}<model_name> for a timm model"
        )
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 (grayscale) or 3 (RGB), got {in_chans}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    model = builder(
        attention=attention,
        num_classes=num_classes,
        in_chans=in_chans,
        attention_kwargs=attention_kwargs,
    )
    if isinstance(pretrained, (str, Path)) and Path(pretrained).expanduser().is_dir():
        pretrained = weights_file(pretrained, backbone)
    model.transfer_report = load_pretrained(model, pretrained) if pretrained is not None else None
    if image_size is not None and hasattr(model, "crop_to"):
        model.crop_to(image_size)
    return model
