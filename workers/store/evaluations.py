"""Evaluations of a checkpoint queued for a worker: their records in Redis and the task body.

`POST /v1/checkpoints/{ref}/evaluate` records an evaluation (`queued`) and sends
`cnnserve.evaluate` through the one enqueue path; a worker marks it `running`, evaluates the
checkpoint on the test set as validation does (`workers.training.validation`), stores the
result beside the checkpoint and in the record (`succeeded`), or the reason it could not (`failed`).
Records expire after `RECORD_TTL_S`; the stored result stays with the checkpoint.

An evaluation is work on the training queue: it is recorded only within the queue limit and
its owner's quota of queued and running work, which its jobs share (one atomic step, as jobs
are, `workers.store.job_index.QUEUE_FN`).

Keys (prefix `cnnserve:`): `evaluation:{id}` the JSON of an `EvaluationRecord`; the sets
`evaluations:queued` and `owner:{owner}:evaluations:active` (`workers.store.job_index`).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict, Field

from workers.contracts import JobStatus
from workers.errors import TrainingError
from workers.settings import Settings
from workers.store import job_index
from workers.store.checkpoints import CheckpointError, CheckpointStore, StoredEvaluation
from workers.store.job_index import EVALUATION_TTL_S, EVALUATIONS_QUEUED, PREFIX
from workers.store.jobs import ActiveJobsLimitError, QueueFullError, Quota, now_iso
from workers.training.devices import prepare_device, release_memory

log = logging.getLogger(__name__)

RECORD_TTL_S = EVALUATION_TTL_S

#: Lua: record a queued evaluation unless the queue is full or its owner past its quota.
#: ARGV: prefix, now, max queued ('' for none), owner ('' for none), max active ('' for none),
#: id, record JSON, ttl. Returns {1 if recorded else 0, the count that refused, which}.
_CREATE = (
    job_index.QUEUE_FN
    + """
local prefix, now, max, owner, max_active = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local queued = queued_work(prefix, now)
if max ~= '' and queued + 1 > tonumber(max) then return {0, queued, 'queue'} end
if owner ~= '' and max_active ~= '' then
  local active = active_work(prefix, owner, now)
  if active + 1 > tonumber(max_active) then return {0, active, 'active'} end
end
redis.call('SET', prefix .. 'evaluation:' .. ARGV[6], ARGV[7], 'EX', ARGV[8])
redis.call('ZADD', prefix .. 'evaluations:queued', now, ARGV[6])
if owner ~= '' then
  redis.call('ZADD', prefix .. 'owner:' .. owner .. ':evaluations:active', now, ARGV[6])
end
return {1, queued, ''}
"""
)


class EvaluationRecord(BaseModel):
    """An evaluation of one checkpoint on the test set, as a worker runs it."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "eval-0123456789abcdef",
                    "checkpoint": "0123456789abcdef-e002",
                    "limit": 1000,
                    "status": "succeeded",
                    "created_at": "2026-12-01T12:00:00.000+00:00",
                    "finished_at": "2026-12-01T12:00:03.000+00:00",
                    "worker": "worker@host",
                    "error": None,
                    "accuracy": 0.71,
                    "images": 1000,
                }
            ]
        }
    )

    id: str
    checkpoint: str
    limit: int | None = Field(None, description="The first N test images (None: all 10,000).")
    status: JobStatus = JobStatus.queued
    created_at: str = Field(default_factory=now_iso)
    started_at: str | None = None
    finished_at: str | None = None
    worker: str | None = None
    error: str | None = None
    accuracy: float | None = Field(None, description="On the evaluated images, when done.")
    images: int | None = None
    owner: str | None = Field(None, description="The principal that asked for it.")


def new_evaluation_id() -> str:
    return f"eval-{uuid.uuid4().hex[:16]}"


class EvaluationStore:
    """Evaluation records in Redis (one key each, expiring)."""

    def __init__(self, client: Any) -> None:
        self.r: Any = client

    @staticmethod
    def _key(evaluation_id: str) -> str:
        return f"{PREFIX}evaluation:{evaluation_id}"

    def create(
        self, record: EvaluationRecord, *, max_queued: int | None = None, quota: Quota
    ) -> None:
        """Record a new queued evaluation, or refuse it: `QueueFullError` past `max_queued`
        (jobs and evaluations queued), `ActiveJobsLimitError` past its owner's quota."""
        if record.owner != quota.owner:
            raise ValueError("an evaluation is recorded with its owner's quota")
        done, before, refused_by = self.r.eval(
            _CREATE,
            0,
            PREFIX,
            repr(time.time()),
            "" if max_queued is None else str(max_queued),
            quota.owner or "",
            "" if quota.max_active is None else str(quota.max_active),
            record.id,
            record.model_dump_json(),
            RECORD_TTL_S,
        )
        if done:
            return
        if refused_by == "active":
            assert quota.owner is not None and quota.max_active is not None
            raise ActiveJobsLimitError(quota.owner, int(before), quota.max_active)
        raise QueueFullError(int(before), int(max_queued or 0))

    def put(self, record: EvaluationRecord) -> None:
        """Write the record as it is now; one that has started leaves the queue, one that has
        finished its owner's count too."""
        pipe = self.r.pipeline(transaction=True)
        pipe.set(self._key(record.id), record.model_dump_json(), ex=RECORD_TTL_S)
        if record.status is not JobStatus.queued:
            pipe.zrem(EVALUATIONS_QUEUED, record.id)
        if record.status.finished and record.owner:
            pipe.zrem(job_index.owner_evaluations_key(record.owner), record.id)
        pipe.execute()

    def discard(self, record: EvaluationRecord) -> None:
        """Remove an evaluation that was never sent (the broker refused it), and its places."""
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(self._key(record.id))
        pipe.zrem(EVALUATIONS_QUEUED, record.id)
        if record.owner:
            pipe.zrem(job_index.owner_evaluations_key(record.owner), record.id)
        pipe.execute()

    def queued_before(self, cutoff: float) -> list[str]:
        """The evaluations waiting on the queue since before `cutoff` (epoch s), oldest first."""
        return list(self.r.zrangebyscore(EVALUATIONS_QUEUED, "-inf", cutoff))

    def get(self, evaluation_id: str) -> EvaluationRecord | None:
        raw = self.r.get(self._key(evaluation_id))
        return EvaluationRecord.model_validate_json(raw) if raw is not None else None


def run_evaluation(evaluation_id: str, *, worker: str, settings: Settings) -> str:
    """A worker's part: evaluate the recorded checkpoint and keep the result; what happened."""
    from workers.training.data import load_fashion_mnist
    from workers.training.validation import evaluate_checkpoint

    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    store = EvaluationStore(client)
    try:
        record = store.get(evaluation_id)
        if record is None or record.status.finished:
            return "missing" if record is None else "finished"
        record.status, record.started_at, record.worker = JobStatus.running, now_iso(), worker
        store.put(record)
        try:
            device, amp = prepare_device(settings.worker_device, "auto")
            result: StoredEvaluation = evaluate_checkpoint(
                CheckpointStore(settings.checkpoints_dir),
                record.checkpoint,
                load_fashion_mnist(settings),
                device=device,
                amp_dtype=amp,
                limit=record.limit,
            )
        except (CheckpointError, TrainingError) as exc:
            record.status, record.error = JobStatus.failed, str(exc)
        except Exception as exc:  # a bug or the environment: fail the evaluation, keep the worker
            log.exception("evaluation %s crashed", evaluation_id)
            record.status, record.error = JobStatus.failed, f"{type(exc).__name__}: {exc}"
        else:
            record.status, record.accuracy, record.images = (
                JobStatus.succeeded,
                result.accuracy,
                result.images,
            )
        finally:
            release_memory(settings.worker_device)
        record.finished_at = now_iso()
        store.put(record)
        return record.status.value
    finally:
        client.close()
