"""python -m orchestrate.ablation on a real Ray cluster with a real MLflow store."""

import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from orchestrate.ablation import main
from orchestrate.run.runner import RunOptions
from orchestrate.run.search import JOURNAL, FinalOnlyOptunaSearch
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
    values = dict(
        preset="tiny",
        storage=str(tmp_path / "ray"),
        tracking_uri=uri,
        reports=str(tmp_path / "reports"),
    )
    values["log_checkpoints"] = False
    return RunOptions(**{**values, **changes})


def runs(tmp_path, experiment):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return client, ([] if exp is None else client.search_runs([exp.experiment_id]))


PARETO_HPO = """
name = "paretohpo"
kind = "tune"
[run]
dataset = "synthetic"
[defaults]
attention = "none"
[tune]
objectives = { best_val_accuracy = "max", latency_ms = "min" }
constraints = ["params <= 1000000"]
num_samples = 5
grace_period = 1
reduction_factor = 2
[[space]]
name = "backbone"
type = "categorical"
choices = ["shufflenet_v2_x0_5", "mobilenet_v2"]
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
name = "lam"
type = "categorical"
choices = [1e38, 0.01]
when = { loss = ["island"] }
[[space]]
name = "lr"
type = "loguniform"
low = 0.0001
high = 0.01
"""
SMALL = {"shufflenet_v2_x0_5": True, "mobilenet_v2": False}  # 0.35 M and 2.2 M parameters


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
    assert states == [
        optuna.trial.TrialState.PRUNED,
        optuna.trial.TrialState.COMPLETE,
        optuna.trial.TrialState.FAIL,
    ]
    assert search._ot_study.best_value == 0.4  # the early 0.9 is not taken as final


@pytest.mark.parametrize(
    ("epochs", "grace", "reduction", "expected"),
    [
        (30, 10, 3, [10]),
        (30, 1, 3, [1, 3, 9, 27]),
        (27, 1, 3, [1, 3, 9]),
        (10, 1, 2, [1, 2, 4, 8]),
        (9, 1, 2, [1, 2, 4, 8]),
        (8, 1, 2, [1, 2, 4]),
        (2, 1, 2, [1]),
        (5, 5, 3, []),
        (3, 10, 3, []),
        (1, 1, 2, []),
    ],
)
def test_asha_rungs_fall_before_the_last_epoch(epochs, grace, reduction, expected):
    from orchestrate.run.search import asha
    from search_spaces.study import TuneSettings
    from search_spaces.study import asha_rungs as rungs

    assert rungs(epochs, grace, reduction) == expected
    assert all(r < epochs for r in rungs(epochs, grace, reduction))
    settings = TuneSettings(grace_period=grace, reduction_factor=reduction)
    assert (asha(epochs, settings) is None) == (expected == [])
    if expected:  # the same rungs as Ray's own bracket (private: only this test reads it)
        from ray.tune.schedulers.async_hyperband import _Bracket

        bracket = _Bracket(grace, epochs - 1, reduction, 0, stop_last_trials=False)
        assert sorted(int(m) for m, _ in bracket._rungs) == expected


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--study", "table9"],
            "unknown study 'table9'; shipped: hpo, hpo_pareto, table3, table4, table5",
        ),
        (["--dataset", "fer2013"], "data_path: dataset 'fer2013' needs the path"),
        (
            ["--dataset", "ckplus", "--data", "/no/such/ck", "--pretrained", "none"],
            "/no/such/ck: no such",
        ),
        (["--seeds", "0"], "seeds: must be at least 1"),
        (["--epochs", "-3"], "--epochs must be positive"),
        (["--preset", "gpu8"], "preset 'gpu8' is not defined; defined: paper, cpu"),
        (
            ["--tracking-uri", "http://127.0.0.1:9"],
            "MLflow server http://127.0.0.1:9 is unreachable",
        ),
        (["--study", "hpo", "--resume"], "--resume: no interrupted session of hpo__synthetic__"),
        (["--resume"], "--resume: no trial of study table4's plan has run in sqlite:///"),
    ],
)
def test_bad_options_are_rejected_before_any_run(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--storage", str(tmp_path / "ray")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    _, all_runs = runs(tmp_path, "table4")
    assert all_runs == []


def test_resume_on_a_grid_needs_one_trial_of_its_plan_to_have_run(tmp_path):
    """No store, a store without the study, the study's experiment with only other trials: each
    refused; one trial of the plan that ran (finished, or killed with no checkpoint): accepted."""
    from orchestrate.plan.ledger import IDENTITY_TAG
    from orchestrate.run.runner import RunOptions, _check_something_to_continue, make_plan
    from orchestrate.store.tracking import PARENT_TAG

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    options = RunOptions(preset="cpu", storage=str(tmp_path / "ray"), tracking_uri=uri, resume=True)
    plan = make_plan(load_study("table4"), options)
    with pytest.raises(FileNotFoundError, match="nothing to continue"):
        _check_something_to_continue(plan, options)  # no store at all
    assert not (tmp_path / "mlflow.db").exists()  # and none made by asking
    client = MlflowClient(uri)
    client.create_experiment("other")
    with pytest.raises(FileNotFoundError, match="nothing to continue"):
        _check_something_to_continue(plan, options)
    experiment = client.create_experiment("table4")
    for identity, status in (("not-this-plan", "FINISHED"), (plan.trials[2].identity, "KILLED")):
        run = client.create_run(experiment, tags={PARENT_TAG: "false", IDENTITY_TAG: identity})
        client.set_terminated(run.info.run_id, status)
    _check_something_to_continue(plan, options)  # the killed trial of this plan runs again


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
            PARETO_HPO.replace('when = { loss = ["island"] }', 'when = { loss = ["arcface"] }'),
            "space[2].when.loss: must be a list of loss's choices",
        ),
        (PARETO_HPO.replace("low = 0.1", "low = -1.0"), "space[2].low: needs numbers low < high"),
        (
            PARETO_HPO.replace(
                'constraints = ["params <= 1000000"]', 'constraints = ["val_loss <= 1"]'
            ),
            "tune.constraints[0]: 'val_loss' is not a metric trials report",
        ),
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
    assert "14 trials:" in out and "psa-seed1-fold0" in out and "resnet50/aff/island" in out
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray_results").exists()
    assert (
        main(
            [
                "--study",
                "table4",
                "--dataset",
                "ckplus",
                "--data",
                str(tmp_path),
                "--seeds",
                "2",
                "--dry-run",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "80 trials:" in out and "protocol kfold" in out  # 4 cells x 2 seeds x 10 folds
    assert (
        main(
            [
                "--study",
                "table4",
                "--dataset",
                "ckplus",
                "--data",
                str(tmp_path),
                "--repetitions",
                "2",
                "--dry-run",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out  # the paper preset's 3 seeds, each over 2 drawings of 10 folds
    assert "240 trials:" in out and "protocol kfold (repeated: folds drawn 2 times)" in out
    assert "basic-seed2-rep1-fold9" in out


def _children(db):
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("mini4") if db.exists() else None
    if exp is None:
        return client, []
    found = client.search_runs([exp.experiment_id], "tags.study_parent = 'false'")
    return client, found


def test_credentials_never_reach_params_or_tags(tmp_path):
    from orchestrate.store.tracking import StudyTracker, mask

    assert (
        mask("http://alice:s3cret@mlflow.internal:5000") == "http://alice:***@mlflow.internal:5000"
    )
    assert mask("s3://KEY:SECRET@bucket/ray") == "s3://KEY:***@bucket/ray"
    assert mask("/data/fer2013") == "/data/fer2013"
    tracker = StudyTracker(f"sqlite:///{tmp_path / 'm.db'}", "masking")
    run_id = tracker.start_parent(
        "session",
        tags={"note": "https://bob:hunter2@example.org/x"},
        params={"tracking_uri": "http://alice:s3cret@mlflow.internal:5000"},
        config=None,
    )
    run = tracker.client.get_run(run_id)
    assert run.data.params["tracking_uri"] == "http://alice:***@mlflow.internal:5000"
    assert "hunter2" not in str(run.data.tags) and "s3cret" not in str(run.data.params)
    tracker.end_parent("FINISHED")


@pytest.mark.slow
def test_a_multi_objective_tuning_study_interrupted_and_continued_keeps_its_front(
    ray_cluster, tmp_path, study_file, monkeypatch, capsys
):
    """Two objectives and a constraint over a conditional space, stopped by SIGINT after a
    trial finished and continued: Optuna holds both values of every complete trial, PRUNED for
    the trials MO-ASHA stopped, FAIL for the diverged ones (lam 1e38: nothing invented for
    them) and each trial's constraint; progress names the trials as their runs, with their
    parameters, and no library line; the runs say which are feasible and on the front; the
    report shows every trial, the front and its figures in a browser, and its re-run command
    runs the best configuration."""
    from conftest import chromium
    from playwright.sync_api import sync_playwright

    from orchestrate.report.tuning import RERUN_FILE

    db = tmp_path / "m.db"
    cmd = [
        sys.executable,
        "-m",
        "orchestrate.ablation",
        "--study",
        study_file(PARETO_HPO),
        "--preset",
        "tiny",
        "--epochs",
        "2",
        "--storage",
        str(tmp_path / "ray"),
        "--tracking-uri",
        f"sqlite:///{db}",
        "--max-concurrent",
        "1",
    ]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )

    def children():
        client = MlflowClient(f"sqlite:///{db}")
        exp = client.get_experiment_by_name("paretohpo") if db.exists() else None
        if exp is None:
            return []
        return client.search_runs([exp.experiment_id], "tags.study_parent = 'false'")

    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        found = children()
        if any(r.info.status == "FINISHED" for r in found) and any(
            r.info.status == "RUNNING" for r in found
        ):
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    first = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, first
    (session,) = [p.name for p in (tmp_path / "ray").iterdir() if p.name != "leases"]

    def journal():
        storage = optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(tmp_path / "ray" / session / JOURNAL))
        )
        return optuna.load_study(study_name=session, storage=storage).trials

    before = {t.number: t.params for t in journal()}
    assert len(before) in (2, 3)  # one finished, one running, maybe one more sampled

    # the same command continues the session; in this process, on the session's Ray
    monkeypatch.chdir(tmp_path)
    assert main(cmd[3:]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert f"continuing {tmp_path / 'ray' / session}" in printed
    assert "Traceback" not in printed + captured.err + first
    assert "A new study created" not in printed + captured.err + first  # no library lines
    after = journal()
    assert [t.number for t in after] == [0, 1, 2, 3, 4]  # numbered on, nothing sampled twice
    assert {t.number: t.params for t in after if t.number in before} == before
    runs = {r.data.tags["ray_trial_id"]: r for r in children()}
    assert len(runs) == 5 and {r.info.status for r in runs.values()} <= {"FINISHED", "FAILED"}
    # progress names each trial as its run is named, with what it samples (3 digits)
    started = dict(re.findall(r"<- started (tuned-\d+) \((.*)\)$", first + printed, re.MULTILINE))
    for run in runs.values():
        sampled = dict(kv.split("=") for kv in run.data.tags["sampled"].split(","))
        shown = dict(kv.split("=") for kv in started[run.info.run_name].split(", "))
        assert shown.keys() == sampled.keys()
        for key, value in sampled.items():
            same = shown[key] == value or float(shown[key]) == pytest.approx(float(value), 5e-3)
            assert same, (key, shown[key], value)
        island = sampled["loss"] == "island"  # the conditional space: lam, lam1 with island
        assert ("lam1" in sampled) == island and ("lam" in sampled) == island
        assert run.data.params["loss"] == sampled["loss"]
    by_lr = {round(float(r.data.params["lr"]), 12): r for r in runs.values()}
    State = optuna.trial.TrialState
    diverged = 0
    for trial in after:
        run = by_lr[round(trial.params["lr"], 12)]
        if trial.params.get("lam", 0) > 1:  # diverged at its first step: failed, told FAIL
            diverged += 1
            assert trial.state == State.FAIL and run.info.status == "FAILED"
            assert run.data.tags["failure_reason"] == "divergence"
            assert "non-finite loss at epoch 1, step 1" in run.data.tags["error"]
            assert "val_accuracy" not in run.data.metrics and not trial.constraints
            continue
        stopped = run.data.tags.get("stopped_early") == "true"
        assert trial.state == (State.PRUNED if stopped else State.COMPLETE)
        if trial.state == State.COMPLETE:  # both objectives, as the run logged them
            assert trial.values == [
                run.data.metrics["best_val_accuracy"],
                run.data.metrics["latency_ms"],
            ]
        # told as a constraint, never as a low score: positive excess is infeasible
        small = SMALL[trial.params["backbone"]]
        (excess,) = trial.constraints.values()
        assert (excess <= 0) == small
        assert excess == run.data.metrics["params"] - 1_000_000
        assert run.data.tags["feasible"] == str(small).lower()
        ranked = not stopped and small
        assert ("pareto_front" in run.data.tags) == ranked

    # the report: every trial with its fate, the front, the best feasible model, the re-run
    folder = tmp_path / "reports" / session
    assert diverged >= 1  # Optuna's seeded first draws: tuned-002 is island with lam 1e38
    failed = [ln for ln in (first + printed).splitlines() if "<- failed " in ln]
    # one line per failed trial in each invocation that saw it (the resumed one retries it,
    # and it fails at once from its note)
    assert len({ln.split("<- failed ")[1].split(":")[0] for ln in failed}) == diverged
    assert all("non-finite loss" in ln for ln in failed)
    log = Path(failed[0].split("(traceback in ")[1].rstrip(")"))
    assert log.is_file() and "Traceback" in log.read_text()
    trials = pd.read_csv(folder / "tuning_trials.csv")
    assert sorted(trials.name) == [f"tuned-{i:03d}" for i in range(1, 6)]
    assert (trials.fate == "failed: divergence").sum() == diverged
    assert set(trials.fate) <= {"finished", "stopped at rung 1 (epoch 1)", "failed: divergence"}
    line = next(ln for ln in printed.splitlines() if ln.startswith("re-run it over seeds"))
    assert line.endswith(f"--study reports/{session}/{RERUN_FILE} --preset tiny")  # from here
    best = next(ln for ln in printed.splitlines() if ln.startswith("best configuration"))
    best_name = best.split(": ")[1].split(" ")[0]
    best_run = next(r for r in runs.values() if r.info.run_name == best_name)
    assert SMALL[best_run.data.params["backbone"]]  # the best is feasible
    assert "best feasible model (params <= 1000000): models:/paretohpo@best_feasible" in printed
    version = MlflowClient(f"sqlite:///{db}").get_model_version_by_alias(
        "paretohpo", "best_feasible"
    )
    assert version.run_id == best_run.info.run_id
    rerun = load_study(folder / RERUN_FILE)
    config = rerun.trials("tiny")[0].config
    assert rerun.seeds_for("tiny") == 3 and config.backbone == best_run.data.params["backbone"]
    assert config.lr == float(best_run.data.params["lr"])
    capsys.readouterr()
    assert main([*shlex.split(line.split(": ", 1)[1])[3:], "--dry-run"]) == 0  # as printed
    assert "study paretohpo_rerun (grid)" in capsys.readouterr().out
    with sync_playwright() as p:
        browser = chromium(p)
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        page.goto((folder / "report.html").as_uri())
        rows = page.locator("table").first.locator("tbody tr")
        assert rows.count() == 5 and rows.first.is_visible()
        text = page.locator("body").inner_text()
        assert "Pareto front" in text and "hypervolume" in text and best_name in text
        images = page.locator("img")
        alts = images.evaluate_all("ims => ims.map(im => im.alt)")
        assert any(a.startswith("the trials' objectives") for a in alts), alts
        assert any(a.startswith("optimisation history") for a in alts), alts
        for i in range(images.count()):
            assert images.nth(i).evaluate("im => im.complete && im.naturalWidth > 100")
        browser.close()
