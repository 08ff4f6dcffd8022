"""The worker's part of `POST /v1/checkpoints/{ref}/evaluate` (task `cnnserve.evaluate`).

The task (`workers.tasks.evaluate`) is a thin call of `run_evaluation`: it reads the evaluation's
record (`workers.store.evaluations`), marks it `running`, evaluates the checkpoint on the test
set as validation does (`workers.training.validation.evaluate_checkpoint`), and records the
result (`succeeded`) or the reason it could not (`failed`).
"""

from __future__ import annotations

import logging

import redis

from workers.contracts import JobStatus
from workers.errors import TrainingError
from workers.settings import Settings
from workers.store.checkpoints import (
    CheckpointError,
    CheckpointStore,
    StoredEvaluation,
    StoreUnavailableError,
)
from workers.store.evaluations import EvaluationStore
from workers.store.jobs import now_iso
from workers.training.data import load_fashion_mnist
from workers.training.devices import prepare_device, release_memory
from workers.training.validation import evaluate_checkpoint

log = logging.getLogger(__name__)


def run_evaluation(evaluation_id: str, *, worker: str, settings: Settings) -> str:
    """Evaluate the recorded checkpoint and keep the result; what happened (its status)."""
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    store = EvaluationStore(client)
    try:
        record = store.get(evaluation_id)
        if record is None or record.status.finished:
            return "missing" if record is None else "finished"
        record.status, record.started_at, record.worker = JobStatus.running, now_iso(), worker
        store.put(record)
        try:
            device, amp = prepare_device(settings.worker_device, "auto")
            result: StoredEvaluation = evaluate_checkpoint(
                CheckpointStore.from_settings(settings, client),
                record.checkpoint,
                load_fashion_mnist(settings),
                device=device,
                amp_dtype=amp,
                limit=record.limit,
            )
        except (CheckpointError, TrainingError, StoreUnavailableError) as exc:
            record.status, record.error = JobStatus.failed, str(exc)
        except Exception as exc:  # a bug or the environment: fail the evaluation, keep the worker
            log.exception("evaluation %s crashed", evaluation_id)
            record.status, record.error = JobStatus.failed, f"{type(exc).__name__}: {exc}"
        else:
            record.status, record.accuracy, record.images = (
                JobStatus.succeeded,
                result.accuracy,
                result.images,
            )
        finally:
            release_memory(settings.worker_device)
        record.finished_at = now_iso()
        store.put(record)
        return record.status.value
    finally:
        client.close()
