"""A subscribers sync that changes more than ``loader.subscriber_step_share`` of the list
swaps it in by steps (issue 19: Redis holds at most about 1.5 lists during a sync): each
step a generation of its own, the buckets it replaced deleted before the next step
writes; calls switch subscriber by subscriber, never answer from a lost bucket; an admin
write made between two steps is kept; a sync stopped between steps leaves a whole step
live, and the next sync completes the list (docs/subscribers.md)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from core import bucket_gens, keys
from core.config import Config
from core.subscribers import SubscriberStore
from loader.sync import SyncOptions, sync_list
from tests.helpers import wait_for
from tests.test_subscriber_generations import SUBSCRIBERS, blocked_by, rows
from tests.test_subscribers import PERSONAL, answer, subscribers_config

QUIET = SyncOptions(progress="off")
#: Replacing every entry is past the removal guard: the operator forces it.
FORCED = SyncOptions(progress="off", force=True)
TOKEN = "subscriber-steps-admin-token-0123456"
#: Every subscriber's entry replaced: the change touches every bucket the list uses.
NEW = {s: "1516777" + s[-4:] for s in SUBSCRIBERS}
OLD = {s: blocked_by(s) for s in SUBSCRIBERS}


def steps_config(wait_s: float) -> dict[str, Any]:
    # 300 subscribers are about 3 % of what the list's 16,384 bucket keys cost Redis: a
    # step share of 1 % makes this change go in by steps (three), as half of a large
    # list's would.
    return subscribers_config(
        cache={"refresh_ms": 50},
        loader={
            "subscriber_step_share": 0.01,
            "subscriber_step_wait_s": wait_s,
            "subscriber_step_min_mb": 0,  # steps for this small list too
        },
    )


async def bucket_key_count(redis: Redis) -> int:
    return len(await redis.keys("{cs:personal:*}:sub:*"))


async def meta_int(redis: Redis, field: str) -> int:
    return int(await redis.hget(keys.meta("personal"), field) or 0)


async def block_of(redis: Redis, subscriber: str) -> list[str]:
    _, entries, lost = await SubscriberStore(redis).read_marked("personal", subscriber)
    assert not lost, f"{subscriber}'s bucket read as lost"
    return list(entries.as_dict()["block"])


def rewrite(source: Path, pairs: dict[str, str]) -> None:
    source.write_text(rows(pairs))


def used_buckets() -> int:
    return len({keys.subscriber_bucket_of(s) for s in SUBSCRIBERS})


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """The list's source, holding OLD (each test syncs it, then rewrites it as NEW)."""
    source = tmp_path / "personal.csv"
    rewrite(source, OLD)
    return source


async def test_a_wide_change_is_swapped_in_by_steps_within_the_memory_bound(
    redis: Redis,
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
    source: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = make_config(steps_config(wait_s=1.0), base_dir=tmp_path)
    await sync_list(redis, config, "personal", QUIET)
    version = await meta_int(redis, "version")
    client = await make_client(config, redis_client=redis)
    assert await answer(client, OLD[SUBSCRIBERS[0]], SUBSCRIBERS[0]) == PERSONAL
    rewrite(source, NEW)
    caplog.set_level(logging.INFO, logger="core.build.subscribers")
    sync = asyncio.create_task(sync_list(redis, config, "personal", FORCED))
    most_keys = 0
    sample = SUBSCRIBERS[::30]
    switched: set[str] = set()
    while not sync.done():
        most_keys = max(most_keys, await bucket_key_count(redis))
        for subscriber in sample:
            # A subscriber answers from its old entry until its step is live, then from
            # its new one, and never from neither (a lost or deleted bucket).
            old_blocked = await answer(client, OLD[subscriber], subscriber) == PERSONAL
            new_blocked = await answer(client, NEW[subscriber], subscriber) == PERSONAL
            assert old_blocked or new_blocked, f"{subscriber} answered from no list"
            if subscriber in switched:
                assert not old_blocked, f"{subscriber} went back to its old entries"
            if new_blocked and not old_blocked:
                switched.add(subscriber)
    report = await sync
    assert report.outcome == "success"
    steps = [r.getMessage() for r in caplog.records if " swapped in (" in r.getMessage()]
    assert steps and steps[0].startswith("list 'personal': step 1 of ")
    # One version a step, the last one being the sync's own commit.
    assert await meta_int(redis, "version") == version + len(steps) + 1
    # Beside the live list's 16,384 bucket keys Redis never held more than a step's
    # buckets, about a third of those changed here (one swap would hold all of them).
    extra = most_keys - keys.SUBSCRIBER_BUCKETS
    assert len(steps) + 1 >= 3
    assert 0 < extra <= 0.5 * used_buckets(), (extra, used_buckets())
    # Every subscriber has its new entries, and no key the live map names expires.
    for subscriber in SUBSCRIBERS:
        assert await block_of(redis, subscriber) == [NEW[subscriber]]
    gen = await meta_int(redis, "gen")
    gens = await bucket_gens.read(redis, "personal", gen)
    for subscriber in SUBSCRIBERS:
        key = gens.key("personal", keys.subscriber_bucket_of(subscriber))
        assert await redis.ttl(key) == -1
    assert await answer(client, NEW[SUBSCRIBERS[-1]], SUBSCRIBERS[-1]) == PERSONAL


async def test_an_admin_write_made_between_two_steps_is_kept(
    redis: Redis,
    make_config: Callable[..., Config],
    make_client: Callable[..., Any],
    source: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CALLSCREEN_ADMIN_TOKENS", TOKEN)
    config = make_config(steps_config(wait_s=2.0), base_dir=tmp_path)
    await sync_list(redis, config, "personal", QUIET)
    version = await meta_int(redis, "version")
    client = await make_client(config, redis_client=redis)
    # The subscriber in the highest bucket is written by the last step.
    last = max(SUBSCRIBERS, key=keys.subscriber_bucket_of)
    rewrite(source, NEW)
    sync = asyncio.create_task(sync_list(redis, config, "personal", FORCED))

    async def first_step_live() -> bool:
        return await meta_int(redis, "version") > version

    await wait_for(first_step_live, timeout_s=30.0, what="the first step's swap")
    assert not sync.done()
    response = await client.put(
        f"/v1/lists/personal/subscribers/{last}/entries/15165550199",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert response.status == 200, await response.text()
    assert (await sync).outcome == "success"
    assert await block_of(redis, last) == sorted([NEW[last], "15165550199"])
    assert await answer(client, "15165550199", last) == PERSONAL


async def test_a_sync_stopped_between_steps_leaves_a_step_live_and_the_next_completes(
    redis: Redis,
    make_config: Callable[..., Config],
    source: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = make_config(steps_config(wait_s=30.0), base_dir=tmp_path)
    await sync_list(redis, config, "personal", QUIET)
    rewrite(source, NEW)
    caplog.set_level(logging.INFO, logger="core.build.subscribers")
    sync = asyncio.create_task(sync_list(redis, config, "personal", FORCED))

    async def waiting() -> bool:  # logged as the step begins its wait
        return any(" swapped in (" in r.getMessage() for r in caplog.records)

    await wait_for(waiting, timeout_s=30.0, what="the first step's swap")
    sync.cancel()  # as a loader stopped while it waits to delete what the step replaced
    with contextlib.suppress(asyncio.CancelledError):
        await sync
    # The list is the first step's generation: some subscribers new, the rest old,
    # none lost; the lock is free and no half-built generation is left building.
    now = {s: await block_of(redis, s) for s in SUBSCRIBERS}
    moved = [s for s in SUBSCRIBERS if now[s] == [NEW[s]]]
    assert 0 < len(moved) < len(SUBSCRIBERS)
    assert all(now[s] == [OLD[s]] for s in SUBSCRIBERS if s not in moved)
    assert not await redis.hexists(keys.meta("personal"), "building")
    assert not await redis.exists(keys.lock("personal"))

    config = make_config(steps_config(wait_s=0.5), base_dir=tmp_path)
    report = await sync_list(redis, config, "personal", FORCED)
    assert report.outcome == "success"  # not skipped as an unchanged source
    for subscriber in SUBSCRIBERS:
        assert await block_of(redis, subscriber) == [NEW[subscriber]]


async def test_a_change_under_the_step_floor_goes_in_one_swap(
    redis: Redis, make_config: Callable[..., Config], source: Path, tmp_path: Path
) -> None:
    """Below ``loader.subscriber_step_min_mb`` (16 MB by default) a change of every
    bucket is one swap, as before steps existed: a small list's second copy is small."""
    data = steps_config(wait_s=30.0)
    del data["loader"]["subscriber_step_min_mb"]
    config = make_config(data, base_dir=tmp_path)
    await sync_list(redis, config, "personal", QUIET)
    version = await meta_int(redis, "version")
    rewrite(source, NEW)
    report = await sync_list(redis, config, "personal", FORCED)
    assert report.outcome == "success"
    assert await meta_int(redis, "version") == version + 1
    for subscriber in SUBSCRIBERS:
        assert await block_of(redis, subscriber) == [NEW[subscriber]]
