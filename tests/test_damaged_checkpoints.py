"""A damaged checkpoint costs its epochs, never the trial: a study interrupted after each of its
trials had checkpointed twice, then a seeded schedule of damage (truncated, bytes flipped, its
file deleted) to the newest checkpoint of one trial and to every checkpoint of the other, each
continued by the same command with one or two trials at a time. Real Ray (the session's
cluster), a real MLflow store, real signals to a real driver."""

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import once_per_run
from mlflow.tracking import MlflowClient

from orchestrate.ablation import main

pytestmark = pytest.mark.slow

STUDY = """
name = "damage"
kind = "grid"
[run]
dataset = "synthetic"
[defaults]
backbone = "shufflenet_v2_x0_5"
attention = "none"
[[cells]]
name = "newest"
loss = "ce"
[[cells]]
name = "every"
loss = "island"
[presets.tiny]
epochs = 6
batch_size = 8
image_size = 32
tta = "none"
synthetic_subjects = 6
synthetic_images_per_class = 2
checkpoint_every = 1
"""
DAMAGE = ("truncated", "bytes flipped", "file deleted")
EPOCHS = 6


def schedule(seed: int = 27) -> list[tuple[str, str, int]]:
    """Two draws of (damage to the newest checkpoint of one trial, damage to every checkpoint
    of the other, trials at a time): every damage and both concurrencies among them."""
    rng = random.Random(seed)
    while True:
        drawn = [(rng.choice(DAMAGE), rng.choice(DAMAGE), c) for c in (1, 2)]
        if {d for a, b, _ in drawn for d in (a, b)} == set(DAMAGE):
            return drawn


def command(folder: Path, concurrency: int) -> list[str]:
    return [
        "--study",
        str(folder / "damage.toml"),
        "--preset",
        "tiny",
        "--storage",
        str(folder / "ray"),
        "--tracking-uri",
        f"sqlite:///{folder / 'mlflow.db'}",
        "--max-concurrent",
        str(concurrency),
        "--no-log-checkpoints",
    ]


def runs(folder: Path):
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    exp = client.get_experiment_by_name("damage")
    return client, client.search_runs([exp.experiment_id], "tags.study_parent = 'false'")


@pytest.fixture(scope="session")
def interrupted(ray_cluster, tmp_path_factory):
    """A folder where both trials checkpointed at least twice before a SIGINT stopped them (its
    driver a process of its own, on the tests' Ray: it starts faster)."""
    import ray

    def make() -> str:
        folder = tmp_path_factory.mktemp("interrupted")
        (folder / "damage.toml").write_text(STUDY)
        address = ["--address", ray.get_runtime_context().gcs_address]
        driver = subprocess.Popen(
            [sys.executable, "-m", "orchestrate.ablation", *command(folder, 2), *address],
            cwd=folder,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.time() + 300
        while time.time() < deadline and driver.poll() is None:
            found = [
                json.loads(f.read_text())["checkpoints"]
                for f in (folder / "ray" / "checkpoints").glob("*.json")
            ]
            if len(found) == 2 and all(len(e) >= 2 for e in found):
                break
            time.sleep(0.1)
        driver.send_signal(signal.SIGINT)
        output = driver.communicate(timeout=120)[0].decode()
        assert driver.returncode == 130, output
        return str(folder)

    return Path(once_per_run(tmp_path_factory, "damaged-checkpoints-base", make))


def damage(checkpoint: Path, how: str) -> None:
    state = checkpoint / "state.pt"
    if how == "truncated":
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    elif how == "bytes flipped":  # in the weights: it still unpickles
        data = bytearray(state.read_bytes())
        for at in range(len(data) // 2, len(data) // 2 + 64):
            data[at] ^= 0xFF
        state.write_bytes(bytes(data))
    else:
        state.unlink()


@pytest.mark.parametrize("newest, every, concurrency", schedule())
def test_a_damaged_checkpoint_is_named_skipped_and_never_tried_again(
    interrupted, tmp_path, newest, every, concurrency, monkeypatch, capsys
):
    folder = tmp_path / "study"
    shutil.copytree(interrupted, folder)
    for file in (folder / "ray" / "checkpoints").glob("*.json"):  # the index, moved with it
        file.write_text(file.read_text().replace(str(interrupted), str(folder)))
    client, before = runs(folder)
    cell_of = {r.data.tags["trial_identity"]: r.data.tags["cell"] for r in before}
    indexed = {
        cell_of[k]: [(e["path"], e["epoch"]) for e in v]
        for k, v in (
            (f.stem, json.loads(f.read_text())["checkpoints"])
            for f in (folder / "ray" / "checkpoints").glob("*.json")
        )
    }
    existing = {
        cell: [(p, e) for p, e in entries if Path(p).is_dir()] for cell, entries in indexed.items()
    }
    assert all(len(v) >= 2 for v in existing.values()), existing
    damaged = {"newest": [existing["newest"][0]], "every": existing["every"]}
    for cell, how in (("newest", newest), ("every", every)):
        for path, _ in damaged[cell]:
            damage(Path(path), how)

    monkeypatch.chdir(folder)
    assert main(command(folder, concurrency)) == 0
    out = capsys.readouterr().out
    client, after = runs(folder)
    finished = [r for r in after if r.info.status == "FINISHED"]
    assert sorted(r.data.tags["cell"] for r in finished) == ["every", "newest"]  # once each
    assert "RUNNING" not in {r.info.status for r in after}
    resumed = {"newest": existing["newest"][1][1], "every": 0}  # the older one; from scratch
    for run in finished:
        cell = run.data.tags["cell"]
        assert int(run.data.tags["continues_after_epoch"]) == resumed[cell]
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))  # each epoch once
        for path, _ in damaged[cell]:  # named in the run's notes and in the study's output
            assert path in run.data.tags["notes"]
            assert path in out
        went = (
            f"continued after epoch {resumed[cell]}"
            if resumed[cell]
            else "started over (no intact checkpoint)"
        )
        assert f"{run.data.tags['cell']} seed 0 fold 0: damaged checkpoint(s) skipped: " in out
        assert went in run.data.tags["notes"]
    # the damaged files are out of the index: nothing will try them again
    paths = {
        e["path"]
        for f in (folder / "ray" / "checkpoints").glob("*.json")
        for e in json.loads(f.read_text())["checkpoints"]
    }
    assert not paths & {p for entries in damaged.values() for p, _ in entries}
