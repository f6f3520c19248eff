"""Packed trials (fermodel.pack): K trials of one architecture trained as one vmapped program are
each the trial they would be alone: same per-epoch losses, same selected epoch, the same test
predictions; a member that diverges ends alone; a pack's checkpoint continues each member, in a
pack or alone. And no training step, alone or packed, waits for the device.

The comparisons run in float64 (precision "fp64"). In float32 a packed member and its lone
trial run different kernels (grouped against plain convolutions), whose rounding differs by
about 1e-7, and training amplifies any such difference: a lone trial whose weights are scaled by
1 + 1e-7 is as far from itself after a few Adam steps (1e-3 relative after one epoch, percents
after ten steps on this set) as the packed member is. In float64 the same amplification leaves
both within 1e-10, so the checks below test the packing itself, not the rounding.
"""

import math
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fermodel.backbones import TORCHVISION_SPECS
from fermodel.config import LOSS_KINDS, TrialConfig
from fermodel.data import make_synthetic
from fermodel.engine import TrainingDiverged, fit, fit_pack
from fermodel.models import build_model
from fermodel.ops import OpCounter
from fermodel.pack import PackedStep
from fermodel.speed import pack_throughput

BASE = dict(
    backbone="shufflenet_v2_x0_5",
    attention="none",
    epochs=2,
    batch_size=16,
    synthetic_subjects=6,
    synthetic_images_per_class=2,
    device="cpu",
    channels_last=False,
    tta="none",
    precision="fp64",
)
LOSSES = ("train_loss", "train_ce", "val_loss")


@pytest.fixture(scope="module")
def data():
    return make_synthetic(num_subjects=6, images_per_class=2, seed=0)


def configs(**changes) -> list[TrialConfig]:
    """Three members: seeds 0, 1, 2, the last with another learning rate and the Island loss."""
    base = {**BASE, **changes}
    return [
        TrialConfig(**base, seed=0, loss="ce"),
        TrialConfig(**base, seed=1, loss="center"),
        TrialConfig(**base, seed=2, loss="island", lr=3e-3),
    ]


def learned(history: list[dict]) -> list[dict]:
    """A history without its timings."""
    return [
        {k: v for k, v in h.items() if k not in ("images_per_second", "epoch_seconds")}
        for h in history
    ]


def assert_same_trial(packed, alone, agreeing: float = 0.99) -> None:
    """The same losses every epoch (1e-4 relative), selected epoch, and at least ``agreeing``
    of the test predictions."""
    assert len(packed.history) == len(alone.history)
    for mine, theirs in zip(packed.history, alone.history, strict=True):
        for key in LOSSES:
            assert math.isclose(mine[key], theirs[key], rel_tol=1e-4), (key, mine, theirs)
    assert packed.best_epoch == alone.best_epoch
    same = sum(a == b for a, b in zip(packed.test_predictions, alone.test_predictions, strict=True))
    assert same >= agreeing * len(alone.test_predictions)


@pytest.mark.slow
def test_a_pack_of_three_trains_as_the_three_trials_alone(data):
    members = configs()
    packed = fit_pack(members, data)
    for config, result in zip(members, packed, strict=True):
        assert not [n for n in result.notes if "packing off" in n]
        assert_same_trial(result, fit(config, data))


def failing(step, idx):
    raise RuntimeError("NYI: querying is_contiguous inside of vmap for memory_format other")


PACKED_STEP = PackedStep.__call__


def wrong(step, idx):
    logits, y, total, ce = PACKED_STEP(step, idx)
    return logits, y, total * 1.01, ce


@pytest.mark.parametrize(
    "call, why",
    [
        (failing, "RuntimeError: NYI: querying is_contiguous inside of vmap"),
        (wrong, "its losses ["),
    ],
    ids=["failing", "wrong"],
)
def test_a_pack_that_fails_its_check_trains_its_members_one_after_another(
    data, monkeypatch, call, why
):
    """A packed step that raises on this device, or whose losses are not the members' own:
    the members train as they would alone, each by its own step, and say so."""
    monkeypatch.setattr(PackedStep, "__call__", call)
    members = configs(epochs=1)
    for config, result in zip(members, fit_pack(members, data), strict=True):
        (note,) = [n for n in result.notes if "packing off" in n]
        assert note.startswith("packing off: not fused: "), note
        assert "; packed by vmap failed its check: " + why in note
        assert note.endswith("trained one after another")
        alone = fit(config, data)
        assert learned(result.history) == learned(alone.history)
        assert result.test_predictions == alone.test_predictions
    rate, how, packed = pack_throughput(TrialConfig(**BASE), data, 2, steps=1, warmup=1)
    assert rate > 0 and not packed and "packing off" in how


TORCH_BATCH_NORM = torch.nn.functional.batch_norm


def batch_norm_refused_by_vmap(x, *args, **kwargs):
    """torch's batch norm as vmap ran it on an H200 (an fp32 copy of a bf16 activation): refused
    inside vmap; outside it, as ever."""
    if torch._C._functorch.is_batchedtensor(x):
        raise RuntimeError(
            "NYI: querying is_contiguous inside of vmap for memory_format other "
            "than torch.contiguous_format"
        )
    return TORCH_BATCH_NORM(x, *args, **kwargs)


def running_statistics(folder: str) -> dict[str, torch.Tensor]:
    model = torch.load(Path(folder) / "state.pt")["model"]
    return {k: v for k, v in model.items() if "running" in k or "batches_tracked" in k}


@pytest.mark.slow
def test_a_pack_whose_batch_norm_fails_packs_with_batch_norm_in_plain_ops(data, monkeypatch):
    """The members train packed, each the trial it is alone: its losses every epoch (the
    validation loss reads the running statistics the plain ops updated), its selected epoch,
    its test predictions, and the running statistics and step counts its checkpoint holds."""
    monkeypatch.setattr(torch.nn.functional, "batch_norm", batch_norm_refused_by_vmap)
    members = configs(checkpoint_every=2)
    packed = {}

    def keep(metrics, folder):
        if folder is not None:
            packed.update({i: running_statistics(Path(folder) / str(i)) for i in range(3)})

    results = fit_pack(members, data, report=keep)
    for index, (config, result) in enumerate(zip(members, results, strict=True)):
        (note,) = [n for n in result.notes if "pack" in n]
        assert note.startswith("packed by vmap with BatchNorm in plain ops (not fused: "), note
        assert "packed by vmap failed its check: RuntimeError: NYI: querying" in note
        alone = {}
        assert_same_trial(
            result,
            fit(
                config,
                data,
                report=lambda m, f, a=alone: a.update(running_statistics(f)) if f else None,
            ),
        )
        assert alone and alone.keys() == packed[index].keys()
        for key, value in alone.items():
            assert torch.allclose(packed[index][key], value, rtol=1e-7, atol=1e-9), key


@pytest.mark.slow
def test_a_member_that_diverges_fails_alone_and_the_others_finish(data):
    members = configs()
    members[1] = members[1].replace(lam=1e308)  # its center term overflows at the first step
    results = fit_pack(members, data)
    assert isinstance(results[1], TrainingDiverged)
    assert (results[1].epoch, results[1].step) == (1, 1)
    for i in (0, 2):
        assert_same_trial(results[i], fit(members[i], data))


@pytest.mark.slow
def test_a_packs_checkpoint_continues_each_member_packed_or_alone(data, tmp_path):
    members = configs(epochs=3, checkpoint_every=1)

    def keep(metrics, folder):
        if folder is not None and metrics[0]["epoch"] == 2:
            for index in range(len(members)):
                target = tmp_path / str(index)
                target.mkdir()
                (target / "state.pt").write_bytes(
                    (Path(folder) / str(index) / "state.pt").read_bytes()
                )

    straight = fit_pack(members, data, report=keep)
    files = [tmp_path / str(i) for i in range(len(members))]
    # each member's checkpoint holds its own weights only, not the pack's stacks
    alone_size = sum(t.numel() for t in torch.load(files[0] / "state.pt")["model"].values())
    model = build_model("shufflenet_v2_x0_5", "none", 7, 1)
    weights = sum(t.numel() for t in model.state_dict().values())
    assert alone_size == weights
    continued = fit_pack(members, data, checkpoints=files)
    for a, b in zip(continued, straight, strict=True):
        assert learned(a.history) == learned(b.history)
        assert a.test_predictions == b.test_predictions
    # one member continues alone, as a trial: the epochs it had are kept, the rest trained
    alone = fit(members[2], data, checkpoint=files[2])
    assert learned(alone.history[:2]) == learned(straight[2].history[:2])
    assert_same_trial(alone, straight[2])


def test_members_must_share_everything_but_their_member_keys(data):
    a = TrialConfig(**BASE)
    with pytest.raises(ValueError, match="must share every key but seed, lr"):
        fit_pack([a, a.replace(backbone="resnet18")], data)
    with pytest.raises(ValueError, match="at least one"):
        fit_pack([], data)


@pytest.mark.parametrize("kind", LOSS_KINDS)
@pytest.mark.parametrize("packed", [False, True], ids=["alone", "packed"])
def test_a_training_step_never_waits_for_the_device(data, kind, packed):
    """Augmentation, forward, joint loss, backward and update: no op copies a value to the host
    or sizes its output from the data (the epoch's bookkeeping syncs outside the step)."""
    from fermodel import engine

    config = TrialConfig(**{**BASE, "loss": kind, "epochs": 1})
    members = [
        engine.make_member(config.replace(seed=s), data, torch.device("cpu"))
        for s in range(2 if packed else 1)
    ]
    step = engine.make_step(members, torch.device("cpu"))
    step.train()
    idx = torch.arange(16).repeat(len(members), 1)
    step(idx)  # the optimiser's state exists from here on, as in every later step
    with OpCounter() as ops:
        step(idx)
    assert ops.kernels > 100, "no step was recorded"
    assert not ops.host_syncs, sorted(set(ops.host_syncs))


# the ResNet family fuses (tests/test_fused.py checks every attention there); vmap is its
# fallback, checked here with PSA, and the route of the torchvision backbones
ARCHITECTURES = [("resnet50", "psa")] + [(b, "none") for b in TORCHVISION_SPECS]


@pytest.mark.parametrize("norms", ["torch", "plain"])
@pytest.mark.parametrize("backbone, attention", ARCHITECTURES)
def test_every_architecture_packs_without_a_loop_over_its_members(
    data, monkeypatch, backbone, attention, norms
):
    """vmap batches every op of a packed step, forward and backward, with the default
    channels_last members: none falls back to a loop over the members, which would cost a
    kernel per member (adaptive pooling of channels_last activations once did). The same with
    BatchNorm in plain ops, where vmap refuses torch's."""
    from fermodel import engine, pack

    monkeypatch.setattr(pack, "FUSION", False)  # the ResNet family fuses (tests/test_fused.py)
    if norms == "plain":
        monkeypatch.setattr(torch.nn.functional, "batch_norm", batch_norm_refused_by_vmap)
    changes = dict(
        backbone=backbone,
        attention=attention,
        batch_size=4,
        loss="island",
        precision="fp32",
        channels_last=True,
    )
    config = TrialConfig(**{**BASE, **changes})
    members = [
        engine.make_member(config.replace(seed=s), data, torch.device("cpu")) for s in range(2)
    ]
    step = engine.make_step(members, torch.device("cpu"))
    assert isinstance(step, PackedStep), members[0].notes  # it passed its check (dropout too)
    norm_layers = [
        m
        for m in members[0].parts.net.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    ]
    assert step.plain_norms == (len(norm_layers) if norms == "plain" else 0)
    step.train()
    torch._C._functorch._set_vmap_fallback_enabled(False)  # an op without a batching rule raises
    try:
        logits, *_ = step(torch.arange(4).repeat(2, 1))
    finally:
        torch._C._functorch._set_vmap_fallback_enabled(True)
    assert logits.shape == (2, 4, 7) and torch.isfinite(logits).all()


class ConvolutionDtypes(TorchDispatchMode):
    """The dtypes of every convolution's input and weight dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.seen: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name == "aten::convolution":
            self.seen |= {args[0].dtype, args[1].dtype}
        return func(*args, **(kwargs or {}))


def first_step(config: TrialConfig, data, k: int) -> tuple[float, set, list]:
    """Member 0's total loss at the first step of a pack of ``k`` (1: alone), the dtypes its
    convolutions computed in, and its notes; vmap's fallback off, so a looped op raises."""
    from fermodel import engine

    members = [
        engine.make_member(config.replace(seed=s), data, torch.device("cpu")) for s in range(k)
    ]
    step = engine.make_step(members, torch.device("cpu"))
    step.train()
    torch._C._functorch._set_vmap_fallback_enabled(False)
    try:
        with ConvolutionDtypes() as convs:
            _, _, total, _ = step(torch.arange(4).repeat(k, 1))
    finally:
        torch._C._functorch._set_vmap_fallback_enabled(True)
    return total[0].item(), convs.seen, members[0].notes


@pytest.mark.parametrize("norms", ["torch", "plain"])
@pytest.mark.parametrize("attention", ["psa", "aff"])
def test_a_bf16_pack_computes_in_the_precision_of_its_lone_trials(
    data, monkeypatch, attention, norms
):
    """bf16 mixed precision ("auto" on CUDA) is applied by hand in a pack, since vmap ignores
    autocast (on the CPU; on CUDA it cast some layers and failed on others): the members'
    convolutions run in bf16 as their lone trials' do under autocast, and the loss differs from
    fp32's by bf16's rounding, as the lone trial's does, not by more and not by nothing. The
    same with BatchNorm in plain ops."""
    from fermodel import pack

    monkeypatch.setattr(pack, "FUSION", False)  # the ResNet family fuses (tests/test_fused.py)
    if norms == "plain":
        monkeypatch.setattr(torch.nn.functional, "batch_norm", batch_norm_refused_by_vmap)
    config = TrialConfig(
        **{
            **BASE,
            "backbone": "resnet50",
            "attention": attention,
            "batch_size": 4,
            "loss": "island",
            "channels_last": True,
        }
    )
    fp32, _, _ = first_step(config.replace(precision="fp32"), data, 1)
    alone, alone_convs, _ = first_step(config.replace(precision="bf16"), data, 1)
    packed, packed_convs, notes = first_step(config.replace(precision="bf16"), data, 2)
    how = [n.split(" (")[0] for n in notes if "pack" in n]
    assert how == [
        "packed by vmap" if norms == "torch" else "packed by vmap with BatchNorm in plain ops"
    ], notes
    assert alone_convs == packed_convs == {torch.bfloat16}
    assert packed != fp32  # cast: vmap under autocast alone left every op in fp32
    assert abs(alone - fp32) < 0.03 * fp32 and abs(packed - fp32) < 0.03 * fp32


@pytest.mark.slow
def test_the_gpu_benchmark_runs_on_the_cpu():
    """bench/gpu.py, small, on the CPU: its figures are printed (their values are a machine's)."""
    import subprocess
    import sys

    bench = Path(__file__).parent.parent / "bench" / "gpu.py"
    done = subprocess.run(
        [
            sys.executable,
            str(bench),
            "--small",
            "--steps",
            "2",
            "--packs",
            "1,2,8",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "ops per step, alone" in out and "ops per step, pack of  8" in out
    assert out.count(", 0 host syncs") == 2
    for label in (
        "reference pipeline",
        "one trial (engine)",
        "pack of  2",
        "pack of  8",
        "best pack:",
        "device-hours packed by",
    ):
        assert label in out, out
