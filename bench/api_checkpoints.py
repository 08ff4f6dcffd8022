"""The checkpoint index against the number of checkpoints on record: `python -m bench api
--checkpoints`.

For each size it writes that many checkpoint manifests (one per job, LeNet, VGG and ResNet-18
in turn, random validation accuracies) laid out as the version before the Redis index wrote
them (with each job's `aliases.json`), for the current tree and, with `--baseline-rev`, a git
worktree of that revision (hard links to the same files, a data dir and a private
`redis-server` each). It starts both APIs, timing each start to its first `/healthz` (the
current one indexes the store into Redis at start; the baseline at bd83212 builds its SQLite
index on the first request that needs it, timed as that operation's first call), then times,
one request at a time over a keep-alive connection per API, in rounds that alternate between
the two APIs request by request:

- `GET /healthz`, the floor;
- `GET /v1/checkpoints/lenet:best` and `GET /v1/checkpoints/<job>:best` (a different job each
  time): resolution and the manifest read;
- `GET /v1/checkpoints?model=lenet&limit=20`: the newest 20 of a model (the baseline has no
  `limit` and answers with every LeNet checkpoint: that is its cost);
- `GET /v1/checkpoints?job_id=<job>`: one job's checkpoints;
- `GET /v1/checkpoints?model=lenet&limit=20&cursor=...`: the second page (current only).

Last, it restarts each API `--restarts` times on its store, now indexed, timing each start
again: that start must not grow with the number of checkpoints (the upgrade ran once).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.api import Client, _percentiles, baseline_tree, write_manifests
from bench.http import api_server
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
    """One source tree's API over its own copy of the store at one size."""

    label: str
    source: Path | None
    data_dir: Path
    redis_url: str
    log_dir: Path
    url: str = ""
    client: Client | None = None
    cursor: str | None = None
    api: ExitStack = field(default_factory=ExitStack)

    def start(self, tag: str) -> float:
        """Start its API; seconds to the first `/healthz`."""
        started = time.perf_counter()
        self.url = self.api.enter_context(
            api_server(
                self.data_dir,
                log_path=self.log_dir / f"api-{self.label}-{tag}.log",
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


def _path(op: str, side: Side, job: str) -> str | None:
    match op:
        case "healthz":
            return "/healthz"
        case "model_best":
            return "/v1/checkpoints/lenet:best"
        case "job_best":
            return f"/v1/checkpoints/{job}:best"
        case "model_page":
            return "/v1/checkpoints?model=lenet&limit=20"
        case "job_listing":
            return f"/v1/checkpoints?job_id={job}"
        case "model_next_page":
            return f"/v1/checkpoints?model=lenet&limit=20&cursor={side.cursor}"
    raise ValueError(op)


def _call(side: Side, path: str) -> tuple[int, bytes, float]:
    assert side.client is not None
    return side.client.call("GET", path)


def measure_size(
    n: int, sides: list[Side], args: argparse.Namespace, jobs: list[str]
) -> dict[str, dict[str, Any]]:
    """Both APIs over `n` checkpoints: first start, first calls, interleaved rounds, restarts."""
    out: dict[str, dict[str, Any]] = {s.label: {"checkpoints": n} for s in sides}
    for side in sides:
        out[side.label]["start_s"] = round(side.start(f"{n}-first"), 2)
        logger.info("%s, %d checkpoints: first start %s s", side.label, n, out[side.label])
    for side in sides:  # the first call of each (the baseline builds its index here)
        first: dict[str, float | None] = {}
        for op in OPS:
            if op == "model_next_page":
                _, body, _ = _call(side, "/v1/checkpoints?model=lenet&limit=20")
                side.cursor = json.loads(body).get("next_cursor")
                if side.cursor is None:
                    first[op] = None
                    continue
            path = _path(op, side, jobs[0])
            assert path is not None
            status, body, seconds = _call(side, path)
            first[op] = round(seconds * 1e3, 3) if status == 200 else None
        out[side.label]["first_call_ms"] = first
        logger.info("%s, %d checkpoints: first calls %s", side.label, n, first)
    samples: dict[str, dict[str, list[float]]] = {s.label: {op: [] for op in OPS} for s in sides}
    spent = {s.label: dict.fromkeys(OPS, 0.0) for s in sides}
    errors: dict[str, dict[str, list[str]]] = {s.label: {op: [] for op in OPS} for s in sides}
    for i in range(args.rounds):
        order = sides if i % 2 == 0 else list(reversed(sides))
        for op in OPS:
            for side in order:
                if spent[side.label][op] >= args.op_budget:
                    continue
                if op == "model_next_page" and side.cursor is None:
                    continue
                path = _path(op, side, jobs[i % len(jobs)])
                assert path is not None
                status, body, seconds = _call(side, path)
                samples[side.label][op].append(seconds)
                spent[side.label][op] += seconds
                if status != 200 and len(errors[side.label][op]) < 3:
                    errors[side.label][op].append(f"{status}: {body[:200]!r}")
    for side in sides:
        out[side.label]["ops"] = {
            op: {**_percentiles(samples[side.label][op]), "errors": errors[side.label][op]}
            for op in OPS
        }
        out[side.label]["restart_s"] = []
    for k in range(args.restarts):  # the store is indexed now: a start that must stay flat
        for side in sides if k % 2 == 0 else list(reversed(sides)):
            side.stop()
            out[side.label]["restart_s"].append(round(side.start(f"{n}-again-{k}"), 2))
    for side in sides:
        side.stop()
        out[side.label]["restart_median_s"] = statistics.median(out[side.label]["restart_s"])
        logger.info(
            "%s, %d checkpoints: %s; restarts %s",
            side.label,
            n,
            {op: v["p50_ms"] for op, v in out[side.label]["ops"].items()},
            out[side.label]["restart_s"],
        )
    return out


@contextmanager
def _sides(
    n: int, sources: list[tuple[str, Path | None]], workdir: Path
) -> Iterator[tuple[list[Side], list[str]]]:
    """A store of `n` checkpoints in the earlier layout per source, each with its own Redis."""
    first = workdir / f"data-{sources[0][0]}-{n}"
    t0 = time.perf_counter()
    write_manifests(first / "checkpoints", n)
    for label, _ in sources[1:]:  # the same files, linked: each version has its own tree
        shutil.copytree(first, workdir / f"data-{label}-{n}", copy_function=os.link)
    logger.info("%d checkpoints written in %.1f s", n, time.perf_counter() - t0)
    rng = random.Random(n)
    jobs = [f"{rng.randrange(n):016x}" for _ in range(min(n, SAMPLED_JOBS))]
    with ExitStack() as stack:
        sides = [
            Side(
                label,
                source,
                workdir / f"data-{label}-{n}",
                stack.enter_context(private_redis(workdir)),
                workdir,
            )
            for label, source in sources
        ]
        try:
            yield sides, jobs
        finally:
            for side in sides:
                side.stop()
    for label, _ in sources:
        shutil.rmtree(workdir / f"data-{label}-{n}", ignore_errors=True)


def summary(sizes: dict[str, dict[str, Any]], labels: list[str]) -> dict[str, Any]:
    """Growth per source (p50 at the largest size over p50 at the smallest size where the
    operation answered: a second page needs more than 20 checkpoints of a model), and current
    over baseline per size."""
    ns = sorted(sizes, key=int)
    small, large = ns[0], ns[-1]

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 2) if a and b else None

    def smallest(label: str, op: str) -> float | None:
        found = (sizes[n][label]["ops"][op]["p50_ms"] for n in ns)
        return next((p50 for p50 in found if p50), None)

    growth: dict[str, dict[str, float | None]] = {}
    for label in labels:
        lo, hi = sizes[small][label], sizes[large][label]
        growth[label] = {op: ratio(hi["ops"][op]["p50_ms"], smallest(label, op)) for op in OPS}
        growth[label]["restart"] = ratio(hi["restart_median_s"], lo["restart_median_s"])
        growth[label]["first_start"] = ratio(hi["start_s"], lo["start_s"])
    versus: dict[str, dict[str, float | None]] = {}
    if "baseline" in labels:
        for n in ns:
            cur, base = sizes[n]["current"], sizes[n]["baseline"]
            versus[n] = {
                op: ratio(cur["ops"][op]["p50_ms"], base["ops"][op]["p50_ms"]) for op in OPS
            }
    return {"growth_largest_over_smallest": growth, "current_over_baseline": versus}


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
    growth = report["summary"]["growth_largest_over_smallest"]
    lines += ["", "| growth, largest / smallest | " + " | ".join(labels) + " |"]
    lines.append("|---|" + "---|" * len(labels))
    for op in (*OPS, "first_start", "restart"):
        cells = [
            "–" if growth[label].get(op) is None else f"{growth[label][op]:.2f}×"
            for label in labels
        ]
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
            for n in sizes_wanted:
                with _sides(n, sources, workdir) as (sides, jobs):
                    report["sizes"][str(n)] = measure_size(n, sides, args, jobs)
                report["machine"]["load_average_end"] = list(os.getloadavg())
                _write(report, args.out)  # after every size: a long run keeps what it has
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
