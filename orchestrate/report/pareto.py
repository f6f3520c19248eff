"""Accuracy against cost: Pareto fronts, who dominates whom, and hypervolume (moocore's).

An objective is a metric and its direction, ``("accuracy", "max")`` or ``("latency_ms", "min")``.
A point dominates another when it is at least as good in every objective and better in one;
the front is the points nothing dominates. Equal points dominate neither each other nor are
kept off the front by each other: ties are all on it, or all off it.
"""

from __future__ import annotations

import moocore
import numpy as np

Objectives = list[tuple[str, str]]  # (metric, "max" | "min")


def _oriented(points, objectives: Objectives) -> np.ndarray:
    """The points with every objective turned into one to maximise."""
    sign = np.array([1.0 if mode == "max" else -1.0 for _, mode in objectives])
    return np.asarray(points, dtype=float).reshape(-1, len(objectives)) * sign


def on_front(points, objectives: Objectives) -> np.ndarray:
    """Whether each point is non-dominated (a boolean per row)."""
    if len(points) == 0:
        return np.zeros(0, dtype=bool)
    return moocore.is_nondominated(_oriented(points, objectives), maximise=True, keep_weakly=True)


def pareto_ranks(points, objectives: Objectives) -> np.ndarray:
    """Non-dominated sorting: 0 for the front, 1 for the front of the rest, and so on."""
    return moocore.pareto_rank(_oriented(points, objectives), maximise=True)


def dominators(points, objectives: Objectives) -> list[list[int]]:
    """For each point, the indices of the points that dominate it."""
    p = _oriented(points, objectives)
    at_least = (p[:, None, :] >= p[None, :, :]).all(axis=2)  # [i, j]: i at least as good as j
    better = (p[:, None, :] > p[None, :, :]).any(axis=2)
    dominates = at_least & better
    return [list(np.flatnonzero(dominates[:, j])) for j in range(len(p))]


def hypervolume(points, objectives: Objectives, reference) -> float:
    """The volume the points dominate up to ``reference`` (in the objectives' own units and
    directions: a reference worse than every point counts them all)."""
    if len(points) == 0:
        return 0.0
    ref = _oriented([reference], objectives)[0]
    return float(moocore.hypervolume(_oriented(points, objectives), ref=ref, maximise=True))
