"""Idle event streams against a real `cnnserve api`: what they cost everyone else.

Starts a private `redis-server` and `cnnserve api` (keys file with `--keys` principals, each
with a queued job and a one-job sweep of its own: no worker runs, so every stream stays open
and idle), then per scenario opens `--streams` Server-Sent Event streams, over raw sockets, of
one kind (`multi`: `GET /v1/jobs/events?ids=`, `sweep`: `GET /v1/sweeps/{id}/events`, `job`:
`GET /v1/jobs/{id}/events`, `mixed`: the three in turn) from one key or spread over all keys.
Before and while they are open it times `GET /healthz`, `GET /v1/jobs` and
`GET /v1/checkpoints` (sequential probes, one at a time), and reads the API's threads,
resident memory and peak memory from /proc, and Redis's blocked clients.

With `--baseline DIR` (a tree of an earlier version, e.g. `git archive main | tar -x -C DIR`)
the same scenarios run against that version first, side by side on the same machine.

    python -m bench streams [--streams 160] [--keys 10] [--probes 20] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import logging
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from bench.http import cnnserve_command, settle, stop_group
from bench.infer import machine_info
from bench.stores import private_redis
from service.access.keys import add_key
from service.cli.stack import free_port

logger = logging.getLogger(__name__)

KINDS = ("multi", "sweep", "job")
TINY = {"model": "lenet", "epochs": 1, "train_limit": 256, "batch_size": 64, "device": "cpu"}


# --- the API process and what /proc says about it ---------------------------------------------


@dataclass
class ApiUnderTest:
    """A `cnnserve api` process this module started (stopped by PID on exit)."""

    url: str
    port: int
    pid: int


@contextlib.contextmanager
def api_process(
    env: dict[str, str], log_path: Path, source: Path | None = None, timeout: float = 90.0
) -> Iterator[ApiUnderTest]:
    """`cnnserve api` on a free loopback port with `env` added; this tree or `source`'s."""
    port = free_port()
    cmd, source_env = cnnserve_command(source)
    cmd += ["--log-level", "WARNING", "api", "--host", "127.0.0.1", "--port", str(port)]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            cmd,
            env={**os.environ, **source_env, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=source,
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"cnnserve api exited ({proc.returncode}); see {log_path}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cnnserve api did not start; see {log_path}") from None
                time.sleep(0.2)
        settle(proc.pid)
        yield ApiUnderTest(f"http://127.0.0.1:{port}", port, proc.pid)
    finally:
        stop_group(proc)


def proc_status(pid: int) -> dict[str, int]:
    """Threads, resident and peak resident memory (KiB) of `pid`, from /proc."""
    out: dict[str, int] = {}
    for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("Threads", "VmRSS", "VmHWM"):
            out[name] = int(value.split()[0])
    return out


def redis_clients(url: str) -> dict[str, int]:
    """Redis's connected and blocked clients."""
    client = redis.Redis.from_url(url)
    try:
        info = client.info("clients")
    finally:
        client.close()
    return {k: int(info[k]) for k in ("connected_clients", "blocked_clients")}


# --- principals and what they follow ------------------------------------------------------------


@dataclass
class Tenant:
    """A principal with a key, a queued job and a sweep of its own."""

    name: str
    key: str
    job: str = ""
    sweep: str = ""

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def stream_path(self, kind: str) -> str:
        return {
            "multi": f"/v1/jobs/events?ids={self.job}",
            "sweep": f"/v1/sweeps/{self.sweep}/events",
            "job": f"/v1/jobs/{self.job}/events",
        }[kind]


def write_tenants(
    keys_file: Path, count: int, scopes: Sequence[str] = ("read", "train")
) -> list[Tenant]:
    """`count` principals (`tenant-00`, ...) in a new keys file, each with one key."""
    tenants = []
    for i in range(count):
        name = f"tenant-{i:02d}"
        key, _, _ = add_key(keys_file, name, list(scopes))  # type: ignore[arg-type]
        tenants.append(Tenant(name, key))
    return tenants


def request(
    url: str, method: str, path: str, headers: dict[str, str] | None = None,
    body: Any = None, timeout: float = 60.0,
) -> tuple[int, bytes, float]:  # fmt: skip
    """One HTTP request on a fresh connection: status, body and seconds."""
    parts = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(parts[0], int(parts[1]), timeout=timeout)
    payload = json.dumps(body).encode() if body is not None else None
    sent = {**(headers or {}), **({"Content-Type": "application/json"} if payload else {})}
    started = time.perf_counter()
    try:
        conn.request(method, path, body=payload, headers=sent)
        response = conn.getresponse()
        data = response.read()
        return response.status, data, time.perf_counter() - started
    finally:
        conn.close()


def give_work(url: str, tenants: Sequence[Tenant]) -> None:
    """Give each tenant a queued job and a one-job sweep (no worker runs: they stay queued)."""
    for t in tenants:
        status, body, _ = request(url, "POST", "/v1/jobs", t.headers, TINY)
        if status != 202:
            raise RuntimeError(f"submitting {t.name}'s job: {status} {body[:300]!r}")
        t.job = json.loads(body)["id"]
        sweep = {"base": TINY, "grid": {"lr": [0.05]}}
        status, body, _ = request(url, "POST", "/v1/sweeps", t.headers, sweep)
        if status != 202:
            raise RuntimeError(f"submitting {t.name}'s sweep: {status} {body[:300]!r}")
        t.sweep = json.loads(body)["id"]


# --- streams over raw sockets --------------------------------------------------------------------


@dataclass
class Swarm:
    """Event streams held open over raw sockets; `statuses` counts what each was answered."""

    port: int
    socks: list[socket.socket] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    retry_after: Counter[int] = field(default_factory=Counter)
    refusals: list[str] = field(default_factory=list)

    def open(self, path: str, headers: dict[str, str], timeout: float = 15.0) -> int:
        """Open one stream; keep it when answered 200, close it otherwise. Its status."""
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        head = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{self.port}", "Accept: text/event-stream"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        try:
            sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
            raw = b""
            while b"\r\n\r\n" not in raw:
                chunk = sock.recv(4096)
                if not chunk:
                    raise ConnectionError(f"{path}: the server closed the connection")
                raw += chunk
        except BaseException:
            sock.close()
            raise
        status = int(raw.split(b" ", 2)[1])
        self.statuses[status] += 1
        if status == 200:
            self.socks.append(sock)
        else:
            if re.search(rb"(?im)^retry-after:\s*\d+", raw):
                self.retry_after[status] += 1
            if len(self.refusals) < 3:
                self.refusals.append(self._body(sock, raw).decode("latin-1", "replace")[:600])
            sock.close()
        return status

    @staticmethod
    def _body(sock: socket.socket, raw: bytes) -> bytes:
        """The rest of a refusal: its body, as long as its Content-Length says."""
        head, _, body = raw.partition(b"\r\n\r\n")
        length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        want = int(length.group(1)) if length else 0
        with contextlib.suppress(OSError):
            while len(body) < want and (chunk := sock.recv(65536)):
                body += chunk
        return body

    def ended(self) -> int:
        """How many of the open streams the server has ended or cut (read without waiting)."""
        ended = 0
        for sock in self.socks:
            sock.setblocking(False)
            tail, closed = b"", False
            try:
                while chunk := sock.recv(65536):
                    tail = (tail + chunk)[-16:]
                else:
                    closed = True
            except BlockingIOError:
                pass
            except OSError:
                closed = True
            finally:
                sock.setblocking(True)
            ended += closed or tail.endswith(b"0\r\n\r\n")
        return ended

    def close(self) -> None:
        for sock in self.socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self.socks.clear()


def open_streams(
    port: int, tenants: Sequence[Tenant], streams: int, kind: str, spread: bool
) -> Swarm:
    """`streams` streams of `kind` (or the three kinds in turn, `mixed`), all from the first
    tenant or spread over every tenant."""
    swarm = Swarm(port)
    for i in range(streams):
        tenant = tenants[i % len(tenants)] if spread else tenants[0]
        this = KINDS[i % len(KINDS)] if kind == "mixed" else kind
        swarm.open(tenant.stream_path(this), tenant.headers)
    return swarm


# --- probes -----------------------------------------------------------------------------------


PROBES = {"healthz": "/healthz", "jobs": "/v1/jobs?limit=20", "checkpoints": "/v1/checkpoints"}


def percentiles(samples: Sequence[float]) -> dict[str, float]:
    ordered = sorted(samples)
    if not ordered:
        return {}

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)

    return {
        "n": len(ordered),
        "p50_ms": round(statistics.median(ordered) * 1000, 1),
        "p99_ms": at(0.99),
        "max_ms": round(ordered[-1] * 1000, 1),
    }


def probe(url: str, headers: dict[str, str], rounds: int) -> dict[str, dict[str, float]]:
    """Time each probe `rounds` times, interleaved, one request at a time."""
    seen: dict[str, list[float]] = {name: [] for name in PROBES}
    errors: Counter[str] = Counter()
    for _ in range(rounds):
        for name, path in PROBES.items():
            try:
                status, _, seconds = request(url, "GET", path, headers, timeout=60)
            except OSError as exc:
                errors[f"{name}: {type(exc).__name__}"] += 1
                continue
            if status != 200:
                errors[f"{name}: {status}"] += 1
            seen[name].append(seconds)
    out: dict[str, Any] = {name: percentiles(s) for name, s in seen.items()}
    if errors:
        out["errors"] = dict(errors)
    return out


def wait_unblocked(redis_url: str, timeout: float = 10.0) -> int:
    """Wait until Redis has no blocked client (every stream's read gone); how many remain."""
    deadline = time.monotonic() + timeout
    blocked = redis_clients(redis_url)["blocked_clients"]
    while blocked and time.monotonic() < deadline:
        time.sleep(0.1)
        blocked = redis_clients(redis_url)["blocked_clients"]
    return blocked


# --- scenarios --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str
    spread: bool


SCENARIOS = (
    Scenario("one key, /v1/jobs/events?ids=", "multi", spread=False),
    Scenario("one key, /v1/sweeps/{id}/events", "sweep", spread=False),
    Scenario("one key, /v1/jobs/{id}/events", "job", spread=False),
    Scenario("every key, the three kinds in turn", "mixed", spread=True),
)


def run_scenario(
    api: ApiUnderTest, redis_url: str, tenants: Sequence[Tenant], scenario: Scenario,
    streams: int, probes: int,
) -> dict[str, Any]:  # fmt: skip
    admin = tenants[0].headers
    idle = probe(api.url, admin, probes)
    started = time.perf_counter()
    swarm = open_streams(api.port, tenants, streams, scenario.kind, scenario.spread)
    try:
        opening_s = time.perf_counter() - started
        time.sleep(2.0)  # every stream's first read is waiting now
        held = {**proc_status(api.pid), **redis_clients(redis_url)}
        loaded = probe(api.url, admin, probes)
        after = proc_status(api.pid)
        ended = swarm.ended()
    finally:
        swarm.close()
    left_blocked = wait_unblocked(redis_url)
    return {
        "scenario": scenario.name,
        "streams_tried": streams,
        "answered": dict(swarm.statuses),
        "ended_early": ended,
        "refusals_with_retry_after": dict(swarm.retry_after),
        "opening_s": round(opening_s, 2),
        "idle": idle,
        "with_streams": loaded,
        "api_threads": held["Threads"],
        "api_rss_mib": round(held["VmRSS"] / 1024, 1),
        "api_peak_rss_mib": round(after["VmHWM"] / 1024, 1),
        "redis_blocked_clients": held["blocked_clients"],
        "redis_connected_clients": held["connected_clients"],
        "redis_blocked_after_close": left_blocked,
    }


def measure(
    label: str, source: Path | None, args: argparse.Namespace, workdir: Path
) -> list[dict[str, Any]]:
    """Every scenario against one version of the API (this tree, or `source`)."""
    home = workdir / label
    home.mkdir()
    keys_file = home / "keys.toml"
    tenants = write_tenants(keys_file, args.keys)
    results = []
    with private_redis(home) as redis_url:
        env = {
            "CNNSERVE_REDIS_URL": redis_url,
            "CNNSERVE_DATA_DIR": str(home / "data"),
            "CNNSERVE_API_KEYS_FILE": str(keys_file),
            "OMP_NUM_THREADS": "1",
        }
        with api_process(env, home / "api.log", source) as api:
            give_work(api.url, tenants)
            for scenario in SCENARIOS:
                if args.only and scenario.kind not in args.only.split(","):
                    continue
                result = run_scenario(api, redis_url, tenants, scenario, args.streams, args.probes)
                logger.info("%s: %s", label, json.dumps(result))
                results.append({"version": label, **result})
    return results


def _ms(result: dict[str, Any], when: str, probe_name: str, stat: str) -> str:
    value = result[when].get(probe_name, {}).get(stat)
    return "–" if value is None else f"{value:,.0f}"


def markdown(results: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| version | scenario | answered | GET /v1/jobs p50 / max (ms) | GET /v1/checkpoints "
        "p50 / max (ms) | /healthz p99 (ms) | API threads | API peak RSS (MiB) | "
        "Redis blocked clients |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        answered = ", ".join(f"{n}×{s}" for s, n in sorted(r["answered"].items()))
        if r["ended_early"]:
            answered += f" ({r['ended_early']} ended early)"
        jobs = f"{_ms(r, 'idle', 'jobs', 'p50_ms')} → {_ms(r, 'with_streams', 'jobs', 'p50_ms')}"
        jobs += f" / {_ms(r, 'with_streams', 'jobs', 'max_ms')}"
        ckpts = f"{_ms(r, 'idle', 'checkpoints', 'p50_ms')} → "
        ckpts += f"{_ms(r, 'with_streams', 'checkpoints', 'p50_ms')} / "
        ckpts += _ms(r, "with_streams", "checkpoints", "max_ms")
        lines.append(
            f"| {r['version']} | {r['scenario']} | {answered} | {jobs} | {ckpts} | "
            f"{_ms(r, 'with_streams', 'healthz', 'p99_ms')} | {r['api_threads']} | "
            f"{r['api_peak_rss_mib']} | {r['redis_blocked_clients']} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench streams", description=__doc__)
    parser.add_argument("--streams", type=int, default=160, help="streams per scenario")
    parser.add_argument("--keys", type=int, default=10, help="principals (each with a key)")
    parser.add_argument("--probes", type=int, default=20, help="rounds of probes per phase")
    parser.add_argument("--only", help="comma-separated kinds: multi,sweep,job,mixed")
    parser.add_argument("--baseline", type=Path, help="a tree of an earlier version, first")
    parser.add_argument("--out", type=Path, default=Path("docs/bench-streams.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cnnserve-bench-streams-") as tmp:
        sources: list[tuple[str, Path | None]] = [("current", None)]
        if args.baseline is not None:
            sources.insert(0, ("baseline", args.baseline.resolve()))
        for label, source in sources:
            results.extend(measure(label, source, args, Path(tmp)))
    report = {
        "benchmark": "streams",
        "machine": machine_info(),
        "streams": args.streams,
        "keys": args.keys,
        "probe_rounds": args.probes,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    sys.stdout.write(markdown(results) + f"\nresults written to {args.out}\n")
    return 0
