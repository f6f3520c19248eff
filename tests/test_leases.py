"""One runner per study: the lease in the study's storage. Invocations racing for it (real
processes, a shared folder and a real S3 API server), holders SIGKILLed on this host and on
another (its own UTS namespace and host name), and the same grid study launched twice from the
command line in one folder."""

import os
import re
import socket
import subprocess
import sys
import time

import pytest
from test_storage import KEYS, S3Server

from orchestrate.plan.lease import FOLDER, Lease, LeaseHeld
from orchestrate.store.storage import Storage

# a stand-in for an invocation: claims the study "st" when told, says so, holds it
CLAIM = """
import sys, time
from orchestrate.plan.lease import Lease, LeaseHeld
from orchestrate.store.storage import Storage
storage, start, hold = Storage.parse(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
storage.files("warm"), storage.read_text("warm")  # imports done before the start
import boto3, botocore  # noqa: E401
time.sleep(max(0.0, start - time.time()))  # every racer leaves the line at once
try:
    Lease.acquire(storage, "st", "session-" + sys.argv[4], out=sys.stderr)
except LeaseHeld as err:
    print("refused:", err, flush=True)
    sys.exit(2)
print("held", flush=True)
time.sleep(hold)
"""


def claim(
    storage: str, name: str, hold: float = 120, start: float = 0, host: str = "", env=None
) -> subprocess.Popen:
    cmd = [sys.executable, "-c", CLAIM, storage, str(start), str(hold), name]
    if host:  # another machine, as far as host names go
        cmd = ["unshare", "--uts", "sh", "-c", f'hostname {host} && exec "$@"', "sh", *cmd]
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def first_line(proc: subprocess.Popen) -> str:
    return proc.stdout.readline().strip()


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("s3"))
    server.client().create_bucket(Bucket="leases")
    yield server
    server.stop()


@pytest.mark.parametrize("where", ["shared folder", "s3"])
def test_of_invocations_racing_for_a_study_exactly_one_holds_it(
    where, tmp_path, request, monkeypatch
):
    env = {}
    if where == "s3":
        server = request.getfixturevalue("bucket")
        env = {**KEYS, "AWS_ENDPOINT_URL": server.url}
        storage = "s3://leases/race"
    else:
        storage = str(tmp_path / "ray")
    start = time.time() + 4  # every racer imported and waiting
    # the holder holds until every racer has tried: on a busy machine a racer may leave late
    racers = [claim(storage, str(i), start=start, env=env) for i in range(5)]
    said = [first_line(r) for r in racers]
    for r in racers:
        r.kill()
        r.wait(timeout=60)
    assert sorted(said)[0] == "held" and sum(s == "held" for s in said) == 1, said
    refusals = [s for s in said if s != "held"]
    host = socket.gethostname()
    for text in refusals:  # each names the holder: where it runs and what it runs
        assert text.startswith(f"refused: study st is already running (host {host}, pid ")
        assert "session session-" in text and "stop it first, or wait for it to end" in text
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert Storage.parse(storage).files(f"{FOLDER}/st") == ["000001.json"]


def test_a_stale_lease_is_taken_over_at_once_on_its_host_and_after_expiry_from_another(
    tmp_path, capsys, monkeypatch
):
    storage = str(tmp_path / "ray")
    here = socket.gethostname()
    holder = claim(storage, "killed")
    assert first_line(holder) == "held"
    holder.kill()
    holder.wait()

    # another host cannot tell that the process is gone: it waits for the lease's expiry
    other = claim(storage, "elsewhere", host="node-b")
    refused = first_line(other)
    assert other.wait(timeout=30) == 2
    assert f"(host {here}, pid {holder.pid}, since " in refused
    assert re.search(r"if it is gone, its lease expires at .* \(in (29\d|300) s\)", refused)

    # on its own host, a holder whose process is gone is taken over at once
    lease = Lease.acquire(Storage.parse(storage), "st", "here")
    out = capsys.readouterr().out
    assert f"taking over study st from host {here}, pid {holder.pid}, " in out
    assert f"(its process {holder.pid} on this host is gone)" in out
    lease.release()  # released: the next invocation starts at once, taking nothing over
    alive = claim(storage, "b", host="node-b", env={"FER_LEASE_SECONDS": "2"})
    assert first_line(alive) == "held"

    time.sleep(5)  # over twice its expiry: renewed meanwhile, it still holds
    with pytest.raises(LeaseHeld, match=r"host node-b, pid \d+, .*expires at .* \(in [012] s\)"):
        Lease.acquire(Storage.parse(storage), "st", "here")
    alive.kill()
    alive.wait()
    assert "taking over" not in alive.stderr.read()  # it found the lease released
    with pytest.raises(LeaseHeld):  # dead, but not yet expired
        Lease.acquire(Storage.parse(storage), "st", "here")
    time.sleep(2.5)
    lease = Lease.acquire(Storage.parse(storage), "st", "here")
    out = capsys.readouterr().out
    assert "taking over study st from host node-b" in out and "(not renewed since " in out
    lease.release()
    assert Storage.parse(storage).files(f"{FOLDER}/st") == [f"{lease.generation:06d}.json"]


TWICE = """
name = "twice"
kind = "grid"
[run]
dataset = "synthetic"
seeds = 2
[defaults]
backbone = "shufflenet_v2_x0_5"
attention = "none"
[[cells]]
name = "ce"
loss = "ce"
[[cells]]
name = "island"
loss = "island"
[presets.tiny]
epochs = 2
batch_size = 16
image_size = 32
synthetic_subjects = 5
synthetic_images_per_class = 2
"""


@pytest.mark.slow
def test_a_study_launched_twice_in_one_folder_trains_each_trial_once(ray_cluster, tmp_path):
    import ray
    from mlflow.tracking import MlflowClient

    (tmp_path / "twice.toml").write_text(TWICE)
    # as a user types it, twice, in one folder (on the tests' running Ray: it starts faster)
    cmd = [
        sys.executable,
        "-m",
        "orchestrate.ablation",
        "--study",
        "twice.toml",
        "--preset",
        "tiny",
        "--no-log-checkpoints",
        "--address",
        ray.get_runtime_context().gcs_address,
    ]
    first = subprocess.Popen(
        cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    time.sleep(1)
    second = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, out[-2000:] + err[-2000:]
    assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
    assert second.stdout == "" and "Traceback" not in err + second.stderr
    refusal = second.stderr.splitlines()
    assert len(refusal) == 1 and refusal[0].startswith(
        f"error: study twice is already running (host {socket.gethostname()}, pid {first.pid}, "
    )
    assert f"lease in {tmp_path / 'ray_results'}/leases/twice)" in refusal[0]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("twice").experiment_id])
    parents = [r for r in runs if r.data.tags["study_parent"] == "true"]
    trials = [r for r in runs if r.data.tags["study_parent"] == "false"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # the refused one: none
    assert f"session {parents[0].data.tags['study_session']}" in refusal[0]
    assert (
        sorted(r.data.tags["trial_identity"] for r in trials)
        == sorted({r.data.tags["trial_identity"] for r in trials})
        and len(trials) == 4
    )
    assert {r.info.status for r in trials} == {"FINISHED"}
