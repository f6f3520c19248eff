"""The training engine: one trial, ``fit(config, data)``, fast, resumable and measured.

The whole split lives on the device as uint8; a step gathers a batch by index, augments it there
as a batch, and runs forward, the joint loss, backward and the optimiser in channels_last (bf16
autocast on CUDA). Every epoch is evaluated on the validation split, the best epoch (highest
validation accuracy, lower validation loss on ties) is kept, and the test split is evaluated
once at the end with that model: nothing is ever selected on test.

The engine knows nothing of Ray or MLflow: it calls ``report(metrics, checkpoint_dir)`` once an
epoch, with a folder holding a full checkpoint on the epochs ``CheckpointCadence`` picks (None
on the others), and the caller persists it if it wants. By default (``checkpoint_every = 0``)
the cadence is measured: each checkpointing call is timed, writing and the caller's upload
together, and the next checkpoint waits until the trial has spent ``(1 - s) / s`` times that
long on other work since the last one, s = ``CHECKPOINT_SHARE`` (5%), so checkpoint I/O stays
near 5% of the trial's time whatever the model, disk or storage; the first epoch (to measure)
and the last are always checkpointed.

Choices: the validation loss (for the plateau schedule and tie-breaks) is cross-entropy alone,
since the Island term depends on the centers rather than on the model; a final training batch
of a single image is dropped (BatchNorm cannot train on one); inputs are normalised with the
mean and std of ImageNet's channels averaged (0.449, 0.226), so ImageNet-initialised stems see
familiar statistics.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from fermodel.attention import fit_kernel
from fermodel.augment import AugmentConfig, augment, predict_tta, to_float
from fermodel.checkpoint import SAME_AS_MODEL, best_model, load_checkpoint, save_checkpoint
from fermodel.config import DATA_KEYS, MEMBER_KEYS, PLACE_KEYS, TrialConfig, pack_key
from fermodel.cost import model_cost, peak_memory_mb, start_peak_memory
from fermodel.data import FERDataset, load_dataset, make_splits
from fermodel.losses import JointLoss
from fermodel.metrics import confusion_matrix, summarize
from fermodel.models import build_model

MEAN, STD = 0.449, 0.226
DIVERGENCE_CHECK_EVERY = 25  # steps between host syncs that look for a non-finite loss
CHECKPOINT_SHARE = 0.05  # the share of a trial's time automatic checkpointing aims at

Report = Callable[[dict, str | None], None]


class TrainingDiverged(RuntimeError):
    def __init__(self, epoch: int, step: int):
        super().__init__(f"training diverged: non-finite loss at epoch {epoch}, step {step}")
        self.epoch, self.step = epoch, step


@dataclass
class TrialResult:
    config: dict
    classes: tuple[str, ...]
    history: list[dict]
    best_epoch: int
    val: dict  # validation metrics of the selected epoch
    test: dict  # test metrics of the selected model, evaluated once
    test_confusion: list[list[int]]
    test_predictions: list[int]
    test_labels: list[int]
    test_ids: list[str]
    images_per_second: float
    train_seconds: float
    notes: list[str] = field(default_factory=list)
    # the independent unit of each test image (its subject, CK+ and synthetic), or None
    test_groups: list[str] | None = None
    checkpoint_epochs: list[int] = field(default_factory=list)  # checkpointed in this call
    checkpoint_seconds: float = 0.0  # spent on them: writing and the report calls
    # with drop_leaked: the metrics on the whole test split, leaked images included (the
    # field's figure, FER2013's full PrivateTest), beside ``test`` on its deduplicated part
    test_full: dict | None = None
    split_sizes: dict = field(default_factory=dict)  # images of train, val and test
    cost: dict = field(default_factory=dict)  # the selected model's, measured (fermodel.cost)
    model_state: dict | None = field(default=None, repr=False)  # the selected model (CPU)

    def to_dict(self) -> dict:
        """Plain values for JSON: everything but the model weights."""
        out = asdict(self)
        out.pop("model_state")
        return out


def data_key(config: TrialConfig) -> str:
    """What decides which images a config reads: trials with equal keys share one dataset."""
    return json.dumps({k: getattr(config, k) for k in DATA_KEYS}, sort_keys=True)


def load_trial_data(config: TrialConfig, cache_dir=None) -> FERDataset:
    """Read the dataset a config names (the driver does this once per dataset of a study)."""
    if config.dataset == "synthetic":
        return load_dataset(
            "synthetic",
            num_subjects=config.synthetic_subjects,
            images_per_class=config.synthetic_images_per_class,
            difficulty=config.synthetic_difficulty,
            seed=config.split_seed,
        )
    if config.dataset == "fer2013":
        return load_dataset(
            "fer2013",
            config.data_path,
            drop_leaked=config.drop_leaked,
            labels=config.labels,
            clean=config.clean,
            mislabeled=config.drop_mislabeled,
            cache_dir=cache_dir,
        )
    return load_dataset(
        "ckplus",
        config.data_path,
        drop_leaked=config.drop_leaked,
        frames=config.ck_frames,
        k=config.ck_k,
        seed=config.split_seed,
    )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here")
    return device


class _Normalized(torch.nn.Module):
    """The model on [0, 1] float images: input size, normalisation and memory format in one
    place. Images are stored at 48x48; ``image_size`` upsamples each batch on the device (a
    larger input gives ResNet-50's last stages more than a 2x2 map, at about the square of
    the cost)."""

    def __init__(
        self,
        model: torch.nn.Module,
        channels_last: bool,
        image_size: int = 48,
        in_chans: int = 1,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.model, self.channels_last, self.image_size = model, channels_last, image_size
        self.in_chans, self.dtype = in_chans, dtype
        self.members = 1  # trials side by side in the channels (a fused pack: fermodel.fused)

    def forward(self, x: torch.Tensor, return_embedding: bool = False):
        x = x.to(self.dtype)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )
        x = (x - MEAN) / STD
        if x.shape[1] != self.in_chans * self.members:  # gray on each channel of an RGB stem
            n, _, h, w = x.shape
            x = x.view(n, self.members, 1, h, w).expand(-1, -1, self.in_chans, -1, -1)
            x = x.reshape(n, -1, h, w) if self.members > 1 else x[:, 0]
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x, return_embedding=return_embedding)


def _augment_config(c: TrialConfig) -> AugmentConfig:
    if not c.augment:
        return AugmentConfig.disabled()
    return AugmentConfig(
        hflip=c.hflip,
        rotation=c.rotation,
        translate=c.translate,
        scale=(c.scale_min, c.scale_max),
        brightness=c.brightness,
        contrast=c.contrast,
    )


def _optimizer(c: TrialConfig, params, device: torch.device) -> torch.optim.Optimizer:
    """The config's optimiser, with PyTorch's fused kernels (one or a few launches for all the
    weights, and no step counter read back to the host, which the per-tensor implementations
    do once per weight tensor: a step that waits for the device). On CUDA the learning rate is
    a tensor on the device, which the schedules change in place, so that a captured CUDA graph
    reads the current value."""
    cuda = device.type == "cuda"
    lr = torch.tensor(c.lr, device=device) if cuda else c.lr
    if c.optimizer in ("adam", "adamw"):
        # capturable: its step counter and learning rate stay on the device (graph capture)
        adam = torch.optim.Adam if c.optimizer == "adam" else torch.optim.AdamW
        return adam(params, lr=lr, weight_decay=c.weight_decay, fused=True, capturable=cuda)
    return torch.optim.SGD(
        params, lr=lr, momentum=c.momentum, weight_decay=c.weight_decay, fused=True
    )


def _scheduler(c: TrialConfig, optimizer):
    if c.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=c.plateau_factor, patience=c.plateau_patience
        )
    if c.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=c.epochs)
    return None


@dataclass
class TrainingParts:
    """Model, loss, optimiser and schedule of a trial, built the one way the engine builds them
    (bench/throughput.py times ``train_step`` on the same parts)."""

    model: torch.nn.Module
    net: _Normalized  # the model on [0, 1] images
    step_net: torch.nn.Module  # ``net``, compiled when the config asks
    criterion: JointLoss
    optimizer: torch.optim.Optimizer
    scheduler: object
    use_bf16: bool
    dtype: torch.dtype = torch.float32  # of the weights and the loss (float64 with "fp64")

    def autocast(self):
        device = next(self.model.parameters()).device.type
        return torch.autocast(device, dtype=torch.bfloat16, enabled=self.use_bf16)


def build_parts(c: TrialConfig, num_classes: int, device: torch.device) -> TrainingParts:
    dtype = torch.float64 if c.precision == "fp64" else torch.float32
    model = build_model(
        c.backbone,
        c.attention,
        num_classes,
        c.in_chans,
        c.pretrained or None,
        image_size=c.image_size,
    )
    model = model.to(device, dtype)
    if c.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = _Normalized(model, c.channels_last, c.image_size, c.in_chans, dtype)
    criterion = JointLoss(c.loss, num_classes, model.num_features, c.lam, c.lam1, c.alpha)
    optimizer = _optimizer(c, model.parameters(), device)
    return TrainingParts(
        model=model,
        net=net,
        step_net=compiled(net) if c.compile else net,
        criterion=criterion.to(device, dtype),
        optimizer=optimizer,
        scheduler=_scheduler(c, optimizer),
        use_bf16=uses_bf16(c.precision, device),
        dtype=dtype,
    )


def compiled(net: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile(net)`` after forgetting what earlier trials of this process compiled: a
    reused Ray actor trains trial after trial, and the variants of one code object (every
    attention's bottleneck shares one ``forward``) would reach dynamo's recompile limit, after
    which it silently runs eager."""
    torch._dynamo.reset()
    return torch.compile(net)


def uses_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast: when asked, or with "auto" on a CUDA device whose tensor cores take bf16
    (compute capability 8.0 and newer: A100, H100, L4, RTX 30xx on); V100 and T4 (7.x) would
    emulate it, slower than fp32."""
    if precision != "auto":
        return precision == "bf16"
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def train_step(parts: TrainingParts, images, labels, aug: AugmentConfig, generator):
    """One optimisation step on a uint8 batch where it lies: augment, forward, joint loss,
    backward, update. Returns the logits and the loss terms (not synchronised)."""
    x = augment(images, aug, generator)
    with parts.autocast():
        logits, emb = parts.step_net(x, return_embedding=True)
    out = parts.criterion(logits.to(parts.dtype), emb.to(parts.dtype), labels)
    parts.optimizer.zero_grad(set_to_none=True)
    out.total.backward()
    parts.optimizer.step()
    return logits, out


def trial_splits(c: TrialConfig, data: FERDataset, balanced: bool = True):
    """The train / val / test splits a config trains on (its balancing only if ``balanced``)."""
    balance = _balance_arg(c.balance) if balanced else None
    return make_splits(
        data,
        c.protocol,
        c.fold,
        c.folds,
        seed=c.split_seed,
        balance=balance,
        drop_leaked=c.drop_leaked,
        repetition=c.repetition,
    )


def _balance_arg(balance: str):
    if not balance:
        return None
    if balance == "minority":
        return "minority"
    return tuple(name.strip() for name in balance.split(",") if name.strip())


def evaluate(model: _Normalized, images, labels, classes, batch_size, autocast, tta="none"):
    """Loss (cross-entropy), metrics, confusion matrix and predictions on one split."""
    (out,) = evaluate_members(model, images[None], labels[None], classes, batch_size, autocast, tta)
    return out


@torch.inference_mode()
def evaluate_members(model, images, labels, classes, batch_size, autocast, tta="none") -> list:
    """``evaluate`` of M networks side by side in ``model``'s channels (a fused pack's network,
    ``fermodel.fused``; M = 1: a trial's own) at once: ``images`` [M, N, C, H, W] (each member's
    split, or one split expanded), ``labels`` [M, N]; one ``(metrics, confusion, predictions)``
    per member."""
    model.eval()
    m, n = labels.shape
    loss_sums = [torch.zeros((), device=images.device, dtype=torch.float64) for _ in range(m)]
    preds = []
    for start in range(0, n, batch_size):
        x = to_float(images[:, start : start + batch_size]).transpose(0, 1).flatten(1, 2)
        y = labels[:, start : start + batch_size]
        with autocast():
            if tta == "none":
                scores = model(x).float().view(len(x), m, -1)  # logits [B, M, classes]
                for j in range(m):
                    loss_sums[j] += F.cross_entropy(scores[:, j], y[j], reduction="sum").double()
            else:  # probabilities averaged over the V views, chunked
                scores = predict_tta(model, x, tta, batch_size=batch_size, members=m)
                scores = scores[:, None] if m == 1 else scores
                for j in range(m):
                    log_probs = scores[:, j].clamp_min(1e-12).log()
                    loss_sums[j] += F.nll_loss(log_probs, y[j], reduction="sum").double()
        preds.append(scores.argmax(-1).T)
    pred = torch.cat(preds, dim=1) if preds else labels[:, :0]
    out = []
    for j in range(m):
        cm = confusion_matrix(labels[j], pred[j], len(classes))
        metrics = summarize(cm.cpu(), classes)
        metrics["loss"] = loss_sums[j].item() / max(n, 1)
        out.append((metrics, cm.cpu(), pred[j].cpu()))
    return out


class CheckpointCadence:
    """Which epochs of a run write a checkpoint.

    ``every > 0``: every ``every`` epochs and the last. ``every == 0`` (auto): the first epoch
    of this run, which measures what a checkpoint costs here (writing ``state.pt`` and the
    caller's report call, a Tune upload included); then the first epoch by which the run has
    spent at least ``(1 - share) / share`` times the last checkpoint's cost on everything else
    since that checkpoint ended; and the last epoch. Checkpointing then takes about ``share`` of
    the run's time (more in runs of few epochs, whose first and last are always written), and
    a run that is lost redoes the work since its last checkpoint: up to ``(1 - share) / share``
    times one checkpoint's cost (19 at 5%) plus one epoch.
    """

    clock = staticmethod(time.perf_counter)  # tests move their own

    def __init__(self, every: int, last_epoch: int, share: float = CHECKPOINT_SHARE):
        self.every, self.last_epoch, self.share = every, last_epoch, share
        self.cost: float | None = None  # seconds the last checkpoint took
        self.ended = 0.0  # clock when it ended
        self.epochs: list[int] = []
        self.seconds = 0.0

    def due(self, epoch: int) -> bool:
        if epoch == self.last_epoch:
            return True
        if self.every:
            return epoch % self.every == 0
        if self.cost is None:
            return True
        return self.clock() - self.ended >= self.cost * (1 - self.share) / self.share

    @contextmanager
    def timed(self, epoch: int) -> Iterator[None]:
        """Around writing a checkpoint and reporting it: records what it cost."""
        start = self.clock()
        yield
        self.ended = self.clock()
        self.cost = self.ended - start
        self.epochs.append(epoch)
        self.seconds += self.cost


def training_state(
    c: TrialConfig,
    epoch: int,
    parts: TrainingParts,
    shuffle_gen,
    augment_gen,
    history: list,
    best: dict,
    best_state: dict | None,
) -> dict:
    """What a checkpoint holds after ``epoch``: everything to continue exactly, each set of
    weights once (see fermodel.checkpoint)."""
    device = next(parts.model.parameters()).device
    return {
        "config": c.to_dict(),
        "epoch": epoch,
        "model": _owned(parts.model.state_dict()),
        "criterion": _owned(parts.criterion.state_dict()),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": None if parts.scheduler is None else parts.scheduler.state_dict(),
        "shuffle_rng": shuffle_gen.get_state(),
        "augment_rng": augment_gen.get_state().cpu(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "history": history,
        "best": best,
        "best_model": SAME_AS_MODEL if best["epoch"] == epoch else best_state,
    }


def _owned(state: dict) -> dict:
    """The tensors of a state dict, each with a storage of its own: a packed member's weights
    are views of the pack's stacks, and torch.save writes a view's whole storage."""
    return {
        k: v.clone() if v.untyped_storage().nbytes() > v.nbytes else v for k, v in state.items()
    }


def _fit_moments(optimizer: torch.optim.Optimizer) -> None:
    """A checkpoint written before PSA's kernels were cropped (``PSA.crop_to``) holds their
    moments whole: cut them as the weights were cut."""
    for p, moments in optimizer.state.items():
        for name, t in moments.items():
            if torch.is_tensor(t) and t.ndim == 4 == p.ndim and t.shape != p.shape:
                moments[name] = fit_kernel(t, p.shape[-1])


def _restore(c: TrialConfig, checkpoint, parts: TrainingParts, shuffle_gen, augment_gen):
    """Load a checkpoint into the parts and generators; returns epoch, history, best, best
    model weights."""
    state = load_checkpoint(checkpoint)
    # where a trial runs (device) may change between its attempts; what it is may not
    saved = {k: v for k, v in state["config"].items() if k not in PLACE_KEYS}
    wanted = {k: v for k, v in c.to_dict().items() if k not in PLACE_KEYS}
    if saved != wanted:
        changed = sorted(k for k, v in wanted.items() if saved.get(k) != v)
        raise ValueError(f"checkpoint was written by a different config (keys: {changed})")
    parts.model.load_state_dict(state["model"])
    parts.criterion.load_state_dict(state["criterion"])
    parts.optimizer.load_state_dict(state["optimizer"])
    _fit_moments(parts.optimizer)
    if parts.scheduler is not None:
        parts.scheduler.load_state_dict(state["scheduler"])
    shuffle_gen.set_state(state["shuffle_rng"])
    torch.set_rng_state(state["torch_rng"])
    device = next(parts.model.parameters()).device
    if device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    notes = []
    if state["augment_rng"].numel() == augment_gen.get_state().numel():
        augment_gen.set_state(state["augment_rng"])
    else:  # a CPU generator's state (Mersenne Twister) does not fit a CUDA one's (Philox)
        augment_gen.manual_seed(c.seed + 1 + 1_000_003 * state["epoch"])
        notes.append(
            f"resumed after epoch {state['epoch']} on {device.type} from a checkpoint "
            "written on another device type: augmentation went on from a seed of its "
            "own, so its draws differ from an uninterrupted run's"
        )
    return state["epoch"], state["history"], state["best"], best_model(state), notes


def fit(
    config: TrialConfig,
    data: FERDataset | None = None,
    report: Report | None = None,
    checkpoint=None,
    checkpoint_now: Callable[[], bool] | None = None,
) -> TrialResult:
    """Train and evaluate one trial. ``data`` is the dataset the config names (read here when
    None); ``checkpoint`` is a checkpoint folder or file to continue from; ``checkpoint_now``,
    asked once an epoch, makes that epoch write a checkpoint whatever the cadence (a driver
    about to stop uses it). A NaN or inf loss raises ``TrainingDiverged``."""

    def pack_report(metrics: list, folder: str | None) -> None:
        if isinstance(metrics[0], dict):
            report(metrics[0], None if folder is None else os.path.join(folder, "0"))

    (result,) = fit_pack(
        [config],
        data,
        pack_report if report else None,
        None if checkpoint is None else [checkpoint],
        checkpoint_now,
    )
    if isinstance(result, TrainingDiverged):
        raise result
    return result


PackReport = Callable[[list, str | None], None]


def pack_group(config: TrialConfig, data: FERDataset, start_epoch: int = 0) -> tuple:
    """Trials train together as one pack (``fit_pack``) when these are equal: every key but the
    member keys (``fermodel.config.pack_key``), the epoch they continue from (0: fresh) and the
    size of their training split (folds may differ by a few images)."""
    return pack_key(config), start_epoch, len(trial_splits(config, data).train)


def fit_pack(
    configs: list[TrialConfig],
    data: FERDataset | None = None,
    report: PackReport | None = None,
    checkpoints: list | None = None,
    checkpoint_now: Callable[[], bool] | None = None,
) -> list[TrialResult | TrainingDiverged]:
    """Train K trials that share an architecture as one pack (``fermodel.pack``; K = 1 is a
    trial alone, trained as a plain module); returns each member's ``TrialResult``, or the
    ``TrainingDiverged`` that ended it (a member that diverges stops alone).

    ``report(metrics, folder)`` is called once an epoch with one entry per member: its epoch
    metrics, the ``TrainingDiverged`` that ended it in this epoch, or None once it has ended;
    ``folder``, on the epochs that checkpoint, holds one checkpoint folder per live member,
    named by its index ("0", "1", ...), each in a single trial's format. ``checkpoints``
    gives each member's checkpoint to continue from (or None)."""
    configs = list(configs)
    if not configs:
        raise ValueError("a pack needs at least one trial config")
    keys = {pack_key(c) for c in configs}
    if len(keys) > 1:
        raise ValueError(f"the trials of a pack must share every key but {', '.join(MEMBER_KEYS)}")
    first = configs[0]
    if first.deterministic:
        # cuBLAS is deterministic only with a fixed workspace, set before its first call
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    previous = torch.are_deterministic_algorithms_enabled()
    benchmark = torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(first.deterministic or previous)
    # every batch has the same shape: let cuDNN pick its fastest kernels once
    torch.backends.cudnn.benchmark = not first.deterministic
    try:
        data = load_trial_data(first) if data is None else data
        device = resolve_device(first.device)
        start_peak_memory(device)
        checkpoints = list(checkpoints) if checkpoints is not None else [None] * len(configs)
        members = [
            make_member(c, data, device, ckpt) for c, ckpt in zip(configs, checkpoints, strict=True)
        ]
        return _train(members, data, device, report, checkpoint_now)
    finally:
        torch.use_deterministic_algorithms(previous)
        torch.backends.cudnn.benchmark = benchmark


@dataclass
class Member:
    """One trial of a run (alone or in a pack): config, splits, parts, generators and what it
    has learnt so far."""

    config: TrialConfig
    splits: object  # fermodel.data.Splits
    parts: TrainingParts
    shuffle_gen: torch.Generator
    augment_gen: torch.Generator
    start_epoch: int = 0
    history: list = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"accuracy": -1.0, "loss": math.inf, "epoch": 0})
    best_state: dict | None = None
    notes: list = field(default_factory=list)
    failed: TrainingDiverged | None = None

    @property
    def alive(self) -> bool:
        return self.failed is None


def make_member(c: TrialConfig, data: FERDataset, device, checkpoint=None) -> Member:
    """A trial built exactly as it is alone (its seed first), restored from ``checkpoint``."""
    torch.manual_seed(c.seed)
    splits = trial_splits(c, data)
    parts = build_parts(c, len(data.classes), device)
    member = Member(
        c,
        splits,
        parts,
        torch.Generator().manual_seed(c.seed),
        torch.Generator(device=device).manual_seed(c.seed + 1),
    )
    if checkpoint is not None:
        (member.start_epoch, member.history, member.best, member.best_state, member.notes) = (
            _restore(c, checkpoint, parts, member.shuffle_gen, member.augment_gen)
        )
    return member


class _SoloStep:
    """One training step of a trial alone, on its plain (maybe compiled) module."""

    def __init__(self, member: Member, aug: AugmentConfig, device):
        self.member, self.aug = member, aug
        train = member.splits.train
        self.x, self.y = train.images.to(device), train.labels.to(device)

    def train(self) -> None:
        self.member.parts.net.train()
        self.member.parts.criterion.train()

    def drop(self, k: int) -> None:
        pass  # a trial alone ends with its divergence

    def __call__(self, idx: torch.Tensor):
        i = idx[0]
        y = self.y[i]
        logits, out = train_step(self.member.parts, self.x[i], y, self.aug, self.member.augment_gen)
        # detached, as a pack's: outputs that kept the step's autograd graph alive kept its
        # gradient accumulators too, made on the stream of the eager steps before a CUDA
        # graph's capture (torch warned of the stream mismatch on an H200)
        return (
            logits.detach()[None],
            y[None],
            out.total.detach().reshape(1),
            out.ce.detach().reshape(1),
        )


def make_step(members: list[Member], device):
    """The training step of a trial alone (its module, maybe compiled) or of a pack (once it
    passes its check, else its members one after another: ``fermodel.pack.checked_pack``); on
    CUDA replayed from CUDA graphs once they pass their check (``fermodel.graphs``). Each
    member's notes record how its steps ran."""
    from fermodel.graphs import CHECK_STEPS, GraphedStep

    aug = _augment_config(members[0].config)
    n, b = len(members[0].splits.train), members[0].config.batch_size
    draw = torch.Generator().manual_seed(0)  # the checks' batches: any, their steps are undone
    batches = [
        torch.randint(n, (len(members), min(b, n)), generator=draw).to(device)
        for _ in range(CHECK_STEPS)
    ]
    if len(members) == 1:
        step = _SoloStep(members[0], aug, device)
    else:
        from fermodel.pack import checked_pack

        step = checked_pack(
            members, [_SoloStep(m, aug, device) for m in members], aug, device, batches[0]
        )
    capture = capture_for(members, device)
    if capture is None:
        return step
    graphed = GraphedStep(step, members, capture)
    step.train()
    why = graphed.check(batches)
    note = (
        "trained from CUDA graphs (checked against eager steps at the start)"
        if why is None
        else f"CUDA graphs off: {why}; trained eagerly"
    )
    for m in members:
        m.notes.append(note)
    return step if why else graphed


def capture_for(members: list[Member], device):
    """How to capture the training step: CUDA graphs on CUDA when the config asks (not with
    torch.compile, which captures its own), else none (eager)."""
    c = members[0].config if members else None
    if device.type != "cuda" or c is None or not c.cuda_graphs or c.compile:
        return None
    from fermodel.graphs import CudaCapture

    return CudaCapture(device, [m.augment_gen for m in members])


def _train(members: list[Member], data, device, report, checkpoint_now) -> list:
    first = members[0].config
    groups = {(pack_key(m.config), m.start_epoch, len(m.splits.train)) for m in members}
    _, starts, sizes = (sorted(set(part)) for part in zip(*groups, strict=True))
    if len(starts) > 1:  # pack_group's parts, read from the built members
        raise ValueError(f"the members of a pack continue from one epoch, got {starts}")
    if len(sizes) > 1:
        raise ValueError(f"the members of a pack train on splits of one size, got {sizes}")
    step = make_step(members, device)
    cadence = CheckpointCadence(first.checkpoint_every, first.epochs)
    n = sizes[0]
    batches = [(s, min(s + first.batch_size, n)) for s in range(0, n, first.batch_size)]
    if batches and batches[-1][1] - batches[-1][0] < 2:
        batches.pop()
    validate = _validation(members, step, device)
    # measured before training, so every epoch's report carries it (schedulers rank on it)
    costs = [architecture_cost(m, len(data.classes), device) for m in members]
    for epoch in range(starts[0] + 1, first.epochs + 1):
        was_alive = [m.alive for m in members]
        seen, seconds, sums = _train_epoch(members, step, epoch, batches, device)
        vals = validate()
        metrics = [
            _end_epoch(m, epoch, seen, seconds, *s, val, cost) if m.alive else None
            for m, s, val, cost in zip(members, sums, vals, costs, strict=True)
        ]
        metrics = [
            m.failed if was and not m.alive else x
            for m, was, x in zip(members, was_alive, metrics, strict=True)
        ]
        if report is not None:
            _report(members, epoch, metrics, report, cadence, checkpoint_now)
        if not any(m.alive for m in members):
            break
    peak = peak_memory_mb(device, len(members))
    return [
        _test(m, data, device, cadence, peak, cost) if m.alive else m.failed
        for m, cost in zip(members, costs, strict=True)
    ]


def _train_epoch(members: list[Member], step, epoch: int, batches, device):
    """One epoch of every live member; returns images seen, seconds, and per member its
    (loss sum, cross-entropy sum, correct) over the epoch. A member whose loss turns NaN or
    inf ends with ``TrainingDiverged`` (looked for every ``DIVERGENCE_CHECK_EVERY`` steps)."""
    started = time.perf_counter()
    step.train()
    n = batches[-1][1] if batches else 0
    order = torch.stack([torch.randperm(n, generator=m.shuffle_gen) for m in members]).to(device)
    k = len(members)
    loss_sum = torch.zeros(k, device=device, dtype=torch.float64)
    ce_sum, correct = torch.zeros_like(loss_sum), torch.zeros(k, device=device)
    first_bad = torch.full((k,), -1, device=device)
    seen = 0
    for i, (lo, hi) in enumerate(batches, 1):
        logits, y, total, ce = step(order[:, lo:hi])
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(total), i, first_bad)
        loss_sum += total.double() * (hi - lo)
        ce_sum += ce.double() * (hi - lo)
        correct += (logits.argmax(-1) == y).sum(-1)
        seen += hi - lo
        if i % DIVERGENCE_CHECK_EVERY == 0 or i == len(batches):
            for index, (member, bad) in enumerate(zip(members, first_bad.tolist(), strict=True)):
                if bad >= 0 and member.alive:
                    member.failed = TrainingDiverged(epoch, bad)
                    step.drop(index)
            if not any(m.alive for m in members):
                break
    seconds = time.perf_counter() - started
    sums = zip(loss_sum.tolist(), ce_sum.tolist(), correct.tolist(), strict=True)
    return seen, seconds, list(sums)


def _validation(members: list[Member], step, device) -> Callable[[], list[dict]]:
    """Each member's validation metrics, with the test's TTA (the selected epoch is judged as it
    is tested): a fused pack's members all at once through its network when they share their
    TTA and evaluation batch and validate on splits of one size, else one after another. The
    splits are moved to the device once."""
    fused = getattr(getattr(step, "step", step), "net", None)  # a FusedStep's, maybe graphed
    c = members[0].config
    vals = [m.splits.val for m in members]
    together = (
        fused is not None
        and len({(m.config.tta, m.config.eval_batch_size) for m in members}) == 1
        and len({len(v) for v in vals}) == 1
    )
    if together:
        same = all(np.array_equal(v.ids, vals[0].ids) for v in vals[1:])
        if same:
            x, y = vals[0].images.to(device), vals[0].labels.to(device)
            x, y = x.expand(len(vals), *x.shape), y.expand(len(vals), *y.shape)
        else:
            x = torch.stack([v.images for v in vals]).to(device)
            y = torch.stack([v.labels for v in vals]).to(device)
        autocast = members[0].parts.autocast
        return lambda: [
            metrics
            for metrics, _, _ in evaluate_members(
                fused, x, y, vals[0].classes, c.eval_batch_size, autocast, c.tta
            )
        ]
    on_device = [(v.images.to(device), v.labels.to(device)) for v in vals]
    return lambda: [
        evaluate(
            m.parts.net, *xy, v.classes, m.config.eval_batch_size, m.parts.autocast, m.config.tta
        )[0]
        if m.alive
        else None
        for m, xy, v in zip(members, on_device, vals, strict=True)
    ]


def _end_epoch(
    m: Member,
    epoch: int,
    seen: int,
    seconds: float,
    loss_sum,
    ce_sum,
    correct,
    val: dict,
    cost: dict,
):
    """The schedule's step on the epoch's validation metrics ``val``, the best epoch so far
    (its weights kept where they are), and the epoch's metrics (with the architecture's
    ``cost``), kept in the history."""
    parts = m.parts
    lr = float(parts.optimizer.param_groups[0]["lr"])  # a tensor on CUDA
    if isinstance(parts.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        parts.scheduler.step(val["loss"])
    elif parts.scheduler is not None:
        parts.scheduler.step()
    if val["accuracy"] > m.best["accuracy"] or (
        val["accuracy"] == m.best["accuracy"] and val["loss"] < m.best["loss"]
    ):
        m.best = {"accuracy": val["accuracy"], "loss": val["loss"], "epoch": epoch}
        # a copy on the device: no copy to the host on each better epoch
        m.best_state = {k: v.detach().clone() for k, v in parts.model.state_dict().items()}
    metrics = {
        "epoch": epoch,
        "train_loss": loss_sum / max(seen, 1),
        "train_ce": ce_sum / max(seen, 1),
        "train_accuracy": correct / max(seen, 1),
        **{f"val_{k}": v for k, v in val.items()},
        "lr": lr,
        "best_val_accuracy": m.best["accuracy"],
        "best_epoch": m.best["epoch"],
        "images_per_second": seen / seconds,
        "epoch_seconds": seconds,
        **{k: cost[k] for k in ARCHITECTURE_COST},
    }
    m.history.append(metrics)
    return metrics


def _report(members, epoch: int, metrics: list, report, cadence, checkpoint_now) -> None:
    """The epoch's metrics to the caller, with a checkpoint of every live member on the epochs
    the cadence (or ``checkpoint_now``) picks."""
    live = any(m.alive for m in members)
    if not live or not (cadence.due(epoch) or (checkpoint_now and checkpoint_now())):
        report(metrics, None)
        return
    with cadence.timed(epoch), tempfile.TemporaryDirectory(prefix="fer-ckpt-") as folder:
        for index, m in enumerate(members):
            if m.alive:
                state = training_state(
                    m.config,
                    epoch,
                    m.parts,
                    m.shuffle_gen,
                    m.augment_gen,
                    m.history,
                    m.best,
                    m.best_state,
                )
                save_checkpoint(os.path.join(folder, str(index)), state)
        report(metrics, folder)


ARCHITECTURE_COST = ("params", "gflops", "latency_ms", "throughput")  # in every epoch's metrics


def architecture_cost(m: Member, classes: int, device) -> dict:
    """What the member's model costs to run (``fermodel.cost``): its architecture's, whatever
    its weights, measured once per process."""
    c = m.config
    key = (
        c.backbone,
        c.attention,
        c.in_chans,
        c.image_size,
        c.precision,
        c.channels_last,
        classes,
        str(device),
        torch.get_num_threads(),
    )
    return model_cost(
        m.parts.net, (c.in_chans, c.image_size, c.image_size), device, key, m.parts.autocast
    )


def _test(m: Member, data: FERDataset, device, cadence, peak_mb: float, cost: dict) -> TrialResult:
    """The selected epoch's model on the test split, evaluated once, with its ``cost``
    (measured before training: the architecture's, whatever its weights)."""
    c, parts, splits = m.config, m.parts, m.splits
    if m.best_state is not None:
        parts.model.load_state_dict(m.best_state)
    args = (data.classes, c.eval_batch_size, parts.autocast, c.tta)
    test_x, test_y = splits.test.images.to(device), splits.test.labels.to(device)
    test, cm, pred = evaluate(parts.net, test_x, test_y, *args)
    test_full = None
    if c.drop_leaked:
        test_full = test
        if splits.full_test is not None:
            full = splits.full_test
            test_full, _, _ = evaluate(
                parts.net, full.images.to(device), full.labels.to(device), *args
            )
    history = m.history
    train_seconds = sum(h["epoch_seconds"] for h in history)
    trained = sum(h["images_per_second"] * h["epoch_seconds"] for h in history)
    best_epoch = m.best["epoch"]
    return TrialResult(
        config=c.to_dict(),
        classes=data.classes,
        history=history,
        best_epoch=best_epoch,
        val={k[4:]: v for k, v in history[best_epoch - 1].items() if k.startswith("val_")}
        if best_epoch
        else {},
        test=test,
        test_confusion=cm.tolist(),
        test_predictions=pred.tolist(),
        test_labels=splits.test.labels.tolist(),
        test_ids=[str(i) for i in splits.test.ids],
        test_groups=None
        if splits.test.subjects is None
        else [str(g) for g in splits.test.subjects],
        images_per_second=trained / train_seconds if train_seconds else float("nan"),
        train_seconds=train_seconds,
        notes=[*data.notes, *splits.notes, *m.notes],
        checkpoint_epochs=cadence.epochs,
        checkpoint_seconds=cadence.seconds,
        test_full=test_full,
        split_sizes={p: len(getattr(splits, p)) for p in ("train", "val", "test")},
        cost={**cost, "peak_memory_mb": peak_mb},
        model_state=None if m.best_state is None else {k: v.cpu() for k, v in m.best_state.items()},
    )
