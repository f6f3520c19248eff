"""bench/device_check.sh keeps its budget: a session lent a GPU gets its figures back only if the
script ends before the device tool's timeout. Run here on the CPU with a stand-in python (the
CUDA parts cannot run here): one benchmark part answers slowly, the next hangs; the script cuts
the hanging part at what is left of the budget, skips the parts that no longer fit, writes
every part's file under $OUT, and ends within its budget."""

import os
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
FAKE = """#!/usr/bin/env bash
echo "python $*"
case "$*" in
  *--precision\\ fp32*) echo "ops per step, alone: measured"; sleep 1000 ;;  # hangs
  *bench/gpu.py*) echo "one trial (engine): measured"; sleep 6 ;;
esac
"""


@pytest.mark.slow
def test_the_device_check_ends_within_its_budget_and_writes_every_part(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE)
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": str(fake), "DEVICE": "cpu", "BUDGET": "35"}
    started = time.monotonic()
    done = subprocess.run(["bash", "bench/device_check.sh"], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=120)  # fmt: skip
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert took <= 35 + 3, took  # the budget, and the kill's grace
    files = {p.name: p.read_text() for p in out.iterdir()}
    assert set(files) == {f"{n}.txt" for n in ("env", "gpu", "gpu32", "gpuvmap", "tests",
                                                 "train")}  # fmt: skip
    # what a part printed reaches its file as it is measured, also from a part cut off
    assert "one trial (engine): measured" in files["gpu.txt"] and "exit 0" in files["gpu.txt"]
    assert "ops per step, alone: measured" in files["gpu32.txt"]
    assert "exit 124" in files["gpu32.txt"]  # timeout's code: cut at what was left
    for skipped in ("gpuvmap", "tests", "train"):
        assert "skipped" in files[f"{skipped}.txt"], files[f"{skipped}.txt"]
    assert "device check done" in done.stdout
