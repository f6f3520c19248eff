"""The trial config: everything one training run depends on, as one flat, typed record.

It is what MLflow logs as params and what a checkpoint stores, so a run can be repeated from
its logged params alone. Every key is declared once, with its meaning and allowed values as
field metadata (``key(...)``): validation, both command lines' help and the docs read them
from here. Defaults follow the paper (Gu & Jin 2025) where it states a value: PSA-ResNet-50,
softmax + Island loss, Adam at lr 0.001, batch 32, 200 epochs, lr x0.1 when the validation loss
has not fallen for 30 epochs; the loss weight is a documented deviation (docs/paper.md). Without a
named dataset a trial runs on the built-in synthetic set.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

# the names a config may give, here so that study files load without torch; the modules that
# build them (fermodel.attention, .losses, .augment, .data) import these or are tested against them
DATASETS = ("fer2013", "ckplus", "synthetic")
PROTOCOLS = ("official", "kfold", "paper")
ATTENTIONS = ("none", "se", "cbam", "eca", "aff", "psa")
# fermodel.models.BACKBONES' names (tests/test_config.py keeps the two equal), and timm's prefix
BACKBONE_NAMES = (
    "resnet50",
    "vgg16",
    "vgg16_bn",
    "mobilenet_v2",
    "densenet121",
    "resnet18",
    "resnet34",
    "shufflenet_v2_x0_5",
)
TIMM = "timm:"
LOSS_KINDS = ("ce", "center", "island")
TTA_MODES = ("none", "flip", "tencrop")

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("plateau", "cosine", "none")
PRECISIONS = ("auto", "fp32", "bf16", "fp64")
LABEL_SETS = ("fer2013", "ferplus", "ferplus7")
CK_FRAMES = ("last", "paper")


class ConfigError(ValueError):
    """A config key that is unknown, of the wrong type, or out of range."""


def key(
    default,
    help: str,
    choices=(),
    low=None,
    high=None,
    open_low=False,
    open_high=False,
    allowed: str = "",
):
    """A config field: its default, what it means, and the values it may take (``choices``, or
    the interval from ``low`` to ``high``, ends included unless ``open_*``; ``allowed`` says it
    in words where neither fits)."""
    return field(
        default=default,
        metadata={
            "help": help,
            "choices": tuple(choices),
            "low": low,
            "high": high,
            "open_low": open_low,
            "open_high": open_high,
            "allowed": allowed,
        },
    )


@dataclass(frozen=True)
class TrialConfig:
    # data: which images, read how, split how
    dataset: str = key(
        "synthetic",
        "which images: the built-in synthetic set, or your copy of "
        "FER2013 or CK+ (named by data_path)",
        DATASETS,
    )
    data_path: str = key(
        "",
        "your copy of the dataset: FER2013's fer2013.csv, Kaggle's "
        "train.csv or image folders; CK+'s extracted folders",
        allowed="a file or folder; empty for the synthetic set",
    )
    protocol: str = key(
        "official",
        "how the data is split: official (FER2013's Training / "
        "PublicTest / PrivateTest; the synthetic set's subject split), kfold "
        "(subject-independent folds, CK+'s standard), paper (the paper's CK+ "
        "split: augmented copies split 2:1 per class)",
        PROTOCOLS,
    )
    fold: int = key(0, "the test fold of the kfold protocol", low=0, allowed="0 to folds - 1")
    folds: int = key(10, "number of folds of the kfold protocol", low=2)
    repetition: int = key(
        0,
        "which drawing of the kfold protocol's subject folds (repeated "
        "k-fold: each repetition re-draws them; 0 is the split split_seed "
        "alone draws)",
        low=0,
    )
    split_seed: int = key(
        0,
        "seed of folds and carved splits (and of the synthetic set), kept "
        "fixed across training seeds",
        allowed="any integer",
    )
    labels: str = key(
        "fer2013",
        "FER2013's labels: fer2013 (the original 7), ferplus (FER+'s 8 "
        "majority labels, from fer2013new.csv), ferplus7 (FER+'s labels on the 7 "
        "classes, contempt dropped)",
        LABEL_SETS,
    )
    clean: bool = key(
        False,
        "FER2013: drop the training images FER+'s votes call non-face or "
        "unknown (needs fer2013new.csv); val and test stay whole",
    )
    drop_mislabeled: bool = key(
        False,
        "FER2013: drop the training images whose FER+ majority "
        "label disagrees with their FER2013 label (the paper's "
        "mislabeled images; needs fer2013new.csv); val and test stay "
        "whole",
    )
    balance: str = key(
        "",
        "top up training classes with augmented copies: minority (every "
        "class up to the median) or comma-separated class names, e.g. disgust",
        allowed="empty (none), minority or class names",
    )
    drop_leaked: bool = key(
        False,
        "drop val images with an identical copy in train or test, and "
        "test images with one in train (the whole test split is still "
        "reported beside)",
    )
    ck_frames: str = key(
        "last",
        "CK+ frames of each sequence: last (the last ck_k) or paper (the paper's 4 random frames)",
        CK_FRAMES,
    )
    ck_k: int = key(3, "CK+: frames taken from the end of each sequence (ck_frames last)", low=1)
    synthetic_subjects: int = key(
        60, "synthetic set: number of subjects (70/15/15% go to train/val/test)", low=3
    )
    synthetic_images_per_class: int = key(
        4, "synthetic set: images of each expression per subject", low=1
    )
    synthetic_difficulty: float = key(
        1.0,
        "synthetic set: how much pose, light, noise and "
        "occlusion hide the expression, and how subtle it may be "
        "(1 the full range, 0.5 half the nuisance)",
        low=0,
        high=1,
        open_low=True,
    )
    # model
    backbone: str = key(
        "resnet50",
        "the network: resnet50 (takes every attention), or a Table 5 "
        "baseline (resnet18, resnet34, vgg16, vgg16_bn, mobilenet_v2, densenet121) "
        "or timm:<model name> (with attention none)",
        allowed="a backbone name or timm:<name>",
    )
    attention: str = key(
        "psa",
        "attention in every ResNet-50 bottleneck (none is the plain ResNet-50, the paper's Basic)",
        tuple(ATTENTIONS),
    )
    pretrained: str = key(
        "",
        "ImageNet initialisation of the backbone",
        allowed="a torchvision weights file or a folder of them, or a weights "
        "name such as ResNet50_Weights.IMAGENET1K_V1 (downloads); empty or "
        "none: random initialisation",
    )
    in_chans: int = key(
        1, "input channels of the stem: 1 (grey) or 3 (RGB, fed the grey image)", (1, 3)
    )
    image_size: int = key(
        48, "model input size; the 48x48 images are upsampled on the device", low=32
    )
    # loss: L = CE + lam * (center | island term)
    loss: str = key(
        "island",
        "ce (softmax cross-entropy), center (+ center loss) or island "
        "(+ Island loss, the paper's joint loss)",
        LOSS_KINDS,
    )
    lam: float = key(0.01, "weight of the center or Island term in the joint loss", low=0)
    lam1: float = key(10.0, "Island loss: weight of the pairwise center-cosine term", low=0)
    alpha: float = key(0.5, "learning rate of the class centers", low=0, high=1, open_low=True)
    # optimisation
    optimizer: str = key("adam", "the optimiser of the network's weights", OPTIMIZERS)
    lr: float = key(0.001, "initial learning rate", low=0, open_low=True)
    weight_decay: float = key(0.0, "L2 weight decay", low=0)
    momentum: float = key(0.9, "SGD momentum (sgd only)", low=0)
    batch_size: int = key(32, "training images per step", low=1)
    epochs: int = key(200, "training epochs", low=1)
    schedule: str = key(
        "plateau",
        "learning-rate schedule: plateau (x plateau_factor after "
        "plateau_patience epochs without a lower validation loss), cosine, none",
        SCHEDULES,
    )
    plateau_patience: int = key(
        30, "plateau schedule: epochs without a lower validation loss before the lr drops", low=1
    )
    plateau_factor: float = key(
        0.1,
        "plateau schedule: factor the lr is multiplied by",
        low=0,
        high=1,
        open_low=True,
        open_high=True,
    )
    # augmentation of training batches, and test-time augmentation
    augment: bool = key(
        True, "augment training batches (flip, rotation, shift, scale, brightness, contrast)"
    )
    hflip: float = key(0.5, "augmentation: probability of a horizontal flip", low=0, high=1)
    rotation: float = key(10.0, "augmentation: largest rotation, degrees", low=0)
    translate: float = key(0.1, "augmentation: largest shift, fraction of the image", low=0)
    scale_min: float = key(
        0.9,
        "augmentation: smallest zoom factor",
        low=0,
        open_low=True,
        allowed="> 0 and <= scale_max",
    )
    scale_max: float = key(
        1.1, "augmentation: largest zoom factor", low=0, open_low=True, allowed=">= scale_min"
    )
    brightness: float = key(0.2, "augmentation: largest brightness change, fraction", low=0)
    contrast: float = key(0.2, "augmentation: largest contrast change, fraction", low=0)
    tta: str = key(
        "none",
        "test-time augmentation, also used on validation: none, flip (the "
        "image and its mirror) or tencrop (ten 42x42 crops)",
        TTA_MODES,
    )
    # runtime
    seed: int = key(
        0, "training seed (initialisation, shuffling, augmentation)", allowed="any integer"
    )
    precision: str = key(
        "auto",
        "arithmetic: auto (bf16 autocast on CUDA devices with bf16 "
        "tensor cores, compute capability 8.0 on; fp32 elsewhere), fp32, bf16, "
        "fp64 (float64 weights and loss: slow, for exact comparisons, such as a "
        "packed trial against the trial alone)",
        PRECISIONS,
    )
    device: str = key(
        "auto",
        "where to train: auto (CUDA if present), cpu, cuda or cuda:N",
        allowed="auto, cpu, cuda or cuda:N",
    )
    channels_last: bool = key(True, "channels-last memory format (faster convolutions on GPUs)")
    compile: bool = key(
        False,
        "torch.compile the model (CUDA; its first epoch compiles for "
        "minutes, and at 48x48 it trained slower than the default CUDA graphs: "
        "docs/benchmarks.md)",
    )
    cuda_graphs: bool = key(
        True,
        "on CUDA, train from CUDA graphs of the whole step, checked "
        "against eager steps at the start (eager on any mismatch, with a "
        "note); not with compile",
    )
    deterministic: bool = key(False, "deterministic kernels, for exact resume checks (slower)")
    eval_batch_size: int = key(256, "images per evaluation batch", low=1)
    # A checkpoint holds the model, the optimiser's state (two more copies of the weights for
    # Adam) and an older best model's weights, ~330 MB for PSA-ResNet-50, written and uploaded
    # by the caller (Tune: to the study's storage); a lost run redoes every epoch since its last
    # checkpoint. Auto measures the checkpoint time per trial, so slow storage means rarer
    # checkpoints and more epochs to redo.
    checkpoint_every: int = key(
        0,
        "epochs between checkpoints; 0: automatic (the first epoch, "
        "then as often as keeps checkpoint time near 5% of the trial's, "
        "and the last); N: every N epochs and the last",
        low=0,
    )

    def __post_init__(self):
        for f in fields(self):
            _check(f, getattr(self, f.name))
        self._check_together()

    def _check_together(self) -> None:
        if self.dataset != "synthetic" and not self.data_path:
            raise ConfigError(f"data_path: dataset {self.dataset!r} needs the path of your copy")
        if self.device != "auto" and not (
            self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")
        ):
            raise ConfigError(f"device: {self.device!r} is not auto, cpu, cuda or cuda:N")
        timm = self.backbone.startswith(TIMM) and len(self.backbone) > len(TIMM)
        if self.backbone not in BACKBONE_NAMES and not timm:
            raise ConfigError(
                f"backbone: {self.backbone!r} is not one of "
                f"{', '.join(BACKBONE_NAMES)} or timm:<model name>"
            )
        if self.attention != "none" and self.backbone != "resnet50":
            raise ConfigError(
                f"attention: {self.attention} sits in ResNet-50's bottlenecks; "
                f"backbone {self.backbone} takes attention none"
            )
        if self.fold >= self.folds:
            raise ConfigError(f"fold: {self.fold} is not below folds ({self.folds})")
        if self.repetition and self.protocol != "kfold":
            raise ConfigError(
                f"repetition: {self.repetition} re-draws the kfold protocol's "
                f"folds; protocol {self.protocol} has none"
            )
        if self.scale_min > self.scale_max:
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


FIELDS = {f.name: f for f in fields(TrialConfig)}
# what decides which images a trial reads (trials with equal values share one loaded dataset)
DATA_KEYS = (
    "dataset",
    "data_path",
    "labels",
    "clean",
    "drop_mislabeled",
    "drop_leaked",
    "ck_frames",
    "ck_k",
    "split_seed",
    "synthetic_subjects",
    "synthetic_images_per_class",
    "synthetic_difficulty",
)
# what decides how a trial's dataset is split (``fermodel.engine.trial_splits``)
SPLIT_KEYS = ("protocol", "fold", "folds", "repetition", "split_seed", "balance")
# what members of one pack of trials (``fermodel.pack``) may differ in; every other key, the
# architecture, data, augmentation and schedule length among them, they share (``pack_key``)
MEMBER_KEYS = (
    "seed",
    "lr",
    "weight_decay",
    "momentum",
    "optimizer",
    "schedule",
    "plateau_patience",
    "plateau_factor",
    "loss",
    "lam",
    "lam1",
    "alpha",
    "fold",
    "repetition",
    "tta",
    "eval_batch_size",
)
# where and how a trial runs, not what it computes: left out of a trial's identity, so that a
# study may move between machines (``--gpus-per-trial``) and keep its finished trials
PLACE_KEYS = ("device", "cuda_graphs")


def pack_key(config: TrialConfig) -> str:
    """What trials must share to train as one pack: all but ``MEMBER_KEYS``."""
    values = config.to_dict()
    return json.dumps({k: v for k, v in values.items() if k not in MEMBER_KEYS}, sort_keys=True)


def _check(f: dataclasses.Field, value) -> None:
    m = f.metadata
    if m["choices"] and value not in m["choices"]:
        raise ConfigError(f"{f.name}: {value!r} is not one of {', '.join(map(str, m['choices']))}")
    low, high = m["low"], m["high"]
    below = low is not None and (value <= low if m["open_low"] else value < low)
    above = high is not None and (value >= high if m["open_high"] else value > high)
    if below or above or (isinstance(value, float) and math.isnan(value)):
        raise ConfigError(f"{f.name}: must be {_interval(m)}, got {value}")


def _interval(m) -> str:
    low, high = m["low"], m["high"]
    if high is None:
        return f"{'>' if m['open_low'] else '>='} {low}"
    return f"in {'(' if m['open_low'] else '['}{low}, {high}{')' if m['open_high'] else ']'}"


def allowed_values(f: dataclasses.Field) -> str:
    """What a key may be, in words: its choices, interval or stated rule."""
    m = f.metadata
    if m["allowed"]:
        return m["allowed"]
    if m["choices"]:
        return "one of " + ", ".join(map(str, m["choices"]))
    if f.type in (bool, "bool"):
        return "on or off"
    if m["low"] is not None:
        return _interval(m).removeprefix("in ")
    return "any value"


def describe(name: str, default=None, allowed: str | None = None) -> str:
    """A key's help line: meaning, allowed values, default. Both CLIs print these; a CLI that
    fills the key otherwise (a study's preset) names its own ``default`` or ``allowed``."""
    f = FIELDS[name]
    if default is None:
        default = f.default if f.default != "" else "none"
    if isinstance(default, bool):
        default = "on" if default else "off"
    allowed = allowed_values(f) if allowed is None else allowed
    return f"{f.metadata['help']}. Allowed: {allowed}. Default: {default}."


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
