"""The other backbones of the paper's Table 5, from torchvision, and any timm model by name.

Each is torchvision's own network (built by its constructor, with torchvision's initialisation)
cut before its classifier and wrapped in one generic adapter, ``BackboneAdapter``: the kept
layers run in order, a global average pool gives the embedding, and a new linear head ``fc``
maps it to the classes. Every kept parameter keeps torchvision's name, so a torchvision ImageNet
state dict transfers by name through ``fermodel.pretrained.load_pretrained``; the adapter names
its first convolution's weight in ``stem_key`` so that, for one input channel, the RGB stem is
summed over channels there.

Registered names, their embedding (what Center/Island loss pulls toward the class centers), its
width, and ``stem_key``:

- ``vgg16``, ``vgg16_bn`` (512, ``features.0.weight``): the global average pool of the last conv
  block, after its max-pool. torchvision's 7x7 adaptive pool and 4096-4096 classifier are
  dropped: at 48x48 the five max-pools leave a 1x1 map, which the 7x7 pool would only copy 49
  times into a 25,088-d vector.
- ``mobilenet_v2`` (1280, ``features.0.0.weight``): the global average pool of the final 1x1
  conv + BN + ReLU6, torchvision's pre-classifier feature (without the classifier's dropout).
- ``densenet121`` (1024, ``features.conv0.weight``): the global average pool after the final
  norm (norm5) and a ReLU, torchvision's pre-classifier feature.
- ``resnet18``, ``resnet34`` (512, ``conv1.weight``): the global average pool of layer4,
  torchvision's pre-``fc`` feature. The head is named ``fc`` as torchvision's is, so with 1000
  classes these are exactly torchvision's networks.
- ``shufflenet_v2_x0_5`` (1024, ``conv1.0.weight``): the global average pool of conv5,
  torchvision's pre-``fc`` feature. Not one of the paper's baselines: a network of 0.34 M
  weights (without its head) that trains a small study on a laptop's CPU in seconds, for smoke
  tests of a study's plumbing (the project's own tests use it).
- ``timm:<model_name>`` (``body.<first_conv>.weight``, ``first_conv`` from timm's
  ``pretrained_cfg``): ``timm.create_model(model_name, pretrained=False, num_classes=0,
  in_chans=in_chans)``, which returns timm's pooled pre-logits feature; its width is the
  model's ``head_hidden_size`` where timm sets one (heads with a hidden layer, as MobileNetV3's),
  else ``num_features``.

Heads are a plain ``nn.Linear`` (PyTorch's default initialisation), without the dropout of
torchvision's VGG and MobileNetV2 classifiers, as for the ResNet-50 family. For VGG, MobileNetV2
and DenseNet every tensor of a torchvision state dict except the classifier's transfers; the
head is new whatever the number of classes. The timm trunk is the submodule ``body``, so a timm
state dict needs the prefix ``body.`` to transfer by name (timm's own pretrained loading is not
used: ``pretrained=False``). Model names with a fixed input size (ViTs) need timm arguments that
are not passed here; convolutional timm models run at 48x48.

ImageNet weights for these backbones come as a file holding a torchvision state dict or as the
weights enum itself or its name (``"VGG16_Weights.IMAGENET1K_V1"``). torchvision's DenseNet download
still uses the pre-0.3 layer names (``denselayer1.norm.1.weight``), which torchvision renames as
it loads them and ``load_pretrained`` does not: for DenseNet use a file saved from
``torchvision.models.densenet121(weights=...).state_dict()``.

One input channel: the stem is a ``Conv2d`` with one input channel and otherwise the same
configuration, initialised with torchvision's RGB initialisation summed over the channels. That
is the rule ``load_pretrained`` applies to ImageNet weights: on a gray image it gives exactly
the response of the RGB network to the image replicated to three channels, so the activations
keep the RGB network's scale.

Attention modules exist for the ResNet-50 family only (``fermodel.resnet``); these backbones
take ``attention="none"`` and raise ValueError for anything else. ``build_model``'s default
attention is ``"psa"``, so they are built with ``build_model(backbone="vgg16",
attention="none")``.

Papers:
    VGG          Simonyan, Zisserman. Very Deep Convolutional Networks for Large-Scale Image
                 Recognition. ICLR 2015.
    MobileNetV2  Sandler, Howard, Zhu, Zhmoginov, Chen. MobileNetV2: Inverted Residuals and
                 Linear Bottlenecks. CVPR 2018.
    DenseNet     Huang, Liu, van der Maaten, Weinberger. Densely Connected Convolutional
                 Networks. CVPR 2017.
    ResNet       He, Zhang, Ren, Sun. Deep Residual Learning for Image Recognition. CVPR 2016.
    ShuffleNetV2 Ma, Zhang, Zheng, Sun. ShuffleNet V2: Practical Guidelines for Efficient CNN
                 Architecture Design. ECCV 2018.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from fermodel.resnet import GlobalAvgPool

TIMM_PREFIX = "timm:"


class BackboneAdapter(nn.Module):
    """Named layers run in order, flattened to the embedding, and a linear head ``fc``.

    ``model(x)`` returns logits; ``model(x, return_embedding=True)`` returns ``(logits, emb)``
    with ``emb`` of shape [N, ``num_features``]; ``forward_features(x)`` returns ``emb``.
    The layers are registered under the names given, so parameter names are their source's.
    """

    def __init__(
        self,
        layers: dict[str, nn.Module],
        num_features: int,
        num_classes: int,
        stem_key: str | None,
        backbone: str = "",
    ):
        super().__init__()
        if "fc" in layers:
            raise ValueError("'fc' is the adapter's head; a trunk layer cannot take that name")
        for name, layer in layers.items():
            self.add_module(name, layer)
        self.trunk_names = tuple(layers)
        self.backbone = backbone
        self.attention = "none"
        self.stem_key = stem_key  # read by load_pretrained to sum an RGB stem for one channel
        self.num_features = num_features
        self.fc = nn.Linear(num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled, flattened embedding, shape [N, num_features]."""
        for name in self.trunk_names:
            x = getattr(self, name)(x)
        return torch.flatten(x, 1)

    def forward(self, x: torch.Tensor, return_embedding: bool = False):
        emb = self.forward_features(x)
        logits = self.fc(emb)
        return (logits, emb) if return_embedding else logits


@dataclass(frozen=True)
class TorchvisionSpec:
    """Where to cut a torchvision classifier network.

    ``trunk``: its top-level children kept, in forward order (the rest, the classifier and any
    pooling, is dropped); ``stem``: the path of its first convolution; ``num_features``: the
    channels of the trunk's output; ``final_relu``: whether torchvision applies a functional
    ReLU between the trunk and the pooling (DenseNet does, after norm5).
    """

    trunk: tuple[str, ...]
    stem: str
    num_features: int
    final_relu: bool = False


_RESNET_TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")

TORCHVISION_SPECS: dict[str, TorchvisionSpec] = {
    "vgg16": TorchvisionSpec(("features",), "features.0", 512),
    "vgg16_bn": TorchvisionSpec(("features",), "features.0", 512),
    "mobilenet_v2": TorchvisionSpec(("features",), "features.0.0", 1280),
    "densenet121": TorchvisionSpec(("features",), "features.conv0", 1024, final_relu=True),
    "resnet18": TorchvisionSpec(_RESNET_TRUNK, "conv1", 512),
    "resnet34": TorchvisionSpec(_RESNET_TRUNK, "conv1", 512),
    "shufflenet_v2_x0_5": TorchvisionSpec(
        ("conv1", "maxpool", "stage2", "stage3", "stage4", "conv5"), "conv1.0", 1024
    ),
}


def _require_no_attention(backbone: str, attention: str, attention_kwargs: dict | None) -> None:
    if attention != "none":
        raise ValueError(
            f"backbone {backbone!r} takes attention='none' only, got {attention!r}: attention "
            "modules are available for the resnet50 family only"
        )
    if attention_kwargs:
        raise TypeError(
            f"backbone {backbone!r} has no attention, so attention_kwargs "
            f"{sorted(attention_kwargs)} cannot apply"
        )


def _grayscale_stem(model: nn.Module, path: str) -> None:
    """Replace the RGB convolution at ``path`` by a one-channel one, its kernels summed."""
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    rgb = parent.get_submodule(leaf)
    if not isinstance(rgb, nn.Conv2d) or rgb.in_channels != 3 or rgb.groups != 1:
        raise TypeError(f"{path} is not a three-channel stem convolution: {rgb}")
    gray = nn.Conv2d(
        1,
        rgb.out_channels,
        rgb.kernel_size,
        stride=rgb.stride,
        padding=rgb.padding,
        dilation=rgb.dilation,
        bias=rgb.bias is not None,
        padding_mode=rgb.padding_mode,
    )
    with torch.no_grad():
        gray.weight.copy_(rgb.weight.sum(dim=1, keepdim=True))
        if rgb.bias is not None:
            gray.bias.copy_(rgb.bias)
    setattr(parent, leaf, gray)


def build_torchvision(
    name: str,
    *,
    attention: str = "none",
    num_classes: int = 7,
    in_chans: int = 1,
    attention_kwargs: dict | None = None,
) -> BackboneAdapter:
    """torchvision's ``name`` (randomly initialised), cut before its classifier, with a new
    head of ``num_classes`` and a one-channel stem when ``in_chans`` is 1."""
    spec = TORCHVISION_SPECS[name]
    _require_no_attention(name, attention, attention_kwargs)
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 (grayscale) or 3 (RGB), got {in_chans}")
    import torchvision  # here, not at import: it costs a second and pulls in torch._dynamo

    source = getattr(torchvision.models, name)(weights=None)
    if in_chans == 1:
        _grayscale_stem(source, spec.stem)
    layers = {child: source.get_submodule(child) for child in spec.trunk}
    if spec.final_relu:
        layers["final_relu"] = nn.ReLU()
    layers["avgpool"] = GlobalAvgPool()
    return BackboneAdapter(layers, spec.num_features, num_classes, f"{spec.stem}.weight", name)


def build_timm(
    model_name: str,
    *,
    attention: str = "none",
    num_classes: int = 7,
    in_chans: int = 1,
    attention_kwargs: dict | None = None,
) -> BackboneAdapter:
    """timm's ``model_name`` without its classifier (``num_classes=0``, so it returns pooled
    features), randomly initialised, as the submodule ``body``, with a new head ``fc``."""
    backbone = f"{TIMM_PREFIX}{model_name}"
    if not model_name:
        raise ValueError(f"a timm backbone is named {TIMM_PREFIX}<model_name>, got {backbone!r}")
    _require_no_attention(backbone, attention, attention_kwargs)
    try:
        import timm
    except ImportError as err:
        raise ImportError(
            f"backbone {backbone!r} needs timm, which is not installed; install the timm "
            'extra: pip install -e ".[timm]"'
        ) from err
    try:
        body = timm.create_model(model_name, pretrained=False, num_classes=0, in_chans=in_chans)
    except RuntimeError as err:
        if "Unknown model" not in str(err):
            raise
        raise ValueError(f"timm has no model {model_name!r} (see timm.list_models())") from None
    # with num_classes=0 a timm model returns its pre-logits features: head_hidden_size wide
    # where the head has a hidden layer (MobileNetV3, some ConvNeXt), num_features otherwise
    width = getattr(body, "head_hidden_size", None) or body.num_features
    cfg = getattr(body, "pretrained_cfg", None) or getattr(body, "default_cfg", None) or {}
    first_conv = (
        cfg.get("first_conv") if isinstance(cfg, dict) else getattr(cfg, "first_conv", None)
    )
    stem_key = f"body.{first_conv}.weight" if isinstance(first_conv, str) else None
    return BackboneAdapter({"body": body}, width, num_classes, stem_key, backbone)


TORCHVISION_BACKBONES: dict[str, Callable[..., nn.Module]] = {
    name: partial(build_torchvision, name) for name in TORCHVISION_SPECS
}
