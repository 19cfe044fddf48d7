"""Request field types that take only what their JSON Schema says.

Pydantic's lax mode reads ``0`` as ``false`` and a Unix time as a date; a client generated from
``/openapi.json`` never sends those, and a hand-written one that does has a bug worth a 422 naming
the field. Booleans use pydantic's ``StrictBool``, integers ``Integer``; dates and date-times in
query strings ``IsoDate``/``IsoDatetime`` (ISO 8601 only).
"""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Annotated, Any

from pydantic import BeforeValidator

_NUMBER = re.compile(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*")


def _iso_only(value: Any) -> Any:
    if isinstance(value, bool | int | float) or (isinstance(value, str) and _NUMBER.fullmatch(value)):
        raise ValueError("an ISO 8601 date or date-time is expected (2026-01-31 or 2026-01-31T12:00:00Z)")
    return value


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("an integer is expected, not a boolean")
    return value


# An integer that is not a boolean (``StrictInt`` would also refuse ``5.0``, which JSON Schema calls an integer).
Integer = Annotated[int, BeforeValidator(_not_bool)]
IsoDatetime = Annotated[datetime, BeforeValidator(_iso_only)]
IsoDate = Annotated[date, BeforeValidator(_iso_only)]
