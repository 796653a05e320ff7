"""The ``Idempotency-Key`` header every job submission takes.

A key is stored with the job and is unique per tenant. An empty key used to be stored as
``""``, so the tenant's next empty key hit the unique constraint (a 500); a key is therefore
1-200 printable ASCII characters, and anything else is refused before any work is done rather
than treated as absent: a client that sends a key expects its retries to be deduplicated.
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Depends, Header
from pydantic import WithJsonSchema

from shared.errors import BadRequest

MAX_KEY_LENGTH = 200  # the column's width
# Visible ASCII, inner spaces allowed (servers strip outer whitespace from header values).
KEY_PATTERN = r"^[!-~]([ -~]*[!-~])?$"
_KEY = re.compile(KEY_PATTERN)


async def idempotency_key(
    key: Annotated[str | None, WithJsonSchema(
        {"type": "string", "minLength": 1, "maxLength": MAX_KEY_LENGTH, "pattern": KEY_PATTERN}
    ), Header(
        alias="Idempotency-Key",
        description="Same key and body return the same job (header `Idempotent-Replayed: "
                    "true`); same key with another body is a 409. 1-200 printable ASCII "
                    "characters, e.g. a UUID; an empty or malformed key is a 400.",
    )] = None,
) -> str | None:
    if key is None:
        return None
    if len(key) > MAX_KEY_LENGTH or not _KEY.fullmatch(key):
        reason = ("is empty" if not key else
                  f"is longer than {MAX_KEY_LENGTH} characters" if len(key) > MAX_KEY_LENGTH
                  else "holds characters other than printable ASCII")
        raise BadRequest(
            f"Idempotency-Key {reason}; send 1-{MAX_KEY_LENGTH} printable ASCII characters "
            "(a UUID, say) or leave the header out", code="invalid_idempotency_key",
            errors=[{"field": "header.Idempotency-Key", "message": f"the key {reason}",
                     "type": "invalid_idempotency_key"}],
        )
    return key


IdempotencyKeyDep = Annotated[str | None, Depends(idempotency_key)]
