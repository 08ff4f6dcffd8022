"""Domain errors of the service, each an RFC 9457 problem: status, type slug and title.

Routes and the pipeline raise these (or the model zoo's and workers' own errors, such as the
job store's `QueueFullError`, which are not defined again here);
`service.api.handlers` maps every one of them to a response, once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class ProblemError(Exception):
    """An error that becomes one problem response; subclasses fix status, type and title."""

    status: int = 500
    slug: str | None = None
    title: str | None = None

    def __init__(
        self,
        detail: str,
        *,
        headers: Mapping[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = dict(headers or {})
        self.extensions = extensions


class BadRequestError(ProblemError):
    """A request the server cannot act on as sent, beyond schema validation."""

    status = 422
    slug = "invalid-request"
    title = "Invalid request"


class InputTooLargeError(ProblemError):
    """An input (tensor, shape, page) beyond the bounds this API serves."""

    status = 422
    slug = "input-too-large"
    title = "Input too large"


class UnauthorizedError(ProblemError):
    """A call that needs an API key, without a valid one."""

    status = 401
    slug = "unauthorized"
    title = "Unauthorized"


class ForbiddenError(ProblemError):
    """A valid API key without the scope the call needs."""

    status = 403
    slug = "forbidden"
    title = "Forbidden"
    #: Who was refused (for the audit log; never in the response).
    principal: Any = None


class RateLimitedError(ProblemError):
    """A principal past its predict rate."""

    status = 429
    slug = "rate-limited"
    title = "Too many requests"


class TooManyStreamsError(ProblemError):
    """A principal (or an address without a key) past its bound of open event streams."""

    status = 429
    slug = "too-many-streams"
    title = "Too many event streams"


class JobFinishedError(ProblemError):
    """An action that needs an unfinished job on a finished one."""

    status = 409
    slug = "job-finished"
    title = "Job already finished"


class IdempotencyConflictError(ProblemError):
    """An Idempotency-Key reused with a different body."""

    status = 422
    slug = "idempotency-key-reused"
    title = "Idempotency-Key reused with a different body"


class IdempotencyInFlightError(ProblemError):
    """An Idempotency-Key whose first request has not finished yet."""

    status = 409
    slug = "idempotency-key-in-flight"
    title = "Request with this Idempotency-Key in progress"


class SweepNotFoundError(ProblemError):
    """No sweep with this id (or another tenant's)."""

    status = 404
    slug = "sweep-not-found"
    title = "Sweep not found"


class ServiceUnavailableError(ProblemError):
    """A backing service (Redis, the broker, storage, workers) is not usable right now."""

    status = 503
    slug = "service-unavailable"
    title = "Service unavailable"


class PayloadTooLargeError(StarletteHTTPException):
    """A request body over the size limit (an HTTPException so FastAPI re-raises it)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(
            413,
            f"the request body is larger than this server's limit of {limit} bytes; "
            "send a smaller body",
            # the unread rest of the body makes the connection unusable
            headers={"Connection": "close"},
        )
