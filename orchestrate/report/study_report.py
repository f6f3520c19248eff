"""What a study's report holds: built by ``orchestrate.report.build`` from what
``orchestrate.report.collect`` read, shown by ``orchestrate.report.render`` (which reads this and
nothing of the building)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd


@dataclass
class TuningReport:
    """A tuning study's own part (``orchestrate.report.tuning``)."""

    goals: list  # [(metric, "max" | "min"), ...]
    constraints: list[str]
    params: list[str]  # the sampled parameters, in the study file's order
    trials: pd.DataFrame  # one row per trial in sampling order: name, param_*, fate, goals, ...
    best: dict | None  # the best ranked trial: name, run_id, sampled, values, test_accuracy
    front: list[str]  # names of the trials on the Pareto front (several objectives)
    reference: list | None  # the hypervolume's reference point, one value per objective
    history: pd.DataFrame  # per trial: trial_hours, best, hypervolume
    importances: dict  # objective -> parameter -> importance
    importance_method: str
    rerun_study: dict | None = None  # the grid study file that re-runs it (report.tuning)
    rerun: str = ""  # the command that runs it, once written beside the report


@dataclass
class StudyReport:
    study: str
    description: str
    kind: str
    dataset: str
    session: str
    preset: str  # the preset the session ran ("" or "None" for none)
    title: str  # what was measured how: dataset, protocol, loss weights, leak handling
    table: pd.DataFrame  # one row per cell
    contrasts: pd.DataFrame  # one row per contrast (CONTRAST_COLUMNS)
    trials: pd.DataFrame  # one row per trial
    cost: dict
    paper_note: str = ""  # why the paper's numbers are not comparable, where they are not
    classes: list[str] = field(default_factory=list)
    confusion: dict = field(default_factory=dict)  # cell label -> summed confusion matrix
    curves: dict = field(default_factory=dict)  # cell label -> mean validation accuracy per epoch
    tuning: TuningReport | None = None
    distribution_png: bytes | None = None
    ignored: int = 0  # finished runs of the experiment that are not trials of this plan
