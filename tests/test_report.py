"""The study report: rebuilt from MLflow alone it equals the one written at the end of the run;
its two readable tables (cells, contrasts; terminal, Markdown, LaTeX, HTML) print MLflow's
numbers; its HTML page renders in a real headless Chromium; the contrasts a study file declares
are tested family by family; and every sentence of its legend is checked against a constructed
case where it must hold."""

import math
import re
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ARTIFACTS, chromium
from mlflow.tracking import MlflowClient
from scipy import stats

from orchestrate.report import statistics
from orchestrate.report.build import CONTRAST_COLUMNS, build_report
from orchestrate.report.build import main as report_main
from orchestrate.report.collect import StudyData
from orchestrate.report.render import (
    cell_columns,
    contrast_columns,
    format_table,
    latex_escape,
    latex_table,
    legend,
    markdown_table,
    to_html,
)
from orchestrate.report.statistics import SIGNIFICANT_SHARE, Predictions, holm, summarize_runs
from search_spaces import STUDY_DIR, load_study

CELLS_READABLE = [
    "Cell",
    "n",
    "Accuracy (%)",
    "95% CI (%)",
    "Macro F1 (%)",
    "Paper (%)",
    "Params (M)",
    "GFLOPs",
    "Latency (ms)",
    "Front",
]
CONTRASTS_READABLE = [
    "Family",
    "Comparison",
    "Δ (points)",
    "95% CI (points)",
    "MDE (points)",
    "Δ (points)",
    "95% CI (points)",
    "MDE (points)",
    "Seeds needed",
]


@pytest.mark.slow
@pytest.mark.xdist_group("finished-study")
def test_the_report_rebuilt_from_mlflow_equals_the_one_of_the_run(finished_study, capsys):
    tmp, uri, summary, printed = (
        finished_study.tmp,
        finished_study.uri,
        finished_study.summary,
        finished_study.out,
    )
    client = MlflowClient(uri)
    logged = {
        name: Path(client.download_artifacts(summary["parent_run_id"], name, str(tmp)))
        for name in ("study_table.csv", "contrasts.csv")
    }
    assert (
        report_main(
            [
                "--run",
                summary["parent_run_id"],
                "--tracking-uri",
                uri,
                "--out",
                str(tmp / "rebuilt"),
            ]
        )
        == 0
    )
    assert (
        report_main(["--study", "minireport", "--tracking-uri", uri, "--out", str(tmp / "by_name")])
        == 0
    )
    for name, path in logged.items():
        assert (tmp / "rebuilt" / name).read_text() == path.read_text()
        assert (tmp / "by_name" / name).read_text() == path.read_text()
    table = pd.read_csv(tmp / "rebuilt" / "study_table.csv")
    assert list(table.cell) == ["Basic", "Basic + joint loss"] and list(table.trials) == [2, 2]
    basic = table.iloc[0]
    assert basic.ci95_low <= basic.accuracy <= basic.ci95_high and basic.paper == 61.5
    contrasts = pd.read_csv(tmp / "rebuilt" / "contrasts.csv")
    assert list(contrasts.columns) == CONTRAST_COLUMNS
    # no declared contrasts: every cell against the reference, one family
    assert len(contrasts) == 1
    joint = contrasts.iloc[0]
    assert (joint.family, joint.comparison) == ("each cell vs Basic", "Basic + joint loss vs Basic")
    assert (joint.plus, joint.minus) == ("joint", "basic")
    # on this test set: the synthetic set names each test image's subject, the unit resampled
    assert joint.testset_unit == "subject" and joint.testset_n >= 1 and joint.testset_p_exact
    assert 0 <= joint.testset_p_holm <= 1 and joint.testset_significant in ("yes", "no")
    if joint.testset_n <= 5:  # the tiny preset's few test subjects: no p < 0.05 possible
        assert joint.testset_note.startswith("n/a: no p < 0.05 is possible with")
        assert math.isnan(joint.testset_ci_low) and math.isnan(joint.testset_mde)
    else:
        assert joint.testset_ci_low <= joint.testset_diff <= joint.testset_ci_high
    # across training runs: two seeds of one fixed split, the paired t-test
    assert (joint.runs_test, joint.runs_n, joint.runs_seeds, joint.runs_folds) == (
        "paired t",
        2,
        2,
        1,
    )
    assert joint.runs_significant in ("yes", "no") and 0 <= joint.runs_p_holm <= 1
    assert joint.runs_ci_low <= joint.runs_diff <= joint.runs_ci_high
    # the terminal: the title, both tables, each question's label above its columns
    assert printed.count("minireport on synthetic (preset tiny): test accuracy") == 1
    assert "leaked images kept" in printed and "Accuracy (%)" in printed
    assert "-- on this test set --" in printed and "across training runs" in printed
    assert re.search(r"CI: the values it does not reject, over \d+ subjects?\)", printed)
    assert "(paired t-test over 2 seeds)" in printed
    # the table's accuracy is the mean of the child runs' test accuracy, and the runs' paired
    # difference the difference of the logged test accuracies
    runs = client.search_runs(
        [client.get_experiment_by_name("minireport").experiment_id], "tags.study_parent = 'false'"
    )

    def of(cell: str) -> list[float]:
        return [r.data.metrics["test_accuracy"] for r in runs if r.data.tags["cell"] == cell]

    assert basic.accuracy == pytest.approx(100 * sum(of("basic")) / 2)
    assert joint.runs_diff == pytest.approx(100 * (sum(of("joint")) - sum(of("basic"))) / 2)
    # every trial logs its split sizes (the k-fold correction reads them)
    assert all(r.data.metrics["train_images"] > r.data.metrics["test_images"] > 0 for r in runs)
    assert (tmp / "rebuilt" / "report.tex").read_text().startswith(r"\begin{table}")
    parent_files = {a.path for a in client.list_artifacts(summary["parent_run_id"])}
    assert {
        "report.html",
        "report.tex",
        "study_table.md",
        "contrasts.csv",
        "class_distribution.png",
        "study.toml",
    } <= parent_files


def test_a_bad_report_request_is_one_line_and_exit_code_2(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert report_main(["--study", "nothing", "--tracking-uri", uri]) == 2
    assert capsys.readouterr().err == f"error: no MLflow store at {tmp_path / 'mlflow.db'}\n"
    assert not (tmp_path / "mlflow.db").exists()  # nothing created
    MlflowClient(uri).create_experiment("other")
    assert report_main(["--study", "nothing", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: study 'nothing' has no experiment") and err.count("\n") == 1


def markdown_tables(markdown: str) -> list[tuple[list[str], list[list[str]]]]:
    """Each Markdown table's headers and rows, unescaped."""

    def cells(line: str) -> list[str]:
        texts = re.split(r"(?<!\\)\|", line.strip()[1:-1])
        return [re.sub(r"\\(.)", r"\1", t.strip()) for t in texts]

    tables, current = [], []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append((cells(current[0]), [cells(x) for x in current[2:]]))
            current = []
    return tables


@pytest.mark.slow
@pytest.mark.xdist_group("finished-study")
def test_the_html_report_renders_in_headless_chromium(finished_study):
    from playwright.sync_api import sync_playwright

    tmp, uri, summary = finished_study.tmp, finished_study.uri, finished_study.summary
    client = MlflowClient(uri)
    page_file = Path(client.download_artifacts(summary["parent_run_id"], "report.html", str(tmp)))
    markdown = Path(
        client.download_artifacts(summary["parent_run_id"], "study_table.md", str(tmp))
    ).read_text()
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = chromium(p)
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        page.goto(page_file.as_uri())
        cells, contrasts = page.locator("table").nth(0), page.locator("table").nth(1)
        assert cells.is_visible() and contrasts.is_visible()
        assert (
            "minireport on synthetic (preset tiny): test accuracy"
            in page.locator("p.title").inner_text()
        )
        # the readable headers, with units; no raw column name (ci95_low, testset_p_holm, ...)
        assert cells.locator("thead tr").last.locator("th").all_inner_texts() == CELLS_READABLE
        assert contrasts.locator("thead tr").last.locator("th").all_inner_texts() == (
            CONTRASTS_READABLE
        )
        headers = page.locator("th").all_inner_texts()
        assert not [h for h in headers if "_" in h or "holm" in h.lower()], headers
        # the header row above the contrasts' columns says which question each group answers
        questions = page.locator("th.question").all_inner_texts()
        assert questions == ["what it costs", "on this test set", "across training runs"]
        # the same rows and numbers as the Markdown tables, the numbers right-aligned
        for table, (_, rows) in zip((cells, contrasts), markdown_tables(markdown), strict=True):
            body = table.locator("tbody tr")
            shown = [body.nth(i).locator("td").all_inner_texts() for i in range(body.count())]
            assert shown == rows
        align = cells.locator("td.num").first.evaluate("td => getComputedStyle(td).textAlign")
        assert align == "right"
        legend_box = page.locator("dl.legend")
        terms = legend_box.locator("dt").all_inner_texts()
        assert legend_box.is_visible() and terms[:6] == CELLS_READABLE[:6]
        assert terms[6:10] == [f"{h}, what it costs" for h in CELLS_READABLE[6:]]
        assert {
            "Δ (points), on this test set",
            "95% CI (points), across training runs",
            "* and **",
            "Family",
        } <= set(terms)
        text = legend_box.inner_text()
        assert "percentage points" in text and "Holm" in text and "not adjusted" in text
        images = page.locator("img")
        alts = images.evaluate_all("ims => ims.map(im => im.alt)")
        assert [a.split(" ")[0] for a in alts] == [
            "each",
            "accuracy",
            "confusion",
            "validation",
            "class",
        ]
        for i in range(images.count()):
            loaded = images.nth(i).evaluate("im => im.complete && im.naturalWidth > 100")
            assert loaded, f"image {i} did not render"
        page.screenshot(path=str(ARTIFACTS / "study_report.png"), full_page=True)
        browser.close()
    assert (ARTIFACTS / "study_report.png").stat().st_size > 20_000


def tabulars(tex: str) -> list[tuple[str, list[str]]]:
    """The header line and the body lines of each tabular."""
    lines, out = tex.splitlines(), []
    for start in [i for i, x in enumerate(lines) if x.startswith(r"\begin{tabular}")]:
        middle = lines.index(r"\midrule", start)
        out.append((lines[middle - 1], lines[middle + 1 : lines.index(r"\bottomrule", start)]))
    return out


def latex_cells(line: str) -> list[str]:
    assert line.endswith(r" \\"), line
    return [c.strip() for c in re.split(r"(?<!\\)&", line.removesuffix(r" \\"))]


def unlatex(text: str) -> str:
    """A cell as printed: signs and escaped characters back to text (not a general parser)."""
    for math_form, plain in (
        ("$-$", "-"),
        (r"$\pm$", "±"),
        (r"$\Delta$", "Δ"),
        (r"$\infty$", "∞"),
        (r"$\dagger$", "†"),
    ):
        text = text.replace(math_form, plain)
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
@pytest.mark.xdist_group("finished-study")
def test_the_latex_and_markdown_tables_print_mlflows_numbers(finished_study):
    tmp, uri, summary = finished_study.tmp, finished_study.uri, finished_study.summary
    client = MlflowClient(uri)
    folder = str(tmp / "tables")
    tex = Path(client.download_artifacts(summary["parent_run_id"], "report.tex", folder))
    md = Path(client.download_artifacts(summary["parent_run_id"], "study_table.md", folder))
    (cell_header, cell_body), (contrast_header, contrast_body) = tabulars(tex.read_text())
    assert [unlatex(c) for c in latex_cells(cell_header)] == CELLS_READABLE
    assert [unlatex(c) for c in latex_cells(contrast_header)] == CONTRASTS_READABLE
    rows = {cells[0]: cells for cells in ([unlatex(c) for c in latex_cells(x)] for x in cell_body)}
    assert list(rows) == ["Basic", "Basic + joint loss"]
    # recomputed from the child runs' metrics, paired by (seed, fold)
    experiment = client.get_experiment_by_name("minireport").experiment_id
    runs = client.search_runs([experiment], "tags.study_parent = 'false'")
    accuracy = {
        (r.data.tags["cell"], int(r.data.tags["seed"]), int(r.data.tags["fold"])): 100
        * r.data.metrics["test_accuracy"]
        for r in runs
    }
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
    joint = [unlatex(c) for c in latex_cells(contrast_body[0])]
    assert joint[:2] == ["each cell vs Basic", "Basic + joint loss vs Basic"]
    diffs = [
        accuracy["joint", s, f] - accuracy["basic", s, f]
        for (cell, s, f) in accuracy
        if cell == "basic"
    ]
    mean, low, high = t_interval(diffs)
    # every test image is shared and every seed paired: the per-image difference averaged over
    # seeds is the mean run difference, on this test set as across training runs
    close(joint[2].rstrip("*"), mean), close(joint[5].rstrip("*"), mean)
    if np.std(diffs) > 0:
        for shown, value in zip(interval(joint[6]), (low, high), strict=True):
            close(str(shown), value)
    p = stats.ttest_1samp(diffs, 0).pvalue if np.std(diffs) > 0 else 1.0  # one contrast
    assert joint[5].count("*") == (2 if p < 0.01 else 1 if p < 0.05 else 0)
    # the Markdown tables: the same rows, each header naming its question
    (md_cell_headers, md_cells), (md_headers, md_contrasts) = markdown_tables(md.read_text())
    assert md_cells == list(rows.values()) and md_contrasts == [joint]
    assert [h.split(", ")[0] for h in md_headers] == CONTRASTS_READABLE
    assert md_headers[2] == "Δ (points), on this test set"
    assert [h.split(", ")[0] for h in md_cell_headers] == CELLS_READABLE


def test_cost_counts_gpu_hours_and_what_early_stopping_saved():
    from orchestrate.report.build import _cost

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


# --------------------------------------------------------------------------------------------
# constructed studies: no Ray, no MLflow; a StudyData as orchestrate.report.collect would read it


def trial(correct, seed=0, fold=0, ids=None, groups=None):
    ids = ids if ids is not None else [f"img{i:04d}" for i in range(len(correct))]
    labels = [i % 7 for i in range(len(correct))]
    predictions = [y if ok else (y + 1) % 7 for y, ok in zip(labels, correct, strict=True)]
    return Predictions(seed, fold, list(ids), labels, predictions, groups)


def study_data(
    cells: dict[str, list[Predictions]],
    meta: dict | None = None,
    dataset: str = "synthetic",
    protocol: str = "official",
    folds: int = 10,
    train_images: int = 1200,
    drop_leaked: bool = False,
    full: dict[str, float] | None = None,
) -> StudyData:
    """A session of finished trials with these predictions; ``meta`` the study file (default:
    the cells in order, labelled by their titled names, the first the reference); ``full`` a
    cell's accuracy on the whole test split (drop_leaked)."""
    rows, predictions = [], {}
    for name, trials in cells.items():
        for k, p in enumerate(trials):
            run_id = f"{name}-{k}"
            right = np.mean(np.array(p.predictions) == np.array(p.labels))
            rows.append(
                {
                    "run_id": run_id,
                    "status": "FINISHED",
                    "cell": name,
                    "seed": p.seed,
                    "fold": p.fold,
                    "trial": run_id,
                    "sampled": "",
                    "stopped_early": False,
                    "error": "",
                    "planned_epochs": 4,
                    "epochs_run": 4,
                    "loss": "island",
                    "lam": "0.01",
                    "lam1": "10.0",
                    "protocol": protocol,
                    "folds": str(folds),
                    "drop_leaked": str(drop_leaked),
                    "test_accuracy": right,
                    "test_macro_f1": 0.5,
                    "train_seconds": 10.0,
                    "trial_seconds": 12.0,
                    "mean_images_per_second": 30.0,
                    "train_images": train_images,
                    "test_images": len(p.ids),
                    **({"test_full_accuracy": full[name] / 100} if full else {}),
                }
            )
            predictions[run_id] = {
                "classes": list("abcdefg"),
                "ids": p.ids,
                "labels": p.labels,
                "predictions": p.predictions,
                "groups": p.groups,
            }
    meta = meta or {
        "kind": "grid",
        "name": "mini",
        "cells": [{"name": n, "label": n.title()} for n in cells],
    }
    return StudyData(
        meta.get("name", "mini"), "s", dataset, meta, pd.DataFrame(rows), predictions=predictions
    )


def seeds(moves, n=300):
    """Per seed (images the other cell gains, images it loses) on n images, both cells right
    on the first half."""
    ref, oth = [], []
    for seed, (gained, lost) in enumerate(moves):
        ref.append(trial([i < n // 2 or i in lost for i in range(n)], seed))
        oth.append(trial([i < n // 2 or i in gained for i in range(n)], seed))
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


def row(report, label: str):
    return report.contrasts.set_index("comparison").loc[label]


def test_a_lucky_seed_is_significant_on_this_test_set_and_not_across_runs():
    # per-seed run differences +12, -4, +4: the image-level test is sure of a 4-point gain, the
    # paired t-test over the three seeds is not (p = 0.48)
    ref, lucky, steady = lucky_and_steady()
    report = build_report(study_data({"basic": ref, "lucky": lucky, "steady": steady}), 2000)
    lucky_row, steady_row = row(report, "Lucky vs Basic"), row(report, "Steady vs Basic")
    assert (lucky_row.testset_significant, lucky_row.runs_significant) == ("yes", "no")
    assert (steady_row.testset_significant, steady_row.runs_significant) == ("yes", "yes")
    assert lucky_row.testset_unit == "image" and lucky_row.testset_n == 300
    assert lucky_row.runs_n == 3 and lucky_row.runs_sd == pytest.approx(8.0)
    assert lucky_row.runs_test == "paired t" and lucky_row.seeds_needed == (
        statistics.seeds_needed(4.0, 8.0)
    )
    printed = format_table(report)
    assert "bootstrap CI, over 300 images)" in printed and "(paired t-test over 3 seeds)" in printed
    line = next(x for x in printed.splitlines() if "Lucky vs Basic" in x)
    mde = f"{lucky_row.testset_mde:.2f}"  # noise floors beside the differences
    assert line.split()[-9:] == [
        "+4.00**",
        "[+2.33,",
        "+5.67]",
        mde,
        "+4.00",
        "[-15.87,",
        "+23.87]",
        f"{lucky_row.runs_mde:.2f}",
        f"{lucky_row.seeds_needed:.0f}",
    ]


def test_holm_adjusts_within_each_family_and_question_on_its_own():
    ref, lucky, steady = lucky_and_steady()
    cells = {"basic": ref, "lucky": lucky, "steady": steady}
    meta = {
        "kind": "grid",
        "cells": [{"name": n, "label": n} for n in cells],
        "contrasts": [
            {"family": "A", "plus": ["lucky"], "minus": ["basic"]},
            {"family": "A", "plus": ["steady"], "minus": ["basic"]},
            {"family": "B", "label": "steady vs lucky", "plus": ["steady"], "minus": ["lucky"]},
        ],
    }
    report = build_report(study_data(cells, meta), 2000)
    c = report.contrasts
    assert list(c.family) == ["A", "A", "B"]
    for question in ("testset", "runs"):
        raw = list(c[f"{question}_p"])
        assert list(c[f"{question}_p_holm"][:2]) == pytest.approx(holm(raw[:2]))
        assert c[f"{question}_p_holm"][2] == pytest.approx(raw[2])  # a family of one
    # the family is printed once, on its first row
    text = format_table(report)
    lines = [x for x in text.splitlines() if "vs" in x and ("[" in x)]
    assert [x.split()[0] for x in lines] == ["A", "steady", "B"]  # "steady vs basic" in A


def test_one_seed_and_one_fold_print_cannot_be_judged_instead_of_a_p_value():
    report = build_report(
        study_data(
            {
                "basic": [trial([i < 150 for i in range(300)])],
                "better": [trial([i < 190 for i in range(300)])],
            }
        )
    )
    c = report.contrasts.iloc[0]
    assert c.runs_significant == "n/a: 1 seed x 1 fold" and pd.isna(c.runs_p_holm)
    assert c.runs_n == 1 and c.runs_diff == pytest.approx(40 / 3)
    assert c.testset_significant == "yes"  # 40 images, all gained: p = 2 / 2**40
    line = next(x for x in format_table(report).splitlines() if "Better vs Basic" in x)
    assert line.endswith("+13.33  n/a: 1 seed x 1 fold")  # no interval, no mark
    assert "across training runs: not asked: one seed and one fold" in format_table(report)
    assert "| +13.33 | n/a: 1 seed x 1 fold |" in markdown_table(report)
    assert "<td class=num>n/a: 1 seed x 1 fold</td>" in to_html(report)
    assert r"+13.33 & n/a: 1 seed x 1 fold &  &  \\" in latex_table(report)


def planted_kfold(effects: dict[str, float], folds=5, seeds=3, per_fold=40, base=0.55, seed=0):
    """Per cell ``seeds`` x ``folds`` trials on disjoint folds of ``per_fold`` images with 4
    images a subject; an image is right with probability base + the cell's effect."""
    rng = np.random.default_rng(seed)
    cells = {}
    for name, effect in effects.items():
        cells[name] = [
            trial(
                rng.random(per_fold) < base + effect,
                s,
                f,
                ids=[f"f{f}-{i}" for i in range(per_fold)],
                groups=[f"S{f}-{i // 4}" for i in range(per_fold)],
            )
            for s in range(seeds)
            for f in range(folds)
        ]
    return cells


def shipped(name: str) -> dict:
    return tomllib.loads((STUDY_DIR / f"{name}.toml").read_text())


def test_table4_reports_the_papers_claims_and_the_interaction_on_a_k_fold_grid():
    effects = {"basic": 0.0, "basic_joint": 0.08, "basic_psa": 0.12, "basic_psa_joint": 0.3}
    data = study_data(
        planted_kfold(effects), shipped("table4"), "ckplus", "kfold", folds=5, train_images=120
    )
    report = build_report(data, 2000)
    c = report.contrasts
    study = load_study("table4")
    assert list(c.comparison) == [x.label for x in study.contrasts]
    assert list(c.family) == ["the paper's claims"] * 4 + ["interaction"]
    assert list(c.plus) == [
        "basic_joint",
        "basic_psa",
        "basic_psa_joint",
        "basic_psa_joint",
        "basic_psa_joint + basic",
    ]
    # every claim and the interaction with its interval, its Holm mark and noise floor
    assert c.testset_ci_low.notna().all() and c.runs_ci_low.notna().all()
    assert (c.testset_ci_low <= c.testset_diff).all()
    assert (c.testset_diff <= c.testset_ci_high).all()
    assert set(c.testset_significant) <= {"yes", "no"} and set(c.runs_significant) <= {"yes", "no"}
    # k-fold: the corrected test over 5 seed-averaged folds, the ratio of the logged sizes
    assert set(c.runs_test) == {"corrected k-fold t"} and set(c.runs_units) == {5}
    assert c.runs_fold_ratio.iloc[0] == pytest.approx(40 / 120)
    interaction = c.iloc[4]
    table = report.table.set_index("key")
    expected = (
        table.accuracy["basic_psa_joint"]
        + table.accuracy["basic"]
        - table.accuracy["basic_psa"]
        - table.accuracy["basic_joint"]
    )
    assert interaction.runs_diff == pytest.approx(expected)
    text = format_table(report)
    for label in c.comparison:
        assert label in text
    assert "the paper's claims" in text and "interaction" in text
    # the planted big gain carries its mark: + both vs + PSA is 18 points on 600 images a cell
    both = row(report, "both beat PSA alone: + both vs + PSA")
    assert both.testset_significant == "yes"
    assert _line_of(text, "both beat PSA alone").split()[-9].endswith("*")


DOCS_EXAMPLE = {"basic": 0.0, "basic_joint": 0.12, "basic_psa": 0.13, "basic_psa_joint": 0.31}


def docs_example() -> str:
    """table4's report on constructed CK+-like predictions: 3 seeds x 10 folds, 100 subjects."""
    cells = planted_kfold(DOCS_EXAMPLE, folds=10, seeds=3, seed=5)
    data = study_data(cells, shipped("table4"), "ckplus", "kfold", folds=10, train_images=320)
    data.preset = "paper"
    return format_table(build_report(data, 2000))


def test_the_docs_report_example_is_what_the_report_prints():
    page = (Path(__file__).parent.parent / "docs" / "report.md").read_text()
    shown = re.search(r"```\n(table4 on ckplus.*?)\n```", page, re.S)
    assert shown, "docs/report.md shows no report"
    assert shown.group(1) == docs_example()


def _line_of(text: str, start: str) -> str:
    return next(x for x in text.splitlines() if start in x)


def test_table5_compares_every_baseline_with_ours():
    effects = {"vgg": 0.0, "resnet": 0.02, "mobilenet": 0.04, "densenet": 0.03, "ours": 0.1}
    report = build_report(
        study_data(
            planted_kfold(effects, seeds=1),
            shipped("table5"),
            "ckplus",
            "kfold",
            folds=5,
            train_images=120,
        ),
        2000,
    )
    c = report.contrasts
    assert set(c.family) == {"ours vs each baseline"}
    assert list(c.plus) == ["ours"] * 4 and list(c.minus) == [
        "vgg",
        "resnet",
        "mobilenet",
        "densenet",
    ]
    # one seed on k-fold: the folds alone, corrected; seed noise cannot be told from the folds'
    assert set(c.runs_test) == {"corrected k-fold t"} and c.seeds_needed.isna().all()


def test_table3_keeps_the_softmax_row_out_of_the_attention_family():
    study = load_study("table3")
    families = {}
    for contrast in study.contrasts:
        families.setdefault(contrast.family, []).append(contrast)
    attention, loss = families.values()
    assert [x.plus for x in attention] == [("se",), ("cbam",), ("eca",), ("aff",), ("psa",)]
    assert {x.minus for x in attention} == {("none",)}
    assert [(x.plus, x.minus) for x in loss] == [(("none",), ("basic",))]


# --------------------------------------------------------------------------------------------
# the legend, sentence by sentence, against constructed cases


def mde_example():
    """300 images, one seed: 10 only the reference gets right, 24 only the other cell."""
    ref = [trial([i < 150 or 150 <= i < 160 for i in range(300)])]
    oth = [trial([i < 150 or 160 <= i < 184 for i in range(300)])]
    return {"basic": ref, "other": oth}


def test_the_mde_sentence_a_difference_below_it_can_still_be_significant():
    report = build_report(study_data(mde_example()))
    c = report.contrasts.iloc[0]
    # the example: +4.67 points below its 5.45-point MDE, yet p = 0.024
    assert c.testset_diff == pytest.approx(14 / 3)
    assert c.testset_mde == pytest.approx(5.45, abs=0.01)
    assert c.testset_diff < c.testset_mde and c.testset_p == pytest.approx(0.0243, abs=1e-4)
    assert c.testset_p == pytest.approx(stats.binomtest(10, 34, 0.5).pvalue)  # exact: McNemar
    meaning = dict(legend(report))["MDE (points), on this test set"]
    # the threshold is this row's: the interval's half-width (3.67 points) over the MDE
    share = (c.testset_ci_high - c.testset_ci_low) / 2 / c.testset_mde
    assert share == pytest.approx(0.67, abs=0.005) and share < SIGNIFICANT_SHARE
    assert "can still be significant, here from 0.67 x MDE" in meaning
    assert "0.70 in the normal limit" in meaning and "cannot be told from noise" not in meaning
    assert c.testset_diff >= share * c.testset_mde  # the bound the sentence gives
    assert "McNemar" in dict(legend(report))["* and **"]


def test_the_interval_sentence_an_interval_can_exclude_zero_without_a_mark():
    # three contrasts in one family: one gains 14 of 300 images and loses 4 (p about 0.03 alone,
    # about 0.09 after Holm over three), its bootstrap interval excluding 0
    ref = [trial([i < 150 for i in range(300)])]
    cells = {
        "basic": ref,
        "a": [trial([i < 164 and not 140 <= i < 144 for i in range(300)])],
        "b": [trial([i < 151 for i in range(300)])],
        "c": [trial([i < 149 for i in range(300)])],
    }
    report = build_report(study_data(cells), 4000)
    a = row(report, "A vs Basic")
    assert a.testset_ci_low > 0 and a.testset_p < 0.05 <= a.testset_p_holm
    shown = _line_of(format_table(report), "A vs Basic").split("A vs Basic")[1].split()[0]
    assert shown == f"{a.testset_diff:+.2f}"  # no mark
    meaning = dict(legend(report))["95% CI (points), on this test set"]
    assert "not adjusted for multiple comparisons" in meaning
    assert "an interval can exclude 0 without a mark" in meaning
    assert "the CIs are not adjusted" in format_table(report)


def test_the_runs_sentences_name_the_test_that_ran_and_its_unit():
    # a fixed split: seeds are the unit
    ref, lucky, _ = lucky_and_steady()
    fixed = build_report(study_data({"basic": ref, "lucky": lucky}))
    explained = dict(legend(fixed))
    assert "paired t-test over 3 seeds on one split" in explained["* and **"]
    assert "survives another seed" in explained["Δ (points), across training runs"]
    assert "∞" not in explained["Seeds needed, across training runs"]
    # k-fold: the corrected test over the seed-averaged folds, with the folds' ratio
    effects = {"basic": 0.0, "better": 0.05}
    kfold = build_report(
        study_data(planted_kfold(effects), None, "ckplus", "kfold", 5, train_images=120)
    )
    explained = dict(legend(kfold))
    runs_test = explained["95% CI (points), across training runs"]
    assert (
        "corrected k-fold t-test (Nadeau & Bengio 2003) over 5 folds (each the mean of its 3 seeds)"
        in runs_test
        and "n_test/n_train = 0.333" in runs_test
    )
    assert "another seed and another training set" in explained["Δ (points), across training runs"]
    assert "∞ where no number of seeds would" in explained["Seeds needed, across training runs"]
    c = kfold.contrasts.iloc[0]
    d = {}
    for cell, sign in (("better", 1), ("basic", -1)):
        for t in planted_kfold(effects)[cell]:
            acc = 100 * np.mean(np.array(t.predictions) == np.array(t.labels))
            d[t.seed, t.fold] = d.get((t.seed, t.fold), 0.0) + sign * acc
    assert c.runs_p == pytest.approx(statistics.across_runs(d, 1 / 3)["p_value"])
    assert "corrected k-fold t-test over 5 folds" in format_table(kfold)


def planted_repeated(effects: dict[str, float], drawings=2, folds=5, seeds=3, subjects=50):
    """``planted_kfold`` drawn ``drawings`` times: each drawing deals the subjects (4 images
    each) into new folds; a trial's fold is numbered as ``report.split_unit`` numbers it.
    Returns the cells and each trial's (repetition, fold)."""
    rng = np.random.default_rng(5)
    cells, places = {}, {}
    for name, effect in effects.items():
        cells[name] = []
        for r in range(drawings):
            order = np.random.default_rng(r).permutation(subjects)
            for s in range(seeds):
                for f in range(folds):
                    images = [(x, i) for x in order[f::folds] for i in range(4)]
                    labels = [int(x * 4 + i) % 7 for x, i in images]  # an image keeps its label
                    right = rng.random(len(images)) < 0.55 + effect
                    guesses = [
                        y if ok else (y + 1) % 7 for y, ok in zip(labels, right, strict=True)
                    ]
                    cells[name].append(
                        Predictions(
                            s,
                            r * folds + f,
                            [f"S{x}-{i}" for x, i in images],
                            labels,
                            guesses,
                            [f"S{x}" for x, _ in images],
                        )
                    )
                    places[name, len(cells[name]) - 1] = (r, f)
    return cells, places


def test_a_repeated_k_fold_study_is_judged_over_every_drawings_folds_and_called_a_heuristic():
    effects = {"basic": 0.0, "better": 0.05}
    cells, places = planted_repeated(effects)
    data = study_data(cells, None, "ckplus", "kfold", 5, train_images=120)
    drawn = [places[r.cell, int(r.run_id.rsplit("-", 1)[1])] for r in data.trials.itertuples()]
    data.trials["repetition"] = [r for r, _ in drawn]
    data.trials["fold"] = [f for _, f in drawn]  # as MLflow logs it: the fold within its drawing
    report = build_report(data, 2000)
    c = report.contrasts.iloc[0]
    assert (c.runs_test, c.runs_units, c.runs_repetitions) == ("corrected repeated k-fold t", 10, 2)
    d = {}
    for cell, sign in (("better", 1), ("basic", -1)):
        for t in cells[cell]:
            acc = 100 * np.mean(np.array(t.predictions) == np.array(t.labels))
            d[t.seed, t.fold] = d.get((t.seed, t.fold), 0.0) + sign * acc
    expected = statistics.across_runs(d, 1 / 3, repetitions=2)
    assert c.runs_p == pytest.approx(expected["p_value"]) and not c.runs_p_by_correlation
    assert "its folds drawn 2 times (repeated k-fold)" in report.title
    explained = dict(legend(report))
    assert (
        "corrected repeated k-fold t-test (Bouckaert & Frank 2004) over 10 folds of 2 "
        "drawings (each the mean of its 3 seeds)"
    ) in explained["95% CI (points), across training runs"]
    text = format_table(report)
    assert "across training runs on repeated k-fold is a heuristic" in text
    assert "simulated levels 1.8-40% over fold correlations 0-0.35" in text
    # an image is tested once per drawing: on this test set, every subject's images count twice
    assert c.testset_n == 50


def test_the_cell_interval_sentence_says_when_it_is_corrected_for_folds():
    effects = {"basic": 0.0, "better": 0.05}
    cells = planted_kfold(effects)
    report = build_report(study_data(cells, None, "ckplus", "kfold", 5, train_images=120))
    basic = report.table.set_index("key").loc["basic"]
    accuracies = {
        (t.seed, t.fold): 100 * np.mean(np.array(t.predictions) == np.array(t.labels))
        for t in cells["basic"]
    }
    expected = summarize_runs(accuracies, 1 / 3)
    assert (basic.ci95_low, basic.ci95_high) == pytest.approx(
        (expected["ci_low"], expected["ci_high"])
    )
    assert (
        "corrected for the folds' overlapping training sets" in dict(legend(report))["95% CI (%)"]
    )
    ref, lucky, _ = lucky_and_steady()
    fixed = dict(legend(build_report(study_data({"basic": ref, "lucky": lucky}))))
    assert "overlapping" not in fixed["95% CI (%)"] and "this test set" in fixed["95% CI (%)"]


def test_the_full_test_column_and_the_paper_footnote():
    # FER2013 with leaked test images dropped: the whole PrivateTest beside, the paper's number
    # compared with it
    ref, lucky, _ = lucky_and_steady()
    meta = {
        "kind": "grid",
        "cells": [
            {"name": "basic", "label": "Basic", "paper": {"fer2013": 69.92}},
            {"name": "lucky", "label": "Lucky"},
        ],
    }
    report = build_report(
        study_data(
            {"basic": ref, "lucky": lucky},
            meta,
            "fer2013",
            drop_leaked=True,
            full={"basic": 51.2, "lucky": 55.0},
        )
    )
    headers = [c.header for c in cell_columns(report)]
    assert headers == [
        "Cell",
        "n",
        "Accuracy (%)",
        "95% CI (%)",
        "Macro F1 (%)",
        "Full test (%)",
        "Paper (%)†",
    ]
    assert report.table.full_accuracy.tolist() == pytest.approx([51.2, 55.0])
    explained = dict(legend(report))
    assert "without its leaked images" in explained["Accuracy (%)"]
    assert "compare them with Full test (%)" in explained["Paper (%)†"]
    assert "leaked images dropped (validation: copies in train or test" in report.title
    text = format_table(report)
    assert "† the paper's FER2013 numbers are on its test set" in text
    # CK+ on subject-independent folds: the paper's own split is not comparable
    effects = {"basic": 0.0, "better": 0.05}
    meta = {
        "kind": "grid",
        "cells": [
            {"name": "basic", "label": "Basic", "paper": {"ckplus": 94.8}},
            {"name": "better", "label": "Better"},
        ],
    }
    kfold = build_report(study_data(planted_kfold(effects), meta, "ckplus", "kfold", 5, 120))
    assert "frames of one subject" in dict(legend(kfold))["Paper (%)†"]
    assert "subject-independent 5-fold cross-validation" in kfold.title
    assert "island loss lam 0.01, lam1 10.0" in kfold.title
    # the synthetic set: no paper number, no footnote, no full-test column
    plain = build_report(study_data({"basic": ref, "lucky": lucky}))
    assert [c.header for c in cell_columns(plain)][-1] == "Macro F1 (%)" and not plain.paper_note


def test_the_monte_carlo_sentence_appears_only_where_a_p_value_is_estimated(monkeypatch):
    ref, lucky, _ = lucky_and_steady()
    exact = build_report(study_data({"basic": ref, "lucky": lucky}), 2000)
    assert "Monte Carlo p-values" not in dict(legend(exact))
    monkeypatch.setattr(statistics, "EXACT_LIMIT", 0)
    estimated = build_report(study_data({"basic": ref, "lucky": lucky}), 2000)
    c = estimated.contrasts.iloc[0]
    assert not c.testset_p_exact and c.testset_p_error > 0
    sentence = dict(legend(estimated))["Monte Carlo p-values"]
    assert f"within ±{c.testset_p_error:.4f}" in sentence and sentence.startswith("1 test-set")


def test_every_column_is_explained_and_the_raw_names_stay_in_the_csv_note():
    ref, oth = seeds([(range(150, 160), ()), (range(160, 175), ())])
    report = build_report(study_data({"basic": ref, "other": oth}))
    markdown, page, tex = markdown_table(report), to_html(report), latex_table(report)
    explained = dict(legend(report))
    names = [c.name for c in cell_columns(report) + contrast_columns(report)]
    assert list(explained)[: len(names)] == names and "* and **" in explained
    for name, meaning in explained.items():
        escaped = name.replace("*", "\\*")
        assert f"- **{escaped}**: {meaning.replace('_', chr(92) + '_')}." in markdown, name
        assert f"<dt>{name}</dt>" in page and latex_escape(f"{name}: {meaning}.") in tex, name
    assert "in percent" in explained["Accuracy (%)"]
    assert "percentage points" in explained["Δ (points), on this test set"]
    assert "over the 300 images" in explained["95% CI (points), on this test set"]
    assert "mean over the 2 seeds" in explained["Δ (points), across training runs"]
    assert "below 0.05 and below 0.01" in explained["* and **"]
    assert "contrasts.csv" in markdown and "<th>testset" not in page and "| testset" not in markdown
    assert page.count("class=question>") == 2 and "dl class=legend" in page
    assert "* / **: Holm-adjusted p < 0.05 / 0.01" in format_table(report)
    cells_md = markdown_tables(markdown)[0][1]
    assert cells_md[1][:4] == [
        "Other",
        "2",
        f"{report.table.accuracy[1]:.2f} ± {report.table['std'][1]:.2f}",
        cells_md[1][3],
    ]


def test_latex_escapes_every_special_character():
    assert latex_escape("a_b%c&d#e$f{g}h~i^j\\k ± Δ ∞ †") == (
        r"a\_b\%c\&d\#e\$f\{g\}h\textasciitilde{}i\textasciicircum{}j\textbackslash{}k "
        r"$\pm$ $\Delta$ $\infty$ $\dagger$"
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


def test_the_latex_tables_have_booktabs_rules_a_row_each_and_escaped_names():
    ref, lucky, steady = lucky_and_steady()
    labels = ["Basic", "PSA & SE_50%", "#1 {x} ~y^2 $z\\w"]
    meta = {
        "kind": "grid",
        "cells": [
            {"name": n, "label": label}
            for n, label in zip(("basic", "lucky", "steady"), labels, strict=True)
        ],
    }
    report = build_report(study_data({"basic": ref, "lucky": lucky, "steady": steady}, meta), 2000)
    tex = latex_table(report)
    lines = tex.splitlines()
    assert [lines.count(r) for r in (r"\toprule", r"\midrule", r"\bottomrule")] == [2, 2, 2]
    (cell_header, cell_body), (_, body) = tabulars(tex)
    assert len(latex_cells(cell_header)) == 5  # no paper column: no cell has the paper's number
    assert r"\begin{tabular}{lrrrr}" in tex and r"\begin{tabular}{llrrrrrrr}" in tex
    assert [latex_cells(x)[0] for x in cell_body] == [
        "Basic",
        r"PSA \& SE\_50\%",
        r"\#1 \{x\} \textasciitilde{}y\textasciicircum{}2 \$z\textbackslash{}w",
    ]
    assert latex_cells(cell_body[0])[1] == "3"
    lucky_row = latex_cells(body[0])
    assert lucky_row[0] == "each cell vs Basic" and lucky_row[1] == r"PSA \& SE\_50\% vs Basic"
    assert lucky_row[2:4] + lucky_row[5:7] == [
        "+4.00**",
        "[+2.33, +5.67]",
        "+4.00",
        "[$-$15.87, +23.87]",
    ]
    # each question's label spans its columns, ruled below
    assert r"\multicolumn{3}{c}{on this test set} & \multicolumn{4}{c}{across training runs}" in tex
    assert r"\cmidrule(lr){3-5} \cmidrule(lr){6-9}" in tex
    assert r"\caption[mini on synthetic: test accuracy; the dataset's own" in tex
    assert balanced(tex) and tex.startswith(r"\begin{table}") and tex.endswith(r"\end{table}")
