"""--storage: local folders and object-store URIs, checked before anything is created, against a
real S3 API server (moto's server mode) on loopback."""

import os
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
from conftest import free_port, wait_http

from orchestrate.store.storage import Storage, StorageError

BIN = Path(sys.executable).parent
KEYS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class S3Server:
    def __init__(self, folder: Path, **env):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(folder / f"s3-{self.port}.log", "wb")  # closed in stop()
        self.proc = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            env={**os.environ, **env},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_http(self.url + "/", "the S3 server", any_status=True)  # 403 when it checks keys

    def client(self):
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing-secret",
            region_name="us-east-1",
        )

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("s3"))
    server.client().create_bucket(Bucket="studies")
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3, monkeypatch):
    for key, value in {**KEYS, "AWS_ENDPOINT_URL": s3.url}.items():
        monkeypatch.setenv(key, value)
    return s3


def test_a_folder_is_made_absolute_and_a_uri_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Storage.parse("ray_results").uri == str(tmp_path / "ray_results")
    assert Storage.parse(f"file://{tmp_path}/x").uri == str(tmp_path / "x")
    assert Storage.parse("s3://bucket/prefix/").uri == "s3://bucket/prefix"
    assert not Storage.parse("s3://bucket").local and Storage.parse("x").local
    assert Storage.parse("s3://bucket/p").join("s1") == "s3://bucket/p/s1"
    for bad, message in [("", "empty"), ("s3://", "names no bucket")]:
        with pytest.raises(StorageError, match=message):
            Storage.parse(bad)
    with pytest.raises(StorageError, match="Unrecognized filesystem type"):
        Storage.parse("nosuch://bucket/x").check()


def test_a_local_folder_is_checked_without_being_created(tmp_path):
    target = tmp_path / "a" / "b"
    Storage.parse(str(target)).check()
    assert not (tmp_path / "a").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="exists and is not a folder"):
        Storage.parse(str(tmp_path / "file")).check()
    with pytest.raises(StorageError, match="is not a writable folder"):
        Storage.parse(str(tmp_path / "file" / "below")).check()


def test_a_bucket_is_checked_and_the_check_leaves_nothing(s3_env):
    storage = Storage.parse("s3://studies/ray")
    storage.check()
    assert s3_env.client().list_objects_v2(Bucket="studies").get("KeyCount") == 0
    marker = storage.write_marker()
    assert storage.sees_marker(marker) is None
    storage.remove_marker(marker)
    assert storage.sees_marker(marker) is not None
    with pytest.raises(StorageError, match="bucket 'missing' does not exist .*AWS_ENDPOINT_URL"):
        Storage.parse("s3://missing/ray").check()


def test_sessions_are_listed_from_the_bucket(s3_env):
    client = s3_env.client()
    for key in (
        "listed/t4__syn__cpu__20260101-000000/tuner.pkl",
        "listed/t4__syn__cpu__20260102-000000/tuner.pkl",
        "listed/t3__syn__cpu__20260103-000000/tuner.pkl",
        "listed/loose.txt",
    ):
        client.put_object(Bucket="studies", Key=key, Body=b"x")
    storage = Storage.parse("s3://studies/listed")
    assert storage.sessions("t4__syn__cpu__") == [
        "t4__syn__cpu__20260101-000000",
        "t4__syn__cpu__20260102-000000",
    ]
    assert Storage.parse("s3://studies/empty").sessions("t4") == []


@pytest.mark.slow
def test_every_storage_error_is_one_line_exit_2_and_leaves_nothing(
    s3, tmp_path, monkeypatch, capsys
):
    from orchestrate.ablation import main

    refusing = S3Server(tmp_path, INITIAL_NO_AUTH_ACTION_COUNT="0")  # enforces credentials
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for key, value in KEYS.items():
        monkeypatch.setenv(key, value)
    try:
        cases = [
            ("s3://missing/ray", s3.url, "bucket 'missing' does not exist"),
            (
                "s3://studies/ray",
                f"http://127.0.0.1:{free_port()}",
                "the object store cannot be reached",
            ),
            ("s3://studies/ray", refusing.url, "the object store refused the credentials"),
            (str(work / "file" / "x"), s3.url, "is not a writable folder"),
        ]
        (work / "file").write_text("in the way")
        for storage, endpoint, message in cases:
            monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
            started = time.monotonic()
            code = main(["--storage", storage, "--tracking-uri", f"sqlite:///{work}/mlflow.db"])
            err = capsys.readouterr().err
            assert code == 2, err
            assert err.startswith(f"error: --storage {storage}: ")
            assert message in err and err.count("\n") == 1
            assert time.monotonic() - started < 60
            # no MLflow store, no folder named s3:, no output of any kind
            assert [p.name for p in work.iterdir()] == ["file"]
    finally:
        refusing.stop()
