"""Worker faults the training suite does not cover with real processes.

`tests/workers/test_worker_jobs.py` already kills a worker mid-epoch and checks the job resumes
from its checkpoint exactly once; here: a job whose worker dies on every attempt, and a second
worker handed the same job by Redis while the first still trains it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from celery import Celery

from tests.workers.helpers import WorkerProcess, lenet_spec, statuses, wait_finished, wait_for
from workers.celery_app import enqueue_job
from workers.contracts import JobStatus
from workers.store.jobs import JobStore

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

MAX_ATTEMPTS = 2
VISIBILITY_S = 10  # the smallest the settings allow


def test_a_job_that_kills_its_worker_on_every_attempt_fails_after_the_cap(
    store: JobStore, celery_app: Celery, start_worker: Callable[..., WorkerProcess]
) -> None:
    env = {"CNNSERVE_MAX_ATTEMPTS": str(MAX_ATTEMPTS)}
    job = store.create(lenet_spec(epochs=30, train_limit=1000))
    enqueue_job(celery_app, job.id)
    killed = []
    for attempt in range(1, MAX_ATTEMPTS + 1):
        worker = start_worker(env=env)
        wait_for(
            store,
            job.id,
            lambda r, a=attempt, w=worker: (
                r.status is JobStatus.running  # type: ignore[misc]
                and r.attempts == a
                and r.worker == w.name
            ),
            90,
            f"attempt {attempt} running",
            worker,
        )
        worker.kill()  # the crash: SIGKILL while it trains the job
        killed.append(worker.name)

    survivor = start_worker(env=env)
    record = wait_finished(store, job.id, 90, survivor)

    assert record.status is JobStatus.failed
    assert record.attempts == MAX_ATTEMPTS
    assert record.error and f"gave up after {MAX_ATTEMPTS} attempts" in record.error
    assert killed[-1] in record.error  # names the worker that died last
    history = statuses(store, job.id)
    assert [s["worker"] for s in history if s["status"] == "running"] == killed
    assert history[-1]["status"] == "failed"
    assert survivor.proc.poll() is None  # the worker that refused the job lives on


def test_two_workers_with_a_short_visibility_timeout_never_train_one_job_at_once(
    store: JobStore, celery_app: Celery, start_worker: Callable[..., WorkerProcess]
) -> None:
    env = {"CNNSERVE_VISIBILITY_TIMEOUT": str(VISIBILITY_S)}
    first = start_worker(env=env)
    job = store.create(lenet_spec(epochs=60, train_limit=1000))  # outlasts the timeout
    enqueue_job(celery_app, job.id)
    wait_for(store, job.id, lambda r: r.status is JobStatus.running, 60, "running", first)
    # kombu sweeps for overdue unacked messages when a consumer starts (then only every
    # ~100 s): start the second worker once the running job's message is overdue
    time.sleep(VISIBILITY_S + 1)
    second = start_worker(env=env)  # idle: Redis hands it the unacked, still running job
    deadline = time.monotonic() + 90
    while "leased by another live worker" not in second.log():
        assert time.monotonic() < deadline, f"no redelivery:\n{second.log()[-3000:]}"
        assert not store.get(job.id).status.finished, "the job ended before the redelivery"
        time.sleep(0.5)
    # a few more epochs with both workers up, then stop the job (its checkpoints stay)
    trained = len(store.get(job.id).metrics)
    wait_for(store, job.id, lambda r: len(r.metrics) >= trained + 2, 60, "two more epochs", first)
    store.request_cancel(job.id)
    record = wait_finished(store, job.id, 60, first)

    assert record.status is JobStatus.cancelled, record.error
    assert record.attempts == 1 and record.worker == first.name
    starts = [s for s in statuses(store, job.id) if s["status"] == "running"]
    assert len(starts) == 1, starts  # one lease holder, one start
    epoch_events = [d["epoch"] for _, k, d in store.events(job.id, count=10_000) if k == "epoch"]
    assert epoch_events == list(range(1, len(record.metrics) + 1))  # each epoch trained once
    assert second.proc.poll() is None and "attempt 1 on" not in second.log()
