"""Every network of the zoo, end to end: a real worker trains it, and it is served alike by
`/v1` predict, `/v2` infer and its ONNX export, explained, evaluated, fine-tuned and swept.

One worker process serves the whole module; each network trains one short epoch (96 images,
validation on 64) at its smallest input size, with a small arch where it takes one, so the
module costs seconds per network on a CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import redis
from fastapi.testclient import TestClient

from models import CLASSES, list_models
from service.api.app import create_app
from tests.conftest import FASHION_MNIST_DIR, REDIS_HOST, REDIS_PORT, REDIS_TEST_DB
from tests.service.checkpoint_helpers import fashion_test_set, png, reference_probs
from workers.celery_app import worker_heartbeats
from workers.settings import Settings, get_settings
from workers.store.checkpoints import CheckpointStore

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
#: One short epoch: a few steps of the model's own recipe (plain SGD at the book's lr).
SHORT = {"epochs": 1, "train_limit": 96, "val_limit": 64, "batch_size": 32, "device": "cpu"}
#: Each network at its smallest input size, with a small arch where it takes one.
NETWORKS: dict[str, dict[str, Any]] = {
    "lenet": {"input_size": 28},
    "vgg": {"input_size": 28, "arch": [[1, 8], [1, 16]]},
    "resnet18": {"input_size": 28, "arch": [[1, 32], [1, 64]]},
    "alexnet": {"input_size": 65},
    "nin": {"input_size": 67},
    "googlenet": {"input_size": 28},
    "bn_lenet": {"input_size": 28},
    "densenet": {"input_size": 28, "arch": {"growth_rate": 8, "arch": [2, 2]}},
    "regnetx32": {
        "input_size": 28,
        "arch": {"stem_channels": 16, "arch": [[1, 16, 8, 1], [1, 32, 16, 1]]},
    },
}
IMAGES = 4
WORKER = [sys.executable, "-m", "service.cli", "--log-level", "INFO", "worker", "--device", "cpu"]


@dataclass
class Stack:
    """A worker process and an in-process API over one Redis database and data directory."""

    client: TestClient
    settings: Settings
    worker: subprocess.Popen[bytes]
    log: Path

    def wait(self, job_id: str, timeout: float = 300.0) -> dict[str, Any]:
        """The job's record once it has finished."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job: dict[str, Any] = self.client.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            if self.worker.poll() is not None:
                pytest.fail(f"the worker exited:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)
        pytest.fail(f"job {job_id} did not finish in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def train(self, spec: dict[str, Any]) -> dict[str, Any]:
        r = self.client.post("/v1/jobs", json=spec)
        assert r.status_code == 202, r.text
        job = self.wait(r.json()["id"])
        assert job["status"] == "succeeded", (job, self.log.read_text()[-3000:])
        return job


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_TEST_DB}"
    db = redis.Redis.from_url(url)
    db.flushdb()
    data_dir = tmp_path_factory.mktemp("book-networks")
    env = {
        "CNNSERVE_REDIS_URL": url,
        "CNNSERVE_DATA_DIR": str(data_dir),
        "CNNSERVE_FASHION_MNIST_DIR": str(FASHION_MNIST_DIR),
    }
    log = data_dir / "worker.log"
    name = f"book-networks-{os.getpid()}@localhost"
    with pytest.MonkeyPatch.context() as mp, log.open("wb") as out:
        for key, value in env.items():
            mp.setenv(key, value)
        get_settings.cache_clear()
        worker = subprocess.Popen(
            [*WORKER, "--name", name],
            env={**os.environ, **env, "CNNSERVE_TORCH_THREADS": "1", "PYTHONUNBUFFERED": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        try:
            settings = get_settings()
            deadline = time.monotonic() + 60
            while not any(w["name"] == name for w in worker_heartbeats(url)):
                if worker.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the worker did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.2)
            with TestClient(create_app(settings)) as client:
                yield Stack(client, settings, worker, log)
        finally:
            worker.terminate()
            try:
                worker.wait(timeout=15)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(timeout=5)
            get_settings.cache_clear()
            db.flushdb()
            db.close()


def _v1(client: TestClient, ref: str, images: np.ndarray) -> np.ndarray:
    files = [("files", (f"{i}.png", png(im), "image/png")) for i, im in enumerate(images)]
    r = client.post(f"/v1/checkpoints/{ref}/predict?top_k=10", files=files)
    assert r.status_code == 200, r.text
    probs = np.zeros((len(images), len(CLASSES)))
    for i, prediction in enumerate(r.json()["predictions"]):
        for score in prediction["top_k"]:
            probs[i, score["class_id"]] = score["probability"]
    return probs


def _v2(client: TestClient, model: str, images: np.ndarray) -> np.ndarray:
    request = {
        "inputs": [
            {
                "name": "image",
                "shape": list(images.shape),
                "datatype": "UINT8",
                "data": images.ravel().tolist(),
            }
        ]
    }
    r = client.post(f"/v2/models/{model}/infer", json=request)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}["probabilities"]
    return np.asarray(out["data"]).reshape(out["shape"])


def _onnx(client: TestClient, ref: str, images: np.ndarray) -> np.ndarray:
    r = client.get(f"/v1/checkpoints/{ref}/model.onnx")
    assert r.status_code == 200, r.text
    session = ort.InferenceSession(r.content, providers=["CPUExecutionProvider"])
    x = images.astype(np.float32)[:, None] / 255
    out: np.ndarray = session.run(None, {"image": x})[0]
    return out


def test_the_zoo_here_is_the_registry() -> None:
    assert list(NETWORKS) == list_models()


@pytest.mark.parametrize("name", list(NETWORKS))
def test_each_network_trains_and_serves_the_same_probabilities_everywhere(
    stack: Stack, name: str
) -> None:
    job = stack.train({"model": name, **SHORT, **NETWORKS[name]})
    assert [m["epoch"] for m in job["metrics"]] == [1]
    ref = f"{job['id']}:best"
    manifest = stack.client.get(f"/v1/checkpoints/{ref}").json()
    size = NETWORKS[name]["input_size"]
    assert (manifest["model"], manifest["input_size"]) == (name, size)
    if isinstance(NETWORKS[name].get("arch"), dict):  # the book's parameters, all of them
        assert NETWORKS[name]["arch"].items() <= manifest["arch"].items()

    images = fashion_test_set()[0][:IMAGES]
    # the network as training left it, in eval mode: what every protocol must answer
    model, _ = CheckpointStore.from_settings(stack.settings).load_model(manifest["id"])
    assert not model.training
    expected = reference_probs(model, images, size)
    served = {
        "/v1": _v1(stack.client, ref, images),
        "/v2": _v2(stack.client, job["id"], images),
        "onnx": _onnx(stack.client, ref, images),
    }
    for protocol, probs in served.items():
        np.testing.assert_allclose(probs, expected, atol=2e-5, err_msg=protocol)
    # batch statistics play no part in serving: an image alone gets what it got in the batch
    np.testing.assert_allclose(_v1(stack.client, ref, images[1:2])[0], served["/v1"][1], atol=1e-6)

    r = stack.client.post(
        f"/v1/checkpoints/{ref}/explain",
        files=[("files", ("0.png", png(images[0]), "image/png"))],
    )
    assert r.status_code == 200, r.text
    (explanation,) = r.json()["explanations"]
    assert explanation["class_id"] == int(expected[0].argmax())
    attribution = np.asarray(explanation["attribution"])
    assert attribution.shape == (28, 28) and np.isfinite(attribution).all()
    assert np.abs(attribution).sum() > 0

    evaluation = stack.client.get(f"/v1/checkpoints/{ref}/evaluation").json()
    assert evaluation["images"] == SHORT["val_limit"]
    assert stack.client.get(f"/v1/checkpoints/{ref}/confusion.png").content.startswith(b"\x89PNG")


@pytest.mark.parametrize("name", ["densenet", "regnetx32"])
def test_a_book_network_is_fine_tuned_from_its_checkpoint(stack: Stack, name: str) -> None:
    spec = {"model": name, **SHORT, **NETWORKS[name]}
    parent = stack.train(spec)
    child = stack.train(
        {**spec, "init_from": f"{parent['id']}:best", "continue_epochs": True, "lr": 0.01}
    )
    assert [m["epoch"] for m in child["metrics"]] == [2]
    manifest = stack.client.get(f"/v1/checkpoints/{child['id']}:best").json()
    assert manifest["parent"] == parent["checkpoints"][-1]

    # the worker's evaluation of the same images agrees with training's validation pass
    r = stack.client.post(
        f"/v1/checkpoints/{manifest['id']}/evaluate", json={"limit": SHORT["val_limit"]}
    )
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 120
    while (record := stack.client.get(r.headers["location"]).json())["status"] not in (
        "succeeded",
        "failed",
    ):
        assert time.monotonic() < deadline, record
        time.sleep(0.2)
    assert record["status"] == "succeeded", record
    assert record["images"] == SHORT["val_limit"]
    assert record["accuracy"] == pytest.approx(child["metrics"][0]["val_acc"])
    # another arch is another network: refused before anything is queued, saying what differs
    other = {**spec["arch"], "arch": spec["arch"]["arch"][:1]}
    r = stack.client.post("/v1/jobs", json={**spec, "arch": other, "init_from": manifest["id"]})
    assert r.status_code == 422, r.text
    assert "differs in arch" in r.json()["detail"]


def test_a_sweep_ranks_book_networks_and_refuses_one_that_does_not_fit(stack: Stack) -> None:
    base = {**SHORT, "input_size": 32}
    models = ["bn_lenet", "googlenet", "densenet", "regnetx32"]
    refused = stack.client.post(
        "/v1/sweeps", json={"base": base, "grid": {"model": [*models, "alexnet"]}}
    )
    assert refused.status_code == 422
    assert "alexnet" in refused.json()["detail"]
    assert "it needs an input_size of 65 or more" in refused.json()["detail"]

    r = stack.client.post("/v1/sweeps", json={"base": base, "grid": {"model": models}})
    assert r.status_code == 202, r.text
    sweep_id = r.json()["id"]
    for job_id in [j["id"] for j in r.json()["jobs"]]:
        assert stack.wait(job_id)["status"] == "succeeded"
    board = stack.client.get(f"/v1/sweeps/{sweep_id}").json()
    assert board["status"] == "succeeded"
    assert sorted(j["spec"]["model"] for j in board["jobs"]) == sorted(models)
    assert all(j["best_val_acc"] is not None for j in board["jobs"])
    picture = stack.client.get(f"/v1/jobs/compare.png?sweep={sweep_id}&metric=val_acc")
    assert picture.status_code == 200 and picture.content.startswith(b"\x89PNG")
