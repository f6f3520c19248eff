"""The demo teaches something: `make demo` (table4 at the cpu preset, on the built-in synthetic
set) ends with cells clearly above chance, differences with intervals, and where to look next.
This is the demo's own study at its own size, through the same run_study the command calls."""

import io

import pytest
from mlflow.tracking import MlflowClient

from orchestrate.runner import RunOptions, run_study
from search_spaces import load_study

CHANCE = 100 / 7


@pytest.mark.slow
def test_the_demo_cells_are_clearly_above_chance(ray_cluster, tmp_path):
    study = load_study("table4")
    options = RunOptions(preset="cpu", storage=str(tmp_path / "ray"),
                         tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                         reports=str(tmp_path / "reports"))  # fmt: skip
    out = io.StringIO()
    summary = run_study(study, options, out=out)
    table = summary["table"].set_index("cell")
    assert list(table.index) == ["basic", "basic_joint", "basic_psa", "basic_psa_joint"]
    # the targets of the demo (issue 13): best cell >= 60%, mean of the cells >= 50%
    assert table.accuracy.max() >= 60 and table.accuracy.mean() >= 50, table.accuracy
    assert table.accuracy.min() > 2 * CHANCE
    # every compared cell has its difference with an interval, on this test set
    compared = table.drop(index="basic")
    assert compared.testset_ci_low.notna().all() and compared.testset_ci_high.notna().all()
    assert (compared.testset_ci_low <= compared.testset_diff).all()
    assert (compared.testset_diff <= compared.testset_ci_high).all()
    # the printed accuracies are MLflow's
    client = MlflowClient(options.tracking_uri)
    experiment = client.get_experiment_by_name("table4").experiment_id
    for run in client.search_runs([experiment], "tags.study_parent = 'false'"):
        accuracy = 100 * run.data.metrics["test_accuracy"]
        assert table.loc[run.data.tags["cell"]].accuracy == pytest.approx(accuracy)
        assert f"{accuracy:.2f}" in out.getvalue()
    # the output ends with what to look at next
    tail = out.getvalue().rstrip().splitlines()[-3:]
    assert tail[0].startswith("next: browse the runs: open http")
    assert tail[1] == f"report: {tmp_path / 'reports' / summary['session'] / 'report.html'}"
    assert tail[2].startswith("best model: models:/")
