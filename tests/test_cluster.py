"""A real multi-node Ray cluster and a real MLflow server on loopback, and the faults they survive.

Every node is ``ray start --block`` in its own process group, every server likewise; each test
stops what it started by process group id, never with ``ray stop`` (which would stop every Ray
on the machine). Token authentication stays on: every process gets the cluster's token.
"""

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import chromium
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
STUDY = """
name = "{name}"
kind = "grid"
reference = "ce"
[run]
dataset = "synthetic"
[defaults]
backbone = "resnet18"
attention = "none"
[[cells]]
name = "ce"
loss = "ce"
[[cells]]
name = "center"
loss = "center"
[[cells]]
name = "island"
loss = "island"
[[cells]]
name = "island_eca"
loss = "island"
backbone = "resnet50"
attention = "eca"
[presets.tiny]
epochs = {epochs}
batch_size = 16
synthetic_subjects = 5
synthetic_images_per_class = 2
"""
ARTIFACTS = Path(__file__).parent.parent / "test-artifacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Group:
    """A command in its own process group, stopped by the test by that group's id."""

    def __init__(self, cmd: list[str], env: dict, log: Path):
        self.cmd, self.env, self.log = cmd, env, log
        self.start()

    def start(self) -> None:
        self.out = open(self.log, "ab")  # closed in stop()
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self.out,
                                     stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

    def stop(self, sig: int = signal.SIGTERM) -> None:
        for s in (sig, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, s)
            except ProcessLookupError:
                break
            deadline = time.time() + 10
            while time.time() < deadline and _group_alive(self.proc.pid):
                time.sleep(0.2)
            if not _group_alive(self.proc.pid):
                break
        self.proc.wait(timeout=10)
        self.out.close()


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs (zombies, which nothing may reap here, do not)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


class Loopback:
    """Ray head + worker nodes and an MLflow server (SQLite, artifact serving) on 127.0.0.1."""

    def __init__(self, folder: Path, workers: int = 1, dashboard: bool = False):
        self.folder = folder
        self.temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: socket paths
        self.port, self.dashboard = free_port(), free_port() if dashboard else None
        token = secrets.token_hex(16)
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
                    "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{BIN}:{os.environ['PATH']}",
                    "MLFLOW_LOGGING_LEVEL": "WARNING",
                    # find a dead node within seconds, not the default half minute
                    "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                    "RAY_health_check_failure_threshold": "3"}  # fmt: skip
        self.env.pop("RAY_ADDRESS", None)
        common = ["--block", "--num-cpus=1", "--node-ip-address=127.0.0.1",
                  f"--temp-dir={self.temp}", "--disable-usage-stats"]  # fmt: skip
        head = [str(BIN / "ray"), "start", "--head", f"--port={self.port}", *common]
        if dashboard:
            head += ["--include-dashboard=true", "--dashboard-host=127.0.0.1",
                     f"--dashboard-port={self.dashboard}"]  # fmt: skip
        else:
            head += ["--include-dashboard=false"]
        self.head = Group(head, self.env, folder / "head.log")
        self.wait_nodes(1)
        worker = [str(BIN / "ray"), "start", f"--address=127.0.0.1:{self.port}", *common]
        self.workers = [Group(worker, self.env, folder / f"worker{i}.log") for i in range(workers)]
        self.wait_nodes(1 + workers)
        self.mlflow_port = free_port()
        self.mlflow = Group(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
             "--port", str(self.mlflow_port), "--backend-store-uri",
             f"sqlite:///{folder / 'server.db'}", "--artifacts-destination",
             str(folder / "server-artifacts"), "--serve-artifacts", "--workers", "1"],
            self.env, folder / "mlflow.log",
        )  # fmt: skip
        self.wait_mlflow()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def wait_mlflow(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("the MLflow server did not come up")

    def wait_nodes(self, n: int, timeout: float = 90) -> None:
        check = textwrap.dedent(f"""
            import time, ray
            ray.init(address="127.0.0.1:{self.port}", logging_level="ERROR")
            deadline = time.time() + {timeout}
            while sum(x["Alive"] for x in ray.nodes()) != {n} and time.time() < deadline:
                time.sleep(0.5)
            raise SystemExit(0 if sum(x["Alive"] for x in ray.nodes()) == {n} else 1)
        """)
        subprocess.run([sys.executable, "-c", check], env=self.env, check=True,
                       timeout=timeout + 30, capture_output=True)  # fmt: skip

    def ablation(self, study: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "orchestrate.ablation", "--study", str(study),
                "--preset", "tiny", "--address", f"127.0.0.1:{self.port}",
                "--tracking-uri", self.uri, "--storage", str(self.folder / "storage"),
                "--no-log-checkpoints", *extra]  # fmt: skip

    def stop(self) -> None:
        for group in [self.mlflow, *self.workers, self.head]:
            group.stop()
        shutil.rmtree(self.temp, ignore_errors=True)


def study_file(folder: Path, name: str, epochs: int = 2) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(STUDY.format(name=name, epochs=epochs))
    return path


def children(uri: str, experiment: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return client, []
    return client, client.search_runs([exp.experiment_id], "tags.study_parent = 'false'")


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def loopback(tmp_path_factory):
    cluster = Loopback(tmp_path_factory.mktemp("loopback"), workers=1, dashboard=True)
    yield cluster
    cluster.stop()


def test_a_study_runs_on_both_nodes_and_logs_through_the_mlflow_server(loopback):
    study = study_file(loopback.folder, "twonodes")
    done = subprocess.run(loopback.ablation(study), env=loopback.env, capture_output=True,
                          text=True, timeout=600, cwd=loopback.folder)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client, runs = children(loopback.uri, "twonodes")
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.data.tags["ray_node_id"] for r in runs}) == 2  # both nodes trained
    for run in runs:
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"confusion_matrix.png", "predictions.json"} <= names
        assert len(client.get_metric_history(run.info.run_id, "val_accuracy")) == 2
    exp = client.get_experiment_by_name("twonodes")
    parent = client.search_runs([exp.experiment_id], "tags.study_parent = 'true'")[0]
    assert parent.info.status == "FINISHED"
    assert "report.html" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "ce" in done.stdout and "browse: mlflow ui" in done.stdout


def test_the_same_study_submitted_as_a_ray_job_finishes(loopback):
    study = study_file(loopback.folder, "asjob")
    args = loopback.ablation(study)
    entry = ["python", *args[1:]]  # the job's own python: the head's PATH has this venv
    address = ["--address", f"http://127.0.0.1:{loopback.dashboard}"]
    done = subprocess.run([str(BIN / "ray"), "job", "submit", *address, "--", *entry],
                          env=loopback.env, capture_output=True, text=True, timeout=600,
                          cwd=loopback.folder)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout
    _, runs = children(loopback.uri, "asjob")
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}


def test_the_mlflow_ui_shows_the_study_in_a_real_browser(loopback):
    from playwright.sync_api import sync_playwright

    client, runs = children(loopback.uri, "twonodes")
    assert runs, "runs after test_a_study_runs_on_both_nodes"
    exp = client.get_experiment_by_name("twonodes")
    parent = client.search_runs([exp.experiment_id], "tags.study_parent = 'true'")[0]
    child = runs[0]
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = chromium(p)
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        page.goto(loopback.uri)
        page.get_by_text("Model training").first.click()  # MLflow 3 opens in its GenAI mode
        page.goto(f"{loopback.uri}/#/experiments/{exp.experiment_id}/runs")
        page.get_by_text(parent.info.run_name).first.wait_for(timeout=60_000)
        page.get_by_text(f"{1 + len(runs)} matching runs").wait_for(timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "mlflow_experiment.png"), full_page=True)
        page.goto(f"{loopback.uri}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}")
        page.get_by_text(parent.info.run_name).first.wait_for(timeout=60_000)
        page.goto(
            f"{loopback.uri}/#/experiments/{exp.experiment_id}/runs/{child.info.run_id}/artifacts"
        )
        page.get_by_text("confusion_matrix.png").first.wait_for(timeout=60_000)
        page.get_by_text("confusion_matrix.png").first.click()
        page.locator("img").last.wait_for(timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "mlflow_confusion_matrix.png"), full_page=True)
        browser.close()
    assert (ARTIFACTS / "mlflow_confusion_matrix.png").stat().st_size > 10_000


def test_a_killed_driver_is_resumed_without_duplicates(loopback):
    study = study_file(loopback.folder, "driverkill", epochs=3)
    cmd = loopback.ablation(study, "--max-concurrent", "1")
    driver = subprocess.Popen(cmd, env=loopback.env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, cwd=loopback.folder)  # fmt: skip

    def one_finished():
        return any(r.info.status == "FINISHED" for r in children(loopback.uri, "driverkill")[1])

    wait_for(one_finished, 300, "a finished trial")
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    client, before = children(loopback.uri, "driverkill")
    finished = {r.info.run_id for r in before if r.info.status == "FINISHED"}
    assert 1 <= len(finished) < 4
    done = subprocess.run([*cmd, "--resume"], env=loopback.env, capture_output=True, text=True,
                          timeout=600, cwd=loopback.folder)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client, after = children(loopback.uri, "driverkill")
    assert len(after) == 4 and {r.info.status for r in after} == {"FINISHED"}
    assert sorted(r.data.tags["cell"] for r in after) == ["ce", "center", "island", "island_eca"]
    for run_id in finished:  # not trained again
        assert len(client.get_metric_history(run_id, "val_accuracy")) == 3
    exp = client.get_experiment_by_name("driverkill")
    parents = client.search_runs([exp.experiment_id], "tags.study_parent = 'true'")
    assert sorted(r.info.status for r in parents) == ["FINISHED", "KILLED"]


def test_a_short_mlflow_outage_loses_no_metric(loopback):
    study = study_file(loopback.folder, "outage", epochs=3)
    # MLflow's client retries with exponential backoff; a small factor keeps the test short
    env = {**loopback.env, "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "10"}  # fmt: skip
    driver = subprocess.Popen(loopback.ablation(study), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              cwd=loopback.folder)  # fmt: skip

    def started() -> bool:
        if driver.poll() is not None:
            raise AssertionError(driver.communicate()[0].decode()[-3000:])
        return len(children(loopback.uri, "outage")[1]) >= 1

    wait_for(started, 300, "a running trial")
    loopback.mlflow.stop()
    time.sleep(6)
    loopback.mlflow.start()
    loopback.wait_mlflow()
    output = driver.communicate(timeout=600)[0].decode()
    assert driver.returncode == 0, output[-3000:]
    client, runs = children(loopback.uri, "outage")
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    for run in runs:
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy"))
        assert steps[:3] == [1, 2, 3] and "test_accuracy" in run.data.metrics


def test_a_worker_node_killed_mid_study_does_not_stop_it(tmp_path):
    cluster = Loopback(tmp_path, workers=1)
    try:
        epochs = 5
        study = study_file(tmp_path, "nodekill", epochs=epochs)
        driver = subprocess.Popen(cluster.ablation(study, "--max-failures", "3"),
                                  env=cluster.env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, cwd=tmp_path)  # fmt: skip

        def trained_two_epochs():
            client, runs = children(cluster.uri, "nodekill")
            return any(len(client.get_metric_history(r.info.run_id, "val_accuracy")) >= 2
                       for r in runs)  # fmt: skip

        wait_for(trained_two_epochs, 300, "two epochs of a trial")
        cluster.workers[0].stop(signal.SIGKILL)  # the node dies at once
        output = driver.communicate(timeout=900)[0].decode()
        assert driver.returncode == 0, output[-3000:]
        client, runs = children(cluster.uri, "nodekill")
        assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
        for run in runs:
            history = client.get_metric_history(run.info.run_id, "val_accuracy")
            assert epochs <= len(history) <= epochs + 1  # at most one epoch redone
            assert sorted({m.step for m in history}) == list(range(1, epochs + 1))
    finally:
        cluster.stop()
