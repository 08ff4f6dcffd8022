"""Fixtures for the training side: job store, Celery app, and real worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from celery import Celery

from tests.conftest import FASHION_MNIST_DIR
from tests.workers.helpers import WorkerProcess
from workers.celery_app import make_celery, worker_heartbeats
from workers.settings import Settings
from workers.store.jobs import JobStore
from workers.training.data import FashionMNIST, load_fashion_mnist

#: Short leases so a killed worker's job is recovered within seconds.
TEST_LEASE_SECONDS = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> FashionMNIST:
    """The real Fashion-MNIST, loaded once per test module."""
    where = tmp_path_factory.mktemp("data")
    return load_fashion_mnist(Settings(fashion_mnist_dir=FASHION_MNIST_DIR, data_dir=where))


@pytest.fixture
def store(settings: Settings) -> Iterator[JobStore]:
    job_store = JobStore.from_url(settings.redis_url)
    yield job_store
    job_store.r.close()


@pytest.fixture
def celery_app(settings: Settings) -> Iterator[Celery]:
    app = make_celery(settings)
    yield app
    app.close()


@pytest.fixture
def worker_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        CNNSERVE_LEASE_SECONDS=str(TEST_LEASE_SECONDS),
        CNNSERVE_TORCH_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture
def start_worker(
    settings: Settings, worker_env: dict[str, str], tmp_path: Path
) -> Iterator[Callable[..., WorkerProcess]]:
    """Start real `cnnserve worker --device cpu` processes; all are stopped at the end."""
    started: list[WorkerProcess] = []

    def start(env: dict[str, str] | None = None, wait: bool = True) -> WorkerProcess:
        name = f"test-{len(started)}-{os.getpid()}@localhost"
        log_path = tmp_path / f"worker-{len(started)}.log"
        cmd = [sys.executable, "-m", "service.cli", "--log-level", "INFO", "worker"]
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [*cmd, "--device", "cpu", "--name", name],
                env={**worker_env, **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=Path(__file__).resolve().parents[2],
            )
        worker = WorkerProcess(name, proc, log_path)
        started.append(worker)
        if wait:
            deadline = time.monotonic() + 60
            while not any(w["name"] == name for w in worker_heartbeats(settings.redis_url)):
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"worker {name} did not start:\n{worker.log()[-3000:]}")
                time.sleep(0.2)
        return worker

    yield start
    for worker in started:
        worker.stop()
