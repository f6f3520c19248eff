"""CUDA graphs' self-check and fallback (fermodel.graphs), run on the CPU with the capture's CPU
twin: a trial that checks its graphs and trains from them trains exactly the steps it would
train eagerly (the check and the warm-up leave no trace); a graph whose replay is wrong, or whose
capture fails, is caught by the check and the trial trains eagerly, saying why. The CUDA capture
itself needs a GPU (bench/gpu.py runs it there)."""

import pytest
import torch
from test_pack import batch_norm_refused_by_vmap

from fermodel import engine, graphs
from fermodel.config import TrialConfig
from fermodel.data import make_synthetic
from fermodel.engine import fit, fit_pack

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
    loss="island",
)


@pytest.fixture(scope="module")
def data():
    return make_synthetic(num_subjects=6, images_per_class=2, seed=0)


def learned(result) -> tuple:
    history = [
        {k: v for k, v in h.items() if k not in ("images_per_second", "epoch_seconds")}
        for h in result.history
    ]
    return history, result.test_predictions, result.best_epoch


class StaleReplay:
    """A wrong graph: it replays the outputs of its first step and trains nothing."""

    def __call__(self, step):
        outputs = step()
        return lambda: outputs


class FailingCapture:
    def __call__(self, step):
        raise RuntimeError("operation not permitted when stream is capturing")


def with_capture(monkeypatch, capture) -> None:
    monkeypatch.setattr(engine, "capture_for", lambda members, device: capture)


@pytest.mark.parametrize(
    "pack, norms",
    [(1, "torch"), (2, "torch"), (2, "plain")],
    ids=["alone", "pack of 2", "pack of 2, plain BatchNorm"],
)
def test_a_checked_graphed_trial_trains_exactly_the_eager_steps(data, monkeypatch, pack, norms):
    """With plain BatchNorms too (a pack where vmap refuses torch's), whose running
    statistics a graph's replay must update as the eager step does."""
    if norms == "plain":
        monkeypatch.setattr(torch.nn.functional, "batch_norm", batch_norm_refused_by_vmap)
    configs = [TrialConfig(**BASE, seed=s) for s in range(pack)]
    eager = fit_pack(configs, data)
    with_capture(monkeypatch, graphs.EagerCapture())
    graphed = fit_pack(configs, data)
    for a, b in zip(graphed, eager, strict=True):
        assert learned(a) == learned(b)
        assert any("trained from CUDA graphs" in note for note in a.notes)
        assert any("plain ops" in note for note in a.notes) == (norms == "plain")


@pytest.mark.parametrize(
    "capture, why",
    [
        (StaleReplay(), "the graph's losses differ from eager ones at step 2"),
        (FailingCapture(), "capturing the step failed (RuntimeError: operation not permitted"),
    ],
)
def test_a_wrong_or_failing_graph_is_caught_and_the_trial_trains_eagerly(
    data, monkeypatch, capture, why
):
    config = TrialConfig(**BASE)
    eager = fit(config, data)
    with_capture(monkeypatch, capture)
    result = fit(config, data)
    assert learned(result) == learned(eager)
    (note,) = [n for n in result.notes if "CUDA graphs" in n]
    assert note.startswith("CUDA graphs off: " + why) and note.endswith("trained eagerly")


def test_graphs_are_used_only_on_cuda_when_asked():
    cpu = TrialConfig(**BASE)
    assert engine.capture_for([], torch.device("cpu")) is None
    assert not cpu.replace(cuda_graphs=False).cuda_graphs  # a place key: identity unchanged
    from search_spaces.study import trial_identity

    assert trial_identity("s", cpu) == trial_identity("s", cpu.replace(cuda_graphs=False))
