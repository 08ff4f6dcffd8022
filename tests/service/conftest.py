"""Fixtures for the API tests: TestClients over a real Redis, and a real uvicorn process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.cli.stack import free_port
from tests.workers.conftest import (  # noqa: F401  (a real worker for the end-to-end tests)
    celery_app,
    start_worker,
    worker_env,
)
from workers.settings import Settings
from workers.store.jobs import JobStore

API_KEY = "test-key-0123456789"


@pytest.fixture
def make_client(settings: Settings) -> Iterator[Callable[..., TestClient]]:
    """Build TestClients over apps with the test settings plus overrides; closed at the end."""
    clients: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        app = create_app(settings.model_copy(update=overrides))
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    """A client of an open API (no keys) on the test Redis database."""
    return make_client()


@pytest.fixture
def keyed_client(make_client: Callable[..., TestClient]) -> TestClient:
    """A client of an API guarded by `API_KEY`; sends no key by itself."""
    return make_client(api_keys=f"other-key,{API_KEY}")


@pytest.fixture
def store(settings: Settings) -> Iterator[JobStore]:
    """The job store on the test Redis database, for writing records and events directly."""
    s = JobStore.from_url(settings.redis_url)
    yield s
    s.r.close()


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early with code {proc.returncode}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """Stop a process this test started (and its group), by PID."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


@dataclass(frozen=True)
class Server:
    """A running API process."""

    url: str
    pid: int


@pytest.fixture
def uvicorn_server(settings: Settings, tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start the API under a real uvicorn process with the test settings (and env overrides)."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(**env_overrides: str) -> Server:
        port = free_port()
        env = {
            **os.environ,
            "CNNSERVE_REDIS_URL": settings.redis_url,
            "CNNSERVE_DATA_DIR": str(settings.data_dir),
            **env_overrides,
        }
        log = open(tmp_path / f"uvicorn-{port}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "service.api.app:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/healthz", proc)
        return Server(url, proc.pid)

    yield start
    for p in procs:
        stop_process(p)
