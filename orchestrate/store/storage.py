"""Where a study keeps its trial checkpoints and Tune's experiment state: ``--storage``.

Either a local folder (one machine, or a path every node mounts, such as NFS) or a URI that
pyarrow's file systems understand (``s3://bucket/prefix``, ``gs://bucket/prefix``), which is
exactly what Ray Tune's ``storage_path`` takes. For S3 the endpoint comes from the standard
``AWS_ENDPOINT_URL`` (MinIO, moto) and credentials from the usual AWS chain, on the driver and
on every node alike.

``check`` runs before anything is created: an unreachable endpoint, a missing bucket, refused
credentials or an unwritable folder are one-line ``StorageError``s. It leaves nothing behind:
the write test object is deleted, and a local folder that does not exist yet is not created
(its nearest existing parent must be writable). Whether every node of a cluster sees the same
storage is checked by ``orchestrate.run.cluster`` with a marker written here.
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

MARKER_PREFIX = ".fer-storage-check-"


class StorageError(ValueError):
    """``--storage`` cannot hold the study's checkpoints."""


@dataclass(frozen=True)
class Storage:
    uri: str  # an absolute folder, or a URI with a scheme

    @classmethod
    def parse(cls, text: str) -> Storage:
        text = str(text).strip()
        if not text:
            raise StorageError("--storage is empty: give a folder or a URI such as s3://bucket/ray")
        if text.startswith("file://"):
            text = text[len("file://") :]
        if "://" not in text:
            return cls(str(Path(text).expanduser().resolve()))
        scheme, rest = text.split("://", 1)
        if not rest.strip("/"):
            raise StorageError(f"--storage {text}: the URI names no bucket")
        return cls(f"{scheme}://{rest.rstrip('/')}")

    @property
    def local(self) -> bool:
        return "://" not in self.uri

    def filesystem(self):
        """(pyarrow file system, path inside it) of the storage root."""
        from pyarrow import fs

        if self.local:
            return fs.LocalFileSystem(), self.uri
        try:
            return fs.FileSystem.from_uri(self.uri)
        except Exception as err:  # ArrowInvalid for unknown schemes, OSError for bad options
            raise StorageError(f"--storage {self.uri}: {_first_line(err)}") from None

    def join(self, name: str) -> str:
        return f"{self.uri}/{name}" if not self.local else str(Path(self.uri) / name)

    # ------------------------------------------------------------------------------- check

    def check(self) -> None:
        if self.local:
            self._check_folder()
        else:
            self._check_bucket()

    def _check_folder(self) -> None:
        path = Path(self.uri)
        if path.exists() and not path.is_dir():
            raise StorageError(f"--storage {path}: exists and is not a folder")
        existing = _nearest_existing(path)
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise StorageError(
                f"--storage {path}: cannot create or write it ({existing} is not a writable folder)"
            )

    def _check_bucket(self) -> None:
        from pyarrow import fs

        filesystem, path = self.filesystem()
        bucket = path.split("/", 1)[0]
        try:
            info = filesystem.get_file_info(bucket)
            if info.type == fs.FileType.NotFound:
                raise StorageError(
                    f"--storage {self.uri}: bucket {bucket!r} does not exist{self._where()}"
                )
            self.remove_marker(self.write_marker())
        except OSError as err:
            raise StorageError(f"--storage {self.uri}: {_explain(err)}{self._where()}") from None

    def _where(self) -> str:
        endpoint = os.environ.get("AWS_ENDPOINT_URL")
        return (
            f" (endpoint {endpoint}, from AWS_ENDPOINT_URL)"
            if endpoint and self.uri.startswith("s3://")
            else ""
        )

    # ------------------------------------------------------------------- small files

    def write_text(self, relative: str, text: str) -> None:
        """Write a small file below the storage (folders created as needed); a reader never sees
        it half-written (locally it is renamed into place; an object store's put is whole)."""
        target = self.join(relative)
        if self.local:
            from fermodel.files import write_atomically

            write_atomically(Path(target), lambda f: f.write(text.encode()))
            return
        filesystem, path = Storage(target).filesystem()
        with filesystem.open_output_stream(path) as out:
            out.write(text.encode())

    def read_text(self, relative: str) -> str | None:
        """A small file below the storage, or None when it is not there."""
        filesystem, path = Storage(self.join(relative)).filesystem()
        try:
            with filesystem.open_input_stream(path) as f:
                return f.read().decode()
        except (FileNotFoundError, IsADirectoryError):
            return None
        except OSError as err:
            if "NoSuchKey" in str(err) or "not found" in str(err).lower():
                return None
            raise

    def create_text(self, relative: str, text: str) -> bool:
        """Create a small file only if it does not exist; False when it does. Atomic where the
        storage can say so (a folder: an exclusive create; S3: a conditional put), so of two
        writers racing for one name exactly one wins; elsewhere it is a check, then a write."""
        target = self.join(relative)
        if self.local:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as out:
                out.write(text.encode())
                out.flush()
                os.fsync(out.fileno())
            return True
        if self.uri.startswith("s3://"):
            import boto3
            from botocore.exceptions import ClientError

            bucket, _, key = target[len("s3://") :].partition("/")
            try:  # boto3 reads AWS_ENDPOINT_URL and the credentials as pyarrow does
                boto3.client("s3").put_object(
                    Bucket=bucket, Key=key, Body=text.encode(), IfNoneMatch="*"
                )
            except ClientError as err:
                if err.response.get("Error", {}).get("Code") in (
                    "PreconditionFailed",
                    "ConditionalRequestConflict",
                ):
                    return False
                raise
            return True
        if self.read_text(relative) is not None:
            return False
        self.write_text(relative, text)
        return True

    def files(self, relative: str) -> list[str]:
        """Names of the files in a folder below the storage (none when it does not exist)."""
        from pyarrow import fs

        filesystem, path = Storage(self.join(relative)).filesystem()
        infos = filesystem.get_file_info(fs.FileSelector(path, allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == fs.FileType.File)

    # ------------------------------------------------------------------- markers, sessions

    def write_marker(self) -> str:
        """Write a small marker file that every node must be able to read; returns its path
        (a local path, or a path inside the object store's file system)."""
        name = f"{MARKER_PREFIX}{secrets.token_hex(8)}"
        if self.local:  # beside the storage when it does not exist yet: nothing is created
            marker = _nearest_existing(Path(self.uri)) / name
            marker.write_text("fer-ablation storage check\n")
            return str(marker)
        filesystem, path = self.filesystem()
        with filesystem.open_output_stream(f"{path}/{name}") as out:
            out.write(b"fer-ablation storage check\n")
        return f"{path}/{name}"

    def remove_marker(self, marker: str) -> None:
        """Delete the marker, and the prefix its write created: an object store keeps an empty
        "folder" object where a deleted file was, which would be a half-written output."""
        if self.local:
            Path(marker).unlink(missing_ok=True)
            return
        filesystem, path = self.filesystem()
        new = _new_prefix(filesystem, path, marker)
        try:
            filesystem.delete_file(marker)
            if new is not None:
                filesystem.delete_dir(new)
        except OSError:
            pass

    def sees_marker(self, marker: str) -> str | None:
        """On a node: None when the marker is readable here, else why not."""
        if self.local:
            return None if Path(marker).is_file() else f"{marker} is not there"
        from pyarrow import fs

        try:
            filesystem, _ = self.filesystem()
            if filesystem.get_file_info(marker).type == fs.FileType.File:
                return None
            return f"{marker} is not visible"
        except (OSError, StorageError) as err:
            return _first_line(err)

    def sessions(self, prefix: str) -> list[str]:
        """Names of the Tune experiments under the storage whose names start with ``prefix``,
        oldest first (the names end in their start time)."""
        from pyarrow import fs

        filesystem, path = self.filesystem()
        try:
            infos = filesystem.get_file_info(fs.FileSelector(path, allow_not_found=True))
        except OSError as err:
            raise StorageError(f"--storage {self.uri}: {_explain(err)}{self._where()}") from None
        names = [i.base_name for i in infos if i.type == fs.FileType.Directory]
        return sorted(n for n in names if n.startswith(prefix))


def _new_prefix(filesystem, path: str, marker: str) -> str | None:
    """The shallowest prefix of ``path`` (below the bucket) that holds nothing but ``marker``,
    found upwards with one listing per level."""
    from pyarrow import fs

    found, only = None, marker
    parts = path.split("/")
    for depth in range(len(parts), 1, -1):
        prefix = "/".join(parts[:depth])
        listing = filesystem.get_file_info(fs.FileSelector(prefix, allow_not_found=True))
        if [i.path for i in listing] != [only]:
            break
        found = only = prefix
    return found


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _explain(err: OSError) -> str:
    """pyarrow's S3 errors, reduced to what the user must fix."""
    text = re.sub(r"\s*\(Request ID: [^)]*\)", "", _first_line(err))
    if re.search(r"NETWORK_CONNECTION|curlCode|Could not connect|Couldn't resolve", text):
        return f"the object store cannot be reached: {text}"
    if re.search(
        r"ACCESS_DENIED|InvalidAccessKeyId|SignatureDoesNotMatch|HTTP status 403|"
        r"Forbidden|INVALID_ACCESS_KEY|SIGNATURE",
        text,
    ):
        return (
            "the object store refused the credentials (AWS_ACCESS_KEY_ID, "
            f"AWS_SECRET_ACCESS_KEY or the instance's role): {text}"
        )
    return text
