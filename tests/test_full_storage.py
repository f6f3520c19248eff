"""A storage that fills mid-study is one clear stop, and the same command finishes the study once
space is freed: the storage is a small tmpfs in the study's own mount namespace (``unshare``),
filled by the test once a trial has checkpointed, emptied again between the two invocations."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

STUDY = """
name = "fills"
kind = "grid"
[run]
dataset = "synthetic"
[defaults]
backbone = "shufflenet_v2_x0_5"
attention = "none"
[[cells]]
name = "a"
loss = "ce"
[[cells]]
name = "b"
loss = "center"
[presets.tiny]
epochs = 3
batch_size = 8
image_size = 32
tta = "none"
synthetic_subjects = 6
synthetic_images_per_class = 2
checkpoint_every = 1
"""
# two invocations of one command in one mount namespace, whose storage is a 64 MB tmpfs; the
# second starts once the test has freed the space (the file "freed")
SCRIPT = """
mount -t tmpfs -o size=64m tmpfs "$STORE"
"$@" > first.out 2> first.err; echo $? > first.rc
while [ ! -f freed ]; do sleep 0.2; done
"$@" > second.out 2> second.err; echo $? > second.rc
"""


def test_a_storage_that_fills_stops_the_study_in_one_line_and_the_same_command_finishes_it(
    tmp_path,
):
    (tmp_path / "fills.toml").write_text(STUDY)
    store = tmp_path / "store"
    store.mkdir()
    db = tmp_path / "m.db"
    command = [
        sys.executable,
        "-m",
        "orchestrate.ablation",
        "--study",
        "fills.toml",
        "--preset",
        "tiny",
        "--storage",
        str(store / "ray"),
        "--tracking-uri",
        f"sqlite:///{db}",
        "--max-concurrent",
        "1",
        "--no-log-checkpoints",
    ]
    shell = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", SCRIPT, "sh", *command],
        cwd=tmp_path,
        env={**os.environ, "STORE": str(store)},
    )
    view = Path(f"/proc/{shell.pid}/root") / str(store).lstrip("/")  # the study's own view
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not list((view / "ray" / "checkpoints").glob("*.json")):
            assert shell.poll() is None and not (tmp_path / "first.rc").exists()
            time.sleep(0.1)
        with open(view / "filler", "wb") as filler:  # the disk fills up: every byte left
            try:
                while True:
                    filler.write(b"\0" * 2**20)
                    filler.flush()
            except OSError:
                pass
        while not (tmp_path / "first.rc").exists() and time.time() < deadline:
            time.sleep(0.2)
        first = (tmp_path / "first.err").read_text()
        assert (tmp_path / "first.rc").read_text().strip() == "4", first
        # one message: which storage is full and what to do; no traceback, nothing RUNNING
        assert first == (
            f"error: --storage {store / 'ray'} is full (No space left on device): "
            "the study stopped, its runs are closed and its trials keep their last "
            "intact checkpoints. Free space there and run the same command: it "
            "continues them (exit 4)\n"
        )
        assert "Traceback" not in (tmp_path / "first.out").read_text()
        assert "report: reports/" in (tmp_path / "first.out").read_text()
        client = MlflowClient(f"sqlite:///{db}")
        experiment = client.get_experiment_by_name("fills").experiment_id
        assert "RUNNING" not in {r.info.status for r in client.search_runs([experiment])}

        (view / "filler").unlink()  # space freed
        (tmp_path / "freed").touch()
        assert shell.wait(timeout=300) == 0
    finally:
        if shell.poll() is None:
            shell.kill()
    second = (tmp_path / "second.out").read_text()
    assert (tmp_path / "second.rc").read_text().strip() == "0", (
        second + (tmp_path / "second.err").read_text()
    )
    children = client.search_runs([experiment], "tags.study_parent = 'false'")
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert sorted(r.data.tags["cell"] for r in finished) == ["a", "b"]  # each trial once
    assert "RUNNING" not in {r.info.status for r in children}
    for run in finished:  # every epoch once, continued or not
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
        assert sorted(steps) == [1, 2, 3]
    # the checkpoint written before the disk filled was kept, and continued from
    assert "1 to run, 1 to continue, 0 finished before (skipped)" in second
