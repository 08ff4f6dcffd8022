"""`cnnserve api` serves the app with uvicorn and stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.cli.stack import free_port
from tests.service.conftest import stop_process, wait_http
from workers.settings import Settings


def start_api(
    settings: Settings, log_path: Path, *args: str
) -> tuple[subprocess.Popen[bytes], str]:
    """`cnnserve api` on a free port with the test's Redis and data dir, no keys; its URL."""
    port = free_port()
    env = {
        **os.environ,
        "CNNSERVE_REDIS_URL": settings.redis_url,
        "CNNSERVE_DATA_DIR": str(settings.data_dir),
        "CNNSERVE_API_KEYS": "",
    }
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "api", "--port", str(port), *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, f"http://127.0.0.1:{port}"


@pytest.mark.integration
def test_cnnserve_api_serves_and_stops(settings: Settings, tmp_path: Path) -> None:
    log_path = tmp_path / "api.log"
    proc, url = start_api(settings, log_path)
    try:
        wait_http(f"{url}/healthz", proc)
        assert httpx.get(f"{url}/v1/models/lenet", timeout=5).json()["name"] == "lenet"
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it caught
        assert proc.wait(timeout=20) in (0, -signal.SIGTERM)
    finally:
        stop_process(proc)
    assert "no API keys" in log_path.read_text()


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _listening_inodes(port: int) -> set[str]:
    """Inodes of the sockets listening on 127.0.0.1:`port` (state 0A in /proc/net/tcp)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":
            inodes.add(fields[9])
    return inodes


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


@pytest.mark.integration
def test_cnnserve_api_workers_each_listen_and_are_supervised(
    settings: Settings, tmp_path: Path
) -> None:
    """`--workers 2`: two processes, each with its own listening socket on the port (the kernel
    spreads connections over them), a dead one replaced, all stopped by one SIGTERM."""
    proc, url = start_api(settings, tmp_path / "api.log", "--workers", "2")
    port = int(url.rsplit(":", 1)[1])
    try:
        wait_http(f"{url}/healthz", proc)

        def servers() -> dict[int, set[str]]:
            listening = _listening_inodes(port)
            found = {c: _socket_inodes(c) & listening for c in _children(proc.pid)}
            return {c: inodes for c, inodes in found.items() if inodes}

        deadline = time.monotonic() + 60
        while len(servers()) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        first = servers()
        assert len(first) == 2, first
        # two sockets, not one shared: each process accepts its own connections
        assert len(set().union(*first.values())) == 2
        with httpx.Client(timeout=5) as client:
            assert all(client.get(f"{url}/healthz").status_code == 200 for _ in range(20))
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while (len(servers()) < 2 or victim in servers()) and time.monotonic() < deadline:
            time.sleep(0.2)
        second = servers()
        assert len(second) == 2 and victim not in second, second
        assert "starting another" in (tmp_path / "api.log").read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not any(Path(f"/proc/{c}").exists() for c in second)
    finally:
        stop_process(proc)
