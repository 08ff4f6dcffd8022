"""Cursors of paged listings (`GET /v1/jobs`, `/v1/sweeps`, `/v1/checkpoints`) as clients see
them: an index's `(score, member)` position, opaque (URL-safe base64), checked when it comes
back."""

from __future__ import annotations

import base64
import binascii
import re

from service.errors import BadRequestError
from workers.store.job_index import JOB_ID_RE, Cursor, format_cursor, parse_cursor


def encode_cursor(cursor: Cursor) -> str:
    return base64.urlsafe_b64encode(format_cursor(cursor).encode()).decode().rstrip("=")


def decode_cursor(cursor: str, member: re.Pattern[str] = JOB_ID_RE) -> Cursor:
    """The position a `next_cursor` names; a 422 problem for anything this API did not give
    out (`member`: the pattern of the listing's ids)."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        return parse_cursor(raw, member)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadRequestError(
            "cursor is not one this API gave out; use next_cursor from the previous page"
        ) from None
