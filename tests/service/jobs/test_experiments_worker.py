"""Experiments end to end: a real API process, a real worker, real Fashion-MNIST."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.service.checkpoint_helpers import JOB_A, lenet, save
from tests.service.conftest import Server
from tests.workers.helpers import WorkerProcess
from workers.settings import Settings
from workers.store.checkpoints import CheckpointStore

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[3]
TINY = {"model": "lenet", "epochs": 1, "train_limit": 512, "batch_size": 64, "device": "cpu"}


@dataclass
class Stack:
    api: httpx.Client
    url: str
    worker: WorkerProcess


@pytest.fixture
def stack(
    uvicorn_server: Callable[..., Server], start_worker: Callable[..., WorkerProcess]
) -> Iterator[Stack]:
    server = uvicorn_server()
    worker = start_worker()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield Stack(client, server.url, worker)


def wait(stack: Stack, path: str, done: Callable[[dict[str, Any]], bool], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        body = stack.api.get(path).json()
        if done(body):
            return body
        assert time.monotonic() < deadline, f"{path}: {body}\n{stack.worker.log()[-3000:]}"
        time.sleep(0.3)


def test_a_grid_sweep_runs_to_the_end_ranked_and_plotted(stack: Stack, tmp_path: Path) -> None:
    # AdamW at 0.01 learns in two epochs of 3,000 images; plain SGD at 0.001 stays near chance
    base = {**TINY, "epochs": 2, "train_limit": 3000, "batch_size": 32}
    r = stack.api.post(
        "/v1/sweeps",
        json={"base": base, "grid": {"lr": [0.001, 0.01], "optimizer": ["sgd", "adamw"]}},
    )
    assert r.status_code == 202, r.text
    sweep_id = r.json()["id"]
    final = wait(
        stack, f"/v1/sweeps/{sweep_id}", lambda s: s["status"] in ("succeeded", "failed"), 180
    )
    assert final["status"] == "succeeded", final
    accs = [j["best_val_acc"] for j in final["jobs"]]
    assert accs == sorted(accs, reverse=True) and all(a is not None for a in accs)
    assert final["jobs"][0]["point"] == {"lr": 0.01, "optimizer": "adamw"}, final["jobs"]
    assert accs[0] > 0.5
    assert all(j["epochs_done"] == 2 and j["seconds_per_epoch"] > 0 for j in final["jobs"])
    plot = stack.api.get(f"/v1/jobs/compare.png?sweep={sweep_id}&metric=val_acc")
    assert plot.status_code == 200
    (tmp_path / "sweep-compare.png").write_bytes(plot.content)
    assert Image.open(io.BytesIO(plot.content)).size == (640, 400)
    best = final["jobs"][0]["best_checkpoint"]
    heatmap = stack.api.get(f"/v1/checkpoints/{best}/confusion.png")
    assert heatmap.status_code == 200 and Image.open(io.BytesIO(heatmap.content)).size == (720, 640)
    evaluation = stack.api.get(f"/v1/checkpoints/{best}/evaluation").json()
    assert evaluation["images"] == 10_000
    assert evaluation["accuracy"] == pytest.approx(final["jobs"][0]["best_val_acc"])


def test_cancelling_a_sweep_stops_its_running_job_and_never_starts_the_rest(stack: Stack) -> None:
    long = {**TINY, "epochs": 20, "train_limit": 20_000}
    sweep = stack.api.post("/v1/sweeps", json={"base": long, "grid": {"seed": [1, 2, 3]}}).json()
    path = f"/v1/sweeps/{sweep['id']}"
    wait(stack, path, lambda s: s["counts"]["running"] == 1, 60)
    asked = time.monotonic()
    assert stack.api.post(f"{path}/cancel").status_code == 202
    final = wait(
        stack, path, lambda s: s["status"] == "cancelled" and s["counts"]["running"] == 0, 30
    )
    assert time.monotonic() - asked < 15
    records = [stack.api.get(f"/v1/jobs/{j['id']}").json() for j in final["jobs"]]
    assert sorted(r["attempts"] for r in records) == [0, 0, 1]  # the queued never started
    assert {r["status"] for r in records} == {"cancelled"}


def test_a_fine_tune_starts_where_its_parent_ended_and_evaluate_fills_in_old_checkpoints(
    stack: Stack, settings: Settings
) -> None:
    parent = stack.api.post(
        "/v1/jobs",
        json={**TINY, "epochs": 2, "train_limit": 3000, "optimizer": "adamw", "lr": 0.01},
    ).json()
    done = wait(
        stack, f"/v1/jobs/{parent['id']}", lambda j: j["status"] in ("succeeded", "failed"), 120
    )
    assert done["status"] == "succeeded", done
    parent_acc = done["metrics"][-1]["val_acc"]
    assert parent_acc > 0.5

    child = stack.api.post(
        "/v1/jobs",
        json={**TINY, "lr": 1e-5, "init_from": f"{parent['id']}:latest", "continue_epochs": True},
    )
    assert child.status_code == 202, child.text
    done = wait(
        stack,
        f"/v1/jobs/{child.json()['id']}",
        lambda j: j["status"] in ("succeeded", "failed"),
        120,
    )
    assert done["status"] == "succeeded", done
    (first,) = done["metrics"]
    assert first["epoch"] == 3  # numbered after the parent's two
    assert first["val_acc"] == pytest.approx(parent_acc, abs=0.03)  # not back at chance (0.1)
    manifest = stack.api.get(f"/v1/checkpoints/{done['latest_checkpoint']}").json()
    assert manifest["parent"] == done["parent_checkpoint"] == f"{parent['id']}-e002"

    old = save(CheckpointStore.from_settings(settings), lenet(), job_id=JOB_A)  # no matrix
    assert stack.api.get(f"/v1/checkpoints/{old.id}/evaluation").status_code == 404
    queued = stack.api.post(f"/v1/checkpoints/{old.id}/evaluate", json={"limit": 2000})
    record = wait(
        stack, queued.headers["location"], lambda e: e["status"] in ("succeeded", "failed"), 60
    )
    assert record["status"] == "succeeded" and record["images"] == 2000, record
    evaluation = stack.api.get(f"/v1/checkpoints/{old.id}/evaluation").json()
    assert evaluation["source"] == "evaluate" and evaluation["images"] == 2000
    assert evaluation["accuracy"] == pytest.approx(record["accuracy"])


def test_the_sweep_command_shows_the_leaderboard_until_the_sweep_ends(stack: Stack) -> None:
    cmd = [
        sys.executable,
        "-m",
        "service.cli",
        "--log-level",
        "WARNING",
        "sweep",
        "--api",
        stack.url,
    ]
    cmd += ["--base", '{"model": "lenet", "epochs": 1, "train_limit": 512, "device": "cpu"}']
    cmd += ["--grid", "lr=0.05,0.5"]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=180, cwd=ROOT, env=dict(os.environ)
    )
    assert done.returncode == 0, done.stderr + done.stdout
    tables = done.stdout.split("\n\n")
    last = [t for t in tables if t.startswith("sweep ")][-1]
    assert ": succeeded" in last.splitlines()[0]
    rows = [line.split() for line in last.splitlines()[2:]]
    assert len(rows) == 2 and [r[0] for r in rows] == ["1", "2"]
    accs = [float(r[4]) for r in rows]
    assert accs == sorted(accs, reverse=True)
    bad_cmd = [*cmd[:-2], "--grid", "lr=20"]
    bad = subprocess.run(bad_cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert bad.returncode == 2 and "less than or equal to 10" in bad.stderr
