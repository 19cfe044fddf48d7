"""A tenant's newest jobs matching provider, kind and model, read cheaply for the dashboard's list.

The tenant's job indexes are per status only, so provider, kind and model are matched by reading the
records. ``JobStore.page`` parses every record it reads; this scan looks for the wanted
``"field":"value"`` pairs in the stored JSON first and parses only the records that have them (then
checks the parsed job, so a lookalike in a job's metadata never matches). With a tenant of 10,000
jobs a filter that one job in ten passes parses about 50 records instead of 500 (``bench/dashboard.py``).
"""

from __future__ import annotations

import json

from orchestrator.domain.ids import time_prefix
from orchestrator.domain.job import Job
from orchestrator.store.jobs import JobStore, Page, ms
from orchestrator.wire.jobs import JobStatus

ROUND = 200  # index entries read per round trip


def _needle(name: str, value: str | None) -> bytes | None:
    """The bytes ``"name":"value"`` as the stored JSON spells them; ``None`` when a value's spelling could
    differ (escaped characters), so that field is checked after parsing only."""
    if value is None or not value.isascii() or json.dumps(value) != f'"{value}"':
        return None
    return f'"{name}":"{value}"'.encode()


async def newest_matching(store: JobStore, tenant: str, *, status: JobStatus | None = None,
                          provider: str | None = None, kind: str | None = None, model: str | None = None,
                          created_from: float | None = None, created_to: float | None = None,
                          cursor: str | None = None, limit: int = 50, scan_limit: int = 5000) -> Page:
    """Newest first; at most ``scan_limit`` index entries are read (``next_cursor`` says where to go on)."""
    needles = [n for n in (_needle("provider", provider), _needle("kind", kind), _needle("model", model)) if n]
    key = store.tenant_key(tenant, status)
    upper = f"({cursor}" if cursor else "+"
    if created_to is not None:
        bound = f"[job_{time_prefix(ms(created_to) + 1)}"
        upper = bound if upper == "+" or bound < upper else upper
    lower = f"[job_{time_prefix(ms(created_from))}" if created_from is not None else "-"
    found: list[Job] = []
    scanned = 0
    ids: list[str] = []
    while scanned < scan_limit:
        ids = [i.decode() if isinstance(i, bytes) else str(i)
               for i in await store.redis.zrevrangebylex(key, upper, lower, start=0,
                                                         num=min(ROUND, scan_limit - scanned))]
        if not ids:
            return Page(found, None)
        pipe = store.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hmget(store.job_key(job_id), ["v", "d"])
        for job_id, (version, data) in zip(ids, await pipe.execute(), strict=True):
            scanned += 1
            if isinstance(data, str):
                data = data.encode()
            if data is None or not all(n in data for n in needles):
                continue
            try:
                job: Job | None = Job.model_validate_json(data)
                job.version = int(version)  # type: ignore[union-attr]
            except (ValueError, TypeError, RecursionError):
                job = (await store.get_many([job_id]))[0]  # the store quarantines an unreadable record
            if job is not None and (provider is None or job.provider == provider) and (
                    kind is None or job.kind == kind) and (model is None or job.model == model):
                found.append(job)
                if len(found) == limit:
                    return Page(found, job.id)
        upper = f"({ids[-1]}"
    return Page(found, ids[-1] if ids else cursor)  # read all it may: the next reading starts after the last
