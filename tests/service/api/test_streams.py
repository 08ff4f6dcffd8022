"""The event streams' bound, and the async reader over a real Redis.

`tests/reliability/test_abuse.py` holds the bound against a real server under load and churn;
these check the rules themselves: who counts as whom, what a refusal says, and that a place
comes back once, however often it is given back.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.requests import Request

from service.access.auth import Caller
from service.access.keys import Principal
from service.api.streams import EventReader, StreamLimiter, job_events, stream_holder
from service.errors import ServiceUnavailableError, TooManyStreamsError
from workers.contracts import JobSpec
from workers.settings import Settings
from workers.store.jobs import JobStore


def _request(host: str) -> Request:
    return Request({"type": "http", "client": (host, 5000), "headers": [], "method": "GET"})


def test_a_principal_past_its_bound_gets_a_429_that_says_when_to_retry() -> None:
    limiter = StreamLimiter(total=10, per_holder=2)
    leases = [limiter.acquire("alice"), limiter.acquire("alice")]
    with pytest.raises(TooManyStreamsError) as refused:
        limiter.acquire("alice")
    assert refused.value.status == 429
    assert refused.value.headers["Retry-After"].isdigit()
    assert "alice has 2 event streams open" in refused.value.detail
    assert "CNNSERVE_MAX_STREAMS_PER_PRINCIPAL" in refused.value.detail
    limiter.acquire("bob")  # another principal is not held to alice's bound
    leases[0].release()
    leases[0].release()  # twice is once
    assert limiter.held_by("alice") == 1 and limiter.open == 2
    limiter.acquire("alice")


def test_a_full_server_gets_a_503_that_says_when_to_retry() -> None:
    limiter = StreamLimiter(total=3, per_holder=2)
    for who in ("alice", "alice", "bob"):
        limiter.acquire(who)
    with pytest.raises(ServiceUnavailableError) as refused:
        limiter.acquire("carol")
    assert refused.value.status == 503
    assert refused.value.headers["Retry-After"].isdigit()
    assert "CNNSERVE_MAX_STREAMS" in refused.value.detail


def test_callers_without_a_key_count_by_address_under_a_name_no_principal_can_have() -> None:
    keyless = Caller(Principal(name=None, scopes=frozenset({"read"})), None)
    one, other = (
        stream_holder(keyless, _request("10.0.0.1")),
        stream_holder(keyless, _request("10.0.0.2")),
    )
    assert one != other
    assert not one[0].isalnum()  # principal names start with a letter or digit
    named = Caller(Principal(name="anonymous", scopes=frozenset({"read"})), "anonymous")
    assert stream_holder(named, _request("10.0.0.1")) == "anonymous" != one
    limiter = StreamLimiter(total=10, per_holder=1)
    limiter.acquire(one)
    with pytest.raises(TooManyStreamsError) as refused:
        limiter.acquire(one)
    assert "callers without a key from 10.0.0.1" in refused.value.detail


def test_the_reader_replays_then_follows_a_job_until_it_finishes(settings: Settings) -> None:
    store = JobStore.from_url(settings.redis_url)
    job = store.create(JobSpec(model="lenet", epochs=1))

    async def follow() -> list[tuple[str | None, dict[str, object]]]:
        reader = EventReader(settings.redis_url, max_streams=4)
        try:
            seen = []
            async for event in job_events(reader, job.id, None):
                seen.append((event.event, json.loads(str(event.data))))
                if len(seen) == 1:  # live: written while the stream waits
                    await asyncio.to_thread(
                        store.add_event, job.id, "status", {"status": "cancelled"}
                    )
            return seen
        finally:
            await reader.aclose()

    try:
        events = asyncio.run(asyncio.wait_for(follow(), timeout=15))
    finally:
        store.r.close()
    assert events == [("status", {"status": "queued"}), ("status", {"status": "cancelled"})]


def test_following_several_jobs_ends_when_one_finished_before_the_stream_began(
    settings: Settings,
) -> None:
    """`GET /v1/jobs/events?ids=` reads the records, then starts the stream: a job that
    finishes in between sent its last event before the stream's first read. The stream must
    still end once the others finish (it waited for that job for ever, holding a place)."""
    from service.api.streams import several_jobs_events
    from workers.contracts import JobStatus

    store = JobStore.from_url(settings.redis_url)
    early, late = (store.create(JobSpec(model="lenet", epochs=1)) for _ in range(2))

    def cancel(job_id: str) -> None:
        store.update(
            job_id,
            lambda r: setattr(r, "status", JobStatus.cancelled),
            event=lambda r: ("status", {"status": "cancelled"}),
        )

    cancel(early.id)  # between the route's read and the stream

    async def follow() -> list[dict[str, object]]:
        reader = EventReader(settings.redis_url, max_streams=4)
        try:
            seen = []
            asyncio.get_running_loop().call_later(0.3, cancel, late.id)
            async for event in several_jobs_events(reader, [early.id, late.id]):
                seen.append(json.loads(str(event.data)))
            return seen
        finally:
            await reader.aclose()

    try:
        events = asyncio.run(asyncio.wait_for(follow(), timeout=15))
    finally:
        store.r.close()
    assert events == [{"job": late.id, "status": "cancelled"}]
