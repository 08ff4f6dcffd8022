"""`/v1/sweeps`: many jobs from one base spec and a grid or random search, with a leaderboard."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from anyio import to_thread
from fastapi import APIRouter, Header, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette import EventSourceResponse, ServerSentEvent

from service.access.audit import audit_target
from service.access.auth import Allow, Caller, CallerDep
from service.api import streams
from service.api.deps import (
    CeleryDep,
    CheckpointStoreDep,
    JobStoreDep,
    SettingsDep,
    SweepStoreDep,
)
from service.api.pages import decode_cursor, encode_cursor
from service.api.problems import problem_responses
from service.api.streams import STREAMS_429, STREAMS_503, EventReader
from service.errors import (
    BadRequestError,
    SweepNotFoundError,
)
from service.jobs import control as job_control
from service.jobs.sweeps import (
    MAX_JOBS,
    Entry,
    PointError,
    SortKey,
    SweepRecord,
    SweepRequest,
    SweepStore,
    entry,
    expand,
    new_sweep_id,
    rank,
    status,
)
from workers.contracts import SWEEP_ID_PATTERN, JobStatus
from workers.store.jobs import JobRecord, JobStore

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/sweeps", tags=["sweeps"])

#: A sweep's event stream sends its leaderboard at most this often (seconds).
SWEEP_EVENT_EVERY_S = 0.5


class Sweep(BaseModel):
    """A sweep: what it varies, its status, and its jobs as a leaderboard (best first)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "fedcba9876543210",
                    "name": None,
                    "status": "running",
                    "created_at": "2026-12-01T12:00:00.000+00:00",
                    "base": {"model": "lenet", "epochs": 2},
                    "varies": ["lr"],
                    "sort": "best_val_acc",
                    "counts": {"queued": 1, "running": 1, "succeeded": 0},
                    "jobs": [],
                }
            ]
        }
    )

    id: str
    name: str | None
    status: JobStatus
    created_at: str
    base: dict[str, Any]
    varies: list[str] = Field(description="The spec fields the sweep varies.")
    sort: str = Field(description="What `jobs` is ordered by, best first.")
    counts: dict[str, int] = Field(description="Jobs per status.")
    jobs: list[Entry]


class SweepPage(BaseModel):
    """Sweeps newest first, with each one's status and best job so far."""

    sweeps: list[Sweep]
    next_cursor: str | None


SweepId = Annotated[
    str,
    Path(pattern=SWEEP_ID_PATTERN, description="A sweep id, as POST /v1/sweeps answered it."),
]
Sort = Annotated[
    SortKey, Query(description="Order the jobs by this, best first (lowest loss, seconds).")
]


def _view(
    sweep: SweepRecord, records: list[JobRecord | None], sort: SortKey, *, top: int | None = None
) -> Sweep:
    # a job removed by retention drops out of its sweep's leaderboard
    pairs = [(r, p) for r, p in zip(records, sweep.points, strict=True) if r is not None]
    jobs = [r for r, _ in pairs]
    entries = [entry(r, p) for r, p in pairs]
    ranked = rank(entries, sort)
    varied = sweep.request.grid or (sweep.request.random.space if sweep.request.random else {})
    counts = {s.value: sum(1 for r in jobs if r.status is s) for s in JobStatus}
    return Sweep(
        id=sweep.id,
        name=sweep.name,
        status=status(jobs, sweep.cancel_requested),
        created_at=sweep.created_at,
        base=sweep.request.base,
        varies=list(varied),
        sort=sort,
        counts=counts,
        jobs=ranked[:top] if top is not None else ranked,
    )


def read_sweep(
    store: JobStore, sweeps: SweepStore, sweep_id: str, caller: Caller
) -> tuple[SweepRecord, list[JobRecord | None]]:
    """A sweep and its jobs' records (one MGET); 404 when there is no such sweep, or it is
    another tenant's."""
    sweep = sweeps.get(sweep_id)
    if sweep is None or not caller.sees(sweep.owner):
        raise SweepNotFoundError(f"no sweep with id {sweep_id!r}; POST /v1/sweeps makes one")
    return sweep, store.get_many(sweep.job_ids)


@router.post(
    "",
    status_code=202,
    summary="Start a sweep",
    description="Makes one job per grid point (every combination of the grid's values) or per "
    f"random sample, from the base spec; at most {MAX_JOBS} jobs, within the queue limit. "
    "Every point's spec is checked before anything is queued: a bad one is a 422 naming it. "
    "The jobs go through the same path as POST /v1/jobs. Answers 202 with the sweep and its "
    "`Location`; with an `Idempotency-Key` a retry answers the same sweep. A sweep larger "
    "than the caller's `max_sweep_jobs` is a 422.",
    response_model=Sweep,
    dependencies=[Allow("train", audit_as="sweep.submit")],
    responses=problem_responses(
        401,
        403,
        409,
        422,
        429,
        503,
        s422="point 1 {'lr': 20.0}: lr: Input should be less than or equal to 10",
        s429="3 jobs are queued and this request adds 4, the limit is 5",
    ),
)
def create_sweep(
    request: Request,
    caller: CallerDep,
    body: SweepRequest,
    store: JobStoreDep,
    sweeps: SweepStoreDep,
    celery: CeleryDep,
    settings: SettingsDep,
    ckpts: CheckpointStoreDep,
    idempotency_key: Annotated[
        str | None,
        Header(alias="Idempotency-Key", description="Any unique string to make retries safe."),
    ] = None,
) -> Response:
    try:
        found, specs = expand(body)
    except PointError as exc:
        raise BadRequestError(str(exc), point=exc.index) from None
    allowed = caller.principal.max_sweep_jobs or settings.max_sweep_jobs
    if caller.owner is not None and len(specs) > allowed:
        raise BadRequestError(
            f"the sweep makes {len(specs)} jobs; {caller.owner}'s limit (max_sweep_jobs) is "
            f"{allowed} per sweep: make the grid smaller",
            limit="max_sweep_jobs",
        )
    sweep_id = new_sweep_id()
    jobs = job_control.records(ckpts, specs, caller, sweep_id=sweep_id)
    key = job_control.Idempotency(store, idempotency_key, f"sweep:{sweep_id}", caller.owner)
    replay = key.replay(body, lambda earlier: sweeps.get(earlier.removeprefix("sweep:")))
    if replay is not None:
        audit_target(request, replay.id)
        view = _view(replay, store.get_many(replay.job_ids), "best_val_acc")
        headers = {"Location": f"/v1/sweeps/{replay.id}", "Idempotent-Replayed": "true"}
        return Response(view.model_dump_json(), 200, headers, media_type="application/json")
    record = SweepRecord(
        id=sweep_id,
        name=body.name,
        request=body,
        points=found,
        job_ids=[j.id for j in jobs],
        owner=caller.owner,
    )
    audit_target(request, sweep_id)
    with key.released_on_failure():
        sweeps.put(record, new=True)
        try:
            job_control.submit(store, celery, settings, jobs, caller)
        except BaseException:
            sweeps.delete(sweep_id, caller.owner)
            raise
    logger.info("sweep %s: %d jobs queued", sweep_id, len(jobs))
    view = _view(record, list(jobs), "best_val_acc")
    return Response(
        view.model_dump_json(),
        status_code=202,
        headers={"Location": f"/v1/sweeps/{sweep_id}"},
        media_type="application/json",
    )


@router.get(
    "",
    summary="List sweeps",
    description="Sweeps newest first, each with its status, counts and best job so far; pass "
    "`next_cursor` as `cursor` for the next page. A principal that is not an admin lists only "
    "its own.",
    response_model=SweepPage,
    dependencies=[Allow("read")],
    responses=problem_responses(401, 403, 422),
)
def list_sweeps(
    caller: CallerDep,
    store: JobStoreDep,
    sweeps: SweepStoreDep,
    limit: Annotated[int, Query(ge=1, le=50, description="Sweeps per page.")] = 20,
    cursor: Annotated[str | None, Query(max_length=64, description="From the last page.")] = None,
) -> SweepPage:
    page, after = sweeps.page(limit, decode_cursor(cursor) if cursor else None, caller.within)
    all_jobs = store.get_many([j for s in page for j in s.job_ids])
    views, at = [], 0
    for sweep in page:
        jobs = all_jobs[at : at + len(sweep.job_ids)]
        at += len(sweep.job_ids)
        views.append(_view(sweep, jobs, "best_val_acc", top=1))
    return SweepPage(sweeps=views, next_cursor=encode_cursor(after) if after else None)


@router.get(
    "/{sweep_id}",
    summary="Read a sweep and its leaderboard",
    description="The sweep's jobs with status, spec, best val_acc, latest losses and seconds "
    "per epoch, best first by `sort` (jobs without a value yet last).",
    response_model=Sweep,
    dependencies=[Allow("read")],
    responses=problem_responses(401, 403, 404, 422),
)
def get_sweep(
    sweep_id: SweepId,
    caller: CallerDep,
    store: JobStoreDep,
    sweeps: SweepStoreDep,
    sort: Sort = "best_val_acc",
) -> Sweep:
    sweep, jobs = read_sweep(store, sweeps, sweep_id, caller)
    return _view(sweep, jobs, sort)


@router.post(
    "/{sweep_id}/cancel",
    status_code=202,
    summary="Cancel a sweep",
    description="Cancels every unfinished job of the sweep: queued ones never start, running "
    "ones stop within seconds and keep their checkpoints; finished ones stay as they are.",
    response_model=Sweep,
    dependencies=[Allow("train", audit_as="sweep.cancel")],
    responses=problem_responses(401, 403, 404, 422),
)
def cancel_sweep(
    sweep_id: SweepId, caller: CallerDep, store: JobStoreDep, sweeps: SweepStoreDep
) -> Sweep:
    sweep, jobs = read_sweep(store, sweeps, sweep_id, caller)
    sweep.cancel_requested = True
    sweeps.put(sweep)
    unfinished = [j.id for j in jobs if j is not None and not j.status.finished]
    for job_id in unfinished:
        job_control.cancel(store, job_id)
    logger.info("sweep %s cancelled (%d unfinished jobs)", sweep_id, len(unfinished))
    return _view(sweep, store.get_many(sweep.job_ids), "best_val_acc")


@router.get(
    "/{sweep_id}/events",
    summary="Follow a sweep",
    description="Server-Sent Events: a `sweep` event with the whole leaderboard at once, and "
    f"again whenever one of its jobs reports (at most every {SWEEP_EVENT_EVERY_S} s); the "
    "stream ends after the event in which every job has finished. Counts against the caller's "
    "bound of open streams (429 past it) and the server's (503).",
    response_class=EventSourceResponse,
    responses={
        200: {
            "description": "An event stream of `sweep` events (data: the Sweep, as JSON).",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        **problem_responses(401, 403, 404, 422, 429, 503, s429=STREAMS_429, s503=STREAMS_503),
    },
    dependencies=[Allow("read")],
)
async def sweep_events(
    request: Request,
    sweep_id: SweepId,
    caller: CallerDep,
    store: JobStoreDep,
    sweeps: SweepStoreDep,
    sort: Sort = "best_val_acc",
) -> EventSourceResponse:
    sweep, _ = await to_thread.run_sync(read_sweep, store, sweeps, sweep_id, caller)  # 404 first
    events = _follow(streams.reader_of(request), store, sweeps, sweep, caller, sort)
    return streams.open_stream(request, caller, events)


async def _follow(
    reader: EventReader,
    store: JobStore,
    sweeps: SweepStore,
    sweep: SweepRecord,
    caller: Caller,
    sort: SortKey,
) -> AsyncIterator[ServerSentEvent]:
    # where each job's events are now, then the first view: whatever happens after the tails
    # are read is an event past them (a job that finished before is finished in the view)
    sweep_id = sweep.id
    cursors = await reader.tails(sweep.job_ids)
    sweep, jobs = await to_thread.run_sync(read_sweep, store, sweeps, sweep_id, caller)
    while True:
        view = _view(sweep, jobs, sort)
        yield ServerSentEvent(data=view.model_dump_json(), event="sweep")
        if view.status.finished:
            return
        started = time.monotonic()
        changed = False
        while not changed:  # waits on a socket, not a thread (service.api.streams)
            cursors, events = await reader.follow(cursors, streams.BLOCK_MS)
            changed = bool(events)
        await asyncio.sleep(max(0.0, SWEEP_EVENT_EVERY_S - (time.monotonic() - started)))
        sweep, jobs = await to_thread.run_sync(read_sweep, store, sweeps, sweep_id, caller)
