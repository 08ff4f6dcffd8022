"""`/healthz`, `/readyz` and `/metrics`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fastapi.testclient import TestClient

from service.access.keys import add_key
from workers.celery_app import write_heartbeat
from workers.settings import Settings
from workers.store.jobs import JobStore


def test_healthz_always_answers(client: TestClient) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


def test_readyz_without_workers_is_503_naming_them(client: TestClient) -> None:
    r = client.get("/readyz")
    assert r.status_code == 503
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["checks"]["redis"]["ok"] is True
    assert body["checks"]["storage"]["ok"] is True
    assert body["checks"]["workers"]["ok"] is False
    assert "worker" in body["detail"]
    assert "redis" not in body["detail"].split("workers:")[0]


def test_readyz_names_unwritable_storage(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("in the way")
    client = make_client(data_dir=not_a_dir)
    r = client.get("/readyz")
    assert r.status_code == 503
    assert r.json()["checks"]["storage"]["ok"] is False
    assert "storage" in r.json()["detail"]
    assert str(not_a_dir) in r.json()["detail"]


def test_readyz_names_unreachable_redis(make_client: Callable[..., TestClient]) -> None:
    client = make_client(redis_url="redis://127.0.0.1:1/0")
    r = client.get("/readyz")
    assert r.status_code == 503
    body = r.json()
    assert body["checks"]["redis"]["ok"] is False
    assert "redis" in body["detail"].lower()
    # metrics still answer when Redis does not
    assert client.get("/metrics").status_code == 200


def test_metrics_count_requests_by_route_and_jobs_by_status(
    client: TestClient, store: JobStore
) -> None:
    job_id = client.post("/v1/jobs", json={"model": "lenet", "epochs": 1}).json()["id"]
    client.get(f"/v1/jobs/{job_id}")
    client.get("/v1/jobs/0000000000000000")
    client.get("/no/such/route")
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'route="/v1/jobs/{job_id}",status="200"' in text
    assert 'route="/v1/jobs/{job_id}",status="404"' in text
    assert 'route="<unmatched>",status="404"' in text
    assert job_id not in text  # no raw paths as labels
    assert 'cnnserve_http_request_duration_seconds_bucket{le="0.001",method="GET"' in text
    assert 'cnnserve_jobs{status="queued"} 1.0' in text
    assert "cnnserve_queue_depth 1.0" in text
    for name in (
        "cnnserve_inference_latency_seconds",
        "cnnserve_inference_batch_size",
        "cnnserve_model_cache_hits_total",
        "cnnserve_model_cache_misses_total",
    ):
        assert f"# TYPE {name.removesuffix('_total')}" in text, name


def test_readyz_is_ready_with_a_live_worker_heartbeat(client: TestClient, store: JobStore) -> None:
    write_heartbeat(store.r, {"name": "trainer-1@gpu-host", "device": "cpu", "job": None})
    r = client.get("/readyz")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ready"
    assert all(c["ok"] for c in body["checks"].values())
    assert "trainer-1@gpu-host" in body["checks"]["workers"]["detail"]


def test_readyz_lists_each_worker_and_the_device_it_trains_on(
    client: TestClient, store: JobStore
) -> None:
    write_heartbeat(store.r, {"name": "cpu-1@host-a", "device": "cpu", "job": None})
    write_heartbeat(
        store.r, {"name": "gpu-1@host-b", "device": "cuda:0", "gpu": "NVIDIA H100", "job": "j1"}
    )
    r = client.get("/readyz")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["workers"] == [
        {"name": "cpu-1@host-a", "device": "cpu"},  # what it does not know is left out
        {"name": "gpu-1@host-b", "device": "cuda:0", "gpu": "NVIDIA H100", "job": "j1"},
    ]
    assert (
        "cpu-1@host-a (cpu), gpu-1@host-b (cuda:0, NVIDIA H100)"
        in (body["checks"]["workers"]["detail"])
    )


def test_readyz_without_workers_lists_none(client: TestClient) -> None:
    r = client.get("/readyz")
    assert r.status_code == 503
    assert r.json()["workers"] == []


def test_readyz_writes_nothing_to_the_data_directory(
    client: TestClient, settings: Settings
) -> None:
    client.get("/readyz")  # made when missing, once
    directory = settings.checkpoints_dir
    before = (directory.stat().st_mtime_ns, sorted(directory.iterdir()))
    for _ in range(5):
        assert client.get("/readyz").json()["checks"]["storage"]["ok"] is True
    assert (directory.stat().st_mtime_ns, sorted(directory.iterdir())) == before


def test_readyz_tells_only_admins_what_it_found(
    make_client: Callable[..., TestClient], store: JobStore, settings: Settings, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.toml"
    admin = {"Authorization": f"Bearer {add_key(keys, 'root', ['admin'])[0]}"}
    reader = {"Authorization": f"Bearer {add_key(keys, 'reader', ['read'])[0]}"}
    wrong = {"Authorization": "Bearer cns_0123456789ab_" + "x" * 43}
    client = make_client(api_keys_file=keys)
    secrets = [str(settings.data_dir), "127.0.0.1", "trainer-1@gpu-host", "celery"]

    for headers in ({}, reader, wrong):  # no worker yet: not ready, and which check says so
        r = client.get("/readyz", headers=headers)
        assert r.status_code == 503 and r.headers["Retry-After"] == "5"
        assert r.json()["detail"].startswith("not ready: workers (a key with the admin scope")
        assert r.json()["checks"] == {"redis": {"ok": True}, "storage": {"ok": True},
                                      "workers": {"ok": False}}  # fmt: skip
        assert not [s for s in secrets if s in r.text], r.text
    assert "start one with `cnnserve worker`" in client.get("/readyz", headers=admin).text

    write_heartbeat(store.r, {"name": "trainer-1@gpu-host", "device": "cpu", "job": None})
    client = make_client(api_keys_file=keys)  # the last answer about workers is cached
    for headers in ({}, reader, wrong):
        r = client.get("/readyz", headers=headers)
        assert r.status_code == 200 and r.json() == {"status": "ready"}, r.text
    found = client.get("/readyz", headers=admin).json()["checks"]
    assert "trainer-1@gpu-host" in found["workers"]["detail"]
    assert str(settings.checkpoints_dir) in found["storage"]["detail"]
    assert "127.0.0.1" in found["redis"]["detail"]
