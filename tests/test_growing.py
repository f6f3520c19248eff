"""A grid study is the set of its trial identities: each invocation trains only those without a
FINISHED run. Seeds and cells added later train alone, a trial lost to a fault is re-run alone,
a diverged one only when asked. Real Ray (the session's local cluster), a real MLflow store,
the command line as users type it."""

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrate.ablation import main

pytestmark = pytest.mark.slow

CELLS = {
    "ce": 'name = "ce"\nloss = "ce"',
    "center": 'name = "center"\nloss = "center"',
    "island": 'name = "island"\nloss = "island"',
    "boom": 'name = "boom"\nloss = "center"\nlam = 1e38',  # diverges at its first step
}


def body(*cells: str, name: str = "grow", extra: str = "") -> str:
    head = (
        f'name = "{name}"\nkind = "grid"\nreference = "{cells[0]}"\n[run]\n'
        'dataset = "synthetic"\n[defaults]\nbackbone = "shufflenet_v2_x0_5"\n'
        'attention = "none"\n'
    )
    return head + "".join(f"[[cells]]\n{CELLS[c]}{extra}\n" for c in cells)


def argv(tmp_path, study: str, *extra: str) -> list[str]:
    return [
        "--study",
        study,
        "--preset",
        "tiny",
        "--storage",
        str(tmp_path / "ray"),
        "--tracking-uri",
        f"sqlite:///{tmp_path}/m.db",
        "--no-log-checkpoints",
        *extra,
    ]


def children(tmp_path, name: str) -> tuple[MlflowClient, list]:
    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    exp = client.get_experiment_by_name(name)
    return client, client.search_runs([exp.experiment_id], "tags.study_parent = 'false'")


def trained(client, run) -> int:
    return len(client.get_metric_history(run.info.run_id, "val_accuracy"))


def test_seeds_and_cells_added_to_a_finished_study_train_alone(
    ray_cluster, tmp_path, study_file, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    study = study_file(body("ce", "center"))
    assert main(argv(tmp_path, study, "--seeds", "1")) == 0
    client, first = children(tmp_path, "grow")
    assert len(first) == 2 and {r.info.status for r in first} == {"FINISHED"}
    printed = capsys.readouterr().out
    assert printed.rstrip().endswith("best model: not logged (--no-log-checkpoints)")
    experiment = client.get_experiment_by_name("grow").experiment_id
    assert not client.search_logged_models([experiment])  # nothing logged, nothing registered

    # a second seed and a third cell at once: only the four new trials train
    grown = study_file(body("ce", "center", "island"))
    assert main(argv(tmp_path, grown, "--seeds", "2", "--dry-run")) == 0
    plan = capsys.readouterr().out
    assert "4 to run, 0 to continue, 2 finished before (skipped)" in plan
    assert plan.count("finished before") == 3 and plan.count(" run ") == 4  # header + 4 rows

    assert main(argv(tmp_path, grown, "--seeds", "2")) == 0
    out = capsys.readouterr().out
    client, second = children(tmp_path, "grow")
    new = [r for r in second if r.info.run_id not in {f.info.run_id for f in first}]
    assert sorted((r.data.tags["cell"], r.data.tags["seed"]) for r in new) == [
        ("ce", "1"),
        ("center", "1"),
        ("island", "0"),
        ("island", "1"),
    ]
    assert len(second) == 6 and all(trained(client, r) == 2 for r in first)  # seed 0 kept
    rows = {
        ln.split()[0]: ln.split()[1]
        for ln in out.splitlines()
        if ln.startswith(("ce ", "center ", "island "))
    }
    assert rows == {"ce": "2", "center": "2", "island": "2"}  # both seeds in each row (n)

    # a changed cell is a new identity
    capsys.readouterr()
    changed = study_file(body("ce", "center", "island", extra="\nlr = 0.002"))
    assert main(argv(tmp_path, changed, "--seeds", "2", "--dry-run")) == 0
    assert "6 to run, 0 to continue, 0 finished before" in capsys.readouterr().out


def _kill_first_trained_worker(tmp_path, name: str, done: threading.Event, killed: list) -> None:
    """SIGKILL the Ray worker of the first trial that reported an epoch, as a lost node would."""
    deadline = time.time() + 300
    while time.time() < deadline and not done.is_set():
        db = tmp_path / "m.db"
        if db.exists():
            client = MlflowClient(f"sqlite:///{db}")
            exp = client.get_experiment_by_name(name)
            running = (
                []
                if exp is None
                else [
                    r
                    for r in client.search_runs(
                        [exp.experiment_id], "attributes.status = 'RUNNING'"
                    )
                    if r.data.tags.get("study_parent") == "false" and trained(client, r)
                ]
            )
            workers = [p for p in _descendants(os.getpid()) if _is_trial_worker(p)]
            if running and len(workers) == 1:
                os.kill(int(workers[0].name), signal.SIGKILL)
                killed.append(running[0].data.tags["cell"])
                return
        time.sleep(0.3)


def _descendants(pid: int) -> list[Path]:
    """This process's descendants (its Ray's workers; not another test process's)."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
    found, frontier = [], {pid}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier}
        found += [Path("/proc", str(p)) for p in frontier]
    return found


def _is_trial_worker(proc: Path) -> bool:
    try:
        return b"ImplicitFunc" in (proc / "cmdline").read_bytes()
    except OSError:
        return False


def test_a_trial_lost_to_a_fault_reruns_alone_and_a_diverged_one_only_when_asked(
    ray_cluster, tmp_path, study_file, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    study = study_file(body("ce", "center", "boom", name="faults"))
    args = argv(tmp_path, study, "--max-concurrent", "1", "--max-failures", "0")
    done, killed = threading.Event(), []
    killer = threading.Thread(
        target=_kill_first_trained_worker, args=(tmp_path, "faults", done, killed)
    )
    killer.start()
    try:
        # a trial failed by an error after its retries (none here): the report is written
        # and printed, and the exit code says it (a diverged trial alone would not)
        assert main(args) == 3
    finally:
        done.set()
        killer.join()
    out, err = capsys.readouterr()
    assert "error: 1 trial failed by an error after its retries (exit 3)" in err
    assert "next: browse the runs" in out
    assert killed, "no trial worker was killed"
    _, first = children(tmp_path, "faults")
    status = {r.data.tags["cell"]: r for r in first}
    assert status[killed[0]].info.status == "FAILED"
    assert status["boom"].data.tags["failure_reason"] == "divergence"
    assert "non-finite loss at epoch 1, step 1" in status["boom"].data.tags["error"]
    assert "Traceback" not in out
    failed_lines = [ln for ln in out.splitlines() if "<- failed " in ln]
    assert len(failed_lines) == 2
    # the lost trial's line names where Ray's traceback went; the diverged one says why (a
    # divergence is a result of training, with no traceback)
    (lost,) = [ln for ln in failed_lines if "traceback in " in ln]
    (boom,) = [ln for ln in failed_lines if "<- failed boom seed 0 fold 0" in ln]
    assert "non-finite loss at epoch 1, step 1" in boom
    log = Path(lost.split("traceback in ")[1].rstrip(")"))
    assert log.is_file() and "Traceback" in log.read_text()

    # the next invocation re-runs only the lost trial; the diverged one is skipped
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "diverged before (--retry-failed runs it again)" in out
    _, second = children(tmp_path, "faults")
    new = [r for r in second if r.info.run_id not in {f.info.run_id for f in first}]
    assert [(r.data.tags["cell"], r.info.status) for r in new] == [(killed[0], "FINISHED")]
    finished = {r.data.tags["cell"] for r in second if r.info.status == "FINISHED"}
    assert finished == {"ce", "center"}

    # asked, the diverged trial runs again, alone, and diverges again: a result, exit 0
    assert main([*args, "--retry-failed"]) == 0
    out = capsys.readouterr().out
    _, third = children(tmp_path, "faults")
    new = [r for r in third if r.info.run_id not in {s.info.run_id for s in second}]
    assert [(r.data.tags["cell"], r.info.status) for r in new] == [("boom", "FAILED")]
    assert "1 to run, 0 to continue, 2 finished before (skipped)" in out
