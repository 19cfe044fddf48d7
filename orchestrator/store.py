"""The Redis store of jobs, their event logs, indexes and webhook deliveries.

Every change to a job is a compare-and-set on its version, done by one Lua
script together with everything that must not be separated from it: the event
log entry, the per-tenant status indexes, the sweeper's ``active`` index and
the webhook deliveries the change causes.

Keys (prefix ``atl:``):

- ``job:{id}``            hash: ``v`` version, ``s`` status, ``t`` tenant, ``d`` job JSON
- ``job:{id}:ev``         list of event JSON (the job's event log)
- ``t:{tenant}:jobs``     sorted set of the tenant's job ids (all scores 0; ids sort by time)
- ``t:{tenant}:st:{s}``   the same, per status
- ``active``              non-terminal job ids, scored by when the sweeper should look (ms)
- ``idem:{tenant}:{key}`` ``"{job_id} {body_sha256}"`` for ``Idempotency-Key``
- ``ptask:{provider}:{task_id}`` -> job id (callbacks, reconciliation)
- ``wh:{id}``             a webhook delivery (JSON); ``wh:due`` sorted set of pending ones (ms)
- ``ep:{id}:dl``          a webhook endpoint's delivery ids (scores 0; ids sort by time), and
                          ``ep:{id}:dl:{status}`` the same per delivery status (see ``endpoints.py``)
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

from redis.asyncio import Redis

from orchestrator.ids import time_prefix
from orchestrator.models import Job, JobEvent, JobStatus, utcnow
from orchestrator.webhooks import Delivery

P = "atl:"

_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 'exists' end
if ARGV[8] ~= '' then
  local existing = redis.call('GET', KEYS[6])
  if existing then return existing end
  redis.call('SET', KEYS[6], ARGV[8], 'EX', ARGV[9])
end
redis.call('HSET', KEYS[1], 'v', ARGV[10], 'd', ARGV[1], 's', ARGV[2], 't', ARGV[3])
redis.call('RPUSH', KEYS[2], ARGV[5])
redis.call('ZADD', KEYS[3], 0, ARGV[6])
redis.call('ZADD', KEYS[4], 0, ARGV[6])
redis.call('ZADD', KEYS[5], ARGV[7], ARGV[6])
if ARGV[11] ~= '' then
  redis.call('ZADD', KEYS[7] .. ':jobs', 0, ARGV[6])
  redis.call('ZADD', KEYS[7] .. ':st:' .. ARGV[2], 0, ARGV[6])
  redis.call('HINCRBY', KEYS[7], 'c:' .. ARGV[2], 1)
  redis.call('HINCRBY', KEYS[7], 'total', 1)
end
return ''
"""

# KEYS: 1 job, 2 job events, 3 tenant old-status set, 4 tenant new-status set, 5 active, 6 webhook due,
#       7 batch hash (or a dummy), 8 the tenant's webhook endpoints hash (or a dummy), 9.. webhook deliveries
# ARGV: 1 expected version, 2 job JSON, 3 new status, 4 job id, 5 event JSON or '', 6 active ('' keep,
#       '-' remove, else score), 7 now ms, 8 delivery key prefix, 9 old status, 10 batch id or '',
#       11 '1' if the new status is terminal and the old one was not, 12 the fingerprint of the
#       endpoints the deliveries were made for ('' when not checked; see ``endpoints_fingerprint``),
#       13.. delivery JSON, then one endpoint delivery index key (or '') per delivery, in the same order
# Returns {new version, 1 if this finished the batch}, or {-1, 0} (no such job), {0, 0} (version
# changed), {-2, 0} (the endpoints changed: nothing was written).
_UPDATE = """
local v = redis.call('HGET', KEYS[1], 'v')
if not v then return {-1, 0} end
if v ~= ARGV[1] then return {0, 0} end
if ARGV[12] ~= '' then
  local vals = redis.call('HVALS', KEYS[8])
  local fp = '0'
  if #vals > 0 then
    for i = 1, #vals do vals[i] = redis.sha1hex(vals[i]) end
    table.sort(vals)
    fp = redis.sha1hex(table.concat(vals, ','))
  end
  if fp ~= ARGV[12] then return {-2, 0} end
end
local nv = tonumber(v) + 1
redis.call('HSET', KEYS[1], 'v', nv, 'd', ARGV[2], 's', ARGV[3])
if KEYS[3] ~= KEYS[4] then
  redis.call('ZREM', KEYS[3], ARGV[4])
  redis.call('ZADD', KEYS[4], 0, ARGV[4])
end
if ARGV[5] ~= '' then
  redis.call('RPUSH', KEYS[2], ARGV[5])
  redis.call('PUBLISH', KEYS[2], nv)
end
if ARGV[6] == '-' then
  redis.call('ZREM', KEYS[5], ARGV[4])
elseif ARGV[6] ~= '' then
  redis.call('ZADD', KEYS[5], ARGV[6], ARGV[4])
end
local n = #KEYS - 8
for i = 9, #KEYS do
  local id = string.sub(KEYS[i], string.len(ARGV[8]) + 1)
  redis.call('SET', KEYS[i], ARGV[i + 4])
  redis.call('ZADD', KEYS[6], ARGV[7], id)
  local idx = ARGV[i + 4 + n]
  if idx and idx ~= '' then
    redis.call('ZADD', idx, 0, id)
    redis.call('ZADD', idx .. ':pending', 0, id)
  end
end
local finished = 0
if ARGV[10] ~= '' and ARGV[9] ~= ARGV[3] then
  local b = KEYS[7]
  redis.call('HINCRBY', b, 'c:' .. ARGV[9], -1)
  redis.call('HINCRBY', b, 'c:' .. ARGV[3], 1)
  redis.call('ZREM', b .. ':st:' .. ARGV[9], ARGV[4])
  redis.call('ZADD', b .. ':st:' .. ARGV[3], 0, ARGV[4])
  if ARGV[5] ~= '' then
    local seq = redis.call('HINCRBY', b, 'seq', 1)
    redis.call('RPUSH', b .. ':ev', '{"sequence":' .. seq .. ',"job_id":"' .. ARGV[4] .. '","event":' .. ARGV[5] .. '}')
    redis.call('PUBLISH', b .. ':ev', seq)
  end
  if ARGV[11] == '1' then
    local done = redis.call('HINCRBY', b, 'done', 1)
    if redis.call('HGET', b, 'accepted') == '1' and done >= tonumber(redis.call('HGET', b, 'total') or '0') then
      if redis.call('HSETNX', b, 'finished_at', ARGV[7]) == 1 then
        redis.call('ZADD', KEYS[6] .. ':batches', ARGV[7], ARGV[10])
        finished = 1
      end
    end
  end
end
return {nv, finished}
"""


# KEYS: 1 webhook due, 2.. deliveries; ARGV per delivery: JSON, due score (ms), id, endpoint index key or ''
_CREATE_DELIVERIES = """
local created = {}
for i = 2, #KEYS do
  local a = (i - 2) * 4
  if redis.call('SET', KEYS[i], ARGV[a + 1], 'NX') then
    redis.call('ZADD', KEYS[1], ARGV[a + 2], ARGV[a + 3])
    if ARGV[a + 4] ~= '' then
      redis.call('ZADD', ARGV[a + 4], 0, ARGV[a + 3])
      redis.call('ZADD', ARGV[a + 4] .. ':pending', 0, ARGV[a + 3])
    end
    created[#created + 1] = 1
  else
    created[#created + 1] = 0
  end
end
return created
"""

# Save a delivery that still exists (never resurrect one deleted with its endpoint), and move it
# between the due set and its endpoint's status indexes.
# KEYS: 1 delivery, 2 webhook due; ARGV: 1 JSON, 2 status, 3 due score (ms), 4 id, 5 endpoint index key or ''
_SAVE_DELIVERY = """
if not redis.call('SET', KEYS[1], ARGV[1], 'XX') then return 0 end
if ARGV[2] == 'pending' then
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
else
  redis.call('ZREM', KEYS[2], ARGV[4])
end
if ARGV[5] ~= '' and redis.call('EXISTS', ARGV[5]) == 1 then
  for _, s in ipairs({'pending', 'delivered', 'dead'}) do
    if s == ARGV[2] then
      redis.call('ZADD', ARGV[5] .. ':' .. s, 0, ARGV[4])
    else
      redis.call('ZREM', ARGV[5] .. ':' .. s, ARGV[4])
    end
  end
end
return 1
"""


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
        self._create = redis.register_script(_CREATE)
        self._update = redis.register_script(_UPDATE)
        self._create_deliveries = redis.register_script(_CREATE_DELIVERIES)
        self._save_delivery = redis.register_script(_SAVE_DELIVERY)

    # -- keys ----------------------------------------------------------------
    @staticmethod
    def job_key(job_id: str) -> str:
        return f"{P}job:{job_id}"

    @staticmethod
    def events_key(job_id: str) -> str:
        return f"{P}job:{job_id}:ev"

    @staticmethod
    def tenant_key(tenant: str, status: JobStatus | None = None) -> str:
        return f"{P}t:{tenant}:jobs" if status is None else f"{P}t:{tenant}:st:{status.value}"

    ACTIVE = f"{P}active"
    DELIVERIES_DUE = f"{P}wh:due"
    # Batches whose completion webhook may not have been recorded yet (see ``Batches``).
    BATCHES_FINISHED = f"{P}wh:due:batches"

    @staticmethod
    def batch_key(batch_id: str) -> str:
        return f"{P}batch:{batch_id}"

    @staticmethod
    def delivery_key(delivery_id: str) -> str:
        return f"{P}wh:{delivery_id}"

    @staticmethod
    def endpoints_key(tenant: str) -> str:
        """A tenant's webhook endpoints (hash: id -> JSON; kept by ``endpoints.Endpoints``)."""
        return f"{P}t:{tenant}:endpoints"

    @staticmethod
    def endpoint_deliveries_key(endpoint_id: str, status: str | None = None) -> str:
        """A webhook endpoint's delivery ids (all, or those in ``status``)."""
        return f"{P}ep:{endpoint_id}:dl" + (f":{status}" if status else "")

    def _index_arg(self, delivery: Delivery) -> str:
        return self.endpoint_deliveries_key(delivery.endpoint_id) if delivery.endpoint_id else ""

    # -- jobs ----------------------------------------------------------------
    async def create(self, job: Job, *, active_at: float, body_hash: str | None = None) -> tuple[Job, bool]:
        """Insert a new job. With an idempotency key, returns the earlier job instead (``False``).

        Raises ``IdempotencyConflict`` when the key was used with a different body.
        """
        job.version = 1
        event = JobEvent(sequence=1, type="job.created", status=job.status, at=job.created_at)
        idem_key = f"{P}idem:{job.tenant}:{job.idempotency_key}" if job.idempotency_key else f"{P}idem:-"
        idem_value = f"{job.id} {body_hash}" if job.idempotency_key else ""
        existing = await self._create(
            keys=self._create_keys(job, idem_key),
            args=self._create_args(job, event, active_at, idem_value),
        )
        if existing in (b"exists", "exists"):
            prior = await self.get(job.id)
            assert prior is not None
            return prior, False
        if existing:
            prior_id, _, prior_hash = (existing.decode() if isinstance(existing, bytes) else existing).partition(" ")
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
                self.batch_key(job.batch_id) if job.batch_id else f"{P}-"]

    def _create_args(self, job: Job, event: JobEvent, active_at: float, idem_value: str) -> list[str | int]:
        return [job_json(job), job.status.value, job.tenant, 0, event_json(event), job.id,
                ms(active_at), idem_value, self.idempotency_ttl, job.version, job.batch_id or ""]

    async def create_many(self, jobs: Sequence[Job], *, active_at: float, chunk: int = 500) -> int:
        """Insert jobs in pipelines (a batch); existing ids are skipped. Returns how many were new."""
        created = 0
        for start in range(0, len(jobs), chunk):
            pipe = self.redis.pipeline(transaction=False)
            for job in jobs[start:start + chunk]:
                job.version = 1
                event = JobEvent(sequence=1, type="job.created", status=job.status, at=job.created_at)
                await self._create(keys=self._create_keys(job, f"{P}idem:-"),
                             args=self._create_args(job, event, active_at, ""), client=pipe)
            created += sum(1 for r in await pipe.execute() if r in (b"", ""))
        return created

    async def get(self, job_id: str) -> Job | None:
        raw = await self.redis.hmget(self.job_key(job_id), ["v", "d"])  # type: ignore[misc]
        return _job(raw)

    async def get_many(self, job_ids: Sequence[str]) -> list[Job | None]:
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(self.job_key(job_id), ["v", "d"])
        return [_job(raw) for raw in await pipe.execute()]

    async def update(self, old: Job, new: Job, *, event: JobEvent | None = None, active_at: float | None = None,
                     deliveries: Sequence[Delivery] = ()) -> Job:
        """Compare-and-set ``old`` -> ``new``; append ``event``; record ``deliveries``.

        ``active_at``: when the sweeper should next look at the job (``REMOVE`` to
        drop it from the index, ``None`` to leave it).
        """
        saved, _ = await self.apply(old, new, event=event, active_at=active_at, deliveries=deliveries)
        return saved

    async def apply(self, old: Job, new: Job, *, event: JobEvent | None = None, active_at: float | None = None,
                    deliveries: Sequence[Delivery] = (), endpoints: str | None = None) -> tuple[Job, bool]:
        """``update``, also saying whether this change finished the job's batch (exactly once per batch).

        ``endpoints``: the fingerprint (``endpoints_fingerprint``) of the tenant's webhook endpoints
        that ``deliveries`` were made for; if they changed since, nothing is written and
        ``EndpointsChanged`` is raised (the caller makes the deliveries again).
        """
        new.version = old.version + 1
        new.updated_at = utcnow()
        if event is not None:
            event.sequence = new.version
        active = "" if active_at is None else ("-" if active_at == REMOVE else str(ms(active_at)))
        finishing = new.status.terminal and not old.status.terminal
        keys = [self.job_key(old.id), self.events_key(old.id), self.tenant_key(old.tenant, old.status),
                self.tenant_key(old.tenant, new.status), self.ACTIVE, self.DELIVERIES_DUE,
                self.batch_key(old.batch_id) if old.batch_id else f"{P}-",
                self.endpoints_key(old.tenant) if endpoints is not None else f"{P}-"]
        args: list[str | int] = [old.version, job_json(new), new.status.value, old.id,
                                 event_json(event) if event else "", active, ms(), f"{P}wh:",
                                 old.status.value, old.batch_id or "", "1" if finishing else "0",
                                 endpoints or ""]
        for d in deliveries:
            keys.append(self.delivery_key(d.id))
            args.append(d.model_dump_json())
        args.extend(self._index_arg(d) for d in deliveries)
        version, finished = await self._update(keys=keys, args=args)
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
    ) -> Page:
        """Newest first; ``cursor`` is the last id of the previous page."""
        key = self.tenant_key(tenant, status)
        upper = f"({cursor}" if cursor else "+"
        if created_to is not None:
            bound = f"[job_{time_prefix(ms(created_to) + 1)}"
            upper = bound if upper == "+" or bound < upper else upper
        lower = f"[job_{time_prefix(ms(created_from))}" if created_from is not None else "-"
        found: list[Job] = []
        scanned = 0
        while len(found) < limit and scanned < 20 * limit + 1000:
            ids = await self.redis.zrevrangebylex(key, upper, lower, start=0, num=limit * 2)
            if not ids:
                return Page(found, None)
            ids = [i.decode() if isinstance(i, bytes) else i for i in ids]
            scanned += len(ids)
            for job in await self.get_many(ids):
                if job is not None and (provider is None or job.provider == provider):
                    found.append(job)
                    if len(found) == limit:
                        return Page(found, job.id)
            upper = f"({ids[-1]}"
        return Page(found, found[-1].id if found else None)

    # -- provider task index ---------------------------------------------------
    async def claim_task(self, provider: str, task_id: str, job_id: str) -> bool:
        """Bind a provider task to a job; ``False`` if another job already owns it."""
        key = f"{P}ptask:{provider}:{task_id}"
        if await self.redis.set(key, job_id, nx=True):
            return True
        owner = await self.redis.get(key)
        return (owner.decode() if isinstance(owner, bytes) else owner) == job_id

    async def job_for_task(self, provider: str, task_id: str) -> str | None:
        owner = await self.redis.get(f"{P}ptask:{provider}:{task_id}")
        return owner.decode() if isinstance(owner, bytes) else owner

    # -- sweeper index -----------------------------------------------------------
    async def touch_active(self, job_id: str, at: float) -> None:
        await self.redis.zadd(self.ACTIVE, {job_id: ms(at)}, xx=True)

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

    async def overdue_deliveries(self, now: float, limit: int = 500) -> list[str]:
        ids = await self.redis.zrangebyscore(self.DELIVERIES_DUE, "-inf", ms(now), start=0, num=limit)
        return [i.decode() if isinstance(i, bytes) else i for i in ids]


def _job(raw: list[bytes | str | None]) -> Job | None:
    version, data = raw
    if data is None or version is None:
        return None
    job = Job.model_validate_json(data)
    job.version = int(version)
    return job
