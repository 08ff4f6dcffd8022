"""Request bodies against the app itself (ASGI calls that count what it reads): who may send
one is settled from the headers before a byte is read; a body is counted as it arrives,
whatever it declared; a V2 body is parsed once, off the event loop when big, and refused from
its shape before its data is decoded."""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image

from service.access.keys import add_key
from service.api.app import create_app
from service.inference import pipeline
from tests.http_checks import assert_problem
from tests.service.checkpoint_helpers import lenet, png, save
from workers.settings import Settings
from workers.store.checkpoints import CheckpointStore, Manifest


@dataclass
class Exchange:
    """What one ASGI call read of its body and answered."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    receives: int = 0
    read: int = 0

    def json(self) -> Any:
        return json.loads(self.body)


def call(
    client: TestClient,
    method: str,
    path: str,
    headers: dict[str, str],
    chunks: list[bytes],
) -> Exchange:
    """Send a request to the client's app chunk by chunk, counting the chunks it reads."""
    out = Exchange()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 1234),
        "server": ("testserver", 80),
    }
    pending = list(chunks)

    async def receive() -> dict[str, Any]:
        out.receives += 1
        if not pending:
            return {"type": "http.disconnect"}
        chunk = pending.pop(0)
        out.read += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            out.status = message["status"]
            out.headers = {k.decode(): v.decode() for k, v in message.get("headers", [])}
        elif message["type"] == "http.response.body":
            out.body += message.get("body", b"")

    async def run() -> None:
        await client.app(scope, receive, send)

    assert client.portal is not None
    client.portal.call(run)
    return out


@pytest.fixture
def ckpt(settings: Settings) -> Manifest:
    return save(CheckpointStore.from_settings(settings), lenet())


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Any]:
    path = tmp_path / "keys.toml"
    return {
        "file": path,
        "reader": add_key(path, "reader", ["read"])[0],
        "predictor": add_key(path, "predictor", ["predict"])[0],
    }


@pytest.fixture
def keyed(settings: Settings, keys: dict[str, Any], ckpt: Manifest) -> Iterator[TestClient]:
    with TestClient(create_app(settings.model_copy(update={"api_keys_file": keys["file"]}))) as c:
        yield c


def multipart(blob: bytes) -> tuple[bytes, str]:
    boundary = "b0undary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + blob
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def image() -> bytes:
    return png(np.zeros((28, 28), dtype=np.uint8))


V2_JSON = json.dumps(
    {"inputs": [{"name": "image", "shape": [1, 28, 28], "datatype": "UINT8", "data": [0] * 784}]}
).encode()
JOB = json.dumps({"model": "lenet", "epochs": 1, "device": "cpu", "train_limit": 256}).encode()


def bodies(ckpt: Manifest) -> list[tuple[str, str, str, bytes]]:
    """(path, content type, scope, body) of every route that reads a body."""
    upload, form = multipart(image())
    pixels = json.dumps({"pixels": [[0] * 28] * 28}).encode()
    return [
        (f"/v1/checkpoints/{ckpt.id}/predict", form, "predict", upload),  # the fast path's
        (f"/v1/checkpoints/{ckpt.id}/predict", "application/json", "predict", pixels),
        (f"/v1/checkpoints/{ckpt.id}/explain", "application/json", "predict", pixels),
        ("/v2/models/lenet/infer", "application/json", "predict", V2_JSON),
        ("/v1/jobs", "application/json", "train", JOB),
        ("/v1/sweeps", "application/json", "train", b'{"base": {"model": "lenet"}}'),
        (f"/v1/checkpoints/{ckpt.id}/evaluate", "application/json", "train", b"{}"),
    ]


# --- item 4: authorised from the headers, before the body -----------------------------------


@pytest.mark.parametrize("who", ["nobody", "wrong", "reader"])
def test_a_caller_without_the_scope_is_refused_before_a_byte_of_the_body(
    keyed: TestClient, keys: dict[str, Any], ckpt: Manifest, who: str
) -> None:
    auth = {"nobody": {}, "wrong": {"Authorization": "Bearer cns_000000000000_wrong"},
            "reader": {"Authorization": f"Bearer {keys['reader']}"}}[who]  # fmt: skip
    for path, content_type, scope, body in bodies(ckpt):
        headers = {"Content-Type": content_type, "Content-Length": str(len(body)),
                   "Expect": "100-continue", **auth}  # fmt: skip
        r = call(keyed, "POST", path, headers, [body])
        status = 403 if who == "reader" else 401
        assert (r.status, r.receives) == (status, 0), (path, r.status, r.body[:300])
        assert r.headers["connection"] == "close"  # the body is left unread
        if status == 401:
            assert r.headers["www-authenticate"].startswith("Bearer")
        if path.startswith("/v2"):
            assert "API key" in r.json()["error"] or "scope" in r.json()["error"]
        else:
            assert r.headers["content-type"] == "application/problem+json"
            assert r.json()["status"] == status
            if status == 403:
                assert f"the {scope} scope" in r.json()["detail"]


def test_a_refused_state_change_is_still_audited(
    keyed: TestClient, ckpt: Manifest, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO", logger="cnnserve.audit"):
        r = call(keyed, "POST", f"/v1/checkpoints/{ckpt.id}/evaluate",
                 {"Content-Type": "application/json", "Content-Length": "2"}, [b"{}"])  # fmt: skip
    assert r.status == 401 and r.receives == 0
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "cnnserve.audit"]
    assert any("action=checkpoint.evaluate" in ln and "status=401" in ln for ln in lines), lines


def test_a_json_prediction_counts_against_the_rate_once(
    settings: Settings, keys: dict[str, Any], ckpt: Manifest
) -> None:
    """Admitted (and counted) before its body is read, a JSON predict call is not counted
    again by the route's `Allow`; the call past the rate is refused unread."""
    update = {"api_keys_file": keys["file"], "predict_rate": "2/minute", "public_predict": True}
    body = json.dumps({"pixels": [[0] * 28] * 28}).encode()
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
    with TestClient(create_app(settings.model_copy(update=update))) as client:
        statuses = [call(client, "POST", f"/v1/checkpoints/{ckpt.id}/predict", headers, [body])
                    for _ in range(3)]  # fmt: skip
    assert [r.status for r in statuses] == [200, 200, 429], [r.body[:200] for r in statuses]
    assert statuses[2].receives == 0 and "retry-after" in statuses[2].headers


# --- item 5: bodies counted as they arrive --------------------------------------------------


def test_the_fast_path_counts_a_body_that_outgrows_its_declared_length(
    settings: Settings, ckpt: Manifest
) -> None:
    """A server that frames a body by its chunks may hand on more than Content-Length said:
    the fast path stops at the limit with the limit's 413, whatever was declared."""
    limit = 100_000
    upload, form = multipart(image() + b"\0" * 300_000)
    chunks = [upload[i : i + 16_384] for i in range(0, len(upload), 16_384)]
    with TestClient(create_app(settings.model_copy(update={"max_body_bytes": limit}))) as client:
        for path in (f"/v1/checkpoints/{ckpt.id}/predict", "/v2/models/lenet/infer"):
            r = call(client, "POST", path, {"Content-Type": form, "Content-Length": "100"}, chunks)
            assert r.status == 413, (path, r.body[:300])
            assert r.read <= limit + 16_384, r.read
            detail = r.json().get("detail") or r.json()["error"]
            assert str(limit) in detail


def test_both_transfer_encoding_and_content_length_is_a_400(
    client: TestClient, ckpt: Manifest
) -> None:
    upload, form = multipart(image())
    headers = {"Content-Type": form, "Content-Length": "100", "Transfer-Encoding": "chunked"}
    for path in (f"/v1/checkpoints/{ckpt.id}/predict", "/v2/models/lenet/infer", "/v1/jobs"):
        r = call(client, "POST", path, headers, [upload])
        assert (r.status, r.receives) == (400, 0), (path, r.body[:300])
        text = r.body.decode()
        assert "Transfer-Encoding" in text and "Content-Length" in text


# --- item 11: an over-limit chunked upload is a 413 -----------------------------------------


def test_an_over_limit_chunked_upload_to_predict_is_a_413(
    settings: Settings, ckpt: Manifest
) -> None:
    limit = 100_000
    upload, form = multipart(image() + b"\0" * 300_000)

    def chunked() -> Iterator[bytes]:
        for i in range(0, len(upload), 16_384):
            yield upload[i : i + 16_384]

    with TestClient(create_app(settings.model_copy(update={"max_body_bytes": limit}))) as client:
        r = client.post(f"/v1/checkpoints/{ckpt.id}/predict", content=chunked(),
                        headers={"Content-Type": form})  # fmt: skip
    assert_problem(r, 413, str(limit))


# --- items 6 and 9: V2 bodies parsed once, bounded, and refused from their shape ------------


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every V2 body the pipeline parsed."""
    seen: list[int] = []
    original = pipeline.parse_request

    def counting(body: bytes, *args: Any) -> Any:
        seen.append(len(body))
        return original(body, *args)

    monkeypatch.setattr(pipeline, "parse_request", counting)
    return seen


def test_a_refused_v2_body_is_parsed_once(
    client: TestClient, ckpt: Manifest, parses: list[int]
) -> None:
    bad = V2_JSON.replace(b"[1, 28, 28]", b"[1, 32, 32]")
    r = client.post("/v2/models/lenet/infer", content=bad)
    assert r.status_code == 400 and "shape" in r.json()["error"]
    assert parses == [len(bad)]


def test_too_many_images_are_refused_from_the_shape_before_the_data(
    client: TestClient, ckpt: Manifest
) -> None:
    """An 18.8 MB body of 12,000 images: refused from its shape; the data's 9.4 million
    numbers are never decoded (its parse alone took seconds)."""
    n = 12_000
    head = b'{"inputs":[{"name":"image","shape":[%d,28,28],"datatype":"UINT8","data":[' % n
    body = head + b"0," * (n * 784 - 1) + b"0]}]}"
    started = time.perf_counter()
    r = client.post("/v2/models/lenet/infer", content=body)
    seconds = time.perf_counter() - started
    assert r.status_code == 400, r.text[:300]
    assert seconds < 5, f"{seconds:.1f} s: the data was decoded (it took 10 s on 2 cores)"
    # refused from a count of its values (a linear scan), which names what it holds
    assert "12000 28×28 images" in r.json()["error"] and "100352" in r.json()["error"]


@pytest.mark.parametrize(
    ("tensor", "says"),
    [
        ({"shape": [1] * 65, "data": [0]}, "dimensions"),
        ({"shape": [1, 28, 28], "data": "DEEP"}, "nested"),
        ({"shape": [1, 28, 28], "data": [[[[[0] * 28] * 28]]]}, "deeper than its shape"),
    ],
)
def test_malformed_v2_tensors_are_400s_not_500s(
    client: TestClient, ckpt: Manifest, tensor: dict[str, Any], says: str
) -> None:
    text = json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", **tensor}]})
    text = text.replace('"DEEP"', "[" * 100_000 + "]" * 100_000)
    r = client.post("/v2/models/lenet/infer", content=text.encode())
    assert r.status_code == 400, r.text[:300]
    assert says in r.json()["error"]


def test_deep_json_on_v1_is_a_4xx_not_a_500(client: TestClient, ckpt: Manifest) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    for path in (f"/v1/checkpoints/{ckpt.id}/predict", "/v1/jobs"):
        r = client.post(path, content=deep, headers={"Content-Type": "application/json"})
        assert r.status_code in (400, 422), (path, r.status_code, r.text[:300])
        assert r.headers["content-type"] == "application/problem+json"


def test_a_rate_store_outage_is_the_routes_503_not_a_500(
    settings: Settings, ckpt: Manifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Admitting before the body meets Redis down as the route would: a 503 problem."""
    upload, form = multipart(image())
    pixels = json.dumps({"pixels": [[0] * 28] * 28}).encode()
    with TestClient(create_app(settings.model_copy(update={"predict_rate": "5/minute"}))) as c:

        async def down(*args: Any) -> None:
            raise redis.ConnectionError("Redis is down")

        monkeypatch.setattr(c.app.state.predict_limiter, "hit", down)  # type: ignore[attr-defined]
        for body, content_type in ((upload, form), (pixels, "application/json")):
            r = c.post(f"/v1/checkpoints/{ckpt.id}/predict", content=body,
                       headers={"Content-Type": content_type})  # fmt: skip
            assert_problem(r, 503)


def test_every_route_that_takes_a_body_refuses_a_caller_without_a_key_unread(
    keyed: TestClient,
) -> None:
    """Whatever route is added: a body-taking operation that asks for a key never reads a
    body from a caller without one."""
    paths = keyed.get("/openapi.json").json()["paths"]
    checked = []
    for template, operations in paths.items():
        for method, operation in operations.items():
            if method.upper() not in ("POST", "PUT", "PATCH", "DELETE"):
                continue
            if not operation.get("security") or {} in operation["security"]:
                continue
            path = re.sub(r"\{[^}]+\}", "lenet", template)
            headers = {"Content-Type": "application/json", "Content-Length": "2"}
            r = call(keyed, method.upper(), path, headers, [b"{}"])
            assert (r.status, r.receives) == (401, 0), (method, template, r.body[:300])
            checked.append(f"{method.upper()} {template}")
    assert len(checked) >= 10, checked


def test_json_bodies_with_more_numbers_than_a_request_has_pixels_are_refused_unparsed(
    client: TestClient, ckpt: Manifest
) -> None:
    """Parsing JSON numbers holds the interpreter whatever thread does it (about 4 million a
    second here), and as `/v1` pixel arrays a 17 MB body became 2 GB of Python objects. A
    JSON body may carry two 28×28 images' worth of numbers per image a request may hold:
    counted (its commas) before it is parsed."""
    limit = 64 * 2 * 784  # the default 64 images a request
    side = 2896  # one 2896² array of zeros: 17 MB, 8.4 million values
    rows = b"[" + b",".join([b"[" + b",".join([b"0"] * side) + b"]"] * side) + b"]"
    r = client.post(
        f"/v1/checkpoints/{ckpt.id}/predict",
        content=b'{"pixels":' + rows + b"}",
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 413, r.text[:300]
    assert r.json()["type"].endswith("too-many-values") and str(limit) in r.json()["detail"]

    # V2: one image's shape, two million numbers of data (it parsed them: 620 ms)
    body = b'{"inputs":[{"name":"image","shape":[1,28,28],"datatype":"FP32","data":['
    body += b"0.5," * 2_000_000 + b"0.5]}]}"
    r = client.post("/v2/models/lenet/infer", content=body)
    assert r.status_code == 400 and "binary extension" in r.json()["error"], r.text[:300]

    # what a full request holds still passes: 64 images of 28×28 as JSON
    full = json.dumps({"pixels": [[[0] * 28] * 28] * 64}).encode()
    r = client.post(
        f"/v1/checkpoints/{ckpt.id}/predict",
        content=full,
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 200, r.text[:300]
    tensor = {"name": "image", "shape": [64, 28, 28], "datatype": "FP32", "data": [0.5] * 50176}
    r = client.post("/v2/models/lenet/infer", json={"inputs": [tensor]})
    assert r.status_code == 200, r.text[:300]


def test_routes_that_take_a_spec_take_at_most_256_kib(client: TestClient, ckpt: Manifest) -> None:
    """A job, sweep or evaluation body is a spec of a few hundred bytes, parsed on the event
    loop and validated whole: a 20 MB job of unknown fields held the loop 12 s and took 2 GB
    (an error for each field). Those routes take 256 KiB; the image routes the body limit."""
    wide = b'{"model":"lenet","epochs":1' + b',"x":0' * 50_000 + b"}"  # 300 KB
    for path in ("/v1/jobs", "/v1/sweeps", f"/v1/checkpoints/{ckpt.id}/evaluate"):
        r = client.post(path, content=wide, headers={"Content-Type": "application/json"})
        assert r.status_code == 413, (path, r.status_code, r.text[:200])
        assert "262144 bytes" in r.json()["detail"]
    buf = io.BytesIO()  # an upload of more than 256 KiB still classifies
    noise = np.random.default_rng(0).integers(0, 255, (600, 600), np.uint8)
    Image.fromarray(noise).save(buf, "PNG")
    assert len(buf.getvalue()) > 256 * 1024
    r = client.post(
        f"/v1/checkpoints/{ckpt.id}/predict", files=[("files", ("a.png", buf.getvalue()))]
    )
    assert r.status_code == 200, r.text[:200]


def test_every_route_that_classifies_takes_the_image_body_limit_and_ops_their_tensors(
    client: TestClient,
) -> None:
    """The image routes are listed by path for the body limit: a route added with the predict
    scope and not listed would take 256 KiB. The seed's ops take their largest tensors."""
    from service.api.body_limit import IMAGE_BODY_PATH, BodySizeLimitMiddleware

    doc = client.get("/openapi.json").json()
    predict_routes = [
        path.replace("{", "").replace("}", "")
        for path, ops in doc["paths"].items()
        for method, op in ops.items()
        if method == "post" and {"ApiKey": ["predict"]} in op.get("security", [])
    ]
    assert len(predict_routes) >= 4
    assert all(IMAGE_BODY_PATH.match(p) for p in predict_routes), predict_routes

    limit = BodySizeLimitMiddleware(lambda *_: None, 20 * 1024 * 1024)  # type: ignore[arg-type]
    x = np.random.default_rng(0).random((4, 64, 64)).tolist()  # 16,384 windows: the most
    body = json.dumps({"X": x, "K": [[[0.5]]] * 4}).encode()
    assert 256 * 1024 < len(body) <= limit.limit_for("/v1/ops/corr2d")
    r = client.post("/v1/ops/corr2d", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text[:300]
