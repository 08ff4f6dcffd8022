"""`/v1/models`: listing, one model, and shape summaries by GET and POST."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.seed_printouts import LENET_28 as LENET_SEED_TEXT

PROBLEM = "application/problem+json"


def test_list_models_gives_recipes_and_parameter_counts(client: TestClient) -> None:
    r = client.get("/v1/models")
    assert r.status_code == 200
    models = {m["name"]: m for m in r.json()["models"]}
    assert list(models) == ["lenet", "vgg", "resnet18"]
    assert models["lenet"]["default_recipe"] == {
        "input_size": 28,
        "lr": 0.1,
        "epochs": 10,
        "batch_size": 128,
    }
    assert models["lenet"]["parameters"] == 61706
    assert models["vgg"]["default_recipe"]["input_size"] == 224
    assert models["vgg"]["default_recipe"]["lr"] == 0.01
    assert models["resnet18"]["default_recipe"]["input_size"] == 96
    assert models["vgg"]["archs"]["vgg11"] == [[1, 64], [1, 128], [2, 256], [2, 512], [2, 512]]
    assert models["vgg"]["default_arch"] == "small"
    assert all(m["description"] for m in models.values())


def test_get_one_model_and_unknown_model(client: TestClient) -> None:
    r = client.get("/v1/models/resnet18")
    assert r.status_code == 200
    assert r.json()["name"] == "resnet18"
    assert r.json()["section"] == "8.6"

    r = client.get("/v1/models/alexnet")
    assert r.status_code == 404
    assert r.headers["content-type"] == PROBLEM
    body = r.json()
    assert body["status"] == 404
    assert "alexnet" in body["detail"] and "lenet" in body["detail"]
    assert body["instance"] == "/v1/models/alexnet"


def test_summary_get_reproduces_the_seed_printout(client: TestClient) -> None:
    r = client.get("/v1/models/lenet/summary", params={"input_shape": "1,1,28,28"})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"model", "input_shape", "layers", "total_params", "total_macs", "text"}
    assert body["model"] == "lenet"
    assert body["input_shape"] == [1, 1, 28, 28]
    assert body["text"] == LENET_SEED_TEXT
    assert set(body["layers"][0]) == {"name", "type", "output_shape", "params", "macs"}
    assert body["layers"][0] == {
        "name": "net.0",
        "type": "Conv2d",
        "output_shape": [1, 6, 28, 28],
        "params": 156,
        "macs": 6 * 28 * 28 * 25,
    }
    assert body["total_params"] == 61706


def test_summary_defaults_to_the_model_input(client: TestClient) -> None:
    r = client.get("/v1/models/resnet18/summary")
    assert r.status_code == 200
    body = r.json()
    assert body["input_shape"] == [1, 1, 96, 96]
    assert body["layers"][-1]["output_shape"] == [1, 10]


def test_summary_get_with_named_arch_and_depth(client: TestClient) -> None:
    r = client.get("/v1/models/vgg/summary", params={"input_shape": "1,1,224,224", "arch": "vgg11"})
    assert r.status_code == 200
    shapes = [row["output_shape"] for row in r.json()["layers"]]
    assert shapes[:5] == [
        [1, 64, 112, 112],
        [1, 128, 56, 56],
        [1, 256, 28, 28],
        [1, 512, 14, 14],
        [1, 512, 7, 7],
    ]
    deep = client.get("/v1/models/lenet/summary", params={"depth": 2}).json()
    assert len(deep["layers"]) == 12  # lenet is flat: depth 2 gives the same rows


def test_summary_post_with_arch_pairs(client: TestClient) -> None:
    r = client.post(
        "/v1/models/vgg/summary",
        json={"input_shape": [2, 1, 64, 64], "arch": [[1, 8], [2, 16]], "depth": 1},
    )
    assert r.status_code == 200
    body = r.json()
    assert body["layers"][0]["output_shape"] == [2, 8, 32, 32]
    assert body["layers"][1]["output_shape"] == [2, 16, 16, 16]
    # an empty body is the default summary
    assert client.post("/v1/models/lenet/summary").json()["input_shape"] == [1, 1, 28, 28]


def test_summary_input_too_small_names_the_layer(client: TestClient) -> None:
    r = client.get("/v1/models/vgg/summary", params={"input_shape": "1,1,16,16"})
    assert r.status_code == 422
    assert r.headers["content-type"] == PROBLEM
    body = r.json()
    assert body["layer"].startswith("net.")
    assert body["layer"] in body["detail"]

    r = client.post("/v1/models/lenet/summary", json={"input_shape": [1, 1, 4, 4]})
    assert r.status_code == 422
    assert "net." in r.json()["detail"]


def test_summary_refuses_absurd_and_malformed_shapes(client: TestClient) -> None:
    for shape in ("1,1,5000,5000", "1000,1,28,28", "1,64,28,28"):
        r = client.get("/v1/models/lenet/summary", params={"input_shape": shape})
        assert r.status_code == 422, shape
        assert "1024" in r.json()["detail"]
    for shape in ("1,1,28", "a,b,c,d", "1,0,28,28"):
        r = client.get("/v1/models/lenet/summary", params={"input_shape": shape})
        assert r.status_code == 422, shape
        assert r.headers["content-type"] == PROBLEM
    r = client.post("/v1/models/lenet/summary", json={"input_shape": [1, 1, 28]})
    assert r.status_code == 422
    assert "input_shape" in r.json()["detail"]


def test_summary_bad_arch(client: TestClient) -> None:
    r = client.get("/v1/models/vgg/summary", params={"arch": "vgg99"})
    assert r.status_code == 422
    assert "vgg11" in r.json()["detail"]
    r = client.get("/v1/models/vgg/summary", params={"arch": "[[1,"})
    assert r.status_code == 422
    r = client.post("/v1/models/lenet/summary", json={"arch": "vgg11"})
    assert r.status_code == 422
    assert "lenet" in r.json()["detail"]
    r = client.get("/v1/models/nope/summary")
    assert r.status_code == 404
