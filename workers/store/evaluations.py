"""Evaluations of a checkpoint queued for a worker: their records in Redis, and what a
confusion matrix says per class.

`POST /v1/checkpoints/{ref}/evaluate` records an evaluation (`queued`) and sends
`cnnserve.evaluate` through the one enqueue path; a worker (`workers.training.evaluate`) marks it
`running`, evaluates the checkpoint on the test set as validation does, stores the result
beside the checkpoint (in the checkpoint store, so any host reads it) and in the record
(`succeeded`), or the reason it could not (`failed`).
Records expire after `RECORD_TTL_S`; the stored result stays with the checkpoint.

Keys (prefix `cnnserve:`): `evaluation:{id}` the JSON of an `EvaluationRecord`.
"""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from workers.contracts import JobStatus
from workers.store.job_index import PREFIX
from workers.store.jobs import now_iso

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
