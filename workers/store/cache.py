"""A bounded read-through cache of checkpoint files on local disk, verified by hash.

Each API process and worker whose checkpoints are in a bucket keeps the weights and ONNX graphs
it reads under `data_dir/cache`, up to `CNNSERVE_CACHE_BYTES`: least recently used out first
(a hit refreshes the file's mtime). A file enters the cache only once its sha256 matches the
one the checkpoint's index records, and is checked again on every read, so a damaged or
altered file is fetched afresh rather than served. Processes sharing a data directory share
the cache safely: files appear by rename, and one being read when another process evicts it
stays readable to its open handle.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

STAGING = ".staging"


class CacheVerifyError(Exception):
    """A fetched file does not match the sha256 it should have."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class DiskCache:
    """Files by name under `root`, at most `max_bytes` of them (always the one last used)."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = int(max_bytes)

    def staging_dir(self) -> Path:
        """A fresh directory beside the cache (same file system) for files being made."""
        path = self.root / STAGING / uuid.uuid4().hex
        path.mkdir(parents=True)
        return path

    def get(self, name: str, sha256: str, fetch: Callable[[Path], None]) -> Path:
        """The cached file `name` whose content has `sha256`, fetched with `fetch(dest)` when
        it is missing or fails its hash; `CacheVerifyError` when the fetched file fails too."""
        path = self.root / name
        try:
            if sha256_file(path) == sha256:
                os.utime(path)  # most recently used
                return path
            log.warning("cache: %s fails its sha256; fetching it again", path)
            path.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        staging = self.staging_dir()
        try:
            tmp = staging / "file"
            fetch(tmp)
            found = sha256_file(tmp)
            if found != sha256:
                raise CacheVerifyError(f"sha256 {found[:12]}… where {sha256[:12]}… was recorded")
            self.adopt(tmp, name)
        finally:
            _remove_tree(staging)
        return path

    def adopt(self, file: Path, name: str) -> Path:
        """Move a file this process made (and verified) into the cache as `name`."""
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(file, path)
        self.trim(keep=path)
        return path

    def forget(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def size(self) -> int:
        """Bytes of cached files now."""
        return sum(size for _, size, _ in self._files())

    def _files(self) -> list[tuple[float, int, Path]]:
        found: list[tuple[float, int, Path]] = []
        if not self.root.is_dir():
            return found
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if d != STAGING]
            for name in filenames:
                path = Path(dirpath) / name
                try:
                    st = path.stat()
                except FileNotFoundError:  # evicted by another process meanwhile
                    continue
                found.append((st.st_mtime, st.st_size, path))
        return found

    def trim(self, keep: Path | None = None) -> int:
        """Evict least recently used files until the cache fits `max_bytes`; bytes freed.

        `keep` (the file just used) stays even when it alone is larger than the limit.
        """
        files = sorted(self._files())
        total = sum(size for _, size, _ in files)
        freed = 0
        for _, size, path in files:
            if total - freed <= self.max_bytes:
                break
            if path == keep:
                continue
            path.unlink(missing_ok=True)
            freed += size
            log.info("cache: evicted %s (%d bytes)", path.name, size)
        return freed

    def clear_staging(self, older_than_s: float = 6 * 3600) -> None:
        """Remove what processes that died mid-write left being made (long enough ago that
        no live process sharing this directory is still at it)."""
        staging = self.root / STAGING
        if not staging.is_dir():
            return
        cutoff = time.time() - older_than_s
        for entry in staging.iterdir():
            try:
                if entry.stat().st_mtime < cutoff:
                    _remove_tree(entry)
            except FileNotFoundError:
                continue


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
