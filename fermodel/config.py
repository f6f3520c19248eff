"""The trial config: everything one training run depends on, as one flat, typed record.

It is what MLflow logs as params and what a checkpoint stores, so a run can be repeated from
its logged params alone. Defaults are the paper's (Gu & Jin 2025): PSA-ResNet-50, softmax +
Island loss, Adam at lr 0.001, batch 32, 200 epochs, lr x0.1 when the validation loss has not
fallen for 30 epochs; on the built-in synthetic set unless a dataset is named.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, fields
from pathlib import Path

from fermodel.attention import ATTENTIONS
from fermodel.augment import TTA_MODES
from fermodel.data.load import DATASETS
from fermodel.data.protocols import PROTOCOLS
from fermodel.losses import LOSS_KINDS

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("plateau", "cosine", "none")
PRECISIONS = ("auto", "fp32", "bf16")
LABEL_SETS = ("fer2013", "ferplus", "ferplus7")
CK_FRAMES = ("last", "paper")


class ConfigError(ValueError):
    """A config key that is unknown, of the wrong type, or out of range."""


@dataclass(frozen=True)
class TrialConfig:
    # data: which images, read how, split how
    dataset: str = "synthetic"
    data_path: str = ""  # the user's copy (absolute); empty for the synthetic set
    protocol: str = "official"  # official | kfold | paper
    fold: int = 0
    folds: int = 10
    split_seed: int = 0  # fixes folds and carved splits across training seeds
    labels: str = "fer2013"  # FER2013: fer2013 | ferplus | ferplus7
    clean: bool = False  # FER2013: drop FER+ non-face / unknown images
    balance: str = ""  # "" | "minority" | comma-separated class names, training split only
    drop_leaked: bool = False  # drop val/test images with an identical copy in train
    ck_frames: str = "last"  # CK+: last k frames per sequence, or the paper's 4 random
    ck_k: int = 3
    synthetic_subjects: int = 60
    synthetic_images_per_class: int = 4
    # model
    backbone: str = "resnet50"
    attention: str = "psa"
    pretrained: str = ""  # path to a torchvision state dict, or e.g. ResNet50_Weights.IMAGENET1K_V1
    in_chans: int = 1
    image_size: int = 48  # model input; the 48x48 images are upsampled on the device
    # loss: L = CE + lam * (center | island term)
    loss: str = "island"
    lam: float = 0.01
    lam1: float = 10.0
    alpha: float = 0.5
    # optimisation
    optimizer: str = "adam"
    lr: float = 0.001
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    batch_size: int = 32
    epochs: int = 200
    schedule: str = "plateau"
    plateau_patience: int = 30
    plateau_factor: float = 0.1
    # augmentation of training batches, and test-time augmentation
    augment: bool = True
    hflip: float = 0.5
    rotation: float = 10.0
    translate: float = 0.1
    scale_min: float = 0.9
    scale_max: float = 1.1
    brightness: float = 0.2
    contrast: float = 0.2
    tta: str = "none"  # none | flip | tencrop
    # runtime
    seed: int = 0
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    channels_last: bool = True
    compile: bool = False  # torch.compile the model (CUDA)
    deterministic: bool = False  # deterministic kernels, for exact resume checks
    eval_batch_size: int = 256
    # Epochs between checkpoints. A checkpoint holds the model, the optimiser's state (two more
    # copies of the weights for Adam) and an older best model's weights, ~330 MB for
    # PSA-ResNet-50, written and uploaded by the caller (Tune: to the study's storage); a run
    # that is lost (a node, a kill) redoes every epoch since its last checkpoint. 0 = auto: the
    # first epoch, then as often as keeps checkpoint time near 5% of the trial's time (measured
    # per trial, so slow storage means rarer checkpoints and more epochs to redo), and the last.
    # N > 0: every N epochs and the last.
    checkpoint_every: int = 0

    def __post_init__(self):
        self._check_choices()
        self._check_ranges()

    def _check_choices(self) -> None:
        choices = {
            "dataset": DATASETS,
            "protocol": PROTOCOLS,
            "labels": LABEL_SETS,
            "ck_frames": CK_FRAMES,
            "attention": tuple(ATTENTIONS),
            "loss": LOSS_KINDS,
            "optimizer": OPTIMIZERS,
            "schedule": SCHEDULES,
            "tta": TTA_MODES,
            "precision": PRECISIONS,
        }
        for key, allowed in choices.items():
            value = getattr(self, key)
            if value not in allowed:
                raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
        if self.dataset != "synthetic" and not self.data_path:
            raise ConfigError(f"data_path: dataset {self.dataset!r} needs the path of your copy")
        if self.device != "auto" and not (
            self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")
        ):
            raise ConfigError(f"device: {self.device!r} is not auto, cpu, cuda or cuda:N")

    def _check_ranges(self) -> None:
        positive = ("folds", "ck_k", "image_size", "synthetic_subjects",
                    "synthetic_images_per_class", "batch_size", "epochs", "eval_batch_size",
                    "lr", "plateau_patience")  # fmt: skip
        for key in positive:
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key}: must be positive, got {getattr(self, key)}")
        non_negative = ("fold", "lam", "lam1", "weight_decay", "momentum", "rotation",
                        "translate", "brightness", "contrast", "hflip",
                        "checkpoint_every")  # fmt: skip
        for key in non_negative:
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be non-negative, got {getattr(self, key)}")
        if self.fold >= self.folds:
            raise ConfigError(f"fold: {self.fold} is not below folds ({self.folds})")
        if not 0 < self.alpha <= 1:
            raise ConfigError(f"alpha: must be in (0, 1], got {self.alpha}")
        if not 0 < self.plateau_factor < 1:
            raise ConfigError(f"plateau_factor: must be in (0, 1), got {self.plateau_factor}")
        if self.image_size < 32:
            raise ConfigError(f"image_size: at least 32 (ResNet-50 halves it five times), "
                              f"got {self.image_size}")  # fmt: skip
        if self.in_chans not in (1, 3):
            raise ConfigError(f"in_chans: must be 1 or 3, got {self.in_chans}")
        if not 0 < self.scale_min <= self.scale_max:
            raise ConfigError(
                f"scale_min/scale_max: need 0 < scale_min <= scale_max, "
                f"got {self.scale_min}, {self.scale_max}"
            )

    # ------------------------------------------------------------------ flat dict round trip

    def to_dict(self) -> dict[str, str | int | float | bool]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrialConfig:
        """Build from plain values; strings are accepted for every type (as MLflow returns
        params), other mismatches and unknown keys are a ConfigError naming the key."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown config key")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})

    def replace(self, **changes) -> TrialConfig:
        return TrialConfig.from_dict({**self.to_dict(), **changes})

    @classmethod
    def from_file(cls, path) -> TrialConfig:
        """A flat JSON or TOML file of config keys."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise ConfigError(f"{path}: cannot read config ({err.strerror})") from None
        try:
            values = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
            raise ConfigError(
                f"{path}: not valid {path.suffix.lstrip('.') or 'JSON'} ({err})"
            ) from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: must hold a flat table of config keys")
        try:
            return cls.from_dict(values)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None


def _coerce(key: str, value, kind):
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif isinstance(value, str):  # strings parse as every type (MLflow returns params so)
        try:
            return kind(value)
        except ValueError:
            pass
    elif not isinstance(value, bool):
        if isinstance(value, kind) or (kind is float and isinstance(value, int)):
            return kind(value)
    raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r}")
