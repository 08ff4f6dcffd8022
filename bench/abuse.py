"""Hostile requests against a real `cnnserve api`: what one request costs in memory and in
event-loop time (issue 23's goals: no request raises the API's peak memory by more than
256 MB, none blocks the event loop for more than 50 ms, at the default limits).

Per tree (this one, and `--baseline DIR` first when given): a private `redis-server`, a keys
file with a predict-scoped and a train-scoped key (`service.access.keys.add_key`), a
freshly initialised LeNet checkpoint owned by the predict key's principal (that tree's own
`bench.http.make_lenet_checkpoint`, in a subprocess) and one `cnnserve api` at the default
limits, warmed with one ordinary predict, infer and explain. Then each attack of
`bench.abuse_attacks.ATTACKS`, after a quiet pause:

- **peak memory growth**: the API's peak RSS is reset (`5` into `/proc/<pid>/clear_refs`)
  just before the request, and `VmHWM` minus the `VmRSS` before is what the request added;
  where clear_refs cannot be written, VmRSS sampled every 2 ms stands in (the JSON says which);
- **event-loop stall**: a thread sends `GET /healthz` every `--probe-ms` over one keep-alive
  connection; the longest and the p99 latency of the probes that overlap the attack (from its
  first byte to `--tail` seconds after its answer), less the idle median, is the stall;
- the status, wall time, and for `Expect: 100-continue` whether `100 Continue` came and how
  many body bytes went out before the answer (an upper bound on what the server read: the
  socket buffers hold a few MB more than the server took).

An attack that pushes the API's RSS past `--cap-mib` above where it was is stopped by killing
the API (by PID) and recorded as such. The API is restarted for the next attack after that,
after an attack that kills it or gets no answer within `--timeout`, when it is still busy 20 s
after answering, or when it holds more than 128 MiB over its start (memory it keeps would hide
the next attack's growth). A killed attack's growth, wall time and stall are lower bounds (a
probe cut by the kill counts as long as it waited). The table marks attacks over either goal.

    python -m bench abuse [--baseline DIR] [--out FILE] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.abuse_attacks import ATTACKS, Attack, RawRequest, Target, files_body, flat_png, v2_json
from bench.abuse_wire import HealthProbe, Outcome, send
from bench.http import cnnserve_command, settle
from bench.infer import machine_info
from bench.stores import private_redis
from bench.streams import api_process
from service.access.keys import add_key

logger = logging.getLogger(__name__)

MEMORY_GOAL_MIB = 256
STALL_GOAL_MS = 50
OWNER = "abuser"
#: An API holding more than this over its start is restarted: freed heap it keeps would be
#: reused by the next attack without a rise in RSS, and hide that attack's growth.
RETAINED_LIMIT_MIB = 128

#: Made in a subprocess with the tree's own helper, owned by the predict key's principal.
CHECKPOINT_SNIPPET = """
import sys
from pathlib import Path
from bench import http

made = http.save_fresh_checkpoint

def owned(store, name, job_id):
    save = store.save
    def save_owned(**kw):
        kw["manifest_fields"] = {**kw["manifest_fields"], "owner": sys.argv[2]}
        return save(**kw)
    store.save = save_owned
    return made(store, name, job_id)

http.save_fresh_checkpoint = owned
print(http.make_lenet_checkpoint(Path(sys.argv[1])))
"""


# --- the API's memory ---------------------------------------------------------------------------


def _status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            out[name] = int(value.split()[0])
    return out


class MemoryWatch:
    """One request's peak RSS growth of `pid` (KiB), and a cap that kills the API."""

    def __init__(self, pid: int, cap_kib: int) -> None:
        self.pid, self.cap_kib = pid, cap_kib
        self.before = _status(pid)["VmRSS"]
        self.method = "clear_refs"
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError:
            self.method = "VmRSS sampled every 2 ms"
        self.sampled = self.before
        self.killed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        every = 0.002 if self.method != "clear_refs" else 0.02  # the cap only
        while not self._stop.wait(every):
            try:
                rss = _status(self.pid)["VmRSS"]
            except (OSError, KeyError):
                return
            self.sampled = max(self.sampled, rss)
            if rss - self.before > self.cap_kib:
                self.killed = True
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                return

    def finish(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        try:
            now = _status(self.pid)
            peak = now["VmHWM"] if self.method == "clear_refs" else self.sampled
            after = now["VmRSS"]
        except (OSError, KeyError):  # the API died
            peak, after = self.sampled, None
        return {
            "rss_before_mib": round(self.before / 1024, 1),
            "peak_growth_mib": round((max(peak, self.sampled) - self.before) / 1024, 1),
            "retained_mib": None if after is None else round((after - self.before) / 1024, 1),
            "memory_method": self.method,
        }


# --- one tree -----------------------------------------------------------------------------------


def _ms(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)


def stall(samples: Sequence[float], idle_p50_ms: float) -> dict[str, Any]:
    """The probes' latency during an attack, and over the idle median (the stall)."""
    if not samples:
        return {"probes": 0}
    worst, p99 = round(max(samples) * 1000, 1), _ms(samples, 0.99)
    return {
        "probes": len(samples),
        "max_ms": worst,
        "p99_ms": p99,
        "stall_max_ms": round(max(0.0, worst - idle_p50_ms), 1),
        "stall_p99_ms": round(max(0.0, p99 - idle_p50_ms), 1),
    }


def make_checkpoint(source: Path | None, data_dir: Path, redis_url: str) -> str:
    _, source_env = cnnserve_command(source)
    env = {**os.environ, **source_env, "CNNSERVE_REDIS_URL": redis_url}
    env["CNNSERVE_DATA_DIR"] = str(data_dir)
    if source is None:
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    done = subprocess.run(
        [sys.executable, "-c", CHECKPOINT_SNIPPET, str(data_dir), OWNER],
        env=env,
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"making the checkpoint: {done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


def warm_up(target: Target) -> None:
    """An ordinary predict, infer and explain: the model loaded before any attack."""
    content_type, body = files_body(flat_png(28, "L"), 1)
    headers = [("Content-Type", content_type), *target.auth(target.predict_key)]
    v2 = [("Content-Type", "application/json"), *target.auth(target.predict_key)]
    for request in (
        RawRequest("POST", f"/v1/checkpoints/{target.checkpoint}/predict", headers, body),
        RawRequest(
            "POST", "/v2/models/lenet/infer", v2, v2_json([1, 28, 28], b"[" + b"0," * 783 + b"0]")
        ),
        RawRequest("POST", f"/v1/checkpoints/{target.checkpoint}/explain", headers, body),
    ):
        outcome = send(target.port, request, timeout=120)
        if outcome.status != 200:
            raise RuntimeError(f"warm-up {request.path}: {outcome.status} {outcome.detail}")


class Tree:
    """One version's API under attack: restarted when an attack kills it."""

    def __init__(
        self, label: str, source: Path | None, home: Path, args: argparse.Namespace
    ) -> None:
        self.label, self.source, self.home, self.args = label, source, home, args
        self.stack = contextlib.ExitStack()
        self.restarts = 0
        self.idles: list[dict[str, Any]] = []

    def __enter__(self) -> Tree:
        keys_file = self.home / "keys.toml"
        predict_key, _, _ = add_key(keys_file, OWNER, ["predict"])
        train_key, _, _ = add_key(keys_file, "trainer", ["read", "train"])
        redis_url = self.stack.enter_context(private_redis(self.home))
        data_dir = self.home / "data"
        checkpoint = make_checkpoint(self.source, data_dir, redis_url)
        self.env = {
            "CNNSERVE_REDIS_URL": redis_url,
            "CNNSERVE_DATA_DIR": str(data_dir),
            "CNNSERVE_API_KEYS_FILE": str(keys_file),
        }
        self.keys = (checkpoint, predict_key, train_key)
        self._start()
        return self

    def _start(self) -> None:
        self.api_stack = contextlib.ExitStack()
        log = self.home / "api.log"
        self.api = self.api_stack.enter_context(api_process(self.env, log, self.source))
        self.target = Target(self.api.port, *self.keys)
        warm_up(self.target)
        settle(self.api.pid)
        self.fresh_rss = _status(self.api.pid)["VmRSS"]
        self.probe = self.api_stack.enter_context(HealthProbe(self.api.port, self.args.probe_ms))
        time.sleep(self.args.idle)
        idle = self.probe.between(time.monotonic() - self.args.idle, time.monotonic())
        self.idle = {
            "probes": len(idle),
            "p50_ms": round(statistics.median(idle) * 1000, 2),
            "p99_ms": _ms(idle, 0.99),
            "max_ms": round(max(idle) * 1000, 1),
        }
        self.idles.append(self.idle)
        logger.info("%s: API pid %d up; idle /healthz %s", self.label, self.api.pid, self.idle)

    def alive(self) -> bool:
        try:
            state = Path(f"/proc/{self.api.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return state != "Z"

    def quiet(self, timeout: float = 20.0) -> bool:
        """Whether the API goes back to idle (under a third of a core, the probes included)."""
        tick = os.sysconf("SC_CLK_TCK")

        def cpu_s() -> float:
            fields = Path(f"/proc/{self.api.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / tick

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            before = cpu_s()
            time.sleep(0.5)
            if cpu_s() - before < 0.5 / 3:
                return True
        return False

    def why_restart(self, result: dict[str, Any]) -> str | None:
        """Why the API must start afresh before the next attack (None: it need not)."""
        if result["api_killed_at_cap"]:
            return f"killed past --cap-mib {self.args.cap_mib}"
        if result["api_died"]:
            return "the attack took it down"
        if result["status"].startswith("0") or "/0" in result["status"]:
            return "no answer within --timeout"
        if not self.quiet():
            return "still busy 20 s after the answer"
        retained = (_status(self.api.pid)["VmRSS"] - self.fresh_rss) / 1024
        if retained > RETAINED_LIMIT_MIB:
            return f"holds {retained:.0f} MiB more than when it started (would mask growth)"
        return None

    def restart(self) -> None:
        self.api_stack.close()
        self.restarts += 1
        self._start()

    def __exit__(self, *exc: object) -> None:
        self.api_stack.close()
        self.stack.close()

    def attack(self, attack: Attack) -> dict[str, Any]:
        request = attack.build(self.target)
        time.sleep(self.args.pause)
        watch = MemoryWatch(self.api.pid, self.args.cap_mib * 1024)
        started = time.monotonic()
        outcomes: list[Outcome] = []
        for _ in range(request.repeat):
            outcomes.append(send(self.target.port, request, timeout=self.args.timeout))
        answered = time.monotonic()
        time.sleep(self.args.tail)
        memory = watch.finish()
        samples = self.probe.between(started, time.monotonic())
        died = watch.killed or not self.alive()
        result = {
            "attack": attack.name,
            "what": attack.what,
            "status": "/".join(str(o.status) for o in outcomes),
            "wall_s": round(answered - started, 3),
            **memory,
            **stall(samples, self.idle["p50_ms"]),
            "idle_p50_ms": self.idle["p50_ms"],
            "api_killed_at_cap": watch.killed,
            "api_died": died and not watch.killed,
            **outcomes[-1].extra(),
        }
        result["breaks_goal"] = breaks_goal(result)
        reason = self.why_restart(result)
        if reason:
            logger.warning(
                "%s: after %s the API %s; restarting it", self.label, attack.name, reason
            )
            result["api_restarted_after"] = reason
            self.restart()
        return result


def breaks_goal(result: dict[str, Any]) -> list[str]:
    broken = []
    if result["api_killed_at_cap"] or result["peak_growth_mib"] > MEMORY_GOAL_MIB:
        broken.append("memory")
    if result.get("stall_max_ms", 0) > STALL_GOAL_MS or result.get("probes") == 0:
        broken.append("stall")
    if result["api_died"]:
        broken.append("crash")
    return broken


def measure(
    label: str, source: Path | None, attacks: Sequence[Attack], args: argparse.Namespace, tmp: Path
) -> dict[str, Any]:
    home = tmp / label
    home.mkdir()
    results = []
    with Tree(label, source, home, args) as tree:
        for attack in attacks:
            result = tree.attack(attack)
            logger.info("%s %s", label, json.dumps(result))
            results.append(result)
        idle = {
            "p50_ms": statistics.median(i["p50_ms"] for i in tree.idles),
            "p99_ms": max(i["p99_ms"] for i in tree.idles),
            "max_ms": max(i["max_ms"] for i in tree.idles),
            "probes": sum(i["probes"] for i in tree.idles),
        }
        return {
            "idle_healthz": idle,
            "idle_per_start": tree.idles,
            "results": results,
            "restarts": tree.restarts,
        }


# --- the report -------------------------------------------------------------------------------


def _ratio(after: float | None, before: float | None) -> str:
    if after is None or before is None or before <= 0:
        return "–"
    return f"{after / before:.2g}×"


def _cell(result: dict[str, Any] | None, key: str) -> Any:
    return "–" if result is None else result.get(key, "–")


def markdown(report: dict[str, Any]) -> str:
    runs = report["trees"]
    labels = list(runs)
    by = {label: {r["attack"]: r for r in runs[label]["results"]} for label in labels}
    before = by.get("baseline", {})
    after = by[labels[-1]]
    lines = [
        "| attack | status | wall (s) | peak RSS growth (MiB) | ratio | loop stall max (ms) | "
        "ratio | stall p99 (ms) | over the goal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, now in after.items():
        was = before.get(name)

        def pair(key: str, was: dict[str, Any] | None = was, now: dict[str, Any] = now) -> str:
            return f"{_cell(was, key)} → {_cell(now, key)}" if was else f"{_cell(now, key)}"

        growth = pair("peak_growth_mib") + (" (killed at cap)" if now["api_killed_at_cap"] else "")
        goal = ", ".join(now["breaks_goal"]) or "no"
        if was:
            goal = f"{', '.join(was['breaks_goal']) or 'no'} → {goal}"
        lines.append(
            f"| {name} | {pair('status')} | {pair('wall_s')} | {growth} | "
            f"{_ratio(now['peak_growth_mib'], was and was['peak_growth_mib'])} | "
            f"{pair('stall_max_ms')} | "
            f"{_ratio(now.get('stall_max_ms'), was and was.get('stall_max_ms'))} | "
            f"{pair('stall_p99_ms')} | {goal} |"
        )
    idle = "\n".join(
        f"- {label}: the probe idle, over {len(runs[label]['idle_per_start'])} API start(s): "
        f"p50 {i['p50_ms']} ms (subtracted), worst p99 {i['p99_ms']} ms, max {i['max_ms']} ms"
        for label, i in ((label, runs[label]["idle_healthz"]) for label in labels)
    )
    return "\n".join(lines) + f"\n\n{idle}\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench abuse", description=__doc__)
    parser.add_argument("--baseline", type=Path, help="a tree of an earlier version, first")
    parser.add_argument("--out", type=Path, default=Path("docs/bench-abuse.json"))
    parser.add_argument("--only", nargs="+", metavar="NAME", help="these attacks only")
    parser.add_argument("--probe-ms", type=float, default=5.0, help="/healthz probe interval")
    parser.add_argument("--pause", type=float, default=1.0, help="quiet seconds before each")
    parser.add_argument("--tail", type=float, default=0.3, help="seconds measured after each")
    parser.add_argument("--idle", type=float, default=2.0, help="idle probing per API start")
    parser.add_argument("--timeout", type=float, default=60.0, help="per request (s)")
    parser.add_argument("--cap-mib", type=int, default=2048, help="kill the API past this growth")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    catalogue = {a.name: a for a in ATTACKS}
    unknown = sorted(set(args.only or ()) - set(catalogue))
    if unknown:
        parser.error(f"unknown attacks {unknown}; known: {', '.join(catalogue)}")
    attacks = [a for a in ATTACKS if not args.only or a.name in args.only]
    sources: list[tuple[str, Path | None]] = [("current", None)]
    if args.baseline is not None:
        sources.insert(0, ("baseline", args.baseline.resolve()))
    trees: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="cnnserve-bench-abuse-") as tmp:
        for label, source in sources:
            trees[label] = {
                "source": str(source or "."),
                **measure(label, source, attacks, args, Path(tmp)),
            }
    report = {
        "benchmark": "abuse",
        "machine": machine_info(),
        "goals": {"peak_growth_mib": MEMORY_GOAL_MIB, "stall_max_ms": STALL_GOAL_MS},
        "settings": {k: str(v) for k, v in vars(args).items()},
        "trees": trees,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    sys.stdout.write(markdown(report) + f"\nresults written to {args.out}\n")
    return 0
