"""A job's life on a worker, run in-process over real Redis, data and checkpoint files."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from celery import Celery

from tests.workers.helpers import lenet_spec, statuses
from workers.celery_app import UNACKED_KEY, enqueue, enqueue_job, task_ids_in_broker
from workers.contracts import EVALUATE_TASK, QUEUE, TRAIN_TASK, JobStatus
from workers.settings import Settings
from workers.store.checkpoints import CheckpointStore, SavedCheckpoint
from workers.store.evaluations import EvaluationRecord, EvaluationStore, new_evaluation_id
from workers.store.jobs import EpochMetrics, JobRecord, JobStore, Progress, Quota
from workers.training.data import load_fashion_mnist
from workers.training.engine import train
from workers.training.runner import recover_orphans, resend_lost, run_job

#: keep in-process training on one core (see tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


class Sent:
    """Stands in for Celery's send_task: the ids a run queued again."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    def __call__(self, job_id: str) -> None:
        self.ids.append(job_id)


def run(job_id: str, settings: Settings, enqueue: Sent | None = None) -> str:
    return run_job(job_id, worker="inproc@test", settings=settings, enqueue=enqueue or Sent())


def test_a_missing_data_directory_fails_the_job_with_a_clear_message(
    settings: Settings, store: JobStore, tmp_path: Path
) -> None:
    nowhere = settings.model_copy(update={"fashion_mnist_dir": tmp_path / "no-such-dir"})
    job = store.create(lenet_spec(epochs=1, train_limit=256))

    assert run(job.id, nowhere) == "failed"

    record = store.get(job.id)
    assert record.status is JobStatus.failed and record.finished_at
    assert record.error is not None
    assert str(tmp_path / "no-such-dir") in record.error
    assert "apt-get install dataset-fashion-mnist" in record.error
    assert statuses(store, job.id)[-1] == {"status": "failed", "error": record.error}


def test_asking_for_a_gpu_on_a_cpu_worker_fails_the_job(
    settings: Settings, store: JobStore
) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    job = store.create(lenet_spec(epochs=1, device="cuda"))
    assert run(job.id, settings) == "failed"
    assert "no usable CUDA GPU" in (store.get(job.id).error or "")


def test_a_corrupted_checkpoint_is_refused_not_resumed_from(
    settings: Settings, store: JobStore
) -> None:
    spec = lenet_spec(epochs=3, train_limit=256)
    job = store.create(spec)
    ckpts = CheckpointStore.from_settings(settings)
    train(  # a first attempt that got through one epoch
        spec.model_copy(update={"epochs": 1}),
        job_id=job.id,
        data=load_fashion_mnist(settings),
        store=ckpts,
    )
    weights = settings.checkpoints_dir / job.id / "e001" / "weights.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-8:] = b"\x00" * 8
    weights.write_bytes(bytes(blob))

    assert run(job.id, settings) == "failed"

    record = store.get(job.id)
    assert record.status is JobStatus.failed
    assert record.error is not None
    assert f"cannot resume from checkpoint {job.id}-e001" in record.error
    assert "do not match the manifest's sha256" in record.error
    assert ckpts.aliases(job.id)["latest"] == f"{job.id}-e001"  # nothing trained over it


def test_a_job_that_keeps_killing_its_worker_fails_after_max_attempts(
    settings: Settings, store: JobStore
) -> None:
    job = store.create(lenet_spec(epochs=1, train_limit=256))
    # as left by workers that died mid-run, the last of them at epoch 1
    store.update(
        job.id,
        lambda r: (
            setattr(r, "attempts", settings.max_attempts),
            setattr(r, "worker", "gone@host"),
            setattr(r, "progress", Progress(epoch=1, epochs=1)),
        ),
    )
    assert run(job.id, settings) == "failed"
    record = store.get(job.id)
    assert record.status is JobStatus.failed and record.attempts == settings.max_attempts
    assert record.error is not None
    assert f"gave up after {settings.max_attempts} attempts" in record.error
    assert "gone@host" in record.error
    assert not (settings.checkpoints_dir / job.id).exists()


def test_the_wall_time_ceiling_fails_the_job_with_its_reason(
    settings: Settings, store: JobStore
) -> None:
    short = settings.model_copy(update={"job_max_seconds": 0})
    job = store.create(lenet_spec(epochs=2, train_limit=256))
    assert run(job.id, short) == "timed_out"
    record = store.get(job.id)
    assert record.status is JobStatus.failed
    assert "wall-time ceiling of 0 s (CNNSERVE_JOB_MAX_SECONDS)" in (record.error or "")


def test_deliveries_that_must_not_train(settings: Settings, store: JobStore) -> None:
    assert run("0123456789abcdef", settings) == "missing"

    done = store.create(lenet_spec(epochs=1))
    store.update(done.id, lambda r: setattr(r, "status", JobStatus.succeeded))
    assert run(done.id, settings) == "finished"

    # another live worker holds the lease: this delivery is a duplicate and is dropped
    busy = store.create(lenet_spec(epochs=1))
    assert store.acquire_lease(busy.id, "other@host#1", 30)
    assert run(busy.id, settings) == "duplicate"
    record = store.get(busy.id)
    assert record.status is JobStatus.queued and record.attempts == 0


def test_running_jobs_without_a_live_lease_are_queued_again(
    settings: Settings, store: JobStore
) -> None:
    orphan = store.create(lenet_spec(epochs=1))
    alive = store.create(lenet_spec(epochs=1))
    for job in (orphan, alive):
        store.update(
            job.id,
            lambda r: (setattr(r, "status", JobStatus.running), setattr(r, "worker", "w@h")),
        )
    store.acquire_lease(alive.id, "w@h#1", 30)
    sent = Sent()

    assert recover_orphans(store, settings, sent) == [orphan.id]
    assert sent.ids == [orphan.id]
    assert store.get(orphan.id).status is JobStatus.queued
    assert store.get(alive.id).status is JobStatus.running
    assert statuses(store, orphan.id)[-1]["status"] == "queued"
    # a second scan (another worker) does not send it twice
    assert recover_orphans(store, settings, sent) == [] and sent.ids == [orphan.id]


def test_queued_work_whose_message_the_broker_lost_is_sent_again(
    settings: Settings, store: JobStore, celery_app: Celery
) -> None:
    def queued_job() -> str:
        job_id = store.create(lenet_spec(epochs=1)).id
        enqueue_job(celery_app, job_id)
        return job_id

    def queued_evaluation() -> str:
        record = EvaluationRecord(id=new_evaluation_id(), checkpoint=f"{'a' * 16}-e001")
        EvaluationStore(store.r).create(record, quota=Quota(None))
        enqueue(celery_app, EVALUATE_TASK, record.id)
        return record.id

    def lose(object_id: str) -> None:
        for raw in store.r.lrange(QUEUE, 0, -1):
            if json.loads(raw)["headers"]["id"] == object_id:
                store.r.lrem(QUEUE, 1, raw)

    waiting, lost_job, lost_evaluation = queued_job(), queued_job(), queued_evaluation()
    delivered = queued_job()  # a worker holds its message, not yet acknowledged
    raw = store.r.lrange(QUEUE, 0, -1)[0]
    assert json.loads(raw)["headers"]["id"] == delivered
    store.r.lrem(QUEUE, 1, raw)
    store.r.hset(UNACKED_KEY, "tag-1", json.dumps([json.loads(raw), "", QUEUE]))
    lose(lost_job)
    lose(lost_evaluation)
    time.sleep(2.2)
    quick = settings.model_copy(update={"lease_seconds": 2})
    recent = store.create(lenet_spec(epochs=1)).id  # recorded, its message not sent yet
    started = queued_job()
    store.update(started, lambda r: setattr(r, "status", JobStatus.running))
    lose(started)

    sent: list[tuple[str, str]] = []
    in_broker = lambda: task_ids_in_broker(store.r)  # noqa: E731
    resent = resend_lost(store, quick, lambda task, i: sent.append((task, i)), in_broker)
    assert sorted(resent) == sorted([lost_job, lost_evaluation])
    assert sorted(sent) == sorted([(TRAIN_TASK, lost_job), (EVALUATE_TASK, lost_evaluation)])
    assert waiting not in resent and delivered not in resent and recent not in resent
    # another worker's scan right after does not send them twice
    assert resend_lost(store, quick, lambda task, i: sent.append((task, i)), in_broker) == []
    # a broker too full to read is not taken for one that lost everything
    store.r.delete(f"cnnserve:resend:{lost_job}")
    assert resend_lost(store, quick, lambda task, i: None, lambda: None) == []


class RecordsUntilEpoch:
    """A first attempt's callbacks that record epochs in the job record up to `last`, then
    stop recording: the worker was killed after publishing the next epoch, before its record."""

    def __init__(self, store: JobStore, job_id: str, last: int) -> None:
        self.store = store
        self.job_id = job_id
        self.last = last

    def on_progress(self, progress: Progress) -> None:
        pass

    def on_epoch(self, metrics: EpochMetrics, saved: SavedCheckpoint) -> None:
        if metrics.epoch > self.last:
            return

        def change(rec: JobRecord) -> None:
            rec.metrics.append(metrics)
            rec.checkpoints = saved.kept
            rec.latest_checkpoint = saved.latest
            rec.best_checkpoint = saved.best

        self.store.update(self.job_id, change)

    def stop_requested(self) -> None:
        return None


def test_a_worker_killed_between_publishing_its_last_epoch_and_recording_it(
    settings: Settings, store: JobStore
) -> None:
    spec = lenet_spec(epochs=2, train_limit=256)
    job = store.create(spec)
    store.update(
        job.id,
        lambda r: (
            setattr(r, "status", JobStatus.running),
            setattr(r, "attempts", 1),
            setattr(r, "worker", "gone@host"),
        ),
    )
    ckpts = CheckpointStore.from_settings(settings)
    first = train(  # both epochs published; only the first reached the record
        spec,
        job_id=job.id,
        data=load_fashion_mnist(settings),
        store=ckpts,
        callbacks=RecordsUntilEpoch(store, job.id, last=1),
    )
    e001, e002 = f"{job.id}-e001", f"{job.id}-e002"
    stale = store.get(job.id)
    assert (stale.checkpoints, stale.latest_checkpoint) == ([e001], e001)
    sent = Sent()
    assert recover_orphans(store, settings, sent) == [job.id]  # its lease is gone

    assert run(job.id, settings, sent) == "succeeded"  # nothing left to train

    record = store.get(job.id)
    assert record.status is JobStatus.succeeded and record.attempts == 2
    assert record.checkpoints == [e001, e002]
    assert record.latest_checkpoint == e002 == ckpts.aliases(job.id)["latest"]
    assert record.best_checkpoint == ckpts.aliases(job.id)["best"]
    assert [m.epoch for m in record.metrics] == [1, 2]
    assert [m.val_acc for m in record.metrics] == [m.val_acc for m in first.history]
    assert record.progress.epoch == 2
    assert statuses(store, job.id)[-2]["resumed_from"] == e002
