"""The HTTP benchmark on a short run: a real server loaded on every path without an error, the
model alone measured in the same rounds, the ratios computed round by round, a table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.integration
def test_a_short_run_loads_every_path_and_compares_them(tmp_path: Path) -> None:
    out = tmp_path / "bench-http.json"
    cmd = [sys.executable, "-m", "bench", "http", "--batching", "on", "--requests", "120"]
    cmd += ["--duration", "4", "--rounds", "2", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    report = json.loads(out.read_text())
    runs = {r["path"]: r for r in report["runs"]}
    assert set(runs) == {"model alone", "v1 png", "v2 uint8", "v2 batch64"}
    for path in ("v1 png", "v2 uint8", "v2 batch64"):
        assert runs[path]["errors"] == 0 and len(runs[path]["rounds_requests_per_s"]) == 2
        assert runs[path]["requests"] > 0 and runs[path]["p99_ms"] > 0
    assert runs["v2 batch64"]["mean_batch_size"] == 64.0
    assert runs["model alone"]["backend"] == "onnxruntime"
    assert len(runs["model alone"]["rounds_images_per_s"]) == 2
    ratios = report["ratios"]["on"]
    for name in ("v2_uint8_over_v1_png_req_per_s", "model_alone_over_v2_batch64_images_per_s"):
        assert len(ratios[name]["per_round"]) == 2 and ratios[name]["median"] > 0
    assert "| on | v2 batch64 | 4 |" in done.stdout and "model alone (onnxruntime" in done.stdout
