"""Publishing an attempt's checkpoints, in order, beside training.

The engine stages each epoch's checkpoint on local disk (a snapshot of the weights and the
optimizer, at once) and hands it here. For a remote store (a bucket) one thread uploads and
publishes the checkpoints in the order they came while the next epoch trains, then reports each
to the callbacks; for the local directory, where publishing is a rename, it happens at once.
While the store cannot be reached, a publication waits and tries again (the staged files stay
on disk) until it succeeds or `stop()` says this worker no longer owns the job; `drain` waits
for what is pending, so an attempt ends only once its checkpoints are visible. A checkpoint
whose turn comes after `lost()` (another worker resumed the job: this one's lease lapsed) is
dropped, not published over the other worker's.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from workers.store.checkpoints import (
    STORE_UNAVAILABLE,
    CheckpointStore,
    JobNotOursError,
    SavedCheckpoint,
    StagedCheckpoint,
    retry_unavailable,
)
from workers.store.jobs import EpochMetrics

log = logging.getLogger(__name__)

Published = Callable[[EpochMetrics, SavedCheckpoint], None]


class Publisher:
    """Publishes staged checkpoints in order, off the training thread for a remote store."""

    def __init__(
        self,
        store: CheckpointStore,
        keep: int,
        on_published: Published,
        stop: Callable[[], bool],
        lost: Callable[[], bool] = lambda: False,
    ) -> None:
        self.store = store
        self.keep = keep
        self.on_published = on_published
        self.stop = stop
        self.lost = lost
        self._pool = (
            ThreadPoolExecutor(1, thread_name_prefix="cnnserve-publish") if store.remote else None
        )
        self._pending: list[Future[None]] = []
        self._lock = threading.Lock()

    def submit(self, staged: StagedCheckpoint, metrics: EpochMetrics) -> None:
        """Publish `staged` after those before it; an earlier failure is raised here."""
        self._raise_failed()
        if self._pool is None:
            self._publish(staged, metrics)
            return
        with self._lock:
            self._pending.append(self._pool.submit(self._publish, staged, metrics))

    def _publish(self, staged: StagedCheckpoint, metrics: EpochMetrics) -> None:
        if self.lost():
            # another worker resumed the job (this one's lease lapsed): its files are the
            # checkpoint's now, and this attempt's must not overwrite them
            log.warning(
                "checkpoint %s not published: the job is another worker's now",
                staged.manifest.id,
            )
            self.store.discard(staged)
            return
        try:
            saved = retry_unavailable(
                lambda: self.store.publish(
                    staged, keep=self.keep, still_ours=lambda: not self.lost()
                ),
                stop=self.stop,
                what=f"checkpoint {staged.manifest.id}",
            )
        except JobNotOursError:
            log.warning(
                "checkpoint %s not filed: the job became another worker's during its upload",
                staged.manifest.id,
            )
            self.store.discard(staged)
            return
        except STORE_UNAVAILABLE:
            log.error(
                "checkpoint %s not published: the store is unavailable and the job is no "
                "longer this worker's; it resumes from its last published checkpoint",
                staged.manifest.id,
            )
            self.store.discard(staged)
            raise
        except BaseException:
            self.store.discard(staged)
            raise
        self.on_published(metrics, saved)

    def _raise_failed(self) -> None:
        with self._lock:
            done = [f for f in self._pending if f.done()]
            self._pending = [f for f in self._pending if not f.done()]
        for future in done:
            future.result()

    def drain(self) -> None:
        """Wait until every submitted checkpoint is published; raise the first failure."""
        with self._lock:
            pending, self._pending = self._pending, []
        failure: BaseException | None = None
        for future in pending:
            try:
                future.result()
            except BaseException as exc:  # wait for the rest before raising
                failure = failure or exc
        if failure is not None:
            raise failure

    def close(self) -> None:
        """Finish what is pending (errors are logged: the run is ending on another one)."""
        try:
            self.drain()
        except BaseException:
            log.warning("a checkpoint was not published", exc_info=True)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
