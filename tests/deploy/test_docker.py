"""`docker compose up` for real: the project's Dockerfile built and the default compose file run
on a real Docker engine, checked as a user would.

What stands in for what cannot be had here (`tests/deploy/docker_images.py`): the official base
images (Docker Hub is out of reach) are Debian bookworm images made with debootstrap, and pip
installs from a wheelhouse served on 127.0.0.1. Everything else is real: the engine, Compose v1
(Debian's docker-compose 1.29; the file is kept to what v2 reads too), the image, the containers,
their volumes and network. The stack runs under a compose project name of its own, its ports are
published on 127.0.0.1 only and all test traffic goes to them, and `down -v` removes it at the
end, also when a test fails.

`make test` installs Debian's docker.io, docker-compose and debootstrap and starts an engine when
none answers (`tests/deploy/dockerd.sh`); run by hand without an engine, these tests skip unless
CNNSERVE_DOCKER_TESTS=require (as `make test` sets it), where they fail instead.
"""

from __future__ import annotations

import gzip
import io
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import FASHION_MNIST_DIR
from tests.deploy import docker_images
from tests.http_checks import parse_sse

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
REQUIRED = os.environ.get("CNNSERVE_DOCKER_TESTS") == "require"
#: Jobs in the container train on the CPU with one torch thread: the machine has two cores.
LENET = {"model": "lenet", "optimizer": "adamw", "lr": 0.01, "device": "auto"}


def _unavailable(why: str) -> None:
    if REQUIRED:
        pytest.fail(f"the Docker tests are required here, but {why}")
    pytest.skip(why)


def _engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    done = subprocess.run(
        ["docker", "version", "--format", "{{.Server.Version}}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return done.returncode == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Compose:
    """`docker-compose` over the repository's default compose file, for one project."""

    project: str
    env_file: Path
    api: str
    flower: str
    api_key: str
    flower_login: tuple[str, str]
    log_dir: Path

    def run(
        self, *args: str, timeout: float = 300, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        cmd = ["docker-compose", "--project-name", self.project, "--project-directory",
               str(ROOT), "--env-file", str(self.env_file), "-f", str(COMPOSE), *args]  # fmt: skip
        # only what the engine needs: no CNNSERVE_* of the calling shell overrides the .env file
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "DOCKER_HOST")}
        done = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"docker-compose {' '.join(args)} failed ({done.returncode}):\n"
                f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}\n{self.logs()}"
            )
        return done

    def container(self, service: str) -> str:
        ids = self.run("ps", "-q", service).stdout.split()
        assert len(ids) == 1, f"{service}: containers {ids}"
        return ids[0]

    def logs(self) -> str:
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "DOCKER_HOST")}
        done = subprocess.run(
            ["docker-compose", "--project-name", self.project, "--project-directory", str(ROOT),
             "--env-file", str(self.env_file), "-f", str(COMPOSE), "logs", "--tail", "40"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        return done.stdout[-6000:]

    def wait_healthy(self, *services: str, timeout: float = 240) -> None:
        """Every container of `services` running and healthy; fail with the logs if not."""
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            for service in services:
                cid = self.container(service)
                states[service] = docker_images.docker(
                    "inspect", "--format", "{{.State.Status}} {{.State.Health.Status}}", cid
                ).stdout.strip()
            if all(s == "running healthy" for s in states.values()):
                return
            time.sleep(2)
        raise AssertionError(f"not healthy within {timeout} s: {states}\n{self.logs()}")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Compose]:
    """The images built (or found cached), a `.env` of the test's own, and `down -v` at the end."""
    if shutil.which("docker-compose") is None:
        _unavailable("docker-compose is not installed (Debian's docker-compose)")
    if not _engine_answers():
        _unavailable("no Docker engine answers (tests/deploy/dockerd.sh start)")
    tmp = tmp_path_factory.mktemp("compose")
    images = docker_images.ensure_images(log_dir=tmp)
    key = f"e2e-{secrets.token_hex(12)}"
    login = ("ops", secrets.token_hex(8))
    api_port, flower_port = _free_port(), _free_port()
    env_file = tmp / ".env"
    env_file.write_text(
        "\n".join(
            [
                f"CNNSERVE_IMAGE={images.cnnserve}",
                f"CNNSERVE_REDIS_IMAGE={images.redis}",
                f"CNNSERVE_FLOWER_IMAGE={images.flower}",
                f"CNNSERVE_PORT=127.0.0.1:{api_port}",
                f"FLOWER_PORT=127.0.0.1:{flower_port}",
                f"FLOWER_BASIC_AUTH={login[0]}:{login[1]}",
                # settings that reach the containers from .env
                f"CNNSERVE_API_KEYS={key}",
                "CNNSERVE_LEASE_SECONDS=4",
                "CNNSERVE_TORCH_THREADS=1",
            ]
        )
        + "\n"
    )
    stack = Compose(
        project=f"cnnserve-e2e-{os.getpid()}",
        env_file=env_file,
        api=f"http://127.0.0.1:{api_port}",
        flower=f"http://127.0.0.1:{flower_port}",
        api_key=key,
        flower_login=login,
        log_dir=tmp,
    )
    (tmp / "build-seconds.txt").write_text(f"{images.build_seconds:.1f}\n")
    try:
        yield stack
    finally:
        stack.run("--profile", "monitoring", "down", "-v", "--remove-orphans", check=False)
        docker_images.prune()


def _project_objects(project: str) -> dict[str, list[str]]:
    label = f"label=com.docker.compose.project={project}"
    return {
        kind: docker_images.docker(*cmd, "--filter", label, "-q").stdout.split()
        for kind, cmd in (
            ("containers", ("ps", "-a")),
            ("volumes", ("volume", "ls")),
            ("networks", ("network", "ls")),
        )
    }


def _trouser_png() -> bytes:
    """The third Fashion-MNIST test image (a pair of trousers), as a PNG."""
    with gzip.open(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz") as f:
        raw = f.read()
    image = Image.frombytes("L", (28, 28), raw[16 + 2 * 784 : 16 + 3 * 784])
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _submit(stack: Compose, spec: dict[str, Any]) -> str:
    r = httpx.post(f"{stack.api}/v1/jobs", json=spec, headers=stack.headers(), timeout=30)
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def _job(stack: Compose, job_id: str) -> dict[str, Any]:
    r = httpx.get(f"{stack.api}/v1/jobs/{job_id}", headers=stack.headers(), timeout=30)
    assert r.status_code == 200, r.text
    return dict(r.json())


def _wait_job(stack: Compose, job_id: str, until: Any, timeout: float, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = _job(stack, job_id)
        if until(job):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {job}\n{stack.logs()}")
        time.sleep(1)


def test_the_default_stack_comes_up_and_a_lenet_job_trains_and_serves(compose: Compose) -> None:
    compose.run("up", "-d", timeout=600)
    compose.wait_healthy("redis", "api", "worker")
    # Redis, the API and one worker, no more: Flower is in a profile
    assert sorted(compose.run("ps", "--services", "--filter", "status=running").stdout.split()) == [
        "api",
        "redis",
        "worker",
    ]
    # published on 127.0.0.1 only
    port = docker_images.docker("port", compose.container("api"), "8000").stdout.split()
    assert port and all(p.startswith("127.0.0.1:") for p in port), port

    assert httpx.get(f"{compose.api}/readyz", timeout=30).json() == {"status": "ready"}
    # what the checks found, workers and their devices included, is for a key's eyes
    ready = httpx.get(f"{compose.api}/readyz", headers=compose.headers(), timeout=30)
    assert ready.status_code == 200, ready.text
    (worker,) = ready.json()["workers"]
    assert worker["device"] == "cpu"  # no GPU here: the default worker trains on the CPU

    # keys from .env are enforced
    assert httpx.get(f"{compose.api}/v1/jobs", timeout=30).status_code == 401
    bad = {"Authorization": "Bearer wrong"}
    assert httpx.get(f"{compose.api}/v1/jobs", headers=bad, timeout=30).status_code == 401

    job_id = _submit(compose, {**LENET, "epochs": 2, "train_limit": 1024})
    with httpx.stream(
        "GET",
        f"{compose.api}/v1/jobs/{job_id}/events",
        headers=compose.headers(),
        timeout=httpx.Timeout(240, connect=10),
    ) as stream:
        assert stream.status_code == 200
        events = list(parse_sse(stream.iter_lines()))
    statuses = [data["status"] for _, kind, data in events if kind == "status"]
    assert statuses[0] == "queued" and statuses[-1] == "succeeded", statuses
    assert [data["epoch"] for _, kind, data in events if kind == "epoch"] == [1, 2]

    job = _job(compose, job_id)
    assert job["device"] == "cpu" and job["worker"] == worker["name"]
    # the checkpoints lie on the fresh volume, written by the image's non-root user
    listing = docker_images.docker(
        "exec", compose.container("api"), "sh", "-c",
        f"id -u && ls -ln /data/checkpoints/{job_id}* | head -n 5",
    ).stdout  # fmt: skip
    assert listing.splitlines()[0] == "10001", listing
    assert " 10001 10001 " in listing, listing

    # the API container serves the worker's checkpoint: /v1 predict and /v2 infer
    files = {"files": ("trouser.png", _trouser_png(), "image/png")}
    r = httpx.post(
        f"{compose.api}/v1/checkpoints/{job_id}:best/predict?top_k=3",
        files=files,
        headers=compose.headers(),
        timeout=60,
    )
    assert r.status_code == 200, r.text
    (prediction,) = r.json()["predictions"]
    assert len(prediction["top_k"]) == 3 and 0 < prediction["probability"] <= 1
    pixels = Image.open(io.BytesIO(_trouser_png())).tobytes()
    infer = {"inputs": [{"name": "image", "shape": [1, 28, 28], "datatype": "UINT8",
                         "data": list(pixels)}]}  # fmt: skip
    r = httpx.post(
        f"{compose.api}/v2/models/{job_id}/infer", json=infer, headers=compose.headers(), timeout=60
    )
    assert r.status_code == 200, r.text
    (probabilities,) = (o for o in r.json()["outputs"] if o["name"] == "probabilities")
    assert probabilities["shape"] == [1, 10]
    assert abs(sum(probabilities["data"]) - 1) < 1e-3


def test_a_worker_killed_mid_job_resumes_and_trains_each_epoch_once(compose: Compose) -> None:
    job_id = _submit(compose, {**LENET, "epochs": 5, "train_limit": 4096})
    _wait_job(
        compose,
        job_id,
        lambda j: j["status"] == "running" and j["latest_checkpoint"],
        240,
        "the first checkpoint",
    )
    docker_images.docker("kill", "--signal", "KILL", compose.container("worker"))
    killed = _job(compose, job_id)
    assert killed["status"] == "running" and len(killed["metrics"]) < 5, killed

    compose.run("up", "-d")  # the worker comes back; the job's lease has run out
    job = _wait_job(compose, job_id, lambda j: j["status"] == "succeeded", 300, "the resumed job")
    assert [m["epoch"] for m in job["metrics"]] == [1, 2, 3, 4, 5]
    assert job["attempts"] == 2
    events = httpx.get(
        f"{compose.api}/v1/jobs/{job_id}/events",
        headers={**compose.headers(), "Accept": "text/event-stream"},
        timeout=60,
    )
    parsed = list(parse_sse(events.text.splitlines()))
    epochs = [data["epoch"] for _, kind, data in parsed if kind == "epoch"]
    assert sorted(epochs) == [1, 2, 3, 4, 5], epochs  # each epoch trained (and sent) once
    requeued = [d for _, kind, d in parsed if kind == "status" and d["status"] == "queued"]
    assert len(requeued) == 2 and "stopped mid-job" in requeued[1]["reason"], requeued


def test_down_and_up_keep_jobs_and_checkpoints(compose: Compose) -> None:
    jobs = httpx.get(f"{compose.api}/v1/jobs", headers=compose.headers(), timeout=30).json()
    before = {j["id"]: j["status"] for j in jobs["jobs"]}
    assert len(before) == 2 and set(before.values()) == {"succeeded"}

    compose.run("down")
    compose.run("up", "-d")
    compose.wait_healthy("redis", "api", "worker")

    jobs = httpx.get(f"{compose.api}/v1/jobs", headers=compose.headers(), timeout=30).json()
    assert {j["id"]: j["status"] for j in jobs["jobs"]} == before
    for job_id in before:
        r = httpx.post(
            f"{compose.api}/v1/checkpoints/{job_id}:latest/predict",
            files={"files": ("t.png", _trouser_png(), "image/png")},
            headers=compose.headers(),
            timeout=60,
        )
        assert r.status_code == 200, r.text


def test_flower_answers_with_its_login_on_loopback_only(compose: Compose) -> None:
    # without a login it does not start, and says what to set
    refused = compose.run(
        "--profile", "monitoring", "run", "--rm", "--no-deps", "-e", "FLOWER_BASIC_AUTH=",
        "flower", check=False,
    )  # fmt: skip
    assert refused.returncode == 64
    assert "set FLOWER_BASIC_AUTH=user:password" in refused.stdout + refused.stderr

    compose.run("--profile", "monitoring", "up", "-d", "flower")
    deadline = time.monotonic() + 90
    while True:
        try:
            anonymous = httpx.get(f"{compose.flower}/", timeout=10)
            break
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise AssertionError(f"Flower did not answer\n{compose.logs()}") from None
            time.sleep(1)
    port = docker_images.docker("port", compose.container("flower"), "5555").stdout.split()
    assert port and all(p.startswith("127.0.0.1:") for p in port), port
    assert anonymous.status_code == 401
    assert httpx.get(f"{compose.flower}/", auth=("ops", "wrong"), timeout=10).status_code == 401
    # with the login: the Celery worker of this stack, as Flower sees it
    worker = _job_worker(compose)
    while True:
        seen = httpx.get(
            f"{compose.flower}/api/workers?refresh=1", auth=compose.flower_login, timeout=30
        )
        assert seen.status_code == 200, seen.text
        if worker in seen.json():
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"Flower does not list {worker}: {seen.text[:500]}")
        time.sleep(2)


def _job_worker(compose: Compose) -> str:
    ready = httpx.get(f"{compose.api}/readyz", headers=compose.headers(), timeout=30)
    (worker,) = ready.json()["workers"]
    return str(worker["name"])


def test_down_v_removes_everything(compose: Compose) -> None:
    assert any(_project_objects(compose.project).values())
    compose.run("--profile", "monitoring", "down", "-v", "--remove-orphans")
    assert _project_objects(compose.project) == {"containers": [], "volumes": [], "networks": []}
