"""Text a client sends must be storable by every database and harmless wherever it is shown.

PostgreSQL refuses NUL in text (``CharacterNotInRepertoireError``), lone surrogates cannot be
encoded as UTF-8 at all, and other control characters end up in PNG text chunks, file names
and logs where they make no sense. They are refused at the edge, naming the field, instead of
failing a write later (a 500, or an event the consumer can never apply).

Every request model derives from :class:`RequestModel`, whose one validator checks every
string in every field, nested lists and dict keys included, so a new field is covered without
thought. Fields meant to hold several lines (prompts, captions, TOML) are marked
:data:`MULTILINE` and may also contain tab, line feed and carriage return.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

# C0 controls, DEL, C1 controls and UTF-16 surrogates (only reachable through JSON escapes).
_ANY_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_CONTROL_BUT_LAYOUT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


@dataclass(frozen=True)
class _Multiline:
    """Marks a field whose text may span lines (``Annotated[str, MULTILINE]``)."""


MULTILINE = _Multiline()


def control_character(text: str, *, multiline: bool = False) -> str | None:
    """Describe the first character ``text`` may not hold (``U+0000 at position 3``), if any."""
    found = (_CONTROL_BUT_LAYOUT if multiline else _ANY_CONTROL).search(text)
    if found is None:
        return None
    return f"U+{ord(found.group()):04X} at position {found.start()}"


def printable(text: str) -> str:
    """``text`` with each refused character shown as ``?``, to name a field or key in an error."""
    return _ANY_CONTROL.sub("?", text)


def _refusal(found: str, *, multiline: bool) -> PydanticCustomError:
    allowed = ("only tab and line breaks are allowed" if multiline
               else "this field is one line of printable text")
    return PydanticCustomError("control_character", "contains a control character ({found}); "
                               "{allowed}", {"found": found, "allowed": allowed})


Loc = tuple[str | int, ...]


def find_control_character(value: Any, *, multiline: bool = False) -> tuple[Loc, str] | None:
    """The first refused character anywhere in ``value`` (strings, lists, dict keys and values)
    as ``(location, description)``; the location is ``()`` for ``value`` itself, else e.g.
    ``(2,)`` or ``("people", 0, "name")``. Nested models are left to their own validator."""
    if isinstance(value, str):
        found = control_character(value, multiline=multiline)
        return ((), found) if found is not None else None
    if isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(key, str) and (found := control_character(key)) is not None:
                return ((printable(key),), f"{found} of the key")
            if (hit := find_control_character(item, multiline=multiline)) is not None:
                return ((str(key), *hit[0]), hit[1])
        return None
    if isinstance(value, list | tuple | set | frozenset):
        for index, item in enumerate(value):
            if (hit := find_control_character(item, multiline=multiline)) is not None:
                return ((index, *hit[0]), hit[1])
    return None


class RequestModel(BaseModel):
    """Base of every model a client sends: no field may carry control characters, and no
    number may be NaN or infinite (Python's JSON parser accepts the non-JSON literals ``NaN``
    and ``Infinity``, and ``1e999`` overflows to infinity), which no option means and which
    PostgreSQL's JSON and our own responses cannot hold."""

    model_config = ConfigDict(allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _refuse_control_characters(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None or isinstance(value, bool | int | float | BaseModel):
            return value
        field = cls.model_fields.get(info.field_name or "")
        multiline = field is not None and any(isinstance(m, _Multiline) for m in field.metadata)
        hit = find_control_character(value, multiline=multiline)
        if hit is not None:
            # A ValidationError raised here is nested under this field's location, so the
            # error names the very element (``tags.3``), not just the list.
            loc, found = hit
            raise ValidationError.from_exception_data(cls.__name__, [InitErrorDetails(
                type=_refusal(found, multiline=multiline), loc=loc, input=value)])
        return value
