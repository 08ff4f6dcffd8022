"""Catalogue-style product photos classify as well as the data set's own images of them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from bench.photos import catalogue_photo
from models import build_model
from service.api.app import create_app
from tests.service.checkpoint_helpers import fashion_test_set, png, save, trained_lenet_state
from workers.settings import Settings
from workers.store.checkpoints import CheckpointStore, Manifest

PHOTOS = 300


@pytest.fixture
def ckpt(settings: Settings) -> Manifest:
    model = build_model("lenet")
    model.load_state_dict(trained_lenet_state(steps=400))  # about 0.75 on the test set
    return save(CheckpointStore.from_settings(settings), model)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


def accuracy(
    client: TestClient, ref: str, blobs: list[bytes], labels: np.ndarray, query: str = ""
) -> float:
    predicted: list[int] = []
    for i in range(0, len(blobs), 50):
        files: list[Any] = [
            ("files", (f"{j}.jpg", b, "image/jpeg")) for j, b in enumerate(blobs[i : i + 50])
        ]
        r = client.post(f"/v1/checkpoints/{ref}/predict{query}", files=files)
        assert r.status_code == 200, r.text
        predicted += [p["class_id"] for p in r.json()["predictions"]]
    return float(np.mean(np.asarray(predicted) == labels))


@pytest.mark.slow
def test_product_photos_classify_within_three_points_of_the_raw_test_images(
    client: TestClient, ckpt: Manifest
) -> None:
    images, labels = fashion_test_set()
    images, labels = images[:PHOTOS], labels[:PHOTOS]
    photos = [catalogue_photo(im, seed=i) for i, im in enumerate(images)]
    assert all(b.startswith(b"\xff\xd8") and len(b) > 5000 for b in photos)  # JPEGs, hundreds of px

    raw = accuracy(client, ckpt.id, [png(im) for im in images], labels)
    converted = accuracy(client, ckpt.id, photos, labels)
    padded = accuracy(client, ckpt.id, photos, labels, "?preprocess=none")
    print(f"raw {raw:.3f}  photos {converted:.3f}  photos, preprocess=none {padded:.3f}")
    assert raw > 0.65  # a trained model, far above chance
    assert converted >= raw - 0.03
    assert converted > padded  # the data set's own conversion is what makes photos work
