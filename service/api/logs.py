"""Log output: text lines, or one JSON object per line for collectors (`CNNSERVE_LOG_FORMAT`).

`configure_logging` runs in every process that serves the app (the `cnnserve` command's and
each uvicorn worker's), so the format holds with `--workers N` too; uvicorn's own loggers get
the same formatter through `uvicorn_log_config`.
"""

from __future__ import annotations

import logging
from typing import Any

from workers.settings import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JSON_FORMATTER = "pythonjsonlogger.json.JsonFormatter"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s"


def _json_formatter() -> logging.Formatter:
    from pythonjsonlogger.json import JsonFormatter

    return JsonFormatter(JSON_FIELDS, rename_fields={"levelname": "level", "name": "logger"})


def configure_logging(settings: Settings, level: int | str | None = None) -> None:
    """Give the root logger a handler (when it has none) in the configured format."""
    root = logging.getLogger()
    if level is not None:
        root.setLevel(level)
    if not root.handlers:
        logging.basicConfig(level=level or logging.INFO, format=TEXT_FORMAT)
    if settings.log_format == "json":
        formatter = _json_formatter()
        for handler in root.handlers:
            handler.setFormatter(formatter)


def uvicorn_log_config(settings: Settings) -> dict[str, Any] | None:
    """uvicorn's logging in JSON when asked for (None: uvicorn's default text)."""
    if settings.log_format != "json":
        return None
    json_formatter = {
        "()": JSON_FORMATTER,
        "fmt": JSON_FIELDS,
        "rename_fields": {"levelname": "level", "name": "logger"},
    }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": json_formatter},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "stream": "ext://sys.stderr",
            },
        },
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": "INFO", "propagate": False},
            "uvicorn.error": {"level": "INFO"},
            "uvicorn.access": {"handlers": ["default"], "level": "INFO", "propagate": False},
        },
    }
