"""`/v1/jobs`: submit, idempotency, limits, auth, listing, reading and cancelling jobs."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from celery import Celery
from fastapi.testclient import TestClient

from tests.service.conftest import API_KEY
from workers.celery_app import write_heartbeat
from workers.contracts import CUDA_QUEUE, QUEUE, JobSpec, JobStatus
from workers.store.jobs import EpochMetrics, JobStore

PROBLEM = "application/problem+json"
SPEC = {"model": "lenet", "epochs": 1, "train_limit": 1000}
CONTRACT_FIELDS = {"id", "status", "spec", "progress", "metrics", "checkpoints", "error"}


def queued_task_ids(store: JobStore) -> list[str]:
    """Task ids of the messages waiting in the broker's training queue."""
    ids = []
    for raw in store.r.lrange(QUEUE, 0, -1):
        ids.append(json.loads(raw)["headers"]["id"])
    return ids


def test_submit_queues_a_job_and_a_task(client: TestClient, store: JobStore) -> None:
    r = client.post("/v1/jobs", json=SPEC)
    assert r.status_code == 202
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert set(job) >= CONTRACT_FIELDS
    assert job["status"] == "queued"
    assert job["spec"]["lr"] == 0.1 and job["spec"]["input_size"] == 28
    assert job["spec"]["batch_size"] == 128
    assert store.get(job["id"]).status == JobStatus.queued
    # the broker holds one training task whose id and argument are the job id
    assert queued_task_ids(store) == [job["id"]]
    body = json.loads(store.r.lrange(QUEUE, 0, -1)[0])
    assert body["headers"]["task"] == "cnnserve.train"


def test_a_job_for_cuda_goes_to_the_gpu_queue_and_says_it_waits_without_a_gpu_worker(
    client: TestClient, store: JobStore
) -> None:
    write_heartbeat(store.r, {"name": "cpu-1@host", "device": "cpu"})
    r = client.post("/v1/jobs", json={**SPEC, "device": "cuda"})
    assert r.status_code == 202
    job = r.json()
    assert job["status"] == "queued"
    assert "waiting for a worker with a CUDA GPU" in job["waiting"]
    assert "cpu-1@host (cpu)" in job["waiting"]
    # on the queue only GPU workers read, not the one every worker reads
    assert store.r.llen(CUDA_QUEUE) == 1 and queued_task_ids(store) == []
    assert client.get(f"/v1/jobs/{job['id']}").json()["waiting"] == job["waiting"]

    write_heartbeat(store.r, {"name": "gpu-1@host", "device": "cuda:0", "gpu": "NVIDIA H100"})
    assert client.get(f"/v1/jobs/{job['id']}").json()["waiting"] is None
    # a job for the CPU or any device never waits for a GPU
    other = client.post("/v1/jobs", json=SPEC).json()
    assert other["waiting"] is None and queued_task_ids(store) == [other["id"]]


def test_get_job_has_the_contract_fields(client: TestClient, store: JobStore) -> None:
    job_id = client.post("/v1/jobs", json=SPEC).json()["id"]

    def add_epoch(rec: object) -> None:
        rec.metrics.append(  # type: ignore[attr-defined]
            EpochMetrics(epoch=1, train_loss=2.3, val_loss=2.2, val_acc=0.2, seconds=3.5)
        )

    store.update(job_id, add_epoch)
    r = client.get(f"/v1/jobs/{job_id}")
    assert r.status_code == 200
    job = r.json()
    assert set(job) >= CONTRACT_FIELDS
    assert job["metrics"] == [
        {
            "epoch": 1,
            "train_loss": 2.3,
            "val_loss": 2.2,
            "val_acc": 0.2,
            "seconds": 3.5,
            "confusion_matrix": None,  # none given here; the engine keeps one per epoch
        }
    ]
    assert set(job["progress"]) >= {"epoch", "epochs", "batch", "batches", "images_per_s", "eta_s"}


def test_out_of_bounds_spec_is_422_and_nothing_is_queued(
    client: TestClient, store: JobStore
) -> None:
    for bad in (
        {"model": "lenet", "epochs": 1000000000},
        {"model": "mobilenet"},
        {"model": "lenet", "batch_size": 0},
        {"model": "lenet", "input_size": 20},
        {"model": "lenet", "colour": "red"},
        {"epochs": 2},
    ):
        r = client.post("/v1/jobs", json=bad)
        assert r.status_code == 422, bad
        assert r.headers["content-type"] == PROBLEM
        assert r.json()["errors"], bad
    r = client.post("/v1/jobs", json={"model": "lenet", "epochs": 1000000000})
    assert "epochs" in r.json()["detail"]
    r = client.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert store.r.llen(QUEUE) == 0
    assert client.get("/v1/jobs").json()["jobs"] == []


def test_an_input_size_below_the_networks_smallest_is_a_422_that_says_it(
    client: TestClient, store: JobStore
) -> None:
    for model, size, smallest in (("alexnet", 64, 65), ("nin", 66, 67), ("densenet", 28, 29)):
        r = client.post("/v1/jobs", json={"model": model, "input_size": size})
        assert r.status_code == 422, r.text
        assert r.headers["content-type"] == PROBLEM
        assert f"input_size {size} does not fit {model}" in r.json()["detail"]
        assert f"it needs an input_size of {smallest} or more" in r.json()["detail"]
    assert store.r.llen(QUEUE) == 0
    r = client.post("/v1/jobs", json={"model": "alexnet", "input_size": 65, "epochs": 1})
    assert r.status_code == 202, r.text


def test_a_job_takes_the_book_parameters_of_densenet_as_its_arch(client: TestClient) -> None:
    arch = {"growth_rate": 8, "arch": [2, 2]}
    r = client.post("/v1/jobs", json={"model": "densenet", "arch": arch, "input_size": 28})
    assert r.status_code == 202, r.text
    assert r.json()["spec"]["arch"] == arch
    r = client.post("/v1/jobs", json={"model": "densenet", "arch": {"growth_rate": 999}})
    assert r.status_code == 422
    assert "arch: DenseNet growth_rate must be 1-128" in r.json()["detail"]


def test_unknown_and_malformed_job_ids_are_404(client: TestClient) -> None:
    for job_id in ("0123456789abcdef", "nope", "0123456789ABCDEF", "..", "0123456789abcdef0"):
        for path in ("", "/events", "/curves.png"):
            r = client.get(f"/v1/jobs/{job_id}{path}")
            assert r.status_code == 404, (job_id, path)
            assert r.headers["content-type"] == PROBLEM
    r = client.post("/v1/jobs/0123456789abcdef/cancel")
    assert r.status_code == 404
    assert "0123456789abcdef" in r.json()["detail"]


def test_state_changing_calls_need_a_key_when_keys_are_set(
    keyed_client: TestClient, store: JobStore
) -> None:
    r = keyed_client.post("/v1/jobs", json=SPEC)
    assert r.status_code == 401
    assert r.headers["content-type"] == PROBLEM
    assert r.headers["www-authenticate"].startswith("Bearer")
    r = keyed_client.post("/v1/jobs", json=SPEC, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert "invalid_token" in r.headers["www-authenticate"]
    r = keyed_client.post("/v1/jobs", json=SPEC, headers={"Authorization": f"Basic {API_KEY}"})
    assert r.status_code == 401
    assert store.r.llen(QUEUE) == 0

    auth = {"Authorization": f"Bearer {API_KEY}"}
    r = keyed_client.post("/v1/jobs", json=SPEC, headers=auth)
    assert r.status_code == 202
    job_id = r.json()["id"]
    # with keys, reads need one too
    assert keyed_client.get(f"/v1/jobs/{job_id}").status_code == 401
    assert keyed_client.get(f"/v1/jobs/{job_id}", headers=auth).status_code == 200
    assert keyed_client.get("/v1/jobs", headers=auth).status_code == 200
    assert keyed_client.post(f"/v1/jobs/{job_id}/cancel").status_code == 401
    assert keyed_client.post(f"/v1/jobs/{job_id}/cancel", headers=auth).status_code == 202


def test_idempotency_key_never_makes_a_second_job(client: TestClient, store: JobStore) -> None:
    headers = {"Idempotency-Key": "retry-me-1"}
    first = client.post("/v1/jobs", json=SPEC, headers=headers)
    assert first.status_code == 202
    # the same body in another key order and with a default spelled out is the same request
    again = client.post("/v1/jobs", json={**SPEC, "seed": 0}, headers=headers)
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["location"] == first.headers["location"]
    assert len(client.get("/v1/jobs").json()["jobs"]) == 1
    assert store.r.llen(QUEUE) == 1

    other = client.post("/v1/jobs", json={**SPEC, "epochs": 2}, headers=headers)
    assert other.status_code == 422
    assert other.headers["content-type"] == PROBLEM
    assert "Idempotency-Key" in other.json()["detail"]
    # a new key is a new job
    assert client.post("/v1/jobs", json=SPEC, headers={"Idempotency-Key": "k2"}).status_code == 202
    bad = client.post("/v1/jobs", json=SPEC, headers={"Idempotency-Key": "x" * 300})
    assert bad.status_code == 422


def test_queue_full_is_429_with_retry_after(
    make_client: Callable[..., TestClient], store: JobStore
) -> None:
    client = make_client(max_queued_jobs=2)
    ids = [client.post("/v1/jobs", json=SPEC).json()["id"] for _ in range(2)]
    r = client.post("/v1/jobs", json=SPEC, headers={"Idempotency-Key": "full"})
    assert r.status_code == 429
    assert r.headers["content-type"] == PROBLEM
    assert int(r.headers["retry-after"]) > 0
    assert "2" in r.json()["detail"]
    assert store.r.llen(QUEUE) == 2
    # cancelling a queued job frees a place, and the refused key was not used up
    assert client.post(f"/v1/jobs/{ids[0]}/cancel").status_code == 202
    r = client.post("/v1/jobs", json=SPEC, headers={"Idempotency-Key": "full"})
    assert r.status_code == 202


def test_broker_down_is_503_and_leaves_nothing_behind(client: TestClient, store: JobStore) -> None:
    app = client.app
    real = app.state.celery  # type: ignore[attr-defined]
    dead = Celery("dead", broker="redis://127.0.0.1:1/0", set_as_current=False)
    dead.conf.broker_connection_timeout = 1
    app.state.celery = dead  # type: ignore[attr-defined]
    try:
        r = client.post("/v1/jobs", json=SPEC, headers={"Idempotency-Key": "k"})
    finally:
        app.state.celery = real  # type: ignore[attr-defined]
        dead.close()
    assert r.status_code == 503
    assert r.headers["content-type"] == PROBLEM
    assert "not created" in r.json()["detail"]
    assert client.get("/v1/jobs").json()["jobs"] == []
    assert store.r.keys("cnnserve:job:*") == []
    # the key was released: the retry succeeds
    assert client.post("/v1/jobs", json=SPEC, headers={"Idempotency-Key": "k"}).status_code == 202


def test_redis_down_is_503(make_client: Callable[..., TestClient]) -> None:
    client = make_client(redis_url="redis://127.0.0.1:1/0")
    for method, path in (("GET", "/v1/jobs"), ("POST", "/v1/jobs")):
        started = time.monotonic()
        r = client.request(method, path, json=SPEC if method == "POST" else None)
        assert r.status_code == 503, path
        assert r.headers["content-type"] == PROBLEM
        assert "Redis" in r.json()["detail"]
        assert time.monotonic() - started < 10
    assert client.get("/healthz").status_code == 200


def make_jobs(store: JobStore, n: int, model: str = "lenet") -> list[str]:
    ids = []
    for _ in range(n):
        ids.append(store.create(JobSpec(model=model, epochs=1)).id)
        time.sleep(0.002)  # distinct creation times
    return ids


def test_list_paginates_with_cursor_and_link(client: TestClient, store: JobStore) -> None:
    ids = make_jobs(store, 5)
    newest_first = ids[::-1]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, str | int] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        r = client.get("/v1/jobs", params=params)
        assert r.status_code == 200
        page = r.json()
        seen += [j["id"] for j in page["jobs"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            assert "link" not in r.headers
            break
        link = r.headers["link"]
        assert link.endswith('rel="next"') and f"cursor={cursor}" in link
        assert link.startswith("</v1/jobs?") and "limit=2" in link
    assert seen == newest_first
    assert pages == 3


def test_list_filters_by_status_and_model(client: TestClient, store: JobStore) -> None:
    lenet = make_jobs(store, 2)
    resnet = make_jobs(store, 1, model="resnet18")
    client.post(f"/v1/jobs/{lenet[0]}/cancel")
    r = client.get("/v1/jobs", params={"status": "cancelled"})
    assert [j["id"] for j in r.json()["jobs"]] == [lenet[0]]
    r = client.get("/v1/jobs", params={"model": "resnet18"})
    assert [j["id"] for j in r.json()["jobs"]] == resnet
    r = client.get("/v1/jobs", params={"status": "queued", "model": "lenet"})
    assert [j["id"] for j in r.json()["jobs"]] == [lenet[1]]
    assert client.get("/v1/jobs", params={"status": "sleeping"}).status_code == 422
    assert client.get("/v1/jobs", params={"limit": 0}).status_code == 422
    r = client.get("/v1/jobs", params={"cursor": "not a cursor!"})
    assert r.status_code == 422
    assert "cursor" in r.json()["detail"]


def test_cancel_queued_running_and_finished_jobs(client: TestClient, store: JobStore) -> None:
    queued, running, done = make_jobs(store, 3)

    r = client.post(f"/v1/jobs/{queued}/cancel")
    assert r.status_code == 202
    assert r.json()["status"] == "cancelled"
    assert r.json()["finished_at"]
    last = store.events(queued)[-1]
    assert (last[1], last[2]) == ("status", {"status": "cancelled"})

    def start(rec: object) -> None:
        rec.status = JobStatus.running  # type: ignore[attr-defined]

    store.update(running, start)
    r = client.post(f"/v1/jobs/{running}/cancel")
    assert r.status_code == 202
    assert r.json()["status"] == "running"
    assert r.json()["cancel_requested"] is True
    assert store.cancel_requested(running)

    def finish(rec: object) -> None:
        rec.status = JobStatus.succeeded  # type: ignore[attr-defined]

    store.update(done, finish)
    for job_id, status in ((done, "succeeded"), (queued, "cancelled")):
        r = client.post(f"/v1/jobs/{job_id}/cancel")
        assert r.status_code == 409
        assert r.headers["content-type"] == PROBLEM
        assert status in r.json()["detail"]
    assert not store.cancel_requested(done)
