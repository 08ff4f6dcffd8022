"""Start and inspect `cnnserve up` as a user would: a real process, real ports, real Redis."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

CNNSERVE = Path(sys.executable).parent / "cnnserve"
FASHION_MNIST_DIR = os.environ.get(
    "CNNSERVE_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"
)


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def stack_env(data_dir: Path, redis_url: str, **extra: str) -> dict[str, str]:
    """The environment for a stack of its own: its data directory and Redis, nothing inherited."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNNSERVE_")}
    env.update(
        CNNSERVE_DATA_DIR=str(data_dir),
        CNNSERVE_REDIS_URL=redis_url,
        CNNSERVE_FASHION_MNIST_DIR=FASHION_MNIST_DIR,
        # Two shared cores: keep the worker and the API from fighting over them.
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
    )
    env.update(extra)
    return env


def _proc_children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the command name, which is in parentheses and may hold spaces.
        fields = stat.rsplit(")", 1)[1].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def descendants(pid: int) -> dict[int, str]:
    """Every live process under `pid`, with its command line."""
    tree = _proc_children()
    found: dict[int, str] = {}
    todo = list(tree.get(pid, []))
    while todo:
        child = todo.pop()
        cmdline = cmdline_of(child)
        if cmdline:
            found[child] = cmdline
        todo.extend(tree.get(child, []))
    return found


def cmdline_of(pid: int) -> str:
    """The command line of `pid` as `descendants` reports it ('' when it is gone)."""
    try:
        cmdline = (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except OSError:
        return ""
    return cmdline.replace(b"\0", b" ").decode(errors="replace").strip()


def running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@dataclass
class Stack:
    """A running `cnnserve up` and where it writes its output."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    seen: dict[int, str] = field(default_factory=dict)

    def processes(self) -> dict[int, str]:
        """The stack's live descendants now; each is remembered for the clean-up."""
        found = descendants(self.proc.pid)
        self.seen.update(found)
        return found

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_up(self, timeout: float = 240.0) -> None:
        """Wait for the banner and a 200 from /healthz; fail with the stack's output if not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"cnnserve up exited with {self.proc.returncode}:\n{self.output()[-4000:]}"
                )
            if "cnnserve is up" in self.output():
                with urllib.request.urlopen(f"{self.base}/healthz", timeout=5) as response:
                    assert response.status == 200
                return
            time.sleep(0.5)
        raise AssertionError(f"cnnserve up did not come up:\n{self.output()[-4000:]}")


@contextmanager
def running_stack(tmp_path: Path, env: dict[str, str], port: int, *args: str) -> Iterator[Stack]:
    """`cnnserve up` on `port`; whatever is left of it is killed by PID at the end."""
    log = tmp_path / "stack.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(CNNSERVE), "up", "--port", str(port), *args],
            env=env,
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    stack = Stack(proc, port, log)
    try:
        yield stack
    finally:
        stack.processes()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid, cmdline in stack.seen.items():
            # Only a process that is still the one we saw: a pid may have been reused.
            if running(pid) and cmdline_of(pid) == cmdline:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def start_redis(directory: Path, port: int) -> subprocess.Popen[bytes]:
    """A throwaway redis-server on `port`, answering PING before this returns."""
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
         "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while not port_open(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("redis-server did not start")
        time.sleep(0.05)
    return proc


def get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
