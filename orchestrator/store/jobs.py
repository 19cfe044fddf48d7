"""The Redis store of jobs, their event logs, indexes and webhook deliveries.

Every change to a job is a compare-and-set on its version, done by one Lua
script together with everything that must not be separated from it: the event
log entry, the per-tenant status indexes, the sweeper's ``active`` index and
the webhook deliveries the change causes.

Keys: see ``orchestrator.store.keys``; scripts: ``orchestrator/store/scripts/*.lua``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from orchestrator.domain.ids import time_prefix
from orchestrator.domain.job import Job
from orchestrator.domain.webhooks import Delivery
from orchestrator.infra import metrics
from orchestrator.store import keys
from orchestrator.store.ledger import BudgetExceeded, Spec
from orchestrator.store.queue import Entry
from orchestrator.store.scripts import script
from orchestrator.wire.jobs import JobEvent, JobStatus, utcnow

log = logging.getLogger("atelier.store")


class Conflict(Exception):
    """The job changed since it was read; re-read and decide again."""


class EndpointsChanged(Exception):
    """The tenant's webhook endpoints are not the ones the deliveries were made for; nothing was written."""


def endpoints_fingerprint(raw: Sequence[bytes | str]) -> str:
    """A fingerprint of a tenant's stored endpoints (the values of its endpoints hash), as ``_UPDATE``
    computes it: ``0`` for none, else the SHA-1 of their sorted SHA-1s."""
    if not raw:
        return "0"
    digests = sorted(hashlib.sha1(r.encode() if isinstance(r, str) else r).hexdigest() for r in raw)
    return hashlib.sha1(",".join(digests).encode()).hexdigest()


def job_json(job: Job) -> str:
    """A job as stored: fields at their defaults are left out (they read back the same), which keeps a
    waiting job's record about a third smaller (bench/inflight.py: Redis memory per job)."""
    return job.model_dump_json(exclude_defaults=True)


def event_json(event: JobEvent) -> str:
    """An event as stored: one line (JSON escapes the newlines inside strings), as job_update.lua splits them."""
    return event.model_dump_json(exclude_none=True)


class IdempotencyConflict(Exception):
    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id


# Sentinel for ``active``: remove the job from the sweeper's index.
REMOVE = -1.0


@dataclass
class Page:
    jobs: list[Job]
    next_cursor: str | None


def ms(t: float | None = None) -> int:
    return int((time.time() if t is None else t) * 1000)


class JobStore:
    def __init__(self, redis: Redis, idempotency_ttl_seconds: int = 7 * 24 * 3600) -> None:
        self.redis = redis
        self.idempotency_ttl = idempotency_ttl_seconds
        self._create = script(redis, "job_create")
        self._update = script(redis, "job_update")
        self._create_deliveries = script(redis, "deliveries_create")
        self._save_delivery = script(redis, "delivery_save")

    # -- keys (see ``keys``) ----------------------------------------------------
    job_key = staticmethod(keys.job)
    events_key = staticmethod(keys.job_events)
    ACTIVE = keys.ACTIVE
    DELIVERIES_DUE = keys.DELIVERIES_DUE
    BATCHES_FINISHED = keys.BATCHES_FINISHED
    batch_key = staticmethod(keys.batch)
    delivery_key = staticmethod(keys.delivery)
    endpoints_key = staticmethod(keys.endpoints)
    endpoint_deliveries_key = staticmethod(keys.endpoint_deliveries)

    @staticmethod
    def tenant_key(tenant: str, status: JobStatus | None = None) -> str:
        return keys.tenant_jobs(tenant, None if status is None else status.value)

    def _index_arg(self, delivery: Delivery) -> str:
        return self.endpoint_deliveries_key(delivery.endpoint_id) if delivery.endpoint_id else ""

    # -- jobs ----------------------------------------------------------------
    async def create(self, job: Job, *, active_at: float, body_hash: str | None = None,
                     ledger: Spec | None = None, enqueue: Entry | None = None) -> tuple[Job, bool]:
        """Insert a new job. With an idempotency key, returns the earlier job instead (``False``).

        ``enqueue``: the job's first submission, queued in the same step (``Queue.first_submission``).
        Raises ``IdempotencyConflict`` when the key was used with a different body, ``BudgetExceeded``
        when ``ledger``'s budget check refuses it (nothing is written).
        """
        job.version = 1
        event = JobEvent(sequence=1, type="job.created", status=job.status, at=job.created_at)
        idem_key = keys.idempotency(job.tenant, job.idempotency_key) if job.idempotency_key else keys.NO_IDEMPOTENCY
        idem_value = f"{job.id} {body_hash}" if job.idempotency_key else ""
        script_keys = self._create_keys(job, idem_key)
        args = self._create_args(job, event, active_at, idem_value, ledger)
        if enqueue is not None:
            script_keys += enqueue.keys
            args += enqueue.args
        existing = await self._create(keys=script_keys, args=args)
        if isinstance(existing, bytes):
            existing = existing.decode()
        if existing.startswith("budget "):
            _, name, remaining = existing.split(" ")
            raise BudgetExceeded.from_field(name, int(remaining), job.ledger.held if job.ledger else 0)
        if existing == "exists":
            prior = await self.get(job.id)
            assert prior is not None
            return prior, False
        if existing:
            prior_id, _, prior_hash = existing.partition(" ")
            if prior_hash != body_hash:
                raise IdempotencyConflict(prior_id)
            prior = await self.get(prior_id)
            if prior is None:  # the job expired but the key did not: treat as a conflict, never re-create
                raise IdempotencyConflict(prior_id)
            return prior, False
        return job, True

    def _create_keys(self, job: Job, idem_key: str) -> list[str]:
        return [self.job_key(job.id), self.events_key(job.id), self.tenant_key(job.tenant),
                self.tenant_key(job.tenant, job.status), self.ACTIVE, idem_key,
                self.batch_key(job.batch_id) if job.batch_id else keys.NONE]

    def _create_args(self, job: Job, event: JobEvent, active_at: float, idem_value: str,
                     ledger: Spec | None = None) -> list[str | int | bytes]:
        return [job_json(job), job.status.value, job.tenant, 0, event_json(event), job.id,
                ms(active_at), idem_value, self.idempotency_ttl, job.version, job.batch_id or "",
                ledger.json() if ledger is not None else ""]

    async def create_many(self, jobs: Sequence[Job], *, active_at: float, chunk: int = 500,
                          ledgers: Sequence[Spec | None] | None = None) -> int:
        """Insert jobs in pipelines (a batch); existing ids are skipped. Returns how many were new.

        ``ledgers``: each job's ledger step (its batch reserved the budget beforehand: no checks)."""
        created = 0
        specs = list(ledgers) if ledgers is not None else [None] * len(jobs)
        for start in range(0, len(jobs), chunk):
            pipe = self.redis.pipeline(transaction=False)
            for job, spec in zip(jobs[start:start + chunk], specs[start:start + chunk], strict=True):
                job.version = 1
                event = JobEvent(sequence=1, type="job.created", status=job.status, at=job.created_at)
                await self._create(keys=self._create_keys(job, keys.NO_IDEMPOTENCY),
                             args=self._create_args(job, event, active_at, "", spec), client=pipe)
            created += sum(1 for r in await pipe.execute() if r in (b"", ""))
        return created

    async def get(self, job_id: str) -> Job | None:
        """The job, ``None`` if there is none; raises ``UnreadableRecord``."""
        raw = await self.redis.hmget(self.job_key(job_id), ["v", "d"])  # type: ignore[misc]
        return _job(job_id, raw)

    async def get_many(self, job_ids: Sequence[str]) -> list[Job | None]:
        """The jobs (``None`` for a missing one, and for an unreadable one, which is quarantined)."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(self.job_key(job_id), ["v", "d"])
        jobs: list[Job | None] = []
        for job_id, raw in zip(job_ids, await pipe.execute(), strict=True):
            try:
                jobs.append(_job(job_id, raw))
            except UnreadableRecord as exc:
                await self.quarantine(exc)
                jobs.append(None)
        return jobs

    async def quarantine(self, exc: UnreadableRecord) -> None:
        """Set an unreadable job record aside (``atelier quarantine list`` shows it): out of the sweeper's
        index and its key renamed, so nothing periodic meets it again."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.zrem(self.ACTIVE, exc.job_id)
        pipe.hset(keys.QUARANTINE, exc.job_id, exc.reason)
        pipe.renamenx(self.job_key(exc.job_id), keys.quarantined_job(exc.job_id))
        with contextlib.suppress(ResponseError):  # the record vanished meanwhile (RENAMENX of a missing key)
            await pipe.execute()
        metrics.record_quarantined()
        log.error("job record %s quarantined: %s", exc.job_id, exc.reason,
                  extra={"job_id": exc.job_id, "event": "record.quarantined"})

    async def quarantined(self) -> dict[str, str]:
        """Quarantined job ids and why."""
        raw = await self.redis.hgetall(keys.QUARANTINE)  # type: ignore[misc]
        return {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                for k, v in raw.items()}

    async def update(self, old: Job, new: Job, *, events: Sequence[JobEvent] = (), active_at: float | None = None,
                     deliveries: Sequence[Delivery] = ()) -> Job:
        """Compare-and-set ``old`` -> ``new``; append ``events``; record ``deliveries``.

        ``active_at``: when the sweeper should next look at the job (``REMOVE`` to
        drop it from the index, ``None`` to leave it).
        """
        saved, _ = await self.apply(old, new, events=events, active_at=active_at, deliveries=deliveries)
        return saved

    async def apply(self, old: Job, new: Job, *, events: Sequence[JobEvent] = (), active_at: float | None = None,
                    deliveries: Sequence[Delivery] = (), endpoints: str | None = None,
                    expires_at: float | None = None, ledger: Spec | None = None) -> tuple[Job, bool]:
        """``update``, also saying whether this change finished the job's batch (exactly once per batch).

        ``events``: one per status the change passes through (usually one; none for a change of fields).
        The version goes up by one per event, and each event's sequence is the version it made.

        ``endpoints``: the fingerprint (``endpoints_fingerprint``) of the tenant's webhook endpoints
        that ``deliveries`` were made for; if they changed since, nothing is written and
        ``EndpointsChanged`` is raised (the caller makes the deliveries again). ``expires_at``: when a
        finishing job's records (and outputs) are reaped (``reap``), scheduled in the same step.
        ``ledger``: the job's money moving with the change (``store.ledger``); ``BudgetExceeded`` when
        its budget check refuses (nothing is written).
        """
        new.version = old.version + max(1, len(events))
        new.updated_at = utcnow()
        for step, event in enumerate(events, start=old.version + 1):
            event.sequence = step
        active = "" if active_at is None else ("-" if active_at == REMOVE else str(ms(active_at)))
        finishing = new.status.terminal and not old.status.terminal
        script_keys = [self.job_key(old.id), self.events_key(old.id), self.tenant_key(old.tenant, old.status),
                self.tenant_key(old.tenant, new.status), self.ACTIVE, self.DELIVERIES_DUE,
                self.batch_key(old.batch_id) if old.batch_id else keys.NONE,
                self.endpoints_key(old.tenant) if endpoints is not None else keys.NONE, keys.RETENTION]
        args: list[str | int] = [old.version, job_json(new), new.status.value, old.id,
                                 "\n".join(event_json(e) for e in events), active, ms(), keys.DELIVERY_PREFIX,
                                 old.status.value, old.batch_id or "", "1" if finishing else "0",
                                 endpoints or "", str(ms(expires_at)) if finishing and expires_at else "",
                                 ledger.json() if ledger is not None else ""]
        for d in deliveries:
            script_keys.append(self.delivery_key(d.id))
            args.append(d.model_dump_json())
        args.extend(self._index_arg(d) for d in deliveries)
        version, finished, *refused = await self._update(keys=script_keys, args=args)
        if version == -3:
            name = refused[0].decode() if isinstance(refused[0], bytes) else str(refused[0])
            raise BudgetExceeded.from_field(name, int(finished), new.ledger.held if new.ledger else 0)
        if version == -1:
            raise Conflict(f"job {old.id} does not exist")
        if version == 0:
            raise Conflict(f"job {old.id} changed concurrently")
        if version == -2:
            raise EndpointsChanged(old.tenant)
        return new, bool(finished)

    async def events(self, job_id: str, after: int = 0) -> list[JobEvent]:
        raw = await self.redis.lrange(self.events_key(job_id), 0, -1)  # type: ignore[misc]
        events = [JobEvent.model_validate_json(r) for r in raw]
        return [e for e in events if e.sequence > after]

    async def page(
        self,
        tenant: str,
        *,
        status: JobStatus | None = None,
        provider: str | None = None,
        created_from: float | None = None,
        created_to: float | None = None,
        cursor: str | None = None,
        limit: int = 50,
        kind: str | None = None,
        oldest_first: bool = False,
    ) -> Page:
        """Newest first (``oldest_first``: oldest first); ``cursor`` is the last id of the previous page."""
        key = self.tenant_key(tenant, status)
        upper = f"({cursor}" if cursor and not oldest_first else "+"
        if created_to is not None:
            bound = f"[job_{time_prefix(ms(created_to) + 1)}"
            upper = bound if upper == "+" or bound < upper else upper
        lower = f"[job_{time_prefix(ms(created_from))}" if created_from is not None else "-"
        if cursor and oldest_first:
            lower = f"({cursor}" if lower == "-" or cursor >= lower[1:] else lower
        found: list[Job] = []
        scanned = 0
        while len(found) < limit and scanned < 20 * limit + 1000:
            if oldest_first:
                ids = await self.redis.zrangebylex(key, lower, upper, start=0, num=limit * 2)
            else:
                ids = await self.redis.zrevrangebylex(key, upper, lower, start=0, num=limit * 2)
            if not ids:
                return Page(found, None)
            ids = [i.decode() if isinstance(i, bytes) else i for i in ids]
            scanned += len(ids)
            for job in await self.get_many(ids):
                if job is not None and (provider is None or job.provider == provider) and (
                        kind is None or job.kind == kind):
                    found.append(job)
                    if len(found) == limit:
                        return Page(found, job.id)
            if oldest_first:
                lower = f"({ids[-1]}"
            else:
                upper = f"({ids[-1]}"
        return Page(found, found[-1].id if found else None)

    async def queued_ahead(self, tenant: str, job_id: str) -> int:
        """How many of the tenant's queued jobs were accepted before ``job_id`` (fal's ``queue_position``)."""
        return int(await self.redis.zlexcount(self.tenant_key(tenant, JobStatus.queued), "-", f"({job_id}"))

    # -- provider task index ---------------------------------------------------
    async def claim_task(self, provider: str, task_id: str, job_id: str) -> bool:
        """Bind a provider task to a job; ``False`` if another job already owns it."""
        key = keys.provider_task(provider, task_id)
        if await self.redis.set(key, job_id, nx=True):
            return True
        owner = await self.redis.get(key)
        return (owner.decode() if isinstance(owner, bytes) else owner) == job_id

    # -- retention ---------------------------------------------------------------------
    async def retention_due(self, now: float, limit: int = 200) -> list[str]:
        """Members of the retention schedule whose time came: job ids, ``batch:{id}`` and ``input:{storage key}``."""
        raw = await self.redis.zrangebyscore(keys.RETENTION, "-inf", ms(now), start=0, num=limit)
        return [r.decode() if isinstance(r, bytes) else str(r) for r in raw]

    async def schedule_expiry(self, member: str, at: float) -> None:
        await self.redis.zadd(keys.RETENTION, {member: ms(at)})

    async def forget_expiry(self, member: str) -> None:
        await self.redis.zrem(keys.RETENTION, member)

    async def delete_job(self, job_id: str, job: Job | None) -> None:
        """Remove every record of a finished job: the job, its events, its deliveries and their index
        entries, its task mapping, its place in the tenant's and batch's indexes and in the schedules."""
        delivery_ids = [d.decode() if isinstance(d, bytes) else str(d)
                        for d in await self.redis.smembers(keys.job_deliveries(job_id))]  # type: ignore[misc]
        raws = await self.redis.mget([self.delivery_key(d) for d in delivery_ids]) if delivery_ids else []
        pipe = self.redis.pipeline(transaction=True)
        for delivery_id, raw in zip(delivery_ids, raws, strict=True):
            pipe.delete(self.delivery_key(delivery_id))
            pipe.zrem(self.DELIVERIES_DUE, delivery_id)
            endpoint_id = Delivery.model_validate_json(raw).endpoint_id if raw else None
            if endpoint_id:
                for status in (None, "pending", "delivered", "dead"):
                    pipe.zrem(self.endpoint_deliveries_key(endpoint_id, status), delivery_id)
        pipe.delete(self.job_key(job_id), self.events_key(job_id), keys.job_deliveries(job_id))
        pipe.zrem(self.ACTIVE, job_id)
        pipe.zrem(keys.RETENTION, job_id)
        if job is not None:
            if job.provider_task_id:
                pipe.delete(keys.provider_task(job.provider, job.provider_task_id))
            pipe.zrem(self.tenant_key(job.tenant), job_id)
            pipe.zrem(self.tenant_key(job.tenant, job.status), job_id)
            if job.batch_id:
                pipe.zrem(self.batch_key(job.batch_id) + ":jobs", job_id)
                pipe.zrem(self.batch_key(job.batch_id) + f":st:{job.status.value}", job_id)
        await pipe.execute()

    async def first_callback(self, provider: str, digest: str, window_seconds: int) -> bool:
        """``True`` the first time a callback with this id is taken inside the window (replays: ``False``)."""
        return bool(await self.redis.set(keys.callback_seen(provider, digest), "1", nx=True, ex=window_seconds))

    async def job_for_task(self, provider: str, task_id: str) -> str | None:
        owner = await self.redis.get(keys.provider_task(provider, task_id))
        return owner.decode() if isinstance(owner, bytes) else owner

    # -- sweeper index -----------------------------------------------------------
    async def touch_active(self, job_id: str, at: float) -> None:
        await self.redis.zadd(self.ACTIVE, {job_id: ms(at)}, xx=True)

    async def forget_active(self, job_id: str) -> None:
        """Drop a finished (or vanished) job from the sweeper's index."""
        await self.redis.zrem(self.ACTIVE, job_id)

    async def overdue(self, now: float, limit: int = 500) -> list[str]:
        ids = await self.redis.zrangebyscore(self.ACTIVE, "-inf", ms(now), start=0, num=limit)
        return [i.decode() if isinstance(i, bytes) else i for i in ids]

    # -- webhook deliveries --------------------------------------------------------
    async def get_delivery(self, delivery_id: str) -> Delivery | None:
        raw = await self.redis.get(self.delivery_key(delivery_id))
        return Delivery.model_validate_json(raw) if raw else None

    async def save_delivery(self, delivery: Delivery) -> bool:
        """Save an existing delivery; ``False`` if it is gone (deleted with its endpoint)."""
        saved = await self._save_delivery(
            keys=[self.delivery_key(delivery.id), self.DELIVERIES_DUE],
            args=[delivery.model_dump_json(), delivery.status, ms(delivery.next_attempt_at.timestamp()),
                  delivery.id, self._index_arg(delivery)])
        return bool(saved)

    async def create_delivery(self, delivery: Delivery) -> bool:
        """Record a new delivery unless one with this id exists (deterministic ids make this once-only)."""
        return (await self.create_deliveries([delivery]))[0]

    async def create_deliveries(self, deliveries: Sequence[Delivery]) -> list[bool]:
        """Record deliveries together (one atomic step), each unless one with its id exists."""
        if not deliveries:
            return []
        args: list[str | int] = []
        for d in deliveries:
            args += [d.model_dump_json(), ms(d.next_attempt_at.timestamp()), d.id, self._index_arg(d)]
        created = await self._create_deliveries(
            keys=[self.DELIVERIES_DUE, *(self.delivery_key(d.id) for d in deliveries)], args=args)
        return [bool(c) for c in created]

    async def drop_delivery(self, delivery: Delivery) -> None:
        """Forget a delivery whose endpoint was deleted (it may have been recorded just after the deletion)."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self.delivery_key(delivery.id))
        pipe.zrem(self.DELIVERIES_DUE, delivery.id)
        if delivery.endpoint_id:
            for status in (None, "pending", "delivered", "dead"):
                pipe.zrem(self.endpoint_deliveries_key(delivery.endpoint_id, status), delivery.id)
        await pipe.execute()

    async def forget_due_delivery(self, delivery_id: str) -> None:
        """Drop a delivery that is no longer pending (or gone) from the due set."""
        await self.redis.zrem(self.DELIVERIES_DUE, delivery_id)

    async def touch_due_delivery(self, delivery_id: str, due: float) -> None:
        """Move a pending delivery's due time (if it is still due at all)."""
        await self.redis.zadd(self.DELIVERIES_DUE, {delivery_id: ms(due)}, xx=True)

    async def overdue_deliveries(self, now: float, limit: int = 500) -> list[str]:
        ids = await self.redis.zrangebyscore(self.DELIVERIES_DUE, "-inf", ms(now), start=0, num=limit)
        return [i.decode() if isinstance(i, bytes) else i for i in ids]


def _job(job_id: str, raw: list[bytes | str | None]) -> Job | None:
    version, data = raw
    if data is None or version is None:
        return None
    try:
        job = Job.model_validate_json(data)
        job.version = int(version)
    except (ValueError, RecursionError) as exc:
        raise UnreadableRecord(job_id, f"{exc.__class__.__name__}: {str(exc)[:200]}") from exc
    return job


class UnreadableRecord(Exception):
    """A stored job that cannot be read back (written by a bug, or by hand): one record's problem,
    set aside with ``JobStore.quarantine`` so that periodic work goes on for everyone."""

    def __init__(self, job_id: str, reason: str) -> None:
        super().__init__(f"job {job_id} cannot be read: {reason}")
        self.job_id = job_id
        self.reason = reason
