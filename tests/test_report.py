"""The study report: rebuilt from MLflow alone it equals the one written at the end of the run,
its readable table (terminal, Markdown, LaTeX, HTML) prints MLflow's numbers with a legend of
every column, its HTML page renders in a real headless Chromium, and its statistics columns
answer the two questions ("on this test set", "across training runs") apart."""

import io
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import chromium
from mlflow.tracking import MlflowClient
from scipy import stats

from orchestrate.report import (
    RUNS_COLUMNS,
    TESTSET_COLUMNS,
    StudyReport,
    columns,
    comparison_columns,
    format_table,
    latex_escape,
    latex_table,
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
                         log_checkpoints=False, reports=str(tmp / "reports"))  # fmt: skip
    out = io.StringIO()
    summary = run_study(load_study(path), options, out=out)
    return tmp, uri, summary, out.getvalue()


@pytest.mark.slow
def test_the_report_is_written_locally_and_no_model_is_registered_when_none_was_logged(finished):
    tmp, uri, summary, printed = finished
    local = tmp / "reports" / summary["session"]
    assert {"report.html", "report.tex", "study_table.md"} <= {p.name for p in local.iterdir()}
    assert printed.rstrip().endswith("best model: not logged (--no-log-checkpoints)")
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("minireport").experiment_id
    assert not client.search_logged_models([experiment]) and summary["model"] is None


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
    # the terminal: the readable table, each question's label above its columns
    assert "Accuracy (%)" in printed and "Δ: cell minus reference (Basic)" in printed
    assert "-- on this test set --" in printed and "across training runs" in printed
    assert re.search(r"sign-flip test over \d+ subjects?\)", printed)
    # the runs' paired difference is the difference of the logged test accuracies
    # the table's accuracy is the mean of the child runs' test accuracy
    runs = client.search_runs([client.get_experiment_by_name("minireport").experiment_id],
                              "tags.study_parent = 'false'")  # fmt: skip
    basic_runs = [r.data.metrics["test_accuracy"] for r in runs if r.data.tags["cell"] == "basic"]
    assert basic.accuracy == pytest.approx(100 * sum(basic_runs) / 2)
    joint_runs = [r.data.metrics["test_accuracy"] for r in runs if r.data.tags["cell"] == "joint"]
    assert joint.runs_diff == pytest.approx(100 * (sum(joint_runs) - sum(basic_runs)) / 2)
    assert (tmp / "rebuilt" / "report.tex").read_text().startswith(r"\begin{table}")
    parent_files = {a.path for a in client.list_artifacts(summary["parent_run_id"])}
    assert {"report.html", "report.tex", "study_table.md", "class_distribution.png",
            "study.toml"} <= parent_files  # fmt: skip


def test_a_bad_report_request_is_one_line_and_exit_code_2(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert report_main(["--study", "nothing", "--tracking-uri", uri]) == 2
    assert capsys.readouterr().err == f"error: no MLflow store at {tmp_path / 'mlflow.db'}\n"
    assert not (tmp_path / "mlflow.db").exists()  # nothing created
    MlflowClient(uri).create_experiment("other")
    assert report_main(["--study", "nothing", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: study 'nothing' has no experiment") and err.count("\n") == 1


READABLE = ["Cell", "n", "Accuracy (%)", "95% CI (%)", "Macro F1 (%)", "Paper (%)",
            "Δ (points)", "95% CI (points)", "MDE (points)",
            "Δ (points)", "95% CI (points)", "MDE (points)", "Seeds needed"]  # fmt: skip


def markdown_rows(markdown: str) -> tuple[list[str], list[list[str]]]:
    """The Markdown table's headers and rows, unescaped."""
    lines = [x for x in markdown.splitlines() if x.startswith("|")]

    def cells(line: str) -> list[str]:
        texts = re.split(r"(?<!\\)\|", line.strip()[1:-1])
        return [re.sub(r"\\(.)", r"\1", t.strip()) for t in texts]

    return cells(lines[0]), [cells(x) for x in lines[2:]]


@pytest.mark.slow
def test_the_html_report_renders_in_headless_chromium(finished):
    from playwright.sync_api import sync_playwright

    tmp, uri, summary, _ = finished
    client = MlflowClient(uri)
    page_file = Path(client.download_artifacts(summary["parent_run_id"], "report.html", str(tmp)))
    markdown = Path(client.download_artifacts(summary["parent_run_id"], "study_table.md",
                                              str(tmp))).read_text()  # fmt: skip
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = chromium(p)
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        page.goto(page_file.as_uri())
        table = page.locator("table").first
        assert table.is_visible()
        # the readable headers, with units; no raw column name (ci95_low, testset_p_holm, ...)
        assert table.locator("thead tr").last.locator("th").all_inner_texts() == READABLE
        headers = page.locator("th").all_inner_texts()
        assert not [h for h in headers if "_" in h or "holm" in h.lower()], headers
        # the header row above the column names says which question each group answers
        questions = page.locator("th.question").all_inner_texts()
        assert questions == ["on this test set", "across training runs"]
        # the same rows and numbers as the Markdown table, the numbers right-aligned
        rows = table.locator("tbody tr")
        shown = [rows.nth(i).locator("td").all_inner_texts() for i in range(rows.count())]
        assert shown == markdown_rows(markdown)[1] and shown[1][0] == "Basic + joint loss"
        align = table.locator("td.num").first.evaluate("td => getComputedStyle(td).textAlign")
        assert align == "right"
        legend = page.locator("dl.legend")
        terms = legend.locator("dt").all_inner_texts()
        assert legend.is_visible() and terms[:6] == READABLE[:6]
        assert {"Δ (points), on this test set", "95% CI (points), across training runs",
                "* and **"} <= set(terms)  # fmt: skip
        assert "percentage points" in legend.inner_text() and "Holm" in legend.inner_text()
        images = page.locator("img")
        assert images.count() == 3  # confusion matrices, curves, class distribution
        for i in range(images.count()):
            loaded = images.nth(i).evaluate("im => im.complete && im.naturalWidth > 100")
            assert loaded, f"image {i} did not render"
        page.screenshot(path=str(ARTIFACTS / "study_report.png"), full_page=True)
        browser.close()
    assert (ARTIFACTS / "study_report.png").stat().st_size > 20_000


def tabular(tex: str) -> tuple[str, list[str]]:
    """The header line and the body lines of the tabular."""
    lines = tex.splitlines()
    middle = lines.index(r"\midrule")
    return lines[middle - 1], lines[middle + 1 : lines.index(r"\bottomrule")]


def latex_cells(line: str) -> list[str]:
    assert line.endswith(r" \\"), line
    return [c.strip() for c in re.split(r"(?<!\\)&", line.removesuffix(r" \\"))]


def unlatex(text: str) -> str:
    """A cell as printed: signs and escaped characters back to text (not a general parser)."""
    text = text.replace("$-$", "-").replace(r"$\pm$", "±").replace(r"$\Delta$", "Δ")
    return re.sub(r"\\([&%$#_{}])", r"\1", text)


def close(text: str, value: float) -> None:
    """``text`` is ``value`` rounded to two decimals."""
    assert abs(float(text) - value) <= 0.005 + 1e-9, (text, value)


def interval(text: str) -> list[float]:
    return [float(x) for x in text.strip("[]").split(", ")]


def t_interval(values) -> tuple[float, float, float]:
    x = np.asarray(values, dtype=float)
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return x.mean(), x.mean() - half, x.mean() + half


@pytest.mark.slow
def test_the_latex_and_markdown_tables_print_mlflows_numbers(finished):
    tmp, uri, summary, _ = finished
    client = MlflowClient(uri)
    folder = str(tmp / "tables")
    tex = Path(client.download_artifacts(summary["parent_run_id"], "report.tex", folder))
    md = Path(client.download_artifacts(summary["parent_run_id"], "study_table.md", folder))
    header, body = tabular(tex.read_text())
    assert [unlatex(c) for c in latex_cells(header)] == READABLE
    rows = {cells[0]: cells for cells in ([unlatex(c) for c in latex_cells(x)] for x in body)}
    assert list(rows) == ["Basic", "Basic + joint loss"]
    # recomputed from the child runs' metrics, paired by (seed, fold)
    experiment = client.get_experiment_by_name("minireport").experiment_id
    runs = client.search_runs([experiment], "tags.study_parent = 'false'")
    accuracy = {(r.data.tags["cell"], int(r.data.tags["seed"]), int(r.data.tags["fold"])):
                100 * r.data.metrics["test_accuracy"] for r in runs}  # fmt: skip
    for key, label in [("basic", "Basic"), ("joint", "Basic + joint loss")]:
        values = [v for (cell, *_), v in accuracy.items() if cell == key]
        f1 = [100 * r.data.metrics["test_macro_f1"] for r in runs if r.data.tags["cell"] == key]
        row = rows[label]
        mean, low, high = t_interval(values)
        shown_mean, shown_std = row[2].split(" ± ")
        assert row[1] == str(len(values)) == "2"
        close(shown_mean, mean), close(shown_std, np.std(values, ddof=1))
        for shown, value in zip(interval(row[3]), (low, high), strict=True):
            close(str(shown), value)
        close(row[4], np.mean(f1))
    assert rows["Basic"][5] == "61.50" and rows["Basic + joint loss"][5] == ""
    assert rows["Basic"][6:] == [""] * 7  # the reference: no difference to itself
    diffs = [accuracy["joint", s, f] - accuracy["basic", s, f]
             for (cell, s, f) in accuracy if cell == "basic"]  # fmt: skip
    mean, low, high = t_interval(diffs)
    joint = rows["Basic + joint loss"]
    # every test image is shared and every seed paired: the per-image difference averaged over
    # seeds is the mean run difference, on this test set as across training runs
    close(joint[6].rstrip("*"), mean), close(joint[9].rstrip("*"), mean)
    if np.std(diffs) > 0:
        for shown, value in zip(interval(joint[10]), (low, high), strict=True):
            close(str(shown), value)
    p = stats.ttest_1samp(diffs, 0).pvalue if np.std(diffs) > 0 else 1.0  # one compared cell
    assert joint[9].count("*") == (2 if p < 0.01 else 1 if p < 0.05 else 0)
    # the Markdown table: the same rows, each header naming its question
    md_headers, md_rows = markdown_rows(md.read_text())
    assert md_rows == list(rows.values())
    assert [h.split(", ")[0] for h in md_headers] == READABLE
    assert md_headers[6] == "Δ (points), on this test set"


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


def report_of(cells: dict[str, list[Predictions]], labels: list[str] | None = None) -> StudyReport:
    """A report whose first cell is the reference, its table built as build_report does (the
    accuracy columns constants)."""
    keys = list(cells)
    labels = labels or [k.title() for k in keys]
    comparisons = {k: compare_cells(cells[keys[0]], cells[k], n_resamples=2000) for k in keys[1:]}
    base = pd.DataFrame({
        "cell": labels, "key": keys, "trials": [len(cells[k]) for k in keys],
        "accuracy": 60.0, "std": 1.5, "ci95_low": 56.27, "ci95_high": 63.73,
        "macro_f1": 50.0, "paper": math.nan,
    })  # fmt: skip
    table = pd.concat([base, comparison_columns(keys, comparisons)], axis=1)
    return StudyReport("mini", "constructed", "grid", "synthetic", "s", labels[0], table,
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
    # in the readable table: ** on this test set (Holm p < 0.01), none across training runs
    printed = format_table(report)
    assert (
        "sign-flip test over 300 images" in printed and "over 3 paired (seed, fold) runs" in printed
    )
    lucky_line = next(x for x in printed.splitlines() if x.startswith("Lucky"))
    mde = f"{lucky_row.testset_mde:.2f}"  # noise floors beside the differences
    assert lucky_line.split()[-9:] == ["+4.00**", "[+2.33,", "+5.67]", mde, "+4.00", "[-15.87,",
                                       "+23.87]", f"{lucky_row.runs_mde:.2f}", "34"]  # fmt: skip


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
    line = next(x for x in format_table(report).splitlines() if x.startswith("Better"))
    assert line.endswith("+13.33  n/a: 1 seed x 1 fold")  # no interval, no mark
    assert "| +13.33 | n/a: 1 seed x 1 fold |" in markdown_table(report)
    assert "<td class=num>n/a: 1 seed x 1 fold</td>" in to_html(report)
    assert r"+13.33 & n/a: 1 seed x 1 fold &  &  \\" in latex_table(report)


def test_the_legend_explains_every_column_and_mark_in_words():
    ref, oth = seeds([(range(150, 160), ()), (range(160, 175), ())])
    report = report_of({"basic": ref, "other": oth})
    markdown, page, tex = markdown_table(report), to_html(report), latex_table(report)
    explained = dict(legend(report))
    assert list(explained)[:-1] == [c.name for c in columns(report)] and "* and **" in explained
    for name, meaning in explained.items():
        escaped = name.replace("*", "\\*")
        assert f"- **{escaped}**: {meaning.replace('_', chr(92) + '_')}." in markdown, name
        assert f"<dt>{name}</dt>" in page and latex_escape(f"{name}: {meaning}.") in tex, name
    # units in words, and the two questions
    assert "in percent" in explained["Accuracy (%)"]
    assert "percentage points" in explained["Δ (points), on this test set"]
    assert "resampling the 300 images" in explained["95% CI (points), on this test set"]
    assert "2 paired (seed, fold) runs" in explained["Δ (points), across training runs"]
    assert "below 0.05 and below 0.01" in explained["* and **"]
    # the raw columns' names only in the note on the CSV, never as headers
    assert (
        r"testset\_p\_holm" in markdown
        and "<th>testset" not in page
        and "| testset" not in markdown
    )
    assert page.count("<th colspan=") == 3 and page.count("class=question>") == 2
    assert "on this test set</th>" in page and "dl class=legend" in page
    terminal = format_table(report)
    assert "* / **: Holm-adjusted p < 0.05 / 0.01" in terminal
    row = next(x for x in markdown.splitlines() if x.startswith("| Other"))
    assert row.startswith("| Other | 2 | 60.00 ± 1.50 | [56.27, 63.73] | 50.00 | +4.17")


def test_latex_escapes_every_special_character():
    assert latex_escape("a_b%c&d#e$f{g}h~i^j\\k ± Δ") == (
        r"a\_b\%c\&d\#e\$f\{g\}h\textasciitilde{}i\textasciicircum{}j\textbackslash{}k "
        r"$\pm$ $\Delta$"
    )


def balanced(tex: str) -> bool:
    """Braces nest and math dollars pair, escaped ones aside."""
    plain = re.sub(r"\\[{}$&%#_]", "", tex)
    depth = 0
    for ch in plain:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0 and plain.count("$") % 2 == 0


def test_the_latex_table_has_booktabs_rules_a_row_per_cell_and_escaped_names():
    ref, lucky, steady = lucky_and_steady()
    labels = ["Basic", "PSA & SE_50%", "#1 {x} ~y^2 $z\\w"]
    report = report_of({"basic": ref, "lucky": lucky, "steady": steady}, labels)
    tex = latex_table(report)
    lines = tex.splitlines()
    rules = [r"\toprule", r"\midrule", r"\bottomrule"]
    assert [lines.count(r) for r in rules] == [1, 1, 1]
    assert [lines.index(r) for r in rules] == sorted(lines.index(r) for r in rules)
    header, body = tabular(tex)
    width = len(latex_cells(header))
    assert width == 12  # no paper column: no cell has the paper's number
    assert rf"\begin{{tabular}}{{l{'r' * (width - 1)}}}" in tex
    assert len(body) == 3 and all(len(latex_cells(x)) == width for x in body)
    assert [latex_cells(x)[0] for x in body] == [
        "Basic",
        r"PSA \& SE\_50\%",
        r"\#1 \{x\} \textasciitilde{}y\textasciicircum{}2 \$z\textbackslash{}w",
    ]
    assert latex_cells(body[0])[1:4] == ["3", r"60.00 $\pm$ 1.50", "[56.27, 63.73]"]
    lucky = latex_cells(body[1])
    assert lucky[5:7] + lucky[8:10] == ["+4.00**", "[+2.33, +5.67]", "+4.00", "[$-$15.87, +23.87]"]
    assert lucky[11] == "34"  # seeds needed
    # each question's label spans its columns, ruled below
    assert r"\multicolumn{3}{c}{on this test set} & \multicolumn{4}{c}{across training runs}" in tex
    assert r"\cmidrule(lr){6-8} \cmidrule(lr){9-12}" in tex
    assert r"\caption[Test accuracy on synthetic (mini)]{" in tex and r"Accuracy (\%): " in tex
    assert balanced(tex) and tex.startswith(r"\begin{table}") and tex.endswith(r"\end{table}")
