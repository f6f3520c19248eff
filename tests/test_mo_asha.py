"""MO-ASHA on synthetic learning curves: with one objective it stops exactly what Ray's ASHA
stops (the same asynchronous event order, fed to both); with two it never stops a trial that is
non-dominated at its rung, so a trial whose curves keep the final order ends on the front it
belongs to, while dominated trials are stopped."""

import random
from types import SimpleNamespace

import numpy as np
import pytest
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from orchestrate.report.pareto import on_front
from orchestrate.run.mo_asha import ParetoASHA, promotable

EPOCHS, GRACE, RF = 27, 1, 3


def curves(n: int, seed: int, noise: float) -> dict[str, list[dict]]:
    """Per trial, its per-epoch results: accuracy rising to a final value (with noise), a loss
    falling, a latency fixed by its architecture."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        final, rate, latency = rng.uniform(0.3, 0.9), rng.uniform(0.1, 0.6), rng.uniform(1, 10)
        out[f"t{i:02d}"] = [
            {
                "epoch": e,
                "acc": final * (1 - np.exp(-rate * e)) + noise * rng.normal(),
                "loss": 2 - final * e / EPOCHS + noise * rng.normal(),
                "latency_ms": latency,
            }
            for e in range(1, EPOCHS + 1)
        ]
    return out


def run(scheduler, results: dict[str, list[dict]], seed: int) -> list[tuple[str, int, str]]:
    """Trials report one epoch at a time in a seeded asynchronous order; a stopped trial reports
    no more. Returns every decision (trial, epoch, action)."""
    rng = random.Random(seed)
    trials = {t: SimpleNamespace(trial_id=t) for t in results}
    for trial in trials.values():
        scheduler.on_trial_add(None, trial)
    progress = dict.fromkeys(results, 0)
    decisions = []
    while progress:
        t = rng.choice(sorted(progress))
        result = results[t][progress[t]]
        action = scheduler.on_trial_result(None, trials[t], result)
        decisions.append((t, result["epoch"], action))
        progress[t] += 1
        if action == TrialScheduler.STOP or progress[t] == EPOCHS:
            scheduler.on_trial_complete(None, trials[t], result)
            del progress[t]
    return decisions


@pytest.mark.parametrize(
    "metric, mode, seed", [("acc", "max", 1), ("loss", "min", 2), ("acc", "max", 3)]
)
def test_with_one_objective_it_stops_exactly_what_ray_asha_stops(metric, mode, seed):
    results = curves(40, seed, noise=0.05)
    settings = dict(
        time_attr="epoch",
        max_t=EPOCHS - 1,
        grace_period=GRACE,
        reduction_factor=RF,
        stop_last_trials=False,
    )
    ray_asha = run(AsyncHyperBandScheduler(metric=metric, mode=mode, **settings), results, seed)
    ours = run(ParetoASHA([(metric, mode)], **settings), results, seed)
    assert ours == ray_asha
    stopped = {t for t, _, a in ray_asha if a == TrialScheduler.STOP}
    assert 10 < len(stopped) < 40  # the rungs did stop trials, and not all of them


def test_a_non_dominated_result_always_goes_on_and_a_deeply_dominated_one_stops():
    rng = np.random.default_rng(7)
    for k in (2, 3):
        objectives = [(str(i), "max") for i in range(k)]
        for _ in range(200):
            recorded = [tuple(p) for p in rng.uniform(size=(rng.integers(1, 30), k))]
            new = tuple(rng.uniform(size=k))
            if on_front([*recorded, new], objectives)[-1]:
                assert promotable(recorded, new, RF)
            worst = tuple(min(p[i] for p in recorded) - 1 for i in range(k))  # below them all
            assert not promotable(recorded, worst, RF)  # every recorded result is ahead of it


def test_with_two_objectives_the_final_front_survives_and_dominated_trials_stop():
    # accuracy curves that keep their final order (one shared shape), latency fixed: a trial on
    # the final front of (accuracy, latency) is non-dominated at every rung it reaches
    rng = np.random.default_rng(11)
    results = {}
    for i in range(40):
        final, latency = rng.uniform(0.3, 0.9), rng.uniform(1, 10)
        results[f"t{i:02d}"] = [
            {"epoch": e, "acc": final * (1 - np.exp(-0.3 * e)), "latency_ms": latency}
            for e in range(1, EPOCHS + 1)
        ]
    objectives = [("acc", "max"), ("latency_ms", "min")]
    scheduler = ParetoASHA(
        objectives,
        time_attr="epoch",
        max_t=EPOCHS - 1,
        grace_period=GRACE,
        reduction_factor=RF,
        stop_last_trials=False,
    )
    decisions = run(scheduler, results, seed=5)
    finals = [(r[-1]["acc"], r[-1]["latency_ms"]) for r in results.values()]
    front = {t for t, on in zip(results, on_front(finals, objectives), strict=True) if on}
    stopped = {t for t, _, a in decisions if a == TrialScheduler.STOP}
    assert front and not front & stopped  # every trial of the final front trained to the end
    assert len(stopped) >= 15  # and the search did stop the dominated ones early
    # the fastest trial, however accurate, is on the front: it ran to the end
    fastest = min(results, key=lambda t: results[t][0]["latency_ms"])
    assert fastest in front and fastest not in stopped


def test_a_mode_other_than_max_or_min_is_refused():
    with pytest.raises(ValueError, match="objective latency_ms: mode 'fast', not 'max' or 'min'"):
        ParetoASHA([("acc", "max"), ("latency_ms", "fast")])
