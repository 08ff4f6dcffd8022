"""The operator's switches beside the keys: public reads, public predictions, /metrics' scope;
and the pages that stay open whatever the keys (docs, OpenAPI, health)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.access.keys import add_key
from tests.service.checkpoint_helpers import fashion_test_set, lenet, png, save
from tests.workers.helpers import lenet_spec
from workers.settings import Settings
from workers.store.checkpoints import CheckpointStore

Make = Callable[..., TestClient]


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A keys file with a reader, a predictor and a trainer; their keys by principal."""
    path = tmp_path / "keys.toml"
    made = {}
    for name, scopes in (("reader", ["read"]), ("predictor", ["predict"]), ("trainer", ["train"])):
        made[name] = add_key(path, name, scopes)[0]  # type: ignore[list-item]
    return path, made


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def checkpoint(settings: Settings) -> str:
    """A trained LeNet checkpoint of the trainer's."""
    return save(CheckpointStore.from_settings(settings), lenet(), owner="trainer").id


def image_upload() -> dict[str, tuple[str, bytes, str]]:
    images, _ = fashion_test_set()
    return {"files": ("shirt.png", png(np.asarray(images[0])), "image/png")}


def test_keys_guard_reads_and_predictions_unless_made_public(
    make_client: Make, keys: tuple[Path, dict[str, str]], checkpoint: str
) -> None:
    path, made = keys
    guarded = make_client(api_keys_file=path)
    assert guarded.get("/v1/jobs").status_code == 401
    assert guarded.get(f"/v1/checkpoints/{checkpoint}").status_code == 401
    assert (
        guarded.post(f"/v1/checkpoints/{checkpoint}/predict", files=image_upload()).status_code
        == 401
    )
    # someone else's checkpoint is not there for a tenant's key
    assert (
        guarded.get(f"/v1/checkpoints/{checkpoint}", headers=bearer(made["reader"])).status_code
        == 404
    )

    public_read = make_client(api_keys_file=path, public_read=True)
    listed = public_read.get("/v1/jobs")
    assert listed.status_code == 200, listed.text
    assert public_read.get(f"/v1/checkpoints/{checkpoint}").json()["id"] == checkpoint
    # reads only: predicting and training still need their keys
    assert (
        public_read.post(f"/v1/checkpoints/{checkpoint}/predict", files=image_upload()).status_code
        == 401
    )
    submit = public_read.post("/v1/jobs", json=lenet_spec(epochs=1).model_dump(mode="json"))
    assert submit.status_code == 401, submit.text
    assert public_read.get("/v1/whoami").json()["sees"] == "all"

    public_predict = make_client(api_keys_file=path, public_predict=True)
    answer = public_predict.post(f"/v1/checkpoints/{checkpoint}/predict", files=image_upload())
    assert answer.status_code == 200, answer.text
    assert answer.json()["predictions"][0]["label"]
    assert public_predict.get("/v1/jobs").status_code == 401  # reads stay guarded


def test_metrics_open_by_default_or_behind_the_scope_named(
    make_client: Make, keys: tuple[Path, dict[str, str]]
) -> None:
    path, made = keys
    assert make_client(api_keys_file=path).get("/metrics").status_code == 200
    scoped = make_client(api_keys_file=path, metrics_scope="read")
    refused = scoped.get("/metrics")
    assert refused.status_code == 401
    assert "key" in refused.json()["detail"].lower()
    assert scoped.get("/metrics", headers=bearer("cns_000000000000_wrong")).status_code == 401
    wrong_scope = scoped.get("/metrics", headers=bearer(made["predictor"]))
    assert wrong_scope.status_code == 403
    assert "read" in wrong_scope.json()["detail"]
    ok = scoped.get("/metrics", headers=bearer(made["reader"]))
    assert ok.status_code == 200 and "cnnserve_" in ok.text


def test_docs_openapi_and_health_stay_open_with_keys(
    make_client: Make, keys: tuple[Path, dict[str, str]]
) -> None:
    client = make_client(api_keys_file=keys[0])
    assert client.get("/docs").status_code == 200
    doc = client.get("/openapi.json")
    assert doc.status_code == 200
    # the docs page's Authorize button knows the scheme, and every guarded call names its scope
    assert "ApiKey" in doc.json()["components"]["securitySchemes"]
    predict = doc.json()["paths"]["/v1/checkpoints/{ref}/predict"]["post"]
    assert predict["security"] == [{"ApiKey": ["predict"]}]
    assert client.get("/healthz").status_code == 200
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/").status_code == 200  # the dashboard page itself (it asks for a key)


def test_callers_without_a_key_do_not_share_a_rate_with_a_principal_named_anonymous(
    make_client: Make, tmp_path: Path
) -> None:
    path = tmp_path / "keys.toml"
    key = add_key(path, "anonymous", ["predict"], predict_rate="2/minute")[0]
    client = make_client(api_keys_file=path, public_predict=True, predict_rate="2/minute")
    url = "/v1/checkpoints/lenet:best/predict"  # none: a 404, counted all the same
    body = {"pixels": [[0, 255], [255, 0]]}
    for _ in range(2):
        assert client.post(url, json=body).status_code == 404
    spent = client.post(url, json=body)  # the keyless callers' budget is spent
    assert spent.status_code == 429 and spent.json()["detail"].startswith("callers without a key")
    # the principal anonymous has a budget of its own, untouched by theirs
    assert client.post(url, json=body, headers=bearer(key)).status_code == 404
