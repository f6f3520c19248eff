"""bench/device_check.sh keeps its budget: a session lent a GPU gets its figures back only if the
script ends before the device tool's timeout. Run here on the CPU with a stand-in python (the
CUDA parts cannot run here): the first benchmark part hangs; the script cuts it at what is left
of the budget, skips the parts that no longer fit, writes every part's file under $OUT (what
the cut part printed before included), and ends within its budget."""

import os
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
FAKE = """#!/usr/bin/env bash
echo "python $*"
case "$*" in
  *bench/gpu.py*) echo "ops per step, alone: measured"; sleep 1000 ;;  # hangs
esac
"""


@pytest.mark.slow
def test_the_device_check_ends_within_its_budget_and_writes_every_part(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE)
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = {
        **os.environ,
        "OUT": str(out),
        "PYTHON": str(fake),
        "DEVICE": "cpu",
        "BUDGET": "12",
        "MIN_PART": "5",
    }
    started = time.monotonic()
    done = subprocess.run(
        ["bash", "bench/device_check.sh"],
        cwd=ROOT,
        env=env,
        text=True,
        capture_output=True,
        timeout=120,
    )
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert took <= 12 + 3, took  # the budget, and the kill's grace
    files = {p.name: p.read_text() for p in out.iterdir()}
    assert set(files) == {f"{n}.txt" for n in ("env", "gpu", "gpu32", "gpuvmap", "tests", "train")}
    assert "exit 0" in files["env.txt"] and "python -c" in files["env.txt"]
    # what a part printed reaches its file as it is measured, also from a part cut off
    assert "ops per step, alone: measured" in files["gpu.txt"]
    assert "exit 124" in files["gpu.txt"]  # timeout's code: cut at what was left
    for skipped in ("gpu32", "gpuvmap", "tests", "train"):
        assert "skipped" in files[f"{skipped}.txt"], files[f"{skipped}.txt"]
    assert "device check done" in done.stdout
