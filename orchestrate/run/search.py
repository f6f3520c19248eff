"""How a tuning study searches: Optuna's TPE inside Ray Tune, ASHA early stopping (MO-ASHA with
several objectives), and the Optuna study kept in the study's storage.

- Ray's OptunaSearch reports each epoch's metric to Optuna as an intermediate value and, when a
  trial ends, tells Optuna its last value as COMPLETE, also when ASHA stopped it after a few
  epochs. TPE would then rank a low-fidelity score as if it were final. Here a trial that did
  not reach its final result (the trainable's ``completed`` flag) is told as PRUNED instead, and
  a trial that failed (divergence, an exception) as FAIL: no metric is invented for either.
- TPE is multivariate with ``group=True``, which models the parameters that are sampled
  together (a ``when`` space is conditional: ``lam1`` exists only with Island loss) as their
  own groups instead of treating absent values as independent draws; ``constant_liar`` keeps
  concurrent trials from being proposed at the same point.
- With several objectives, Optuna's study has one direction per objective and is told every
  objective's final value; a study's constraints are set on each Optuna trial, so a trial that
  breaks one is infeasible (TPE ranks it behind every feasible one), never given a low score.
- ASHA's rungs (grace * reduction**k epochs) all fall before a trial's last epoch: a rung on the
  last epoch would stop a trial after its training and before its test evaluation, saving
  nothing. Trials past the last rung run to the end (``stop_last_trials=False``).
- The Optuna study is a journal file: ``<storage>/<session>/optuna.journal`` for a local
  storage; for an object store, a local file under ``~/.cache/fer-ablation/optuna`` mirrored into
  the session after every trial and fetched back on ``--resume``. Tune's own searcher
  checkpoint restores the sampler, and the journal keeps the trials' history, numbered on,
  for ``optuna-dashboard``.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import optuna
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

JOURNAL = "optuna.journal"
LOCAL_JOURNALS = Path.home() / ".cache" / "fer-ablation" / "optuna"


class FinalOnlyOptunaSearch(OptunaSearch):
    """Ray's OptunaSearch that tells Optuna PRUNED for a trial stopped early (see above) and,
    for a study with ``constraints``, each constraint's excess over its bound as the trial's
    constraint (Optuna's ``Trial.set_constraint``, named as the study file writes it: over 0
    is infeasible), also for a pruned trial, from its last result."""

    def __init__(self, *args, constraints: tuple = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.constraints = tuple(constraints)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if result is not None and not error and trial_id not in self._completed_trials:
            for c in self.constraints:
                if math.isfinite(excess := c.excess(float(result.get(c.metric, math.nan)))):
                    self._ot_trials[trial_id].set_constraint(str(c), excess)
        if result is not None and not error and not result.get("completed"):
            result = None  # with error False, OptunaSearch tells Optuna PRUNED
        super().on_trial_complete(trial_id, result=result, error=error)


def tpe(seed: int = 0) -> optuna.samplers.TPESampler:
    """TPE; with several objectives its multi-objective form (MOTPE), which at tens of trials
    models what NSGA-II's generations need hundreds for. It reads trials' constraints itself."""
    with warnings.catch_warnings():  # group=True is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, group=True, constant_liar=True
        )


def asha(epochs: int, settings, session: str = "") -> ASHAScheduler | None:
    """ASHA on the study's goal with every rung before the last epoch (pausable on Ctrl-C,
    see orchestrate.run.interrupt): Ray's on one metric, MO-ASHA (``orchestrate.run.mo_asha``) on
    several objectives; None (no early stopping) when the grace period leaves no such rung."""
    from orchestrate.run.interrupt import PausableASHA, PausableParetoASHA

    if settings.grace_period > epochs - 1:
        return None
    rungs = dict(
        time_attr="epoch",
        max_t=epochs - 1,  # rungs at or below max_t: all before the last epoch
        grace_period=settings.grace_period,
        reduction_factor=settings.reduction_factor,
        stop_last_trials=False,
    )
    if len(settings.goals) > 1:
        return PausableParetoASHA(session, objectives=settings.goals, **rungs)
    ((metric, mode),) = settings.goals
    return PausableASHA(session, metric=metric, mode=mode, **rungs)


def journal_path(storage, session: str) -> Path:
    if storage.local:
        path = Path(storage.join(session)) / JOURNAL
    else:
        path = LOCAL_JOURNALS / f"{session}.journal"
        if not path.exists() and (text := storage.read_text(f"{session}/{JOURNAL}")):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def optuna_storage(storage, session: str) -> optuna.storages.JournalStorage:
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(journal_path(storage, session))))
