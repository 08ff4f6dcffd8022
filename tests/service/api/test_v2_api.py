"""`/v2` over HTTP: names and versions, metadata, JSON and binary inference equal to `/v1`
predict, and every mistake answered as the protocol's `{"error": ...}` with a 4xx."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from tritonclient.utils import deserialize_bytes_tensor

from models import CLASSES
from service.api.app import create_app
from tests.service.checkpoint_helpers import (
    JOB_A,
    JOB_B,
    fashion_test_set,
    lenet,
    png,
    save,
)
from workers.settings import Settings
from workers.store.checkpoints import CheckpointStore, Manifest


@pytest.fixture
def ckpts(settings: Settings) -> dict[str, Manifest]:
    store = CheckpointStore.from_settings(settings)
    model = lenet()
    return {
        "a1": save(store, model, job_id=JOB_A, epoch=1, val_acc=0.60),
        "a2": save(store, model, job_id=JOB_A, epoch=2, val_acc=0.75),  # best and latest of A
        "b1": save(store, lenet(trained=False), job_id=JOB_B, epoch=1, val_acc=0.20),
    }


@pytest.fixture
def client(settings: Settings, ckpts: dict[str, Manifest]) -> Iterator[TestClient]:
    with TestClient(create_app(settings.model_copy(update={"max_images_per_request": 8}))) as c:
        yield c


def pixel_request(images: np.ndarray, **extra: Any) -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": "image",
                "shape": list(images.shape),
                "datatype": "UINT8",
                "data": images.ravel().tolist(),
            }
        ],
        **extra,
    }


def v1_probs(client: TestClient, ref: str, images: np.ndarray) -> np.ndarray:
    files = [("files", (f"{i}.png", png(im), "image/png")) for i, im in enumerate(images)]
    body = client.post(f"/v1/checkpoints/{ref}/predict?top_k=10", files=files).json()
    out = np.zeros((len(images), 10))
    for i, p in enumerate(body["predictions"]):
        for s in p["top_k"]:
            out[i, s["class_id"]] = s["probability"]
    return out


def outputs(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {o["name"]: o for o in body["outputs"]}


def test_server_metadata_and_health(client: TestClient) -> None:
    meta = client.get("/v2").json()
    assert meta["name"] == "cnnserve"
    assert set(meta["extensions"]) >= {"binary_tensor_data", "classification"}
    for path in ("/v2/health/live", "/v2/health/ready"):
        r = client.get(path)
        assert r.status_code == 200 and r.content == b""


def test_names_are_registry_models_or_jobs_and_versions_are_checkpoints(
    client: TestClient, ckpts: dict[str, Manifest]
) -> None:
    best, a1 = ckpts["a2"].id, ckpts["a1"].id
    meta = client.get("/v2/models/lenet").json()
    assert meta["parameters"]["checkpoint"] == best  # lenet:best
    assert meta["versions"][:2] == ["best", "latest"]
    assert set(meta["versions"][2:]) == {a1, best, ckpts["b1"].id}
    assert meta["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, 28, 28]}]
    assert {o["name"]: o["shape"] for o in meta["outputs"]} == {
        "probabilities": [-1, 10],
        "label": [-1],
    }
    assert client.get(f"/v2/models/lenet/versions/{a1}").json()["parameters"]["checkpoint"] == a1
    assert client.get("/v2/models/lenet/versions/latest").json()["parameters"]["checkpoint"] == (
        ckpts["b1"].id
    )
    job = client.get(f"/v2/models/{JOB_A}").json()
    assert job["parameters"]["checkpoint"] == best and set(job["versions"][2:]) == {a1, best}
    assert client.get(f"/v2/models/{JOB_B}/versions/latest/ready").status_code == 200


@pytest.mark.parametrize(
    ("path", "status", "message"),
    [
        ("/v2/models/mobilenet", 404, "unknown model 'mobilenet'"),
        ("/v2/models/resnet18", 404, "model 'resnet18' has no checkpoint"),
        ("/v2/models/lenet/versions/7", 404, "unknown version '7'"),
        ("/v2/models/lenet/versions/0000000000000000-e001", 404, "has no checkpoint for version"),
        (f"/v2/models/{JOB_B}/versions/{JOB_A}-e001", 404, "not a version of"),
        ("/v2/models/vgg/ready", 404, "model 'vgg' has no checkpoint"),
        ("/v2/nowhere", 404, "no route matches GET /v2/nowhere"),
    ],
)
def test_unknown_names_are_404_errors_in_the_protocols_form(
    client: TestClient, path: str, status: int, message: str
) -> None:
    r = client.get(path)
    assert r.status_code == status
    assert r.headers["content-type"] == "application/json"
    assert set(r.json()) == {"error"} and message in r.json()["error"], r.json()


def test_json_inference_equals_v1_predict(client: TestClient, ckpts: dict[str, Manifest]) -> None:
    images, labels = fashion_test_set()
    batch = images[:6]
    r = client.post(
        "/v2/models/lenet/infer",
        content=json.dumps(pixel_request(batch, id="r1")),
        headers={"content-type": ""},  # tritonclient sends none
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model_name"], body["model_version"], body["id"]) == (
        "lenet",
        ckpts["a2"].id,
        "r1",
    )
    out = outputs(body)
    probs = np.asarray(out["probabilities"]["data"]).reshape(out["probabilities"]["shape"])
    assert probs.shape == (6, 10) and out["probabilities"]["datatype"] == "FP32"
    np.testing.assert_allclose(probs, v1_probs(client, "lenet:best", batch), atol=1e-6)
    assert out["label"]["data"] == [CLASSES[c] for c in probs.argmax(axis=1)]
    assert np.mean(probs.argmax(axis=1) == labels[:6]) >= 0.5  # a trained model


def test_fp32_nchw_pixels_and_png_bytes_give_the_same_answer(client: TestClient) -> None:
    images, _ = fashion_test_set()
    batch = images[10:13]
    fp32 = {
        "inputs": [
            {
                "name": "x",
                "shape": [3, 1, 28, 28],
                "datatype": "FP32",
                "data": batch.astype(float).tolist(),
            }
        ]
    }
    pngs = {
        "inputs": [
            {
                "name": "x",
                "shape": [3],
                "datatype": "BYTES",
                "data": [base64.b64encode(png(im)).decode() for im in batch],
            }
        ],
        "outputs": [{"name": "probabilities"}],
    }
    a = outputs(client.post("/v2/models/lenet/infer", json=fp32).json())["probabilities"]["data"]
    b = outputs(client.post("/v2/models/lenet/infer", json=pngs).json())["probabilities"]["data"]
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_classification_and_binary_outputs(client: TestClient) -> None:
    images, _ = fashion_test_set()
    request = pixel_request(
        images[:2],
        outputs=[
            {"name": "probabilities", "parameters": {"classification": 3, "binary_data": True}},
            {"name": "label"},
        ],
    )
    r = client.post("/v2/models/lenet/infer", json=request)
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    size = int(r.headers["inference-header-content-length"])
    header = json.loads(r.content[:size])
    top = outputs(header)["probabilities"]
    assert top["datatype"] == "BYTES" and top["shape"] == [2, 3]
    assert top["parameters"]["binary_data_size"] == len(r.content) - size
    strings = [s.decode() for s in deserialize_bytes_tensor(r.content[size:])]
    score, index, label = strings[0].split(":")
    assert label == CLASSES[int(index)] and 0 < float(score) <= 1
    assert outputs(header)["label"]["data"][0] == label


@pytest.mark.parametrize(
    ("request_body", "message"),
    [
        (pixel_request(np.zeros((1, 32, 32), np.uint8)), "has shape [1, 32, 32]; send [N, 28, 28]"),
        (
            pixel_request(np.zeros((9, 28, 28), np.uint8)),
            "holds 9 images; this server takes 1 to 8",
        ),
        (
            {
                "inputs": [
                    {"name": "x", "shape": [1, 28, 28], "datatype": "INT32", "data": [0] * 784}
                ]
            },
            "is INT32; send UINT8 or FP32 pixels, or BYTES images",
        ),
        (
            {
                "inputs": [
                    {"name": "x", "shape": [1, 28, 28], "datatype": "FP32", "data": [300] * 784}
                ]
            },
            "FP32 pixels must be 0 to 255",
        ),
        (
            {**pixel_request(np.zeros((1, 28, 28), np.uint8)), "outputs": [{"name": "logits"}]},
            "unknown output 'logits'",
        ),
        (
            {
                "inputs": [
                    *pixel_request(np.zeros((1, 28, 28), np.uint8))["inputs"],
                    *pixel_request(np.zeros((1, 28, 28), np.uint8))["inputs"],
                ]
            },
            "takes one input",
        ),
        (
            {"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["aGVsbG8="]}]},
            "not an image this server reads",
        ),
        (
            {**pixel_request(np.zeros((1, 28, 28), np.uint8)), "parameters": {"invert": "maybe"}},
            "parameter 'invert' must be one of auto, true, false",
        ),
    ],
)
def test_bad_inference_requests_are_4xx_errors_that_say_what_to_send(
    client: TestClient, request_body: dict[str, Any], message: str
) -> None:
    r = client.post("/v2/models/lenet/infer", json=request_body)
    assert 400 <= r.status_code < 500, r.text
    assert set(r.json()) == {"error"} and message in r.json()["error"], r.json()


def test_an_oversized_body_is_a_413_error(settings: Settings, ckpts: dict[str, Manifest]) -> None:
    with TestClient(create_app(settings.model_copy(update={"max_body_bytes": 4096}))) as c:
        r = c.post("/v2/models/lenet/infer", content=b"{" + b" " * 5000 + b"}")
    assert r.status_code == 413 and "larger than this server's limit" in r.json()["error"]
