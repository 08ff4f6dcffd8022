"""The fast path: the hot inference calls answered without FastAPI's routing, dependency
resolution and response machinery.

- `POST /v1/checkpoints/{ref}/predict` with a small multipart upload;
- `POST /v2/models/{model}[/versions/{version}]/infer`, the Open Inference Protocol's infer.

That machinery cost more CPU per LeNet request than decoding the image and the forward pass
together (`bench peers`, docs/benchmarks.md), and a fifth of a 64-image V2 batch's forward
pass (`bench http`). This layer stands in front of the whole middleware stack
(`service.api.app.CnnserveAPI`; `STANDS_IN_FRONT_OF` names each middleware and why what it
answers may skip it, and a test holds the app to that list). It does what the routes do, with
what they do it with: the same bearer parser, key check, scope and rate limit
(`service.access.auth`), the same query model (`PredictQuery`), the same resolution within the
caller's tenant and the same pipeline (`service.inference.pipeline`); it imports no route.

It answers only a success. Whatever it does not take (JSON predict bodies, big uploads, odd
query strings, bodies without a declared length) goes to the route untouched. It admits a call
from its headers (key, scope, rate) before reading a byte of its body; whatever goes wrong on
the way (no key, a 429, an unknown checkpoint or model, a bad image or tensor) it leaves in the
request's state for `service.api.admission`, at the bottom of the stack, to answer exactly as
the route would (a problem document on `/v1`, the protocol's `{"error": ...}` on `/v2`), so a
body is never read or parsed twice and a prediction is counted against the rate once.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl

from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.access.audit import AuditMiddleware
from service.access.auth import Caller
from service.api.admission import REFUSAL, Admission, Refusal, admit
from service.api.body_limit import BodySizeLimitMiddleware, declared_length
from service.api.deps import inference_of
from service.errors import ProblemError
from service.inference import decode, pipeline
from service.inference.batcher import InferenceService
from service.metrics import RequestMetricsMiddleware, observe_request
from workers.contracts import CHECKPOINT_REF_PATTERN

logger = logging.getLogger(__name__)

PREDICT_PATH = re.compile(r"^/v1/checkpoints/([^/]{1,64})/predict$")
#: The V2 infer routes; model and version names as the routes' path parameters allow them.
INFER_PATH = re.compile(r"^/v2/models/([^/]{1,64})(?:/versions/([^/]{1,64}))?/infer$")
REF = re.compile(CHECKPOINT_REF_PATTERN)

#: The app's middleware, outermost first, that the fast path stands in front of; what it
#: answers may skip each: the request metrics (it counts its answers itself), the body limit
#: (it takes only bodies of a declared length within the limit, and counts what arrives), the
#: audit log (predictions change no state) and admission (it admits its calls from their
#: headers too, before reading a body, and leaves what it refuses to it). A middleware added
#: to the app must be added here, with why the fast path may skip it, or the fast path must do
#: its work too: a test holds them equal.
STANDS_IN_FRONT_OF = (
    RequestMetricsMiddleware,
    BodySizeLimitMiddleware,
    AuditMiddleware,
    Admission,
)

Headers = dict[bytes, bytes]
#: What a fast route answers: the body and its headers (Content-Type among them).
Answer = tuple[bytes, dict[str, str]]
#: How a taken request is answered, given the inference service, the admitted caller and
#: the body: the route's work, raising a `ProblemError` wherever the route would refuse.
Handler = Callable[[InferenceService, Caller, bytes], Awaitable[Answer]]


@dataclass(frozen=True)
class Taken:
    """A request the fast path answers: its route's template (the metrics' label) and how
    to answer it."""

    route: str
    handle: Handler


PREDICT_ROUTE = "/v1/checkpoints/{ref}/predict"
INFER_ROUTE = "/v2/models/{model}/infer"
INFER_VERSION_ROUTE = "/v2/models/{model}/versions/{model_version}/infer"


def _query(raw: bytes) -> pipeline.PredictQuery | None:
    """The predict query, read as the route reads it (Starlette's query parameters, the last
    of a repeated one, validated by the route's own model), or None where the route should
    judge it (a 422)."""
    params = dict(parse_qsl(raw.decode("latin-1"), keep_blank_values=True)) if raw else {}
    try:
        return pipeline.PredictQuery.model_validate(params)
    except ValidationError:
        return None


def take_predict(match: re.Match[str], scope: Scope, headers: Headers) -> Taken | None:
    """A predict call with a small multipart body and well-formed query parameters."""
    ref = match.group(1)
    content_type = headers.get(b"content-type", b"").decode("latin-1")
    query = _query(scope.get("query_string", b""))
    if (
        query is None
        or not REF.match(ref)
        or decode.body_kind(content_type) != "multipart"
        or int(headers[b"content-length"]) > decode.INLINE_MULTIPART_BYTES
    ):
        return None

    async def handle(inference: InferenceService, caller: Caller, body: bytes) -> Answer:
        settings = inference.settings
        manifest = await inference.resolver.manifest(ref, caller.within)
        parts = decode.multipart_parts(content_type, body, settings.max_images_per_request)
        how = pipeline.Preparation.of(manifest, query)
        native = await pipeline.files_native(decode.upload_blobs(parts), settings, how)
        answer = await pipeline.predict_answer(
            inference, how, native, query.top_k, query.return_input
        )
        return answer, {"Content-Type": "application/json"}

    return Taken(PREDICT_ROUTE, handle)


def take_infer(match: re.Match[str], scope: Scope, headers: Headers) -> Taken | None:
    """A V2 infer call (any content type: tritonclient sends none)."""
    model, version = match.group(1), match.group(2)
    raw_length = headers.get(b"inference-header-content-length")
    header_length = raw_length.decode("latin-1") if raw_length is not None else None

    async def handle(inference: InferenceService, caller: Caller, body: bytes) -> Answer:
        manifest = await inference.resolver.model_manifest(model, version, caller.within)
        return await pipeline.infer_answer(inference, model, manifest, body, header_length)

    return Taken(INFER_ROUTE if version is None else INFER_VERSION_ROUTE, handle)


#: The routes the fast path answers: a path pattern and what it takes of those requests.
ROUTES: tuple[tuple[re.Pattern[str], Callable[..., Taken | None]], ...] = (
    (PREDICT_PATH, take_predict),
    (INFER_PATH, take_infer),
)


def _taken(scope: Scope) -> tuple[Taken, Headers] | None:
    """What the fast path makes of a request, with its headers; None: the app's.

    Only bodies of a declared length within the body limit: the limit's middleware, behind
    this layer, refuses the others (and uvicorn holds a body to its declared length)."""
    if scope["type"] != "http" or scope["method"] != "POST":
        return None
    path = scope["path"]
    for pattern, take in ROUTES:
        match = pattern.match(path)
        if match is None:
            continue
        length = declared_length(scope)
        if length is None or not 0 <= length <= scope["app"].state.settings.max_body_bytes:
            return None
        headers: Headers = {}
        for name, value in scope["headers"]:
            headers.setdefault(name, value)  # the first of a repeated header, as Starlette
        if b"transfer-encoding" in headers:  # framed by its coding, not its length: the stack's
            return None
        taken = take(match, scope, headers)
        return None if taken is None else (taken, headers)
    return None


class FastPath:
    """Answer the hot inference calls directly; hand everything else to `app`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = _taken(scope)
        if found is None:
            await self.app(scope, receive, send)
            return
        taken, headers = found
        started = time.perf_counter()
        state = scope.setdefault("state", {})
        try:  # from the headers, before a byte of the body is read
            caller = await admit(scope, "predict")
        except ProblemError as exc:  # answered by `Admission`, the body left unread
            state[REFUSAL] = Refusal(exc, body_read=False)
            await self.app(scope, receive, send)
            return
        except Exception:  # not a refusal (Redis down, say): the stack meets it and answers it
            logger.warning("fast path could not admit; the route takes the request", exc_info=True)
            await self.app(scope, receive, send)
            return
        limit = scope["app"].state.settings.max_body_bytes
        body, complete = await _read_body(receive, limit)
        if body is None:  # the client left before its body arrived: nobody to answer
            return
        if not complete:  # past the limit: the limit's middleware refuses it, reading no more
            await self.app(scope, _replay(body, receive, more_body=True), send)
            return
        try:
            answer = await self._answer(scope, headers, body, taken, caller)
        except ProblemError as exc:  # answered as the route would, without parsing again
            state[REFUSAL] = Refusal(exc, body_read=True)
            answer = None
        except Exception:
            # not a refusal: the route will meet it again and report it (a 500)
            logger.warning("fast path failed; the route takes the request", exc_info=True)
            answer = None
        if answer is None:
            await self.app(scope, _replay(body, receive), send)
            return
        content, extra = answer
        response_headers = [(b"content-length", str(len(content)).encode())]
        response_headers += [(k.lower().encode(), v.encode()) for k, v in extra.items()]
        await send({"type": "http.response.start", "status": 200, "headers": response_headers})
        await send({"type": "http.response.body", "body": content})
        observe_request("POST", taken.route, 200, time.perf_counter() - started)

    async def _answer(
        self, scope: Scope, headers: Headers, body: bytes, taken: Taken, caller: Caller
    ) -> Answer:
        return await taken.handle(inference_of(scope["app"].state), caller, body)


async def _read_body(receive: Receive, limit: int) -> tuple[bytes | None, bool]:
    """The request body counted as it arrives: (the body, True); (what came, False) once past
    `limit` bytes, whatever the request declared; (None, False) on a disconnect."""
    chunks: list[bytes] = []
    received = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None, False
        chunk = message.get("body", b"")
        chunks.append(chunk)
        received += len(chunk)
        if received > limit:
            return b"".join(chunks), False
        if not message.get("more_body", False):
            return b"".join(chunks), True


def _replay(body: bytes, receive: Receive, *, more_body: bool = False) -> Receive:
    """A receive that gives `body` once, then the real one's messages (the rest of the body,
    or a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": more_body}
        return await receive()

    return replay
