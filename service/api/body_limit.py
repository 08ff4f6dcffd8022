"""Request body size limit as pure ASGI middleware: 413 before the body is buffered.

The declared `Content-Length` is checked before the app runs, and every body is counted as it
streams in and cut off at the limit, whatever it declared, so the server never holds more than
the limit of any body. A request that declares both a `Transfer-Encoding` and a
`Content-Length` is refused (400), as RFC 9112 §6.3 recommends: the two framings disagree about
where the body ends, and a server behind a proxy must not pick one.

The limit (`CNNSERVE_MAX_BODY_BYTES`) is for the routes that take images: predict, explain
and V2 infer. Every other body is a spec of a few hundred bytes (a job, a sweep, an
evaluation), parsed as JSON on the event loop by FastAPI and validated in one step, so those
routes take at most `CONTROL_BODY_BYTES` (`/v1/ops`, whose tensors are bigger, `OPS_BODY_BYTES`):
a 20 MB job body of unknown fields held the loop for 12 s and 2 GB (each field's error
reported).
"""

from __future__ import annotations

import logging
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.problems import problem_response
from service.errors import PayloadTooLargeError

logger = logging.getLogger(__name__)

#: The routes whose bodies are images (up to `max_bytes`).
IMAGE_BODY_PATH = re.compile(
    r"^/v1/checkpoints/[^/]+/(predict|explain)$|^/v2/models/[^/]+(/versions/[^/]+)?/infer$"
)
#: The most any other route's body may hold (a job spec is about 200 bytes)...
CONTROL_BODY_BYTES = 256 * 1024
#: ... but the seed's tensor operations (`/v1/ops`), whose inputs are up to 16 × 64 × 64
#: numbers as JSON (about 1.2 MB at full float precision).
OPS_PATH = re.compile(r"^/v1/ops/")
OPS_BODY_BYTES = 2 * 1024 * 1024


class BodySizeLimitMiddleware:
    """Refuse HTTP request bodies over `max_bytes` with a 413 problem."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def limit_for(self, path: str) -> int:
        """The most the body of a request to `path` may hold."""
        if IMAGE_BODY_PATH.match(path):
            return self.max_bytes
        if OPS_PATH.match(path):
            return min(self.max_bytes, OPS_BODY_BYTES)
        return min(self.max_bytes, CONTROL_BODY_BYTES)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        if _framed_twice(scope):
            logger.info("refused a request with both Transfer-Encoding and Content-Length")
            response = problem_response(
                400,
                "the request has both Transfer-Encoding and Content-Length; send one of them "
                "(RFC 9112 §6.3)",
                instance=scope.get("path"),
                slug="ambiguous-framing",
                headers={"Connection": "close"},
            )
            await response(scope, receive, send)
            return
        declared = declared_length(scope)
        if declared is not None and declared > limit:
            logger.info("refused a %d-byte body (limit %d)", declared, limit)
            await self._send_413(scope, receive, send, limit)
            return

        received = 0
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLargeError(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except PayloadTooLargeError:
            # raised from a receive the app did not turn into a response itself
            if response_started:
                raise
            await self._send_413(scope, receive, send, limit)

    async def _send_413(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        """The 413 problem the exception handlers would give, sent from outside the app."""
        exc = PayloadTooLargeError(limit)
        response = problem_response(
            413,
            exc.detail,
            instance=scope.get("path"),
            slug="payload-too-large",
            headers=exc.headers,
        )
        await response(scope, receive, send)


def _framed_twice(scope: Scope) -> bool:
    names = {name for name, _ in scope.get("headers", [])}
    return b"transfer-encoding" in names and b"content-length" in names


def declared_length(scope: Scope) -> int | None:
    """The body length a request declares (its first Content-Length), None without one."""
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
