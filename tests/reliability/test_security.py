"""Security: no path escapes the data directory, no pickle is ever executed, no key is logged."""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from service.api.app import create_app
from tests.reliability.procs import ApiProcess, raw_request
from tests.service.checkpoint_helpers import JOB_A, fashion_test_set, lenet, png, save
from tests.workers.helpers import lenet_spec
from workers.contracts import JobStatus
from workers.settings import Settings
from workers.store.checkpoint_index import record_key
from workers.store.checkpoints import CheckpointStore
from workers.store.jobs import JobStore
from workers.training.data import load_fashion_mnist
from workers.training.engine import train
from workers.training.runner import run_job

pytestmark = [pytest.mark.integration]

SECRET = "top-secret-marker-7f3a9c"

#: Ways to spell "go up and out": plain, percent-encoded, double-encoded, absolute, backslashes.
ESCAPES = [
    "../../../secret.txt",
    "..%2f..%2f..%2fsecret.txt",
    "..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "%2e%2e%2f%2e%2e%2f%2e%2e%2fsecret.txt",
    "%2e%2e/%2e%2e/%2e%2e/secret.txt",
    "..%252f..%252f..%252fsecret.txt",
    "%2Fetc%2Fpasswd",
    "/etc/passwd",
    "....//....//....//etc/passwd",
    "..\\..\\..\\secret.txt",
    "..%5c..%5c..%5csecret.txt",
    f"{JOB_A}-e001%2f..%2f..%2f..%2fsecret.txt",
    f"{JOB_A}-e001/../../../secret.txt",
    "lenet:best%00../../secret.txt",
]
#: Every route with a path parameter, and the static docs mount (the one that serves files).
ENDPOINTS = [
    ("GET", "/v1/models/{}"),
    ("GET", "/v1/models/{}/summary"),
    ("POST", "/v1/models/{}/summary"),
    ("GET", "/v1/jobs/{}"),
    ("POST", "/v1/jobs/{}/cancel"),
    ("GET", "/v1/jobs/{}/events"),
    ("GET", "/v1/jobs/{}/curves.png"),
    ("GET", "/v1/jobs/{}/curves.svg"),
    ("GET", "/v1/checkpoints/{}"),
    ("GET", "/v1/checkpoints/{}/weights"),
    ("POST", "/v1/checkpoints/{}/predict"),
    ("DELETE", "/v1/checkpoints/{}"),
    ("GET", "/static-docs/{}"),
]


class Payload:
    """Unpickling this runs `open(marker, "w")`: the file's existence proves code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def test_no_endpoint_serves_a_file_outside_the_data_directory(
    settings: Settings, tmp_path: Path, start_api: Callable[..., ApiProcess]
) -> None:
    (tmp_path / "secret.txt").write_text(SECRET)  # beside the data directory, not in it
    ckpts = CheckpointStore.from_settings(settings)
    save(ckpts, lenet(trained=False), job_id=JOB_A, epoch=1)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    api = start_api()

    tried = 0
    for method, template in ENDPOINTS:
        for escape in ESCAPES:
            target = template.format(escape)
            body = b"{}" if method == "POST" else b""
            headers = {"Content-Type": "application/json"} if body else {}
            status, payload = raw_request(api.port, method, target, headers, body)
            tried += 1
            assert 400 <= status < 500, (method, target, status, payload[:300])
            assert SECRET.encode() not in payload and b"root:x:0:0" not in payload, target
    assert tried == len(ENDPOINTS) * len(ESCAPES)
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert [p for p in before if p not in after] == []  # no DELETE reached anything
    assert "unhandled error" not in api.log()


def _rehash(manifest_path: Path, field: str, path: Path) -> None:
    """What an attacker with write access to the volume would do: make the hash match."""
    manifest = json.loads(manifest_path.read_text())
    manifest[field] = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("crafted", ["state.pt", "weights.safetensors"])
def test_a_pickle_planted_in_a_checkpoint_is_never_executed_on_resume(
    settings: Settings, store: JobStore, tmp_path: Path, crafted: str, one_thread: None
) -> None:
    spec = lenet_spec(epochs=2, train_limit=256)
    job = store.create(spec)
    ckpts = CheckpointStore.from_settings(settings)
    train(spec.model_copy(update={"epochs": 1}), job_id=job.id, data=load_fashion_mnist(settings),
          store=ckpts)  # fmt: skip
    directory = settings.checkpoints_dir / job.id / "e001"
    marker = tmp_path / "pwned"
    if crafted == "state.pt":  # a torch.save file, as resume state is, with a payload inside
        torch.save({"epoch": 1, "optimizer": Payload(marker)}, directory / crafted)
        _rehash(directory / "manifest.json", "state_sha256", directory / crafted)
    else:  # weights that are a pickle instead of safetensors
        (directory / crafted).write_bytes(pickle.dumps(Payload(marker)))
        _rehash(directory / "manifest.json", "weights_sha256", directory / crafted)

    outcome = run_job(job.id, worker="inproc@test", settings=settings, enqueue=lambda _: None)

    assert not marker.exists(), "the planted pickle was executed"
    record = store.get(job.id)
    assert outcome == "failed" and record.status is JobStatus.failed
    assert record.error and f"cannot resume from checkpoint {job.id}-e001" in record.error, (
        record.error
    )


def test_a_pickle_posing_as_weights_is_refused_when_served(
    settings: Settings, tmp_path: Path
) -> None:
    ckpts = CheckpointStore.from_settings(settings)
    save(ckpts, lenet(trained=False), job_id=JOB_A, epoch=1)
    directory = settings.checkpoints_dir / JOB_A / "e001"
    marker = tmp_path / "pwned"
    (directory / "weights.safetensors").write_bytes(pickle.dumps(Payload(marker)))
    _rehash(directory / "manifest.json", "weights_sha256", directory / "weights.safetensors")

    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        files = {"files": ("a.png", png(fashion_test_set()[0][0]))}
        # write access to the volume is not enough: the index in Redis recorded the manifest's
        # sha256 when the checkpoint was saved
        r = client.post(f"/v1/checkpoints/{JOB_A}:latest/predict", files=files)
        assert r.status_code == 409, r.text
        assert "its manifest does not match the sha256 recorded" in r.json()["detail"]
        # with write access to Redis as well, the pickle reaches the loader, which refuses it
        # unread
        manifest = (directory / "manifest.json").read_bytes()
        ckpts.index.r.hset(
            record_key(f"{JOB_A}-e001"), "manifest_sha256", hashlib.sha256(manifest).hexdigest()
        )
        r = client.post(f"/v1/checkpoints/{JOB_A}:latest/predict", files=files)
        assert r.status_code == 409, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        assert "safetensors" in r.json()["detail"], r.json()
    assert not marker.exists(), "the planted pickle was executed"


def test_api_keys_never_reach_the_log(
    settings: Settings, start_api: Callable[..., ApiProcess]
) -> None:
    good, wrong = "good-key-5b1e0c9d2a", "wrong-key-8d7f6e5c4b"
    save(CheckpointStore.from_settings(settings), lenet(trained=False), job_id=JOB_A, epoch=1)
    api = start_api(log_level="DEBUG", CNNSERVE_API_KEYS=f"{good},second-key-0a1b2c")
    job = {"model": "lenet", "epochs": 1, "train_limit": 256}
    with httpx.Client(base_url=api.url, timeout=20) as c:
        for key, expected in ((good, 202), (wrong, 401), (None, 401)):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            assert c.post("/v1/jobs", json=job, headers=headers).status_code == expected
            read = 200 if key == good else 401  # with keys, reads need one too
            assert c.get("/v1/jobs", headers=headers).status_code == read
            r = c.post(f"/v1/checkpoints/{JOB_A}-e001/predict", headers=headers,
                       files={"files": ("a.png", png(fashion_test_set()[0][0]))})  # fmt: skip
            assert r.status_code == read
        bad = {"Authorization": f"Bearer {wrong}"}
        assert c.delete(f"/v1/checkpoints/{JOB_A}-e001", headers=bad).status_code == 401
        ok = {"Authorization": f"Bearer {good}"}
        assert c.delete(f"/v1/checkpoints/{JOB_A}-e001", headers=ok).status_code == 204
    api.stop()  # flushes everything the process had to say
    log = api.log()
    assert "POST /v1/jobs" in log  # the requests were logged...
    for secret in (good, wrong, "second-key-0a1b2c"):
        assert secret not in log  # ...the keys were not
