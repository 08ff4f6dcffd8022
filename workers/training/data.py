"""Fashion-MNIST from its four IDX `.gz` files, verified against the published checksums.

The files are checked once per (path, size, mtime): the verdict is kept in memory and in a
small stamp file under `data_dir`, so a worker does not re-hash 30 MB before every job.
Zalando publishes the MD5 of each `.gz` file (torchvision checks the same numbers); Debian's
`dataset-fashion-mnist` recompresses the files, so the MD5 of the decompressed IDX bytes,
as other loaders list them, is accepted too.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import struct
import tempfile
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from workers.errors import DataError
from workers.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IdxFile:
    """One of the four files and its published checksums."""

    name: str
    gz_md5: str
    raw_md5: str
    magic: int
    count: int


TRAIN_IMAGES = IdxFile(
    "train-images-idx3-ubyte.gz",
    "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    0x0803,
    60000,
)
TRAIN_LABELS = IdxFile(
    "train-labels-idx1-ubyte.gz",
    "25c81989df183df01b3e8a0aad5dffbe",
    "9018921c3c673c538a1fc5bad174d6f9",
    0x0801,
    60000,
)
TEST_IMAGES = IdxFile(
    "t10k-images-idx3-ubyte.gz",
    "bef4ecab320f06d8554ea6380940ec79",
    "8181f5470baa50b63fa0f6fddb340f0a",
    0x0803,
    10000,
)
TEST_LABELS = IdxFile(
    "t10k-labels-idx1-ubyte.gz",
    "bb300cfdad3c16e7a12a480ee83cd310",
    "15d484375f8d13e6eb1aabb0c3f46965",
    0x0801,
    10000,
)
FILES: tuple[IdxFile, ...] = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

STAMP_NAME = "fashion-mnist-verified.json"
HOW_TO_GET = (
    "install Debian's package (`apt-get install dataset-fashion-mnist`, files in "
    "/usr/share/datasets/fashion-mnist), point CNNSERVE_FASHION_MNIST_DIR at a directory "
    "holding the four IDX .gz files, or set CNNSERVE_ALLOW_DOWNLOAD=true on a machine with "
    "network access"
)


@dataclass(frozen=True)
class FashionMNIST:
    """The whole data set as uint8 image tensors (N×28×28) and int64 label tensors."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    directory: Path
    md5: dict[str, str] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """What a checkpoint manifest records about the data it was trained on."""
        return {
            "name": "Fashion-MNIST",
            "train_examples": int(self.train_images.shape[0]),
            "test_examples": int(self.test_images.shape[0]),
            "idx_md5": dict(self.md5),
        }


_cache: dict[tuple[Any, ...], FashionMNIST] = {}
_cache_lock = threading.Lock()


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _read_stamp(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_stamp(path: Path, stamp: dict[str, Any]) -> None:
    """Best effort: a read-only data dir only costs a re-check next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as f:
            json.dump(stamp, f, indent=2)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot write the data checksum stamp %s: %s", path, exc)


def _parse_idx(spec: IdxFile, raw: bytes, path: Path) -> torch.Tensor:
    ndim = 3 if spec.magic == 0x0803 else 1
    header = 4 + 4 * ndim
    if len(raw) < header or struct.unpack(">I", raw[:4])[0] != spec.magic:
        raise DataError(f"Fashion-MNIST file {path} is not an IDX file of the expected kind")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if dims[0] != spec.count or len(raw) != header + int(torch.tensor(dims).prod()):
        raise DataError(
            f"Fashion-MNIST file {path} holds {dims} items, expected {spec.count}; "
            f"the file is truncated or not Fashion-MNIST: {HOW_TO_GET}"
        )
    t = torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8)
    return t.view(*dims) if ndim == 3 else t.to(torch.int64)


def _download(settings: Settings) -> Path:
    """Fetch the files with torchvision's downloader (only when the operator allows it)."""
    from torchvision.datasets import FashionMNIST as TVFashionMNIST

    root = settings.data_dir / "downloads"
    log.info("downloading Fashion-MNIST into %s (CNNSERVE_ALLOW_DOWNLOAD is set)", root)
    try:
        TVFashionMNIST(str(root), train=True, download=True)
        TVFashionMNIST(str(root), train=False, download=True)
    except (OSError, RuntimeError) as exc:
        raise DataError(f"downloading Fashion-MNIST failed: {exc}; instead {HOW_TO_GET}") from exc
    return root / "FashionMNIST" / "raw"


def _find_dir(settings: Settings) -> Path:
    directory = Path(settings.fashion_mnist_dir)
    missing = [f.name for f in FILES if not (directory / f.name).is_file()]
    if not missing:
        return directory
    if settings.allow_download:
        return _download(settings)
    if not directory.is_dir():
        raise DataError(
            f"the Fashion-MNIST directory {directory} does not exist "
            f"(CNNSERVE_FASHION_MNIST_DIR); to get the data, {HOW_TO_GET}"
        )
    raise DataError(
        f"Fashion-MNIST file {missing[0]} is missing from {directory}"
        f"{' (and ' + ', '.join(missing[1:]) + ')' if len(missing) > 1 else ''}; "
        f"to get it, {HOW_TO_GET}"
    )


def load_fashion_mnist(settings: Settings) -> FashionMNIST:
    """The verified data set from `settings.fashion_mnist_dir`, cached in this process.

    Raises `DataError` naming the file and how to get it when a file is missing or corrupt.
    """
    directory = _find_dir(settings)
    stats = []
    for spec in FILES:
        st = (directory / spec.name).stat()
        stats.append((spec.name, st.st_size, st.st_mtime_ns))
    key = (str(directory.resolve()), tuple(stats))
    with _cache_lock:
        cached = _cache.get(key)
        if cached is not None:
            return cached
        data = _load(directory, stats, settings.data_dir / STAMP_NAME)
        _cache.clear()
        _cache[key] = data
        return data


def _load(directory: Path, stats: list[tuple[str, int, int]], stamp_path: Path) -> FashionMNIST:
    stamp = _read_stamp(stamp_path)
    stamp_changed = False
    tensors: list[torch.Tensor] = []
    md5s: dict[str, str] = {}
    for spec, (_name, size, mtime_ns) in zip(FILES, stats, strict=True):
        path = directory / spec.name
        compressed = path.read_bytes()
        try:
            raw = gzip.decompress(compressed)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(
                f"Fashion-MNIST file {path} is damaged (not a readable gzip file: {exc}); "
                f"replace it: {HOW_TO_GET}"
            ) from exc
        seen = stamp.get(str(path.resolve()))
        if not (
            isinstance(seen, dict)
            and seen.get("size") == size
            and seen.get("mtime_ns") == mtime_ns
            and seen.get("raw_md5") == spec.raw_md5
        ):
            gz_md5 = _md5(compressed)
            raw_md5 = _md5(raw)
            if gz_md5 != spec.gz_md5 and raw_md5 != spec.raw_md5:
                raise DataError(
                    f"Fashion-MNIST file {path} fails its checksum (MD5 {gz_md5}, "
                    f"decompressed {raw_md5}; published {spec.gz_md5}, decompressed "
                    f"{spec.raw_md5}): it is damaged or not Fashion-MNIST; replace it: "
                    f"{HOW_TO_GET}"
                )
            stamp[str(path.resolve())] = {
                "size": size,
                "mtime_ns": mtime_ns,
                "raw_md5": spec.raw_md5,
            }
            stamp_changed = True
            log.info("verified %s against the published checksum", path)
        tensors.append(_parse_idx(spec, raw, path))
        md5s[spec.name.removesuffix(".gz")] = spec.raw_md5
    if stamp_changed:
        _write_stamp(stamp_path, stamp)
    train_x, train_y, test_x, test_y = tensors
    return FashionMNIST(train_x, train_y, test_x, test_y, directory, md5s)


def clear_cache() -> None:
    """Forget the in-process copy (tests)."""
    with _cache_lock:
        _cache.clear()
