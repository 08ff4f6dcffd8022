"""The job store's indexes in Redis: jobs by status and model, and finished jobs by age.

Every index is a sorted set of job ids scored by creation time (the score of the job in the
`jobs` set), so a filtered listing reads only the ids it shows, a count is one ZCARD, and the
orphan scan reads only the running jobs. `JobStore` writes them in the same MULTI/EXEC as the
record whenever a job is created, changes status or is removed, so they never disagree.

Keys (prefix `cnnserve:`):
- `jobs`                              every job (the listing without filters)
- `jobs:status:{status}`              the jobs in one status
- `jobs:model:{model}`                the jobs of one model
- `jobs:status:{status}:model:{model}` both filters at once
- `jobs:finished`                     finished jobs scored by when they finished (retention)
- `schema`                            `2` once the records of an earlier version are indexed
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import uuid
from datetime import datetime
from typing import Any

from workers.contracts import JobStatus

log = logging.getLogger(__name__)

PREFIX = "cnnserve:"
ALL_JOBS = f"{PREFIX}jobs"
FINISHED = f"{PREFIX}jobs:finished"
SCHEMA_KEY = f"{PREFIX}schema"
SCHEMA_LOCK = f"{PREFIX}schema:lock"
#: The store's layout version: 1 had records and `jobs` only; 2 adds the indexes.
SCHEMA = "2"
#: Records indexed per round trip when an earlier version's store is upgraded.
MIGRATE_CHUNK = 1000
MIGRATE_LOCK_S = 60

Cursor = tuple[float, str]
JOB_ID_RE = re.compile(r"^[0-9a-f]{16}$")


def record_key(job_id: str) -> str:
    """The key of a job's record; its events, cancel flag and lease hang off it."""
    return f"{PREFIX}job:{job_id}"


def status_key(status: JobStatus | str) -> str:
    return f"{PREFIX}jobs:status:{JobStatus(status).value}"


def model_key(model: str) -> str:
    return f"{PREFIX}jobs:model:{model}"


def status_model_key(status: JobStatus | str, model: str) -> str:
    return f"{status_key(status)}:model:{model}"


def listing_key(status: JobStatus | None, model: str | None) -> str:
    """The index that holds exactly the jobs a listing with these filters shows."""
    if status is not None and model is not None:
        return status_model_key(status, model)
    if status is not None:
        return status_key(status)
    if model is not None:
        return model_key(model)
    return ALL_JOBS


def index_job(
    pipe: Any,
    job_id: str,
    score: float,
    status: JobStatus,
    model: str,
    finished_at: float | None = None,
) -> None:
    """Queue the commands that file `job_id` under `status` and `model` (and only there).

    Idempotent: run again for the same job, or with a new status, it moves the job's
    entries; the other statuses' entries are removed whatever they held.
    """
    pipe.zadd(ALL_JOBS, {job_id: score})
    pipe.zadd(model_key(model), {job_id: score})
    for other in JobStatus:
        if other is not status:
            pipe.zrem(status_key(other), job_id)
            pipe.zrem(status_model_key(other, model), job_id)
    pipe.zadd(status_key(status), {job_id: score})
    pipe.zadd(status_model_key(status, model), {job_id: score})
    if status.finished:
        pipe.zadd(FINISHED, {job_id: finished_at if finished_at is not None else time.time()})
    else:
        pipe.zrem(FINISHED, job_id)


def unindex_job(pipe: Any, job_id: str, model: str | None) -> None:
    """Queue the commands that remove `job_id` from every index."""
    pipe.zrem(ALL_JOBS, job_id)
    pipe.zrem(FINISHED, job_id)
    for status in JobStatus:
        pipe.zrem(status_key(status), job_id)
        if model is not None:
            pipe.zrem(status_model_key(status, model), job_id)
    if model is not None:
        pipe.zrem(model_key(model), job_id)


def format_cursor(cursor: Cursor) -> str:
    score, job_id = cursor
    return f"{score!r}:{job_id}"


def parse_cursor(raw: str) -> Cursor:
    """`score:id` as `format_cursor` writes it (a bare score, as version 1 gave out, too)."""
    score, _, job_id = raw.partition(":")
    value = float(score)
    if math.isnan(value) or (job_id and not JOB_ID_RE.fullmatch(job_id)):
        raise ValueError(f"not a cursor: {raw!r}")
    return value, job_id


def page(r: Any, key: str, limit: int, cursor: Cursor | None) -> tuple[list[str], Cursor | None]:
    """Ids of `key` newest first after `cursor`: one page, and the cursor of the next one.

    Ties in creation time are broken by id (Redis orders equal scores by member), so no job
    is skipped or shown twice across pages, even when the cursor's own job has since left
    the index (a queued job that started running, say).
    """
    top = "+inf" if cursor is None else repr(cursor[0])
    found: list[tuple[str, float]] = []
    offset = 0
    while len(found) <= limit:
        want = limit + 2 - len(found)
        batch = r.zrevrangebyscore(key, top, "-inf", start=offset, num=want, withscores=True)
        if not batch:
            break
        offset += len(batch)
        for job_id, score in batch:
            if cursor is not None and score == cursor[0] and job_id >= cursor[1]:
                continue  # at or before the cursor in this order
            found.append((job_id, score))
    ids = [job_id for job_id, _ in found[:limit]]
    more = len(found) > limit
    return ids, ((found[limit - 1][1], found[limit - 1][0]) if more else None)


def _timestamp(iso: str | None) -> float | None:
    if not iso:
        return None
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None


def _index_chunk(r: Any, entries: list[tuple[str, float]]) -> int:
    """Index one chunk of `(job_id, score)` from the `jobs` set; returns the jobs indexed."""
    raws = r.mget([record_key(job_id) for job_id, _ in entries])
    pipe = r.pipeline(transaction=False)
    indexed = 0
    for (job_id, score), raw in zip(entries, raws, strict=True):
        if raw is None:  # listed but gone: nothing to show
            pipe.zrem(ALL_JOBS, job_id)
            continue
        try:
            record = json.loads(raw)
            status = JobStatus(record["status"])
            model = str(record["spec"]["model"])
        except (ValueError, KeyError, TypeError):
            log.warning("job %s: record unreadable; left out of the indexes", job_id)
            continue
        index_job(pipe, job_id, score, status, model, _timestamp(record.get("finished_at")))
        indexed += 1
    pipe.execute()
    return indexed


def ensure_indexed(r: Any, wait_s: float = 600.0) -> int:
    """Index every job an earlier version recorded, once per store; returns how many.

    Idempotent and safe when several API and worker processes start together: one takes a
    lock and indexes (renewing the lock per chunk); the others wait for the schema mark. If
    the indexer dies, its lock lapses and the next process starts over.
    """
    if r.get(SCHEMA_KEY) == SCHEMA:
        return 0
    token = uuid.uuid4().hex
    deadline = time.monotonic() + wait_s
    while not r.set(SCHEMA_LOCK, token, nx=True, ex=MIGRATE_LOCK_S):
        if r.get(SCHEMA_KEY) == SCHEMA:
            return 0
        if time.monotonic() > deadline:
            raise TimeoutError("another process is still indexing the job store")
        time.sleep(0.1)
    try:
        if r.get(SCHEMA_KEY) == SCHEMA:
            return 0
        total = 0
        start = 0
        while True:
            entries = r.zrange(ALL_JOBS, start, start + MIGRATE_CHUNK - 1, withscores=True)
            if not entries:
                break
            total += _index_chunk(r, entries)
            start += len(entries)
            r.expire(SCHEMA_LOCK, MIGRATE_LOCK_S)
        r.set(SCHEMA_KEY, SCHEMA)
        if total:
            log.info("job store upgraded: %d job(s) indexed by status and model", total)
        return total
    finally:
        if r.get(SCHEMA_LOCK) == token:
            r.delete(SCHEMA_LOCK)


def counts(r: Any) -> dict[str, int]:
    """Jobs per status, from the index sizes."""
    pipe = r.pipeline(transaction=False)
    for status in JobStatus:
        pipe.zcard(status_key(status))
    return {s.value: int(n) for s, n in zip(JobStatus, pipe.execute(), strict=True)}


def ids_in(r: Any, status: JobStatus) -> list[str]:
    return list(r.zrange(status_key(status), 0, -1))


def expired(r: Any, before: float, limit: int) -> list[str]:
    """Finished jobs that finished before `before` (oldest first, at most `limit`)."""
    return list(r.zrangebyscore(FINISHED, "-inf", before, start=0, num=limit))
