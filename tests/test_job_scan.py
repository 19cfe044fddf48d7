"""The dashboard's filtered job list reads the store through ``store/job_scan.py``: the stored JSON is
matched before it is parsed, and the parsed job decides (real Redis, jobs made through the real API)."""

from __future__ import annotations

import redis

from orchestrator.cli.devstack import Stack
from orchestrator.store.job_scan import newest_matching
from orchestrator.store.jobs import JobStore
from tests.helpers import api, submit


async def test_lookalikes_in_metadata_do_not_match_and_pages_follow_the_cursor(stack: Stack) -> None:
    async with api(stack) as client:
        decoy = await submit(client, metadata={"provider": "fal", "kind": "video", "model": "fal-ai/flux/schnell"})
        fal = [await submit(client, provider="fal", model="fal-ai/flux/schnell", input={"prompt": f"p{i}"})
               for i in range(3)]
        other = await submit(client)
    r = redis.asyncio.Redis.from_url(stack.settings.redis_url)
    try:
        store = JobStore(r)
        found = await newest_matching(store, "dev", provider="fal", model="fal-ai/flux/schnell")
        assert [j.id for j in found.jobs] == [j["id"] for j in reversed(fal)]
        assert decoy["id"] not in {j.id for j in found.jobs}
        first = await newest_matching(store, "dev", provider="fal", limit=2)
        assert [j.id for j in first.jobs] == [fal[2]["id"], fal[1]["id"]] and first.next_cursor == fal[1]["id"]
        rest = await newest_matching(store, "dev", provider="fal", cursor=first.next_cursor, limit=2)
        assert [j.id for j in rest.jobs] == [fal[0]["id"]]
        assert (await newest_matching(store, "dev", kind="video")).jobs == []
        # A value the stored JSON would spell with escapes is matched after parsing only, never missed.
        assert (await newest_matching(store, "dev", model='a "quoted" model')).jobs == []
        everything = await newest_matching(store, "dev")
        assert {j.id for j in everything.jobs} == {decoy["id"], other["id"], *(j["id"] for j in fal)}
        # At most scan_limit entries are read; the cursor says where the next reading starts.
        capped = await newest_matching(store, "dev", provider="nobody", scan_limit=2)
        assert capped.jobs == [] and capped.next_cursor == fal[2]["id"]  # read: other, fal[2]
        assert (await newest_matching(store, "other-tenant")).jobs == []
    finally:
        await r.aclose()
