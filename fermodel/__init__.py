"""fermodel: PSA-ResNet-50 and its attention variants, Center/Island loss, data, the training
engine (no ray; mlflow only in fermodel.predict, to load runs:/ and models:/ URIs).

The names below are imported on first use, so that ``fermodel.config`` and ``fermodel.data``
(what study files and the report need) load without torch."""

import importlib

_HOME = {
    "ATTENTIONS": "fermodel.attention",
    "create_attention": "fermodel.attention",
    "LOSS_KINDS": "fermodel.losses",
    "CenterLoss": "fermodel.losses",
    "IslandLoss": "fermodel.losses",
    "JointLoss": "fermodel.losses",
    "BACKBONES": "fermodel.models",
    "build_model": "fermodel.models",
    "PretrainedError": "fermodel.pretrained",
    "TransferReport": "fermodel.pretrained",
    "load_pretrained": "fermodel.pretrained",
}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'fermodel' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)
