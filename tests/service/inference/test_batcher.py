"""The batcher (`InferenceService.predict`): compute threads drain a checkpoint's queue batch
after batch, a busy checkpoint makes way for another, and one checkpoint's batches run on
every compute thread at once."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

import service.inference.batcher as inference_mod
from service.inference.batcher import InferenceService
from tests.service.checkpoint_helpers import JOB_A, JOB_B, fashion_test_set, lenet, save
from tests.service.checkpoint_helpers import reference_probs as model_probs
from workers.settings import Settings
from workers.store.checkpoints import CheckpointStore, Manifest

#: Each recorded forward pass takes at least this long, so passes can overlap or queue.
PASS_S = 0.03


class Passes:
    """Every forward pass a service ran: which checkpoint, how many images, and how many
    passes ran at the same time at most."""

    def __init__(self) -> None:
        self.order: list[tuple[str, int]] = []
        self.running = 0
        self.most_at_once = 0
        self._lock = threading.Lock()

    def record(self, svc: InferenceService, manifest: Manifest) -> None:
        loaded = svc.cache.load(manifest.id, manifest.weights_sha256)
        inner = loaded.run_batch

        def run(x: np.ndarray) -> np.ndarray:
            with self._lock:
                self.order.append((manifest.id, len(x)))
                self.running += 1
                self.most_at_once = max(self.most_at_once, self.running)
            try:
                time.sleep(PASS_S)
                return inner(x)
            finally:
                with self._lock:
                    self.running -= 1

        loaded.run_batch = run


def batches(n: int, size: int) -> list[np.ndarray]:
    """`n` requests of `size` Fashion-MNIST test images each, as the model takes them."""
    images = np.asarray(fashion_test_set()[0][: n * size])
    x = (images.astype(np.float32) / 255)[:, None]
    return [x[i * size : (i + 1) * size] for i in range(n)]


@pytest.fixture
def checkpoints(settings: Settings) -> CheckpointStore:
    return CheckpointStore.from_settings(settings)


def service(settings: Settings, store: CheckpointStore, **update: object) -> InferenceService:
    return InferenceService(settings.model_copy(update={"max_batch_size": 4, **update}), store)


def test_a_busy_checkpoint_makes_way_for_another(
    settings: Settings, checkpoints: CheckpointStore
) -> None:
    """One compute thread, twelve full batches queued for A, then one for B: B does not wait
    for A's queue to run dry."""
    model = lenet()
    a, b = save(checkpoints, model, job_id=JOB_A), save(checkpoints, model, job_id=JOB_B)
    svc = service(settings, checkpoints)
    passes = Passes()
    for manifest in (a, b):
        passes.record(svc, manifest)
    xs = batches(13, 4)

    async def burst() -> list[np.ndarray]:
        flood = [asyncio.ensure_future(svc.predict(a, x)) for x in xs[:12]]
        await asyncio.sleep(PASS_S / 2)  # A's first batch is running
        late = await svc.predict(b, xs[12])
        return [late[1], *[p for _, p in await asyncio.gather(*flood)]]

    try:
        late, *flooded = asyncio.run(burst())
    finally:
        svc.close()
    assert svc.parallel == 1
    assert passes.order.count((a.id, 4)) == 12 and passes.order.count((b.id, 4)) == 1
    assert passes.order.index((b.id, 4)) <= 2, passes.order  # after at most two of A's
    want = model_probs(model, fashion_test_set()[0][:52])
    got = np.concatenate([*flooded, late])
    assert np.abs(got - want).max() < 1e-4  # every request got its own rows


@pytest.mark.parametrize("compute_threads", [1, 2])
def test_a_checkpoints_batches_run_on_every_compute_thread(
    settings: Settings,
    checkpoints: CheckpointStore,
    monkeypatch: pytest.MonkeyPatch,
    compute_threads: int,
) -> None:
    """A machine with several compute threads runs as many batches of one checkpoint at once;
    one thread runs them one after another."""
    monkeypatch.setattr(inference_mod, "cpu_budget", lambda: (compute_threads, 1))
    model = lenet()
    manifest = save(checkpoints, model)
    svc = service(settings, checkpoints)
    passes = Passes()
    passes.record(svc, manifest)
    xs = batches(8, 4)

    async def burst() -> list[np.ndarray]:
        return [p for _, p in await asyncio.gather(*(svc.predict(manifest, x) for x in xs))]

    try:
        got = np.concatenate(asyncio.run(burst()))
    finally:
        svc.close()
    assert len(passes.order) == 8
    assert passes.most_at_once == compute_threads
    assert np.abs(got - model_probs(model, fashion_test_set()[0][:32])).max() < 1e-4


def test_requests_that_trickle_in_are_taken_by_the_running_drain(
    settings: Settings, checkpoints: CheckpointStore
) -> None:
    """Single images arriving while a batch runs go together in the next pass, with no wait
    for the batch window: the compute thread takes them as soon as its pass ends."""
    manifest = save(checkpoints, lenet())
    svc = service(settings, checkpoints, max_batch_size=8, batch_window_ms=60_000.0)
    passes = Passes()
    passes.record(svc, manifest)
    xs = batches(1, 8) + batches(5, 1)

    async def trickle() -> None:
        first = asyncio.ensure_future(svc.predict(manifest, xs[0]))  # a full batch goes at once
        await asyncio.sleep(PASS_S / 3)
        singles = asyncio.gather(*(svc.predict(manifest, x) for x in xs[1:]))
        await asyncio.wait_for(asyncio.gather(first, singles), timeout=10)  # not the minute

    try:
        asyncio.run(trickle())
    finally:
        svc.close()
    assert [n for _, n in passes.order] == [8, 5]


def test_a_closed_loop_of_clients_is_batched_without_waiting_for_the_window(
    settings: Settings, checkpoints: CheckpointStore
) -> None:
    """Once a busy spell has served 8 images, 8 waiting images go at once; 7 still wait for
    the window, for the eighth client."""
    manifest = save(checkpoints, lenet())
    svc = service(settings, checkpoints, max_batch_size=64, batch_window_ms=50.0)
    passes = Passes()
    passes.record(svc, manifest)
    xs = batches(8, 1)

    async def rounds() -> None:
        await asyncio.gather(*(svc.predict(manifest, x) for x in xs))  # waits 50 ms once
        svc.settings = svc.settings.model_copy(update={"batch_window_ms": 60_000.0})
        await asyncio.sleep(0.05)  # the spell is over: the compute thread remembered it
        again = asyncio.gather(*(svc.predict(manifest, x) for x in xs))
        await asyncio.wait_for(again, timeout=10)  # not the minute
        fewer = asyncio.gather(*(svc.predict(manifest, x) for x in xs[:7]))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(fewer, timeout=1)

    try:
        asyncio.run(rounds())
    finally:
        svc.close()
    assert [n for _, n in passes.order] == [8, 8]
