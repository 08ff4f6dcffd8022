"""The checkpoint index against the number of checkpoints on record: `python -m bench api
--checkpoints`.

For each size it writes that many checkpoint manifests (one per job, LeNet, VGG and ResNet-18
in turn, random validation accuracies) laid out as the version before the Redis index wrote
them (with each job's `aliases.json`), for the current tree and, with `--baseline-rev`, a git
worktree of that revision (hard links to the same files; a data dir and a private
`redis-server` each). It starts every API, one per size and source, timing each start to its
first `/healthz` (the current one indexes the store into Redis at start; the baseline at
bd83212 builds its SQLite index on the first request that needs it, timed as that operation's
first call). Then, with every API up at once, it times one request at a time over a
keep-alive connection per API, in rounds that visit every API for every operation in an order
rotated each round, so that a noisy machine weighs on every size and source alike:

- `GET /healthz`, the floor;
- `GET /v1/checkpoints/lenet:best` and `GET /v1/checkpoints/<job>:best` (a different job each
  time): resolution and the manifest read;
- `GET /v1/checkpoints?model=lenet&limit=20`: the newest 20 of a model (the baseline has no
  `limit` and answers with every LeNet checkpoint: that is its cost);
- `GET /v1/checkpoints?job_id=<job>`: one job's checkpoints;
- `GET /v1/checkpoints?model=lenet&limit=20&cursor=...`: the second page (current only).

Last, it restarts each API `--restarts` times over its store, indexed now, timing each start
again, and times in a fresh process what the current API's start does with the store (open it;
index it had it never been): neither may grow with the number of checkpoints.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.api import Client, _percentiles, baseline_tree, write_manifests
from bench.http import api_server, cnnserve_command
from bench.infer import machine_info
from bench.stores import private_redis

logger = logging.getLogger(__name__)

DEFAULT_SIZES = (10, 10_000, 100_000)
OPS = (
    "healthz",
    "model_best",
    "job_best",
    "model_page",
    "job_listing",
    "model_next_page",
)
#: How many jobs' ids the job operations rotate over.
SAMPLED_JOBS = 64


@dataclass
class Side:
    """One source tree's API over its own copy of a store of `n` checkpoints."""

    label: str
    n: int
    source: Path | None
    data_dir: Path
    redis_url: str
    log_dir: Path
    jobs: list[str]
    url: str = ""
    client: Client | None = None
    cursor: str | None = None
    api: ExitStack = field(default_factory=ExitStack)
    samples: dict[str, list[float]] = field(default_factory=lambda: {op: [] for op in OPS})
    spent: dict[str, float] = field(default_factory=lambda: dict.fromkeys(OPS, 0.0))
    errors: dict[str, list[str]] = field(default_factory=lambda: {op: [] for op in OPS})
    result: dict[str, Any] = field(default_factory=dict)

    def start(self, tag: str) -> float:
        """Start its API; seconds to the first `/healthz`."""
        started = time.perf_counter()
        self.url = self.api.enter_context(
            api_server(
                self.data_dir,
                log_path=self.log_dir / f"api-{self.label}-{self.n}-{tag}.log",
                env={"CNNSERVE_REDIS_URL": self.redis_url},
                source=self.source,
                start_timeout=1800,
            )
        )
        seconds = time.perf_counter() - started
        self.client = Client(self.url)
        return seconds

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        self.api.close()
        self.api = ExitStack()

    def call(self, path: str) -> tuple[int, bytes, float]:
        """GET `path` on its keep-alive connection, opened again (and the request sent again,
        the failed try not counted) when the server closed it: uvicorn closes a connection
        idle for 5 s, which a round over many APIs can leave this one."""
        assert self.client is not None
        try:
            return self.client.call("GET", path)
        except (http.client.RemoteDisconnected, ConnectionError):
            self.client.close()
            self.client = Client(self.url)
        try:
            return self.client.call("GET", path)
        except (http.client.HTTPException, OSError) as exc:
            logs = self.log_dir.glob(f"api-{self.label}-{self.n}-*.log")
            log = max(logs, key=lambda path: path.stat().st_mtime)
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.label} API at {self.n} failed: {exc}\n{tail}") from exc

    def path(self, op: str, i: int) -> str:
        job = self.jobs[i % len(self.jobs)]
        return {
            "healthz": "/healthz",
            "model_best": "/v1/checkpoints/lenet:best",
            "job_best": f"/v1/checkpoints/{job}:best",
            "model_page": "/v1/checkpoints?model=lenet&limit=20",
            "job_listing": f"/v1/checkpoints?job_id={job}",
            "model_next_page": f"/v1/checkpoints?model=lenet&limit=20&cursor={self.cursor}",
        }[op]

    def first_calls(self) -> None:
        """Each operation once (the baseline builds its SQLite index on the first)."""
        first: dict[str, float | None] = {}
        for op in OPS:
            if op == "model_next_page":
                _, body, _ = self.call(self.path("model_page", 0))
                self.cursor = json.loads(body).get("next_cursor")
                if self.cursor is None:  # no second page (or a version without cursors)
                    first[op] = None
                    continue
            status, _, seconds = self.call(self.path(op, 0))
            first[op] = round(seconds * 1e3, 3) if status == 200 else None
        self.result["first_call_ms"] = first

    def sample(self, op: str, i: int, budget: float) -> None:
        """One timed request of `op`, unless `op` has used its budget or does not apply."""
        if self.spent[op] >= budget or (op == "model_next_page" and self.cursor is None):
            return
        status, body, seconds = self.call(self.path(op, i))
        self.samples[op].append(seconds)
        self.spent[op] += seconds
        if status != 200 and len(self.errors[op]) < 3:
            self.errors[op].append(f"{status}: {body[:200]!r}")


_STORE_START = """
import json, time
from workers.settings import get_settings
from workers.store.checkpoints import CheckpointStore
started = time.perf_counter()
store = CheckpointStore.from_settings(get_settings())
indexed = store.ensure_indexed()
print(json.dumps({"ms": (time.perf_counter() - started) * 1e3, "indexed": indexed}))
"""


def store_start_ms(side: Side) -> dict[str, Any]:
    """What the API's start does with the store (open it, index it if it was never indexed),
    timed in a fresh process of the side's own code."""
    _, env = cnnserve_command(side.source)
    out = subprocess.run(
        [sys.executable, "-c", _STORE_START],
        env={
            **os.environ,
            **env,
            "CNNSERVE_REDIS_URL": side.redis_url,
            "CNNSERVE_DATA_DIR": str(side.data_dir),
        },
        cwd=side.source,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    result: dict[str, Any] = json.loads(out.splitlines()[-1])
    return result


def measure(sides: list[Side], args: argparse.Namespace) -> None:
    """Every API over every size, at once: first starts, first calls, rounds that visit every
    API for every operation (in an order rotated each round), then timed restarts."""
    for side in sides:
        side.result["start_s"] = round(side.start("first"), 2)
        logger.info(
            "%s, %d checkpoints: first start %.1f s", side.label, side.n, side.result["start_s"]
        )
    for side in sides:
        side.first_calls()
        logger.info(
            "%s, %d checkpoints: first calls %s", side.label, side.n, side.result["first_call_ms"]
        )
    for i in range(args.rounds):
        shift = i % len(sides)
        order = sides[shift:] + sides[:shift]
        for op in OPS:
            for side in order:
                side.sample(op, i, args.op_budget)
    for side in sides:
        side.result["ops"] = {
            op: {**_percentiles(side.samples[op]), "errors": side.errors[op]} for op in OPS
        }
        side.result["restart_s"] = []
        side.result["store_start_ms"] = []
    for k in range(args.restarts):  # the store is indexed now: a start that must stay flat
        shift = k % len(sides)
        for side in sides[shift:] + sides[:shift]:
            side.stop()
            side.result["restart_s"].append(round(side.start(f"again-{k}"), 2))
            if side.source is None:  # the baseline has no start-up step for its store
                for _ in range(3):
                    side.result["store_start_ms"].append(round(store_start_ms(side)["ms"], 2))
    for side in sides:
        side.stop()
        side.result["restart_median_s"] = statistics.median(side.result["restart_s"])
        if side.result["store_start_ms"]:
            side.result["store_start_median_ms"] = statistics.median(side.result["store_start_ms"])
        logger.info("%s, %d checkpoints: %s", side.label, side.n, side.result)


@contextmanager
def _sides(
    sizes: list[int], sources: list[tuple[str, Path | None]], workdir: Path
) -> Iterator[list[Side]]:
    """Per size, a store of that many checkpoints in the earlier layout per source (hard links
    to the same manifests), each with its own Redis."""
    with ExitStack() as stack:
        sides = []
        for n in sizes:
            first = workdir / f"data-{sources[0][0]}-{n}"
            t0 = time.perf_counter()
            write_manifests(first / "checkpoints", n)
            for label, _ in sources[1:]:  # the same files: each version has its own tree
                shutil.copytree(first, workdir / f"data-{label}-{n}", copy_function=os.link)
            logger.info("%d checkpoints written in %.1f s", n, time.perf_counter() - t0)
            rng = random.Random(n)
            jobs = [f"{rng.randrange(n):016x}" for _ in range(min(n, SAMPLED_JOBS))]
            for label, source in sources:
                redis_url = stack.enter_context(private_redis(workdir))
                data_dir = workdir / f"data-{label}-{n}"
                sides.append(Side(label, n, source, data_dir, redis_url, workdir, jobs))
        try:
            yield sides
        finally:
            for side in sides:
                side.stop()


def summary(sizes: dict[str, dict[str, Any]], labels: list[str]) -> dict[str, Any]:
    """Per source, p50 at the largest size over p50 at each smaller size (at the smallest a
    model has fewer than 20 checkpoints, so its page is shorter and there is no second page);
    and current over baseline per size."""
    ns = sorted(sizes, key=int)
    large = ns[-1]

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 2) if a and b else None

    growth: dict[str, dict[str, dict[str, float | None]]] = {}
    for label in labels:
        hi = sizes[large][label]
        growth[label] = {}
        for n in ns[:-1]:
            lo = sizes[n][label]
            row = {op: ratio(hi["ops"][op]["p50_ms"], lo["ops"][op]["p50_ms"]) for op in OPS}
            row["first_start"] = ratio(hi["start_s"], lo["start_s"])
            row["restart"] = ratio(hi["restart_median_s"], lo["restart_median_s"])
            if "store_start_median_ms" in hi:
                row["store_start"] = ratio(hi["store_start_median_ms"], lo["store_start_median_ms"])
            growth[label][n] = row
    versus: dict[str, dict[str, float | None]] = {}
    if "baseline" in labels:
        for n in ns:
            cur, base = sizes[n]["current"], sizes[n]["baseline"]
            versus[n] = {
                op: ratio(cur["ops"][op]["p50_ms"], base["ops"][op]["p50_ms"]) for op in OPS
            }
    return {"growth_largest_over": growth, "current_over_baseline": versus}


def _ms(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.1f} ms" if value < 1000 else f"{value / 1000:.1f} s"


def markdown(report: dict[str, Any]) -> str:
    """p50 per operation, size and source; starts; growth."""
    sizes = report["sizes"]
    ns = sorted(sizes, key=int)
    labels = report["sources"]
    head = ["operation"] + [f"{int(n):,} ({label})" for n in ns for label in labels]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for op in OPS:
        cells = [_ms(sizes[n][label]["ops"][op]["p50_ms"]) for n in ns for label in labels]
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    for key, name in (("start_s", "first start"), ("restart_median_s", "start, indexed")):
        cells = [f"{sizes[n][label][key]:.1f} s" for n in ns for label in labels]
        lines.append(f"| API {name} | " + " | ".join(cells) + " |")
    cells = [
        f"{sizes[n][label]['store_start_median_ms']:.1f} ms"
        if "store_start_median_ms" in sizes[n][label]
        else "–"
        for n in ns
        for label in labels
    ]
    lines.append("| the store's part of a start, indexed | " + " | ".join(cells) + " |")
    growth = report["summary"]["growth_largest_over"]
    large = f"{int(ns[-1]):,}"
    cols = [(label, n) for label in labels for n in ns[:-1]]
    head = [f"{label}: {large} / {int(n):,}" for label, n in cols]
    lines += ["", "| p50 growth | " + " | ".join(head) + " |", "|---|" + "---|" * len(cols)]
    for op in (*OPS, "first_start", "restart", "store_start"):
        row = [growth[label][n].get(op) for label, n in cols]
        cells = ["–" if g is None else f"{g:.2f}×" for g in row]
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """`python -m bench api --checkpoints`: measure, write JSON, print markdown."""
    sizes_wanted = [int(s) for s in args.sizes.split(",")] if args.sizes else list(DEFAULT_SIZES)
    report: dict[str, Any] = {
        "benchmark": "api --checkpoints",
        "machine": machine_info(),
        "baseline_rev": args.baseline_rev,
        "rounds": args.rounds,
        "op_budget_s": args.op_budget,
        "restarts": args.restarts,
        "sizes": {},
    }
    with tempfile.TemporaryDirectory(prefix="cnnserve-bench-ckpt-") as tmp:
        workdir = Path(tmp)
        with baseline_tree(args.baseline_rev, workdir) as baseline:
            sources: list[tuple[str, Path | None]] = [("current", None)]
            if baseline is not None:
                sources.insert(0, ("baseline", baseline))
            report["sources"] = [label for label, _ in sources]
            with _sides(sizes_wanted, sources, workdir) as sides:
                measure(sides, args)
            for side in sides:
                report["sizes"].setdefault(str(side.n), {})[side.label] = side.result
            report["machine"]["load_average_end"] = list(os.getloadavg())
    report["summary"] = summary(report["sizes"], report["sources"])
    _write(report, args.out)
    sys.stdout.write(markdown(report) + f"\nresults written to {args.out}\n")
    failed = [
        (n, label, op, r["errors"])
        for n, size in report["sizes"].items()
        for label, side in size.items()
        for op, r in side["ops"].items()
        if r["errors"]
    ]
    for entry in failed:
        logger.error("errors at %s checkpoints, %s, %s: %s", *entry)
    return 1 if any(label == "current" for _, label, *_ in failed) else 0


def _write(report: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
