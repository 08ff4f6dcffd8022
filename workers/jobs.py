"""Job records in Redis: the durable state of every job, its event stream and its lease.

Keys (prefix `cnnserve:`):
- `job:{id}`        JSON of the `JobRecord`
- `jobs`            sorted set of job ids by creation time (listing, pagination)
- `job:{id}:events` a Redis stream of progress/epoch/status events (SSE replay)
- `job:{id}:cancel` set when a cancel is requested
- `job:{id}:lease`  held by the worker training the job (SET NX PX, renewed by heartbeat)
- `idem:{key}`      an Idempotency-Key's job id and body hash
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict, Field

from workers.contracts import JobSpec, JobStatus

PREFIX = "cnnserve:"
EVENTS_MAXLEN = 20_000


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class Progress(BaseModel):
    """Live progress of a running job."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "epoch": 2,
                    "epochs": 10,
                    "batch": 120,
                    "batches": 469,
                    "images_per_s": 5200.0,
                    "eta_s": 95.5,
                }
            ]
        }
    )

    epoch: int = 0
    epochs: int = 0
    batch: int = 0
    batches: int = 0
    images_per_s: float | None = None
    eta_s: float | None = None


class EpochMetrics(BaseModel):
    """One epoch's numbers, as d2l's plot shows them."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"epoch": 1, "train_loss": 2.31, "val_loss": 2.3, "val_acc": 0.1, "seconds": 3.9}
            ]
        }
    )

    epoch: int
    train_loss: float
    val_loss: float
    val_acc: float
    seconds: float


class JobRecord(BaseModel):
    """Everything known about one job."""

    id: str
    status: JobStatus = JobStatus.queued
    spec: JobSpec
    created_at: str = Field(default_factory=now_iso)
    started_at: str | None = None
    finished_at: str | None = None
    attempts: int = 0
    worker: str | None = None
    device: str | None = None
    progress: Progress = Field(default_factory=Progress)
    metrics: list[EpochMetrics] = Field(default_factory=list)
    checkpoints: list[str] = Field(default_factory=list)
    best_checkpoint: str | None = None
    latest_checkpoint: str | None = None
    cancel_requested: bool = False
    error: str | None = None


class JobNotFoundError(LookupError):
    """No job has this id."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"no job with id {job_id!r}")


def new_job_id() -> str:
    return uuid.uuid4().hex[:16]


class JobStore:
    """Reads and writes job records, events, cancel flags and leases in Redis."""

    def __init__(self, client: redis.Redis) -> None:
        # redis-py's stubs type replies loosely; records are JSON strings (decode_responses)
        self.r: Any = client

    @classmethod
    def from_url(cls, url: str) -> JobStore:
        return cls(redis.Redis.from_url(url, decode_responses=True))

    # records
    def _key(self, job_id: str) -> str:
        return f"{PREFIX}job:{job_id}"

    def create(self, spec: JobSpec, job_id: str | None = None) -> JobRecord:
        record = JobRecord(id=job_id or new_job_id(), spec=spec)
        pipe = self.r.pipeline()
        pipe.set(self._key(record.id), record.model_dump_json())
        pipe.zadd(f"{PREFIX}jobs", {record.id: time.time()})
        pipe.execute()
        self.add_event(record.id, "status", {"status": record.status.value})
        return record

    def get(self, job_id: str) -> JobRecord:
        raw = self.r.get(self._key(job_id))
        if raw is None:
            raise JobNotFoundError(job_id)
        return JobRecord.model_validate_json(raw)

    def exists(self, job_id: str) -> bool:
        return bool(self.r.exists(self._key(job_id)))

    def update(self, job_id: str, change: Callable[[JobRecord], None]) -> JobRecord:
        """Apply `change` to the record atomically (optimistic WATCH/MULTI, retried)."""
        key = self._key(job_id)
        while True:
            with self.r.pipeline() as pipe:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        raise JobNotFoundError(job_id)
                    record = JobRecord.model_validate_json(raw)
                    change(record)
                    pipe.multi()
                    pipe.set(key, record.model_dump_json())
                    pipe.execute()
                    return record
                except redis.WatchError:
                    continue

    def list_jobs(
        self,
        *,
        status: JobStatus | None = None,
        model: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[JobRecord], str | None]:
        """Jobs newest first, filtered; returns a page and the cursor of the next one."""
        max_score: str = "+inf"
        if cursor:
            max_score = f"({float(cursor)!r}"
        out: list[JobRecord] = []
        next_cursor: str | None = None
        while len(out) < limit:
            batch = self.r.zrevrangebyscore(
                f"{PREFIX}jobs", max_score, "-inf", start=0, num=200, withscores=True
            )
            if not batch:
                break
            raws = self._get_many([job_id for job_id, _ in batch])
            for (_, score), raw in zip(batch, raws, strict=True):
                max_score = f"({score!r}"
                if raw is None:
                    continue
                rec = JobRecord.model_validate_json(raw)
                if status is not None and rec.status != status:
                    continue
                if model is not None and rec.spec.model != model:
                    continue
                out.append(rec)
                if len(out) == limit:
                    next_cursor = repr(score)
                    break
        if next_cursor is not None:
            more = self.r.zrevrangebyscore(
                f"{PREFIX}jobs", f"({float(next_cursor)!r}", "-inf", start=0, num=1
            )
            if not more:
                next_cursor = None
        return out, next_cursor

    def _get_many(self, job_ids: list[str]) -> list[str | None]:
        """The raw records of `job_ids` in one round trip per 500 (None where gone)."""
        out: list[str | None] = []
        for i in range(0, len(job_ids), 500):
            out.extend(self.r.mget([self._key(j) for j in job_ids[i : i + 500]]))
        return out

    def count_by_status(self) -> dict[str, int]:
        """How many jobs are in each status (one MGET per 500 jobs, not a GET per job)."""
        counts = {s.value: 0 for s in JobStatus}
        for raw in self._get_many(list(self.r.zrange(f"{PREFIX}jobs", 0, -1))):
            if raw is not None:
                counts[json.loads(raw)["status"]] += 1
        return counts

    # events
    def add_event(self, job_id: str, kind: str, data: dict[str, Any]) -> str:
        """Append an event to the job's stream; returns its id (the SSE event id)."""
        return str(
            self.r.xadd(
                f"{self._key(job_id)}:events",
                {"event": kind, "data": json.dumps(data)},
                maxlen=EVENTS_MAXLEN,
                approximate=True,
            )
        )

    def events(
        self, job_id: str, after: str | None = None, block_ms: int | None = None, count: int = 100
    ) -> list[tuple[str, str, dict[str, Any]]]:
        """Events after the id `after` (all when None): `(id, kind, data)`; may block."""
        stream = f"{self._key(job_id)}:events"
        start = after or "0-0"
        res = self.r.xread({stream: start}, count=count, block=block_ms)
        out: list[tuple[str, str, dict[str, Any]]] = []
        for _name, entries in res or []:
            for eid, fields in entries:
                out.append((eid, fields["event"], json.loads(fields["data"])))
        return out

    # cancel
    def request_cancel(self, job_id: str) -> None:
        self.r.set(f"{self._key(job_id)}:cancel", "1")

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.r.exists(f"{self._key(job_id)}:cancel"))

    # lease
    def acquire_lease(self, job_id: str, owner: str, ttl_s: float) -> bool:
        """Take the job's lease unless another live worker holds it."""
        key = f"{self._key(job_id)}:lease"
        if self.r.set(key, owner, nx=True, px=int(ttl_s * 1000)):
            return True
        return self.r.get(key) == owner

    _RENEW = (
        "if redis.call('get', KEYS[1]) == ARGV[1] then "
        "return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"
    )
    _RELEASE = (
        "if redis.call('get', KEYS[1]) == ARGV[1] then "
        "return redis.call('del', KEYS[1]) else return 0 end"
    )

    def renew_lease(self, job_id: str, owner: str, ttl_s: float) -> bool:
        key = f"{self._key(job_id)}:lease"
        return bool(self.r.eval(self._RENEW, 1, key, owner, int(ttl_s * 1000)))

    def release_lease(self, job_id: str, owner: str) -> None:
        self.r.eval(self._RELEASE, 1, f"{self._key(job_id)}:lease", owner)

    def lease_held(self, job_id: str) -> bool:
        """Whether a live worker holds the job's lease."""
        return bool(self.r.exists(f"{self._key(job_id)}:lease"))

    # idempotency
    def idempotent_job(
        self, key: str, body_hash: str, job_id: str, ttl_s: int = 86400
    ) -> str | None:
        """Claim `key` for `job_id`; returns the earlier job's id when the key was used before.

        Raises ValueError when the key was used with a different body.
        """
        rkey = f"{PREFIX}idem:{key}"
        value = json.dumps({"job_id": job_id, "body": body_hash})
        if self.r.set(rkey, value, nx=True, ex=ttl_s):
            return None
        raw = self.r.get(rkey)
        if raw is None:
            return None
        earlier = json.loads(raw)
        if earlier["body"] != body_hash:
            raise ValueError("this Idempotency-Key was already used with a different request body")
        return str(earlier["job_id"])

    # removal (used by the API to undo a job it could not enqueue)
    def delete(self, job_id: str) -> None:
        """Remove a job's record, listing entry, events, cancel flag and lease."""
        key = self._key(job_id)
        pipe = self.r.pipeline()
        pipe.delete(key, f"{key}:events", f"{key}:cancel", f"{key}:lease")
        pipe.zrem(f"{PREFIX}jobs", job_id)
        pipe.execute()

    _FORGET_IDEM = (
        "local v = redis.call('get', KEYS[1]) "
        "if v and cjson.decode(v)['job_id'] == ARGV[1] then return redis.call('del', KEYS[1]) "
        "else return 0 end"
    )

    def forget_idempotency_key(self, key: str, job_id: str) -> None:
        """Release an Idempotency-Key claimed for `job_id` (when that job was never made)."""
        self.r.eval(self._FORGET_IDEM, 1, f"{PREFIX}idem:{key}", job_id)
