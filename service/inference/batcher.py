"""`InferenceService`: forward passes off the event loop, concurrent requests batched.

It runs the forward passes on a small thread pool (never on the event loop) and, when
`settings.batching` is on, stacks concurrent requests for one checkpoint into one forward
pass: the first request waits up to `batch_window_ms` for company (a full batch goes at once,
and so does one as big as the checkpoint's last busy spell: the closed loop of clients that
keeps it busy is all there), a checkpoint has at most one batch per compute thread in flight,
and whatever queues meanwhile goes next (≤ `max_batch_size` images), taken by the compute
thread itself as soon as its batch is done. It holds the pipeline's checkpoint resolver
(`service.inference.resolve`), so that deleting a checkpoint forgets it everywhere at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from service.inference.backends import (
    LoadedModel,
    cpu_budget,
    ensure_onnx,
    load_for_inference,
)
from service.inference.cache import ModelCache
from service.inference.resolve import Resolver
from service.metrics import observe_batch
from workers.settings import Settings
from workers.store.checkpoints import CheckpointStore, Manifest

logger = logging.getLogger(__name__)

#: Checkpoints whose last busy spell is remembered (bounded; cleared wholesale when full).
SPELLS_SIZE = 1024


@dataclass
class _Pending:
    x: np.ndarray
    future: asyncio.Future[np.ndarray]


@dataclass
class _Queue:
    """One checkpoint's waiting requests, and whether a compute thread is draining them.

    The event loop appends and starts a drain; a compute thread takes batch after batch
    until nothing waits, so the model never idles for a trip through the event loop
    between two batches. `lock` guards `pending`, `images` and `drains`; `timer` is the
    loop's alone.
    """

    loaded: LoadedModel
    loop: asyncio.AbstractEventLoop
    lock: threading.Lock = field(default_factory=threading.Lock)
    pending: deque[_Pending] = field(default_factory=deque)
    images: int = 0
    #: Compute threads draining it (at most the service's `parallel`).
    drains: int = 0
    timer: asyncio.TimerHandle | None = None


def _deliver(batch: list[_Pending], probs: np.ndarray | None, failure: Exception | None) -> None:
    """Give each request of a batch its rows of the answer, or the failure (on the loop)."""
    start = 0
    for p in batch:
        end = start + len(p.x)
        if not p.future.done():  # a client may have gone away
            if failure is not None:
                p.future.set_exception(failure)
            else:
                assert probs is not None
                p.future.set_result(probs[start:end])
        start = end


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> bool:
    """`fn(*args)` on `loop` from another thread; False when the loop has closed."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        return False
    return True


class InferenceService:
    """Classifies preprocessed batches for checkpoints, off the event loop, batched."""

    def __init__(self, settings: Settings, store: CheckpointStore) -> None:
        self.settings = settings
        self.store = store
        # the server process's Pillow guard matches its own limit (images.decode_image checks
        # each header against the limit before decoding anyway)
        Image.MAX_IMAGE_PIXELS = settings.max_image_pixels
        workers, threads = cpu_budget()
        self.threads = threads
        #: Batches of one checkpoint that may run at once (one per compute thread).
        self.parallel = workers
        torch.set_num_threads(threads)
        self._compute = ThreadPoolExecutor(workers, thread_name_prefix="cnnserve-infer")
        self._loaders = ThreadPoolExecutor(2, thread_name_prefix="cnnserve-load")
        #: Explanations (gradients, many forward passes) one at a time, beside predictions.
        self.explainers = ThreadPoolExecutor(1, thread_name_prefix="cnnserve-explain")
        self.cache = ModelCache(self._load, settings.model_cache_size)
        self._queues: dict[str, _Queue] = {}
        #: Images each checkpoint's last busy spell served (one drain, start to end).
        self._spells: dict[str, int] = {}
        #: Drains handed to the compute pool that no thread has started yet.
        self._waiting = 0
        self._waiting_lock = threading.Lock()
        #: Checkpoint refs to manifests, the one cache of them.
        self.resolver = Resolver(store)

    def _load(self, ckpt_id: str) -> LoadedModel:
        return load_for_inference(
            self.store,
            ckpt_id,
            backend=self.settings.inference_backend,
            threads=self.threads,
            max_batch_size=self.settings.max_batch_size,
        )

    async def model(self, manifest: Manifest) -> LoadedModel:
        """The loaded model for a checkpoint, from the cache or loaded on a worker thread."""
        loaded = self.cache.lookup(manifest.id, manifest.weights_sha256)
        if loaded is not None:
            return loaded
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._loaders, self.cache.load, manifest.id, manifest.weights_sha256
        )

    async def onnx_file(self, manifest: Manifest) -> Path:
        """The checkpoint's ONNX graph (the one ONNX Runtime serves), exported if need be."""
        loaded = await self.model(manifest)
        if loaded.onnx_path is not None and loaded.onnx_path.is_file():
            return loaded.onnx_path
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._loaders, ensure_onnx, loaded.module, loaded.manifest, self.store
        )

    async def predict(self, manifest: Manifest, x: np.ndarray) -> tuple[LoadedModel, np.ndarray]:
        """Class probabilities (N×C) for preprocessed images (N×1×28×28 float32)."""
        loaded = await self.model(manifest)
        if not self.settings.batching:
            return loaded, await self._forward(loaded, x)
        loop = asyncio.get_running_loop()
        queue = self._queues.get(loaded.checkpoint_id)
        if queue is None or queue.loaded is not loaded:
            if queue is not None and (queue.pending or queue.drains):
                # the checkpoint was reloaded: the old queue finishes, this one goes alone
                return loaded, await self._forward(loaded, x)
            queue = self._queues[loaded.checkpoint_id] = _Queue(loaded, loop)
        item = _Pending(x, loop.create_future())
        window = self.settings.batch_window_ms / 1000.0
        # a batch goes when it is full, or as big as the last busy spell (the clients that
        # keep this checkpoint busy are all here), or when the first request's wait is over
        full = min(self.settings.max_batch_size, self._spells.get(loaded.checkpoint_id, 1 << 30))
        with queue.lock:
            queue.pending.append(item)
            queue.images += len(x)
            free = queue.drains < self.parallel
            start = free and (queue.images >= full or window <= 0)
            queue.drains += start
        if start:
            self._start(queue)
        elif free and queue.timer is None:  # the first request waits a moment for company
            queue.timer = loop.call_later(window, self._window_closed, queue)
        return loaded, await item.future

    async def _forward(self, loaded: LoadedModel, x: np.ndarray) -> np.ndarray:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        probs = await loop.run_in_executor(self._compute, loaded.run, x)
        observe_batch(loaded.manifest.model, len(x), time.perf_counter() - started)
        return probs

    def _window_closed(self, queue: _Queue) -> None:
        """The first waiting request's wait is over: drain what came meanwhile (on the loop)."""
        queue.timer = None
        with queue.lock:
            if queue.drains >= self.parallel or not queue.pending:
                return
            queue.drains += 1
        self._start(queue)

    def _start(self, queue: _Queue) -> None:
        """Hand the queue to a compute thread (on the loop; the caller counted the drain)."""
        if queue.timer is not None:
            queue.timer.cancel()
            queue.timer = None
        self._submit(queue)

    def _submit(self, queue: _Queue, served: int = 0) -> None:
        """Put a drain of the queue in the compute pool's line (counted until it starts)."""
        with self._waiting_lock:
            self._waiting += 1
        self._compute.submit(self._drain, queue, served)

    def _next_batch(self, queue: _Queue) -> list[_Pending]:
        """The queue's next batch (≤ max_batch_size images, at least one request); an empty
        list ends the drain (under the queue's lock)."""
        batch: list[_Pending] = []
        images = 0
        with queue.lock:
            while queue.pending:
                n = len(queue.pending[0].x)
                if batch and images + n > self.settings.max_batch_size:
                    break
                batch.append(queue.pending.popleft())
                images += n
            queue.images -= images
            if not batch:
                queue.drains -= 1
        return batch

    def _drain(self, queue: _Queue, served: int = 0) -> None:
        """Run the queue's batches until none waits (on a compute thread), then remember how
        many images this busy spell served (`served`: those before a hand-over).

        When another checkpoint's queue waits for a compute thread, this one goes to the back
        of the line after each batch, so a busy checkpoint cannot starve the others.
        """
        with self._waiting_lock:
            self._waiting -= 1
        while batch := self._next_batch(queue):
            images = sum(len(p.x) for p in batch)
            served += images
            started = time.perf_counter()
            try:
                x = batch[0].x if len(batch) == 1 else np.concatenate([p.x for p in batch])
                probs: np.ndarray | None = queue.loaded.run(x)
                failure: Exception | None = None
            except Exception as exc:  # hand the failure to every waiting request
                probs, failure = None, exc
            else:
                observe_batch(queue.loaded.manifest.model, images, time.perf_counter() - started)
            if not _call_soon(queue.loop, _deliver, batch, probs, failure):
                return  # the loop is gone: nobody waits for answers
            if self._waiting and queue.pending:  # another queue is in line: go behind it
                self._submit(queue, served)
                return
        if served:  # a drain that found nothing taken says nothing of the clients
            if len(self._spells) >= SPELLS_SIZE:
                self._spells.clear()
            self._spells[queue.loaded.checkpoint_id] = served
        _call_soon(queue.loop, self._retire, queue)

    def _retire(self, queue: _Queue) -> None:
        """Forget a drained queue unless a request came since (on the loop)."""
        with queue.lock:
            idle = not (queue.pending or queue.drains)
        if idle and self._queues.get(queue.loaded.checkpoint_id) is queue:
            del self._queues[queue.loaded.checkpoint_id]

    def forget(self, deleted: Manifest) -> None:
        """Drop a deleted checkpoint: its cached model and every ref resolved to it (the store
        removed its files, exported graph included)."""
        self.cache.evict(deleted.id)
        self.resolver.forget(deleted.id)

    def close(self) -> None:
        """Stop the thread pools (pending forward passes finish first)."""
        self._compute.shutdown(wait=True)
        self._loaders.shutdown(wait=False)
        self.explainers.shutdown(wait=False)
