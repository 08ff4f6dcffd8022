"""`/v1/jobs`: submit, list, read and cancel training jobs; their live events and curves."""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any

from anyio import to_thread
from fastapi import APIRouter, Header, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from service.access.audit import audit_target
from service.access.auth import Allow, CallerDep
from service.api.deps import CeleryDep, CheckpointStoreDep, JobStoreDep, SettingsDep, ValidJob
from service.api.pagination import decode_cursor, encode_cursor
from service.api.problems import problem_responses
from service.errors import (
    JobFinishedError,
)
from service.jobs import control as job_control
from workers.contracts import JobSpec, JobStatus
from workers.store.jobs import JobNotFoundError, JobRecord

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/jobs", tags=["jobs"])

JSON = "application/json"
_PAGE_EXCLUDES: Any = {"metrics": {"__all__": {"confusion_matrix"}}}

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

    waiting: str | None = Field(
        None,
        description="Why a queued job is not starting, when it is known: a job that asks for "
        "`cuda` waits for a worker on a GPU (CPU workers never take it). Null otherwise, and "
        "left out of listings.",
    )


def _job(
    record: JobRecord,
    note: str | None,
    status_code: int = 200,
    headers: dict[str, str] | None = None,
) -> Response:
    """One job as `Job`: the record as read, and why it waits (`job_control.waiting_note`)."""
    body = record.model_dump_json()
    body = f'{body[:-1]},"waiting":{json.dumps(note)}}}'
    return Response(body, status_code=status_code, headers=headers, media_type=JSON)


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


@router.post(
    "",
    status_code=202,
    summary="Submit a training job",
    description="Queues a job; omitted spec fields take the seed's recipe for the model. "
    "Answers 202 with the job and its `Location`. With an `Idempotency-Key` header, sending "
    "the same key and body again answers 200 with the same job instead of making a second; "
    "the same key with another body is a 422. More than `max_queued_jobs` queued jobs, or "
    "more of the caller's own queued and running jobs than its `max_active_jobs`, is a 429 "
    "with `Retry-After`.",
    response_model=Job,
    dependencies=[Allow("train", audit_as="job.submit")],
    responses={
        200: {
            "description": "A replay of an earlier request with the same Idempotency-Key: "
            "the job it made, and no new one.",
            "model": Job,
        },
        **problem_responses(
            401,
            403,
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
    request: Request,
    spec: JobSpec,
    caller: CallerDep,
    store: JobStoreDep,
    celery: CeleryDep,
    settings: SettingsDep,
    ckpts: CheckpointStoreDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description="Any unique string (1–255 printable characters) to make retries safe.",
            examples=["4f9c2a51-7a1e-4d55-9a44-6b1f2f0d7c3e"],
        ),
    ] = None,
) -> Response:
    (record,) = job_control.records(ckpts, [spec], caller)
    if idempotency_key is not None:
        earlier = job_control.claim_key(
            store, idempotency_key, job_control.body_hash(spec), record.id, caller.owner
        )
        if earlier is not None:
            try:
                replay = store.get(earlier)
            except JobNotFoundError:
                raise job_control.in_flight() from None
            audit_target(request, earlier)
            replayed = {"Location": f"/v1/jobs/{earlier}", "Idempotent-Replayed": "true"}
            return _json(replay, 200, replayed)
    audit_target(request, record.id)
    try:
        job_control.submit(store, celery, settings, [record], caller)
    except BaseException:
        job_control.release_key(store, idempotency_key, record.id, caller.owner)
        raise
    note = job_control.waiting_note(record, settings.redis_url)
    return _job(record, note, 202, {"Location": f"/v1/jobs/{record.id}"})


@router.get(
    "",
    summary="List jobs",
    description="Jobs newest first, filtered by status and model, a page at a time: pass "
    '`next_cursor` (also in the `Link: <...>; rel="next"` header) as `cursor`. Each job as '
    "`GET /v1/jobs/{id}` has it, but for the per-epoch confusion matrices. A principal that is "
    "not an admin lists only its own jobs.",
    response_model=JobPage,
    dependencies=[Allow("read")],
    responses=problem_responses(401, 403, 422, s422="cursor is not one this API gave out"),
)
def list_jobs(
    request: Request,
    caller: CallerDep,
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
    raw_cursor = decode_cursor(cursor) if cursor else None
    records, after = store.list_jobs(
        status=status, model=model, limit=limit, cursor=raw_cursor, owner=caller.within
    )
    next_cursor = encode_cursor(after) if after else None
    headers = {}
    if next_cursor:
        url = request.url.remove_query_params("cursor").include_query_params(cursor=next_cursor)
        headers["Link"] = f'<{url.path}?{url.query}>; rel="next"'
    # a JobPage, each record serialised once, as read (per-epoch confusion matrices are left
    # to GET /v1/jobs/{id}: a page should not grow by a hundred numbers per epoch per job)
    jobs = ",".join(r.model_dump_json(exclude=_PAGE_EXCLUDES) for r in records)
    body = f'{{"jobs":[{jobs}],"next_cursor":{json.dumps(next_cursor)}}}'
    return Response(body, headers=headers, media_type=JSON)


@router.get(
    "/{job_id}",
    summary="Read a job",
    description="The job's status, spec, live progress, per-epoch metrics (train loss, "
    "validation loss and accuracy, seconds) and checkpoints; for a queued job that asks for "
    "`cuda` while no GPU worker runs, `waiting` says so.",
    response_model=Job,
    dependencies=[Allow("read")],
    responses=problem_responses(401, 403, 404),
)
async def get_job(job: ValidJob, settings: SettingsDep) -> Response:
    note = None
    if job_control.may_wait_for_a_gpu(job):  # reads the workers' heartbeats: off the loop
        note = await to_thread.run_sync(job_control.waiting_note, job, settings.redis_url)
    return _job(job, note)


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    summary="Cancel a job",
    description="A queued job becomes `cancelled` at once and never starts; a running job "
    "stops within seconds and keeps its checkpoints. A finished job is a 409.",
    response_model=Job,
    dependencies=[Allow("train", audit_as="job.cancel")],
    responses=problem_responses(401, 403, 404, 409),
)
def cancel_job(job: ValidJob, store: JobStoreDep) -> Response:
    record, unfinished = job_control.cancel(store, job.id)
    if not unfinished:
        raise JobFinishedError(f"job {job.id} already {record.status.value}; nothing to cancel")
    logger.info("cancel requested for job %s (%s)", job.id, record.status.value)
    return _json(record, 202)
