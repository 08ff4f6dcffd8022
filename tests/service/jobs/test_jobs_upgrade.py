"""Long-lived stores through the API: an upgrade from the store layout before the indexes, and
finished jobs removed after their retention."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from fastapi.testclient import TestClient

from workers.contracts import JobSpec, JobStatus
from workers.store.jobs import EpochMetrics, JobRecord, JobStore

#: Specs as clients of the previous version sent them, ResNet-18 among them.
SPECS = [
    {"model": "resnet18", "epochs": 10, "device": "cuda"},
    {"model": "lenet", "epochs": 2, "train_limit": 5000},
    {"model": "vgg", "arch": "vgg11", "epochs": 3},
    {"model": "resnet18", "arch": [[2, 64], [2, 128]], "input_size": 64},
]


def previous_version_store(r: Any, count: int) -> list[JobRecord]:
    """`count` jobs written as the previous version wrote them: a record per job and the
    `jobs` set, no indexes, every status, the newest last."""
    jobs = []
    cycle = list(JobStatus)
    for i in range(count):
        status = cycle[i % len(cycle)]
        record = JobRecord(
            id=f"{0xA000 + i:016x}", spec=JobSpec.model_validate(SPECS[i % len(SPECS)])
        )
        record.status = status
        if status.finished:
            record.finished_at = "2026-11-30T10:00:00.000+00:00"
            record.metrics = [
                EpochMetrics(epoch=1, train_loss=1, val_loss=1, val_acc=0.5, seconds=2)
            ]
        r.set(f"cnnserve:job:{record.id}", record.model_dump_json())
        r.zadd("cnnserve:jobs", {record.id: 1_764_000_000.0 + i})
        r.xadd(f"cnnserve:job:{record.id}:events", {"event": "status", "data": "{}"})
        jobs.append(record)
    return jobs


def listed(client: TestClient, query: str = "") -> list[str]:
    ids, url = [], f"/v1/jobs?limit=7{query}"
    while url:
        r = client.get(url)
        assert r.status_code == 200, r.text
        ids += [j["id"] for j in r.json()["jobs"]]
        nxt = r.json()["next_cursor"]
        url = f"/v1/jobs?limit=7{query}&cursor={nxt}" if nxt else ""
    return ids


def test_an_upgraded_store_lists_filters_counts_and_cancels_every_job(
    store: JobStore, make_client: Callable[..., TestClient]
) -> None:
    jobs = previous_version_store(store.r, 40)
    client = make_client()  # its start-up indexes the store

    newest_first = [j.id for j in reversed(jobs)]
    assert listed(client) == newest_first
    for status in JobStatus:
        want = [j.id for j in reversed(jobs) if j.status is status]
        assert listed(client, f"&status={status.value}") == want
    assert listed(client, "&model=resnet18&status=queued") == [
        j.id for j in reversed(jobs) if j.spec.model == "resnet18" and j.status is JobStatus.queued
    ]
    metrics = client.get("/metrics").text
    for status in JobStatus:
        count = sum(1 for j in jobs if j.status is status)
        assert re.search(rf'^cnnserve_jobs\{{status="{status.value}"\}} {count}\.0$', metrics, re.M)

    queued = next(j for j in jobs if j.status is JobStatus.queued and j.spec.model == "resnet18")
    r = client.post(f"/v1/jobs/{queued.id}/cancel")
    assert r.status_code == 202 and r.json()["status"] == "cancelled"
    assert queued.id not in listed(client, "&status=queued")
    assert queued.id in listed(client, "&status=cancelled")
    one = client.get(f"/v1/jobs/{jobs[0].id}").json()
    assert one["spec"] == jobs[0].spec.model_dump(mode="json")


def test_finished_jobs_leave_after_their_retention_and_the_rest_stay(
    store: JobStore, make_client: Callable[..., TestClient]
) -> None:
    client = make_client(job_retention=timedelta(seconds=2))
    done = client.post("/v1/jobs", json={"model": "lenet", "epochs": 1}).json()["id"]
    waiting = client.post("/v1/jobs", json={"model": "lenet", "epochs": 1}).json()["id"]
    assert client.post(f"/v1/jobs/{done}/cancel").status_code == 202

    deadline = time.monotonic() + 20
    while client.get(f"/v1/jobs/{done}").status_code == 200:
        assert time.monotonic() < deadline, "the finished job was never removed"
        time.sleep(0.2)
    gone = client.get(f"/v1/jobs/{done}")
    assert gone.status_code == 404 and gone.headers["content-type"].startswith(
        "application/problem+json"
    )
    assert client.get(f"/v1/jobs/{done}/events").status_code == 404
    assert [j["id"] for j in client.get("/v1/jobs").json()["jobs"]] == [waiting]
    assert store.events(done) == []
