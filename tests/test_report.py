"""The study report: rebuilt from MLflow alone it equals the one written at the end of the run,
and its HTML page renders in a real headless Chromium."""

import io
from pathlib import Path

import pandas as pd
import pytest
from conftest import chromium
from mlflow.tracking import MlflowClient

from orchestrate.report import main as report_main
from orchestrate.runner import RunOptions, run_study
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
    assert pd.isna(basic["diff"]) and 0 <= joint.p_holm <= 1
    assert joint.diff_ci_low <= joint["diff"] <= joint.diff_ci_high
    assert "diff vs ref" in printed and "reference: Basic" in printed
    # the table's accuracy is the mean of the child runs' test accuracy
    runs = client.search_runs([client.get_experiment_by_name("minireport").experiment_id],
                              "tags.study_parent = 'false'")  # fmt: skip
    basic_runs = [r.data.metrics["test_accuracy"] for r in runs if r.data.tags["cell"] == "basic"]
    assert basic.accuracy == pytest.approx(100 * sum(basic_runs) / 2)
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
