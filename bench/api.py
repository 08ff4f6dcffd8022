"""API cost against the size of the history: `python -m bench api`.

For each size (jobs on record) it fills a private `redis-server` with that many jobs laid out
as the version before the indexes wrote them (a record per job and the `jobs` set, so the
upgrade runs at start-up too): the three models in turn, 85 % succeeded, 5 % each failed,
cancelled and queued, ten epochs of metrics on the finished ones, and one running job whose
worker holds its lease. As many checkpoint manifests lie in the data directory, laid out as the
version before the Redis checkpoint index wrote them (with `aliases.json`), so the API's start
indexes them. Then it starts `cnnserve api` on them and times, one request at a time over a
keep-alive connection, in interleaved rounds: `GET /healthz` (the floor), submit, get one
ResNet-18 job, a page of 20 (plain, `status=failed`, `model=resnet18`), cancel, `/metrics`,
`GET /v1/checkpoints/lenet:best` and the newest 20 LeNet checkpoints; and, in a separate
process as a worker runs it, one orphan scan (`runner.recover_orphans`).

With `--baseline-rev REV` the same runs against a git worktree of REV, size by size in the same
process, so the table has before and after side by side. An operation stops sampling once it
has used `--op-budget` seconds at a size (the old code needs minutes per request at large
sizes), and the scan gets `--scan-timeout`. With `--epoch` it also trains one LeNet epoch on a
real worker with no jobs and with 10,000 finished jobs on record.

    python -m bench api [--sizes 10,1000,10000,100000] [--reps 100] [--baseline-rev e772259]

`--checkpoints` measures the checkpoint index alone instead (`bench/api_checkpoints.py`):
`<model>:best`, listings and the API's start at 10 to 100,000 checkpoints, side by side with
`--baseline-rev`.

    python -m bench api --checkpoints [--sizes 10,10000,100000] [--baseline-rev bd83212]
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis

from bench.http import api_server, cnnserve_command, stop_group
from bench.infer import machine_info
from bench.stores import private_redis
from workers.contracts import JobSpec, JobStatus
from workers.store.checkpoints import Manifest, Preprocessing
from workers.store.jobs import EpochMetrics, JobRecord

logger = logging.getLogger(__name__)

DEFAULT_SIZES = (10, 1_000, 10_000, 100_000)
MODELS = ("lenet", "vgg", "resnet18")
EPOCH_HISTORY = 10_000
#: p50 at the largest size within this factor of p50 at the smallest (the issue's goal).
GROWTH_GOAL = 1.5
FLOOR_GOALS = {"get": 3.0, "list": 5.0, "submit": 5.0}
SCAN_GOAL_MS = 50.0
OPS = (
    "healthz",
    "submit",
    "get",
    "list",
    "list_by_status",
    "list_by_model",
    "cancel",
    "metrics",
    "model_best",
    "checkpoints_page",
)


def _status_of(i: int) -> JobStatus:
    return {0: JobStatus.failed, 1: JobStatus.cancelled, 2: JobStatus.queued}.get(
        i % 20, JobStatus.succeeded
    )


def _templates() -> dict[str, dict[str, Any]]:
    """One record per model as the store serialises it, to copy (faster than a model each)."""
    history = [
        EpochMetrics(epoch=e, train_loss=2.0 / e, val_loss=2.1 / e, val_acc=0.5 + e / 40, seconds=4)
        for e in range(1, 11)
    ]
    out = {}
    for model in MODELS:
        record = JobRecord(id="0" * 16, spec=JobSpec(model=model, epochs=10), metrics=history)
        out[model] = json.loads(record.model_dump_json())
    return out


@dataclass
class History:
    """What `fill` wrote: ids to read, and the running job."""

    resnet_ids: list[str] = field(default_factory=list)
    running: str | None = None


def fill(r: Any, n: int, *, finished_only: bool = False, running: bool = True) -> History:
    """`n` jobs in the previous version's layout (records and `jobs` only), newest last."""
    templates = _templates()
    out = History()
    t0 = time.time() - n
    for start in range(0, n, 2000):
        pipe = r.pipeline(transaction=False)
        for i in range(start, min(n, start + 2000)):
            job_id = f"{i:016x}"
            model = MODELS[i % len(MODELS)]
            status = JobStatus.succeeded if finished_only else _status_of(i)
            if running and i == n - 1:
                status, out.running = JobStatus.running, job_id
                pipe.set(f"cnnserve:job:{job_id}:lease", "bench@host#1", ex=86400)
            record = dict(templates[model], id=job_id, status=status.value)
            if not status.finished:
                record["metrics"] = []
            else:
                record["finished_at"] = "2026-11-01T12:00:00.000+00:00"
            pipe.set(f"cnnserve:job:{job_id}", json.dumps(record))
            pipe.zadd("cnnserve:jobs", {job_id: t0 + i})
            if model == "resnet18" and len(out.resnet_ids) < 50:
                out.resnet_ids.append(job_id)
        pipe.execute()
    return out


def write_manifests(checkpoints: Path, n: int) -> None:
    """`n` checkpoints' manifests and aliases as the version before the Redis index wrote them
    (no weights: nothing measured loads them); the API indexes them at start-up."""
    rng = random.Random(0)
    for i in range(n):
        job_id = f"{i:016x}"
        model = MODELS[i % len(MODELS)]
        size = {"lenet": 28, "vgg": 224, "resnet18": 96}[model]
        manifest = Manifest(
            id=f"{job_id}-e001",
            job_id=job_id,
            epoch=1,
            model=model,
            input_size=size,
            preprocessing=Preprocessing(resize=size),
            metrics={"train_loss": 0.5, "val_loss": 0.5, "val_acc": round(rng.random(), 4)},
            weights_sha256="0" * 64,
            created_at=f"2026-11-01T12:00:00.{i % 1000000:06d}+00:00",
        )
        directory = checkpoints / job_id / "e001"
        directory.mkdir(parents=True)
        (directory / "manifest.json").write_text(manifest.model_dump_json())
        aliases = {"latest": manifest.id, "best": manifest.id}
        (checkpoints / job_id / "aliases.json").write_text(json.dumps(aliases))


class Client:
    """One keep-alive HTTP/1.1 connection; `call` returns (status, body, seconds)."""

    def __init__(self, url: str, timeout: float = 300.0) -> None:
        parts = urlsplit(url)
        host = parts.hostname or "127.0.0.1"
        self.conn = http.client.HTTPConnection(host, parts.port, timeout=timeout)

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, bytes, float]:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload else {}
        started = time.perf_counter()
        self.conn.request(method, path, body=payload, headers=headers)
        response = self.conn.getresponse()
        data = response.read()
        return response.status, data, time.perf_counter() - started

    def close(self) -> None:
        self.conn.close()


def _percentiles(samples: list[float]) -> dict[str, Any]:
    ordered = sorted(samples)
    if not ordered:
        return {"n": 0, "p50_ms": None, "p99_ms": None}
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return {
        "n": len(ordered),
        "p50_ms": round(statistics.median(ordered) * 1e3, 3),
        "p99_ms": round(p99 * 1e3, 3),
    }


def time_operations(
    url: str, history: History, reps: int, op_budget: float
) -> dict[str, dict[str, Any]]:
    """Every operation `reps` times in interleaved rounds (fewer where over `op_budget`)."""
    client = Client(url)
    samples: dict[str, list[float]] = {op: [] for op in OPS}
    spent = dict.fromkeys(OPS, 0.0)
    errors: dict[str, list[str]] = {op: [] for op in OPS}
    submitted: list[str] = []
    ids = history.resnet_ids or ["0" * 16]

    def run(op: str, method: str, path: str, body: Any = None, ok: int = 200) -> bytes:
        status, data, seconds = client.call(method, path, body)
        samples[op].append(seconds)
        spent[op] += seconds
        if status != ok and len(errors[op]) < 3:
            errors[op].append(f"{status}: {data[:200]!r}")
        return data

    def request(op: str, i: int) -> None:
        match op:
            case "healthz":
                run(op, "GET", "/healthz")
            case "submit":
                body = run(op, "POST", "/v1/jobs", {"model": "resnet18", "epochs": 1}, ok=202)
                submitted.append(json.loads(body).get("id", ""))
            case "get":
                run(op, "GET", f"/v1/jobs/{ids[i % len(ids)]}")
            case "list":
                run(op, "GET", "/v1/jobs?limit=20")
            case "list_by_status":
                run(op, "GET", "/v1/jobs?limit=20&status=failed")
            case "list_by_model":
                run(op, "GET", "/v1/jobs?limit=20&model=resnet18")
            case "cancel":  # the job this round submitted, still queued
                if submitted and submitted[-1]:
                    run(op, "POST", f"/v1/jobs/{submitted.pop()}/cancel", ok=202)
            case "metrics":
                run(op, "GET", "/metrics")
            case "model_best":
                run(op, "GET", "/v1/checkpoints/lenet:best")
            case "checkpoints_page":
                run(op, "GET", "/v1/checkpoints?model=lenet&limit=20")

    for op in OPS:  # one warm-up call each (imports, caches, connections)
        request(op, 0)
        samples[op].clear()
        spent[op] = 0.0
    for i in range(reps):
        for op in OPS:
            if spent[op] < op_budget:
                request(op, i)
    client.close()
    return {op: {**_percentiles(samples[op]), "errors": errors[op]} for op in OPS}


_SCAN = """
import json, sys, time
from workers.store.jobs import JobStore
from workers.training.runner import recover_orphans
from workers.settings import Settings
store = JobStore.from_url(sys.argv[1])
settings = Settings(redis_url=sys.argv[1])
getattr(store, "ensure_indexed", lambda: 0)()  # a worker indexes before its first scan
for _ in range(int(sys.argv[2])):
    t = time.perf_counter()
    recover_orphans(store, settings, lambda job_id: None)
    print(time.perf_counter() - t, flush=True)  # one line per scan: a timeout keeps the done
"""


def time_orphan_scan(
    redis_url: str, source: Path | None, reps: int, timeout: float
) -> dict[str, Any]:
    """`recover_orphans` as a worker runs it, in a process of the source's own code."""
    _, env = cnnserve_command(source)
    timed_out = False
    try:
        output = subprocess.run(
            [sys.executable, "-c", _SCAN, redis_url, str(reps)],
            env={**os.environ, **env},
            cwd=source,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        ).stdout
    except subprocess.TimeoutExpired as exc:
        timed_out = True
        out = exc.stdout or b""
        output = out.decode() if isinstance(out, bytes) else out
    samples = [float(line) for line in output.split() if line]
    result = _percentiles(samples)
    if timed_out:
        result["timed_out_s"] = timeout  # the scans that finished within it are in the numbers
    return result


def measure_size(
    n: int, source: Path | None, args: argparse.Namespace, workdir: Path
) -> dict[str, Any]:
    """One size against one source tree: fill, start the API, time everything."""
    label = "baseline" if source else "current"
    with private_redis(workdir) as url:
        client: Any = redis.Redis.from_url(url, decode_responses=True)
        t0 = time.perf_counter()
        history = fill(client, n)
        data_dir = workdir / f"data-{label}-{n}"
        write_manifests(data_dir / "checkpoints", n)  # as many checkpoints as jobs
        logger.info("%s, %d jobs: store filled in %.1f s", label, n, time.perf_counter() - t0)
        env = {"CNNSERVE_REDIS_URL": url, "CNNSERVE_MAX_QUEUED_JOBS": str(10**9)}
        started = time.perf_counter()
        with api_server(
            data_dir,
            log_path=workdir / f"api-{label}-{n}.log",
            env=env,
            source=source,
            start_timeout=600,
        ) as api:
            start_s = time.perf_counter() - started
            ops = time_operations(api, history, args.reps, args.op_budget)
        ops["orphan_scan"] = time_orphan_scan(url, source, args.scan_reps, args.scan_timeout)
        client.close()
    logger.info("%s, %d jobs: %s", label, n, {k: v["p50_ms"] for k, v in ops.items()})
    return {"jobs": n, "api_start_s": round(start_s, 2), "ops": ops}


def measure_epochs(source: Path | None, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """One LeNet epoch on a real worker with no history and with 10,000 finished jobs."""
    label = "baseline" if source else "current"
    seconds: dict[str, list[float]] = {"0": [], str(EPOCH_HISTORY): []}
    for run in range(args.epoch_runs):
        for history in (0, EPOCH_HISTORY) if run % 2 == 0 else (EPOCH_HISTORY, 0):
            with private_redis(workdir) as url:
                client: Any = redis.Redis.from_url(url, decode_responses=True)
                fill(client, history, finished_only=True, running=False)
                data_dir = workdir / f"epoch-{label}-{history}-{run}"
                env = {"CNNSERVE_REDIS_URL": url, "CNNSERVE_DATA_DIR": str(data_dir)}
                with (
                    _worker(source, env, workdir / f"worker-{label}-{history}-{run}.log"),
                    api_server(
                        data_dir, log_path=workdir / "api-epoch.log", env=env, source=source
                    ) as api,
                ):
                    seconds[str(history)].append(_one_epoch(api))
                client.close()
            logger.info("%s epoch with %d jobs on record: %s", label, history, seconds)
    return {k: [round(s, 2) for s in v] for k, v in seconds.items()}


@contextmanager
def _worker(source: Path | None, env: dict[str, str], log_path: Path) -> Iterator[None]:
    cmd, source_env = cnnserve_command(source)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*cmd, "--log-level", "WARNING", "worker", "--device", "cpu"],
            env={**os.environ, **source_env, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=source,
        )
    try:
        yield
    finally:
        stop_group(proc)


def _one_epoch(api: str) -> float:
    client = Client(api)
    status, body, _ = client.call("POST", "/v1/jobs", {"model": "lenet", "epochs": 1})
    if status != 202:
        raise RuntimeError(f"submit failed: {status} {body[:300]!r}")
    job_id = json.loads(body)["id"]
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        _, body, _ = client.call("GET", f"/v1/jobs/{job_id}")
        job = json.loads(body)
        if job["status"] in ("failed", "cancelled"):
            raise RuntimeError(f"the epoch job {job['status']}: {job['error']}")
        if job["status"] == "succeeded":
            client.close()
            return float(job["metrics"][0]["seconds"])
        time.sleep(0.5)
    raise RuntimeError("the epoch job did not finish within 10 minutes")


@contextmanager
def baseline_tree(rev: str | None, workdir: Path) -> Iterator[Path | None]:
    """A git worktree of `rev` (removed afterwards), or None."""
    if rev is None:
        yield None
        return
    tree = workdir / f"baseline-{rev}"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev], check=True)
    try:
        yield tree
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], check=False)


def goals(sizes: dict[str, Any]) -> dict[str, Any]:
    """The issue's goals, computed from one source's results."""
    ns = sorted(int(n) for n in sizes)
    small, large = sizes[str(ns[0])]["ops"], sizes[str(ns[-1])]["ops"]

    def ratio(a: Any, b: Any) -> float | None:
        return round(a / b, 2) if a and b else None

    growth = {op: ratio(large[op]["p50_ms"], small[op]["p50_ms"]) for op in large}
    floor = {
        str(n): {
            op: ratio(sizes[str(n)]["ops"][op]["p50_ms"], sizes[str(n)]["ops"]["healthz"]["p50_ms"])
            for op in ("get", "list", "submit")
        }
        for n in ns
    }
    return {
        "growth_p50_largest_over_smallest": growth,
        "growth_goal": GROWTH_GOAL,
        "p50_over_healthz": floor,
        "floor_goals": FLOOR_GOALS,
        "orphan_scan_p50_ms_at_largest": large["orphan_scan"]["p50_ms"],
        "orphan_scan_goal_ms": SCAN_GOAL_MS,
    }


def _cell(result: dict[str, Any] | None) -> str:
    if result is None:
        return "–"
    if result.get("timed_out_s") and not result.get("n"):
        return f"> {result['timed_out_s']:.0f} s"
    p50 = result["p50_ms"]
    if p50 is None:
        return "–"
    return f"{p50:.1f} ms" if p50 < 1000 else f"{p50 / 1000:.1f} s"


def markdown(report: dict[str, Any]) -> str:
    """p50 per operation and size, current and (if run) baseline side by side."""
    sources = [s for s in ("baseline", "current") if s in report["results"]]
    sizes = sorted(int(n) for n in report["results"]["current"]["sizes"])
    head = ["operation"] + [f"{n:,} jobs ({src})" for n in sizes for src in sources]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for op in (*OPS, "orphan_scan"):
        cells = [
            _cell(report["results"][src]["sizes"].get(str(n), {}).get("ops", {}).get(op))
            for n in sizes
            for src in sources
        ]
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goals_markdown(report: dict[str, Any]) -> str:
    """The issue's goals against each source's results, as a markdown table."""
    sources = [s for s in ("baseline", "current") if s in report["results"]]
    lines = ["| goal | " + " | ".join(sources) + " |", "|---|" + "---|" * len(sources)]

    def row(label: str, cells: list[str]) -> None:
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    res = {src: report["results"][src] for src in sources}
    sizes = sorted(int(n) for n in res[sources[-1]]["sizes"])
    small, large = f"{sizes[0]:,}", f"{sizes[-1]:,}"
    for op in (*OPS, "orphan_scan"):
        cells = []
        for src in sources:
            g = res[src]["goals"]["growth_p50_largest_over_smallest"].get(op)
            cells.append("–" if g is None else f"{g:.2f}×")
        row(f"{op}: p50 at {large} jobs / at {small} (≤ {GROWTH_GOAL}×)", cells)
    for op, goal in FLOOR_GOALS.items():
        cells = []
        for src in sources:
            ratios = [v[op] for v in res[src]["goals"]["p50_over_healthz"].values() if v[op]]
            cells.append(f"{min(ratios):.1f}–{max(ratios):.1f}×" if ratios else "–")
        row(f"{op}: p50 / healthz p50, every size (≤ {goal:g}×)", cells)
    cells = []
    for src in sources:
        scan = res[src]["sizes"][str(sizes[-1])]["ops"]["orphan_scan"]
        cells.append(_cell(scan))
    row(f"orphan scan at {large} jobs, 1 running (< {SCAN_GOAL_MS:g} ms)", cells)
    if all("lenet_epoch_s" in res[src] for src in sources):
        cells = []
        for src in sources:
            e = res[src]["lenet_epoch_s"]
            before, after = statistics.median(e["0"]), statistics.median(e[str(EPOCH_HISTORY)])
            cells.append(f"{before:.2f} s → {after:.2f} s")
        row(f"LeNet epoch, 0 → {EPOCH_HISTORY:,} finished jobs on record (unchanged)", cells)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench api", description=__doc__)
    parser.add_argument("--sizes", help="comma-separated (default 10,1000,10000,100000 jobs)")
    parser.add_argument("--reps", type=int, default=100, help="requests per operation and size")
    parser.add_argument("--op-budget", type=float, default=20.0, help="seconds per operation")
    parser.add_argument("--scan-reps", type=int, default=20)
    parser.add_argument("--scan-timeout", type=float, default=120.0)
    parser.add_argument("--baseline-rev", help="also measure this git revision, side by side")
    parser.add_argument("--epoch", action="store_true", help="also time LeNet epochs on a worker")
    parser.add_argument("--epoch-runs", type=int, default=2)
    parser.add_argument(
        "--checkpoints",
        action="store_true",
        help="the checkpoint index instead (bench/api_checkpoints.py): <model>:best, listings "
        "and API start at --sizes checkpoints (default 10,10000,100000), side by side",
    )
    parser.add_argument("--rounds", type=int, default=60, help="--checkpoints: rounds per size")
    parser.add_argument("--restarts", type=int, default=3, help="--checkpoints: timed restarts")
    parser.add_argument("--out", type=Path, help="JSON results (default docs/bench-api*.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.checkpoints:
        from bench import api_checkpoints

        args.out = args.out or Path("docs/bench-api-checkpoint-index.json")
        args.sizes = args.sizes or ",".join(map(str, api_checkpoints.DEFAULT_SIZES))
        return api_checkpoints.run(args)
    args.out = args.out or Path("docs/bench-api.json")
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else list(DEFAULT_SIZES)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="cnnserve-bench-api-") as tmp:
        workdir = Path(tmp)
        with baseline_tree(args.baseline_rev, workdir) as baseline:
            sources: list[tuple[str, Path | None]] = [("current", None)]
            if baseline is not None:
                sources.insert(0, ("baseline", baseline))
            for n in sizes:
                for label, source in sources:
                    entry = results.setdefault(label, {"sizes": {}})
                    entry["sizes"][str(n)] = measure_size(n, source, args, workdir)
            for label, source in sources:
                results[label]["goals"] = goals(results[label]["sizes"])
                if args.epoch:
                    results[label]["lenet_epoch_s"] = measure_epochs(source, args, workdir)
    report = {
        "benchmark": "api",
        "machine": machine_info(),
        "baseline_rev": args.baseline_rev,
        "reps": args.reps,
        "op_budget_s": args.op_budget,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    sys.stdout.write(markdown(report) + "\n\n" + goals_markdown(report) + "\n")
    sys.stdout.write(f"results written to {args.out}\n")
    errors = [
        (label, n, op, r["errors"])
        for label, res in results.items()
        for n, size in res["sizes"].items()
        for op, r in size["ops"].items()
        if r.get("errors")
    ]
    for e in errors:
        logger.error("errors in %s at %s jobs, %s: %s", *e)
    return 1 if any(label == "current" for label, *_ in errors) else 0
