"""Request body size limit as pure ASGI middleware: 413 before the body is buffered.

The declared `Content-Length` is checked before the app runs, and every body is counted as it
streams in and cut off at the limit, whatever it declared, so the server never holds more than
the limit of any body. A request that declares both a `Transfer-Encoding` and a
`Content-Length` is refused (400), as RFC 9112 §6.3 recommends: the two framings disagree about
where the body ends, and a server behind a proxy must not pick one.
"""

from __future__ import annotations

import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.problems import problem_response
from service.errors import PayloadTooLargeError

logger = logging.getLogger(__name__)


class BodySizeLimitMiddleware:
    """Refuse HTTP request bodies over `max_bytes` with a 413 problem."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
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
        if declared is not None and declared > self.max_bytes:
            logger.info("refused a %d-byte body (limit %d)", declared, self.max_bytes)
            await self._send_413(scope, receive, send)
            return

        received = 0
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise PayloadTooLargeError(self.max_bytes)
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
            await self._send_413(scope, receive, send)

    async def _send_413(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The 413 problem the exception handlers would give, sent from outside the app."""
        exc = PayloadTooLargeError(self.max_bytes)
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
