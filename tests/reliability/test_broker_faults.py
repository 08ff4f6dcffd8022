"""Broker faults: `kill -9` of a Redis with an append-only file, then a restart on its directory.

Queued jobs (records and Celery messages) survive; while Redis is down the API answers 503
problems, never 500s, and recovers by itself; a worker training a job rides out the outage.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis
from celery import Celery

from tests.reliability.procs import ApiProcess, RedisServer
from tests.workers.helpers import (
    WorkerProcess,
    lenet_spec,
    statuses,
    train_until_first_checkpoint,
    wait_finished,
)
from workers.celery_app import enqueue_job
from workers.contracts import QUEUE, JobStatus
from workers.store.jobs import JobStore

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

PROBLEM = "application/problem+json"
TINY_JOB = {"model": "lenet", "epochs": 1, "train_limit": 256, "device": "cpu"}


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis-aof", aof=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(aof_redis: RedisServer) -> str:
    """Everything in these tests (API, workers, fixtures) talks to the durable Redis."""
    return aof_redis.url


def queued_messages(url: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        return int(client.llen(QUEUE))
    finally:
        client.close()


def assert_503_problem(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    assert response.json()["status"] == 503 and response.json()["detail"]


def test_queued_jobs_survive_a_redis_kill_and_run_after_the_restart(
    aof_redis: RedisServer,
    store: JobStore,
    start_api: Callable[..., ApiProcess],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    api = start_api()
    ids = []
    for seed in range(3):
        r = httpx.post(f"{api.url}/v1/jobs", json={**TINY_JOB, "seed": seed}, timeout=10)
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    assert queued_messages(aof_redis.url) == 3

    aof_redis.kill9()

    with httpx.Client(base_url=api.url, timeout=15) as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert_503_problem(ready)
        assert ready.json()["checks"]["redis"]["ok"] is False
        for response in (
            client.get("/v1/jobs"),
            client.get(f"/v1/jobs/{ids[0]}"),
            client.post("/v1/jobs", json=TINY_JOB),
            client.post(f"/v1/jobs/{ids[1]}/cancel"),
            client.get("/metrics"),
        ):
            if response.request.url.path == "/metrics":
                assert response.status_code == 200  # metrics still answer, minus job gauges
            else:
                assert_503_problem(response)

        aof_redis.start()  # same port, same directory: the AOF is replayed

        deadline = time.monotonic() + 20
        while (listing := client.get("/v1/jobs")).status_code != 200:
            assert time.monotonic() < deadline, f"the API did not recover: {listing.text}"
            time.sleep(0.2)
        jobs = {j["id"]: j for j in listing.json()["jobs"]}
        assert set(jobs) == set(ids), "a queued job record was lost"
        assert all(jobs[i]["status"] == "queued" for i in ids)
        ready = client.get("/readyz").json()
        assert ready["checks"]["redis"]["ok"] is True  # only the missing worker is left
    assert queued_messages(aof_redis.url) == 3, "a queued Celery message was lost"
    assert "unhandled error" not in api.log()

    worker = start_worker()
    for job_id in ids:
        record = wait_finished(store, job_id, 120, worker)
        assert record.status is JobStatus.succeeded, record.error
        assert record.attempts == 1


def lose_the_last_writes(server: RedisServer, since: bytes) -> None:
    """Cut the append-only file before the last `since` command, as a Redis that had not yet
    synced its last second would lose it (`appendfsync everysec`, the compose file's), then
    start it again on what is left."""
    server.kill9()
    aof = sorted((server.directory / "appendonlydir").glob("*.incr.aof"))[-1]
    data = aof.read_bytes()
    command = re.compile(rb"\*\d+\r\n\$%d\r\n%s\r\n" % (len(since), since), re.IGNORECASE)
    cut = [m.start() for m in command.finditer(data)][-1]
    aof.write_bytes(data[:cut])
    server.start()


def test_a_job_whose_message_redis_lost_runs_all_the_same(
    aof_redis: RedisServer,
    store: JobStore,
    start_api: Callable[..., ApiProcess],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    api = start_api()
    r = httpx.post(f"{api.url}/v1/jobs", json=TINY_JOB, timeout=10)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert queued_messages(aof_redis.url) == 1

    lose_the_last_writes(aof_redis, b"LPUSH")  # the message; the record was written before it

    assert store.get(job_id).status is JobStatus.queued, "the record should have survived"
    assert queued_messages(aof_redis.url) == 0, "the message should be lost"
    # a worker's maintenance notices within a lease (2 s here) and sends it again
    worker = start_worker(env={"CNNSERVE_LEASE_SECONDS": "2"})
    record = wait_finished(store, job_id, 120, worker)
    assert record.status is JobStatus.succeeded, record.error
    assert record.attempts == 1
    assert "its message was lost; sent again" in worker.log()


def test_a_worker_rides_out_a_redis_restart_without_losing_its_job(
    aof_redis: RedisServer,
    store: JobStore,
    celery_app: Celery,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    epochs = 4
    # a lease longer than the outage, as in production (30 s): no other worker may take it
    worker = start_worker(env={"CNNSERVE_LEASE_SECONDS": "10"})
    job = train_until_first_checkpoint(
        store, celery_app, worker, lenet_spec(epochs=epochs, train_limit=1000)
    )

    aof_redis.kill9()
    time.sleep(3)
    aof_redis.start()

    record = wait_finished(store, job.id, 180, worker)
    assert record.status is JobStatus.succeeded, f"{record.error}\n{worker.log()[-3000:]}"
    assert [m.epoch for m in record.metrics] == list(range(1, epochs + 1))
    assert worker.proc.poll() is None, "the worker died with the broker"
    # the attempt rode out the outage: one start, no epoch trained twice
    history = statuses(store, job.id)
    assert record.attempts == 1, history
    assert [s["status"] for s in history].count("running") == 1, history
    # the worker still takes new work after the outage
    nxt = store.create(lenet_spec(epochs=1, train_limit=256))
    enqueue_job(celery_app, nxt.id)
    assert wait_finished(store, nxt.id, 90, worker).status is JobStatus.succeeded
