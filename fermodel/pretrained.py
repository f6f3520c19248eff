"""ImageNet initialisation from a torchvision ResNet-50 state dict, as the paper does.

Every tensor of the source whose name and shape match the model's is copied. For a one-channel
model, conv1's RGB kernels are summed: on a grayscale image replicated to three channels that
gives exactly the same response as the original filter. What cannot match stays as initialised:
PSA's pyramid convolutions (the 16 ``layer*.*.conv2.weight`` of torchvision have no counterpart,
so 304 of 320 tensors transfer), the attention modules, and the classifier of a FER head (its
shape differs from ImageNet's 1000 classes).
"""

from __future__ import annotations

import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


class PretrainedError(ValueError):
    """The pretrained source is missing, unreadable, not a state dict, or does not fit."""


@dataclass
class TransferReport:
    source: str
    transferred: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)  # copied after summing over input channels
    unmatched: list[str] = field(default_factory=list)  # source tensors left out
    left_new: list[str] = field(default_factory=list)  # model tensors not initialised from source
    source_total: int = 0

    @property
    def summary(self) -> str:
        return (
            f"transferred {len(self.transferred)} of {self.source_total} tensors from "
            f"{self.source} ({len(self.adapted)} adapted to the input channels); "
            f"{len(self.left_new)} model tensors left as initialised"
        )


def read_state_dict(source) -> tuple[dict[str, torch.Tensor], str]:
    """Resolve ``source`` to a state dict: a path to a file saved with ``torch.save``, a
    torchvision weights enum (downloads where there is internet), or its name as a string,
    e.g. ``"ResNet50_Weights.IMAGENET1K_V1"``. Files load with ``weights_only=True``; a dict
    holding the state dict under ``state_dict`` or ``model`` is unwrapped."""
    from torchvision.models import WeightsEnum, get_weight

    if isinstance(source, str) and re.fullmatch(r"\w+_Weights\.\w+", source):
        try:
            source = get_weight(source)
        except (ValueError, KeyError) as err:
            raise PretrainedError(f"unknown torchvision weights {source!r}: {err}") from None
    if isinstance(source, WeightsEnum):
        return dict(source.get_state_dict(progress=False)), str(source)

    path = Path(source).expanduser()
    if not path.is_file():
        raise PretrainedError(f"pretrained file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        global_name = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if global_name is None:
            raise PretrainedError(f"{path}: not a file saved by torch.save") from None
        raise PretrainedError(
            f"{path}: refused, loading it would unpickle arbitrary objects "
            f"({global_name.group(1)}); only plain state dicts are accepted"
        ) from None
    except Exception as err:  # torch raises several types for files that are not archives
        raise PretrainedError(f"{path}: not a file saved by torch.save ({err})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise PretrainedError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise PretrainedError(
            f"{path}: not a state dict, entry {bad[0]!r} is not a tensor named by a string"
        )
    return obj, str(path)


def check_source(source: str, backbone: str) -> None:
    """Raise the ``PretrainedError`` that building ``backbone`` from ``source`` (a file, a
    folder of torchvision's files or a weights name) would raise for a missing or unreadable
    file, before anything is built or written."""
    if re.fullmatch(r"\w+_Weights\.\w+", source):
        return  # a torchvision weights name, downloaded (and checked) when the model is built
    path = Path(source).expanduser()
    read_state_dict(weights_file(path, backbone) if path.is_dir() else path)


def weights_file(folder, backbone: str) -> Path:
    """The ImageNet file of ``backbone`` in ``folder``, a copy of torchvision's checkpoint folder
    (``~/.cache/torch/hub/checkpoints``): the file names are those of torchvision's weights,
    e.g. ``resnet50-0676ba61.pth`` or ``resnet50-11ad3fa6.pth`` for ResNet-50."""
    from torchvision.models import get_model_weights

    folder = Path(folder).expanduser()
    try:
        names = [Path(w.url).name for w in get_model_weights(backbone)]
    except (ValueError, KeyError):
        raise PretrainedError(
            f"{folder}: a folder of torchvision files has no file for {backbone!r}; give that "
            "backbone's file itself"
        ) from None
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise PretrainedError(
        f"{folder}: no ImageNet file of {backbone} (looked for {', '.join(names)}); "
        f"{download_hint(backbone)}"
    )


def download_hint(backbone: str = "resnet50") -> str:
    """How to get torchvision's ImageNet file of ``backbone`` (this machine may have no
    internet: the file is made where there is, and copied)."""
    return (
        f'on a machine with internet, `python -c "import torchvision; '
        f"torchvision.models.get_model('{backbone}', weights='IMAGENET1K_V1')\"` saves "
        "torchvision's file in ~/.cache/torch/hub/checkpoints (for ResNet-50: "
        "resnet50-0676ba61.pth, also at https://download.pytorch.org/models/"
        "resnet50-0676ba61.pth); give that file or folder"
    )


def load_pretrained(model: nn.Module, source) -> TransferReport:
    """Copy every matching tensor of ``source`` into ``model`` and report what moved.

    The RGB stem summed for a one-channel model is the tensor named by ``model.stem_key``
    (``"conv1.weight"``, the ResNets', for a model that does not declare one; ``None``: none).
    """
    src, name = read_state_dict(source)
    own = model.state_dict()
    stem_key = getattr(model, "stem_key", "conv1.weight")
    report = TransferReport(source=name, source_total=len(src))
    updates = {}
    for key, tensor in src.items():
        target = own.get(key)
        grayscale_stem = (
            key == stem_key and target is not None and target.ndim == 4 and target.shape[1] == 1
        )
        if grayscale_stem and tensor.ndim == 4 and tensor.shape[1] == 3:
            tensor = tensor.sum(dim=1, keepdim=True)
            report.adapted.append(key)
        if target is not None and target.shape == tensor.shape:
            updates[key] = tensor.to(target.dtype)
            report.transferred.append(key)
        else:
            report.unmatched.append(key)
    if not updates:
        raise PretrainedError(
            f"{name}: no tensor matches the model by name and shape "
            f"(first source keys: {', '.join(list(src)[:3])})"
        )
    model.load_state_dict(updates, strict=False)
    report.left_new = [k for k in own if k not in updates]
    log.info(report.summary)
    return report
