"""The worker's background threads over a real Redis: its heartbeat never waits behind a scan,
and orphan recovery sends a job the one way the API does."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
from celery import Celery

from tests.workers.helpers import lenet_spec
from workers.celery_app import worker_heartbeats
from workers.contracts import QUEUE, TRAIN_TASK, JobStatus
from workers.settings import Settings
from workers.store.jobs import JobStore
from workers.training import runner
from workers.worker import WorkerMonitor


def test_the_heartbeat_keeps_beating_while_an_orphan_scan_is_slow(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    scanning = threading.Event()
    release = threading.Event()

    def slow_scan(*_: Any) -> list[str]:  # as a scan over a huge history would be
        scanning.set()
        release.wait(30)
        return []

    monkeypatch.setattr(runner, "recover_orphans", slow_scan)
    quick = settings.model_copy(update={"lease_seconds": 2})  # a heartbeat each second
    monitor = WorkerMonitor("monitor-test@host", quick)
    monitor.start()
    try:
        assert scanning.wait(10)
        seen = set()
        deadline = time.monotonic() + 10
        while len(seen) < 3 and time.monotonic() < deadline:
            seen |= {b["seen_at"] for b in worker_heartbeats(settings.redis_url)}
            time.sleep(0.2)
        assert len(seen) >= 3, "the heartbeat stopped while the scan ran"
        assert scanning.is_set() and not release.is_set()
    finally:
        release.set()
        monitor.stop()
    assert worker_heartbeats(settings.redis_url) == []  # cleared on the way out


def test_a_recovered_job_is_sent_as_the_api_sends_it(
    settings: Settings, store: JobStore, celery_app: Celery
) -> None:
    from workers.celery_app import enqueue_job

    job = store.create(lenet_spec(epochs=1))
    store.update(job.id, lambda r: setattr(r, "status", JobStatus.running))

    sent = runner.recover_orphans(store, settings, lambda jid: enqueue_job(celery_app, jid))

    assert sent == [job.id]
    (raw,) = store.r.lrange(QUEUE, 0, -1)
    headers = json.loads(raw)["headers"]
    assert (headers["task"], headers["id"]) == (TRAIN_TASK, job.id)


def test_one_worker_a_period_reads_the_broker_for_lost_messages(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every worker's maintenance looks for lost messages; reading the broker (up to every
    queued message) is done by one of them per period, not by each."""
    sweeps: list[str] = []

    def counting(*_: Any) -> list[str]:
        sweeps.append(threading.current_thread().name)
        return []

    monkeypatch.setattr(runner, "resend_lost", counting)
    quick = settings.model_copy(update={"lease_seconds": 1})
    monitors = [WorkerMonitor(f"w{i}@host", quick) for i in range(3)]
    for monitor in monitors:
        monitor.start()
    time.sleep(3.5)  # three periods and a half
    for monitor in monitors:
        monitor.stop()
    # three workers, about four periods: once a period, never three times
    assert 2 <= len(sweeps) <= 5, sweeps
