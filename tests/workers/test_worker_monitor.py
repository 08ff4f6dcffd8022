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
