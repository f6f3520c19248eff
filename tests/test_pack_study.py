"""A packed grid study through `python -m orchestrate.ablation --pack K`: one Tune trial trains
the pack, and everywhere else each member is a trial: its own MLflow run with its metrics,
artifacts and model, its own row in the report, which equals the study's trials trained
alone (an unpacked study's trials: packs of one); stopped mid-study and invoked again, every
member continues from the pack's checkpoint. Real Ray (the
session's local cluster, and the stopped driver's own), a real MLflow store, real signals."""

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrate.ablation import main

pytestmark = pytest.mark.slow

STUDY = """
name = "packed"
kind = "grid"
reference = "a"
[run]
dataset = "synthetic"
[defaults]
backbone = "shufflenet_v2_x0_5"
attention = "none"
channels_last = false  # packs run without it: the unpacked twin must too, to compare
precision = "fp64"  # float32's rounding differs between kernels (tests/test_pack.py)
[[cells]]
name = "a"
loss = "ce"
[[cells]]
name = "b"
loss = "island"
[[cells]]
name = "c"
loss = "center"
lr = 0.003
[presets.tiny]
epochs = 3
batch_size = 16
synthetic_subjects = 10
synthetic_images_per_class = 2
checkpoint_every = 100
"""


def command(folder: Path, *extra: str) -> list[str]:
    return [
        "--study",
        str(folder / "packed.toml"),
        "--preset",
        "tiny",
        "--storage",
        str(folder / "ray"),
        "--tracking-uri",
        f"sqlite:///{folder}/m.db",
        *extra,
    ]


def children(folder: Path) -> tuple[MlflowClient, list]:
    client = MlflowClient(f"sqlite:///{folder}/m.db")
    exp = client.get_experiment_by_name("packed") if (folder / "m.db").exists() else None
    if exp is None:
        return client, []
    return client, client.search_runs([exp.experiment_id], "tags.study_parent = 'false'")


def finished(folder: Path) -> dict:
    """Per cell: its FINISHED run's epoch losses, test accuracy and predictions."""
    client, runs = children(folder)
    out = {}
    for run in runs:
        if run.info.status != "FINISHED":
            continue
        cell = run.data.tags["cell"]
        assert cell not in out, f"two FINISHED runs of {cell}"
        history = {
            key: [
                m.value
                for m in sorted(
                    client.get_metric_history(run.info.run_id, key), key=lambda m: m.step
                )
            ]
            for key in ("train_loss", "val_loss")
        }
        path = client.download_artifacts(run.info.run_id, "predictions.json", str(folder))
        predictions = json.loads(Path(path).read_text())["predictions"]
        out[cell] = (history, run.data.metrics["test_accuracy"], predictions, run)
    return out


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory):
    """Each trial of the study alone, as an unpacked study trains it (``fit``, a pack of one):
    its epoch losses, test accuracy and predictions, by cell."""
    from fermodel.engine import fit, load_trial_data
    from search_spaces import load_study

    folder = tmp_path_factory.mktemp("unpacked")
    (folder / "packed.toml").write_text(STUDY)
    out = {}
    for spec in load_study(folder / "packed.toml").trials("tiny"):
        result = fit(spec.config, load_trial_data(spec.config))
        history = {key: [h[key] for h in result.history] for key in ("train_loss", "val_loss")}
        out[spec.cell] = (history, result.test["accuracy"], result.test_predictions, None)
    return out


def test_a_packed_study_stopped_and_continued_is_its_trials_alone(
    unpacked, tmp_path, monkeypatch, capsys
):
    """Stopped by Ctrl-C after an epoch, continued by the same command: every member continues
    from the pack's checkpoint, and ends as its own trial (run, artifacts, model, report row)
    with the unpacked study's numbers."""
    (tmp_path / "packed.toml").write_text(STUDY)
    cmd = [
        sys.executable,
        "-m",
        "orchestrate.ablation",
        *command(tmp_path, "--pack", "3", "--no-log-checkpoints"),
    ]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )

    def trained_one_epoch() -> bool:
        client, runs = children(tmp_path)
        return len(runs) == 3 and all(
            client.get_metric_history(r.info.run_id, "val_accuracy") for r in runs
        )

    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not trained_one_epoch():
        time.sleep(0.3)
    assert proc.poll() is None, proc.communicate()[0].decode()
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 130, output
    assert "started a pack: a seed 0 fold 0, b seed 0 fold 0, c seed 0 fold 0" in output
    _, stopped = children(tmp_path)
    assert {r.info.status for r in stopped} == {"KILLED"}
    assert len({r.data.tags["ray_trial_id"] for r in stopped}) == 1  # one Tune trial

    monkeypatch.chdir(tmp_path)
    assert main(command(tmp_path, "--pack", "3")) == 0  # this time logging the models
    out = capsys.readouterr().out
    assert "0 to run, 3 to continue" in out
    runs = finished(tmp_path)
    assert sorted(runs) == ["a", "b", "c"]
    client, _ = children(tmp_path)
    earlier = {r.data.tags["cell"]: r for r in stopped}
    for cell, (history, _, predictions, run) in runs.items():
        assert run.data.tags["continues_run"] == earlier[cell].info.run_id
        assert int(run.data.tags["continues_after_epoch"]) >= 1
        assert run.data.tags["pack_size"] == "3"
        # its notes say how it ran: on the synthetic set, packed (no "packing off")
        assert run.data.tags["notes"].startswith("synthetic: ")
        assert "packing off" not in run.data.tags["notes"]
        alone_history, _, alone_predictions, _ = unpacked[cell]
        for key, values in history.items():
            assert len(values) == 3  # each epoch once
            for mine, theirs in zip(values, alone_history[key], strict=True):
                assert math.isclose(mine, theirs, rel_tol=1e-4), (cell, key, values)
        same = sum(a == b for a, b in zip(predictions, alone_predictions, strict=True))
        assert same >= 0.99 * len(predictions)
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"predictions.json", "confusion_matrix.png", "curves.png"} <= names
    # each member's selected model, logged from its own run
    experiment = client.get_experiment_by_name("packed").experiment_id
    logged = client.search_logged_models([experiment])
    assert sorted(m.source_run_id for m in logged) == sorted(
        r.info.run_id for *_, r in runs.values()
    )
    # the report: one row per trial, the unpacked study's numbers
    rows = {ln.split()[0]: ln.split() for ln in out.splitlines() if ln[:2] in ("a ", "b ", "c ")}
    assert sorted(rows) == ["a", "b", "c"]
    for cell, row in rows.items():
        assert row[1] == "1" and float(row[2]) == pytest.approx(100 * unpacked[cell][1], abs=0.01)
