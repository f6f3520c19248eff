"""python -m orchestrate.ablation on a real Ray cluster with a real MLflow store."""

import io
import math
import signal
import subprocess
import sys
import time

import optuna
import pytest
from mlflow.tracking import MlflowClient

from orchestrate.ablation import main
from orchestrate.runner import RunOptions, run_study
from orchestrate.search import FinalOnlyOptunaSearch
from search_spaces import load_study

GRID = """
name = "mini4"
kind = "grid"
reference = "basic"
[run]
dataset = "synthetic"
[defaults]
backbone = "resnet50"
[[cells]]
name = "basic"
attention = "none"
loss = "ce"
paper = { synthetic = 50.0 }
[[cells]]
name = "joint"
attention = "none"
loss = "island"
[[cells]]
name = "psa"
attention = "psa"
loss = "ce"
[[cells]]
name = "psa_joint"
attention = "psa"
loss = "island"
"""


def options(tmp_path, **changes):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    values = dict(preset="tiny", storage=str(tmp_path / "ray"), tracking_uri=uri)
    values["log_checkpoints"] = False
    return RunOptions(**{**values, **changes})


def runs(tmp_path, experiment):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return client, ([] if exp is None else client.search_runs([exp.experiment_id]))


@pytest.mark.slow
def test_a_four_trial_ablation_is_fully_tracked(ray_cluster, tmp_path, study_file):
    out = io.StringIO()
    summary = run_study(load_study(study_file(GRID)), options(tmp_path), out=out)
    client, all_runs = runs(tmp_path, "mini4")
    parents = [r for r in all_runs if r.data.tags.get("study_parent") == "true"]
    children = [r for r in all_runs if r.data.tags.get("study_parent") == "false"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 4 and {r.info.status for r in children} == {"FINISHED"}
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert {r.data.tags["cell"] for r in children} == {"basic", "joint", "psa", "psa_joint"}
    for run in children:
        assert run.data.params["attention"] in ("none", "psa") and run.data.params["epochs"] == "2"
        assert len(client.get_metric_history(run.info.run_id, "val_accuracy")) == 2
        assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 2
        assert "test_accuracy" in run.data.metrics and "test_macro_f1" in run.data.metrics
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"confusion_matrix.png", "curves.png", "per_class_report.json",
                "predictions.json"} <= names  # fmt: skip
    parent_files = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"study_table.csv", "study_table.md"} <= parent_files
    # the printed table is the MLflow metrics
    table = summary["table"].set_index("cell")
    for run in children:
        row = table.loc[run.data.tags["cell"]]
        assert row.trials == 1
        assert row.accuracy == pytest.approx(100 * run.data.metrics["test_accuracy"])
        printed = f"{100 * run.data.metrics['test_accuracy']:.2f}"
        assert printed in out.getvalue()
    assert table.loc["basic"].paper == 50.0 and math.isnan(table.loc["joint"].paper)


HPO = """
name = "minihpo"
kind = "tune"
[run]
dataset = "synthetic"
[tune]
num_samples = 5
grace_period = 1
reduction_factor = 2
[[space]]
name = "attention"
type = "categorical"
choices = ["none", "eca"]
[[space]]
name = "loss"
type = "categorical"
choices = ["ce", "island"]
[[space]]
name = "lam1"
type = "loguniform"
low = 0.1
high = 10.0
when = { loss = ["island"] }
[[space]]
name = "lr"
type = "loguniform"
low = 0.0001
high = 0.01
"""


@pytest.mark.slow
def test_the_tuning_study_samples_its_conditional_space_with_asha(
    ray_cluster, tmp_path, study_file
):
    summary = run_study(load_study(study_file(HPO)), options(tmp_path, epochs=3), out=io.StringIO())
    report = summary["report"]
    assert report.kind == "tune" and 1 <= len(report.best) <= 5  # ASHA may stop some
    assert set(report.importances) <= {"attention", "loss", "lr"}
    assert report.cost["trials"] == 5
    _, all_runs = runs(tmp_path, "minihpo")
    children = [r for r in all_runs if r.data.tags.get("study_parent") == "false"]
    assert len(children) == 5 and {r.info.status for r in children} == {"FINISHED"}
    for run in children:
        sampled = dict(kv.split("=") for kv in run.data.tags["sampled"].split(","))
        assert ("lam1" in sampled) == (sampled["loss"] == "island")
        assert run.data.params["loss"] == sampled["loss"]
        assert float(run.data.params["lr"]) == pytest.approx(float(sampled["lr"]))


def test_early_stopped_trials_are_pruned_not_complete():
    search = FinalOnlyOptunaSearch(
        space=lambda t: {"x": t.suggest_float("x", 0, 1)}, metric="best_val_accuracy", mode="max"
    )
    for trial_id in ("a", "b", "c"):
        assert search.suggest(trial_id) is not None
    search.on_trial_result("a", {"best_val_accuracy": 0.9, "training_iteration": 1})
    search.on_trial_complete("a", {"best_val_accuracy": 0.9, "epoch": 1})  # stopped by ASHA
    search.on_trial_complete("b", {"best_val_accuracy": 0.4, "epoch": 3, "completed": 1})
    search.on_trial_complete("c", None, error=True)
    states = [t.state for t in search._ot_study.trials]
    assert states == [optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE,
                      optuna.trial.TrialState.FAIL]  # fmt: skip
    assert search._ot_study.best_value == 0.4  # the early 0.9 is not taken as final


@pytest.mark.slow
def test_a_diverging_trial_fails_with_its_reason_and_the_study_finishes(
    ray_cluster, tmp_path, study_file
):
    body = GRID.replace('name = "mini4"', 'name = "diverge"').replace(
        'name = "joint"\nattention = "none"\nloss = "island"',
        'name = "joint"\nattention = "none"\nloss = "center"\nlam = 1e38',
    )
    run_study(load_study(study_file(body)), options(tmp_path), out=io.StringIO())
    _, all_runs = runs(tmp_path, "diverge")
    children = {r.data.tags["cell"]: r for r in all_runs if r.data.tags.get("cell")}
    assert children["joint"].info.status == "FAILED"
    assert "non-finite loss at epoch 1, step 1" in children["joint"].data.tags["error"]
    assert {children[c].info.status for c in ("basic", "psa", "psa_joint")} == {"FINISHED"}
    assert all(r.info.status != "RUNNING" for r in all_runs)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--study", "table9"], "unknown study 'table9'; shipped: hpo, table3, table4, table5"),
        (["--dataset", "fer2013"], "data_path: dataset 'fer2013' needs the path"),
        (["--dataset", "ckplus", "--data", "/no/such/ck"], "/no/such/ck: no such"),
        (["--seeds", "0"], "seeds: must be at least 1"),
        (["--epochs", "-3"], "--epochs must be positive"),
        (["--preset", "gpu8"], "preset 'gpu8' is not defined; defined: paper, cpu"),
        (
            ["--tracking-uri", "http://127.0.0.1:9"],
            "MLflow server http://127.0.0.1:9 is unreachable",
        ),
        (["--resume"], "--resume: no interrupted session of table4__synthetic__cpu"),
    ],
)
def test_bad_options_are_rejected_before_any_run(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--storage", str(tmp_path / "ray")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    _, all_runs = runs(tmp_path, "table4")
    assert all_runs == []


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('name = "x"\nkind = "grid"\n', "cells: a grid study needs a non-empty [[cells]] list"),
        ('name = "x"\nkind = "sweep"\n', "kind: 'sweep' is not one of grid, tune"),
        (
            GRID.replace('loss = "ce"', 'loss = "arcface"', 1),
            "cells.basic: loss: 'arcface' is not one of ce, center, island",
        ),
        (
            GRID.replace('attention = "none"', 'atention = "none"', 1),
            "cells[0].atention: not a trial-config key",
        ),
        (
            GRID.replace('reference = "basic"', 'reference = "best"'),
            "reference: 'best' is not a cell",
        ),
        (
            GRID.replace('backbone = "resnet50"', "seed = 3"),
            "defaults.seed: set by the study's [run]",
        ),
        (
            HPO.replace('when = { loss = ["island"] }', 'when = { loss = ["arcface"] }'),
            "space[2].when.loss: must be a list of loss's choices",
        ),
        (HPO.replace("low = 0.1", "low = -1.0"), "space[2].low: needs numbers low < high"),
        ("name = [", "not valid TOML"),
    ],
)
def test_bad_study_files_name_file_key_and_problem(
    tmp_path, study_file, monkeypatch, capsys, body, message
):
    monkeypatch.chdir(tmp_path)
    path = study_file(body, name="bad")
    assert main(["--study", path, "--storage", str(tmp_path / "ray")]) == 2
    err = capsys.readouterr().err
    assert "bad.toml" in err and message in err
    assert not (tmp_path / "mlflow.db").exists()


def test_dry_run_prints_the_plan_and_starts_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--study", "table3", "--seeds", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "12 trials:" in out and "psa-seed1-fold0" in out and "resnet50/aff/island" in out
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray_results").exists()
    assert main(["--study", "table4", "--dataset", "ckplus", "--data", str(tmp_path),
                 "--seeds", "2", "--dry-run"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "80 trials:" in out and "protocol kfold" in out  # 4 cells x 2 seeds x 10 folds


def _children(db):
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("mini4") if db.exists() else None
    if exp is None:
        return client, []
    found = client.search_runs([exp.experiment_id], "tags.study_parent = 'false'")
    return client, found


@pytest.mark.slow
def test_an_interrupted_study_resumes_without_rerunning_finished_trials(tmp_path, study_file):
    path = study_file(GRID)
    db = tmp_path / "mlflow.db"
    cmd = [sys.executable, "-m", "orchestrate.ablation", "--study", path, "--preset", "tiny",
           "--storage", str(tmp_path / "ray"), "--tracking-uri", f"sqlite:///{db}",
           "--max-concurrent", "1", "--no-log-checkpoints"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        _, found = _children(db)
        if sum(r.info.status == "FINISHED" for r in found) >= 1:
            break
        time.sleep(1)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 130, output
    client, before = _children(db)
    finished = {r.info.run_id: r for r in before if r.info.status == "FINISHED"}
    assert 1 <= len(finished) < 4

    done = subprocess.run([*cmd, "--resume"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    client, after = _children(db)
    assert len(after) == 4 and {r.info.status for r in after} == {"FINISHED"}
    assert len({r.data.tags["cell"] for r in after}) == 4  # no duplicate runs
    for run_id in finished:  # finished trials were not run again
        assert len(client.get_metric_history(run_id, "val_accuracy")) == 2
    exp = client.get_experiment_by_name("mini4")
    parents = client.search_runs([exp.experiment_id], "tags.study_parent = 'true'")
    assert sorted(r.info.status for r in parents) == ["FINISHED", "KILLED"]


def test_credentials_never_reach_params_or_tags(tmp_path):
    from orchestrate.tracking import StudyTracker, mask

    assert (
        mask("http://alice:s3cret@mlflow.internal:5000") == "http://alice:***@mlflow.internal:5000"
    )
    assert mask("s3://KEY:SECRET@bucket/ray") == "s3://KEY:***@bucket/ray"
    assert mask("/data/fer2013") == "/data/fer2013"
    tracker = StudyTracker(f"sqlite:///{tmp_path / 'm.db'}", "masking")
    run_id = tracker.start_parent(
        "session", tags={"note": "https://bob:hunter2@example.org/x"},
        params={"tracking_uri": "http://alice:s3cret@mlflow.internal:5000"},
    )  # fmt: skip
    run = tracker.client.get_run(run_id)
    assert run.data.params["tracking_uri"] == "http://alice:***@mlflow.internal:5000"
    assert "hunter2" not in str(run.data.tags) and "s3cret" not in str(run.data.params)
    tracker.end_parent("FINISHED")
