"""tritonclient, unmodified, against a real `cnnserve` API process: health, metadata, binary
and JSON inference, the classification extension, batches, and its error path."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from models import CLASSES
from tests.service.checkpoint_helpers import JOB_A, fashion_test_set, lenet, png, save
from tests.service.conftest import Server
from workers.settings import Settings
from workers.store.checkpoints import CheckpointStore

pytestmark = pytest.mark.integration


@dataclass
class Served:
    triton: httpclient.InferenceServerClient
    url: str


@pytest.fixture
def served(settings: Settings, uvicorn_server: Callable[..., Server]) -> Iterator[Served]:
    store = CheckpointStore.from_settings(settings)
    save(store, lenet(), job_id=JOB_A, epoch=1, val_acc=0.7)
    server = uvicorn_server()
    client = httpclient.InferenceServerClient(url=server.url.removeprefix("http://"))
    yield Served(client, server.url)
    client.close()


@pytest.fixture
def triton(served: Served) -> httpclient.InferenceServerClient:
    return served.triton


def test_health_and_metadata(triton: httpclient.InferenceServerClient) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("lenet") and triton.is_model_ready(JOB_A, "best")
    assert not triton.is_model_ready("resnet18")  # nothing trained yet
    meta = triton.get_model_metadata("lenet")
    assert meta["name"] == "lenet" and meta["versions"][:2] == ["best", "latest"]
    assert meta["inputs"][0] == {"name": "image", "datatype": "UINT8", "shape": [-1, 28, 28]}
    assert triton.get_server_metadata()["name"] == "cnnserve"


def infer(
    triton: httpclient.InferenceServerClient,
    array: np.ndarray,
    datatype: str,
    *,
    binary: bool,
    class_count: int = 0,
) -> httpclient.InferResult:
    tensor = httpclient.InferInput("image", list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    outputs = [
        httpclient.InferRequestedOutput(
            "probabilities", binary_data=binary, class_count=class_count
        ),
        httpclient.InferRequestedOutput("label", binary_data=binary),
    ]
    return triton.infer("lenet", [tensor], outputs=outputs)


def test_binary_and_json_inference_agree_with_v1_predict(served: Served) -> None:
    triton = served.triton
    images, labels = fashion_test_set()
    batch = images[:16]
    binary = infer(triton, batch, "UINT8", binary=True)
    as_json = infer(triton, batch.astype(np.float32)[:, None], "FP32", binary=False)

    probs = binary.as_numpy("probabilities")
    assert probs.shape == (16, 10) and probs.dtype == np.float32
    np.testing.assert_allclose(as_json.as_numpy("probabilities"), probs, atol=1e-6)
    assert [s.decode() for s in binary.as_numpy("label")] == [CLASSES[c] for c in probs.argmax(1)]
    assert np.mean(probs.argmax(1) == labels[:16]) > 0.3  # far above chance (0.1)

    files = [("files", (f"{i}.png", png(im), "image/png")) for i, im in enumerate(batch)]
    v1 = httpx.post(f"{served.url}/v1/checkpoints/lenet:best/predict?top_k=10", files=files)
    for row, prediction in zip(probs, v1.json()["predictions"], strict=True):
        for score in prediction["top_k"]:
            assert row[score["class_id"]] == pytest.approx(score["probability"], abs=1e-6)


def test_the_classification_extension_and_encoded_images(
    triton: httpclient.InferenceServerClient,
) -> None:
    images, _ = fashion_test_set()
    top = infer(triton, images[:4], "UINT8", binary=True, class_count=3).as_numpy("probabilities")
    assert top.shape == (4, 3)
    score, index, label = top[0][0].decode().split(":")
    assert label == CLASSES[int(index)] and 0 < float(score) <= 1

    pngs = np.array([png(im) for im in images[:4]], dtype=object)
    tensor = httpclient.InferInput("image", [4], "BYTES")
    tensor.set_data_from_numpy(pngs, binary_data=True)
    result = triton.infer("lenet", [tensor])  # no outputs named: all, in binary
    pixels = infer(triton, images[:4], "UINT8", binary=True).as_numpy("probabilities")
    np.testing.assert_allclose(result.as_numpy("probabilities"), pixels, atol=1e-6)


def test_errors_reach_tritonclient_with_the_servers_message(
    triton: httpclient.InferenceServerClient,
) -> None:
    with pytest.raises(
        InferenceServerException, match=r"shape \[1, 32, 32\]; send \[N, 28, 28\]"
    ) as err:
        infer(triton, np.zeros((1, 32, 32), np.uint8), "UINT8", binary=True)
    assert err.value.status() == "400"
    with pytest.raises(InferenceServerException, match="unknown model 'mobilenet'"):
        triton.get_model_metadata("mobilenet")
    with pytest.raises(InferenceServerException, match="no checkpoint"):
        triton.infer("resnet18", [httpclient.InferInput("image", [1, 28, 28], "UINT8")])
