"""Several hosts, no shared disk: API processes and workers that share only Redis and a bucket
of a real S3-compatible server (moto's, `tests/s3.py`), each with a private data directory.

- a job trained on one worker resumes on the other after `kill -9`;
- a fresh API process with an empty data directory lists, resolves, predicts, answers V2 and
  exports ONNX; a delete removes the objects;
- two API processes and two workers racing saves and deletes never leave an alias naming a
  missing checkpoint;
- the store unreachable: 503 where it is needed, `/readyz` says so, and nothing is lost when
  it comes back.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import safetensors.torch
from celery import Celery

from models import build_model
from tests.reliability.procs import ApiProcess
from tests.s3 import BUCKET, S3Server
from tests.service.checkpoint_helpers import fashion_test_set, png, reference_probs
from tests.workers.helpers import WorkerProcess, lenet_spec, wait_finished, wait_for
from workers.celery_app import enqueue_job
from workers.contracts import JobStatus
from workers.store.jobs import JobStore

pytestmark = [pytest.mark.integration, pytest.mark.slow]

StartWorker = Callable[..., WorkerProcess]
StartApi = Callable[..., ApiProcess]


def host(tmp_path: Path, name: str) -> dict[str, str]:
    """The environment of one host: its own, empty data directory."""
    data = tmp_path / name
    data.mkdir()
    return {"CNNSERVE_DATA_DIR": str(data)}


def prefix_of(s3_url: str) -> str:
    return s3_url.removeprefix(f"s3://{BUCKET}/") + "/"


def submit(store: JobStore, celery_app: Celery, **fields: Any) -> str:
    job = store.create(lenet_spec(**fields))
    enqueue_job(celery_app, job.id)
    return job.id


def test_a_job_resumes_on_another_host_and_a_fresh_api_serves_everything(
    s3_url: str,
    s3_server: S3Server,
    store: JobStore,
    celery_app: Celery,
    start_worker: StartWorker,
    start_api: StartApi,
    tmp_path: Path,
) -> None:
    workers = {w.name: w for w in (start_worker(env=host(tmp_path, h)) for h in ("a", "b"))}
    job = submit(store, celery_app, epochs=4, train_limit=6000, batch_size=64, seed=3)
    started = wait_for(store, job, lambda r: r.latest_checkpoint is not None, 120, "a checkpoint")
    first = workers.pop(str(started.worker))
    (second,) = workers.values()
    first.kill()  # kill -9 on the host training it: the other resumes from what it published

    record = wait_finished(store, job, 300, second)

    assert record.status is JobStatus.succeeded, record.error
    assert record.worker == second.name and record.attempts == 2
    assert [m.epoch for m in record.metrics] == [1, 2, 3, 4]
    resumed = [e for _, kind, e in store.events(job, count=1000) if kind == "status"]
    assert resumed[-2]["worker"] == second.name and resumed[-2]["resumed_from"]
    for name in ("a", "b"):  # no host kept a checkpoint store of its own
        assert not (tmp_path / name / "checkpoints").exists()

    api = start_api(**host(tmp_path, "host-c"))  # a fresh API host: an empty data dir
    http = httpx.Client(base_url=api.url, timeout=60)
    listed = http.get("/v1/checkpoints", params={"job_id": job}).json()["checkpoints"]
    assert {c["id"] for c in listed} == set(record.checkpoints)
    for ref in (f"{job}:best", f"{job}:latest", "lenet:best", "lenet:latest"):
        manifest = http.get(f"/v1/checkpoints/{ref}")
        assert manifest.status_code == 200, (ref, manifest.text)
    best = http.get(f"/v1/checkpoints/{job}:best").json()["id"]
    assert best == record.best_checkpoint
    images, _ = fashion_test_set()
    files = [("files", (f"{i}.png", png(images[i]))) for i in range(8)]
    predicted = http.post(f"/v1/checkpoints/{job}:best/predict", files=files)
    assert predicted.status_code == 200, predicted.text
    assert predicted.json()["checkpoint"] == best
    # the weights the job published, as a client downloads them: the same answers
    net = build_model("lenet")
    net.load_state_dict(safetensors.torch.load(http.get(f"/v1/checkpoints/{best}/weights").content))
    want = reference_probs(net.eval(), images[:8]).argmax(1).tolist()
    assert [p["class_id"] for p in predicted.json()["predictions"]] == want
    v2 = http.post(
        "/v2/models/lenet/infer",
        json={
            "inputs": [
                {
                    "name": "image",
                    "shape": [2, 28, 28],
                    "datatype": "UINT8",
                    "data": images[:2].ravel().tolist(),
                }
            ]
        },
    )
    assert v2.status_code == 200, v2.text
    graph = http.get(f"/v1/checkpoints/{best}/model.onnx")
    assert graph.status_code == 200, graph.text
    session = ort.InferenceSession(graph.content, providers=["CPUExecutionProvider"])
    probs = session.run(None, {"image": images[:2, None].astype(np.float32) / 255})[0]
    assert probs.shape == (2, 10)
    folder = f"{prefix_of(s3_url)}{best.replace('-', '/')}/"
    assert any(k.endswith(".onnx") for k in s3_server.keys(folder))  # published for every host

    assert http.delete(f"/v1/checkpoints/{best}").status_code == 204
    assert s3_server.keys(folder) == []  # its objects are gone, the exported graph with them
    assert http.get(f"/v1/checkpoints/{best}").status_code == 404
    assert http.get(f"/v1/checkpoints/{job}:best").json()["id"] != best


def test_racing_saves_and_deletes_across_hosts_never_leave_a_dangling_alias(
    s3_url: str,
    s3_server: S3Server,
    store: JobStore,
    celery_app: Celery,
    start_worker: StartWorker,
    start_api: StartApi,
    tmp_path: Path,
) -> None:
    keep = {"CNNSERVE_KEEP_CHECKPOINTS": "1"}  # every save prunes: aliases move all the time
    for name in ("worker-a", "worker-b"):
        start_worker(env={**host(tmp_path, name), **keep})
    apis = [start_api(**host(tmp_path, name)) for name in ("api-a", "api-b")]
    jobs = [
        submit(store, celery_app, epochs=12, train_limit=512, batch_size=128, seed=i)
        for i in range(2)
    ]
    done = threading.Event()
    failures: list[str] = []

    def delete_aliases(api: ApiProcess, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=api.url, timeout=60) as http:
            while not done.is_set():
                ref = f"{rng.choice(jobs)}:{rng.choice(['best', 'latest'])}"
                r = http.delete(f"/v1/checkpoints/{ref}")
                if r.status_code not in (204, 404):
                    failures.append(f"DELETE {ref}: {r.status_code} {r.text[:300]}")
                time.sleep(rng.uniform(0.05, 0.4))

    deleters = [threading.Thread(target=delete_aliases, args=(a, i)) for i, a in enumerate(apis)]
    for t in deleters:
        t.start()
    try:
        for job in jobs:
            wait_finished(store, job, 400)
    finally:
        done.set()
        for t in deleters:
            t.join(timeout=60)
    assert not failures, failures

    http = httpx.Client(base_url=apis[0].url, timeout=60)
    for job in jobs:
        listed = {
            c["id"]
            for c in http.get("/v1/checkpoints", params={"job_id": job}).json()["checkpoints"]
        }
        for alias in ("best", "latest"):
            r = http.get(f"/v1/checkpoints/{job}:{alias}")
            if r.status_code == 404:
                assert not listed  # an alias is missing only when nothing is left
                continue
            assert r.status_code == 200, r.text
            ckpt = r.json()["id"]
            assert ckpt in listed
            weights = http.get(f"/v1/checkpoints/{ckpt}/weights")
            assert weights.status_code == 200, weights.text  # its objects are there, intact
        for ckpt in listed:
            folder = f"{prefix_of(s3_url)}{ckpt.replace('-', '/')}/"
            assert any(k.endswith("manifest.json") for k in s3_server.keys(folder)), ckpt


def test_an_unreachable_store_gives_503_and_readyz_says_so_and_nothing_is_lost(
    s3_url: str,
    s3_server: S3Server,
    store: JobStore,
    celery_app: Celery,
    start_worker: StartWorker,
    start_api: StartApi,
    tmp_path: Path,
) -> None:
    worker = start_worker(env=host(tmp_path, "worker"))
    before = submit(store, celery_app, epochs=1, train_limit=512)
    trained = wait_finished(store, before, 120, worker)
    assert trained.status is JobStatus.succeeded, trained.error
    api = start_api(**host(tmp_path, "api"))
    http = httpx.Client(base_url=api.url, timeout=60)
    assert http.get("/readyz").status_code == 200

    s3_server.relay.cut()
    try:
        during = submit(store, celery_app, epochs=3, train_limit=512)  # trains meanwhile
        ready = http.get("/readyz")
        assert ready.status_code == 503
        assert "checkpoint store" in ready.json()["detail"], ready.json()
        weights = http.get(f"/v1/checkpoints/{trained.latest_checkpoint}/weights")
        assert weights.status_code == 503, weights.text
        assert weights.headers["retry-after"] and "not reachable" in weights.json()["detail"]
        image = png(fashion_test_set()[0][0])
        predicted = http.post(
            f"/v1/checkpoints/{before}:latest/predict", files={"files": ("a.png", image)}
        )
        assert predicted.status_code == 503, predicted.text
        listed = http.get("/v1/checkpoints")  # the index is in Redis: listing still answers
        assert listed.status_code == 200
        wait_for(store, during, lambda r: r.progress.epoch >= 2, 120, "training on", worker)
        assert store.get(during).status is JobStatus.running  # waiting to publish, not failed
    finally:
        s3_server.relay.restore()

    record = wait_finished(store, during, 180, worker)
    assert record.status is JobStatus.succeeded, record.error
    assert [m.epoch for m in record.metrics] == [1, 2, 3]  # every epoch published, in order
    assert record.latest_checkpoint == f"{during}-e003"
    assert http.get("/readyz").status_code == 200
    for job in (before, during):
        r = http.post(f"/v1/checkpoints/{job}:latest/predict", files={"files": ("a.png", image)})
        assert r.status_code == 200, r.text
    ids = {c["id"] for c in http.get("/v1/checkpoints").json()["checkpoints"]}
    assert ids >= {trained.latest_checkpoint, *record.checkpoints}
    weights = http.get(f"/v1/checkpoints/{during}:latest/weights")
    assert hashlib.sha256(weights.content).hexdigest() == weights.headers["x-weights-sha256"]
