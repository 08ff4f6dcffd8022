"""Shared fixtures: an isolated Redis database and data directory per test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch

from workers.settings import Settings, get_settings

REDIS_HOST = os.environ.get("CNNSERVE_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("CNNSERVE_TEST_REDIS_PORT", "6379"))
# DB 0 is the local stack's; tests use their own database and flush it.
REDIS_TEST_DB = int(os.environ.get("CNNSERVE_TEST_REDIS_DB", "9"))
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


@pytest.fixture
def settings(tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """Settings pointing at the test Redis database and a fresh data directory."""
    monkeypatch.setenv("CNNSERVE_REDIS_URL", redis_url)
    monkeypatch.setenv("CNNSERVE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CNNSERVE_FASHION_MNIST_DIR", str(FASHION_MNIST_DIR))
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op torch thread: in-process training stays fast when other tests hold cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
