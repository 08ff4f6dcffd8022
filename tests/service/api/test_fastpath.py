"""The fast path (`service.api.fastpath`): the common predict call and V2 infer answered without
FastAPI's routing and middleware stack, exactly as the routes answer them; anything else, and
every refusal, is the route's own answer."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from starlette.middleware.errors import ServerErrorMiddleware

from bench import http as bench_http
from service.access.keys import add_key
from service.api import fastpath
from service.api.app import create_app
from service.inference.pipeline import PredictQuery
from tests.http_checks import assert_problem
from tests.service.checkpoint_helpers import (
    JOB_A,
    encode,
    fashion_test_set,
    lenet,
    png,
    reference_probs,
    save,
)
from workers.settings import Settings
from workers.store.checkpoints import CheckpointStore, Manifest

ROUTE = "/v1/checkpoints/{ref}/predict"
INFER = "/v2/models/{model}/infer"
INFER_VERSION = "/v2/models/{model}/versions/{model_version}/infer"


@pytest.fixture
def ckpt(settings: Settings) -> Manifest:
    return save(CheckpointStore.from_settings(settings), lenet())


@pytest.fixture
def answered(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """One entry per request the fast path looked at: whether it answered it itself."""
    seen: list[bool] = []
    original = fastpath.FastPath._answer

    async def spy(self: fastpath.FastPath, *args: Any) -> fastpath.Answer | None:
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


def predicted(client: TestClient, route: str, status: int = 200) -> float:
    value = REGISTRY.get_sample_value(
        "cnnserve_http_requests_total", {"method": "POST", "route": route, "status": str(status)}
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
    assert answered == [True, False, True]  # the 429 before its body was read


# --- V2 infer --------------------------------------------------------------------------------


def v2_body(images: np.ndarray, **request: Any) -> tuple[bytes, dict[str, str]]:
    """A V2 infer body with the images as a binary UINT8 tensor, as tritonclient sends it
    (no Content-Type), and its headers."""
    body, header_length = bench_http.v2_body(images, **request)
    return body, {"Inference-Header-Content-Length": str(header_length)}


def binary_probabilities(r: Any, n: int) -> np.ndarray:
    """The binary FP32 `probabilities` output of a V2 answer."""
    size = int(r.headers["inference-header-content-length"])
    (out,) = json.loads(r.content[:size])["outputs"]
    assert out["name"] == "probabilities" and out["parameters"]["binary_data_size"] == n * 40
    return np.frombuffer(r.content[size:], dtype="<f4").reshape(n, 10)


def test_v2_infer_takes_the_fast_path_on_both_routes(
    client: TestClient, ckpt: Manifest, answered: list[bool]
) -> None:
    images = np.asarray(fashion_test_set()[0][:6])
    want = reference_probs(lenet(), images)
    wanted = {"outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}
    body, headers = v2_body(images, **wanted)
    before = predicted(client, INFER), predicted(client, INFER_VERSION)
    for path in ("/v2/models/lenet/infer", f"/v2/models/{JOB_A}/versions/{ckpt.id}/infer"):
        r = client.post(path, content=body, headers=headers)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/octet-stream"
        assert np.abs(binary_probabilities(r, 6) - want).max() < 1e-4
    # JSON in, JSON out, with the classification extension and a request id
    request = {
        "id": "r1",
        "inputs": [
            {"name": "image", "shape": [6, 28, 28], "datatype": "UINT8",
             "data": images.ravel().tolist()}
        ],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 2}}],
    }  # fmt: skip
    r = client.post("/v2/models/lenet/infer", json=request)
    assert r.status_code == 200, r.text
    reply = r.json()
    assert reply["id"] == "r1" and reply["model_version"] == ckpt.id
    top = [s.split(":") for s in reply["outputs"][0]["data"]]
    assert [int(c) for _, c, _ in top[::2]] == want.argmax(axis=1).tolist()
    assert answered == [True, True, True]
    # /metrics counts the fast path's answers under the routes' templates
    assert predicted(client, INFER) == before[0] + 2
    assert predicted(client, INFER_VERSION) == before[1] + 1


@pytest.mark.parametrize(
    ("path", "change", "status", "says"),
    [
        ("/v2/models/lenet/infer", {"shape": [1, 32, 32]}, 400, "shape"),
        ("/v2/models/lenet/infer", {"datatype": "INT64"}, 400, "INT64"),
        ("/v2/models/mobilenet/infer", {}, 404, "unknown model"),
        ("/v2/models/lenet/versions/worst/infer", {}, 404, "unknown version"),
        ("/v2/models/vgg/infer", {}, 404, "no checkpoint"),
    ],
)
def test_v2_refusals_are_the_routes_errors(
    client: TestClient,
    ckpt: Manifest,
    answered: list[bool],
    path: str,
    change: dict[str, Any],
    status: int,
    says: str,
) -> None:
    images = np.asarray(fashion_test_set()[0][:1])
    request = {"inputs": [{"name": "image", "shape": [1, 28, 28], "datatype": "UINT8",
                           "data": images.ravel().tolist(), **change}]}  # fmt: skip
    before = predicted(client, INFER if "versions" not in path else INFER_VERSION, status)
    r = client.post(path, content=json.dumps(request).encode())
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert says in r.json()["error"]
    assert True not in answered
    after = predicted(client, INFER if "versions" not in path else INFER_VERSION, status)
    assert after == before + 1  # counted once, by the route


def test_v2_keys_scopes_and_the_rate_hold_on_the_fast_path(
    settings: Settings, ckpt: Manifest, answered: list[bool], tmp_path: Path
) -> None:
    """No key: 401; a read-only key: 403; a predictor's key: answered. A refused call that
    fell back after the fast path counted it counts once against the rate."""
    keys = tmp_path / "keys.toml"
    reader = add_key(keys, "reader", ["read"])[0]
    predictor = add_key(keys, "predictor", ["predict"])[0]
    save(CheckpointStore.from_settings(settings), lenet(), job_id="00000000000000aa",
         owner="predictor")  # fmt: skip
    images = np.asarray(fashion_test_set()[0][:1])
    body, headers = v2_body(images)
    url = "/v2/models/lenet/infer"
    with client_for(settings, api_keys_file=keys) as client:
        r = client.post(url, content=body, headers=headers)
        assert r.status_code == 401 and "API key" in r.json()["error"]
        r = client.post(url, content=body, headers={**headers, "Authorization": f"Bearer {reader}"})
        assert r.status_code == 403 and "predict scope" in r.json()["error"]
    assert True not in answered
    signed = {**headers, "Authorization": f"Bearer {predictor}"}
    bad, _ = v2_body(images[:, :20])  # a 1×20×28 tensor: the wrong shape
    with client_for(settings, api_keys_file=keys, predict_rate="3/minute") as client:
        assert client.post(url, content=body, headers=signed).status_code == 200
        refused = client.post(url, content=bad, headers=signed)
        assert refused.status_code == 400 and "shape" in refused.json()["error"]
        r = client.post(url, content=body, headers=signed)
        assert r.status_code == 200
        assert r.json()["model_version"] != ckpt.id  # the predictor's own lenet, not anyone's
        r = client.post(url, content=body, headers=signed)
    assert r.status_code == 429 and "predict_rate" in r.json()["error"]
    assert answered[-3:] == [True, False, True]  # the 429 before its body was read


def test_a_v2_body_over_the_limit_is_refused_before_the_fast_path(
    settings: Settings, ckpt: Manifest, answered: list[bool]
) -> None:
    images = np.asarray(fashion_test_set()[0][:2])
    body, headers = v2_body(images)
    with client_for(settings, max_body_bytes=1024) as client:
        r = client.post("/v2/models/lenet/infer", content=body, headers=headers)
    assert r.status_code == 413 and "error" in r.json()
    assert answered == []  # never read: the limit's middleware answered


# --- what keeps the fast path and the routes one contract ----------------------------------


def test_the_route_takes_no_query_parameter_the_fast_path_does_not_read(
    client: TestClient,
) -> None:
    """The fast path validates a predict call's query with `PredictQuery`: a parameter the
    route gained beside it would be ignored there, and the call answered 200 regardless."""
    paths = client.get("/openapi.json").json()["paths"]

    def query(path: str) -> set[str]:
        return {p["name"] for p in paths[path]["post"].get("parameters", []) if p["in"] == "query"}

    assert query(ROUTE) == {f.alias or name for name, f in PredictQuery.model_fields.items()}
    assert query(INFER) == query(INFER_VERSION) == set()  # V2 takes its options in the body


def test_a_query_the_model_reads_leniently_is_read_alike_on_both_paths(
    client: TestClient, ckpt: Manifest, answered: list[bool]
) -> None:
    images, _ = fashion_test_set()
    query = "?top_k=03&return_input=yes&top_k=2"  # the last of a repeated one, as Starlette
    fast = client.post(f"/v1/checkpoints/{ckpt.id}/predict{query}", files=uploads(images[:1]))
    body = {"images": [base64.b64encode(png(images[0])).decode()]}
    slow = client.post(f"/v1/checkpoints/{ckpt.id}/predict{query}", json=body)
    assert fast.status_code == slow.status_code == 200, (fast.text, slow.text)
    assert answered == [True]
    for answer in (fast.json(), slow.json()):
        assert len(answer["predictions"][0]["top_k"]) == 2 and "input" in answer["predictions"][0]


def test_the_fast_path_stands_in_front_of_every_middleware(settings: Settings) -> None:
    """A middleware added to the app must be weighed against the fast path (which skips it)
    in `fastpath.STANDS_IN_FRONT_OF`; the fast path never runs inside the stack."""
    app = create_app(settings)
    assert [m.cls for m in app.user_middleware] == list(fastpath.STANDS_IN_FRONT_OF)
    stack = app.build_middleware_stack()
    assert isinstance(stack, fastpath.FastPath)
    assert isinstance(stack.app, ServerErrorMiddleware)  # the whole stack is behind it
