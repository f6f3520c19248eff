"""The manual: `make test` builds docs/ with `mkdocs build --strict`, so a broken link or an API
reference that no longer resolves fails CI (shown here on a broken copy); the README's links
reach pages that exist, and the study commands the README and docs show run (dry) as shown."""

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ARTIFACTS, chromium

from orchestrate.ablation import main

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
PACKAGES = ("fermodel", "orchestrate", "search_spaces")


def documents() -> dict[str, str]:
    pages = {f"docs/{p.relative_to(DOCS)}": p.read_text() for p in sorted(DOCS.rglob("*.md"))}
    return {"README.md": (ROOT / "README.md").read_text(), **pages}


def build(folder: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", "site"]
    env = {"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture
def docs_copy(tmp_path):
    """The docs, their config and the packages they document, in a folder of their own."""
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path)
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    return tmp_path


def test_the_site_builds_strict_and_a_broken_link_or_reference_fails_it(docs_copy):
    done = build(docs_copy)
    assert done.returncode == 0, done.stderr
    html = (docs_copy / "site" / "reference" / "orchestrate.html").read_text()
    assert "across_runs" in html  # the API reference is rendered from the docstrings
    _browse(docs_copy / "site")
    # a link to a page that does not exist
    page = docs_copy / "docs" / "studies.md"
    text = page.read_text()
    page.write_text(text + "\nSee [the old page](no-such-page.md).\n")
    done = build(docs_copy)
    assert done.returncode != 0
    assert "'no-such-page.md', but the target is not found" in done.stderr
    page.write_text(text)
    # a function renamed in the code while the reference still names it
    source = docs_copy / "orchestrate" / "report" / "statistics.py"
    source.write_text(source.read_text().replace("def across_runs(", "def across_all_runs("))
    reference = docs_copy / "docs" / "reference" / "orchestrate.md"
    renamed = "orchestrate.report.statistics.across_runs"
    reference.write_text(reference.read_text() + f"\n::: {renamed}\n")
    done = build(docs_copy)
    assert done.returncode != 0 and "orchestrate.report.statistics.across_runs" in done.stderr


def test_every_page_is_in_the_nav_and_the_readme_links_reach_pages():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert pages == set(re.findall(r":\s*([\w/-]+\.md)\s*$", nav, re.MULTILINE))
    links = re.findall(r"\]\((docs/[^)#]+)", documents()["README.md"])
    assert len(links) >= 10
    for link in links:
        assert (ROOT / link).is_file(), link


def shown_commands() -> list[tuple[str, list[str]]]:
    """Every ``python -m orchestrate.ablation`` command in the README and docs: (where, args)."""
    found = []
    for name, text in documents().items():
        for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
            joined = re.sub(r"\\\n\s*", " ", block)
            for line in joined.splitlines():
                if "python -m orchestrate.ablation" in line:
                    words = shlex.split(line, comments=True)
                    at = words.index("orchestrate.ablation")
                    found.append((name, words[at + 1 :]))
    return found


def test_the_shown_study_commands_plan_as_shown(tmp_path, monkeypatch, capsys):
    """Each shown command parses; those on the built-in set plan their trials (--dry-run)."""
    from orchestrate.ablation import build_parser

    commands = shown_commands()
    assert len(commands) >= 10
    monkeypatch.chdir(tmp_path)
    planned = 0
    for where, args in commands:
        parsed = build_parser().parse_args(args)
        assert parsed.study, where
        if parsed.dataset in (None, "synthetic") and not parsed.address and not parsed.resume:
            code = main([*args, "--dry-run", "--storage", str(tmp_path / "ray")])
            assert code == 0, (where, args, capsys.readouterr().err)
            assert " trials:" in capsys.readouterr().out or parsed.study.startswith("hpo")
            planned += 1
    assert planned >= 5
    assert not (tmp_path / "mlflow.db").exists()


def _browse(site: Path) -> None:
    """The built site as a reader sees it in Chromium, opened from disk: the manual's sections
    in its navigation, a page's table, the API reference, a link followed."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = chromium(p)
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        page.goto((site / "index.html").as_uri())
        nav = page.locator("nav.md-nav--primary").inner_text()
        for title in (
            "Getting started",
            "Running studies",
            "Packed trials",
            "Clusters",
            "The report and its statistics",
            "Benchmarks",
            "API reference",
        ):
            assert title in nav, title
        page.get_by_role("link", name="The report and its statistics").first.click()
        page.wait_for_load_state()
        assert page.url.endswith("report.html")
        assert page.locator("td", has_text="10 x repeated k-fold").count() == 3
        page.screenshot(path=str(ARTIFACTS / "docs_report.png"), full_page=False)
        page.goto((site / "reference" / "orchestrate.html").as_uri())
        assert page.locator("h2, h3", has_text="across_runs").count() >= 1
        browser.close()
