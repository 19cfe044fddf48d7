"""The budget ledger: what each job holds against its tenant's budgets, and the usage figures.

Money moves in the same Lua step as the job it belongs to (``scripts/ledger.lib.lua``, run inside
``job_create.lua`` and ``job_update.lua``), so the ledger is exact under races: a job is accepted
only if its estimate fits the budgets left, and no crash between two writes can leave a
reservation without its job. Amounts are integer micro-USD (no rounding drift).

A job's estimate is *held* when it is accepted (``committed`` of the month and the day it was
accepted), replaced by its final cost when it finishes (zero when nothing was billed), and moved
with it when it falls back to another provider. Budgets are per tenant, per calendar month and
per day (UTC), set by an operator in the tenant's settings hash, and optionally per API key (in
the key's own hash): a job counts against both its tenant's budgets and its key's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from redis.asyncio import Redis

from orchestrator.domain.job import Job, LedgerHold
from orchestrator.store import keys
from orchestrator.store.scripts import script

MICROS = 1_000_000
BUDGET_FIELDS = {"monthly": "budget_monthly", "daily": "budget_daily"}
USAGE_TTL_SECONDS = 400 * 24 * 3600
SPEND_TTL_SECONDS = {"m": 70 * 24 * 3600, "d": 3 * 24 * 3600}


def micros(amount: float | None) -> int:
    return round((amount or 0.0) * MICROS)


def dollars(value: int) -> float:
    return round(value / MICROS, 6)


class BudgetExceeded(Exception):
    """Accepting this would pass the ``budget`` (``monthly``, ``daily``, or the API key's ``key_monthly``,
    ``key_daily``); ``remaining`` micro-USD are left."""

    def __init__(self, budget: str, remaining: int, needed: int) -> None:
        self.period = budget
        self.remaining = max(0, remaining)
        self.needed = needed
        whose = f"API key's {budget[4:]}" if budget.startswith("key_") else budget
        super().__init__(f"the {whose} budget has {dollars(self.remaining):g} USD left; this needs "
                         f"{dollars(needed):g} USD")

    @classmethod
    def from_field(cls, label: str, remaining: int, needed: int) -> BudgetExceeded:
        return cls(label, remaining, needed)


def today() -> str:
    return datetime.now(UTC).date().isoformat()


def dims(provider: str, model: str, batch_id: str | None) -> list[str]:
    """The usage groups a job counts in: its model, and its batch. The tenant's totals and each
    provider's are the sums of its models' figures (``Ledger.usage``), not counted again."""
    return [f"m:{provider}/{model}"] + ([f"b:{batch_id}"] if batch_id else [])


def _derived(groups: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """The ``all`` and ``p:{provider}`` groups, summed from the ``m:{provider}/{model}`` groups (figures
    written by earlier versions under ``all`` and ``p:`` are left out: they repeat the models')."""
    out = {name: figures for name, figures in groups.items() if name.startswith(("m:", "b:"))}
    for name, figures in groups.items():
        if name.startswith("m:"):
            for total in ("all", "p:" + name[2:].split("/", 1)[0]):
                into = out.setdefault(total, {})
                for figure, value in figures.items():
                    into[figure] = into.get(figure, 0) + value
    return out


def _spend_keys(tenant: str, day: str, api_key: str | None = None) -> list[tuple[str, str, str, str]]:
    """``(label, settings hash, field, spend hash)`` of the budgets a job accepted on ``day`` counts in:
    its tenant's, and its API key's (``api_key``: the key's SHA-256)."""
    periods = (("monthly", f"m{day[:7]}"), ("daily", f"d{day}"))
    found = [(label, keys.tenant_settings(tenant), BUDGET_FIELDS[label], keys.tenant_spend(tenant, period))
             for label, period in periods]
    if api_key:
        found += [(f"key_{label}", keys.api_key(api_key), BUDGET_FIELDS[label], keys.key_spend(api_key, period))
                  for label, period in periods]
    return found


@dataclass
class Spec:
    """A ledger step (``ledger.lib.lua``): an optional budget check, then increments."""

    check: dict[str, Any] | None = None
    incr: list[list[Any]] = field(default_factory=list)
    expire: list[list[Any]] = field(default_factory=list)

    def add(self, key: str, name: str, delta: int) -> None:
        if delta:
            self.incr.append([key, name, int(delta)])

    def json(self) -> str:
        body: dict[str, Any] = {"incr": self.incr, "expire": self.expire}
        if self.check is not None:
            body["check"] = self.check
        return json.dumps(body, separators=(",", ":"))


def _hold_spend(spec: Spec, tenant: str, day: str, delta: int, *, check: int | None,
                api_key: str | None = None) -> None:
    periods = _spend_keys(tenant, day, api_key)
    if check is not None and check > 0:
        spec.check = {"amount": check, "limits": [list(p) for p in periods]}
    for *_, key in periods:
        spec.add(key, "committed", delta)
        spec.expire.append([key, SPEND_TTL_SECONDS[key.rsplit(":", 1)[1][0]]])


def _count(spec: Spec, tenant: str, day: str, groups: list[str], **deltas: int) -> None:
    key = keys.tenant_usage(tenant, day)
    for group in groups:
        for name, delta in deltas.items():
            spec.add(key, f"{group}|{name}", delta)
    spec.expire.append([key, USAGE_TTL_SECONDS])


def accept(job: Job, estimate: float | None, *, reserved_by_batch: bool = False,
           api_key: str | None = None) -> Spec:
    """The step that accepts ``job`` (checked against the budgets unless its batch reserved for it;
    ``api_key``: the submitting key's SHA-256, whose own budgets count too); sets ``job.ledger``."""
    amount = micros(estimate)
    day = today()
    job.ledger = LedgerHold(day=day, held=amount, dims=dims(job.provider, job.model, job.batch_id), key=api_key)
    spec = Spec()
    if not reserved_by_batch:
        _hold_spend(spec, job.tenant, day, amount, check=amount, api_key=api_key)
    _count(spec, job.tenant, day, job.ledger.dims, n=1, est=amount)
    return spec


def settle(old: Job, new: Job, final: float, *, succeeded: bool) -> Spec | None:
    """The step that replaces the job's hold by its final cost (once); updates ``new.ledger``."""
    hold = old.ledger
    if hold is None or hold.settled:
        return None
    amount = micros(final)
    spec = Spec()
    _hold_spend(spec, old.tenant, hold.day, amount - hold.held, check=None, api_key=hold.key)
    _count(spec, old.tenant, hold.day, hold.dims, done=1, ok=1 if succeeded else 0, fin=amount)
    new.ledger = hold.model_copy(update={"held": amount, "settled": True})
    return spec


def move(old: Job, new: Job, spent: float, estimate: float | None) -> Spec | None:
    """The step that moves a job to a fallback: the last attempt's hold becomes what it cost
    (``spent``, usually zero: it created nothing), the new attempt's estimate is held, checked against
    the budgets for what it adds; the usage counts move to the new provider and model."""
    hold = old.ledger
    if hold is None or hold.settled:
        return None
    spent_micros, amount = micros(spent), micros(estimate)
    spec = Spec()
    added = spent_micros + amount - hold.held
    _hold_spend(spec, old.tenant, hold.day, added, check=added, api_key=hold.key)
    new_dims = dims(new.provider, new.model, new.batch_id)
    _count(spec, old.tenant, hold.day, hold.dims, n=-1, est=-hold.held)
    _count(spec, old.tenant, hold.day, new_dims, n=1, est=amount + spent_micros)
    new.ledger = LedgerHold(day=hold.day, held=spent_micros + amount, dims=new_dims, key=hold.key)
    return spec


# -- budgets and reading the figures ------------------------------------------------------------------
class Ledger:
    """Budgets as operators set them, a batch's reservation, and the usage figures."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._reserve = script(redis, "budget_reserve")

    async def set_budget(self, tenant: str, period: str, amount: float | None, *,
                         api_key: str | None = None) -> None:
        """Set (``None``: clear) the tenant's ``period`` (``monthly``/``daily``) budget in USD, or that of
        one of its API keys (``api_key``: the key's SHA-256)."""
        name = BUDGET_FIELDS[period]
        where = keys.api_key(api_key) if api_key else keys.tenant_settings(tenant)
        if amount is None:
            await self.redis.hdel(where, name)  # type: ignore[misc]
        else:
            await self.redis.hset(where, name, str(micros(amount)))  # type: ignore[misc]

    async def budgets(self, tenant: str, day: str | None = None, *,
                      api_key: str | None = None) -> dict[str, dict[str, Any]]:
        """Each budget (``monthly``, ``daily``, and with ``api_key`` the key's ``key_monthly``,
        ``key_daily`` where set): ``limit`` (USD or ``None``), ``committed``, ``remaining``, ``period``."""
        spends = _spend_keys(tenant, day or today(), api_key)
        pipe = self.redis.pipeline(transaction=False)
        for _, settings, name, spend in spends:
            pipe.hget(settings, name)
            pipe.hget(spend, "committed")
        answers = await pipe.execute()
        out: dict[str, dict[str, Any]] = {}
        for index, (label, _, _, spend) in enumerate(spends):
            raw_limit, used = answers[2 * index], answers[2 * index + 1]
            if label.startswith("key_") and raw_limit is None:
                continue  # a key without budgets of its own: only the tenant's apply
            used_micros = int(used or 0)
            limit = int(raw_limit) if raw_limit is not None else None
            out[label] = {"period": spend.rsplit(":", 1)[1][1:], "limit": dollars(limit) if limit is not None else None,
                          "committed": dollars(used_micros),
                          "remaining": dollars(max(0, limit - used_micros)) if limit is not None else None}
        return out

    async def reserve_batch(self, tenant: str, batch_id: str, amount: float, api_key: str | None = None) -> None:
        """Hold a batch's whole estimate at once (once per batch id: a replay holds nothing more).
        Raises ``BudgetExceeded``."""
        spec = Spec()
        _hold_spend(spec, tenant, today(), micros(amount), check=micros(amount), api_key=api_key)
        answer = await self._reserve(keys=[keys.batch_budget(batch_id)], args=[spec.json()])
        if answer:
            text = answer.decode() if isinstance(answer, bytes) else str(answer)
            _, name, remaining = text.split(" ")
            raise BudgetExceeded.from_field(name, int(remaining), micros(amount))

    async def usage(self, tenant: str, start: date, end: date) -> dict[str, dict[str, dict[str, int]]]:
        """``{day: {group: {figure: value}}}`` for the days from ``start`` to ``end`` (inclusive)."""
        days = [(start + timedelta(days=i)).isoformat() for i in range((end - start).days + 1)]
        pipe = self.redis.pipeline(transaction=False)
        for day in days:
            pipe.hgetall(keys.tenant_usage(tenant, day))
        out: dict[str, dict[str, dict[str, int]]] = {}
        for day, raw in zip(days, await pipe.execute(), strict=True):
            groups: dict[str, dict[str, int]] = {}
            for k, v in raw.items():
                name = k.decode() if isinstance(k, bytes) else str(k)
                group, _, figure = name.rpartition("|")
                groups.setdefault(group, {})[figure] = int(v)
            if groups:
                out[day] = _derived(groups)
        return out
