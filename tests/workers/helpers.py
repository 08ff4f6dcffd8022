"""Helpers for the training tests: worker processes and waiting on job records."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from celery import Celery
from safetensors.torch import load_file

from workers.celery_app import enqueue_job
from workers.contracts import JobSpec
from workers.store.checkpoints import CheckpointStore
from workers.store.jobs import EpochMetrics, JobRecord, JobStore


@dataclass
class WorkerProcess:
    """A `cnnserve worker` subprocess, stopped by PID."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """`kill -9`: no warm shutdown, no chance to tidy up."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


def weights(store: CheckpointStore, ckpt: str) -> dict[str, torch.Tensor]:
    """A checkpoint's weights, read straight from its safetensors file."""
    return load_file(str(store.weights_path(ckpt)))


def numbers(history: list[EpochMetrics]) -> list[tuple[int, float, float, float]]:
    """A run's history as the numbers two runs must agree on."""
    return [(m.epoch, m.train_loss, m.val_loss, m.val_acc) for m in history]


def lenet_spec(**fields: Any) -> JobSpec:
    return JobSpec.model_validate({"model": "lenet", "device": "cpu", **fields})


def wait_for(
    store: JobStore,
    job_id: str,
    predicate: Callable[[JobRecord], bool],
    timeout: float,
    what: str,
    worker: WorkerProcess | None = None,
) -> JobRecord:
    """Poll the job record until `predicate` holds; fail with the record and worker log."""
    deadline = time.monotonic() + timeout
    while True:
        record = store.get(job_id)
        if predicate(record):
            return record
        if time.monotonic() > deadline:
            log = worker.log()[-4000:] if worker else ""
            pytest.fail(f"timed out waiting for {what}: {record.model_dump_json()}\n{log}")
        time.sleep(0.1)


def wait_finished(
    store: JobStore, job_id: str, timeout: float, worker: WorkerProcess | None = None
) -> JobRecord:
    return wait_for(store, job_id, lambda r: r.status.finished, timeout, "a final status", worker)


def statuses(store: JobStore, job_id: str) -> list[dict[str, Any]]:
    """The job's `status` events, in order."""
    return [data for _id, kind, data in store.events(job_id, count=10_000) if kind == "status"]


def train_until_first_checkpoint(
    store: JobStore, celery_app: Celery, worker: WorkerProcess, spec: JobSpec
) -> JobRecord:
    """Submit `spec` as a job and wait until `worker` has checkpointed its first epoch."""
    job = store.create(spec)
    enqueue_job(celery_app, job.id)
    return wait_for(
        store, job.id, lambda r: r.latest_checkpoint is not None, 90, "a checkpoint", worker
    )
