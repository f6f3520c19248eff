"""The CUDA path on a real GPU: what tests/test_graphs.py and tests/test_pack.py check on the CPU
through the capture's CPU twin, here with real CUDA graphs, real packs on the device, and CUDA's
own detector of host syncs. These tests run only where a GPU is present (CI has none; a session
lent one runs them with bench/device_check.sh)."""

import math

import pytest
import torch
from test_pack import assert_same_trial

from fermodel import engine
from fermodel.config import TrialConfig
from fermodel.data import make_synthetic
from fermodel.engine import fit, fit_pack

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# the paper's model; fp64 where a test compares two ways of training the same steps, since
# training amplifies float32's rounding differences between kernels (tests/test_pack.py)
BASE = dict(
    backbone="resnet50",
    attention="psa",
    epochs=2,
    batch_size=16,
    synthetic_subjects=6,
    synthetic_images_per_class=2,
    device="cuda",
    tta="none",
    loss="island",
)


@pytest.fixture(scope="module")
def data():
    return make_synthetic(num_subjects=6, images_per_class=2, seed=0)


def graphs_note(result) -> str:
    (note,) = [n for n in result.notes if "CUDA graphs" in n]
    return note


def test_a_trial_as_users_run_it_checks_its_graphs_and_trains_from_them(data):
    """Default precision (bf16 autocast on this GPU), channels_last, the Island loss."""
    result = fit(TrialConfig(**BASE), data)
    assert graphs_note(result).startswith("trained from CUDA graphs"), result.notes
    assert all(math.isfinite(h["train_loss"]) for h in result.history)


@pytest.mark.parametrize("route", ["fused", "vmap"])
@pytest.mark.parametrize("precision", ["auto", "fp32"])
def test_a_pack_checks_itself_and_its_graphs_and_trains(data, precision, route, monkeypatch):
    """A pack runs packed in both precisions, from checked graphs, fused (the ResNet family's
    route) and by vmap (its fallback). In bf16 ("auto" here) torch 2.11 on an H200 refused
    vmap's batch norm (fermodel.pack), so a vmap pack may use BatchNorm in plain ops, saying
    so; no pack may fall back to its members one after another."""
    from fermodel import pack

    monkeypatch.setattr(pack, "FUSION", route == "fused")
    results = fit_pack([TrialConfig(**BASE, seed=s, precision=precision) for s in range(2)], data)
    for result in results:
        assert graphs_note(result).startswith("trained from CUDA graphs"), result.notes
        assert all(math.isfinite(h["train_loss"]) for h in result.history)
    how = [n for n in results[0].notes if n.startswith(pack.PACK_NOTES)]
    print(precision, route, how)  # what this GPU and torch did, in the test's output (-s)
    assert len(how) == 1 and not how[0].startswith(pack.PACKING_OFF_NOTE), how
    assert how[0].startswith(pack.FUSED_NOTE if route == "fused" else pack.VMAP_NOTE), how


# the smaller network for two epochs; the paper's for one: a ResNet-50 trained from scratch on
# 56 images is chaotic (weights scaled by 1 + 1e-12 move its loss by 1% at epoch 2, CPU or GPU)
@pytest.mark.parametrize(
    "model",
    [dict(backbone="shufflenet_v2_x0_5", attention="none"), dict(epochs=1)],
    ids=["shufflenet", "psa-resnet50"],
)
@pytest.mark.parametrize("pack", [1, 3], ids=["alone", "pack of 3"])
def test_graphed_trials_train_the_steps_each_trains_alone_eagerly(data, pack, model):
    """In fp64. Members differ in seed, loss and learning rate; each is compared with itself
    trained alone without graphs."""
    changes = [
        dict(seed=0, loss="ce"),
        dict(seed=1, loss="center"),
        dict(seed=2, loss="island", lr=3e-3),
    ][:pack]
    configs = [TrialConfig(**{**BASE, "precision": "fp64", **model, **c}) for c in changes]
    graphed = fit_pack(configs, data)
    for config, result in zip(configs, graphed, strict=True):
        assert graphs_note(result).startswith("trained from CUDA graphs"), result.notes
        assert not [n for n in result.notes if n.startswith("packing off")]
        alone = fit(config.replace(cuda_graphs=False), data)
        assert_same_trial(result, alone, agreeing=0.9)  # GPU rounding may flip 1 of 14 images


@pytest.mark.parametrize("packed", [False, True], ids=["alone", "packed"])
def test_an_eager_cuda_step_never_waits_for_the_device(data, packed):
    """CUDA's sync debug mode raises on any op that waits for the device (an ``.item()``, a
    data-dependent shape, a copy to the host): none runs in a training step."""
    precision = "fp32" if packed else "auto"
    config = TrialConfig(**{**BASE, "cuda_graphs": False, "epochs": 1, "precision": precision})
    device = torch.device("cuda")
    members = [
        engine.make_member(config.replace(seed=s), data, device) for s in range(2 if packed else 1)
    ]
    step = engine.make_step(members, device)
    step.train()
    idx = torch.arange(16, device=device).repeat(len(members), 1)
    step(idx)  # the optimiser's state exists from here on
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        logits, *_ = step(idx)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert logits.shape == (len(members), 16, 7)
