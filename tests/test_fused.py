"""Fused packs (fermodel.fused): K trials of the ResNet family trained as one network of K times
the channels are each the trial they would be alone, in float64 to 1e-9: every epoch's losses,
the selected epoch, the test predictions, and the BatchNorm statistics and Island centers their
checkpoints hold; members differ in seed, fold, learning rate, weight decay and loss. A fused
step costs about one trial's kernels whatever K is.

The ResNet here has one bottleneck a stage instead of ResNet-50's 3, 4, 6, 3: the same modules
(every attention at its site, each stage's first block with its downsampling), at a fraction
of the time; its input is 32x32 (``image_size``), for the same reason.
"""

from pathlib import Path

import pytest
import torch

from fermodel import engine
from fermodel.config import ATTENTIONS, TrialConfig
from fermodel.data import make_synthetic
from fermodel.engine import fit, fit_pack
from fermodel.fused import fuse, why_not_fusable
from fermodel.models import BACKBONES, build_model
from fermodel.ops import OpCounter
from fermodel.pack import FusedStep, PackedStep
from fermodel.resnet import ResNet

SMALL = (1, 1, 1, 1)
BASE = dict(
    backbone="resnet50",
    epochs=2,
    batch_size=8,
    synthetic_subjects=6,
    synthetic_images_per_class=1,
    device="cpu",
    tta="none",
    precision="fp64",
    protocol="kfold",
    folds=3,
    checkpoint_every=1,
    image_size=32,
)
LOSSES = ("train_loss", "train_ce", "val_loss")


@pytest.fixture(scope="module")
def data():
    return make_synthetic(num_subjects=6, images_per_class=1, seed=0)


@pytest.fixture
def small_resnet(monkeypatch):
    monkeypatch.setitem(BACKBONES, "resnet50", lambda **kw: ResNet(SMALL, **kw))


def members(attention: str) -> list[TrialConfig]:
    """Three members of one architecture that differ in everything a member may."""
    base = {**BASE, "attention": attention}
    return [
        TrialConfig(**base, seed=0, fold=0, loss="island"),
        TrialConfig(**base, seed=1, fold=1, loss="center", lr=3e-3, weight_decay=1e-4, lam=0.02),
        TrialConfig(
            **base,
            seed=2,
            fold=2,
            loss="island",
            lam1=5.0,
            alpha=0.3,
            optimizer="sgd",
            momentum=0.8,
        ),
    ]


def checkpoints_of(results: dict):
    """A report that keeps every member's checkpointed model and loss state, by epoch."""

    def report(metrics, folder):
        if folder is None:
            return
        for i, m in enumerate(metrics):
            if isinstance(m, dict):
                state = torch.load(Path(folder) / str(i) / "state.pt")
                kept = {
                    k: v
                    for k, v in state["model"].items()
                    if "running" in k or "batches_tracked" in k
                }
                kept.update({f"criterion.{k}": v for k, v in state["criterion"].items()})
                results.setdefault(i, {})[m["epoch"]] = kept

    return report


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b), 1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("attention", list(ATTENTIONS))
def test_a_fused_pack_trains_each_member_as_its_trial_alone(
    data, small_resnet, attention, monkeypatch
):
    configs = members(attention)
    packed_states: dict = {}
    alone_evaluations = []  # the pack validates at once: a member alone only for its test
    own = engine.evaluate
    monkeypatch.setattr(
        engine, "evaluate", lambda *a, **k: alone_evaluations.append(1) or own(*a, **k)
    )
    packed = fit_pack(configs, data, report=checkpoints_of(packed_states))
    monkeypatch.setattr(engine, "evaluate", own)
    assert len(alone_evaluations) == len(configs)
    sizes = {r.split_sizes["train"] for r in packed}
    assert len(sizes) == 1 and sizes.pop() % configs[0].batch_size not in (0, 1)  # a last,
    # smaller batch trains
    for i, (config, result) in enumerate(zip(configs, packed, strict=True)):
        assert any(n.startswith("packed fused: 3 trials") for n in result.notes), result.notes
        alone_states: dict = {}
        alone = fit(
            config,
            data,
            report=lambda m, f, s=alone_states: checkpoints_of(s)(
                [m], None if f is None else str(Path(f).parent)
            ),
        )
        assert len(result.history) == len(alone.history) == 2
        for mine, theirs in zip(result.history, alone.history, strict=True):
            for key in LOSSES:
                assert close(mine[key], theirs[key]), (key, mine[key], theirs[key])
        assert result.best_epoch == alone.best_epoch
        assert result.test_predictions == alone.test_predictions
        assert packed_states[i].keys() == alone_states[0].keys() == {1, 2}
        for epoch, theirs in alone_states[0].items():
            mine = packed_states[i][epoch]
            assert mine.keys() == theirs.keys()
            assert any(k.endswith("centers") for k in mine) == (config.loss != "ce")
            for key, value in theirs.items():  # relative to the tensor's size, as a whole
                a, b = mine[key].double(), value.double()
                assert (a - b).norm() <= 1e-9 * b.norm(), (epoch, key, (a - b).norm(), b.norm())


def test_every_attention_of_the_resnet_family_fuses_and_torchvision_backbones_do_not():
    for attention in ATTENTIONS:
        assert why_not_fusable(build_model("resnet50", attention, 7, 1)) is None, attention
    assert "may mix the members' channels" in why_not_fusable(build_model("vgg16", "none", 7, 1))


@pytest.mark.parametrize("attention", list(ATTENTIONS))
def test_the_fused_network_computes_each_member_and_its_weights_are_views(attention):
    """Forward and backward of the fused network equal each member's own, in float64, with
    channels-last members; a member's weights are views of the fused ones."""
    torch.manual_seed(0)
    nets = [
        ResNet(SMALL, attention, 7, 1).double().to(memory_format=torch.channels_last)
        for _ in range(3)
    ]
    x = torch.randn(3, 4, 1, 48, 48, dtype=torch.float64)
    alone = [net(x[k], return_embedding=True) for k, net in enumerate(nets)]
    fused = fuse(nets)
    side = x.transpose(0, 1).reshape(4, 3, 48, 48).contiguous(memory_format=torch.channels_last)
    logits, emb = fused(side, return_embedding=True)
    for k, (own_logits, own_emb) in enumerate(alone):
        assert torch.allclose(logits.view(4, 3, 7)[:, k], own_logits, rtol=1e-10, atol=1e-12)
        assert torch.allclose(emb.view(4, 3, -1)[:, k], own_emb, rtol=1e-10, atol=1e-12)
    fused_weights = {p.data_ptr() for p in fused.parameters()}
    for net in nets:
        for p in net.parameters():  # a view inside one of the fused tensors
            assert p.untyped_storage().data_ptr() in {
                f.untyped_storage().data_ptr() for f in fused.parameters()
            }
    assert len(fused_weights) == len(list(nets[0].parameters()))


def fused_step_ops(config: TrialConfig, data, k: int) -> int:
    device = torch.device("cpu")
    ms = [engine.make_member(config.replace(seed=s), data, device) for s in range(k)]
    step = engine.make_step(ms, device)
    assert isinstance(step, FusedStep) if k > 1 else True, ms[0].notes
    step.train()
    idx = torch.arange(config.batch_size).repeat(k, 1)
    step(idx)  # the optimisers' state exists from the second step on
    with OpCounter() as ops:
        step(idx)
    assert not ops.host_syncs
    return ops.kernels


PER_MEMBER_OPS = 4  # its augmentation draw and its optimiser's fused step


@pytest.mark.slow
def test_a_fused_step_costs_one_trials_kernels_and_a_few_per_member(data, small_resnet):
    """PSA with Island loss: the fused step's non-view ops grow by at most ``PER_MEMBER_OPS``
    a member, and a pack of 16 issues at most 1.25 times one trial's (bench/gpu.py prints the
    same for PSA-ResNet-50: 1.13 times)."""
    config = TrialConfig(
        **{
            **BASE,
            "attention": "psa",
            "loss": "island",
            "precision": "fp32",
            "batch_size": 2,
            "protocol": "official",
        }
    )
    one, two, four, sixteen = (fused_step_ops(config, data, k) for k in (1, 2, 4, 16))
    assert (sixteen - two) / 14 <= PER_MEMBER_OPS and (four - two) / 2 <= PER_MEMBER_OPS
    assert sixteen <= 1.25 * one, (one, sixteen)


def test_a_fused_pack_that_fails_its_check_takes_vmap_and_says_why(data, small_resnet, monkeypatch):
    def wrong(step, x):
        logits, emb = FUSED_FORWARD(step, x)
        return logits + torch.arange(logits.shape[-1]), emb  # another cross-entropy

    monkeypatch.setattr(FusedStep, "_forward", wrong)
    config = TrialConfig(**{**BASE, "attention": "eca", "protocol": "official"})
    ms = [engine.make_member(config.replace(seed=s), data, torch.device("cpu")) for s in range(2)]
    step = engine.make_step(ms, torch.device("cpu"))
    assert isinstance(step, PackedStep)
    (note,) = [n for n in ms[0].notes if "pack" in n]
    assert note.startswith("packed by vmap (packed fused failed its check: its losses [")


FUSED_FORWARD = FusedStep._forward


def test_an_out_of_memory_in_a_packs_check_is_raised_not_looped(data, small_resnet, monkeypatch):
    def out_of_memory(step, x):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(FusedStep, "_forward", out_of_memory)
    config = TrialConfig(**{**BASE, "attention": "none", "protocol": "official"})
    ms = [engine.make_member(config.replace(seed=s), data, torch.device("cpu")) for s in range(2)]
    before = [p.detach().clone() for p in ms[0].parts.model.parameters()]
    with pytest.raises(torch.cuda.OutOfMemoryError):
        engine.make_step(ms, torch.device("cpu"))
    after = list(ms[0].parts.model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


@pytest.mark.parametrize("tta", ["none", "flip", "tencrop"])
def test_a_fused_pack_is_evaluated_at_once_as_each_member_alone(data, small_resnet, tta):
    """Validation through the fused network (``fermodel.engine._validation`` takes it for fused
    packs): each member's loss, predictions and confusion matrix are those of its own network,
    with every TTA, on its own fold's split."""
    base = {**BASE, "attention": "cbam", "tta": tta, "eval_batch_size": 7}
    configs = [TrialConfig(**base, seed=s, fold=s) for s in range(3)]
    ms = [engine.make_member(c, data, torch.device("cpu")) for c in configs]
    step = engine.make_step(ms, torch.device("cpu"))
    assert isinstance(step, FusedStep)
    step.train()
    step(torch.arange(8).repeat(3, 1))  # trained a step: running statistics of their own
    vals = [m.splits.val for m in ms]
    x, y = torch.stack([v.images for v in vals]), torch.stack([v.labels for v in vals])
    together = engine.evaluate_members(
        step.net, x, y, vals[0].classes, 7, ms[0].parts.autocast, tta
    )
    for m, v, (metrics, cm, pred) in zip(ms, vals, together, strict=True):
        own, own_cm, own_pred = engine.evaluate(
            m.parts.net, v.images, v.labels, v.classes, 7, m.parts.autocast, tta
        )
        # TTA averages float32 probabilities (as a trial alone does, whatever its precision):
        # logits equal to float64's rounding may round apart in float32
        tolerance = 1e-9 if tta == "none" else 1e-6
        assert abs(metrics["loss"] - own["loss"]) <= tolerance * own["loss"], (metrics, own)
        assert torch.equal(pred, own_pred) and torch.equal(cm, own_cm)
