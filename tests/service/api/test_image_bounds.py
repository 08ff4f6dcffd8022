"""What one classify call may make the server decode: the pixels its images declare in all
(`CNNSERVE_MAX_REQUEST_PIXELS`) and explain's count, judged from headers and counts before
any image is decoded, on /v1 predict (multipart, fast path and route; JSON), explain and V2."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.inference.decode import INLINE_MULTIPART_BYTES
from tests.http_checks import assert_problem
from tests.service.checkpoint_helpers import encode, lenet, png, save, text_bomb_png
from workers.settings import Settings
from workers.store.checkpoints import CheckpointStore, Manifest

BUDGET = 10_000  # pixels: two 64×64 images fit, three do not


@pytest.fixture
def ckpt(settings: Settings) -> Manifest:
    return save(CheckpointStore.from_settings(settings), lenet(trained=False))


@pytest.fixture
def client(make_client: Callable[..., TestClient], ckpt: Manifest) -> TestClient:
    return make_client(max_request_pixels=BUDGET, explain_max_images=2)


def images(count: int, side: int = 64) -> list[bytes]:
    rng = np.random.default_rng(count)
    return [png(rng.integers(0, 255, (side, side), dtype=np.uint8)) for _ in range(count)]


def damaged(side: int = 64) -> bytes:
    """A PNG whose header declares side×side and whose pixel data is cut: decoding it fails."""
    return png(np.full((side, side), 7, np.uint8))[:-30]


def files(blobs: list[bytes]) -> list[Any]:
    return [("files", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)]


def b64(blobs: list[bytes]) -> dict[str, Any]:
    return {"images": [base64.b64encode(b).decode() for b in blobs]}


def assert_over_budget(r: Any, declared: int) -> None:
    body = assert_problem(r, 413, "CNNSERVE_MAX_REQUEST_PIXELS", str(BUDGET), str(declared))
    assert body["limit"] == BUDGET and body["setting"] == "CNNSERVE_MAX_REQUEST_PIXELS"


def test_predict_refuses_more_pixels_than_the_budget_before_decoding_any(
    client: TestClient, ckpt: Manifest
) -> None:
    url = f"/v1/checkpoints/{ckpt.id}/predict"
    assert client.post(url, files=files(images(2))).status_code == 200  # 8,192 pixels
    # a damaged first image would be a 422 if anything were decoded: the budget answers first
    over = [damaged(), *images(2)]
    assert_over_budget(client.post(url, files=files(over)), 3 * 64 * 64)  # the fast path's
    big = [*over, png(np.zeros((300, 300), np.uint8)), *images(30, side=100)]
    assert sum(len(b) for b in big) > INLINE_MULTIPART_BYTES  # streamed: the route's
    assert_over_budget(client.post(url, files=files(big)), 3 * 64 * 64 + 300**2 + 30 * 100**2)
    assert_over_budget(client.post(url, json=b64(over)), 3 * 64 * 64)
    # raw pixel arrays count as they are declared, before they are converted
    pixels = {"pixels": [np.zeros((64, 64)).tolist()] * 3}
    assert_over_budget(client.post(url, json=pixels), 3 * 64 * 64)
    assert client.post(url, json={"pixels": [np.zeros((64, 64)).tolist()] * 2}).status_code == 200


def test_one_image_over_the_image_limit_is_named_before_the_request_budget(
    make_client: Callable[..., TestClient], ckpt: Manifest
) -> None:
    client = make_client(max_request_pixels=BUDGET, max_image_pixels=5000)
    r = client.post(f"/v1/checkpoints/{ckpt.id}/predict", files=files([*images(1), damaged(80)]))
    assert assert_problem(r, 413, "6400 pixels", "5000")["image_index"] == 1


def test_explain_counts_its_images_before_decoding_any(client: TestClient, ckpt: Manifest) -> None:
    url = f"/v1/checkpoints/{ckpt.id}/explain"
    gif = encode(np.zeros((8, 8), np.uint8), "GIF")  # a 415 if it were decoded
    for body in ({"files": files([*images(2, side=28), gif])}, {"json": b64([gif] * 3)}):
        assert_problem(client.post(url, **body), 413, "explains at most 2")


def test_explain_refuses_more_pixels_than_the_budget(
    make_client: Callable[..., TestClient], ckpt: Manifest
) -> None:
    client = make_client(max_request_pixels=BUDGET)
    r = client.post(f"/v1/checkpoints/{ckpt.id}/explain", files=files([damaged(), *images(2)]))
    assert_over_budget(r, 3 * 64 * 64)


def test_v2_bytes_inputs_are_within_the_budget(client: TestClient) -> None:
    def infer(blobs: list[bytes]) -> Any:
        tensor = {"name": "x", "shape": [len(blobs)], "datatype": "BYTES"}
        tensor["data"] = [base64.b64encode(b).decode() for b in blobs]
        return client.post("/v2/models/lenet/infer", json={"inputs": [tensor]})

    assert infer(images(2)).status_code == 200
    r = infer([damaged(), *images(2)])
    assert r.status_code == 413, r.text
    error = r.json()["error"]
    assert "CNNSERVE_MAX_REQUEST_PIXELS" in error and str(BUDGET) in error


def test_a_png_with_megabytes_of_compressed_text_is_refused_and_says_why(
    client: TestClient, ckpt: Manifest
) -> None:
    r = client.post(f"/v1/checkpoints/{ckpt.id}/predict", files=files([text_bomb_png()]))
    assert_problem(r, 422, "text chunks", "metadata")
