"""Admission before the body: a request that carries a body is authorised from its headers
(key, scope, predict rate) before the app reads a byte of it.

FastAPI reads a declared body (JSON, a form) before it resolves a route's dependencies, and
uvicorn answers `Expect: 100-continue` with `100 Continue` on the app's first `receive()`: left
to the routes' `Allow(scope)`, a caller without a key could make the server take a whole body
(up to the limit) before hearing 401. This layer, the innermost of the middleware, finds the
route a request matches and the rule its `Allow` declares (`auth.access_rule`), and runs the
same `authorize` (and, for `predict`, the rate) first. A refusal is answered here as the route
would answer it (`handlers.problem_of`: a problem document, the protocol's `{"error": ...}`
under `/v2`, `WWW-Authenticate`, the audit line), with `Connection: close`, since the body stays
unread. A predict caller it admitted (and counted) is left in the request's state, so `Allow`
counts it once.

The fast path, in front of the stack, admits its calls the same way before reading their body;
what it refuses, before or after reading, it leaves here (`REFUSAL`) to be answered, so a body
is never read, nor parsed, twice.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from fastapi.routing import APIRoute, iter_route_contexts
from starlette.requests import Request
from starlette.routing import compile_path
from starlette.types import ASGIApp, Receive, Scope, Send

from service.access import audit
from service.access.auth import (
    ADMITTED,
    AccessRule,
    Caller,
    access_rule,
    authorize,
    bearer_credentials,
    count_prediction,
)
from service.api.handlers import problem_of
from service.errors import ProblemError

logger = logging.getLogger(__name__)

#: The request-state name under which the fast path leaves a `Refusal` for this layer to answer.
REFUSAL = "fast_path_refusal"
#: The methods whose requests may carry a body the app would read.
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass(frozen=True)
class Refusal:
    """A refusal the fast path met, to be answered as the route would: whether it read the
    body first (if not, the connection closes after the answer)."""

    error: ProblemError
    body_read: bool


@dataclass(frozen=True)
class GuardedRoute:
    """A route that may read a body: its full path's pattern, methods and access rule."""

    pattern: re.Pattern[str]
    convertors: dict[str, Any]
    methods: frozenset[str]
    access: AccessRule | None
    #: Where the request metrics read the route's template (`path`) from a refused request.
    context: Any


def guarded_routes(app: Any) -> list[GuardedRoute]:
    """The app's routes that take a body-bearing method, in matching order."""
    out = []
    for context in iter_route_contexts(app.routes):
        route = context.original_route
        methods = frozenset(route.methods or ()) if isinstance(route, APIRoute) else frozenset()
        if not methods & BODY_METHODS:
            continue
        assert isinstance(route, APIRoute)
        rules = (access_rule(d.call) for d in route.dependant.dependencies)
        pattern, _, convertors = compile_path(context.path or route.path)
        access = next((r for r in rules if r is not None), None)
        out.append(GuardedRoute(pattern, convertors, methods, access, context))
    return out


def has_body(scope: Scope) -> bool:
    """Whether a request declares a body (a length above 0, or a transfer coding)."""
    if scope["method"] not in BODY_METHODS:
        return False
    for name, value in scope["headers"]:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


class Admission:
    """Authorise a body-bearing request from its headers before the app may read its body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._routes: list[GuardedRoute] | None = None

    def _match(self, scope: Scope) -> tuple[GuardedRoute, dict[str, Any]] | None:
        """The route a request matches, when it has an access rule, and its path parameters."""
        if self._routes is None:  # the routes are fixed once the app serves
            self._routes = guarded_routes(scope["app"])
        path, method = scope["path"], scope["method"]
        for route in self._routes:
            found = route.pattern.match(path)
            if found is None or method not in route.methods:
                continue
            if route.access is None:
                return None
            params = {k: route.convertors[k].convert(v) for k, v in found.groupdict().items()}
            return route, params
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        refusal: Refusal | None = state.pop(REFUSAL, None)
        if refusal is None and not has_body(scope):
            await self.app(scope, receive, send)
            return
        matched = self._match(scope)
        if refusal is None and matched is not None and ADMITTED not in state:
            assert matched[0].access is not None
            refused = await self._admit(scope, matched[0].access.rule)
            refusal = None if refused is None else Refusal(refused, body_read=False)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        if matched is not None:
            route, params = matched
            scope.setdefault("route", route.context)  # the metrics' label
            if route.access is not None and route.access.audit_as is not None:
                who = getattr(refusal.error, "principal", None)
                request = Request({**scope, "path_params": params})
                name, key_id = (who.name, who.key_id) if who is not None else (None, None)
                audit.note(request, route.access.audit_as, name, key_id)
        response = problem_of(refusal.error, scope["path"])
        if not refusal.body_read:  # the rest of the body is not read: the connection is unusable
            response.headers["Connection"] = "close"
        await response(scope, receive, send)

    async def _admit(self, scope: Scope, rule: Any) -> ProblemError | None:
        """None when the request's key may call a route with this rule (a predict call is
        counted against its rate and left admitted); the refusal otherwise."""
        try:
            await admit(scope, rule)
        except ProblemError as exc:
            return exc
        except Exception:  # not a refusal (Redis down, say): the route's `Allow` meets it and
            # the app's handlers answer it (a 503), after the body is read
            logger.warning("could not admit before the body; the route will", exc_info=True)
        return None


async def admit(scope: Scope, rule: Any) -> Caller:
    """The caller of a request, from its `Authorization` header, allowed `rule` (a scope, or
    `Allow`'s rule); a predict call is counted against its rate and left admitted in the
    request's state (so that the route's `Allow` does neither again). Raises the refusal."""
    app_state = scope["app"].state
    authorization = next((v for k, v in scope["headers"] if k == b"authorization"), None)
    credentials = bearer_credentials(authorization.decode("latin-1") if authorization else None)
    caller = authorize(app_state.key_ring, app_state.settings, rule, credentials)
    if rule == "predict":
        await count_prediction(app_state, caller)
        state = scope.setdefault("state", {})
        state[ADMITTED] = state["caller"] = caller
    return caller
