"""The poll board: when each waiting job is next read at its provider, and which due job goes
first when the key's request budget cannot read them all.

Per provider and API key (``atl:polls:{provider}:{key_id}:*``):

``due``    ZSET  job id -> when its schedule says to read it next (ms)
``ready``  ZSET  job id -> its rank among due jobs (lowest first): a job a callback woke first,
                 then by expected finish (submitted + the model's typical duration, so the job most
                 likely done is read first), jobs expecting a callback last
``meta``   HASH  job id -> ``"{poll seq}:{rank}"``

One pending poll per job, whatever races happen: a job is one member, and a schedule with an
older poll sequence never replaces a newer one. ``take`` runs in one Lua script for every board:
it moves due jobs to ``ready``, works out how many requests the key's budget allows now (the same
GCRA key submits spend, ``atl:rate:{provider}:{key_id}``), pops that many (times the group size
for providers that read many tasks per request), spends the budget, and marks the popped jobs in
the sweeper's index as "being polled". Several workers can take from one board: none exceeds the
budget, and no job is handed out twice.

While a job waits on the board the sweeper leaves it alone (its ``atl:active`` score is far
ahead): the board is as durable as the rest of the job's state. Once popped, the job is
the poller's for ``lease`` seconds; a worker killed mid-poll is found by the sweeper after that.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from redis.asyncio import Redis

from orchestrator.schedule import CALLBACK_OFFSET

P = "atl:"
BOARDS = f"{P}pollboards"
WAKE_CHANNEL = f"{P}polls:wake"  # published when a callback wakes a job, so a poller need not wait a round
# While on the board the sweeper need not look: the board itself holds the work.
ON_BOARD_MARGIN = 6 * 3600.0

_PUT = """
local old = redis.call('HGET', KEYS[3], ARGV[1])
if old then
  local old_seq = tonumber(string.match(old, '^(%d+):'))
  if old_seq and old_seq > tonumber(ARGV[2]) then return 0 end
end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2] .. ':' .. ARGV[4])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[4], 'XX', ARGV[5], ARGV[1])
redis.call('SADD', KEYS[5], ARGV[6])
if tonumber(ARGV[4]) < 0 then redis.call('PUBLISH', KEYS[6], ARGV[6]) end
return 1
"""

_FORGET = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return 1
"""

# KEYS: per board due, ready, meta, rate; then the sweeper's index last.
# ARGV: now_ms, lease_ms, callback_offset, then per board: interval_ms (0: no budget), burst_ms, group,
#       max_jobs, early_ms, spare (1: spend unused budget on polls not due yet).
# Returns per board: {taken: {id, seq, id, seq, ...}, next_due_ms or -1, ready_left}.
_TAKE = """
local now = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
local callback_offset = tonumber(ARGV[3])
local active = KEYS[#KEYS]
local out = {}
for b = 0, (#KEYS - 1) / 4 - 1 do
  local due, ready, meta, rate = KEYS[b*4+1], KEYS[b*4+2], KEYS[b*4+3], KEYS[b*4+4]
  local interval = tonumber(ARGV[4 + b*6])
  local burst = tonumber(ARGV[5 + b*6])
  local group = tonumber(ARGV[6 + b*6])
  local max_jobs = tonumber(ARGV[7 + b*6])
  local early = tonumber(ARGV[8 + b*6])
  local spare = tonumber(ARGV[9 + b*6])
  local moved = redis.call('ZRANGEBYSCORE', due, '-inf', now + early, 'LIMIT', 0, 2000)
  for _, id in ipairs(moved) do
    local m = redis.call('HGET', meta, id)
    local rank = 0
    if m then rank = tonumber(string.match(m, ':(.+)$')) or 0 end
    redis.call('ZADD', ready, rank, id)
    redis.call('ZREM', due, id)
  end
  local tokens = math.floor(max_jobs / group)
  local by_budget = false  -- spend what the budget leaves on polls not due yet
  local tat = tonumber(redis.call('GET', rate) or now)
  if interval > 0 then
    if tat < now then tat = now end
    local allowed = math.floor((now + burst - tat) / interval) + 1
    if allowed < 0 then allowed = 0 end
    if allowed < tokens then tokens = allowed end
    by_budget = spare == 1
  elseif tat > now then
    tokens = 0  -- no budget, but the key is paused (a provider's Retry-After)
  end
  local taken = {}
  local function take(id, from)
    local m = redis.call('HGET', meta, id)
    redis.call('HDEL', meta, id)
    redis.call('ZREM', from, id)
    taken[#taken + 1] = id
    taken[#taken + 1] = m and string.match(m, '^(%d+):') or '0'
    redis.call('ZADD', active, 'XX', now + lease, id)
  end
  if tokens > 0 then
    -- Jobs a callback woke (negative ranks) may use the whole allowance.
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', ready, '-inf', '(0', 'LIMIT', 0, tokens * group)) do
      take(id, ready)
    end
    -- Scheduled polls leave half the burst to submissions: a job not yet submitted waits for nothing
    -- but the budget, a waiting job's poll is only a check (and reads many jobs per request).
    local reserve = 0
    if interval > 0 then reserve = math.floor(burst / interval / 2) end
    local left = (tokens - reserve) * group - #taken / 2
    if left > 0 then
      local popped = redis.call('ZRANGE', ready, 0, left - 1)
      for _, id in ipairs(popped) do take(id, ready) end
      left = left - #popped
    end
    -- Budget left over: read waiting jobs before their schedule says, earliest due first, but only
    -- those due within the time the budget needs to read every waiting job once (so no job is read
    -- more often than its share), and never jobs expecting a callback.
    if by_budget and left > 0 then
      local horizon = (redis.call('ZCARD', due) + redis.call('ZCARD', ready)) * interval / group
      local soon = redis.call('ZRANGEBYSCORE', due, '-inf', now + horizon, 'LIMIT', 0, left * 2)
      for _, id in ipairs(soon) do
        if left <= 0 then break end
        local m = redis.call('HGET', meta, id)
        local rank = m and tonumber(string.match(m, ':(.+)$')) or 0
        if rank < callback_offset then
          take(id, due)
          left = left - 1
        end
      end
    end
    local requests = math.ceil((#taken / 2) / group)
    if interval > 0 and requests > 0 then
      redis.call('SET', rate, tat + requests * interval, 'PX', math.ceil(burst + (requests + 1) * interval))
    end
  end
  local first = redis.call('ZRANGE', due, 0, 0, 'WITHSCORES')
  local next_due = -1
  if #first == 2 then next_due = tonumber(first[2]) end
  out[#out + 1] = {taken, next_due, redis.call('ZCARD', ready)}
end
return out
"""


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


def _keys(provider: str, key_id: str) -> tuple[str, str, str]:
    base = f"{P}polls:{provider}:{key_id}"
    return f"{base}:due", f"{base}:ready", f"{base}:meta"


def rate_key(provider: str, key_id: str) -> str:
    """The key's GCRA request budget, shared with submits (``orchestrator.throttle``)."""
    return f"{P}rate:{provider}:{key_id}"


def ms(seconds: float) -> int:
    return int(seconds * 1000)


class PollBoard:
    def __init__(self, redis: Redis, active_key: str) -> None:
        self.redis = redis
        self.active_key = active_key
        self._put = redis.register_script(_PUT)
        self._forget = redis.register_script(_FORGET)
        self._take = redis.register_script(_TAKE)

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
        keys: list[str] = []
        args: list[float | int | str] = [ms(now), ms(lease), f"{CALLBACK_OFFSET:.0f}"]
        for board in boards:
            keys.extend([*_keys(board.provider, board.key_id), rate_key(board.provider, board.key_id)])
            interval = 60_000 / board.rpm if board.rpm else 0
            args.extend([interval, interval * max(0, board.burst - 1), max(1, board.group), board.max_jobs,
                         ms(board.early), int(board.spare)])
        keys.append(self.active_key)
        replies = await self._take(keys=keys, args=args)
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
