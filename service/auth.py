"""API keys: `Authorization: Bearer <key>` guards every state-changing call when keys are set.

Keys come from `CNNSERVE_API_KEYS` (comma-separated). With none configured the API is open and
a warning is logged at start-up. Keys are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import logging
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.errors import UnauthorizedError
from workers.settings import Settings

logger = logging.getLogger(__name__)

#: The OpenAPI security scheme (the docs page's "Authorize" button); errors are ours.
bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key from CNNSERVE_API_KEYS, sent as `Authorization: Bearer <key>`.",
)


def key_matches(given: str, keys: list[str]) -> bool:
    """Whether `given` equals one of `keys`, comparing every key in constant time."""
    given_b = given.encode()
    found = False
    for key in keys:
        # no short-circuit: the time taken does not tell which key, or how much of it, matched
        found |= hmac.compare_digest(given_b, key.encode())
    return found


def log_auth_mode(settings: Settings) -> None:
    """Say at start-up whether the API is guarded; never prints a key."""
    keys = settings.api_key_list
    if not keys:
        logger.warning(
            "CNNSERVE_API_KEYS is not set: the API is open and anyone who can reach it "
            "may submit, cancel and delete; set CNNSERVE_API_KEYS=key1,key2 to guard it"
        )
    else:
        logger.info("API keys configured (%d); state-changing calls need a Bearer key", len(keys))


async def require_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> None:
    """Let the call through when keys are off or a configured key is sent; 401 otherwise."""
    settings: Settings = request.app.state.settings
    keys = settings.api_key_list
    if not keys:
        return
    if credentials is None:
        raise UnauthorizedError(
            "this call changes state and needs an API key: send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": 'Bearer realm="cnnserve"'},
        )
    if not key_matches(credentials.credentials, keys):
        raise UnauthorizedError(
            "the API key is not valid; check the key you send in 'Authorization: Bearer <key>'",
            headers={
                "WWW-Authenticate": 'Bearer realm="cnnserve", error="invalid_token", '
                'error_description="the API key is not valid"'
            },
        )


#: Add to a route's or router's `dependencies=[RequireKey]` to guard it.
RequireKey = Depends(require_key)
