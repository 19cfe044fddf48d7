"""The poller: takes due polls from the poll boards (``orchestrator/polls.py``) and runs them.

One runs in every worker process. Each round is one Lua call for all boards, which hands out
only what each key's request budget allows now, best candidates first, so with tens of
thousands of jobs waiting on one key the budget, not the schedule, sets the pace, and no 429
is self-inflicted. Polls run here as tasks, not arq jobs: a waiting job holds no worker slot and
costs no queue entry, and a poll lost with its process is found by the sweeper after the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Coroutine
from typing import Any

from orchestrator.services.runtime import Runtime
from orchestrator.store.polls import WAKE_CHANNEL, Board
from workers.poll import poll, poll_group, retry_polls

log = logging.getLogger("atelier.poller")

IDLE_SECONDS = 0.1  # the longest pause between rounds (a callback wakes the poller at once, via pub/sub)
BUSY_SECONDS = 0.02  # between rounds while a budget holds back due polls
BOARDS_REFRESH_SECONDS = 0.5  # a key's first poll may wait this long for its board to be seen
# A popped poll's owner has the provider request's timeout plus this long before the sweeper steps in.
LEASE_MARGIN_SECONDS = 15.0
# A grouped read (Suno gateway: 50 tasks per request) also takes polls due within this long.
GROUP_EARLY_SECONDS = 1.0
RETRY_SECONDS = 1.0  # a poll that crashed (e.g. Redis restarting) is retried after this


class Poller:
    def __init__(self, rt: Runtime, concurrency: int) -> None:
        self.rt = rt
        self.concurrency = max(1, concurrency)
        self.lease = rt.settings.http_timeout_seconds + LEASE_MARGIN_SECONDS
        self.running: set[asyncio.Task[None]] = set()
        self._boards: list[Board] = []
        self._boards_at = 0.0
        self.woken = asyncio.Event()  # a callback woke a job: start the next round now

    async def boards(self) -> list[Board]:
        if time.monotonic() - self._boards_at > BOARDS_REFRESH_SECONDS:
            boards = []
            for name, key_id in await self.rt.polls.boards():
                provider = self.rt.registry.get(name)
                if provider is not None:
                    group = provider.fetch_group_size
                    boards.append(Board(name, key_id, rpm=provider.settings.rpm, group=group,
                                        early=GROUP_EARLY_SECONDS if group > 1 else 0.0,
                                        spare=self.rt.settings.poll_spare_budget))
            self._boards, self._boards_at = boards, time.monotonic()
        return self._boards

    async def round(self) -> float:
        """Take and start what is due; returns how long to pause before the next round."""
        free = self.concurrency - len(self.running)
        boards = await self.boards()
        if free <= 0 or not boards:
            return IDLE_SECONDS
        taken = await self.rt.polls.take([dataclasses.replace(b, max_jobs=free * b.group) for b in boards],
                                         self.lease)
        pause = IDLE_SECONDS
        now = time.time()
        for t in taken:
            group = t.board.group
            for start in range(0, len(t.polls), group):
                chunk = t.polls[start:start + group]
                self._start(chunk, poll_group(self.rt, chunk) if group > 1
                            else poll(self.rt, chunk[0][0], chunk[0][1]))
            if t.backlog:
                pause = BUSY_SECONDS
            elif t.next_due is not None:
                pause = min(pause, max(0.0, t.next_due - now))
        return pause

    def _start(self, polls: list[tuple[str, int]], work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(self._guard(polls, work))
        self.running.add(task)
        task.add_done_callback(self.running.discard)

    async def _guard(self, polls: list[tuple[str, int]], work: Coroutine[Any, Any, None]) -> None:
        try:
            await asyncio.wait_for(work, self.lease - 5)
        except Exception:
            log.exception("a poll failed; retrying it shortly", extra={"event": "poll.crashed"})
            # Put it back (a newer poll, if one was scheduled meanwhile, wins); if even that fails,
            # the sweeper finds the job after the lease.
            with contextlib.suppress(Exception):
                await retry_polls(self.rt, polls, RETRY_SECONDS)

    async def listen(self, stop: asyncio.Event) -> None:
        """Set ``woken`` whenever a callback puts a job first in line (through Redis restarts)."""
        while not stop.is_set():
            pubsub = self.rt.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(WAKE_CHANNEL)
                while not stop.is_set():
                    if await pubsub.get_message(timeout=1.0) is not None:
                        self.woken.set()
            except Exception:  # noqa: BLE001 - Redis restarting: the rounds still run, only slower to wake
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def run(self, stop: asyncio.Event) -> None:
        listener = asyncio.create_task(self.listen(stop))
        try:
            await self._rounds(stop)
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    async def _rounds(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.woken.clear()
            try:
                pause = await self.round()
            except Exception:  # Redis restarting: keep going, as the arq workers do
                log.warning("poll round failed; retrying", exc_info=True, extra={"event": "poll.round_failed"})
                pause = 1.0
            if len(self.running) >= self.concurrency:
                await asyncio.wait(set(self.running), timeout=IDLE_SECONDS, return_when=asyncio.FIRST_COMPLETED)
                continue
            if pause > 0 and not self.woken.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.woken.wait(), pause)

    async def drain(self, timeout: float) -> None:
        """Let running polls finish (shutdown); what is still running after ``timeout`` is cancelled."""
        if self.running:
            await asyncio.wait(set(self.running), timeout=timeout)
        for task in list(self.running):
            task.cancel()
