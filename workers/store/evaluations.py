"""Evaluations of a checkpoint queued for a worker: their records in Redis and the task body.

`POST /v1/checkpoints/{ref}/evaluate` records an evaluation (`queued`) and sends
`cnnserve.evaluate` through the one enqueue path; a worker marks it `running`, evaluates the
checkpoint on the test set as validation does (`workers.training.validation`), stores the
result beside the checkpoint (in the checkpoint store, so any host reads it) and in the record
(`succeeded`), or the reason it could not (`failed`).
Records expire after `RECORD_TTL_S`; the stored result stays with the checkpoint.

Keys (prefix `cnnserve:`): `evaluation:{id}` the JSON of an `EvaluationRecord`.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict, Field

from workers.contracts import JobStatus
from workers.errors import TrainingError
from workers.settings import Settings
from workers.store.checkpoints import (
    CheckpointError,
    CheckpointStore,
    StoredEvaluation,
    StoreUnavailableError,
)
from workers.store.job_index import PREFIX
from workers.store.jobs import now_iso
from workers.training.devices import prepare_device, release_memory

log = logging.getLogger(__name__)

RECORD_TTL_S = 7 * 86400


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

    def put(self, record: EvaluationRecord) -> None:
        self.r.set(self._key(record.id), record.model_dump_json(), ex=RECORD_TTL_S)

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
                CheckpointStore.from_settings(settings, client),
                record.checkpoint,
                load_fashion_mnist(settings),
                device=device,
                amp_dtype=amp,
                limit=record.limit,
            )
        except (CheckpointError, TrainingError, StoreUnavailableError) as exc:
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
