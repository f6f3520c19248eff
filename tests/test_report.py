"""The study report: rebuilt from MLflow alone it equals the one written at the end of the run,
its HTML page renders in a real headless Chromium, and its statistics columns answer the two
questions ("on this test set", "across training runs") apart, with their legend."""

import io
import math
from pathlib import Path

import pandas as pd
import pytest
from conftest import chromium
from mlflow.tracking import MlflowClient

from orchestrate.report import (
    RUNS_COLUMNS,
    TESTSET_COLUMNS,
    StudyReport,
    comparison_columns,
    format_table,
    legend,
    markdown_table,
    to_html,
)
from orchestrate.report import main as report_main
from orchestrate.runner import RunOptions, run_study
from orchestrate.statistics import Predictions, compare_cells, holm
from search_spaces import load_study

STUDY = """
name = "minireport"
description = "two cells, two seeds"
kind = "grid"
reference = "basic"
[run]
dataset = "synthetic"
seeds = 2
[defaults]
backbone = "resnet18"
attention = "none"
[[cells]]
name = "basic"
label = "Basic"
loss = "ce"
paper = { synthetic = 61.5 }
[[cells]]
name = "joint"
label = "Basic + joint loss"
loss = "island"
"""
ARTIFACTS = Path(__file__).parent.parent / "test-artifacts"


@pytest.fixture(scope="module")
def finished(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    path = tmp / "minireport.toml"
    path.write_text(STUDY + "[presets.tiny]\nepochs = 2\nbatch_size = 16\n"
                    "synthetic_subjects = 5\nsynthetic_images_per_class = 2\n")  # fmt: skip
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    options = RunOptions(preset="tiny", storage=str(tmp / "ray"), tracking_uri=uri,
                         log_checkpoints=False)  # fmt: skip
    out = io.StringIO()
    summary = run_study(load_study(path), options, out=out)
    return tmp, uri, summary, out.getvalue()


@pytest.mark.slow
def test_the_report_rebuilt_from_mlflow_equals_the_one_of_the_run(finished, capsys):
    tmp, uri, summary, printed = finished
    client = MlflowClient(uri)
    logged = Path(client.download_artifacts(summary["parent_run_id"], "study_table.csv", str(tmp)))
    assert report_main(["--run", summary["parent_run_id"], "--tracking-uri", uri,
                        "--out", str(tmp / "rebuilt")]) == 0  # fmt: skip
    rebuilt = tmp / "rebuilt" / "study_table.csv"
    assert rebuilt.read_text() == logged.read_text()
    assert report_main(["--study", "minireport", "--tracking-uri", uri,
                        "--out", str(tmp / "by_name")]) == 0  # fmt: skip
    assert (tmp / "by_name" / "study_table.csv").read_text() == logged.read_text()
    table = pd.read_csv(rebuilt)
    assert list(table.cell) == ["Basic", "Basic + joint loss"] and list(table.trials) == [2, 2]
    basic, joint = table.iloc[0], table.iloc[1]
    assert basic.ci95_low <= basic.accuracy <= basic.ci95_high and basic.paper == 61.5
    assert set(TESTSET_COLUMNS + RUNS_COLUMNS) <= set(table.columns)
    assert basic[TESTSET_COLUMNS + RUNS_COLUMNS].isna().all()  # the reference: no comparison
    # on this test set: the synthetic set names each test image's subject, the unit resampled
    assert joint.testset_unit == "subject" and joint.testset_n >= 1
    assert 0 <= joint.testset_p_holm <= 1 and joint.testset_significant in ("yes", "no")
    assert joint.testset_ci_low <= joint.testset_diff <= joint.testset_ci_high
    assert pd.isna(joint.testset_mde) or joint.testset_mde > 0
    # across training runs: two seeds of one fold are two paired runs
    assert joint.runs_n == 2 and 0 <= joint.runs_p_holm <= 1
    assert joint.runs_significant in ("yes", "no")
    assert joint.runs_ci_low <= joint.runs_diff <= joint.runs_ci_high
    assert pd.isna(joint.seeds_needed) or joint.seeds_needed >= 2
    # the runs' paired difference is the difference of the logged test accuracies
    assert "diff vs ref" in printed and "reference: Basic" in printed
    assert "on this test set (unit: subject)" in printed and "across training runs" in printed
    # the table's accuracy is the mean of the child runs' test accuracy
    runs = client.search_runs([client.get_experiment_by_name("minireport").experiment_id],
                              "tags.study_parent = 'false'")  # fmt: skip
    basic_runs = [r.data.metrics["test_accuracy"] for r in runs if r.data.tags["cell"] == "basic"]
    assert basic.accuracy == pytest.approx(100 * sum(basic_runs) / 2)
    joint_runs = [r.data.metrics["test_accuracy"] for r in runs if r.data.tags["cell"] == "joint"]
    assert joint.runs_diff == pytest.approx(100 * (sum(joint_runs) - sum(basic_runs)) / 2)
    markdown = (tmp / "rebuilt" / "study_table.md").read_text()
    assert "`testset_mde`" in markdown and "`seeds_needed`" in markdown
    parent_files = {a.path for a in client.list_artifacts(summary["parent_run_id"])}
    assert {"report.html", "study_table.md", "class_distribution.png", "study.toml"} <= parent_files


def test_a_bad_report_request_is_one_line_and_exit_code_2(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert report_main(["--study", "nothing", "--tracking-uri", uri]) == 2
    assert capsys.readouterr().err == f"error: no MLflow store at {tmp_path / 'mlflow.db'}\n"
    assert not (tmp_path / "mlflow.db").exists()  # nothing created
    MlflowClient(uri).create_experiment("other")
    assert report_main(["--study", "nothing", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: study 'nothing' has no experiment") and err.count("\n") == 1


@pytest.mark.slow
def test_the_html_report_renders_in_headless_chromium(finished):
    from playwright.sync_api import sync_playwright

    tmp, uri, summary, _ = finished
    page_file = Path(MlflowClient(uri).download_artifacts(summary["parent_run_id"], "report.html",
                                                          str(tmp)))  # fmt: skip
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = chromium(p)
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        page.goto(page_file.as_uri())
        table = page.locator("table").first
        assert table.is_visible()
        assert "Basic + joint loss" in table.inner_text()
        # the header row above the column names says which question each group answers
        questions = page.locator("th.question")
        names = {questions.nth(i).inner_text() for i in range(questions.count())}
        assert names == {"on this test set", "across training runs"}
        legend = page.locator("dl.legend")
        assert legend.is_visible() and "runs_mde" in legend.inner_text()
        images = page.locator("img")
        assert images.count() == 3  # confusion matrices, curves, class distribution
        for i in range(images.count()):
            loaded = images.nth(i).evaluate("im => im.complete && im.naturalWidth > 100")
            assert loaded, f"image {i} did not render"
        page.screenshot(path=str(ARTIFACTS / "study_report.png"), full_page=True)
        browser.close()
    assert (ARTIFACTS / "study_report.png").stat().st_size > 20_000


def test_cost_counts_gpu_hours_and_what_early_stopping_saved():
    from orchestrate.report import _cost

    frame = pd.DataFrame(
        {
            "status": ["FINISHED"] * 3,
            "trial_seconds": [3600.0, 1800.0, 900.0],
            "train_seconds": [3000.0, 1000.0, 500.0],
            "mean_images_per_second": [100.0, 200.0, 300.0],
            "stopped_early": [False, True, True],
            "planned_epochs": [10, 10, 10],
            "epochs_run": [10, 2, 5],
        }
    )
    cost = _cost(frame, gpus=0.25)
    assert cost["trial_hours"] == pytest.approx(1.75) and cost["gpu_hours"] == pytest.approx(0.4375)
    # 8 epochs of 500 s and 5 epochs of 100 s not run
    assert cost["saved_hours"] == pytest.approx((8 * 500 + 5 * 100) / 3600)
    assert cost["saved_fraction"] == pytest.approx(4500 / (6300 + 4500))
    assert cost["images_per_second"] == pytest.approx(200.0) and cost["stopped_early"] == 2


# the statistics columns, built from constructed predictions (no Ray, no MLflow)


def trial(correct, seed=0):
    labels = [i % 7 for i in range(len(correct))]
    predictions = [y if ok else (y + 1) % 7 for y, ok in zip(labels, correct, strict=True)]
    return Predictions(seed, 0, [f"img{i:04d}" for i in range(len(correct))], labels, predictions)


def report_of(cells: dict[str, list[Predictions]]) -> StudyReport:
    """A report whose first cell is the reference, its table built as build_report does."""
    keys = list(cells)
    comparisons = {k: compare_cells(cells[keys[0]], cells[k], n_resamples=2000) for k in keys[1:]}
    base = pd.DataFrame({
        "cell": [k.title() for k in keys], "key": keys, "trials": [len(cells[k]) for k in keys],
        "accuracy": 60.0, "std": math.nan, "ci95_low": math.nan, "ci95_high": math.nan,
        "macro_f1": 50.0, "paper": math.nan,
    })  # fmt: skip
    table = pd.concat([base, comparison_columns(keys, comparisons)], axis=1)
    return StudyReport("mini", "constructed", "grid", "synthetic", "s", keys[0].title(), table,
                       pd.DataFrame(), "method", {"trials": 0})  # fmt: skip


def seeds(moves):
    """Per seed (images the other cell gains, images it loses) on 300 images, both cells right
    on the first 150."""
    ref, oth = [], []
    for seed, (gained, lost) in enumerate(moves):
        ref.append(trial([i < 150 or i in lost for i in range(300)], seed))
        oth.append(trial([i < 150 or i in gained for i in range(300)], seed))
    return ref, oth


def lucky_and_steady():
    """The reference, a cell with per-seed run differences +12, -4, +4 (one lucky seed; see
    tests/test_statistics.py), and a steady cell right wherever the reference is plus 12, 12
    and 13 images (+4, +4, +4.33)."""
    ref, lucky = seeds([(range(150, 186), ()), ((), range(186, 198)), (range(198, 210), ())])
    steady = []
    for t, gained in zip(ref, (range(210, 222), range(222, 234), range(234, 247)), strict=True):
        pairs = enumerate(zip(t.predictions, t.labels, strict=True))
        right = [p == y or i in gained for i, (p, y) in pairs]
        steady.append(trial(right, t.seed))
    return ref, lucky, steady


def test_a_lucky_seed_is_significant_on_this_test_set_and_not_across_runs():
    # per-seed run differences +12, -4, +4 (see tests/test_statistics.py): the image-level
    # test is sure of a 4-point gain, the paired t-test over the three runs is not (p = 0.48)
    ref, lucky, steady = lucky_and_steady()
    report = report_of({"basic": ref, "lucky": lucky, "steady": steady})
    lucky_row, steady_row = report.table.iloc[1], report.table.iloc[2]
    assert (lucky_row.testset_significant, lucky_row.runs_significant) == ("yes", "no")
    # the steady cell gains 12, 12, 13 images in its seeds: both questions say yes
    assert (steady_row.testset_significant, steady_row.runs_significant) == ("yes", "yes")
    assert lucky_row.testset_unit == "image" and lucky_row.testset_n == 300
    assert lucky_row.runs_n == 3 and lucky_row.runs_sd == pytest.approx(8.0)
    assert lucky_row.seeds_needed == 34  # (t_0.975 + t_0.80) * 8 / sqrt(K) <= 4 from K = 34
    printed = format_table(report)
    assert "on this test set (unit: image)" in printed and "across training runs" in printed
    assert "+4.00 [" in printed and "MDE" in printed and "seeds" in printed


def test_holm_adjusts_each_question_on_its_own():
    ref, lucky, steady = lucky_and_steady()
    cells = {"basic": ref, "lucky": lucky, "steady": steady}
    table = report_of(cells).table
    raw = [compare_cells(ref, cells[k], n_resamples=2000) for k in ("lucky", "steady")]
    test_p = holm([r["test_set"]["p_value"] for r in raw])
    runs_p = holm([r["runs"]["p_value"] for r in raw])
    assert list(table.testset_p_holm[1:]) == pytest.approx(test_p)
    assert list(table.runs_p_holm[1:]) == pytest.approx(runs_p)
    assert runs_p[1] == pytest.approx(2 * min(r["runs"]["p_value"] for r in raw))


def test_one_seed_and_one_fold_print_cannot_be_judged_instead_of_a_p_value():
    report = report_of({
        "basic": [trial([i < 150 for i in range(300)])],
        "better": [trial([i < 190 for i in range(300)])],
    })  # fmt: skip
    row = report.table.iloc[1]
    assert row.runs_significant == "n/a: 1 seed x 1 fold" and pd.isna(row.runs_p_holm)
    assert row.runs_n == 1 and row.runs_diff == pytest.approx(40 / 3)
    assert row.testset_significant == "yes"  # 40 images, all gained: McNemar p = 2 / 2**40
    line = [x for x in format_table(report).splitlines() if x.startswith("Better")][-1]
    runs_part = line.split("|")[1]
    assert runs_part.strip() == "+13.33   n/a: 1 seed x 1 fold"
    assert "| n/a: 1 seed x 1 fold |" in markdown_table(report)
    assert "<td>n/a: 1 seed x 1 fold</td>" in to_html(report)


def test_the_legend_explains_every_statistics_column():
    ref, oth = seeds([(range(150, 160), ()), (range(160, 175), ())])
    report = report_of({"basic": ref, "other": oth})
    markdown, page = markdown_table(report), to_html(report)
    explained = " ".join(names for names, _ in legend(report))
    for column in ["trials", "accuracy", "std", "ci95_low", *TESTSET_COLUMNS, *RUNS_COLUMNS]:
        assert column in explained, column
        assert f"`{column}" in markdown or f", {column}" in markdown, column
    assert "ON THIS TEST SET" in markdown and "ACROSS TRAINING RUNS" in markdown
    assert page.count("<th colspan=") == 3 and page.count("class=question>") == 2
    assert "on this test set</th>" in page and "dl class=legend" in page
    terminal = format_table(report)
    assert "MDE: smallest difference detectable with 80% power" in terminal
    # counts print as integers, p-values with four decimals
    row = next(x for x in markdown.splitlines() if x.startswith("| Other"))
    assert "| image | 300 |" in row and "| 2 |" in row
