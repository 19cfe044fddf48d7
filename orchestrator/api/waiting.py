"""Answers in one request: ``Prefer: wait=N`` on ``POST /v1/jobs``, ``?wait=N`` on ``GET /v1/jobs/{id}``.

A waiting request holds no worker and no Redis connection of its own. Each API process keeps one
pub/sub connection (``JobWaiters``), subscribed to the event channel of every job someone waits for
(``keys.job_events``: ``job_update.lua`` publishes each new event of the job on it), and one future
per job that all of that job's waiters await. A message makes the process read the job once; a
finished job resolves the future for every waiter at once. The job is read again once Redis
confirmed the subscription, so a job that finished just before it is not missed; and every
``RECHECK_SECONDS`` the process reads all the jobs it watches in one pipeline, so a message lost to a
reconnect costs a few seconds, never the answer. Reads are shared by a job's waiters and at most
``MAX_READS`` run at once, so waiters add a bounded number of Redis connections, whatever their number.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Header, Query, Request, Response
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from orchestrator.api.deps import RuntimeDep
from orchestrator.api.problems import Problem
from orchestrator.domain.job import Job
from orchestrator.services.runtime import Runtime
from orchestrator.store.jobs import JobStore
from orchestrator.wire.jobs import JobView

log = logging.getLogger("atelier.api.waiting")

MAX_WAIT_SECONDS = 60
RECHECK_SECONDS = 5.0  # every watched job is read again this often (messages lost to a reconnect)
IDLE_SECONDS = 2.0  # a channel nobody waits on any more stays subscribed this long (a client waiting again)
MAX_WATCHED_JOBS = 20_000  # beyond this many jobs waited on in one process, answers come without waiting
READ_CHUNK = 500
MAX_READS = 8  # job reads in flight at once for the waiters (each may take a pooled connection)


@dataclass(eq=False)
class _Watch:
    """The waiters of one job: one subscription, one future (the finished job, ``None`` if it vanished)."""

    job_id: str
    channel: str
    subscribed: asyncio.Future[None]
    finished: asyncio.Future[Job | None]
    waiters: int = 0
    idle_since: float | None = None
    checking: bool = False
    again: bool = False
    reading: asyncio.Future[Job | None] | None = None  # a read of the job as it is now, shared


@dataclass(eq=False)
class JobWaiters:
    """One API process's waiters, fanned out from one shared pub/sub subscription."""

    redis: Redis
    store: JobStore
    _watches: dict[str, _Watch] = field(default_factory=dict)
    _by_channel: dict[str, _Watch] = field(default_factory=dict)
    _pubsub: PubSub | None = None
    _reader: asyncio.Task[None] | None = None
    _starting: asyncio.Lock = field(default_factory=asyncio.Lock)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _reads: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(MAX_READS))

    def watched(self) -> int:
        """How many jobs are waited on (and subscribed) now."""
        return len(self._watches)

    async def until_finished(self, job_id: str, seconds: float) -> Job | None:
        """The job as soon as it is finished, else as it is after ``seconds`` (``None``: it was deleted)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        if job_id not in self._watches and len(self._watches) >= MAX_WATCHED_JOBS:
            async with self._reads:
                return await self.store.get(job_id)
        await self._start()
        watch = await self._join(job_id)
        try:
            # Resolved by the read that follows the subscription's confirmation, or by a later event's.
            return await asyncio.wait_for(asyncio.shield(watch.finished), max(0.0, deadline - loop.time()))
        except TimeoutError:
            return await self._now(watch)
        finally:
            self._leave(watch)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        for task in list(self._tasks):
            task.cancel()
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()
            self._pubsub = None

    # -- the subscription ---------------------------------------------------------------------
    async def _start(self) -> None:
        if self._reader is not None:
            return
        async with self._starting:
            if self._reader is not None:
                return
            pubsub = self.redis.pubsub()
            await pubsub.connect()  # before any subscribe: concurrent first calls would take two connections
            self._pubsub = pubsub
            self._reader = asyncio.create_task(self._read(), name="atelier-job-waiters")

    async def _join(self, job_id: str) -> _Watch:
        watch = self._watches.get(job_id)
        if watch is not None:
            watch.waiters += 1
            watch.idle_since = None
            return watch
        loop = asyncio.get_running_loop()
        channel = self.store.events_key(job_id)
        watch = _Watch(job_id, channel, loop.create_future(), loop.create_future(), waiters=1)
        self._watches[job_id] = watch
        self._by_channel[channel] = watch
        assert self._pubsub is not None
        try:
            await self._pubsub.subscribe(channel)
        except Exception:  # noqa: BLE001 - the periodic re-read still answers the waiters
            log.warning("could not subscribe to job %s's events; its waiters rely on re-reads", job_id,
                        exc_info=True)
            if not watch.subscribed.done():
                watch.subscribed.set_result(None)
                self._check(watch)
        return watch

    def _leave(self, watch: _Watch) -> None:
        watch.waiters -= 1
        if watch.waiters <= 0:
            watch.idle_since = asyncio.get_running_loop().time()

    async def _read(self) -> None:
        """Take the subscription's messages; re-read watched jobs now and then; drop idle channels."""
        assert self._pubsub is not None
        loop = asyncio.get_running_loop()
        next_recheck = loop.time() + RECHECK_SECONDS
        backoff = 0.1
        while True:
            try:
                message = await self._pubsub.get_message(timeout=1.0)
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - Redis went away: the client reconnects and subscribes again
                log.warning("job waiters lost their subscription; reconnecting", exc_info=True)
                await asyncio.sleep(backoff)
                backoff = min(2.0, backoff * 2)
                next_recheck = 0.0  # events may have been missed meanwhile
                message = None
            if message is not None:
                self._on_message(message)
            now = loop.time()
            if now >= next_recheck:
                next_recheck = now + RECHECK_SECONDS
                self._spawn(self._recheck())
                await self._drop_strays()
            await self._drop_idle(now)

    def _on_message(self, message: dict[str, Any]) -> None:
        channel = message.get("channel")
        name = channel.decode() if isinstance(channel, bytes) else str(channel)
        watch = self._by_channel.get(name)
        if watch is None:
            return
        if message.get("type") == "subscribe":
            if not watch.subscribed.done():
                watch.subscribed.set_result(None)
                self._check(watch)  # after subscribing: an event before it is not missed
        elif message.get("type") == "message":
            self._check(watch)

    async def _drop_idle(self, now: float) -> None:
        """Unsubscribe channels nobody waits on any more (only confirmed ones: each ``subscribe``
        confirmation then belongs to the channel's current watch)."""
        idle = [w for w in self._watches.values()
                if w.idle_since is not None and now - w.idle_since >= IDLE_SECONDS and w.subscribed.done()]
        if not idle:
            return
        for watch in idle:
            del self._watches[watch.job_id]
            del self._by_channel[watch.channel]
        assert self._pubsub is not None
        try:
            await self._pubsub.unsubscribe(*(w.channel for w in idle))
        except Exception:  # noqa: BLE001 - a dropped connection drops its subscriptions too
            log.warning("could not unsubscribe from %d job channels", len(idle), exc_info=True)

    async def _drop_strays(self) -> None:
        """Unsubscribe channels the client still holds but no watch has: an unsubscribe lost with the
        connection is subscribed again by the client when it reconnects."""
        assert self._pubsub is not None
        pending = self._pubsub.pending_unsubscribe_channels
        strays = [c for c in self._pubsub.channels if c not in pending
                  and (c.decode() if isinstance(c, bytes) else str(c)) not in self._by_channel]
        if strays:
            with contextlib.suppress(Exception):
                await self._pubsub.unsubscribe(*strays)

    # -- reading the jobs -------------------------------------------------------------------
    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _check(self, watch: _Watch) -> None:
        """Read the job once for all its waiters (a burst of events: at most one read in flight, then one more)."""
        if watch.finished.done():
            return
        if watch.checking:
            watch.again = True
            return
        watch.checking = True
        self._spawn(self._check_job(watch))

    async def _check_job(self, watch: _Watch) -> None:
        try:
            while True:
                watch.again = False
                async with self._reads:
                    job = await self.store.get(watch.job_id)
                if job is None or job.status.terminal:
                    _resolve(watch, job)
                    return
                if not watch.again:
                    return
        except Exception:  # noqa: BLE001 - the periodic re-read tries again
            log.warning("could not read job %s for its waiters", watch.job_id, exc_info=True)
        finally:
            watch.checking = False

    async def _now(self, watch: _Watch) -> Job | None:
        """The job as it is now, read once for the waiters whose wait ends together."""
        if watch.finished.done():
            return watch.finished.result()
        if watch.reading is None or watch.reading.done():
            watch.reading = asyncio.get_running_loop().create_future()
            self._spawn(self._read_now(watch, watch.reading))
        return await asyncio.shield(watch.reading)

    async def _read_now(self, watch: _Watch, into: asyncio.Future[Job | None]) -> None:
        try:
            async with self._reads:
                job = await self.store.get(watch.job_id)
        except asyncio.CancelledError:
            into.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - its waiters raise it (the API's error handling answers)
            into.set_exception(exc)
            into.exception()  # marked retrieved: no warning when every waiter left meanwhile
            return
        into.set_result(job)

    async def _recheck(self) -> None:
        """Read every watched, unfinished job (pipelined): the safety net under the messages."""
        pending = [w for w in self._watches.values() if not w.finished.done() and w.waiters > 0]
        for start in range(0, len(pending), READ_CHUNK):
            chunk = pending[start:start + READ_CHUNK]
            try:
                async with self._reads:
                    jobs = await self.store.get_many([w.job_id for w in chunk])
            except Exception:  # noqa: BLE001 - the next round tries again
                log.warning("could not re-read %d waited-on jobs", len(chunk), exc_info=True)
                return
            for watch, job in zip(chunk, jobs, strict=True):
                if job is None or job.status.terminal:
                    _resolve(watch, job)


def _resolve(watch: _Watch, job: Job | None) -> None:
    if not watch.finished.done():
        watch.finished.set_result(job)


async def job_waiters(request: Request, rt: RuntimeDep) -> JobWaiters:
    """The process's ``JobWaiters`` (made on first use; ``close_waiters`` ends it with the app)."""
    found: JobWaiters | None = getattr(request.app.state, "job_waiters", None)
    if found is None:
        found = JobWaiters(rt.redis, rt.store)
        request.app.state.job_waiters = found
    return found


async def close_waiters(state: Any) -> None:
    found: JobWaiters | None = getattr(state, "job_waiters", None)
    if found is not None:
        await found.close()


# -- the request side -----------------------------------------------------------------------------
@dataclass
class Waiting:
    """How long a request asked to wait for its job to finish (``None``: not at all)."""

    seconds: int | None
    waiters: JobWaiters | None
    preference: bool = False  # asked with ``Prefer: wait=N`` (answered with ``Preference-Applied``)

    async def answer(self, rt: Runtime, view: JobView, response: Response | None = None) -> JobView:
        """``view``, or the job once it finished (then 200) if that happens within the wait; else the job
        as it is then (the status code the route set stays: 202 for a new job)."""
        if self.seconds is None or self.waiters is None:
            return view
        if self.preference and response is not None:
            response.headers["Preference-Applied"] = f"wait={self.seconds}"
        if view.status.terminal or self.seconds == 0:
            if view.status.terminal and response is not None:
                response.status_code = 200
            return view
        job = await self.waiters.until_finished(view.id, self.seconds)
        if job is None:  # deleted meanwhile: what was last seen
            return view
        if job.status.terminal and response is not None:
            response.status_code = 200
        return await rt.jobs.view(job)


NO_WAIT = Waiting(None, None)  # a route function called directly (the dashboard): no waiting


def parse_prefer_wait(value: str | None) -> int | None:
    """``wait`` of a ``Prefer`` header (RFC 7240: comma-separated preferences, ``;`` parameters, the
    first ``wait`` counts, others are ignored). Raises ``ValueError`` saying what is wrong."""
    if not value:
        return None
    for item in value.split(","):
        name, _, rest = item.split(";", 1)[0].strip().partition("=")
        if name.strip().lower() != "wait":
            continue
        raw = rest.strip().strip('"').strip()
        if not raw.isdigit() or not raw.isascii():
            raise ValueError(f"wait must be a whole number of seconds from 0 to {MAX_WAIT_SECONDS} "
                             f"(got {rest.strip()[:40]!r})")
        seconds = int(raw)
        if seconds > MAX_WAIT_SECONDS:
            raise ValueError(f"wait is at most {MAX_WAIT_SECONDS} seconds (got {seconds})")
        return seconds
    return None


PreferHeader = Annotated[str | None, Header(
    alias="Prefer", max_length=1000,
    description=f"`wait=N` (N at most {MAX_WAIT_SECONDS} seconds, RFC 7240): hold the answer until the job "
                "finishes, at most N seconds. A finished job comes back with 200 (outputs included), one "
                "still working with 202 as without the header; `Preference-Applied: wait=N` says it was "
                "honoured. Other preferences are ignored.")]
WaitQuery = Annotated[int | None, Query(
    ge=0, le=MAX_WAIT_SECONDS,
    description=f"Hold the answer until the job finishes, at most this many seconds (up to "
                f"{MAX_WAIT_SECONDS}); the job comes back as it is then (200 either way: read `status`).")]


async def prefer_wait(prefer: PreferHeader = None, waiters: JobWaiters = Depends(job_waiters)) -> Waiting:  # noqa: B008
    try:
        seconds = parse_prefer_wait(prefer)
    except ValueError as exc:
        raise Problem(422, "Invalid request", f"Prefer: {exc}",
                      errors=[{"field": "Prefer", "message": str(exc)}]) from exc
    return Waiting(seconds, waiters, preference=True)


async def query_wait(wait: WaitQuery = None, waiters: JobWaiters = Depends(job_waiters)) -> Waiting:  # noqa: B008
    return Waiting(wait, waiters, preference=False)


PREFERENCE_APPLIED = {"Preference-Applied": {"description": "`wait=N` when the request's `Prefer: wait=N` "
                                                             "was honoured", "schema": {"type": "string"}}}
PreferWait = Annotated[Waiting, Depends(prefer_wait)]
QueryWait = Annotated[Waiting, Depends(query_wait)]
