"""The predict fast path: `POST /v1/checkpoints/{ref}/predict` with small multipart uploads,
answered without FastAPI's routing, dependency resolution and response machinery.

That machinery cost more CPU per LeNet request than decoding the image and the forward pass
together (`bench peers`, docs/benchmarks.md). This layer sits inside the metrics, body-limit
and audit middlewares, so those still see every request, and it does what the route does with
the route's own functions: the same key check, scope and rate limit (`service.auth`), the same
checkpoint resolution within the caller's tenant, multipart parser, image checks, batcher and
JSON.

It answers only a success. Whatever it does not take (JSON bodies, big uploads, odd query
strings) goes to the route untouched, and whatever goes wrong on the way (no key, an unknown
checkpoint, a bad image, a 429) goes to the route too, with the body it read replayed and the
caller it admitted left in the request's state, so every error is the route's own problem
document and a prediction is counted against the rate once.
"""

from __future__ import annotations

import logging
import re
from typing import Any, get_args
from urllib.parse import parse_qsl

from fastapi.security import HTTPAuthorizationCredentials
from fastapi.security.utils import get_authorization_scheme_param
from pydantic import TypeAdapter, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.auth import ADMITTED, authorize, count_prediction
from service.errors import ProblemError
from service.images import InvertMode, PreprocessMode
from service.inference import inference_of
from service.routes.predict import (
    INLINE_MULTIPART_BYTES,
    MAX_TOP_K,
    Preparation,
    files_native,
    manifest_for,
    multipart_parts,
    predict_json,
    upload_blobs,
)
from workers.contracts import CHECKPOINT_REF_PATTERN

logger = logging.getLogger(__name__)

PREDICT_PATH = re.compile(r"^/v1/checkpoints/([^/]{1,64})/predict$")
REF = re.compile(CHECKPOINT_REF_PATTERN)
#: The route's own types: its accepted values, and pydantic's reading of a boolean.
INVERT, PREPROCESS = set(get_args(InvertMode)), set(get_args(PreprocessMode))
BOOL = TypeAdapter(bool)


class RouteLabel:
    """What `service.metrics.route_template` reads: the predict route's template."""

    path = "/v1/checkpoints/{ref}/predict"


ROUTE = RouteLabel()


def _query(raw: bytes) -> dict[str, Any] | None:
    """The predict query parameters, or None where the route should judge them (a 422)."""
    params = dict(parse_qsl(raw.decode("latin-1"), keep_blank_values=True)) if raw else {}
    top_k, invert = params.get("top_k", "1"), params.get("invert", "auto")
    mode, with_input = params.get("preprocess", "auto"), params.get("return_input", "false")
    if not (top_k.isascii() and top_k.isdigit() and 1 <= int(top_k) <= MAX_TOP_K):
        return None
    if invert not in INVERT or mode not in PREPROCESS:
        return None
    try:
        flag = BOOL.validate_python(with_input)
    except ValidationError:
        return None
    return {"top_k": int(top_k), "invert": invert, "mode": mode, "with_input": flag}


def _credentials(authorization: str | None) -> HTTPAuthorizationCredentials | None:
    """As `HTTPBearer(auto_error=False)` reads the Authorization header."""
    scheme, token = get_authorization_scheme_param(authorization)
    if not (authorization and scheme and token) or scheme.lower() != "bearer":
        return None
    return HTTPAuthorizationCredentials(scheme=scheme, credentials=token)


class PredictFastPath:
    """Answer the common predict call directly; hand everything else to `app`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        match = PREDICT_PATH.match(scope["path"])
        if match is None or not REF.match(match.group(1)):
            await self.app(scope, receive, send)
            return
        headers: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name, value)  # the first of a repeated header, as Starlette
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        length = headers.get(b"content-length", b"")
        query = _query(scope.get("query_string", b""))
        if (
            query is None
            or content_type.split(";")[0].strip().lower() != "multipart/form-data"
            or not length.isdigit()
            or int(length) > INLINE_MULTIPART_BYTES
        ):
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        if body is None:  # the client left before its body arrived: nobody to answer
            return
        try:
            answer = await self._answer(scope, headers, content_type, body, query, match.group(1))
        except ProblemError:  # the route answers it, with its own problem document
            answer = None
        except Exception:
            # not a refusal: the route will meet it again and report it (a 500)
            logger.warning("predict fast path failed; the route takes the request", exc_info=True)
            answer = None
        if answer is None:
            await self.app(scope, _replay(body, receive), send)
            return
        scope["route"] = ROUTE
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-length", str(len(answer)).encode()),
                    (b"content-type", b"application/json"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": answer})

    async def _answer(
        self,
        scope: Scope,
        headers: dict[bytes, bytes],
        content_type: str,
        body: bytes,
        query: dict[str, Any],
        ref: str,
    ) -> bytes | None:
        app_state = scope["app"].state
        inference = inference_of(app_state)
        authorization = headers.get(b"authorization")
        credentials = _credentials(authorization.decode("latin-1") if authorization else None)
        caller = authorize(app_state.key_ring, app_state.settings, "predict", credentials)
        await count_prediction(app_state, caller)
        state = scope.setdefault("state", {})
        state[ADMITTED] = state["caller"] = caller
        settings = inference.settings
        manifest = await manifest_for(inference, caller, ref)
        blobs = upload_blobs(multipart_parts(content_type, body, settings.max_images_per_request))
        how = Preparation(manifest, query["invert"], query["mode"])
        native = await files_native(blobs, settings, how)
        return await predict_json(inference, how, native, query["top_k"], query["with_input"])


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body (within the body limit's receive), None on a disconnect."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives `body` once, then waits on the real one (a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
