"""`make test` sets up what it needs: the Makefile's browser step installs Debian's chromium when
it is missing (as root, with apt-get) or stops with one line saying what to install. The
machine's own commands are hidden behind a PATH of stand-ins, so apt itself is never run."""

import os
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
    return subprocess.run([MAKE, "-s", "-C", str(ROOT), "browser"], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


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


def test_ci_runs_the_readme_test_command_and_nothing_else():
    commands = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]  # fmt: skip
    assert commands[-1] == "make test"
    assert not any(c.split()[0] in ("apt-get", "pip", "uv") for c in commands)
    assert "make test" in (ROOT / "README.md").read_text()
