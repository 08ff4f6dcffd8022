"""`/v1/models`: listing, one model, and shape summaries by GET and POST."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from tests.book_printouts import DENSENET_96, NIN_224, REGNETX32_96
from tests.seed_printouts import LENET_28 as LENET_SEED_TEXT

PROBLEM = "application/problem+json"


def test_list_models_gives_recipes_and_parameter_counts(client: TestClient) -> None:
    r = client.get("/v1/models")
    assert r.status_code == 200
    models = {m["name"]: m for m in r.json()["models"]}
    assert list(models)[:3] == ["lenet", "vgg", "resnet18"]  # the seed's three first
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


#: The issue's table: section, the book's summary shape (its recipe's resize), parameters
#: there, the recipe's lr; and the smallest input_size a job takes.
BOOK_TABLE = {
    "alexnet": ("8.1", 224, 46_764_746, 0.01, 65),
    "nin": ("8.3", 224, 1_992_166, 0.05, 67),
    "googlenet": ("8.4", 96, 5_977_530, 0.01, 28),
    "bn_lenet": ("8.5", 28, 44_878, 0.1, 28),
    "densenet": ("8.7", 96, 758_226, 0.01, 29),
    "regnetx32": ("8.8", 96, 179_290, 0.05, 28),
}


def test_the_models_list_the_rest_of_chapter_8_with_the_book_recipes(client: TestClient) -> None:
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert list(models) == ["lenet", "vgg", "resnet18", *BOOK_TABLE]
    for name, (section, size, params, lr, smallest) in BOOK_TABLE.items():
        info = models[name]
        assert info["section"] == section, name
        assert info["default_recipe"] == {
            "input_size": size,
            "lr": lr,
            "epochs": 10,
            "batch_size": 128,
        }, name
        assert info["parameters"] == params, name
        assert info["min_input_size"] == smallest, name
        assert info["description"].startswith(
            {"bn_lenet": "LeNet with batch", "nin": "Network in Network"}.get(name, "")
        )
    assert [models[n]["min_input_size"] for n in ("lenet", "vgg", "resnet18")] == [28, 32, 28]
    assert models["densenet"]["archs"] == {
        "book": {"num_channels": 64, "growth_rate": 32, "arch": [4, 4, 4, 4]}
    }
    assert models["regnetx32"]["archs"]["regnetx32"] == {
        "stem_channels": 32,
        "arch": [[4, 32, 16, 1], [6, 80, 16, 1]],
    }
    assert "growth_rate" in models["densenet"]["arch_form"]
    assert "bot_mul" in models["regnetx32"]["arch_form"]
    assert models["alexnet"]["arch_form"] is None and models["alexnet"]["archs"] == {}


@pytest.mark.parametrize(
    ("name", "shape", "text"),
    [
        ("nin", "1,1,224,224", NIN_224),
        ("densenet", "1,1,96,96", DENSENET_96),
        ("regnetx32", "1,1,96,96", REGNETX32_96),
    ],
)
def test_a_summary_at_the_book_shape_is_the_book_printout(
    client: TestClient, name: str, shape: str, text: str
) -> None:
    body = client.get(f"/v1/models/{name}/summary", params={"input_shape": shape}).json()
    assert body["text"] == text
    assert body["total_params"] == BOOK_TABLE[name][2]


def test_summaries_take_the_book_parameters_as_an_arch_object(client: TestClient) -> None:
    arch = {"growth_rate": 16, "arch": [2, 2]}
    got = client.get(
        "/v1/models/densenet/summary",
        params={"input_shape": "1,1,32,32", "arch": json.dumps(arch)},
    )
    assert got.status_code == 200, got.text
    posted = client.post(
        "/v1/models/densenet/summary", json={"input_shape": [1, 1, 32, 32], "arch": arch}
    )
    assert posted.json() == got.json()
    channels = [row["output_shape"][1] for row in got.json()["layers"]]
    assert channels == [64, 64 + 2 * 16, (64 + 32) // 2, 48 + 2 * 16, 10]

    anynet = {"stem_channels": 16, "arch": [[2, 32, 16, 1], [1, 64, 16, 0.5]]}
    r = client.post(
        "/v1/models/regnetx32/summary", json={"input_shape": [1, 1, 28, 28], "arch": anynet}
    )
    assert r.status_code == 200, r.text
    assert [row["output_shape"] for row in r.json()["layers"]] == [
        [1, 16, 14, 14],
        [1, 32, 7, 7],
        [1, 64, 4, 4],
        [1, 10],
    ]


@pytest.mark.parametrize(
    ("name", "arch", "said"),
    [
        ("densenet", {"growth_rate": 0}, "growth_rate must be 1-128"),
        ("densenet", {"blocks": [4]}, "has no 'blocks'"),
        ("regnetx32", {"arch": [[4, 50, 16, 1]]}, "groups 16 wide"),
        ("regnetx32", [[4, 32]], "a name or an object"),
        ("vgg", {"arch": [4]}, "a name or [count, channels] pairs"),
        ("alexnet", {"hidden": 256}, "fixed architecture"),
    ],
)
def test_a_bad_arch_object_is_a_422_that_says_what_is_wrong(
    client: TestClient, name: str, arch: object, said: str
) -> None:
    for r in (
        client.post(f"/v1/models/{name}/summary", json={"arch": arch}),
        client.get(f"/v1/models/{name}/summary", params={"arch": json.dumps(arch)}),
    ):
        assert r.status_code == 422
        assert r.headers["content-type"] == PROBLEM
        assert said in r.json()["detail"]
    r = client.get("/v1/models/densenet/summary", params={"arch": "{growth"})
    assert r.status_code == 422 and "not a JSON object" in r.json()["detail"]


def test_a_summary_below_the_smallest_size_names_the_layer(client: TestClient) -> None:
    r = client.get("/v1/models/alexnet/summary", params={"input_shape": "1,1,64,64"})
    assert r.status_code == 422
    assert r.json()["layer"] == "net.12"
    assert client.get("/v1/models/alexnet/summary", params={"input_shape": "1,1,65,65"}).json()[
        "layers"
    ][-1]["output_shape"] == [1, 10]


def test_get_one_model_and_unknown_model(client: TestClient) -> None:
    r = client.get("/v1/models/resnet18")
    assert r.status_code == 200
    assert r.json()["name"] == "resnet18"
    assert r.json()["section"] == "8.6"

    r = client.get("/v1/models/mobilenet")
    assert r.status_code == 404
    assert r.headers["content-type"] == PROBLEM
    body = r.json()
    assert body["status"] == 404
    assert "mobilenet" in body["detail"] and "regnetx32" in body["detail"]
    assert body["instance"] == "/v1/models/mobilenet"


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
