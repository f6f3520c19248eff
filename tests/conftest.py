"""Shared fixtures: one real local Ray cluster for the whole test session (ray.init takes
seconds), and tiny study files in the real format."""

import os
import socket
import subprocess
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
# the screenshots the browser tests take, for a person to look at: outside the checkout
ARTIFACTS = Path(
    os.environ.get("FER_TEST_ARTIFACTS", Path(tempfile.gettempdir()) / "fer-test-artifacts")
)


def _checkout_files() -> set[str]:
    """What git sees in the checkout that it does not track, ignored files and folders included
    (a folder new as a whole is one entry)."""
    done = subprocess.run(
        ["git", "status", "--porcelain", "--ignored"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    return set(done.stdout.splitlines()) if done.returncode == 0 else set()


def _check_checkout(session) -> None:
    """The suite leaves nothing in the checkout: a file a test wrote there fails the run."""
    before = getattr(session.config, "checkout_before", None)
    left = sorted(
        line
        for line in _checkout_files() - (before or set())
        if "__pycache__" not in line and ".pytest_cache" not in line
    )
    if before is not None and left:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        text = f"the tests left files in the checkout: {', '.join(left[:10])}"
        if reporter is not None:
            reporter.write_line(text, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_collection_modifyitems(config, items):
    """Slow tests first (stable otherwise): xdist hands out the groups largest first, then
    single tests in this order, so the run ends on short tests, whichever worker is ahead."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_sessionstart(session):
    if not hasattr(session.config, "workerinput"):  # the controller: before any test ran
        session.config.checkout_before = _checkout_files()


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    # a small object store: the tests' datasets are tiny, and every xdist worker has its own Ray
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
        object_store_memory=300 * 2**20,
    )
    yield
    ray.shutdown()


# one finished study of two cells x two seeds, its models logged, shared by the report and
# tracking tests (marked xdist_group("finished-study"), so that one worker runs it once)
FINISHED_STUDY = """
name = "minireport"
description = "two cells, two seeds"
kind = "grid"
reference = "basic"
[run]
dataset = "synthetic"
seeds = 2
[defaults]
backbone = "shufflenet_v2_x0_5"
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
[presets.tiny]
epochs = 2
batch_size = 16
synthetic_subjects = 5
synthetic_images_per_class = 2
"""


@pytest.fixture(scope="session")
def finished_study(ray_cluster, tmp_path_factory):
    """The finished study: its folder, MLflow store, client, runs, summary and printed output."""
    import io
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    from orchestrate.run.runner import RunOptions, run_study
    from search_spaces import load_study

    tmp = tmp_path_factory.mktemp("finished")
    (tmp / "minireport.toml").write_text(FINISHED_STUDY)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    options = RunOptions(
        preset="tiny", storage=str(tmp / "ray"), tracking_uri=uri, reports=str(tmp / "reports")
    )
    out = io.StringIO()
    summary = run_study(load_study(tmp / "minireport.toml"), options, out=out)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("minireport")
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if r.data.tags["study_parent"] == "false"]
    return SimpleNamespace(
        tmp=tmp,
        uri=uri,
        client=client,
        experiment=experiment,
        runs=runs,
        children=children,
        summary=summary,
        out=out.getvalue(),
    )


TINY = """
[presets.tiny]
epochs = 2
batch_size = 16
plateau_patience = 2
synthetic_subjects = 5
synthetic_images_per_class = 2
"""


@pytest.fixture
def study_file(tmp_path):
    """Write a study TOML (body + the tiny preset) and return its path."""

    def write(body: str, name: str = "study") -> str:
        path = tmp_path / f"{name}.toml"
        path.write_text(textwrap.dedent(body) + TINY)
        return str(path)

    return write


def once_per_run(tmp_path_factory, name: str, compute):
    """``compute()``'s JSON result, computed by the first test process that asks and read by the
    others (xdist's workers share the parent of their temporary folders), so that tests needing
    it may run on any worker."""
    import json

    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    path = shared / f"{name}.json"
    with FileLock(f"{path}.lock"):
        if not path.is_file():
            path.write_text(json.dumps(compute()))
        return json.loads(path.read_text())


def chromium(playwright):
    """Debian's chromium, headless, with the flags a closed network needs (no downloads)."""
    return playwright.chromium.launch(
        executable_path="/usr/bin/chromium",
        args=[
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
        ],
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, what: str, timeout: float = 60, any_status: bool = False) -> None:
    """Until ``url`` answers 200, or anything with ``any_status`` (a server just started)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError:
            if any_status:
                return
            time.sleep(0.3)
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{what} did not come up at {url}")


# Every process the tests start inherits this marker in its environment; at the end of the
# session none may still be alive (a rig, a server or a Ray left running breaks the next run).
MARKER = "FER_ABLATION_TEST_SESSION"
LEFTOVER_GRACE = 20.0  # seconds for processes told to stop (Ray's, a server's) to exit


def pytest_configure(config):
    import os
    import secrets

    os.environ.setdefault(MARKER, f"{os.getpid()}-{secrets.token_hex(4)}")
    # and one for the processes they start (fermodel.train, bench/gpu.py): OpenMP threads of
    # processes that share cores spin while they wait (two 2-thread trainings side by side on
    # this 2-core machine took 86-95 CPU-s and 43-49 s, one thread each 34 CPU-s and 18 s)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # one torch thread per test process: two workers with two threads each on two cores
        # would spend their time switching (the trials Ray starts set their own)
        import torch

        torch.set_num_threads(1)


def leftover_processes(marker: str) -> list[str]:
    """``pid command`` of every live process but this one whose environment holds the marker."""
    import os
    from pathlib import Path

    needle = f"{MARKER}={marker}".encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        if int(proc.name) == os.getpid():
            continue
        try:
            if needle not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # a zombie has exited; only its parent may reap it
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # exited meanwhile, or not ours to read
        found.append(f"{proc.name} {command.strip()[:160]}")
    return found


@pytest.hookimpl(hookwrapper=True)
def pytest_sessionfinish(session, exitstatus):
    """After every other sessionfinish: xdist's stops its workers there, fixtures are done."""
    yield
    import os
    import signal

    if hasattr(session.config, "workerinput"):
        return  # a worker: its sibling workers carry the marker too; the controller checks
    _check_checkout(session)
    marker = os.environ.get(MARKER)
    if not marker:
        return
    deadline = time.time() + LEFTOVER_GRACE
    while (left := leftover_processes(marker)) and time.time() < deadline:
        time.sleep(0.5)
    if not left:
        return
    for line in left:  # stop them, so that this run's failure does not become the next one's
        try:
            os.kill(int(line.split()[0]), signal.SIGKILL)
        except OSError:
            pass
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    text = f"{len(left)} process(es) started by the tests were still alive at the end:\n"
    text += "\n".join(f"  {line}" for line in left)
    if reporter is not None:
        reporter.write_line(text, red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
