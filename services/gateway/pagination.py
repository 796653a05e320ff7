"""Cursor pages, newest first, for every list in the API (jobs, places, actions, webhooks).

The cursor is the last row's (created_at, id): rows inserted meanwhile never shift a page, and
a page boundary between two rows of the same instant is still exact.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Select, and_, or_

from shared.errors import BadRequest
from shared.text import control_character

Q = TypeVar("Q", bound=Select[Any])


def encode_cursor(created_at: datetime, row_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), row_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """A cursor is client input: what it decodes to reaches SQL, so a NUL in its id or a
    timestamp that overflows in UTC (year 1 at +01:00) is refused here, not a 500 there."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created, row_id = json.loads(base64.urlsafe_b64decode(padded))
        if not isinstance(created, str) or not isinstance(row_id, str):
            raise TypeError("a cursor holds a timestamp and an id")
        if control_character(row_id) is not None:
            raise ValueError("control character in the cursor's id")
        at = datetime.fromisoformat(created)
        return (at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)), row_id
    except (ValueError, TypeError, OverflowError, binascii.Error) as exc:
        raise BadRequest("cursor is not one this API returned", code="invalid_cursor") from exc


def newest_first(query: Q, created_at: Any, row_id: Any, *, limit: int,
                 cursor: str | None) -> Q:
    """``query`` ordered newest first, after ``cursor``, one row more than ``limit`` (which
    says whether there is a next page)."""
    if cursor:
        after_at, after_id = decode_cursor(cursor)
        query = query.where(or_(created_at < after_at,
                                and_(created_at == after_at, row_id < after_id)))
    return query.order_by(created_at.desc(), row_id.desc()).limit(limit + 1)
