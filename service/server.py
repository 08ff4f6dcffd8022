"""`cnnserve api`: serve the app factory with uvicorn."""

from __future__ import annotations

import logging

import uvicorn
from uvicorn.config import LOGGING_CONFIG

from service.logs import uvicorn_log_config
from workers.settings import get_settings

logger = logging.getLogger(__name__)


def serve(host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> int:
    """Run uvicorn on `service.app:create_app` until interrupted; returns an exit code."""
    if workers < 1:
        logger.error("--workers must be at least 1, got %d", workers)
        return 2
    if workers > 1:
        # each process has its own Prometheus registry: /metrics shows one process's numbers
        logger.warning("%d worker processes: /metrics reports the one that answers", workers)
    log_config = uvicorn_log_config(get_settings()) or LOGGING_CONFIG
    uvicorn.run(
        "service.app:create_app",
        log_config=log_config,
        factory=True,
        host=host,
        port=port,
        workers=workers,
        proxy_headers=True,
        log_level=logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower(),
        timeout_graceful_shutdown=10,
    )
    return 0
