"""Cursors of paged listings (`GET /v1/jobs`, `/v1/sweeps`, `/v1/checkpoints`) as clients see
them: an index's `(score, member)` position, opaque (URL-safe base64), and a 422 for any cursor
this API did not give out."""

from __future__ import annotations

import base64
import binascii
import re

from service.errors import BadRequestError
from workers.contracts import JOB_ID_RE
from workers.store.job_index import Cursor, format_cursor, parse_cursor


def encode_cursor(cursor: Cursor) -> str:
    """A listing position as the `next_cursor` a page answers."""
    return base64.urlsafe_b64encode(format_cursor(cursor).encode()).decode().rstrip("=")


def decode_cursor(cursor: str, member: re.Pattern[str] = JOB_ID_RE) -> Cursor:
    """The listing position a client's `cursor` names (`member`: the pattern of the listing's
    ids)."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        return parse_cursor(raw, member)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadRequestError(
            "cursor is not one this API gave out; use next_cursor from the previous page"
        ) from None
