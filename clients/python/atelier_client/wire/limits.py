"""Bounds on free-form JSON: what a tenant may send (``metadata``, ``input.options``) and what Atelier
keeps of what a provider says. Everything stored must read back: pydantic refuses nesting deeper than
about 200 levels and JSON cannot encode a lone surrogate, so both are refused (or cut) on the way in.

The walks are iterative: a body nested 10,000 levels deep must cost a loop, not a RecursionError.
"""

from __future__ import annotations

from typing import Any

MAX_DEPTH = 16  # nesting levels a tenant's metadata or options may use
MAX_OPTIONS_BYTES = 64 * 1024
PROVIDER_DEPTH = 12  # levels kept of a provider's free-form answer (error details, output metadata)
PROVIDER_TEXT = 2000  # characters kept of one provider string (an error message, a status)
PROVIDER_BYTES = 16 * 1024  # characters kept of a provider's free-form answer as a whole


def _children(value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [(f".{k}", v) for k, v in value.items()] + [(f".{k}", k) for k in value]
    if isinstance(value, list | tuple):
        return [(f"[{i}]", v) for i, v in enumerate(value)]
    return []


def problem(value: Any, *, max_depth: int = MAX_DEPTH) -> tuple[str, str] | None:
    """``(path, message)`` for the first thing that would not read back: nesting deeper than
    ``max_depth``, or a string with an unpaired surrogate (``"\\ud800"``). ``None`` when fine."""
    stack: list[tuple[str, Any, int]] = [("", value, 0)]
    while stack:
        path, item, depth = stack.pop()
        if isinstance(item, str):
            if _lone_surrogate(item):
                return path, "contains an unpaired surrogate (\\ud800-\\udfff): send valid Unicode"
            continue
        if isinstance(item, dict | list | tuple):
            if depth >= max_depth:
                return path, f"is nested more than {max_depth} levels deep"
            stack.extend((path + step, child, depth + 1) for step, child in _children(item))
    return None


def _lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def clean_text(text: str, limit: int = PROVIDER_TEXT) -> str:
    """A provider's string as Atelier keeps it: valid Unicode, at most ``limit`` characters."""
    if _lone_surrogate(text):
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text if len(text) <= limit else text[:limit] + f"… ({len(text) - limit} more characters)"


def bounded(value: Any, *, depth: int = PROVIDER_DEPTH, text: int = PROVIDER_TEXT,
            budget: int = PROVIDER_BYTES) -> Any:
    """A provider's free-form JSON cut to what Atelier keeps: ``depth`` levels, strings of ``text``
    characters, about ``budget`` characters in all; deeper or later parts become ``"…"``."""
    left = [budget]

    def cut(item: Any, level: int) -> Any:
        if left[0] <= 0:
            return "…"
        if isinstance(item, str):
            kept = clean_text(item, min(text, max(0, left[0])))
            left[0] -= len(kept)
            return kept
        if isinstance(item, dict | list | tuple):
            if level >= depth:
                left[0] -= 1
                return "…"
            if isinstance(item, dict):
                return {clean_text(str(k), 200): cut(v, level + 1) for k, v in list(item.items())[:200]}
            return [cut(v, level + 1) for v in list(item)[:200]]
        left[0] -= 8
        return item

    return cut(value, 0) if _deep_or_big(value, depth) else value


def _deep_or_big(value: Any, depth: int) -> bool:
    """Whether ``bounded`` has anything to cut (the common small answer is kept as it is, uncopied)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    size = 0
    while stack:
        item, level = stack.pop()
        if isinstance(item, str):
            size += len(item)
            if len(item) > PROVIDER_TEXT or _lone_surrogate(item):
                return True
        elif isinstance(item, dict | list | tuple):
            if level >= depth or len(item) > 200:
                return True
            stack.extend((child, level + 1) for _, child in _children(item))
        else:
            size += 8
        if size > PROVIDER_BYTES:
            return True
    return False
