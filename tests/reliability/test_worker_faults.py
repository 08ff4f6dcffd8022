"""Worker faults the training suite does not cover with real processes.

`tests/workers/test_worker_jobs.py` already kills a worker mid-epoch and checks the job resumes
from its checkpoint exactly once; here: a job whose worker dies on every attempt, and a second
worker handed the same job by Redis while the first still trains it.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from celery import Celery

from tests.workers.helpers import WorkerProcess, lenet_spec, statuses, wait_finished, wait_for
from workers.celery_app import enqueue_job
from workers.contracts import JobStatus
from workers.jobs import JobStore

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
    epochs = 10
    env = {"CNNSERVE_VISIBILITY_TIMEOUT": str(VISIBILITY_S)}
    first = start_worker(env=env)
    job = store.create(lenet_spec(epochs=epochs, train_limit=1000))
    enqueue_job(celery_app, job.id)
    wait_for(store, job.id, lambda r: r.status is JobStatus.running, 60, "running", first)
    second = start_worker(env=env)  # idle, and the unacked message is redelivered to it

    record = wait_finished(store, job.id, 180, first)

    assert record.status is JobStatus.succeeded, record.error
    assert record.attempts == 1 and record.worker == first.name
    starts = [s for s in statuses(store, job.id) if s["status"] == "running"]
    assert len(starts) == 1, starts  # one lease holder, one start
    epoch_events = [d["epoch"] for _, k, d in store.events(job.id, count=10_000) if k == "epoch"]
    assert epoch_events == list(range(1, epochs + 1))  # each epoch trained once
    # the fault really happened: Redis handed the running job to the second worker
    assert "leased by another live worker" in second.log(), second.log()[-3000:]
