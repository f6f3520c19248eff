"""The training engine: selection on validation only, exact resume, divergence, every model."""

import os
import shutil
import time

import numpy as np
import pytest
import torch

from fermodel import ATTENTIONS, LOSS_KINDS, engine
from fermodel.checkpoint import SAME_AS_MODEL, CheckpointError, load_checkpoint, save_checkpoint
from fermodel.config import TrialConfig
from fermodel.data import make_synthetic
from fermodel.engine import TrainingDiverged, fit
from fermodel.metrics import confusion_matrix, summarize

ATTENTION_PARTS = (".attn.", ".merge.", ".conv2.se.")  # each attention's own weights (PSA: its SE)
SMALL = "shufflenet_v2_x0_5"  # the cheapest backbone, where a test checks plumbing, not learning


@pytest.fixture(scope="module")
def tiny():
    return make_synthetic(num_subjects=5, images_per_class=2, seed=0)  # 42 train, 14 val, 14 test


def quick(**changes):
    base = dict(
        epochs=2,
        batch_size=16,
        deterministic=True,
        synthetic_subjects=5,
        synthetic_images_per_class=2,
    )
    return TrialConfig(**{**base, **changes})


def test_metrics_agree_with_scikit_learn():
    from sklearn.metrics import accuracy_score, f1_score, recall_score

    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    p[y == 3] = 3  # one class predicted perfectly
    p[p == 2] = 1  # one class never predicted
    m = summarize(confusion_matrix(torch.tensor(y), torch.tensor(p), 4), ("a", "b", "c", "d"))
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert m["macro_f1"] == pytest.approx(f1_score(y, p, average="macro", zero_division=0))
    recalls = recall_score(y, p, average=None, zero_division=0)
    assert [m[f"recall_{c}"] for c in "abcd"] == pytest.approx(list(recalls))


def test_fit_reports_every_epoch_and_tests_once(tiny):
    reports = []
    result = fit(quick(), tiny, report=lambda m, d: reports.append((m, d)))
    assert [m["epoch"] for m, _ in reports] == [1, 2]
    assert all(d is not None for _, d in reports)  # auto: the first epoch and the last
    for key in (
        "train_loss",
        "val_loss",
        "val_accuracy",
        "val_macro_f1",
        "lr",
        "val_recall_happy",
        "images_per_second",
    ):
        assert key in reports[0][0]
    assert len(result.test_predictions) == len(result.test_labels) == 14
    assert result.test_confusion and sum(map(sum, result.test_confusion)) == 14
    assert result.val["accuracy"] == reports[result.best_epoch - 1][0]["val_accuracy"]


def test_the_test_split_never_influences_selection(tiny):
    scrambled = tiny.subset(np.arange(len(tiny)))
    test = torch.from_numpy(scrambled.split == "test")
    scrambled.images = scrambled.images.clone()
    scrambled.images[test] = 255 - scrambled.images[test]
    scrambled.labels = scrambled.labels.clone()
    scrambled.labels[test] = (scrambled.labels[test] + 3) % 7
    a, b = fit(quick(), tiny), fit(quick(), scrambled)
    assert timeless(a.history) == timeless(b.history)
    assert a.best_epoch == b.best_epoch and a.val == b.val
    assert a.test_labels != b.test_labels


def timeless(history):
    return [{k: v for k, v in h.items() if "second" not in k} for h in history]


def test_resuming_from_a_checkpoint_gives_the_same_run(tiny, tmp_path):
    saved = {}

    def keep(metrics, folder):
        saved[metrics["epoch"]] = shutil.copytree(folder, tmp_path / f"epoch{metrics['epoch']}")

    config = quick(epochs=3, attention="psa", loss="island", checkpoint_every=1)
    straight = fit(config, tiny, report=keep)
    assert sorted(saved) == [1, 2, 3]
    states = {k: load_checkpoint(saved[k]) for k in (1, 2)}
    assert states[1]["epoch"] == 1 and states[1]["config"] == config.to_dict()
    assert "centers" in "".join(states[1]["criterion"])
    # epoch 1 is the best one of its checkpoint, epoch 2 is not the best of its own
    assert [s["best"]["epoch"] for s in states.values()] == [1, 1], "need both cases"
    for k in (1, 2):
        resumed = fit(config, tiny, checkpoint=saved[k])
        assert timeless(resumed.history) == timeless(straight.history)
        assert resumed.test_predictions == straight.test_predictions  # the best model's
        assert resumed.best_epoch == straight.best_epoch
    with pytest.raises(ValueError, match=r"different config \(keys: \['lr'\]\)"):
        fit(config.replace(lr=0.01), tiny, checkpoint=saved[1])

    # and each set of weights is stored once: the best model of epoch 1 is a marker, not a
    # second copy of the model; epoch 2's is epoch 1's weights alone, a state dict of tensors
    current, older = states[1], states[2]
    assert current["best_model"] == SAME_AS_MODEL
    assert older["best_model"].keys() == current["model"].keys()
    for key, weights in older["best_model"].items():
        assert torch.equal(weights, current["model"][key])
    model_bytes = sum(t.numel() * t.element_size() for t in current["model"].values())
    size = {k: (saved[k] / "state.pt").stat().st_size for k in (1, 2)}
    assert size[2] - size[1] == pytest.approx(model_bytes, rel=0.02)
    assert size[1] < 3.05 * model_bytes  # the model and Adam's two moments; the rest is small


@pytest.fixture
def fake_clock(monkeypatch):
    """The checkpoint cadence's clock, moved by the test alone: each epoch's evaluation takes
    30 s, and a report takes what the test's callback adds."""
    now = [0.0]
    monkeypatch.setattr(engine.CheckpointCadence, "clock", staticmethod(lambda: now[0]))
    evaluate = engine.evaluate

    def slow_evaluate(*args, **kwargs):
        now[0] += 30
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(engine, "evaluate", slow_evaluate)
    return now


def small(**changes):
    return quick(backbone=SMALL, attention="none", **changes)


def test_auto_checkpoints_keep_a_slow_upload_near_5_percent_of_the_time(tiny, fake_clock):
    written = []

    def upload(metrics, folder):
        if folder is not None:  # 2 s, then 4 s: the next waits for 19 x that of training
            fake_clock[0] += 2 if not written else 4
            written.append(metrics["epoch"])

    result = fit(small(epochs=7), tiny, report=upload)
    # epoch 1 measures (2 s); 30 s after it ends is < 38 s, 60 s is not: epoch 3 (4 s); then
    # 30 and 60 s are < 76 s, 90 s is not: epoch 6; and the last epoch
    assert written == result.checkpoint_epochs == [1, 3, 6, 7]
    assert result.checkpoint_seconds == 2 + 4 + 4 + 4
    assert len(result.history) == 7


def test_a_real_slow_upload_is_not_repeated_every_epoch(tiny):
    written = []

    def upload(metrics, folder):
        if folder is not None:
            time.sleep(1.0)  # the next checkpoint waits for ~19 s of training
            written.append(metrics["epoch"])

    result = fit(small(epochs=3), tiny, report=upload)
    assert written == result.checkpoint_epochs == [1, 3]
    assert result.checkpoint_seconds >= 2.0


def test_checkpoint_every_n_epochs_and_the_last_whatever_they_cost(tiny, fake_clock):
    written = []

    def upload(metrics, folder):
        if folder is not None:
            fake_clock[0] += 1000
            written.append(metrics["epoch"])

    result = fit(small(epochs=5, checkpoint_every=2), tiny, report=upload)
    assert written == result.checkpoint_epochs == [2, 4, 5]


class Payload:
    pass


def test_checkpoints_are_refused_when_they_need_arbitrary_objects(tmp_path):
    torch.save({"config": {}, "epoch": 1, "x": Payload()}, tmp_path / "state.pt")
    with pytest.raises(CheckpointError, match="refused, it would need unpickling"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint there"):
        load_checkpoint(tmp_path / "elsewhere")


@pytest.mark.parametrize("damage", ["truncated", "one bit flipped in a weight", "a value"])
def test_a_damaged_checkpoint_is_refused_even_when_it_still_unpickles(tmp_path, damage):
    state = {
        "config": {"seed": 0},
        "epoch": 3,
        "history": [{"loss": 0.5}],
        "model": {"w": torch.randn(64, 64), "n": torch.tensor(7)},
        "rng": torch.ByteTensor(32).random_(),
    }
    file = save_checkpoint(tmp_path, state)
    assert load_checkpoint(tmp_path)["model"]["w"].equal(state["model"]["w"])  # intact: read
    data = bytearray(file.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "one bit flipped in a weight":
        weights = state["model"]["w"].numpy().tobytes()
        data[bytes(data).index(weights[:64]) + 1000] ^= 0x01  # inside w's bytes
    else:  # rewritten by something that knows the format, the checksum left as it was
        saved = torch.load(file, weights_only=True)
        saved["epoch"] = 4
        torch.save(saved, file)
        data = bytearray(file.read_bytes())
    file.write_bytes(bytes(data))
    why = "unreadable checkpoint" if damage == "truncated" else "damaged checkpoint .*checksum"
    with pytest.raises(CheckpointError, match=why):
        load_checkpoint(tmp_path)
    torch.save(state, file)  # written before checkpoints had checksums: read unchecked
    assert load_checkpoint(tmp_path)["epoch"] == 3


def test_a_diverging_run_names_epoch_and_step(tiny):
    with pytest.raises(TrainingDiverged, match="non-finite loss at epoch 1, step 1") as err:
        fit(quick(loss="center", lam=1e38), tiny)
    assert (err.value.epoch, err.value.step) == (1, 1)


# each attention once, each loss twice: a loss reads only the pooled embedding, which every
# attention gives alike (tests/test_fused.py trains every attention with Center and Island loss)
PAIRS = [
    ("none", "center"),
    ("se", "ce"),
    ("cbam", "island"),
    ("eca", "center"),
    ("aff", "ce"),
    ("psa", "island"),
]


def test_the_pairs_cover_every_attention_and_every_loss():
    assert sorted(a for a, _ in PAIRS) == sorted(ATTENTIONS)
    assert sorted(loss for _, loss in PAIRS) == sorted(LOSS_KINDS * 2)


@pytest.mark.slow
@pytest.mark.parametrize(("attention", "loss"), PAIRS)
def test_every_attention_trains_with_its_paired_loss(tiny, attention, loss):
    """One epoch moves the attention's own weights, and they change what the model says."""
    from fermodel.models import build_model

    config = quick(epochs=1, batch_size=42, attention=attention, loss=loss)
    torch.manual_seed(config.seed)  # as fit builds its model: the seed first
    initial = build_model("resnet50", attention, 7, 1).state_dict()
    result = fit(config, tiny)
    assert np.isfinite(result.history[0]["train_loss"])
    trained = result.model_state
    own = [
        k
        for k, v in trained.items()
        if any(part in k for part in ATTENTION_PARTS) and v.is_floating_point()
    ]
    if attention == "none":
        assert own == []
        return
    assert own and all(torch.isfinite(trained[k]).all() for k in own)
    assert any(not torch.equal(trained[k], initial[k]) for k in own)  # the gradient reached them
    model = build_model("resnet50", attention, 7, 1)
    model.load_state_dict(trained)
    model.eval()
    x = torch.randn(4, 1, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(x)
        for name, weight in model.named_parameters():
            if name in own:
                weight.mul_(-1.0)  # the attention as trained, turned around
        after = model(x)
    assert not torch.allclose(before, after)  # the attention is in the path to the output


def test_image_size_upsamples_every_batch_on_the_device(tiny):
    from fermodel.augment import AugmentConfig
    from fermodel.engine import build_parts, train_step

    config = quick(image_size=64, backbone=SMALL, attention="none")
    parts = build_parts(config, 7, torch.device("cpu"))
    seen = []
    parts.model.conv1.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    train_step(
        parts, tiny.images[:8], tiny.labels[:8], AugmentConfig(), torch.Generator().manual_seed(0)
    )
    assert seen == [(8, 1, 64, 64)]
    assert fit(quick(epochs=1, image_size=64, backbone=SMALL, attention="none"), tiny).test


def test_an_rgb_stem_sees_the_gray_image_on_each_channel(tiny):
    config = quick(in_chans=3, backbone=SMALL, attention="none", epochs=1)
    result = fit(config, tiny)
    assert len(result.test_predictions) == 14
    parts = engine.build_parts(config, 7, torch.device("cpu"))
    parts.net.eval()
    gray = torch.rand(4, 1, 48, 48)
    normalized = (gray - engine.MEAN) / engine.STD
    with torch.no_grad():
        expected = parts.model(normalized.repeat(1, 3, 1, 1))
        assert torch.allclose(parts.net(gray), expected, atol=1e-6)


def test_the_test_images_carry_their_subjects_for_clustered_statistics(tiny):
    result = fit(quick(epochs=1, backbone=SMALL, attention="none"), tiny)
    test = tiny.subset(np.flatnonzero(tiny.split == "test"))
    assert result.test_groups == [str(s) for s in test.subjects]  # held-out subjects


def test_validation_judges_the_same_predictor_as_the_test(tiny, monkeypatch):
    calls = []
    evaluate = engine.evaluate

    def recording(*args, **kwargs):
        calls.append(args[6] if len(args) > 6 else kwargs.get("tta", "none"))
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(engine, "evaluate", recording)
    fit(quick(epochs=2, tta="flip", backbone=SMALL, attention="none"), tiny)
    assert calls == ["flip", "flip", "flip"]  # two validations and the test


def test_with_drop_leaked_a_trial_reports_the_whole_test_split_beside_the_deduplicated(tiny):
    """Two test images are copies of training images: the trial is tested without them, and on
    the whole test split too (FER2013's full PrivateTest, the field's figure)."""
    leaky = tiny.subset(np.arange(len(tiny)))
    train, test = np.flatnonzero(leaky.split == "train"), np.flatnonzero(leaky.split == "test")
    leaky.images = leaky.images.clone()
    leaky.images[test[:2]] = leaky.images[train[:2]]
    result = fit(quick(drop_leaked=True, tta="none"), leaky)
    assert len(result.test_ids) == 12 and result.split_sizes["test"] == 12
    assert result.split_sizes == {"train": 42, "val": 14, "test": 12}
    # the whole split: the same selected model on the 12 and on the 2 copies
    config = quick(drop_leaked=True, tta="none")
    parts = engine.build_parts(config, len(leaky.classes), torch.device("cpu"))
    parts.model.load_state_dict(result.model_state)
    copies = leaky.subset(test[:2])
    _, _, predicted = engine.evaluate(
        parts.net, copies.images, copies.labels, leaky.classes, 256, parts.autocast
    )
    right = sum(p == y for p, y in zip(result.test_predictions, result.test_labels, strict=True))
    right += int((predicted == copies.labels).sum())
    assert result.test_full["accuracy"] == pytest.approx(right / 14)
    assert set(result.test_full) >= {"accuracy", "macro_f1"}
    # without drop_leaked there is nothing beside
    assert fit(quick(), leaky).test_full is None


@pytest.mark.parametrize(
    ("precision", "device", "capability", "expected"),
    [
        ("auto", "cpu", None, False),
        ("auto", "cuda", (7, 0), False),
        ("auto", "cuda", (7, 5), False),
        ("auto", "cuda", (8, 0), True),
        ("auto", "cuda", (9, 0), True),
        ("bf16", "cpu", None, True),
        ("fp32", "cuda", (9, 0), False),
    ],
)
def test_auto_precision_takes_bf16_only_where_tensor_cores_have_it(
    monkeypatch, precision, device, capability, expected
):
    from fermodel.engine import uses_bf16

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
    assert uses_bf16(precision, torch.device(device)) is expected


def test_a_deterministic_trial_fixes_the_cublas_workspace(tiny, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    fit(small(epochs=1), tiny)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_a_checkpoint_written_on_cuda_resumes_on_the_cpu_and_says_what_changed(tiny, tmp_path):
    saved = {}

    def keep(metrics, folder):
        saved[metrics["epoch"]] = shutil.copytree(folder, tmp_path / f"epoch{metrics['epoch']}")

    config = small(epochs=2, checkpoint_every=1)
    straight = fit(config, tiny, report=keep)
    # what a CUDA trial writes: device "cuda" and its Philox generator's 16-byte state
    state = load_checkpoint(saved[1])
    state["config"]["device"] = "cuda"
    state["augment_rng"] = torch.zeros(16, dtype=torch.uint8)
    save_checkpoint(tmp_path / "from-cuda", state)
    resumed = fit(config, tiny, checkpoint=tmp_path / "from-cuda")
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    assert resumed.history[0] == straight.history[0]  # epoch 1 is the checkpoint's
    assert any("written on another device type" in note for note in resumed.notes)
    assert not any("device type" in note for note in straight.notes)


@pytest.mark.slow
def test_every_trial_in_a_reused_process_compiles_afresh(monkeypatch):
    """A reused Ray actor trains trial after trial: each compiled model must be compiled, not
    run eagerly because earlier trials used up dynamo's recompile limit (the attention variants
    share one bottleneck ``forward``). Dynamo's eager backend: tracing, not code generation."""
    import functools

    import torch._dynamo
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 2)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    counters.clear()
    x = torch.rand(2, 1, 48, 48)
    for attention in ("se", "eca", "cbam"):  # a third variant would pass the limit of 2
        config = TrialConfig(attention=attention, compile=True, device="cpu")
        engine.build_parts(config, 7, torch.device("cpu")).step_net(x)
        assert counters["frames"]["ok"] == counters["frames"]["total"], dict(counters["frames"])
    assert counters["frames"]["total"] == 3
    torch._dynamo.reset()
