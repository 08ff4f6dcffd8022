"""A job that asks for a GPU never trains on a CPU worker: it waits on the GPU queue and says
so; a worker started for `cuda` without a usable GPU refuses to start and says why."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import torch
from celery import Celery

from service.jobs.control import waiting_note
from tests.workers.helpers import WorkerProcess, lenet_spec, wait_finished, wait_for
from workers.celery_app import (
    WORKER_KEY,
    WORKERS_KEY,
    clear_heartbeat,
    enqueue_job,
    worker_heartbeats,
    write_heartbeat,
)
from workers.contracts import CUDA_QUEUE, QUEUE, JobStatus, queue_for, queues_for_worker
from workers.healthcheck import HEARTBEAT_NAMES, HEARTBEAT_PREFIX, check_worker
from workers.settings import Settings
from workers.store.jobs import JobStore
from workers.training.cuda_check import Driver, cuda_problem

ROOT = Path(__file__).resolve().parents[2]


def test_jobs_that_ask_for_a_gpu_have_a_queue_only_gpu_workers_read() -> None:
    assert [queue_for(d) for d in ("auto", "cpu", "cuda", "cuda:1")] == [
        QUEUE,
        QUEUE,
        CUDA_QUEUE,
        CUDA_QUEUE,
    ]
    assert queues_for_worker("cpu") == [QUEUE]
    assert queues_for_worker("cuda:0") == [QUEUE, CUDA_QUEUE]
    # the health check reads the keys workers write
    assert (HEARTBEAT_PREFIX, HEARTBEAT_NAMES) == (WORKER_KEY, WORKERS_KEY)


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_a_cuda_job_waits_for_a_gpu_worker_and_says_so_while_a_cpu_worker_trains_others(
    settings: Settings,
    store: JobStore,
    celery_app: Celery,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    worker = start_worker()
    gpu_job = store.create(lenet_spec(epochs=1, train_limit=256, device="cuda"))
    enqueue_job(celery_app, gpu_job.id, gpu_job.spec.device)
    cpu_job = store.create(lenet_spec(epochs=1, train_limit=256, device="auto"))
    enqueue_job(celery_app, cpu_job.id, cpu_job.spec.device)

    # the worker trains the job queued after the GPU one ...
    assert wait_finished(store, cpu_job.id, 90, worker).status is JobStatus.succeeded
    # ... and never touched the GPU job: still queued, never started, on the GPU queue
    waiting = store.get(gpu_job.id)
    assert waiting.status is JobStatus.queued and waiting.attempts == 0
    assert waiting.worker is None and waiting.error is None
    client = redis.Redis.from_url(settings.redis_url)
    assert client.llen(CUDA_QUEUE) == 1 and client.llen(QUEUE) == 0
    client.close()

    # its heartbeat says what it trains on, and the job's note names it
    (beat,) = worker_heartbeats(settings.redis_url)
    assert beat["name"] == worker.name and beat["device"] == "cpu"
    note = waiting_note(waiting, settings.redis_url)
    assert note is not None
    assert "waiting for a worker with a CUDA GPU" in note and f"{worker.name} (cpu)" in note
    assert "cnnserve worker --device cuda" in note
    assert waiting_note(store.get(cpu_job.id), settings.redis_url) is None

    # the health check a container runs sees this host's worker beating
    assert check_worker(settings.redis_url)[0]

    # once a worker on a GPU beats, the job is no longer said to be stuck
    write_heartbeat(store.r, {"name": "gpu-worker@elsewhere", "device": "cuda:0"})
    assert waiting_note(waiting, settings.redis_url) is None


def test_the_health_check_fails_without_a_worker_on_this_host(settings: Settings) -> None:
    client = redis.Redis.from_url(settings.redis_url)
    write_heartbeat(client, {"name": "w@other", "device": "cpu", "host": "another-host"})
    client.close()
    healthy, line = check_worker(settings.redis_url)
    assert not healthy and "no worker on" in line
    down, why = check_worker("redis://127.0.0.1:1/0")
    assert not down and "Redis is not reachable" in why


def test_heartbeats_are_read_without_scanning_redis_and_forget_workers_gone(
    settings: Settings,
) -> None:
    """`/readyz`, a queued `cuda` job's status and the container health check read the
    workers' heartbeats: that costs as many reads as there are workers, however many jobs and
    checkpoints Redis holds (it scanned the whole keyspace before)."""
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    client.mset({f"cnnserve:ckpt:{i:016x}-e001": "x" for i in range(2000)})
    for name in ("a@h1", "b@h2", "gone@h3"):
        write_heartbeat(client, {"name": name, "device": "cpu", "host": name[-2:]})
    client.delete(f"{WORKER_KEY}gone@h3")  # its key expired: the worker died without a word
    clear_heartbeat(client, "b@h2")  # stopped cleanly
    before = int(client.info("commandstats").get("cmdstat_scan", {}).get("calls", 0))
    assert [b["name"] for b in worker_heartbeats(settings.redis_url)] == ["a@h1"]
    assert client.smembers(WORKERS_KEY) == {"a@h1"}  # the dead one is forgotten
    assert not check_worker(settings.redis_url)[0]  # none on this host
    after = int(client.info("commandstats").get("cmdstat_scan", {}).get("calls", 0))
    assert after == before
    client.close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a usable GPU")
def test_a_cuda_worker_without_a_gpu_exits_at_start_naming_the_requirement_and_the_fix(
    settings: Settings,
) -> None:
    env = {**os.environ, "CNNSERVE_REDIS_URL": settings.redis_url}
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "worker", "--device", "cuda"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    err = done.stderr
    assert "cannot start a worker on cuda: no NVIDIA driver is visible here" in err
    assert f"CUDA {torch.version.cuda}" in err if torch.version.cuda else "CPU-only" in err
    assert "docker-compose.gpu.yml" in err or "CPU-only" in err
    assert "--device cpu" in err
    assert not worker_heartbeats(settings.redis_url)  # it never came up


def _problem(driver: Driver, **kw: object) -> str | None:
    facts: dict[str, object] = {
        "torch_version": "2.14.1+cu130",
        "torch_cuda": "13.0",
        "driver": driver,
        "available": True,
        "gpu_count": 1,
    }
    facts.update(kw)
    return cuda_problem(str(facts.pop("device", "cuda")), **facts)  # type: ignore[arg-type]


def test_the_start_up_check_names_the_driver_the_requirement_and_the_fix() -> None:
    good = Driver("580.95.05", (13, 0))
    assert _problem(good) is None

    old = _problem(Driver("535.104.05", (12, 2)), available=False)
    assert old is not None
    assert "535.104.05 (CUDA 12.2)" in old
    assert "built for CUDA 13.0 and needs an NVIDIA driver 580.65.06 or newer" in old
    assert "upgrade the host's NVIDIA driver" in old
    assert "CNNSERVE_TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126" in old

    # a CUDA 12.8 build runs on any driver for CUDA 12 (minor-version compatibility)
    assert _problem(Driver("535.104.05", (12, 2)), torch_cuda="12.8") is None

    cpu_build = _problem(good, torch_cuda=None, torch_version="2.14.1+cpu")
    assert cpu_build is not None and "CPU-only build" in cpu_build

    hidden = _problem(good, available=False, torch_reason="CUDA_VISIBLE_DEVICES is empty")
    assert hidden is not None and "CUDA_VISIBLE_DEVICES is empty" in hidden

    missing = _problem(good, device="cuda:3", gpu_count=2)
    assert missing is not None and "cuda:0 to cuda:1" in missing


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_an_orphaned_cuda_job_goes_back_to_the_gpu_queue_not_to_a_cpu_worker(
    settings: Settings, store: JobStore, start_worker: Callable[..., WorkerProcess]
) -> None:
    # a GPU worker died mid-job: its job is `running` with no live lease
    orphan = store.create(lenet_spec(epochs=1, train_limit=256, device="cuda"))
    store.update(
        orphan.id,
        lambda r: (setattr(r, "status", JobStatus.running), setattr(r, "worker", "gpu@gone")),
    )
    worker = start_worker()  # a CPU worker's maintenance thread finds the orphan ...
    record = wait_for(
        store, orphan.id, lambda r: r.status is JobStatus.queued, 60, "the requeue", worker
    )
    # ... and sends it back where only GPU workers look; it does not train it
    client = redis.Redis.from_url(settings.redis_url)
    try:
        assert client.llen(CUDA_QUEUE) == 1 and client.llen(QUEUE) == 0
    finally:
        client.close()
    assert record.attempts == 0 and record.error is None
