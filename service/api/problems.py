"""RFC 9457 problem documents: the schema, the response builder and their OpenAPI form."""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

PROBLEM_MEDIA_TYPE = "application/problem+json"
#: Paths under this prefix speak the Open Inference Protocol, whose errors are {"error": "..."}.
OIP_PREFIX = "/v2"
#: Problem `type` URIs name the kind of problem; plain HTTP ones use `about:blank` (RFC 9457).
TYPE_PREFIX = "urn:cnnserve:problem:"


class Problem(BaseModel):
    """An RFC 9457 problem detail: what went wrong and what to do about it."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "type": "urn:cnnserve:problem:job-not-found",
                    "title": "Job not found",
                    "status": 404,
                    "detail": "no job with id '0123456789abcdef'",
                    "instance": "/v1/jobs/0123456789abcdef",
                }
            ]
        },
    )

    type: str = Field("about:blank", description="A URI naming the kind of problem.")
    title: str = Field(description="A short summary of the kind of problem.")
    status: int = Field(description="The HTTP status code.", ge=400, le=599)
    detail: str | None = Field(None, description="What went wrong here, and what to do.")
    instance: str | None = Field(None, description="The request path that had the problem.")


def is_oip_path(path: str) -> bool:
    return path == OIP_PREFIX or path.startswith(f"{OIP_PREFIX}/")


class InferenceError(BaseModel):
    """An Open Inference Protocol error: what went wrong and what to send instead."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"error": "input 'image' has shape [1, 32, 32]; send [N, 28, 28] or [N, 1, 28, 28]"}
            ]
        }
    )

    error: str


def inference_error_responses(*statuses: int, **details: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for `/v2` error statuses: `{"error": ...}` with examples."""
    return {
        status: {
            "description": _DESCRIPTIONS.get(status, "Error"),
            "content": {
                "application/json": {
                    "schema": {"$ref": "#/components/schemas/InferenceError"},
                    "example": {"error": details.get(f"s{status}", _example(status)["detail"])},
                }
            },
        }
        for status in statuses
    }


def problem_body(
    status: int,
    detail: str | None,
    *,
    instance: str | None = None,
    slug: str | None = None,
    title: str | None = None,
    extensions: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A problem document as a dict (JSON-ready)."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    body: dict[str, Any] = {
        "type": f"{TYPE_PREFIX}{slug}" if slug else "about:blank",
        "title": title or phrase,
        "status": status,
        "detail": detail,
    }
    if instance is not None:
        body["instance"] = instance
    for key, value in (extensions or {}).items():
        if key not in body:
            body[key] = value
    return body


def problem_response(
    status: int,
    detail: str | None,
    *,
    instance: str | None = None,
    slug: str | None = None,
    title: str | None = None,
    headers: Mapping[str, str] | None = None,
    extensions: Mapping[str, Any] | None = None,
) -> JSONResponse:
    """A JSONResponse carrying a problem document with the problem media type.

    Under `/v2` (the Open Inference Protocol) the same error is the protocol's own
    `{"error": "..."}`, which clients such as tritonclient read.
    """
    if instance is not None and is_oip_path(instance):
        message = detail or problem_body(status, None, title=title)["title"]
        return JSONResponse({"error": message}, status_code=status, headers=dict(headers or {}))
    body = problem_body(
        status, detail, instance=instance, slug=slug, title=title, extensions=extensions
    )
    return JSONResponse(
        jsonable_encoder(body),
        status_code=status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=dict(headers or {}),
    )


_EXAMPLES: dict[int, tuple[str, str, str]] = {
    400: ("bad-request", "Bad Request", "the request could not be read"),
    401: (
        "unauthorized",
        "Unauthorized",
        "this call needs an API key with the read scope: send 'Authorization: Bearer <key>'",
    ),
    403: (
        "forbidden",
        "Forbidden",
        "principal carol may read; this call needs the train scope",
    ),
    404: ("not-found", "Not Found", "no job with id '0123456789abcdef'"),
    405: ("method-not-allowed", "Method Not Allowed", "PUT is not allowed on /v1/jobs"),
    409: ("job-finished", "Job already finished", "job 0123456789abcdef already succeeded"),
    413: (
        "payload-too-large",
        "Payload Too Large",
        "the request body is larger than this server's limit of 20971520 bytes",
    ),
    415: ("unsupported-media-type", "Unsupported Media Type", "send PNG, JPEG, WebP or BMP"),
    422: ("validation-error", "Request validation failed", "epochs: Input should be <= 100"),
    429: ("queue-full", "Too many queued jobs", "100 jobs are queued; retry later"),
    500: ("internal-error", "Internal Server Error", "the server hit an unexpected error"),
    503: ("redis-unavailable", "Service unavailable", "the job store (Redis) is not reachable"),
}

_DESCRIPTIONS = {
    400: "Bad request",
    401: "Missing or wrong API key",
    403: "The key lacks the scope this call needs",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict with the resource's state",
    413: "Request body too large",
    415: "Unsupported media type",
    422: "Invalid input",
    429: "Too many requests",
    500: "Internal error",
    503: "A backing service is unavailable",
}


def _example(status: int, detail: str | None = None) -> dict[str, Any]:
    slug, title, default = _EXAMPLES.get(status, ("error", "Error", "something went wrong"))
    return {
        "type": f"{TYPE_PREFIX}{slug}",
        "title": title,
        "status": status,
        "detail": detail or default,
    }


def problem_responses(*statuses: int, **details: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for error statuses, as problem documents with examples.

    `details` may give an example detail per status as `s404="..."`.
    """
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        out[status] = {
            "description": _DESCRIPTIONS.get(status, "Error"),
            "content": {
                PROBLEM_MEDIA_TYPE: {
                    "schema": {"$ref": "#/components/schemas/Problem"},
                    "example": _example(status, details.get(f"s{status}")),
                }
            },
        }
    return out


def _document_refusals(operation: dict[str, Any]) -> None:
    """What a key-guarded operation answers a caller it refuses, documented wherever the
    operation declares the key (so no route can forget it): 401 without a valid key, 403 for
    a key without the scope. Where the key is optional (`{}`), only a wrong key is refused."""
    security = operation.get("security")
    if not security:
        return
    responses = operation.setdefault("responses", {})
    statuses = (401,) if {} in security else (401, 403)
    for status in statuses:
        if str(status) not in responses and status not in responses:
            responses[str(status)] = {"description": _DESCRIPTIONS.get(status, "Error")}


def problemize_openapi(schema: dict[str, Any]) -> dict[str, Any]:
    """Rewrite every 4xx/5xx response of an OpenAPI document as `application/problem+json`."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["Problem"] = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    components["InferenceError"] = InferenceError.model_json_schema()
    for path, path_item in schema.get("paths", {}).items():
        for operation in path_item.values():
            if not isinstance(operation, dict):
                continue
            _document_refusals(operation)
            for code, response in operation.get("responses", {}).items():
                if str(code)[:1] not in ("4", "5"):
                    continue
                if is_oip_path(path):
                    given = response.get("content", {}).get("application/json", {})
                    if given.get("schema", {}).get("$ref") != "#/components/schemas/InferenceError":
                        response.update(inference_error_responses(int(code))[int(code)])
                    continue
                content = response.get("content", {})
                if PROBLEM_MEDIA_TYPE in content:
                    content.pop("application/json", None)
                    continue
                example = _example(int(code))
                response["content"] = {
                    PROBLEM_MEDIA_TYPE: {
                        "schema": {"$ref": "#/components/schemas/Problem"},
                        "example": example,
                    }
                }
                if response.get("description") in (None, "Validation Error"):
                    response["description"] = _DESCRIPTIONS.get(int(code), "Error")
    return schema
