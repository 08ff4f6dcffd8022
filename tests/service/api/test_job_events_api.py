"""`/v1/jobs/{id}/events` (SSE replay and live follow) and `/v1/jobs/{id}/curves.*`."""

from __future__ import annotations

import io
import json
import threading
import time

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.api.routes import job_events
from tests.http_checks import Event, parse_sse
from workers.contracts import JobSpec, JobStatus
from workers.store.jobs import EpochMetrics, JobRecord, JobStore


def read_sse(client: TestClient, url: str, headers: dict[str, str] | None = None) -> list[Event]:
    """Read an event stream to its end: (id, event, data) per event, comments skipped."""
    events: list[Event] = []
    with client.stream("GET", url, headers=headers or {}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        events.extend(parse_sse(r.iter_lines()))
    return events


def finished_job(store: JobStore) -> tuple[str, list[str]]:
    """A job with a full event history: queued, running, progress, epoch, succeeded."""
    job_id = store.create(JobSpec(model="lenet", epochs=1)).id
    ids = [store.events(job_id)[0][0]]
    ids.append(store.add_event(job_id, "status", {"status": "running"}))
    ids.append(store.add_event(job_id, "progress", {"epoch": 1, "batch": 5, "batches": 8}))
    ids.append(
        store.add_event(
            job_id,
            "epoch",
            {"epoch": 1, "train_loss": 2.3, "val_loss": 2.2, "val_acc": 0.2, "seconds": 1.0},
        )
    )

    def finish(rec: JobRecord) -> None:
        rec.status = JobStatus.succeeded

    store.update(job_id, finish)
    ids.append(store.add_event(job_id, "status", {"status": "succeeded"}))
    return job_id, ids


def test_events_replay_everything_and_end(client: TestClient, store: JobStore) -> None:
    job_id, ids = finished_job(store)
    events = read_sse(client, f"/v1/jobs/{job_id}/events")
    assert [e[0] for e in events] == ids
    assert [e[1] for e in events] == ["status", "status", "progress", "epoch", "status"]
    assert events[0][2] == {"status": "queued"}
    assert events[3][2]["val_acc"] == 0.2
    assert events[-1][2] == {"status": "succeeded"}


def test_every_event_matches_the_documented_event_schema(
    client: TestClient, store: JobStore
) -> None:
    import jsonschema_rs

    job_id, _ids = finished_job(store)
    doc = client.get("/openapi.json").json()
    content = doc["paths"]["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]
    validator = jsonschema_rs.validator_for(content["text/event-stream"]["schema"])
    for eid, kind, data in read_sse(client, f"/v1/jobs/{job_id}/events"):
        event = {"id": eid, "event": kind, "data": json.dumps(data)}
        assert validator.is_valid(event), event


def test_events_resume_after_last_event_id(client: TestClient, store: JobStore) -> None:
    job_id, ids = finished_job(store)
    events = read_sse(client, f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": ids[2]})
    assert [e[0] for e in events] == ids[3:]
    events = read_sse(client, f"/v1/jobs/{job_id}/events?last_event_id={ids[3]}")
    assert [e[0] for e in events] == ids[4:]
    # after the final event there is nothing more to say: the stream ends at once
    started = time.monotonic()
    assert read_sse(client, f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": ids[4]}) == []
    assert time.monotonic() - started < 5


def test_events_follow_live_until_the_job_ends(client: TestClient, store: JobStore) -> None:
    job_id = store.create(JobSpec(model="lenet", epochs=2)).id

    def worker() -> None:
        time.sleep(0.5)
        store.add_event(job_id, "status", {"status": "running"})
        for epoch in (1, 2):
            time.sleep(0.2)
            store.add_event(job_id, "progress", {"epoch": epoch, "batch": 1, "batches": 1})
        time.sleep(0.2)
        store.add_event(job_id, "status", {"status": "failed", "error": "out of memory"})

    t = threading.Thread(target=worker)
    t.start()
    try:
        events = read_sse(client, f"/v1/jobs/{job_id}/events")
    finally:
        t.join()
    assert [e[1] for e in events] == ["status", "status", "progress", "progress", "status"]
    assert events[-1][2] == {"status": "failed", "error": "out of memory"}


def test_events_end_for_a_job_cancelled_while_queued(client: TestClient, store: JobStore) -> None:
    job_id = store.create(JobSpec(model="lenet", epochs=1)).id
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
    events = read_sse(client, f"/v1/jobs/{job_id}/events")
    assert [e[2]["status"] for e in events] == ["queued", "cancelled"]


def test_events_errors(client: TestClient, store: JobStore) -> None:
    job_id, _ = finished_job(store)
    r = client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "yesterday"})
    assert r.status_code == 422
    assert r.headers["content-type"] == "application/problem+json"
    r = client.get("/v1/jobs/ffffffffffffffff/events")
    assert r.status_code == 404


def with_metrics(store: JobStore, epochs: int) -> str:
    job_id = store.create(JobSpec(model="lenet", epochs=3)).id

    def change(rec: JobRecord) -> None:
        rec.status = JobStatus.running
        for e in range(1, epochs + 1):
            rec.metrics.append(
                EpochMetrics(
                    epoch=e, train_loss=2.3 / e, val_loss=2.2 / e, val_acc=0.3 * e, seconds=1.0
                )
            )

    store.update(job_id, change)
    return job_id


def test_curves_png_decodes(client: TestClient, store: JobStore) -> None:
    job_id = with_metrics(store, 3)
    r = client.get(f"/v1/jobs/{job_id}/curves.png")
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(r.content))
    img.load()
    assert img.format == "PNG"
    assert img.width >= 300 and img.height >= 200
    # a real plot: many colours (lines, legend, text), not a blank canvas
    colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50


def test_curves_svg_has_the_three_series(client: TestClient, store: JobStore) -> None:
    job_id = with_metrics(store, 2)
    r = client.get(f"/v1/jobs/{job_id}/curves.svg")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("image/svg+xml")
    text = r.text
    assert "<svg" in text
    for label in ("train loss", "val loss", "val acc", "epoch"):
        assert label in text, label


def test_curves_before_the_first_epoch_are_empty_axes(client: TestClient, store: JobStore) -> None:
    job_id = store.create(JobSpec(model="lenet", epochs=1)).id
    r = client.get(f"/v1/jobs/{job_id}/curves.png")
    assert r.status_code == 200
    Image.open(io.BytesIO(r.content)).load()
    assert "no finished epoch yet" in client.get(f"/v1/jobs/{job_id}/curves.svg").text
    assert client.get("/v1/jobs/0000000000000000/curves.svg").status_code == 404


def test_events_send_keep_alive_pings_while_idle(
    client: TestClient, store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(job_events, "SSE_PING_S", 0.3)
    job_id = store.create(JobSpec(model="lenet", epochs=1)).id

    def finish_later() -> None:
        time.sleep(1.2)
        store.add_event(job_id, "status", {"status": "cancelled"})

    t = threading.Thread(target=finish_later)
    t.start()
    comments = 0
    try:
        with client.stream("GET", f"/v1/jobs/{job_id}/events") as r:
            for line in r.iter_lines():
                comments += line.startswith(":")
    finally:
        t.join()
    assert comments >= 2
