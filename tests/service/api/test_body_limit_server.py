"""A 200 MB upload against a real uvicorn process is refused quickly, without buffering it."""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import httpx
import pytest

from tests.service.conftest import Server

TOTAL = 200 * 1024 * 1024
CHUNK = 64 * 1024


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def upload(url: str, *, chunked: bool) -> tuple[bytes, int, float]:
    """Stream up to 200 MB to POST /v1/jobs until the server answers; (reply, sent, seconds)."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    head = f"POST /v1/jobs HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
    head += "Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {TOTAL}\r\n"
    started = time.monotonic()
    sock.sendall((head + "\r\n").encode())
    payload = b"x" * CHUNK
    framed = f"{CHUNK:x}\r\n".encode() + payload + b"\r\n" if chunked else payload
    sent = 0
    reply = b""
    try:
        while sent < TOTAL:
            readable, writable, _ = select.select([sock], [sock], [], 10)
            if readable:
                break
            if writable:
                sock.sendall(framed)
                sent += CHUNK
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server closed its side: read what it said
    try:
        sock.settimeout(10)
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            reply += data
    except (ConnectionResetError, TimeoutError):
        pass
    finally:
        sock.close()
    return reply, sent, time.monotonic() - started


@pytest.mark.integration
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_200_mb_upload_is_refused_quickly(
    uvicorn_server: Callable[..., Server], chunked: bool
) -> None:
    server = uvicorn_server(CNNSERVE_MAX_BODY_BYTES=str(1024 * 1024))
    rss_before = rss_bytes(server.pid)
    reply, sent, seconds = upload(server.url, chunked=chunked)
    status_line, _, rest = reply.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 413"), reply[:300]
    headers, _, body = rest.partition(b"\r\n\r\n")
    assert b"application/problem+json" in headers.lower()
    problem = json.loads(body)
    assert problem["status"] == 413
    assert "262144" in problem["detail"]  # a spec route: 256 KiB, under the 1 MiB limit
    assert seconds < 10
    # refused near the limit, not after the whole 200 MB
    assert sent < 40 * 1024 * 1024, sent
    assert rss_bytes(server.pid) - rss_before < 50 * 1024 * 1024
    # and the server is still healthy
    assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200
