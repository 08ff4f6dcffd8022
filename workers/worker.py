"""`cnnserve worker`: a Celery training worker for one device, and its monitor thread.

One process per GPU with concurrency 1. The pool is `threads`: nothing forks, so CUDA is
never initialised in a parent whose children would inherit it, and the worker still answers
pings (for `/readyz`) while a job trains. The monitor thread keeps the worker's heartbeat key
in Redis and queues again the jobs of workers that died (`runner.recover_orphans`).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading

import redis

from workers.contracts import QUEUE
from workers.settings import DEVICE_PATTERN, Settings, get_settings

log = logging.getLogger(__name__)


class WorkerMonitor(threading.Thread):
    """Heartbeat and orphan recovery, from a daemon thread of the worker process."""

    def __init__(self, name: str, settings: Settings) -> None:
        super().__init__(name="cnnserve-monitor", daemon=True)
        self.node = name
        self.settings = settings
        self.halt = threading.Event()

    def run(self) -> None:
        from workers.celery_app import WORKER_HEARTBEAT_S, app, enqueue_job, write_heartbeat
        from workers.jobs import JobStore
        from workers.runner import recover_orphans

        client = redis.Redis.from_url(self.settings.redis_url, decode_responses=True)
        store = JobStore(client)
        tick = min(WORKER_HEARTBEAT_S, self.settings.lease_seconds / 2)
        recover_every = float(self.settings.lease_seconds)
        next_recover = 0.0
        elapsed = 0.0
        while True:
            try:
                from workers import runner

                write_heartbeat(
                    client,
                    {
                        "name": self.node,
                        "device": self.settings.worker_device,
                        "pid": os.getpid(),
                        "host": socket.gethostname(),
                        "job": runner.current_job,
                    },
                )
                if elapsed >= next_recover:
                    next_recover = elapsed + recover_every
                    recover_orphans(store, self.settings, lambda jid: enqueue_job(app, jid))
            except redis.RedisError as exc:
                log.warning("worker monitor: Redis unavailable (%s)", exc)
            except Exception:
                log.exception("worker monitor failed; retrying")
            if self.halt.wait(tick):
                break
            elapsed += tick
        try:
            from workers.celery_app import clear_heartbeat

            clear_heartbeat(client, self.node)
        finally:
            client.close()


_monitor: WorkerMonitor | None = None


def start_monitor(name: str) -> None:
    """Start this process's monitor thread (on Celery's `worker_ready`)."""
    global _monitor
    if _monitor is None:
        _monitor = WorkerMonitor(name, get_settings())
        _monitor.start()


def stop_monitor() -> None:
    global _monitor
    if _monitor is not None:
        _monitor.halt.set()
        _monitor.join(timeout=5)
        _monitor = None


def run_worker(device: str = "auto", name: str | None = None) -> int:
    """Run a Celery training worker for `device` until it is stopped; returns its exit code."""
    if not re.fullmatch(DEVICE_PATTERN, device):
        log.error("unknown device %r; use auto, cpu, cuda or cuda:N", device)
        return 2
    if device.startswith("cuda"):
        import torch  # the pool does not fork, so asking about CUDA here is safe

        index = int(device.partition(":")[2] or 0)
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            log.error(
                "cannot start a worker on %s: torch sees %d CUDA GPU(s) here; "
                "use --device cpu (or auto) on this machine",
                device,
                torch.cuda.device_count() if torch.cuda.is_available() else 0,
            )
            return 2
        log.info("training on %s (%s)", device, torch.cuda.get_device_name(device))
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

    node = name or f"cnnserve-{device.replace(':', '')}-{os.getpid()}@%h"
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    argv = [
        "worker",
        "--pool=threads",
        "--concurrency=1",
        f"--queues={QUEUE}",
        f"--hostname={node}",
        f"--loglevel={level}",
        "--without-gossip",
        "--without-mingle",
    ]
    log.info("starting a training worker for device %s as %s", device, node)
    code = app.start(argv=argv)
    return int(code or 0)
