"""The local object store: files put by rename, whole or not at all."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from workers.store.blobs import LocalBlobs


def test_threads_putting_the_same_key_at_once_each_succeed_and_one_whole_file_wins(
    tmp_path: Path,
) -> None:
    """Two loader threads exporting the same ONNX graph put the same key at once; each put's
    temporary file must be its own (one per process collided: FileNotFoundError, a 500)."""
    blobs = LocalBlobs(tmp_path / "store")
    contents = [bytes([i]) * 200_000 for i in range(8)]

    def put(i: int) -> None:
        source = tmp_path / f"src-{i}"
        source.write_bytes(contents[i])
        blobs.put_file("0123456789abcdef/e001/model.onnx", source)

    for _ in range(5):
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(put, range(8)))  # raises if any put failed
        assert blobs.get_bytes("0123456789abcdef/e001/model.onnx") in contents
    leftovers = [p.name for p in (tmp_path / "store").rglob("*") if p.name.startswith(".")]
    assert leftovers == []
