"""Evaluations of a checkpoint queued for a worker: their records in Redis, and what a
confusion matrix says per class.

`POST /v1/checkpoints/{ref}/evaluate` records an evaluation (`queued`) and sends
`cnnserve.evaluate` through the one enqueue path; a worker (`workers.training.evaluate`) marks it
`running`, evaluates the checkpoint on the test set as validation does, stores the result
beside the checkpoint (in the checkpoint store, so any host reads it) and in the record
(`succeeded`), or the reason it could not (`failed`).
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

from pydantic import BaseModel, ConfigDict, Field

from workers.contracts import JobStatus
from workers.store import job_index
from workers.store.job_index import EVALUATION_TTL_S, EVALUATIONS_QUEUED, PREFIX
from workers.store.jobs import ActiveJobsLimitError, QueueFullError, Quota, now_iso

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


class ClassScores(BaseModel):
    """One class's numbers in a confusion matrix (one class against the rest)."""

    model_config = ConfigDict(populate_by_name=True)

    class_: str = Field(alias="class", description="The class name.")
    precision: float = Field(description="Of the images predicted as this class, how many are.")
    recall: float = Field(description="Of the images of this class, how many were found.")
    f1: float = Field(description="The harmonic mean of precision and recall.")
    accuracy: float = Field(
        description="This class against the rest: (true positives + true negatives) / images."
    )
    support: int = Field(description="Images of this class.")


def per_class(matrix: list[list[int]], classes: list[str]) -> list[ClassScores]:
    """Precision, recall, F1 and one-vs-rest accuracy per class from a confusion matrix."""
    n = sum(map(sum, matrix))
    out = []
    for i, name in enumerate(classes):
        tp = matrix[i][i]
        predicted = sum(row[i] for row in matrix)
        actual = sum(matrix[i])
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        tn = n - predicted - actual + tp
        out.append(
            ClassScores(
                class_=name,
                precision=precision,
                recall=recall,
                f1=f1,
                accuracy=(tp + tn) / n if n else 0.0,
                support=actual,
            )
        )
    return out
