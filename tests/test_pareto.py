"""Pareto fronts, dominance and hypervolume against hand-computed 2- and 3-objective cases, with
ties and mixed directions; and the report's front of cells by accuracy against latency."""

import math

import pandas as pd
import pytest

from orchestrate.report.build import _front
from orchestrate.report.pareto import dominators, hypervolume, on_front, pareto_ranks

ACC_LAT = [("accuracy", "max"), ("latency_ms", "min")]


def test_two_objectives_with_mixed_directions_and_ties():
    # (accuracy %, latency ms): B and B' tie; C is worse than B in both; D only faster
    points = [(70, 10), (80, 20), (80, 20), (75, 25), (60, 5), (60, 30)]
    assert on_front(points, ACC_LAT).tolist() == [True, True, True, False, True, False]
    assert pareto_ranks(points, ACC_LAT).tolist() == [0, 0, 0, 1, 0, 2]  # C ahead of the last
    # the tied pair dominates neither each other; the last point is below everything but C
    assert dominators(points, ACC_LAT) == [[], [], [], [1, 2], [], [0, 1, 2, 3, 4]]
    # reference (50 %, 40 ms): rectangles from each front point, their union by hand:
    # latency 5..10 -> 60-50 wide; 10..20 -> 70-50; 20..40 -> 80-50
    expected = (10 - 5) * 10 + (20 - 10) * 20 + (40 - 20) * 30
    assert hypervolume(points, ACC_LAT, (50, 40)) == pytest.approx(expected)
    # a dominated point adds nothing; a reference no point beats counts nothing
    assert hypervolume(points[:3] + points[4:5], ACC_LAT, (50, 40)) == pytest.approx(expected)
    assert hypervolume(points, ACC_LAT, (90, 1)) == 0


def test_three_objectives_by_hand():
    objectives = [("a", "max"), ("b", "max"), ("c", "min")]
    points = [(1, 1, 0), (2, 0.5, 0), (1, 1, 1), (0.5, 0.5, 0.5)]
    assert on_front(points, objectives).tolist() == [True, True, False, False]
    assert dominators(points, objectives) == [[], [], [0], [0, 1]]
    # reference (0, 0, 2): boxes 1x1x2 and 2x0.5x2 overlap in 1x0.5x2
    assert hypervolume(points, objectives, (0, 0, 2)) == pytest.approx(2 + 2 - 1)
    assert hypervolume([], objectives, (0, 0, 2)) == 0


def test_the_report_names_the_cells_that_dominate_each_dominated_cell():
    table = pd.DataFrame(
        {
            "cell": ["Basic", "PSA", "PSA + joint", "Slow", "Unmeasured"],
            "accuracy": [60.0, 70.0, 72.0, 65.0, 90.0],
            "latency_ms": [2.0, 4.0, 4.0, 9.0, math.nan],
        }
    )
    out = _front(table)
    assert out.front.tolist() == [True, False, True, False, None]
    assert out.dominated_by.tolist() == ["", "PSA + joint", "", "PSA, PSA + joint", ""]
    alone = _front(table.iloc[:1].copy())  # one cell: no front to speak of
    assert alone.front.tolist() == [None]
