"""The job store's indexes over a real Redis: listings, counts, the orphan scan, upgrades,
retention and Idempotency-Keys."""

from __future__ import annotations

import itertools
import json
import threading
import time
from typing import Any

import pytest

from tests.workers.helpers import lenet_spec, statuses
from workers.contracts import JobSpec, JobStatus
from workers.settings import Settings
from workers.store import job_index
from workers.store.jobs import JobRecord, JobStore
from workers.training.runner import finish, recover_orphans

MODELS = ("lenet", "vgg", "resnet18")


def spec(model: str) -> JobSpec:
    return JobSpec(model=model, epochs=1, device="cpu")


def set_status(store: JobStore, job_id: str, status: JobStatus) -> None:
    store.update(job_id, lambda r: setattr(r, "status", status))


def write_v1_job(r: Any, record: JobRecord, score: float) -> None:
    """A job exactly as the version before the indexes wrote it: the record and `jobs`."""
    r.set(f"cnnserve:job:{record.id}", record.model_dump_json())
    r.zadd("cnnserve:jobs", {record.id: score})


def everything(store: JobStore, **filters: Any) -> list[str]:
    """Every id a paged listing shows, page by page (3 a page), newest first."""
    ids: list[str] = []
    cursor = None
    while True:
        page, cursor = store.list_jobs(limit=3, cursor=cursor, **filters)
        ids += [r.id for r in page]
        if cursor is None:
            return ids


def test_filtered_listings_and_counts_come_from_the_indexes(store: JobStore) -> None:
    made: list[tuple[str, str, JobStatus]] = []
    statuses_cycle = itertools.cycle(list(JobStatus))
    for model, _ in itertools.product(MODELS, range(4)):
        job = store.create(spec(model))
        status = next(statuses_cycle)
        if status is not JobStatus.queued:
            set_status(store, job.id, status)
        made.append((job.id, model, status))
    newest_first = [m for m in reversed(made)]

    assert everything(store) == [j for j, _, _ in newest_first]
    for status in JobStatus:
        want = [j for j, _, s in newest_first if s is status]
        assert everything(store, status=status) == want
        for model in MODELS:
            both = [j for j, m, s in newest_first if s is status and m == model]
            assert everything(store, status=status, model=model) == both
    for model in MODELS:
        assert everything(store, model=model) == [j for j, m, _ in newest_first if m == model]
    assert store.count_by_status() == {
        s.value: sum(1 for _, _, st in made if st is s) for s in JobStatus
    }
    assert sorted(store.running_ids()) == sorted(j for j, _, s in made if s is JobStatus.running)


def test_pages_never_skip_or_repeat_jobs_created_at_the_same_instant(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(time, "time", lambda: 1_750_000_000.5)
    ids = [store.create(spec("lenet")).id for _ in range(7)]
    monkeypatch.undo()

    listed = everything(store)
    assert sorted(listed) == sorted(ids) and len(listed) == len(set(listed))
    # a job that leaves the filtered index between pages does not upset the next page
    first, cursor = store.list_jobs(status=JobStatus.queued, limit=3)
    set_status(store, first[-1].id, JobStatus.running)
    rest, _ = store.list_jobs(status=JobStatus.queued, limit=10, cursor=cursor)
    assert {r.id for r in first} | {r.id for r in rest} == set(ids)
    assert not {r.id for r in first} & {r.id for r in rest}


def test_a_status_change_moves_the_job_between_indexes_with_its_event(store: JobStore) -> None:
    job = store.create(spec("vgg"))
    set_status(store, job.id, JobStatus.running)
    assert finish(store, job.id, JobStatus.succeeded, seconds=1.0)
    r = store.r

    assert r.zscore(job_index.status_key("succeeded"), job.id) is not None
    for other in ("queued", "running", "failed", "cancelled"):
        assert r.zscore(job_index.status_key(other), job.id) is None
        assert r.zscore(job_index.status_model_key(other, "vgg"), job.id) is None
    assert r.zscore(job_index.FINISHED, job.id) is not None
    assert statuses(store, job.id)[-1] == {"status": "succeeded", "seconds": 1.0}
    # finishing twice changes nothing and says nothing
    assert not finish(store, job.id, JobStatus.failed, "late")
    assert store.get(job.id).status is JobStatus.succeeded
    assert [s["status"] for s in statuses(store, job.id)] == ["queued", "succeeded"]


def test_a_store_written_before_the_indexes_is_indexed_once_by_processes_starting_together(
    settings: Settings, store: JobStore
) -> None:
    jobs = []
    for i, (model, status) in enumerate(itertools.product(MODELS, JobStatus)):
        record = JobRecord(id=f"{i:016x}", spec=spec(model), status=status)
        if status.finished:
            record.finished_at = "2025-01-01T12:00:00.000+00:00"
        write_v1_job(store.r, record, 1_700_000_000.0 + i)
        jobs.append(record)
    results: list[int] = []

    def start_up() -> None:  # each API or worker process has its own store and connection
        own = JobStore.from_url(settings.redis_url)
        results.append(own.ensure_indexed())
        own.r.close()

    threads = [threading.Thread(target=start_up) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert sorted(results) == [0, 0, 0, len(jobs)]  # one process indexed, the others waited
    assert everything(store) == [j.id for j in reversed(jobs)]
    for status in JobStatus:
        assert everything(store, status=status) == [
            j.id for j in reversed(jobs) if j.status is status
        ]
    assert store.count_by_status() == {s.value: len(MODELS) for s in JobStatus}
    # finished jobs age from when they finished, as their records say (for retention)
    finished = store.r.zrange(job_index.FINISHED, 0, -1, withscores=True)
    assert len(finished) == len(MODELS) * 3
    assert {score for _, score in finished} == {1735732800.0}  # 2025-01-01T12:00:00Z
    assert JobStore.from_url(settings.redis_url).ensure_indexed() == 0  # marked done


def test_the_orphan_scan_reads_only_the_running_index(settings: Settings, store: JobStore) -> None:
    orphan = store.create(lenet_spec(epochs=1))
    set_status(store, orphan.id, JobStatus.running)
    # a long history the scan must not read: records that would not even parse
    pipe = store.r.pipeline(transaction=False)
    for i in range(2000):
        job_id = f"{i:016x}"
        pipe.set(f"cnnserve:job:{job_id}", "not a record")
        job_index.index_job(pipe, job_id, float(i), JobStatus.succeeded, "lenet", float(i))
    pipe.execute()
    sent: list[str] = []

    assert recover_orphans(store, settings, sent.append) == [orphan.id] == sent
    assert store.get(orphan.id).status is JobStatus.queued


def test_finished_jobs_past_their_retention_are_removed_and_others_kept(
    store: JobStore,
) -> None:
    old = store.create(spec("lenet"))
    finish(store, old.id, JobStatus.cancelled)
    store.r.zadd(job_index.FINISHED, {old.id: time.time() - 3600})  # finished an hour ago
    store.request_cancel(old.id)
    recent = store.create(spec("lenet"))
    finish(store, recent.id, JobStatus.failed, "oops")
    running = store.create(spec("resnet18"))
    set_status(store, running.id, JobStatus.running)

    assert store.purge_finished(older_than_s=600) == 1
    assert not store.exists(old.id) and store.events(old.id) == []
    assert not store.r.exists(f"cnnserve:job:{old.id}:cancel")
    assert store.exists(recent.id) and store.exists(running.id)
    assert everything(store) == [running.id, recent.id]
    assert store.count_by_status()["cancelled"] == 0
    assert store.purge_finished(older_than_s=600) == 0


def test_an_idempotency_key_whose_job_was_removed_makes_a_new_job(store: JobStore) -> None:
    first = store.create(spec("lenet"))
    assert store.idempotent_job("key-1", "body", first.id) is None
    assert store.idempotent_job("key-1", "body", "0" * 16) == first.id  # a replay
    with pytest.raises(ValueError, match="different request body"):
        store.idempotent_job("key-1", "other body", "0" * 16)

    store.delete(first.id)  # as retention removes it
    # within a minute of the claim, a missing job may still be in the making ...
    assert store.idempotent_job("key-1", "body", "1" * 16) == first.id
    claim = json.loads(store.r.get("cnnserve:idem:key-1"))
    store.r.set("cnnserve:idem:key-1", json.dumps({**claim, "at": time.time() - 120}))
    # ... later the key is free again, whatever body comes with it
    assert store.idempotent_job("key-1", "new body", "1" * 16) is None


def test_listing_survives_a_record_removed_between_index_and_read(store: JobStore) -> None:
    kept = store.create(spec("lenet"))
    gone = store.create(spec("lenet"))
    store.r.delete(f"cnnserve:job:{gone.id}")  # as if removed mid-listing
    page, _ = store.list_jobs()
    assert [r.id for r in page] == [kept.id]
