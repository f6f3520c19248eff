"""What a tuning study found: every trial with its fate, the best configuration and the command
that re-runs it with seeds, the optimisation history, parameter importances and, with several
objectives, the Pareto front and its hypervolume. Pure functions of a ``StudyData``.

- A trial's objectives are its reported values: validation figures (never test: test accuracy
  is shown for the selected configuration only, after the choice) and its architecture's cost.
- Ranked are the trials that trained to their last epoch and meet every constraint; a trial
  stopped at a rung has low-fidelity values, a trial that breaks a constraint is infeasible.
- The best configuration is the ranked trial with the best first objective (ties: the earlier
  trial); with constraints, "best" means the best among feasible trials.
- The re-run is a grid study (``rerun.toml`` beside the report) with the best configuration
  (and, with several objectives, every other trial on the front) as cells, run over seeds, so
  a tuned model enters the paper's comparisons with the statistics a grid gets; selecting on
  validation and re-training with fresh seeds keeps the choice from flattering its test score.
- The hypervolume's reference point is stated: each objective's bound where a constraint gives
  one, else its worst ranked value moved a tenth of the values' range further (so that every
  ranked trial adds volume).
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd

from orchestrate.report.pareto import dominators, hypervolume, on_front
from orchestrate.report.study_report import TuningReport

IMPORTANCE_METHOD = "fANOVA (Optuna's FanovaImportanceEvaluator, 64 trees, seed 0)"
# fewer ranked trials than this give no importances: a forest over a handful of points
# attributes noise (4 trials once gave the learning rate half of the latency's variance)
MIN_IMPORTANCE_TRIALS = 8
RERUN_FILE = "rerun.toml"
RERUN_SEEDS = 3
MAX_RERUN_CELLS = 6


def settings_of(meta: dict, preset: str):
    """The study's tune settings as the session ran them (its preset's changes applied)."""
    from search_spaces.study import TuneSettings, _tune_keys

    def fail(key, problem):  # the study file was checked when it ran: this is a logged copy
        return ValueError(f"logged study file: {key}: {problem}")

    table = {**meta.get("tune", {}), **meta.get("presets", {}).get(preset, {}).get("tune", {})}
    if "objectives" in table:
        table = {k: v for k, v in table.items() if k not in ("metric", "mode")}
    return TuneSettings(**_tune_keys(table, "tune", fail))


def parse_sampled(text: str, space: dict) -> dict:
    """A trial's ``sampled`` tag (``k=v,k=v``) as the study file types its values."""
    out = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=", 1)
        param = space.get(key, {"type": "categorical", "choices": []})
        if param["type"] == "categorical":
            out[key] = next((c for c in param["choices"] if str(c) == value), value)
        else:
            out[key] = int(value) if param["type"] == "int" else float(value)
    return out


def _fate(row, rungs: list[int]) -> str:
    from orchestrate.store.tracking import failure_reason

    if row.status == "FINISHED" and not row.stopped_early:
        return "finished"
    if row.status == "FINISHED":
        rung = rungs.index(row.epochs_run) + 1 if row.epochs_run in rungs else None
        return (
            f"stopped at rung {rung} (epoch {row.epochs_run})"
            if rung
            else f"stopped after epoch {row.epochs_run}"
        )
    if row.status == "FAILED":
        return f"failed: {failure_reason(row.error)}"
    return "interrupted" if row.status == "KILLED" else row.status.lower()


def tuning_report(data, n_importance_trees: int = 64) -> TuningReport:
    from search_spaces.study import asha_rungs as rung_epochs

    meta, trials = data.meta, data.trials
    settings = settings_of(meta, data.preset)
    goals, constraints = settings.goals, list(settings.constraints)
    space = {p["name"]: p for p in meta.get("space", [])}
    frame = trials.copy()
    frame["order"] = [
        int(n.rsplit("-", 1)[-1]) if re.search(r"-\d+$", n) else i
        for i, n in enumerate(frame.get("name", pd.Series(dtype=str)))
    ]
    frame = frame.sort_values("order").reset_index(drop=True)
    sampled = [parse_sampled(s, space) for s in frame.sampled]
    params = [p for p in space if any(p in s for s in sampled)]
    epochs = int(frame.planned_epochs.max()) if len(frame) else 0
    stops = rung_epochs(epochs, settings.grace_period, settings.reduction_factor)
    frame["fate"] = [_fate(r, stops) for r in frame.itertuples()]
    for name in params:
        frame[f"param_{name}"] = [s.get(name) for s in sampled]
    for metric, _ in goals:
        if metric not in frame:
            frame[metric] = math.nan
    for c in constraints:
        if c.metric not in frame:
            frame[c.metric] = math.nan
    frame["violates"] = [  # only where the value is known: a trial that failed first has none
        "; ".join(
            f"{c.metric} {getattr(r, c.metric):.4g} breaks {c}"
            for c in constraints
            if c.excess(getattr(r, c.metric)) > 0
        )
        for r in frame.itertuples()
    ]
    complete = frame.fate.eq("finished") & frame[[m for m, _ in goals]].notna().all(axis=1)
    frame["ranked"] = complete & frame.violates.eq("")
    frame["front"], frame["dominated_by"] = False, ""
    ranked = frame[frame.ranked]
    if len(ranked):
        points = ranked[[m for m, _ in goals]].to_numpy(dtype=float)
        for index, on, by in zip(
            ranked.index, on_front(points, goals), dominators(points, goals), strict=True
        ):
            frame.at[index, "front"] = bool(on)
            frame.at[index, "dominated_by"] = ", ".join(ranked.name.iloc[i] for i in by)
    best = _best(frame, goals)
    frame = selected_test_only(frame, best)
    reference = _reference(frame[frame.ranked], goals, constraints)
    report = TuningReport(
        goals=goals,
        constraints=[str(c) for c in constraints],
        params=params,
        trials=frame,
        best=best,
        front=list(frame.name[frame.front]) if len(goals) > 1 else [],
        reference=reference,
        history=_history(frame, goals, reference),
        importances=_importances(frame, goals, space, params, n_importance_trees),
        importance_method=IMPORTANCE_METHOD,
    )
    report.rerun_study = rerun_study(data, report)
    return report


def selected_test_only(trials: pd.DataFrame, best: dict | None) -> pd.DataFrame:
    """The trials with their test figures blanked but the selected one's: chosen on
    validation, a tuning study shows test figures for its choice alone."""
    test = [c for c in trials.columns if c.startswith("test_")]
    keep = trials.run_id == (best["run_id"] if best else None)
    return trials.assign(**{c: trials[c].where(keep) for c in test})


def _best(frame: pd.DataFrame, goals) -> dict | None:
    ranked = frame[frame.ranked]
    if not len(ranked):
        return None
    metric, mode = goals[0]
    order = ranked.sort_values([metric, "order"], ascending=[mode == "min", True])
    row = order.iloc[0]
    params = {c[6:]: v for c, v in row.items() if c.startswith("param_") and _present(v)}
    return {
        "name": row["name"],
        "run_id": row.run_id,
        "sampled": row.sampled,
        "params": params,
        "values": {m: float(row[m]) for m, _ in goals},
        "test_accuracy": float(row.get("test_accuracy", math.nan)),
    }


def _reference(ranked: pd.DataFrame, goals, constraints) -> list[float] | None:
    if len(goals) < 2 or not len(ranked):
        return None
    reference = []
    for metric, mode in goals:
        bounds = [
            c.bound for c in constraints if c.metric == metric and (c.op == "<=") == (mode == "min")
        ]
        values = ranked[metric].astype(float)
        if bounds:
            reference.append(min(bounds) if mode == "min" else max(bounds))
            continue
        spread = values.max() - values.min() or abs(values.iloc[0]) or 1.0
        worst = values.max() + spread / 10 if mode == "min" else values.min() - spread / 10
        reference.append(worst)
    return reference


def _history(frame: pd.DataFrame, goals, reference) -> pd.DataFrame:
    """After each trial in sampling order: the trial-hours spent, the best first objective
    among ranked trials so far, and (several objectives) the front's hypervolume."""
    metric, mode = goals[0]
    hours = frame.trial_seconds.fillna(0).cumsum() / 3600
    best, rows = math.nan, []
    for i, row in frame.iterrows():
        if row.ranked:
            value = float(row[metric])
            better = math.isnan(best) or (value > best if mode == "max" else value < best)
            best = value if better else best
        out = {"name": row["name"], "trial_hours": hours[i], "best": best}
        if reference is not None:
            seen = frame.loc[:i][frame.loc[:i].ranked]
            points = seen[[m for m, _ in goals]].to_numpy(dtype=float)
            out["hypervolume"] = hypervolume(points, goals, reference)
        rows.append(out)
    return pd.DataFrame(rows)


def _importances(frame, goals, space, params, trees: int) -> dict:
    """Per objective, each always-sampled parameter's importance over the ranked trials
    (conditional ones are left out: the evaluator needs every trial to have sampled them)."""
    import optuna

    always = [p for p in params if not space[p].get("when")]
    ranked = frame[frame.ranked]
    if len(ranked) < MIN_IMPORTANCE_TRIALS or not always:
        return {}
    distributions = {}
    for name in always:
        p = space[name]
        if p["type"] == "categorical":
            distributions[name] = optuna.distributions.CategoricalDistribution(p["choices"])
        elif p["type"] == "int":
            distributions[name] = optuna.distributions.IntDistribution(p["low"], p["high"])
        else:
            distributions[name] = optuna.distributions.FloatDistribution(
                p["low"], p["high"], log=p["type"] == "loguniform"
            )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        directions=["maximize" if m == "max" else "minimize" for _, m in goals]
    )
    for _, row in ranked.iterrows():
        study.add_trial(
            optuna.trial.create_trial(
                params={n: row[f"param_{n}"] for n in always},
                distributions=distributions,
                values=[float(row[m]) for m, _ in goals],
            )
        )
    # fANOVA (a random forest's variance decomposition) uses every trial; Optuna's default,
    # PED-ANOVA, compares the top 10% with the rest, which tens of trials cannot populate
    evaluator = optuna.importance.FanovaImportanceEvaluator(n_trees=trees, seed=0)
    out = {}
    for i, (metric, _) in enumerate(goals):
        if ranked[metric].nunique() < 2:
            continue  # nothing varies: nothing to attribute
        out[metric] = dict(
            optuna.importance.get_param_importances(
                study, evaluator=evaluator, target=lambda t, i=i: t.values[i]
            )
        )
    return out


# ------------------------------------------------------------------------------ the re-run


def rerun_study(data, report: TuningReport) -> dict | None:
    """The grid study that re-runs the best configuration (and the front's others) over seeds,
    as the TOML tables of a study file."""
    if report.best is None:
        return None
    meta, frame = data.meta, report.trials
    names = [report.best["name"], *[n for n in report.front if n != report.best["name"]]]
    cells = []
    for name in names[:MAX_RERUN_CELLS]:
        row = frame[frame.name == name].iloc[0]
        sampled = {p: row[f"param_{p}"] for p in report.params if _present(row[f"param_{p}"])}
        role = "best" if name == report.best["name"] else "on the front"
        cells.append({"name": name.replace("-", "_"), "label": f"{name} ({role})", **sampled})
    presets = {}
    for preset, table in meta.get("presets", {}).items():
        presets[preset] = {k: v for k, v in table.items() if k != "tune"}
    run = {**meta.get("run", {}), "seeds": RERUN_SEEDS}
    if data.data_path:
        run["data_path"] = data.data_path
    return {
        "name": f"{data.study}_rerun",
        "description": f"{data.study}'s tuned configurations (session {data.session}) over "
        f"{RERUN_SEEDS} seeds",
        "kind": "grid",
        "reference": cells[0]["name"],
        "run": run,
        "defaults": meta.get("defaults", {}),
        "cells": cells,
        "presets": presets,
    }


def _present(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def rerun_command(path, preset: str) -> str:
    flag = f" --preset {preset}" if preset not in ("", "None") else ""
    return f"python -m orchestrate.ablation --study {path}{flag}"


def toml_text(tables: dict) -> str:
    """A study file's text: top-level keys, then tables (``[run]``), arrays of tables
    (``[[cells]]``) and nested tables (``[presets.cpu.fer2013]``)."""
    lines: list[str] = []

    def value(v) -> str:
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        raise TypeError(f"no TOML form for {v!r}")

    def table(header: str, entries: dict, array: bool = False) -> None:
        # an array's entries (cells) keep their dicts inline: paper = { fer2013 = 74.26 }
        plain = {k: v for k, v in entries.items() if not isinstance(v, dict) or array}
        nested = {k: v for k, v in entries.items() if k not in plain}
        if header:
            lines.extend(["", f"[[{header}]]" if array else f"[{header}]"])
        lines.extend(f"{k} = {value(v)}" for k, v in plain.items())
        for key, sub in nested.items():
            table(f"{header}.{key}" if header else key, sub)

    top = {k: v for k, v in tables.items() if not isinstance(v, (dict, list))}
    table("", top)
    for key, entries in tables.items():
        if isinstance(entries, list):
            for entry in entries:
                table(key, entry, array=True)
        elif isinstance(entries, dict):
            table(key, entries)
    return "\n".join(lines).lstrip("\n") + "\n"
