"""What a study's report holds: built by ``orchestrate.report`` from what ``orchestrate.collect``
read, shown by ``orchestrate.render`` (which reads this and nothing of the building)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd


@dataclass
class StudyReport:
    study: str
    description: str
    kind: str
    dataset: str
    session: str
    title: str  # what was measured how: dataset, protocol, loss weights, leak handling
    table: pd.DataFrame  # one row per cell
    contrasts: pd.DataFrame  # one row per contrast (CONTRAST_COLUMNS)
    trials: pd.DataFrame  # one row per trial
    cost: dict
    paper_note: str = ""  # why the paper's numbers are not comparable, where they are not
    classes: list[str] = field(default_factory=list)
    confusion: dict = field(default_factory=dict)  # cell label -> summed confusion matrix
    curves: dict = field(default_factory=dict)  # cell label -> mean validation accuracy per epoch
    best: pd.DataFrame | None = None  # tuning: best trials
    importances: dict = field(default_factory=dict)  # tuning: parameter -> importance
    distribution_png: bytes | None = None
    ignored: int = 0  # finished runs of the experiment that are not trials of this plan
