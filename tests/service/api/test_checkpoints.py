"""`/v1/checkpoints`: list, manifest, weights download, delete, refs that never become paths."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load

from service.api.app import create_app
from tests.http_checks import PROBLEM, assert_problem
from tests.service.checkpoint_helpers import (
    JOB_A,
    JOB_B,
    as_first_version_wrote_it,
    damage,
    fashion_test_set,
    lenet,
    png,
    save,
)
from workers.settings import Settings
from workers.store.checkpoints import CheckpointStore, Manifest

KEY = "test-key-123"


@pytest.fixture
def store(settings: Settings) -> CheckpointStore:
    return CheckpointStore.from_settings(settings)


@pytest.fixture
def saved(store: CheckpointStore) -> dict[str, Manifest]:
    """Job A: epochs 1 (val_acc 0.6), 2 (0.8, best), 3 (0.7, latest); job B: one of 0.75."""
    model = lenet(trained=False)
    return {
        "a1": save(store, model, job_id=JOB_A, epoch=1, val_acc=0.6),
        "a2": save(store, model, job_id=JOB_A, epoch=2, val_acc=0.8),
        "a3": save(store, model, job_id=JOB_A, epoch=3, val_acc=0.7),
        "b1": save(store, model, job_id=JOB_B, epoch=1, val_acc=0.75),
    }


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture
def keyed_client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings.model_copy(update={"api_keys": KEY}))) as c:
        yield c


def test_list_all_and_filtered(client: TestClient, saved: dict[str, Manifest]) -> None:
    r = client.get("/v1/checkpoints")
    assert r.status_code == 200
    ids = [c["id"] for c in r.json()["checkpoints"]]
    assert sorted(ids) == sorted(m.id for m in saved.values())
    entry = next(c for c in r.json()["checkpoints"] if c["id"] == saved["a2"].id)
    assert entry["model"] == "lenet" and entry["epoch"] == 2
    assert entry["metrics"]["val_acc"] == 0.8 and entry["input_size"] == 28

    only_b = client.get("/v1/checkpoints", params={"job_id": JOB_B}).json()["checkpoints"]
    assert [c["id"] for c in only_b] == [saved["b1"].id]
    none = {"checkpoints": [], "next_cursor": None}
    assert client.get("/v1/checkpoints", params={"model": "vgg"}).json() == none
    assert len(client.get("/v1/checkpoints", params={"model": "lenet"}).json()["checkpoints"]) == 4


def _on_record(store: CheckpointStore, n: int) -> list[dict[str, Any]]:
    """`n` checkpoints in the index (no files: a listing reads only the index), ten at each
    creation time so that pages end inside a tie; their summaries newest first."""
    rows = []
    for i in range(n):
        job = f"{i // 2:016x}"
        summary = {
            "id": f"{job}-e{i % 2 + 1:03d}",
            "job_id": job,
            "epoch": i % 2 + 1,
            "model": "lenet" if i % 3 else "resnet18",
            "arch": None,
            "input_size": 28,
            "metrics": {"val_acc": 0.5},
            "weights_sha256": "0" * 64,
            "created_at": f"2026-12-01T12:{i // 10 // 60 % 60:02d}:{i // 10 % 60:02d}+00:00",
            "owner": None,
        }
        rows.append((summary, 0.5, "0" * 64))
    store.index.publish_many(rows, store.location)
    # newest first; within one creation time the larger id first (the index's order)
    return sorted((r[0] for r in rows), key=lambda r: (r["created_at"], r["id"]), reverse=True)


def test_listing_pages_through_thousands_of_checkpoints_with_next_cursor(
    client: TestClient, store: CheckpointStore
) -> None:
    on_record = _on_record(store, 2_500)  # more than the largest page (1000)
    newest_first = [c["id"] for c in on_record]

    seen: list[str] = []
    params: dict[str, str | int] = {"limit": 1000}
    pages = 0
    while True:
        r = client.get("/v1/checkpoints", params=params)
        assert r.status_code == 200, r.text
        body = r.json()
        seen += [c["id"] for c in body["checkpoints"]]
        pages += 1
        if body["next_cursor"] is None:
            assert "link" not in r.headers
            break
        assert len(body["checkpoints"]) == 1000
        assert body["next_cursor"] in r.headers["link"] and 'rel="next"' in r.headers["link"]
        params = {"limit": 1000, "cursor": body["next_cursor"]}
    assert pages == 3
    assert seen == newest_first  # every checkpoint once, none skipped at a tie, newest first

    # filtered by model, and a cursor without a limit: the rest of the listing
    lenet = [c["id"] for c in on_record if c["model"] == "lenet"]
    first = client.get("/v1/checkpoints", params={"model": "lenet", "limit": 7}).json()
    rest = client.get(
        "/v1/checkpoints", params={"model": "lenet", "cursor": first["next_cursor"]}
    ).json()
    assert [c["id"] for c in first["checkpoints"] + rest["checkpoints"]] == lenet
    assert rest["next_cursor"] is None

    # one job's checkpoints page by epoch
    job = newest_first[0][:16]
    page = client.get("/v1/checkpoints", params={"job_id": job, "limit": 1}).json()
    after = client.get(
        "/v1/checkpoints", params={"job_id": job, "limit": 1, "cursor": page["next_cursor"]}
    ).json()
    assert [c["epoch"] for c in page["checkpoints"] + after["checkpoints"]] == [2, 1]
    assert after["next_cursor"] is None


def test_a_cursor_the_listing_did_not_give_out_is_a_422(
    client: TestClient, store: CheckpointStore
) -> None:
    _on_record(store, 30)
    a_jobs_cursor = base64.urlsafe_b64encode(f"1764590400.5:{JOB_A}".encode()).decode()
    for bad in ("not-a-cursor!", "bm90IGEgY3Vyc29y", a_jobs_cursor):
        assert_problem(
            client.get("/v1/checkpoints", params={"limit": 5, "cursor": bad}),
            422,
            "cursor is not one this API gave out",
        )


def test_list_filters_are_validated(client: TestClient) -> None:
    assert_problem(client.get("/v1/checkpoints", params={"job_id": "../etc"}), 422, "job_id")
    assert_problem(client.get("/v1/checkpoints", params={"model": "A/B"}), 422, "model")


def test_manifest_by_id_and_by_alias(client: TestClient, saved: dict[str, Manifest]) -> None:
    r = client.get(f"/v1/checkpoints/{saved['a1'].id}")
    assert r.status_code == 200
    body = r.json()
    assert body["id"] == saved["a1"].id and body["model"] == "lenet"
    assert body["preprocessing"]["resize"] == 28 and body["preprocessing"]["invert"] == "auto"
    assert body["classes"][9] == "ankle boot"
    assert body["weights_sha256"] == saved["a1"].weights_sha256
    for ref, want in [
        (f"{JOB_A}:latest", "a3"),
        (f"{JOB_A}:best", "a2"),
        (f"{JOB_B}:best", "b1"),
        ("lenet:best", "a2"),
    ]:
        assert client.get(f"/v1/checkpoints/{ref}").json()["id"] == saved[want].id, ref


def test_model_latest_is_the_models_newest_checkpoint_wherever_best_works(
    client: TestClient, saved: dict[str, Manifest]
) -> None:
    newest = saved["b1"]  # saved last
    assert client.get("/v1/checkpoints/lenet:latest").json()["id"] == newest.id
    files = [("files", ("0.png", png(fashion_test_set()[0][0]), "image/png"))]
    for path in ("predict", "explain"):
        r = client.post(f"/v1/checkpoints/lenet:latest/{path}", files=files)
        assert r.status_code == 200 and r.json()["checkpoint"] == newest.id, r.text
    r = client.get("/v1/checkpoints/lenet:latest/weights")
    assert r.status_code == 200 and newest.id in r.headers["content-disposition"]
    v2 = client.get("/v2/models/lenet/versions/latest").json()
    assert v2["parameters"]["checkpoint"] == newest.id
    assert_problem(client.get("/v1/checkpoints/vgg:latest"), 404, "vgg")


def test_a_checkpoint_the_first_version_wrote_is_served_as_before(
    client: TestClient, store: CheckpointStore
) -> None:
    model = lenet()
    current = save(store, model, job_id=JOB_A)
    earlier = save(store, model, job_id=JOB_B)
    as_first_version_wrote_it(store, earlier)
    prep = client.get(f"/v1/checkpoints/{earlier.id}").json()["preprocessing"]
    assert prep["resize"] == 28 and prep["invert"] == "auto" and "grayscale" not in prep
    images = fashion_test_set()[0][:4]
    files = [("files", (f"{i}.png", png(im), "image/png")) for i, im in enumerate(images)]
    answers = [
        client.post(f"/v1/checkpoints/{m.id}/predict?top_k=10", files=files).json()
        for m in (current, earlier)
    ]
    assert answers[1]["checkpoint"] == earlier.id
    assert answers[0]["predictions"] == answers[1]["predictions"]


def test_unknown_refs_are_404_problems(client: TestClient, saved: dict[str, Manifest]) -> None:
    assert_problem(client.get(f"/v1/checkpoints/{JOB_A}-e099"), 404, "<job>:latest")
    assert_problem(client.get("/v1/checkpoints/0000000000000000:latest"), 404, "latest")
    assert_problem(client.get("/v1/checkpoints/vgg:best"), 404, "vgg")
    assert_problem(client.get("/v1/checkpoints/lenet:worst"), 404)
    assert_problem(client.get("/v1/checkpoints/nonsense"), 404)


@pytest.mark.parametrize(
    "ref",
    [
        "..",
        "%2e%2e",
        "%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
        "..%2F..%2F..%2Fetc%2Fpasswd",
        "%2Fetc%2Fpasswd",
        "/etc/passwd",
        "0123456789abcdef-e001%2F..%2F..",
        "0123456789abcdef%2Fe001",
        "0123456789abcdef%2Faliases.json",
        "....%2F%2F",
        "%252e%252e%252f",
        "..%5C..%5Cwindows",
        "0123456789abcdef-e001%00",
        "lenet:best%2F..",
        "~root",
    ],
)
@pytest.mark.parametrize("suffix", ["", "/weights"])
def test_refs_never_become_paths(
    client: TestClient, saved: dict[str, Manifest], ref: str, suffix: str
) -> None:
    r = client.get(f"/v1/checkpoints/{ref}{suffix}")
    assert r.status_code == 404, (ref, r.status_code, r.text[:200])
    assert r.headers["content-type"].startswith(PROBLEM)
    assert b"root:" not in r.content and b"safetensors" not in r.content
    r = client.delete(f"/v1/checkpoints/{ref}")
    assert r.status_code in (404, 405), r.text
    r = client.post(f"/v1/checkpoints/{ref}/predict", json={"pixels": [[0, 1], [1, 0]]})
    assert r.status_code in (404, 405), r.text
    assert len(client.get("/v1/checkpoints").json()["checkpoints"]) == 4


def test_weights_download_is_the_verified_safetensors_file(
    client: TestClient, saved: dict[str, Manifest], store: CheckpointStore
) -> None:
    m = saved["a2"]
    r = client.get(f"/v1/checkpoints/{JOB_A}:best/weights")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/octet-stream"
    assert f'filename="{m.id}.safetensors"' in r.headers["content-disposition"]
    assert r.content == store.weights_path(m.id).read_bytes()
    state = load(r.content)
    want = lenet(trained=False).state_dict()
    assert state.keys() == want.keys()
    assert all(torch.equal(state[k], want[k]) for k in want)


def test_downloads_leave_no_pinned_file_behind_however_they_end(
    client: TestClient, saved: dict[str, Manifest], settings: Settings
) -> None:
    """A download streams from a hard link of its own (another process's cache eviction
    cannot unlink it mid-response); the link goes once the response is over, a range it
    cannot satisfy (416) and a malformed one (400) included."""
    m = saved["a2"]
    answers = []
    for path in ("weights", "model.onnx"):
        url = f"/v1/checkpoints/{m.id}/{path}"
        answers.append(client.get(url).status_code)
        answers.append(client.get(url, headers={"Range": "bytes=0-9"}).status_code)
        answers.append(client.get(url, headers={"Range": "bytes=999999999-"}).status_code)
    assert answers == [200, 206, 416, 200, 206, 416]
    left = [p for p in settings.data_dir.rglob("*") if ".staging" in p.parts and p.is_file()]
    assert left == []


def test_altered_weights_are_refused_not_served(
    client: TestClient, saved: dict[str, Manifest], store: CheckpointStore
) -> None:
    m = saved["a1"]
    damage(store, m.id, "weights.safetensors", lambda b: b[:-1] + bytes([b[-1] ^ 0xFF]))
    body = assert_problem(client.get(f"/v1/checkpoints/{m.id}/weights"), 409, "sha256")
    assert body["type"].endswith("checkpoint-corrupt")
    r = client.post(f"/v1/checkpoints/{m.id}/predict", json={"pixels": [[0, 1], [2, 3]]})
    assert_problem(r, 409, "sha256")


def test_delete_needs_a_key_when_keys_are_configured(
    keyed_client: TestClient, saved: dict[str, Manifest]
) -> None:
    ref = f"/v1/checkpoints/{saved['a2'].id}"
    r = keyed_client.delete(ref)
    assert_problem(r, 401, "Authorization: Bearer")
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert_problem(keyed_client.delete(ref, headers={"Authorization": "Bearer nope"}), 401)
    auth = {"Authorization": f"Bearer {KEY}"}
    assert keyed_client.get(ref, headers=auth).status_code == 200  # still there
    # with keys, reading and classifying need one too (unless the operator made them public)
    assert_problem(keyed_client.get(f"{ref}/weights"), 401, "read scope")
    assert keyed_client.get(f"{ref}/weights", headers=auth).status_code == 200
    r = keyed_client.post(f"{ref}/predict", json={"pixels": [[0, 255], [255, 0]]}, headers=auth)
    assert r.status_code == 200

    r = keyed_client.delete(ref, headers=auth)
    assert r.status_code == 204 and r.content == b""
    assert_problem(keyed_client.get(ref, headers=auth), 404)
    # the job's best alias moved to what is left
    assert (
        keyed_client.get(f"/v1/checkpoints/{JOB_A}:best", headers=auth).json()["id"]
        == saved["a3"].id
    )


def test_delete_by_alias_and_open_server(client: TestClient, saved: dict[str, Manifest]) -> None:
    assert client.delete(f"/v1/checkpoints/{JOB_B}:latest").status_code == 204
    assert_problem(client.get(f"/v1/checkpoints/{JOB_B}:latest"), 404)
    assert_problem(client.delete(f"/v1/checkpoints/{saved['b1'].id}"), 404)
    ids = {c["id"] for c in client.get("/v1/checkpoints").json()["checkpoints"]}
    assert ids == {saved["a1"].id, saved["a2"].id, saved["a3"].id}


def test_deleted_checkpoint_is_not_served_from_the_model_cache(
    client: TestClient, saved: dict[str, Manifest], store: CheckpointStore
) -> None:
    ref = f"/v1/checkpoints/{saved['a1'].id}"
    folder = f"{JOB_A}/e001/"
    assert client.post(f"{ref}/predict", json={"pixels": [[0, 9], [9, 0]]}).status_code == 200
    exported = [k for k in store.blobs.list_keys(folder) if k.endswith(".onnx")]
    assert exported, "the predict call exported no ONNX graph"
    assert client.delete(ref).status_code == 204
    assert_problem(client.post(f"{ref}/predict", json={"pixels": [[0, 9], [9, 0]]}), 404)
    # its files, the exported graph among them, are gone from the store
    assert list(store.blobs.list_keys(folder)) == [], "the deleted checkpoint's files are left"


def test_openapi_documents_the_checkpoint_operations(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    predict = paths["/v1/checkpoints/{ref}/predict"]["post"]
    assert set(predict["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    assert {"413", "415", "422", "404"} <= set(predict["responses"])
    for path, method in [
        ("/v1/checkpoints", "get"),
        ("/v1/checkpoints/{ref}", "get"),
        ("/v1/checkpoints/{ref}", "delete"),
        ("/v1/checkpoints/{ref}/weights", "get"),
    ]:
        op = paths[path][method]
        assert op["summary"] and op["description"], path
