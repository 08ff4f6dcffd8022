"""Every error is an RFC 9457 problem; API keys; the body-size limit; logging of keys."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient

from service.access.keys import KeyRing
from tests.http_checks import assert_problem
from tests.service.conftest import API_KEY
from workers.settings import Settings


def test_unknown_route_is_a_404_problem(client: TestClient) -> None:
    body = assert_problem(client.get("/v9/everything"), 404)
    assert body["instance"] == "/v9/everything"
    assert "/docs" in str(body["detail"])


def test_wrong_method_is_a_405_problem(client: TestClient) -> None:
    r = client.delete("/v1/jobs")
    body = assert_problem(r, 405)
    assert "GET" in r.headers["allow"] and "POST" in r.headers["allow"]
    assert "DELETE" in str(body["detail"])


def test_validation_error_is_a_422_problem_with_errors(client: TestClient) -> None:
    r = client.get("/v1/ops/output-size", params={"n": "eight", "kernel": 3})
    body = assert_problem(r, 422)
    errors = body["errors"]
    assert isinstance(errors, list) and errors[0]["loc"] == ["query", "n"]
    assert "n:" in str(body["detail"]) or "query.n" in str(body["detail"])


def test_model_validated_inside_a_route_is_a_422_not_a_500(client: TestClient) -> None:
    from workers.contracts import JobSpec

    def build() -> None:
        JobSpec(model="lenet", epochs=0)

    client.app.add_api_route("/build-spec", build)  # type: ignore[attr-defined]
    body = assert_problem(client.get("/build-spec"), 422)
    assert "epochs" in str(body["detail"])


def test_unhandled_error_is_a_500_problem_without_internals(client: TestClient) -> None:
    def boom() -> None:
        raise RuntimeError("secret internal state")

    client.app.add_api_route("/boom", boom)  # type: ignore[attr-defined]
    r = client.get("/boom")
    body = assert_problem(r, 500)
    assert "secret" not in r.text
    assert "logged" in str(body["detail"])


def test_body_over_the_limit_is_413(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_body_bytes=1024)
    big = {"model": "lenet", "padding": "x" * 2000}
    body = assert_problem(client.post("/v1/jobs", json=big), 413)
    assert "1024" in str(body["detail"])

    # no Content-Length: counted as it streams in
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "lenet", "pad": "'
        for _ in range(10):
            yield b"x" * 200
        yield b'"}'

    r = client.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert_problem(r, 413)
    # a body under the limit goes through
    assert client.post("/v1/ops/pool2d", json={"X": [[1, 2], [3, 4]]}).status_code == 200


def test_keys_guard_every_state_changing_route(keyed_client: TestClient) -> None:
    """Every POST/PUT/PATCH/DELETE operation in the OpenAPI document refuses a missing key."""
    schema = keyed_client.get("/openapi.json").json()
    guarded = 0
    read_only_posts = {"/v1/models/{name}/summary", "/v1/ops/corr2d", "/v1/ops/pool2d"}
    for path, item in schema["paths"].items():
        for method in item:
            if method not in ("post", "put", "patch", "delete") or path in read_only_posts:
                continue
            if path.endswith(("/predict", "/explain", "/infer")):
                continue  # classification computes, it changes nothing
            url = path.replace("{job_id}", "0123456789abcdef").replace("{ref}", "lenet:best")
            r = keyed_client.request(method.upper(), url, json={"model": "lenet"})
            assert_problem(r, 401)
            assert r.headers["www-authenticate"].startswith("Bearer"), url
            assert item[method].get("security"), f"{method} {path} does not document its key"
            guarded += 1
    assert guarded >= 3


def test_legacy_keys_are_admins_and_compared_whole(settings: Settings) -> None:
    ring = KeyRing(settings.model_copy(update={"api_keys": f"a,{API_KEY}"}))
    admin = ring.authenticate(API_KEY)
    assert admin is not None and admin.name == "admin" and admin.admin
    assert ring.authenticate(API_KEY[:-1]) is None
    assert ring.authenticate(API_KEY + "x") is None
    assert ring.authenticate("") is None
    assert KeyRing(settings).authenticate(API_KEY) is None  # no keys at all


def test_startup_warns_without_keys_and_never_logs_keys(
    make_client: Callable[..., TestClient], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        make_client()
    assert "no API keys" in caplog.text and "the API is open" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        c = make_client(api_keys=f"{API_KEY},second-secret-key")
        c.post("/v1/jobs", json={"model": "lenet"}, headers={"Authorization": "Bearer nope-key"})
        c.post("/v1/jobs", json={"model": "lenet"}, headers={"Authorization": f"Bearer {API_KEY}"})
    assert "the API is open" not in caplog.text
    assert API_KEY not in caplog.text
    assert "second-secret-key" not in caplog.text
    assert "nope-key" not in caplog.text
