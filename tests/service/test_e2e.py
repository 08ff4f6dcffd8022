"""End to end: a real `cnnserve api` (uvicorn) and a real `cnnserve worker` on the real Redis.

Submit a short LeNet job, follow its Server-Sent Events to the end, fetch its curves, then
classify 100 Fashion-MNIST test images uploaded as PNG files and compare the share classified
correctly with the job's own final validation accuracy.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from service.cli.stack import free_port
from tests.http_checks import parse_sse
from tests.service.checkpoint_helpers import fashion_test_set, png
from workers.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

JOB = {
    "model": "lenet",
    "epochs": 2,
    "train_limit": 5000,
    "batch_size": 64,
    # plain SGD on a sigmoid LeNet barely leaves chance in 160 steps; AdamW gets it to ~0.7,
    # which makes "the API classifies as well as the job says" a test with teeth
    "optimizer": "adamw",
    "lr": 0.01,
    "seed": 0,
}
#: The brief: the 100-image accuracy is within a few points of the job's val_acc.
TOLERANCE = 0.05


def _cnnserve() -> list[str]:
    exe = Path(sys.executable).with_name("cnnserve")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "service.cli"]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


@pytest.fixture
def start(tmp_path: Path, settings: Settings) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start `cnnserve <args>` with the test settings; every process is stopped by PID."""
    procs: list[subprocess.Popen[bytes]] = []
    env = {
        **os.environ,
        "CNNSERVE_REDIS_URL": settings.redis_url,
        "CNNSERVE_DATA_DIR": str(settings.data_dir),
        "CNNSERVE_FASHION_MNIST_DIR": str(settings.fashion_mnist_dir),
        "CNNSERVE_TORCH_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }

    def run(*args: str) -> subprocess.Popen[bytes]:
        log = tmp_path / f"{args[0]}-{len(procs)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [*_cnnserve(), *args],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc.log_path = log  # type: ignore[attr-defined]
        procs.append(proc)
        return proc

    yield run
    for p in procs:
        _stop(p)


def _log(proc: subprocess.Popen[bytes]) -> str:
    path: Path = proc.log_path  # type: ignore[attr-defined]
    return path.read_text(errors="replace")[-4000:]


def _wait_ready(url: str, api: subprocess.Popen[bytes], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if api.poll() is not None:
            pytest.fail(f"cnnserve api exited:\n{_log(api)}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    pytest.fail(f"{url}/readyz never answered 200 (no worker seen?):\n{_log(api)}")


def _follow(url: str, job_id: str, timeout: float) -> list[tuple[str, dict[str, Any]]]:
    """The job's SSE events from the start to the stream's end."""
    events: list[tuple[str, dict[str, Any]]] = []
    with httpx.stream(
        "GET",
        f"{url}/v1/jobs/{job_id}/events",
        timeout=httpx.Timeout(timeout, connect=5),
        headers={"Accept": "text/event-stream"},
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events.extend((kind, data) for _id, kind, data in parse_sse(r.iter_lines()))
    return events


def test_train_follow_and_classify_with_real_processes(
    start: Callable[..., subprocess.Popen[bytes]],
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    worker = start("worker", "--device", "cpu", "--name", f"e2e-{os.getpid()}@localhost")
    api = start("api", "--host", "127.0.0.1", "--port", str(port))
    _wait_ready(url, api)

    r = httpx.post(f"{url}/v1/jobs", json=JOB, timeout=10)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert r.headers["location"].endswith(f"/v1/jobs/{job_id}")

    events = _follow(url, job_id, timeout=600)
    kinds = [k for k, _ in events]
    assert "epoch" in kinds and "progress" in kinds, (kinds, _log(worker))
    final = events[-1]
    assert final[0] == "status" and final[1]["status"] == "succeeded", (final, _log(worker))
    epochs = [d for k, d in events if k == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2]

    job = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()
    assert job["status"] == "succeeded" and len(job["metrics"]) == 2
    val_acc = job["metrics"][-1]["val_acc"]
    assert val_acc == pytest.approx(epochs[-1]["val_acc"])

    curves = httpx.get(f"{url}/v1/jobs/{job_id}/curves.png", timeout=30)
    assert curves.status_code == 200 and curves.headers["content-type"] == "image/png"
    plot = Image.open(io.BytesIO(curves.content))
    assert plot.format == "PNG" and plot.width > 200 and plot.height > 150

    manifest = httpx.get(f"{url}/v1/checkpoints/{job_id}:latest", timeout=10).json()
    assert manifest["epoch"] == 2 and manifest["metrics"]["val_acc"] == pytest.approx(val_acc)

    images, labels = fashion_test_set()
    predicted: list[int] = []
    for start_at in range(0, 100, 25):  # several multipart requests
        files = [
            ("files", (f"test-{i}.png", png(images[i]), "image/png"))
            for i in range(start_at, start_at + 25)
        ]
        r = httpx.post(
            f"{url}/v1/checkpoints/{job_id}:latest/predict?top_k=3", files=files, timeout=60
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["checkpoint"] == manifest["id"]
        predicted += [p["class_id"] for p in body["predictions"]]
    accuracy = float((np.array(predicted) == labels[:100]).mean())
    assert abs(accuracy - val_acc) <= TOLERANCE, (
        f"the API classified {accuracy:.2f} of 100 test images correctly; the job reported "
        f"val_acc {val_acc:.3f}"
    )
    # the server is still healthy and the worker still alive
    assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
    assert worker.poll() is None
