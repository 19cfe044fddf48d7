"""The poll board: when each waiting job is next read at its provider, and which due job goes
first when the key's request budget cannot read them all.

Per provider and API key (``keys.poll_board``):

``due``    ZSET  job id -> when its schedule says to read it next (ms)
``ready``  ZSET  job id -> its rank among due jobs (lowest first): a job a callback woke first,
                 then by expected finish (submitted + the model's typical duration, so the job most
                 likely done is read first), jobs expecting a callback last
``meta``   HASH  job id -> ``"{poll seq}:{rank}"``

One pending poll per job, whatever races happen: a job is one member, and a schedule with an
older poll sequence never replaces a newer one. ``take`` runs in one Lua script for every board:
it moves due jobs to ``ready``, works out how many requests the key's budget allows now (the same
GCRA key submits spend, ``keys.rate``), pops that many (times the group size
for providers that read many tasks per request), spends the budget, and marks the popped jobs in
the sweeper's index as "being polled". Several workers can take from one board: none exceeds the
budget, and no job is handed out twice.

While a job waits on the board the sweeper leaves it alone (its ``keys.ACTIVE`` score is far
ahead): the board is as durable as the rest of the job's state. Once popped, the job is
the poller's for ``lease`` seconds; a worker killed mid-poll is found by the sweeper after that.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from redis.asyncio import Redis

from orchestrator.domain.schedule import CALLBACK_OFFSET
from orchestrator.store import keys
from orchestrator.store.scripts import script

BOARDS = keys.POLL_BOARDS
WAKE_CHANNEL = keys.POLL_WAKE_CHANNEL  # published when a callback wakes a job, so a poller need not wait a round
# While on the board the sweeper need not look: the board itself holds the work.
ON_BOARD_MARGIN = 6 * 3600.0





@dataclass(frozen=True)
class Board:
    """One provider key's board, with what ``take`` needs to know about its budget."""

    provider: str
    key_id: str
    rpm: float | None = None  # the key's request budget; None: no budget
    burst: int = 5
    group: int = 1  # jobs one status request can read
    max_jobs: int = 500  # per take, when the budget does not limit it
    # Grouped reads: also take polls due this soon, so one request reads them together.
    early: float = 0.0
    # Spend budget the due polls leave unused on jobs not due yet (see _TAKE).
    spare: bool = True

    @property
    def name(self) -> str:
        return f"{self.provider}:{self.key_id}"


@dataclass
class Taken:
    board: Board
    polls: list[tuple[str, int]]  # (job id, poll seq)
    next_due: float | None  # seconds since the epoch, None when nothing is scheduled
    backlog: int  # due jobs the budget could not read yet


_keys = keys.poll_board
rate_key = keys.rate  # the key's GCRA request budget, shared with submits (``orchestrator.store.throttle``)


def ms(seconds: float) -> int:
    return int(seconds * 1000)


class PollBoard:
    def __init__(self, redis: Redis, active_key: str) -> None:
        self.redis = redis
        self.active_key = active_key
        self._put = script(redis, "poll_put")
        self._forget = script(redis, "poll_forget")
        self._take = script(redis, "poll_take")

    async def put(self, provider: str, key_id: str | None, job_id: str, seq: int, at: float, rank: float) -> bool:
        """Schedule poll ``seq`` of ``job_id`` at ``at`` (epoch seconds); replaces an older pending one.

        ``False`` when a newer poll is already scheduled.
        """
        key_id = key_id or "-"
        due, ready, meta = _keys(provider, key_id)
        done = await self._put(keys=[due, ready, meta, self.active_key, BOARDS, WAKE_CHANNEL],
                               args=[job_id, seq, ms(at), f"{rank:.0f}", ms(at + ON_BOARD_MARGIN),
                                     f"{provider}:{key_id}"])
        return bool(done)

    async def forget(self, provider: str, key_id: str | None, job_id: str) -> None:
        """Drop a finished job's pending poll, so it spends no request."""
        await self._forget(keys=list(_keys(provider, key_id or "-")), args=[job_id])

    async def boards(self) -> list[tuple[str, str]]:
        """Every (provider, key id) that ever had a poll scheduled."""
        names = await self.redis.smembers(BOARDS)  # type: ignore[misc]
        pairs = []
        for raw in names:
            name = raw.decode() if isinstance(raw, bytes) else str(raw)
            provider, _, key_id = name.partition(":")
            pairs.append((provider, key_id))
        return sorted(pairs)

    async def take(self, boards: Iterable[Board], lease: float, now: float | None = None) -> list[Taken]:
        """Pop the polls that are due and that each key's budget allows now (see the module doc)."""
        boards = list(boards)
        if not boards:
            return []
        now = time.time() if now is None else now
        board_keys: list[str] = []
        args: list[float | int | str] = [ms(now), ms(lease), f"{CALLBACK_OFFSET:.0f}"]
        for board in boards:
            board_keys.extend([*_keys(board.provider, board.key_id), rate_key(board.provider, board.key_id)])
            interval = 60_000 / board.rpm if board.rpm else 0
            args.extend([interval, interval * max(0, board.burst - 1), max(1, board.group), board.max_jobs,
                         ms(board.early), int(board.spare)])
        board_keys.append(self.active_key)
        replies = await self._take(keys=board_keys, args=args)
        taken = []
        for board, (flat, next_due, backlog) in zip(boards, replies, strict=True):
            ids = [x.decode() if isinstance(x, bytes) else str(x) for x in flat]
            polls = [(ids[i], int(ids[i + 1])) for i in range(0, len(ids), 2)]
            due_at = None if int(next_due) < 0 else int(next_due) / 1000
            taken.append(Taken(board, polls, due_at, int(backlog)))
        return taken


async def counts(redis: Redis) -> dict[str, tuple[int, int]]:
    """Per provider (over its keys): polls scheduled for later, and polls due waiting for budget."""
    names = sorted((raw.decode() if isinstance(raw, bytes) else str(raw))
                   for raw in await redis.smembers(BOARDS))  # type: ignore[misc]
    pipe = redis.pipeline(transaction=False)
    for name in names:
        provider, _, key_id = name.partition(":")
        due, ready, _ = _keys(provider, key_id)
        pipe.zcard(due)
        pipe.zcard(ready)
    values = [int(v) for v in await pipe.execute()] if names else []
    totals: dict[str, tuple[int, int]] = {}
    for i, name in enumerate(names):
        provider = name.partition(":")[0]
        scheduled, waiting = totals.get(provider, (0, 0))
        totals[provider] = (scheduled + values[2 * i], waiting + values[2 * i + 1])
    return totals
