"""Real `cnnserve worker` processes on real Redis train real Fashion-MNIST jobs end to end."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from celery import Celery

from tests.workers.helpers import (
    WorkerProcess,
    lenet_spec,
    statuses,
    train_until_first_checkpoint,
    wait_finished,
)
from workers.celery_app import enqueue_job, live_workers, worker_heartbeats
from workers.contracts import JobStatus
from workers.settings import Settings
from workers.store.checkpoints import CheckpointStore
from workers.store.jobs import JobStore
from workers.training.data import load_fashion_mnist

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def test_lenet_job_goes_queued_running_succeeded(
    settings: Settings,
    store: JobStore,
    celery_app: Celery,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    worker = start_worker()
    assert worker.name in live_workers(celery_app, timeout=2.0)
    job = store.create(lenet_spec(epochs=2, train_limit=2000))
    enqueue_job(celery_app, job.id)

    record = wait_finished(store, job.id, 90, worker)

    assert record.status is JobStatus.succeeded, record.error
    assert [s["status"] for s in statuses(store, job.id)] == ["queued", "running", "succeeded"]
    assert record.attempts == 1
    assert record.worker == worker.name
    assert record.device == "cpu"
    assert record.started_at and record.finished_at and record.started_at <= record.finished_at
    assert record.error is None
    assert [m.epoch for m in record.metrics] == [1, 2]
    for m in record.metrics:
        assert math.isfinite(m.train_loss) and math.isfinite(m.val_loss)
        assert 0.0 <= m.val_acc <= 1.0 and m.seconds > 0
    assert record.progress.epoch == 2 and record.progress.batch == record.progress.batches == 16

    events = store.events(job.id, count=10_000)
    progress = [d for _, kind, d in events if kind == "progress"]
    assert progress and all(p["epochs"] == 2 and p["batches"] == 16 for p in progress)
    assert any(p["images_per_s"] for p in progress)
    epochs = [d for _, kind, d in events if kind == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert [e["checkpoint"] for e in epochs] == [f"{job.id}-e001", f"{job.id}-e002"]

    ckpts = CheckpointStore.from_settings(settings)
    assert record.checkpoints == [f"{job.id}-e001", f"{job.id}-e002"]
    assert record.latest_checkpoint == f"{job.id}-e002"
    assert record.best_checkpoint in record.checkpoints
    assert ckpts.resolve(f"{job.id}:latest") == record.latest_checkpoint
    manifest = ckpts.manifest(record.latest_checkpoint)
    assert manifest.model == "lenet" and manifest.input_size == 28 and manifest.epoch == 2
    assert manifest.preprocessing.resize == 28
    assert manifest.preprocessing.scale == pytest.approx(1 / 255)
    assert manifest.spec["train_limit"] == 2000 and manifest.spec["lr"] == 0.1
    assert manifest.dataset["idx_md5"]["t10k-images-idx3-ubyte"]
    assert [h["epoch"] for h in manifest.history] == [1, 2]
    assert manifest.metrics == {
        "train_loss": record.metrics[-1].train_loss,
        "val_loss": record.metrics[-1].val_loss,
        "val_acc": record.metrics[-1].val_acc,
    }
    for name in ("weights.safetensors", "manifest.json", "state.pt"):
        assert (settings.checkpoints_dir / job.id / "e002" / name).is_file()

    # the saved weights, loaded afresh, reproduce the recorded validation numbers
    model, _ = ckpts.load_model(record.latest_checkpoint)
    data = load_fashion_mnist(settings)
    with torch.inference_mode():
        logits = model(data.test_images.unsqueeze(1).float() / 255)
    assert F.cross_entropy(logits, data.test_labels).item() == pytest.approx(
        manifest.metrics["val_loss"], rel=1e-4
    )
    acc = (logits.argmax(1) == data.test_labels).float().mean().item()
    assert acc == pytest.approx(manifest.metrics["val_acc"], abs=1e-4)

    beats = {w["name"]: w for w in worker_heartbeats(settings.redis_url)}
    assert beats[worker.name]["device"] == "cpu" and beats[worker.name]["pid"] == worker.pid


def test_killed_worker_job_resumes_from_last_checkpoint_on_a_fresh_worker(
    settings: Settings,
    store: JobStore,
    celery_app: Celery,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    epochs = 5
    first = start_worker()
    job = train_until_first_checkpoint(
        store, celery_app, first, lenet_spec(epochs=epochs, train_limit=1000)
    )

    first.kill()
    killed = store.get(job.id)
    assert killed.status is JobStatus.running, "the job finished before the kill; make it longer"
    done_before = len(killed.metrics)
    assert 1 <= done_before < epochs

    second = start_worker()
    record = wait_finished(store, job.id, 120, second)

    assert record.status is JobStatus.succeeded, record.error
    assert record.attempts == 2
    assert record.worker == second.name
    assert [m.epoch for m in record.metrics] == list(range(1, epochs + 1))

    history = statuses(store, job.id)
    assert [s["status"] for s in history] == ["queued", "running", "queued", "running", "succeeded"]
    assert first.name in history[2]["reason"]
    resumed = history[3]
    assert resumed["attempt"] == 2 and resumed["worker"] == second.name
    resumed_epoch = int(resumed["resumed_from"].rsplit("-e", 1)[1])
    assert resumed_epoch >= done_before >= 1  # from its last checkpoint, not from zero

    # epoch events after the restart pick up right after the checkpoint: none trained twice
    events = store.events(job.id, count=10_000)
    restart = next(i for i, (_, k, d) in enumerate(events) if d.get("attempt") == 2)
    after = [d["epoch"] for _, k, d in events[restart:] if k == "epoch"]
    assert after == list(range(resumed_epoch + 1, epochs + 1))

    manifest = CheckpointStore.from_settings(settings).manifest(f"{job.id}-e{epochs:03d}")
    assert [int(h["epoch"]) for h in manifest.history] == list(range(1, epochs + 1))


def test_a_worker_shutting_down_hands_its_job_back_to_the_queue(
    settings: Settings,
    store: JobStore,
    celery_app: Celery,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    epochs = 4
    first = start_worker()
    job = train_until_first_checkpoint(
        store, celery_app, first, lenet_spec(epochs=epochs, train_limit=1000)
    )

    first.stop()  # SIGTERM, as `docker stop` sends: a warm shutdown
    assert first.proc.returncode == 0, first.log()[-3000:]
    handed_back = store.get(job.id)
    assert handed_back.status is JobStatus.queued
    assert "shut down" in statuses(store, job.id)[-1]["reason"]

    second = start_worker()
    record = wait_finished(store, job.id, 120, second)
    assert record.status is JobStatus.succeeded, record.error
    assert record.attempts == 2
    assert [m.epoch for m in record.metrics] == list(range(1, epochs + 1))


def test_cancel_stops_a_running_job_within_seconds_and_keeps_its_checkpoints(
    settings: Settings,
    store: JobStore,
    celery_app: Celery,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    worker = start_worker()
    job = train_until_first_checkpoint(
        store, celery_app, worker, lenet_spec(epochs=50, train_limit=2000)
    )

    store.request_cancel(job.id)
    asked = time.monotonic()
    record = wait_finished(store, job.id, 30, worker)
    took = time.monotonic() - asked

    assert record.status is JobStatus.cancelled
    assert took < 10, f"cancel took {took:.1f} s"
    assert record.finished_at is not None and record.error is None
    assert statuses(store, job.id)[-1]["status"] == "cancelled"
    assert len(record.metrics) < 50
    ckpts = CheckpointStore.from_settings(settings)
    latest = ckpts.resolve(f"{job.id}:latest")
    assert latest == record.latest_checkpoint
    ckpts.weights_path(latest)  # still there and intact
    # the worker is free again: the next job runs
    nxt = store.create(lenet_spec(epochs=1, train_limit=256))
    enqueue_job(celery_app, nxt.id)
    assert wait_finished(store, nxt.id, 60, worker).status is JobStatus.succeeded


def test_a_job_cancelled_while_queued_never_starts(
    settings: Settings,
    store: JobStore,
    celery_app: Celery,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    cancelled = store.create(lenet_spec(epochs=1, train_limit=256))
    enqueue_job(celery_app, cancelled.id)
    store.request_cancel(cancelled.id)  # no worker yet: the job is still queued
    later = store.create(lenet_spec(epochs=1, train_limit=256))
    enqueue_job(celery_app, later.id)

    worker = start_worker()
    assert wait_finished(store, later.id, 60, worker).status is JobStatus.succeeded

    record = store.get(cancelled.id)
    assert record.status is JobStatus.cancelled
    assert record.attempts == 0 and record.started_at is None
    assert "running" not in [s["status"] for s in statuses(store, cancelled.id)]
    assert not (settings.checkpoints_dir / cancelled.id).exists()
