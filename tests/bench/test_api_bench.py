"""The API benchmark on two small histories: every operation answered, goals computed, a table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.api import OPS

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_a_small_run_times_every_operation_at_every_size(tmp_path: Path) -> None:
    out = tmp_path / "bench-api.json"
    cmd = [sys.executable, "-m", "bench", "api", "--sizes", "10,200", "--reps", "3"]
    cmd += ["--scan-reps", "2", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    report = json.loads(out.read_text())
    sizes = report["results"]["current"]["sizes"]
    assert set(sizes) == {"10", "200"}
    for size in sizes.values():
        for op in (*OPS, "orphan_scan"):
            timing = size["ops"][op]
            assert timing["n"] >= 2 and timing["p50_ms"] > 0, (op, timing)
            assert timing.get("errors", []) == [], (op, timing)
    goals = report["results"]["current"]["goals"]
    assert set(goals["growth_p50_largest_over_smallest"]) == {*OPS, "orphan_scan"}
    assert goals["orphan_scan_p50_ms_at_largest"] > 0
    assert "| list_by_status |" in done.stdout and "200 jobs (current)" in done.stdout
