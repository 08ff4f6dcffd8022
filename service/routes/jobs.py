"""`/v1/jobs`: submit, list, read and cancel training jobs; their live events and curves."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import re
from typing import Annotated, Any

import redis
from fastapi import APIRouter, Header, Query, Request, Response
from kombu.exceptions import KombuError
from pydantic import BaseModel, ConfigDict, Field

from service.auth import RequireKey
from service.deps import CeleryDep, JobStoreDep, SettingsDep, ValidJob
from service.errors import (
    BadRequestError,
    IdempotencyConflictError,
    IdempotencyInFlightError,
    JobFinishedError,
    QueueFullError,
    ServiceUnavailableError,
    problem_responses,
)
from workers.celery_app import enqueue_job
from workers.contracts import JobSpec, JobStatus
from workers.job_index import Cursor, format_cursor, parse_cursor
from workers.jobs import JobNotFoundError, JobRecord, JobStore, new_job_id, now_iso
from workers.jobs import QueueFullError as QueueFull

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/jobs", tags=["jobs"])

IDEMPOTENCY_KEY_RE = re.compile(r"^[\x21-\x7e]{1,255}$")
QUEUE_FULL_RETRY_S = 30
JSON = "application/json"

_EXAMPLE_JOB: dict[str, Any] = {
    "id": "0123456789abcdef",
    "status": "succeeded",
    "spec": {
        "model": "lenet",
        "arch": None,
        "epochs": 2,
        "batch_size": 128,
        "lr": 0.1,
        "input_size": 28,
        "seed": 0,
        "optimizer": "sgd",
        "device": "auto",
        "precision": "auto",
        "train_limit": 5000,
    },
    "created_at": "2025-01-01T12:00:00.000+00:00",
    "started_at": "2025-01-01T12:00:01.000+00:00",
    "finished_at": "2025-01-01T12:00:09.000+00:00",
    "attempts": 1,
    "worker": "worker@host",
    "device": "cpu",
    "progress": {
        "epoch": 2,
        "epochs": 2,
        "batch": 40,
        "batches": 40,
        "images_per_s": 5200.0,
        "eta_s": 0.0,
    },
    "metrics": [
        {"epoch": 1, "train_loss": 2.31, "val_loss": 2.30, "val_acc": 0.10, "seconds": 3.9},
        {"epoch": 2, "train_loss": 2.29, "val_loss": 2.25, "val_acc": 0.19, "seconds": 3.8},
    ],
    "checkpoints": ["0123456789abcdef-e001", "0123456789abcdef-e002"],
    "best_checkpoint": "0123456789abcdef-e002",
    "latest_checkpoint": "0123456789abcdef-e002",
    "cancel_requested": False,
    "error": None,
}


class Job(JobRecord):
    """A training job: its spec, status, live progress, per-epoch metrics and checkpoints."""

    model_config = ConfigDict(json_schema_extra={"examples": [_EXAMPLE_JOB]})


class JobPage(BaseModel):
    """One page of jobs, newest first."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"jobs": [_EXAMPLE_JOB], "next_cursor": "MTczNTczMzIwMC4w"}]
        }
    )

    jobs: list[Job]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null on the last page."
    )


def _json(
    body: BaseModel, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """A model serialised once: the records are valid as read, so FastAPI's second
    validation of the response (and its dump before it) would only repeat work."""
    return Response(
        body.model_dump_json(), status_code=status_code, headers=headers, media_type=JSON
    )


def _spec_hash(spec: JobSpec) -> str:
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _encode_cursor(cursor: Cursor) -> str:
    return base64.urlsafe_b64encode(format_cursor(cursor).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> Cursor:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        return parse_cursor(raw)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadRequestError(
            "cursor is not one this API gave out; use next_cursor from the previous page"
        ) from None


@router.post(
    "",
    status_code=202,
    summary="Submit a training job",
    description="Queues a job; omitted spec fields take the seed's recipe for the model. "
    "Answers 202 with the job and its `Location`. With an `Idempotency-Key` header, sending "
    "the same key and body again answers 200 with the same job instead of making a second; "
    "the same key with another body is a 422. More than `max_queued_jobs` queued jobs is a "
    "429 with `Retry-After`.",
    response_model=Job,
    dependencies=[RequireKey],
    responses={
        200: {
            "description": "A replay of an earlier request with the same Idempotency-Key: "
            "the job it made, and no new one.",
            "model": Job,
        },
        **problem_responses(
            401,
            409,
            422,
            429,
            503,
            s409="the first request with this Idempotency-Key is still being processed",
            s422="epochs: Input should be less than or equal to 100",
            s503="the broker (Redis) is not reachable; the job was not created",
        ),
    },
)
def submit_job(
    spec: JobSpec,
    store: JobStoreDep,
    celery: CeleryDep,
    settings: SettingsDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description="Any unique string (1–255 printable characters) to make retries safe.",
            examples=["4f9c2a51-7a1e-4d55-9a44-6b1f2f0d7c3e"],
        ),
    ] = None,
) -> Response:
    job_id = new_job_id()
    if idempotency_key is not None:
        if not IDEMPOTENCY_KEY_RE.fullmatch(idempotency_key):
            raise BadRequestError("Idempotency-Key must be 1 to 255 printable ASCII characters")
        try:
            earlier = store.idempotent_job(idempotency_key, _spec_hash(spec), job_id)
        except ValueError as exc:
            raise IdempotencyConflictError(
                f"{exc}; use a new key for a new job", idempotency_key=idempotency_key
            ) from None
        if earlier is not None:
            try:
                record = store.get(earlier)
            except JobNotFoundError:
                raise IdempotencyInFlightError(
                    "the first request with this Idempotency-Key is still being processed; "
                    "retry in a moment",
                    headers={"Retry-After": "1"},
                ) from None
            replayed = {"Location": f"/v1/jobs/{earlier}", "Idempotent-Replayed": "true"}
            return _json(record, 200, replayed)

    try:
        try:
            record = store.create(spec, job_id=job_id, max_queued=settings.max_queued_jobs)
        except QueueFull as full:
            raise QueueFullError(
                f"{full}; retry in {QUEUE_FULL_RETRY_S} s or cancel queued jobs",
                headers={"Retry-After": str(QUEUE_FULL_RETRY_S)},
            ) from None
    except BaseException:
        if idempotency_key is not None:
            _forget_key(store, idempotency_key, job_id)
        raise

    try:
        enqueue_job(celery, job_id)
    except (KombuError, redis.RedisError, OSError) as exc:
        logger.warning("could not enqueue job %s: %s", job_id, exc)
        _undo(store, job_id, idempotency_key)
        raise ServiceUnavailableError(
            "the broker (Redis) is not reachable; the job was not created; retry shortly",
            headers={"Retry-After": "5"},
        ) from None
    logger.info("queued job %s (%s)", job_id, spec.model)
    return _json(record, 202, {"Location": f"/v1/jobs/{job_id}"})


def _forget_key(store: JobStore, key: str, job_id: str) -> None:
    try:
        store.forget_idempotency_key(key, job_id)
    except redis.RedisError:
        logger.warning("could not release Idempotency-Key of unmade job %s", job_id)


def _undo(store: JobStore, job_id: str, idempotency_key: str | None) -> None:
    try:
        store.delete(job_id)
    except redis.RedisError:
        logger.warning("could not remove unqueued job %s", job_id)
    if idempotency_key is not None:
        _forget_key(store, idempotency_key, job_id)


@router.get(
    "",
    summary="List jobs",
    description="Jobs newest first, filtered by status and model, a page at a time: pass "
    '`next_cursor` (also in the `Link: <...>; rel="next"` header) as `cursor`.',
    response_model=JobPage,
    responses=problem_responses(422, s422="cursor is not one this API gave out"),
)
def list_jobs(
    request: Request,
    store: JobStoreDep,
    status: Annotated[JobStatus | None, Query(description="Only jobs in this status.")] = None,
    model: Annotated[
        str | None, Query(description="Only jobs of this model.", max_length=32)
    ] = None,
    limit: Annotated[int, Query(ge=1, le=200, description="Jobs per page.")] = 50,
    cursor: Annotated[
        str | None, Query(description="`next_cursor` of the previous page.", max_length=64)
    ] = None,
) -> Response:
    raw_cursor = _decode_cursor(cursor) if cursor else None
    records, after = store.list_jobs(status=status, model=model, limit=limit, cursor=raw_cursor)
    next_cursor = _encode_cursor(after) if after else None
    headers = {}
    if next_cursor:
        url = request.url.remove_query_params("cursor").include_query_params(cursor=next_cursor)
        headers["Link"] = f'<{url.path}?{url.query}>; rel="next"'
    # a JobPage, each record serialised once, as read
    jobs = ",".join(r.model_dump_json() for r in records)
    body = f'{{"jobs":[{jobs}],"next_cursor":{json.dumps(next_cursor)}}}'
    return Response(body, headers=headers, media_type=JSON)


@router.get(
    "/{job_id}",
    summary="Read a job",
    description="The job's status, spec, live progress, per-epoch metrics (train loss, "
    "validation loss and accuracy, seconds) and checkpoints.",
    response_model=Job,
    responses=problem_responses(404),
)
async def get_job(job: ValidJob) -> Response:
    return _json(job)


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    summary="Cancel a job",
    description="A queued job becomes `cancelled` at once and never starts; a running job "
    "stops within seconds and keeps its checkpoints. A finished job is a 409.",
    response_model=Job,
    dependencies=[RequireKey],
    responses=problem_responses(401, 404, 409),
)
def cancel_job(job: ValidJob, store: JobStoreDep) -> Response:
    if job.status.finished:
        raise JobFinishedError(f"job {job.id} already {job.status.value}; nothing to cancel")
    store.request_cancel(job.id)
    cancelled_now = False

    def change(record: JobRecord) -> None:
        nonlocal cancelled_now
        cancelled_now = False  # decided afresh if the transaction is retried
        if record.status.finished:
            raise JobFinishedError(
                f"job {record.id} already {record.status.value}; nothing to cancel"
            )
        record.cancel_requested = True
        if record.status == JobStatus.queued:
            record.status = JobStatus.cancelled
            record.finished_at = now_iso()
            cancelled_now = True

    def status_event(_record: JobRecord) -> tuple[str, dict[str, Any]] | None:
        return ("status", {"status": JobStatus.cancelled.value}) if cancelled_now else None

    record = store.update(job.id, change, event=status_event)
    logger.info("cancel requested for job %s (%s)", job.id, record.status.value)
    return _json(record, 202)
