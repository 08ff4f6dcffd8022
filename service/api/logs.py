"""Log output: text lines, or one JSON object per line for collectors (`CNNSERVE_LOG_FORMAT`).

`configure_logging` runs in every process that serves the app (the `cnnserve` command's and
each uvicorn worker's), so the format holds with `--workers N` too; uvicorn's own loggers get
the same formatters through `uvicorn_log_config`.

Whatever a client sends can end up in a log line (a path, an id, an error's message), so no
logged value may break a line or act on a terminal: the text formatters write control
characters (C0, DEL, C1, and the Unicode line and paragraph separators) as visible escapes
(`\\n`, `\\x1b`, `\\u2028`), indent every line of a traceback under its record, and cut a
record's line at `MAX_LINE_CHARS`; the JSON formatter's lines are JSON strings (every control
character escaped, ASCII only) with each value cut the same way. A line that starts at the
left margin is always a record of ours.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from pythonjsonlogger.json import JsonFormatter
from uvicorn.logging import AccessFormatter, DefaultFormatter

from workers.settings import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s"
RENAMED = {"levelname": "level", "name": "logger"}
#: A record's text (or a JSON value) longer than this is cut, saying how much was left out.
MAX_LINE_CHARS = 8192

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """`text` with every control character written as a visible escape (`\\n`, `\\x1b`)."""
    return _CONTROL.sub(_escape, text)


def clip(text: str, limit: int = MAX_LINE_CHARS) -> str:
    """`text`, cut to `limit` characters with a note of how many were left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…[{len(text) - limit} more characters]"


def _indented(text: str) -> str:
    """A traceback's lines, escaped and indented, so none of them can pass for a record."""
    return "\n".join("    " + clip(escape_controls(line)) for line in text.splitlines())


class _SafeLines(logging.Formatter):
    """One record, one line that a logged value cannot break or colour (see the module)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return clip(escape_controls(super().formatMessage(record)))

    def formatException(self, ei: Any) -> str:
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indented(super().formatStack(stack_info))


class SafeTextFormatter(_SafeLines):
    """The text format of every cnnserve log line."""


class SafeUvicornFormatter(_SafeLines, DefaultFormatter):
    """uvicorn's own lines (`INFO:     ...`), without colours: escapes would show them."""


class SafeAccessFormatter(_SafeLines, AccessFormatter):
    """uvicorn's access lines; the request line is the client's, byte for byte."""


class SafeJsonFormatter(JsonFormatter):
    """One JSON object per record; every string value cut at `MAX_LINE_CHARS`."""

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        return {k: clip(v) if isinstance(v, str) else v for k, v in log_data.items()}


def _json_formatter() -> logging.Formatter:
    return SafeJsonFormatter(JSON_FIELDS, rename_fields=RENAMED, json_ensure_ascii=True)


def configure_logging(settings: Settings, level: int | str | None = None) -> None:
    """Give the root logger a handler (when it has none), and every root handler the
    configured format, safe from what a logged value holds."""
    root = logging.getLogger()
    if level is not None:
        root.setLevel(level)
    if not root.handlers:
        logging.basicConfig(level=level or logging.INFO, format=TEXT_FORMAT)
    for handler in root.handlers:
        if settings.log_format == "json":
            handler.setFormatter(_json_formatter())
        else:
            fmt = handler.formatter._fmt if handler.formatter is not None else None
            handler.setFormatter(SafeTextFormatter(fmt or TEXT_FORMAT))


def uvicorn_log_config(settings: Settings) -> dict[str, Any]:
    """uvicorn's logging, in the configured format, with the same safe formatters."""
    formatters: dict[str, dict[str, Any]]
    if settings.log_format == "json":
        json_formatter: dict[str, Any] = {
            "()": f"{__name__}.SafeJsonFormatter",
            "fmt": JSON_FIELDS,
            "rename_fields": RENAMED,
        }
        formatters = {"default": json_formatter, "access": json_formatter}
    else:
        formatters = {
            "default": {
                "()": f"{__name__}.SafeUvicornFormatter",
                "fmt": "%(levelprefix)s %(message)s",
                "use_colors": False,
            },
            "access": {
                "()": f"{__name__}.SafeAccessFormatter",
                "fmt": '%(levelprefix)s %(client_addr)s - "%(request_line)s" %(status_code)s',
                "use_colors": False,
            },
        }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": formatters,
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "stream": "ext://sys.stderr",
            },
            "access": {
                "class": "logging.StreamHandler",
                "formatter": "access",
                "stream": "ext://sys.stdout"
                if settings.log_format == "text"
                else "ext://sys.stderr",
            },
        },
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": "INFO", "propagate": False},
            "uvicorn.error": {"level": "INFO"},
            "uvicorn.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
        },
    }
