"""Page cursors of the listings (`GET /v1/jobs`, `GET /v1/sweeps`): the store's position, opaque
to clients (URL-safe base64), and a 422 for any cursor this API did not give out."""

from __future__ import annotations

import base64
import binascii

from service.errors import BadRequestError
from workers.store.job_index import Cursor, format_cursor, parse_cursor


def encode_cursor(cursor: Cursor) -> str:
    """A listing position as the `next_cursor` a page answers."""
    return base64.urlsafe_b64encode(format_cursor(cursor).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> Cursor:
    """The listing position a client's `cursor` names."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        return parse_cursor(raw)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadRequestError(
            "cursor is not one this API gave out; use next_cursor from the previous page"
        ) from None
