"""When to poll next: a fraction of the model's typical duration first, then backoff with jitter."""

from __future__ import annotations

import random
from typing import Protocol

from orchestrator.domain.job import Job
from providers.contract import Provider


class PollSettings(Protocol):
    """The deployment's poll bounds (``orchestrator.infra.settings.Settings`` has them)."""

    poll_min_seconds: float
    poll_backoff: float


FIRST_POLL_FRACTION = 0.25
JITTER = 0.2
# While a callback is expected, polling is only a safety net: this much slower.
CALLBACK_POLL_FACTOR = 4.0


def poll_delay(settings: PollSettings, provider: Provider, job: Job, hint: float | None = None) -> float:
    """Seconds until the next poll of ``job`` (``job.polls`` polls done so far).

    A provider hint (``Retry-After``, ``openai-poll-after-ms``) wins within the
    configured bounds.
    """
    low, high = settings.poll_min_seconds, provider.settings.poll_max_seconds
    factor = CALLBACK_POLL_FACTOR if job.callback_expected else 1.0
    if hint is not None:
        return min(max(hint, low), high * factor)
    typical = provider.typical_seconds(job.kind, job.model)
    first = provider.settings.poll_initial_seconds or FIRST_POLL_FRACTION * typical
    high *= factor
    delay = max(low, first) * factor * settings.poll_backoff ** max(0, job.polls - 1)
    delay = min(delay, high)
    return max(low, delay * random.uniform(1 - JITTER, 1 + JITTER))


# Ranks among due polls when the key's budget cannot read them all (lowest first, in ms).
CALLBACK_OFFSET = 1e13  # expecting a callback: polling is only a safety net, read these last


def woken_rank(at: float) -> float:
    """A callback said the task changed (at ``at``): read it before any scheduled poll, the freshest news
    first. (First come, first served would leave a completion waiting behind every earlier "started"
    callback when the budget is short: seen in bench/inflight.py, p99 detection 25 s.)"""
    return -at * 1000


def poll_rank(provider: Provider, job: Job) -> float:
    """The job's expected finish time (accepted + the model's typical duration), in ms.

    Ordering by it reads first the job most likely to be done. Unlike "age over typical
    duration" it does not change with time, so it can be a sorted-set score.
    """
    start = job.timestamps.get("submitted") or job.created_at
    rank = (start.timestamp() + provider.typical_seconds(job.kind, job.model)) * 1000
    if job.callback_expected:
        rank += CALLBACK_OFFSET
    return rank
