"""`/v1/ops`: the seed's primitives over HTTP, with the seed's printed numbers."""

from __future__ import annotations

from fastapi.testclient import TestClient

X3 = [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0], [6.0, 7.0, 8.0]]


def test_corr2d_seed_example(client: TestClient) -> None:
    r = client.post("/v1/ops/corr2d", json={"X": X3, "K": [[0, 1], [2, 3]]})
    assert r.status_code == 200
    assert r.json() == {"op": "corr2d", "shape": [2, 2], "Y": [[19.0, 25.0], [37.0, 43.0]]}


def test_corr2d_multi_in_seed_example(client: TestClient) -> None:
    x = [X3, [[1, 2, 3], [4, 5, 6], [7, 8, 9]]]
    k = [[[0, 1], [2, 3]], [[1, 2], [3, 4]]]
    r = client.post("/v1/ops/corr2d", json={"X": x, "K": k})
    assert r.status_code == 200
    assert r.json()["op"] == "corr2d_multi_in"
    assert r.json()["Y"] == [[56.0, 72.0], [104.0, 120.0]]


def test_corr2d_multi_in_out_seed_example(client: TestClient) -> None:
    x = [X3, [[1, 2, 3], [4, 5, 6], [7, 8, 9]]]
    k0 = [[[0, 1], [2, 3]], [[1, 2], [3, 4]]]
    k = [
        k0,
        [[[v + 1 for v in row] for row in ch] for ch in k0],
        [[[v + 2 for v in row] for row in ch] for ch in k0],
    ]
    r = client.post("/v1/ops/corr2d", json={"X": x, "K": k})
    assert r.status_code == 200
    assert r.json()["op"] == "corr2d_multi_in_out"
    assert r.json()["shape"] == [3, 2, 2]
    assert r.json()["Y"] == [
        [[56.0, 72.0], [104.0, 120.0]],
        [[76.0, 100.0], [148.0, 172.0]],
        [[96.0, 128.0], [192.0, 224.0]],
    ]


def test_corr2d_1x1_is_a_matrix_product(client: TestClient) -> None:
    x = [X3, X3]
    k = [[[[1.0]], [[2.0]]]]
    r = client.post("/v1/ops/corr2d", json={"X": x, "K": k})
    assert r.status_code == 200
    assert r.json()["op"] == "corr2d_multi_in_out_1x1"
    assert r.json()["Y"] == [[[3.0 * v for v in row] for row in X3]]


def test_corr2d_errors(client: TestClient) -> None:
    cases = [
        {"X": [[1, 2], [3]], "K": [[1]]},  # ragged
        {"X": X3, "K": [[[1]]]},  # 2-D X with 3-D K
        {"X": [X3, X3, X3], "K": [[[1]], [[1]]]},  # channel mismatch
        {"X": [[1, 2]], "K": [[1, 2, 3]]},  # kernel larger than input
        {"X": [[0] * 65] * 65, "K": [[1]]},  # too large
        {"X": X3},  # missing K
    ]
    for body in cases:
        r = client.post("/v1/ops/corr2d", json=body)
        assert r.status_code == 422, body
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["detail"]
    big = [[[0.0] * 64] * 64] * 16
    r = client.post("/v1/ops/corr2d", json={"X": big, "K": [[[[1.0]]] * 16] * 16})
    assert r.status_code == 422
    assert "windows" in r.json()["detail"]


def test_pool2d_seed_examples(client: TestClient) -> None:
    r = client.post("/v1/ops/pool2d", json={"X": X3, "pool_size": [2, 2]})
    assert r.status_code == 200
    assert r.json()["Y"] == [[4.0, 5.0], [7.0, 8.0]]
    r = client.post("/v1/ops/pool2d", json={"X": X3, "pool_size": 2, "mode": "avg"})
    assert r.json()["Y"] == [[2.0, 3.0], [5.0, 6.0]]
    r = client.post("/v1/ops/pool2d", json={"X": X3, "pool_size": 4})
    assert r.status_code == 422
    r = client.post("/v1/ops/pool2d", json={"X": X3, "mode": "median"})
    assert r.status_code == 422


def test_output_size_seed_examples(client: TestClient) -> None:
    r = client.get("/v1/ops/output-size", params={"n": 8, "kernel": 3, "padding": 2, "stride": 2})
    assert r.status_code == 200
    body = r.json()
    assert body["output_size"] == 4
    assert "⌊" in body["formula"]
    # nn.Conv2d(kernel_size=3, padding=1): per-side padding 1 keeps an 8×8 input 8×8
    r = client.get(
        "/v1/ops/output-size",
        params={"n": 8, "kernel": 3, "padding": 1, "padding_convention": "per_side"},
    )
    assert r.json()["output_size"] == 8
    assert r.json()["total_padding"] == 2
    # 7.3: kernel (3, 5), padding (0, 1) per side, stride (3, 4) on 8×8 gives 2×2
    h = client.get("/v1/ops/output-size", params={"n": 8, "kernel": 3, "stride": 3}).json()
    w = client.get(
        "/v1/ops/output-size",
        params={"n": 8, "kernel": 5, "padding": 1, "stride": 4, "padding_convention": "per_side"},
    ).json()
    assert (h["output_size"], w["output_size"]) == (2, 2)


def test_output_size_errors(client: TestClient) -> None:
    assert client.get("/v1/ops/output-size", params={"n": 8, "kernel": 9}).status_code == 422
    assert client.get("/v1/ops/output-size", params={"n": 8, "kernel": 0}).status_code == 422
    assert client.get("/v1/ops/output-size", params={"n": 8}).status_code == 422
    r = client.get("/v1/ops/output-size", params={"n": 8, "kernel": 3, "stride": 0})
    assert r.headers["content-type"] == "application/problem+json"
