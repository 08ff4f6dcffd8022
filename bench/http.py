"""HTTP classification benchmark: concurrent single-image predictions against a real server.

Without `--url` it makes a temporary data dir with a freshly initialised LeNet checkpoint,
starts `cnnserve api` on a free loopback port (once with request batching on, once off), and
stops it by PID afterwards. With `--url` and `--ref` it loads an already running server.

The load generator speaks HTTP/1.1 keep-alive over raw asyncio streams on uvloop (one
connection per client): on a 2-core machine a full HTTP client library, or asyncio's own
loop, would eat the CPU the server needs. Per server, in interleaved rounds:

- `v1 png`: `POST /v1/checkpoints/{ref}/predict` uploading one 28×28 Fashion-MNIST test image
  as a multipart PNG file;
- `v2 uint8`: `POST /v2/models/lenet/infer` with the same image as a binary UINT8 tensor
  (Triton's binary extension, no Content-Type, as tritonclient sends it);
- `v2 batch64`: the same with 64 images per request (throughput in images/s),

and, in this process, the model alone on batches of 64, the floor for `v2 batch64`: the
server's own loader (ONNX Runtime) and compute layout (`cpu_budget`: as many concurrent forward
passes, of as many threads, as the server runs), measured in the same rounds. Bounded by
`--requests` and `--duration` per load, whichever first. The ratios are between the best
rounds, and round by round with their median.

    python -m bench http [--clients 16] [--requests 5000] [--duration 20] [--rounds 3]
    python -m bench http --url http://127.0.0.1:8000 --ref lenet:best
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import io
import json
import logging
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Coroutine, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import uvloop
from PIL import Image

from bench.infer import machine_info, save_fresh_checkpoint
from service.cli.stack import free_port

logger = logging.getLogger(__name__)

BOUNDARY = "cnnservebenchboundary"
FASHION_TEST_IMAGES = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def sample_png() -> bytes:
    """A real Fashion-MNIST test image as PNG (a gradient if the data set is missing)."""
    try:
        raw = gzip.decompress(FASHION_TEST_IMAGES.read_bytes())
        img = np.frombuffer(raw, np.uint8, count=784, offset=16).reshape(28, 28)
    except OSError:
        img = np.tile(np.arange(0, 252, 9, dtype=np.uint8), (28, 1))
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def multipart_request(host: str, port: int, path: str, image: bytes) -> bytes:
    """The raw bytes of one POST of `image` as a multipart file part named `files`."""
    body = (
        (
            f"--{BOUNDARY}\r\n"
            'Content-Disposition: form-data; name="files"; filename="image.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    head = (
        f"POST {path} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


def predict_request(host: str, port: int, ref: str, image: bytes) -> bytes:
    """The raw bytes of one multipart predict request."""
    return multipart_request(host, port, f"/v1/checkpoints/{ref}/predict", image)


async def _client(
    host: str,
    port: int,
    request: bytes,
    budget: list[int],
    deadline: float,
    latencies: list[float],
    errors: list[str],
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while budget[0] > 0 and time.perf_counter() < deadline:
            budget[0] -= 1
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            body = await reader.readexactly(int(length.group(1)) if length else 0)
            latencies.append(time.perf_counter() - started)
            if status != 200:
                errors.append(f"{status}: {body[:200]!r}")
            if re.search(rb"(?i)connection:\s*close", head):
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
    except (OSError, asyncio.IncompleteReadError) as exc:
        errors.append(f"connection: {exc}")
    finally:
        writer.close()


async def _load(
    host: str, port: int, request: bytes, clients: int, requests: int, duration: float
) -> dict[str, Any]:
    budget = [requests]
    latencies: list[float] = []
    errors: list[str] = []
    started = time.perf_counter()
    deadline = started + duration
    await asyncio.gather(
        *(_client(host, port, request, budget, deadline, latencies, errors) for _ in range(clients))
    )
    elapsed = time.perf_counter() - started
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3

    return {
        "requests": len(latencies),
        "seconds": round(elapsed, 3),
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(pct(0.50), 2) if latencies else None,
        "p99_ms": round(pct(0.99), 2) if latencies else None,
        "mean_ms": round(statistics.fmean(latencies) * 1e3, 2) if latencies else None,
        "errors": len(errors),
        "error_samples": errors[:5],
    }


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        data: bytes = r.read()
        return data


def server_batch_stats(url: str, model: str = "lenet") -> dict[str, float]:
    """Forward passes and the images they took, from the server's /metrics."""
    text = _get(f"{url}/metrics").decode()

    def value(name: str) -> float:
        m = re.search(rf'^{name}\{{model="{model}"\}} ([0-9.e+]+)$', text, re.M)
        return float(m.group(1)) if m else 0.0

    images = value("cnnserve_inference_batch_size_sum")
    batches = value("cnnserve_inference_batch_size_count")
    return {"forward_passes": batches, "images": images}


def v2_body(images: np.ndarray, **request: Any) -> tuple[bytes, int]:
    """A V2 infer body with the images as a binary UINT8 tensor (and any other fields of the
    request), and the length of its JSON header."""
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": list(images.shape),
                    "datatype": "UINT8",
                    "parameters": {"binary_data_size": images.nbytes},
                }
            ],
            **request,
        }
    ).encode()
    return header + np.ascontiguousarray(images, dtype=np.uint8).tobytes(), len(header)


def v2_request(host: str, port: int, model: str, images: np.ndarray) -> bytes:
    """The raw bytes of one V2 infer request: images as a binary UINT8 tensor, binary output."""
    wanted = [{"name": "probabilities", "parameters": {"binary_data": True}}]
    body, header_length = v2_body(images, outputs=wanted)
    head = (
        f"POST /v2/models/{model}/infer HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        f"Inference-Header-Content-Length: {header_length}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


def sample_images(n: int) -> np.ndarray:
    """The first `n` Fashion-MNIST test images (N×28×28 uint8)."""
    raw = gzip.decompress(FASHION_TEST_IMAGES.read_bytes())
    return np.frombuffer(raw, np.uint8, count=784 * n, offset=16).reshape(n, 28, 28)


def requests_for(url: str, ref: str) -> dict[str, tuple[bytes, int]]:
    """Each path's raw request and the images it carries."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    one = sample_images(1)
    return {
        "v1 png": (predict_request(host, port, ref, sample_png()), 1),
        "v2 uint8": (v2_request(host, port, "lenet", one), 1),
        "v2 batch64": (v2_request(host, port, "lenet", sample_images(64)), 64),
    }


def run(coro: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """Run one load on uvloop: asyncio's own loop would take CPU the server needs."""
    return uvloop.run(coro)


def run_load(
    url: str,
    request: bytes,
    *,
    images: int,
    clients: int,
    requests: int,
    duration: float,
    warmup: int = 50,
) -> dict[str, Any]:
    """Warm the server up, then measure `clients` concurrent requests of one kind."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    run(_load(host, port, request, 4, warmup, 30.0))
    before = server_batch_stats(url)
    result = run(_load(host, port, request, clients, requests, duration))
    after = server_batch_stats(url)
    passes = after["forward_passes"] - before["forward_passes"]
    result["mean_batch_size"] = (
        round((after["images"] - before["images"]) / passes, 2) if passes else None
    )
    result["images_per_s"] = round(result["requests_per_s"] * images, 1)
    return result


class ModelAlone:
    """The checkpoint as the server runs it, in this process, on batches of 64: the server's
    loader (ONNX Runtime where it serves) and its compute layout, so many forward passes at
    once (`cpu_budget`'s compute threads) of so many intra-op threads each. No HTTP at all."""

    def __init__(self, data_dir: Path, ref: str) -> None:
        from bench.stores import open_store
        from service.inference.backends import (
            cpu_budget,
            load_for_inference,
        )

        self.streams, threads = cpu_budget()
        store = open_store(data_dir / "checkpoints")
        self.loaded = load_for_inference(store, store.resolve(ref), backend="auto", threads=threads)
        self.layout = f"{self.streams} × {threads} threads"
        self.x = sample_images(64).astype(np.float32)[:, None] / 255
        for _ in range(20):
            self.loaded.run(self.x)

    def measure(self, seconds: float) -> dict[str, Any]:
        """Images per second over `seconds`, every stream running batch after batch."""
        passes = [0] * self.streams
        deadline = time.perf_counter() + seconds

        def stream(i: int) -> None:
            while time.perf_counter() < deadline:
                self.loaded.run(self.x)
                passes[i] += 1

        started = time.perf_counter()
        threads = [threading.Thread(target=stream, args=(i,)) for i in range(self.streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
        return {
            "path": "model alone",
            "backend": self.loaded.backend,
            "layout": self.layout,
            "requests": sum(passes),
            "seconds": round(elapsed, 3),
            "images_per_s": round(64 * sum(passes) / elapsed, 1),
        }


def interleaved(
    url: str,
    ref: str,
    *,
    clients: int,
    requests: int,
    duration: float,
    rounds: int,
    alone: ModelAlone | None = None,
) -> list[dict[str, Any]]:
    """Every path in turn (and the model alone, given one), `rounds` times; per path the best
    round, and every round's req/s and images/s."""
    per_path: dict[str, list[dict[str, Any]]] = {}
    for _ in range(rounds):
        for path, (request, images) in requests_for(url, ref).items():
            n_clients = clients if images == 1 else min(clients, 4)
            result = run_load(
                url,
                request,
                images=images,
                clients=n_clients,
                requests=requests // rounds,
                duration=duration / rounds,
            )
            per_path.setdefault(path, []).append({"path": path, "clients": n_clients, **result})
        if alone is not None:  # after the loads: a server that just started is warming up
            per_path.setdefault("model alone", []).append(alone.measure(duration / rounds / 4))
    out = []
    for path, results in per_path.items():
        if path == "model alone":
            best = max(results, key=lambda r: r["images_per_s"])
            out.append({**best, "rounds_images_per_s": [r["images_per_s"] for r in results]})
            continue
        best = max(results, key=lambda r: r["requests_per_s"])
        out.append(
            {
                **best,
                "errors": sum(r["errors"] for r in results),
                "rounds_requests_per_s": [r["requests_per_s"] for r in results],
                "rounds_images_per_s": [r["images_per_s"] for r in results],
            }
        )
    return out


def ratios(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per batching setting: V2 uint8 over /v1 PNG (req/s) and the model alone over V2
    batch-64 (images/s), between the best rounds and round by round (with the median)."""

    def compare(top: dict[str, Any], bottom: dict[str, Any], key: str) -> dict[str, Any]:
        rounds = [
            round(a / b, 2)
            for a, b in zip(top[f"rounds_{key}"], bottom[f"rounds_{key}"], strict=True)
        ]
        return {
            "best_rounds": round(top[key] / bottom[key], 2),
            "per_round": rounds,
            "median": round(statistics.median(rounds), 2),
        }

    out: dict[str, dict[str, Any]] = {}
    for batching in dict.fromkeys(r["batching"] for r in runs):
        by = {r["path"]: r for r in runs if r["batching"] == batching}
        alone = by.get("model alone")
        out[batching] = {
            "v2_uint8_over_v1_png_req_per_s": compare(
                by["v2 uint8"], by["v1 png"], "requests_per_s"
            ),
            "model_alone_over_v2_batch64_images_per_s": None
            if alone is None
            else compare(alone, by["v2 batch64"], "images_per_s"),
        }
    return out


def make_lenet_checkpoint(data_dir: Path) -> str:
    """Save a freshly initialised LeNet checkpoint under `data_dir`; returns its id."""
    from bench.stores import open_store

    store = open_store(data_dir / "checkpoints")
    return save_fresh_checkpoint(store, "lenet", "00000000000be7c4").id


def cnnserve_command(source: Path | None) -> tuple[list[str], dict[str, str]]:
    """The `cnnserve` command line and extra environment, from this install or `source`
    (another checkout's tree, for a side-by-side run against an earlier version)."""
    if source is not None:
        return [sys.executable, "-m", "service.cli"], {"PYTHONPATH": str(source)}
    exe = Path(sys.executable).with_name("cnnserve")
    return ([str(exe)] if exe.exists() else [sys.executable, "-m", "service.cli"]), {}


@contextmanager
def api_server(
    data_dir: Path,
    *,
    batching: bool = True,
    log_path: Path,
    env: dict[str, str] | None = None,
    source: Path | None = None,
    start_timeout: float = 60.0,
) -> Iterator[str]:
    """`cnnserve api` on a free loopback port; stopped by PID on exit."""
    port = free_port()
    cmd, source_env = cnnserve_command(source)
    full_env = {
        **os.environ,
        **source_env,
        "CNNSERVE_DATA_DIR": str(data_dir),
        "CNNSERVE_BATCHING": "true" if batching else "false",
        **(env or {}),
    }
    cmd += ["--log-level", "WARNING", "api", "--host", "127.0.0.1", "--port", str(port)]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=source,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"cnnserve api exited ({proc.returncode}); see {log_path}")
            try:
                _get(f"{url}/healthz")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"cnnserve api did not answer within {start_timeout:.0f} s"
                    ) from None
                time.sleep(0.2)
        settle(proc.pid)
        yield url
    finally:
        stop_group(proc)


def settle(pid: int, *, busy_below: float = 0.05, timeout: float = 30.0) -> None:
    """Wait until process `pid` uses less than `busy_below` of a core over half a second: a
    server that has just started warms up in the background (it checks each model's recipe
    once), and a load measured meanwhile would say so."""
    stat = Path(f"/proc/{pid}/stat")
    if not stat.exists():  # not Linux: give it the few seconds it takes
        time.sleep(5)
        return
    tick = os.sysconf("SC_CLK_TCK")

    def cpu_s() -> float:
        fields = stat.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick  # utime + stime

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = cpu_s()
        time.sleep(0.5)
        if cpu_s() - before < busy_below * 0.5:
            return


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop a process this benchmark started (and its group), by PID: TERM, then KILL."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def markdown(runs: Sequence[dict[str, Any]]) -> str:
    """The runs as a markdown table."""
    lines = [
        "| batching | path | clients | requests | req/s (best round) | images/s | p50 (ms) | "
        "p99 (ms) | errors | images per forward pass |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        if r["path"] == "model alone":
            lines.append(
                f"| {r['batching']} | model alone ({r['backend']}, {r['layout']}, batch 64, "
                f"in process) | – | {r['requests']} | – | {r['images_per_s']:.0f} | – | – | – "
                "| 64 |"
            )
            continue
        lines.append(
            f"| {r['batching']} | {r['path']} | {r['clients']} | {r['requests']} | "
            f"{r['requests_per_s']:.0f} | {r['images_per_s']:.0f} | "
            f"{r['p50_ms']} | {r['p99_ms']} | {r['errors']} | {r['mean_batch_size']} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from bench.stores import bench_redis

    parser = argparse.ArgumentParser(prog="python -m bench http", description=__doc__)
    parser.add_argument("--url", help="an already running server (else one is started)")
    parser.add_argument("--ref", help="the checkpoint to load (with --url)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=5000, help="at most this many per path")
    parser.add_argument(
        "--duration", type=float, default=20.0, help="at most this long per path (s)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per server")
    parser.add_argument(
        "--batching", choices=["both", "on", "off"], default="both", help="started server only"
    )
    parser.add_argument("--out", type=Path, default=Path("docs/bench-http.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.url and not args.ref:
        parser.error("--url needs --ref (a checkpoint id or alias)")
    load = {
        "clients": args.clients,
        "requests": args.requests,
        "duration": args.duration,
        "rounds": args.rounds,
    }
    runs: list[dict[str, Any]] = []
    if args.url:
        for result in interleaved(args.url.rstrip("/"), args.ref, **load):
            runs.append({"batching": "server's setting", **result})
    else:
        modes = {"both": [True, False], "on": [True], "off": [False]}[args.batching]
        with (
            tempfile.TemporaryDirectory(prefix="cnnserve-bench-http-") as tmp,
            bench_redis(Path(tmp)),
        ):
            data_dir = Path(tmp) / "data"
            ref = make_lenet_checkpoint(data_dir)
            alone = ModelAlone(data_dir, ref)
            for batching in modes:
                log_path = Path(tmp) / f"api-{'on' if batching else 'off'}.log"
                with api_server(data_dir, batching=batching, log_path=log_path) as url:
                    logger.info("server %s (batching %s), loading it", url, batching)
                    for result in interleaved(url, ref, **load, alone=alone):
                        runs.append({"batching": "on" if batching else "off", **result})
                        logger.info("batching %s: %s", batching, result)
    report = {
        "benchmark": "http",
        "machine": machine_info(),
        "model": "lenet",
        "payload": "v1: one 28×28 Fashion-MNIST PNG per request, multipart; v2: the same "
        "image(s) as a binary UINT8 tensor",
        "load_generator": "raw HTTP/1.1 over asyncio streams on uvloop, one keep-alive "
        "connection per client",
        "limits": {"requests": args.requests, "duration_s": args.duration, "rounds": args.rounds},
        "runs": runs,
        "ratios": ratios(runs),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    sys.stdout.write(markdown(runs) + "\n")
    sys.stdout.write(f"ratios: {json.dumps(report['ratios'])}\nresults written to {args.out}\n")
    return 0 if all(r.get("errors", 0) == 0 for r in runs) else 1
