"""`cnnserve worker`: a Celery training worker for one device, and its monitor thread.

One process per GPU with concurrency 1. The pool is `threads`: nothing forks, so CUDA is
never initialised in a parent whose children would inherit it, and the worker still answers
pings (for `/readyz`) while a job trains. Two daemon threads run beside the pool: one keeps
the worker's heartbeat key in Redis, the other queues again the jobs of workers that died
(`runner.recover_orphans`), sends again the messages the broker lost (`runner.resend_lost`)
and removes jobs past their retention.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
from typing import TYPE_CHECKING

import redis

from workers.contracts import TRAIN_TASK, queues_for_worker
from workers.settings import DEVICE_PATTERN, Settings, get_settings

if TYPE_CHECKING:
    from workers.store.jobs import JobStore

log = logging.getLogger(__name__)
#: Held by the worker that sweeps the broker for lost messages this period (see `_my_turn`).
MAINTENANCE_KEY = "cnnserve:maintenance:turn"


class Heartbeat(threading.Thread):
    """Keeps the worker's heartbeat key fresh, and does nothing else, so nothing delays it."""

    def __init__(self, name: str, settings: Settings, halt: threading.Event) -> None:
        super().__init__(name="cnnserve-heartbeat", daemon=True)
        self.node = name
        self.settings = settings
        self.halt = halt

    def run(self) -> None:
        from workers.celery_app import WORKER_HEARTBEAT_S, clear_heartbeat, write_heartbeat
        from workers.training import runner
        from workers.training.devices import describe_device

        client = redis.Redis.from_url(self.settings.redis_url, decode_responses=True)
        tick = min(WORKER_HEARTBEAT_S, self.settings.lease_seconds / 2)
        info = {
            "name": self.node,
            **describe_device(self.settings.worker_device),
            "pid": os.getpid(),
            "host": socket.gethostname(),
        }
        try:
            while True:
                try:
                    write_heartbeat(client, {**info, "job": runner.current_job})
                except redis.RedisError as exc:
                    log.warning("worker heartbeat: Redis unavailable (%s)", exc)
                if self.halt.wait(tick):
                    break
            clear_heartbeat(client, self.node)
        except redis.RedisError:
            pass  # shutting down without Redis: the key expires by itself
        finally:
            client.close()


class Maintenance(threading.Thread):
    """Every `lease_seconds`: queue again the jobs of workers that died, send again the
    messages the broker lost, drop expired jobs.

    Its own thread (and Redis connection), so a slow scan never holds up the heartbeat; it
    also indexes a job store and a checkpoint store written by an earlier version before the
    first scan.
    """

    def __init__(self, settings: Settings, halt: threading.Event, worker: str = "") -> None:
        super().__init__(name="cnnserve-maintenance", daemon=True)
        self.settings = settings
        self.halt = halt
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}"

    def run(self) -> None:
        from workers.celery_app import app, enqueue, enqueue_job, task_ids_in_broker
        from workers.store.checkpoints import CheckpointStore, StoreUnavailableError
        from workers.store.jobs import JobStore
        from workers.training.runner import recover_orphans, resend_lost

        store = JobStore.from_url(self.settings.redis_url)

        def requeue_job(store: JobStore, job_id: str) -> str:
            # back on the queue its device asks for: a `cuda` job only ever reaches a GPU worker
            return enqueue_job(app, job_id, store.get(job_id).spec.device)

        def resend(store: JobStore, task: str, object_id: str) -> str:
            # a job goes back on the queue its device asks for, as orphans do
            if task == TRAIN_TASK:
                return requeue_job(store, object_id)
            return enqueue(app, task, object_id)

        checkpoints = CheckpointStore.from_settings(self.settings, store.r)
        retention = self.settings.job_retention
        try:
            while True:
                try:
                    store.ensure_indexed()
                    checkpoints.ensure_indexed()
                    recover_orphans(store, self.settings, lambda jid: requeue_job(store, jid))
                    if self._my_turn(store):  # the broker's read and the purge: one worker's
                        resend_lost(
                            store,
                            self.settings,
                            lambda task, oid: resend(store, task, oid),
                            lambda: task_ids_in_broker(store.r),
                        )
                        if retention is not None:
                            store.purge_finished(retention.total_seconds())
                except (redis.RedisError, StoreUnavailableError) as exc:
                    log.warning("worker maintenance: %s", exc)
                except Exception:
                    log.exception("worker maintenance failed; retrying")
                if self.halt.wait(float(self.settings.lease_seconds)):
                    break
        finally:
            store.r.close()

    def _my_turn(self, store: JobStore) -> bool:
        """Whether this worker does this period's sweep of the broker: the first of all the
        workers to ask in each period (a key that lives a little less than one), so that the
        broker is read once a period, not once per worker."""
        period_ms = int(self.settings.lease_seconds * 1000)
        return bool(
            store.r.set(MAINTENANCE_KEY, self.worker, nx=True, px=max(1, period_ms * 4 // 5))
        )


class WorkerMonitor:
    """The worker's background threads: its heartbeat, and maintenance beside it."""

    def __init__(self, name: str, settings: Settings) -> None:
        self.halt = threading.Event()
        self.threads = [
            Heartbeat(name, settings, self.halt),
            Maintenance(settings, self.halt, name),
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.halt.set()
        for thread in self.threads:
            thread.join(timeout=timeout)


_monitor: WorkerMonitor | None = None


def start_monitor(name: str) -> None:
    """Start this process's heartbeat and maintenance threads (on Celery's `worker_ready`)."""
    global _monitor
    if _monitor is None:
        _monitor = WorkerMonitor(name, get_settings())
        _monitor.start()


def stop_monitor() -> None:
    global _monitor
    if _monitor is not None:
        _monitor.stop()
        _monitor = None


def run_worker(device: str = "auto", name: str | None = None) -> int:
    """Run a Celery training worker for `device` until it is stopped; returns its exit code."""
    if not re.fullmatch(DEVICE_PATTERN, device):
        log.error("unknown device %r; use auto, cpu, cuda or cuda:N", device)
        return 2
    if device.startswith("cuda"):
        from workers.training.cuda_check import worker_cuda_problem

        problem = worker_cuda_problem(device)
        if problem is not None:
            log.error("cannot start a worker on %s: %s", device, problem)
            return 2
    elif device == "auto":
        from workers.training.cuda_check import read_driver, worker_cuda_problem

        problem = worker_cuda_problem("cuda") if read_driver().visible else None
        if problem is not None:  # never fall back to the CPU without a word
            log.warning("an NVIDIA driver is here, but this worker trains on the CPU: %s", problem)
    # tasks read the worker's device from the settings; set it before anything reads them
    os.environ["CNNSERVE_WORKER_DEVICE"] = device
    get_settings.cache_clear()
    settings = get_settings()
    if settings.visibility_timeout <= settings.job_max_seconds:
        log.warning(
            "CNNSERVE_VISIBILITY_TIMEOUT (%d s) should exceed CNNSERVE_JOB_MAX_SECONDS (%d s), "
            "or Redis may hand a long job to a second worker",
            settings.visibility_timeout,
            settings.job_max_seconds,
        )
    from workers.celery_app import app
    from workers.training.devices import describe_device

    trains_on = describe_device(device)
    queues = queues_for_worker(trains_on["device"])
    node = name or f"cnnserve-{device.replace(':', '')}-{os.getpid()}@%h"
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    argv = [
        "worker",
        "--pool=threads",
        "--concurrency=1",
        f"--queues={','.join(queues)}",
        f"--hostname={node}",
        f"--loglevel={level}",
        "--without-gossip",
        "--without-mingle",
    ]
    log.info(
        "starting a training worker for device %s (%s) as %s, taking jobs from %s",
        device,
        ", ".join(f"{k} {v}" for k, v in trains_on.items()),
        node,
        ", ".join(queues),
    )
    code = app.start(argv=argv)
    return int(code or 0)
