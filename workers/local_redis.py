"""A Redis of one's own on this machine, for a laptop with none running.

`cnnserve up` and `cnnserve train` start a private `redis-server` when nothing answers at
`CNNSERVE_REDIS_URL` and the URL is a local one: on the URL's port (another free one if that
is taken), bound to loopback, with its append-only file in `data_dir/redis`, so the job and
checkpoint indexes outlive it and the next private Redis (of either command) reads them back.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import redis

log = logging.getLogger(__name__)

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "0.0.0.0", ""})
REDIS_START_SECONDS = 15.0
REDIS_STOP_SECONDS = 10.0


class LocalRedisError(Exception):
    """No usable Redis, and none can be started here; the message says what to do."""


def port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def redis_answers(url: str) -> bool:
    """True when a Redis at `url` answers PING; one that refuses us is a `LocalRedisError`."""
    client = redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=2.0)
    try:
        return bool(client.ping())
    except redis.AuthenticationError as exc:
        raise LocalRedisError(f"Redis at {url} refused the credentials in the URL: {exc}") from exc
    except (redis.ConnectionError, redis.TimeoutError):
        return False
    except redis.ResponseError as exc:
        raise LocalRedisError(f"Redis at {url} answered PING with an error: {exc}") from exc
    finally:
        client.close()


def die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that makes Linux send SIGTERM to the child if this process dies."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


@dataclass(frozen=True)
class PrivateRedis:
    """A `redis-server` to start: its command line, the URL it will answer at, its directory."""

    argv: list[str]
    url: str
    directory: Path


def plan_private_redis(url: str, data_dir: Path, command: str) -> PrivateRedis:
    """How to start a Redis for `url` (which nothing answers) with its files in
    `data_dir/redis`; a `LocalRedisError` naming `command` when none can be started here."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    if host not in LOCAL_HOSTS:
        raise LocalRedisError(
            f"No Redis answers at {url}. `{command}` starts a private Redis only for a "
            f"local URL; start that Redis, or unset CNNSERVE_REDIS_URL to use a local one."
        )
    server = shutil.which("redis-server")
    if server is None:
        raise LocalRedisError(
            f"No Redis answers at {url}, and redis-server is not installed, so "
            f"`{command}` cannot start one. Install it (Debian/Ubuntu: "
            f"`apt-get install redis-server`; `make up` does) or point CNNSERVE_REDIS_URL "
            f"at a running Redis."
        )
    port = parts.port or 6379
    if not port_free("127.0.0.1", port):
        port = free_port()
    directory = data_dir / "redis"
    directory.mkdir(parents=True, exist_ok=True)
    argv = [
        server,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(directory),
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--maxmemory-policy", "noeviction",
        "--logfile", str(directory / "redis.log"),
        "--daemonize", "no",
    ]  # fmt: skip
    if parts.password:
        argv += ["--requirepass", parts.password]
    netloc = f"127.0.0.1:{port}"
    if parts.password is not None or parts.username is not None:
        netloc = f"{parts.username or ''}:{parts.password or ''}@{netloc}"
    private_url = urlunsplit((parts.scheme or "redis", netloc, parts.path or "/0", "", ""))
    return PrivateRedis(argv, private_url, directory)


def wait_until_answers(
    plan: PrivateRedis, proc: subprocess.Popen[bytes], stopping: Callable[[], bool]
) -> None:
    """Wait for a just-started private Redis to answer; a `LocalRedisError` if it exits, takes
    longer than `REDIS_START_SECONDS`, or `stopping()` says to give up."""
    deadline = time.monotonic() + REDIS_START_SECONDS
    while not redis_answers(plan.url):
        if proc.poll() is not None:
            raise LocalRedisError(
                f"redis-server exited with code {proc.returncode} at start-up; "
                f"see {plan.directory / 'redis.log'}."
            )
        if stopping():
            raise LocalRedisError("stopped while Redis was starting")
        if time.monotonic() > deadline:
            raise LocalRedisError(f"redis-server did not answer within {REDIS_START_SECONDS:.0f} s")
        time.sleep(0.05)


def stop_process_group(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM to a child that leads its own session, SIGKILL to what is left after `timeout`."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log.warning("redis-server (pid %d) did not stop in time; killing it", proc.pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextlib.contextmanager
def redis_for(url: str, data_dir: Path, command: str) -> Iterator[tuple[str, bool]]:
    """The Redis URL to use while the block runs, and whether it is a private one: `url` when
    a Redis answers there, else a private one started for the block (`plan_private_redis`)
    and stopped after it (its append-only file is flushed on the way down)."""
    if redis_answers(url):
        yield url, False
        return
    plan = plan_private_redis(url, data_dir, command)
    proc = subprocess.Popen(
        plan.argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # a terminal's Ctrl-C reaches us only; we stop it ourselves
        preexec_fn=die_with_parent(),
    )
    try:
        wait_until_answers(plan, proc, lambda: False)
        log.info("started a private Redis at %s (AOF in %s)", plan.url, plan.directory)
        yield plan.url, True
    finally:
        stop_process_group(proc, REDIS_STOP_SECONDS)
