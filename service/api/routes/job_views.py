"""Views over several jobs at once: `/v1/jobs/compare` (one metric side by side, as JSON or
on one plot) and `/v1/jobs/events` (their events in one stream, for a table of jobs).

Registered before `/v1/jobs/{job_id}`, so `compare` and `events` are never read as job ids.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from anyio import to_thread
from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, Field
from sse_starlette import EventSourceResponse

from service.access.auth import Allow, Caller, CallerDep
from service.api import streams
from service.api.deps import JobStoreDep, SweepStoreDep
from service.api.plots import PLOT_RESPONSE, PlotFormat, plot_response, render_comparison
from service.api.problems import problem_responses
from service.api.streams import STREAMS_429, STREAMS_503
from service.errors import (
    BadRequestError,
    SweepNotFoundError,
)
from workers.contracts import JOB_ID_RE, SWEEP_ID_PATTERN, JobSpec
from workers.store.jobs import JobNotFoundError, JobRecord, JobStore

router = APIRouter(prefix="/jobs", tags=["jobs"])

MAX_COMPARED = 64
Metric = Literal["val_acc", "val_loss", "train_loss", "seconds"]


class Series(BaseModel):
    """One job's metric, epoch by epoch."""

    id: str
    label: str = Field(description="The job's values of the fields that differ, for a legend.")
    differs: dict[str, Any] = Field(description="Those fields and this job's values.")
    spec: JobSpec
    status: str
    points: list[tuple[int, float]] = Field(description="(epoch, value) pairs.")


class Comparison(BaseModel):
    """Several jobs' metric side by side, and the spec fields in which they differ."""

    metric: str
    differing_fields: list[str]
    jobs: list[Series]


Ids = Annotated[
    str | None,
    Query(
        description=f"Comma-separated job ids (at most {MAX_COMPARED}).",
        max_length=MAX_COMPARED * 17,
        examples=["0123456789abcdef,fedcba9876543210"],
    ),
]
Sweep = Annotated[
    str | None,
    Query(pattern=SWEEP_ID_PATTERN, description="Compare every job of this sweep instead."),
]
MetricQuery = Annotated[Metric, Query(description="Which per-epoch number to compare.")]


def _records(
    store: JobStore, sweeps: Any, ids: str | None, sweep: str | None, caller: Caller
) -> list[JobRecord]:
    if (ids is None) == (sweep is None):
        raise BadRequestError("give ids=<id>,<id>,... or sweep=<id>, one of the two")
    if sweep is not None:
        record = sweeps.get(sweep)
        if record is None or not caller.sees(record.owner):
            raise SweepNotFoundError(f"no sweep with id {sweep!r}")
        wanted = list(record.job_ids)
    else:
        wanted = [i.strip() for i in (ids or "").split(",") if i.strip()]
        if not wanted:
            raise BadRequestError("ids is empty; list the jobs to compare, comma-separated")
        if len(wanted) > MAX_COMPARED:
            raise BadRequestError(f"{len(wanted)} jobs; compare at most {MAX_COMPARED} at once")
        bad = [i for i in wanted if not JOB_ID_RE.fullmatch(i)]
        if bad:
            raise BadRequestError(f"{bad[0]!r} is not a job id (16 hex digits)")
    found = store.get_many(list(dict.fromkeys(wanted)))
    # another tenant's job is missing, as one that does not exist
    records = [r if r is not None and caller.sees(r.owner) else None for r in found]
    missing = [i for i, r in zip(dict.fromkeys(wanted), records, strict=True) if r is None]
    if missing and sweep is None:
        raise JobNotFoundError(missing[0])
    return [r for r in records if r is not None]


def _comparison(records: list[JobRecord], metric: Metric) -> Comparison:
    specs = [r.spec.model_dump(mode="json", exclude={"device"}) for r in records]
    fields = list(specs[0]) if specs else []
    differing = [f for f in fields if len({repr(s[f]) for s in specs}) > 1]
    series = []
    for record, spec in zip(records, specs, strict=True):
        differs = {f: spec[f] for f in differing}
        label = ", ".join(f"{f}={v}" for f, v in differs.items()) or record.id
        series.append(
            Series(
                id=record.id,
                label=label if len(records) > 1 or differing else record.id,
                differs=differs,
                spec=record.spec,
                status=record.status.value,
                points=[(m.epoch, float(getattr(m, metric))) for m in record.metrics],
            )
        )
    return Comparison(metric=metric, differing_fields=differing, jobs=series)


_DESCRIPTION = (
    "The chosen per-epoch metric of several jobs (`ids`, or every job of a `sweep`), with the "
    "spec fields in which they differ: each job is labelled by its values of those."
)


def compared(
    caller: CallerDep,
    store: JobStoreDep,
    sweeps: SweepStoreDep,
    ids: Ids = None,
    sweep: Sweep = None,
    metric: MetricQuery = "val_acc",
) -> Comparison:
    """The comparison a request asks for, as JSON and plots show it."""
    return _comparison(_records(store, sweeps, ids, sweep, caller), metric)


Compared = Annotated[Comparison, Depends(compared)]


@router.get(
    "/compare",
    summary="Compare jobs",
    description=_DESCRIPTION,
    response_model=Comparison,
    dependencies=[Allow("read")],
    responses=problem_responses(401, 403, 404, 422),
)
def compare(comparison: Compared) -> Comparison:
    return comparison


@router.get(
    "/compare.{format:plot}",
    summary="Plot jobs side by side as PNG or SVG",
    description=f"{_DESCRIPTION} One line per job, a legend of the differing fields.",
    response_class=Response,
    responses={**PLOT_RESPONSE, **problem_responses(401, 403, 404, 422)},
    dependencies=[Allow("read")],
)
def compare_plot(format: PlotFormat, comparison: Compared) -> Response:
    title = f"{comparison.metric.replace('_', ' ')} of {len(comparison.jobs)} jobs"
    body = render_comparison(
        [(s.label, s.points) for s in comparison.jobs], comparison.metric, format, title=title
    )
    return plot_response(body, format)


FOLLOWED = 50


@router.get(
    "/events",
    summary="Follow several jobs",
    description="Server-Sent Events of up to 50 jobs in one stream, from now on: each job's "
    "`status`, `progress` and `epoch` events as `/v1/jobs/{id}/events` sends them, with the "
    "job's id added to the data (`job`). Ends when every one of them has finished. Counts "
    "against the caller's bound of open streams (429 past it) and the server's (503).",
    response_class=EventSourceResponse,
    responses={
        200: {
            "description": "An event stream; each event's data has the job's id.",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        **problem_responses(401, 403, 422, 429, 503, s429=STREAMS_429, s503=STREAMS_503),
    },
    dependencies=[Allow("read")],
)
async def follow_jobs(
    request: Request,
    caller: CallerDep,
    store: JobStoreDep,
    ids: Annotated[
        str,
        Query(
            description=f"Comma-separated job ids (at most {FOLLOWED}).",
            max_length=FOLLOWED * 17,
            examples=["0123456789abcdef,fedcba9876543210"],
        ),
    ],
) -> EventSourceResponse:
    wanted = list(dict.fromkeys(i.strip() for i in ids.split(",") if i.strip()))
    if not wanted or len(wanted) > FOLLOWED:
        raise BadRequestError(f"list 1 to {FOLLOWED} job ids to follow, comma-separated")
    bad = [i for i in wanted if not JOB_ID_RE.fullmatch(i)]
    if bad:
        raise BadRequestError(f"{bad[0]!r} is not a job id (16 hex digits)")
    records = await to_thread.run_sync(store.get_many, wanted)
    # the missing, the finished and other tenants' jobs are left out alike
    live = [
        r.id for r in records if r is not None and not r.status.finished and caller.sees(r.owner)
    ]
    events = streams.several_jobs_events(streams.reader_of(request), live)
    return streams.open_stream(request, caller, events)
