"""The local stack behind `cnnserve up`: Redis (when none answers), one worker and the API.

Every part runs as a child process in its own session, so a terminal's Ctrl-C reaches only this
process, which then stops the children in reverse order (SIGTERM to each process group, SIGKILL
after a timeout) and leaves nothing behind. If a child dies on its own, everything stops and
the command exits non-zero.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from workers.local_redis import (
    LocalRedisError,
    die_with_parent,
    plan_private_redis,
    port_free,
    redis_answers,
    wait_until_answers,
)
from workers.local_redis import free_port as free_port  # where tests and benchmarks take it
from workers.settings import get_settings

logger = logging.getLogger(__name__)

API_START_SECONDS = 180.0
#: Seconds each part gets to stop after SIGTERM before SIGKILL.
STOP_TIMEOUTS = {"api": 10.0, "worker": 30.0, "redis": 10.0}


class StackError(Exception):
    """The stack cannot start or keep running; the message tells the user what to do."""


@dataclass
class Child:
    """One process of the stack, leader of its own process group."""

    name: str
    proc: subprocess.Popen[bytes]

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


def run_stack(host: str, port: int, device: str) -> int:
    """Run Redis (if needed), one worker and the API until Ctrl-C or SIGTERM; 0 on a clean stop."""
    return LocalStack(host=host, port=port, device=device).run()


def _display_host(host: str) -> str:
    """The host to put in a URL a person clicks: a wildcard bind is reached on loopback."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


class LocalStack:
    """Starts, watches and stops the local stack's processes."""

    def __init__(self, host: str, port: int, device: str) -> None:
        self.host = host
        self.port = port
        self.device = device
        self.settings = get_settings()
        self.children: list[Child] = []
        self._stop = threading.Event()
        self._signals = 0
        self._signals_at_stop = 0
        self._preexec = die_with_parent()

    # -- lifecycle -------------------------------------------------------------------------

    def run(self) -> int:
        """Start everything, wait for a signal or a dead child, stop everything."""
        previous = {
            sig: signal.signal(sig, self._on_signal)
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        }
        code = 0
        try:
            self._start()
            code = self._watch()
        except StackError as exc:
            logger.error("%s", exc)
            code = 1
        finally:
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if code == 0:
            logger.info("cnnserve stack stopped")
        return code

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals == 1:
            logger.info("%s: stopping the stack (again to kill it now)", signal.strsignal(signum))
        self._stop.set()

    def _start(self) -> None:
        data_dir = self.settings.data_dir.expanduser().resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        if not port_free(self.host, self.port):
            raise StackError(
                f"Port {self.port} on {self.host} is already in use; stop what holds it or "
                f"choose another with `cnnserve up --port N`."
            )
        redis_url, private = self._ensure_redis(data_dir)
        env = dict(os.environ)
        env["CNNSERVE_REDIS_URL"] = redis_url
        env["CNNSERVE_DATA_DIR"] = str(data_dir)
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        cli = [sys.executable, "-m", "service.cli", "--log-level", str(level)]

        self._spawn("worker", [*cli, "worker", "--device", self.device], env)
        self._spawn("api", [*cli, "api", "--host", self.host, "--port", str(self.port)], env)
        base = f"http://{_display_host(self.host)}:{self.port}"
        self._wait_for_api(f"{base}/healthz")

        redis_note = f"private, AOF in {data_dir / 'redis'}" if private else "already running"
        sys.stdout.write(
            "\ncnnserve is up\n"
            f"  dashboard {base}/\n"
            f"  API       {base}/v1\n"
            f"  docs      {base}/docs\n"
            f"  Redis     {redis_url} ({redis_note})\n"
            f"  worker    device {self.device}; data in {data_dir}\n"
            "Ctrl-C stops everything.\n\n"
        )
        sys.stdout.flush()

    def _watch(self) -> int:
        while not self._stop.wait(0.25):
            self._check_children()
        return 0

    def _check_children(self) -> None:
        for child in self.children:
            code = child.proc.poll()
            if code is not None:
                raise StackError(
                    f"The {child.name} (pid {child.proc.pid}) exited unexpectedly with code "
                    f"{code}; stopping the stack. Its output is above."
                )

    # -- parts -----------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> Child:
        logger.info("starting the %s: %s", name, " ".join(argv))
        proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches us only; we stop the group ourselves
            preexec_fn=self._preexec,
        )
        child = Child(name, proc)
        self.children.append(child)
        return child

    def _ensure_redis(self, data_dir: Path) -> tuple[str, bool]:
        """The Redis URL to use and whether we started that Redis ourselves."""
        url = self.settings.redis_url
        try:
            if redis_answers(url):
                logger.info("using the Redis at %s", url)
                return url, False
            plan = plan_private_redis(url, data_dir, "cnnserve up")
            child = self._spawn("redis", plan.argv, dict(os.environ))
            wait_until_answers(plan, child.proc, self._stop.is_set)
        except LocalRedisError as exc:
            raise StackError(str(exc)) from exc
        logger.info("started a private Redis at %s (AOF in %s)", plan.url, plan.directory)
        return plan.url, True

    def _wait_for_api(self, url: str) -> None:
        deadline = time.monotonic() + API_START_SECONDS
        while True:
            self._check_children()
            if self._stop.is_set():
                raise StackError("stopped while the API was starting")
            with (
                contextlib.suppress(urllib.error.URLError, OSError),
                urllib.request.urlopen(url, timeout=2) as response,
            ):
                if response.status == 200:
                    return
            if time.monotonic() > deadline:
                raise StackError(f"The API did not answer {url} within {API_START_SECONDS:.0f} s")
            self._stop.wait(0.2)

    # -- stopping --------------------------------------------------------------------------

    def _stop_all(self) -> None:
        """Stop children newest first, so the API goes before the worker and Redis goes last."""
        self._signals_at_stop = self._signals
        for child in reversed(self.children):
            self._stop_child(child)
        self.children.clear()

    def _stop_child(self, child: Child) -> None:
        pgid = child.proc.pid  # leader of its own session, so its pid is the group id
        if child.alive:
            logger.info("stopping the %s (pid %d)", child.name, child.proc.pid)
            self._signal_group(pgid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUTS.get(child.name, 10.0)
            while child.alive and time.monotonic() < deadline:
                if self._signals > self._signals_at_stop:
                    break  # asked (again) while stopping: no more waiting
                time.sleep(0.05)
            if child.alive:
                logger.warning("the %s did not stop in time; killing it", child.name)
        # Whatever is left in the group (the leader or its children) goes now.
        self._signal_group(pgid, signal.SIGKILL)
        child.proc.wait()

    @staticmethod
    def _signal_group(pgid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
