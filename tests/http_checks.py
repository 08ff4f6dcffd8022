"""Checks the API tests share: RFC 9457 problem responses and Server-Sent Event streams."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

PROBLEM = "application/problem+json"

#: (id, event, data) of one Server-Sent Event.
Event = tuple[str, str, dict[str, Any]]


def assert_problem(r: Any, status: int, *words: str) -> dict[str, Any]:
    """`r` is an RFC 9457 problem of `status` whose detail names each of `words` (any case)."""
    assert r.status_code == status, r.text[:1000]
    assert r.headers["content-type"].startswith(PROBLEM), r.headers["content-type"]
    body: dict[str, Any] = r.json()
    assert body["status"] == status, body
    assert isinstance(body["title"], str) and body["title"], body
    assert isinstance(body["detail"], str) and len(body["detail"]) > 10, body
    assert str(body["type"]).startswith(("urn:cnnserve:problem:", "about:blank")), body
    for word in words:
        assert word.lower() in body["detail"].lower(), body
    return body


def parse_sse(lines: Iterable[str]) -> Iterator[Event]:
    """The events of a `text/event-stream` body, line by line; comments (pings) skipped."""
    fields: dict[str, str] = {}
    for line in lines:
        if line == "":
            if "data" in fields:
                yield (
                    fields.get("id", ""),
                    fields.get("event", "message"),
                    json.loads(fields["data"]),
                )
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
