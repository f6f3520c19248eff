"""`make demo` as a newcomer meets it: wall time of the first run and what its table shows.

The demo runs in a fresh clone of this repository's HEAD, cold: no bytecode cache (a private
``PYTHONPYCACHEPREFIX``), a new MLflow store and Ray storage in the clone, a private Ray started
and stopped by the command. Only the package install is not timed: the clone uses this
checkout's ``.venv`` (``make -o .venv/bin/activate`` keeps make from reinstalling it).

Printed: the wall time against the 5-minute target (ratio), and from the printed table the best
and the mean test accuracy of the cells against their targets (60% and 50%; chance is 14%).

    .venv/bin/python bench/demo.py
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_SECONDS = 300.0
TARGET_BEST, TARGET_MEAN = 60.0, 50.0
# a cell's row of the terminal table: its label, the trial count, then mean accuracy in %
ROW = re.compile(r"^(?P<label>\S.*?)\s{2,}(?P<n>\d+)\s+(?P<acc>\d+\.\d+)")


def run_demo(folder: Path) -> tuple[float, str]:
    subprocess.run(["git", "clone", "-q", str(ROOT), str(folder / "repo")], check=True)
    repo = folder / "repo"
    (repo / ".venv").symlink_to(ROOT / ".venv")
    env = {"PYTHONPYCACHEPREFIX": str(folder / "pycache"), "PATH": "/usr/bin:/bin"}
    started = time.perf_counter()
    done = subprocess.run(
        ["make", "-o", ".venv/bin/activate", "demo"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"make demo failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return seconds, done.stdout


def cell_accuracies(output: str) -> dict[str, float]:
    table = output.split("test accuracy:", 1)[-1]
    cells = {}
    for line in table.splitlines():
        if not line.strip():
            if cells:
                break
            continue
        match = ROW.match(line)
        if match:
            cells[match["label"].strip()] = float(match["acc"])
    return cells


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="fer-demo-bench-") as folder:
        seconds, output = run_demo(Path(folder))
    print(output)
    cells = cell_accuracies(output)
    if not cells:
        sys.exit("could not read the cells' accuracies from the demo's table")
    best, mean = max(cells.values()), sum(cells.values()) / len(cells)
    print(
        f"make demo: {seconds:.0f} s (target {TARGET_SECONDS:.0f} s, "
        f"ratio {seconds / TARGET_SECONDS:.2f})"
    )
    print(
        f"best cell {best:.1f}% (target {TARGET_BEST:.0f}%), mean of {len(cells)} cells "
        f"{mean:.1f}% (target {TARGET_MEAN:.0f}%), chance 14.3%"
    )


if __name__ == "__main__":
    main()
