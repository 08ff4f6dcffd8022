"""The abuse benchmark on two cheap attacks against this tree: each answered and measured (peak
memory growth, the event loop's stall from the probes), a JSON report and a table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.abuse_attacks import ATTACKS

ROOT = Path(__file__).resolve().parents[2]
CHEAP = ("v2-shape-overflow", "v2-expect-100-nokey")


@pytest.mark.slow
@pytest.mark.integration
def test_two_cheap_attacks_are_answered_and_measured(tmp_path: Path) -> None:
    assert set(CHEAP) <= {a.name for a in ATTACKS}
    out = tmp_path / "bench-abuse.json"
    cmd = [sys.executable, "-m", "bench", "abuse", "--only", *CHEAP, "--out", str(out)]
    cmd += ["--pause", "0.2", "--idle", "0.5", "--tail", "0.1"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]

    report = json.loads(out.read_text())
    tree = report["trees"]["current"]
    assert tree["idle_healthz"]["probes"] > 0 and tree["restarts"] == 0
    results = {r["attack"]: r for r in tree["results"]}
    assert set(results) == set(CHEAP)
    for r in results.values():
        assert r["status"].isdigit() and int(r["status"]) >= 400, r
        assert r["memory_method"] in ("clear_refs", "VmRSS sampled every 2 ms")
        assert r["peak_growth_mib"] >= 0 and r["probes"] > 0 and r["stall_max_ms"] >= 0
        assert isinstance(r["breaks_goal"], list)
    assert results["v2-expect-100-nokey"]["status"] == "401"
    assert "sent_100_continue" in results["v2-expect-100-nokey"]
    assert "| v2-expect-100-nokey | 401 |" in done.stdout
