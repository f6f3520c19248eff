"""MO-ASHA: asynchronous successive halving that stops trials by Pareto rank, never by a scalar.

Ray Tune's ASHA (``AsyncHyperBandScheduler``) takes one metric; a study that trades accuracy
against latency would have to fold them into a weighted sum, which decides the trade-off before
the search has seen it. This scheduler keeps ASHA's rungs and bookkeeping (its one bracket, its
``grace_period``, ``reduction_factor`` and ``max_t``) and changes only the rule at a rung, after
Schmucker et al. (2021, "Multi-objective asynchronous successive halving"):

- with one objective, ASHA's own rule: a trial below the ``1 - 1/rf`` quantile of the results
  recorded at the rung is stopped (so it stops exactly what ASHA stops);
- with several, the results recorded at the rung and the trial's are sorted into Pareto fronts
  (``orchestrate.report.pareto``); the trial goes on while fewer than ``1/rf`` of them lie on fronts
  ahead of its own. A trial non-dominated at its rung always goes on.
"""

from __future__ import annotations

import math

import numpy as np
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler
from ray.tune.schedulers.async_hyperband import _Bracket

from orchestrate.report.pareto import pareto_ranks


def promotable(recorded: list[tuple], values: tuple, rf: float) -> bool:
    """Whether a trial with ``values`` (every objective to maximise) goes on past a rung where
    ``recorded`` were recorded before it."""
    if not recorded:
        return True
    if len(values) == 1:  # ASHA's cutoff, as Ray computes it
        cutoff = np.nanpercentile([r[0] for r in recorded], (1 - 1 / rf) * 100)
        return not values[0] < cutoff
    ranks = pareto_ranks([*recorded, values], [(str(i), "max") for i in range(len(values))])
    ahead = int((ranks[:-1] < ranks[-1]).sum())
    return ahead < (len(recorded) + 1) / rf


class _ParetoBracket(_Bracket):
    def on_result(self, trial, cur_iter: int, cur_rew) -> str:
        """Ray's bracket walk (rungs from the highest), with the vector rule above."""
        for milestone, recorded in self._rungs:
            if cur_iter >= milestone and trial.trial_id in recorded and not self._stop_last_trials:
                break
            if cur_iter < milestone or trial.trial_id in recorded:
                continue
            go_on = promotable(list(recorded.values()), cur_rew, self.rf)
            recorded[trial.trial_id] = cur_rew
            return TrialScheduler.CONTINUE if go_on else TrialScheduler.STOP
        return TrialScheduler.CONTINUE


class ParetoASHA(AsyncHyperBandScheduler):
    """ASHA over ``objectives`` [(metric, "max" | "min"), ...] (see the module docstring)."""

    def __init__(
        self,
        objectives: list[tuple[str, str]],
        time_attr: str = "training_iteration",
        max_t: int = 100,
        grace_period: int = 1,
        reduction_factor: float = 4,
        stop_last_trials: bool = True,
    ):
        for metric, mode in objectives:
            if mode not in ("max", "min"):
                raise ValueError(f"objective {metric}: mode {mode!r}, not 'max' or 'min'")
        metric, mode = objectives[0]
        super().__init__(
            time_attr=time_attr,
            metric=metric,
            mode=mode,
            max_t=max_t,
            grace_period=grace_period,
            reduction_factor=reduction_factor,
            stop_last_trials=stop_last_trials,
        )
        self.objectives = list(objectives)
        self._brackets = [
            _ParetoBracket(grace_period, max_t, reduction_factor, 0, stop_last_trials)
        ]

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # the objectives are its own; Tune's single metric does not apply

    def _values(self, result: dict) -> tuple | None:
        """The result's objectives, each turned into one to maximise; None when one is missing."""
        try:
            return tuple(
                float(result[m]) * (1 if mode == "max" else -1) for m, mode in self.objectives
            )
        except (KeyError, TypeError, ValueError):
            return None

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        values = self._values(result)
        if self._time_attr not in result or values is None or any(map(math.isnan, values)):
            return TrialScheduler.CONTINUE
        if result[self._time_attr] >= self._max_t and self._stop_last_trials:
            action = TrialScheduler.STOP
        else:
            action = self._trial_info[trial.trial_id].on_result(
                trial, result[self._time_attr], values
            )
        if action == TrialScheduler.STOP:
            self._num_stopped += 1
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        values = self._values(result)
        if self._time_attr in result and values is not None:
            self._trial_info[trial.trial_id].on_result(trial, result[self._time_attr], values)
        del self._trial_info[trial.trial_id]
