"""Shared fixtures: an isolated Redis database, data directory and checkpoint store per test.

`CNNSERVE_TEST_CHECKPOINT_STORE=s3` runs every test's checkpoint store in a bucket of a real
S3-compatible server started for the session (moto's, `tests/s3.py`), through
`CNNSERVE_CHECKPOINT_URL` and the AWS variables exactly as an operator sets them (worker and API
processes the tests start inherit them); unset, the store is the local directory.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis
import torch

from workers.settings import Settings, get_settings
from workers.store.checkpoints import CheckpointStore

if TYPE_CHECKING:  # boto3 only where a test asks for the S3 server: the GPU window lacks it
    from tests.s3 import S3Server

REDIS_HOST = os.environ.get("CNNSERVE_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("CNNSERVE_TEST_REDIS_PORT", "6379"))
# DB 0 is the local stack's; tests use their own database and flush it.
REDIS_TEST_DB = int(os.environ.get("CNNSERVE_TEST_REDIS_DB", "9"))
#: `s3`: checkpoint stores in the test S3 server's bucket; `local` (default): the data dir.
CHECKPOINT_STORE = os.environ.get("CNNSERVE_TEST_CHECKPOINT_STORE", "local")
FASHION_MNIST_DIR = Path(
    os.environ.get("CNNSERVE_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
)


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A flushed Redis database on the real server."""
    url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_TEST_DB}"
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.fail(f"Redis is not reachable at {REDIS_HOST}:{REDIS_PORT}; `make test` starts one")
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3 server, started once per session, with the test bucket made."""
    from tests.s3 import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3") / "moto.log")
    yield server
    server.stop()


@pytest.fixture
def s3_url(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """`CNNSERVE_CHECKPOINT_URL` (and the AWS variables) at a fresh prefix of the bucket."""
    from tests.s3 import BUCKET

    url = f"s3://{BUCKET}/t-{uuid.uuid4().hex[:12]}"
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CNNSERVE_CHECKPOINT_URL", url)
    return url


@pytest.fixture
def settings(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[Settings]:
    """Settings pointing at the test Redis database, a fresh data directory and checkpoint
    store (the data dir's, or a fresh prefix of the S3 bucket with
    CNNSERVE_TEST_CHECKPOINT_STORE=s3)."""
    if CHECKPOINT_STORE == "s3" or "s3_url" in request.fixturenames:
        request.getfixturevalue("s3_url")
    else:
        monkeypatch.delenv("CNNSERVE_CHECKPOINT_URL", raising=False)
    monkeypatch.setenv("CNNSERVE_REDIS_URL", redis_url)
    monkeypatch.setenv("CNNSERVE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CNNSERVE_FASHION_MNIST_DIR", str(FASHION_MNIST_DIR))
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


@pytest.fixture
def checkpoint_store(settings: Settings) -> Iterator[CheckpointStore]:
    """The test settings' checkpoint store (indexed in the test Redis database)."""
    store = CheckpointStore.from_settings(settings)
    yield store
    store.close()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op torch thread: in-process training stays fast when other tests hold cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
