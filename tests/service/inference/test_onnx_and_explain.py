"""A checkpoint taken elsewhere as ONNX, and its predictions explained (Integrated Gradients)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from service.api.app import create_app
from tests.http_checks import assert_problem
from tests.service.checkpoint_helpers import fashion_test_set, lenet, png, save
from workers.settings import Settings
from workers.store.checkpoints import CheckpointStore, Manifest


@pytest.fixture
def ckpt(settings: Settings) -> Manifest:
    return save(CheckpointStore.from_settings(settings), lenet())


@pytest.fixture
def client(settings: Settings, ckpt: Manifest) -> Iterator[TestClient]:
    with TestClient(create_app(settings.model_copy(update={"explain_max_images": 4}))) as c:
        yield c


def upload(images: np.ndarray) -> list[Any]:
    return [("files", (f"{i}.png", png(im), "image/png")) for i, im in enumerate(images)]


def test_the_onnx_download_runs_in_plain_onnxruntime_as_predict_does(
    client: TestClient, ckpt: Manifest
) -> None:
    r = client.get(f"/v1/checkpoints/{ckpt.id}/model.onnx")
    assert r.status_code == 200, r.text
    assert r.headers["x-onnx-opset"] == str(ckpt.onnx.opset) == "17"
    assert f"{ckpt.id}.onnx" in r.headers["content-disposition"]
    graph = onnx.load_model_from_string(r.content)
    assert graph.opset_import[0].version == 17
    props = {p.key: p.value for p in graph.metadata_props}
    assert json.loads(props["cnnserve.classes"])[9] == "ankle boot"
    assert json.loads(props["cnnserve.preprocessing"])["resize"] == 28

    session = ort.InferenceSession(r.content, providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, out.name) == ("image", "probabilities")
    assert inp.shape[0] == out.shape[0] == "batch"  # a dynamic batch axis
    images, _ = fashion_test_set()
    batch = images[:5]
    probs = session.run(None, {"image": batch.astype(np.float32)[:, None] / 255})[0]
    served = client.post(f"/v1/checkpoints/{ckpt.id}/predict?top_k=10", files=upload(batch))
    for row, prediction in zip(probs, served.json()["predictions"], strict=True):
        for score in prediction["top_k"]:
            assert row[score["class_id"]] == pytest.approx(score["probability"], abs=1e-5)
    manifest = client.get(f"/v1/checkpoints/{ckpt.id}").json()
    assert manifest["onnx"] == {
        "opset": 17,
        "input": "image",
        "output": "probabilities",
        "dynamic_batch": True,
    }


def test_an_explanation_names_the_predicted_class_and_attributes_its_score(
    client: TestClient, ckpt: Manifest
) -> None:
    images, _ = fashion_test_set()
    batch = images[:3]
    r = client.post(f"/v1/checkpoints/{ckpt.id}/explain", files=upload(batch))
    assert r.status_code == 200, r.text
    body = r.json()
    predicted = client.post(f"/v1/checkpoints/{ckpt.id}/predict", files=upload(batch)).json()
    assert body["method"] == "integrated_gradients" and len(body["explanations"]) == 3
    model, _ = CheckpointStore.from_settings(client.app.state.settings).load_model(ckpt.id)
    for i, (e, p) in enumerate(zip(body["explanations"], predicted["predictions"], strict=True)):
        assert (e["label"], e["class_id"]) == (p["label"], p["class_id"])
        attribution = np.asarray(e["attribution"])
        assert attribution.shape == (28, 28)
        # Integrated Gradients' completeness: the attributions add up to the class score's
        # rise from the black baseline to the image
        x = torch.from_numpy(batch[i : i + 1, None].astype(np.float32) / 255)
        with torch.no_grad():
            rise = (model(x) - model(torch.zeros_like(x)))[0, e["class_id"]].item()
        assert attribution.sum() == pytest.approx(rise, rel=0.05, abs=0.05)
        garment = batch[i] > 0
        assert np.abs(attribution[garment]).sum() > np.abs(attribution[~garment]).sum()


def test_an_explanation_as_a_png_heatmap(client: TestClient, ckpt: Manifest) -> None:
    images, _ = fashion_test_set()
    r = client.post(
        f"/v1/checkpoints/{ckpt.id}/explain",
        files=upload(images[:2]),
        headers={"Accept": "image/png"},
    )
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    sheet = Image.open(io.BytesIO(r.content))
    assert sheet.size == (2 * 224 + 4, 224 + 22)
    pixels = np.asarray(sheet.convert("RGB")).astype(int)
    red = (pixels[..., 0] > pixels[..., 2] + 60).sum()
    assert red > 100  # some of each garment pushes for its class


def test_explanations_are_bounded(client: TestClient, ckpt: Manifest, settings: Settings) -> None:
    images, _ = fashion_test_set()
    r = client.post(f"/v1/checkpoints/{ckpt.id}/explain", files=upload(images[:5]))
    assert_problem(r, 413, "explains at most 4")
    with TestClient(create_app(settings.model_copy(update={"explain_timeout_s": 1e-6}))) as c:
        slow = c.post(f"/v1/checkpoints/{ckpt.id}/explain", files=upload(images[:2]))
    assert_problem(slow, 503, "took longer than this server allows")
    assert (
        client.post("/v1/checkpoints/lenet:best/explain", json={"pixels": [[0]]}).status_code == 200
    )
