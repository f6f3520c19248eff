"""`make test` sets up what it needs: the Makefile's browser step installs Debian's chromium when
it is missing (as root, with apt-get) or stops with one line saying what to install. The
machine's own commands are hidden behind a PATH of stand-ins, so apt itself is never run."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
MAKE = shutil.which("make")


def stand_in(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


@pytest.fixture
def bin_dir(tmp_path):
    """A PATH holding only stand-ins: an apt-get that records its calls, `id` as root."""
    folder = tmp_path / "bin"
    folder.mkdir()
    stand_in(folder, "apt-get", f'echo "$@" >> {tmp_path}/apt.log')
    stand_in(folder, "id", "echo 0")
    return folder


def make_browser(bin_dir: Path):
    env = {**os.environ, "PATH": str(bin_dir)}
    return subprocess.run(
        [MAKE, "-s", "-C", str(ROOT), "browser"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def apt_calls(bin_dir: Path) -> list[str]:
    log = bin_dir.parent / "apt.log"
    return log.read_text().splitlines() if log.exists() else []


def test_missing_chromium_is_installed_with_apt_as_root(bin_dir):
    done = make_browser(bin_dir)
    assert done.returncode == 0, done.stderr
    assert apt_calls(bin_dir) == ["update -qq", "install -y -qq chromium"]
    assert "installing chromium" in done.stdout


def test_present_chromium_installs_nothing(bin_dir):
    stand_in(bin_dir, "chromium", "exit 0")
    done = make_browser(bin_dir)
    assert done.returncode == 0, done.stderr
    assert apt_calls(bin_dir) == []


@pytest.mark.parametrize("why", ["no apt-get", "not root"])
def test_otherwise_make_stops_with_one_line_saying_what_to_install(bin_dir, why):
    if why == "no apt-get":
        (bin_dir / "apt-get").unlink()
    else:
        stand_in(bin_dir, "id", "echo 1000")
    done = make_browser(bin_dir)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "needs chromium" in lines[0] and "apt-get install chromium" in lines[0]
    assert apt_calls(bin_dir) == []


def test_ci_runs_the_readme_test_command_and_nothing_else(tmp_path):
    """.ci/run, run with a stand-in make (and pip, apt-get, uv) first on its PATH, calls make
    test from the checkout's root and nothing else."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for tool in ("make", "pip", "apt-get", "uv"):
        stand_in(folder, tool, f'echo "{tool} $@ in $(pwd)" >> {tmp_path}/calls.log')
    env = {**os.environ, "PATH": f"{folder}:/usr/bin:/bin"}
    done = subprocess.run(
        ["bash", str(ROOT / ".ci" / "run")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "calls.log").read_text().splitlines() == [f"make test in {ROOT}"]
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"^make test\b", readme, re.MULTILINE)  # the command the README gives


def fake_python(tmp_path: Path, pip_fails: bool = False) -> Path:
    """A python3 whose ``-m venv DIR`` makes a venv of stand-ins: a pip as noisy as the real one
    (and failing if asked), and a python that says what it was asked to run."""
    folder = tmp_path / "fake"
    folder.mkdir()
    pip = (
        'echo "Collecting torch"; echo "  Downloading torch-2.14.1.whl (800 MB)"; '
        f'echo "Successfully installed torch"; exit {1 if pip_fails else 0}'
    )
    body = f"""
venv="$3"
mkdir -p "$venv/bin"
printf '#!/bin/sh\\n%s\\n' '{pip}' > "$venv/bin/pip"
printf '#!/bin/sh\\necho "ran python $*"\\n' > "$venv/bin/python"
chmod +x "$venv/bin/pip" "$venv/bin/python"
"""
    stand_in(folder, "python3", body)
    return folder / "python3"


def make_demo(tmp_path: Path, python: Path) -> subprocess.CompletedProcess:
    venv = tmp_path / "venv"
    command = [MAKE, "--no-print-directory", "demo", f"VENV={venv}", f"PYTHON={python}"]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_make_demo_prints_one_line_for_its_install_and_no_pip_log(tmp_path):
    done = make_demo(tmp_path, fake_python(tmp_path))
    assert done.returncode == 0, done.stderr
    venv = tmp_path / "venv"
    assert done.stdout.splitlines() == [
        f"make: installing . into {venv} (pip's log: {venv}/pip.log)",
        "ran python -m orchestrate.ablation",
    ]
    assert "Collecting torch" in (venv / "pip.log").read_text() and done.stderr == ""
    again = make_demo(tmp_path, tmp_path / "no-python-needed")
    assert again.stdout.splitlines() == ["ran python -m orchestrate.ablation"]  # installed once


def test_a_failed_install_shows_pips_last_lines_and_names_its_log(tmp_path):
    done = make_demo(tmp_path, fake_python(tmp_path, pip_fails=True))
    assert done.returncode != 0
    venv = tmp_path / "venv"
    assert "Successfully installed torch" in done.stdout  # the tail of pip's own words
    assert f"make: pip failed; its whole log: {venv}/pip.log" in done.stdout
    assert "ran python" not in done.stdout and not (venv / "installed-demo").exists()
