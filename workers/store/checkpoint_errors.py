"""What the checkpoint store raises, and how its callers ride out a store that cannot be reached."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis

from workers.store.blobs import StoreUnavailableError

log = logging.getLogger(__name__)

#: What a store that cannot be reached raises: the files' store, or Redis under the index.
STORE_UNAVAILABLE: tuple[type[Exception], ...] = (
    StoreUnavailableError,
    redis.ConnectionError,
    redis.TimeoutError,
)
T = TypeVar("T")


class CheckpointError(Exception):
    """Base class for checkpoint-store errors."""


class CheckpointNotFoundError(CheckpointError, LookupError):
    """No checkpoint answers to this id or alias."""

    def __init__(self, ref: str, reason: str = "") -> None:
        self.ref = ref
        super().__init__(reason or f"no checkpoint {ref!r}")


class CheckpointCorruptError(CheckpointError):
    """A checkpoint whose files do not match its manifest."""


class JobNotOursError(CheckpointError):
    """A worker publishing for a job whose lease it lost: another worker owns the job now."""


class LineageError(ValueError):
    """An `init_from` that names no checkpoint, or one of another network."""

    def __init__(self, detail: str, differs: list[str] | None = None) -> None:
        self.differs = differs or []
        super().__init__(detail)


def retry_unavailable(
    op: Callable[[], T], *, stop: Callable[[], bool], what: str, max_delay_s: float = 10.0
) -> T:
    """`op()`, tried again (backing off) while the store is unreachable, until `stop()`."""
    delay = 0.25
    while True:
        try:
            return op()
        except STORE_UNAVAILABLE as exc:
            if stop():
                raise
            log.warning("%s: the checkpoint store is unavailable (%s); retrying", what, exc)
            time.sleep(delay)
            delay = min(delay * 2, max_delay_s)
