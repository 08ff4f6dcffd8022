"""`cnnserve up`: its own Redis when none answers, one worker, the API; a stop leaves nothing."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis

from service.cli.stack import free_port
from tests.deploy.stack_helpers import (
    CNNSERVE,
    get,
    port_open,
    running,
    running_stack,
    stack_env,
    start_redis,
)


def _wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"cnnserve up did not exit within {timeout} s") from exc


def test_no_redis_and_no_redis_server_is_a_clear_error(tmp_path: Path) -> None:
    """With nothing answering and redis-server not on PATH, it says so and exits 1."""
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    url = f"redis://127.0.0.1:{free_port()}/0"
    env = stack_env(tmp_path / "data", url, PATH=str(empty_bin))
    result = subprocess.run(
        [str(CNNSERVE), "up", "--port", str(free_port())],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    message = result.stderr
    assert f"No Redis answers at {url}" in message
    assert "redis-server is not installed" in message
    assert "apt-get install redis-server" in message
    assert "Traceback" not in message
    assert "cnnserve is up" not in result.stdout


def test_a_busy_api_port_is_a_clear_error(tmp_path: Path) -> None:
    """A port already taken is refused before anything starts."""
    holder = subprocess.Popen(
        ["python3", "-c", "import socket,time,sys; s=socket.socket(); "
         "s.bind(('127.0.0.1',0)); s.listen(); print(s.getsockname()[1], flush=True); "
         "time.sleep(60)"],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        port = int(holder.stdout.readline())
        env = stack_env(tmp_path / "data", f"redis://127.0.0.1:{free_port()}/0")
        result = subprocess.run(
            [str(CNNSERVE), "up", "--port", str(port)],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 1
    assert f"Port {port} on 127.0.0.1 is already in use" in result.stderr
    assert not (tmp_path / "data" / "redis").exists(), "it started Redis before refusing"


@pytest.mark.integration
@pytest.mark.slow
def test_up_starts_its_own_redis_with_aof_and_sigterm_stops_everything(tmp_path: Path) -> None:
    redis_port, api_port = free_port(), free_port()
    data_dir = tmp_path / "data"
    env = stack_env(data_dir, f"redis://127.0.0.1:{redis_port}/0")
    with running_stack(tmp_path, env, api_port) as stack:
        stack.wait_up()
        out = stack.output()
        assert f"http://127.0.0.1:{api_port}/docs" in out
        assert f"redis://127.0.0.1:{redis_port}/0 (private, AOF in {data_dir / 'redis'})" in out

        status, body = get(f"{stack.base}/healthz")
        assert status == 200, body

        # Its own Redis, on the URL's port, appending to a file in the data directory.
        client = redis.Redis(port=redis_port)
        try:
            assert client.ping()
            assert client.config_get("appendonly")["appendonly"] == "yes"
            assert client.config_get("dir")["dir"] == str((data_dir / "redis").resolve())
        finally:
            client.close()
        assert (data_dir / "redis" / "appendonlydir").is_dir()

        processes = stack.processes()
        commands = " | ".join(processes.values())
        assert any("redis-server" in c for c in processes.values()), commands
        assert any(" worker" in c for c in processes.values()), commands
        assert any(" api " in c for c in processes.values()), commands

        stack.proc.send_signal(signal.SIGTERM)
        assert _wait_exit(stack.proc, 90) == 0, stack.output()[-3000:]
        left = {pid: cmd for pid, cmd in processes.items() if running(pid)}
        assert not left, f"still running after SIGTERM: {left}"
        assert not port_open(api_port)
        assert not port_open(redis_port)


@pytest.mark.integration
@pytest.mark.slow
def test_up_uses_a_redis_that_answers_and_stops_when_a_child_dies(tmp_path: Path) -> None:
    """An answering Redis is used, not replaced; a dead worker stops the stack with code 1."""
    redis_port, api_port = free_port(), free_port()
    (tmp_path / "redis").mkdir()
    external = start_redis(tmp_path / "redis", redis_port)
    try:
        env = stack_env(tmp_path / "data", f"redis://127.0.0.1:{redis_port}/3")
        with running_stack(tmp_path, env, api_port) as stack:
            stack.wait_up()
            assert "(already running)" in stack.output()
            assert not (tmp_path / "data" / "redis").exists()
            processes = stack.processes()
            assert not any("redis-server" in c for c in processes.values())
            worker = next(
                pid for pid, c in processes.items() if " worker" in c and "service.cli" in c
            )
            # The worker's whole process group, as a crash would take it.
            subprocess.run(["kill", "-KILL", str(worker)], check=True)
            code = _wait_exit(stack.proc, 60)
            assert code == 1
            assert "exited unexpectedly" in stack.output()
            time.sleep(0.2)
            left = {pid: cmd for pid, cmd in processes.items() if running(pid)}
            assert not left, f"still running after the worker died: {left}"
        assert external.poll() is None, "the stack stopped a Redis it did not start"
    finally:
        external.kill()
        external.wait()
