"""A real worker process trains a tiny LeNet job submitted over HTTP; its SSE stream ends."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import FASHION_MNIST_DIR
from tests.http_checks import Event, parse_sse
from tests.service.conftest import Server, stop_process
from workers.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def worker(settings: Settings, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A Celery training worker (solo pool) on the test Redis, stopped by PID at the end."""
    env = {
        **os.environ,
        "CNNSERVE_REDIS_URL": settings.redis_url,
        "CNNSERVE_DATA_DIR": str(settings.data_dir),
        "CNNSERVE_FASHION_MNIST_DIR": str(FASHION_MNIST_DIR),
        "CNNSERVE_TORCH_THREADS": "1",
    }
    log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "workers.celery_app",
            "worker",
            "--pool",
            "solo",
            "--queues",
            "training",
            "--hostname",
            f"api-test-{os.getpid()}@%h",
            "--without-gossip",
            "--without-mingle",
            "--loglevel",
            "INFO",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        stop_process(proc, timeout=30)
        log.close()


def sse_events(url: str, timeout: float) -> list[Event]:
    events: list[Event] = []
    with httpx.stream("GET", url, timeout=httpx.Timeout(timeout, connect=5)) as r:
        assert r.status_code == 200
        events.extend(parse_sse(r.iter_lines()))
    return events


@pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST is not installed",
)
def test_lenet_job_succeeds_through_the_api(
    uvicorn_server: Callable[..., Server],
    worker: subprocess.Popen[bytes],
    tmp_path: Path,
) -> None:
    server = uvicorn_server(CNNSERVE_FASHION_MNIST_DIR=str(FASHION_MNIST_DIR))
    base = server.url
    deadline = time.monotonic() + 90
    ready = httpx.get(f"{base}/readyz", timeout=10)
    while ready.status_code != 200 and time.monotonic() < deadline:
        assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
        time.sleep(1)
        ready = httpx.get(f"{base}/readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["workers"]["ok"] is True

    spec = {"model": "lenet", "epochs": 1, "train_limit": 1000, "device": "cpu", "batch_size": 64}
    r = httpx.post(f"{base}/v1/jobs", json=spec, timeout=10)
    assert r.status_code == 202
    job_id = r.json()["id"]

    events = sse_events(f"{base}/v1/jobs/{job_id}/events", timeout=300)
    kinds = [e[1] for e in events]
    statuses = [e[2]["status"] for e in events if e[1] == "status"]
    assert statuses[0] == "queued"
    assert "running" in statuses
    assert statuses[-1] == "succeeded", (tmp_path / "worker.log").read_text()[-3000:]
    assert events[-1][1] == "status"
    assert "epoch" in kinds
    epoch = next(e[2] for e in events if e[1] == "epoch")
    assert 0.0 <= epoch["val_acc"] <= 1.0

    job = httpx.get(f"{base}/v1/jobs/{job_id}", timeout=10).json()
    assert job["status"] == "succeeded"
    assert [m["epoch"] for m in job["metrics"]] == [1]
    assert job["checkpoints"]
    png = httpx.get(f"{base}/v1/jobs/{job_id}/curves.png", timeout=30)
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    # replay after the first event gives the rest and ends
    rest = sse_events(f"{base}/v1/jobs/{job_id}/events?last_event_id={events[0][0]}", timeout=30)
    assert [e[0] for e in rest] == [e[0] for e in events[1:]]
