"""The wire side of `bench abuse`: a raw-socket sender that notices an early answer, and a
`/healthz` probe that times the event loop from a thread.

`send` writes the head, then the body in 64 KiB pieces, looking for an answer before each
piece: a server that answers (or hangs up) before the body is done stops the upload there, and
the outcome says how many body bytes went out first. With `Expect: 100-continue` it waits up to
a second for `100 Continue` or a final answer before sending any of the body, as curl does.
"""

from __future__ import annotations

import contextlib
import re
import select
import socket
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from bench.abuse_attacks import RawRequest

PIECE = 64 * 1024
EXPECT_WAIT_S = 1.0


@dataclass
class Outcome:
    """What one request got: status (0: no answer), and how the upload went."""

    status: int
    body_bytes: int
    body_bytes_sent: int
    answered_mid_body: bool
    response_bytes: int
    detail: str
    got_100_continue: bool | None = None

    def extra(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "body_bytes": self.body_bytes,
            "body_bytes_sent_before_answer": self.body_bytes_sent,
            "answered_mid_body": self.answered_mid_body,
            "response_bytes": self.response_bytes,
            "detail": self.detail,
        }
        if self.got_100_continue is not None:
            out["sent_100_continue"] = self.got_100_continue
        return out


def _head(port: int, request: RawRequest) -> bytes:
    names = {name.lower() for name, _ in request.headers}
    lines = [f"{request.method} {request.path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{name}: {value}" for name, value in request.headers]
    if request.chunked and "transfer-encoding" not in names:
        lines.append("Transfer-Encoding: chunked")
    elif request.body and not request.chunked and "content-length" not in names:
        lines.append(f"Content-Length: {len(request.body)}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _readable(sock: socket.socket, wait: float = 0.0) -> bool:
    return bool(select.select([sock], [], [], wait)[0])


def _upload(sock: socket.socket, request: RawRequest) -> tuple[int, bool, bytes]:
    """Send the body until done or answered: bytes sent, whether answered first, what came."""
    sent, body = 0, request.body
    while sent < len(body):
        if _readable(sock):
            got = sock.recv(65536)
            return sent, True, got
        piece = body[sent : sent + PIECE]
        frame = b"%x\r\n%s\r\n" % (len(piece), piece) if request.chunked else piece
        try:
            sock.sendall(frame)
        except (BrokenPipeError, ConnectionResetError):
            return sent, True, b""
        sent += len(piece)
    if request.chunked:
        with contextlib.suppress(OSError):
            sock.sendall(b"0\r\n\r\n")
    return sent, False, b""


def _response(sock: socket.socket, buffer: bytes) -> tuple[int, int, str]:
    """Read one response after `buffer`: status, body bytes, the start of its body."""
    with contextlib.suppress(OSError):
        while b"\r\n\r\n" not in buffer and (chunk := sock.recv(65536)):
            buffer += chunk
    head, _, body = buffer.partition(b"\r\n\r\n")
    match = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    if not match:
        return 0, 0, buffer[:200].decode("latin-1")
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    total = len(body)
    with contextlib.suppress(OSError):
        while (length is None or total < int(length.group(1))) and (chunk := sock.recv(65536)):
            total += len(chunk)
            if len(body) < 400:
                body += chunk[:400]
    return int(match.group(1)), total, body[:300].decode("utf-8", "replace")


def send(port: int, request: RawRequest, timeout: float = 120.0) -> Outcome:
    """Send `request` on a fresh connection and read its answer."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    got_100: bool | None = None
    try:
        sock.sendall(_head(port, request))
        early = b""
        if request.expect_continue:
            got_100 = False
            if _readable(sock, EXPECT_WAIT_S):
                early = sock.recv(65536)
                if early.startswith(b"HTTP/1.1 100"):
                    got_100 = True
                    early = early.partition(b"\r\n\r\n")[2]
        if early:
            sent, mid_body = 0, True
        else:
            sent, mid_body, early = _upload(sock, request)
        status, total, detail = _response(sock, early)
    except OSError as exc:
        return Outcome(0, len(request.body), 0, False, 0, f"{type(exc).__name__}: {exc}", got_100)
    finally:
        sock.close()
    return Outcome(status, len(request.body), sent, mid_body, total, detail, got_100)


class HealthProbe:
    """`GET /healthz` every `every_ms` over one keep-alive connection, from a thread; each
    probe's start and latency kept (a probe in flight counts as lasting until now)."""

    def __init__(self, port: int, every_ms: float) -> None:
        self.port, self.every = port, every_ms / 1000
        self.samples: list[tuple[float, float]] = []
        self.in_flight: float | None = None
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="healthz-probe")
        self._request = f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _connect(self) -> socket.socket | None:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        except OSError:
            return None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _one(self, sock: socket.socket) -> None:
        sock.sendall(self._request)
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed")
            buffer += chunk
        head, _, body = buffer.partition(b"\r\n\r\n")
        length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        want = int(length.group(1)) if length else 0
        while len(body) < want:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed")
            body += chunk

    def _run(self) -> None:
        sock = self._connect()
        while not self._stop.is_set():
            if sock is None:
                self._stop.wait(0.2)
                sock = self._connect()
                continue
            started = time.monotonic()
            self.in_flight = started
            try:
                self._one(sock)
            except OSError:  # the API went down mid-probe: it stalled at least this long
                self.errors += 1
                self.samples.append((started, time.monotonic() - started))
                sock.close()
                sock = None
                continue
            finally:
                self.in_flight = None
            self.samples.append((started, time.monotonic() - started))
            self._stop.wait(max(0.0, started + self.every - time.monotonic()))
        if sock is not None:
            sock.close()

    def between(self, start: float, end: float) -> list[float]:
        """Latencies (s) of the probes that overlap [start, end]."""
        out = [lat for t, lat in list(self.samples) if t < end and t + lat > start]
        flying = self.in_flight
        if flying is not None and flying < end:
            out.append(time.monotonic() - flying)
        return out
