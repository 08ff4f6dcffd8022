"""`/v1/jobs/{id}/events` and `/v1/jobs/{id}/curves.*`: a job's live events and its plots."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from sse_starlette import EventSourceResponse

from service.access.auth import Allow, CallerDep
from service.api import streams
from service.api.deps import ValidJob
from service.api.plots import PLOT_RESPONSE, PlotFormat, plot_response, render_curves
from service.api.problems import problem_responses
from service.api.streams import STREAMS_429, STREAMS_503
from service.errors import BadRequestError

router = APIRouter(prefix="/jobs", tags=["jobs"])

SSE_PING_S = 15
EVENT_ID_RE = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}$")


_EVENTS_DESCRIPTION = """Server-Sent Events of the job: `status` ({status, error?}), `progress`
(epoch, batch, images/s, ETA) and `epoch` (the epoch's metrics and its checkpoint id), each with
its id. Replays from the start, or after the id in the `Last-Event-ID` header (or the
`last_event_id` query parameter), then follows live, with keep-alive comments; the stream ends
after the `status` event that finishes the job. A principal may hold a bounded number of
streams open at once (429 past it), and so may the server (503); both say when to retry.

```
id: 1735733200000-0
event: status
data: {"status": "queued"}
```
"""


#: One event of the stream, as an SSE client parses it.
SSE_EVENT_SCHEMA: dict[str, object] = {
    "type": "object",
    "required": ["id", "event", "data"],
    "properties": {
        "id": {
            "type": "string",
            "pattern": "^[0-9]+-[0-9]+$",
            "description": "The event's id; send it back as Last-Event-ID to resume after it.",
        },
        "event": {"type": "string", "enum": ["status", "progress", "epoch"]},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "description": "A JSON object: {status, error?}, a Progress, or EpochMetrics with "
            "the epoch's checkpoint id.",
        },
        "retry": {"type": "integer", "minimum": 0},
    },
}


@router.get(
    "/{job_id}/events",
    summary="Follow a job's events",
    description=_EVENTS_DESCRIPTION,
    response_class=EventSourceResponse,
    responses={
        200: {
            "description": "An event stream.",
            "content": {
                "text/event-stream": {
                    # as OpenAPI 3.2 models SSE: the schema of one event, not of the stream
                    "schema": SSE_EVENT_SCHEMA,
                    "example": 'id: 1735733200000-0\nevent: status\ndata: {"status": "queued"}\n\n',
                }
            },
        },
        **problem_responses(
            401,
            403,
            404,
            422,
            429,
            503,
            s422="Last-Event-ID is not an event id like 1-0",
            s429=STREAMS_429,
            s503=STREAMS_503,
        ),
    },
    dependencies=[Allow("read")],
)
async def job_events(
    request: Request,
    job: ValidJob,
    caller: CallerDep,
    last_event_id_header: Annotated[
        str | None, Header(alias="Last-Event-ID", description="Resume after this event id.")
    ] = None,
    last_event_id: Annotated[
        str | None,
        Query(description="Resume after this event id (for clients that cannot set headers)."),
    ] = None,
) -> EventSourceResponse:
    after = last_event_id_header or last_event_id
    if after is not None and not EVENT_ID_RE.fullmatch(after):
        raise BadRequestError(f"Last-Event-ID {after!r} is not an event id like 1735733200000-0")
    # a missing (or another tenant's) job was a 404 before the stream started
    events = streams.job_events(streams.reader_of(request), job.id, after)
    return streams.open_stream(request, caller, events, ping=SSE_PING_S)


_CURVES_DESCRIPTION = (
    "Train loss, validation loss and validation accuracy against epoch, as d2l plots them "
    "(solid, dashed and dash-dot lines with a legend). Before the first epoch ends: empty axes."
)


@router.get(
    "/{job_id}/curves.{format:plot}",
    summary="Plot a job's curves as PNG or SVG",
    description=_CURVES_DESCRIPTION,
    response_class=Response,
    responses={**PLOT_RESPONSE, **problem_responses(401, 403, 404)},
    dependencies=[Allow("read")],
)
def job_curves(job: ValidJob, format: PlotFormat) -> Response:
    body = render_curves(
        job.metrics, format, epochs=job.spec.epochs, title=f"{job.spec.model} · job {job.id}"
    )
    return plot_response(body, format)
