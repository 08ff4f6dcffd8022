"""The training benchmark: both ways run, a report with a ratio, the doc and the plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bench.train import merge_reports, per_model, update_doc
from tests.conftest import FASHION_MNIST_DIR

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_tiny_run_reports_both_ways_and_a_ratio(tmp_path: Path) -> None:
    out = tmp_path / "docs" / "bench-train-tiny.json"
    doc = tmp_path / "docs" / "benchmarks.md"
    doc.parent.mkdir()
    doc.write_text("# Benchmarks\n\n## Inference\n\nkept as it is\n")
    cmd = [
        sys.executable,
        "-m",
        "bench",
        "train",
        "--device",
        "cpu",
        "--models",
        "lenet,nin",
        "--epochs",
        "2",
        "--d2l-epochs",  # the d2l way is timed on fewer epochs than cnnserve trains
        "1",
        "--train-limit",
        "lenet=512,nin=64",
        "--val-limit",
        "lenet=1000,nin=64",
        "--input-size",  # NiN at its smallest size instead of the book's 224
        "nin=67",
        "--threads",
        "1",
        "--loader-workers",
        "2",
        "--fashion-mnist-dir",
        str(FASHION_MNIST_DIR),
        "--out",
        str(out),
        "--doc",
        str(doc),
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]

    report = json.loads(out.read_text())
    assert report["benchmark"] == "training"
    assert report["machine"]["cores"] >= 1 and report["machine"]["torch"]
    result, book = report["results"]
    assert (book["model"], book["input_size"], book["train_images"]) == ("nin", 67, 64)
    assert book["d2l"]["median_epoch_s"] > 0 and book["cnnserve"]["median_epoch_s"] > 0
    assert result["model"] == "lenet" and result["train_images"] == 512
    assert result["val_images"] == 1000
    for way, epochs in (("d2l", 1), ("cnnserve", 2)):
        summary = result[way]
        assert summary["median_epoch_s"] > 0 and summary["images_per_s"] > 0
        assert 0.0 <= summary["val_acc"] <= 1.0
        assert summary["epochs"] == epochs and summary["seeds"] == [0]
        assert len(result["runs"][way]) == 1
        assert len(result["runs"][way][0]["epoch_s"]) == epochs
    assert result["val_acc_delta"] is None  # 1 epoch against 2: not comparable
    assert result["cnnserve"]["cuda_graph"] is False  # no CUDA graph on the CPU
    ratio = result["d2l"]["median_epoch_s"] / result["cnnserve"]["median_epoch_s"]
    assert result["speedup"] == pytest.approx(ratio, rel=0.01)

    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = doc.read_text()
    assert "## Inference\n\nkept as it is" in text  # the others' sections stay
    assert "<!-- bench-train:bench-train-tiny:start -->" in text
    assert "| lenet (28px) | 512 / 1000 | 1 × 1; 2 × 1 |" in text
    assert "| nin (67px) | 64 / 64 | 1 × 1; 2 × 1 |" in text
    assert "(bench-train-tiny.png)" in text


def test_per_model_values() -> None:
    models = ["lenet", "vgg", "resnet18"]
    assert per_model("2", models, "--epochs") == {"lenet": 2, "vgg": 2, "resnet18": 2}
    assert per_model("all", models, "--train-limit") == dict.fromkeys(models)
    assert per_model("vgg=1024,resnet18=512", models, "--train-limit") == {
        "lenet": None,
        "vgg": 1024,
        "resnet18": 512,
    }
    with pytest.raises(ValueError, match="not among --models"):
        per_model("mobilenet=3", models, "--epochs")


def test_doc_update_replaces_only_its_block(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Training\n\nprose\n\n## HTTP\n\ntheirs\n")
    update_doc(doc, "bench-train-cpu", "table one")
    update_doc(doc, "bench-train-cuda", "gpu table")
    update_doc(doc, "bench-train-cpu", "table two")
    text = doc.read_text()
    assert text.count("table") == 2 and "table two" in text and "table one" not in text
    assert text.index("prose") < text.index("table two") < text.index("gpu table")
    assert text.index("gpu table") < text.index("## HTTP") and text.endswith("theirs\n")


def test_reports_of_one_machine_merge_into_one_table() -> None:
    def report(device: str, model: str) -> dict[str, Any]:
        return {"device": device, "command": f"bench {model}", "results": [{"model": model}]}

    merged = merge_reports([report("cuda:0", "lenet"), report("cuda:0", "vgg")])
    assert [r["model"] for r in merged["results"]] == ["lenet", "vgg"]
    assert merged["command"] == "bench lenet; bench vgg"
    with pytest.raises(SystemExit, match="different devices"):
        merge_reports([report("cuda:0", "lenet"), report("cpu", "vgg")])


@pytest.mark.slow
def test_a_window_run_writes_its_report_after_every_run_and_says_why_no_graph(
    tmp_path: Path,
) -> None:
    """The GPU window's runs: no d2l way, the engine with and without its CUDA graph; the report
    is on disk after each run, not only at the end (a window may be cut short)."""
    out = tmp_path / "lenet.json"
    cmd = [sys.executable, "-m", "bench", "train", "--device", "cpu", "--models", "lenet",
           "--ways", "cnnserve,cnnserve-eager", "--epochs", "1", "--seeds", "0",
           "--train-limit", "256", "--val-limit", "500", "--threads", "1",
           "--fashion-mnist-dir", str(FASHION_MNIST_DIR), "--out", str(out),
           "--no-doc", "--no-plot"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    snapshots: list[dict[str, Any]] = []
    seen = 0.0
    while proc.poll() is None:
        if out.exists() and out.stat().st_mtime != seen:
            seen = out.stat().st_mtime
            snapshots.append(json.loads(out.read_text()))
        time.sleep(0.05)
    assert proc.returncode == 0, proc.stderr.read()[-3000:] if proc.stderr else ""

    report = json.loads(out.read_text())
    assert report["complete"] is True and report["ways"] == ["cnnserve", "cnnserve-eager"]
    (result,) = report["results"]
    assert "d2l" not in result and result["speedup"] is None
    assert result["graph_speedup"] > 0
    assert result["cnnserve"]["cuda_graph_notes"] == ["not applicable: not a CUDA device"]
    assert result["cnnserve-eager"]["cuda_graph_notes"] == ["off (eager steps asked for)"]
    # a partial report was on disk while the model's second run trained
    partial = [s for s in snapshots if not s["complete"] and "running" in s]
    assert partial and any(len(s["running"]["runs"]["cnnserve"]) == 1 for s in partial), [
        s.get("running") for s in snapshots
    ]
