"""Every field an adapter would refuse, not only the first.

An adapter's ``validate`` raises ``InvalidInput`` at the first field it refuses; a client fixing
one field at a time would need as many round trips as there are mistakes. ``invalid_inputs`` asks
again with the refused field set aside (dropped, or replaced by a neutral value where dropping
would change what the request is, e.g. an image-to-video request without its image), and repeats.

Only what the client wrote is reported after the first error: a field that setting another aside
made necessary (a prompt that text-to-video needs once the image is gone) is not the client's
mistake. A refusal of the model, kind, operation or source ends the search: every later check
depends on them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from providers.contract import GenerationRequest, MediaInput, Provider
from providers.errors import InvalidInput

MAX_ERRORS = 20
# Stand-ins for a refused field where dropping it would change what is asked (never sent anywhere:
# only ``validate`` sees them).
NEUTRAL: dict[str, list[Any]] = {
    "prompt": [None, "a lighthouse at dusk"],
    "negative_prompt": [None, "blurry"],
    "image_url": ["https://example.com/atelier-validation.png", None],
}
COMMON = frozenset(f.name for f in dataclasses.fields(MediaInput) if f.name != "options")


def invalid_inputs(provider: Provider, request: GenerationRequest) -> list[InvalidInput]:
    """The adapter's refusals of ``request``, one per field, in the order it checks them."""
    found: list[InvalidInput] = []
    tried: dict[str, int] = {}
    current = request
    for _ in range(MAX_ERRORS * 2):
        try:
            provider.validate(current)
            break
        except InvalidInput as exc:
            if exc.field not in tried:
                if found and not _written(request, exc.field):
                    break
                found.append(exc)
                if len(found) >= MAX_ERRORS:
                    break
            step = tried.get(exc.field, 0)
            tried[exc.field] = step + 1
            changed = _set_aside(request, current, exc.field, step)
            if changed is None:
                break
            current = changed
        except Exception:  # noqa: BLE001 - a set-aside request the adapter cannot read: report what was found
            if current is request:
                raise
            break
    return found


def _written(request: GenerationRequest, field: str) -> bool:
    """Whether the client gave ``field`` (``input.<name>`` or ``input.options.<key>...``)."""
    parts = field.split(".")
    if parts[0] != "input" or len(parts) < 2:
        return False
    if parts[1] == "options":
        return len(parts) > 2 and parts[2] in request.input.options
    return parts[1] in COMMON and getattr(request.input, parts[1]) is not None


def _set_aside(original: GenerationRequest, current: GenerationRequest, field: str,
               step: int) -> GenerationRequest | None:
    """``current`` with ``field`` dropped or neutralised (the ``step``-th way), or ``None`` to stop."""
    parts = field.split(".")
    if parts[0] != "input" or len(parts) < 2:
        return None  # model, kind, operation, source: later checks depend on them
    given = current.input
    if parts[1] == "options":
        if len(parts) < 3 or parts[2] not in given.options or step > 0:
            return None
        options = {k: v for k, v in given.options.items() if k != parts[2]}
        return dataclasses.replace(current, input=dataclasses.replace(given, options=options))
    name = parts[1]
    if name not in COMMON:
        return None
    ways = [w for w in NEUTRAL.get(name, [None]) if w != getattr(original.input, name)]
    if step >= len(ways):
        return None
    return dataclasses.replace(current, input=dataclasses.replace(given, **{name: ways[step]}))
