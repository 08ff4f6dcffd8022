"""Server-Sent Event streams: bounded per principal and in all, waiting without a thread.

Every event stream of the API (`GET /v1/jobs/{id}/events`, `GET /v1/jobs/events?ids=`,
`GET /v1/sweeps/{id}/events`) is opened with `open_stream`:

- it takes a place from the process's `StreamLimiter` first: past the caller's bound
  (`CNNSERVE_MAX_STREAMS_PER_PRINCIPAL`) a 429, past the process's (`CNNSERVE_MAX_STREAMS`) a
  503, both with `Retry-After`. Callers without a key count by their address, under a name
  no principal can have;
- the place is given back by the response itself once it is over, however it ends (the
  stream finishes, the client leaves, a send times out, the server stops), and only after the
  stream's pending read was cancelled: churn (connect, disconnect, again) cannot take the
  number of waiting reads past the bound;
- streams wait on `EventReader`: blocking reads on redis.asyncio, so a waiting stream is a
  coroutine parked on a socket, never a thread of the pool that the sync routes share.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import redis
import redis.asyncio
from fastapi import Request
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.types import Receive, Scope, Send

from service.access.auth import KEYLESS, Caller
from service.errors import ServiceUnavailableError, TooManyStreamsError
from workers.contracts import JobStatus
from workers.store.job_index import record_key
from workers.store.jobs import JobEvent, advance, events_key, parse_events

logger = logging.getLogger(__name__)

#: How long one read waits for events before the stream looks at its job again (ms).
BLOCK_MS = 1000
#: A client that reads nothing for this long (its socket full) loses its stream (seconds).
SEND_TIMEOUT_S = 30.0
PING_S = 15.0
#: What a refused caller is told to wait: its own streams take a while to end; the
#: process's are many, one of them ends soon.
PRINCIPAL_RETRY_S = 10
PROCESS_RETRY_S = 5

_FINISHED = {s.value for s in JobStatus if s.finished}

#: Examples of the refusals, for the routes' OpenAPI documents.
STREAMS_429 = (
    "alice has 32 event streams open here; the limit (CNNSERVE_MAX_STREAMS_PER_PRINCIPAL) is 32: "
    "close one, or follow several jobs in one stream (GET /v1/jobs/events?ids=...), and retry"
)
STREAMS_503 = (
    "this server has 256 event streams open, its limit (CNNSERVE_MAX_STREAMS); retry in 5 s"
)


def finishes(kind: str, data: dict[str, Any]) -> bool:
    """Whether this event is the one that finishes its job."""
    return kind == "status" and data.get("status") in _FINISHED


# --- the bound --------------------------------------------------------------------------------


class StreamLease:
    """One open stream's place; `release` gives it back (once, however often it is called)."""

    def __init__(self, limiter: StreamLimiter, holder: str) -> None:
        self._limiter = limiter
        self.holder = holder
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._limiter._give_back(self.holder)


class StreamLimiter:
    """The event streams open in this process, per holder and in all.

    Used from the event loop only (acquired in the route, released by the response), so it
    needs no lock.
    """

    def __init__(self, total: int, per_holder: int) -> None:
        self.total = total
        self.per_holder = per_holder
        self._held: Counter[str] = Counter()
        self._open = 0

    @property
    def open(self) -> int:
        return self._open

    def held_by(self, holder: str) -> int:
        return self._held[holder]

    def acquire(self, holder: str) -> StreamLease:
        """A place for one more stream of `holder`; a 429 past its bound, a 503 past ours."""
        if self._held[holder] >= self.per_holder:
            raise TooManyStreamsError(
                f"{_who(holder)} {self._held[holder]} event streams open here; the limit "
                f"(CNNSERVE_MAX_STREAMS_PER_PRINCIPAL) is {self.per_holder}: close one, or "
                "follow several jobs in one stream (GET /v1/jobs/events?ids=...), and retry",
                headers={"Retry-After": str(PRINCIPAL_RETRY_S)},
                limit="max_streams_per_principal",
                open_streams=self._held[holder],
            )
        if self._open >= self.total:
            raise ServiceUnavailableError(
                f"this server has {self._open} event streams open, its limit "
                f"(CNNSERVE_MAX_STREAMS); retry in {PROCESS_RETRY_S} s",
                headers={"Retry-After": str(PROCESS_RETRY_S)},
            )
        self._held[holder] += 1
        self._open += 1
        return StreamLease(self, holder)

    def _give_back(self, holder: str) -> None:
        self._open -= 1
        self._held[holder] -= 1
        if self._held[holder] <= 0:
            del self._held[holder]


def _who(holder: str) -> str:
    if holder.startswith(KEYLESS):
        return f"callers without a key from {holder.partition('@')[2]} have"
    return f"{holder} has"


def stream_holder(caller: Caller, request: Request) -> str:
    """Whom a stream counts against: its principal; without a key, the caller's address,
    under a name no principal can have (principal names start with a letter or digit)."""
    if caller.principal.name is not None:
        return caller.principal.name
    host = request.client.host if request.client is not None else "unknown"
    return f"{KEYLESS}@{host}"


class BoundedEventSource(EventSourceResponse):
    """An event stream that gives its place back when the response is over, whatever ends it.

    The place is released after `EventSourceResponse` has returned: by then its task group
    has cancelled the stream's pending read (and redis-py closed that read's connection).
    """

    def __init__(self, content: AsyncIterator[ServerSentEvent], lease: StreamLease, **kw: Any):
        super().__init__(content, **kw)
        self.lease = lease

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.lease.release()


def open_stream(
    request: Request,
    caller: Caller,
    events: AsyncIterator[ServerSentEvent],
    *,
    ping: float = PING_S,
) -> EventSourceResponse:
    """The response that streams `events`, once the caller has a place (429/503 if not)."""
    limiter: StreamLimiter = request.app.state.stream_limiter
    lease = limiter.acquire(stream_holder(caller, request))
    return BoundedEventSource(events, lease, ping=ping, send_timeout=SEND_TIMEOUT_S)


# --- reading without a thread -------------------------------------------------------------------


class EventReader:
    """Job event streams read with redis.asyncio: waiting costs a socket, not a thread.

    A stream reads one thing at a time, so it holds at most one pooled connection: the pool
    is sized for `max_streams` (plus a few) and never refuses a stream its read.
    """

    def __init__(self, redis_url: str, max_streams: int) -> None:
        self.r: Any = redis.asyncio.Redis.from_url(
            redis_url,
            max_connections=max_streams + 8,
            decode_responses=True,
            socket_connect_timeout=2,
            socket_timeout=BLOCK_MS / 1000 + 10,
            health_check_interval=30,
        )

    async def events(self, job_id: str, after: str | None, block_ms: int) -> list[JobEvent]:
        """The job's events after `after` (all when None), waiting up to `block_ms`."""
        reply = await self.r.xread({events_key(job_id): after or "0-0"}, count=100, block=block_ms)
        return parse_events(reply)

    async def tails(self, job_ids: list[str]) -> dict[str, str]:
        """The id of each job's last event ("0-0" for none yet): where to follow them from."""
        async with self.r.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.xrevrange(events_key(job_id), count=1)
            lasts = await pipe.execute()
        return {j: (last[0][0] if last else "0-0") for j, last in zip(job_ids, lasts, strict=True)}

    async def follow(
        self, cursors: dict[str, str], block_ms: int | None
    ) -> tuple[dict[str, str], list[JobEvent]]:
        """Wait up to `block_ms` (None: not at all) for these jobs' next events (one read over
        all of them): the cursors moved past what arrived, and it."""
        if not cursors:
            return cursors, []
        streams = {events_key(job_id): after for job_id, after in cursors.items()}
        events = parse_events(await self.r.xread(streams, count=1000, block=block_ms))
        return advance(cursors, events), events

    async def status(self, job_id: str) -> JobStatus | None:
        """The job's status now (None: no such job any more)."""
        raw = await self.r.get(record_key(job_id))
        return JobStatus(json.loads(raw)["status"]) if raw is not None else None

    async def finished(self, job_ids: list[str]) -> set[str]:
        """Which of these jobs have finished (or whose records are gone), in one read."""
        raws = await self.r.mget([record_key(j) for j in job_ids])
        return {
            job_id
            for job_id, raw in zip(job_ids, raws, strict=True)
            if raw is None or JobStatus(json.loads(raw)["status"]).finished
        }

    async def aclose(self) -> None:
        await self.r.aclose()


def reader_of(request: Request) -> EventReader:
    reader: EventReader = request.app.state.event_reader
    return reader


async def job_events(
    reader: EventReader, job_id: str, after: str | None
) -> AsyncIterator[ServerSentEvent]:
    """One job's events after `after` (from the start when None), then live, until the
    event that finishes it (or its record is gone)."""
    cursor = after
    try:
        while True:
            batch = await reader.events(job_id, cursor, BLOCK_MS)
            for _job, event_id, kind, data in batch:
                cursor = event_id
                yield ServerSentEvent(data=json.dumps(data), event=kind, id=event_id)
                if finishes(kind, data):
                    return
            if not batch:
                status = await reader.status(job_id)
                # deleted while we followed it; or finished, its final event before `after`
                if status is None or status.finished:
                    return
    except redis.RedisError as exc:  # the client reconnects with Last-Event-ID
        logger.warning("event stream of job %s ended: Redis unavailable (%s)", job_id, exc)


def _tagged(event: JobEvent) -> ServerSentEvent:
    """One of several jobs' events, with its job's id in its data."""
    job_id, event_id, kind, data = event
    return ServerSentEvent(data=json.dumps({"job": job_id, **data}), event=kind, id=event_id)


async def several_jobs_events(
    reader: EventReader, job_ids: list[str]
) -> AsyncIterator[ServerSentEvent]:
    """These jobs' events from now on, each with its job's id, until all have finished.

    A job that finished before the stream's first read (after the route read its record)
    sent its last event before the stream began: a quiet second looks at the records, so such
    a job (or one deleted meanwhile) is not waited for without end."""
    try:
        cursors = await reader.tails(job_ids)
        unfinished = set(job_ids)
        while unfinished:
            cursors, events = await reader.follow(
                {j: c for j, c in cursors.items() if j in unfinished}, BLOCK_MS
            )
            for event in events:
                yield _tagged(event)
                if finishes(event[2], event[3]):
                    unfinished.discard(event[0])
            if not events:
                done = await reader.finished(sorted(unfinished))
                if done:  # what they sent since the read above (status and event are one step)
                    _, late = await reader.follow({j: cursors[j] for j in done}, None)
                    for event in late:
                        yield _tagged(event)
                    unfinished -= done
    except redis.RedisError as exc:
        logger.warning("event stream of %d jobs ended: Redis unavailable (%s)", len(job_ids), exc)
