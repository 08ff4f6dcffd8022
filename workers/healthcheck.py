"""`cnnserve worker --check`: is a training worker on this host alive? For container checks.

A worker keeps a heartbeat key in Redis (`workers.worker.Heartbeat`, every few seconds, also
while a job trains); this reads those keys (named by the set of workers' names) and looks for
one from this host name. It imports neither Celery nor torch, so a health check every few
seconds costs a fraction of a second.
"""

from __future__ import annotations

import json
import socket

import redis

#: The heartbeat keys' prefix (`workers.celery_app.WORKER_KEY`; a test keeps the two equal).
HEARTBEAT_PREFIX = "cnnserve:worker:"
#: The set of the workers' names (`workers.celery_app.WORKERS_KEY`; the same test).
HEARTBEAT_NAMES = "cnnserve:workers"


def beating_here(redis_url: str, host: str | None = None) -> list[str]:
    """Names of the workers on `host` (default: this one) whose heartbeat key is fresh."""
    host = host or socket.gethostname()
    client: redis.Redis = redis.Redis.from_url(
        redis_url, decode_responses=True, socket_timeout=5, socket_connect_timeout=5
    )
    try:
        beating: set[str] = client.smembers(HEARTBEAT_NAMES)  # type: ignore[assignment]
        keys = [f"{HEARTBEAT_PREFIX}{n}" for n in sorted(beating)]
        values = client.mget(keys) if keys else []
    finally:
        client.close()
    names = []
    for raw in values:
        if raw:
            info = json.loads(raw)
            if info.get("host") == host:
                names.append(str(info.get("name")))
    return names


def check_worker(redis_url: str) -> tuple[bool, str]:
    """Whether a worker on this host beats, and a line saying so (a health check's output)."""
    try:
        names = beating_here(redis_url)
    except redis.RedisError as exc:
        return False, f"unhealthy: Redis is not reachable: {exc}"
    if not names:
        return False, f"unhealthy: no worker on {socket.gethostname()} beat in the last 15 s"
    return True, f"healthy: {', '.join(names)}"
