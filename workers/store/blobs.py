"""Where checkpoint files live: a local directory, or a bucket of any S3-compatible store.

Both speak one small interface of keys (`<job>/e<NNN>/weights.safetensors`, ...), so the
checkpoint store above them is the same code for both. A key is written whole or not at all:
the local directory writes a temporary file and renames it (after fsync), as Lightning's
`_atomic_save` does; an S3 PUT is atomic by itself.

The S3 side is boto3 (botocore): the AWS SDK itself, so credentials, endpoint and region come
from the standard places (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL`,
`AWS_DEFAULT_REGION`, `~/.aws`, the instance's role), large files go up and down in parallel
parts (s3transfer), and it is what moto, the S3 server the tests run, is built around.
fsspec/s3fs (Lightning's choice) would add aiobotocore, which pins botocore to a narrow window
behind boto3's and runs an event loop in a thread under every call; obstore is younger.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

#: Seconds to connect to the object store, and to wait for an answer; short enough that an
#: unreachable store gives a 503 promptly, long enough for a busy one.
CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 30.0
ATTEMPTS = 3


class BlobNotFoundError(LookupError):
    """No object (file) under this key."""

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(f"no object {key!r}")


class StoreUnavailableError(Exception):
    """The checkpoint store cannot be reached or refuses us (network, credentials, server
    errors): nothing is wrong with the checkpoint, retry later."""


class Blobs(Protocol):
    """Whole objects by key, in a local directory or a bucket."""

    #: Where it is, for messages (`/srv/data/checkpoints`, `s3://bucket/prefix`).
    location: str
    #: True when reads go over the network (and are worth caching on local disk).
    remote: bool

    def put_file(self, key: str, path: Path) -> None:
        """Store the file at `path` under `key`, atomically; a local store moves it there (the
        caller's copy is gone), a remote one leaves it (the caller removes it)."""

    def put_bytes(self, key: str, data: bytes) -> None:
        """Store `data` under `key`, atomically."""

    def get_bytes(self, key: str) -> bytes:
        """The object under `key` (`BlobNotFoundError` if none)."""

    def download(self, key: str, dest: Path) -> None:
        """Write the object under `key` to `dest` (`BlobNotFoundError` if none)."""

    def local_path(self, key: str) -> Path | None:
        """The object's own file where it is on this machine's disk, else None."""

    def delete_prefix(self, prefix: str) -> None:
        """Remove every object whose key starts with `prefix` (a folder: ends with `/`)."""

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        """Every key under `prefix`, in no particular order."""

    def check(self) -> str:
        """A line saying the store answers; `StoreUnavailableError` when it does not."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalBlobs:
    """Objects as files under one directory (the default: `data_dir/checkpoints`)."""

    remote = False

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        # one spelling per directory: the upgrade's "indexed" mark is keyed by it
        self.location = str(self.root.resolve())

    def _path(self, key: str) -> Path:
        # keys are made by the checkpoint store from validated ids, never from a client string
        return self.root / key

    def _replace(self, tmp: Path, key: str) -> None:
        final = self._path(key)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)

    def put_file(self, key: str, path: Path) -> None:
        final = self._path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        # a name of its own: two threads of one process may put the same key at once
        fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.")
        os.close(fd)
        tmp = Path(name)
        try:
            shutil.move(path, tmp)  # a rename when staged on the same file system
            self._replace(tmp, key)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def put_bytes(self, key: str, data: bytes) -> None:
        final = self._path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            self._replace(Path(name), key)
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise BlobNotFoundError(key) from None

    def download(self, key: str, dest: Path) -> None:
        try:
            shutil.copyfile(self._path(key), dest)
        except (FileNotFoundError, NotADirectoryError):
            raise BlobNotFoundError(key) from None

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def delete_prefix(self, prefix: str) -> None:
        target = self._path(prefix.rstrip("/"))
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # staging, temporaries
            for name in filenames:
                if not name.startswith("."):
                    yield (Path(dirpath) / name).relative_to(self.root).as_posix()

    def check(self) -> str:
        if self.root.is_dir() or not self.root.exists():
            return f"{self.root} is readable"
        raise StoreUnavailableError(f"the checkpoint directory {self.root} is not a directory")


def split_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` as (bucket, `some/prefix/`) (the prefix empty or ending `/`)."""
    rest = url.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


class S3Blobs:
    """Objects in a bucket (under a prefix) of any S3-compatible store, through boto3."""

    remote = True

    def __init__(self, url: str, client: Any = None) -> None:
        self.bucket, self.prefix = split_s3_url(url)
        self.location = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.client = client if client is not None else _s3_client()

    def _key(self, key: str) -> str:
        return self.prefix + key

    def _unavailable(self, exc: Exception, what: str) -> StoreUnavailableError:
        return StoreUnavailableError(
            f"the checkpoint store {self.location} is not reachable ({what}: {_reason(exc)}); "
            "retry shortly"
        )

    def _call(self, what: str, key: str | None, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one boto3 call, turning its errors into the store's own."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if key is not None and code in ("NoSuchKey", "404", "NotFound"):
                raise BlobNotFoundError(key) from None
            raise self._unavailable(exc, what) from exc
        except (BotoCoreError, OSError) as exc:
            raise self._unavailable(exc, what) from exc

    def put_file(self, key: str, path: Path) -> None:
        self._call("upload", None, self.client.upload_file, str(path), self.bucket, self._key(key))

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call(
            "upload",
            None,
            self.client.put_object,
            Bucket=self.bucket,
            Key=self._key(key),
            Body=data,
        )

    def get_bytes(self, key: str) -> bytes:
        def read() -> bytes:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            try:
                return bytes(body.read())
            finally:
                body.close()

        return bytes(self._call("download", key, read))

    def download(self, key: str, dest: Path) -> None:
        self._call(
            "download", key, self.client.download_file, self.bucket, self._key(key), str(dest)
        )

    def local_path(self, key: str) -> Path | None:
        return None

    def delete_prefix(self, prefix: str) -> None:
        batch: list[dict[str, str]] = []
        for key in self.list_keys(prefix):
            batch.append({"Key": self._key(key)})
            if len(batch) == 1000:  # the most one DeleteObjects call takes
                self._delete(batch)
                batch = []
        if batch:
            self._delete(batch)

    def _delete(self, batch: list[dict[str, str]]) -> None:
        self._call(
            "delete",
            None,
            self.client.delete_objects,
            Bucket=self.bucket,
            Delete={"Objects": batch, "Quiet": True},
        )

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        pages = iter(paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)))
        while True:
            page = self._call("list", None, next, pages, None)
            if page is None:
                return
            for item in page.get("Contents", []):
                yield str(item["Key"])[len(self.prefix) :]

    def check(self) -> str:
        self._call("head bucket", None, self.client.head_bucket, Bucket=self.bucket)
        return f"{self.location} answers"


def _reason(exc: Exception) -> str:
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return f"{error.get('Code') or status}: {error.get('Message') or exc}"
    return str(exc) or type(exc).__name__


def _s3_client() -> Any:
    """A boto3 S3 client configured from the standard AWS variables, with short timeouts."""
    import boto3
    from botocore.config import Config

    custom_endpoint = bool(
        os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    )
    config = Config(
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        retries={"max_attempts": ATTEMPTS, "mode": "standard"},
        max_pool_connections=32,
        # MinIO, Ceph and the like answer at one host name: path-style addressing for them
        s3={"addressing_style": "path" if custom_endpoint else "auto"},
    )
    return boto3.session.Session().client("s3", config=config)


def open_blobs(checkpoint_url: str | None, local_root: Path) -> Blobs:
    """The store `checkpoint_url` names (`s3://...`), or the local directory when it is unset."""
    if checkpoint_url:
        return S3Blobs(checkpoint_url)
    return LocalBlobs(local_root)
