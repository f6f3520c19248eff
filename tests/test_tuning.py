"""The tuning report from a finished study's data: fates, the front, the best feasible trial,
the hypervolume with its reference point, and the re-run study file."""

import math
import tomllib

import numpy as np
import pandas as pd
import pytest

from orchestrate.report.collect import StudyData
from orchestrate.report.pareto import hypervolume
from orchestrate.report.tuning import rerun_study, toml_text, tuning_report
from search_spaces import load_study

META = {
    "name": "mo",
    "kind": "tune",
    "run": {"dataset": "synthetic"},
    "defaults": {"backbone": "resnet50"},
    "tune": {
        "objectives": {"best_val_accuracy": "max", "latency_ms": "min"},
        "constraints": ["latency_ms <= 20"],
        "grace_period": 1,
        "reduction_factor": 3,
    },
    "space": [
        {"name": "attention", "type": "categorical", "choices": ["none", "se", "psa"]},
        {
            "name": "lam",
            "type": "loguniform",
            "low": 0.001,
            "high": 0.1,
            "when": {"attention": ["se"]},
        },
        {"name": "lr", "type": "loguniform", "low": 0.0001, "high": 0.01},
    ],
    "presets": {"cpu": {"epochs": 3, "tune": {"num_samples": 6}, "fer2013": {"clean": True}}},
}

# name, status, stopped, epochs, sampled, best val, latency; the ranked ones (finished, within
# 20 ms): a 0.80/10, b 0.70/8, c 0.75/12 (below a), e 0.90/25 breaks the constraint
TRIALS = [
    ("tuned-001", "FINISHED", False, 3, "attention=none,lr=0.001", 0.80, 10.0),
    ("tuned-002", "FINISHED", False, 3, "attention=se,lam=0.01,lr=0.002", 0.70, 8.0),
    ("tuned-003", "FINISHED", True, 1, "attention=none,lr=0.0002", 0.60, 10.0),
    ("tuned-004", "FINISHED", False, 3, "attention=none,lr=0.003", 0.75, 12.0),
    ("tuned-005", "FINISHED", False, 3, "attention=psa,lr=0.004", 0.90, 25.0),
    ("tuned-006", "FAILED", False, 1, "attention=se,lam=0.05,lr=0.009", math.nan, math.nan),
]


def data(meta=META) -> StudyData:
    rows = [
        {
            "run_id": f"r{i}",
            "name": n,
            "status": st,
            "stopped_early": stop,
            "error": "TrainingDiverged: non-finite loss" if st == "FAILED" else "",
            "planned_epochs": 3,
            "epochs_run": ep,
            "sampled": smp,
            "best_val_accuracy": acc,
            "latency_ms": lat,
            "params": 2e7,
            "trial_seconds": 360.0,
            "test_accuracy": 0.5 + i / 100,
        }
        for i, (n, st, stop, ep, smp, acc, lat) in enumerate(TRIALS)
    ]
    frame = pd.DataFrame(rows).sample(frac=1.0, random_state=0)  # MLflow's order is not theirs
    return StudyData(
        study="mo", session="mo__s", dataset="synthetic", meta=meta, trials=frame, preset="cpu"
    )


def test_every_trial_has_its_fate_and_only_finished_feasible_trials_are_ranked():
    t = tuning_report(data())
    assert list(t.trials.name) == [row[0] for row in TRIALS]  # sampling order
    assert list(t.trials.fate) == [
        "finished",
        "finished",
        "stopped at rung 1 (epoch 1)",
        "finished",
        "finished",
        "failed: divergence",
    ]
    assert list(t.trials.ranked) == [True, True, False, True, False, False]
    assert t.trials.violates[4] == "latency_ms 25 breaks latency_ms <= 20"
    assert t.trials.param_lam[1] == 0.01 and pd.isna(t.trials.param_lam[0])  # conditional
    assert t.params == ["attention", "lam", "lr"]
    assert t.front == ["tuned-001", "tuned-002"]
    assert t.trials.dominated_by[3] == "tuned-001"
    # the most accurate feasible trial, not the infeasible 0.90 one; its test figure shown
    assert t.best["name"] == "tuned-001" and t.best["test_accuracy"] == 0.5
    assert t.best["params"] == {"attention": "none", "lr": 0.001}
    # test figures for the choice alone: chosen on validation, the others' are not shown
    assert t.trials.test_accuracy.notna().tolist() == [True] + [False] * 5


def test_the_hypervolume_is_measured_from_the_stated_reference_point():
    t = tuning_report(data())
    # accuracy: the worst ranked 0.70 moved a tenth of the range (0.10) down; latency: the bound
    assert t.reference == pytest.approx([0.69, 20.0])
    by_hand = (0.80 - 0.69) * (20 - 10) + (0.70 - 0.69) * (10 - 8)
    assert t.history.hypervolume.iloc[-1] == pytest.approx(by_hand)
    goals = [("best_val_accuracy", "max"), ("latency_ms", "min")]
    assert hypervolume([[0.80, 10], [0.70, 8]], goals, t.reference) == pytest.approx(by_hand)
    # it grows with the trials that join the front and stays with those that do not
    assert list(t.history.hypervolume.round(6)) == [
        round(x, 6) for x in [0.11 * 10, by_hand, by_hand, by_hand, by_hand, by_hand]
    ]
    assert list(t.history.trial_hours) == pytest.approx([0.1 * i for i in range(1, 7)])


def test_one_objective_has_a_best_so_far_history_and_no_front():
    meta = {**META, "tune": {"metric": "best_val_accuracy", "mode": "max", "grace_period": 1}}
    t = tuning_report(data(meta))
    assert t.front == [] and t.reference is None and "hypervolume" not in t.history
    assert t.best["name"] == "tuned-005"  # no constraint: the most accurate
    assert list(t.history.best) == [0.80, 0.80, 0.80, 0.80, 0.90, 0.90]


def test_the_rerun_study_file_loads_and_runs_each_chosen_configuration_over_seeds(tmp_path):
    d = data()
    t = tuning_report(d)
    tables = rerun_study(d, t)
    path = tmp_path / "rerun.toml"
    path.write_text(toml_text(tables))
    assert tomllib.loads(path.read_text()) == tables  # the writer writes what it was given
    study = load_study(path)
    assert study.kind == "grid" and study.seeds_for("cpu") == 3
    assert [c.name for c in study.cells] == ["tuned_001", "tuned_002"]  # best, then the front
    trials = study.trials("cpu")
    first = next(s.config for s in trials if s.cell == "tuned_001")
    second = next(s.config for s in trials if s.cell == "tuned_002")
    assert (first.attention, first.lr, first.epochs) == ("none", 0.001, 3)
    assert (second.attention, second.lam, second.lr) == ("se", 0.01, 0.002)
    assert "tune" not in tables["presets"]["cpu"] and tables["presets"]["cpu"]["fer2013"]


def test_importances_name_the_parameter_the_objective_depends_on():
    """Twelve finished trials whose accuracy follows the learning rate alone and whose latency
    follows attention alone: fANOVA gives each objective to its parameter; below 8 ranked
    trials it gives nothing rather than noise."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        lr, attention = float(10 ** rng.uniform(-4, -2)), ["none", "se", "psa"][i % 3]
        rows.append(
            {
                "run_id": f"r{i}",
                "name": f"tuned-{i + 1:03d}",
                "status": "FINISHED",
                "stopped_early": False,
                "error": "",
                "planned_epochs": 3,
                "epochs_run": 3,
                "sampled": f"attention={attention},lr={lr}",
                "best_val_accuracy": 0.5 + 10 * lr,
                "latency_ms": {"none": 10.0, "se": 12.0, "psa": 30.0}[attention],
                "params": 2e7,
                "trial_seconds": 60.0,
                "test_accuracy": 0.5,
            }
        )
    meta = {**META, "tune": {**META["tune"], "constraints": []}}
    t = tuning_report(
        StudyData(
            study="mo",
            session="s",
            dataset="synthetic",
            meta=meta,
            trials=pd.DataFrame(rows),
            preset="cpu",
        )
    )
    assert (
        max(t.importances["best_val_accuracy"], key=t.importances["best_val_accuracy"].get) == "lr"
    )
    assert max(t.importances["latency_ms"], key=t.importances["latency_ms"].get) == "attention"
    few = tuning_report(
        StudyData(
            study="mo",
            session="s",
            dataset="synthetic",
            meta=meta,
            trials=pd.DataFrame(rows[:7]),
            preset="cpu",
        )
    )
    assert few.importances == {}
