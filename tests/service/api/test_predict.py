"""`POST /v1/checkpoints/{ref}/predict`: real Fashion-MNIST images in, training's preprocessing,
top-k out, and every bad input answered with a quick, clear problem."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from models import CLASSES
from service.api.app import create_app
from tests.http_checks import assert_problem
from tests.service.checkpoint_helpers import (
    encode,
    fashion_test_set,
    huge_png_header,
    lenet,
    png,
    reference_probs,
    save,
)
from workers.settings import Settings
from workers.store.checkpoints import CheckpointStore, Manifest


@pytest.fixture
def store(settings: Settings) -> CheckpointStore:
    return CheckpointStore.from_settings(settings)


@pytest.fixture
def ckpt(store: CheckpointStore) -> Manifest:
    return save(store, lenet())


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    small = settings.model_copy(update={"max_images_per_request": 40})
    with TestClient(create_app(small)) as c:
        yield c


def url(m: Manifest | str, query: str = "") -> str:
    ref = m if isinstance(m, str) else m.id
    return f"/v1/checkpoints/{ref}/predict{query}"


def files(*blobs: bytes, name: str = "img.png", mime: str = "image/png") -> list[Any]:
    return [("files", (f"{i}-{name}", b, mime)) for i, b in enumerate(blobs)]


def full_probs(body: dict[str, Any]) -> np.ndarray:
    """The N×10 probability matrix from answers with top_k=10."""
    out = np.zeros((len(body["predictions"]), 10))
    for i, p in enumerate(body["predictions"]):
        for s in p["top_k"]:
            out[i, s["class_id"]] = s["probability"]
    return out


# --- answers ---------------------------------------------------------------------------------


def test_real_test_images_as_png_files(client: TestClient, ckpt: Manifest) -> None:
    images, labels = fashion_test_set()
    r = client.post(url(ckpt, "?top_k=10"), files=files(*(png(im) for im in images[:32])))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["checkpoint"] == ckpt.id and body["model"] == "lenet"
    assert len(body["predictions"]) == 32
    for p in body["predictions"]:
        scores = [s["probability"] for s in p["top_k"]]
        assert len(scores) == 10 and scores == sorted(scores, reverse=True)
        assert abs(sum(scores) - 1) < 1e-4
        assert {k: p[k] for k in ("label", "class_id", "probability")} == p["top_k"][0]
        assert all(s["label"] == CLASSES[s["class_id"]] for s in p["top_k"])
    # exactly what the network gives the tensor training would have built from these images
    want = reference_probs(lenet(), images[:32])
    assert np.abs(full_probs(body) - want).max() < 1e-4
    predicted = np.array([p["class_id"] for p in body["predictions"]])
    assert (predicted == labels[:32]).mean() > 0.4  # a few seconds of training; chance is 0.1


def test_base64_images_and_pixels_answer_like_files(client: TestClient, ckpt: Manifest) -> None:
    images = fashion_test_set()[0][:3]
    via_files = client.post(url(ckpt, "?top_k=10"), files=files(*(png(im) for im in images)))
    b64 = [base64.b64encode(png(im)).decode() for im in images]
    b64[1] = "data:image/png;base64," + b64[1]
    via_b64 = client.post(url(ckpt, "?top_k=10"), json={"images": b64})
    via_pixels = client.post(url(ckpt, "?top_k=10"), json={"pixels": images.tolist()})
    one = client.post(url(ckpt, "?top_k=10"), json={"pixels": images[0].tolist()})
    for r in (via_files, via_b64, via_pixels, one):
        assert r.status_code == 200, r.text
    assert via_files.json()["predictions"] == via_b64.json()["predictions"]
    assert via_files.json()["predictions"] == via_pixels.json()["predictions"]
    assert one.json()["predictions"] == via_pixels.json()["predictions"][:1]


def test_top_k_default_is_one(client: TestClient, ckpt: Manifest) -> None:
    r = client.post(url(ckpt), json={"pixels": fashion_test_set()[0][0].tolist()})
    assert len(r.json()["predictions"][0]["top_k"]) == 1


def test_every_allowed_format_by_content_not_name(client: TestClient, ckpt: Manifest) -> None:
    img = fashion_test_set()[0][0]
    blobs = [encode(img, f) for f in ("PNG", "JPEG", "WEBP", "BMP")]
    # a misleading file name and media type do not matter: the content decides
    r = client.post(url(ckpt), files=files(*blobs, name="photo.gif", mime="image/gif"))
    assert r.status_code == 200, r.text
    labels = {p["class_id"] for p in r.json()["predictions"]}
    assert len(r.json()["predictions"]) == 4 and len(labels) == 1


def test_photos_are_inverted_padded_and_scaled_like_training(
    client: TestClient, ckpt: Manifest
) -> None:
    images = fashion_test_set()[0][:8]
    original = full_probs(
        client.post(url(ckpt, "?top_k=10"), files=files(*(png(im) for im in images))).json()
    )
    # dark-on-light (a product photo): auto-inverted back to Fashion-MNIST's look
    light = [png(255 - im) for im in images]
    auto = full_probs(client.post(url(ckpt, "?top_k=10"), files=files(*light)).json())
    assert np.abs(auto - original).max() < 1e-5
    kept = full_probs(client.post(url(ckpt, "?top_k=10&invert=false"), files=files(*light)).json())
    assert np.abs(kept - original).max() > 0.05
    # RGB with a transparent-free white background: grayscale, inverted
    rgb = [png(np.stack([255 - im] * 3, axis=-1)) for im in images]
    assert (
        np.abs(
            full_probs(client.post(url(ckpt, "?top_k=10"), files=files(*rgb)).json()) - original
        ).max()
        < 1e-5
    )
    # 4× larger: Lanczos back to 28×28 keeps the predicted classes
    big = [png(np.kron(im, np.ones((4, 4), np.uint8))) for im in images]
    scaled = full_probs(client.post(url(ckpt, "?top_k=10"), files=files(*big)).json())
    assert (scaled.argmax(1) == original.argmax(1)).mean() >= 0.75
    # a non-square crop is padded with black to a square
    top = images[0][:14]
    padded = np.zeros((28, 28), np.uint8)
    padded[7:21] = top
    a = client.post(url(ckpt, "?top_k=10&invert=false"), files=files(png(top))).json()
    b = client.post(url(ckpt, "?top_k=10&invert=false"), files=files(png(padded))).json()
    assert np.abs(full_probs(a) - full_probs(b)).max() < 1e-6


def test_larger_input_models_get_trainings_bilinear_resize(
    client: TestClient, store: CheckpointStore
) -> None:
    model = lenet(input_size=56, trained=False)
    m = save(store, model, job_id="00000000000000aa", input_size=56)
    images = fashion_test_set()[0][:6]
    r = client.post(url(m, "?top_k=10"), files=files(*(png(im) for im in images)))
    assert r.status_code == 200
    want = reference_probs(model, images, input_size=56)
    assert np.abs(full_probs(r.json()) - want).max() < 1e-4


def test_concurrent_requests_are_batched(client: TestClient, ckpt: Manifest) -> None:
    images = fashion_test_set()[0][:24]
    client.post(url(ckpt), files=files(png(images[0])))  # load the model first

    def sample() -> float:
        return (
            REGISTRY.get_sample_value("cnnserve_inference_batch_size_sum", {"model": "lenet"})
            or 0.0
        )

    def count() -> float:
        return (
            REGISTRY.get_sample_value("cnnserve_inference_batch_size_count", {"model": "lenet"})
            or 0.0
        )

    images_before, batches_before = sample(), count()
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda im: client.post(url(ckpt), files=files(png(im))), images))
    assert all(r.status_code == 200 for r in answers)
    assert sample() - images_before == 24
    assert count() - batches_before < 24  # some requests shared a forward pass
    metrics = client.get("/metrics").text
    assert "cnnserve_inference_batch_size_bucket" in metrics
    assert "cnnserve_model_cache_hits_total" in metrics


# --- refusals --------------------------------------------------------------------------------


def test_gif_is_415(client: TestClient, ckpt: Manifest) -> None:
    gif = encode(fashion_test_set()[0][0], "GIF")
    body = assert_problem(client.post(url(ckpt), files=files(gif, name="a.gif")), 415, "GIF")
    assert "PNG" in body["detail"] and body["image_index"] == 0


def test_text_posing_as_png_is_refused_clearly(client: TestClient, ckpt: Manifest) -> None:
    r = client.post(url(ckpt), files=files(b"definitely an image\n" * 10, name="cat.png"))
    assert_problem(r, 415, "text", "PNG, JPEG, WebP or BMP")
    # PNG magic followed by junk: a damaged image, 422
    r = client.post(url(ckpt), files=files(b"\x89PNG\r\n\x1a\n" + b"junk" * 50))
    assert_problem(r, 422, "PNG")
    # the second image of three is the bad one, and the answer says so
    good = png(fashion_test_set()[0][0])
    r = client.post(url(ckpt), files=files(good, b"GIF89a....", good))
    assert assert_problem(r, 415, "image 1")["image_index"] == 1


def test_decompression_bomb_is_refused_before_decoding(client: TestClient, ckpt: Manifest) -> None:
    bomb = huge_png_header(20000, 20000)
    started = time.perf_counter()
    r = client.post(url(ckpt), files=files(bomb))
    elapsed = time.perf_counter() - started
    assert_problem(r, 413, "pixels", "downscale")
    assert elapsed < 2.0  # decoding it would take 400 MB and many seconds
    r = client.post(url(ckpt), json={"images": [base64.b64encode(bomb).decode()]})
    assert_problem(r, 413, "pixels")
    # and the server is fine afterwards
    assert client.get("/healthz").status_code == 200
    assert client.post(url(ckpt), files=files(png(fashion_test_set()[0][0]))).status_code == 200


def test_200_mb_body_is_refused_unread(client: TestClient, ckpt: Manifest) -> None:
    sent = 0

    def body() -> Iterator[bytes]:
        nonlocal sent
        chunk = b"\0" * (1 << 20)
        for _ in range(200):
            sent += len(chunk)
            yield chunk

    started = time.perf_counter()
    r = client.post(
        url(ckpt),
        content=body(),
        headers={
            "content-type": "multipart/form-data; boundary=x",
            "content-length": str(200 * (1 << 20)),
        },
    )
    assert_problem(r, 413, "limit")
    assert time.perf_counter() - started < 5.0
    assert client.get("/healthz").status_code == 200


def test_too_many_images(client: TestClient, ckpt: Manifest) -> None:
    img = fashion_test_set()[0][0]
    blob = png(img)
    assert client.post(url(ckpt), files=files(*[blob] * 40)).status_code == 200
    assert_problem(client.post(url(ckpt), files=files(*[blob] * 41)), 413, "at most 40")
    b64 = base64.b64encode(blob).decode()
    assert_problem(client.post(url(ckpt), json={"images": [b64] * 41}), 413, "at most 40")
    assert_problem(client.post(url(ckpt), json={"pixels": [img.tolist()] * 41}), 413, "at most 40")


@pytest.mark.parametrize("query", ["?top_k=0", "?top_k=11", "?top_k=x", "?invert=maybe"])
def test_query_bounds(client: TestClient, ckpt: Manifest, query: str) -> None:
    r = client.post(url(ckpt, query), json={"pixels": [[0, 1], [1, 0]]})
    body = assert_problem(r, 422)
    assert "top_k" in body["detail"] or "invert" in body["detail"]


@pytest.mark.parametrize(
    ("payload", "status", "words"),
    [
        ({"images": ["not base64!"]}, 422, ["base64"]),
        ({"images": []}, 422, ["empty"]),
        ({"pixels": [[0, 300]]}, 422, ["0 to 255"]),
        ({"pixels": [[0, 1], [2]]}, 422, ["rectangular"]),
        ({"pixels": []}, 422, ["empty"]),
        ({"pixels": [[]]}, 422, ["empty"]),
        ({"pixels": [[[]]]}, 422, ["empty"]),
        ({"pixels": [[[0, 1]], []]}, 422, ["empty"]),
        ({"pixels": [[0, 1]], "images": ["x"]}, 422, ["exactly one"]),
        ({}, 422, ["exactly one"]),
        ({"pixels": "abc"}, 422, ["pixels"]),
        ({"imgs": []}, 422, ["imgs"]),
    ],
)
def test_bad_json_bodies(
    client: TestClient, ckpt: Manifest, payload: dict[str, Any], status: int, words: list[str]
) -> None:
    assert_problem(client.post(url(ckpt), json=payload), status, *words)


def test_bad_bodies(client: TestClient, ckpt: Manifest) -> None:
    r = client.post(url(ckpt), content=b"hello", headers={"content-type": "text/plain"})
    assert_problem(r, 415, "multipart/form-data", "application/json")
    r = client.post(url(ckpt), content=b"{not json", headers={"content-type": "application/json"})
    assert_problem(r, 422, "json")
    assert_problem(client.post(url(ckpt), data={"files": "x.png"}), 415, "multipart")
    text_part = client.post(url(ckpt), files={"files": (None, b"x.png")})
    assert_problem(text_part, 422, "not a file upload")
    assert_problem(
        client.post(url(ckpt), files=[("image", ("a.png", b"x", "image/png"))]), 422, "'files'"
    )
    assert_problem(client.post(url(ckpt), files=files(b"")), 422, "empty")


def test_unknown_checkpoint_is_404_before_reading_the_body(client: TestClient) -> None:
    r = client.post(url("0123456789abcdef-e042"), files=files(b"anything"))
    assert_problem(r, 404, "checkpoint")
    assert_problem(client.post(url("resnet18:best"), json={"pixels": [[0]]}), 404, "resnet18")


def test_small_and_large_multipart_bodies_read_alike(client: TestClient, ckpt: Manifest) -> None:
    """Bodies up to 256 KiB are parsed in one pass, bigger ones streamed: same answers, same
    refusals, whichever path a body takes."""
    blob = png(fashion_test_set()[0][0])
    small = client.post(url(ckpt, "?top_k=3"), files=files(blob, blob))
    padding = {"note": "x" * (300 * 1024)}  # a text field pushes the body past 256 KiB
    large = client.post(url(ckpt, "?top_k=3"), files=files(blob, blob), data=padding)
    assert small.status_code == large.status_code == 200, (small.text, large.text)
    assert small.json() == large.json()
    for extra in ({}, padding):
        text_part = client.post(url(ckpt), files={"files": (None, b"x.png")}, data=extra)
        assert_problem(text_part, 422, "not a file upload")
        other = client.post(url(ckpt), files={"image": ("a.png", blob, "image/png")}, data=extra)
        assert_problem(other, 422, "named 'files'", "image")
    broken = client.post(
        url(ckpt),
        content=b"--x\r\nContent-Disposition: form-data; name=files\r\n\r\nabc",
        headers={"content-type": "multipart/form-data"},
    )
    assert_problem(broken, 422, "could not be read", "boundary")
