"""`cnnserve api`: serve the app factory with uvicorn, in one process or several.

With `--workers N` every process binds its own listening socket to the same address with
`SO_REUSEPORT`, so the kernel spreads new connections over the processes. uvicorn's own
`--workers` shares one socket, and whichever process wakes first accepts a whole burst of
connections (asyncio accepts up to the backlog per wake-up): keep-alive clients then pile
onto one process while the other idles, which is why two processes served no more than one.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import time
from types import FrameType
from typing import Any

import uvicorn

from service.api.logs import uvicorn_log_config
from service.inference.backends import API_PROCESSES_ENV
from workers.settings import get_settings

logger = logging.getLogger(__name__)

#: How long a stopping server may finish its requests (also each worker's own limit).
GRACEFUL_S = 10


def _config(host: str, port: int, http: str = "auto") -> dict[str, Any]:
    return {
        "http": http,
        "app": "service.api.app:create_app",
        "log_config": uvicorn_log_config(get_settings()),
        "factory": True,
        "host": host,
        "port": port,
        "proxy_headers": True,
        "log_level": logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower(),
        "timeout_graceful_shutdown": GRACEFUL_S,
    }


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port) that other processes may bind too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _worker(host: str, port: int, http: str = "auto") -> None:
    """One API process of several: its own socket on the shared port."""
    sock = reuse_port_socket(host, port)
    config = uvicorn.Config(**_config(host, port, http))
    uvicorn.Server(config).run(sockets=[sock])


def _supervise(host: str, port: int, workers: int, http: str = "auto") -> int:
    """Start `workers` API processes, restart any that dies, stop them all on TERM or INT;
    HUP is passed on (each re-reads the keys file)."""
    ctx = multiprocessing.get_context("spawn")
    # bound here first, so a taken port fails at once and the children inherit a good one
    probe = reuse_port_socket(host, port)
    procs: list[multiprocessing.process.BaseProcess] = []
    stopping = False

    def start() -> multiprocessing.process.BaseProcess:
        proc = ctx.Process(
            target=_worker, args=(host, port, http), name="cnnserve-api", daemon=False
        )
        proc.start()
        return proc

    def on_stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    def on_hup(signum: int, frame: FrameType | None) -> None:
        for proc in procs:
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signal.SIGHUP)

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    procs.extend(start() for _ in range(workers))
    probe.close()  # the children listen now
    logger.info("%d API processes on http://%s:%d (SO_REUSEPORT)", workers, host, port)
    while not stopping:
        time.sleep(0.2)
        for i, proc in enumerate(procs):
            if not stopping and not proc.is_alive():
                logger.warning(
                    "API process %s exited (%s); starting another", proc.pid, proc.exitcode
                )
                procs[i] = start()
    for proc in procs:
        if proc.is_alive():
            proc.terminate()  # SIGTERM: uvicorn finishes what is in flight
    deadline = time.monotonic() + GRACEFUL_S + 5
    for proc in procs:
        proc.join(max(0.1, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    return 0


def serve(host: str = "127.0.0.1", port: int = 8000, workers: int = 1, http: str = "auto") -> int:
    """Run the API until interrupted; returns an exit code."""
    if workers < 1:
        logger.error("--workers must be at least 1, got %d", workers)
        return 2
    # inherited by the worker processes: each sizes its inference threads to its share
    os.environ[API_PROCESSES_ENV] = str(workers)
    if workers == 1:
        uvicorn.run(**_config(host, port, http))
        return 0
    # each process has its own Prometheus registry: /metrics shows one process's numbers
    logger.warning("%d worker processes: /metrics reports the one that answers", workers)
    try:
        return _supervise(host, port, workers, http)
    except OSError as exc:
        logger.error("cannot listen on %s:%d: %s", host, port, exc)
        return 1
