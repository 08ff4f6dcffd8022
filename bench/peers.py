"""cnnserve beside TorchServe and LitServe, serving the same weights, measured side by side.

One command makes the checkpoints (a freshly initialised LeNet at 28×28 and ResNet-18 at 96;
the cost of a forward pass does not depend on training), starts every server on a free
loopback port with the same thread settings (`--threads` intra-op threads,
`OMP_WAIT_POLICY=PASSIVE`), and loads each in turn with the same generator as `bench http`:
`--clients` keep-alive connections uploading one 28×28 Fashion-MNIST PNG per request as a
multipart file. The servers not under test are frozen (SIGSTOP on their process group), so
an idle JVM or poller takes nothing from the one measured. Rounds are interleaved, and the
order rotates each round.

Per server and model: requests/s (median and range over rounds), p50/p99 latency (of the
median round), errors, server CPU per request (user + system time of the server's whole
process group, from /proc, over the load) and images per forward pass (cnnserve's /metrics;
the peers' handlers count in a shared file).

Servers (`--servers`, default all that are installed):

- `cnnserve`: `cnnserve api`, request batching on, ONNX Runtime (its default);
- `cnnserve-eager`: the same with `CNNSERVE_INFERENCE_BACKEND=eager` (the HTTP stack beside
  the peers', with the same PyTorch forward pass);
- `cnnserve-w2`: `cnnserve api --workers 2`;
- `litserve`: LitServe, one CPU worker, `max_batch_size=64`, `batch_timeout=2 ms`;
- `torchserve`: TorchServe (Java 17), one backend worker, `batchSize=32`,
  `maxBatchDelay=2 ms`, logging at WARN, token auth off;
- `torchserve-w2`: the same with two backend workers of `--threads / 2` threads each.

Every process it starts is stopped by its process group id; loopback only; each load is
bounded by `--requests` and `--duration`, start-up by `--start-timeout`.

    python -m bench peers [--models lenet,resnet18] [--rounds 3] [--duration 10]
    python -m bench peers --servers cnnserve,torchserve --models lenet --out /tmp/p.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.http import _load, cnnserve_command, multipart_request, sample_png, server_batch_stats
from bench.infer import machine_info, save_fresh_checkpoint
from service.cli.stack import free_port

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
SERVERS = ("cnnserve", "cnnserve-eager", "cnnserve-w2", "litserve", "torchserve", "torchserve-w2")
MODELS = ("lenet", "resnet18")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

LOG4J2 = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN">
  <Appenders>
    <Console name="STDOUT" target="SYSTEM_OUT">
      <PatternLayout pattern="%d{ISO8601} [%-5p] %t %c - %m%n"/>
    </Console>
  </Appenders>
  <Loggers>
    <Root level="warn"><AppenderRef ref="STDOUT"/></Root>
  </Loggers>
</Configuration>
"""


@dataclass
class Server:
    """One running server: its process group, where to send a prediction, how it batches."""

    name: str
    model: str
    proc: subprocess.Popen[bytes]
    host: str
    port: int
    path: str
    batch_stats: Callable[[], tuple[float, float]]
    config: dict[str, Any] = field(default_factory=dict)
    frozen: bool = False

    def group_cpu_s(self) -> float:
        """User + system CPU seconds of every live process in this server's group."""
        total = 0
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) == self.proc.pid:  # pgrp
                total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / CLOCK_TICKS

    def freeze(self) -> None:
        if not self.frozen and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGSTOP)
            self.frozen = True

    def thaw(self) -> None:
        if self.frozen and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)
        self.frozen = False

    def stop(self) -> None:
        """TERM the whole group (thawed first, so it can act on it), then KILL."""
        if self.proc.poll() is not None:
            return
        self.thaw()
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
        # children that outlived their parent (a JVM, backend workers)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def _launch(cmd: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd
        )


def _post(host: str, port: int, path: str, png: bytes) -> int:
    """One prediction through the same bytes the load sends; its HTTP status."""

    async def one() -> int:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(multipart_request(host, port, path, png))
            head = await reader.readuntil(b"\r\n\r\n")
            return int(head.split(b" ", 2)[1])
        finally:
            writer.close()

    return asyncio.run(asyncio.wait_for(one(), 30))


def _wait_until_serving(server: Server, log: Path, timeout: float) -> None:
    """Until a real prediction answers 200 (not just a health check), or fail with the log."""
    deadline = time.monotonic() + timeout
    png = sample_png()
    last = "no answer"
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited ({server.proc.returncode}); see {log}")
        try:
            status = _post(server.host, server.port, server.path, png)
            if status == 200:
                return
            last = f"HTTP {status}"
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            last = str(exc) or type(exc).__name__
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"{server.name} did not serve within {timeout:.0f} s ({last}); see {log}")


def _counter_file(path: Path) -> Callable[[], tuple[float, float]]:
    np.zeros(2, dtype=np.int64).tofile(path)

    def read() -> tuple[float, float]:
        passes, images = np.fromfile(path, dtype=np.int64, count=2)
        return float(passes), float(images)

    return read


def start_cnnserve(
    name: str, model: str, ckpt: str, data_dir: Path, work: Path, env: dict[str, str]
) -> tuple[Server, Path]:
    port = free_port()
    # `<server>@before`: the same server from the checkout given by --before
    before = name.endswith("@before")
    source = Path(env["PEERS_BEFORE"]) if before else None
    cmd, source_env = cnnserve_command(source)
    name_base = name.removesuffix("@before")
    workers = 2 if name_base.endswith("-w2") else 1
    config = {
        "CNNSERVE_BATCHING": "true",
        "CNNSERVE_INFERENCE_BACKEND": "eager" if name_base.endswith("-eager") else "auto",
        "CNNSERVE_DATA_DIR": str(data_dir),
    }
    cmd += ["--log-level", "WARNING", "api", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--workers", str(workers)]
    log = work / f"{name}-{model}.log"
    proc = _launch(cmd, {**env, **source_env, **config}, log, source or REPO)
    url = f"http://127.0.0.1:{port}"

    def stats() -> tuple[float, float]:
        s = server_batch_stats(url, model)
        return s["forward_passes"], s["images"]

    server = Server(
        name,
        model,
        proc,
        "127.0.0.1",
        port,
        f"/v1/checkpoints/{ckpt}/predict",
        # several processes: /metrics is the answering one's, so not the whole picture
        stats if workers == 1 else (lambda: (0.0, 0.0)),
        {"workers": workers, **{k: v for k, v in config.items() if k != "CNNSERVE_DATA_DIR"}},
    )
    return server, log


def _peer_env(env: dict[str, str], data_dir: Path, ckpt: str, counters: Path) -> dict[str, str]:
    """What `bench.peer_handlers.Classifier` reads: the checkpoint, its counters, this repo."""
    return {
        **env,
        "PEER_CHECKPOINTS": str(data_dir / "checkpoints"),
        "PEER_CHECKPOINT": ckpt,
        "PEER_STATS": str(counters),
        "PYTHONPATH": str(REPO),
    }


def start_litserve(
    name: str, model: str, ckpt: str, data_dir: Path, work: Path, env: dict[str, str]
) -> tuple[Server, Path]:
    port = free_port()
    counters = work / f"{name}-{model}.stats"
    config = {"max_batch_size": 64, "batch_timeout_s": 0.002, "workers_per_device": 1}
    cmd = [sys.executable, "-m", "bench.peer_handlers", "litserve", str(port), "64", "0.002"]
    peer_env = _peer_env(env, data_dir, ckpt, counters)
    stats = _counter_file(counters)
    log = work / f"{name}-{model}.log"
    proc = _launch(cmd, peer_env, log, REPO)
    return Server(name, model, proc, "127.0.0.1", port, "/predict", stats, config), log


def start_torchserve(
    name: str, model: str, ckpt: str, data_dir: Path, work: Path, env: dict[str, str]
) -> tuple[Server, Path]:
    workers = 2 if name.endswith("-w2") else 1
    threads = max(1, int(env["PEER_THREADS"]) // workers)
    home = work / f"{name}-{model}"
    store = home / "model-store"
    store.mkdir(parents=True)
    archiver = Path(sys.executable).with_name("torch-model-archiver")
    subprocess.run(
        [str(archiver), "--model-name", model, "--version", "1.0", "--handler",
         str(REPO / "bench" / "peer_handlers.py"), "--export-path", str(store), "--force"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    inference, management, metrics = free_port(), free_port(), free_port()
    config = {"batchSize": 32, "maxBatchDelay": 2, "workers": workers, "threads": threads}
    models = {
        model: {
            "1.0": {
                "defaultVersion": True,
                "marName": f"{model}.mar",
                "minWorkers": workers,
                "maxWorkers": workers,
                "batchSize": 32,
                "maxBatchDelay": 2,
                "responseTimeout": 60,
            }
        }
    }
    (home / "log4j2.xml").write_text(LOG4J2)
    (home / "config.properties").write_text(
        "\n".join(
            [
                f"inference_address=http://127.0.0.1:{inference}",
                f"management_address=http://127.0.0.1:{management}",
                f"metrics_address=http://127.0.0.1:{metrics}",
                # gRPC is not measured, but its default ports would clash between instances
                "grpc_inference_address=127.0.0.1",
                "grpc_management_address=127.0.0.1",
                f"grpc_inference_port={free_port()}",
                f"grpc_management_port={free_port()}",
                "disable_token_authorization=true",
                "disable_system_metrics=true",
                "install_py_dep_per_model=false",
                f"default_workers_per_model={workers}",
                f"load_models={model}.mar",
                f"models={json.dumps(models)}",
                f"vmargs=-Xmx1g -Dlog4j.configurationFile=file://{home / 'log4j2.xml'}",
            ]
        )
        + "\n"
    )
    counters = home / "stats"
    stats = _counter_file(counters)
    peer_env = {
        **_peer_env(env, data_dir, ckpt, counters),
        "PEER_THREADS": str(threads),
        "OMP_NUM_THREADS": str(threads),
        "LOG_LOCATION": str(home / "logs"),
        "TMPDIR": str(home),  # its pid file lives there: one per instance
        "METRICS_LOCATION": str(home / "logs"),
    }
    cmd = [str(Path(sys.executable).with_name("torchserve")), "--start", "--foreground", "--ncs",
           "--model-store", str(store), "--ts-config", str(home / "config.properties"),
           "--disable-token-auth"]  # fmt: skip
    log = work / f"{name}-{model}.log"
    proc = _launch(cmd, peer_env, log, home)
    path = f"/predictions/{model}"
    return Server(name, model, proc, "127.0.0.1", inference, path, stats, config), log


STARTERS = {
    "cnnserve": start_cnnserve,
    "cnnserve-eager": start_cnnserve,
    "cnnserve-w2": start_cnnserve,
    "litserve": start_litserve,
    "torchserve": start_torchserve,
    "torchserve-w2": start_torchserve,
}


def available(name: str) -> str | None:
    """Why a server cannot run here (None when it can)."""
    if name.startswith("litserve") and importlib.util.find_spec("litserve") is None:
        return "litserve is not installed (pip install -e '.[bench]')"
    if name.startswith("torchserve"):
        if importlib.util.find_spec("ts") is None:
            return "torchserve is not installed (pip install -e '.[bench]')"
        if shutil.which("java") is None:
            return "TorchServe needs Java 17 (apt-get install openjdk-17-jre-headless)"
    return None


def measure(
    server: Server, *, clients: int, requests: int, duration: float, warmup: int
) -> dict[str, Any]:
    """Warm up (at most 3 s: a JVM's JIT needs more than Python does), then one bounded load:
    throughput, latency, CPU and batching of `server`."""
    request = multipart_request(server.host, server.port, server.path, sample_png())
    asyncio.run(_load(server.host, server.port, request, clients, warmup, 3.0))
    passes0, images0 = server.batch_stats()
    cpu0 = server.group_cpu_s()
    result = asyncio.run(_load(server.host, server.port, request, clients, requests, duration))
    cpu = server.group_cpu_s() - cpu0
    passes1, images1 = server.batch_stats()
    done = max(1, result["requests"])
    result["cpu_ms_per_request"] = round(cpu * 1e3 / done, 3)
    passes = passes1 - passes0
    result["images_per_forward"] = round((images1 - images0) / passes, 2) if passes else None
    return result


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over rounds (and the round whose req/s is the median, for its latencies)."""
    rates = [r["requests_per_s"] for r in rounds]
    median_round = sorted(rounds, key=lambda r: r["requests_per_s"])[len(rounds) // 2]
    batching = [r["images_per_forward"] for r in rounds if r["images_per_forward"] is not None]
    return {
        "requests_per_s": round(statistics.median(rates), 1),
        "requests_per_s_range": [min(rates), max(rates)],
        "p50_ms": median_round["p50_ms"],
        "p99_ms": median_round["p99_ms"],
        "errors": sum(r["errors"] for r in rounds),
        "error_samples": [s for r in rounds for s in r["error_samples"]][:3],
        "cpu_ms_per_request": round(statistics.median(r["cpu_ms_per_request"] for r in rounds), 3),
        "images_per_forward": round(statistics.median(batching), 2) if batching else None,
        "requests": sum(r["requests"] for r in rounds),
        "rounds": rounds,
    }


def run_model(
    model: str, names: list[str], work: Path, env: dict[str, str], args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    """Start every server for one model, load them in interleaved rounds, stop them."""
    from bench.stores import open_store

    data_dir = work / f"data-{model}"
    ckpt = save_fresh_checkpoint(open_store(data_dir / "checkpoints"), model, "0000000000be7c4a")
    servers: list[Server] = []
    try:
        for name in names:
            start = STARTERS[name.removesuffix("@before")]
            server, log = start(name, model, ckpt.id, data_dir, work, env)
            servers.append(server)
            _wait_until_serving(server, log, args.start_timeout)
            server.freeze()
            logger.info("%s serving %s on port %d", name, model, server.port)
        per: dict[str, list[dict[str, Any]]] = {s.name: [] for s in servers}
        for i in range(args.rounds):
            order = servers[i % len(servers) :] + servers[: i % len(servers)]
            for server in order:
                server.thaw()
                try:
                    result = measure(
                        server,
                        clients=args.clients,
                        requests=args.requests,
                        duration=args.duration,
                        warmup=args.warmup,
                    )
                finally:
                    server.freeze()
                per[server.name].append(result)
                logger.info(
                    "%s %s round %d: %.0f req/s, p99 %s ms, %.2f ms CPU/request, %s img/pass",
                    model, server.name, i + 1, result["requests_per_s"], result["p99_ms"],
                    result["cpu_ms_per_request"], result["images_per_forward"],
                )  # fmt: skip
        return {s.name: {"config": s.config, **summarise(per[s.name])} for s in servers}
    finally:
        for server in servers:
            server.stop()


def ratios(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """cnnserve's best configuration (one process or two) against the best peer and the best
    TorchServe, per model (what the goals are about), and against the --before checkout."""

    def best(per: dict[str, dict[str, Any]], names: list[str]) -> str | None:
        return max(names, key=lambda n: per[n]["requests_per_s"]) if names else None

    out: dict[str, Any] = {}
    for model, per in results.items():
        ours = best(per, [n for n in ("cnnserve", "cnnserve-w2") if n in per])
        peer = best(per, [n for n in per if not n.startswith("cnnserve")])
        ts = best(per, [n for n in per if n.startswith("torchserve")])
        before = best(per, [n for n in per if n.endswith("@before")])
        if ours is None:
            continue
        r = per[ours]

        def over(
            other: str | None, key: str, r: dict[str, Any] = r, per: dict[str, Any] = per
        ) -> float | None:
            return round(r[key] / per[other][key], 2) if other else None

        out[model] = {
            "cnnserve": ours,
            "best_peer": peer,
            "req_per_s_over_best_peer": over(peer, "requests_per_s"),
            "p99_over_best_peer": over(peer, "p99_ms"),
            "best_torchserve": ts,
            "req_per_s_over_torchserve": over(ts, "requests_per_s"),
            "cpu_per_request_over_best_torchserve_cpu": round(
                r["cpu_ms_per_request"]
                / min(per[n]["cpu_ms_per_request"] for n in per if n.startswith("torchserve")),
                2,
            )
            if ts
            else None,
            "before": before,
            "req_per_s_over_before": over(before, "requests_per_s"),
        }
    return out


def markdown(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    lines = [
        "| model | server | req/s (median) | range | p50 (ms) | p99 (ms) | errors | "
        "server CPU per request (ms) | images per forward |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, per in results.items():
        for name, r in per.items():
            lo, hi = r["requests_per_s_range"]
            lines.append(
                f"| {model} | {name} | {r['requests_per_s']:.0f} | {lo:.0f}–{hi:.0f} | "
                f"{r['p50_ms']} | {r['p99_ms']} | {r['errors']} | {r['cpu_ms_per_request']:.2f} | "
                f"{r['images_per_forward'] if r['images_per_forward'] is not None else '–'} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from bench.stores import bench_redis

    parser = argparse.ArgumentParser(prog="python -m bench peers", description=__doc__)
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated")
    parser.add_argument("--models", default=",".join(MODELS), help="lenet,resnet18")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=6000, help="at most, per load")
    parser.add_argument("--duration", type=float, default=8.0, help="at most, per load (s)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1000, help="requests before each load")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads per server")
    parser.add_argument("--start-timeout", type=float, default=180.0)
    parser.add_argument("--out", type=Path, default=Path("docs/bench-peers.json"))
    parser.add_argument(
        "--before",
        type=Path,
        help="another cnnserve checkout: adds cnnserve@before and cnnserve-w2@before, run "
        "from it in the same rounds (git worktree add /tmp/before <commit>)",
    )
    parser.add_argument(
        "--work",
        type=Path,
        help="keep checkpoints, archives and server logs here (else a temp dir)",
    )
    args = parser.parse_args(argv)
    # TERM unwinds like Ctrl-C, so every server started is stopped (and thawed) on the way out
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    names, skipped = [], {}
    for name in args.servers.split(","):
        if name.removesuffix("@before") not in STARTERS or (
            name.endswith("@before") and not name.startswith("cnnserve")
        ):
            parser.error(f"unknown server {name!r}; choose from {', '.join(SERVERS)}")
        why = available(name)
        if why:
            skipped[name] = why
            logger.warning("skipping %s: %s", name, why)
        else:
            names.append(name)
    if args.before:
        names += [f"{n}@before" for n in ("cnnserve", "cnnserve-w2")]
    models = args.models.split(",")
    for model in models:
        if model not in MODELS:
            parser.error(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    env = {
        **os.environ,
        "OMP_WAIT_POLICY": "PASSIVE",
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
        "PEER_THREADS": str(args.threads),
        "PEERS_BEFORE": str(args.before.resolve()) if args.before else "",
    }
    results: dict[str, dict[str, dict[str, Any]]] = {}
    with contextlib.ExitStack() as stack:
        if args.work:
            args.work.mkdir(parents=True, exist_ok=False)
            work = args.work.resolve()
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cnnserve-peers-")))
        # the servers (and the peers' handlers) read the checkpoint index from this Redis
        stack.enter_context(bench_redis(work))
        for model in models:
            results[model] = run_model(model, names, work, env, args)
    report = {
        "benchmark": "peers",
        "machine": machine_info(),
        "load": {
            "clients": args.clients,
            "requests_per_load": args.requests,
            "duration_s": args.duration,
            "rounds": args.rounds,
            "warmup_requests": args.warmup,
            "payload": "one 28×28 Fashion-MNIST test PNG per request, multipart file 'files'",
        },
        "threads": args.threads,
        "skipped": skipped,
        "results": results,
        "ratios": ratios(results),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    sys.stdout.write(markdown(results) + "\n")
    sys.stdout.write(f"ratios: {json.dumps(report['ratios'])}\nwritten to {args.out}\n")
    failed = any(r["errors"] for per in results.values() for r in per.values())
    return 1 if failed else 0
