"""The Celery side of training: thin tasks over `runner.run_job` and `evaluate.run_evaluation`,
and the worker's hooks. Every task option (acks late, reject on a lost worker, no results) is
the app's (`workers.celery_app.make_celery`); a task here names itself and binds, nothing more.

Only workers load this module (the app's `include`); the engine itself is imported lazily,
inside the task, so even loading this module does not pull in the training loop.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task
from celery.signals import worker_ready, worker_shutdown, worker_shutting_down

from workers.celery_app import app, enqueue
from workers.contracts import EVALUATE_TASK, QUEUE, TRAIN_TASK
from workers.settings import get_settings

log = logging.getLogger(__name__)


@app.task(bind=True, name=TRAIN_TASK)
def train_job(self: Task, job_id: str) -> str:
    """Train the job `job_id` (an id, never the spec: the record in Redis is the truth)."""
    from workers.training.runner import run_job

    # a job put back (the worker stops mid-job) goes back to the queue it came from
    queue = (self.request.delivery_info or {}).get("routing_key") or QUEUE
    return run_job(
        job_id,
        worker=str(self.request.hostname or "worker"),
        settings=get_settings(),
        enqueue=lambda jid: enqueue(app, TRAIN_TASK, jid, queue=queue),
    )


@app.task(bind=True, name=EVALUATE_TASK)
def evaluate(self: Task, evaluation_id: str) -> str:
    """Evaluate the checkpoint an evaluation record names (the record is the truth)."""
    from workers.training.evaluate import run_evaluation

    return run_evaluation(
        evaluation_id, worker=str(self.request.hostname or "worker"), settings=get_settings()
    )


@worker_ready.connect
def _start_monitor(sender: Any = None, **_: Any) -> None:
    from workers.worker import start_monitor

    start_monitor(str(getattr(sender, "hostname", None) or "worker"))


@worker_shutting_down.connect
def _stop_training(**_: Any) -> None:
    from workers.training.runner import shutdown_requested

    log.info("worker shutting down: a running job stops and goes back to the queue")
    shutdown_requested.set()


@worker_shutdown.connect
def _stop_monitor(**_: Any) -> None:
    from workers.worker import stop_monitor

    stop_monitor()
