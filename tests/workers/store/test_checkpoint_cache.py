"""Local disk is a cache only: bounded in bytes (least recently used out first), verified by
hash, and ONNX graphs go with their checkpoint (issue 23, item 14: the ONNX cache grew without
bound and pruned epochs left theirs)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.service.checkpoint_helpers import JOB_A, lenet, save
from workers.settings import Settings
from workers.store.cache import DiskCache
from workers.store.checkpoints import CheckpointStore


def cached_bytes(root: Path) -> int:
    return sum(
        p.stat().st_size for p in root.rglob("*") if p.is_file() and ".staging" not in p.parts
    )


def test_the_cache_keeps_the_most_recently_used_within_its_bytes(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path / "cache", max_bytes=2500)
    blobs = {name: bytes([i]) * 1000 for i, name in enumerate("abcd")}

    def get(name: str) -> Path:
        data = blobs[name]
        return cache.get(name, hashlib.sha256(data).hexdigest(), lambda p: p.write_bytes(data))

    for name in "abc":
        get(name)
    assert cached_bytes(cache.root) <= 2500
    assert not (cache.root / "a").exists()  # the least recently used went first
    get("b")  # used again: now the most recent
    get("d")
    assert {p.name for p in cache.root.iterdir() if p.is_file()} == {"b", "d"}
    (cache.root / "d").write_bytes(b"tampered")  # damaged on disk: fetched again, not served
    assert get("d").read_bytes() == blobs["d"]
    with pytest.raises(Exception, match="sha256"):
        cache.get("e", "0" * 64, lambda p: p.write_bytes(b"not what was recorded"))
    assert not (cache.root / "e").exists()


def test_onnx_graphs_and_weights_read_from_a_bucket_stay_within_the_cache_bytes(
    s3_url: str, settings: Settings, make_client: Callable[..., TestClient]
) -> None:
    store = CheckpointStore.from_settings(settings)
    ids = [save(store, lenet(trained=False), job_id=f"{i:016x}", epoch=1).id for i in range(4)]
    limit = 600_000  # about two checkpoints' weights and graphs (LeNet: ~250 KB each)
    client = make_client(cache_bytes=limit, model_cache_size=1)
    cache = settings.cache_dir
    for ckpt in ids:
        for path in ("model.onnx", "weights"):
            assert client.get(f"/v1/checkpoints/{ckpt}/{path}").status_code == 200
        assert cached_bytes(cache) <= limit, sorted(p.name for p in cache.rglob("*"))
    assert list(cache.rglob("*.onnx")), "the graph read last is kept"
    for ckpt in ids:  # evicted ones come back from the bucket, verified
        assert client.get(f"/v1/checkpoints/{ckpt}/model.onnx").status_code == 200
    store.close()


def test_a_pruned_epoch_takes_its_exported_graph_with_it(
    checkpoint_store: CheckpointStore, make_client: Callable[..., TestClient]
) -> None:
    client = make_client()
    first = save(checkpoint_store, lenet(trained=False), job_id=JOB_A, epoch=1, val_acc=0.1)
    assert client.get(f"/v1/checkpoints/{first.id}/model.onnx").status_code == 200
    assert [k for k in checkpoint_store.blobs.list_keys(f"{JOB_A}/e001/") if k.endswith(".onnx")]
    for epoch in (2, 3, 4):  # keep=1 in this save: e001 is neither best nor latest nor kept
        checkpoint_store.save(
            job_id=JOB_A,
            epoch=epoch,
            model=lenet(trained=False),
            manifest_fields={
                "model": "lenet",
                "input_size": 28,
                "preprocessing": first.preprocessing,
                "metrics": {"val_acc": 0.5},
            },
            keep=1,
        )
    assert list(checkpoint_store.blobs.list_keys(f"{JOB_A}/e001/")) == []


def test_a_download_survives_another_process_evicting_its_file(
    s3_url: str,
    settings: Settings,
    make_client: Callable[..., TestClient],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Processes sharing a data dir share the cache: one's eviction could unlink the file
    another had just verified, before its response opened it (a 500). A download streams
    from a hard link of its own, and a file evicted in between is fetched again."""
    store = CheckpointStore.from_settings(settings)
    ckpt = save(store, lenet(trained=False), job_id=JOB_A, epoch=1)
    client = make_client()
    api_store: CheckpointStore = client.app.state.checkpoint_store  # type: ignore[attr-defined]
    real = api_store.weights_path
    evicted: list[Path] = []

    def weights_path_then_evicted(ckpt_id: str) -> Path:
        path = real(ckpt_id)
        if not evicted:  # the first time, another process evicts it at once
            path.unlink()
            evicted.append(path)
        return path

    monkeypatch.setattr(api_store, "weights_path", weights_path_then_evicted)
    r = client.get(f"/v1/checkpoints/{ckpt.id}/weights")
    assert r.status_code == 200, r.text[:200]
    assert hashlib.sha256(r.content).hexdigest() == ckpt.weights_sha256
    assert evicted
    pins = [p for p in settings.cache_dir.rglob("*") if ".staging" in p.parts and p.is_file()]
    assert pins == []  # released once the response was sent

    # a pin outlives the file it was made from
    path = api_store.weights_path(ckpt.id)
    pin, release = api_store.files.pinned(path)
    path.unlink()
    assert hashlib.sha256(pin.read_bytes()).hexdigest() == ckpt.weights_sha256
    release()
    assert not pin.exists()
    store.close()
