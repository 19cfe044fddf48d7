"""Every Redis key Atelier writes, in one place (prefix ``atl:``; arq's own keys are arq's).

The Redis key map in ``docs/architecture.md`` describes each one; the key strings appear
nowhere else in the code.
"""

from __future__ import annotations

P = "atl:"
NONE = f"{P}-"  # a placeholder key where a Lua script takes an optional key

# -- jobs ---------------------------------------------------------------------------------------
# Non-terminal job ids, scored by when the sweeper should next look (ms).
ACTIVE = f"{P}active"


def job(job_id: str) -> str:
    """Hash: ``v`` version, ``s`` status, ``t`` tenant, ``d`` the job JSON."""
    return f"{P}job:{job_id}"


def job_events(job_id: str) -> str:
    """List of event JSON (the job's event log); also the pub/sub channel of its new events."""
    return f"{P}job:{job_id}:ev"


def tenant_jobs(tenant: str, status: str | None = None) -> str:
    """Sorted set of the tenant's job ids (scores 0; ids sort by time), all or per status."""
    return f"{P}t:{tenant}:jobs" if status is None else f"{P}t:{tenant}:st:{status}"


def idempotency(tenant: str, key: str) -> str:
    """``"{job_id} {body_sha256}"`` for a job's ``Idempotency-Key``."""
    return f"{P}idem:{tenant}:{key}"


def batch_idempotency(tenant: str, key: str) -> str:
    return f"{P}idem:{tenant}:batch:{key}"


NO_IDEMPOTENCY = f"{P}idem:-"


QUARANTINE = f"{P}quarantine"  # hash: job id -> why its record was set aside


def quarantined_job(job_id: str) -> str:
    """Where an unreadable job record is moved (kept for an operator, out of every index's way)."""
    return f"{P}quarantine:job:{job_id}"


def provider_task(provider: str, task_id: str) -> str:
    """The job that owns a provider task (callbacks, reconciliation)."""
    return f"{P}ptask:{provider}:{task_id}"


def callback_seen(provider: str, digest: str) -> str:
    """A verified callback already taken (expires after the replay window)."""
    return f"{P}cb:{provider}:{digest}"


# When finished jobs' (and batches') records and outputs are reaped: member "{job id}" or "batch:{id}", ms.
RETENTION = f"{P}retention"


def job_deliveries(job_id: str) -> str:
    """Set of the delivery ids a job's transitions created (reaped with the job)."""
    return f"{P}job:{job_id}:dl"


# -- batches ------------------------------------------------------------------------------------
def batch(batch_id: str) -> str:
    """Hash: the batch record and its counters (``c:{status}``, ``total``, ``done``, ``seq``...);
    ``:st:{status}`` sorted sets of its job ids and ``:ev`` its event log hang off it."""
    return f"{P}batch:{batch_id}"


def batch_progress_lock(batch_id: str) -> str:
    return f"{P}batch:{batch_id}:progress"


def tenant_batches(tenant: str) -> str:
    return f"{P}t:{tenant}:batches"


# -- webhooks -----------------------------------------------------------------------------------
DELIVERIES_DUE = f"{P}wh:due"  # pending delivery ids, scored by their next attempt (ms)
# Batches whose completion webhook may not have been recorded yet.
BATCHES_FINISHED = f"{P}wh:due:batches"
DELIVERY_PREFIX = f"{P}wh:"


# Deliveries held back (their destination's circuit is open or its attempts are at their cap), as
# "{delivery id}:{attempt}" scored by when to queue them again (ms).
DELIVERIES_PARKED = f"{P}whq:parked"


def webhook_destination(destination: str, part: str) -> str:
    """A webhook destination's ``inflight`` deliveries (admitted or being attempted: zset of leases, ms),
    ``circuit`` (hash: ``failures``, ``failing_since``, ``opens``, ``open_until``), ``parked``
    deliveries (woken when the circuit closes), ``waiting`` line (zset of "{delivery id}:{attempt}"
    by arrival: a finishing attempt hands its place to the oldest) or adapted ``limit`` (string)."""
    return f"{P}whq:dest:{destination}:{part}"


def webhook_tenant(tenant: str, part: str) -> str:
    """The tenant's active deliveries (``inflight``: admitted or being attempted, zset of leases, ms) or
    its ``waiting`` line (zset of "{delivery id}:{attempt}" by arrival)."""
    return f"{P}whq:tenant:{tenant}:{part}"


def webhook_attempt(delivery_id: str) -> str:
    """Set while a worker makes an attempt of the delivery (a second one answers busy)."""
    return f"{P}whq:attempt:{delivery_id}"


def delivery(delivery_id: str) -> str:
    """A webhook delivery (JSON)."""
    return f"{DELIVERY_PREFIX}{delivery_id}"


def endpoints(tenant: str) -> str:
    """Hash: a tenant's webhook endpoints, id -> JSON."""
    return f"{P}t:{tenant}:endpoints"


def endpoint_health(endpoint_id: str) -> str:
    """Hash: ``failing_since`` (ms) while the endpoint's deliveries fail without a success."""
    return f"{P}ep:{endpoint_id}:health"


def endpoint_deliveries(endpoint_id: str, status: str | None = None) -> str:
    """An endpoint's delivery ids (scores 0; ids sort by time), all or per delivery status."""
    return f"{P}ep:{endpoint_id}:dl" + (f":{status}" if status else "")


# -- the deployment -------------------------------------------------------------------------------
# Hash: ``created_at``, written by every API and worker at start (and ``atelier keys create --init``);
# the operator commands look for it before writing, so a wrong ATELIER_REDIS_URL is noticed.
DEPLOYMENT = f"{P}deployment"


# -- tenants and secrets --------------------------------------------------------------------------
def api_key(digest: str) -> str:
    """Hash: ``tenant``, ``created_at`` of an API key, by its SHA-256."""
    return f"{P}apikey:{digest}"


def tenant_api_keys(tenant: str) -> str:
    return f"{P}tenant:{tenant}:keys"


def tenant_webhook_secret(tenant: str) -> str:
    return f"{P}tenant:{tenant}:whsec"


def tenant_settings(tenant: str) -> str:
    """Hash: a tenant's operator-set settings (``retention_seconds``)."""
    return f"{P}tenant:{tenant}:settings"


def shared_secret(name: str) -> str:
    return f"{P}secret:{name}"


# -- provider keys: throttle, line, poll boards, pool health ---------------------------------------
def inflight(provider: str, key_id: str) -> str:
    """Set of job ids holding a slot on a provider key (its concurrency cap)."""
    return f"{P}inflight:{provider}:{key_id}"


def waiting(provider: str, key_id: str) -> str:
    """Sorted set of job ids waiting for a slot on the key."""
    return f"{P}waiting:{provider}:{key_id}"


def fair_tags(provider: str, key_id: str, line: str = "slots") -> str:
    """Hash of the fair-share tags of a key's ``slots`` (waiting) or ``budget`` line (per priority:
    virtual time, each tenant's next tag); deleted whenever the line is empty."""
    return f"{P}fairtags:{provider}:{key_id}" + ("" if line == "slots" else f":{line}")


def budget_line(provider: str, key_id: str) -> str:
    """Sorted set of job ids waiting for the key's request budget (priority, then arrival)."""
    return f"{P}budgetline:{provider}:{key_id}"


def rate(provider: str, key_id: str) -> str:
    """The key's GCRA state (theoretical arrival time, ms), spent by submits and polls alike."""
    return f"{P}rate:{provider}:{key_id}"


# Scan patterns of the per-key sets above (the sweeper repairs slots held by finished jobs).
SLOT_PATTERNS = (f"{P}inflight:*", f"{P}waiting:*", f"{P}budgetline:*")


def parse_slot_key(key: str) -> tuple[str, str, str]:
    """``(kind, provider, key_id)`` of a key matched by ``SLOT_PATTERNS``."""
    _, kind, provider, key_id = key.split(":", 3)
    return kind, provider, key_id


POLL_BOARDS = f"{P}pollboards"  # set of "{provider}:{key_id}" that have a poll board
POLL_WAKE_CHANNEL = f"{P}polls:wake"  # published when a callback wakes a job


def poll_board(provider: str, key_id: str) -> tuple[str, str, str]:
    """The board's ``due``, ``ready`` and ``meta`` keys (see ``orchestrator.store.polls``)."""
    base = f"{P}polls:{provider}:{key_id}"
    return f"{base}:due", f"{base}:ready", f"{base}:meta"


KEYS_OUT = f"{P}keyouts"  # set of "{provider}:{key_id}" out of the pool


def key_out(provider: str, key_id: str) -> str:
    """Why a provider key is out of the pool (JSON), expiring when it is due for a recheck."""
    return f"{P}keyout:{provider}:{key_id}"


# -- the model catalog ----------------------------------------------------------------------------
def model_durations(provider: str, model: str) -> str:
    """List of the run times (ms) of the model's latest succeeded jobs, newest first, capped."""
    return f"{P}dur:{provider}:{model}"


# -- money: budgets and usage ------------------------------------------------------------------------
def tenant_spend(tenant: str, period: str) -> str:
    """Hash: ``committed`` micro-USD of the tenant's jobs accepted in ``period`` (``m2026-12`` a
    month, ``d2026-12-03`` a day; UTC): estimates held, then final costs."""
    return f"{P}spend:{tenant}:{period}"


def key_spend(digest: str, period: str) -> str:
    """Hash: ``committed`` micro-USD of the jobs one API key (its SHA-256) submitted in ``period``
    (its budgets: ``budget_monthly``/``budget_daily`` in the key's own hash, ``api_key``)."""
    return f"{P}spend:key:{digest}:{period}"


def tenant_usage(tenant: str, day: str) -> str:
    """Hash: the tenant's usage figures of jobs accepted on ``day`` (``2026-12-03``), per group:
    ``{group}|n`` accepted, ``|est`` estimated micro-USD, ``|done`` finished, ``|ok`` succeeded,
    ``|fin`` final micro-USD; groups ``m:{provider}/{model}`` and ``b:{batch}`` (the totals and the
    providers' figures are their models' sums; versions before December 2026 also wrote ``all`` and
    ``p:{provider}``, which reading leaves out)."""
    return f"{P}usage:{tenant}:{day}"


def batch_budget(batch_id: str) -> str:
    """String: set once a batch's estimate was reserved against its tenant's budgets."""
    return f"{P}batch:{batch_id}:budget"
