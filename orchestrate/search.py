"""Optuna's TPE inside Ray Tune, told only what a finished trial really scored.

Ray's OptunaSearch reports each epoch's metric to Optuna as an intermediate value and, when a
trial ends, tells Optuna its last value as COMPLETE, also when ASHA stopped it after a few
epochs. TPE would then rank a low-fidelity score as if it were final. Here a trial that did not
reach its final result (the trainable's ``completed`` flag) is told as PRUNED instead: TPE keeps
it, ordered by its last intermediate value, below every completed trial.
"""

from __future__ import annotations

from ray.tune.search.optuna import OptunaSearch


class FinalOnlyOptunaSearch(OptunaSearch):
    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if result is not None and not error and not result.get("completed"):
            result = None  # with error False, OptunaSearch tells Optuna PRUNED
        super().on_trial_complete(trial_id, result=result, error=error)
