"""The predict fast path (`service.fastpath`): the common multipart call answered without
FastAPI's routing, exactly as the route answers it; anything else, and every refusal, is the
route's own answer."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from service import fastpath
from service.app import create_app
from tests.http_checks import assert_problem
from tests.service.checkpoint_helpers import encode, fashion_test_set, lenet, png, save
from workers.checkpoints import CheckpointStore, Manifest
from workers.settings import Settings

ROUTE = "/v1/checkpoints/{ref}/predict"


@pytest.fixture
def ckpt(settings: Settings) -> Manifest:
    return save(CheckpointStore(settings.checkpoints_dir), lenet())


@pytest.fixture
def answered(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """One entry per request the fast path looked at: whether it answered it itself."""
    seen: list[bool] = []
    original = fastpath.FastPath._answer

    async def spy(self: fastpath.FastPath, *args: Any) -> bytes | None:
        try:
            out = await original(self, *args)
        except Exception:
            seen.append(False)
            raise
        seen.append(out is not None)
        return out

    monkeypatch.setattr(fastpath.FastPath, "_answer", spy)
    return seen


def client_for(settings: Settings, **update: Any) -> TestClient:
    return TestClient(create_app(settings.model_copy(update=update)))


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with client_for(settings) as c:
        yield c


def uploads(images: np.ndarray) -> list[Any]:
    return [("files", (f"{i}.png", png(im), "image/png")) for i, im in enumerate(images)]


def predicted(client: TestClient, route: str) -> float:
    value = REGISTRY.get_sample_value(
        "cnnserve_http_requests_total", {"method": "POST", "route": route, "status": "200"}
    )
    return value or 0.0


def test_multipart_predictions_take_the_fast_path_and_equal_the_routes(
    client: TestClient, ckpt: Manifest, answered: list[bool]
) -> None:
    images, _ = fashion_test_set()
    images = np.asarray(images[:5])
    query = "?top_k=3&return_input=true&invert=auto&preprocess=auto"
    before = predicted(client, ROUTE)
    fast = client.post(f"/v1/checkpoints/{ckpt.id}/predict{query}", files=uploads(images))
    assert fast.status_code == 200, fast.text
    assert fast.headers["content-type"] == "application/json"
    assert answered == [True]
    # the same images as base64 JSON: the route answers those
    body = {"images": [base64.b64encode(png(im)).decode() for im in images]}
    slow = client.post(f"/v1/checkpoints/{ckpt.id}/predict{query}", json=body)
    assert slow.status_code == 200, slow.text
    assert answered == [True], "a JSON body is the route's"
    a, b = fast.json(), slow.json()
    assert a["checkpoint"] == b["checkpoint"] == ckpt.id and a["model"] == b["model"]
    for p, q, image in zip(a["predictions"], b["predictions"], images, strict=True):
        assert [s["class_id"] for s in p["top_k"]] == [s["class_id"] for s in q["top_k"]]
        assert p["label"] == q["label"] and len(p["top_k"]) == 3
        assert np.allclose([s["probability"] for s in p["top_k"]],
                           [s["probability"] for s in q["top_k"]], atol=1e-5)  # fmt: skip
        assert np.array_equal(np.asarray(p["input"]), image)
    # /metrics still counts the fast path's answers under the route's template
    assert predicted(client, ROUTE) == before + 2


def test_the_first_call_and_an_alias_take_it_too(
    settings: Settings, ckpt: Manifest, answered: list[bool]
) -> None:
    images, _ = fashion_test_set()
    with client_for(settings) as client:
        r = client.post("/v1/checkpoints/lenet:best/predict", files=uploads(images[:1]))
    assert r.status_code == 200, r.text
    assert r.json()["checkpoint"] == ckpt.id
    assert answered == [True]


@pytest.mark.parametrize(
    ("query", "files", "status", "says"),
    [
        ("?top_k=11", None, 422, "top_k"),
        ("?invert=maybe", None, 422, "invert"),
        ("?return_input=maybe", None, 422, "return_input"),
        ("", [("files", ("a.gif", b"GIF89a" + b"\0" * 64, "image/gif"))], 415, "GIF"),
        ("", [("files", ("a.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "image/png"))], 422,
         "damaged"),
        ("", [("other", ("a.png", b"x", "image/png"))], 422, "'files'"),
    ],
)  # fmt: skip
def test_refusals_are_the_routes_problems(
    client: TestClient,
    ckpt: Manifest,
    answered: list[bool],
    query: str,
    files: list[Any] | None,
    status: int,
    says: str,
) -> None:
    images, _ = fashion_test_set()
    sent = files or uploads(images[:1])
    r = client.post(f"/v1/checkpoints/{ckpt.id}/predict{query}", files=sent)
    assert_problem(r, status)
    assert says in r.json()["detail"] or says in str(r.json().get("errors"))
    assert True not in answered


def test_unknown_checkpoint_and_bad_refs_are_404s(client: TestClient, ckpt: Manifest) -> None:
    images, _ = fashion_test_set()
    for ref in ("fedcba9876543210-e001", "vgg:best", "not a ref"):
        r = client.post(f"/v1/checkpoints/{ref}/predict", files=uploads(images[:1]))
        assert r.status_code in (404, 422), r.text
        assert r.headers["content-type"] == "application/problem+json"


def test_a_refused_prediction_counts_against_the_rate_once(
    settings: Settings, ckpt: Manifest, answered: list[bool]
) -> None:
    """A bad image falls back to the route after the fast path counted the call: still once."""
    images, _ = fashion_test_set()
    good = uploads(images[:1])
    bad = [("files", ("a.jpg", encode(np.asarray(images[0]), "JPEG")[:40], "image/jpeg"))]
    with client_for(settings, predict_rate="3/minute") as client:
        url = f"/v1/checkpoints/{ckpt.id}/predict"
        assert client.post(url, files=good).status_code == 200
        assert client.post(url, files=bad).status_code == 422
        assert client.post(url, files=good).status_code == 200
        r = client.post(url, files=good)
    assert_problem(r, 429)
    assert r.headers["ratelimit-limit"] == "3" and r.headers["ratelimit-remaining"] == "0"
    assert answered == [True, False, True, False]
