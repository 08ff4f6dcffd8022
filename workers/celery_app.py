"""The Celery app: Redis broker and result backend, JSON only, durable delivery of jobs.

The API imports this module to enqueue jobs and to see live workers; it never imports the
training engine (only workers load `workers.tasks`, through `include`).

What the API calls:
- `enqueue_job(app, job_id, spec.device)` after `JobStore.create(spec)` to queue the job;
- `live_workers(app, timeout)` (Celery ping) or `worker_heartbeats(redis_url)` (instant, from
  the heartbeat keys workers keep in Redis) for `/readyz`;
- to cancel: `JobStore.request_cancel(id)`, and if the job is still `queued`, mark it
  `cancelled` (with `finished_at` and a `status` event) — a worker that later receives its
  message finds it finished and drops it; a running job is stopped by its worker.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis
from celery import Celery

from workers.contracts import CUDA_QUEUE, QUEUE, TRAIN_TASK, queue_for
from workers.settings import Settings, get_settings
from workers.store.jobs import PREFIX

#: Where kombu's Redis transport keeps the training queue's messages: one list per priority
#: step (its defaults: 0, 3, 6, 9; the list of 0 is the queue's own name) and, once delivered
#: and until acknowledged, the `unacked` hash.
_PRIORITY_SEP = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)
UNACKED_KEY = "unacked"
#: Messages read at most when looking for lost ones; past it nothing is called lost.
MAX_SCANNED_MESSAGES = 100_000

#: Workers refresh `cnnserve:worker:<name>` this often; the key expires after 3 misses.
WORKER_HEARTBEAT_S = 5.0
WORKER_KEY = f"{PREFIX}worker:"
#: The names of the workers that keep a heartbeat key (so that no reader scans for them).
WORKERS_KEY = f"{PREFIX}workers"


def make_celery(settings: Settings) -> Celery:
    """A Celery app on the settings' Redis, configured for long, durable training jobs."""
    app = Celery(
        "cnnserve",
        broker=settings.redis_url,
        backend=settings.redis_url,
        include=["workers.tasks"],
    )
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # a job's message is acked only when the job is over, so a dead worker loses nothing
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # longer than the longest job, or Redis would hand a running job to a second worker
        broker_transport_options={"visibility_timeout": settings.visibility_timeout},
        task_default_queue=QUEUE,
        task_routes={TRAIN_TASK: {"queue": QUEUE}},
        task_ignore_result=True,  # the job record in Redis is the result
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        enable_utc=True,
    )
    return app


app = make_celery(get_settings())


#: How often sending a task is retried when the broker connection fails, and how fast.
ENQUEUE_RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2}


def enqueue_job(celery: Celery, job_id: str, device: str = "auto") -> str:
    """Queue a training job by task name (no engine import); returns the Celery task id.

    `device` is the spec's: a job that asks for a GPU goes where only GPU workers look.
    """
    return enqueue(celery, TRAIN_TASK, job_id, queue=queue_for(device))


def enqueue(celery: Celery, task: str, object_id: str, queue: str = QUEUE) -> str:
    """Queue one piece of worker work by task name; returns the Celery task id.

    The one way work is sent, by the API and by orphan recovery alike: the task id is the
    job's (or evaluation's) id, so broker tools show what a message is for, with a short retry
    when the broker connection blips; if it still fails, the caller sees Kombu's or Redis's
    error.
    """
    result = celery.send_task(
        task,
        args=[object_id],
        queue=queue,
        task_id=object_id,
        retry=True,
        retry_policy=ENQUEUE_RETRY_POLICY,
        # the job record is the result: no result subscription per message (a PubSub
        # subscribe and unsubscribe round trip each, for a result nobody reads)
        ignore_result=True,
    )
    return str(result.id)


def _task_id(raw: str | bytes) -> str | None:
    try:
        message = json.loads(raw)
        if isinstance(message, list):  # unacked: [message, exchange, routing key]
            message = message[0]
        task_id = message["headers"]["id"]
    except (ValueError, KeyError, TypeError, IndexError):
        return None
    return task_id if isinstance(task_id, str) else None


def task_ids_in_broker(client: Any, limit: int = MAX_SCANNED_MESSAGES) -> set[str] | None:
    """The task ids (job and evaluation ids, `enqueue`'s) of every message the broker holds
    for the training queues (CPU and GPU): waiting, or delivered to a worker and not yet
    acknowledged.

    None when it holds more than `limit` messages: too many to read to say that one is missing.
    """
    lists = [
        f"{queue}{suffix}"
        for queue in (QUEUE, CUDA_QUEUE)
        for suffix in ("", *(f"{_PRIORITY_SEP}{step}" for step in _PRIORITY_STEPS))
    ]
    pipe = client.pipeline(transaction=False)
    for key in lists:
        pipe.llen(key)
    pipe.hlen(UNACKED_KEY)
    if sum(int(n) for n in pipe.execute()) > limit:
        return None
    ids: set[str | None] = set()
    for key in lists:
        for start in range(0, limit, 1000):
            chunk = client.lrange(key, start, start + 999)
            ids.update(_task_id(raw) for raw in chunk)
            if len(chunk) < 1000:
                break
    ids.update(_task_id(raw) for raw in client.hvals(UNACKED_KEY))
    ids.discard(None)
    return {i for i in ids if i is not None}


def live_workers(celery: Celery, timeout: float = 1.0) -> list[str]:
    """Node names of the workers that answer a ping within `timeout` seconds."""
    replies: list[dict[str, Any]] = celery.control.ping(timeout=timeout) or []
    return sorted({name for reply in replies for name in reply})


def worker_heartbeats(redis_url: str) -> list[dict[str, Any]]:
    """The workers that refreshed their heartbeat key recently (no broadcast, no waiting).

    Each entry: `name`, `device`, `pid`, `host`, `job` (the job it trains or None), `seen_at`
    (epoch seconds). Read from the set of workers' names and their keys: as many reads as there
    are workers, whatever else Redis holds (never a scan of the keyspace).
    """
    client: Any = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return beating(client)
    finally:
        client.close()


def beating(client: Any) -> list[dict[str, Any]]:
    """The heartbeats of `WORKERS_KEY`'s workers whose keys are fresh; forgets the others."""
    names = sorted(client.smembers(WORKERS_KEY))
    if not names:
        return []
    out, gone = [], []
    for name, raw in zip(names, client.mget([f"{WORKER_KEY}{n}" for n in names]), strict=True):
        if raw:
            out.append(json.loads(raw))
        else:
            gone.append(name)
    if gone:  # expired: a worker that stopped without clearing its heartbeat
        client.eval(_FORGET, 1, WORKERS_KEY, WORKER_KEY, *gone)
    return out


#: Lua: forget the named workers whose heartbeat key is (still) gone, in one step, so that a
#: worker that beats again meanwhile is not dropped from the set.
_FORGET = """
for i = 2, #ARGV do
  if redis.call('EXISTS', ARGV[1] .. ARGV[i]) == 0 then redis.call('SREM', KEYS[1], ARGV[i]) end
end
return 0
"""


def write_heartbeat(client: Any, info: dict[str, Any]) -> None:
    """Record that a worker is alive (called by the worker every `WORKER_HEARTBEAT_S`)."""
    info = {**info, "seen_at": time.time()}
    pipe = client.pipeline(transaction=False)
    pipe.set(f"{WORKER_KEY}{info['name']}", json.dumps(info), ex=int(3 * WORKER_HEARTBEAT_S))
    pipe.sadd(WORKERS_KEY, info["name"])
    pipe.execute()


def clear_heartbeat(client: Any, name: str) -> None:
    pipe = client.pipeline(transaction=False)
    pipe.delete(f"{WORKER_KEY}{name}")
    pipe.srem(WORKERS_KEY, name)
    pipe.execute()
