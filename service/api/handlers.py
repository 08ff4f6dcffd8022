"""The one mapping of every error to an RFC 9457 `application/problem+json` response.

Every 4xx and 5xx the service answers, Starlette's own 404/405 and FastAPI's validation errors
included, goes through `register_exception_handlers(app)`. Routes raise domain exceptions
(`service.errors`, or the model zoo's and workers' own errors) and never build error responses
themselves.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from models import ArchError, ShapeError, UnknownModelError
from service.api.problems import problem_response
from service.errors import ProblemError
from workers.store.checkpoints import (
    CheckpointCorruptError,
    CheckpointNotFoundError,
    StoreUnavailableError,
)
from workers.store.jobs import ActiveJobsLimitError, JobNotFoundError, QueueFullError

logger = logging.getLogger(__name__)

#: A submission past the queue limit or a quota is told to retry after this many seconds.
QUEUE_FULL_RETRY_S = 30


def _path(request: Request) -> str:
    return request.url.path


def _validation_errors(errors: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ())]
        out.append({"loc": loc, "msg": err.get("msg", ""), "type": err.get("type", "")})
    return out


def _validation_detail(errors: list[dict[str, Any]]) -> str:
    parts = []
    for err in errors[:5]:
        where = ".".join(p for p in err["loc"] if p not in ("body",)) or "body"
        parts.append(f"{where}: {err['msg']}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


_STATUS_SLUGS = {
    404: "not-found",
    405: "method-not-allowed",
    413: "payload-too-large",
    415: "unsupported-media-type",
}


async def _http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else None
    if exc.status_code == 404 and detail in (None, "Not Found"):
        detail = f"no route matches {request.method} {request.url.path}; see /docs for the API"
    headers = dict(exc.headers or {})
    if exc.status_code == 400 and detail == "There was an error parsing the body":
        # FastAPI's answer to a body that is not UTF-8: a malformed body, as bad JSON is (422)
        return problem_response(
            422,
            "the body could not be read: it is not UTF-8 text; send UTF-8 JSON",
            instance=_path(request),
            slug="validation-error",
            title="Request validation failed",
            extensions={"errors": [{"loc": ["body"], "msg": "not UTF-8", "type": "json_invalid"}]},
        )
    if exc.status_code == 405 and detail in (None, "Method Not Allowed"):
        allow = _allowed_methods(request) or headers.get("Allow") or headers.get("allow", "")
        headers.pop("allow", None)
        headers["Allow"] = allow
        detail = f"{request.method} is not allowed on {request.url.path}" + (
            f"; allowed: {allow}" if allow else ""
        )
    return problem_response(
        exc.status_code,
        detail,
        instance=_path(request),
        slug=_STATUS_SLUGS.get(exc.status_code),
        headers=headers,
    )


def _allowed_methods(request: Request) -> str:
    """Every method some route takes on this path (Starlette names only the first route's)."""
    allowed = []
    for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"):
        scope = {**request.scope, "method": method}
        if any(r.matches(scope)[0] == Match.FULL for r in request.app.router.routes):
            allowed.append(method)
    return ", ".join(allowed)


async def _request_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError | ValidationError)
    errors = _validation_errors(exc.errors())
    return problem_response(
        422,
        _validation_detail(errors),
        instance=_path(request),
        slug="validation-error",
        title="Request validation failed",
        extensions={"errors": errors},
    )


async def _problem_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ProblemError)
    return problem_of(exc, _path(request))


def problem_of(exc: ProblemError, path: str) -> JSONResponse:
    """The answer to a domain error on `path` (for the layers that answer before a route)."""
    return problem_response(
        exc.status,
        exc.detail,
        instance=path,
        slug=exc.slug,
        title=exc.title,
        headers=exc.headers,
        extensions=exc.extensions,
    )


async def _shape_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ShapeError)
    return problem_response(
        422,
        f"{exc}; use a larger input",
        instance=_path(request),
        slug="input-too-small",
        title="Input shape does not fit the network",
        extensions={"layer": exc.layer, "layer_type": exc.layer_type},
    )


async def _unknown_model(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, UnknownModelError)
    return problem_response(
        404,
        str(exc),
        instance=_path(request),
        slug="model-not-found",
        title="Model not found",
        extensions={"known_models": exc.known},
    )


async def _arch_error(request: Request, exc: Exception) -> JSONResponse:
    return problem_response(
        422, str(exc), instance=_path(request), slug="invalid-arch", title="Invalid arch"
    )


async def _job_not_found(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, JobNotFoundError)
    return problem_response(
        404,
        f"{exc}; job ids are 16 hex digits as returned by POST /v1/jobs",
        instance=_path(request),
        slug="job-not-found",
        title="Job not found",
    )


async def _checkpoint_not_found(request: Request, exc: Exception) -> JSONResponse:
    return problem_response(
        404,
        f"{exc}; refs are checkpoint ids (<job>-eNNN) or aliases "
        "(<job>:latest, <job>:best, <model>:best, <model>:latest)",
        instance=_path(request),
        slug="checkpoint-not-found",
        title="Checkpoint not found",
    )


async def _checkpoint_corrupt(request: Request, exc: Exception) -> JSONResponse:
    return problem_response(
        409,
        f"the checkpoint's files do not match its manifest ({exc}); "
        "use another checkpoint or delete this one",
        instance=_path(request),
        slug="checkpoint-corrupt",
        title="Checkpoint corrupt",
    )


async def _queue_full(request: Request, exc: Exception) -> JSONResponse:
    return problem_response(
        429,
        f"{exc}; retry in {QUEUE_FULL_RETRY_S} s or cancel queued jobs",
        instance=_path(request),
        slug="queue-full",
        title="Too many queued jobs",
        headers={"Retry-After": str(QUEUE_FULL_RETRY_S)},
    )


async def _active_jobs_limit(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ActiveJobsLimitError)
    return problem_response(
        429,
        f"{exc}; retry in {QUEUE_FULL_RETRY_S} s, when one has finished, or cancel one",
        instance=_path(request),
        slug="too-many-active-jobs",
        title="Too many active jobs",
        headers={"Retry-After": str(QUEUE_FULL_RETRY_S)},
        extensions={
            "limit": "max_active_jobs",
            "max_active_jobs": exc.limit,
            "active_jobs": exc.active,
        },
    )


async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
    logger.warning("Redis unavailable on %s %s: %s", request.method, request.url.path, exc)
    return problem_response(
        503,
        "the job store (Redis) is not reachable; retry shortly",
        instance=_path(request),
        slug="redis-unavailable",
        title="Service unavailable",
        headers={"Retry-After": "5"},
    )


async def _store_down(request: Request, exc: Exception) -> JSONResponse:
    logger.warning(
        "checkpoint store unavailable on %s %s: %s", request.method, request.url.path, exc
    )
    return problem_response(
        503,
        str(exc),
        instance=_path(request),
        slug="checkpoint-store-unavailable",
        title="Service unavailable",
        headers={"Retry-After": "5"},
    )


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem_response(
        500,
        "the server hit an unexpected error; it was logged. Retry, and report it if it persists",
        instance=_path(request),
        slug="internal-error",
    )


def register_exception_handlers(app: FastAPI) -> None:
    """Map every domain exception and framework error of `app` to a problem response."""
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(RequestValidationError, _request_validation)
    # a pydantic model validated inside a route (a JobSpec built by hand, say) is still a 422
    app.add_exception_handler(ValidationError, _request_validation)
    app.add_exception_handler(ProblemError, _problem_error)
    app.add_exception_handler(ShapeError, _shape_error)
    app.add_exception_handler(UnknownModelError, _unknown_model)
    app.add_exception_handler(ArchError, _arch_error)
    app.add_exception_handler(JobNotFoundError, _job_not_found)
    app.add_exception_handler(CheckpointNotFoundError, _checkpoint_not_found)
    app.add_exception_handler(CheckpointCorruptError, _checkpoint_corrupt)
    app.add_exception_handler(QueueFullError, _queue_full)
    app.add_exception_handler(ActiveJobsLimitError, _active_jobs_limit)
    app.add_exception_handler(redis.ConnectionError, _redis_down)
    app.add_exception_handler(redis.TimeoutError, _redis_down)
    app.add_exception_handler(StoreUnavailableError, _store_down)
    app.add_exception_handler(Exception, _unhandled)
