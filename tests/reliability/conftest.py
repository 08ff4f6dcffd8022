"""Fixtures for the reliability tests: a Redis of their own, workers, and API processes.

These tests kill and restart things, so they never share the developers' Redis: every test runs
on a private `redis-server` (flushed per test), and the ones that kill Redis start their own.
Workers and job helpers are the training suite's (`tests/workers/`), imported, not copied.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.reliability.procs import ApiProcess, RedisServer
from tests.workers.conftest import (  # noqa: F401  (fixtures, re-exported for this suite)
    celery_app,
    start_worker,
    store,
    worker_env,
)


@pytest.fixture(scope="session")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One throwaway Redis for the suite; no persistence."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(private_redis: RedisServer) -> Iterator[str]:
    """The private Redis, empty for each test (overrides the shared DB-9 fixture)."""
    client = redis.Redis.from_url(private_redis.url)
    client.flushall()
    yield private_redis.url
    client.flushall()
    client.close()


@pytest.fixture
def start_api(tmp_path: Path, settings: object) -> Iterator[Callable[..., ApiProcess]]:
    """Start `cnnserve api` processes with the test settings (plus env overrides)."""
    started: list[ApiProcess] = []

    def start(log_level: str = "INFO", **env: str) -> ApiProcess:
        api = ApiProcess(
            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **env},
            log_path=tmp_path / f"api-{len(started)}.log",
            log_level=log_level,
        )
        started.append(api)
        api.start()
        return api

    yield start
    for api in started:
        api.stop()
