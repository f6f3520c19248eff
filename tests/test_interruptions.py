"""A study is never lost, however it is stopped: a fixed set of interruption schedules (seeded
draws over the signal, whom it reaches, the moment and the concurrency), each followed by a plain
re-invocation of the same command. Every schedule must end with each trial identity holding
exactly one FINISHED run and none RUNNING, no epoch trained twice past its last checkpoint, and
the same test predictions, bit for bit, as an uninterrupted run of the study (CPU, deterministic
kernels). The stopped drivers are real processes in their own sessions with a private Ray,
stopped by real signals; the re-invocation and the reference run in this process."""

import contextlib
import io
import json
import os
import random
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
name = "stops"
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
loss = "island"
[[cells]]
name = "c"
loss = "center"
[presets.tiny]
epochs = 3
batch_size = 8
image_size = 32
tta = "none"
synthetic_subjects = 8
synthetic_images_per_class = 2
deterministic = true
checkpoint_every = 100
"""
# checkpoint_every = 100: only the last epoch is checkpointed on its own, so any earlier
# checkpoint is one a signal asked for at the end of the running epoch
SIGNALS = ("SIGINT to the driver", "SIGINT to the process group", "SIGTERM", "SIGKILL")
MOMENTS = ("before any checkpoint", "mid-study", "after a trial finished")
EXIT = {
    "SIGINT to the driver": 130,
    "SIGINT to the process group": 130,
    "SIGTERM": 143,
    "SIGKILL": -9,
}


def schedules(seed: int = 2026) -> list[tuple[str, str, int]]:
    """One (signal, moment, trials at a time) draw per signal, drawn again until every moment
    and both concurrencies are among them."""
    rng = random.Random(seed)
    while True:
        drawn = [(s, rng.choice(MOMENTS), rng.choice((1, 2))) for s in SIGNALS]
        if {m for _, m, _ in drawn} == set(MOMENTS) and {c for *_, c in drawn} == {1, 2}:
            return drawn


def command(folder: Path, concurrency: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "orchestrate.ablation",
        "--study",
        str(folder / "stops.toml"),
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


def children(folder: Path) -> tuple[MlflowClient, list]:
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    exp = client.get_experiment_by_name("stops") if (folder / "mlflow.db").exists() else None
    if exp is None:
        return client, []
    return client, client.search_runs([exp.experiment_id], "tags.study_parent = 'false'")


def reached(folder: Path, moment: str) -> bool:
    client, runs = children(folder)
    running = [r for r in runs if r.info.status == "RUNNING"]
    if moment == "before any checkpoint":
        return bool(running)
    if moment == "mid-study":
        return any(client.get_metric_history(r.info.run_id, "val_accuracy") for r in running)
    return any(r.info.status == "FINISHED" for r in runs) and bool(running)


def predictions(folder: Path) -> dict[str, list]:
    """Per identity: its FINISHED run's test accuracy and predictions (as JSON holds them)."""
    client, runs = children(folder)
    out = {}
    for run in runs:
        if run.info.status == "FINISHED":
            path = client.download_artifacts(run.info.run_id, "predictions.json", str(folder))
            body = json.loads(Path(path).read_text())
            identity = run.data.tags["trial_identity"]
            assert identity not in out, f"two FINISHED runs of {identity}"
            out[identity] = [run.data.metrics["test_accuracy"], body["predictions"]]
    return out


@pytest.fixture(scope="session")
def reference(ray_cluster, tmp_path_factory):
    """The uninterrupted study's predictions, run once for the schedules on every worker."""

    def run() -> dict:
        folder = tmp_path_factory.mktemp("uninterrupted")
        (folder / "stops.toml").write_text(STUDY)
        with (
            pytest.MonkeyPatch.context() as patch,
            contextlib.redirect_stdout(io.StringIO()) as out,
        ):
            patch.chdir(folder)
            assert main(command(folder, 2)[3:]) == 0, out.getvalue()
        result = predictions(folder)
        assert len(result) == 3
        return result

    return once_per_run(tmp_path_factory, "interruption-reference", run)


@pytest.mark.parametrize("how, moment, concurrency", schedules())
def test_a_stopped_study_continues_to_the_uninterrupted_result(
    reference, tmp_path, how, moment, concurrency, monkeypatch, capsys
):
    (tmp_path / "stops.toml").write_text(STUDY)
    cmd = command(tmp_path, concurrency)
    # its own session: a signal to "the process group" reaches the driver and Ray's processes,
    # as a terminal's Ctrl-C does, and nothing of the test's
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not reached(tmp_path, moment):
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0].decode()
    if how == "SIGINT to the process group":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(
            {
                "SIGINT to the driver": signal.SIGINT,
                "SIGTERM": signal.SIGTERM,
                "SIGKILL": signal.SIGKILL,
            }[how]
        )
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == EXIT[how], output
    assert "SIGTERM received" not in output and "Traceback" not in output
    _, stopped = children(tmp_path)
    if how != "SIGKILL":  # every open run closed; a killed driver can close nothing
        assert "RUNNING" not in {r.info.status for r in stopped}, output
        hint = output.splitlines()
        again = hint[hint.index(next(ln for ln in hint if "Continue with:" in ln)) + 1]
        assert again.strip() == "python -m orchestrate.ablation " + " ".join(cmd[3:])
    last_epoch = {r.data.tags["trial_identity"]: r for r in stopped if r.info.status != "FINISHED"}

    # the same command again (in this process, on the session's Ray: it starts faster)
    monkeypatch.chdir(tmp_path)
    assert main(cmd[3:]) == 0, capsys.readouterr()
    client, runs = children(tmp_path)
    assert "RUNNING" not in {r.info.status for r in runs}
    assert predictions(tmp_path) == reference  # one FINISHED run per identity, the same result
    for run in runs:
        if run.info.status != "FINISHED":
            continue
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
        assert sorted(steps) == [1, 2, 3], steps  # the whole trial, each epoch once
        earlier = last_epoch.get(run.data.tags["trial_identity"])
        if earlier is None:
            continue  # finished before the signal
        trained = len(client.get_metric_history(earlier.info.run_id, "val_accuracy"))
        resumed_after = int(run.data.tags.get("continues_after_epoch", 0))
        if how != "SIGKILL" and trained:
            # a graceful stop checkpoints the epoch it was in: nothing trained before is lost
            assert run.data.tags.get("continues_run") == earlier.info.run_id, output
            assert resumed_after >= trained, (trained, resumed_after)


@pytest.mark.parametrize("late", [False, True], ids=["started before", "started after"])
def test_the_stop_waits_for_every_trial_that_started_to_checkpoint(tmp_path, capsys, late):
    """Tune may have launched a trial before the signal and report its start after it: that
    trial checkpoints at the end of its first epoch too, and the stop waits for it (a schedule
    above once lost such a trial's first epoch: the other trial's checkpoint stopped the study
    between its epoch's result and its checkpoint)."""
    from types import SimpleNamespace

    from orchestrate.run.callbacks import GracefulStop
    from orchestrate.run.interrupt import FLAG, INTERRUPTED

    handed_over = []
    stop = GracefulStop("late-start", str(tmp_path))
    stop.tune_handler = lambda signum, frame: handed_over.append(signum)
    a, b = SimpleNamespace(trial_id="a"), SimpleNamespace(trial_id="b")
    stop.on_trial_start(0, [], a)
    if not late:
        stop.on_trial_start(0, [], b)
    try:
        stop._on_signal(signal.SIGINT, None)
    finally:
        INTERRUPTED.pop("late-start", None)
    assert (tmp_path / FLAG).exists()  # the trials read it at the end of their epoch
    assert "waiting for " + ("1" if late else "2") in capsys.readouterr().err
    if late:
        stop.on_trial_start(0, [], b)
    stop.on_checkpoint(0, [], a, None)
    assert not handed_over
    stop.on_checkpoint(0, [], b, None)
    assert handed_over == [signal.SIGINT]
    stop.on_trial_start(0, [], SimpleNamespace(trial_id="c"))  # after the hand-over: not waited
    assert handed_over == [signal.SIGINT]
