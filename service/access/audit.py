"""The audit log: one line per attempted state change: who, what, which id, and the outcome.

A route that changes state declares its action (`Allow("train", audit="job.submit")`); the
authorisation step notes the action and the principal on the request (before it refuses one,
too), the route may name the id it made (`audit_target`), and `AuditMiddleware` writes the
line once the response status is known, to the `cnnserve.audit` logger:

    audit action=job.cancel principal=alice key=3f2a9c1b7d4e target=0123456789abcdef
          outcome=ok status=202   (one line)

With `CNNSERVE_LOG_FORMAT=json` the same fields are the JSON line's (`audit: true`). A key
appears only by its id; neither a key nor its hash is ever written.

A line cannot be forged: the target is the client's path parameter, so every value is cut at
`MAX_FIELD_CHARS`, its control characters escaped, and written `logfmt`'s way, in quotes
when it holds anything but letters, digits and `_.:@/+-` (`target="zz outcome=ok"` is one
field, not two); the log formatters escape whatever else reaches a line
(`service.api.logs`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.logs import clip, escape_controls

audit_logger = logging.getLogger("cnnserve.audit")

STATE_KEY = "cnnserve_audit"
#: A value longer than this (a client's path parameter) is cut, saying how much was left out.
MAX_FIELD_CHARS = 128
_BARE = re.compile(r"[A-Za-z0-9_.:@/+-]+")


@dataclass
class AuditEntry:
    """What one request tried to change, and by whom."""

    action: str
    principal: str | None
    key_id: str | None
    target: str | None


def note(request: Request, action: str, principal: str | None, key_id: str | None) -> None:
    """Mark this request as a state change to audit (the target defaults to its path ids)."""
    params = request.path_params
    target = next((str(params[k]) for k in ("job_id", "ref", "sweep_id") if k in params), None)
    request.scope.setdefault("state", {})[STATE_KEY] = AuditEntry(action, principal, key_id, target)


def audit_target(request: Request, target: str) -> None:
    """Name the id a state change made or acted on (a new job's, say)."""
    entry = request.scope.get("state", {}).get(STATE_KEY)
    if entry is not None:
        entry.target = target


def _outcome(status: int) -> str:
    if status < 400:
        return "ok"
    return "refused" if status < 500 else "failed"


def field_value(value: str | None) -> str:
    """A value as the audit line writes it: cut, control characters escaped, and quoted
    unless it is a plain word (so it is one field, whatever it holds)."""
    if not value:
        return "-"
    text = clip(value, MAX_FIELD_CHARS)
    if _BARE.fullmatch(text) and text != "-":
        return text
    return '"' + escape_controls(text.replace("\\", "\\\\").replace('"', '\\"')) + '"'


def write(entry: AuditEntry, status: int) -> None:
    fields: dict[str, Any] = {
        "audit": True,
        "action": entry.action,
        "principal": entry.principal or "-",
        "key": entry.key_id or "-",
        "target": clip(entry.target, MAX_FIELD_CHARS) if entry.target else "-",
        "outcome": _outcome(status),
        "status": status,
    }
    audit_logger.info(
        "audit action=%s principal=%s key=%s target=%s outcome=%s status=%d",
        field_value(entry.action),
        field_value(entry.principal),
        field_value(entry.key_id),
        field_value(entry.target),
        fields["outcome"],
        status,
        extra=fields,
    )


class AuditMiddleware:
    """Write the audit line of every request a route marked, with its final status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        status = 500

        async def watching_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watching_send)
        finally:
            entry = state.get(STATE_KEY)
            if entry is not None:
                write(entry, status)
