"""Reading what a provider reports a task used (``providers.contract.Usage``), defensively.

Usage fields arrive as loosely typed JSON (a number, a numeric string, ``null``, or garbage): a
value that is not a finite, non-negative number is treated as absent, never as zero, so a bad field
can only leave ``cost.reported`` empty, not make a job look free.
"""

from __future__ import annotations

import math
from typing import Any

from providers.contract import Usage


def amount(value: Any) -> float | None:
    """A finite, non-negative number (``"3.5"`` too), else ``None``."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) and number >= 0 else None


def count(value: Any) -> int | None:
    """A non-negative whole number (``2``, ``2.0``, ``"2"``), else ``None``."""
    number = amount(value)
    return int(number) if number is not None and number.is_integer() else None


def usage(*, cost: float | None = None, currency: str = "USD", compute_seconds: float | None = None,
          tokens: int | None = None, outputs: int | None = None, seconds: float | None = None) -> Usage | None:
    """A ``Usage`` when at least one field is known, else ``None`` (the provider reported nothing)."""
    if cost is None and compute_seconds is None and tokens is None and outputs is None and seconds is None:
        return None
    return Usage(cost=cost, currency=currency, compute_seconds=compute_seconds, tokens=tokens, outputs=outputs,
                 seconds=seconds)


def credits_in_usd(credits: Any, usd_per_credit: Any) -> float | None:
    """Credits a provider says it charged, in USD at ``usd_per_credit`` (``None`` when either is unknown)."""
    spent, rate = amount(credits), amount(usd_per_credit)
    return None if spent is None or rate is None else round(spent * rate, 6)
