"""A benchmark's own Redis and checkpoint store, so no run touches the stack's database.

The checkpoint index lives in Redis; a benchmark that saves checkpoints or starts servers over
them starts a private `redis-server` on a free loopback port (`bench_redis` also points
`CNNSERVE_REDIS_URL` at it, for the servers it starts), and opens stores with `open_store`.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from service.cli.stack import free_port
from workers.settings import get_settings
from workers.store.checkpoints import CheckpointStore


def _stop(proc: subprocess.Popen[bytes]) -> None:
    from bench.http import stop_group

    stop_group(proc)


@contextmanager
def private_redis(workdir: Path) -> Iterator[str]:
    """A `redis-server` of the benchmark's own on a free loopback port; stopped by PID."""
    port = free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the benchmark's redis-server did not start") from None
                time.sleep(0.05)
        yield url
    finally:
        client.close()
        _stop(proc)


@contextmanager
def bench_redis(workdir: Path) -> Iterator[str]:
    """`private_redis`, with `CNNSERVE_REDIS_URL` pointing at it meanwhile."""
    before = os.environ.get("CNNSERVE_REDIS_URL")
    with private_redis(workdir) as url:
        os.environ["CNNSERVE_REDIS_URL"] = url
        get_settings.cache_clear()
        try:
            yield url
        finally:
            if before is None:
                os.environ.pop("CNNSERVE_REDIS_URL", None)
            else:
                os.environ["CNNSERVE_REDIS_URL"] = before
            get_settings.cache_clear()


def open_store(location: Path | str) -> CheckpointStore:
    """A checkpoint store at `location` indexed in the Redis `CNNSERVE_REDIS_URL` names."""
    settings = get_settings()
    return CheckpointStore.open(
        location,
        redis_url=settings.redis_url,
        cache_dir=settings.cache_dir,
        cache_bytes=int(settings.cache_bytes),
    )
