"""fermodel: PSA-ResNet-50 and its attention variants, Center/Island loss, data, the training
engine (no ray; mlflow only in fermodel.predict, to load runs:/ and models:/ URIs)."""

from fermodel.attention import ATTENTIONS, create_attention
from fermodel.losses import LOSS_KINDS, CenterLoss, IslandLoss, JointLoss
from fermodel.models import BACKBONES, build_model
from fermodel.pretrained import PretrainedError, TransferReport, load_pretrained

__all__ = [
    "ATTENTIONS",
    "BACKBONES",
    "LOSS_KINDS",
    "CenterLoss",
    "IslandLoss",
    "JointLoss",
    "PretrainedError",
    "TransferReport",
    "build_model",
    "create_attention",
    "load_pretrained",
]
