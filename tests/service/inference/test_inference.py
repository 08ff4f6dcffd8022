"""The inference path: preprocessing, backends (ONNX Runtime vs eager), model cache, batching."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY

import service.inference.backends as inference_mod
from models import build_model
from service.inference.backends import (
    load_for_inference,
    onnx_name,
)
from service.inference.batcher import InferenceService
from service.inference.cache import ModelCache
from service.inference.images import (
    ImageInputError,
    ImageTooLargeError,
    UnsupportedImageError,
    decode_image,
    pixels_to_array,
)
from tests.service.checkpoint_helpers import (
    JOB_A,
    JOB_B,
    damage,
    encode,
    fashion_test_set,
    huge_png_header,
    lenet,
    png,
    reference_probs,
    save,
)
from workers.preprocessing import grayscale
from workers.settings import Settings
from workers.store.checkpoints import CheckpointStore, Preprocessing


@pytest.fixture
def store(settings: Settings) -> CheckpointStore:
    return CheckpointStore.from_settings(settings)


@pytest.fixture
def service(settings: Settings, store: CheckpointStore) -> Iterator[InferenceService]:
    svc = InferenceService(settings, store)
    yield svc
    svc.close()


def metric(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


# --- images ----------------------------------------------------------------------------------


def test_decode_reads_every_allowed_format_by_content() -> None:
    img = fashion_test_set()[0][0]
    for fmt in ("PNG", "BMP"):
        assert np.array_equal(decode_image(encode(img, fmt), max_pixels=10_000), img), fmt
    webp = decode_image(encode(img, "WEBP"), max_pixels=10_000)  # WebP has no gray mode
    assert webp.shape == (28, 28, 3) and np.array_equal(grayscale(webp), img)
    jpeg = decode_image(encode(img, "JPEG"), max_pixels=10_000)
    assert jpeg.shape == (28, 28) and np.abs(jpeg.astype(int) - img).mean() < 8


def test_decode_refuses_gif_text_and_damaged_png() -> None:
    img = fashion_test_set()[0][0]
    with pytest.raises(UnsupportedImageError, match="GIF"):
        decode_image(encode(img, "GIF"), max_pixels=10_000)
    with pytest.raises(UnsupportedImageError, match="text"):
        decode_image(b"hello, I am a PNG, honest", max_pixels=10_000)
    with pytest.raises(ImageInputError, match="PNG"):
        decode_image(png(img)[:40], max_pixels=10_000)


def test_decode_refuses_a_bomb_from_its_header(tmp_path: Path) -> None:
    bomb = huge_png_header(20000, 20000)
    assert len(bomb) < 200
    with pytest.raises(ImageTooLargeError, match="400000000 pixels"):
        decode_image(bomb, max_pixels=4096 * 4096)
    # just over the limit (below Pillow's own 2× guard) is refused by our header check
    with pytest.raises(ImageTooLargeError, match="101×100"):
        decode_image(huge_png_header(101, 100), max_pixels=100 * 100)


def test_pixels_are_checked() -> None:
    assert pixels_to_array([[0, 255.0]], max_pixels=10, index=0).dtype == np.uint8
    with pytest.raises(ImageInputError, match="0 to 255"):
        pixels_to_array([[0, 256]], max_pixels=10, index=0)
    with pytest.raises(ImageInputError, match="rectangular"):
        pixels_to_array([[0, 1], [2]], max_pixels=10, index=0)
    with pytest.raises(ImageTooLargeError):
        pixels_to_array([[0] * 5] * 5, max_pixels=10, index=0)


# --- backends --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "input_size", "arch"),
    [("lenet", 28, None), ("lenet", 56, None), ("resnet18", 64, None), ("vgg", 32, "small")],
)
def test_onnxruntime_agrees_with_eager_pytorch(
    store: CheckpointStore, tmp_path: Path, name: str, input_size: int, arch: str | None
) -> None:
    torch.manual_seed(0)
    model = build_model(name, arch=arch, input_size=input_size).eval()
    manifest = store.save(
        job_id=JOB_A,
        epoch=1,
        model=model,
        manifest_fields={
            "model": name,
            "arch": arch,
            "input_size": input_size,
            "preprocessing": Preprocessing(resize=input_size),
        },
    ).manifest
    ort_model = load_for_inference(store, manifest.id, backend="auto", threads=2)
    eager = load_for_inference(store, manifest.id, backend="eager", threads=2)
    assert ort_model.backend == "onnxruntime" and eager.backend == "eager"
    assert ort_model.onnx_path is not None and ort_model.onnx_path.is_file()
    images = fashion_test_set()[0][:8]
    x = (images.astype(np.float32) * np.float32(1 / 255))[:, None]
    want = reference_probs(model, images, input_size)
    assert np.abs(eager.run(x) - want).max() < 1e-5
    assert np.abs(ort_model.run(x) - want).max() < 1e-4
    assert np.array_equal(ort_model.run(x).argmax(1), want.argmax(1))


def test_onnx_export_is_kept_by_weights_and_failures_fall_back_to_eager(
    store: CheckpointStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = save(store, lenet(trained=False))
    first = load_for_inference(store, manifest.id, backend="auto", threads=1)
    assert first.onnx_path is not None
    assert manifest.weights_sha256[:32] in onnx_name(manifest)
    key = f"{manifest.job_id}/e{manifest.epoch:03d}/onnx/{onnx_name(manifest)}"
    assert key in set(store.blobs.list_keys())  # published beside its checkpoint
    exported = store.blobs.get_bytes(key)

    def broken_export(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated exporter failure")

    monkeypatch.setattr(inference_mod, "export_onnx", broken_export)
    again = load_for_inference(store, manifest.id, backend="auto", threads=1)
    assert again.backend == "onnxruntime" and store.blobs.get_bytes(key) == exported  # reused
    damage(store, manifest.id, f"onnx/{onnx_name(manifest)}", lambda b: b[: len(b) // 2])
    fallback = load_for_inference(store, manifest.id, backend="auto", threads=1)
    assert fallback.backend == "eager"
    x = np.zeros((1, 1, 28, 28), np.float32)
    assert fallback.run(x).shape == (1, 10)


# --- cache -----------------------------------------------------------------------------------


def test_model_cache_is_an_lru_that_counts_hits_and_misses(
    store: CheckpointStore, tmp_path: Path
) -> None:
    manifests = [save(store, lenet(trained=False), epoch=e) for e in (1, 2, 3)]
    loads: list[str] = []

    def loader(ckpt_id: str) -> inference_mod.LoadedModel:
        loads.append(ckpt_id)
        return load_for_inference(store, ckpt_id, backend="eager", threads=1)

    cache = ModelCache(loader, size=2)
    hits0 = metric("cnnserve_model_cache_hits_total")
    misses0 = metric("cnnserve_model_cache_misses_total")
    a, b, c = manifests
    for m in (a, b):
        assert cache.lookup(m.id, m.weights_sha256) is None
        cache.load(m.id, m.weights_sha256)
    assert cache.lookup(a.id, a.weights_sha256) is not None  # a is now the most recent
    cache.load(c.id, c.weights_sha256)  # evicts b, the least recently used
    assert a.id in cache and c.id in cache and b.id not in cache and len(cache) == 2
    assert loads == [a.id, b.id, c.id]
    assert metric("cnnserve_model_cache_hits_total") - hits0 == 1
    assert metric("cnnserve_model_cache_misses_total") - misses0 == 3
    # a checkpoint rewritten with other weights is not served from the stale entry
    assert cache.lookup(a.id, "0" * 64) is None


# --- batching --------------------------------------------------------------------------------


async def _concurrent(svc: InferenceService, manifest_id: str, n: int) -> list[np.ndarray]:
    manifest = svc.store.manifest(manifest_id)
    images = fashion_test_set()[0][:n]
    xs = [(img.astype(np.float32) * np.float32(1 / 255))[None, None] for img in images]
    await svc.model(manifest)  # loaded before the burst, as a warm server is
    results = await asyncio.gather(*(svc.predict(manifest, x) for x in xs))
    return [probs for _, probs in results]


def _record_batches(svc: InferenceService, manifest_id: str) -> list[int]:
    sizes: list[int] = []
    manifest = svc.store.manifest(manifest_id)
    loaded = svc.cache.load(manifest.id, manifest.weights_sha256)
    inner = loaded.run_batch

    def recording(x: np.ndarray) -> np.ndarray:
        sizes.append(len(x))
        return inner(x)

    loaded.run_batch = recording
    return sizes


def test_concurrent_requests_share_one_forward_pass(
    settings: Settings, store: CheckpointStore
) -> None:
    model = lenet()
    manifest = save(store, model)
    svc = InferenceService(settings.model_copy(update={"batch_window_ms": 20.0}), store)
    try:
        sizes = _record_batches(svc, manifest.id)
        probs = asyncio.run(_concurrent(svc, manifest.id, 16))
    finally:
        svc.close()
    assert sum(sizes) == 16 and len(sizes) < 16 and max(sizes) > 1
    want = reference_probs(model, fashion_test_set()[0][:16])
    assert np.abs(np.concatenate(probs) - want).max() < 1e-4  # each got its own rows back


def test_batches_respect_max_batch_size_and_batching_can_be_switched_off(
    settings: Settings, store: CheckpointStore
) -> None:
    manifest = save(store, lenet(trained=False))
    capped = InferenceService(
        settings.model_copy(update={"batch_window_ms": 20.0, "max_batch_size": 4}), store
    )
    try:
        sizes = _record_batches(capped, manifest.id)
        asyncio.run(_concurrent(capped, manifest.id, 16))
    finally:
        capped.close()
    assert sum(sizes) == 16 and max(sizes) <= 4
    off = InferenceService(settings.model_copy(update={"batching": False}), store)
    try:
        sizes = _record_batches(off, manifest.id)
        asyncio.run(_concurrent(off, manifest.id, 8))
    finally:
        off.close()
    assert sizes == [1] * 8


def test_inference_metrics_record_batches(
    service: InferenceService, store: CheckpointStore
) -> None:
    manifest = save(store, lenet(trained=False), job_id=JOB_B)
    before = metric("cnnserve_inference_batch_size_count", {"model": "lenet"})
    asyncio.run(_concurrent(service, manifest.id, 4))
    assert metric("cnnserve_inference_batch_size_count", {"model": "lenet"}) > before
    assert metric("cnnserve_inference_latency_seconds_count", {"model": "lenet"}) > 0
