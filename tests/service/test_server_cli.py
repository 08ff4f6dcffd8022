"""`cnnserve api` serves the app with uvicorn and stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from service.stack import free_port
from tests.service.conftest import stop_process, wait_http
from workers.settings import Settings


@pytest.mark.integration
def test_cnnserve_api_serves_and_stops(settings: Settings, tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "CNNSERVE_REDIS_URL": settings.redis_url,
        "CNNSERVE_DATA_DIR": str(settings.data_dir),
        "CNNSERVE_API_KEYS": "",
    }
    log_path = tmp_path / "api.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "api", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_http(f"{url}/healthz", proc)
            assert httpx.get(f"{url}/v1/models/lenet", timeout=5).json()["name"] == "lenet"
            proc.send_signal(signal.SIGTERM)
            # uvicorn shuts down gracefully, then re-raises the signal it caught
            assert proc.wait(timeout=20) in (0, -signal.SIGTERM)
        finally:
            stop_process(proc)
    assert "no API keys" in log_path.read_text()
