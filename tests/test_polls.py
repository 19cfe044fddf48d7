"""The poll board: one pending poll per job, budget-limited hand-out in order of how likely a job
is done, grouped reads (Suno gateway), and callbacks first. Real Redis, real HTTP."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import pytest
from redis.asyncio import Redis

from orchestrator.cli.devstack import dev_stack
from orchestrator.domain.job import Job
from orchestrator.domain.schedule import CALLBACK_OFFSET, poll_rank, woken_rank
from orchestrator.store.polls import ON_BOARD_MARGIN, Board, PollBoard
from orchestrator.wire.jobs import JobInput, JobKind
from providers.contract import ProviderSettings
from providers.replicate import ReplicateProvider
from tests.helpers import api, submit, wait_for

ACTIVE = "atl:test-active"


@pytest.fixture
async def board(redis_url: str):
    redis = Redis.from_url(redis_url)
    prefix = f"t{time.monotonic_ns()}"
    try:
        yield PollBoard(redis, ACTIVE), redis, prefix
    finally:
        await redis.aclose()


async def test_one_pending_poll_per_job_and_newer_sequence_wins(board):
    polls, redis, p = board
    now = time.time()
    assert await polls.put(p, "k", "job_a", 2, now - 1, 10)
    assert not await polls.put(p, "k", "job_a", 1, now - 1, 10), "an older poll must not replace a newer one"
    assert await polls.put(p, "k", "job_a", 3, now - 1, 10)  # the newer one replaces the pending one
    taken = await polls.take([Board(p, "k")], lease=60)
    assert taken[0].polls == [("job_a", 3)]
    assert (await polls.take([Board(p, "k")], lease=60))[0].polls == [], "handed out once only"


async def test_budget_limits_the_hand_out_and_picks_the_likeliest_done_first(board):
    polls, redis, p = board
    now = time.time()
    # Expected finish (rank): job_old long ago, job_new later, job_cb expects a callback.
    await polls.put(p, "k", "job_new", 1, now - 5, now * 1000 + 50_000)
    await polls.put(p, "k", "job_cb", 1, now - 5, now * 1000 - 90_000 + CALLBACK_OFFSET)
    await polls.put(p, "k", "job_old", 1, now - 1, now * 1000 - 60_000)
    await polls.put(p, "k", "job_later", 1, now + 60, 0)  # not due yet, however urgent
    b = Board(p, "k", rpm=60, burst=2)  # 1 request/s, 2 at once
    first = await polls.take([b], lease=60, now=now)
    assert [job for job, _ in first[0].polls] == ["job_old", "job_new"]
    assert first[0].backlog == 1
    assert (await polls.take([b], lease=60, now=now + 0.5))[0].polls == [], "the budget is spent"
    later = await polls.take([b], lease=60, now=now + 1.01)
    assert [job for job, _ in later[0].polls] == ["job_cb"], "callback-expecting jobs come last"
    assert later[0].next_due == pytest.approx(now + 60, abs=0.01)


async def test_woken_job_jumps_the_line_and_grouped_reads_spend_one_request_each(board):
    polls, redis, p = board
    now = time.time()
    for i in range(7):
        await polls.put(p, "k", f"job_{i}", 1, now - 1, now * 1000 + i)
    await polls.put(p, "k", "job_woken_before", 1, now - 30, woken_rank(now - 30))  # e.g. a "started" callback
    await polls.put(p, "k", "job_woken", 1, now, woken_rank(now))  # the freshest news first
    b = Board(p, "k", rpm=60, burst=2, group=3)
    taken = (await polls.take([b], lease=60, now=now))[0]
    assert [job for job, _ in taken.polls] == ["job_woken", "job_woken_before", "job_0", "job_1", "job_2", "job_3"]
    assert taken.backlog == 3  # 2 requests x 3 jobs; three wait for the next request


async def test_sweeper_index_follows_the_board(board):
    polls, redis, p = board
    now = time.time()
    await redis.zadd(ACTIVE, {"job_s": 1})
    await polls.put(p, "k", "job_s", 1, now, 1)
    on_board = await redis.zscore(ACTIVE, "job_s")
    assert on_board == pytest.approx((now + ON_BOARD_MARGIN) * 1000, abs=50), "the board holds it"
    await polls.take([Board(p, "k")], lease=30, now=now)
    assert await redis.zscore(ACTIVE, "job_s") == pytest.approx((now + 30) * 1000, abs=50), "leased"
    await polls.put(p, "k", "job_f", 1, now, 1)
    await polls.forget(p, "k", "job_f")
    assert (await polls.take([Board(p, "k")], lease=30, now=now + 1))[0].polls == []


async def test_suno_gateway_polls_are_grouped_into_batch_fetches(redis_url):
    async with dev_stack(redis_url=redis_url, poll_min_seconds=0.3, log_format="text") as stack, \
            api(stack) as client:
        jobs = [(await submit(client, provider="suno", kind="audio", model="chirp-v4",
                              input={"prompt": f"song {i} [sim:run=2]"}))["id"] for i in range(12)]
        results = [await wait_for(client, job_id, timeout=60) for job_id in jobs]
        stats = stack.simulators["suno"].stats.requests
    assert [j["status"] for j in results] == ["succeeded"] * 12, results
    assert stats["batch_fetch"] >= 1, stats
    # Twelve jobs waiting ~2 s with polls every >= 0.3 s: one at a time would take dozens of reads.
    assert stats["fetch"] == 0, "no single fetches: every due Suno poll went into POST /suno/fetch"
    assert stats["batch_fetch"] < 12 * 3


async def test_many_jobs_on_one_budget_never_exceed_it(redis_url):
    rpm = 180  # 3 requests/s, burst 5
    async with dev_stack(redis_url=redis_url, replicate_rpm=rpm, poll_min_seconds=0.1,
                         log_format="text") as stack, api(stack) as client:
        sim = stack.simulators["replicate"]
        seen: list[tuple[float, int]] = []

        async def watch() -> None:
            while True:
                seen.append((time.monotonic(), sim.stats.requests["create"] + sim.stats.requests["get"]))
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch())
        try:
            ids = [(await submit(client, input={"prompt": f"p{i} [sim:run=1]"}))["id"] for i in range(10)]
            results = [await wait_for(client, job_id, timeout=60) for job_id in ids]
        finally:
            watcher.cancel()
    assert all(j["status"] == "succeeded" for j in results)
    # Over any window, requests <= burst + rate * window (a little slack for sampling).
    for i, (t0, n0) in enumerate(seen):
        for t1, n1 in seen[i + 1:]:
            assert n1 - n0 <= 5 + 1 + rpm / 60 * (t1 - t0), f"{n1 - n0} requests in {t1 - t0:.2f}s"


async def test_a_paused_key_hands_out_nothing_until_the_pause_ends(board):
    polls, redis, p = board
    now = time.time()
    await polls.put(p, "k", "job_p", 1, now - 1, 1)
    await redis.set(f"atl:rate:{p}:k", int((now + 2) * 1000))  # what Throttle.pause leaves
    assert (await polls.take([Board(p, "k")], lease=30, now=now))[0].polls == []
    assert (await polls.take([Board(p, "k", rpm=600)], lease=30, now=now + 1))[0].polls == []
    assert (await polls.take([Board(p, "k")], lease=30, now=now + 2.5))[0].polls == [("job_p", 1)]


async def test_spare_budget_reads_jobs_before_their_schedule_within_their_share(board):
    polls, redis, p = board
    now = time.time()
    await polls.put(p, "k", "job_a", 1, now + 2, 1)
    await polls.put(p, "k", "job_b", 1, now + 3, 1)
    await polls.put(p, "k", "job_cb", 1, now + 1, 1 + CALLBACK_OFFSET)  # polling is only a safety net
    await polls.put(p, "k", "job_far", 1, now + 100, 1)  # beyond 4 jobs x 1 s: not its turn
    b = Board(p, "k", rpm=60, burst=5)  # 5 at once, 2 of them kept for submissions and due polls
    taken = (await polls.take([b], lease=30, now=now))[0]
    assert [job for job, _ in taken.polls] == ["job_a", "job_b"]
    assert (await polls.take([Board(p, "k", rpm=60, burst=5, spare=False)], lease=30, now=now))[0].polls == []


def test_typical_duration_and_poll_rank_per_model_else_per_kind():
    provider = ReplicateProvider(ProviderSettings(name="replicate", base_url="http://x",
                                                  typical_seconds={"video": 120, "minimax/video-01": 300}))
    at = datetime(2026, 11, 25, tzinfo=UTC)

    def job(model: str, callback_expected: bool = False) -> Job:
        return Job(id="job_t", tenant="t", provider="replicate", kind=JobKind.video, model=model,
                   input=JobInput(prompt="x"), timestamps={"submitted": at}, callback_expected=callback_expected)

    assert provider.typical_seconds("video", "minimax/video-01") == 300
    assert provider.typical_seconds("video", "other/video") == 120
    assert poll_rank(provider, job("other/video")) == (at.timestamp() + 120) * 1000
    # Expecting a callback: after every job that does not, however late.
    late = poll_rank(provider, job("minimax/video-01"))
    assert poll_rank(provider, job("other/video", callback_expected=True)) > late


async def test_scheduled_polls_leave_half_the_burst_to_submissions_woken_ones_do_not(board):
    polls, redis, p = board
    now = time.time()
    for i in range(6):
        await polls.put(p, "k", f"job_{i}", 1, now - 1, now * 1000 + i)
    await polls.put(p, "k", "job_woken", 1, now, woken_rank(now))
    b = Board(p, "k", rpm=60, burst=5, spare=False)  # 5 requests at once; 2 kept for submissions
    taken = (await polls.take([b], lease=60, now=now))[0]
    assert [job for job, _ in taken.polls] == ["job_woken", "job_0", "job_1"]
    for i in range(6):
        await polls.put(p, "k2", f"job_w{i}", 1, now, woken_rank(now - i))
    woken = (await polls.take([Board(p, "k2", rpm=60, burst=5)], lease=60, now=now))[0]
    assert len(woken.polls) == 5, "callbacks may use the whole allowance"
