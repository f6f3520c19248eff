"""The demo teaches something: `make demo` (table4 at the cpu preset, on the built-in synthetic
set) ends with cells clearly above chance, differences with intervals, and where to look next.
This is the demo's own study at its own size, through the same run_study the command calls."""

import io
import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrate.run.runner import RunOptions, run_study
from search_spaces import load_study

CHANCE = 100 / 7
ROOT = Path(__file__).parent.parent
# where the demo's output is shown, and the lines that differ by run (timings, paths, the model)
SHOWN = ("README.md", "docs/getting-started.md")
RUN_BOUND = ("[", "report: ", "best model: ", "next: ", "cost: ", "...")


def masked(line: str) -> str:
    """A printed line with its numbers, runs of spaces and rules made alike (a latency measured
    on a busy machine may have a digit more or its decimals fewer: 52 for 20.5, and its column
    and rule a character more), and the cost table's front column too (which cells are on it
    follows those latencies)."""
    line = re.sub(r"-{3,}", "---", re.sub(r"\d+(\.\d+)?", "#", " ".join(line.split())))
    return re.sub(r" (yes|below .*)$", " <front>", line)


def shown_lines(path: Path) -> list[str]:
    """The demo's output as a page shows it, but the lines that differ by run."""
    block = re.search(r"```\n((?:4 to run|table4 on synthetic).*?)```", path.read_text(), re.S)
    assert block, f"{path} shows no demo output"
    return [x for x in block.group(1).splitlines() if x.strip() and not x.startswith(RUN_BOUND)]


@pytest.mark.slow
def test_the_demo_cells_are_clearly_above_chance(ray_cluster, tmp_path):
    study = load_study("table4")
    # without logging the four models (torch.export, seconds each of the suite's two cores):
    # tests/test_tracking.py checks logged models on its own study
    options = RunOptions(
        preset="cpu",
        storage=str(tmp_path / "ray"),
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        reports=str(tmp_path / "reports"),
        log_checkpoints=False,
    )
    out = io.StringIO()
    summary = run_study(study, options, out=out)
    table = summary["table"].set_index("cell")  # by the cells' labels
    labels = {c.name: c.label for c in study.cells}
    assert list(table.index) == list(labels.values())
    # the targets of the demo: best cell >= 60%, mean of the cells >= 50%
    assert table.accuracy.max() >= 60 and table.accuracy.mean() >= 50, table.accuracy
    assert table.accuracy.min() > 2 * CHANCE
    # the paper's claims and the interaction, each with its difference and interval
    contrasts = summary["report"].contrasts
    assert list(contrasts.comparison) == [c.label for c in study.contrasts]
    assert set(contrasts.family) == {"the paper's claims", "interaction"}
    assert contrasts.testset_ci_low.notna().all() and contrasts.testset_ci_high.notna().all()
    assert (contrasts.testset_ci_low <= contrasts.testset_diff).all()
    assert (contrasts.testset_diff <= contrasts.testset_ci_high).all()
    # every trial fully tracked, under the study's one parent run
    client = MlflowClient(options.tracking_uri)
    experiment = client.get_experiment_by_name("table4").experiment_id
    all_runs = client.search_runs([experiment])
    parents = [r for r in all_runs if r.data.tags["study_parent"] == "true"]
    children = [r for r in all_runs if r.data.tags["study_parent"] == "false"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 4 and {r.info.status for r in children} == {"FINISHED"}
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    epochs = study.presets["cpu"]["config"]["epochs"]
    for run in children:
        assert run.data.params["epochs"] == str(epochs)
        assert run.data.params["synthetic_difficulty"] == "0.3"
        for metric in ("val_accuracy", "train_loss", "lr"):
            assert len(client.get_metric_history(run.info.run_id, metric)) == epochs
        assert "test_macro_f1" in run.data.metrics
        assert run.data.tags["notes"].startswith("synthetic: 40 subjects")  # how the trial ran
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {
            "confusion_matrix.png",
            "curves.png",
            "per_class_report.json",
            "predictions.json",
        } <= names
        # the printed accuracies are MLflow's
        accuracy = 100 * run.data.metrics["test_accuracy"]
        assert table.loc[labels[run.data.tags["cell"]]].accuracy == pytest.approx(accuracy)
        assert f"{accuracy:.2f}" in out.getvalue()
    parent_files = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"study_table.csv", "study_table.md", "report.html", "report.tex"} <= parent_files
    assert "paper" not in table or table.paper.isna().all()  # no paper number on this set
    # progress names the selection metric, never test accuracy (nothing is picked by test)
    progress = [x for x in out.getvalue().splitlines() if x.startswith("[")]
    assert any("best validation 0." in x for x in progress)
    assert not any("test" in x for x in progress)
    # what the README and the docs show is what it prints (numbers aside)
    printed = {masked(x) for x in out.getvalue().splitlines()}
    for page in SHOWN:
        lines = shown_lines(ROOT / page)
        assert len(lines) >= 12, page
        for line in lines:
            near = [x for x in out.getvalue().splitlines() if x[:20] == line[:20]]
            assert masked(line) in printed, (page, line, near)
    # the output ends with what to look at next
    tail = out.getvalue().rstrip().splitlines()[-3:]
    assert tail[0].startswith("next: browse the runs: open http")
    assert tail[1] == f"report: {tmp_path / 'reports' / summary['session'] / 'report.html'}"
    assert tail[2] == "best model: not logged (--no-log-checkpoints)"
