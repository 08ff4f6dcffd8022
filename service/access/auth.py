"""Who may call what: principals, scopes, tenants and the predict rate, one rule per route.

Every route of `/v1` and `/v2` (but the V2 health probes) declares the scope it needs with
`Allow(scope)`: `read` (jobs, events, curves, checkpoints' manifests and files, models),
`predict` (predict, explain, V2 infer), `train` (submit and cancel jobs and sweeps, evaluate,
delete checkpoints) or `admin` (all of them, every tenant's). The rule is in the OpenAPI
document (`security: [{"ApiKey": ["train"]}]`), so the docs show it and a test checks that
no route is without one.

Keys come from the keys file and `CNNSERVE_API_KEYS` (`service.access.keys`). With neither, the API
is open: every call is allowed and nothing is owned (today's behaviour, with a warning at
start-up). With keys, a call needs a key whose principal has the scope, unless the operator
made reads or predictions public (`CNNSERVE_PUBLIC_READ`, `CNNSERVE_PUBLIC_PREDICT`).

Tenants: a principal that is not an admin sees only what it made (`Caller.within`); anything
else answers 404 exactly as what does not exist, so ids cannot be probed. What a public call
may read or classify is everyone's: the operator opened it to all.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from limits import RateLimitItem, parse
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import storage_from_string
from starlette.requests import HTTPConnection

from service.access import audit
from service.access.keys import KeyRing, Principal
from service.errors import (
    ForbiddenError,
    RateLimitedError,
    UnauthorizedError,
)
from workers.settings import Settings

logger = logging.getLogger(__name__)

#: What a route may ask for: a scope, or `any` (whoever calls, even without a key).
Rule = Literal["read", "predict", "train", "admin", "any"]


def bearer_credentials(authorization: str | None) -> HTTPAuthorizationCredentials | None:
    """The key an `Authorization: Bearer <key>` header sends (None: no such header), read as
    `HTTPBearer(auto_error=False)` reads it; the routes and the fast path both read it here."""
    scheme, token = get_authorization_scheme_param(authorization)
    if not (authorization and scheme and token) or scheme.lower() != "bearer":
        return None
    return HTTPAuthorizationCredentials(scheme=scheme, credentials=token)


class BearerKey(HTTPBearer):
    """The OpenAPI security scheme (the docs page's "Authorize" button) that reads the header
    with `bearer_credentials`; refusing is `authorize`'s (our problems, not FastAPI's)."""

    async def __call__(self, request: HTTPConnection) -> HTTPAuthorizationCredentials | None:
        return bearer_credentials(request.headers.get("Authorization"))


bearer_scheme = BearerKey(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key (`cnnserve keys add`, or one of CNNSERVE_API_KEYS), sent as "
    "`Authorization: Bearer <key>`. Each operation lists the scope it needs.",
)

#: Everyone, on a server without keys: may do everything, owns nothing, sees everything.
OPEN = Principal(name=None, scopes=frozenset({"admin"}))

WWW_AUTHENTICATE = 'Bearer realm="cnnserve"'

#: Whom callers without a key count as, for rates and streams: no principal can have this
#: name (principal names start with a letter or digit).
KEYLESS = ":keyless"


@dataclass(frozen=True)
class Caller:
    """The principal of one request, and whose things it may see (`within`: None, all)."""

    principal: Principal
    within: str | None

    @property
    def owner(self) -> str | None:
        """What the things this request makes record as their owner."""
        return self.principal.name

    def sees(self, owner: str | None) -> bool:
        return self.within is None or owner == self.within

    @property
    def rate_identity(self) -> str:
        """Whose predict budget a call spends: its principal's, or the one that all callers
        without a key share (under a name no principal can have)."""
        return self.principal.name or KEYLESS


# --- the predict rate ------------------------------------------------------------------------


class PredictLimiter:
    """Predict calls per principal in a moving window kept in Redis (`limits`), so every API
    process counts against the same budget."""

    def __init__(self, redis_url: str) -> None:
        storage = storage_from_string(
            f"async+{redis_url}", implementation="redispy", key_prefix="cnnserve:ratelimit"
        )
        self._limiter = MovingWindowRateLimiter(storage)
        self._items: dict[str, RateLimitItem] = {}

    def _item(self, rate: str) -> RateLimitItem:
        item = self._items.get(rate)
        if item is None:
            item = self._items[rate] = parse(rate)
        return item

    async def hit(self, who: str, rate: str) -> None:
        """Count one call of `who`; a 429 with `Retry-After` and `RateLimit-*` past `rate`."""
        item = self._item(rate)
        if await self._limiter.hit(item, "predict", who):
            return
        stats = await self._limiter.get_window_stats(item, "predict", who)
        retry = max(1, math.ceil(stats.reset_time - time.time()))
        window = item.get_expiry()
        name = "callers without a key" if who == KEYLESS else who
        raise RateLimitedError(
            f"{name} made {item.amount} predict calls in the last {window} s, its limit "
            f"(predict_rate) is {rate}; retry in {retry} s",
            headers={
                "Retry-After": str(retry),
                "RateLimit-Limit": str(item.amount),
                "RateLimit-Remaining": "0",
                "RateLimit-Reset": str(retry),
                "RateLimit-Policy": f"{item.amount};w={window}",
            },
        )


# --- authorisation -----------------------------------------------------------------------------


def _public(rule: Rule, settings: Settings) -> bool:
    return (rule == "read" and settings.public_read) or (
        rule == "predict" and settings.public_predict
    )


def _unauthorized(detail: str, error: str | None = None) -> UnauthorizedError:
    header = WWW_AUTHENTICATE
    if error is not None:
        header += f', error="{error}"'
    return UnauthorizedError(detail, headers={"WWW-Authenticate": header})


def authorize(
    ring: KeyRing,
    settings: Settings,
    rule: Rule,
    credentials: HTTPAuthorizationCredentials | None,
) -> Caller:
    """The caller of a request with these credentials, for a route with this rule; a 401
    (no key, or a wrong one) or 403 (a key without the scope) problem otherwise."""
    if not ring.configured:
        return Caller(OPEN, None)
    if credentials is None:
        if rule == "any" or _public(rule, settings):
            public = {s for s in ("read", "predict") if _public(s, settings)}
            return Caller(Principal(name=None, scopes=frozenset(public)), None)
        raise _unauthorized(
            f"this call needs an API key with the {rule} scope: send "
            "'Authorization: Bearer <key>' (the dashboard and /docs ask for one)"
        )
    principal = ring.authenticate(credentials.credentials)
    if principal is None:
        raise _unauthorized(
            "the API key is not valid (mistyped, revoked or never issued); check the key you "
            "send in 'Authorization: Bearer <key>'",
            "invalid_token",
        )
    if rule != "any" and not principal.may(rule):
        may = ", ".join(principal.scope_list()) or "nothing"
        refused = ForbiddenError(
            f"principal {principal.name} may {may}; this call needs the {rule} scope (ask an "
            "admin for a key with it)",
            scope=rule,
        )
        refused.principal = principal  # for the audit line, not the response
        raise refused
    within = None if principal.admin or _public(rule, settings) else principal.name
    return Caller(principal, within)


#: The request-state name under which a predict caller admitted and counted before the route
#: ran (by `service.api.admission` or the fast path) is left, so `Allow` does neither twice.
ADMITTED = "admitted_caller"


@dataclass(frozen=True)
class AccessRule:
    """What a route's `Allow` asks of its callers: the rule and the action it audits."""

    rule: Rule
    audit_as: str | None


#: Each `Allow` dependency's rule, by its function: what `access_rule` reads.
_RULES: dict[Any, AccessRule] = {}


def access_rule(call: Any) -> AccessRule | None:
    """The rule of an `Allow` dependency's function (None: not one), for code that admits a
    caller before FastAPI resolves the route's dependencies (`service.api.admission`)."""
    return _RULES.get(call)


async def count_prediction(app_state: Any, caller: Caller) -> None:
    """Count one predict call against the caller's rate; a 429 problem past it."""
    named = caller.principal.name is not None  # a key's holder: its own rate
    rate = caller.principal.predict_rate if named else app_state.settings.predict_rate
    if rate:
        await app_state.predict_limiter.hit(caller.rate_identity, rate)


def Allow(rule: Rule, *, audit_as: str | None = None) -> Any:
    """The dependency that lets a route's callers through: `dependencies=[Allow("read")]`.

    With `audit_as`, the request is an attempted state change and gets an audit line.
    """

    async def allow(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
    ) -> Caller:
        admitted: Caller | None = getattr(request.state, ADMITTED, None)
        if admitted is not None and rule == "predict":  # the fast path admitted and counted it
            request.state.caller = admitted
            return admitted
        app_state = request.app.state
        try:
            caller = authorize(app_state.key_ring, app_state.settings, rule, credentials)
        except (UnauthorizedError, ForbiddenError) as exc:
            if audit_as is not None:
                who: Principal | None = getattr(exc, "principal", None)
                name, key_id = (who.name, who.key_id) if who is not None else (None, None)
                audit.note(request, audit_as, name, key_id)
            raise
        if audit_as is not None:
            audit.note(request, audit_as, caller.principal.name, caller.principal.key_id)
        if rule == "predict":
            await count_prediction(app_state, caller)
        request.state.caller = caller
        return caller

    allow.__name__ = f"allow_{rule}"
    _RULES[allow] = AccessRule(rule, audit_as)
    scopes = [] if rule == "any" else [rule]
    return Security(allow, scopes=scopes)


async def current_caller(request: Request) -> Caller:
    """The caller `Allow` let through (a route without a rule is a bug: 500, and a test).

    `async` on purpose, like `Allow`'s own function: FastAPI runs a plain `def` dependency on
    the thread pool, a hop that costs more than this lookup on every call."""
    caller: Caller | None = getattr(request.state, "caller", None)
    if caller is None:
        raise RuntimeError(f"{request.method} {request.url.path} has no access rule (Allow)")
    return caller


CallerDep = Annotated[Caller, Depends(current_caller)]


def log_auth_mode(settings: Settings, ring: KeyRing) -> None:
    """Say at start-up how the API is guarded; never prints a key or a hash."""
    if not ring.configured:
        logger.warning(
            "no API keys (CNNSERVE_API_KEYS_FILE, CNNSERVE_API_KEYS): the API is open and "
            "anyone who can reach it may submit, cancel and delete; `cnnserve keys add NAME "
            "--scopes read,predict,train` makes one"
        )
        return
    principals, keys = ring.counts
    legacy = len(settings.api_key_list)
    opened = [name for name, on in (("reads", settings.public_read), ("predictions",
              settings.public_predict)) if on]  # fmt: skip
    logger.info(
        "API keys required: %d principal(s) with %d key(s) in the keys file, %d admin key(s) "
        "in CNNSERVE_API_KEYS; public: %s",
        principals,
        keys,
        legacy,
        ", ".join(opened) or "nothing",
    )
