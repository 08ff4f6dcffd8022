"""docker-compose.yml is valid and wires a durable Redis, the API, a worker and Flower; the GPU
override gives the worker a GPU. (tests/deploy/test_docker.py runs it on a real engine.)"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from workers.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
GPU_OVERRIDE = ROOT / "docker-compose.gpu.yml"
NO_COMPOSE = "docker-compose is not installed (Debian's docker-compose; `make test` installs it)"


def compose_config(
    *files: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`docker-compose config` over the given files, as Debian's docker-compose validates them."""
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip(NO_COMPOSE)
    args = [binary, "--project-directory", str(ROOT)]
    for f in files:
        args += ["-f", str(f)]
    return subprocess.run(
        [*args, "config"], cwd=ROOT, capture_output=True, text=True, check=False, env=env
    )


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    """The compose file as the engine sees it: anchors merged, variables interpolated."""
    result = compose_config(COMPOSE)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_docker_compose_config_is_valid() -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip(NO_COMPOSE)
    result = subprocess.run(
        [binary, "-f", str(COMPOSE), "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr, result.stderr


def test_redis_is_durable_and_health_checked(config: dict[str, Any]) -> None:
    redis = config["services"]["redis"]
    assert redis["image"].startswith("redis:7")
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert "--appendfsync everysec" in command
    assert "--maxmemory-policy noeviction" in command
    assert any(v.startswith("redis-data:/data") for v in redis["volumes"])
    assert "redis-cli" in redis["healthcheck"]["test"]
    assert "ping" in redis["healthcheck"]["test"]
    assert "redis-data" in config["volumes"]


def test_api_waits_for_a_healthy_redis_and_publishes_8000(config: dict[str, Any]) -> None:
    api = config["services"]["api"]
    assert api["command"] == ["cnnserve", "api", "--host", "0.0.0.0"]
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert any(
        str(p.get("target")) == "8000" and str(p.get("published")) == "8000" for p in api["ports"]
    )
    assert api["environment"]["CNNSERVE_REDIS_URL"] == "redis://redis:6379/0"


def test_the_default_worker_needs_no_gpu_and_scales(config: dict[str, Any]) -> None:
    """`docker compose up` works on a machine without the NVIDIA toolkit: no GPU reservation."""
    worker = config["services"]["worker"]
    assert worker["command"] == ["cnnserve", "worker", "--device", "auto"]
    assert "deploy" not in worker
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    # `--scale worker=N` needs no fixed name and no published port.
    assert "container_name" not in worker
    assert "ports" not in worker
    # The image's HTTP health check does not fit a worker: its heartbeat is its check.
    assert worker["healthcheck"]["test"] == ["CMD", "cnnserve", "worker", "--check"]


def test_the_gpu_override_gives_the_worker_one_nvidia_gpu() -> None:
    result = compose_config(COMPOSE, GPU_OVERRIDE)
    assert result.returncode == 0, result.stderr
    worker = yaml.safe_load(result.stdout)["services"]["worker"]
    assert worker["command"] == ["cnnserve", "worker", "--device", "cuda"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    # the rest of the worker stays as the default file has it
    assert worker["healthcheck"]["test"] == ["CMD", "cnnserve", "worker", "--check"]
    assert worker["environment"]["CNNSERVE_REDIS_URL"] == "redis://redis:6379/0"


def test_base_images_and_package_indexes_come_from_variables() -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "CNNSERVE_PYTHON_IMAGE": "mirror.example/python:3.11-slim-bookworm",
        "CNNSERVE_REDIS_IMAGE": "mirror.example/redis:7.4-bookworm",
        "CNNSERVE_TORCH_INDEX_URL": "https://download.pytorch.org/whl/cu126",
        "CNNSERVE_PIP_INDEX_URL": "https://pypi.mirror.example/simple",
        "CNNSERVE_PIP_FIND_LINKS": "http://wheels.example/",
        "CNNSERVE_PORT": "127.0.0.1:8123",
    }
    result = compose_config(COMPOSE, env=env)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    args = services["api"]["build"]["args"]
    assert args["PYTHON_IMAGE"] == "mirror.example/python:3.11-slim-bookworm"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cu126"
    assert args["PIP_INDEX_URL"] == "https://pypi.mirror.example/simple"
    assert args["PIP_FIND_LINKS"] == "http://wheels.example/"
    assert services["redis"]["image"] == "mirror.example/redis:7.4-bookworm"
    assert services["api"]["ports"] == ["127.0.0.1:8123:8000/tcp"]


def test_the_defaults_are_the_official_images(config: dict[str, Any]) -> None:
    assert config["services"]["api"]["build"]["args"]["PYTHON_IMAGE"] == (
        "python:3.11-slim-bookworm"
    )
    assert config["services"]["redis"]["image"] == "redis:7.4-bookworm"
    assert config["services"]["flower"]["image"] == "mher/flower:2.0.1"
    assert config["services"]["api"]["build"]["args"]["TORCH_INDEX_URL"] == ""


def test_api_and_worker_share_one_image_and_the_checkpoint_volume(
    config: dict[str, Any],
) -> None:
    api, worker = config["services"]["api"], config["services"]["worker"]
    assert api["image"] == worker["image"]
    assert api["build"] == worker["build"]
    for service in (api, worker):
        assert any(v.startswith("checkpoints:/data") for v in service["volumes"])
        assert service["environment"]["CNNSERVE_DATA_DIR"] == "/data"
    assert "checkpoints" in config["volumes"]


def test_flower_runs_only_with_the_monitoring_profile_with_a_login_on_loopback(
    config: dict[str, Any],
) -> None:
    flower = config["services"]["flower"]
    assert flower["profiles"] == ["monitoring"]
    command = " ".join(flower["command"])
    assert "--broker=redis://redis:6379/0" in command
    # it controls the workers: no login, no Flower (the container exits saying what to set)
    assert 'if [ -z "$${FLOWER_BASIC_AUTH:-}" ]' in command and "exit 64" in command
    assert "FLOWER_BASIC_AUTH" in flower["environment"]
    assert flower["ports"] == ["127.0.0.1:5555:5555/tcp"]
    for name, service in config["services"].items():
        if name != "flower":
            assert "profiles" not in service, f"{name} would not start by default"


def test_every_setting_reaches_the_containers() -> None:
    """Each Settings field is either fixed for the containers or passed through from .env."""
    raw = yaml.safe_load(COMPOSE.read_text())
    env = raw["x-cnnserve-env"]
    want = {f"CNNSERVE_{name.upper()}" for name in Settings.model_fields}
    assert set(env) == want, f"missing: {want - set(env)}; unknown: {set(env) - want}"


def test_settings_from_the_environment_pass_through(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "CNNSERVE_API_KEYS": "k1,k2", "CNNSERVE_MAX_QUEUED_JOBS": "7"}
    result = compose_config(COMPOSE, env=env)
    assert result.returncode == 0, result.stderr
    api = yaml.safe_load(result.stdout)["services"]["api"]
    assert api["environment"]["CNNSERVE_API_KEYS"] == "k1,k2"
    assert str(api["environment"]["CNNSERVE_MAX_QUEUED_JOBS"]) == "7"
