"""Job records in Redis: the durable state of every job, its event stream and its lease.

Keys (prefix `cnnserve:`; the indexes are described in `workers.store.job_index`):
- `job:{id}`          JSON of the `JobRecord`
- `job:{id}:events`   a Redis stream of progress/epoch/status events (SSE replay)
- `job:{id}:cancel`   set when a cancel is requested
- `job:{id}:lease`    held by the worker training the job (SET NX PX, renewed by heartbeat)
- `job:{id}:requeue`  a short claim, so one worker requeues a given orphan
- `idem:{key}`        an Idempotency-Key's job id, body hash and when it was claimed
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict, Field

from workers.contracts import TRUSTED, JobSpec, JobStatus
from workers.settings import OWNER_PATTERN
from workers.store import job_index as index
from workers.store.job_index import PREFIX, Cursor, record_key

__all__ = [
    "PREFIX",
    "Cursor",
    "EpochMetrics",
    "JobEvent",
    "JobNotFoundError",
    "JobRecord",
    "JobStore",
    "Progress",
    "QueueFullError",
    "advance",
    "events_key",
    "new_job_id",
    "now_iso",
    "parse_events",
]

EVENTS_MAXLEN = 20_000
#: An Idempotency-Key whose job record is missing this long after its claim belonged to a
#: job that is gone (removed by retention, or never made): the key may be used again.
IDEMPOTENCY_IN_FLIGHT_S = 60.0


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
    confusion_matrix: list[list[int]] | None = Field(
        None,
        description="The validation confusion matrix (rows: true class, columns: predicted).",
    )


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
    parent_checkpoint: str | None = Field(
        None, description="The checkpoint `init_from` resolved to when the job was submitted."
    )
    epoch_offset: int = Field(
        0, description="Epochs are numbered after this (the parent's, with continue_epochs)."
    )
    sweep_id: str | None = Field(None, description="The sweep this job belongs to, if any.")
    owner: str | None = Field(
        None,
        pattern=OWNER_PATTERN,
        description="The principal (API key holder) that submitted the job; null when the "
        "server had no keys. Only it and admins see the job.",
    )


class JobNotFoundError(LookupError):
    """No job has this id."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"no job with id {job_id!r}")


class QueueFullError(Exception):
    """The jobs asked for would take the queue past its limit."""

    def __init__(self, queued: int, limit: int, adding: int = 1) -> None:
        self.queued = queued
        self.limit = limit
        more = f" and this request adds {adding}" if adding > 1 else ""
        super().__init__(f"{queued} jobs and evaluations are queued{more}, the limit is {limit}")


class ActiveJobsLimitError(Exception):
    """The jobs asked for would take their owner past its queued + running jobs quota."""

    def __init__(self, owner: str, active: int, limit: int, adding: int = 1) -> None:
        self.owner = owner
        self.active = active
        self.limit = limit
        more = f" and this request adds {adding}" if adding > 1 else ""
        super().__init__(
            f"{owner} has {active} jobs and evaluations queued or running{more}; its limit "
            f"(max_active_jobs) is {limit}"
        )


@dataclass(frozen=True)
class Quota:
    """Whose jobs these are, and how many of theirs may be queued or running at once."""

    owner: str | None
    max_active: int | None = None


def _model_and_owner(raw: str | None) -> tuple[str | None, str | None]:
    """The model and owner a raw record names (None when there is no readable record)."""
    try:
        record = json.loads(raw) if raw is not None else None
        if not isinstance(record, dict):
            return None, None
        owner = record.get("owner")
        return str(record["spec"]["model"]), owner if isinstance(owner, str) else None
    except (ValueError, KeyError, TypeError):
        return None, None


def new_job_id() -> str:
    return uuid.uuid4().hex[:16]


#: One event of a job's stream: (job id, event id, kind, data).
JobEvent = tuple[str, str, str, dict[str, Any]]


def events_key(job_id: str) -> str:
    """The key of a job's event stream (a Redis stream; its ids are the SSE event ids)."""
    return f"{record_key(job_id)}:events"


def parse_events(reply: Any) -> list[JobEvent]:
    """An XREAD reply over job event streams, as `JobEvent`s in the order Redis gave them."""
    out: list[JobEvent] = []
    for name, entries in reply or []:
        job_id = name.removeprefix(PREFIX + "job:").removesuffix(":events")
        for eid, fields in entries:
            out.append((job_id, eid, fields["event"], json.loads(fields["data"])))
    return out


def advance(cursors: dict[str, str], events: list[JobEvent]) -> dict[str, str]:
    """The cursors moved past `events` (each job's to its last event among them)."""
    moved = dict(cursors)
    for job_id, eid, _kind, _data in events:
        moved[job_id] = eid
    return moved


class JobStore:
    """Reads and writes job records, their indexes, events, cancel flags and leases in Redis.

    Records read back are trusted (`TRUSTED`): their specs were checked on submission.
    """

    def __init__(self, client: redis.Redis) -> None:
        # redis-py's stubs type replies loosely; records are JSON strings (decode_responses)
        self.r: Any = client
        self._indexed = False

    @classmethod
    def from_url(cls, url: str) -> JobStore:
        return cls(redis.Redis.from_url(url, decode_responses=True))

    # records
    def _key(self, job_id: str) -> str:
        return record_key(job_id)

    @staticmethod
    def _load(raw: str | bytes) -> JobRecord:
        return JobRecord.model_validate_json(raw, context=TRUSTED)

    def ensure_indexed(self) -> int:
        """Index the records an earlier version wrote (once per store); returns how many."""
        if self._indexed:
            return 0
        n = index.ensure_indexed(self.r)
        self._indexed = True
        return n

    def create(
        self,
        spec: JobSpec,
        job_id: str | None = None,
        *,
        max_queued: int | None = None,
        **fields: Any,
    ) -> JobRecord:
        """Record a new queued job (with any other `JobRecord` fields), its indexes and its
        first event in one atomic step.

        With `max_queued`, raises `QueueFullError` instead when that many jobs are queued.
        """
        record = JobRecord(id=job_id or new_job_id(), spec=spec, **fields)
        self.create_many([record], max_queued=max_queued)
        return record

    def create_many(
        self,
        records: list[JobRecord],
        *,
        max_queued: int | None = None,
        quota: Quota | None = None,
    ) -> None:
        """Record new queued jobs all at once, or none when they would take the queue past
        `max_queued` (`QueueFullError`) or their owner past its quota (`ActiveJobsLimitError`);
        created at the same instant, listed by id among themselves.

        Every record must have `quota.owner` as its owner (None: no owner, no quota).
        """
        quota = quota or Quota(None)
        if any(r.owner != quota.owner for r in records):
            raise ValueError("every job recorded at once has the quota's owner")
        jobs = [x for r in records for x in (r.id, r.spec.model, r.model_dump_json())]
        created, before, refused_by = self.r.eval(
            index.CREATE,
            0,
            PREFIX,
            repr(time.time()),
            "" if max_queued is None else str(max_queued),
            json.dumps({"status": JobStatus.queued.value}),
            EVENTS_MAXLEN,
            quota.owner or "",
            "" if quota.max_active is None else str(quota.max_active),
            *jobs,
        )
        if created:
            return
        if refused_by == "active":
            assert quota.owner is not None and quota.max_active is not None
            raise ActiveJobsLimitError(quota.owner, int(before), quota.max_active, len(records))
        raise QueueFullError(int(before), int(max_queued or 0), len(records))

    def count_active(self, owner: str) -> int:
        """How many of `owner`'s jobs and evaluations are queued or running (three ZCARDs)."""
        pipe = self.r.pipeline(transaction=False)
        for key in index.active_keys(owner):
            pipe.zcard(key)
        return sum(int(n) for n in pipe.execute())

    def get(self, job_id: str) -> JobRecord:
        raw = self.r.get(self._key(job_id))
        if raw is None:
            raise JobNotFoundError(job_id)
        return self._load(raw)

    def get_many(self, job_ids: list[str]) -> list[JobRecord | None]:
        """The records of `job_ids` in order, one round trip per 500 (None: gone)."""
        out: list[JobRecord | None] = []
        for i in range(0, len(job_ids), 500):
            raws = self.r.mget([self._key(j) for j in job_ids[i : i + 500]])
            out.extend(self._load(raw) if raw is not None else None for raw in raws)
        return out

    def exists(self, job_id: str) -> bool:
        return bool(self.r.exists(self._key(job_id)))

    def update(
        self,
        job_id: str,
        change: Callable[[JobRecord], None],
        event: Callable[[JobRecord], tuple[str, dict[str, Any]] | None] | None = None,
    ) -> JobRecord:
        """Apply `change` to the record atomically (optimistic WATCH/MULTI, retried).

        A change of status moves the job between the indexes in the same transaction, and
        `event(record)`, when it returns `(kind, data)`, is appended to the job's stream in it
        too, so a status and its event are never seen apart.
        """
        key = self._key(job_id)
        while True:
            with self.r.pipeline() as pipe:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        raise JobNotFoundError(job_id)
                    record = self._load(raw)
                    before = record.status
                    change(record)
                    emit = event(record) if event is not None else None
                    pipe.multi()
                    pipe.set(key, record.model_dump_json())
                    if record.status != before:  # the job keeps its creation time as its score
                        index.index_job(
                            pipe,
                            job_id,
                            time.time(),
                            record.status,
                            record.spec.model,
                            owner=record.owner,
                        )
                    if emit is not None:
                        self._queue_event(pipe, job_id, *emit)
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
        cursor: Cursor | None = None,
        owner: str | None = None,
    ) -> tuple[list[JobRecord], Cursor | None]:
        """Jobs newest first, filtered (to one owner's with `owner`); returns a page and the
        cursor of the next one.

        Reads only the page's ids from the index that matches the filters, and their records.
        """
        self.ensure_indexed()
        key = index.listing_key(status, model, owner)
        ids, next_cursor = index.page(self.r, key, limit, cursor)
        raws = self.r.mget([self._key(j) for j in ids]) if ids else []
        return [self._load(raw) for raw in raws if raw is not None], next_cursor

    def count_by_status(self) -> dict[str, int]:
        """How many jobs are in each status (the sizes of the status indexes)."""
        self.ensure_indexed()
        return index.counts(self.r)

    def count(self, status: JobStatus) -> int:
        """How many jobs are in `status` (one ZCARD)."""
        self.ensure_indexed()
        return int(self.r.zcard(index.status_key(status)))

    def running_ids(self) -> list[str]:
        """The ids of the jobs whose status is `running` (the running index, nothing else)."""
        self.ensure_indexed()
        return index.ids_in(self.r, JobStatus.running)

    def queued_before(self, cutoff: float) -> list[str]:
        """The ids of the queued jobs recorded before `cutoff` (epoch seconds), oldest first."""
        self.ensure_indexed()
        return list(self.r.zrangebyscore(index.status_key(JobStatus.queued), "-inf", cutoff))

    # events
    def _queue_event(self, pipe: Any, job_id: str, kind: str, data: dict[str, Any]) -> None:
        pipe.xadd(
            events_key(job_id),
            {"event": kind, "data": json.dumps(data)},
            maxlen=EVENTS_MAXLEN,
            approximate=True,
        )

    def add_event(self, job_id: str, kind: str, data: dict[str, Any]) -> str:
        """Append an event to the job's stream; returns its id (the SSE event id)."""
        pipe = self.r.pipeline(transaction=False)
        self._queue_event(pipe, job_id, kind, data)
        return str(pipe.execute()[0])

    def events(
        self, job_id: str, after: str | None = None, block_ms: int | None = None, count: int = 100
    ) -> list[tuple[str, str, dict[str, Any]]]:
        """Events after the id `after` (all when None): `(id, kind, data)`; may block."""
        res = self.r.xread({events_key(job_id): after or "0-0"}, count=count, block=block_ms)
        return [(eid, kind, data) for _job, eid, kind, data in parse_events(res)]

    def stream_tails(self, job_ids: list[str]) -> dict[str, str]:
        """The id of each job's last event ("0-0" for none yet): where to follow them from."""
        pipe = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.xrevrange(events_key(job_id), count=1)
        return {
            job_id: (last[0][0] if last else "0-0")
            for job_id, last in zip(job_ids, pipe.execute(), strict=True)
        }

    def follow_events(
        self, cursors: dict[str, str], block_ms: int
    ) -> tuple[dict[str, str], list[JobEvent]]:
        """Wait up to `block_ms` for these jobs' next events (one XREAD over all their
        streams): the cursors moved past what arrived, and it as (job, id, kind, data)."""
        streams = {events_key(job_id): after for job_id, after in cursors.items()}
        res = self.r.xread(streams, count=1000, block=block_ms) if streams else None
        events = parse_events(res)
        return advance(cursors, events), events

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

    def leases_held(self, job_ids: list[str]) -> list[bool]:
        """Whether a live worker holds each job's lease (one round trip for all)."""
        pipe = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.exists(f"{self._key(job_id)}:lease")
        return [bool(n) for n in pipe.execute()] if job_ids else []

    def lease_held(self, job_id: str) -> bool:
        """Whether a live worker holds the job's lease."""
        return self.leases_held([job_id])[0]

    def claim_requeue(self, job_id: str, ttl_s: float) -> bool:
        """Claim the right to requeue an orphaned job; one caller gets it per `ttl_s`."""
        key = f"{self._key(job_id)}:requeue"
        return bool(self.r.set(key, "1", nx=True, ex=max(2, int(ttl_s))))

    def claim_resend(self, object_id: str, ttl_s: float) -> bool:
        """Claim the right to send a lost message again; one caller gets it per `ttl_s`."""
        return bool(self.r.set(f"{PREFIX}resend:{object_id}", "1", nx=True, ex=max(2, int(ttl_s))))

    # idempotency
    @staticmethod
    def _idem_key(key: str, owner: str | None) -> str:
        # each principal has its own keys: another's replay must not hand back its job
        return f"{PREFIX}idem:{key}" if owner is None else f"{PREFIX}idem:{owner}:{key}"

    def idempotent_job(
        self, key: str, body_hash: str, job_id: str, ttl_s: int = 86400, owner: str | None = None
    ) -> str | None:
        """Claim `key` (of `owner`) for `job_id`; returns the earlier job's id when the key was
        used before.

        Raises ValueError when the key was used with a different body. A key whose job is
        gone (removed by retention) is claimed afresh.
        """
        rkey = self._idem_key(key, owner)
        value = json.dumps({"job_id": job_id, "body": body_hash, "at": time.time()})
        while True:
            with self.r.pipeline() as pipe:
                try:
                    pipe.watch(rkey)
                    raw = pipe.get(rkey)
                    if raw is not None:
                        earlier = json.loads(raw)
                        # a claim without a time was made by an earlier version: long ago
                        age = time.time() - float(earlier.get("at", 0.0))
                        if pipe.exists(self._key(earlier["job_id"])) or (
                            age < IDEMPOTENCY_IN_FLIGHT_S
                        ):
                            if earlier["body"] != body_hash:
                                raise ValueError(
                                    "this Idempotency-Key was already used with a different "
                                    "request body"
                                )
                            return str(earlier["job_id"])
                    pipe.multi()
                    pipe.set(rkey, value, ex=ttl_s)
                    pipe.execute()
                    return None
                except redis.WatchError:
                    continue

    # removal
    def delete(self, job_id: str) -> None:
        """Remove a job's record, index entries, events, cancel flag and lease."""
        self.delete_many([job_id])

    def delete_many(self, job_ids: list[str]) -> None:
        if not job_ids:
            return
        raws = self.r.mget([self._key(j) for j in job_ids])
        pipe = self.r.pipeline()
        for job_id, raw in zip(job_ids, raws, strict=True):
            model, owner = _model_and_owner(raw)
            key = self._key(job_id)
            pipe.delete(key, f"{key}:events", f"{key}:cancel", f"{key}:lease", f"{key}:requeue")
            index.unindex_job(pipe, job_id, model, owner)
        pipe.execute()

    def purge_finished(self, older_than_s: float, batch: int = 500) -> int:
        """Remove jobs that finished more than `older_than_s` ago (records and events; their
        checkpoints stay); returns how many."""
        removed = 0
        while True:
            ids = index.expired(self.r, time.time() - older_than_s, batch)
            if not ids:
                return removed
            self.delete_many(ids)
            removed += len(ids)

    _FORGET_IDEM = (
        "local v = redis.call('get', KEYS[1]) "
        "if v and cjson.decode(v)['job_id'] == ARGV[1] then return redis.call('del', KEYS[1]) "
        "else return 0 end"
    )

    def forget_idempotency_key(self, key: str, job_id: str, owner: str | None = None) -> None:
        """Release an Idempotency-Key claimed for `job_id` (when that job was never made)."""
        self.r.eval(self._FORGET_IDEM, 1, self._idem_key(key, owner), job_id)
