"""The API process dies while a client follows a job's events; the client reconnects with
`Last-Event-ID` to the restarted API and misses no epoch, sees none twice."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.http_checks import parse_sse
from tests.reliability.procs import ApiProcess
from tests.workers.helpers import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

EPOCHS = 6


def test_a_client_following_events_survives_an_api_restart(
    start_api: Callable[..., ApiProcess], start_worker: Callable[..., WorkerProcess]
) -> None:
    worker = start_worker()
    api = start_api()
    r = httpx.post(
        f"{api.url}/v1/jobs",
        json={"model": "lenet", "epochs": EPOCHS, "train_limit": 1000, "device": "cpu"},
        timeout=10,
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]

    seen: list[tuple[str, str, dict[str, Any]]] = []
    connections = 0
    killed_at: int | None = None
    down_for = 0.0
    deadline = time.monotonic() + 180
    while not (seen and seen[-1][1] == "status" and seen[-1][2]["status"] == "succeeded"):
        assert time.monotonic() < deadline, f"stream never ended: {seen[-3:]}\n{worker.log()}"
        headers = {"Last-Event-ID": seen[-1][0]} if seen else {}
        try:
            with httpx.stream("GET", f"{api.url}/v1/jobs/{job_id}/events", headers=headers,
                              timeout=httpx.Timeout(30, connect=2)) as stream:  # fmt: skip
                assert stream.status_code == 200
                connections += 1
                for event in parse_sse(stream.iter_lines()):
                    seen.append(event)
                    if event[1] == "epoch" and killed_at is None:
                        killed_at = event[2]["epoch"]
                        api.kill9()  # mid-stream; the client finds out by itself
                        down = time.monotonic()
                        api.start()  # same port; training went on meanwhile
                        down_for = time.monotonic() - down
        except httpx.HTTPError:
            time.sleep(0.2)  # as an EventSource does: wait, then reconnect with the last id

    assert api.starts == 2 and connections >= 2
    assert killed_at is not None and killed_at < EPOCHS, "the job ended before the restart"
    ids = [event_id for event_id, _, _ in seen]
    assert len(ids) == len(set(ids)), "an event was delivered twice"
    epochs = [data["epoch"] for _, kind, data in seen if kind == "epoch"]
    assert epochs == list(range(1, EPOCHS + 1)), epochs
    assert down_for > 0
