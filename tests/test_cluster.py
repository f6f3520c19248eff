"""A real multi-node Ray cluster, a real S3 API server and a real MLflow server on loopback, and
the faults a study on them survives.

The rig differs from one machine the way a cluster does:

- each worker node runs in its own mount and UTS namespace (``unshare``; the tests run as root)
  with a fresh tmpfs over the folders the head and the driver write to (the tests' temporary
  folders, Ray's temp folders, /dev/shm, the dataset cache) and a host name of its own, so it
  cannot read the study's folder, the MLflow store, Ray's session files or the dataset cache,
  while the project and its virtualenv stay visible wherever the checkout lies (under /tmp too);
- checkpoints and Tune's state go to a real S3 API server (moto's server mode) as ``s3://``;
- the MLflow server runs with docker/compose.yaml's own ``--allowed-hosts``, and the driver
  reaches it as ``http://mlflow:PORT``, the compose host name, through a private /etc/hosts.

Every node and server is a process group stopped by its id, never with ``ray stop`` (which would
stop every Ray on the machine). Token authentication stays on: every process gets the token.
"""

import os
import platform
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import pytest
import yaml
from conftest import ARTIFACTS, chromium, free_port, wait_http
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("rig")]  # one rig, one worker

ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent
BUCKET = "fer-rig"
HOSTS = "127.0.0.1 localhost mlflow\n::1 localhost ip6-localhost ip6-loopback\n"
CACHE = str(Path.home() / ".cache" / "fer-ablation")  # the engine's dataset cache
STUDY = """
name = "{name}"
kind = "grid"
reference = "ce"
[run]
dataset = "synthetic"
[defaults]
backbone = "{backbone}"
attention = "none"
{cells}
[presets.tiny]
epochs = {epochs}
checkpoint_every = 1  # the fault tests count epochs redone after a checkpoint
batch_size = 16
synthetic_subjects = 5
synthetic_images_per_class = 2
"""
CELLS = [("ce", "ce"), ("center", "center")]


def own_view(cmd: list[str], hosts: Path | None = None, private=(), hostname=None) -> list[str]:
    """``cmd`` in its own mount namespace: a fresh tmpfs over each ``private`` folder, ``hosts``
    over /etc/hosts, and with ``hostname`` its own UTS namespace and host name."""
    steps = [f"hostname {hostname}"] if hostname else []
    steps += [f"mkdir -p {d} && mount -t tmpfs tmpfs {d}" for d in private]
    if hosts is not None:
        steps.append(f"mount --bind {hosts} /etc/hosts")
    flags = ["--mount", "--propagation", "private", *(["--uts"] if hostname else [])]
    return ["unshare", *flags, "sh", "-c", " && ".join([*steps, 'exec "$@"']), "sh", *cmd]


def compose_allowed_hosts() -> str:
    """The MLflow server's allow-list exactly as docker/compose.yaml starts it."""
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    flag = next(
        a for a in compose["services"]["mlflow"]["command"] if a.startswith("--allowed-hosts=")
    )
    return flag.split("=", 1)[1]


class Group:
    """A command in its own process group, stopped by the test by that group's id; it runs in
    its log's folder (a test's), so that what it writes there (an MLflow server's artifacts, a
    Ray job's report) never lands in the checkout."""

    def __init__(self, cmd: list[str], env: dict, log: Path):
        self.cmd, self.env, self.log = cmd, env, log
        self.start()

    def start(self) -> None:
        self.out = open(self.log, "ab")  # closed in stop()
        self.proc = subprocess.Popen(
            self.cmd,
            env=self.env,
            cwd=self.log.parent,
            stdout=self.out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

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


class Rig:
    """Ray head + worker nodes that share no disk, an S3 server and an MLflow server."""

    def __init__(self, folder: Path, basetemp: Path, workers: int = 1, dashboard: bool = False):
        self.folder, self.basetemp = folder, basetemp
        self.temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: socket paths
        self.hosts = folder / "hosts"
        self.hosts.write_text(HOSTS)
        self.port, self.dashboard = free_port(), free_port() if dashboard else None
        self.s3_port, self.mlflow_port = free_port(), free_port()
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(16),
            "RAY_USAGE_STATS_ENABLED": "0",
            "PATH": f"{BIN}:{os.environ['PATH']}",
            "MLFLOW_LOGGING_LEVEL": "WARNING",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.s3_port}",
            "AWS_ACCESS_KEY_ID": "rig",
            "AWS_SECRET_ACCESS_KEY": "rig-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            # find a dead node within seconds, not the default half minute
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_timeout_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
        }
        self.env.pop("RAY_ADDRESS", None)
        self.s3, self.head, self.workers, self.mlflow = None, None, [], None
        try:
            self._start(workers, dashboard)
        except BaseException:
            self.stop()  # a rig that did not come up leaves nothing running
            raise

    def _start(self, workers: int, dashboard: bool) -> None:
        folder = self.folder
        self.s3 = Group(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.s3_port)],
            self.env,
            folder / "s3.log",
        )
        wait_http(f"http://127.0.0.1:{self.s3_port}/", "the S3 server")
        self.s3_client().create_bucket(Bucket=BUCKET)
        common = ["--block", "--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
        head = [
            str(BIN / "ray"),
            "start",
            "--head",
            f"--port={self.port}",
            f"--temp-dir={self.temp}",
            *common,
        ]
        if dashboard:
            # the job agent's own port too: its default (52365) is taken by any other Ray's
            # agent on the machine, and `ray job submit` then finds "no available agent"
            head += [
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard}",
                f"--dashboard-agent-listen-port={free_port()}",
            ]
        else:
            head += ["--include-dashboard=false"]
        # the head runs `ray job submit`'s drivers: it resolves the compose host name too
        self.head = Group(own_view(head, hosts=self.hosts), self.env, folder / "head.log")
        self.wait_nodes(1)
        for i in range(workers):
            worker = [
                str(BIN / "ray"),
                "start",
                f"--address=127.0.0.1:{self.port}",
                f"--temp-dir={self.temp}w{i}",
                *common,
            ]
            view = own_view(worker, private=self.private(i), hostname=f"rig-worker-{i}")
            self.workers.append(Group(view, self.env, folder / f"worker{i}.log"))
        self.wait_nodes(1 + workers)
        self.mlflow = Group(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.mlflow_port),
                "--backend-store-uri",
                f"sqlite:///{folder / 'server.db'}",
                "--artifacts-destination",
                str(folder / "server-artifacts"),
                "--serve-artifacts",
                "--workers",
                "1",
                f"--allowed-hosts={compose_allowed_hosts()}",
            ],
            self.env,
            folder / "mlflow.log",
        )
        self.wait_mlflow()

    def private(self, worker: int) -> list[str]:
        """What worker ``worker`` does not share with the head and the driver: the tests'
        temporary folders, Ray's temp folders (its own one too), /dev/shm, the dataset cache."""
        return [str(self.basetemp), str(self.temp), f"{self.temp}w{worker}", "/dev/shm", CACHE]

    @property
    def uri(self) -> str:  # the tests' own view of the MLflow server
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def storage(self) -> str:
        return f"s3://{BUCKET}/studies"

    def s3_client(self):
        return boto3.client(
            "s3",
            endpoint_url=self.env["AWS_ENDPOINT_URL"],
            aws_access_key_id="rig",
            aws_secret_access_key="rig-secret",
            region_name="us-east-1",
        )

    def s3_keys(self, prefix: str = "studies/") -> list[str]:
        pages = (
            self.s3_client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        )
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def wait_mlflow(self) -> None:
        wait_http(self.uri + "/health", "the MLflow server")

    def wait_nodes(self, n: int, timeout: float = 90) -> None:
        ids = self.node_ids(n, timeout)
        assert len(ids) == n, f"{len(ids)} of {n} nodes came up"

    def node_ids(self, n: int = 0, timeout: float = 0) -> list[str]:
        check = textwrap.dedent(f"""
            import time, ray
            ray.init(address="127.0.0.1:{self.port}", logging_level="ERROR")
            deadline = time.time() + {timeout}
            alive = lambda: [x["NodeID"] for x in ray.nodes() if x["Alive"]]
            while len(alive()) != {n} and time.time() < deadline:
                time.sleep(0.5)
            print(" ".join(alive()))
        """)
        done = subprocess.run(
            [sys.executable, "-c", check],
            env=self.env,
            check=True,
            timeout=timeout + 60,
            capture_output=True,
            text=True,
        )
        return done.stdout.split()

    def args(self, study: Path, *extra: str) -> list[str]:
        """The study's command line as a user on the head would type it (compose host name)."""
        return [
            "-m",
            "orchestrate.ablation",
            "--study",
            str(study),
            "--preset",
            "tiny",
            "--address",
            f"127.0.0.1:{self.port}",
            "--storage",
            self.storage,
            "--tracking-uri",
            f"http://mlflow:{self.mlflow_port}",
            "--no-log-checkpoints",
            *extra,
        ]

    def ablation(self, study: Path, *extra: str) -> list[str]:
        return own_view([sys.executable, *self.args(study, *extra)], hosts=self.hosts)

    def stop(self) -> None:
        # Ray nodes drain for up to 30 s on SIGTERM: the rig's are disposable, killed at once
        for group in [self.mlflow, *self.workers, self.head, self.s3]:
            if group is not None:
                group.stop(
                    signal.SIGKILL if group in (self.head, *self.workers) else signal.SIGTERM
                )
        for i in range(len(self.workers)):
            shutil.rmtree(f"{self.temp}w{i}", ignore_errors=True)
        shutil.rmtree(self.temp, ignore_errors=True)


def study_file(
    folder: Path, name: str, epochs: int = 2, cells: int = 2, backbone: str = "shufflenet_v2_x0_5"
) -> Path:
    body = "\n".join(f'[[cells]]\nname = "{n}"\nloss = "{loss}"' for n, loss in CELLS[:cells])
    path = folder / f"{name}.toml"
    path.write_text(STUDY.format(name=name, epochs=epochs, cells=body, backbone=backbone))
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


def run(cmd: list[str], env: dict, cwd: Path, timeout: float = 600):
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)


# session-scoped: xdist may interleave other modules' tests between this module's, and a
# module-scoped fixture would then be torn down and made again
@pytest.fixture(scope="session")
def rig(tmp_path_factory):
    cluster = Rig(
        tmp_path_factory.mktemp("rig"), tmp_path_factory.getbasetemp(), workers=1, dashboard=True
    )
    yield cluster
    cluster.stop()


def test_a_study_on_nodes_that_share_no_disk_keeps_its_checkpoints_in_s3_and_runs_once(rig):
    # resnet18: a trial outlasts the start of the other node's actor, so each node takes one
    study = study_file(rig.folder, "twonodes", backbone="resnet18")
    driver = subprocess.Popen(
        rig.ablation(study),
        env=rig.env,
        cwd=rig.folder,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    # meanwhile a colleague launches the same study from a folder of their own: the lease in the
    # bucket refuses it in one line, and it creates nothing
    colleague = rig.folder / "colleague"
    colleague.mkdir()
    wait_for(
        lambda: rig.s3_keys("studies/leases/twonodes/") or driver.poll() is not None,
        300,
        "the study's lease",
    )
    again = run(rig.ablation(study), rig.env, colleague)
    assert again.returncode == 2 and again.stdout == "", again.stdout + again.stderr
    # the lease names the driver's parent run once that is open (the colleague may come sooner)
    assert re.fullmatch(
        r"error: study twonodes is already running \(host [^,]+, pid "
        rf"{driver.pid}, since [^,]+, session twonodes__\S+?(, parent run \w+)?; lease in "
        rf"{rig.storage}/leases/twonodes\): stop it first, or wait for it to end\n",
        again.stderr,
    ), again.stderr
    assert not list(colleague.iterdir())
    out, err = driver.communicate(timeout=600)
    done = subprocess.CompletedProcess(driver.args, driver.returncode, out, err)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client, runs = children(rig.uri, "twonodes")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.data.tags["ray_node_id"] for r in runs}) == 2  # both nodes trained
    for run_ in runs:
        names = {a.path for a in client.list_artifacts(run_.info.run_id)}
        assert {"confusion_matrix.png", "predictions.json"} <= names
        assert len(client.get_metric_history(run_.info.run_id, "val_accuracy")) == 2
    exp = client.get_experiment_by_name("twonodes")
    (parent,) = client.search_runs([exp.experiment_id], "tags.study_parent = 'true'")
    assert parent.info.status == "FINISHED"  # and the refused invocation has none
    assert "report.html" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    # what to look at next: the runs, on the server by the name the study used
    runs_page = f"open http://mlflow:{rig.mlflow_port}/#/experiments/{exp.experiment_id}/runs"
    assert "ce" in done.stdout and runs_page in done.stdout
    # the checkpoints and Tune's state are in the bucket, under the session's name ...
    session = parent.data.tags["study_session"]
    keys = rig.s3_keys(f"studies/{session}/")
    assert any("/checkpoint_" in k for k in keys), keys[:20]
    assert any(k.endswith("tuner.pkl") for k in keys)
    for run_ in runs:  # every trial, from either node
        assert any(run_.data.tags["ray_trial_id"] in k and "/checkpoint_" in k for k in keys)
    # ... and nothing was written to a local folder named after the URI
    assert not [p for p in rig.folder.iterdir() if p.name.startswith("s3:")]
    assert not list(rig.s3_keys("studies/.fer-storage-check"))  # the checks leave no marker


def test_a_study_submitted_as_a_ray_job_finishes_and_shows_in_the_mlflow_ui(rig):
    from playwright.sync_api import sync_playwright

    study = study_file(rig.folder, "asjob", cells=1)
    entry = ["python", *rig.args(study)]  # the job's own python: the head's PATH has this venv
    address = ["--address", f"http://127.0.0.1:{rig.dashboard}"]
    deadline = time.time() + 120
    while True:  # the head's job agent starts after the node registers ("try again later")
        done = run([str(BIN / "ray"), "job", "submit", *address, "--", *entry], rig.env, rig.folder)
        if "No available agent" not in done.stderr or time.time() > deadline:
            break
        time.sleep(2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout
    client, runs = children(rig.uri, "asjob")
    assert len(runs) == 1 and {r.info.status for r in runs} == {"FINISHED"}
    # the study in the rig server's UI, in a real browser: its runs, and a child's artifacts
    exp = client.get_experiment_by_name("asjob")
    parent = client.search_runs([exp.experiment_id], "tags.study_parent = 'true'")[0]
    child = runs[0]
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = chromium(p)
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        page.goto(rig.uri)
        page.get_by_text("Model training").first.click()  # MLflow 3 opens in its GenAI mode
        page.goto(f"{rig.uri}/#/experiments/{exp.experiment_id}/runs")
        page.get_by_text(parent.info.run_name).first.wait_for(timeout=60_000)
        page.get_by_text(f"{1 + len(runs)} matching runs").wait_for(timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "mlflow_experiment.png"), full_page=True)
        page.goto(f"{rig.uri}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}")
        page.get_by_text(parent.info.run_name).first.wait_for(timeout=60_000)
        page.goto(f"{rig.uri}/#/experiments/{exp.experiment_id}/runs/{child.info.run_id}/artifacts")
        page.get_by_text("confusion_matrix.png").first.wait_for(timeout=60_000)
        page.get_by_text("confusion_matrix.png").first.click()
        page.locator("img").last.wait_for(timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "mlflow_confusion_matrix.png"), full_page=True)
        browser.close()
    assert (ARTIFACTS / "mlflow_confusion_matrix.png").stat().st_size > 10_000


def test_a_rig_whose_setup_fails_stops_what_it_started(tmp_path, monkeypatch):
    started = []
    real_start = Group.start

    def start(self):
        real_start(self)
        started.append(self.proc.pid)

    def no_nodes(self, n, timeout=90):
        raise AssertionError(f"0 of {n} nodes came up")  # as a head that never registers

    monkeypatch.setattr(Group, "start", start)
    monkeypatch.setattr(Rig, "wait_nodes", no_nodes)
    with pytest.raises(AssertionError, match="0 of 1 nodes came up"):
        Rig(tmp_path, tmp_path)
    assert len(started) == 2  # the S3 server and the Ray head were up
    assert not [pid for pid in started if _group_alive(pid)]  # and both groups are gone


def test_the_mlflow_server_admits_the_compose_host_names_and_refuses_others(rig):
    def status(host: str) -> int:
        request = urllib.request.Request(
            f"{rig.uri}/api/2.0/mlflow/experiments/search?max_results=1", headers={"Host": host}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code

    assert status(f"mlflow:{rig.mlflow_port}") == 200
    assert status("mlflow:5000") == 200  # as compose's clients send it
    assert status(f"127.0.0.1:{rig.mlflow_port}") == 200  # the published port, from a browser
    assert status(f"mlflow.evil.example:{rig.mlflow_port}") == 403


def test_a_local_storage_is_refused_on_nodes_that_share_no_disk(rig):
    study = study_file(rig.folder, "localdisk")
    local = rig.folder / "local-storage"
    started = time.time()
    cmd = [*rig.ablation(study)]
    cmd[cmd.index(rig.storage)] = str(local)
    done = run(cmd, rig.env, rig.folder, timeout=120)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert time.time() - started < 60
    err = done.stderr.strip()
    assert err.startswith(f"error: --storage {local} is a local folder that 1 of 2 nodes")
    assert "NFS" in err and "s3://" in err and err.count("\n") == 0
    assert not local.exists()  # nothing half-written: no folder, no marker, no MLflow run
    assert not [p.name for p in rig.folder.iterdir() if p.name.startswith(".fer-storage")]
    assert children(rig.uri, "localdisk")[1] == []
    assert MlflowClient(rig.uri).get_experiment_by_name("localdisk") is None


@pytest.mark.parametrize(
    ("flags", "asked"),
    [
        (["--gpus-per-trial", "1"], "1 CPU and 1 GPU"),
        (["--cpus-per-trial", "4"], "4 CPU and 0 GPU"),
    ],
)
def test_trials_that_fit_on_no_node_are_refused_within_seconds(rig, flags, asked):
    study = study_file(rig.folder, "toobig")
    started = time.time()
    done = run(rig.ablation(study, *flags), rig.env, rig.folder, timeout=120)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert time.time() - started < 60
    assert done.stderr == (
        f"error: a trial asks {asked}, but the largest node has 1 CPU and 0 GPU (2 nodes) and "
        "no autoscaler: lower --cpus-per-trial / --gpus-per-trial or add a bigger node\n"
    )
    assert MlflowClient(rig.uri).get_experiment_by_name("toobig") is None


def test_a_killed_driver_is_continued_from_s3_by_the_next_invocation_elsewhere(rig):
    study = study_file(rig.folder, "driverkill", epochs=3)
    cmd = rig.ablation(study, "--max-concurrent", "1")
    driver = subprocess.Popen(
        cmd,
        env={**rig.env, "FER_LEASE_SECONDS": "8"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=rig.folder,
    )

    def one_finished_one_checkpointed():
        client, runs = children(rig.uri, "driverkill")
        indexed = {
            k.rsplit("/", 1)[-1].removesuffix(".json") for k in rig.s3_keys("studies/checkpoints/")
        }
        return any(r.info.status == "FINISHED" for r in runs) and any(
            r.info.status == "RUNNING"
            and r.data.tags.get("trial_identity") in indexed
            and client.get_metric_history(r.info.run_id, "val_accuracy")
            for r in runs
        )

    # the driver notes a trial's checkpoint in the bucket once Tune has it: kill after that
    wait_for(one_finished_one_checkpointed, 300, "a finished trial and a checkpoint of the next")
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    client, before = children(rig.uri, "driverkill")
    finished = {r.info.run_id for r in before if r.info.status == "FINISHED"}
    killed = [r for r in before if r.info.status == "RUNNING"]
    assert len(finished) == 1 and len(killed) == 1
    # another machine, a new working folder, the same command: it cannot tell that the driver
    # is gone, so the study's lease holds it off until it expires, and nothing is created ...
    elsewhere = rig.folder / "elsewhere"
    elsewhere.mkdir()
    there = own_view(
        [sys.executable, *rig.args(study, "--max-concurrent", "1")],
        hosts=rig.hosts,
        hostname="rig-other",
    )
    refused = run(there, rig.env, elsewhere)
    assert refused.returncode == 2, refused.stdout[-3000:] + refused.stderr[-3000:]
    said = re.fullmatch(
        r"error: study driverkill is already running \(host [^,]+, pid "
        rf"{driver.pid}, since .*; lease in {rig.storage}/leases/driverkill\): "
        r"if it is gone, its lease expires at .* \(in (\d) s\) and the same "
        r"command continues the study then\n",
        refused.stderr,
    )
    assert said, refused.stderr
    assert not list(elsewhere.iterdir())
    time.sleep(int(said.group(1)) + 1)
    # ... then continues it: the checkpoint can only be found in the bucket
    done = run(there, rig.env, elsewhere)
    assert "lease: taking over study driverkill from host " in done.stdout
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "0 to run, 1 to continue, 1 finished before (skipped)" in done.stdout
    client, after = children(rig.uri, "driverkill")
    final = [r for r in after if r.info.status == "FINISHED"]
    assert sorted(r.data.tags["cell"] for r in final) == ["ce", "center"]
    assert {r.info.run_id for r in after if r.info.status == "KILLED"} == {killed[0].info.run_id}
    assert client.get_run(killed[0].info.run_id).data.tags["closed_by"] != ""
    for run_id in finished:  # not trained again
        assert len(client.get_metric_history(run_id, "val_accuracy")) == 3
    continued = next(r for r in final if r.info.run_id not in finished)
    assert continued.data.tags["continues_run"] == killed[0].info.run_id
    history = client.get_metric_history(continued.info.run_id, "val_accuracy")
    assert sorted(m.step for m in history) == [1, 2, 3]  # earlier epochs copied, none twice
    exp = client.get_experiment_by_name("driverkill")
    parents = client.search_runs(
        [exp.experiment_id], "tags.study_parent = 'true'", order_by=["attributes.start_time ASC"]
    )
    assert [r.info.status for r in parents] == ["KILLED", "FINISHED"]  # one per invocation
    progress = [ln for ln in done.stdout.splitlines() if " done, " in ln]
    assert progress[0].split("] ")[1].startswith("1/2 done")  # counts the earlier trial
    # nothing of the study's state is local, only the report it was asked to write here
    assert [p.name for p in elsewhere.iterdir()] == ["reports"]
    assert {p.name for p in next((elsewhere / "reports").iterdir()).iterdir()} >= {"report.html"}


def test_an_mlflow_outage_through_the_whole_training_delays_no_trial_and_loses_nothing(rig):
    study = study_file(rig.folder, "outage", epochs=3)
    cmd = [a for a in rig.ablation(study) if a != "--no-log-checkpoints"]
    driver = subprocess.Popen(
        cmd,
        env=rig.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=rig.folder,
        text=True,
    )
    lines: list[tuple[float, str]] = []  # (when it was printed, line)
    reader = threading.Thread(
        target=lambda: lines.extend((time.monotonic(), ln) for ln in driver.stdout), daemon=True
    )
    reader.start()
    wait_for(
        lambda: any("<- started" in ln for _, ln in lines) or driver.poll() is not None,
        300,
        "a running trial",
    )
    stopped = time.monotonic()
    rig.mlflow.stop()
    # the server stays away until both trials have trained to the end (a minute at most), and
    # a few seconds more: a Tune loop that waited on MLflow would not get there
    deadline = stopped + 60
    while time.monotonic() < deadline and sum("<- finished" in ln for _, ln in lines) < 2:
        time.sleep(0.5)
    time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
    back = time.monotonic()
    rig.mlflow.start()
    rig.wait_mlflow()
    down = time.monotonic() - stopped  # what clients saw: the outage and the server's restart
    assert driver.wait(timeout=600) == 0, "".join(ln for _, ln in lines)[-3000:]
    reader.join(timeout=30)
    # both trials trained to the end while the server was away: Tune's loop never waited
    finished = [t for t, ln in lines if "<- finished" in ln]
    assert len(finished) == 2 and max(finished) < back
    client, runs = children(rig.uri, "outage")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    for run_ in runs:  # every epoch's metrics, the final ones and the artifacts arrived
        steps = sorted(m.step for m in client.get_metric_history(run_.info.run_id, "val_accuracy"))
        assert steps == [1, 2, 3] and "test_accuracy" in run_.data.metrics
        names = {a.path for a in client.list_artifacts(run_.info.run_id)}
        assert {"confusion_matrix.png", "predictions.json"} <= names
        logged = client.search_logged_models(
            [run_.info.experiment_id], f"source_run_id = '{run_.info.run_id}'"
        )
        assert len(logged) == 1  # the selected model, through the server's artifact proxy
    best = client.get_model_version_by_alias("outage", "best")  # registered at the end
    assert best.run_id in {r.info.run_id for r in runs}
    assert any(ln.strip() == "best model: models:/outage@best" for _, ln in lines)
    report = next(ln for _, ln in lines if ln.startswith("tracking: "))
    assert "MLflow was unreachable" in report and "none lost" in report
    # measured from the first failed write to the first that got through after the restart
    assert down - 10 <= float(report.split("longest ")[1].split(" s")[0]) <= down + 15


def test_without_an_address_a_private_ray_starts_beside_a_running_cluster(rig, tmp_path):
    # in this driver's view /tmp/ray/ray_current_cluster names the rig, as on a machine where
    # `ray start --head` ran: a bare ray.init() would join it
    seen = tmp_path / "ray-temp"
    seen.mkdir()
    (seen / "ray_current_cluster").write_text(f"127.0.0.1:{rig.port}")
    study = study_file(tmp_path, "private", cells=1)
    cmd = [
        sys.executable,
        "-m",
        "orchestrate.ablation",
        "--study",
        str(study),
        "--preset",
        "tiny",
        "--storage",
        str(tmp_path / "ray"),
        "--tracking-uri",
        f"sqlite:///{tmp_path}/m.db",
        "--no-log-checkpoints",
    ]
    script = f'mkdir -p /tmp/ray && mount --bind {seen} /tmp/ray && exec "$@"'
    view = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *cmd]
    done = run(view, rig.env, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _, runs = children(f"sqlite:///{tmp_path}/m.db", "private")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["ray_node_id"] not in rig.node_ids()


AUTOSCALER = """
cluster_name: fake
max_workers: 1
upscaling_speed: 1.0
idle_timeout_minutes: 1
provider: {type: fake_multinode, disable_launch_config_check: true, disable_node_updaters: true}
auth: {ssh_user: ubuntu}
available_node_types:
  ray.head.default: {resources: {CPU: 1}, node_config: {}, max_workers: 0}
  gpu: {resources: {CPU: 1, GPU: 1}, node_config: {}, min_workers: 0, max_workers: 1}
head_node_type: ray.head.default
file_mounts: {}
cluster_synced_files: []
file_mounts_sync_continuously: false
rsync_exclude: []
rsync_filter: []
initialization_commands: []
setup_commands: []
head_setup_commands: []
worker_setup_commands: []
head_start_ray_commands: []
worker_start_ray_commands: []
"""


def test_an_autoscaling_cluster_is_waited_for_up_to_the_node_timeout(tmp_path):
    config = tmp_path / "autoscaler.yaml"
    config.write_text(AUTOSCALER)
    temp = Path(tempfile.mkdtemp(prefix="rta", dir="/tmp"))
    port = free_port()
    # Ray's own autoscaler with its local "fake" node provider: a GPU node type it may start
    env = {
        **os.environ,
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
    }
    env.pop("RAY_ADDRESS", None)
    head = Group(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            f"--autoscaling-config={config}",
            "--num-cpus=1",
            f"--temp-dir={temp}",
            "--include-dashboard=false",
            "--disable-usage-stats",
            "--node-ip-address=127.0.0.1",
        ],
        env,
        tmp_path / "head.log",
    )
    try:
        reporting = textwrap.dedent(f"""
            import time, ray
            from ray._private import ray_constants
            from ray.experimental.internal_kv import _internal_kv_get
            ray.init(address="127.0.0.1:{port}", logging_level="ERROR")
            deadline = time.time() + 60
            while not _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS):
                assert time.time() < deadline, "the autoscaler never reported"
                time.sleep(0.5)
        """)
        subprocess.run([sys.executable, "-c", reporting], env=env, check=True, timeout=120)
        study = study_file(tmp_path, "autoscale", cells=1)
        cmd = [
            sys.executable,
            "-m",
            "orchestrate.ablation",
            "--study",
            str(study),
            "--preset",
            "tiny",
            "--address",
            f"127.0.0.1:{port}",
            "--gpus-per-trial",
            "1",
            "--node-timeout",
            "3",
            "--storage",
            str(tmp_path / "ray"),
            "--tracking-uri",
            f"sqlite:///{tmp_path}/m.db",
        ]
        started = time.time()
        done = run(cmd, env, tmp_path, timeout=120)
        assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
        assert time.time() - started < 60
        assert (
            "a trial asks 1 CPU and 1 GPU and the largest node has 1 CPU and 0 GPU" in done.stdout
        )
        assert "waiting up to 3 s for the autoscaler" in done.stdout
        assert done.stderr.startswith("error: a trial asks 1 CPU and 1 GPU")
        assert "the autoscaler started no node that fits within --node-timeout 3 s" in done.stderr
        assert not (tmp_path / "m.db").exists() and not (tmp_path / "ray").exists()
    finally:
        head.stop()
        shutil.rmtree(temp, ignore_errors=True)


def test_a_worker_node_killed_mid_study_has_its_trials_restored_from_s3(rig):
    """It takes the rig's worker away, and starts it again at the end."""
    epochs = 8
    study = study_file(rig.folder, "nodekill", epochs=epochs)
    driver = subprocess.Popen(
        rig.ablation(study, "--max-failures", "3"),
        env=rig.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=rig.folder,
    )

    def worker_trial_has_two_epochs():
        # the trial on the worker, by the host tag its run carries while it trains (the head's
        # may finish first: the worker builds its own dataset cache, so it starts later)
        client, runs = children(rig.uri, "nodekill")
        there = [r for r in runs if r.data.tags.get("host") == "rig-worker-0"]
        assert not [r for r in there if r.info.status == "FINISHED"], "it ended before the kill"
        return (
            bool(there)
            and len(client.get_metric_history(there[0].info.run_id, "val_accuracy")) >= 2
        )

    wait_for(worker_trial_has_two_epochs, 300, "two epochs of the worker's trial")
    rig.workers[0].stop(signal.SIGKILL)  # the node dies at once, and its disk with it
    output = driver.communicate(timeout=900)[0].decode()
    assert driver.returncode == 0, output[-3000:]
    client, runs = children(rig.uri, "nodekill")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    for run_ in runs:  # restored from the bucket: at most one epoch redone, none skipped
        history = client.get_metric_history(run_.info.run_id, "val_accuracy")
        assert epochs <= len(history) <= epochs + 1
        assert sorted({m.step for m in history}) == list(range(1, epochs + 1))
    assert len({r.data.tags["ray_node_id"] for r in runs}) == 1  # both ended on the head
    assert {r.data.tags["host"] for r in runs} == {platform.node()}  # the tag moved with it
    rig.workers[0].start()  # the rig as it was, for whatever test this worker runs next
    rig.wait_nodes(2)
